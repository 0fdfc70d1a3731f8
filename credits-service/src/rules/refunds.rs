//! Refunds: giving back a recorded debit or a captured hold, at most once.

use super::ledger::{apply, Entry, Kind};
use super::lock_and_expire;
use crate::db::Sql;
use crate::store::{
    decode_hold_state, validate_idempotency_key, validate_optional_text, HoldState, RefundOutcome,
    Result, StoreError,
};
use crate::vals;

/// Give back a recorded debit or a captured hold, found by its idempotency
/// key, at most once.
pub async fn refund<S: Sql>(
    tx: &mut S,
    idempotency_key: &str,
    note: Option<&str>,
    now: i64,
) -> Result<RefundOutcome> {
    validate_idempotency_key("idempotency_key", idempotency_key)?;
    validate_optional_text("note", note)?;
    let debit = tx
        .row(
            "SELECT account, amount, route, key_prefix FROM debits WHERE idempotency_key = $1",
            &vals![idempotency_key],
        )
        .await?;
    let hold = tx
        .row(
            "SELECT id, account, amount, state, route, key_prefix FROM holds WHERE idempotency_key = $1",
            &vals![idempotency_key],
        )
        .await?;
    let captured_hold = match &hold {
        Some(h) => Some((h.clone(), decode_hold_state(&h.text(3)?)?)),
        None => None,
    };
    // (account, amount, hold_id, route, key_prefix)
    let target = match (debit, captured_hold) {
        (Some(_), Some((_, HoldState::Captured))) => {
            return Err(StoreError::Invalid(format!(
                "both a debit and a captured hold use idempotency key {idempotency_key:?}; refuse to guess"
            )))
        }
        (Some(d), _) => (d.text(0)?, d.i64(1)?, None, d.opt_text(2)?, d.opt_text(3)?),
        (None, Some((h, HoldState::Captured))) => (
            h.text(1)?,
            h.i64(2)?,
            Some(h.text(0)?),
            h.opt_text(4)?,
            h.opt_text(5)?,
        ),
        (None, Some((_, state))) => return Ok(RefundOutcome::NotRefundable { state }),
        (None, None) => return Ok(RefundOutcome::NotFound),
    };
    let (account, amount, hold_id, route, prefix) = target;
    let cur = lock_and_expire(tx, &account, now)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("account {account} vanished")))?;
    let done = tx
        .int(
            "SELECT COUNT(*) FROM ledger WHERE kind = 'refund' AND idempotency_key = $1 \
             AND COALESCE(hold_id, '') = $2",
            &vals![idempotency_key, hold_id.as_deref().unwrap_or("")],
        )
        .await?;
    if done > 0 {
        return Ok(RefundOutcome::AlreadyRefunded {
            idempotency_key: idempotency_key.to_string(),
        });
    }
    let after = apply(
        tx,
        cur,
        &Entry {
            hold_id: hold_id.as_deref(),
            idempotency_key: Some(idempotency_key),
            route: route.as_deref(),
            key_prefix: prefix.as_deref(),
            note: Some(note.unwrap_or("refund")),
            ..Entry::new(&account, Kind::Refund, amount, now)
        },
    )
    .await?;
    Ok(RefundOutcome::Refunded {
        account: account.clone(),
        amount,
        balance: after.balance,
        idempotency_key: idempotency_key.to_string(),
        hold_id,
    })
}

job!(
    /// [`refund`].
    Refund { idempotency_key: String, note: Option<String>, now: i64 } -> RefundOutcome,
    |j, tx| refund(tx, &j.idempotency_key, j.note.as_deref(), j.now).await
);
