//! Shared fixtures for the harness suites: the compiled filter (loaded once
//! per test binary), a test signing key, and the demo policy pointed at it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;

use dialtone_devstack::tokens;
use dialtone_harness::{default_wasm_path, CallAnswer, HttpStream, Plugin, PluginOptions, Wasm};
use p256::ecdsa::SigningKey;
use serde_json::{json, Value};

/// 2026-01-15T08:00:00Z: the clock every scenario starts at.
pub const NOW: i64 = 1_768_464_000;
pub const APP_ID: &str = "dialtone-demo-app";
pub const ADMIN_KEY: &str = "harness-operator-admin-key-0123";
pub const USER: &str = "did:privy:harness-user";
/// An API key in the shape the service mints; its prefix is `abc12345`.
pub const API_KEY: &str = "dial_live_abc12345deadbeefdeadbeefdeadbeef00000000";
pub const API_KEY_PREFIX: &str = "abc12345";

pub fn wasm() -> &'static Wasm {
    static WASM: OnceLock<Wasm> = OnceLock::new();
    WASM.get_or_init(|| {
        let path = default_wasm_path().unwrap_or_else(|e| panic!("{e}"));
        Wasm::from_file(&path).unwrap_or_else(|e| panic!("{} must be built first (`make wasm`): {e:#}", path.display()))
    })
}

/// A fixed test-only P-256 key (scalar 0x07…07).
pub fn signing_key() -> SigningKey {
    SigningKey::from_slice(&[7u8; 32]).unwrap()
}

/// `policy/demo.json` with the test key as the Privy verification key.
pub fn demo_config() -> Value {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    dialtone_devstack::demo_plugin_config(&root, &tokens::public_pem(&signing_key()).unwrap()).unwrap()
}

pub fn start(config: &Value) -> Plugin {
    Plugin::start(wasm(), PluginOptions::new(config.to_string()).clock_secs(NOW).env("DIAL_ADMIN_API_KEY", ADMIN_KEY))
        .unwrap_or_else(|e| panic!("{e}"))
}

pub fn demo() -> Plugin {
    start(&demo_config())
}

/// Privy-shaped claims, valid at NOW:
/// `{"sid","iss":"privy.io","iat":NOW-5,"aud":APP_ID,"sub":USER,"exp":NOW+3600}`.
pub fn claims() -> Value {
    tokens::privy_claims(APP_ID, USER, NOW - 5, NOW + 3600)
}

pub fn es256_header() -> Value {
    json!({"alg": "ES256", "typ": "JWT"})
}

pub fn privy_token_with(claims: &Value) -> String {
    tokens::sign_es256(&signing_key(), &es256_header(), claims)
}

pub fn privy_token() -> String {
    privy_token_with(&claims())
}

/// Request headers as Envoy would hand them to the filter.
pub fn request<'a>(method: &'a str, path: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![(":method", method), (":path", path), (":authority", "api.example.com"), (":scheme", "https"), ("x-request-id", "req-1")];
    h.extend_from_slice(extra);
    h
}

/// The key/credits service's answer for a key record.
pub fn key_record(scopes: &[&str], state: &str, balance: i64) -> CallAnswer {
    CallAnswer::json(200, &json!({
        "account": USER, "key_prefix": API_KEY_PREFIX, "kind": "api_key",
        "scopes": scopes, "state": state, "expires_at": null, "balance": balance
    }))
}

pub fn charged(amount: u64, balance: i64) -> CallAnswer {
    CallAnswer::json(200, &json!({"account": USER, "charged": amount, "balance": balance, "replayed": false}))
}

/// The service placed hold `hold_id` of `amount` for USER.
pub fn held(hold_id: &str, amount: u64, balance: i64) -> CallAnswer {
    CallAnswer::json(200, &json!({"hold_id": hold_id, "account": USER, "amount": amount, "balance": balance, "expires_at": NOW + 300, "replayed": false}))
}

/// The service settled hold `hold_id` (`captured` or `released`).
pub fn settled(hold_id: &str, state: &str) -> CallAnswer {
    CallAnswer::json(200, &json!({"hold_id": hold_id, "state": state, "account": USER}))
}

pub fn broke(balance: i64, required: u64) -> CallAnswer {
    CallAnswer::json(402, &json!({"error": "insufficient_credits", "balance": balance, "required": required}))
}

/// Asserts the stream ended in a local reply with `status` and `error`, and returns its JSON body.
pub fn refused(s: &HttpStream<'_>, status: u32, error: &str) -> Value {
    let r = s.local_reply().unwrap_or_else(|| panic!("expected a {status} reply, outcome {:?}", s.outcome()));
    assert_eq!(r.status, status, "body {}", r.body_str());
    assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
    let body = r.json();
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"], error, "{body}");
    if status == 401 {
        assert!(r.header("www-authenticate").unwrap().starts_with("Bearer realm=\"dialtone\""));
    }
    body
}

/// The whole 401 the filter answers: status, JSON content type, exactly
/// `{"success":false,"error":"unauthorized","message":<message>}`, and the
/// RFC 6750 challenge with `rfc6750` (`invalid_request` / `invalid_token`).
pub fn assert_unauthorized(r: &dialtone_harness::LocalReply, what: &str, message: &str, rfc6750: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.body_str());
    assert_eq!(r.header("content-type").as_deref(), Some("application/json"), "{what}");
    assert_eq!(r.json(), json!({"success": false, "error": "unauthorized", "message": message}), "{what}");
    assert_eq!(
        r.header("www-authenticate"),
        Some(format!("Bearer realm=\"dialtone\", error=\"{rfc6750}\", error_description=\"{message}\"")),
        "{what}"
    );
}
