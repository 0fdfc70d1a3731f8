//! Privy access-token verification with a fixed key set (a pinned PEM key
//! and a JWKS of two ES256 keys plus an RSA key) at an arbitrary clock.
//!
//! Input: 8 bytes of `now` (i64, little endian), then the token. Seeds: the
//! derived conformance corpus (at its `now_unix`) and tokens minted with
//! each key of the set (examples/gen_seeds.rs).
//!
//! Oracle: a token accepted by `verify` must, checked independently here,
//! be three strict base64url segments with an `ES256` header and no `crit`,
//! carry a signature that a key its `kid` may select verifies, and have
//! claims that pass every Privy check at `now` (with the leeway).
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use dialtone::privy_jwt::Session;
use dialtone_fuzz::{verifier, APP_ID, ISSUER, LEEWAY};
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::Signature;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((clock, token)) = data.split_first_chunk::<8>() else { return };
    let now = i64::from_le_bytes(*clock);
    let token = String::from_utf8_lossy(token);
    match verifier().verify(&token, now) {
        Ok(session) => check_accepted(&token, now, &session),
        Err(e) => assert!(!e.reason().is_empty()),
    }
});

fn segment(s: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(s).unwrap_or_else(|e| panic!("accepted a segment that is not strict base64url ({e}): {s:?}"))
}

fn object(bytes: &[u8], what: &str) -> serde_json::Map<String, Value> {
    // Strict: valid UTF-8 throughout (serde_json alone does not check the
    // members it skips; the verifier must).
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(m)) => m,
        other => panic!("accepted a {what} that is not a JSON object: {other:?}"),
    }
}

/// RFC 7519 NumericDate, truncated to whole seconds.
fn date(v: Option<&Value>) -> Option<i128> {
    let n = v?.as_number()?;
    n.as_i64().map(i128::from).or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f.trunc() as i128))
}

fn check_accepted(token: &str, now: i64, s: &Session) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "accepted {token:?}");
    let (h64, p64, s64) = (parts[0], parts[1], parts[2]);

    let header = object(&segment(h64), "header");
    assert_eq!(header.get("alg"), Some(&Value::String("ES256".into())), "{header:?}");
    assert!(!header.contains_key("crit"), "{header:?}");
    if let Some(typ) = header.get("typ") {
        assert!(typ.as_str().is_some_and(|t| t.eq_ignore_ascii_case("jwt")), "{header:?}");
    }
    let kid = header.get("kid").map(|k| k.as_str().unwrap_or_else(|| panic!("non-string kid accepted: {header:?}")));

    let sig = Signature::from_slice(&segment(s64)).unwrap_or_else(|e| panic!("accepted a bad signature encoding: {e}"));
    let signing_input = format!("{h64}.{p64}");
    let verified = verifier().keys.iter().any(|k| {
        let selectable = match (kid, k.kid.as_deref()) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        };
        selectable && k.key.verify(signing_input.as_bytes(), &sig).is_ok()
    });
    assert!(verified, "accepted a token no selectable key signed: {token:?}");

    let claims = object(&segment(p64), "claims set");
    assert_eq!(claims.get("iss").and_then(Value::as_str), Some(ISSUER), "{claims:?}");
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == APP_ID,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(APP_ID)),
        _ => false,
    };
    assert!(aud_ok, "{claims:?}");
    let now = i128::from(now);
    let leeway = i128::from(LEEWAY);
    let exp = date(claims.get("exp")).unwrap_or_else(|| panic!("accepted without a numeric exp: {claims:?}"));
    assert!(now - leeway < exp, "accepted an expired token: exp={exp} now={now}");
    assert_eq!(i128::from(s.expires_at), exp);
    if let Some(nbf) = claims.get("nbf") {
        let nbf = date(Some(nbf)).unwrap_or_else(|| panic!("accepted a non-numeric nbf: {claims:?}"));
        assert!(now + leeway >= nbf, "accepted before nbf: nbf={nbf} now={now}");
    }
    let iat = date(claims.get("iat")).unwrap_or_else(|| panic!("accepted without a numeric iat: {claims:?}"));
    assert!(iat <= now + leeway, "accepted a token issued in the future: iat={iat} now={now}");
    // The account goes into an upstream header.
    assert_eq!(claims.get("sub").and_then(Value::as_str), Some(s.account.as_str()));
    assert!(!s.account.is_empty() && s.account.len() <= 256, "{:?}", s.account);
    assert!(s.account.bytes().all(|b| (0x21..=0x7e).contains(&b)), "unsafe account {:?}", s.account);
    assert_eq!(claims.get("sid").and_then(Value::as_str), Some(s.session_id.as_str()));
    assert!(!s.session_id.is_empty());
}
