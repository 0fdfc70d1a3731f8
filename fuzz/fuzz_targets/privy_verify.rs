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
//!
//! The other way: from the same input, a well-formed valid token is built
//! and must be accepted, with its `sub`, `sid` and `exp`: claims Privy's
//! checks pass at a clock taken from the input (`aud` a string or a list,
//! `nbf` or not, NumericDates as integers or with a fraction or exponent,
//! extra claims, an unregistered header member or a well-formed `x5t`),
//! signed by one of the three keys (a
//! JWKS key under its kid or with none, the pinned key with none or with a
//! kid no JWKS key has), low-S or its high-S twin (valid ES256), the JSON
//! in any member order and whitespace.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use dialtone::privy_jwt::Session;
use dialtone_fuzz::{
    json_object, signing_key, verifier, Choices, Key, APP_ID, CONFORMANCE_KID, ISSUER, JWKS2_KID, LEEWAY, VISIBLE,
};
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::signature::{Signer, Verifier};
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
    valid_token_is_accepted(&mut Choices::new(data));
});

fn segment(s: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(s).unwrap_or_else(|e| panic!("accepted a segment that is not strict base64url ({e}): {s:?}"))
}

fn object(bytes: &[u8], what: &str) -> serde_json::Map<String, Value> {
    // Strict: an RFC 8259 JSON object, valid UTF-8 throughout (serde_json
    // alone does not check the members it skips; the verifier must).
    json_object(bytes)
        .unwrap_or_else(|| panic!("accepted a {what} that is not a JSON object: {:?}", String::from_utf8_lossy(bytes)))
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

/// A NumericDate of `secs` as JSON: an integer, or a number that truncates
/// to it (a fraction, an exponent).
fn numeric_date(c: &mut Choices, secs: i64) -> String {
    match c.below(6) {
        0 if secs >= 0 => format!("{secs}.{}", c.pick(&["0", "5", "999", "25"])),
        1 => format!("{secs}e0"),
        2 => format!("{secs}E+0"),
        3 if secs >= 0 => format!("{secs}.0e-0"),
        _ => secs.to_string(),
    }
}

/// Builds a valid token from `c` and checks that `verify` takes it.
fn valid_token_is_accepted(c: &mut Choices) {
    // A clock from 1970 to about 3000, and claims valid at it.
    let now = (c.u64() % 32_000_000_000) as i64;
    let exp = now - LEEWAY + 1 + (c.u64() % (1 << 32)) as i64;
    let iat = now + LEEWAY - (c.u64() % (1 << 32)) as i64;
    let nbf = c.bool().then(|| now + LEEWAY - (c.u64() % (1 << 32)) as i64);
    let sub = if c.bool() { format!("did:privy:{}", c.text(b"abcdefghijklmnopqrstuvwxyz0123456789", 1, 30)) } else { c.text(VISIBLE, 1, 256) };
    let sid = c.text(VISIBLE, 1, 64);
    let aud = if c.bool() {
        c.json_string(APP_ID)
    } else {
        let mut list = Vec::new();
        for _ in 0..c.below(4) {
            let other = c.text(VISIBLE, 0, 20);
            list.push(c.json_string(&other));
        }
        let at = c.below(list.len() + 1);
        list.insert(at, c.json_string(APP_ID));
        format!("[{}]", list.join(","))
    };
    let mut claims = vec![
        ("iss", c.json_string(ISSUER)),
        ("aud", aud),
        ("sub", c.json_string(&sub)),
        ("sid", c.json_string(&sid)),
        ("exp", numeric_date(c, exp)),
        ("iat", numeric_date(c, iat)),
    ];
    if let Some(nbf) = nbf {
        claims.push(("nbf", numeric_date(c, nbf)));
    }
    if c.bool() {
        let extra = c.pick(&["\"privy\"", "1", "[]", "{\"a\":null}", "true", "-0.5e-3"]);
        claims.push(("fuzz_extra", extra.into()));
    }
    let claims = c.json_object(claims);

    let (key, kid) = match c.below(5) {
        0 => (Key::Jwks1, Some(CONFORMANCE_KID.to_owned())),
        1 => (Key::Jwks2, Some(JWKS2_KID.to_owned())),
        2 => (c.pick(&[Key::Jwks1, Key::Jwks2]), None),
        // The pinned key has no kid: it is tried for a token naming none,
        // and for one whose kid no JWKS key has.
        3 => (Key::Pem, None),
        _ => (Key::Pem, Some(format!("pinned-{}", c.text(b"abcdef0123456789", 1, 16)))),
    };
    let mut header = vec![("alg", c.json_string("ES256"))];
    if let Some(kid) = &kid {
        header.push(("kid", c.json_string(kid)));
    }
    if c.bool() {
        let typ = c.pick(&["JWT", "jwt"]);
        header.push(("typ", c.json_string(typ)));
    }
    match c.below(4) {
        // A member no JWS spec registers (ignored), or a well-formed x5t
        // (a base64url SHA-1 thumbprint: 20 bytes; one that is not is a
        // malformed header, and jwt-compact refuses it).
        0 => {
            let extra = c.text(VISIBLE, 0, 20);
            header.push(("fuzz_extra", c.json_string(&extra)));
        }
        1 => {
            let thumbprint = URL_SAFE_NO_PAD.encode(c.bytes::<20>());
            header.push(("x5t", c.json_string(&thumbprint)));
        }
        _ => {}
    }
    let header = c.json_object(header);

    let signing_input = format!("{}.{}", URL_SAFE_NO_PAD.encode(&header), URL_SAFE_NO_PAD.encode(&claims));
    let sig: Signature = signing_key(key).sign(signing_input.as_bytes());
    let sig = if c.bool() {
        // The high-S twin, s → n − s: valid ES256 (RFC 7515 A.3 is high-S).
        let (r, s) = sig.split_scalars();
        Signature::from_scalars(*r, -*s).unwrap_or(sig)
    } else {
        sig
    };
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()));
    let want = Session { account: sub, session_id: sid, expires_at: exp };
    assert_eq!(verifier().verify(&token, now), Ok(want), "a valid token refused at now={now}: {header} {claims} {token}");
}
