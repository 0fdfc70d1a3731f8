//! The key/credits service contract as the filter speaks it (see
//! `docs/credits-service.openapi.yaml`): request bodies to send and strict
//! parsing of the answers. Anything unexpected is a [`ServiceError`], which
//! the filter answers with 503 (fail closed).

use serde::{Deserialize, Serialize};

use crate::bearer::KEY_PREFIX_LEN;
use crate::policy::{is_scope, RateLimit};
use crate::privy_jwt::is_header_safe;

/// The VM environment variable holding the key the filter proves itself
/// with to the key/credits service (sent on every callout as
/// [`SERVICE_KEY_HEADER`]); never in the plugin config, never logged.
pub const SERVICE_KEY_ENV: &str = "DIAL_SERVICE_KEY";
/// The callout header carrying it.
pub const SERVICE_KEY_HEADER: &str = "x-dialtone-service-key";
/// Shorter keys are refused at load.
pub const MIN_SERVICE_KEY_LEN: usize = 32;

/// Why the service key in the environment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKeyError {
    TooShort,
    /// It goes into a header: visible ASCII only.
    NotHeaderSafe,
}

impl std::fmt::Display for ServiceKeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceKeyError::TooShort => write!(f, "{SERVICE_KEY_ENV} must be at least {MIN_SERVICE_KEY_LEN} characters"),
            ServiceKeyError::NotHeaderSafe => write!(f, "{SERVICE_KEY_ENV} must be visible ASCII (it is sent in a header)"),
        }
    }
}

/// The service key from the VM environment's value: none when unset or
/// empty (callouts then carry no key, and a service that requires one
/// refuses them: fail closed).
pub fn service_key_from_env(value: Option<&str>) -> Result<Option<String>, ServiceKeyError> {
    match value.filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) if v.len() < MIN_SERVICE_KEY_LEN => Err(ServiceKeyError::TooShort),
        Some(v) if !is_header_safe(v) => Err(ServiceKeyError::NotHeaderSafe),
        Some(v) => Ok(Some(v.to_owned())),
    }
}

/// What came back from a callout, as the host reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    /// The service answered (any status). `body` is at most the configured cap.
    Answered { status: u16, body: Vec<u8>, truncated: bool },
    /// No answer: connection refused/reset, timeout, or no `:status`.
    Failed,
}

/// Why the service could not be trusted for this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceError {
    /// Unreachable, reset or timed out.
    Unavailable,
    /// An HTTP status the contract does not define for this call (5xx, or an
    /// Envoy-generated 503/504 for a dead upstream).
    Status(u16),
    /// A body that is not the JSON the contract promises.
    Garbage,
    /// Bigger than `max_response_bytes`.
    TooLarge,
    /// The debit answer contradicts the request (wrong amount, negative balance,
    /// an idempotency conflict): never treat that as paid.
    Inconsistent,
    /// The callout could not even be dispatched (unknown cluster, …).
    DispatchFailed,
}

impl ServiceError {
    pub fn reason(self) -> &'static str {
        match self {
            ServiceError::Unavailable => "unreachable",
            ServiceError::Status(_) => "bad_status",
            ServiceError::Garbage => "garbage",
            ServiceError::TooLarge => "too_large",
            ServiceError::Inconsistent => "inconsistent",
            ServiceError::DispatchFailed => "dispatch_failed",
        }
    }
}

#[derive(Serialize)]
pub struct LookupRequest<'a> {
    pub key_sha256: &'a str,
}

#[derive(Serialize)]
pub struct DebitRequest<'a> {
    pub account: &'a str,
    pub amount: u64,
    pub idempotency_key: &'a str,
    pub route: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<&'a str>,
    /// Checked first by the service: a rate-limited request is not charged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// A hold (charge on success): same fields as a debit, plus its lifetime.
#[derive(Serialize)]
pub struct HoldRequest<'a> {
    pub account: &'a str,
    pub amount: u64,
    pub idempotency_key: &'a str,
    pub ttl_seconds: u64,
    pub route: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

#[derive(Serialize)]
pub struct RateLimitRequest<'a> {
    pub account: &'a str,
    pub rate_limit: RateLimit,
}

#[derive(Serialize)]
pub struct ReleaseRequest<'a> {
    pub reason: &'a str,
}

/// `POST x402_claims_path`: only one request at a time may be served on one
/// x402 payment (every Envoy, every worker). `owner` is the request's
/// idempotency key, so a retried claim is answered as the first one was.
#[derive(Debug, Serialize)]
pub struct ClaimRequest<'a> {
    pub claim: &'a str,
    pub owner: &'a str,
    pub ttl_seconds: u64,
    pub route: &'a str,
}

/// What the service said of a payment claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This request holds the payment (now, or already: a retry).
    Claimed,
    /// Another request holds it.
    InUse,
}

/// Reads a claim answer for `claim`: 200/201 naming it and `claimed: true`,
/// or 409 `claim_in_use`.
pub fn parse_claim(outcome: CallOutcome, claim: &str) -> Result<Claim, ServiceError> {
    #[derive(Deserialize)]
    struct Answer {
        claim: String,
        #[serde(default)]
        claimed: Option<bool>,
        #[serde(default)]
        error: Option<String>,
    }
    let (status, body) = answered(outcome)?;
    let a: Answer = match status {
        200 | 201 | 409 => object(&body)?,
        other => return Err(ServiceError::Status(other)),
    };
    if a.claim != claim {
        return Err(ServiceError::Inconsistent);
    }
    match (status, a.claimed, a.error.as_deref()) {
        (200 | 201, Some(true), None) => Ok(Claim::Claimed),
        (409, _, Some("claim_in_use")) => Ok(Claim::InUse),
        _ => Err(ServiceError::Garbage),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    Active,
    Revoked,
    Expired,
}

/// A key the service knows.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct KeyRecord {
    pub account: String,
    pub key_prefix: String,
    pub kind: String,
    pub scopes: Vec<String>,
    pub state: KeyState,
    #[serde(default)]
    pub expires_at: Option<i64>,
    pub balance: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(KeyRecord),
    NotFound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Debit {
    Charged { balance: i64 },
    Insufficient { balance: i64 },
    RateLimited { retry_after: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    Held { hold_id: String, balance: i64 },
    Insufficient { balance: i64 },
    RateLimited { retry_after: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateCheck {
    Allowed,
    Limited { retry_after: u64 },
}

/// How a capture or release went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    Done,
    /// Already settled the other way, or expired and released by the service.
    NotOpen,
}

/// A failure of the transport rather than an answer of the service: no
/// answer at all, or Envoy's own 503/504 (connect failure, reset, overflow,
/// timeout), whose body is not the service's JSON. Every call in this
/// contract is idempotent (lookups by nature, holds and debits by their
/// idempotency key, capture/release by hold id), so one retry is safe.
pub fn is_transport_failure(outcome: &CallOutcome) -> bool {
    match outcome {
        CallOutcome::Failed => true,
        CallOutcome::Answered { status: 503 | 504, body, .. } => body.first() != Some(&b'{'),
        CallOutcome::Answered { .. } => false,
    }
}

/// The contract's answers are JSON objects: valid UTF-8 (which serde_json
/// does not check inside members it skips) and not the array form serde's
/// derive would also take.
pub(crate) fn object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ServiceError> {
    let text = std::str::from_utf8(body).map_err(|_| ServiceError::Garbage)?;
    if !text.trim_start().starts_with('{') {
        return Err(ServiceError::Garbage);
    }
    serde_json::from_slice(body).map_err(|_| ServiceError::Garbage)
}

pub(crate) fn answered(outcome: CallOutcome) -> Result<(u16, Vec<u8>), ServiceError> {
    match outcome {
        CallOutcome::Failed => Err(ServiceError::Unavailable),
        CallOutcome::Answered { truncated: true, .. } => Err(ServiceError::TooLarge),
        CallOutcome::Answered { status, body, .. } => Ok((status, body)),
    }
}

/// The account id goes into an upstream header: visible ASCII, bounded.
pub(crate) fn valid_account(a: &str) -> bool {
    !a.is_empty() && a.len() <= 256 && is_header_safe(a)
}

pub fn parse_lookup(outcome: CallOutcome) -> Result<Lookup, ServiceError> {
    let (status, body) = answered(outcome)?;
    match status {
        200 => {
            let rec: KeyRecord = object(&body)?;
            let sane = valid_account(&rec.account)
                && rec.key_prefix.len() == KEY_PREFIX_LEN
                && is_header_safe(&rec.key_prefix)
                && rec.scopes.len() <= 256
                && rec.scopes.iter().all(|s| is_scope(s));
            if !sane {
                return Err(ServiceError::Garbage);
            }
            Ok(Lookup::Found(rec))
        }
        404 => Ok(Lookup::NotFound),
        other => Err(ServiceError::Status(other)),
    }
}

#[derive(Deserialize)]
struct Charged {
    account: String,
    charged: u64,
    balance: i64,
}

#[derive(Deserialize)]
struct Refused {
    error: String,
    balance: i64,
}

#[derive(Deserialize)]
struct Limited {
    error: String,
    retry_after_seconds: u64,
}

/// A 429 from the service: the account's request budget is spent.
fn rate_limited(body: &[u8]) -> Result<u64, ServiceError> {
    let l: Limited = object(body)?;
    if l.error != "rate_limited" {
        return Err(ServiceError::Garbage);
    }
    // At least one second; at most a day (a bigger answer is nonsense).
    Ok(l.retry_after_seconds.clamp(1, 86_400))
}

/// Hold ids go into a callout path: keep them to a safe alphabet.
fn valid_hold_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Deserialize)]
struct Held {
    hold_id: String,
    account: String,
    amount: u64,
    balance: i64,
}

/// Parses a hold answer for a hold of `amount` on `account`.
pub fn parse_hold(outcome: CallOutcome, account: &str, amount: u64) -> Result<Hold, ServiceError> {
    let (status, body) = answered(outcome)?;
    match status {
        200 | 201 => {
            let h: Held = object(&body)?;
            if !valid_hold_id(&h.hold_id) {
                return Err(ServiceError::Garbage);
            }
            if h.account != account || h.amount != amount || h.balance < 0 {
                return Err(ServiceError::Inconsistent);
            }
            Ok(Hold::Held { hold_id: h.hold_id, balance: h.balance })
        }
        402 => {
            let r: Refused = object(&body)?;
            if r.error != "insufficient_credits" || r.balance < 0 {
                return Err(ServiceError::Garbage);
            }
            Ok(Hold::Insufficient { balance: r.balance })
        }
        429 => Ok(Hold::RateLimited { retry_after: rate_limited(&body)? }),
        409 => Err(ServiceError::Inconsistent),
        other => Err(ServiceError::Status(other)),
    }
}

pub fn parse_ratelimit(outcome: CallOutcome) -> Result<RateCheck, ServiceError> {
    #[derive(Deserialize)]
    struct Allowed {
        allowed: bool,
    }
    let (status, body) = answered(outcome)?;
    match status {
        200 => {
            let a: Allowed = object(&body)?;
            if !a.allowed {
                return Err(ServiceError::Garbage);
            }
            Ok(RateCheck::Allowed)
        }
        429 => Ok(RateCheck::Limited { retry_after: rate_limited(&body)? }),
        other => Err(ServiceError::Status(other)),
    }
}

/// Parses the answer to a capture or release of `hold_id`.
pub fn parse_settlement(outcome: CallOutcome, hold_id: &str) -> Result<Settlement, ServiceError> {
    #[derive(Deserialize)]
    struct Settled {
        hold_id: String,
    }
    let (status, body) = answered(outcome)?;
    match status {
        200 => {
            let s: Settled = object(&body)?;
            if s.hold_id != hold_id {
                return Err(ServiceError::Inconsistent);
            }
            Ok(Settlement::Done)
        }
        409 => Ok(Settlement::NotOpen),
        other => Err(ServiceError::Status(other)),
    }
}

/// Parses a debit answer for a debit of `amount` from `account`.
pub fn parse_debit(outcome: CallOutcome, account: &str, amount: u64) -> Result<Debit, ServiceError> {
    let (status, body) = answered(outcome)?;
    match status {
        200 => {
            let c: Charged = object(&body)?;
            if c.account != account || c.charged != amount || c.balance < 0 {
                return Err(ServiceError::Inconsistent);
            }
            Ok(Debit::Charged { balance: c.balance })
        }
        402 => {
            let r: Refused = object(&body)?;
            if r.error != "insufficient_credits" || r.balance < 0 {
                return Err(ServiceError::Garbage);
            }
            Ok(Debit::Insufficient { balance: r.balance })
        }
        429 => Ok(Debit::RateLimited { retry_after: rate_limited(&body)? }),
        409 => Err(ServiceError::Inconsistent),
        other => Err(ServiceError::Status(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(status: u16, body: &str) -> CallOutcome {
        CallOutcome::Answered { status, body: body.as_bytes().to_vec(), truncated: false }
    }

    const RECORD: &str = r#"{"account":"did:privy:abc","key_prefix":"abc12345","kind":"api_key","scopes":["sms:send"],"state":"active","expires_at":null,"balance":10}"#;

    #[test]
    fn lookup_answers() {
        match parse_lookup(ok(200, RECORD)) {
            Ok(Lookup::Found(r)) => {
                assert_eq!(r.account, "did:privy:abc");
                assert_eq!(r.state, KeyState::Active);
                assert_eq!(r.scopes, vec!["sms:send".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_lookup(ok(404, r#"{"error":"key_not_found"}"#)), Ok(Lookup::NotFound));
        assert_eq!(parse_lookup(ok(500, "")), Err(ServiceError::Status(500)));
        assert_eq!(parse_lookup(ok(503, "no healthy upstream")), Err(ServiceError::Status(503)));
        assert_eq!(parse_lookup(ok(200, "<html>")), Err(ServiceError::Garbage));
        assert_eq!(parse_lookup(ok(200, r#"{"account":"x"}"#)), Err(ServiceError::Garbage));
        assert_eq!(parse_lookup(CallOutcome::Failed), Err(ServiceError::Unavailable));
        assert_eq!(
            parse_lookup(CallOutcome::Answered { status: 200, body: vec![], truncated: true }),
            Err(ServiceError::TooLarge)
        );
        // Header injection through the account id is refused.
        let evil = RECORD.replace("did:privy:abc", "did:privy:abc\\r\\nx-dialtone-auth-method: admin");
        assert_eq!(parse_lookup(ok(200, &evil)), Err(ServiceError::Garbage));
        let bad_state = RECORD.replace("active", "zombie");
        assert_eq!(parse_lookup(ok(200, &bad_state)), Err(ServiceError::Garbage));
    }

    #[test]
    fn debit_answers() {
        let a = "did:privy:abc";
        assert_eq!(
            parse_debit(ok(200, r#"{"account":"did:privy:abc","charged":1,"balance":9,"replayed":false}"#), a, 1),
            Ok(Debit::Charged { balance: 9 })
        );
        assert_eq!(
            parse_debit(ok(402, r#"{"error":"insufficient_credits","balance":0,"required":1}"#), a, 1),
            Ok(Debit::Insufficient { balance: 0 })
        );
        // Charged a different amount or account: not proof of payment.
        assert_eq!(
            parse_debit(ok(200, r#"{"account":"did:privy:abc","charged":2,"balance":9}"#), a, 1),
            Err(ServiceError::Inconsistent)
        );
        assert_eq!(
            parse_debit(ok(200, r#"{"account":"did:privy:other","charged":1,"balance":9}"#), a, 1),
            Err(ServiceError::Inconsistent)
        );
        assert_eq!(parse_debit(ok(409, r#"{"error":"idempotency_conflict"}"#), a, 1), Err(ServiceError::Inconsistent));
        assert_eq!(parse_debit(ok(200, "{}"), a, 1), Err(ServiceError::Garbage));
        assert_eq!(parse_debit(ok(402, "{}"), a, 1), Err(ServiceError::Garbage));
        assert_eq!(parse_debit(ok(504, ""), a, 1), Err(ServiceError::Status(504)));
        assert_eq!(
            parse_debit(ok(429, r#"{"error":"rate_limited","retry_after_seconds":3}"#), a, 1),
            Ok(Debit::RateLimited { retry_after: 3 })
        );
        assert_eq!(parse_debit(ok(429, "slow down"), a, 1), Err(ServiceError::Garbage));
    }

    #[test]
    fn answers_must_be_json_objects_in_utf8() {
        // Found by the credits_answers fuzzer: invalid UTF-8 inside a member
        // serde skips, and the array form of a struct.
        let mut body = br#"{"account":"did:privy:abc","charged":1,"balance":9,"replayed":false,"x":""#.to_vec();
        body.extend_from_slice(&[0xc5, 0xc5]);
        body.extend_from_slice(br#""}"#);
        let bad = CallOutcome::Answered { status: 200, body, truncated: false };
        assert_eq!(parse_debit(bad, "did:privy:abc", 1), Err(ServiceError::Garbage));
        assert_eq!(parse_debit(ok(200, r#"["did:privy:abc",1,9]"#), "did:privy:abc", 1), Err(ServiceError::Garbage));
        assert_eq!(parse_lookup(ok(200, &format!("[{RECORD}]"))), Err(ServiceError::Garbage));
    }

    #[test]
    fn transport_failures_are_told_from_answers() {
        assert!(is_transport_failure(&CallOutcome::Failed));
        assert!(is_transport_failure(&ok(503, "upstream connect error or disconnect/reset before headers")));
        assert!(is_transport_failure(&ok(504, "upstream request timeout")));
        assert!(!is_transport_failure(&ok(503, r#"{"error":"maintenance"}"#)));
        assert!(!is_transport_failure(&ok(500, "oops")));
        assert!(!is_transport_failure(&ok(402, "{}")));
    }

    #[test]
    fn hold_and_settlement_answers() {
        let a = "did:privy:abc";
        let held = r#"{"hold_id":"hold_0123abcd","account":"did:privy:abc","amount":2,"balance":8,"expires_at":1,"replayed":false}"#;
        assert_eq!(parse_hold(ok(200, held), a, 2), Ok(Hold::Held { hold_id: "hold_0123abcd".into(), balance: 8 }));
        assert_eq!(parse_hold(ok(200, held), a, 3), Err(ServiceError::Inconsistent));
        let evil = held.replace("hold_0123abcd", "../../v1/debit");
        assert_eq!(parse_hold(ok(200, &evil), a, 2), Err(ServiceError::Garbage));
        assert_eq!(
            parse_hold(ok(402, r#"{"error":"insufficient_credits","balance":1,"required":2}"#), a, 2),
            Ok(Hold::Insufficient { balance: 1 })
        );
        assert_eq!(
            parse_hold(ok(429, r#"{"error":"rate_limited","retry_after_seconds":0}"#), a, 2),
            Ok(Hold::RateLimited { retry_after: 1 })
        );
        assert_eq!(parse_hold(CallOutcome::Failed, a, 2), Err(ServiceError::Unavailable));
        assert_eq!(parse_settlement(ok(200, r#"{"hold_id":"h1","state":"captured"}"#), "h1"), Ok(Settlement::Done));
        assert_eq!(parse_settlement(ok(409, r#"{"error":"hold_not_open"}"#), "h1"), Ok(Settlement::NotOpen));
        assert_eq!(parse_settlement(ok(200, r#"{"hold_id":"h2"}"#), "h1"), Err(ServiceError::Inconsistent));
        assert_eq!(parse_ratelimit(ok(200, r#"{"allowed":true,"remaining":3}"#)), Ok(RateCheck::Allowed));
        assert_eq!(
            parse_ratelimit(ok(429, r#"{"error":"rate_limited","retry_after_seconds":7}"#)),
            Ok(RateCheck::Limited { retry_after: 7 })
        );
        assert_eq!(parse_ratelimit(ok(200, r#"{"allowed":false}"#)), Err(ServiceError::Garbage));
    }

    #[test]
    fn the_service_key_is_optional_but_not_weak() {
        assert_eq!(service_key_from_env(None), Ok(None));
        assert_eq!(service_key_from_env(Some("")), Ok(None));
        assert_eq!(service_key_from_env(Some("short")), Err(ServiceKeyError::TooShort));
        let ok = "k".repeat(MIN_SERVICE_KEY_LEN);
        assert_eq!(service_key_from_env(Some(&ok)), Ok(Some(ok.clone())));
        assert_eq!(service_key_from_env(Some(&format!("{ok}\r\nx-evil: 1"))), Err(ServiceKeyError::NotHeaderSafe));
        assert!(!ServiceKeyError::TooShort.to_string().contains(&ok), "the message never carries a key");
    }

    #[test]
    fn claim_answers() {
        let c = "ab".repeat(32);
        let ans = |status: u16, body: &str| CallOutcome::Answered { status, body: body.as_bytes().to_vec(), truncated: false };
        assert_eq!(parse_claim(ans(201, &format!(r#"{{"claim":"{c}","claimed":true}}"#)), &c), Ok(Claim::Claimed));
        assert_eq!(parse_claim(ans(200, &format!(r#"{{"claim":"{c}","claimed":true}}"#)), &c), Ok(Claim::Claimed));
        assert_eq!(parse_claim(ans(409, &format!(r#"{{"claim":"{c}","error":"claim_in_use"}}"#)), &c), Ok(Claim::InUse));
        assert_eq!(parse_claim(ans(201, r#"{"claim":"other","claimed":true}"#), &c), Err(ServiceError::Inconsistent));
        assert_eq!(parse_claim(ans(201, &format!(r#"{{"claim":"{c}","claimed":false}}"#)), &c), Err(ServiceError::Garbage));
        assert_eq!(parse_claim(ans(500, "{}"), &c), Err(ServiceError::Status(500)));
        assert_eq!(parse_claim(CallOutcome::Failed, &c), Err(ServiceError::Unavailable));
    }
}
