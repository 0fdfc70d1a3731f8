//! The findings of the outside review of the verification path, each
//! through the compiled `.wasm`: shared-data slots that another module could
//! mint, slots of another build, JWKS size and staleness, state surviving a
//! reconfiguration, a pinned kid-less key hiding a rotation, caches emptied
//! by unchanged keys; and `Authorization` on public routes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use dialtone::cache::{self, SlotKey};
use dialtone::privy_jwt::Session;
use dialtone_devstack::tokens;
use dialtone_harness::{CallAnswer, LogLevel, Outcome, Plugin, PluginOptions, StartError};
use p256::ecdsa::SigningKey;
use serde_json::{json, Value};

/// The deployment's shared-cache secret (`DIAL_SHARED_CACHE_SECRET`).
const SECRET: &str = "harness-shared-cache-secret-0123456789";
/// A JWT-shaped string nobody ever signed: `{"a":…}.{"a":…}.` + 1 byte.
const UNSIGNED: &str = "eyJhIn0.eyJhIn0.AA";
const ACCOUNT: &str = "/api/v1/account";

fn start_with_secret(config: &Value, secret: &str) -> Plugin {
    Plugin::start(
        wasm(),
        PluginOptions::new(config.to_string())
            .clock_secs(NOW)
            .env("DIAL_ADMIN_API_KEY", ADMIN_KEY)
            .env("DIAL_SHARED_CACHE_SECRET", secret),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn counter(p: &Plugin, name: &str) -> i64 {
    p.metric(name).map(|m| m.value).unwrap_or_else(|| panic!("{name} not defined"))
}

/// GET /api/v1/account (free, no scope) with `token`: what happened.
fn account(p: &mut Plugin, token: &str) -> Outcome {
    let mut s = p.http().unwrap();
    s.request(&request("GET", ACCOUNT, &[("authorization", &format!("Bearer {token}"))])).unwrap();
    s.outcome()
}

fn passed_as(outcome: &Outcome) -> Option<String> {
    match outcome {
        Outcome::Passed(h) => dialtone_harness::host::header_value(h, "x-dialtone-account"),
        _ => None,
    }
}

fn refused_401(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Replied(r) if r.status == 401)
}

/// The verifier fingerprint of the demo policy: public values only
/// (issuer, app id, leeway, the pinned public key), so anyone can compute it.
fn demo_fingerprint() -> cache::Digest32 {
    let cfg = dialtone::policy::Config::from_json(demo_config().to_string().as_bytes(), Some(ADMIN_KEY)).unwrap();
    cfg.privy.unwrap().fingerprint
}

/// A slot for `token` saying it was verified as `account`, MAC'd with `key`.
fn slot_for(token: &str, account: &str, key: &SlotKey) -> (String, Vec<u8>) {
    let digest = cache::sha256(token.as_bytes());
    let session = Session { account: account.into(), session_id: "sid".into(), expires_at: 0 };
    (cache::shared_slot(&digest), cache::encode_shared(key, &digest, &demo_fingerprint(), &session, i64::MAX).unwrap())
}

#[test]
fn a_forged_shared_slot_is_refused_with_401() {
    // Review finding 1: writing dialtone.verified.<slot> with SHA256(T), the
    // public fingerprint, a far exp and the victim made `Bearer T` pass as the
    // victim, for any JWT-shaped T, with no signature check.
    let attacker = SlotKey::derive(b"whatever the other module picks....", dialtone::BUILD_ID).unwrap();
    let older_build = SlotKey::derive(SECRET.as_bytes(), "0.1.0+0000000000000000").unwrap();
    for (what, key) in [("a MAC under another secret", &attacker), ("the right secret, another build", &older_build)] {
        let mut p = start_with_secret(&demo_config(), SECRET);
        let (slot, value) = slot_for(UNSIGNED, "did:privy:victim", key);
        p.set_shared_data(&slot, &value);
        let outcome = account(&mut p, UNSIGNED);
        assert!(refused_401(&outcome), "{what}: {outcome:?}");
        assert_eq!(counter(&p, "dialtone.cache.token.shared_hit"), 0, "{what}");
        assert!(p.callout_log().is_empty() && p.crashed().is_none(), "{what}");
    }
    // The slot layout of the dialtone before the fix (no MAC at all).
    let mut p = start_with_secret(&demo_config(), SECRET);
    let digest = cache::sha256(UNSIGNED.as_bytes());
    let mut old = b"dt1\0".to_vec();
    old.extend_from_slice(&digest);
    old.extend_from_slice(&demo_fingerprint());
    old.extend_from_slice(&i64::MAX.to_le_bytes());
    old.extend_from_slice(&16u16.to_le_bytes());
    old.extend_from_slice(b"did:privy:victims");
    p.set_shared_data(&cache::shared_slot(&digest), &old);
    assert!(refused_401(&account(&mut p, UNSIGNED)));
    // Without the secret nothing is shared: a slot is never even trusted,
    // whoever wrote it, and verified tokens are not written out.
    let mut p = start(&demo_config());
    let right_key = SlotKey::derive(SECRET.as_bytes(), dialtone::BUILD_ID).unwrap();
    let (slot, value) = slot_for(UNSIGNED, "did:privy:victim", &right_key);
    p.set_shared_data(&slot, &value);
    assert!(refused_401(&account(&mut p, UNSIGNED)));
    let before = p.shared_entries().len();
    assert_eq!(passed_as(&account(&mut p, &privy_token())).as_deref(), Some(USER));
    assert_eq!(p.shared_entries().len(), before, "no secret: nothing written to shared data");
    assert!(p.log_text(LogLevel::Info).contains("shared token cache=off"));

    // The negative cases above mean something only if a slot made this way
    // is what the filter accepts from a VM of its own build and secret.
    let mut p = start_with_secret(&demo_config(), SECRET);
    p.set_shared_data(&slot, &value);
    assert_eq!(passed_as(&account(&mut p, UNSIGNED)).as_deref(), Some("did:privy:victim"));
}

#[test]
fn workers_with_the_secret_share_verified_tokens_and_others_do_not() {
    let token = privy_token();
    let mut worker1 = start_with_secret(&demo_config(), SECRET);
    assert_eq!(passed_as(&account(&mut worker1, &token)).as_deref(), Some(USER));
    assert_eq!(counter(&worker1, "dialtone.cache.token.miss"), 1, "verified on the first worker");
    let entries = worker1.shared_entries();
    assert_eq!(entries.len(), 1);
    assert!(entries[0].1.windows(USER.len()).any(|w| w == USER.as_bytes()), "the slot names the session");
    assert!(!entries[0].1.windows(16).any(|w| token.as_bytes().windows(16).any(|t| t == w)), "never the token");

    // Another worker of the same Envoy (same build, same secret) reads it.
    let mut worker2 = start_with_secret(&demo_config(), SECRET);
    for (k, v) in &entries {
        worker2.set_shared_data(k, v);
    }
    assert_eq!(passed_as(&account(&mut worker2, &token)).as_deref(), Some(USER));
    assert_eq!((counter(&worker2, "dialtone.cache.token.shared_hit"), counter(&worker2, "dialtone.cache.token.miss")), (1, 0));
    assert_eq!(passed_as(&account(&mut worker2, &token)).as_deref(), Some(USER));
    assert_eq!(counter(&worker2, "dialtone.cache.token.hit"), 1, "then kept per VM");

    // A VM with another secret ignores the slot and verifies for itself.
    let mut stranger = start_with_secret(&demo_config(), "another-deployment-secret-0123456789");
    for (k, v) in &entries {
        stranger.set_shared_data(k, v);
    }
    assert_eq!(passed_as(&account(&mut stranger, &token)).as_deref(), Some(USER));
    assert_eq!((counter(&stranger, "dialtone.cache.token.shared_hit"), counter(&stranger, "dialtone.cache.token.miss")), (0, 1));
}

#[test]
fn a_short_shared_secret_refuses_to_load_and_says_why() {
    let err = Plugin::start(
        wasm(),
        PluginOptions::new(demo_config().to_string()).clock_secs(NOW).env("DIAL_SHARED_CACHE_SECRET", "too-short"),
    )
    .err()
    .expect("refused");
    let StartError::ConfigRefused { logs } = err else { panic!("{err}") };
    let text = logs.iter().map(|l| l.message.as_str()).collect::<Vec<_>>().join("\n");
    assert!(text.contains("DIAL_SHARED_CACHE_SECRET must be at least 32 characters"), "{text}");
    assert!(!text.contains("too-short"), "the secret is never logged: {text}");
}

fn jwk(kid: &str, key: &SigningKey) -> Value {
    let p = key.verifying_key().to_encoded_point(false);
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
           "x": URL_SAFE_NO_PAD.encode(p.x().unwrap()), "y": URL_SAFE_NO_PAD.encode(p.y().unwrap())})
}

fn kid_token(kid: &str, key: &SigningKey) -> String {
    let mut h = es256_header();
    h["kid"] = json!(kid);
    tokens::sign_es256(key, &h, &claims())
}

fn kid_token_with(kid: &str, key: &SigningKey, claims: &Value) -> String {
    let mut h = es256_header();
    h["kid"] = json!(kid);
    tokens::sign_es256(key, &h, claims)
}

/// The demo policy fetching the issuer's JWKS, with `extra` merged into
/// `jwks_fetch`, and with or without the pinned PEM.
fn fetching(pinned: bool, extra: Value) -> Value {
    let mut cfg = demo_config();
    let privy = cfg["privy"].as_object_mut().unwrap();
    if !pinned {
        privy.remove("verification_key");
    }
    let mut fetch = json!({"cluster": "privy_api", "authority": "api.privy.io", "path": "/v1/apps/dialtone-demo-app/jwks.json",
                           "refresh_seconds": 10, "unknown_kid_cooldown_seconds": 30, "timeout_ms": 500});
    for (k, v) in extra.as_object().unwrap() {
        fetch[k] = v.clone();
    }
    privy.insert("jwks_fetch".into(), fetch);
    cfg
}

/// Answers the root context's pending JWKS fetch.
fn answer_fetch(p: &mut Plugin, answer: CallAnswer) {
    let fetch = p.pending_callouts().into_iter().next().expect("a JWKS fetch");
    assert_eq!(fetch.path(), "/v1/apps/dialtone-demo-app/jwks.json");
    p.answer(fetch.token, answer).unwrap();
}

#[test]
fn too_many_jwks_keys_are_refused_and_a_token_costs_a_bounded_few_verifications() {
    let keys: Vec<SigningKey> = (20u8..40).map(|i| SigningKey::from_slice(&[i; 32]).unwrap()).collect();
    let doc = |n: usize| json!({"keys": keys[..n].iter().enumerate().map(|(i, k)| jwk(&format!("k{i}"), k)).collect::<Vec<_>>()});
    // Configured: refused at load, with the path and the bound.
    let mut cfg = demo_config();
    cfg["privy"]["jwks"] = doc(17);
    let err = Plugin::start(wasm(), PluginOptions::new(cfg.to_string()).clock_secs(NOW)).err().expect("refused");
    let StartError::ConfigRefused { logs } = err else { panic!("{err}") };
    assert!(logs.iter().any(|l| l.message.contains("$.privy.jwks") && l.message.contains("more than 16 ES256 keys")), "{logs:?}");
    cfg["privy"]["max_keys"] = json!(20);
    Plugin::start(wasm(), PluginOptions::new(cfg.to_string()).clock_secs(NOW)).unwrap_or_else(|e| panic!("{e}"));
    cfg["privy"]["max_keys"] = json!(65);
    assert!(Plugin::start(wasm(), PluginOptions::new(cfg.to_string()).clock_secs(NOW)).is_err(), "max_keys is bounded (64)");

    // Fetched: a document over the cap is refused, the last good keys stay.
    let mut p = start(&fetching(false, json!({})));
    answer_fetch(&mut p, CallAnswer::json(200, &doc(2)));
    assert!(passed_as(&account(&mut p, &kid_token("k1", &keys[1]))).is_some());
    p.advance(Duration::from_secs(11));
    p.tick().unwrap();
    answer_fetch(&mut p, CallAnswer::json(200, &doc(17)));
    assert!(p.log_text(LogLevel::Warn).contains("more than 16 ES256 keys"), "{}", p.log_text(LogLevel::Warn));
    assert_eq!(counter(&p, "dialtone.jwks.failed"), 1);
    assert!(passed_as(&account(&mut p, &kid_token("k0", &keys[0]))).is_some(), "the last good keys keep serving");
    assert!(p.crashed().is_none());
}

#[test]
fn fetched_keys_are_dropped_after_max_stale_seconds_of_failed_refetches() {
    let key = signing_key();
    let mut cfg = fetching(false, json!({"max_stale_seconds": 60}));
    cfg["privy"]["token_cache_entries"] = json!(0); // every request verifies
    let mut p = start(&cfg);
    answer_fetch(&mut p, CallAnswer::json(200, &json!({"keys": [jwk("k-live", &key)]})));
    let token = kid_token("k-live", &key);
    assert_eq!(passed_as(&account(&mut p, &token)).as_deref(), Some(USER));
    // Every refetch fails for 59 s: the last good keys keep serving.
    for _ in 0..5 {
        p.advance(Duration::from_secs(11));
        p.tick().unwrap();
        answer_fetch(&mut p, CallAnswer::raw(503, b"down"));
    }
    p.advance(Duration::from_secs(4)); // 59 s after the good fetch
    p.tick().unwrap();
    assert_eq!(counter(&p, "dialtone.jwks.expired"), 0);
    assert_eq!(passed_as(&account(&mut p, &token)).as_deref(), Some(USER));
    // At 60 s they are dropped and counted; the token's kid is unknown now.
    p.advance(Duration::from_secs(1));
    p.tick().unwrap();
    assert_eq!(counter(&p, "dialtone.jwks.expired"), 1);
    assert!(p.log_text(LogLevel::Warn).contains("dropped 1 fetched JWKS key(s)"));
    let mut s = p.http().unwrap();
    s.request(&request("GET", ACCOUNT, &[("authorization", &format!("Bearer {token}"))])).unwrap();
    // The unknown kid fetches at once; that fails too: 401.
    s.answer_next(CallAnswer::raw(503, b"still down")).unwrap();
    let r = s.local_reply().expect("refused");
    assert_eq!((r.status, r.json()["message"].clone()), (401, json!("token signed by an unknown key")));
    s.close().unwrap();
    // A good fetch brings them back.
    p.advance(Duration::from_secs(11));
    p.tick().unwrap();
    answer_fetch(&mut p, CallAnswer::json(200, &json!({"keys": [jwk("k-live", &key)]})));
    assert_eq!(passed_as(&account(&mut p, &token)).as_deref(), Some(USER));
    // Bounds are checked at load.
    for bad in [json!(30), json!(10), json!(604_801)] {
        let cfg = fetching(false, json!({"max_stale_seconds": bad}));
        assert!(Plugin::start(wasm(), PluginOptions::new(cfg.to_string()).clock_secs(NOW)).is_err(), "max_stale_seconds {bad}");
    }
}

#[test]
fn a_reconfiguration_starts_without_the_previous_policys_fetched_keys() {
    let key = signing_key();
    let mut p = start(&fetching(false, json!({})));
    answer_fetch(&mut p, CallAnswer::json(200, &json!({"keys": [jwk("k-live", &key)]})));
    let token = kid_token("k-live", &key);
    assert_eq!(passed_as(&account(&mut p, &token)).as_deref(), Some(USER));
    // The same VM gets a new policy (another JWKS path): nothing fetched
    // under the old one may verify under the new one.
    let mut cfg = fetching(false, json!({"path": "/v1/apps/other-app/jwks.json"}));
    cfg["privy"]["app_id"] = json!(APP_ID);
    assert!(p.reconfigure(cfg.to_string()).unwrap());
    let fetch = p.pending_callouts().into_iter().find(|c| c.path() == "/v1/apps/other-app/jwks.json").expect("a fetch for the new policy");
    // The old policy's fetch, still in flight, answers late: ignored.
    if let Some(old) = p.pending_callouts().into_iter().find(|c| c.path() == "/v1/apps/dialtone-demo-app/jwks.json") {
        p.answer(old.token, CallAnswer::json(200, &json!({"keys": [jwk("k-live", &key)]}))).unwrap();
    }
    p.answer(fetch.token, CallAnswer::json(200, &json!({"keys": [jwk("k-other", &SigningKey::from_slice(&[3; 32]).unwrap())]})))
        .unwrap();
    let mut s = p.http().unwrap();
    s.request(&request("GET", ACCOUNT, &[("authorization", &format!("Bearer {token}"))])).unwrap();
    // k-live is unknown to the new policy: it refetches (its own path), then 401.
    let refetch = s.answer_next(CallAnswer::json(200, &json!({"keys": []}))).unwrap();
    assert_eq!(refetch.path(), "/v1/apps/other-app/jwks.json");
    let r = s.local_reply().expect("refused");
    assert_eq!((r.status, r.json()["message"].clone()), (401, json!("token signed by an unknown key")));
    assert_eq!(counter(&p, "dialtone.cache.token.hit"), 0, "the token verified under the old policy was not served from the cache");
}

#[test]
fn an_unknown_kid_is_fetched_even_with_a_pinned_kidless_key() {
    let pinned = signing_key();
    let rotated = SigningKey::from_slice(&[11u8; 32]).unwrap();
    let mut p = start(&fetching(true, json!({})));
    answer_fetch(&mut p, CallAnswer::json(200, &json!({"keys": [jwk("k-live", &pinned)]})));
    // The issuer rotates to a key under a new kid. Before the fix the pinned
    // PEM "matched" every kid: the new kid never caused a fetch, and 401.
    let mut s = p.http().unwrap();
    s.request(&request("GET", ACCOUNT, &[("authorization", &format!("Bearer {}", kid_token("k-new", &rotated)))])).unwrap();
    let refetch = s.answer_next(CallAnswer::json(200, &json!({"keys": [jwk("k-live", &pinned), jwk("k-new", &rotated)]}))).unwrap();
    assert_eq!(refetch.path(), "/v1/apps/dialtone-demo-app/jwks.json");
    assert_eq!(passed_as(&s.outcome()).as_deref(), Some(USER));
    s.close().unwrap();
    // A token signed with the pinned key under a kid nobody publishes: within
    // the cooldown, the pinned kid-less key is tried (no fetch, no 401).
    let mut s = p.http().unwrap();
    s.request(&request("GET", ACCOUNT, &[("authorization", &format!("Bearer {}", kid_token("k-unlisted", &pinned)))])).unwrap();
    assert!(s.pending_callouts().is_empty(), "in the cooldown: no fetch");
    assert_eq!(passed_as(&s.outcome()).as_deref(), Some(USER));
    s.close().unwrap();
    // After the cooldown such a token fetches first, then falls back to the
    // pinned key.
    p.advance(Duration::from_secs(31));
    let mut s = p.http().unwrap();
    let other_claims = tokens::privy_claims(APP_ID, USER, NOW + 25, NOW + 3600);
    s.request(&request("GET", ACCOUNT, &[("authorization", &format!("Bearer {}", kid_token_with("k-unlisted", &pinned, &other_claims)))]))
        .unwrap();
    s.answer_next(CallAnswer::json(200, &json!({"keys": [jwk("k-live", &pinned), jwk("k-new", &rotated)]}))).unwrap();
    assert_eq!(passed_as(&s.outcome()).as_deref(), Some(USER));
}

#[test]
fn an_unchanged_jwks_keeps_the_token_cache_and_a_changed_one_empties_it() {
    let key = signing_key();
    let doc = json!({"keys": [jwk("k-live", &key)]});
    let mut p = start(&fetching(false, json!({})));
    answer_fetch(&mut p, CallAnswer::json(200, &doc));
    let token = kid_token("k-live", &key);
    assert!(passed_as(&account(&mut p, &token)).is_some());
    assert_eq!(counter(&p, "dialtone.cache.token.miss"), 1);
    // The scheduled refresh brings the very same keys: the cache stays.
    p.advance(Duration::from_secs(11));
    p.tick().unwrap();
    answer_fetch(&mut p, CallAnswer::json(200, &doc));
    assert!(passed_as(&account(&mut p, &token)).is_some());
    assert_eq!((counter(&p, "dialtone.cache.token.hit"), counter(&p, "dialtone.cache.token.miss")), (1, 1), "served from the cache");
    // A changed key set (one more key): verified again.
    p.advance(Duration::from_secs(11));
    p.tick().unwrap();
    answer_fetch(&mut p, CallAnswer::json(200, &json!({"keys": [jwk("k-live", &key), jwk("k-2", &SigningKey::from_slice(&[5; 32]).unwrap())]})));
    assert!(passed_as(&account(&mut p, &token)).is_some());
    assert_eq!((counter(&p, "dialtone.cache.token.hit"), counter(&p, "dialtone.cache.token.miss")), (1, 2), "verified again");
    assert_eq!(counter(&p, "dialtone.jwks.fetched"), 3);
}

#[test]
fn authorization_reaches_the_upstream_only_when_the_policy_forwards_it() {
    // The README's rule, on every allowed path: a public route, an unmatched
    // request let through, a checked credential.
    let mut cfg = demo_config();
    cfg["unmatched"] = json!("allow");
    for forward in [false, true] {
        cfg["forward_authorization"] = json!(forward);
        let mut p = start(&cfg);
        for (what, path, token) in [
            ("public route", "/healthz", "client-secret-for-something-else".to_owned()),
            ("unmatched, let through", "/not/in/the/policy", "client-secret-for-something-else".to_owned()),
            ("checked Privy token", ACCOUNT, privy_token()),
        ] {
            let mut s = p.http().unwrap();
            s.request(&request("GET", path, &[("authorization", &format!("Bearer {token}"))])).unwrap();
            assert!(matches!(s.outcome(), Outcome::Passed(_)), "{what}: {:?}", s.outcome());
            let upstream = s.upstream_header("authorization");
            if forward {
                assert_eq!(upstream, Some(format!("Bearer {token}")), "{what}: forwarded as sent");
            } else {
                assert_eq!(upstream, None, "{what}: removed");
            }
        }
    }
}
