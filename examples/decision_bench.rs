//! What the pure per-request logic costs natively when the caches answer
//! (the free-route paths of `make bench`'s D1 and D3): the decision alone,
//! without the host. `cargo run --release --example decision_bench`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use dialtone::cache::Caches;
use dialtone::credits_api::CallOutcome;
use dialtone::decision::{decide_cached, resume_cached, Decision, Request};
use dialtone::policy::Config;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePublicKey, LineEnding};

const NOW: i64 = 1_800_000_000;
const API_KEY: &str = "dial_live_abc12345deadbeefdeadbeefdeadbeef00000000";

fn main() {
    let key = SigningKey::from_slice(&[7u8; 32]).unwrap();
    let pem = key.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
    let cfg = serde_json::json!({
        "credits_service": {"cluster": "credits"},
        "privy": {"app_id": "app-1", "verification_key": pem},
        "routes": [{"name": "free", "path": {"prefix": "/free"}, "scope": "bench:read"}]
    });
    let cfg = Config::from_json(cfg.to_string().as_bytes(), None).unwrap();
    let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","typ":"JWT"}"#);
    let c = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"sid":"bench-session-0","iss":"privy.io","iat":{},"aud":"app-1","sub":"did:privy:bench","exp":{}}}"#,
        NOW - 5,
        NOW + 3600
    ));
    let sig: Signature = key.sign(format!("{h}.{c}").as_bytes());
    let token = format!("Bearer {h}.{c}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()));
    let api_key = format!("Bearer {API_KEY}");
    let mut caches = Caches::new(1024, 1024, 1000);
    let req = |auth: &'static str| Request {
        method: "GET",
        path: "/free",
        scheme: "http",
        authority: "bench",
        authorization: vec![auth.as_bytes()],
        request_id: "0f8e0d8c-1234-4cde-9abc-0123456789ab",
        ..Request::default()
    };
    let token: &'static str = Box::leak(token.into_boxed_str());
    let api_key: &'static str = Box::leak(api_key.into_boxed_str());
    // Fill the caches.
    assert!(matches!(decide_cached(&cfg, &req(token), NOW * 1000, &mut caches), Decision::Allow(_)));
    let Decision::Call(_, pending) = decide_cached(&cfg, &req(api_key), NOW * 1000, &mut caches) else { panic!() };
    let rec = r#"{"account":"did:privy:bench","key_prefix":"abc12345","kind":"api_key","scopes":["bench:read"],"state":"active","expires_at":null,"balance":10}"#;
    let out = CallOutcome::Answered { status: 200, body: rec.as_bytes().to_vec(), truncated: false };
    assert!(matches!(resume_cached(&cfg, pending, out, NOW * 1000, &mut caches), Decision::Allow(_)));
    for (name, auth) in [("privy token, cached", token), ("API key, cached", api_key)] {
        let n = 200_000u32;
        let start = Instant::now();
        for _ in 0..n {
            let d = decide_cached(&cfg, &req(auth), NOW * 1000, &mut caches);
            assert!(matches!(d, Decision::Allow(_)));
        }
        println!("{name}: {:.2} µs per decision", start.elapsed().as_secs_f64() * 1e6 / f64::from(n));
    }
    let mut fresh = Caches::disabled();
    let n = 2_000u32;
    let start = Instant::now();
    for _ in 0..n {
        assert!(matches!(decide_cached(&cfg, &req(token), NOW * 1000, &mut fresh), Decision::Allow(_)));
    }
    println!("privy token, verified: {:.2} µs per decision", start.elapsed().as_secs_f64() * 1e6 / f64::from(n));
}
