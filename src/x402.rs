//! x402 v2 payments, enforced by the filter: the client's `PAYMENT-SIGNATURE`
//! is decoded strictly and matched against the route's **own** payment
//! requirements, then verified by an x402 facilitator before the upstream is
//! called, and settled by it after the upstream answered 2xx/3xx (or before
//! the upstream, for routes whose upstream needs the settled transaction,
//! such as a credits top-up). Pure: the glue sends the callouts this module
//! builds and hands their answers back.
//!
//! Wire format (x402 v2, as the reference `@x402/core` speaks it): headers
//! are standard base64 (with padding) of UTF-8 JSON; the facilitator takes
//! `{x402Version, paymentPayload, paymentRequirements}` on both `/verify` and
//! `/settle`, and answers HTTP 200 with `{isValid, invalidReason?, payer?}` /
//! `{success, errorReason?, transaction, network, payer?}`; its reasons are
//! opaque strings.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Map, Value};

use crate::credits_api::CallOutcome;
use crate::policy::X402Accept;
use crate::privy_jwt::is_header_safe;

/// The v2 payment header (lower case: as Envoy hands headers over).
pub const PAYMENT_SIGNATURE: &str = "payment-signature";
/// The v1 payment header: never passed unchecked, refused with a clear 402.
pub const X_PAYMENT: &str = "x-payment";
/// The settlement receipt on a paid response.
pub const PAYMENT_RESPONSE: &str = "payment-response";
/// Opaque reasons from a facilitator are cut to this many characters.
const MAX_REASON_CHARS: usize = 160;

/// Why a payment header was refused before any callout (402, with a fresh
/// `PAYMENT-REQUIRED` whose `error` says why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentError {
    /// More bytes than `x402_facilitator.max_payment_bytes`.
    TooLarge,
    /// `PAYMENT-SIGNATURE` sent more than once.
    Repeated,
    /// Not standard base64.
    Base64,
    /// Not one UTF-8 JSON object (duplicate members included).
    Json,
    /// `x402Version` is not 2.
    Version,
    /// No `accepted` requirements, or no `payload` object.
    Incomplete,
    /// `accepted` is not one of this route's requirements.
    Mismatch,
    /// Only the v1 `X-PAYMENT` header: this filter speaks x402 v2.
    V1,
    /// Another request is being served on this very payment (its copy was
    /// sent concurrently): a payment pays for one request.
    InUse,
}

impl PaymentError {
    /// The `error` of the fresh `PAYMENT-REQUIRED`.
    pub fn message(self) -> &'static str {
        match self {
            PaymentError::TooLarge => "PAYMENT-SIGNATURE is too large",
            PaymentError::Repeated => "PAYMENT-SIGNATURE must be sent once",
            PaymentError::Base64 => "PAYMENT-SIGNATURE is not base64",
            PaymentError::Json => "PAYMENT-SIGNATURE is not a JSON object",
            PaymentError::Version => "x402Version must be 2",
            PaymentError::Incomplete => "the payment has no accepted requirements or no payload",
            PaymentError::Mismatch => "the accepted requirements are not this resource's",
            PaymentError::V1 => "x402 v1 (X-PAYMENT) is not accepted: pay with PAYMENT-SIGNATURE (x402 v2)",
            PaymentError::InUse => "this payment is already paying for another request",
        }
    }

    /// A short, stable name for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            PaymentError::TooLarge => "too_large",
            PaymentError::Repeated => "repeated",
            PaymentError::Base64 => "base64",
            PaymentError::Json => "json",
            PaymentError::Version => "version",
            PaymentError::Incomplete => "incomplete",
            PaymentError::Mismatch => "mismatch",
            PaymentError::V1 => "v1",
            PaymentError::InUse => "in_use",
        }
    }
}

/// A payment that decoded and matches one of the route's requirements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    /// The client's PaymentPayload, as sent (the facilitator checks it).
    pub payload: Value,
    /// The route's own requirement that `accepted` matched: what is sent to
    /// the facilitator, never the client's copy.
    pub requirement: X402Accept,
}

/// Decodes the request's `PAYMENT-SIGNATURE` values strictly and matches the
/// payment against `accepts` (the route's requirements).
pub fn parse_payment(values: &[&[u8]], accepts: &[X402Accept], max_bytes: usize) -> Result<Payment, PaymentError> {
    let raw = match values {
        [one] => *one,
        _ => return Err(PaymentError::Repeated),
    };
    if raw.len() > max_bytes {
        return Err(PaymentError::TooLarge);
    }
    let raw = raw.trim_ascii();
    let text = std::str::from_utf8(raw).map_err(|_| PaymentError::Base64)?;
    let json = STANDARD.decode(text).map_err(|_| PaymentError::Base64)?;
    let payload = json_object(&json).ok_or(PaymentError::Json)?;
    if payload.get("x402Version").and_then(Value::as_u64) != Some(2) || !payload.get("x402Version").is_some_and(Value::is_u64) {
        return Err(PaymentError::Version);
    }
    let (Some(accepted), Some(Value::Object(_))) = (payload.get("accepted"), payload.get("payload")) else {
        return Err(PaymentError::Incomplete);
    };
    if !accepted.is_object() {
        return Err(PaymentError::Incomplete);
    }
    let requirement = accepts.iter().find(|r| matches(r, accepted)).ok_or(PaymentError::Mismatch)?.clone();
    Ok(Payment { payload, requirement })
}

/// The reference server's rule: every field but `extra` equal (the same
/// members, the same values), and the route's `extra` contained in the
/// client's.
fn matches(required: &X402Accept, accepted: &Value) -> bool {
    let Ok(Value::Object(mut ours)) = serde_json::to_value(required) else { return false };
    let Value::Object(theirs) = accepted else { return false };
    let our_extra = ours.remove("extra");
    let mut their_core = theirs.clone();
    let their_extra = their_core.remove("extra");
    if ours != their_core {
        return false;
    }
    match (our_extra, their_extra) {
        (None, _) => true,
        (Some(want), Some(have)) => contains_subset(&want, &have),
        (Some(_), None) => false,
    }
}

/// `expected` ⊆ `actual`: objects by member (recursively), anything else equal.
fn contains_subset(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => e.iter().all(|(k, v)| a.get(k).is_some_and(|av| contains_subset(v, av))),
        (e, a) => e == a,
    }
}

/// One UTF-8 JSON object with no member named twice (at any depth).
fn json_object(bytes: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(bytes).ok()?;
    let value: Value = serde_json::from_str(text).ok()?;
    (value.is_object() && !has_duplicates(text)).then_some(value)
}

/// Whether some object in `text` names a member twice (serde_json keeps the
/// last one silently; a payment read twice two ways is a forgery vector).
fn has_duplicates(text: &str) -> bool {
    struct Check;
    impl<'de> serde::de::Visitor<'de> for Check {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen: Vec<String> = Vec::new();
            while let Some(k) = map.next_key::<String>()? {
                if seen.contains(&k) {
                    return Err(serde::de::Error::custom("duplicate member"));
                }
                seen.push(k);
                map.next_value::<CheckValue>()?;
            }
            Ok(())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element::<CheckValue>()?.is_some() {}
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }
    struct CheckValue;
    impl<'de> serde::Deserialize<'de> for CheckValue {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(Check).map(|()| CheckValue)
        }
    }
    serde_json::from_str::<CheckValue>(text).is_err()
}

/// The id a payment is claimed under: the SHA-256 of its signed part (the
/// `payload` member: for the exact EVM scheme, the EIP-3009 authorization
/// and its signature), hex. Copies of one payment share it; a new payment
/// (a new nonce) does not.
pub fn claim_id(p: &Payment) -> String {
    use sha2::{Digest, Sha256};
    let signed = p.payload.get("payload").map(Value::to_string).unwrap_or_default();
    Sha256::digest(signed.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The body of both facilitator calls: the client's payload and the route's
/// own requirement.
pub fn facilitator_body(p: &Payment) -> Vec<u8> {
    json!({"x402Version": 2, "paymentPayload": p.payload, "paymentRequirements": p.requirement})
        .to_string()
        .into_bytes()
}

/// Why the facilitator could not be used: 503 `payment_unavailable` (fail
/// closed: a request is never passed, nor a response delivered, unpaid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FacilitatorError {
    /// No answer: refused, reset, timed out (Envoy's own 503/504 included).
    Unavailable,
    /// A status other than 200.
    Status(u16),
    /// Not the JSON the protocol defines.
    Garbage,
    /// Over `max_response_bytes`.
    TooLarge,
    /// The callout could not even be dispatched (unknown cluster, …).
    DispatchFailed,
}

impl FacilitatorError {
    pub fn reason(self) -> &'static str {
        match self {
            FacilitatorError::Unavailable => "unreachable",
            FacilitatorError::Status(_) => "bad_status",
            FacilitatorError::Garbage => "garbage",
            FacilitatorError::TooLarge => "too_large",
            FacilitatorError::DispatchFailed => "dispatch_failed",
        }
    }
}

/// The facilitator's verdict on a payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    Valid { payer: String },
    /// `reason`: the facilitator's `invalidReason`, opaque (cut, printable).
    Invalid { reason: String },
}

/// What a settlement came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Paid: `header` is the `PAYMENT-RESPONSE` value (base64 of the receipt).
    Settled { transaction: String, network: String, payer: Option<String>, header: String },
    /// Refused or failed on chain: 402 with this `PAYMENT-RESPONSE`.
    Failed { reason: String, header: String },
}

fn answered(outcome: CallOutcome) -> Result<Map<String, Value>, FacilitatorError> {
    match outcome {
        CallOutcome::Failed => Err(FacilitatorError::Unavailable),
        CallOutcome::Answered { truncated: true, .. } => Err(FacilitatorError::TooLarge),
        // Envoy answers a dead facilitator with its own 503/504.
        CallOutcome::Answered { status, .. } if status != 200 => Err(FacilitatorError::Status(status)),
        CallOutcome::Answered { body, .. } => match json_object(&body) {
            Some(Value::Object(m)) => Ok(m),
            _ => Err(FacilitatorError::Garbage),
        },
    }
}

/// A facilitator's reason, kept opaque but safe to echo: printable ASCII,
/// at most [`MAX_REASON_CHARS`].
fn opaque(v: Option<&Value>) -> String {
    let s: String = v.and_then(Value::as_str).unwrap_or("unspecified").chars().filter(|c| (' '..='~').contains(c)).collect();
    match s.char_indices().nth(MAX_REASON_CHARS) {
        Some((at, _)) => s[..at].to_owned(),
        None if s.is_empty() => "unspecified".to_owned(),
        None => s,
    }
}

/// An address, hash or network id that goes into a header.
fn header_value(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).filter(|s| !s.is_empty() && s.len() <= 256 && is_header_safe(s)).map(str::to_owned)
}

/// Reads a `/verify` answer.
pub fn parse_verify(outcome: CallOutcome) -> Result<Verification, FacilitatorError> {
    let m = answered(outcome)?;
    match m.get("isValid") {
        Some(Value::Bool(true)) => {
            let payer = header_value(m.get("payer")).ok_or(FacilitatorError::Garbage)?;
            Ok(Verification::Valid { payer })
        }
        Some(Value::Bool(false)) => Ok(Verification::Invalid { reason: opaque(m.get("invalidReason")) }),
        _ => Err(FacilitatorError::Garbage),
    }
}

/// Reads a `/settle` answer for a payment on `network`.
pub fn parse_settle(outcome: CallOutcome, network: &str) -> Result<Settlement, FacilitatorError> {
    let m = answered(outcome)?;
    match m.get("success") {
        Some(Value::Bool(true)) => {
            let transaction = header_value(m.get("transaction")).ok_or(FacilitatorError::Garbage)?;
            let answered_network = header_value(m.get("network")).ok_or(FacilitatorError::Garbage)?;
            if answered_network != network {
                // Settled somewhere else than the route asked: never "paid".
                return Err(FacilitatorError::Garbage);
            }
            let payer = header_value(m.get("payer"));
            // The receipt is re-written from what was checked, not echoed.
            let mut receipt = json!({"success": true, "transaction": transaction, "network": network});
            if let (Some(p), Some(obj)) = (&payer, receipt.as_object_mut()) {
                obj.insert("payer".into(), Value::String(p.clone()));
            }
            Ok(Settlement::Settled { transaction, network: network.to_owned(), payer, header: STANDARD.encode(receipt.to_string()) })
        }
        Some(Value::Bool(false)) => {
            let reason = opaque(m.get("errorReason"));
            let mut receipt = json!({"success": false, "errorReason": reason, "transaction": "", "network": network});
            if let (Some(tx), Some(obj)) = (header_value(m.get("transaction")), receipt.as_object_mut()) {
                obj.insert("transaction".into(), Value::String(tx));
            }
            Ok(Settlement::Failed { reason, header: STANDARD.encode(receipt.to_string()) })
        }
        _ => Err(FacilitatorError::Garbage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;

    /// The requirement of the reference samples (tests/vectors/x402).
    fn requirement() -> X402Accept {
        serde_json::from_value(json!({
            "scheme": "exact", "network": "eip155:31337", "amount": "10000",
            "asset": "0x5fbdb2315678afecb367f032d93f642f64180aa3",
            "payTo": "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC", "maxTimeoutSeconds": 60,
            "extra": {"name": "USDC", "version": "2"}
        }))
        .unwrap()
    }

    fn payload(accepted: Value) -> Value {
        json!({
            "x402Version": 2,
            "payload": {"authorization": {"from": "0x7099", "value": "10000"}, "signature": "0xbd14"},
            "resource": {"url": "http://127.0.0.1:10000/api/premium"},
            "accepted": accepted
        })
    }

    fn header(v: &Value) -> Vec<u8> {
        STANDARD.encode(v.to_string()).into_bytes()
    }

    fn accepted() -> Value {
        serde_json::to_value(requirement()).unwrap()
    }

    #[test]
    fn a_matching_payment_is_taken_with_the_routes_own_requirement() {
        let reqs = [requirement()];
        let p = parse_payment(&[&header(&payload(accepted()))], &reqs, 8192).unwrap();
        assert_eq!(p.requirement, requirement());
        let body: Value = serde_json::from_slice(&facilitator_body(&p)).unwrap();
        assert_eq!(body["x402Version"], 2);
        assert_eq!(body["paymentRequirements"], accepted());
        assert_eq!(body["paymentPayload"], p.payload);
        // The client may carry more in `extra` (the reference allows it).
        let mut more = accepted();
        more["extra"]["note"] = json!("client-side");
        assert!(parse_payment(&[&header(&payload(more))], &reqs, 8192).is_ok());
    }

    #[test]
    fn anything_else_is_refused_before_a_callout() {
        let reqs = [requirement()];
        let good = header(&payload(accepted()));
        let with = |f: &dyn Fn(&mut Value)| {
            let mut a = accepted();
            f(&mut a);
            header(&payload(a))
        };
        let cases: Vec<(&str, Vec<u8>, PaymentError)> = vec![
            ("wrong amount", with(&|a| a["amount"] = json!("1")), PaymentError::Mismatch),
            ("wrong payTo", with(&|a| a["payTo"] = json!("0x000000000000000000000000000000000000dEaD")), PaymentError::Mismatch),
            ("wrong network", with(&|a| a["network"] = json!("eip155:8453")), PaymentError::Mismatch),
            ("wrong asset", with(&|a| a["asset"] = json!("0x036CbD53842c5426634e7929541eC2318f3dCF7e")), PaymentError::Mismatch),
            ("amount as a number", with(&|a| a["amount"] = json!(10000)), PaymentError::Mismatch),
            ("an extra core member", with(&|a| a["bonus"] = json!(1)), PaymentError::Mismatch),
            ("a missing member", with(&|a| { a.as_object_mut().unwrap().remove("maxTimeoutSeconds"); }), PaymentError::Mismatch),
            ("our extra not contained", with(&|a| a["extra"]["version"] = json!("1")), PaymentError::Mismatch),
            ("no extra", with(&|a| { a.as_object_mut().unwrap().remove("extra"); }), PaymentError::Mismatch),
            ("not base64", b"%%%".to_vec(), PaymentError::Base64),
            ("base64 of garbage", STANDARD.encode("not json").into_bytes(), PaymentError::Json),
            ("a JSON array", header(&json!([1])), PaymentError::Json),
            ("version 1", header(&{ let mut p = payload(accepted()); p["x402Version"] = json!(1); p }), PaymentError::Version),
            ("version \"2\"", header(&{ let mut p = payload(accepted()); p["x402Version"] = json!("2"); p }), PaymentError::Version),
            ("version 2.0", header(&{ let mut p = payload(accepted()); p["x402Version"] = json!(2.0); p }), PaymentError::Version),
            ("no payload", header(&{ let mut p = payload(accepted()); p.as_object_mut().unwrap().remove("payload"); p }), PaymentError::Incomplete),
            ("no accepted", header(&{ let mut p = payload(accepted()); p.as_object_mut().unwrap().remove("accepted"); p }), PaymentError::Incomplete),
        ];
        for (what, h, want) in cases {
            assert_eq!(parse_payment(&[&h], &reqs, 8192).map(|_| ()), Err(want), "{what}");
        }
        assert_eq!(parse_payment(&[&good, &good], &reqs, 8192).map(|_| ()), Err(PaymentError::Repeated));
        assert_eq!(parse_payment(&[], &reqs, 8192).map(|_| ()), Err(PaymentError::Repeated));
        assert_eq!(parse_payment(&[&good], &reqs, good.len() - 1).map(|_| ()), Err(PaymentError::TooLarge));
        // A member named twice: read one way here, another way by the facilitator.
        let text = payload(accepted()).to_string();
        let dup = text.replacen("\"x402Version\":2", "\"x402Version\":2,\"x402Version\":2", 1);
        assert_eq!(parse_payment(&[STANDARD.encode(dup).as_bytes()], &reqs, 8192).map(|_| ()), Err(PaymentError::Json));
    }

    fn answer(status: u16, body: Value) -> CallOutcome {
        CallOutcome::Answered { status, body: body.to_string().into_bytes(), truncated: false }
    }

    #[test]
    fn verify_answers() {
        let payer = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
        assert_eq!(parse_verify(answer(200, json!({"isValid": true, "payer": payer}))), Ok(Verification::Valid { payer: payer.into() }));
        assert_eq!(
            parse_verify(answer(200, json!({"isValid": false, "invalidReason": "invalid_exact_evm_nonce_already_used", "payer": payer}))),
            Ok(Verification::Invalid { reason: "invalid_exact_evm_nonce_already_used".into() })
        );
        let long = "x".repeat(1000);
        match parse_verify(answer(200, json!({"isValid": false, "invalidReason": format!("{long}\r\n")}))) {
            Ok(Verification::Invalid { reason }) => assert_eq!(reason.len(), MAX_REASON_CHARS),
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_verify(answer(200, json!({"isValid": false}))), Ok(Verification::Invalid { reason: "unspecified".into() }));
        for (what, outcome, want) in [
            ("5xx", answer(500, json!({"error": "boom"})), FacilitatorError::Status(500)),
            ("Envoy's 503", answer(503, json!({})), FacilitatorError::Status(503)),
            ("no answer", CallOutcome::Failed, FacilitatorError::Unavailable),
            ("garbage", CallOutcome::Answered { status: 200, body: b"<html>".to_vec(), truncated: false }, FacilitatorError::Garbage),
            ("isValid a string", answer(200, json!({"isValid": "true", "payer": payer})), FacilitatorError::Garbage),
            ("valid without payer", answer(200, json!({"isValid": true})), FacilitatorError::Garbage),
            ("payer with CRLF", answer(200, json!({"isValid": true, "payer": "0x1\r\nx-evil: 1"})), FacilitatorError::Garbage),
            ("too large", CallOutcome::Answered { status: 200, body: vec![], truncated: true }, FacilitatorError::TooLarge),
        ] {
            assert_eq!(parse_verify(outcome), Err(want), "{what}");
        }
    }

    #[test]
    fn settle_answers() {
        let tx = "0x5240caeb76e008a016ccfacb8faab06934f2937e25313e2923fb1ce9fd1d6009";
        let payer = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
        let ok = json!({"success": true, "transaction": tx, "network": "eip155:31337", "payer": payer});
        match parse_settle(answer(200, ok.clone()), "eip155:31337") {
            Ok(Settlement::Settled { transaction, header, payer: Some(p), .. }) => {
                assert_eq!((transaction.as_str(), p.as_str()), (tx, payer));
                let receipt: Value = serde_json::from_slice(&STANDARD.decode(header).unwrap()).unwrap();
                assert_eq!(receipt, ok, "the receipt the reference server sends");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_settle(answer(200, ok.clone()), "eip155:8453"), Err(FacilitatorError::Garbage), "another network");
        match parse_settle(answer(200, json!({"success": false, "errorReason": "insufficient_funds", "transaction": "", "network": "eip155:31337"})), "eip155:31337") {
            Ok(Settlement::Failed { reason, header }) => {
                assert_eq!(reason, "insufficient_funds");
                let receipt: Value = serde_json::from_slice(&STANDARD.decode(header).unwrap()).unwrap();
                assert_eq!(receipt["success"], false);
                assert_eq!(receipt["errorReason"], "insufficient_funds");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_settle(answer(200, json!({"success": true, "network": "eip155:31337"})), "eip155:31337"), Err(FacilitatorError::Garbage));
        assert_eq!(parse_settle(answer(502, json!({})), "eip155:31337"), Err(FacilitatorError::Status(502)));
    }
}
