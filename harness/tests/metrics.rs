//! Every counter the filter defines (`dialtone::metrics::all_counters()`),
//! moved by exactly the amount one request (or one JWKS fetch) should move
//! it, on the compiled `.wasm`. Table-driven: each row sets a plugin up
//! (not measured), runs what it is about (measured), checks the outcome, and
//! states the exact change of **every** counter, so a row also proves that
//! nothing else was counted. A counter no row moves fails
//! `every_counter_is_covered`: a new metric needs a row here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::collections::BTreeMap;

use common::*;
use dialtone_devstack::tokens;
use dialtone_harness::{CallAnswer, Outcome, Plugin, PluginOptions};
use p256::ecdsa::SigningKey;
use serde_json::{json, Value};

const SMS: &str = "/api/v1/sms/send";
const ACCOUNT: &str = "/api/v1/account";

/// Counters the harness cannot move, each with the Envoy test that asserts it.
/// `dispatch_failed`: `dispatch_http_call` fails only for a cluster Envoy
/// does not know, and this host accepts every cluster name (and a validated
/// policy always has a non-empty `:authority`/`:path`).
const THROUGH_ENVOY_ONLY: &[(&str, &str, &str)] = &[
    (
        "dialtone.denied.credits_unavailable.dispatch_failed",
        "../tests/e2e/tests/gate.rs",
        "a_callout_to_an_unknown_cluster_fails_closed",
    ),
    (
        "dialtone.denied.payment_unavailable.dispatch_failed",
        "../tests/e2e/tests/gate.rs",
        "a_callout_to_an_unknown_cluster_fails_closed",
    ),
];

struct Case {
    what: &'static str,
    config: fn() -> Value,
    /// The VM environment besides the admin key.
    env: &'static [(&'static str, &'static str)],
    /// Runs before the counters are read (cache warming, a pending fetch).
    setup: fn(&mut Plugin),
    /// The measured part; asserts its own outcome.
    run: fn(&mut Plugin),
    /// The exact change of every counter; unlisted counters must not move.
    expect: &'static [(&'static str, i64)],
}

fn nothing(_: &mut Plugin) {}

fn bearer(credential: &str) -> String {
    format!("Bearer {credential}")
}

/// Sends a request (no body) and answers its callouts in order; returns the outcome.
fn send(p: &mut Plugin, method: &str, path: &str, headers: &[(&str, &str)], answers: Vec<CallAnswer>) -> Outcome {
    let mut s = p.http().unwrap();
    s.request(&request(method, path, headers)).unwrap();
    for a in answers {
        s.answer_next(a).unwrap_or_else(|e| panic!("{method} {path}: {e} (outcome {:?})", s.outcome()));
    }
    assert!(s.pending_callouts().is_empty(), "{method} {path}: callouts left unanswered: {:?}", s.pending_callouts());
    s.outcome()
}

fn passed(o: &Outcome) {
    assert!(matches!(o, Outcome::Passed(_)), "expected the request to pass, got {o:?}");
}

/// Asserts a local reply with this status and `error` code; returns its body.
fn replied(o: &Outcome, status: u32, error: &str) -> Value {
    let Outcome::Replied(r) = o else { panic!("expected a {status} reply, got {o:?}") };
    assert_eq!(r.status, status, "{}", r.body_str());
    let body = r.json();
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"], error, "{body}");
    body
}

fn unauthorized(o: &Outcome, message: &str) {
    assert_eq!(replied(o, 401, "unauthorized")["message"], message);
}

fn unavailable(o: &Outcome) {
    let Outcome::Replied(r) = o else { panic!("expected a 503, got {o:?}") };
    assert_eq!((r.status, r.body_str()), (503, r#"{"success":false,"error":"credits_unavailable"}"#.to_owned()));
}

fn key_auth() -> String {
    bearer(API_KEY)
}

fn active(scopes: &[&str]) -> CallAnswer {
    key_record(scopes, "active", 10)
}

/// A key lookup whose answer is `answer`, on the paid SMS route.
fn sms_with_key(p: &mut Plugin, answers: Vec<CallAnswer>) -> Outcome {
    send(p, "POST", SMS, &[("authorization", &key_auth())], answers)
}

fn account_with(p: &mut Plugin, credential: &str, answers: Vec<CallAnswer>) -> Outcome {
    send(p, "GET", ACCOUNT, &[("authorization", &bearer(credential))], answers)
}

fn token_with(f: impl FnOnce(&mut Value)) -> String {
    let mut c = claims();
    f(&mut c);
    privy_token_with(&c)
}

/// A Privy token with its own session id (so it is its own cache entry).
fn session_token(sid: &str) -> String {
    token_with(|c| c["sid"] = json!(sid))
}

fn jwk(kid: &str, key: &SigningKey) -> Value {
    let p = key.verifying_key().to_encoded_point(false);
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256", "x": tokens::b64(p.x().unwrap()), "y": tokens::b64(p.y().unwrap())})
}

/// The demo policy with the test key only as a JWKS entry of `kid` "k1".
fn jwks_config() -> Value {
    let mut cfg = demo_config();
    let privy = cfg["privy"].as_object_mut().unwrap();
    privy.remove("verification_key");
    privy.insert("jwks".into(), json!({"keys": [jwk("k1", &signing_key())]}));
    cfg
}

/// The demo policy fetching the issuer's JWKS (the fetch is sent at start).
fn jwks_fetch_config() -> Value {
    let mut cfg = jwks_config();
    cfg["privy"]["jwks_fetch"] = json!({"cluster": "privy_api", "authority": "api.privy.io", "path": "/jwks.json", "refresh_seconds": 300});
    cfg
}

fn pending_jwks_fetch(p: &mut Plugin) -> u32 {
    let fetch = p.pending_callouts().into_iter().find(|c| c.upstream == "privy_api").expect("a JWKS fetch at start");
    assert_eq!(fetch.path(), "/jwks.json");
    fetch.token
}

const PAYER: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";

/// A PAYMENT-SIGNATURE for the demo policy's SMS requirement (`accepted`
/// edited by `f`).
fn payment_with(f: impl FnOnce(&mut Value)) -> String {
    use base64::Engine;
    let cfg = demo_config();
    let mut accepted = cfg["routes"][0]["x402"]["accepts"][0].clone();
    f(&mut accepted);
    let payload = json!({"x402Version": 2, "accepted": accepted, "payload": {"signature": "0x1"}});
    base64::engine::general_purpose::STANDARD.encode(payload.to_string())
}

fn pay(p: &mut Plugin, header: &str, answers: Vec<CallAnswer>) -> Outcome {
    send(p, "POST", SMS, &[("payment-signature", header)], answers)
}

fn verified() -> CallAnswer {
    CallAnswer::json(200, &json!({"isValid": true, "payer": PAYER}))
}

/// A verified payment whose upstream answers 200 and whose settlement is `settle`.
fn paid_response(p: &mut Plugin, settle: CallAnswer) -> Outcome {
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("payment-signature", &payment_with(|_| {}))])).unwrap();
    s.answer_next(verified()).unwrap();
    let claim = claimed(&mut s);
    assert!(matches!(s.outcome(), Outcome::Passed(_)), "{:?}", s.outcome());
    assert_eq!(claim.len(), 64);
    s.send_response_headers(&[(":status", "200")]).unwrap();
    let call = s.answer_next(settle).unwrap();
    assert_eq!((call.upstream.as_str(), call.path()), ("x402_facilitator", "/settle".to_owned()));
    match s.local_reply() {
        Some(r) => Outcome::Replied(r),
        None => {
            assert!(s.response_resumed(), "the upstream's response is delivered");
            assert!(s.response_headers().iter().any(|(n, _)| n == "payment-response"), "with its receipt");
            Outcome::Passed(s.request_headers())
        }
    }
}

/// Answers the pending x402 claim: this request holds the payment.
fn claimed(s: &mut dialtone_harness::HttpStream<'_>) -> String {
    let call = s.pending_callouts().into_iter().next().expect("a claim");
    assert_eq!(call.path(), "/v1/x402/claims");
    let claim = call.body_json()["claim"].as_str().unwrap().to_owned();
    s.answer(call.token, CallAnswer::json(201, &json!({"claim": claim, "claimed": true}))).unwrap();
    claim
}

fn payment_refused(o: &Outcome, reason: &str) {
    assert_eq!(replied(o, 402, "payment_required")["reason"], reason);
}

fn payment_unavailable(o: &Outcome) {
    let Outcome::Replied(r) = o else { panic!("expected a 503, got {o:?}") };
    assert_eq!((r.status, r.body_str()), (503, r#"{"success":false,"error":"payment_unavailable"}"#.to_owned()));
}

fn hold_response(p: &mut Plugin, upstream_status: &str, settlement: &str) {
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &key_auth())])).unwrap();
    s.answer_next(active(&["sms:send"])).unwrap();
    s.answer_next(held("hold_1", 1, 9)).unwrap();
    assert!(matches!(s.outcome(), Outcome::Passed(_)), "{:?}", s.outcome());
    s.send_response_headers(&[(":status", upstream_status)]).unwrap();
    let call = s.answer_next(settled("hold_1", settlement)).unwrap();
    assert_eq!(call.path(), format!("/v1/holds/hold_1/{}", if settlement == "captured" { "capture" } else { "release" }));
    assert!(s.response_resumed(), "the upstream's {upstream_status} is delivered");
}

const LEASE_ID: &str = "lease_00000000000000000000000b";

/// The demo policy with leases of 4 credits (granted from 8 available, so
/// the 9 a held SMS shows is room), reported every 200 ms.
fn lease_config() -> Value {
    let mut cfg = demo_config();
    cfg["credits_service"]["lease"] = json!({"credits": 4, "report_ms": 200, "ttl_seconds": 30, "min_balance_factor": 2});
    cfg
}

/// A held, captured SMS that shows 9 credits.
fn held_sms(p: &mut Plugin) {
    hold_response(p, "200", "captured");
}

/// The tick's lease request, answered with `answer`.
fn lease_round(p: &mut Plugin, answer: CallAnswer) {
    p.tick().unwrap();
    let ask = p.pending_callouts().into_iter().next().expect("a lease call on the tick");
    p.answer(ask.token, answer).unwrap();
}

fn lease_granted() -> CallAnswer {
    CallAnswer::json(200, &json!({"granted": true, "lease_id": LEASE_ID, "account": USER, "credits": 4, "balance": 5, "ttl_seconds": 30}))
}

fn with_lease(p: &mut Plugin) {
    held_sms(p);
    lease_round(p, lease_granted());
}

/// An SMS paid from the lease: no callout; the upstream answers 200.
fn leased_sms(p: &mut Plugin) {
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &key_auth())])).unwrap();
    assert!(matches!(s.outcome(), Outcome::Passed(_)), "{:?}", s.outcome());
    assert!(s.callouts().is_empty());
    s.send_response_headers(&[(":status", "200")]).unwrap();
}

fn lease_report(p: &mut Plugin, state: &str, recall: bool, refused: usize) {
    p.advance(std::time::Duration::from_millis(200));
    let refused: Vec<Value> = (0..refused).map(|i| json!({"idempotency_key": format!("k{i}"), "reason": "lease_closed"})).collect();
    lease_round(p, CallAnswer::json(200, &json!({"lease_id": LEASE_ID, "state": state, "recall": recall, "balance": 4, "refused": refused})));
}

fn table() -> Vec<Case> {
    vec![
        // --- Credit leases (the tick's calls are the root context's).
        Case {
            what: "a lease asked for on the tick and granted",
            config: lease_config,
            env: &[],
            setup: held_sms,
            run: |p| lease_round(p, lease_granted()),
            expect: &[("dialtone.lease.calls", 1), ("dialtone.lease.granted", 1)],
        },
        Case {
            what: "a lease asked for and declined",
            config: lease_config,
            env: &[],
            setup: held_sms,
            run: |p| lease_round(p, CallAnswer::json(200, &json!({"granted": false, "balance": 9, "needed": 20, "recalling": false}))),
            expect: &[("dialtone.lease.calls", 1), ("dialtone.lease.declined", 1)],
        },
        Case {
            what: "a paid request spent from the lease, then reported",
            config: lease_config,
            env: &[],
            setup: with_lease,
            run: |p| {
                leased_sms(p);
                lease_report(p, "open", false, 0);
            },
            expect: &[
                ("dialtone.allowed.apikey", 1),
                ("dialtone.cache.key.hit", 1),
                ("dialtone.lease.spent", 1),
                ("dialtone.lease.calls", 1),
                ("dialtone.lease.reports", 1),
            ],
        },
        Case {
            what: "a lease recalled, then returned",
            config: lease_config,
            env: &[],
            setup: with_lease,
            run: |p| {
                lease_report(p, "open", true, 0);
                lease_report(p, "closed", false, 0);
            },
            expect: &[("dialtone.lease.calls", 2), ("dialtone.lease.reports", 2), ("dialtone.lease.recalled", 1), ("dialtone.lease.returned", 1)],
        },
        Case {
            what: "a spend the service refused (its lease expired first)",
            config: lease_config,
            env: &[],
            setup: |p| {
                with_lease(p);
                leased_sms(p);
            },
            run: |p| lease_report(p, "closed", false, 1),
            expect: &[("dialtone.lease.calls", 1), ("dialtone.lease.reports", 1), ("dialtone.lease.spent", 1), ("dialtone.lease.lost", 1)],
        },
        // --- Allowed, by credential.
        Case {
            what: "a Privy session on a free route",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| passed(&account_with(p, &privy_token(), vec![])),
            expect: &[("dialtone.allowed.privy", 1), ("dialtone.cache.token.miss", 1)],
        },
        Case {
            what: "an API key on a free route (looked up)",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| passed(&account_with(p, API_KEY, vec![active(&[])])),
            expect: &[("dialtone.allowed.apikey", 1), ("dialtone.cache.key.miss", 1), ("dialtone.callout.answered", 1)],
        },
        Case {
            what: "the admin key on a paid route",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| passed(&send(p, "POST", SMS, &[("authorization", &bearer(ADMIN_KEY))], vec![])),
            expect: &[("dialtone.allowed.admin", 1)],
        },
        Case {
            what: "a public route",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| passed(&send(p, "GET", "/healthz", &[], vec![])),
            expect: &[("dialtone.allowed.anonymous", 1)],
        },
        Case {
            what: "an x402 payment without a Bearer, verified, upstream 200, settled",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| passed(&paid_response(p, CallAnswer::json(200, &json!({"success": true, "transaction": "0xabc", "network": "eip155:31337", "payer": PAYER})))),
            expect: &[("dialtone.allowed.x402", 1), ("dialtone.x402.verified", 1), ("dialtone.x402.settled", 1), ("dialtone.callout.answered", 1)],
        },
        Case {
            what: "an x402 settlement the facilitator refuses",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let o = paid_response(p, CallAnswer::json(200, &json!({"success": false, "errorReason": "insufficient_funds", "network": "eip155:31337"})));
                assert_eq!(replied(&o, 402, "payment_failed")["reason"], "insufficient_funds");
            },
            expect: &[
                ("dialtone.allowed.x402", 1),
                ("dialtone.x402.verified", 1),
                ("dialtone.denied.payment_failed", 1),
                ("dialtone.x402.settle_failed", 1),
                ("dialtone.callout.answered", 1),
            ],
        },
        Case {
            what: "an x402 payment the facilitator calls invalid",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let o = pay(p, &payment_with(|_| {}), vec![CallAnswer::json(200, &json!({"isValid": false, "invalidReason": "nonce_used"}))]);
                payment_refused(&o, "nonce_used");
            },
            expect: &[("dialtone.denied.payment_required", 1), ("dialtone.x402.invalid.facilitator", 1)],
        },
        Case {
            what: "a copy of an x402 payment another request is being served on",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let mut s = p.http().unwrap();
                s.request(&request("POST", SMS, &[("payment-signature", &payment_with(|_| {}))])).unwrap();
                s.answer_next(verified()).unwrap();
                let call = s.pending_callouts().into_iter().next().expect("a claim");
                let claim = call.body_json()["claim"].as_str().unwrap().to_owned();
                s.answer(call.token, CallAnswer::json(409, &json!({"claim": claim, "error": "claim_in_use"}))).unwrap();
                payment_refused(&s.outcome(), "this payment is already paying for another request");
            },
            expect: &[("dialtone.denied.payment_required", 1), ("dialtone.x402.invalid.in_use", 1), ("dialtone.callout.answered", 1)],
        },
        Case {
            what: "an x402 payment for another amount",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| payment_refused(&pay(p, &payment_with(|a| a["amount"] = json!("1")), vec![]), "the accepted requirements are not this resource's"),
            expect: &[("dialtone.denied.payment_required", 1), ("dialtone.x402.invalid.mismatch", 1)],
        },
        Case {
            what: "an x402 payment that is not base64",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| payment_refused(&pay(p, "%%%", vec![]), "PAYMENT-SIGNATURE is not base64"),
            expect: &[("dialtone.denied.payment_required", 1), ("dialtone.x402.invalid.base64", 1)],
        },
        Case {
            what: "an x402 payment that is not JSON",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| payment_refused(&pay(p, "bm90IGpzb24=", vec![]), "PAYMENT-SIGNATURE is not a JSON object"),
            expect: &[("dialtone.denied.payment_required", 1), ("dialtone.x402.invalid.json", 1)],
        },
        Case {
            what: "an x402 v1 payload in PAYMENT-SIGNATURE",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| payment_refused(&pay(p, "eyJ4NDAyVmVyc2lvbiI6MX0=", vec![]), "x402Version must be 2"),
            expect: &[("dialtone.denied.payment_required", 1), ("dialtone.x402.invalid.version", 1)],
        },
        Case {
            what: "an x402 payment with no payload",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| payment_refused(&pay(p, "eyJ4NDAyVmVyc2lvbiI6Mn0=", vec![]), "the payment has no accepted requirements or no payload"),
            expect: &[("dialtone.denied.payment_required", 1), ("dialtone.x402.invalid.incomplete", 1)],
        },
        Case {
            what: "PAYMENT-SIGNATURE sent twice",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let h = payment_with(|_| {});
                let o = send(p, "POST", SMS, &[("payment-signature", &h), ("payment-signature", &h)], vec![]);
                payment_refused(&o, "PAYMENT-SIGNATURE must be sent once");
            },
            expect: &[("dialtone.denied.payment_required", 1), ("dialtone.x402.invalid.repeated", 1)],
        },
        Case {
            what: "a PAYMENT-SIGNATURE over max_payment_bytes",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| payment_refused(&pay(p, &"A".repeat(9000), vec![]), "PAYMENT-SIGNATURE is too large"),
            expect: &[("dialtone.denied.payment_required", 1), ("dialtone.x402.invalid.too_large", 1)],
        },
        Case {
            what: "only the v1 X-PAYMENT header",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let o = send(p, "POST", SMS, &[("x-payment", "eyJ4NDAyVmVyc2lvbiI6MX0=")], vec![]);
                payment_refused(&o, "x402 v1 (X-PAYMENT) is not accepted: pay with PAYMENT-SIGNATURE (x402 v2)");
            },
            expect: &[("dialtone.denied.payment_required", 1), ("dialtone.x402.invalid.v1", 1)],
        },
        Case {
            what: "the facilitator unreachable (retried once)",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| payment_unavailable(&pay(p, &payment_with(|_| {}), vec![CallAnswer::Failed, CallAnswer::Failed])),
            expect: &[
                ("dialtone.denied.payment_unavailable", 1),
                ("dialtone.denied.payment_unavailable.unreachable", 1),
                ("dialtone.x402.unavailable", 1),
            ],
        },
        Case {
            what: "the facilitator answers 500",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| payment_unavailable(&pay(p, &payment_with(|_| {}), vec![CallAnswer::json(500, &json!({"error": "boom"}))])),
            expect: &[
                ("dialtone.denied.payment_unavailable", 1),
                ("dialtone.denied.payment_unavailable.bad_status", 1),
                ("dialtone.x402.unavailable", 1),
            ],
        },
        Case {
            what: "the facilitator answers garbage",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| payment_unavailable(&pay(p, &payment_with(|_| {}), vec![CallAnswer::raw(200, b"<html>")])),
            expect: &[
                ("dialtone.denied.payment_unavailable", 1),
                ("dialtone.denied.payment_unavailable.garbage", 1),
                ("dialtone.x402.unavailable", 1),
            ],
        },
        Case {
            what: "the facilitator answers more than max_response_bytes",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| payment_unavailable(&pay(p, &payment_with(|_| {}), vec![CallAnswer::raw(200, &vec![b' '; 70_000])])),
            expect: &[
                ("dialtone.denied.payment_unavailable", 1),
                ("dialtone.denied.payment_unavailable.too_large", 1),
                ("dialtone.x402.unavailable", 1),
            ],
        },
        // --- 401 by reason.
        Case {
            what: "no credential on a route without x402",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| unauthorized(&send(p, "GET", ACCOUNT, &[], vec![]), "missing credentials"),
            expect: &[("dialtone.denied.unauthorized", 1), ("dialtone.denied.unauthorized.missing", 1)],
        },
        Case {
            what: "another Authorization scheme",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let o = send(p, "GET", ACCOUNT, &[("authorization", "Basic dXNlcjpwYXNz")], vec![]);
                unauthorized(&o, "the Authorization scheme must be Bearer");
            },
            expect: &[("dialtone.denied.unauthorized", 1), ("dialtone.denied.unauthorized.malformed_header", 1)],
        },
        Case {
            what: "a Bearer that is no known credential",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| unauthorized(&account_with(p, "not-a-dialtone-credential", vec![]), "the Bearer token is not a recognised credential"),
            expect: &[("dialtone.denied.unauthorized", 1), ("dialtone.denied.unauthorized.unknown_format", 1)],
        },
        Case {
            what: "an unsigned (alg none) token",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| unauthorized(&account_with(p, &tokens::unsigned(&claims()), vec![]), "malformed token"),
            expect: &[("dialtone.denied.unauthorized", 1), ("dialtone.denied.unauthorized.token_malformed", 1), ("dialtone.cache.token.miss", 1)],
        },
        Case {
            what: "a token naming a kid the JWKS does not have",
            config: jwks_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let token = tokens::sign_es256(&signing_key(), &json!({"alg": "ES256", "typ": "JWT", "kid": "k-other"}), &claims());
                unauthorized(&account_with(p, &token, vec![]), "token signed by an unknown key");
            },
            expect: &[("dialtone.denied.unauthorized", 1), ("dialtone.denied.unauthorized.token_unknown_kid", 1), ("dialtone.cache.token.miss", 1)],
        },
        Case {
            what: "a token signed by another key",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let other = SigningKey::from_slice(&[8u8; 32]).unwrap();
                let token = tokens::sign_es256(&other, &es256_header(), &claims());
                unauthorized(&account_with(p, &token, vec![]), "invalid token signature");
            },
            expect: &[("dialtone.denied.unauthorized", 1), ("dialtone.denied.unauthorized.token_signature", 1), ("dialtone.cache.token.miss", 1)],
        },
        Case {
            what: "a token for another app",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| unauthorized(&account_with(p, &token_with(|c| c["aud"] = json!("another-app")), vec![]), "token audience is not this app"),
            expect: &[("dialtone.denied.unauthorized", 1), ("dialtone.denied.unauthorized.token_claims", 1), ("dialtone.cache.token.miss", 1)],
        },
        Case {
            what: "an expired token",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let token = token_with(|c| {
                    c["iat"] = json!(NOW - 7200);
                    c["exp"] = json!(NOW - 3600);
                });
                unauthorized(&account_with(p, &token, vec![]), "token expired");
            },
            expect: &[("dialtone.denied.unauthorized", 1), ("dialtone.denied.unauthorized.token_time", 1), ("dialtone.cache.token.miss", 1)],
        },
        Case {
            what: "a Privy token where the policy has no privy section",
            config: || {
                let mut cfg = demo_config();
                cfg.as_object_mut().unwrap().remove("privy");
                cfg
            },
            env: &[],
            setup: nothing,
            run: |p| unauthorized(&account_with(p, &privy_token(), vec![]), "Privy access tokens are not accepted here"),
            expect: &[("dialtone.denied.unauthorized", 1), ("dialtone.denied.unauthorized.privy_not_accepted", 1)],
        },
        Case {
            what: "an unknown API key",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let o = sms_with_key(p, vec![CallAnswer::json(404, &json!({"error": "key_not_found"}))]);
                unauthorized(&o, "unknown API key");
            },
            expect: &[
                ("dialtone.denied.unauthorized", 1),
                ("dialtone.denied.unauthorized.unknown_key", 1),
                ("dialtone.cache.key.miss", 1),
                ("dialtone.callout.answered", 1),
            ],
        },
        Case {
            what: "a revoked API key",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| unauthorized(&sms_with_key(p, vec![key_record(&["sms:send"], "revoked", 10)]), "API key revoked"),
            expect: &[
                ("dialtone.denied.unauthorized", 1),
                ("dialtone.denied.unauthorized.key_revoked", 1),
                ("dialtone.cache.key.miss", 1),
                ("dialtone.callout.answered", 1),
            ],
        },
        Case {
            what: "an API key on a route that takes only Privy sessions",
            config: || {
                let mut cfg = demo_config();
                cfg["routes"][2]["credentials"] = json!(["privy"]);
                cfg
            },
            env: &[],
            setup: nothing,
            run: |p| {
                let o = send(p, "POST", "/api/v1/credits/top-up", &[("authorization", &key_auth()), ("payment-signature", &payment_with(|_| {}))], vec![]);
                unauthorized(&o, "this kind of credential is not accepted on this route");
            },
            expect: &[("dialtone.denied.unauthorized", 1), ("dialtone.denied.unauthorized.kind_not_accepted", 1)],
        },
        Case {
            what: "an expired API key",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| unauthorized(&sms_with_key(p, vec![key_record(&["sms:send"], "expired", 10)]), "API key expired"),
            expect: &[
                ("dialtone.denied.unauthorized", 1),
                ("dialtone.denied.unauthorized.key_expired", 1),
                ("dialtone.cache.key.miss", 1),
                ("dialtone.callout.answered", 1),
            ],
        },
        // --- The other refusals.
        Case {
            what: "a key without the route's scope",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let body = replied(&sms_with_key(p, vec![active(&["contacts_read"])]), 403, "insufficient_scope");
                assert_eq!(body["required_scope"], "sms:send");
            },
            expect: &[("dialtone.denied.insufficient_scope", 1), ("dialtone.cache.key.miss", 1), ("dialtone.callout.answered", 1)],
        },
        Case {
            what: "a hold refused for too little credit",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let body = replied(&sms_with_key(p, vec![active(&["sms:send"]), broke(0, 1)]), 402, "insufficient_credits");
                assert_eq!((body["credits"].as_i64(), body["required"].as_i64()), (Some(0), Some(1)));
            },
            expect: &[("dialtone.denied.insufficient_credits", 1), ("dialtone.cache.key.miss", 1), ("dialtone.callout.answered", 2)],
        },
        Case {
            what: "no credential on an x402 route",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| assert_eq!(replied(&send(p, "POST", SMS, &[], vec![]), 402, "payment_required")["x402Version"], 2),
            expect: &[("dialtone.denied.payment_required", 1)],
        },
        Case {
            what: "a path no route matches",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| drop(replied(&send(p, "GET", "/not/in/policy", &[], vec![]), 403, "route_not_allowed")),
            expect: &[("dialtone.denied.route_not_allowed", 1)],
        },
        Case {
            what: "the account's rate limit spent",
            config: || {
                let mut cfg = demo_config();
                cfg["rate_limit"] = json!({"requests": 2, "window_seconds": 60});
                cfg
            },
            env: &[],
            setup: nothing,
            run: |p| {
                let limited = CallAnswer::json(429, &json!({"error": "rate_limited", "retry_after_seconds": 30}));
                let Outcome::Replied(r) = account_with(p, &privy_token(), vec![limited]) else { panic!("no 429") };
                assert_eq!((r.status, r.body_str()), (429, r#"{"success":false,"error":"rate_limited"}"#.to_owned()));
                assert_eq!(r.header("retry-after").as_deref(), Some("30"));
            },
            expect: &[("dialtone.denied.rate_limited", 1), ("dialtone.cache.token.miss", 1), ("dialtone.callout.answered", 1)],
        },
        // --- 503 by reason.
        Case {
            what: "a lookup lost twice (retried once)",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| unavailable(&sms_with_key(p, vec![CallAnswer::Failed, CallAnswer::Failed])),
            expect: &[
                ("dialtone.denied.credits_unavailable", 1),
                ("dialtone.denied.credits_unavailable.unreachable", 1),
                ("dialtone.cache.key.miss", 1),
                ("dialtone.callout.failed", 2),
                ("dialtone.callout.retried", 1),
            ],
        },
        Case {
            what: "a lookup answered 500",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| unavailable(&sms_with_key(p, vec![CallAnswer::json(500, &json!({"error": "internal"}))])),
            expect: &[
                ("dialtone.denied.credits_unavailable", 1),
                ("dialtone.denied.credits_unavailable.bad_status", 1),
                ("dialtone.cache.key.miss", 1),
                ("dialtone.callout.answered", 1),
            ],
        },
        Case {
            what: "a lookup answered with HTML",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| unavailable(&sms_with_key(p, vec![CallAnswer::raw(200, b"<html>not json</html>")])),
            expect: &[
                ("dialtone.denied.credits_unavailable", 1),
                ("dialtone.denied.credits_unavailable.garbage", 1),
                ("dialtone.cache.key.miss", 1),
                ("dialtone.callout.answered", 1),
            ],
        },
        Case {
            what: "a lookup answer over max_response_bytes",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let mut body = br#"{"account":"did:privy:x","pad":""#.to_vec();
                body.resize(70_000, b'a');
                body.extend_from_slice(br#""}"#);
                unavailable(&sms_with_key(p, vec![CallAnswer::raw(200, &body)]));
            },
            expect: &[
                ("dialtone.denied.credits_unavailable", 1),
                ("dialtone.denied.credits_unavailable.too_large", 1),
                ("dialtone.cache.key.miss", 1),
                ("dialtone.callout.answered", 1),
            ],
        },
        Case {
            what: "a hold answered 409 (idempotency conflict)",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let conflict = CallAnswer::json(409, &json!({"error": "idempotency_conflict"}));
                unavailable(&sms_with_key(p, vec![active(&["sms:send"]), conflict]));
            },
            expect: &[
                ("dialtone.denied.credits_unavailable", 1),
                ("dialtone.denied.credits_unavailable.inconsistent", 1),
                ("dialtone.cache.key.miss", 1),
                ("dialtone.callout.answered", 2),
            ],
        },
        // --- Callouts and settlements.
        Case {
            what: "a lookup lost once, answered on the retry",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| passed(&account_with(p, API_KEY, vec![CallAnswer::Failed, active(&[])])),
            expect: &[
                ("dialtone.allowed.apikey", 1),
                ("dialtone.cache.key.miss", 1),
                ("dialtone.callout.failed", 1),
                ("dialtone.callout.retried", 1),
                ("dialtone.callout.answered", 1),
            ],
        },
        Case {
            what: "a paid request whose upstream answered 200: the hold is captured",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| hold_response(p, "200", "captured"),
            expect: &[
                ("dialtone.allowed.apikey", 1),
                ("dialtone.cache.key.miss", 1),
                ("dialtone.callout.answered", 3),
                ("dialtone.hold.captured", 1),
            ],
        },
        Case {
            what: "a paid request whose upstream answered 500: the hold is released",
            config: demo_config,
            env: &[],
            setup: nothing,
            run: |p| hold_response(p, "500", "released"),
            expect: &[
                ("dialtone.allowed.apikey", 1),
                ("dialtone.cache.key.miss", 1),
                ("dialtone.callout.answered", 3),
                ("dialtone.hold.released", 1),
            ],
        },
        // --- Caches.
        Case {
            what: "an API key again within key_cache_ttl_ms: no lookup",
            config: demo_config,
            env: &[],
            setup: |p| passed(&account_with(p, API_KEY, vec![active(&[])])),
            run: |p| {
                p.advance(std::time::Duration::from_millis(100));
                passed(&account_with(p, API_KEY, vec![]));
            },
            expect: &[("dialtone.allowed.apikey", 1), ("dialtone.cache.key.hit", 1)],
        },
        Case {
            what: "a Privy token again: from the VM's cache",
            config: demo_config,
            env: &[],
            setup: |p| passed(&account_with(p, &privy_token(), vec![])),
            run: |p| passed(&account_with(p, &privy_token(), vec![])),
            expect: &[("dialtone.allowed.privy", 1), ("dialtone.cache.token.hit", 1)],
        },
        Case {
            // One cache entry per VM: B evicts A locally, and A comes back
            // from the shared slot A's verification wrote (as another
            // worker's VM would read it).
            what: "a Privy token verified before, no longer in the VM's cache: from shared data",
            config: || {
                let mut cfg = demo_config();
                cfg["privy"]["token_cache_entries"] = json!(1);
                cfg
            },
            // Slots are shared only between VMs given the secret.
            env: &[(dialtone::cache::SHARED_SECRET_ENV, "harness-shared-cache-secret-0123456789abcdef")],
            setup: |p| {
                passed(&account_with(p, &session_token("session-a"), vec![]));
                passed(&account_with(p, &session_token("session-b"), vec![]));
            },
            run: |p| passed(&account_with(p, &session_token("session-a"), vec![])),
            expect: &[("dialtone.allowed.privy", 1), ("dialtone.cache.token.shared_hit", 1)],
        },
        // --- JWKS fetches (the root context's fetch at start, answered).
        Case {
            what: "the JWKS fetched at start",
            config: jwks_fetch_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let token = pending_jwks_fetch(p);
                let other = SigningKey::from_slice(&[12u8; 32]).unwrap();
                p.answer(token, CallAnswer::json(200, &json!({"keys": [jwk("k2", &other)]}))).unwrap();
            },
            expect: &[("dialtone.jwks.fetched", 1)],
        },
        Case {
            what: "the JWKS fetch answered 500",
            config: jwks_fetch_config,
            env: &[],
            setup: nothing,
            run: |p| {
                let token = pending_jwks_fetch(p);
                p.answer(token, CallAnswer::raw(500, b"down")).unwrap();
            },
            expect: &[("dialtone.jwks.failed", 1)],
        },
        Case {
            // Two keys taken at start; no good fetch since, for longer than
            // max_stale_seconds: the next tick drops both (counted per key).
            what: "fetched keys older than max_stale_seconds dropped",
            config: || {
                let mut cfg = jwks_fetch_config();
                cfg["privy"]["jwks_fetch"]["refresh_seconds"] = json!(60);
                cfg["privy"]["jwks_fetch"]["max_stale_seconds"] = json!(120);
                cfg
            },
            env: &[],
            setup: |p| {
                let token = pending_jwks_fetch(p);
                let other = SigningKey::from_slice(&[12u8; 32]).unwrap();
                p.answer(token, CallAnswer::json(200, &json!({"keys": [jwk("k2", &other), jwk("k3", &signing_key())]}))).unwrap();
            },
            run: |p| {
                p.advance(std::time::Duration::from_secs(121));
                p.tick().unwrap();
                assert!(p.log_text(dialtone_harness::LogLevel::Warn).contains("dropped 2 fetched JWKS key(s)"), "{}", p.log_text(dialtone_harness::LogLevel::Info));
            },
            expect: &[("dialtone.jwks.expired", 2)],
        },
    ]
}

fn counters(p: &Plugin) -> BTreeMap<&'static str, i64> {
    dialtone::metrics::all_counters()
        .map(|name| (name, p.metric(name).map(|m| m.value).unwrap_or_else(|| panic!("{name} is not defined by the filter"))))
        .collect()
}

#[test]
fn each_counter_moves_by_exactly_what_happened() {
    let mut failures = Vec::new();
    for case in table() {
        let mut opts = PluginOptions::new((case.config)().to_string()).clock_secs(NOW).env("DIAL_ADMIN_API_KEY", ADMIN_KEY);
        for (k, v) in case.env {
            opts = opts.env(k, v);
        }
        let mut p = Plugin::start(wasm(), opts).unwrap_or_else(|e| panic!("{}: {e}", case.what));
        (case.setup)(&mut p);
        let before = counters(&p);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (case.run)(&mut p)));
        if let Err(e) = outcome {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()));
            failures.push(format!("{}: {}", case.what, msg.unwrap_or_default()));
            continue;
        }
        let after = counters(&p);
        let moved: BTreeMap<&str, i64> = after.iter().map(|(n, v)| (*n, v - before[n])).filter(|(_, d)| *d != 0).collect();
        let want: BTreeMap<&str, i64> = case.expect.iter().copied().collect();
        if moved != want {
            failures.push(format!("{}:\n    counted  {moved:?}\n    expected {want:?}", case.what));
        }
        assert!(p.crashed().is_none(), "{}: the VM crashed", case.what);
    }
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), table().len(), failures.join("\n"));
}

/// Every counter the filter defines is moved by a row above (or, where the
/// harness cannot make it happen, asserted through Envoy by the named test).
#[test]
fn every_counter_is_covered() {
    let table = table();
    let all: Vec<&str> = dialtone::metrics::all_counters().collect();
    for case in &table {
        for (name, delta) in case.expect {
            assert!(all.contains(name), "{}: {name} is not a counter of the filter", case.what);
            assert_ne!(*delta, 0, "{}: list only counters that move", case.what);
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, file, test) in THROUGH_ENVOY_ONLY {
        assert!(all.contains(name), "{name} is not a counter of the filter");
        assert!(!table.iter().any(|c| c.expect.iter().any(|(n, _)| n == name)), "{name} has a row now: take it off THROUGH_ENVOY_ONLY");
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let body = text.split(&format!("fn {test}()")).nth(1).unwrap_or_else(|| panic!("{file} has no test {test}"));
        let body = body.split("\n#[test]").next().unwrap_or_default();
        assert!(body.contains(&format!("\"{name}\"")), "{file}::{test} does not assert {name}");
    }
    let uncovered: Vec<&str> = all
        .iter()
        .copied()
        .filter(|name| !table.iter().any(|c| c.expect.iter().any(|(n, _)| n == name)))
        .filter(|name| !THROUGH_ENVOY_ONLY.iter().any(|(n, _, _)| n == name))
        .collect();
    assert!(uncovered.is_empty(), "counters no test moves (add a row to the table): {uncovered:?}");
}
