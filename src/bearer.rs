//! `Authorization: Bearer <token>` parsing and credential classification.
//!
//! Pure logic: no proxy-wasm imports. The parser works on raw header bytes
//! because a hostile client can send anything, including non-UTF-8.

use sha2::{Digest, Sha256};

/// Default cap on the token length, in bytes. Privy access tokens are about
/// 600 bytes; anything near this cap is hostile or a mistake.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 4096;

pub const API_KEY_PREFIX: &str = "dial_live_";
pub const API_TOKEN_PREFIX: &str = "privy_";
/// The `privy_` token body is exactly this many lowercase hex digits.
const API_TOKEN_HEX_LEN: usize = 40;
/// How many characters after the literal prefix identify a key in logs,
/// headers and the dashboard.
pub const KEY_PREFIX_LEN: usize = 8;
/// `dial_live_` keys carry at least this many characters after the prefix
/// (ours carry 40); shorter ones cannot be keys we minted.
const API_KEY_MIN_BODY: usize = 16;
const API_KEY_MAX_BODY: usize = 128;

/// Why the `Authorization` header(s) could not be read as one Bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerError {
    /// More than one `Authorization` header: ambiguous, refuse.
    MultipleHeaders,
    /// A scheme other than Bearer (Basic, Digest, …) or no scheme at all.
    NotBearer,
    /// `Bearer` with nothing after it.
    EmptyToken,
    /// Longer than the configured cap.
    TooLong,
    /// Characters outside RFC 6750's b64token set (spaces, controls, non-ASCII).
    BadCharacters,
}

impl BearerError {
    pub fn describe(self) -> &'static str {
        match self {
            BearerError::MultipleHeaders => "more than one Authorization header",
            BearerError::NotBearer => "the Authorization scheme must be Bearer",
            BearerError::EmptyToken => "the Bearer token is empty",
            BearerError::TooLong => "the Bearer token is too long",
            BearerError::BadCharacters => "the Bearer token has characters RFC 6750 does not allow",
        }
    }
}

/// Reads the Bearer token from every `Authorization` header value the request
/// carried. `Ok(None)` means no header at all (the x402 fall-through).
pub fn bearer_token<'a>(
    values: &[&'a [u8]],
    max_len: usize,
) -> Result<Option<&'a str>, BearerError> {
    let value = match values {
        [] => return Ok(None),
        [one] => *one,
        _ => return Err(BearerError::MultipleHeaders),
    };
    // RFC 7235: credentials = auth-scheme [ 1*SP token68 ]; Envoy has already
    // trimmed surrounding whitespace, we trim again for hosts that do not.
    let value = trim_ows(value);
    const SCHEME: &[u8] = b"bearer";
    let (scheme, rest) = match value.iter().position(|b| *b == b' ') {
        Some(i) => value.split_at(i),
        None => (value, &[][..]),
    };
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return Err(BearerError::NotBearer);
    }
    let token = trim_ows(rest);
    if token.is_empty() {
        return Err(BearerError::EmptyToken);
    }
    if token.len() > max_len {
        return Err(BearerError::TooLong);
    }
    if !is_b64token(token) {
        return Err(BearerError::BadCharacters);
    }
    // is_b64token admits ASCII only, so this cannot fail; map it anyway.
    std::str::from_utf8(token)
        .map(Some)
        .map_err(|_| BearerError::BadCharacters)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// RFC 6750 §2.1: `b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_b64token(token: &[u8]) -> bool {
    let body_len = token.len() - token.iter().rev().take_while(|b| **b == b'=').count();
    if body_len == 0 {
        return false;
    }
    token.iter().take(body_len).all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
    })
}

/// What kind of credential a token is. Borrowed from the request; nothing here
/// is ever logged except [`Credential::log_label`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential<'a> {
    /// The operator admin key: bypass payment and scopes.
    Admin,
    /// A Privy access token (a JWS compact serialization, starts `eyJ`).
    PrivyAccessToken(&'a str),
    /// `dial_live_…` or `privy_…`: looked up at the key/credits service.
    Key(KeyCredential<'a>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `dial_live_…`, no expiry until revoked.
    ApiKey,
    /// `privy_` + 40 hex, expires after 30/60/90/365 days or never.
    ApiToken,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::ApiKey => "api_key",
            KeyKind::ApiToken => "api_token",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCredential<'a> {
    pub kind: KeyKind,
    pub secret: &'a str,
    /// The 8 characters after `dial_live_` / `privy_`: safe to log and show.
    pub prefix: &'a str,
}

impl KeyCredential<'_> {
    /// SHA-256 of the whole secret, lowercase hex: the only form in which a
    /// key leaves the filter.
    pub fn sha256_hex(&self) -> String {
        sha256_hex(self.secret.as_bytes())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifyError {
    /// Not the admin key and not any credential format we know.
    UnknownFormat,
    /// Looks like a `privy_` token but is not exactly 40 lowercase hex.
    MalformedApiToken,
    /// Looks like a `dial_live_` key but its body is malformed.
    MalformedApiKey,
}

impl ClassifyError {
    pub fn describe(self) -> &'static str {
        match self {
            ClassifyError::UnknownFormat => "the Bearer token is not a recognised credential",
            ClassifyError::MalformedApiToken => "malformed API token",
            ClassifyError::MalformedApiKey => "malformed API key",
        }
    }
}

/// Classifies a Bearer token. `admin_digests` are SHA-256 digests of the
/// operator admin key(s); they are compared in constant time.
pub fn classify<'a>(
    token: &'a str,
    admin_digests: &[[u8; 32]],
) -> Result<Credential<'a>, ClassifyError> {
    if !admin_digests.is_empty() {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Check every digest, whatever matched, so timing says nothing about which.
        let mut hit = false;
        for admin in admin_digests {
            hit |= constant_time_eq(&digest, admin);
        }
        if hit {
            return Ok(Credential::Admin);
        }
    }
    if let Some(body) = token.strip_prefix(API_KEY_PREFIX) {
        let ok_len = (API_KEY_MIN_BODY..=API_KEY_MAX_BODY).contains(&body.len());
        if !ok_len || !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(ClassifyError::MalformedApiKey);
        }
        let prefix = body.get(..KEY_PREFIX_LEN).ok_or(ClassifyError::MalformedApiKey)?;
        return Ok(Credential::Key(KeyCredential { kind: KeyKind::ApiKey, secret: token, prefix }));
    }
    if let Some(body) = token.strip_prefix(API_TOKEN_PREFIX) {
        let hex_ok = body.len() == API_TOKEN_HEX_LEN
            && body.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err(ClassifyError::MalformedApiToken);
        }
        let prefix = body.get(..KEY_PREFIX_LEN).ok_or(ClassifyError::MalformedApiToken)?;
        return Ok(Credential::Key(KeyCredential { kind: KeyKind::ApiToken, secret: token, prefix }));
    }
    // A JWS compact serialization whose protected header is a JSON object
    // starts with base64url("{\"") = "eyJ".
    if token.starts_with("eyJ") {
        return Ok(Credential::PrivyAccessToken(token));
    }
    Err(ClassifyError::UnknownFormat)
}

/// Compares two digests without an early exit.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    // black_box keeps the optimiser from turning the fold back into a branchy compare.
    std::hint::black_box(diff) == 0
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex_lower(&Sha256::digest(bytes))
}

pub fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Parses a 64-hex-digit SHA-256 digest (either case).
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let hi = (pair.first()).and_then(|c| char::from(*c).to_digit(16))?;
        let lo = (pair.get(1)).and_then(|c| char::from(*c).to_digit(16))?;
        *slot = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// Finds the value of cookie `name` in the `Cookie` header values.
pub fn cookie_value<'a>(cookie_headers: &[&'a [u8]], name: &str) -> Option<&'a [u8]> {
    cookie_headers
        .iter()
        .flat_map(|h| h.split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = trim_ows(pair);
            let eq = pair.iter().position(|b| *b == b'=')?;
            let (k, v) = pair.split_at(eq);
            (k == name.as_bytes()).then(|| v.get(1..).unwrap_or_default())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "admin-secret-for-tests-0123456789";

    fn admin_digest() -> [u8; 32] {
        Sha256::digest(ADMIN.as_bytes()).into()
    }

    #[test]
    fn reads_bearer_case_insensitively() {
        for v in ["Bearer abc", "bearer abc", "BEARER abc", "BeArEr   abc  ", "\tBearer abc"] {
            assert_eq!(bearer_token(&[v.as_bytes()], 100), Ok(Some("abc")), "{v:?}");
        }
    }

    #[test]
    fn no_header_is_none() {
        assert_eq!(bearer_token(&[], 100), Ok(None));
    }

    #[test]
    fn rejects_bad_headers() {
        let cases: &[(&[u8], BearerError)] = &[
            (b"Basic dXNlcjpwYXNz", BearerError::NotBearer),
            (b"Bearer", BearerError::EmptyToken),
            (b"Bearer    ", BearerError::EmptyToken),
            (b"", BearerError::NotBearer),
            (b"abc", BearerError::NotBearer),
            (b"Bearerabc", BearerError::NotBearer),
            (b"Bearer a b", BearerError::BadCharacters),
            (b"Bearer a\x00b", BearerError::BadCharacters),
            (b"Bearer a\r\nb", BearerError::BadCharacters),
            (b"Bearer \xff\xfe", BearerError::BadCharacters),
            (b"Bearer caf\xc3\xa9", BearerError::BadCharacters),
            (b"Bearer ===", BearerError::BadCharacters),
            (b"Bearer a=b", BearerError::BadCharacters),
            (b"Bearer\tabc", BearerError::NotBearer),
        ];
        for (v, want) in cases {
            assert_eq!(bearer_token(&[v], 100), Err(*want), "{:?}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn allows_rfc6750_charset_with_padding() {
        assert_eq!(bearer_token(&[b"Bearer aZ09-._~+/=="], 100), Ok(Some("aZ09-._~+/==")));
    }

    #[test]
    fn two_headers_are_refused_even_if_identical() {
        assert_eq!(
            bearer_token(&[b"Bearer abc", b"Bearer abc"], 100),
            Err(BearerError::MultipleHeaders)
        );
    }

    #[test]
    fn caps_length() {
        let long = format!("Bearer {}", "a".repeat(101));
        assert_eq!(bearer_token(&[long.as_bytes()], 100), Err(BearerError::TooLong));
        let ok = format!("Bearer {}", "a".repeat(100));
        assert!(bearer_token(&[ok.as_bytes()], 100).is_ok());
    }

    #[test]
    fn classifies_every_kind() {
        let admins = [admin_digest()];
        assert_eq!(classify(ADMIN, &admins), Ok(Credential::Admin));
        assert_eq!(classify("eyJhbGciOiJFUzI1NiJ9.e30.sig", &admins),
            Ok(Credential::PrivyAccessToken("eyJhbGciOiJFUzI1NiJ9.e30.sig")));
        let key = "dial_live_abc12345deadbeefdeadbeefdeadbeef00000000";
        match classify(key, &admins) {
            Ok(Credential::Key(k)) => {
                assert_eq!(k.kind, KeyKind::ApiKey);
                assert_eq!(k.prefix, "abc12345");
                assert_eq!(k.sha256_hex(), sha256_hex(key.as_bytes()));
            }
            other => panic!("{other:?}"),
        }
        let tok = "privy_0123456789abcdef0123456789abcdef01234567";
        match classify(tok, &admins) {
            Ok(Credential::Key(k)) => {
                assert_eq!(k.kind, KeyKind::ApiToken);
                assert_eq!(k.prefix, "01234567");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_lookalikes() {
        let none: [[u8; 32]; 0] = [];
        for (t, want) in [
            ("privy_0123456789ABCDEF0123456789abcdef01234567", ClassifyError::MalformedApiToken),
            ("privy_0123456789abcdef0123456789abcdef0123456", ClassifyError::MalformedApiToken),
            ("privy_0123456789abcdef0123456789abcdef012345678", ClassifyError::MalformedApiToken),
            ("dial_live_short", ClassifyError::MalformedApiKey),
            ("dial_live_abc12345-eadbeefdeadbeefdeadbeef", ClassifyError::MalformedApiKey),
            ("dial_test_abc12345deadbeefdeadbeefdeadbeef", ClassifyError::UnknownFormat),
            ("admin-secret-for-tests-012345678", ClassifyError::UnknownFormat),
            ("abc", ClassifyError::UnknownFormat),
        ] {
            assert_eq!(classify(t, &none), Err(want), "{t}");
        }
        // Near-miss of the admin key is not admin.
        assert_eq!(classify("admin-secret-for-tests-012345678", &[admin_digest()]),
            Err(ClassifyError::UnknownFormat));
    }

    #[test]
    fn constant_time_eq_compares() {
        let a = admin_digest();
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] ^= 1;
        assert!(!constant_time_eq(&a, &b));
    }

    #[test]
    fn parses_digests() {
        let d = admin_digest();
        assert_eq!(parse_sha256_hex(&hex_lower(&d)), Some(d));
        assert_eq!(parse_sha256_hex(&hex_lower(&d).to_uppercase()), Some(d));
        assert_eq!(parse_sha256_hex("zz"), None);
        assert_eq!(parse_sha256_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn finds_cookies() {
        let h: [&[u8]; 2] = [b"a=1; privy-token=eyJx.y.z", b"other=2"];
        assert_eq!(cookie_value(&h, "privy-token"), Some(&b"eyJx.y.z"[..]));
        assert_eq!(cookie_value(&h, "other"), Some(&b"2"[..]));
        assert_eq!(cookie_value(&h, "privy"), None);
        assert_eq!(cookie_value(&[b"privy-token"], "privy-token"), None);
    }
}
