//! Privy access-token verification: ES256 JWS, checked entirely in the sandbox.
//!
//! The algorithm is fixed to ES256 by the verifier; the token's `alg` header
//! must say exactly `ES256` and is never used to pick an algorithm. Parsing is
//! strict on purpose (RFC 7515 base64url without padding or stray bits, no
//! duplicate JSON members, no `crit`): each laxity is a known forgery vector,
//! see `../shared/testdata/JWT_ATTACKS.md`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::{Signature, VerifyingKey};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

use crate::es256::PreparedKey;

/// A `kid` longer than this is hostile; no issuer uses one.
const MAX_KID_LEN: usize = 256;
/// Upper bound on an account id that we will put in an upstream header.
const MAX_SUB_LEN: usize = 256;

/// One ES256 verification key, optionally named by `kid` (keys from a JWKS
/// carry one; a pinned PEM key does not). Built with [`EsKey::new`], which
/// precomputes the key's table for fast verification (~152 KB, shared by
/// clones, so copying keys between caches costs nothing).
#[derive(Clone, Debug)]
pub struct EsKey {
    pub kid: Option<String>,
    pub key: VerifyingKey,
    prepared: Option<Arc<PreparedKey>>,
}

impl EsKey {
    pub fn new(kid: Option<String>, key: VerifyingKey) -> Self {
        EsKey { kid, key, prepared: PreparedKey::new(&key).map(Arc::new) }
    }

    /// ES256 over `signing_input` with this key.
    pub fn verify(&self, signing_input: &[u8], sig: &Signature) -> bool {
        match &self.prepared {
            // `key` is a public field: only trust the table if it is still
            // the table of `key` (a 64-byte compare).
            Some(p) if p.key() == &self.key => p.verify(signing_input, sig),
            // No table (never expected): build one now rather than keep
            // p256's own verifier in the .wasm as a fallback. Fails closed.
            _ => PreparedKey::new(&self.key).is_some_and(|p| p.verify(signing_input, sig)),
        }
    }
}

/// Why a verification key in the config was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    Pem,
    Jwks(&'static str),
    DuplicateKid(String),
    NoUsableKey,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::Pem => write!(f, "not a P-256 public key in PEM (SPKI) form"),
            KeyError::Jwks(why) => write!(f, "invalid JWKS: {why}"),
            KeyError::DuplicateKid(kid) => write!(f, "JWKS names kid {kid:?} twice"),
            KeyError::NoUsableKey => write!(f, "no ES256 (EC P-256, use=sig) key in the JWKS"),
        }
    }
}

/// Parses the PEM SPKI key that the Privy dashboard shows.
pub fn key_from_pem(pem: &str) -> Result<EsKey, KeyError> {
    use p256::pkcs8::DecodePublicKey;
    let key = VerifyingKey::from_public_key_pem(pem.trim()).map_err(|_| KeyError::Pem)?;
    Ok(EsKey::new(None, key))
}

/// Parses a JWKS document (`{"keys":[…]}`), keeping the EC P-256 signing keys
/// and skipping keys of other types (an issuer may publish RSA keys too).
pub fn keys_from_jwks(jwks: &Value) -> Result<Vec<EsKey>, KeyError> {
    keys_from_jwks_reusing(jwks, &[])
}

/// The same, taking the precomputed table of any key already in `previous`
/// instead of building it again: a periodic re-fetch of an unchanged JWKS
/// then costs no table builds (a few ms of wasm and 152 KB per key otherwise).
pub fn keys_from_jwks_reusing(jwks: &Value, previous: &[EsKey]) -> Result<Vec<EsKey>, KeyError> {
    let keys = jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or(KeyError::Jwks("expected an object with a \"keys\" array"))?;
    let mut out: Vec<EsKey> = Vec::new();
    for jwk in keys {
        let obj = jwk.as_object().ok_or(KeyError::Jwks("every key must be an object"))?;
        if obj.contains_key("d") {
            return Err(KeyError::Jwks("a key has a private part (\"d\"): publish public keys only"));
        }
        let field = |name: &str| obj.get(name).and_then(Value::as_str);
        if field("kty") != Some("EC") || field("crv") != Some("P-256") {
            continue;
        }
        if field("use").is_some_and(|u| u != "sig") || field("alg").is_some_and(|a| a != "ES256") {
            continue;
        }
        // RFC 7517 §4.3: a key whose key_ops exclude "verify" must not verify.
        if let Some(ops) = obj.get("key_ops") {
            let verifies = ops.as_array().is_some_and(|o| o.iter().any(|op| op == "verify"));
            if !verifies {
                continue;
            }
        }
        let coord = |name: &str| -> Result<[u8; 32], KeyError> {
            let b = field(name)
                .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
                .ok_or(KeyError::Jwks("EC key coordinates must be base64url"))?;
            <[u8; 32]>::try_from(b.as_slice()).map_err(|_| KeyError::Jwks("P-256 coordinates are 32 bytes"))
        };
        let (x, y) = (coord("x")?, coord("y")?);
        let point = p256::EncodedPoint::from_affine_coordinates(&x.into(), &y.into(), false);
        let key = VerifyingKey::from_encoded_point(&point)
            .map_err(|_| KeyError::Jwks("EC key is not a point on P-256"))?;
        let kid = match obj.get("kid") {
            None => None,
            Some(Value::String(k)) if k.len() <= MAX_KID_LEN => Some(k.clone()),
            Some(_) => return Err(KeyError::Jwks("kid must be a string of at most 256 bytes")),
        };
        if let Some(k) = &kid {
            if out.iter().any(|e| e.kid.as_deref() == Some(k)) {
                return Err(KeyError::DuplicateKid(k.clone()));
            }
        }
        let reused = previous.iter().find_map(|p| p.prepared.as_ref().filter(|t| t.key() == &key));
        out.push(match reused {
            Some(table) => EsKey { kid, key, prepared: Some(Arc::clone(table)) },
            None => EsKey::new(kid, key),
        });
    }
    if out.is_empty() {
        return Err(KeyError::NoUsableKey);
    }
    Ok(out)
}

/// What a verified token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// `sub`: the Privy user (`did:privy:…`), the account charged.
    pub account: String,
    /// `sid`: the Privy session id.
    pub session_id: String,
    /// `exp`, seconds since the epoch.
    pub expires_at: i64,
}

/// Every way a token is refused. Structured so that logs and metrics can say
/// why without ever containing the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    /// Not three non-empty dot-separated segments.
    Structure,
    /// A segment is not strict unpadded base64url.
    Base64,
    /// The protected header is not a JSON object we accept.
    Header,
    /// `alg` is not exactly `"ES256"`.
    Algorithm,
    /// `typ` present and not `JWT`.
    Type,
    /// `crit` present: we implement no JWS extensions, so none may be critical.
    Crit,
    /// `kid` matches no configured key.
    UnknownKid,
    /// The signature is not 64 bytes of in-range `r‖s`, or does not verify.
    Signature,
    /// The claims set is not a JSON object we accept.
    Claims,
    /// A claim Privy always sets is missing or has the wrong type.
    MissingClaim(&'static str),
    Issuer,
    Audience,
    Expired,
    NotYetValid,
    IssuedInFuture,
}

impl JwtError {
    /// A short, stable reason for logs and the `error_description`.
    pub fn reason(self) -> &'static str {
        match self {
            JwtError::Structure => "malformed token",
            JwtError::Base64 => "malformed token encoding",
            JwtError::Header => "malformed token header",
            JwtError::Algorithm => "token algorithm must be ES256",
            JwtError::Type => "token type must be JWT",
            JwtError::Crit => "token has critical extensions",
            JwtError::UnknownKid => "token signed by an unknown key",
            JwtError::Signature => "invalid token signature",
            JwtError::Claims => "malformed token claims",
            JwtError::MissingClaim(_) => "token is missing a required claim",
            JwtError::Issuer => "token issuer is not accepted",
            JwtError::Audience => "token audience is not this app",
            JwtError::Expired => "token expired",
            JwtError::NotYetValid => "token not yet valid",
            JwtError::IssuedInFuture => "token issued in the future",
        }
    }
}

/// The checks a Privy access token must pass, compiled from config.
#[derive(Clone, Debug)]
pub struct PrivyVerifier {
    pub keys: Vec<EsKey>,
    pub issuer: String,
    pub app_id: String,
    pub leeway_secs: i64,
}

// serde's derive refuses a member that appears twice in the JSON, which is
// exactly what we want for every field listed here (duplicate-key attacks).
// Every member goes through `present`, so `"crit": null` is a crit that is
// there (and refused), not one that is absent: a plain `Option` would read
// a JSON null as "no member".
#[derive(Deserialize)]
struct Header {
    #[serde(default, deserialize_with = "present")]
    alg: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    typ: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    kid: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    crit: Option<Value>,
}

/// A member that appears, whatever its value (null included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default, deserialize_with = "present")]
    iss: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    sub: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    aud: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    exp: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    nbf: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    iat: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    sid: Option<Value>,
}

impl PrivyVerifier {
    /// Verifies `token` at `now` (seconds since the epoch, from the host clock).
    pub fn verify(&self, token: &str, now: i64) -> Result<Session, JwtError> {
        self.verify_with(token, now, &[])
    }

    /// The same, with keys fetched from the issuer's JWKS alongside the
    /// configured ones.
    pub fn verify_with(&self, token: &str, now: i64, fetched: &[EsKey]) -> Result<Session, JwtError> {
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Structure);
        };
        if h64.is_empty() || p64.is_empty() || s64.is_empty() {
            return Err(JwtError::Structure);
        }
        let header_bytes = b64(h64)?;
        let header: Header = json_object(&header_bytes).ok_or(JwtError::Header)?;
        if header.alg != Some(Value::String("ES256".into())) {
            return Err(JwtError::Algorithm);
        }
        if header.crit.is_some() {
            return Err(JwtError::Crit);
        }
        match &header.typ {
            None => {}
            Some(Value::String(t)) if t.eq_ignore_ascii_case("JWT") => {}
            Some(_) => return Err(JwtError::Type),
        }
        let kid = match &header.kid {
            None => None,
            Some(Value::String(k)) if k.len() <= MAX_KID_LEN => Some(k.as_str()),
            Some(_) => return Err(JwtError::Header),
        };

        // Exactly 64 bytes of big-endian r‖s (IEEE P1363), 0 < r, s < n.
        // from_slice refuses DER, other lengths and out-of-range scalars.
        let sig_bytes = b64(s64)?;
        let sig = es256_signature(&sig_bytes).ok_or(JwtError::Signature)?;
        let signing_input_len = h64.len() + 1 + p64.len();
        let signing_input = token.as_bytes().get(..signing_input_len).ok_or(JwtError::Structure)?;
        let mut candidates = self
            .keys
            .iter()
            .chain(fetched.iter())
            .filter(|k| match (kid, k.kid.as_deref()) {
                // A pinned key without kid is tried for any token; a JWKS key
                // only for its own kid (or for tokens that name none).
                (_, None) | (None, Some(_)) => true,
                (Some(want), Some(have)) => want == have,
            })
            .peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::UnknownKid);
        }
        if !candidates.any(|k| k.verify(signing_input, &sig)) {
            return Err(JwtError::Signature);
        }

        // Only now is the payload worth reading.
        let claims_bytes = b64(p64)?;
        let claims: Claims = json_object(&claims_bytes).ok_or(JwtError::Claims)?;
        self.check_claims(&claims, now)
    }

    fn check_claims(&self, c: &Claims, now: i64) -> Result<Session, JwtError> {
        let leeway = self.leeway_secs;
        let exp = numeric_date(&c.exp, "exp")?.ok_or(JwtError::MissingClaim("exp"))?;
        let iat = numeric_date(&c.iat, "iat")?.ok_or(JwtError::MissingClaim("iat"))?;
        if c.iss.as_ref().and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(JwtError::Issuer);
        }
        let aud_ok = match &c.aud {
            Some(Value::String(a)) => *a == self.app_id,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(self.app_id.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err(JwtError::Audience);
        }
        if now.saturating_sub(leeway) >= exp {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = numeric_date(&c.nbf, "nbf")? {
            if now.saturating_add(leeway) < nbf {
                return Err(JwtError::NotYetValid);
            }
        }
        if iat > now.saturating_add(leeway) {
            return Err(JwtError::IssuedInFuture);
        }
        let sub = match &c.sub {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_SUB_LEN && is_header_safe(s) => s,
            _ => return Err(JwtError::MissingClaim("sub")),
        };
        let sid = match &c.sid {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => return Err(JwtError::MissingClaim("sid")),
        };
        Ok(Session { account: sub.clone(), session_id: sid.clone(), expires_at: exp })
    }
}

/// ES256 (ECDSA P-256 with SHA-256) over `signing_input`. High-S signatures
/// are valid ES256 (RFC 7515 A.3 is one), so they are not refused.
///
/// Without an [`EsKey`]: this builds the key's table first (about 60
/// verifications' worth of work; the last key's is kept), and verifies
/// through the same code as [`EsKey::verify`] so that the conformance
/// vectors exercise it. Configured keys are [`EsKey`]s.
pub fn es256_verify(key: &VerifyingKey, signing_input: &[u8], sig: &Signature) -> bool {
    // Callers tend to check several signatures with one key in a row (the
    // Wycheproof groups do): keep the last key's table.
    thread_local! {
        static LAST: std::cell::RefCell<Option<EsKey>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let Ok(mut last) = last.try_borrow_mut() else {
            return EsKey::new(None, *key).verify(signing_input, sig);
        };
        match &*last {
            Some(k) if k.key == *key => {}
            _ => *last = Some(EsKey::new(None, *key)),
        }
        last.as_ref().is_some_and(|k| k.verify(signing_input, sig))
    })
}

/// Parses a raw `r‖s` signature: exactly 64 bytes, 0 < r, s < n.
pub fn es256_signature(raw: &[u8]) -> Option<Signature> {
    Signature::from_slice(raw).ok()
}

/// Visible ASCII only: the value ends up in an upstream request header.
pub fn is_header_safe(s: &str) -> bool {
    s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn b64(segment: &str) -> Result<Vec<u8>, JwtError> {
    // URL_SAFE_NO_PAD refuses '=', '+', '/', whitespace and non-zero trailing bits.
    URL_SAFE_NO_PAD.decode(segment).map_err(|_| JwtError::Base64)
}

/// Parses a JSON object (not an array: serde's derive would also accept a
/// sequence for a struct), refusing duplicate members and trailing bytes.
fn json_object<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    // serde_json does not check the UTF-8 of members it skips: check it all.
    let text = std::str::from_utf8(bytes).ok()?;
    if !text.trim_start().starts_with('{') {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

/// RFC 7519 NumericDate: a JSON number of seconds (fractions allowed, truncated).
fn numeric_date(v: &Option<Value>, name: &'static str) -> Result<Option<i64>, JwtError> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                return Ok(Some(i));
            }
            match n.as_f64() {
                // Casting a finite f64 within ±2^62 to i64 is exact enough for seconds.
                Some(f) if f.is_finite() && f.abs() < 4.0e18 => Ok(Some(f.trunc() as i64)),
                _ => Err(JwtError::MissingClaim(name)),
            }
        }
        Some(_) => Err(JwtError::MissingClaim(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::SigningKey;

    // RFC 7515 A.3 private scalar (published in the RFC).
    const A3_D: &str = "jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI";
    const APP: &str = "test-app";
    const NOW: i64 = 1_700_000_000;

    fn signing_key() -> SigningKey {
        let d = URL_SAFE_NO_PAD.decode(A3_D).unwrap();
        SigningKey::from_slice(&d).unwrap()
    }

    fn verifier() -> PrivyVerifier {
        let sk = signing_key();
        PrivyVerifier {
            keys: vec![EsKey::new(Some("k1".into()), *sk.verifying_key())],
            issuer: "privy.io".into(),
            app_id: APP.into(),
            leeway_secs: 60,
        }
    }

    fn sign(header: &str, claims: &str) -> String {
        let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
        let sig: Signature = signing_key().sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    fn claims(exp: i64) -> String {
        format!(r#"{{"sid":"s1","iss":"privy.io","iat":{},"aud":"{APP}","sub":"did:privy:abc","exp":{exp}}}"#, NOW - 10)
    }

    const H: &str = r#"{"alg":"ES256","typ":"JWT","kid":"k1"}"#;

    #[test]
    fn accepts_a_good_token() {
        let t = sign(H, &claims(NOW + 3600));
        let s = verifier().verify(&t, NOW).unwrap();
        assert_eq!(s.account, "did:privy:abc");
        assert_eq!(s.session_id, "s1");
    }

    #[test]
    fn expiry_edges_to_the_second() {
        let v = verifier();
        let t = sign(H, &claims(NOW));
        // exp = now: still inside the 60 s leeway until now = exp + 59.
        assert!(v.verify(&t, NOW + 59).is_ok());
        assert_eq!(v.verify(&t, NOW + 60), Err(JwtError::Expired));
    }

    #[test]
    fn nbf_and_iat_edges() {
        let v = verifier();
        let c = format!(r#"{{"sid":"s","iss":"privy.io","iat":{NOW},"aud":"{APP}","sub":"did:privy:a","exp":{},"nbf":{}}}"#, NOW + 999, NOW + 60);
        let t = sign(H, &c);
        assert!(v.verify(&t, NOW).is_ok());
        assert_eq!(v.verify(&t, NOW - 1), Err(JwtError::NotYetValid));
        let c = format!(r#"{{"sid":"s","iss":"privy.io","iat":{},"aud":"{APP}","sub":"did:privy:a","exp":{}}}"#, NOW + 61, NOW + 999);
        assert_eq!(v.verify(&sign(H, &c), NOW), Err(JwtError::IssuedInFuture));
    }

    #[test]
    fn unknown_kid_is_refused() {
        let t = sign(r#"{"alg":"ES256","kid":"other"}"#, &claims(NOW + 60));
        assert_eq!(verifier().verify(&t, NOW), Err(JwtError::UnknownKid));
    }

    #[test]
    fn refuses_crit_and_bad_typ() {
        let t = sign(r#"{"alg":"ES256","crit":["exp"],"exp":1}"#, &claims(NOW + 60));
        assert_eq!(verifier().verify(&t, NOW), Err(JwtError::Crit));
        let t = sign(r#"{"alg":"ES256","typ":"at+jwt"}"#, &claims(NOW + 60));
        assert_eq!(verifier().verify(&t, NOW), Err(JwtError::Type));
    }

    #[test]
    fn a_null_member_is_present_not_absent() {
        let c = claims(NOW + 100);
        for (header, want) in [
            (r#"{"alg":"ES256","kid":"k1","crit":null}"#, JwtError::Crit),
            (r#"{"alg":"ES256","kid":null}"#, JwtError::Header),
            (r#"{"alg":"ES256","kid":"k1","typ":null}"#, JwtError::Type),
            (r#"{"alg":null,"kid":"k1"}"#, JwtError::Algorithm),
        ] {
            assert_eq!(verifier().verify(&sign(header, &c), NOW), Err(want), "{header}");
        }
        let with_null_nbf = c.replacen('{', r#"{"nbf":null,"#, 1);
        assert_eq!(verifier().verify(&sign(H, &with_null_nbf), NOW), Err(JwtError::MissingClaim("nbf")));
    }

    #[test]
    fn refuses_duplicate_members() {
        let t = sign(r#"{"alg":"ES256","alg":"ES256"}"#, &claims(NOW + 60));
        assert_eq!(verifier().verify(&t, NOW), Err(JwtError::Header));
    }

    #[test]
    fn jwks_refetch_reuses_tables_of_unchanged_keys() {
        let jwk = |d: &[u8], kid: &str| {
            let pt = SigningKey::from_slice(d).unwrap().verifying_key().to_encoded_point(false);
            serde_json::json!({"kty":"EC","crv":"P-256","kid":kid,
                "x":URL_SAFE_NO_PAD.encode(pt.x().unwrap()),"y":URL_SAFE_NO_PAD.encode(pt.y().unwrap())})
        };
        let first = keys_from_jwks(&serde_json::json!({"keys":[jwk(&[7; 32], "a")]})).unwrap();
        // Same key (even renamed), plus a new one.
        let second = keys_from_jwks_reusing(&serde_json::json!({"keys":[jwk(&[8; 32], "b"), jwk(&[7; 32], "a2")]}), &first).unwrap();
        let table = |k: &EsKey| Arc::as_ptr(k.prepared.as_ref().unwrap());
        assert_eq!(table(&second[1]), table(&first[0]));
        assert_ne!(table(&second[0]), table(&first[0]));
        assert_eq!(second[1].kid.as_deref(), Some("a2"));
        assert_eq!(second[0].prepared.as_ref().unwrap().key(), &second[0].key);
    }

    #[test]
    fn a_key_replaced_after_construction_is_not_checked_with_the_old_table() {
        let t = sign(H, &claims(NOW + 3600));
        let mut v = verifier();
        assert!(v.verify(&t, NOW).is_ok());
        // Swap the public key but keep the old table: the token must now fail.
        v.keys[0].key = *SigningKey::from_slice(&[9; 32]).unwrap().verifying_key();
        assert_eq!(v.verify(&t, NOW), Err(JwtError::Signature));
        v.keys[0].key = *signing_key().verifying_key();
        assert!(v.verify(&t, NOW).is_ok());
    }

    #[test]
    fn jwks_parsing() {
        let sk = signing_key();
        let pt = sk.verifying_key().to_encoded_point(false);
        let x = URL_SAFE_NO_PAD.encode(pt.x().unwrap());
        let y = URL_SAFE_NO_PAD.encode(pt.y().unwrap());
        let jwks: Value = serde_json::from_str(&format!(
            r#"{{"keys":[{{"kty":"RSA","n":"x","e":"AQAB"}},{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}","kid":"a","use":"sig","alg":"ES256"}}]}}"#
        )).unwrap();
        let keys = keys_from_jwks(&jwks).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("a"));
        let dup: Value = serde_json::from_str(&format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}","kid":"a"}},{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}","kid":"a"}}]}}"#
        )).unwrap();
        assert_eq!(keys_from_jwks(&dup).unwrap_err(), KeyError::DuplicateKid("a".into()));
        let only_rsa: Value = serde_json::from_str(r#"{"keys":[{"kty":"RSA"}]}"#).unwrap();
        assert_eq!(keys_from_jwks(&only_rsa).unwrap_err(), KeyError::NoUsableKey);
        let off_curve: Value = serde_json::from_str(&format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","x":"{x}","y":"{x}"}}]}}"#
        )).unwrap();
        assert!(keys_from_jwks(&off_curve).is_err());
    }
}
