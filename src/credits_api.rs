//! The key/credits service contract as the filter speaks it (see
//! `docs/credits-service.openapi.yaml`): request bodies to send and strict
//! parsing of the answers. Anything unexpected is a [`ServiceError`], which
//! the filter answers with 503 (fail closed).

use serde::{Deserialize, Serialize};

use crate::bearer::KEY_PREFIX_LEN;
use crate::policy::is_scope;
use crate::privy_jwt::is_header_safe;

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
}

fn answered(outcome: CallOutcome) -> Result<(u16, Vec<u8>), ServiceError> {
    match outcome {
        CallOutcome::Failed => Err(ServiceError::Unavailable),
        CallOutcome::Answered { truncated: true, .. } => Err(ServiceError::TooLarge),
        CallOutcome::Answered { status, body, .. } => Ok((status, body)),
    }
}

/// The account id goes into an upstream header: visible ASCII, bounded.
fn valid_account(a: &str) -> bool {
    !a.is_empty() && a.len() <= 256 && is_header_safe(a)
}

pub fn parse_lookup(outcome: CallOutcome) -> Result<Lookup, ServiceError> {
    let (status, body) = answered(outcome)?;
    match status {
        200 => {
            let rec: KeyRecord = serde_json::from_slice(&body).map_err(|_| ServiceError::Garbage)?;
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

/// Parses a debit answer for a debit of `amount` from `account`.
pub fn parse_debit(outcome: CallOutcome, account: &str, amount: u64) -> Result<Debit, ServiceError> {
    let (status, body) = answered(outcome)?;
    match status {
        200 => {
            let c: Charged = serde_json::from_slice(&body).map_err(|_| ServiceError::Garbage)?;
            if c.account != account || c.charged != amount || c.balance < 0 {
                return Err(ServiceError::Inconsistent);
            }
            Ok(Debit::Charged { balance: c.balance })
        }
        402 => {
            let r: Refused = serde_json::from_slice(&body).map_err(|_| ServiceError::Garbage)?;
            if r.error != "insufficient_credits" || r.balance < 0 {
                return Err(ServiceError::Garbage);
            }
            Ok(Debit::Insufficient { balance: r.balance })
        }
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
    }
}
