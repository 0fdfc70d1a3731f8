//! A JWKS document fetched from the issuer (`dialtone::jwks::JwksCache::accept`,
//! and through it `privy_jwt::keys_from_jwks`): untrusted network input.
//!
//! Input: `[flags, status lo, status hi, body…]`; flag bit 0 the body was
//! truncated at the cap, bit 1 the fetch failed, bit 2 a cap of 1024 bytes
//! instead of 65536.
//!
//! Invariants: a refused document never drops the last good keys (nor
//! their fetch time); an accepted one is an untruncated 200 within the cap,
//! a JSON object whose `keys` holds no private key, and yields only keys with
//! distinct `kid`s of at most 256 bytes.
#![no_main]

use dialtone::credits_api::CallOutcome;
use dialtone::jwks::JwksCache;
use dialtone_fuzz::fetched_keys;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let [flags, lo, hi, body @ ..] = data else { return };
    let status = u16::from_le_bytes([*lo, *hi]);
    let truncated = flags & 1 != 0;
    let max_bytes = if flags & 4 != 0 { 1024 } else { 64 * 1024 };
    let outcome = if flags & 2 != 0 {
        CallOutcome::Failed
    } else {
        CallOutcome::Answered { status, body: body.to_vec(), truncated }
    };

    // A cache that already holds good keys, fetched at t=1000.
    let mut cache = JwksCache { keys: fetched_keys().to_vec(), fetched_at: Some(1000), ..JwksCache::default() };
    let fetch = dialtone::policy::JwksFetch {
        cluster: "jwks".into(),
        authority: "jwks".into(),
        path: "/jwks.json".into(),
        refresh_seconds: 300,
        timeout_ms: 2000,
        max_bytes,
        unknown_kid_cooldown_seconds: 30,
        max_stale_seconds: 6 * 3600,
        max_keys: dialtone::privy_jwt::DEFAULT_MAX_KEYS,
    };
    cache.started(&fetch, 2000, false);
    assert!(cache.in_flight(2000));
    let result = cache.accept(outcome, &fetch, &[0; 32], 2000);
    assert!(!cache.in_flight(2000), "a fetch still in flight after its answer");
    match result {
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert_eq!(cache.fetched_at, Some(1000), "a refused document moved the fetch time");
            let kids = |ks: &[dialtone::privy_jwt::EsKey]| ks.iter().map(|k| (k.kid.clone(), k.key)).collect::<Vec<_>>();
            assert_eq!(kids(&cache.keys), kids(fetched_keys()), "a refused document dropped the last good keys");
        }
        Ok(accepted) => {
            let n = accepted.keys;
            assert!(n <= fetch.max_keys, "{n} keys taken, over max_keys");
            assert_eq!(flags & 2, 0, "keys from a failed fetch");
            assert!(status == 200 && !truncated && body.len() <= max_bytes, "keys from status {status}");
            assert_eq!(n, cache.keys.len());
            assert!(n >= 1, "an accepted document without a usable key");
            assert_eq!(cache.fetched_at, Some(2000));
            let doc: Value = serde_json::from_slice(body).unwrap_or_else(|e| panic!("keys from a non-JSON body: {e}"));
            let keys = doc.get("keys").and_then(Value::as_array).unwrap_or_else(|| panic!("keys without a keys array: {doc}"));
            assert!(keys.iter().all(|k| k.get("d").is_none()), "a document with a private key was taken");
            assert!(n <= keys.len());
            for (i, k) in cache.keys.iter().enumerate() {
                if let Some(kid) = &k.kid {
                    assert!(kid.len() <= 256);
                    assert!(cache.keys[..i].iter().all(|o| o.kid.as_ref() != Some(kid)), "duplicate kid {kid:?}");
                }
            }
        }
    }
});
