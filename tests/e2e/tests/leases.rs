//! Credit leases through real Envoys and the real key/credits service:
//! a client spending its last credits through another Envoy than the one
//! holding the leases still gets every credit (recall and return), an Envoy
//! killed with unreported spends loses at most the stated bound and never
//! overdraws, and near an empty balance no lease exists, so the seeds'
//! exact behaviour (N = 200 on B = 50) holds with leasing configured.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use dialtone_e2e::{bearer, concurrent_posts, devstack, raw_request_complete, wait_for, Resp, TestStack};
use serde_json::{json, Value};

const PAID: &str = "/echo/paid/work";
const BROKE_BODY: &str = r#"{"success":false,"error":"insufficient_credits","credits":0,"required":1}"#;
const PATIENCE: Duration = Duration::from_secs(120);

fn send_paid(port: u16, key: &str) -> Resp {
    let auth = bearer(key);
    raw_request_complete(port, "POST", PAID, &[("authorization", auth.as_bytes())], Some(b"{}"))
}

fn account(t: &TestStack, id: &str) -> Value {
    t.stack.account_admin(id).unwrap_or_else(|e| panic!("admin account: {e}"))
}

fn open_leases(v: &Value) -> usize {
    v["open_leases"].as_array().map_or(0, Vec::len)
}

fn ledger_check(t: &TestStack) {
    let out = t.stack.cli(&["check"]).unwrap_or_else(|e| panic!("ledger check failed: {e}"));
    assert!(out.starts_with("ok"), "{out}");
}

fn lease_config(credits: u64, report_ms: u64, ttl_seconds: u64, factor: u64) -> impl FnOnce(&mut Value) {
    move |cfg: &mut Value| {
        cfg["credits_service"]["lease"] =
            json!({"credits": credits, "report_ms": report_ms, "ttl_seconds": ttl_seconds, "min_balance_factor": factor});
    }
}

/// Spends through Envoy 1 until it holds a lease, then through Envoy 2
/// until the account is empty: every one of the B credits is served, the
/// refusals in between last only until the leases come back, and the ledger
/// has one row per charged request.
#[test]
fn the_last_credits_through_any_envoy_are_all_served() {
    const B: u64 = 200;
    let mut t = TestStack::start_full("lease-last", lease_config(10, 100, 3, 2), |o| {
        o.concurrency = 2;
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let second = t.stack.add_envoy().unwrap();
    let first = t.stack.opts.ports.listen;
    t.stack.create_account("did:privy:lessee", B).unwrap();
    let key = t.stack.create_key("did:privy:lessee", &["sms:send"], &[]).unwrap();
    let mut served = 0u64;
    // Envoy 1 until a lease is open.
    wait_for(
        "a lease held by Envoy 1",
        PATIENCE,
        || {
            let r = send_paid(first, &key);
            assert_eq!(r.status, 200, "{}", r.body);
            served += 1;
            (open_leases(&account(&t, "did:privy:lessee")) > 0).then_some(())
        },
        String::new,
    );
    for _ in 0..5 {
        assert_eq!(send_paid(first, &key).status, 200);
        served += 1;
    }
    // Envoy 2 until nothing is left anywhere.
    let mut longest_refusal = Duration::ZERO;
    let mut refused_since: Option<Instant> = None;
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < PATIENCE, "served {served} of {B}: {}", account(&t, "did:privy:lessee"));
        let r = send_paid(second, &key);
        match r.status {
            200 => {
                served += 1;
                if let Some(since) = refused_since.take() {
                    longest_refusal = longest_refusal.max(since.elapsed());
                }
            }
            402 => {
                assert_eq!(r.body, BROKE_BODY);
                refused_since.get_or_insert_with(Instant::now);
                let a = account(&t, "did:privy:lessee");
                if a["balance"] == 0 && a["held"] == 0 && open_leases(&a) == 0 {
                    break;
                }
                // Credits sit in a lease: wait for it to come back (an event
                // at the service, not a sleep of a guessed length).
                wait_for(
                    "leased credits to come back",
                    PATIENCE,
                    || {
                        let a = account(&t, "did:privy:lessee");
                        (a["balance"].as_i64() > Some(0) || a["held"] == 0).then_some(())
                    },
                    || account(&t, "did:privy:lessee").to_string(),
                );
            }
            other => panic!("{other}: {}", r.body),
        }
    }
    eprintln!("served {served} of {B}; the longest refusal while credits sat in a lease: {longest_refusal:?}");
    assert_eq!(served, B, "every credit is served, through whichever Envoy");
    assert_eq!(t.stack.balance("did:privy:lessee").unwrap(), 0);
    ledger_check(&t);
}

/// An Envoy killed (SIGKILL) with lease spends it has not reported: once
/// the service expires its leases, what was served minus what was charged
/// is at most the bound (workers × 2 leases × lease credits: a VM holds the
/// lease it spends and, once that runs low, the next), nothing was charged twice
/// (charged ≤ served), the balance is never negative and `check` passes.
#[test]
fn an_envoy_killed_with_unreported_spends_loses_at_most_the_bound() {
    const B: u64 = 100;
    const WORKERS: u64 = 2;
    const CREDITS: u64 = 10;
    // Reports every 2 s: the kill lands between two of them.
    let mut t = TestStack::start_full("lease-kill", lease_config(CREDITS, 2000, 10, 2), |o| {
        o.concurrency = WORKERS as u32;
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let port = t.stack.opts.ports.listen;
    t.stack.create_account("did:privy:crash", B).unwrap();
    let key = t.stack.create_key("did:privy:crash", &["sms:send"], &[]).unwrap();
    let mut served = 0u64;
    wait_for(
        "a lease",
        PATIENCE,
        || {
            assert_eq!(send_paid(port, &key).status, 200);
            served += 1;
            (open_leases(&account(&t, "did:privy:crash")) > 0).then_some(())
        },
        String::new,
    );
    for _ in 0..8 {
        let r = send_paid(port, &key);
        assert_eq!(r.status, 200, "{}", r.body);
        served += 1;
    }
    t.stack.kill_envoy();
    // The service closes the dead Envoy's leases at their expiry.
    wait_for(
        "the dead Envoy's leases to expire",
        PATIENCE,
        || (open_leases(&account(&t, "did:privy:crash")) == 0).then_some(()),
        || account(&t, "did:privy:crash").to_string(),
    );
    let balance = t.stack.balance("did:privy:crash").unwrap();
    assert!(balance >= 0);
    let charged = B - u64::try_from(balance).unwrap();
    assert_eq!(account(&t, "did:privy:crash")["held"], 0);
    const BOUND: u64 = WORKERS * 2 * CREDITS;
    eprintln!("served {served}, charged {charged}, lost {} (bound {BOUND})", served - charged.min(served));
    assert!(charged <= served, "charged {charged} for {served} served: double charge");
    assert!(served - charged <= BOUND, "lost {} > bound {BOUND}", served - charged);
    ledger_check(&t);
}

/// The seeds' exactness with leasing configured: B = 50 is below
/// min_balance_factor × credits (10 × 10), so no lease is granted and 200
/// concurrent requests through 2 Envoys × 2 workers serve exactly 50.
#[test]
fn near_an_empty_balance_no_lease_exists_and_exactly_the_balance_is_served() {
    const N: usize = 200;
    const B: u64 = 50;
    let mut t = TestStack::start_full(
        "lease-exact",
        |cfg| {
            cfg["credits_service"]["timeout_ms"] = json!(10_000);
            lease_config(10, 100, 3, 10)(cfg);
        },
        |o| {
            o.concurrency = 2;
            o.extra_credits = vec![devstack::free_port()?];
            Ok(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let second = t.stack.add_envoy().unwrap();
    t.stack.create_account("did:privy:crowd", B).unwrap();
    let key = t.stack.create_key("did:privy:crowd", &["sms:send"], &[]).unwrap();
    let results = concurrent_posts(&[t.stack.opts.ports.listen, second], PAID, &key, N);
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let broke = results.iter().filter(|(s, b)| *s == 402 && b == BROKE_BODY).count();
    assert_eq!((ok, broke), (B as usize, N - B as usize));
    assert_eq!(t.stack.balance("did:privy:crowd").unwrap(), 0);
    let ledger = t.stack.cli(&["account", "ledger", "did:privy:crowd", "--limit", "500", "--json"]).unwrap();
    assert!(!ledger.contains("\"lease\""), "no lease near an empty balance: {ledger}");
    ledger_check(&t);
}
