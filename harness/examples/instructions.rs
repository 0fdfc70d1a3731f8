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
//! facilitator): a free route and the token scenarios of D1/D2; then the
//! API-key rows: D3 (free, cached lookup), D4 (paid, one debit callout,
//! answered in the harness) and D4l (paid from a credit lease, no callout).
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
        for (row, route, lease) in [
            ("D3: API key, free route (cached lookup)", "/free", false),
            ("D4: API key, paid route, debit callout", "/paid", false),
            ("D4l: API key, paid route, from a lease", "/paid", true),
        ] {
            // An older build may not know `lease`: its row is skipped.
            let Ok(mut plugin) = Plugin::start(&wasm, PluginOptions::new(api_key_policy(lease)).clock_secs(NOW)) else {
                println!("{row:<44} {:>14}  {}", "(refused)", path.display());
                continue;
            };
            let mut n = 0;
            let mut send = |plugin: &mut Plugin| {
                n += 1;
                let (auth, id) = (format!("Bearer {API_KEY}"), format!("req-{n}"));
                let mut stream = plugin.http().unwrap();
                stream
                    .request(&[(":method", "GET"), (":path", route), (":authority", "api.example.com"), ("x-request-id", &id), ("authorization", &auth)])
                    .unwrap();
                // The lookup (first request only) and the debit (D4, and D4l
                // before its lease) are answered; the answering is counted.
                while let Some(c) = stream.pending_callouts().into_iter().next() {
                    let body = if c.path() == "/v1/keys/lookup" {
                        json!({"account": ACCOUNT, "key_prefix": &API_KEY[10..18], "kind": "api_key", "scopes": ["sms:send"],
                               "state": "active", "expires_at": null, "balance": 1_000_000})
                    } else {
                        json!({"account": ACCOUNT, "charged": 1, "balance": 999_999, "replayed": false})
                    };
                    stream.answer(c.token, dialtone_harness::CallAnswer::json(200, &body)).unwrap();
                }
                assert!(stream.local_reply().is_none(), "{}: refused: {:?}", path.display(), stream.local_reply());
            };
            send(&mut plugin);
            if lease {
                // The tick asks for the lease the first debit made room for.
                plugin.tick().unwrap();
                let ask = plugin.pending_callouts().into_iter().next().expect("a lease request");
                let grant = json!({"granted": true, "lease_id": "lease_instructions", "account": ACCOUNT, "credits": 10_000,
                                   "balance": 989_999, "ttl_seconds": 30});
                plugin.answer(ask.token, dialtone_harness::CallAnswer::json(200, &grant)).unwrap();
            }
            for _ in 1..WARMUP {
                send(&mut plugin);
            }
            let before = plugin.instructions().unwrap();
            for _ in 0..MEASURED {
                send(&mut plugin);
            }
            let per_request = (plugin.instructions().unwrap() - before) / MEASURED as u64;
            println!("{row:<44} {per_request:>14}  {}", path.display());
        }
    }
}

const API_KEY: &str = "dial_live_5a1e5c0d7f3b9e2a4c6d8f0b1e3a5c7d9f1b3e5a";
const ACCOUNT: &str = "did:privy:bench";

/// The bench's API-key routes (a free one and an up-front paid one), with
/// or without leases of 10,000 credits.
fn api_key_policy(lease: bool) -> String {
    let mut policy = json!({
        "credits_service": {"cluster": "dialtone_credits", "timeout_ms": 2000, "key_cache_ttl_ms": 1000},
        "routes": [
            {"name": "free", "path": {"prefix": "/free"}, "scope": "sms:send"},
            {"name": "paid", "path": {"prefix": "/paid"}, "scope": "sms:send", "cost": 1, "charge": "up_front"}
        ]
    });
    if lease {
        policy["credits_service"]["lease"] = json!({"credits": 10_000, "report_ms": 200, "ttl_seconds": 30, "min_balance_factor": 4});
    }
    policy.to_string()
}
