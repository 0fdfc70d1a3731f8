//! Credential formats, hashing and generation.
//!
//! Two kinds of bearer credential exist:
//! - API key:   `dial_live_` + 40 lowercase hex; never expires (until revoked).
//! - API token: `privy_` + 40 lowercase hex; expires after 30/60/90/365 days or never.
//!
//! The service only ever stores `sha256(secret)` (lowercase hex) and a short
//! display prefix (the first 8 hex chars after the kind marker), so a database
//! leak does not leak usable credentials. The filter hashes the presented
//! Bearer value itself and sends only the hash to `/v1/keys/lookup`.

use sha2::{Digest, Sha256};
use std::fmt;

/// Marker that starts every API key.
pub const API_KEY_MARKER: &str = "dial_live_";
/// Marker that starts every API token.
pub const API_TOKEN_MARKER: &str = "privy_";
/// Number of random hex characters after the marker.
pub const SECRET_HEX_LEN: usize = 40;
/// Number of hex characters (after the marker) used as the display prefix.
pub const PREFIX_LEN: usize = 8;
/// Maximum number of *active* API tokens an account may hold.
pub const MAX_ACTIVE_API_TOKENS: i64 = 25;
/// The key preset the dashboard calls "Quick: agent key".
pub const AGENT_PRESET: &str = "agent";
/// Scopes of an agent key unless others are given.
pub const AGENT_SCOPES: &[&str] = &["sms:send"];
/// Name of an agent key unless another is given.
pub const AGENT_NAME: &str = "agent key";
/// Seconds in a day, for token expiries.
pub const DAY_SECS: i64 = 86_400;

/// The two credential kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    ApiKey,
    ApiToken,
}

impl KeyKind {
    /// The wire/DB spelling (`api_key` | `api_token`).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::ApiKey => "api_key",
            KeyKind::ApiToken => "api_token",
        }
    }

    /// Parse the wire/DB spelling.
    pub fn parse(s: &str) -> Option<KeyKind> {
        match s {
            "api_key" => Some(KeyKind::ApiKey),
            "api_token" => Some(KeyKind::ApiToken),
            _ => None,
        }
    }

    /// The marker string every secret of this kind starts with.
    pub fn marker(self) -> &'static str {
        match self {
            KeyKind::ApiKey => API_KEY_MARKER,
            KeyKind::ApiToken => API_TOKEN_MARKER,
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A computed key state. Never stored: derived from `revoked_at`/`expires_at`
/// and the caller's clock so that expiry needs no background job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Revoked,
    Expired,
}

impl KeyState {
    /// Revocation wins over expiry; a key expires at the instant `expires_at`.
    pub fn compute(revoked_at: Option<i64>, expires_at: Option<i64>, now: i64) -> KeyState {
        if revoked_at.is_some() {
            KeyState::Revoked
        } else if expires_at.is_some_and(|exp| exp <= now) {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Revoked => "revoked",
            KeyState::Expired => "expired",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long an API token lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Days(u32),
    Never,
}

impl Expiry {
    /// The only lifetimes offered for API tokens.
    pub const ALLOWED_DAYS: [u32; 4] = [30, 60, 90, 365];

    /// Parse `30d`, `60d`, `90d`, `365d` or `never`.
    pub fn parse(s: &str) -> Result<Expiry, String> {
        if s == "never" {
            return Ok(Expiry::Never);
        }
        let days = s
            .strip_suffix('d')
            .and_then(|d| d.parse::<u32>().ok())
            .filter(|d| Self::ALLOWED_DAYS.contains(d));
        match days {
            Some(d) => Ok(Expiry::Days(d)),
            None => Err(format!(
                "invalid expiry {s:?}: expected one of 30d, 60d, 90d, 365d, never"
            )),
        }
    }

    /// Absolute expiry (unix seconds) for a key created at `now`.
    pub fn expires_at(self, now: i64) -> Option<i64> {
        match self {
            Expiry::Days(d) => Some(now.saturating_add(i64::from(d).saturating_mul(DAY_SECS))),
            Expiry::Never => None,
        }
    }
}

/// Lowercase hex SHA-256 of the full secret string — the only thing stored.
pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// True for exactly 64 lowercase hex characters (the lookup key format).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `n_bytes` of OS randomness as lowercase hex (2 × n_bytes chars).
pub fn random_hex(n_bytes: usize) -> Result<String, getrandom::Error> {
    let mut buf = vec![0u8; n_bytes];
    getrandom::getrandom(&mut buf)?;
    Ok(hex::encode(buf))
}

/// A fresh secret of the given kind: marker + 40 random lowercase hex chars.
pub fn generate_secret(kind: KeyKind) -> Result<String, getrandom::Error> {
    Ok(format!(
        "{}{}",
        kind.marker(),
        random_hex(SECRET_HEX_LEN / 2)?
    ))
}

/// Parse a secret: returns its kind and display prefix when it is well-formed.
pub fn parse_secret(secret: &str) -> Option<(KeyKind, String)> {
    for kind in [KeyKind::ApiKey, KeyKind::ApiToken] {
        if let Some(rest) = secret.strip_prefix(kind.marker()) {
            if rest.len() == SECRET_HEX_LEN && is_lower_hex(rest) {
                return rest.get(..PREFIX_LEN).map(|p| (kind, p.to_string()));
            }
        }
    }
    None
}

/// A display prefix is exactly 8 lowercase hex characters.
pub fn is_valid_prefix(s: &str) -> bool {
    s.len() == PREFIX_LEN && is_lower_hex(s)
}

/// Scope syntax: non-empty, only `[A-Za-z0-9:_.-]`, at most 100 chars.
pub fn validate_scope(scope: &str) -> Result<(), String> {
    let ok_chars = scope
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.' | b'-'));
    if scope.is_empty() || scope.len() > 100 || !ok_chars {
        return Err(format!(
            "invalid scope {scope:?}: must be 1-100 chars of [A-Za-z0-9:_.-]"
        ));
    }
    Ok(())
}

/// Parse a comma-separated scope list (`sms:send,contacts_read`), trimming
/// whitespace and dropping duplicates while keeping the given order.
pub fn parse_scopes(list: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for raw in list.split(',') {
        let scope = raw.trim();
        validate_scope(scope)?;
        if !out.iter().any(|s| s == scope) {
            out.push(scope.to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_have_the_documented_format() {
        let key = generate_secret(KeyKind::ApiKey).unwrap();
        assert!(key.starts_with("dial_live_"));
        assert_eq!(key.len(), "dial_live_".len() + 40);
        let (kind, prefix) = parse_secret(&key).unwrap();
        assert_eq!(kind, KeyKind::ApiKey);
        assert_eq!(prefix, key["dial_live_".len().."dial_live_".len() + 8]);

        let token = generate_secret(KeyKind::ApiToken).unwrap();
        assert!(token.starts_with("privy_"));
        assert_eq!(token.len(), "privy_".len() + 40);
        let (kind, prefix) = parse_secret(&token).unwrap();
        assert_eq!(kind, KeyKind::ApiToken);
        assert_eq!(prefix, token[6..14]);
        assert!(is_valid_prefix(&prefix));
        assert_ne!(generate_secret(KeyKind::ApiToken).unwrap(), token);
    }

    #[test]
    fn parse_secret_rejects_malformed() {
        assert!(parse_secret("dial_live_abc").is_none());
        assert!(parse_secret(&format!("dial_live_{}", "A".repeat(40))).is_none());
        assert!(parse_secret(&format!("privy_{}", "a".repeat(41))).is_none());
        assert!(parse_secret(&format!("other_{}", "a".repeat(40))).is_none());
    }

    #[test]
    fn sha256_hex_matches_known_vector() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sha256_hex(&sha256_hex("x")));
        assert!(!is_sha256_hex(&sha256_hex("x").to_uppercase()));
        assert!(!is_sha256_hex("abc"));
    }

    #[test]
    fn state_is_computed_from_timestamps() {
        assert_eq!(KeyState::compute(None, None, 10), KeyState::Active);
        assert_eq!(KeyState::compute(None, Some(11), 10), KeyState::Active);
        assert_eq!(KeyState::compute(None, Some(10), 10), KeyState::Expired);
        assert_eq!(KeyState::compute(Some(5), Some(1), 10), KeyState::Revoked);
    }

    #[test]
    fn expiry_parsing() {
        assert_eq!(Expiry::parse("30d").unwrap(), Expiry::Days(30));
        assert_eq!(Expiry::parse("365d").unwrap(), Expiry::Days(365));
        assert_eq!(Expiry::parse("never").unwrap(), Expiry::Never);
        assert!(Expiry::parse("31d").is_err());
        assert!(Expiry::parse("30").is_err());
        assert_eq!(Expiry::Days(30).expires_at(100), Some(100 + 30 * 86_400));
        assert_eq!(Expiry::Never.expires_at(100), None);
    }

    #[test]
    fn scope_parsing() {
        assert_eq!(
            parse_scopes("sms:send, contacts_read,sms:send").unwrap(),
            vec!["sms:send", "contacts_read"]
        );
        assert!(parse_scopes("").is_err());
        assert!(parse_scopes("a,,b").is_err());
        assert!(parse_scopes("sms send").is_err());
        assert!(parse_scopes("a/b").is_err());
    }
}
