//! WebAssembly instructions per request, for one or more builds of the
//! filter: a cost measure that is the same on every run and every machine,
//! where the wall-clock bench (`make bench`) on a shared 2-core machine
//! moves by ±20%. It counts only the filter's own work (not Envoy's, not
//! V8's code quality), so it answers "did this change make the filter do
//! more?", not "how many requests per second".
//!
//! `make instructions` (this build), or
//! `cargo run --release -p dialtone-harness --example instructions -- A.wasm B.wasm …`
//!
//! The policy is the bench's that an older build also loads (no x402
//! facilitator): a free route and the token scenarios of D1/D2.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use dialtone_devstack::tokens;
use dialtone_harness::{default_wasm_path, Plugin, PluginOptions, Wasm};
use p256::ecdsa::SigningKey;
use serde_json::json;

const NOW: i64 = 1_768_464_000;
const APP_ID: &str = "bench-app";
const WARMUP: usize = 20;
const MEASURED: usize = 200;
/// A `DIAL_SHARED_CACHE_SECRET` (≥ 32 characters), for the rows that share.
const SHARED_SECRET: &str = "instructions-example-shared-secret-0123";

fn main() {
    let wasms: Vec<PathBuf> = match std::env::args().skip(1).map(PathBuf::from).collect::<Vec<_>>() {
        w if w.is_empty() => vec![default_wasm_path().unwrap_or_else(|e| panic!("{e}"))],
        w => w,
    };
    let key = SigningKey::from_slice(&[7u8; 32]).unwrap();
    let policy = json!({
        "credits_service": {"cluster": "dialtone_credits", "timeout_ms": 2000},
        "privy": {"app_id": APP_ID, "verification_key": tokens::public_pem(&key).unwrap()},
        "routes": [{"name": "free", "path": {"prefix": "/free"}, "scope": "sms:send"}]
    })
    .to_string();
    // Distinct tokens (one session each), as the bench's D2 load sends.
    let fresh: Vec<String> = (0..WARMUP + MEASURED)
        .map(|i| {
            let mut claims = tokens::privy_claims(APP_ID, "did:privy:bench-user", NOW - 5, NOW + 3600);
            claims["sid"] = json!(format!("session-{i}"));
            tokens::sign_es256(&key, &json!({"alg": "ES256", "typ": "JWT"}), &claims)
        })
        .collect();
    let repeated = vec![fresh[0].clone(); WARMUP + MEASURED];

    println!("{:<44} {:>14}  build", "instructions per request", "");
    for path in &wasms {
        let wasm = Wasm::metered_from_file(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        for (row, tokens, secret) in [
            ("D2: fresh Privy token, free route", &fresh, None),
            ("D2: the same, shared slots (HMAC'd)", &fresh, Some(SHARED_SECRET)),
            ("D1: repeated Privy token, free route", &repeated, None),
        ] {
            let mut opts = PluginOptions::new(policy.clone()).clock_secs(NOW);
            if let Some(secret) = secret {
                opts = opts.env("DIAL_SHARED_CACHE_SECRET", secret);
            }
            let mut plugin = Plugin::start(&wasm, opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let send = |plugin: &mut Plugin, token: &str| {
                let auth = format!("Bearer {token}");
                let mut stream = plugin.http().unwrap();
                stream
                    .request(&[(":method", "GET"), (":path", "/free"), (":authority", "api.example.com"), ("authorization", &auth)])
                    .unwrap();
                // Every request must pass: a refusal is far cheaper and
                // would make a broken build look fast.
                assert!(stream.local_reply().is_none(), "{}: refused: {:?}", path.display(), stream.local_reply());
            };
            for t in &tokens[..WARMUP] {
                send(&mut plugin, t);
            }
            let before = plugin.instructions().unwrap();
            for t in &tokens[WARMUP..] {
                send(&mut plugin, t);
            }
            let per_request = (plugin.instructions().unwrap() - before) / MEASURED as u64;
            println!("{row:<44} {per_request:>14}  {}", path.display());
        }
    }
}
