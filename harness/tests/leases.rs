//! Credit leases in the compiled filter: the root context asks for a lease
//! once an account shows credits to spare, paid requests then spend it with
//! no callout (charge on success: a failed upstream gives the credit back),
//! spends are reported on the tick with their idempotency keys, and a spent,
//! recalled or expiring lease is returned and requests fall back to
//! per-request holds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use dialtone_harness::{Action, CallAnswer, Outcome, Plugin};
use serde_json::{json, Value};
use std::time::Duration;

const SMS: &str = "/api/v1/sms/send";
const LEASE: &str = "lease_00000000000000000000000a";

/// The demo policy with leases of 5 credits, reported every 200 ms.
fn leasing() -> Plugin {
    let mut cfg = demo_config();
    cfg["credits_service"]["key_cache_ttl_ms"] = json!(1000);
    cfg["credits_service"]["lease"] = json!({"credits": 5, "report_ms": 200, "ttl_seconds": 30, "min_balance_factor": 4});
    let p = start(&cfg);
    assert_eq!(p.tick_period(), Duration::from_millis(200));
    p
}

fn granted(id: &str, balance: i64) -> CallAnswer {
    CallAnswer::json(200, &json!({"granted": true, "lease_id": id, "account": USER, "credits": 5, "balance": balance, "expires_at": NOW + 30, "ttl_seconds": 30, "replayed": false}))
}

fn report_answer(state: &str, recall: bool) -> CallAnswer {
    CallAnswer::json(200, &json!({"lease_id": LEASE, "account": USER, "state": state, "recall": recall, "balance": 90, "refused": []}))
}

/// One SMS with request id `id`; the upstream answers `upstream`. Returns
/// the callouts the request made (answered with `answers`, in order).
fn sms(p: &mut Plugin, id: &str, upstream: &str, answers: Vec<CallAnswer>) -> Vec<dialtone_harness::Callout> {
    let auth = format!("Bearer {API_KEY}");
    let mut s = p.http().unwrap();
    let headers = [(":method", "POST"), (":path", SMS), (":authority", "api.example.com"), (":scheme", "https"), ("x-request-id", id), ("authorization", auth.as_str())];
    s.request(&headers).unwrap();
    let mut made = Vec::new();
    let mut answers = answers.into_iter();
    while let Some(c) = s.pending_callouts().into_iter().next() {
        let a = answers.next().unwrap_or_else(|| panic!("{id}: unexpected callout {}", c.path()));
        s.answer(c.token, a).unwrap();
        made.push(c);
    }
    let Outcome::Passed(_) = s.outcome() else { panic!("{id}: {:?}", s.outcome()) };
    let action = s.send_response_headers(&[(":status", upstream)]).unwrap();
    while let Some(c) = s.pending_callouts().into_iter().next() {
        let a = answers.next().unwrap_or_else(|| panic!("{id}: unexpected callout {}", c.path()));
        s.answer(c.token, a).unwrap();
        made.push(c);
    }
    assert!(action == Action::Continue || s.response_resumed(), "{id}: response left paused");
    s.close().unwrap();
    made
}

/// The first request is charged with a hold (100 credits: room for a lease
/// of 5 at factor 4); the next tick asks for the lease; it is granted.
fn with_lease(p: &mut Plugin) {
    let made = sms(p, "req-1", "200", vec![key_record(&["sms:send"], "active", 100), held("hold_0001", 1, 99), settled("hold_0001", "captured")]);
    assert_eq!(made.len(), 3);
    p.tick().unwrap();
    let ask = p.pending_callouts().into_iter().next().expect("a lease request on the tick");
    assert_eq!(ask.path(), "/v1/leases");
    assert_eq!(ask.upstream, "dialtone_credits");
    let body = ask.body_json();
    assert_eq!((body["account"].as_str(), body["credits"].as_u64(), body["min_balance_factor"].as_u64(), body["ttl_seconds"].as_u64()), (Some(USER), Some(5), Some(4), Some(30)));
    assert!(body["idempotency_key"].as_str().unwrap().starts_with("vm-"));
    p.answer(ask.token, granted(LEASE, 94)).unwrap();
}

fn spend_keys(report: &Value) -> Vec<String> {
    report["spends"].as_array().unwrap().iter().map(|s| s["idempotency_key"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn a_leased_account_pays_with_no_callout_and_every_spend_is_reported() {
    let mut p = leasing();
    with_lease(&mut p);
    // Five requests from the lease: no callout, not even to settle. The
    // failed one (503 upstream) pays nothing and its credit goes back.
    for (id, status) in [("req-2", "200"), ("req-3", "200"), ("req-4", "503"), ("req-5", "200"), ("req-6", "200"), ("req-7", "200")] {
        assert!(sms(&mut p, id, status, vec![]).is_empty(), "{id} made a callout");
    }
    // The lease is spent: the next request is held the usual way.
    let made = sms(&mut p, "req-8", "200", vec![held("hold_0002", 1, 88), settled("hold_0002", "captured")]);
    assert_eq!(made[0].path(), "/v1/holds");
    // The tick returns the lease with its five spends, each under its own key.
    p.advance(Duration::from_millis(200));
    p.tick().unwrap();
    let calls = p.pending_callouts();
    let report = calls.iter().find(|c| c.path() == format!("/v1/leases/{LEASE}/report")).expect("the final report");
    let body = report.body_json();
    assert_eq!(body["final"], json!(true));
    assert_eq!(spend_keys(&body), ["sms_send:req-2", "sms_send:req-3", "sms_send:req-5", "sms_send:req-6", "sms_send:req-7"]);
    assert!(body["spends"].as_array().unwrap().iter().all(|s| s["amount"] == 1 && s["route"] == "sms_send" && s["key_prefix"] == API_KEY_PREFIX));
    assert!(!report.body.windows(API_KEY.len()).any(|w| w == API_KEY.as_bytes()), "the key never leaves in a report");
    p.answer(report.token, report_answer("closed", false)).unwrap();
    assert_eq!(p.metric("dialtone.lease.spent").map(|m| m.value), Some(6), "six spends taken, one given back");
    assert_eq!(p.metric("dialtone.lease.returned").map(|m| m.value), Some(1));
    assert!(p.crashed().is_none());
}

#[test]
fn a_failed_report_is_sent_again_with_the_same_spends() {
    let mut p = leasing();
    with_lease(&mut p);
    sms(&mut p, "req-2", "200", vec![]);
    p.advance(Duration::from_millis(200));
    p.tick().unwrap();
    let first = p.pending_callouts().into_iter().next().unwrap();
    assert_eq!(first.body_json()["final"], json!(false));
    p.answer(first.token, CallAnswer::raw(503, b"upstream connect error")).unwrap();
    p.advance(Duration::from_millis(200));
    p.tick().unwrap();
    let again = p.pending_callouts().into_iter().next().unwrap();
    assert_eq!(spend_keys(&again.body_json()), ["sms_send:req-2"]);
    p.answer(again.token, report_answer("open", false)).unwrap();
    // Reported: the next round is a heartbeat with nothing in it.
    p.advance(Duration::from_millis(200));
    p.tick().unwrap();
    let beat = p.pending_callouts().into_iter().next().unwrap();
    assert!(spend_keys(&beat.body_json()).is_empty());
}

#[test]
fn a_recalled_lease_is_returned_and_requests_fall_back_to_holds() {
    let mut p = leasing();
    with_lease(&mut p);
    sms(&mut p, "req-2", "200", vec![]);
    p.advance(Duration::from_millis(200));
    p.tick().unwrap();
    let beat = p.pending_callouts().into_iter().next().unwrap();
    // Another Envoy's request was refused for want of credits: recall.
    p.answer(beat.token, report_answer("open", true)).unwrap();
    let made = sms(&mut p, "req-3", "200", vec![held("hold_0003", 1, 80), settled("hold_0003", "captured")]);
    assert_eq!(made[0].path(), "/v1/holds", "a recalled lease pays for nothing more");
    p.advance(Duration::from_millis(200));
    p.tick().unwrap();
    let last = p.pending_callouts().into_iter().find(|c| c.path().ends_with("/report")).expect("the return");
    assert_eq!(last.body_json()["final"], json!(true));
    assert!(spend_keys(&last.body_json()).is_empty(), "req-2 was reported before");
    assert_eq!(p.metric("dialtone.lease.recalled").map(|m| m.value), Some(1));
}

#[test]
fn a_lease_stops_before_it_expires_and_a_declined_one_costs_nothing() {
    let mut p = leasing();
    with_lease(&mut p);
    // 30 s lease, reported every 200 ms: no spend from 29.6 s on.
    p.advance(Duration::from_millis(29_600));
    let made = sms(&mut p, "req-2", "200", vec![key_record(&["sms:send"], "active", 94), held("hold_0004", 1, 93), settled("hold_0004", "captured")]);
    assert_eq!(made[1].path(), "/v1/holds");
    p.tick().unwrap();
    let calls = p.pending_callouts();
    let ret = calls.iter().find(|c| c.path().ends_with("/report")).expect("the return");
    assert_eq!(ret.body_json()["final"], json!(true));
    // 93 ≥ 20: another lease is asked for; the service declines it.
    let ask = calls.iter().find(|c| c.path() == "/v1/leases").expect("a new lease request");
    p.answer(ask.token, CallAnswer::json(200, &json!({"granted": false, "balance": 93, "needed": 20, "recalling": true}))).unwrap();
    let made = sms(&mut p, "req-3", "200", vec![held("hold_0005", 1, 92), settled("hold_0005", "captured")]);
    assert_eq!(made[0].path(), "/v1/holds");
    // A lease request the service cannot answer changes nothing either.
    let mut q = leasing();
    sms(&mut q, "req-1", "200", vec![key_record(&["sms:send"], "active", 100), held("hold_0001", 1, 99), settled("hold_0001", "captured")]);
    q.tick().unwrap();
    let ask = q.pending_callouts().into_iter().next().unwrap();
    q.answer(ask.token, CallAnswer::raw(200, b"<html>garbage</html>")).unwrap();
    let made = sms(&mut q, "req-2", "200", vec![held("hold_0002", 1, 98), settled("hold_0002", "captured")]);
    assert_eq!(made[0].path(), "/v1/holds");
    assert!(p.crashed().is_none() && q.crashed().is_none());
}

#[test]
fn a_reload_that_turns_leasing_off_still_reports_and_returns_the_lease() {
    let mut p = leasing();
    with_lease(&mut p);
    sms(&mut p, "req-2", "200", vec![]);
    let mut cfg = demo_config();
    cfg["credits_service"]["key_cache_ttl_ms"] = json!(1000);
    assert!(p.reconfigure(cfg.to_string()).unwrap());
    // Leasing is off: the next request is held the usual way.
    let made = sms(&mut p, "req-3", "200", vec![key_record(&["sms:send"], "active", 90), held("hold_0003", 1, 89), settled("hold_0003", "captured")]);
    assert_eq!(made[1].path(), "/v1/holds");
    // The lease, idle from now on, is reported with req-2 and given back.
    p.advance(Duration::from_millis(200));
    p.tick().unwrap();
    let beat = p.pending_callouts().into_iter().find(|c| c.path().ends_with("/report")).expect("req-2 reported");
    assert_eq!((spend_keys(&beat.body_json()), beat.body_json()["final"].clone()), (vec!["sms_send:req-2".to_owned()], json!(false)));
    p.answer(beat.token, report_answer("open", false)).unwrap();
    p.advance(Duration::from_millis(2_000));
    p.tick().unwrap();
    let ret = p.pending_callouts().into_iter().find(|c| c.path().ends_with("/report")).expect("the return");
    assert_eq!(ret.body_json()["final"], json!(true));
    p.answer(ret.token, report_answer("closed", false)).unwrap();
    assert!(p.crashed().is_none());
}
