//! The filter's scenarios, run against the compiled `dialtone.wasm` in the
//! harness: deterministic clock, scripted callouts, no Envoy. (The Envoy
//! suite in tests/e2e keeps what only Envoy proves.)

mod common;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::*;
use dialtone_devstack::tokens;
use dialtone_harness::{Action, CallAnswer, LogLevel, Outcome, Plugin, PluginOptions, StartError};
use serde_json::{json, Value};

const SMS: &str = "/api/v1/sms/send";

#[test]
fn api_key_is_looked_up_by_hash_checked_and_charged() {
    let mut p = demo();
    let mut s = p.http().unwrap();
    let auth = format!("Bearer {API_KEY}");
    assert_eq!(s.request(&request("POST", SMS, &[("authorization", &auth)])).unwrap(), Action::Pause);

    let lookup = s.answer_next(key_record(&["sms:send"], "active", 10)).unwrap();
    assert_eq!(lookup.upstream, "dialtone_credits");
    assert_eq!(lookup.header(":method").as_deref(), Some("POST"));
    assert_eq!(lookup.path(), "/v1/keys/lookup");
    assert_eq!(lookup.header(":authority").as_deref(), Some("credits.internal"));
    assert_eq!(lookup.timeout_ms, 1000);
    assert_eq!(lookup.body_json(), json!({"key_sha256": dialtone::bearer::sha256_hex(API_KEY.as_bytes())}));
    // The secret never leaves the filter, in any form but its hash.
    let wire = format!("{:?}{}", lookup.headers, String::from_utf8_lossy(&lookup.body));
    assert!(!wire.contains(API_KEY) && !wire.contains(&API_KEY[10..]));

    // Charge on success (the default): a hold now, settled when the upstream answers.
    let hold = s.answer_next(held("hold_0001", 1, 9)).unwrap();
    assert_eq!(hold.path(), "/v1/holds");
    assert_eq!(
        hold.body_json(),
        json!({"account": USER, "amount": 1, "idempotency_key": "sms_send:req-1", "ttl_seconds": 300, "route": "sms_send", "key_prefix": API_KEY_PREFIX})
    );
    assert_eq!(hold.header("x-request-id").as_deref(), Some("req-1"));

    let Outcome::Passed(_) = s.outcome() else { panic!("{:?}", s.outcome()) };
    assert_eq!(s.upstream_header("x-dialtone-account").as_deref(), Some(USER));
    assert_eq!(s.upstream_header("x-dialtone-auth-method").as_deref(), Some("apikey"));
    assert_eq!(s.upstream_header("x-dialtone-key-prefix").as_deref(), Some(API_KEY_PREFIX));
    assert_eq!(s.upstream_header("x-dialtone-credits-remaining").as_deref(), Some("9"));
    assert_eq!(s.upstream_header("x-dialtone-charged").as_deref(), Some("1"));
    assert_eq!(s.upstream_header("authorization"), None, "the secret stays at the edge");

    // The upstream answers 200: the response waits for the capture.
    assert_eq!(s.send_response_headers(&[(":status", "200")]).unwrap(), Action::Pause);
    let capture = s.answer_next(settled("hold_0001", "captured")).unwrap();
    assert_eq!(capture.path(), "/v1/holds/hold_0001/capture");
    assert!(s.response_resumed());
    s.close().unwrap();
    assert!(p.crashed().is_none());
}

/// A client never pays for the server's failure: 5xx (and Envoy's own 503/504
/// for a reset or timeout) releases the hold; a settlement that fails does not
/// hold up the response.
#[test]
fn charge_on_success_releases_on_upstream_failure() {
    let auth = format!("Bearer {API_KEY}");
    for (status, action) in [("500", "release"), ("503", "release"), ("504", "release"), ("404", "release"), ("302", "capture"), ("201", "capture")] {
        let mut p = demo();
        let mut s = p.http().unwrap();
        s.request(&request("POST", SMS, &[("authorization", &auth)])).unwrap();
        s.answer_next(key_record(&["sms:send"], "active", 5)).unwrap();
        s.answer_next(held("hold_x", 1, 4)).unwrap();
        assert_eq!(s.send_response_headers(&[(":status", status)]).unwrap(), Action::Pause);
        let call = s.answer_next(settled("hold_x", action)).unwrap();
        assert_eq!(call.path(), format!("/v1/holds/hold_x/{action}"), "upstream {status}");
        if action == "release" {
            assert_eq!(call.body_json(), json!({"reason": "upstream_error"}));
        }
        assert!(s.response_resumed());
    }
    // A capture that is not confirmed (service gone, hold already expired):
    // never served unpaid. The response is replaced by 503; the service
    // releases the hold when it expires.
    for answers in [vec![CallAnswer::Failed, CallAnswer::Failed], vec![CallAnswer::json(409, &json!({"error": "hold_not_open", "state": "released"}))]] {
        let mut p = demo();
        let mut s = p.http().unwrap();
        s.request(&request("POST", SMS, &[("authorization", &auth)])).unwrap();
        s.answer_next(key_record(&["sms:send"], "active", 5)).unwrap();
        s.answer_next(held("hold_y", 1, 4)).unwrap();
        s.send_response_headers(&[(":status", "200")]).unwrap();
        for a in answers {
            s.answer_next(a).unwrap();
        }
        assert!(!s.response_resumed());
        assert_eq!(s.local_reply().map(|r| (r.status, r.body_str())), Some((503, r#"{"success":false,"error":"credits_unavailable"}"#.into())));
        assert!(p.log_text(LogLevel::Warn).contains("hold_y"));
    }
    // A release that fails lets the (failed) response through.
    let mut p = demo();
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &auth)])).unwrap();
    s.answer_next(key_record(&["sms:send"], "active", 5)).unwrap();
    s.answer_next(held("hold_w", 1, 4)).unwrap();
    s.send_response_headers(&[(":status", "500")]).unwrap();
    s.answer_next(CallAnswer::Failed).unwrap();
    s.answer_next(CallAnswer::Failed).unwrap();
    assert!(s.response_resumed());
    // Up-front routes debit instead, and settle nothing.
    let mut cfg = demo_config();
    cfg["routes"][0]["charge"] = json!("up_front");
    let mut p = start(&cfg);
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &auth)])).unwrap();
    s.answer_next(key_record(&["sms:send"], "active", 5)).unwrap();
    assert_eq!(s.answer_next(charged(1, 4)).unwrap().path(), "/v1/debit");
    assert_eq!(s.send_response_headers(&[(":status", "500")]).unwrap(), Action::Continue);
    assert!(s.pending_callouts().is_empty());
}

/// A lost hold answer is asked again with the same idempotency key, so the
/// service replays the first hold instead of placing a second one.
#[test]
fn a_transport_failure_is_retried_once_with_the_same_idempotency_key() {
    let mut p = demo();
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &format!("Bearer {API_KEY}"))])).unwrap();
    s.answer_next(key_record(&["sms:send"], "active", 5)).unwrap();
    let first = s.answer_next(CallAnswer::raw(503, b"upstream connect error or disconnect/reset before headers")).unwrap();
    let second = s.answer_next(held("hold_r", 1, 4)).unwrap();
    assert_eq!(first.path(), "/v1/holds");
    assert_eq!(first.body_json()["idempotency_key"], "sms_send:req-1");
    assert_eq!(first.body, second.body);
    assert!(matches!(s.outcome(), Outcome::Passed(_)));
    assert!(p.log_text(LogLevel::Info).contains("retrying /v1/holds"));
}

/// One budget per account: the service counts; the filter asks on free
/// routes and folds the check into the hold on paid ones.
#[test]
fn rate_limited_requests_get_429_with_retry_after() {
    let mut cfg = demo_config();
    cfg["rate_limit"] = json!({"requests": 2, "window_seconds": 60});
    let mut p = start(&cfg);
    let limited = CallAnswer::json(429, &json!({"error": "rate_limited", "retry_after_seconds": 30}));
    let mut s = p.http().unwrap();
    s.request(&request("GET", "/api/v1/account", &[("authorization", &format!("Bearer {}", privy_token()))])).unwrap();
    let call = s.answer_next(limited.clone()).unwrap();
    assert_eq!(call.path(), "/v1/ratelimit");
    assert_eq!(call.body_json(), json!({"account": USER, "rate_limit": {"requests": 2, "window_seconds": 60, "burst": 2}}));
    let r = s.local_reply().unwrap();
    assert_eq!((r.status, r.body_str()), (429, r#"{"success":false,"error":"rate_limited"}"#.to_string()));
    assert_eq!(r.header("retry-after").as_deref(), Some("30"));
    // Paid route: one callout carries both.
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &format!("Bearer {}", privy_token()))])).unwrap();
    let call = s.answer_next(limited).unwrap();
    assert_eq!(call.path(), "/v1/holds");
    assert_eq!(call.body_json()["rate_limit"]["requests"], 2);
    assert_eq!(s.local_reply().map(|r| r.status), Some(429));
}

#[test]
fn api_key_refusals() {
    let auth = format!("Bearer {API_KEY}");
    let cases: Vec<(CallAnswer, u32, &str, &str)> = vec![
        (CallAnswer::json(404, &json!({"error": "key_not_found"})), 401, "unauthorized", "unknown API key"),
        (key_record(&["sms:send"], "revoked", 10), 401, "unauthorized", "API key revoked"),
        (key_record(&["sms:send"], "expired", 10), 401, "unauthorized", "API key expired"),
    ];
    for (answer, status, error, message) in cases {
        let mut p = demo();
        let mut s = p.http().unwrap();
        s.request(&request("POST", SMS, &[("authorization", &auth)])).unwrap();
        s.answer_next(answer).unwrap();
        assert_eq!(refused(&s, status, error)["message"], message);
        assert!(s.pending_callouts().is_empty(), "no debit after a refused lookup");
    }
    // Missing scope: 403, no debit.
    let mut p = demo();
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &auth)])).unwrap();
    s.answer_next(key_record(&["contacts_read"], "active", 10)).unwrap();
    assert_eq!(refused(&s, 403, "insufficient_scope")["required_scope"], "sms:send");
    assert_eq!(s.callouts().len(), 1);
    let www = s.local_reply().unwrap().header("www-authenticate").unwrap();
    assert_eq!(www, "Bearer realm=\"dialtone\", error=\"insufficient_scope\", scope=\"sms:send\"");
}

#[test]
fn insufficient_credits_is_the_seed_body_exactly() {
    let mut p = demo();
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &format!("Bearer {API_KEY}"))])).unwrap();
    s.answer_next(key_record(&["sms:send"], "active", 0)).unwrap();
    s.answer_next(broke(0, 1)).unwrap();
    let r = s.local_reply().unwrap();
    assert_eq!(r.status, 402);
    assert_eq!(r.body_str(), r#"{"success":false,"error":"insufficient_credits","credits":0,"required":1}"#);
}

#[test]
fn privy_expiry_nbf_and_iat_edges_to_the_second() {
    // exp = NOW; with the default 60 s leeway the token works through NOW+59
    // and is refused from NOW+60.
    let mut c = claims();
    c["exp"] = json!(NOW);
    let token = privy_token_with(&c);
    let auth = format!("Bearer {token}");
    for (t, ok) in [(NOW + 59, true), (NOW + 60, false)] {
        let mut p = demo();
        p.set_time_secs(t);
        let mut s = p.http().unwrap();
        s.request(&request("GET", "/api/v1/account", &[("authorization", &auth)])).unwrap();
        match ok {
            true => assert!(matches!(s.outcome(), Outcome::Passed(_)), "at {t}: {:?}", s.outcome()),
            false => assert_eq!(refused(&s, 401, "unauthorized")["message"], "token expired"),
        }
    }
    // nbf = NOW+100: refused until NOW+40 (nbf - leeway), accepted from then.
    let mut c = claims();
    c["nbf"] = json!(NOW + 100);
    let auth = format!("Bearer {}", privy_token_with(&c));
    for (t, ok) in [(NOW + 39, false), (NOW + 40, true)] {
        let mut p = demo();
        p.set_time_secs(t);
        let mut s = p.http().unwrap();
        s.request(&request("GET", "/api/v1/account", &[("authorization", &auth)])).unwrap();
        match ok {
            true => assert!(matches!(s.outcome(), Outcome::Passed(_)), "at {t}"),
            false => assert_eq!(refused(&s, 401, "unauthorized")["message"], "token not yet valid"),
        }
    }
    // iat = NOW+61: in the future beyond the leeway.
    let mut c = claims();
    c["iat"] = json!(NOW + 61);
    let mut p = demo();
    let mut s = p.http().unwrap();
    s.request(&request("GET", "/api/v1/account", &[("authorization", &format!("Bearer {}", privy_token_with(&c)))])).unwrap();
    assert_eq!(refused(&s, 401, "unauthorized")["message"], "token issued in the future");
}

#[test]
fn privy_session_skips_scope_and_pays() {
    let mut p = demo();
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &format!("Bearer {}", privy_token()))])).unwrap();
    let debit = s.answer_next(held("hold_p", 1, 41)).unwrap();
    assert_eq!(debit.path(), "/v1/holds");
    assert_eq!(debit.body_json()["account"], USER);
    assert_eq!(debit.body_json().get("key_prefix"), None);
    assert_eq!(s.callouts().len(), 1, "no lookup for a Privy session");
    assert_eq!(s.upstream_header("x-dialtone-auth-method").as_deref(), Some("privy"));
    assert_eq!(s.upstream_header("x-dialtone-credits-remaining").as_deref(), Some("41"));
}

#[test]
fn hostile_privy_tokens_are_refused_before_any_callout() {
    let key = signing_key();
    let pem = tokens::public_pem(&key).unwrap();
    let attacker = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims();
        f(&mut c);
        c
    };
    let good = privy_token();
    let parts: Vec<&str> = good.split('.').collect();
    let cases: Vec<(&str, String, &str)> = vec![
        ("tampered payload", format!("{}.{}.{}", parts[0], tokens::b64(with(&|c| c["sub"] = json!("did:privy:victim")).to_string().as_bytes()), parts[2]), "invalid token signature"),
        ("signature of another key", tokens::sign_es256(&attacker, &es256_header(), &claims()), "invalid token signature"),
        ("alg none", tokens::unsigned(&claims()), "malformed token"),
        ("alg none with a signature", format!("{}AAAA", tokens::unsigned(&claims())), "token algorithm must be ES256"),
        ("HS256 keyed with the PEM", tokens::sign_hs256(pem.as_bytes(), &json!({"alg": "HS256"}), &claims()).unwrap(), "token algorithm must be ES256"),
        ("wrong aud", privy_token_with(&with(&|c| c["aud"] = json!("other-app"))), "token audience is not this app"),
        ("wrong iss", privy_token_with(&with(&|c| c["iss"] = json!("privy.evil"))), "token issuer is not accepted"),
        ("no sub", privy_token_with(&with(&|c| { c.as_object_mut().unwrap().remove("sub"); })), "token is missing a required claim"),
        ("exp as a string", privy_token_with(&with(&|c| c["exp"] = json!("4102444800"))), "malformed token claims"),
        ("crit", tokens::sign_es256(&key, &json!({"alg": "ES256", "crit": ["exp"]}), &claims()), "token has critical extensions"),
        ("embedded jwk", tokens::sign_es256(&attacker, &json!({"alg": "ES256", "jwk": {"kty": "EC"}}), &claims()), "invalid token signature"),
        ("padded signature", format!("{good}="), "malformed token encoding"),
        ("four segments", format!("{good}.x"), "malformed token"),
    ];
    for (what, token, message) in cases {
        let mut p = demo();
        let mut s = p.http().unwrap();
        s.request(&request("POST", SMS, &[("authorization", &format!("Bearer {token}"))])).unwrap();
        let body = refused(&s, 401, "unauthorized");
        assert_eq!(body["message"], message, "{what}");
        assert!(s.callouts().is_empty(), "{what}: a refused token must cost no callout");
        assert!(!p.log_text(LogLevel::Trace).contains(&token), "{what}: token in the logs");
    }
}

/// The derived Privy-shaped corpus (tests/vectors/derived), through the
/// compiled filter rather than the native library: the wasm build agrees.
#[test]
fn derived_conformance_corpus_through_the_wasm() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors/derived/es256_privy_conformance.json");
    let data: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap();
    let vc = &data["verifier_config"];
    let mut cfg = demo_config();
    cfg["privy"] = json!({"app_id": vc["audience"], "issuer": vc["issuer"], "jwks": {"keys": [vc["public_key_jwk"]]}, "leeway_seconds": vc["leeway_seconds"]});
    let wasm_now = vc["now_unix"].as_i64().unwrap();
    let mut p = Plugin::start(wasm(), PluginOptions::new(cfg.to_string()).clock_secs(wasm_now)).unwrap();
    let mut accepted = 0;
    for case in data["cases"].as_array().unwrap() {
        let token = case["token"].as_str().unwrap();
        let mut s = p.http().unwrap();
        s.request(&request("GET", "/api/v1/account", &[("authorization", &format!("Bearer {token}"))])).unwrap();
        let passed = matches!(s.outcome(), Outcome::Passed(_));
        assert_eq!(passed, case["expect"] == "accept", "{} ({})", case["id"], case["class"]);
        accepted += usize::from(passed);
        s.close().unwrap();
    }
    assert_eq!(accepted, 4);
    assert!(p.crashed().is_none());
}

#[test]
fn fails_closed_whatever_the_service_does() {
    let auth = format!("Bearer {API_KEY}");
    let huge = vec![b'a'; 70_000];
    let faults: Vec<(&str, CallAnswer)> = vec![
        ("timeout / refused", CallAnswer::Failed),
        ("500", CallAnswer::raw(500, b"oops")),
        ("Envoy's own 503", CallAnswer::raw(503, b"no healthy upstream")),
        ("504", CallAnswer::raw(504, b"upstream request timeout")),
        ("garbage 200", CallAnswer::raw(200, b"<html>hello</html>")),
        ("empty 200", CallAnswer::raw(200, b"")),
        ("huge 200", CallAnswer::raw(200, &huge)),
        ("wrong shape", CallAnswer::json(200, &json!({"account": USER}))),
        ("header injection in the account", CallAnswer::json(200, &json!({"account": "did:privy:x\r\nx-dialtone-auth-method: admin", "key_prefix": API_KEY_PREFIX, "kind": "api_key", "scopes": ["sms:send"], "state": "active", "balance": 1}))),
        ("another key's record", CallAnswer::json(200, &json!({"account": USER, "key_prefix": "zzzzzzzz", "kind": "api_key", "scopes": ["sms:send"], "state": "active", "balance": 1}))),
    ];
    for (what, answer) in faults {
        let mut p = demo();
        let mut s = p.http().unwrap();
        s.request(&request("POST", SMS, &[("authorization", &auth)])).unwrap();
        let first = s.answer_next(answer.clone()).unwrap();
        // A transport failure (no answer, Envoy's own 503/504) is retried once,
        // with the very same request; an answer of the service is not.
        if let Some(retry) = s.pending_callouts().first().cloned() {
            assert!(matches!(what, "timeout / refused" | "Envoy's own 503" | "504"), "{what} was retried");
            assert_eq!((retry.path(), &retry.body), (first.path(), &first.body), "{what}");
            s.answer(retry.token, answer).unwrap();
        }
        assert!(s.pending_callouts().is_empty(), "{what}: more than one retry");
        let r = s.local_reply().unwrap_or_else(|| panic!("{what}: {:?}", s.outcome()));
        assert_eq!(r.status, 503, "{what}");
        assert_eq!(r.body_str(), r#"{"success":false,"error":"credits_unavailable"}"#, "{what}");
    }
    // Hold failures: never passed unpaid.
    let debit_faults: Vec<(&str, CallAnswer)> = vec![
        ("timeout", CallAnswer::Failed),
        ("idempotency conflict", CallAnswer::json(409, &json!({"error": "idempotency_conflict"}))),
        ("held another amount", CallAnswer::json(200, &json!({"hold_id": "h", "account": USER, "amount": 0, "balance": 5}))),
        ("negative balance", CallAnswer::json(200, &json!({"hold_id": "h", "account": USER, "amount": 1, "balance": -1}))),
        ("hold id that is a path", CallAnswer::json(200, &json!({"hold_id": "../debit", "account": USER, "amount": 1, "balance": 1}))),
        ("rate limit answer without the contract's body", CallAnswer::raw(429, b"slow down")),
    ];
    for (what, answer) in debit_faults {
        let mut p = demo();
        let mut s = p.http().unwrap();
        s.request(&request("POST", SMS, &[("authorization", &auth)])).unwrap();
        s.answer_next(key_record(&["sms:send"], "active", 5)).unwrap();
        s.answer_next(answer.clone()).unwrap();
        if !s.pending_callouts().is_empty() {
            s.answer_next(answer).unwrap();
        }
        assert_eq!(s.local_reply().map(|r| r.status), Some(503), "{what}");
    }
    // The same VM keeps serving after a failure.
    let mut p = demo();
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &auth)])).unwrap();
    s.answer_next(CallAnswer::Failed).unwrap();
    s.answer_next(CallAnswer::Failed).unwrap();
    s.close().unwrap();
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &auth)])).unwrap();
    s.answer_next(key_record(&["sms:send"], "active", 5)).unwrap();
    s.answer_next(held("hold_z", 1, 4)).unwrap();
    assert!(matches!(s.outcome(), Outcome::Passed(_)));
}

#[test]
fn client_identity_headers_are_stripped_everywhere() {
    let spoof = [
        ("x-dialtone-account", "did:privy:victim"),
        ("X-Dialtone-Auth-Method", "admin"),
        ("x-dialtone-key-prefix", "deadbeef"),
        ("x-dialtone-credits-remaining", "99999"),
        ("x-dialtone-whatever", "x"),
    ];
    // Public route.
    let mut p = demo();
    let mut s = p.http().unwrap();
    s.request(&request("GET", "/healthz", &spoof)).unwrap();
    let Outcome::Passed(h) = s.outcome() else { panic!() };
    // Only the filter's own route header remains.
    let ours: Vec<_> = h.iter().filter(|(k, _)| k.starts_with("x-dialtone-")).collect();
    assert_eq!(ours, vec![&("x-dialtone-route".to_string(), b"healthz".to_vec())], "{h:?}");
    // An x402 payment (verified, claimed): stripped, then the filter's own
    // x402 headers; the payment header itself untouched.
    let mut s = p.http().unwrap();
    let accepted = demo_config()["routes"][0]["x402"]["accepts"][0].clone();
    let payment = STANDARD.encode(json!({"x402Version": 2, "accepted": accepted, "payload": {"signature": "0x1"}}).to_string());
    let mut headers = spoof.to_vec();
    headers.push(("payment-signature", &payment));
    s.request(&request("POST", SMS, &headers)).unwrap();
    s.answer_next(CallAnswer::json(200, &json!({"isValid": true, "payer": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"}))).unwrap();
    let claim = s.pending_callouts()[0].body_json()["claim"].clone();
    s.answer_next(CallAnswer::json(201, &json!({"claim": claim, "claimed": true}))).unwrap();
    let Outcome::Passed(h) = s.outcome() else { panic!("{:?}", s.outcome()) };
    let mut ours: Vec<&str> = h.iter().filter(|(k, _)| k.starts_with("x-dialtone-")).map(|(k, _)| k.as_str()).collect();
    ours.sort_unstable();
    assert_eq!(
        ours,
        ["x-dialtone-auth-method", "x-dialtone-route", "x-dialtone-x402-amount", "x-dialtone-x402-asset", "x-dialtone-x402-network", "x-dialtone-x402-payer"],
        "{h:?}"
    );
    assert_eq!(s.upstream_header("x-dialtone-account"), None, "the spoofed account is gone");
    assert_eq!(s.upstream_header("x-dialtone-auth-method").as_deref(), Some("x402"));
    assert_eq!(s.upstream_header("payment-signature").as_deref(), Some(payment.as_str()));
    // Privy session: replaced with the real identity.
    let mut s = p.http().unwrap();
    let auth = format!("Bearer {}", privy_token());
    let mut headers = spoof.to_vec();
    headers.push(("authorization", &auth));
    s.request(&request("GET", "/api/v1/account", &headers)).unwrap();
    assert_eq!(s.upstream_header("x-dialtone-account").as_deref(), Some(USER));
    assert_eq!(s.upstream_header("x-dialtone-auth-method").as_deref(), Some("privy"));
    assert_eq!(s.upstream_header("x-dialtone-key-prefix"), None);
    assert_eq!(s.upstream_header("x-dialtone-whatever"), None);
}

#[test]
fn x402_fall_through_and_requirements() {
    let mut p = demo();
    let mut s = p.http().unwrap();
    s.request(&request("POST", "/api/v1/sms/send?dry=1", &[])).unwrap();
    let body = refused(&s, 402, "payment_required");
    assert_eq!(body["x402Version"], 2);
    assert_eq!(body["resource"]["url"], "https://api.example.com/api/v1/sms/send");
    assert_eq!(body["accepts"][0]["payTo"], "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
    let header = s.local_reply().unwrap().header("payment-required").unwrap();
    let decoded: Value = serde_json::from_slice(&STANDARD.decode(header).unwrap()).unwrap();
    assert_eq!(decoded["accepts"], body["accepts"]);
    assert!(s.callouts().is_empty());
    // The v1 header is never passed unchecked.
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("x-payment", "v1-payload")])).unwrap();
    let body = refused(&s, 402, "payment_required");
    assert_eq!(body["reason"], "x402 v1 (X-PAYMENT) is not accepted: pay with PAYMENT-SIGNATURE (x402 v2)");
    assert!(s.callouts().is_empty());
    // No x402 on the route: 401 with a bare challenge.
    let mut s = p.http().unwrap();
    s.request(&request("GET", "/api/v1/account", &[])).unwrap();
    refused(&s, 401, "unauthorized");
    assert_eq!(s.local_reply().unwrap().header("www-authenticate").as_deref(), Some("Bearer realm=\"dialtone\""));
}

#[test]
fn admin_key_comes_from_the_vm_environment() {
    let mut p = demo();
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &format!("Bearer {ADMIN_KEY}"))])).unwrap();
    assert!(matches!(s.outcome(), Outcome::Passed(_)));
    assert!(s.callouts().is_empty(), "admin: no lookup, no debit");
    assert_eq!(s.upstream_header("x-dialtone-auth-method").as_deref(), Some("admin"));
    // Without the environment variable the same key is just unknown.
    let mut p = Plugin::start(wasm(), PluginOptions::new(demo_config().to_string()).clock_secs(NOW)).unwrap();
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &format!("Bearer {ADMIN_KEY}"))])).unwrap();
    refused(&s, 401, "unauthorized");
    // Or as a digest in the config.
    let mut cfg = demo_config();
    cfg["admin_key_sha256"] = json!(dialtone::bearer::sha256_hex(ADMIN_KEY.as_bytes()));
    let mut p = Plugin::start(wasm(), PluginOptions::new(cfg.to_string()).clock_secs(NOW)).unwrap();
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &format!("Bearer {ADMIN_KEY}"))])).unwrap();
    assert!(matches!(s.outcome(), Outcome::Passed(_)));
}

#[test]
fn invalid_config_refuses_to_start_and_says_why() {
    let mut cfg = demo_config();
    cfg["routes"][1]["path"] = json!({"template": "/api/{id"});
    cfg["credits_service"]["timeout_ms"] = json!(0);
    match Plugin::start(wasm(), PluginOptions::new(cfg.to_string())) {
        Err(StartError::ConfigRefused { logs }) => {
            let text: Vec<&str> = logs.iter().filter(|l| l.level == LogLevel::Error).map(|l| l.message.as_str()).collect();
            let text = text.join("\n");
            assert!(text.contains("invalid plugin configuration"), "{text}");
            assert!(text.contains("$.routes[1].path.template"), "{text}");
            assert!(text.contains("$.credits_service.timeout_ms"), "{text}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("an invalid config was accepted"),
    }
    for bad in ["", "not json", "{}", "[]", "{\"routes\": 5}"] {
        assert!(matches!(Plugin::start(wasm(), PluginOptions::new(bad)), Err(StartError::ConfigRefused { .. })), "{bad:?}");
    }
}

#[test]
fn hostile_headers_never_crash_the_vm() {
    let mut p = demo();
    let long = "a".repeat(70_000);
    let long_bearer = format!("Bearer {long}");
    let hostile: Vec<Vec<(&str, &[u8])>> = vec![
        vec![("authorization", b"Bearer \xff\xfe")],
        vec![("authorization", b"\xff")],
        vec![("authorization", long_bearer.as_bytes())],
        vec![("authorization", b"Bearer a"), ("authorization", b"Bearer b")],
        vec![("authorization", b"Bearer\x00abc")],
        vec![("authorization", b"bearer   ")],
        vec![("cookie", b"privy-token=\xff\xff; a=b")],
        vec![("cookie", b"privy-token=eyJ.eyJ.x")],
        vec![("x-request-id", b"\xff\xfe")],
        vec![("payment-signature", b"")],
        vec![(":path", b"/\xff\xfe")],
        vec![(":method", b"")],
    ];
    for headers in &hostile {
        let mut base: Vec<(&str, &[u8])> = vec![(":method", b"GET"), (":path", b"/api/v1/account"), (":authority", b"h"), (":scheme", b"https")];
        for (k, _) in headers {
            base.retain(|(bk, _)| bk != k);
        }
        base.extend(headers.iter().cloned());
        let mut s = p.http().unwrap();
        s.send_request_headers(&base, true).unwrap();
        let r = s.local_reply().unwrap_or_else(|| panic!("{headers:?}: {:?}", s.outcome()));
        assert!(r.status == 401 || r.status == 403, "{headers:?}: {}", r.status);
        s.close().unwrap();
    }
    assert!(p.crashed().is_none());
    // Still serving.
    let mut s = p.http().unwrap();
    s.request(&request("GET", "/healthz", &[])).unwrap();
    assert!(matches!(s.outcome(), Outcome::Passed(_)));
}

#[test]
fn secrets_never_reach_the_logs() {
    let token = privy_token();
    let mut expired = claims();
    expired["exp"] = json!(NOW - 3600);
    let expired = privy_token_with(&expired);
    let mut p = demo();
    for auth in [API_KEY, token.as_str(), expired.as_str(), ADMIN_KEY] {
        let mut s = p.http().unwrap();
        s.request(&request("POST", SMS, &[("authorization", &format!("Bearer {auth}"))])).unwrap();
        while let Some(c) = s.pending_callouts().first().cloned() {
            let answer = if c.path() == "/v1/keys/lookup" { key_record(&[], "active", 0) } else { broke(0, 1) };
            s.answer(c.token, answer).unwrap();
        }
        s.close().unwrap();
    }
    let logs = p.log_text(LogLevel::Trace);
    assert!(!logs.is_empty());
    for secret in [API_KEY, &token, &expired, ADMIN_KEY] {
        assert!(!logs.contains(secret), "a secret is in the logs");
        assert!(!logs.contains(&secret[secret.len() - 16..]), "part of a secret is in the logs");
    }
    let (out, err) = p.stdio();
    assert!(!out.contains(API_KEY) && !err.contains(API_KEY));
}

#[test]
fn privy_cookie_mode() {
    let mut p = demo();
    let mut s = p.http().unwrap();
    let cookie = format!("theme=dark; privy-token={}", privy_token());
    s.request(&request("GET", "/api/v1/account", &[("cookie", &cookie)])).unwrap();
    assert_eq!(s.upstream_header("x-dialtone-auth-method").as_deref(), Some("privy"));
    // Header first: a bad Authorization header is not rescued by a good cookie.
    let mut s = p.http().unwrap();
    s.request(&request("GET", "/api/v1/account", &[("cookie", &cookie), ("authorization", "Basic eA==")])).unwrap();
    refused(&s, 401, "unauthorized");
    // Off when the policy says so.
    let mut cfg = demo_config();
    cfg["privy"]["accept_cookie"] = json!(false);
    let mut p = start(&cfg);
    let mut s = p.http().unwrap();
    s.request(&request("GET", "/api/v1/account", &[("cookie", &cookie)])).unwrap();
    refused(&s, 401, "unauthorized");
}

#[test]
fn unmatched_routes_are_denied_by_default_and_allowed_when_configured() {
    let mut p = demo();
    let mut s = p.http().unwrap();
    s.request(&request("GET", "/admin/secret", &[])).unwrap();
    refused(&s, 403, "route_not_allowed");
    let mut cfg = demo_config();
    cfg["unmatched"] = json!("allow");
    let mut p = start(&cfg);
    let mut s = p.http().unwrap();
    s.request(&request("GET", "/admin/secret", &[("x-dialtone-account", "spoof")])).unwrap();
    assert!(matches!(s.outcome(), Outcome::Passed(_)));
    assert_eq!(s.upstream_header("x-dialtone-account"), None);
}

#[test]
fn a_jwks_selects_keys_by_kid() {
    let key = signing_key();
    let point = key.verifying_key().to_encoded_point(false);
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "k-2026", "use": "sig", "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()), "y": URL_SAFE_NO_PAD.encode(point.y().unwrap())});
    let mut cfg = demo_config();
    cfg["privy"].as_object_mut().unwrap().remove("verification_key");
    cfg["privy"]["jwks"] = json!({"keys": [jwk]});
    let mut p = start(&cfg);
    for (kid, ok) in [(Some("k-2026"), true), (Some("k-2025"), false), (None, true)] {
        let mut header = es256_header();
        if let Some(k) = kid {
            header["kid"] = json!(k);
        }
        let token = tokens::sign_es256(&key, &header, &claims());
        let mut s = p.http().unwrap();
        s.request(&request("GET", "/api/v1/account", &[("authorization", &format!("Bearer {token}"))])).unwrap();
        assert_eq!(matches!(s.outcome(), Outcome::Passed(_)), ok, "kid {kid:?}");
        s.close().unwrap();
    }
}

/// A request with a body: the body waits while the callouts are in flight
/// (as in Envoy), a refused request never continues, and a paid one does.
#[test]
fn a_request_body_waits_for_the_decision() {
    let mut p = demo();
    let auth = format!("Bearer {API_KEY}");
    let headers = request("POST", SMS, &[("authorization", &auth), ("content-type", "application/json")]);
    let raw: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    let mut s = p.http().unwrap();
    assert_eq!(s.send_request_headers(&raw, false).unwrap(), Action::Pause);
    assert_eq!(s.send_request_body(b"{\"to\":", false).unwrap(), Action::Pause);
    s.answer_next(key_record(&["sms:send"], "active", 0)).unwrap();
    s.answer_next(broke(0, 1)).unwrap();
    assert_eq!(s.local_reply().map(|r| r.status), Some(402));
    assert_eq!(s.send_request_body(b"\"+1\"}", true).unwrap(), Action::Pause);
    assert!(!matches!(s.outcome(), Outcome::Passed(_)));

    // The key's lookup is reused (well within key_cache_ttl_ms): the only
    // callout is the hold, and the body still waits for it.
    let mut s = p.http().unwrap();
    assert_eq!(s.send_request_headers(&raw, false).unwrap(), Action::Pause);
    assert_eq!(s.send_request_body(b"{", false).unwrap(), Action::Pause);
    let calls = s.pending_callouts();
    assert_eq!(calls.iter().map(|c| c.path()).collect::<Vec<_>>(), vec!["/v1/holds".to_string()]);
    s.answer_next(held("hold_b", 1, 4)).unwrap();
    assert!(matches!(s.outcome(), Outcome::Passed(_)));
    assert_eq!(s.send_request_body(b"}", true).unwrap(), Action::Continue);
    assert_eq!(p.metric("dialtone.cache.key.hit").map(|m| m.value), Some(1));
}

/// Decisions by outcome, callouts by result and their latency, settlements:
/// counted through the proxy-wasm metrics ABI.
#[test]
fn metrics_count_what_happened() {
    let mut p = demo();
    let auth = format!("Bearer {API_KEY}");
    // A paid request left waiting for its hold; a public one; a 401; a lookup
    // lost twice (retried once), then 503; a paid request held and captured.
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &auth)])).unwrap();
    s.answer_next(key_record(&["sms:send"], "active", 5)).unwrap();
    p.advance(std::time::Duration::from_millis(7));
    let mut s = p.http().unwrap();
    s.request(&request("GET", "/healthz", &[])).unwrap();
    let mut s = p.http().unwrap();
    s.request(&request("GET", "/api/v1/account", &[])).unwrap();
    // Past the key cache's TTL: the next request looks the key up again.
    p.advance(std::time::Duration::from_secs(1));
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &auth)])).unwrap();
    s.answer_next(CallAnswer::Failed).unwrap();
    s.answer_next(CallAnswer::Failed).unwrap();
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &auth)])).unwrap();
    s.answer_next(key_record(&["sms:send"], "active", 5)).unwrap();
    s.answer_next(held("hold_m", 1, 4)).unwrap();
    s.send_response_headers(&[(":status", "200")]).unwrap();
    s.answer_next(settled("hold_m", "captured")).unwrap();
    let count = |name: &str| p.metric(name).map(|m| m.value).unwrap_or_else(|| panic!("{name} not defined"));
    assert_eq!(count("dialtone.allowed.apikey"), 1);
    assert_eq!(count("dialtone.allowed.anonymous"), 1);
    assert_eq!(count("dialtone.denied.unauthorized"), 1);
    assert_eq!(count("dialtone.denied.credits_unavailable"), 1);
    assert_eq!(count("dialtone.callout.retried"), 1);
    assert_eq!(count("dialtone.callout.failed"), 2);
    assert_eq!(count("dialtone.callout.answered"), 4);
    assert_eq!(count("dialtone.hold.captured"), 1);
    assert_eq!(count("dialtone.denied.insufficient_credits"), 0);
    assert_eq!((count("dialtone.cache.key.miss"), count("dialtone.cache.key.hit")), (3, 0));
    let latency = p.metric("dialtone.callout.latency_ms").unwrap();
    assert_eq!(latency.samples.len(), 6);
}

#[allow(clippy::unwrap_used)] // test fixture
fn jwks_of(keys: &[(&str, &p256::ecdsa::SigningKey)]) -> Value {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(kid, k)| {
            let p = k.verifying_key().to_encoded_point(false);
            json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                   "x": URL_SAFE_NO_PAD.encode(p.x().unwrap()), "y": URL_SAFE_NO_PAD.encode(p.y().unwrap())})
        })
        .collect();
    json!({ "keys": keys })
}

/// The issuer's JWKS, fetched at start, on a timer, and at once for an
/// unknown kid (once per cooldown); the last good keys survive a bad fetch.
#[test]
fn jwks_fetch_and_key_rotation_without_an_outage() {
    let old = signing_key();
    let new = p256::ecdsa::SigningKey::from_slice(&[11u8; 32]).unwrap();
    let token = |kid: &str, key: &p256::ecdsa::SigningKey| {
        let mut h = es256_header();
        h["kid"] = json!(kid);
        tokens::sign_es256(key, &h, &claims())
    };
    let mut cfg = demo_config();
    let privy = cfg["privy"].as_object_mut().unwrap();
    privy.remove("verification_key");
    privy.insert("jwks_fetch".into(), json!({"cluster": "privy_api", "authority": "api.privy.io", "path": "/v1/apps/dialtone-demo-app/jwks.json", "refresh_seconds": 60, "unknown_kid_cooldown_seconds": 30}));
    let mut p = start(&cfg);
    assert_eq!(p.tick_period(), std::time::Duration::from_secs(1));
    // At start the root context fetches the document.
    let fetch = p.pending_callouts().into_iter().next().expect("a JWKS fetch at start");
    assert_eq!((fetch.upstream.as_str(), fetch.path(), fetch.header(":method").as_deref()), ("privy_api", "/v1/apps/dialtone-demo-app/jwks.json".to_string(), Some("GET")));
    p.answer(fetch.token, CallAnswer::json(200, &jwks_of(&[("k-old", &old)]))).unwrap();
    let ok = |p: &mut Plugin, tok: &str| {
        let mut s = p.http().unwrap();
        s.request(&request("GET", "/api/v1/account", &[("authorization", &format!("Bearer {tok}"))])).unwrap();
        if let Some(c) = s.pending_callouts().first().cloned() {
            return Err(c);
        }
        Ok(matches!(s.outcome(), Outcome::Passed(_)))
    };
    assert_eq!(ok(&mut p, &token("k-old", &old)), Ok(true));

    // The issuer rotates: a token with the new kid makes the request fetch at
    // once, and it passes with no 401 in between.
    let mut s = p.http().unwrap();
    s.request(&request("GET", "/api/v1/account", &[("authorization", &format!("Bearer {}", token("k-new", &new)))])).unwrap();
    let refetch = s.answer_next(CallAnswer::json(200, &jwks_of(&[("k-old", &old), ("k-new", &new)]))).unwrap();
    assert_eq!(refetch.path(), "/v1/apps/dialtone-demo-app/jwks.json");
    assert!(matches!(s.outcome(), Outcome::Passed(_)), "{:?}", s.outcome());
    s.close().unwrap();
    assert_eq!(ok(&mut p, &token("k-old", &old)), Ok(true), "old tokens keep working");
    assert_eq!(ok(&mut p, &token("k-new", &new)), Ok(true));

    // Another unknown kid within the cooldown: 401 at once, no fetch storm.
    let stranger = p256::ecdsa::SigningKey::from_slice(&[13u8; 32]).unwrap();
    assert_eq!(ok(&mut p, &token("k-stranger", &stranger)), Ok(false));

    // The refresh timer fetches again; a failed or oversized fetch keeps the
    // last good keys.
    p.advance(std::time::Duration::from_secs(61));
    p.tick().unwrap();
    let refresh = p.pending_callouts().into_iter().next().expect("a scheduled refresh");
    p.answer(refresh.token, CallAnswer::raw(500, b"down")).unwrap();
    assert_eq!(ok(&mut p, &token("k-new", &new)), Ok(true));
    p.advance(std::time::Duration::from_secs(11));
    p.tick().unwrap();
    let retry = p.pending_callouts().into_iter().next().expect("a retry after the failure");
    p.answer(retry.token, CallAnswer::raw(200, &vec![b' '; 70_000])).unwrap();
    assert_eq!(ok(&mut p, &token("k-old", &old)), Ok(true));
    assert!(p.log_text(LogLevel::Warn).contains("keeping the last good keys"));
    assert!(p.crashed().is_none());
}

/// A JWKS fetch sent for a request's unknown kid dies with the request when
/// the client goes away (Envoy cancels the stream's callouts): the VM's
/// refresh schedule must not wait for its answer forever, or a key the
/// issuer removed would keep verifying on that VM.
#[test]
fn a_jwks_fetch_lost_with_its_request_does_not_stop_the_refresh() {
    let key = signing_key();
    let mut cfg = demo_config();
    let privy = cfg["privy"].as_object_mut().unwrap();
    privy.remove("verification_key");
    privy.insert("jwks_fetch".into(), json!({"cluster": "privy_api", "path": "/jwks.json", "refresh_seconds": 60, "unknown_kid_cooldown_seconds": 30, "timeout_ms": 2000}));
    let mut p = start(&cfg);
    let fetches = |p: &Plugin| p.callout_log().iter().filter(|c| c.upstream == "privy_api").count();
    let first = p.pending_callouts().into_iter().next().expect("a JWKS fetch at start");
    p.answer(first.token, CallAnswer::json(200, &jwks_of(&[("k1", &key)]))).unwrap();
    // A token naming a kid nobody knows: the request waits for a fetch, and
    // the client leaves before it answers.
    let mut h = es256_header();
    h["kid"] = json!("k-unknown");
    let token = tokens::sign_es256(&key, &h, &claims());
    let mut s = p.http().unwrap();
    s.request(&request("GET", "/api/v1/account", &[("authorization", &format!("Bearer {token}"))])).unwrap();
    assert_eq!(s.pending_callouts().len(), 1, "the unknown kid made the request fetch the JWKS");
    s.close().unwrap();
    assert_eq!(fetches(&p), 2);
    // Past the refresh interval: the root context fetches again.
    p.advance(std::time::Duration::from_secs(61));
    p.tick().unwrap();
    assert_eq!(fetches(&p), 3, "the scheduled refresh still runs");
    assert!(p.crashed().is_none());
}
