//! Money-like behaviour through real Envoys and real key/credits-service
//! instances: never overdrawn under concurrency, never charged for the
//! server's failure, consistent after a crash, revocation and rate limits
//! that hold across workers and replicas.
//!
//! The database is SQLite by default; with `DIALTONE_E2E_PG_URL` set (make
//! test sets it after starting PostgreSQL) these run on PostgreSQL, as
//! production would with several service instances.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dialtone_e2e::{bearer, devstack, raw_request, Resp, TestStack};
use serde_json::{json, Value};

const PAID: &str = "/echo/paid/work";
const BROKE_BODY: &str = r#"{"success":false,"error":"insufficient_credits","credits":0,"required":1}"#;

/// The database for these tests: PostgreSQL when the environment names one.
fn database(name: &str) -> Option<String> {
    let base = std::env::var("DIALTONE_E2E_PG_URL").ok().filter(|u| !u.is_empty())?;
    // One database per test, created on the server (tests run in parallel).
    let db = format!("e2e_{name}_{}", std::process::id());
    let out = std::process::Command::new("psql")
        .args([&base, "-v", "ON_ERROR_STOP=1", "-c", &format!("CREATE DATABASE {db}")])
        .output()
        .expect("psql");
    assert!(out.status.success(), "creating {db}: {}", String::from_utf8_lossy(&out.stderr));
    let (prefix, _) = base.rsplit_once('/').expect("a postgres URL ends in /DBNAME");
    Some(format!("{prefix}/{db}"))
}

fn ledger_check(t: &TestStack) -> String {
    let out = t.stack.cli(&["check"]).unwrap_or_else(|e| panic!("ledger check failed: {e}"));
    assert!(out.starts_with("ok"), "{out}");
    out
}

fn send_paid(t: &TestStack, port: u16, key: &str, extra: &[(&str, &str)]) -> Resp {
    let auth = bearer(key);
    let mut h = vec![("authorization", auth.as_str())];
    h.extend_from_slice(extra);
    t.send_to(port, "POST", PAID, &h, Some(b"{}"))
}

/// N = 200 concurrent paid requests on B = 50 credits, spread over two Envoys
/// (2 workers each) in front of two credits-service instances on one
/// database: exactly 50 succeed, the rest get the exact 402, nothing is lost.
#[test]
fn concurrent_paid_requests_never_overdraw() {
    const N: usize = 200;
    const B: u64 = 50;
    let mut t = TestStack::start_full("concurrency", |_| {}, |o| {
        o.concurrency = 2;
        o.extra_credits = vec![devstack::free_port()?];
        o.database = database("concurrency");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let second = t.stack.add_envoy().unwrap();
    t.stack.create_account("did:privy:crowd", B).unwrap();
    let key = t.stack.create_key("did:privy:crowd", &["sms:send"], &[]).unwrap();
    let ports = [t.stack.opts.ports.listen, second];
    let t = Arc::new(t);
    let results = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let (t, key, results) = (t.clone(), key.clone(), results.clone());
            let port = ports[i % 2];
            std::thread::spawn(move || {
                let r = send_paid(&t, port, &key, &[]);
                results.lock().unwrap().push((r.status, r.body));
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let results = results.lock().unwrap();
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let broke = results.iter().filter(|(s, b)| *s == 402 && b == BROKE_BODY).count();
    let other: Vec<_> = results.iter().filter(|(s, b)| *s != 200 && !(*s == 402 && b == BROKE_BODY)).collect();
    assert_eq!((ok, broke), (B as usize, N - B as usize), "unexpected answers: {other:?}");
    assert_eq!(t.stack.balance("did:privy:crowd").unwrap(), 0);
    ledger_check(&t);
}

/// Charge on success: an upstream that answers 500 leaves the balance as it was.
#[test]
fn the_server_s_failure_is_never_charged() {
    let t = TestStack::start_full("onsuccess", |_| {}, |o| {
        o.database = database("onsuccess");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    t.stack.create_account("did:privy:careful", 5).unwrap();
    let key = t.stack.create_key("did:privy:careful", &["sms:send"], &[]).unwrap();
    let port = t.stack.opts.ports.listen;
    for status in ["500", "503"] {
        let r = send_paid(&t, port, &key, &[("x-demo-status", status)]);
        assert_eq!(r.status.to_string(), status, "{}", r.body);
        assert_eq!(t.stack.balance("did:privy:careful").unwrap(), 5, "charged for a {status}");
    }
    let r = send_paid(&t, port, &key, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(t.stack.balance("did:privy:careful").unwrap(), 4);
    // Up-front routes still exist for whoever wants them: the ledger tells both apart.
    let ledger: Value = serde_json::from_str(&t.stack.cli(&["--json", "account", "ledger", "did:privy:careful"]).unwrap()).unwrap();
    let kinds: Vec<&str> = ledger["entries"].as_array().unwrap().iter().filter_map(|r| r["kind"].as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "release").count(), 2, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "capture").count(), 1, "{kinds:?}");
    ledger_check(&t);
}

/// A revoked key is refused within the lookup cache's TTL (500 ms by default,
/// at most 1 s) on every Envoy and worker: each VM reuses an active key's
/// lookup that long, never longer. Both Envoys are hammered from before the
/// revoke until well after it; every request sent later than the TTL after
/// the revoke returned must be 401.
#[test]
fn revocation_takes_effect_within_the_cache_ttl_everywhere() {
    const TTL_MS: u128 = 500;
    let mut t = TestStack::start_full("revocation", |_| {}, |o| {
        o.concurrency = 2;
        o.database = database("revocation");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let second = t.stack.add_envoy().unwrap();
    t.stack.create_account("did:privy:rev", 100).unwrap();
    let key = t.stack.create_key("did:privy:rev", &["sms:send"], &[]).unwrap();
    for port in [t.stack.opts.ports.listen, second] {
        for _ in 0..4 {
            assert_eq!(t.get_from(port, "/api/v1/account", &key).status, 200);
        }
    }
    let auth = bearer(&key);
    let start = Instant::now();
    let revoked_after = Arc::new(std::sync::OnceLock::<Duration>::new());
    // Two clients per Envoy (its two workers), from before the revoke to 1.5 s after.
    let clients: Vec<_> = [t.stack.opts.ports.listen, second, t.stack.opts.ports.listen, second]
        .into_iter()
        .map(|port| {
            let (auth, revoked_after) = (auth.clone(), revoked_after.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                loop {
                    let sent = start.elapsed();
                    if revoked_after.get().is_some_and(|r| sent > *r + Duration::from_millis(1500)) {
                        return seen;
                    }
                    let r = raw_request(port, "GET", "/api/v1/account", &[("authorization", auth.as_bytes())], None);
                    seen.push((sent, r.status));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    t.stack.cli(&["key", "revoke", &key[10..18]]).unwrap();
    let revoked = start.elapsed();
    revoked_after.set(revoked).unwrap();
    let seen: Vec<(Duration, u16)> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    let after: Vec<_> = seen.iter().filter(|(sent, _)| *sent > revoked).collect();
    let served_after: Vec<u128> =
        after.iter().filter(|(_, s)| *s == 200).map(|(sent, _)| (*sent - revoked).as_millis()).collect();
    for (sent, status) in &seen {
        assert!(*status == 200 || *status == 401, "unexpected status {status}");
        if *sent > revoked && (*sent - revoked).as_millis() > TTL_MS {
            assert_eq!(*status, 401, "a request sent {:?} after the revoke was served", *sent - revoked);
        }
    }
    assert!(after.iter().any(|(_, s)| *s == 401), "the revoked key was never refused");
    eprintln!(
        "revocation: {} requests after the revoke; {} served, the last sent {} ms after the revoke returned (bound: the {TTL_MS} ms cache TTL); {} refused",
        after.len(),
        served_after.len(),
        served_after.iter().max().copied().unwrap_or(0),
        after.len() - served_after.len()
    );
}

/// All requests of one account share one budget: two keys and a Privy session
/// of the same account draw from it, across two Envoys; other accounts don't.
#[test]
fn one_rate_limit_budget_per_account_across_keys_and_envoys() {
    let mut t = TestStack::start_full(
        "ratelimit",
        |cfg| cfg["rate_limit"] = json!({"requests": 4, "window_seconds": 3600, "burst": 4}),
        |o| {
            o.concurrency = 2;
            o.database = database("ratelimit");
            Ok(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let second = t.stack.add_envoy().unwrap();
    t.stack.create_account("did:privy:busy", 100).unwrap();
    t.stack.create_account("did:privy:calm", 100).unwrap();
    let a = t.stack.create_key("did:privy:busy", &["sms:send"], &[]).unwrap();
    let b = t.stack.create_key("did:privy:busy", &["sms:send"], &[]).unwrap();
    let calm = t.stack.create_key("did:privy:calm", &["sms:send"], &[]).unwrap();
    let first = t.stack.opts.ports.listen;
    assert_eq!(t.get_from(first, "/api/v1/account", &a).status, 200);
    assert_eq!(t.get_from(second, "/api/v1/account", &b).status, 200);
    assert_eq!(send_paid(&t, first, &a, &[]).status, 200);
    let session = t.privy_token("did:privy:busy");
    assert_eq!(t.get_from(second, "/api/v1/account", &session).status, 200);
    // The fifth request of the account, whichever key or Envoy: 429.
    for (port, cred) in [(first, &b), (second, &a), (first, &session)] {
        let r = t.get_from(port, "/api/v1/account", cred);
        r.assert_refusal(429, "rate_limited");
        assert_eq!(r.body, r#"{"success":false,"error":"rate_limited"}"#);
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=3600).contains(&retry), "{retry}");
    }
    // A rate-limited paid request is not charged.
    assert_eq!(send_paid(&t, second, &b, &[]).status, 429);
    assert_eq!(t.stack.balance("did:privy:busy").unwrap(), 99);
    // Another account has its own budget.
    assert_eq!(t.get_from(second, "/api/v1/account", &calm).status, 200);
}

/// At most 25 active API tokens per account; revoked and expired ones free a slot.
#[test]
fn twenty_five_active_tokens_per_account() {
    let t = TestStack::start_full("tokenlimit", |_| {}, |o| {
        o.database = database("tokenlimit");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    t.stack.create_account("did:privy:many", 10).unwrap();
    let tokens: Vec<String> = (0..25)
        .map(|_| t.stack.create_key("did:privy:many", &["sms:send"], &["--kind", "api_token", "--expires", "30d"]).unwrap())
        .collect();
    let err = t.stack.create_key("did:privy:many", &["sms:send"], &["--kind", "api_token", "--expires", "30d"]).unwrap_err();
    assert!(err.contains("25"), "{err}");
    // Every one of them works through Envoy.
    let port = t.stack.opts.ports.listen;
    for tok in tokens.iter().step_by(6) {
        assert_eq!(t.get_from(port, "/api/v1/account", tok).status, 200);
    }
    t.stack.cli(&["key", "revoke", &tokens[0][6..14]]).unwrap();
    // The VM may reuse the token's lookup for key_cache_ttl_ms (500 ms): the
    // revocation test proves that bound; here, wait it out.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(t.get_from(port, "/api/v1/account", &tokens[0]).status, 401);
    let again = t.stack.create_key("did:privy:many", &["sms:send"], &["--kind", "api_token", "--expires", "30d"]).unwrap();
    assert_eq!(t.get_from(port, "/api/v1/account", &again).status, 200);
}

/// kill -9 the credits service in the middle of a load run, restart it: no
/// request is served unpaid while it is down, nothing is lost or doubled.
#[test]
fn a_crashed_credits_service_loses_nothing() {
    // Short-lived holds: a hold whose capture or release was lost in the
    // crash must be released by the service soon, not in five minutes.
    let t = TestStack::start_full("crash", |cfg| cfg["credits_service"]["hold_ttl_seconds"] = json!(2), |o| {
        o.concurrency = 2;
        o.database = database("crash");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    t.stack.create_account("did:privy:load", 10_000).unwrap();
    let key = t.stack.create_key("did:privy:load", &["sms:send"], &[]).unwrap();
    let port = t.stack.opts.ports.listen;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let t = Arc::new(Mutex::new(t));
    // Two clients, paced, so the whole ledger of the run fits in one page.
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, statuses, key) = (stop.clone(), statuses.clone(), key.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && n < 2000 {
                    let r = dialtone_e2e::raw_request(port, "POST", PAID, &[("authorization", bearer(&key).as_bytes())], Some(b"{}"));
                    statuses.lock().unwrap().push(r.status);
                    n += 1;
                    std::thread::sleep(Duration::from_millis(4));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    t.lock().unwrap().stack.stop_credits(); // SIGKILL, as a crash
    let down_from = statuses.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(800));
    let down_to = statuses.lock().unwrap().len();
    t.lock().unwrap().stack.start_credits().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let statuses = statuses.lock().unwrap();
    let t = t.lock().unwrap();
    let ok = statuses.iter().filter(|s| **s == 200).count() as i64;
    assert!(statuses.iter().all(|s| *s == 200 || *s == 503), "{statuses:?}");
    // While it was down (a margin for requests in flight at the kill): only 503s.
    let margin = 8;
    let window = &statuses[(down_from + margin).min(down_to)..down_to];
    assert!(!window.is_empty() && window.iter().all(|s| *s == 503), "served while down: {window:?}");
    // Every 200 was paid exactly once: one capture per request served...
    let ledger: Value = serde_json::from_str(&t.stack.cli(&["--json", "account", "ledger", "did:privy:load", "--limit", "1000"]).unwrap()).unwrap();
    let entries = ledger["entries"].as_array().unwrap();
    assert!(entries.len() < 1000, "raise the ledger limit");
    let captures = entries.iter().filter(|e| e["kind"] == "capture").count() as i64;
    assert_eq!(captures, ok, "captures must equal requests served");
    // ...and once the holds lost in the crash have expired, the balance is
    // exactly what was served.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut balance = t.stack.balance("did:privy:load").unwrap();
    while 10_000 - balance != ok && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        balance = t.stack.balance("did:privy:load").unwrap();
    }
    eprintln!("crash run: {} requests, {ok} served and paid, {} refused with 503; balance {balance}", statuses.len(), statuses.len() as i64 - ok);
    assert_eq!(10_000 - balance, ok, "credits spent must equal requests served");
    ledger_check(&t);
}
