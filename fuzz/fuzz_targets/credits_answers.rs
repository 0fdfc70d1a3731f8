//! The parsers of key/credits-service answers: `parse_lookup`, `parse_debit`,
//! `parse_hold`, `parse_ratelimit`, `parse_settlement`, `is_transport_failure`.
//!
//! Input: `[flags, status lo, status hi, amount, body…]`. Flags: bit 0 the
//! body was truncated at the size cap; bit 1 the callout failed (no answer);
//! bit 2 the amount asked is `amount + 2^40`; bit 3 the account asked is
//! empty instead of `did:privy:cm123abc`. Every parser sees every input.
//!
//! Oracle: whatever a parser accepts as a success (found, charged, held,
//! allowed, settled) must be, checked independently here, an untruncated
//! answer with the contract's status, a UTF-8 JSON object (not the array
//! form serde's derive would take) naming exactly what was asked
//! (account, amount, hold id), with header-safe values where they end up in
//! upstream headers or callout paths.
#![no_main]

use dialtone::credits_api::{
    self, CallOutcome, Debit, Hold, KeyState, Lookup, RateCheck, ServiceError, Settlement,
};
use dialtone::denial::Denial;
use dialtone_fuzz::{
    answer_field, answer_json, check_denial, ACCOUNT, HOLD_ID,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let [flags, lo, hi, amount, body @ ..] = data else { return };
    let status = u16::from_le_bytes([*lo, *hi]);
    let truncated = flags & 1 != 0;
    let outcome = if flags & 2 != 0 {
        CallOutcome::Failed
    } else {
        CallOutcome::Answered { status, body: body.to_vec(), truncated }
    };
    let amount = u64::from(*amount) + if flags & 4 != 0 { 1 << 40 } else { 0 };
    let account = if flags & 8 != 0 { "" } else { ACCOUNT };
    check_all(&outcome, account, amount);
});

fn check_all(outcome: &CallOutcome, account: &str, amount: u64) {
    // Envoy's own 503/504 (not the service's JSON) or no answer at all.
    let transport = match outcome {
        CallOutcome::Failed => true,
        CallOutcome::Answered { status, body, .. } => matches!(status, 503 | 504) && body.first() != Some(&b'{'),
    };
    assert_eq!(credits_api::is_transport_failure(outcome), transport, "{outcome:?}");

    let (status, json, truncated) = match outcome {
        CallOutcome::Failed => (0, None, false),
        CallOutcome::Answered { status, body, truncated } => (*status, answer_json(body), *truncated),
    };
    let success = |what: &str| -> Value {
        assert!(!truncated, "{what} accepted from a truncated answer");
        json.clone().unwrap_or_else(|| panic!("{what} accepted from a body that is not JSON"))
    };
    let field = |v: &Value, name: &str| answer_field(v, name).cloned().unwrap_or(Value::Null);
    let check_err = |e: ServiceError| {
        assert!(!e.reason().is_empty());
        match e {
            ServiceError::Unavailable => assert!(matches!(outcome, CallOutcome::Failed)),
            ServiceError::TooLarge => assert!(truncated),
            ServiceError::Status(s) => assert_eq!(s, status),
            _ => {}
        }
        check_denial(&Denial::CreditsUnavailable(e));
    };
    let check_limited = |what: &str, retry_after: u64| {
        assert_eq!(status, 429, "{what}");
        let v = success(what);
        assert_eq!(field(&v, "error"), "rate_limited");
        assert!((1..=86_400).contains(&retry_after));
        check_denial(&Denial::RateLimited { retry_after });
    };
    let check_insufficient = |what: &str, balance: i64| {
        assert_eq!(status, 402, "{what}");
        let v = success(what);
        assert_eq!(field(&v, "error"), "insufficient_credits");
        assert_eq!(field(&v, "balance").as_i64(), Some(balance));
        assert!(balance >= 0);
        check_denial(&Denial::InsufficientCredits { credits: balance, required: amount });
    };

    match credits_api::parse_lookup(outcome.clone()) {
        Ok(Lookup::Found(rec)) => {
            assert_eq!(status, 200);
            let v = success("lookup");
            let f = |n: &str| field(&v, n);
            assert_eq!(f("account").as_str(), Some(rec.account.as_str()));
            assert_eq!(f("key_prefix").as_str(), Some(rec.key_prefix.as_str()));
            assert_eq!(f("balance").as_i64(), Some(rec.balance));
            let state = match rec.state {
                KeyState::Active => "active",
                KeyState::Revoked => "revoked",
                KeyState::Expired => "expired",
            };
            assert_eq!(f("state").as_str(), Some(state));
            // These end up in upstream headers.
            let visible = |s: &str| s.bytes().all(|b| (0x21..=0x7e).contains(&b));
            assert!(!rec.account.is_empty() && rec.account.len() <= 256 && visible(&rec.account), "{rec:?}");
            assert!(rec.key_prefix.len() == 8 && visible(&rec.key_prefix), "{rec:?}");
            assert!(rec.scopes.len() <= 256 && rec.scopes.iter().all(|s| dialtone::policy::is_scope(s)), "{rec:?}");
        }
        Ok(Lookup::NotFound) => assert!(status == 404 && !truncated),
        Err(e) => check_err(e),
    }

    match credits_api::parse_debit(outcome.clone(), account, amount) {
        Ok(Debit::Charged { balance }) => {
            assert_eq!(status, 200);
            let v = success("debit");
            assert_eq!(field(&v, "account").as_str(), Some(account), "charged another account");
            assert_eq!(field(&v, "charged").as_u64(), Some(amount), "charged another amount");
            assert_eq!(field(&v, "balance").as_i64(), Some(balance));
            assert!(balance >= 0);
        }
        Ok(Debit::Insufficient { balance }) => check_insufficient("debit refusal", balance),
        Ok(Debit::RateLimited { retry_after }) => check_limited("debit", retry_after),
        Err(e) => check_err(e),
    }

    match credits_api::parse_hold(outcome.clone(), account, amount) {
        Ok(Hold::Held { hold_id, balance }) => {
            assert!(status == 200 || status == 201, "{status}");
            let v = success("hold");
            assert_eq!(field(&v, "hold_id").as_str(), Some(hold_id.as_str()));
            assert_eq!(field(&v, "account").as_str(), Some(account), "held on another account");
            assert_eq!(field(&v, "amount").as_u64(), Some(amount), "held another amount");
            assert_eq!(field(&v, "balance").as_i64(), Some(balance));
            assert!(balance >= 0);
            // The hold id goes into the capture/release callout path.
            assert!(
                !hold_id.is_empty()
                    && hold_id.len() <= 64
                    && hold_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "{hold_id:?}"
            );
        }
        Ok(Hold::Insufficient { balance }) => check_insufficient("hold refusal", balance),
        Ok(Hold::RateLimited { retry_after }) => check_limited("hold", retry_after),
        Err(e) => check_err(e),
    }

    match credits_api::parse_ratelimit(outcome.clone()) {
        Ok(RateCheck::Allowed) => {
            assert_eq!(status, 200);
            let v = success("rate check");
            assert_eq!(field(&v, "allowed"), Value::Bool(true));
        }
        Ok(RateCheck::Limited { retry_after }) => check_limited("rate check", retry_after),
        Err(e) => check_err(e),
    }

    match credits_api::parse_settlement(outcome.clone(), HOLD_ID) {
        Ok(Settlement::Done) => {
            assert_eq!(status, 200);
            let v = success("settlement");
            assert_eq!(field(&v, "hold_id").as_str(), Some(HOLD_ID), "settled another hold");
        }
        Ok(Settlement::NotOpen) => assert!(status == 409 && !truncated),
        Err(e) => check_err(e),
    }
}
