//! Privy access-token verification: ES256 JWS, checked entirely in the sandbox.
//!
//! The algorithm is fixed to ES256 by the verifier; the token's `alg` header
//! must say exactly `ES256` and is never used to pick an algorithm. Parsing is
//! strict on purpose (RFC 7515 base64url without padding or stray bits, no
//! duplicate JSON members, no `crit`): each laxity is a known forgery vector,
//! see `tests/vectors/README.md` and `docs/security-tests.md`.
//!
//! The claims layer is `jwt-compact`'s ([`Claims`], [`TimeOptions`] with the
//! policy's leeway and the host's clock); the signature is checked by
//! [`Es256Tables`], a `jwt_compact::Algorithm` over our table-based ES256
//! ([`crate::es256`]). The token layer is ours ([`parse_token`], in place of
//! jwt-compact's `UntrustedToken`, which decoded and parsed every token a
//! second time and cost D2 about 9%; the README's "The token layer" has the
//! measurement): exact structure, strict base64url in every segment, a
//! protected header with no duplicate or `null` members, `alg` exactly
//! `ES256`, no `crit`, `typ` absent or `JWT`; and after the signature: `exp`
//! exclusive (RFC 7519 §4.1.4: valid *before* it),
//! `iat` not in the future, `iss`, `aud`, `sub`, `sid`.

use std::borrow::Cow;
use std::num::NonZeroUsize;
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jwt_compact::{Algorithm, AlgorithmSignature, Claims, TimeOptions, ValidationError};
use p256::ecdsa::{Signature, VerifyingKey};
use serde::Deserialize;
use serde_json::Value;

use crate::es256::PreparedKey;

/// A `kid` longer than this is hostile; no issuer uses one.
const MAX_KID_LEN: usize = 256;
/// Upper bound on an account id that we will put in an upstream header.
const MAX_SUB_LEN: usize = 256;
/// The most ES256 keys a verifier holds by default (pinned JWKS, and each
/// fetched JWKS on its own): each costs a 151,552-byte table per VM.
pub const DEFAULT_MAX_KEYS: usize = 16;
/// The bound on `privy.max_keys`.
pub const MAX_KEYS_LIMIT: usize = 64;
/// A token that names no `kid` is tried against at most this many keys
/// (kid-less keys first, then the others, in configuration then document
/// order), and a token whose `kid` no key has, against at most this many
/// kid-less keys: one garbage token never costs N verifications.
pub const MAX_KEYS_TRIED: usize = 3;

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
    /// More usable ES256 keys than the policy's `max_keys`.
    TooManyKeys { max: usize },
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::Pem => write!(f, "not a P-256 public key in PEM (SPKI) form"),
            KeyError::Jwks(why) => write!(f, "invalid JWKS: {why}"),
            KeyError::DuplicateKid(kid) => write!(f, "JWKS names kid {kid:?} twice"),
            KeyError::NoUsableKey => write!(f, "no ES256 (EC P-256, use=sig) key in the JWKS"),
            KeyError::TooManyKeys { max } => {
                write!(f, "JWKS has more than {max} ES256 keys (privy.max_keys; each costs a 152 KB table per VM)")
            }
        }
    }
}

/// The DER of a P-256 `SubjectPublicKeyInfo` up to its point (RFC 5480):
/// SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (0 unused
/// bits) { point } }, for the 65-byte uncompressed and 33-byte compressed forms.
const SPKI_P256_UNCOMPRESSED: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d,
    0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const SPKI_P256_COMPRESSED: [u8; 26] = [
    0x30, 0x39, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d,
    0x03, 0x01, 0x07, 0x03, 0x22, 0x00,
];

/// Parses the PEM SPKI key that the Privy dashboard shows.
///
/// A P-256 SPKI is a fixed DER prefix followed by the SEC1 point, so the
/// DER is matched byte for byte instead of parsed (the `der`/`spki`/`pkcs8`
/// crates cost about 30 KB of `.wasm`); p256 checks the point is on the curve.
pub fn key_from_pem(pem: &str) -> Result<EsKey, KeyError> {
    let body = pem
        .trim()
        .strip_prefix("-----BEGIN PUBLIC KEY-----")
        .and_then(|rest| rest.strip_suffix("-----END PUBLIC KEY-----"))
        .ok_or(KeyError::Pem)?;
    let b64: String = body.split_ascii_whitespace().collect();
    let der = STANDARD.decode(&b64).map_err(|_| KeyError::Pem)?;
    let point = match (der.len(), der.get(..26)) {
        (91, Some(prefix)) if prefix == SPKI_P256_UNCOMPRESSED => der.get(26..),
        (59, Some(prefix)) if prefix == SPKI_P256_COMPRESSED => der.get(26..),
        _ => None,
    }
    .ok_or(KeyError::Pem)?;
    let key = VerifyingKey::from_sec1_bytes(point).map_err(|_| KeyError::Pem)?;
    Ok(EsKey::new(None, key))
}

/// Parses a JWKS document (`{"keys":[…]}`), keeping the EC P-256 signing keys
/// and skipping keys of other types (an issuer may publish RSA keys too).
/// At most `max_keys` ES256 keys: a bigger set is refused, not truncated.
pub fn keys_from_jwks(jwks: &Value, max_keys: usize) -> Result<Vec<EsKey>, KeyError> {
    keys_from_jwks_reusing(jwks, &[], max_keys)
}

/// The same, taking the precomputed table of any key already in `previous`
/// instead of building it again: a periodic re-fetch of an unchanged JWKS
/// then costs no table builds (a few ms of wasm and 152 KB per key otherwise).
/// One point published twice (under two kids) shares one table; the same
/// kid-less key twice is kept once; a kid named twice is refused.
///
/// Every entry is checked (and the count capped) before any table is built,
/// so a hostile document costs parsing, not table builds.
pub fn keys_from_jwks_reusing(jwks: &Value, previous: &[EsKey], max_keys: usize) -> Result<Vec<EsKey>, KeyError> {
    let keys = jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or(KeyError::Jwks("expected an object with a \"keys\" array"))?;
    let mut found: Vec<(Option<String>, VerifyingKey)> = Vec::new();
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
        match &kid {
            // A kid names one key: named twice is refused, even the same key.
            Some(k) if found.iter().any(|(other, _)| other.as_deref() == Some(k)) => {
                return Err(KeyError::DuplicateKid(k.clone()));
            }
            // The same kid-less key twice is one key.
            None if found.iter().any(|(other, v)| other.is_none() && *v == key) => continue,
            _ => {}
        }
        if found.len() == max_keys {
            return Err(KeyError::TooManyKeys { max: max_keys });
        }
        found.push((kid, key));
    }
    if found.is_empty() {
        return Err(KeyError::NoUsableKey);
    }
    let mut out: Vec<EsKey> = Vec::with_capacity(found.len());
    for (kid, key) in found {
        let reused = previous
            .iter()
            .chain(out.iter())
            .find_map(|p| p.prepared.as_ref().filter(|t| t.key() == &key).map(Arc::clone));
        out.push(match reused {
            Some(table) => EsKey { kid, key, prepared: Some(table) },
            None => EsKey::new(kid, key),
        });
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

/// What to do with a token whose `kid` no key has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownKid {
    /// Try the kid-less keys (a pinned PEM): nothing better will come.
    TryKidless,
    /// Say [`JwtError::UnknownKid`] so the caller fetches the issuer's JWKS
    /// first (a pinned kid-less key would otherwise match every kid, and a
    /// rotation would never be fetched); it verifies again with
    /// [`UnknownKid::TryKidless`] once the fetch answered or may not be sent.
    Refetch,
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
    #[serde(default, deserialize_with = "present")]
    cty: Option<Value>,
}

/// A member that appears, whatever its value (null included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Privy's own claims, beside jwt-compact's `exp`/`nbf`/`iat` (flattened
/// into [`Claims`]: a member named twice is still refused by the derive).
#[derive(Deserialize)]
struct PrivyClaims {
    #[serde(default, deserialize_with = "present")]
    iss: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    sub: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    aud: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    sid: Option<Value>,
}

/// ES256 as a `jwt_compact::Algorithm`: verification only (tokens are
/// Privy's to sign), with the key's precomputed table ([`EsKey::verify`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Es256Tables;

/// No signing key exists for [`Es256Tables`]: the filter only verifies.
#[derive(Debug)]
pub enum NoSigningKey {}

/// A raw `r‖s` ES256 signature with `0 < r, s < n`.
#[derive(Debug, Clone)]
pub struct Es256Signature(pub Signature);

impl AlgorithmSignature for Es256Signature {
    const LENGTH: Option<NonZeroUsize> = NonZeroUsize::new(64);

    fn try_from_slice(slice: &[u8]) -> anyhow::Result<Self> {
        es256_signature(slice).map(Es256Signature).ok_or_else(|| anyhow::Error::msg("not an in-range P-256 r||s"))
    }

    fn as_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.to_bytes().to_vec())
    }
}

impl Algorithm for Es256Tables {
    type SigningKey = NoSigningKey;
    type VerifyingKey = EsKey;
    type Signature = Es256Signature;

    fn name(&self) -> Cow<'static, str> {
        Cow::Borrowed("ES256")
    }

    fn sign(&self, signing_key: &NoSigningKey, _message: &[u8]) -> Es256Signature {
        match *signing_key {}
    }

    fn verify_signature(&self, signature: &Es256Signature, key: &EsKey, message: &[u8]) -> bool {
        key.verify(message, &signature.0)
    }
}

/// A compact JWS split, decoded and its header checked: what
/// [`PrivyVerifier::verify_full`] needs before it verifies.
struct ParsedToken<'t> {
    kid: Option<String>,
    /// What was signed: the token up to its last '.' (RFC 7515 §5.2).
    signed: &'t [u8],
    signature: Es256Signature,
    /// The decoded claims, read only once the signature verified.
    payload: Vec<u8>,
}

/// Our token layer (in place of jwt-compact's `UntrustedToken`, see the
/// README, "The token layer": it decoded and parsed every token a second
/// time): three non-empty segments; strict unpadded base64url in all of
/// them (no `=`, no `+`/`/`, no stray trailing bits); a header that is one JSON object with no
/// duplicate member, `alg` exactly `"ES256"`, no `crit` (even `null`), `typ`
/// absent or `JWT`, `cty` absent or `JSON` (as jwt-compact), `kid` absent
/// or a short string; a 64-byte `r‖s` with `0 < r, s < n`.
fn parse_token(token: &str) -> Result<ParsedToken<'_>, JwtError> {
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Structure);
    };
    if h64.is_empty() || p64.is_empty() || s64.is_empty() {
        return Err(JwtError::Structure);
    }
    let header: Header = json_object(&b64(h64)?).ok_or(JwtError::Header)?;
    if !matches!(&header.alg, Some(Value::String(a)) if a == "ES256") {
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
    match &header.cty {
        None => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("JSON") => {}
        Some(_) => return Err(JwtError::Header),
    }
    let kid = match header.kid {
        None => None,
        Some(Value::String(k)) if k.len() <= MAX_KID_LEN => Some(k),
        Some(_) => return Err(JwtError::Header),
    };
    // Exactly 64 bytes of big-endian r‖s (IEEE P1363), 0 < r, s < n:
    // refuses DER, other lengths and out-of-range scalars.
    let signature = Es256Signature::try_from_slice(&b64(s64)?).map_err(|_| JwtError::Signature)?;
    let payload = b64(p64)?;
    let signed = token.as_bytes().get(..h64.len() + 1 + p64.len()).ok_or(JwtError::Structure)?;
    Ok(ParsedToken { kid, signed, signature, payload })
}

impl PrivyVerifier {
    /// Verifies `token` at `now` (seconds since the epoch, from the host clock).
    pub fn verify(&self, token: &str, now: i64) -> Result<Session, JwtError> {
        self.verify_with(token, now, &[])
    }

    /// The same, with keys fetched from the issuer's JWKS alongside the
    /// configured ones (no refetch wanted for an unknown `kid`).
    pub fn verify_with(&self, token: &str, now: i64, fetched: &[EsKey]) -> Result<Session, JwtError> {
        self.verify_full(token, now, fetched, UnknownKid::TryKidless)
    }

    /// Verifies `token` at `now` with the configured and the `fetched` keys.
    ///
    /// The signature is checked first, with [`Es256Tables`] through
    /// jwt-compact's `Algorithm` trait, and only then are the claims read
    /// into jwt-compact's [`Claims`]. jwt-compact's own
    /// `Validator::validate` would parse the claims before the signature,
    /// once per candidate key.
    pub fn verify_full(&self, token: &str, now: i64, fetched: &[EsKey], unknown: UnknownKid) -> Result<Session, JwtError> {
        let token = parse_token(token)?;
        let keys = self.candidates(token.kid.as_deref(), fetched, unknown)?;
        if !keys.into_iter().any(|key| Es256Tables.verify_signature(&token.signature, key, token.signed)) {
            return Err(JwtError::Signature);
        }
        // Only now is the payload worth reading. `Claims` flattens our
        // members, so serde reads the whole object through its buffer: an
        // array is refused (a map is asked for), and every member is parsed,
        // none skipped, so invalid UTF-8 and lone surrogates anywhere are
        // refused too (`jwt_compact_layer_and_the_stricter_edges`).
        let claims: Claims<PrivyClaims> = serde_json::from_slice(&token.payload).map_err(|_| JwtError::Claims)?;
        self.check_claims(&claims, now)
    }

    /// The keys a token may be checked with, at most [`MAX_KEYS_TRIED`]
    /// (one, for a token naming a `kid` that a key has).
    fn candidates<'k>(
        &'k self,
        kid: Option<&str>,
        fetched: &'k [EsKey],
        unknown: UnknownKid,
    ) -> Result<Vec<&'k EsKey>, JwtError> {
        let all = || self.keys.iter().chain(fetched.iter());
        let kidless = || all().filter(|k| k.kid.is_none());
        let named = || all().filter(|k| k.kid.is_some());
        let chosen: Vec<&EsKey> = match kid {
            Some(want) => match all().find(|k| k.kid.as_deref() == Some(want)) {
                Some(key) => vec![key],
                None if unknown == UnknownKid::Refetch => return Err(JwtError::UnknownKid),
                None => kidless().take(MAX_KEYS_TRIED).collect(),
            },
            None => kidless().chain(named()).take(MAX_KEYS_TRIED).collect(),
        };
        if chosen.is_empty() {
            return Err(JwtError::UnknownKid);
        }
        Ok(chosen)
    }

    fn check_claims(&self, c: &Claims<PrivyClaims>, now: i64) -> Result<Session, JwtError> {
        let leeway = self.leeway_secs;
        let exp = c.expiration.ok_or(JwtError::MissingClaim("exp"))?.timestamp();
        let iat = c.issued_at.ok_or(JwtError::MissingClaim("iat"))?.timestamp();
        let p = &c.custom;
        if p.iss.as_ref().and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(JwtError::Issuer);
        }
        let aud_ok = match &p.aud {
            Some(Value::String(a)) => *a == self.app_id,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(self.app_id.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err(JwtError::Audience);
        }
        // jwt-compact's checks with the policy's leeway and the host clock…
        let clock = chrono::DateTime::from_timestamp(now, 0).unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
        let options = TimeOptions::new(chrono::Duration::seconds(leeway), move || clock);
        c.validate_expiration(&options).map_err(|e| validation_error(&e))?;
        if c.not_before.is_some() {
            c.validate_maturity(&options).map_err(|e| validation_error(&e))?;
        }
        // …and the stricter edge: RFC 7519 §4.1.4 says valid *before* exp;
        // jwt-compact still accepts the second exp + leeway itself.
        if now.saturating_sub(leeway) >= exp {
            return Err(JwtError::Expired);
        }
        if iat > now.saturating_add(leeway) {
            return Err(JwtError::IssuedInFuture);
        }
        let sub = match &p.sub {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_SUB_LEN && is_header_safe(s) => s,
            _ => return Err(JwtError::MissingClaim("sub")),
        };
        let sid = match &p.sid {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => return Err(JwtError::MissingClaim("sid")),
        };
        Ok(Session { account: sub.clone(), session_id: sid.clone(), expires_at: exp })
    }
}

/// jwt-compact's refusals, as ours.
fn validation_error(e: &ValidationError) -> JwtError {
    match e {
        ValidationError::AlgorithmMismatch { .. } => JwtError::Algorithm,
        ValidationError::InvalidSignatureLen { .. }
        | ValidationError::MalformedSignature(_)
        | ValidationError::InvalidSignature => JwtError::Signature,
        ValidationError::Expired => JwtError::Expired,
        ValidationError::NotMature => JwtError::NotYetValid,
        _ => JwtError::Claims,
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
    // Unpadded base64url, strictly: URL_SAFE_NO_PAD refuses '=', '+', '/',
    // whitespace and non-zero trailing bits. (Not base64ct, jwt-compact's
    // constant-time one: on public token bytes it cost 3% of a fresh
    // token's verification: 67,220 of 2,242,962 wasm instructions.)
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

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
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
        sign_raw(header, claims.as_bytes())
    }

    fn sign_raw(header: &str, claims: &[u8]) -> String {
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
        // jwt-compact refuses a null NumericDate as malformed claims.
        assert_eq!(verifier().verify(&sign(H, &with_null_nbf), NOW), Err(JwtError::Claims));
        let with_null_exp = c.replacen(&format!(r#""exp":{}"#, NOW + 100), r#""exp":null"#, 1);
        assert_eq!(verifier().verify(&sign(H, &with_null_exp), NOW), Err(JwtError::Claims));
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
        let first = keys_from_jwks(&serde_json::json!({"keys":[jwk(&[7; 32], "a")]}), 16).unwrap();
        // Same key (even renamed), plus a new one.
        let second = keys_from_jwks_reusing(&serde_json::json!({"keys":[jwk(&[8; 32], "b"), jwk(&[7; 32], "a2")]}), &first, 16).unwrap();
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
        let keys = keys_from_jwks(&jwks, 16).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("a"));
        let dup: Value = serde_json::from_str(&format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}","kid":"a"}},{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}","kid":"a"}}]}}"#
        )).unwrap();
        assert_eq!(keys_from_jwks(&dup, 16).unwrap_err(), KeyError::DuplicateKid("a".into()), "even the same key");
        let kidless_twice: Value = serde_json::from_str(&format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}"}},{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}"}}]}}"#
        )).unwrap();
        assert_eq!(keys_from_jwks(&kidless_twice, 16).unwrap().len(), 1, "the same kid-less key twice is one key");
        let other = SigningKey::from_slice(&[3; 32]).unwrap().verifying_key().to_encoded_point(false);
        let (x2, y2) = (URL_SAFE_NO_PAD.encode(other.x().unwrap()), URL_SAFE_NO_PAD.encode(other.y().unwrap()));
        let dup: Value = serde_json::from_str(&format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}","kid":"a"}},{{"kty":"EC","crv":"P-256","x":"{x2}","y":"{y2}","kid":"a"}}]}}"#
        )).unwrap();
        assert_eq!(keys_from_jwks(&dup, 16).unwrap_err(), KeyError::DuplicateKid("a".into()), "two keys under one kid");
        let shared: Value = serde_json::from_str(&format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}","kid":"a"}},{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}","kid":"b"}}]}}"#
        )).unwrap();
        let both = keys_from_jwks(&shared, 16).unwrap();
        assert_eq!(both.len(), 2);
        assert!(Arc::ptr_eq(both[0].prepared.as_ref().unwrap(), both[1].prepared.as_ref().unwrap()), "one point, one table");
        assert_eq!(keys_from_jwks(&shared, 1).unwrap_err(), KeyError::TooManyKeys { max: 1 });
        let only_rsa: Value = serde_json::from_str(r#"{"keys":[{"kty":"RSA"}]}"#).unwrap();
        assert_eq!(keys_from_jwks(&only_rsa, 16).unwrap_err(), KeyError::NoUsableKey);
        let off_curve: Value = serde_json::from_str(&format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","x":"{x}","y":"{x}"}}]}}"#
        )).unwrap();
        assert!(keys_from_jwks(&off_curve, 16).is_err());
    }

    /// A verifier whose keys are RFC 7515 A.3 (under `kids[0]`) and decoys.
    fn keys(specs: &[(Option<&str>, u8)]) -> Vec<EsKey> {
        specs
            .iter()
            .map(|(kid, d)| {
                let key = if *d == 0 { *signing_key().verifying_key() } else { *SigningKey::from_slice(&[*d; 32]).unwrap().verifying_key() };
                EsKey::new(kid.map(str::to_owned), key)
            })
            .collect()
    }

    #[test]
    fn a_token_with_a_kid_is_checked_with_that_key_only() {
        let t = sign(H, &claims(NOW + 60)); // kid k1
        // k1 is a decoy here; the right key sits under another kid.
        let v = PrivyVerifier { keys: keys(&[(Some("k1"), 9), (Some("k2"), 0)]), ..verifier() };
        assert_eq!(v.verify(&t, NOW), Err(JwtError::Signature), "the key named k2 is never tried for kid k1");
        let v = PrivyVerifier { keys: keys(&[(Some("k2"), 9), (Some("k1"), 0)]), ..verifier() };
        assert!(v.verify(&t, NOW).is_ok());
    }

    #[test]
    fn a_token_without_kid_is_tried_against_a_bounded_few_keys() {
        let t = sign(r#"{"alg":"ES256","typ":"JWT"}"#, &claims(NOW + 60));
        let decoys: Vec<(Option<&str>, u8)> = (1..=MAX_KEYS_TRIED as u8).map(|i| (None, i)).collect();
        let mut specs = decoys.clone();
        specs.push((None, 0));
        let v = PrivyVerifier { keys: keys(&specs), ..verifier() };
        assert_eq!(v.verify(&t, NOW), Err(JwtError::Signature), "the right key is the fourth: never tried");
        let mut specs = decoys[1..].to_vec();
        specs.push((None, 0));
        let v = PrivyVerifier { keys: keys(&specs), ..verifier() };
        assert!(v.verify(&t, NOW).is_ok(), "the third is tried");
        // Kid-less keys go first, then the named ones.
        let v = PrivyVerifier { keys: keys(&[(Some("a"), 1), (Some("b"), 2), (None, 3), (None, 4), (Some("c"), 0)]), ..verifier() };
        assert_eq!(v.verify(&t, NOW), Err(JwtError::Signature));
        let v = PrivyVerifier { keys: keys(&[(Some("a"), 0), (Some("b"), 2), (None, 3), (None, 4)]), ..verifier() };
        assert!(v.verify(&t, NOW).is_ok(), "two kid-less keys, then the first named one");
    }

    #[test]
    fn an_unknown_kid_asks_for_a_refetch_before_the_pinned_kidless_key() {
        // A pinned PEM (no kid) plus JWKS fetching: a token naming a kid
        // nobody has must make the caller fetch, not match the pinned key.
        let t = sign(r#"{"alg":"ES256","kid":"rotated-in"}"#, &claims(NOW + 60));
        let v = PrivyVerifier { keys: keys(&[(None, 0)]), ..verifier() };
        assert_eq!(v.verify_full(&t, NOW, &[], UnknownKid::Refetch), Err(JwtError::UnknownKid));
        assert!(v.verify_full(&t, NOW, &[], UnknownKid::TryKidless).is_ok(), "after the fetch (or in its cooldown)");
        // Once fetched, the named key is the only one tried.
        let fetched = keys(&[(Some("rotated-in"), 0)]);
        assert!(v.verify_full(&t, NOW, &fetched, UnknownKid::Refetch).is_ok());
        let decoy = keys(&[(Some("rotated-in"), 7)]);
        assert_eq!(v.verify_full(&t, NOW, &decoy, UnknownKid::TryKidless), Err(JwtError::Signature));
    }

    #[test]
    fn jwt_compact_layer_and_the_stricter_edges() {
        let v = verifier();
        // The token layer refuses padding, a 4th segment…
        let t = sign(H, &claims(NOW + 60));
        assert_eq!(v.verify(&format!("{t}="), NOW), Err(JwtError::Base64));
        assert_eq!(v.verify(&format!("{t}.x"), NOW), Err(JwtError::Structure));
        // …a duplicate claim (serde refuses it through the flatten too).
        let dup = format!(r#"{{"sub":"did:privy:x",{}"#, &claims(NOW + 60)[1..]);
        assert_eq!(v.verify(&sign(H, &dup), NOW), Err(JwtError::Claims));
        let dup_exp = format!(r#"{{"exp":1,{}"#, &claims(NOW + 60)[1..]);
        assert_eq!(v.verify(&sign(H, &dup_exp), NOW), Err(JwtError::Claims));
        // Claims that are not an object.
        assert_eq!(v.verify(&sign(H, "[1,2]"), NOW), Err(JwtError::Claims));
        // Invalid UTF-8 or a lone surrogate in a member nobody reads: the
        // flattened `Claims` parses every member, none is skipped unchecked.
        let good = claims(NOW + 60);
        for bad in [&b"\"x\":\"\xff\","[..], b"\"\xc0\xaf\":1,", br#""x":["a","\ud800"],"#, br#""x":{"y":"\udc00"},"#] {
            let mut payload = b"{".to_vec();
            payload.extend_from_slice(bad);
            payload.extend_from_slice(&good.as_bytes()[1..]);
            assert_eq!(v.verify(&sign_raw(H, &payload), NOW), Err(JwtError::Claims), "{}", String::from_utf8_lossy(&payload));
        }
        // exp + leeway is already expired (RFC 7519: valid before exp), where
        // jwt-compact alone would still accept that second.
        let t = sign(H, &claims(NOW));
        assert!(v.verify(&t, NOW + v.leeway_secs - 1).is_ok());
        assert_eq!(v.verify(&t, NOW + v.leeway_secs), Err(JwtError::Expired));
        // A fractional NumericDate is truncated (RFC 7519 allows fractions).
        let frac = claims(NOW + 60).replace(&format!("{}", NOW + 60), &format!("{}.75", NOW + 60));
        assert_eq!(v.verify(&sign(H, &frac), NOW).map(|s| s.expires_at), Ok(NOW + 60));
        // cty other than JSON: jwt-compact refuses it (CBOR is not enabled).
        assert_eq!(v.verify(&sign(r#"{"alg":"ES256","kid":"k1","cty":"CBOR"}"#, &claims(NOW + 60)), NOW), Err(JwtError::Header));
        // An embedded jwk / jku in the header is never used to pick a key.
        let pt = SigningKey::from_slice(&[9; 32]).unwrap().verifying_key().to_encoded_point(false);
        let jwk = format!(
            r#"{{"alg":"ES256","kid":"k1","jku":"https://evil/jwks","jwk":{{"kty":"EC","crv":"P-256","x":"{}","y":"{}"}}}}"#,
            URL_SAFE_NO_PAD.encode(pt.x().unwrap()),
            URL_SAFE_NO_PAD.encode(pt.y().unwrap())
        );
        let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(&jwk), URL_SAFE_NO_PAD.encode(claims(NOW + 60)));
        let sig: Signature = SigningKey::from_slice(&[9; 32]).unwrap().sign(input.as_bytes());
        let forged = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()));
        assert!(v.verify(&forged, NOW).is_err());
    }

    #[test]
    fn es256_tables_is_a_jwt_compact_algorithm() {
        use jwt_compact::{AlgorithmExt, Empty};
        let key = EsKey::new(None, *signing_key().verifying_key());
        let good = sign(H, &claims(NOW + 60));
        let token = jwt_compact::UntrustedToken::new(&good).unwrap();
        assert!(Es256Tables.validator::<Empty>(&key).validate(&token).is_ok());
        let other = EsKey::new(None, *SigningKey::from_slice(&[9; 32]).unwrap().verifying_key());
        assert!(matches!(Es256Tables.validator::<Empty>(&other).validate(&token), Err(ValidationError::InvalidSignature)));
        // High-S twin: still valid ES256 (RFC 7515 A.3 is one).
        let sig = Es256Signature::try_from_slice(token.signature_bytes()).unwrap();
        let high = sig.0.normalize_s().map_or_else(|| Signature::from_scalars(sig.0.r(), -*sig.0.s()).unwrap(), |_| sig.0);
        assert!(Es256Tables.verify_signature(&Es256Signature(high), &key, good.rsplit_once('.').unwrap().0.as_bytes()));
        assert!(Es256Signature::try_from_slice(&[0; 64]).is_err(), "r = s = 0");
        assert_eq!(Es256Signature(sig.0).as_bytes().len(), 64);
    }

    #[test]
    fn pem_keys_are_read_byte_for_byte_and_anything_else_refused() {
        use p256::pkcs8::{EncodePublicKey, LineEnding};
        let vk = *signing_key().verifying_key();
        let pem = vk.to_public_key_pem(LineEnding::LF).unwrap();
        assert_eq!(key_from_pem(&pem).unwrap().key, vk);
        assert_eq!(key_from_pem(&format!("  {}\r\n", pem.replace('\n', "\r\n"))).unwrap().key, vk, "CRLF and blanks");
        // The compressed form of the same key.
        let compressed = p256::PublicKey::from(vk).to_public_key_der().unwrap();
        let der = compressed.as_bytes();
        assert_eq!(der.len(), 91, "p256 writes the uncompressed form");
        let point = vk.to_encoded_point(true);
        let mut cder = SPKI_P256_COMPRESSED.to_vec();
        cder.extend_from_slice(point.as_bytes());
        let cpem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", base64::engine::general_purpose::STANDARD.encode(&cder));
        assert_eq!(key_from_pem(&cpem).unwrap().key, vk);
        // Refused: not a PEM, another curve's prefix, a point off the curve,
        // a truncated key, a private key.
        let mut off = der.to_vec();
        off[90] ^= 1;
        let off_pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----", base64::engine::general_purpose::STANDARD.encode(&off));
        let mut p384ish = der.to_vec();
        p384ish[22] = 0x22; // secp384r1's OID ends in 0x22
        let p384_pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----", base64::engine::general_purpose::STANDARD.encode(&p384ish));
        let short = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----", base64::engine::general_purpose::STANDARD.encode(&der[..90]));
        for bad in ["", "not a key", &off_pem, &p384_pem, &short, &pem.replace("PUBLIC KEY", "PRIVATE KEY"), &pem.replace('M', "*")] {
            assert_eq!(key_from_pem(bad).unwrap_err(), KeyError::Pem, "{bad}");
        }
    }
}
