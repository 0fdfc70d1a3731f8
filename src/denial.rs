//! Every refusal the filter writes itself, and the one function that turns a
//! refusal into status + JSON body + headers.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use crate::bearer::{BearerError, ClassifyError};
use crate::credits_api::ServiceError;
use crate::policy::X402Offer;
use crate::privy_jwt::JwtError;
use crate::x402::{FacilitatorError, PaymentError, PAYMENT_RESPONSE};

pub const REALM: &str = "dialtone";

#[derive(Debug, Clone, PartialEq)]
pub enum Denial {
    /// 401 `unauthorized`.
    Unauthorized(AuthFailure),
    /// 403 `insufficient_scope`.
    InsufficientScope { scope: String },
    /// 402 `insufficient_credits`, the seed's exact body.
    InsufficientCredits { credits: i64, required: u64 },
    /// 402 `payment_required` with the route's x402 requirements; `refused`
    /// says why a payment that was sent was not taken.
    PaymentRequired { offer: Box<X402Offer>, resource_url: String, refused: Option<PaymentRefusal> },
    /// 402 `payment_failed`: the facilitator did not settle the payment. The
    /// reference server's answer: `PAYMENT-RESPONSE` (`success: false`) and
    /// `Cache-Control: no-store`; the upstream's response is not delivered.
    PaymentFailed { reason: String, receipt: String },
    /// 503 `payment_unavailable`: the facilitator is down, slow or answers
    /// garbage. Fail closed.
    PaymentUnavailable(FacilitatorError),
    /// 403 `route_not_allowed`: no policy route matched and `unmatched` is deny.
    RouteNotAllowed,
    /// 503 `credits_unavailable`: fail closed.
    CreditsUnavailable(ServiceError),
    /// 429 `rate_limited`: the account's shared budget is spent.
    RateLimited { retry_after: u64 },
}

/// Why a payment that was sent was refused (the fresh `PAYMENT-REQUIRED`'s `error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentRefusal {
    /// Refused here, before any callout.
    Local(PaymentError),
    /// The facilitator's `invalidReason` (opaque).
    Facilitator(String),
}

impl PaymentRefusal {
    pub fn message(&self) -> &str {
        match self {
            PaymentRefusal::Local(e) => e.message(),
            PaymentRefusal::Facilitator(reason) => reason,
        }
    }
}

/// Why a credential was refused (the 401 cases).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Header(BearerError),
    Format(ClassifyError),
    Jwt(JwtError),
    PrivyNotConfigured,
    UnknownKey,
    Revoked,
    Expired,
    /// A kind of credential the route does not take (`credentials`).
    KindNotAccepted,
}

impl AuthFailure {
    pub fn describe(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing credentials",
            AuthFailure::Header(e) => e.describe(),
            AuthFailure::Format(e) => e.describe(),
            AuthFailure::Jwt(e) => e.reason(),
            AuthFailure::PrivyNotConfigured => "Privy access tokens are not accepted here",
            AuthFailure::KindNotAccepted => "this kind of credential is not accepted on this route",
            AuthFailure::UnknownKey => "unknown API key",
            AuthFailure::Revoked => "API key revoked",
            AuthFailure::Expired => "API key expired",
        }
    }

    /// RFC 6750 §3.1 error code (none when no credentials were sent).
    fn rfc6750_error(self) -> Option<&'static str> {
        match self {
            AuthFailure::Missing => None,
            AuthFailure::Header(_) => Some("invalid_request"),
            _ => Some("invalid_token"),
        }
    }

    /// A short machine-readable reason for logs and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Header(_) => "malformed_header",
            AuthFailure::Format(_) => "unknown_format",
            AuthFailure::Jwt(JwtError::Expired) => "token_expired",
            AuthFailure::Jwt(_) => "invalid_token",
            AuthFailure::PrivyNotConfigured => "privy_not_configured",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::Revoked => "revoked",
            AuthFailure::Expired => "expired",
            AuthFailure::KindNotAccepted => "kind_not_accepted",
        }
    }
}

/// A local reply, ready for `send_http_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Reply {
    pub fn body_json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

impl Denial {
    /// The stable `error` code of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::Unauthorized(_) => "unauthorized",
            Denial::InsufficientScope { .. } => "insufficient_scope",
            Denial::InsufficientCredits { .. } => "insufficient_credits",
            Denial::PaymentRequired { .. } => "payment_required",
            Denial::PaymentFailed { .. } => "payment_failed",
            Denial::PaymentUnavailable(_) => "payment_unavailable",
            Denial::RouteNotAllowed => "route_not_allowed",
            Denial::CreditsUnavailable(_) => "credits_unavailable",
            Denial::RateLimited { .. } => "rate_limited",
        }
    }

    pub fn reply(&self) -> Reply {
        let code = self.code();
        let mut headers: Vec<(&'static str, String)> = vec![("content-type", "application/json".into())];
        let (status, body) = match self {
            Denial::Unauthorized(why) => {
                let mut www = format!("Bearer realm=\"{REALM}\"");
                if let Some(e) = why.rfc6750_error() {
                    www.push_str(&format!(", error=\"{e}\", error_description=\"{}\"", why.describe()));
                }
                headers.push(("www-authenticate", www));
                (401, json!({"success": false, "error": code, "message": why.describe()}))
            }
            Denial::InsufficientScope { scope } => {
                headers.push((
                    "www-authenticate",
                    format!("Bearer realm=\"{REALM}\", error=\"insufficient_scope\", scope=\"{scope}\""),
                ));
                (403, json!({"success": false, "error": code, "required_scope": scope}))
            }
            // serde_json is built with preserve_order: the body reads exactly
            // as the seed shows it.
            Denial::InsufficientCredits { credits, required } => (
                402,
                json!({"success": false, "error": code, "credits": credits, "required": required}),
            ),
            Denial::PaymentRequired { offer, resource_url, refused } => {
                let resource = json!({
                    "url": resource_url,
                    "description": offer.description,
                    "mimeType": offer.mime_type,
                });
                let accepts = serde_json::to_value(&offer.accepts).unwrap_or(Value::Array(vec![]));
                let why = refused.as_ref().map_or("PAYMENT-SIGNATURE header is required", PaymentRefusal::message);
                let required = json!({
                    "x402Version": 2,
                    "error": why,
                    "resource": resource,
                    "accepts": accepts,
                });
                headers.push(("payment-required", STANDARD.encode(required.to_string())));
                headers.push(("cache-control", "no-store".into()));
                let mut body = json!({
                    "success": false,
                    "error": code,
                    "x402Version": 2,
                    "resource": resource,
                    "accepts": accepts,
                });
                if let (Some(r), Some(obj)) = (refused, body.as_object_mut()) {
                    obj.insert("reason".into(), Value::String(r.message().to_owned()));
                }
                (402, body)
            }
            Denial::PaymentFailed { reason, receipt } => {
                headers.push((PAYMENT_RESPONSE, receipt.clone()));
                headers.push(("cache-control", "no-store".into()));
                (402, json!({"success": false, "error": code, "reason": reason}))
            }
            Denial::PaymentUnavailable(_) => (503, json!({"success": false, "error": code})),
            Denial::RouteNotAllowed => (403, json!({"success": false, "error": code})),
            Denial::CreditsUnavailable(_) => (503, json!({"success": false, "error": code})),
            Denial::RateLimited { retry_after } => {
                headers.push(("retry-after", retry_after.to_string()));
                (429, json!({"success": false, "error": code}))
            }
        };
        Reply { status, headers, body: body.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;

    fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
        r.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn insufficient_credits_is_the_seed_body_byte_for_byte() {
        let r = Denial::InsufficientCredits { credits: 0, required: 1 }.reply();
        assert_eq!(r.status, 402);
        assert_eq!(r.body, r#"{"success":false,"error":"insufficient_credits","credits":0,"required":1}"#);
        assert_eq!(header(&r, "content-type"), Some("application/json"));
    }

    #[test]
    fn unauthorized_has_rfc6750_challenge() {
        let r = Denial::Unauthorized(AuthFailure::Missing).reply();
        assert_eq!(r.status, 401);
        assert_eq!(header(&r, "www-authenticate"), Some("Bearer realm=\"dialtone\""));
        assert_eq!(r.body_json()["error"], "unauthorized");
        assert_eq!(r.body_json()["success"], false);
        let r = Denial::Unauthorized(AuthFailure::Jwt(JwtError::Expired)).reply();
        assert_eq!(
            header(&r, "www-authenticate"),
            Some("Bearer realm=\"dialtone\", error=\"invalid_token\", error_description=\"token expired\"")
        );
        let r = Denial::Unauthorized(AuthFailure::Header(BearerError::NotBearer)).reply();
        assert!(header(&r, "www-authenticate").unwrap().contains("error=\"invalid_request\""));
    }

    #[test]
    fn scope_and_unavailable() {
        let r = Denial::InsufficientScope { scope: "sms:send".into() }.reply();
        assert_eq!(r.status, 403);
        assert_eq!(r.body_json()["required_scope"], "sms:send");
        assert!(header(&r, "www-authenticate").unwrap().contains("insufficient_scope"));
        let r = Denial::CreditsUnavailable(ServiceError::Unavailable).reply();
        assert_eq!(r.status, 503);
        assert_eq!(r.body, r#"{"success":false,"error":"credits_unavailable"}"#);
    }

    #[test]
    fn rate_limited_has_retry_after() {
        let r = Denial::RateLimited { retry_after: 7 }.reply();
        assert_eq!(r.status, 429);
        assert_eq!(r.body, r#"{"success":false,"error":"rate_limited"}"#);
        assert_eq!(header(&r, "retry-after"), Some("7"));
    }

    #[test]
    fn payment_required_carries_x402_v2() {
        let offer = X402Offer {
            description: "one SMS".into(),
            mime_type: "application/json".into(),
            accepts: vec![crate::policy::X402Accept {
                scheme: "exact".into(),
                network: "eip155:8453".into(),
                amount: "10000".into(),
                asset: "0xA".into(),
                pay_to: "0xB".into(),
                max_timeout_seconds: 60,
                extra: None,
            }],
            settle: crate::policy::Settle::AfterResponse,
        };
        let r = Denial::PaymentRequired { offer: Box::new(offer.clone()), resource_url: "http://h/p".into(), refused: None }.reply();
        assert_eq!(r.status, 402);
        let b = r.body_json();
        assert_eq!(b["error"], "payment_required");
        assert_eq!(b["accepts"][0]["payTo"], "0xB");
        assert_eq!(b["accepts"][0]["maxTimeoutSeconds"], 60);
        let decoded: Value = serde_json::from_slice(&STANDARD.decode(header(&r, "payment-required").unwrap()).unwrap()).unwrap();
        assert_eq!(decoded["x402Version"], 2);
        assert_eq!(decoded["resource"]["url"], "http://h/p");
        assert_eq!(decoded["accepts"], b["accepts"]);
        assert_eq!(decoded["error"], "PAYMENT-SIGNATURE header is required");
        assert_eq!(header(&r, "cache-control"), Some("no-store"));
        // A refused payment: the fresh requirements say why.
        let refused = Some(PaymentRefusal::Facilitator("invalid_exact_evm_nonce_already_used".into()));
        let r = Denial::PaymentRequired { offer: Box::new(offer), resource_url: "http://h/p".into(), refused }.reply();
        let decoded: Value = serde_json::from_slice(&STANDARD.decode(header(&r, "payment-required").unwrap()).unwrap()).unwrap();
        assert_eq!(decoded["error"], "invalid_exact_evm_nonce_already_used");
        assert_eq!(r.body_json()["reason"], "invalid_exact_evm_nonce_already_used");
    }

    #[test]
    fn settlement_failure_is_the_reference_servers_answer() {
        let r = Denial::PaymentFailed { reason: "insufficient_funds".into(), receipt: "eyJzdWNjZXNzIjpmYWxzZX0=".into() }.reply();
        assert_eq!(r.status, 402);
        assert_eq!(header(&r, "payment-response"), Some("eyJzdWNjZXNzIjpmYWxzZX0="));
        assert_eq!(header(&r, "cache-control"), Some("no-store"));
        assert_eq!(r.body, r#"{"success":false,"error":"payment_failed","reason":"insufficient_funds"}"#);
        let r = Denial::PaymentUnavailable(crate::x402::FacilitatorError::Status(500)).reply();
        assert_eq!((r.status, r.body.as_str()), (503, r#"{"success":false,"error":"payment_unavailable"}"#));
    }
}
