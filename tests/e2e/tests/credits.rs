//! Money-like behaviour through real Envoys and real key/credits-service
//! instances: never overdrawn under concurrency, never charged for the
//! server's failure, consistent after a crash, revocation and rate limits
//! that hold across workers and replicas.
//!
//! The database is chosen by `DIALTONE_E2E_BACKEND`: `sqlite` (the default,
//! `make e2e`) or `postgres` (`make pg`), which needs `DIALTONE_E2E_PG_URL`
//! (`scripts/with-postgres.sh` sets it) and fails without it rather than
//! fall back to SQLite. With the switch unset, a `DIALTONE_E2E_PG_URL` alone
//! also selects PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dialtone_e2e::{bearer, concurrent_posts, devstack, key_cache_ttl, raw_request_complete, wait_for, Conn, EnvoyStats, Resp, TestStack, CACHE_CLOCK_SLACK};
use serde_json::{json, Value};

const PAID: &str = "/echo/paid/work";
const BROKE_BODY: &str = r#"{"success":false,"error":"insufficient_credits","credits":0,"required":1}"#;
const UNAVAILABLE_BODY: &str = r#"{"success":false,"error":"credits_unavailable"}"#;
/// A failure deadline for events that take milliseconds on a healthy machine.
const PATIENCE: Duration = Duration::from_secs(120);

/// Where the tests' data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Backend {
    Sqlite,
    /// The server's URL (its `dialtone` database).
    Postgres(String),
}

fn backend() -> Backend {
    let url = std::env::var("DIALTONE_E2E_PG_URL").ok().filter(|u| !u.is_empty());
    match std::env::var("DIALTONE_E2E_BACKEND").ok().filter(|b| !b.is_empty()).as_deref() {
        Some("postgres") => Backend::Postgres(url.unwrap_or_else(|| {
            panic!("DIALTONE_E2E_BACKEND=postgres needs DIALTONE_E2E_PG_URL (run through scripts/with-postgres.sh, as `make pg` does)")
        })),
        Some("sqlite") => Backend::Sqlite,
        Some(other) => panic!("DIALTONE_E2E_BACKEND={other:?}: expected `sqlite` or `postgres`"),
        None => url.map_or(Backend::Sqlite, Backend::Postgres),
    }
}

/// The database for the test called `name`: `None` is a SQLite file of its
/// own; on PostgreSQL, a database of its own on the server.
fn database(name: &str) -> Option<String> {
    let Backend::Postgres(base) = backend() else { return None };
    // One database per test, created on the server (tests run in parallel).
    let db = format!("e2e_{name}_{}", std::process::id());
    let out = std::process::Command::new("psql")
        .args([&base, "-v", "ON_ERROR_STOP=1", "-c", &format!("CREATE DATABASE {db}")])
        .output()
        .expect("psql");
    assert!(out.status.success(), "creating {db}: {}", String::from_utf8_lossy(&out.stderr));
    let (prefix, _) = base.rsplit_once('/').expect("a postgres URL ends in /DBNAME");
    eprintln!("{name}: PostgreSQL database {db}");
    Some(format!("{prefix}/{db}"))
}

fn ledger_check(t: &TestStack) -> String {
    let out = t.stack.cli(&["check"]).unwrap_or_else(|e| panic!("ledger check failed: {e}"));
    assert!(out.starts_with("ok"), "{out}");
    out
}

/// A paid request; the response is read as soon as it is complete (not
/// when Envoy closes the connection, up to a second later after a refusal).
fn send_paid(port: u16, key: &str, extra: &[(&str, &str)]) -> Resp {
    let auth = bearer(key);
    let mut h: Vec<(&str, &[u8])> = vec![("authorization", auth.as_bytes())];
    h.extend(extra.iter().map(|(k, v)| (*k, v.as_bytes())));
    raw_request_complete(port, "POST", PAID, &h, Some(b"{}"))
}

/// N = 200 concurrent paid requests on B = 50 credits, spread over two Envoys
/// (2 workers each) in front of two credits-service instances on one
/// database: exactly 50 succeed, the rest get the exact 402, nothing is lost.
///
/// All 200 holds queue on one account's row lock; on a loaded machine (and
/// on PostgreSQL) the last ones wait a second or more. The callout timeout
/// is raised from 1 s to 10 s so that the queue, not the clock, decides: a
/// timed-out hold is a 503 that leaves an orphan hold behind (correct, fail
/// closed, but not what this test counts). Timeouts have their own tests
/// (gate.rs).
#[test]
fn concurrent_paid_requests_never_overdraw() {
    const N: usize = 200;
    const B: u64 = 50;
    let mut t = TestStack::start_full("concurrency", |cfg| cfg["credits_service"]["timeout_ms"] = json!(10_000), |o| {
        o.concurrency = 2;
        o.extra_credits = vec![devstack::free_port()?];
        o.database = database("concurrency");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let second = t.stack.add_envoy().unwrap();
    t.stack.create_account("did:privy:crowd", B).unwrap();
    let key = t.stack.create_key("did:privy:crowd", &["sms:send"], &[]).unwrap();
    let results = concurrent_posts(&[t.stack.opts.ports.listen, second], PAID, &key, N);
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
        let r = send_paid(port, &key, &[("x-demo-status", status)]);
        assert_eq!(r.status.to_string(), status, "{}", r.body);
        assert_eq!(t.stack.balance("did:privy:careful").unwrap(), 5, "charged for a {status}");
    }
    let r = send_paid(port, &key, &[]);
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
/// lookup that long, never longer. The bound runs from the lookup that filled
/// the cache, and the tests measure it from events they see without racing:
/// a lookup's answer reaches the filter after its request was sent and
/// before its response came back.
///
/// 1. The cache is real: on one keep-alive connection (one VM), a key is
///    looked up, revoked, and asked for again within the TTL of the lookup's
///    request: it is served from the cache (a `cache.key.hit`, 200) though
///    revoked; past the TTL of the lookup's response, it is refused.
/// 2. The bound holds everywhere: two Envoys (two workers each) are hammered
///    with a key from before its revoke on; every request sent later than
///    the TTL after the last lookup that can have seen the key active (the
///    last response to a request sent before the revoke committed) is 401.
#[test]
fn revocation_takes_effect_within_the_cache_ttl_everywhere() {
    let mut t = TestStack::start_full("revocation", |_| {}, |o| {
        o.concurrency = 2;
        o.database = database("revocation");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let ttl = key_cache_ttl(&t.stack.opts.plugin_config);
    let second = t.stack.add_envoy().unwrap();
    t.stack.create_account("did:privy:rev", 100).unwrap();
    let (first, admin) = (t.stack.opts.ports.listen, t.stack.opts.ports.admin);
    // Through the service's admin API (what an operator's tooling calls): it
    // commits before it answers, and costs no process start.
    let credits = t.stack.opts.ports.credits;
    let revoke = |key: &str| {
        let auth = bearer(dialtone_e2e::ADMIN_KEY);
        let r = raw_request_complete(credits, "POST", &format!("/v1/admin/keys/{}/revoke", &key[10..18]), &[("authorization", auth.as_bytes())], None);
        assert_eq!(r.status, 200, "revoke: {}", r.body);
    };
    let key_stats = || {
        let s = EnvoyStats::read(admin, "dialtone.cache.key");
        (s.value("dialtone.cache.key.hit"), s.value("dialtone.cache.key.miss"))
    };

    // --- 1. A hit after the revoke, then the refusal past the bound. The
    // hit is certain only if the second request reached the filter within
    // the TTL of the first one's sending; on a machine too slow for that,
    // try again with a fresh key (each attempt is checked either way).
    let mut conn = Conn::open(first);
    let deadline = Instant::now() + PATIENCE;
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(Instant::now() < deadline, "{attempts} attempts, none within the {ttl:?} TTL: the machine is too slow");
        let key = t.stack.create_key("did:privy:rev", &["sms:send"], &[]).unwrap();
        let auth = bearer(&key);
        let (hit0, miss0) = key_stats();
        let sent = Instant::now();
        let r = conn.get("/api/v1/account", &[("authorization", &auth)]);
        let answered = Instant::now();
        assert_eq!(r.status, 200, "{}", r.body);
        revoke(&key);
        let r = conn.get("/api/v1/account", &[("authorization", &auth)]);
        if sent.elapsed() + CACHE_CLOCK_SLACK >= ttl {
            // Hit or refusal are both right this late: just the right answers.
            assert!(r.status == 200 || r.body.contains("API key revoked"), "{r:?}");
            eprintln!("revocation: attempt {attempts} took {:?}, past the TTL: again", sent.elapsed());
            continue;
        }
        assert_eq!(r.status, 200, "revoked, but within the TTL of its lookup: served from the cache: {}", r.body);
        assert_eq!(key_stats(), (hit0 + 1, miss0 + 1), "one lookup, then one cache hit");
        // Past the TTL of the lookup's answer (which came before `answered`).
        let bound = answered + ttl + CACHE_CLOCK_SLACK;
        std::thread::sleep(bound.saturating_duration_since(Instant::now()));
        let r = conn.get("/api/v1/account", &[("authorization", &auth)]);
        assert_eq!(r.assert_refusal(401, "unauthorized")["message"], "API key revoked");
        assert_eq!(key_stats(), (hit0 + 1, miss0 + 2), "past the TTL the key was looked up again");
        break;
    }
    drop(conn);

    // --- 2. Everywhere, under load.
    let key = t.stack.create_key("did:privy:rev", &["sms:send"], &[]).unwrap();
    for port in [first, second] {
        for _ in 0..4 {
            assert_eq!(t.get_from(port, "/api/v1/account", &key).status, 200);
        }
    }
    let auth = bearer(&key);
    let stop = Arc::new(AtomicBool::new(false));
    type Seen = Vec<(Instant, Instant, Resp)>;
    let seen: Arc<Vec<Mutex<Seen>>> = Arc::new((0..4).map(|_| Mutex::new(Vec::new())).collect());
    // Two clients per Envoy (its two workers), one request per connection.
    let clients: Vec<_> = [first, second, first, second]
        .into_iter()
        .enumerate()
        .map(|(i, port)| {
            let (auth, stop, seen) = (auth.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let sent = Instant::now();
                    let r = raw_request_complete(port, "GET", "/api/v1/account", &[("authorization", auth.as_bytes())], None);
                    seen[i].lock().unwrap().push((sent, Instant::now(), r));
                }
            })
        })
        .collect();
    let summary = || seen.iter().map(|c| c.lock().unwrap().len().to_string()).collect::<Vec<_>>().join("/") + " requests";
    // Every client served before the revoke.
    wait_for("each client served before the revoke", PATIENCE, || seen.iter().all(|c| !c.lock().unwrap().is_empty()).then_some(()), summary);
    let revoking = Instant::now();
    revoke(&key);
    let revoked = Instant::now();
    // A lookup that saw the key active was sent for a request sent before
    // the revoke committed (so before `revoked`), and answered before that
    // request's response. Once every client has sent a request after
    // `revoked`, all those responses are in.
    wait_for(
        "each client's requests sent before the revoke answered",
        PATIENCE,
        || seen.iter().all(|c| c.lock().unwrap().iter().any(|(sent, _, _)| *sent >= revoked)).then_some(()),
        summary,
    );
    let last_active_lookup = seen
        .iter()
        .flat_map(|c| c.lock().unwrap().iter().filter(|(sent, _, _)| *sent < revoked).map(|(_, answered, _)| *answered).collect::<Vec<_>>())
        .max()
        .unwrap();
    let bound = last_active_lookup + ttl + CACHE_CLOCK_SLACK;
    // Each client: five requests sent past the bound.
    wait_for(
        "five requests per client past the bound",
        PATIENCE,
        || seen.iter().all(|c| c.lock().unwrap().iter().filter(|(sent, _, _)| *sent > bound).count() >= 5).then_some(()),
        summary,
    );
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let seen: Vec<(Instant, Instant, Resp)> = seen.iter().flat_map(|c| c.lock().unwrap().clone()).collect();
    let ms = |a: Instant, b: Instant| a.saturating_duration_since(b).as_millis();
    for (sent, answered, r) in &seen {
        if *answered < revoking {
            assert_eq!(r.status, 200, "refused before the revoke: {}", r.body);
        } else if r.status != 200 {
            assert_eq!(r.assert_refusal(401, "unauthorized")["message"], "API key revoked");
        }
        if *sent > bound {
            assert_eq!(r.status, 401, "served though sent {} ms past the last active lookup (TTL {ttl:?})", ms(*sent, last_active_lookup));
        }
    }
    let served_after: Vec<u128> = seen.iter().filter(|(sent, _, r)| *sent >= revoked && r.status == 200).map(|(sent, _, _)| ms(*sent, revoked)).collect();
    eprintln!(
        "revocation: cached hit after the revoke in attempt {attempts}; under load {} requests, the revoke took {} ms, \
         the last active lookup was answered {} ms after it; {} served after it (the last sent {} ms after), {} refused past the bound",
        seen.len(),
        ms(revoked, revoking),
        ms(last_active_lookup, revoked),
        served_after.len(),
        served_after.iter().max().copied().unwrap_or(0),
        seen.iter().filter(|(sent, _, _)| *sent > bound).count(),
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
    assert_eq!(send_paid(first, &a, &[]).status, 200);
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
    assert_eq!(send_paid(second, &b, &[]).status, 429);
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
    // tokens[0]'s lookup was answered before this.
    let looked_up = Instant::now();
    t.stack.cli(&["key", "revoke", &tokens[0][6..14]]).unwrap();
    // The VM may reuse the token's lookup for key_cache_ttl_ms: the
    // revocation test proves that bound; here, wait it out.
    dialtone_e2e::wait_out_key_cache(looked_up, &t.stack.opts.plugin_config);
    let r = t.get_from(port, "/api/v1/account", &tokens[0]);
    assert_eq!(r.assert_refusal(401, "unauthorized")["message"], "API key revoked");
    let again = t.stack.create_key("did:privy:many", &["sms:send"], &["--kind", "api_token", "--expires", "30d"]).unwrap();
    assert_eq!(t.get_from(port, "/api/v1/account", &again).status, 200);
}

/// Where the crash test stands when a request is sent and when it is answered.
const UP: u8 = 0;
/// The service was killed, has exited, and its port refuses connections.
const DOWN: u8 = 1;
/// Being restarted (it may answer already).
const RESTARTING: u8 = 2;
/// Restarted and answering its health check.
const BACK: u8 = 3;

/// One request of the crash test's load.
#[derive(Debug, Clone)]
struct Sent {
    sent: u8,
    answered: u8,
    status: u16,
    body: String,
    /// The request id the upstream saw (served requests only): the hold's
    /// idempotency key is `echo_paid:<id>`.
    request_id: Option<String>,
}

/// The crash test's load, shared with its clients.
struct Load {
    phase: AtomicU8,
    stop: AtomicBool,
    sent: Mutex<Vec<Sent>>,
    more: Condvar,
}

impl Load {
    /// Waits until `enough` holds of the requests so far; panics after PATIENCE.
    fn wait(&self, what: &str, enough: impl Fn(&[Sent]) -> bool) {
        let guard = self.sent.lock().unwrap();
        let (guard, timeout) = self.more.wait_timeout_while(guard, PATIENCE, |s| !enough(s)).unwrap();
        if timeout.timed_out() {
            let by_phase: BTreeMap<(u8, u8, u16), usize> = guard.iter().fold(BTreeMap::new(), |mut m, s| {
                *m.entry((s.sent, s.answered, s.status)).or_default() += 1;
                m
            });
            panic!("{what}: not after {PATIENCE:?}; requests by (sent, answered, status): {by_phase:?}");
        }
    }
}

/// At most this many served requests (two ledger rows each): the whole
/// ledger of the run fits in one page of `account ledger` (1000 rows).
const MAX_SERVED: usize = 400;

/// kill -9 the credits service in the middle of a load run, restart it: no
/// request is served unpaid while it is down (each is the filter's own 503),
/// every served request is captured exactly once, nothing is lost or
/// doubled. Each step waits for what it needs (requests served, the process
/// gone and its port refusing, the service back), not for the clock.
#[test]
fn a_crashed_credits_service_loses_nothing() {
    // Short-lived holds: a hold whose capture or release was lost in the
    // crash must be released by the service soon, not in five minutes.
    // A callout timeout of 10 s (not 1 s): a loaded machine's slow hold is
    // not what this test is about; the crash shows as refused connections
    // and resets, not as timeouts.
    let edit = |cfg: &mut Value| {
        cfg["credits_service"]["hold_ttl_seconds"] = json!(2);
        cfg["credits_service"]["timeout_ms"] = json!(10_000);
    };
    let mut t = TestStack::start_full("crash", edit, |o| {
        o.concurrency = 2;
        o.database = database("crash");
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    const CREDITS: i64 = 10_000;
    t.stack.create_account("did:privy:load", CREDITS as u64).unwrap();
    let key = t.stack.create_key("did:privy:load", &["sms:send"], &[]).unwrap();
    let port = t.stack.opts.ports.listen;
    let load = Arc::new(Load { phase: AtomicU8::new(UP), stop: AtomicBool::new(false), sent: Mutex::new(Vec::new()), more: Condvar::new() });
    let served = |s: &[Sent]| s.iter().filter(|r| r.status == 200).count();
    // Two clients, paced a little (the load is not the point; the crash is).
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (load, auth) = (load.clone(), bearer(&key));
            std::thread::spawn(move || {
                while !load.stop.load(Ordering::SeqCst) {
                    let sent = load.phase.load(Ordering::SeqCst);
                    let r = raw_request_complete(port, "POST", PAID, &[("authorization", auth.as_bytes())], Some(b"{}"));
                    let answered = load.phase.load(Ordering::SeqCst);
                    let request_id = (r.status == 200).then(|| r.echoed_header("x-request-id").expect("the upstream saw a request id"));
                    let mut all = load.sent.lock().unwrap();
                    all.push(Sent { sent, answered, status: r.status, body: r.body, request_id });
                    let full = all.iter().filter(|r| r.status == 200).count() >= MAX_SERVED;
                    drop(all);
                    load.more.notify_all();
                    if full {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(4));
                }
            })
        })
        .collect();
    load.wait("20 requests served before the crash", |s| served(s) >= 20);
    t.stack.stop_credits(); // SIGKILL, as a crash; returns once the process has exited
    dialtone_e2e::wait_until_refused(t.stack.opts.ports.credits);
    load.phase.store(DOWN, Ordering::SeqCst);
    load.wait("20 requests sent and answered while the service was down", |s| {
        s.iter().filter(|r| r.sent == DOWN && r.answered == DOWN).count() >= 20
    });
    load.phase.store(RESTARTING, Ordering::SeqCst);
    t.stack.start_credits().unwrap();
    load.phase.store(BACK, Ordering::SeqCst);
    load.wait("20 requests served after the restart", |s| s.iter().filter(|r| r.sent == BACK && r.status == 200).count() >= 20);
    load.stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let sent = load.sent.lock().unwrap().clone();
    assert!(served(&sent) < MAX_SERVED, "the run served {MAX_SERVED} requests: its ledger may not fit in one page");

    // While the service was down, every request was refused by the filter
    // itself (not by Envoy, not served); before the crash, served (or, when
    // a callout failed twice in transport, the filter's own 503); around the
    // kill and the restart, served or 503.
    for r in &sent {
        match (r.sent, r.answered) {
            (DOWN, DOWN) => assert_eq!((r.status, r.body.as_str()), (503, UNAVAILABLE_BODY), "while the service was down"),
            (UP, UP) => assert!(r.status == 200 || (r.status, r.body.as_str()) == (503, UNAVAILABLE_BODY), "before the crash: {r:?}"),
            _ => assert!(r.status == 200 || r.status == 503, "{r:?}"),
        }
    }
    let served_before = sent.iter().filter(|r| (r.sent, r.answered) == (UP, UP) && r.status == 200).count();
    assert!(served_before >= 20, "{served_before} served before the crash");

    // Every request served was held and captured exactly once; a capture
    // without a served request can only be one whose confirmation was lost
    // (cut off by the crash, or a transport failure twice): the filter then
    // answers 503, never serves unpaid. None of those was sent and answered
    // while the service was down.
    let ledger: Value = serde_json::from_str(&t.stack.cli(&["--json", "account", "ledger", "did:privy:load", "--limit", "1000"]).unwrap()).unwrap();
    let entries = ledger["entries"].as_array().unwrap();
    assert!(entries.len() < 1000, "the ledger has more rows than one page shows");
    let mut holds: BTreeMap<String, String> = BTreeMap::new(); // hold id -> idempotency key
    for e in entries.iter().filter(|e| e["kind"] == "hold") {
        let idem = e["idempotency_key"].as_str().unwrap().to_owned();
        assert!(!holds.values().any(|k| *k == idem), "two holds for {idem}");
        holds.insert(e["hold_id"].as_str().unwrap().to_owned(), idem);
    }
    let mut captured: BTreeMap<&str, usize> = BTreeMap::new();
    for e in entries.iter().filter(|e| e["kind"] == "capture") {
        let hold = e["hold_id"].as_str().unwrap();
        *captured.entry(holds.get(hold).unwrap_or_else(|| panic!("capture of unknown hold {hold}")).as_str()).or_default() += 1;
    }
    let served_keys: BTreeSet<String> = sent.iter().filter_map(|r| r.request_id.as_ref()).map(|id| format!("echo_paid:{id}")).collect();
    assert_eq!(served_keys.len(), served(&sent), "request ids are unique");
    for k in &served_keys {
        assert_eq!(captured.get(k.as_str()), Some(&1), "served {k}: one capture");
    }
    let unserved_captures = captured.keys().filter(|k| !served_keys.contains(**k)).count();
    let cut_off = sent.iter().filter(|r| r.status != 200 && (r.sent, r.answered) != (DOWN, DOWN)).count();
    assert!(unserved_captures <= cut_off, "{unserved_captures} captures without a served request; {cut_off} refusals that may have held");
    let captures = captured.values().sum::<usize>() as i64;

    // Once the holds lost in the crash have expired and been released, the
    // credits spent are exactly the captures.
    let spent = wait_for(
        "the holds lost in the crash released",
        PATIENCE,
        || {
            let spent = CREDITS - t.stack.balance("did:privy:load").unwrap();
            (spent == captures).then_some(spent)
        },
        || format!("spent {}, captured {captures}", CREDITS - t.stack.balance("did:privy:load").unwrap()),
    );
    eprintln!(
        "crash run: {} requests, {} served and paid, {} refused while down, {} other 503s, {unserved_captures} paid but not served; {spent} credits spent",
        sent.len(),
        served(&sent),
        sent.iter().filter(|r| r.sent == DOWN && r.answered == DOWN).count(),
        cut_off,
    );
    ledger_check(&t);
}
