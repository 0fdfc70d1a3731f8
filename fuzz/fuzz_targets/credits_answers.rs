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
//! answer with the contract's status, a UTF-8 JSON object by RFC 8259's
//! grammar (not the array form serde's derive would take; see
//! `dialtone_fuzz::answer_json` for valid JSON that serde_json's `Value`
//! cannot hold) naming exactly what was asked (account, amount, hold id),
//! with header-safe values where they end up in upstream headers or callout
//! paths. The oracle's own JSON grammar check is held to serde_json's
//! skipper (`IgnoredAny`) on every body.
//!
//! The other way: from the same input, answers that keep the contract
//! (`docs/credits-service.openapi.yaml`: every status and shape, the
//! documented optional members, any member order, whitespace and string
//! escapes) are built, and each parser must take each of them, with the
//! values it holds.
#![no_main]

use dialtone::credits_api::{
    self, CallOutcome, Debit, Hold, KeyRecord, KeyState, Lookup, RateCheck, ServiceError, Settlement,
};
use dialtone::denial::Denial;
use dialtone_fuzz::{
    answer_field, answer_json, check_denial, is_json_text, Choices, ACCOUNT, ALNUM, HOLD_ID, LOWER_HEX, VISIBLE,
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
    // The oracle's grammar check agrees with serde_json's skipper, which
    // checks the grammar but not the UTF-8 of what it skips.
    let skipped = std::str::from_utf8(body).is_ok() && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
    assert_eq!(is_json_text(body), skipped, "JSON grammar check and serde_json disagree on {:?}", String::from_utf8_lossy(body));
    check_all(&outcome, account, amount);
    contract_answers_are_taken(&mut Choices::new(data));
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

fn answered(status: u16, body: &str) -> CallOutcome {
    CallOutcome::Answered { status, body: body.as_bytes().to_vec(), truncated: false }
}

/// Answers built from `c` that keep the contract are taken, with their values.
fn contract_answers_are_taken(c: &mut Choices) {
    // What the filter asked: an account (visible ASCII, at most 256 bytes:
    // what the filter sends), an amount (at least 1), a hold id.
    let account = if c.bool() { format!("did:privy:{}", c.text(ALNUM, 1, 40)) } else { c.text(VISIBLE, 1, 256) };
    let amount = match c.below(3) {
        0 => 1 + u64::from(c.byte()),
        1 => 1 + c.u64() % (i64::MAX as u64),
        _ => c.u64().max(1),
    };
    let balance = |c: &mut Choices| -> i64 {
        match c.below(3) {
            0 => 0,
            1 => i64::from(c.byte()),
            _ => (c.u64() >> 1) as i64,
        }
    };
    let retry = |c: &mut Choices| -> u64 {
        if c.bool() {
            1 + u64::from(c.byte())
        } else {
            c.u64().max(1)
        }
    };
    let boolean = |c: &mut Choices| c.pick(&["true", "false"]).to_owned();
    let acct = c.json_string(&account);

    // Key lookup (KeyLookup), 200; and 404.
    let key_prefix = c.text(LOWER_HEX, 8, 8);
    let kind = c.pick(&["api_key", "api_token"]);
    let scopes: Vec<String> = (0..c.below(5)).map(|_| c.text(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.-", 1, 100)).collect();
    let (state, state_name) = c.pick(&[(KeyState::Active, "active"), (KeyState::Revoked, "revoked"), (KeyState::Expired, "expired")]);
    let expires_at = c.bool().then(|| c.u64() as i64);
    let key_balance = balance(c);
    let scope_list: Vec<String> = scopes.iter().map(|s| c.json_string(s)).collect();
    let scopes_json = format!("[{}{}]", c.ws(), scope_list.join(&format!(",{}", c.ws())));
    let members = vec![
        ("account", acct.clone()),
        ("key_prefix", c.json_string(&key_prefix)),
        ("kind", c.json_string(kind)),
        ("scopes", scopes_json),
        ("state", c.json_string(state_name)),
        ("expires_at", expires_at.map_or("null".into(), |e| e.to_string())),
        ("balance", key_balance.to_string()),
    ];
    let body = c.json_object(members);
    let want = KeyRecord {
        account: account.clone(),
        key_prefix,
        kind: kind.into(),
        scopes,
        state,
        expires_at,
        balance: key_balance,
    };
    let outcome = answered(200, &body);
    assert!(!credits_api::is_transport_failure(&outcome));
    assert_eq!(credits_api::parse_lookup(outcome), Ok(Lookup::Found(want)), "{body}");
    let body = c.json_object(vec![("error", "\"key_not_found\"".into())]);
    assert_eq!(credits_api::parse_lookup(answered(404, &body)), Ok(Lookup::NotFound), "{body}");

    // Refusals shared by debits and holds: 402 (InsufficientCredits), 429 (RateLimited).
    let refused_balance = balance(c);
    let insufficient = c.json_object(vec![
        ("error", "\"insufficient_credits\"".into()),
        ("balance", refused_balance.to_string()),
        ("required", amount.to_string()),
    ]);
    let retry_after = retry(c);
    let limited = c.json_object(vec![("error", "\"rate_limited\"".into()), ("retry_after_seconds", retry_after.to_string())]);
    let clamped = retry_after.clamp(1, 86_400);

    // Debit (DebitResult).
    let debit_balance = balance(c);
    let members = vec![
        ("account", acct.clone()),
        ("charged", amount.to_string()),
        ("balance", debit_balance.to_string()),
        ("replayed", boolean(c)),
    ];
    let body = c.json_object(members);
    assert_eq!(credits_api::parse_debit(answered(200, &body), &account, amount), Ok(Debit::Charged { balance: debit_balance }), "{body}");
    assert_eq!(
        credits_api::parse_debit(answered(402, &insufficient), &account, amount),
        Ok(Debit::Insufficient { balance: refused_balance }),
        "{insufficient}"
    );
    assert_eq!(credits_api::parse_debit(answered(429, &limited), &account, amount), Ok(Debit::RateLimited { retry_after: clamped }), "{limited}");

    // Hold (HoldResult), 200 or 201.
    let hold_id = format!("hold_{}", c.text(LOWER_HEX, 24, 24));
    let hold_balance = balance(c);
    let status = c.pick(&[200, 201]);
    let members = vec![
        ("hold_id", c.json_string(&hold_id)),
        ("account", acct.clone()),
        ("amount", amount.to_string()),
        ("balance", hold_balance.to_string()),
        ("expires_at", (c.u64() as i64).to_string()),
        ("replayed", boolean(c)),
    ];
    let body = c.json_object(members);
    assert_eq!(
        credits_api::parse_hold(answered(status, &body), &account, amount),
        Ok(Hold::Held { hold_id: hold_id.clone(), balance: hold_balance }),
        "{body}"
    );
    assert_eq!(
        credits_api::parse_hold(answered(402, &insufficient), &account, amount),
        Ok(Hold::Insufficient { balance: refused_balance }),
        "{insufficient}"
    );
    assert_eq!(credits_api::parse_hold(answered(429, &limited), &account, amount), Ok(Hold::RateLimited { retry_after: clamped }), "{limited}");

    // Rate check: {allowed: true, remaining}; 429.
    let remaining = balance(c);
    let body = c.json_object(vec![("allowed", "true".into()), ("remaining", remaining.to_string())]);
    assert_eq!(credits_api::parse_ratelimit(answered(200, &body)), Ok(RateCheck::Allowed), "{body}");
    assert_eq!(credits_api::parse_ratelimit(answered(429, &limited)), Ok(RateCheck::Limited { retry_after: clamped }), "{limited}");

    // Capture/release (SettledHold); 409 (HoldNotOpen).
    let settled_state = c.pick(&["captured", "released"]);
    let mut members = vec![
        ("hold_id", c.json_string(&hold_id)),
        ("state", c.json_string(settled_state)),
        ("account", acct),
        ("amount", amount.to_string()),
        ("balance", balance(c).to_string()),
        ("held", balance(c).to_string()),
    ];
    if settled_state == "released" && c.bool() {
        let reason = c.pick(&["upstream_error", "expired", "requested"]);
        members.push(("reason", c.json_string(reason)));
    }
    let body = c.json_object(members);
    assert_eq!(credits_api::parse_settlement(answered(200, &body), &hold_id), Ok(Settlement::Done), "{body}");
    let state = c.pick(&["\"captured\"", "\"released\""]);
    let body = c.json_object(vec![("error", "\"hold_not_open\"".into()), ("state", state.into())]);
    assert_eq!(credits_api::parse_settlement(answered(409, &body), &hold_id), Ok(Settlement::NotOpen), "{body}");
}
