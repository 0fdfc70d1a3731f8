//! Holds: reserving credits, capturing or releasing them, and expiring the
//! ones whose time is up.

use super::ledger::{apply, Entry, Kind};
use super::limits::rate_take;
use super::{lock_account, lock_and_expire};
use crate::db::Sql;
use crate::keys;
use crate::store::{
    decode_hold_state, validate_charge, AccountSummary, HoldOutcome, HoldReceipt, HoldRequest,
    HoldState, RateDecision, RateLimit, ReleaseReason, Result, SettleOutcome, SettledHold,
    StoreError, HOLD_TTL_SECONDS, MAX_TEXT_CHARS,
};
use crate::vals;

/// Release every open hold of `account` whose time is up (`expires_at <=
/// now`). The caller holds the account's lock and passes its state.
pub(super) async fn expire_account_holds<S: Sql>(
    tx: &mut S,
    account: &str,
    mut cur: AccountSummary,
    now: i64,
) -> Result<(AccountSummary, usize)> {
    let due = tx
        .rows(
            "SELECT id, amount, idempotency_key, route, key_prefix FROM holds \
             WHERE account = $1 AND state = 'open' AND expires_at <= $2 ORDER BY expires_at, id",
            &vals![account, now],
        )
        .await?;
    let released = due.len();
    for r in due {
        let (id, amount) = (r.text(0)?, r.i64(1)?);
        let (key, route, prefix) = (r.opt_text(2)?, r.opt_text(3)?, r.opt_text(4)?);
        tx.exec(
            "UPDATE holds SET state = 'released', release_reason = 'expired', settled_at = $2 \
             WHERE id = $1 AND state = 'open'",
            &vals![&id, now],
        )
        .await?;
        cur = apply(
            tx,
            cur,
            &Entry {
                hold_id: Some(&id),
                idempotency_key: key.as_deref(),
                route: route.as_deref(),
                key_prefix: prefix.as_deref(),
                note: Some("hold expired"),
                ..Entry::new(account, Kind::Release, amount, now)
            },
        )
        .await?;
    }
    Ok((cur, released))
}

fn random_hold_id() -> Result<String> {
    Ok(format!("hold_{}", keys::random_hex(12)?))
}

/// Reserve credits (charge on success), atomically and idempotently.
pub async fn create_hold<S: Sql>(
    tx: &mut S,
    req: &HoldRequest,
    rate: Option<&RateLimit>,
    now_ms: i64,
) -> Result<HoldOutcome> {
    validate_charge(
        &req.account,
        req.amount,
        &req.idempotency_key,
        req.route.as_deref(),
        req.key_prefix.as_deref(),
        rate,
    )?;
    if !HOLD_TTL_SECONDS.contains(&req.ttl_seconds) {
        return Err(StoreError::Invalid(format!(
            "ttl_seconds must be {}..={}",
            HOLD_TTL_SECONDS.start(),
            HOLD_TTL_SECONDS.end()
        )));
    }
    let now = now_ms.div_euclid(1000);
    let cur = lock_and_expire(tx, &req.account, now).await?;
    if let Some(prior) = tx
        .row(
            "SELECT id, account, amount, balance_after, expires_at FROM holds WHERE idempotency_key = $1",
            &vals![&req.idempotency_key],
        )
        .await?
    {
        let (account, amount) = (prior.text(1)?, prior.i64(2)?);
        if account != req.account || amount != req.amount {
            return Ok(HoldOutcome::Conflict);
        }
        return Ok(HoldOutcome::Held(HoldReceipt {
            hold_id: prior.text(0)?,
            account,
            amount,
            balance: prior.i64(3)?,
            expires_at: prior.i64(4)?,
            replayed: true,
        }));
    }
    if let Some(rl) = rate {
        if let RateDecision::Limited {
            retry_after_seconds,
        } = rate_take(tx, &req.account, rl, now_ms).await?
        {
            return Ok(HoldOutcome::RateLimited {
                retry_after_seconds,
            });
        }
    }
    let balance = cur.map_or(0, |c| c.balance);
    let Some(cur) = cur.filter(|c| c.balance >= req.amount) else {
        if cur.is_some() {
            super::leases::recall_leases(tx, &req.account).await?;
        }
        return Ok(HoldOutcome::Insufficient {
            balance,
            required: req.amount,
        });
    };
    let hold_id = random_hold_id()?;
    let expires_at = now.saturating_add(req.ttl_seconds);
    let balance_after = balance - req.amount;
    tx.exec(
        "INSERT INTO holds (id, account, amount, state, idempotency_key, balance_after, route, \
         key_prefix, created_at, expires_at) VALUES ($1, $2, $3, 'open', $4, $5, $6, $7, $8, $9)",
        &vals![
            &hold_id,
            &req.account,
            req.amount,
            &req.idempotency_key,
            balance_after,
            &req.route,
            &req.key_prefix,
            now,
            expires_at
        ],
    )
    .await?;
    apply(
        tx,
        cur,
        &Entry {
            hold_id: Some(&hold_id),
            idempotency_key: Some(&req.idempotency_key),
            route: req.route.as_deref(),
            key_prefix: req.key_prefix.as_deref(),
            ..Entry::new(&req.account, Kind::Hold, req.amount, now)
        },
    )
    .await?;
    Ok(HoldOutcome::Held(HoldReceipt {
        hold_id,
        account: req.account.clone(),
        amount: req.amount,
        balance: balance_after,
        expires_at,
        replayed: false,
    }))
}

job!(
    /// [`create_hold`].
    CreateHold { req: HoldRequest, rate: Option<RateLimit>, now_ms: i64 } -> HoldOutcome,
    batch_by |j| crate::rules::BatchKey::Account(&j.req.account),
    |j, tx| create_hold(tx, &j.req, j.rate.as_ref(), j.now_ms).await
);

/// Capture (`release == None`) or release a hold. Idempotent; a hold settled
/// the other way (or expired) is [`SettleOutcome::NotOpen`].
pub async fn settle<S: Sql>(
    tx: &mut S,
    hold_id: &str,
    release: Option<ReleaseReason>,
    now: i64,
) -> Result<SettleOutcome> {
    if hold_id.is_empty() || hold_id.chars().count() > MAX_TEXT_CHARS {
        return Ok(SettleOutcome::NotFound);
    }
    let Some(h) = tx
        .row("SELECT account FROM holds WHERE id = $1", &vals![hold_id])
        .await?
    else {
        return Ok(SettleOutcome::NotFound);
    };
    let account = h.text(0)?;
    // Expire first: an expired hold is released, never captured.
    let cur = lock_and_expire(tx, &account, now)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("hold {hold_id} has no account")))?;
    let h = tx
        .row(
            "SELECT amount, state, release_reason, idempotency_key, route, key_prefix \
             FROM holds WHERE id = $1",
            &vals![hold_id],
        )
        .await?
        .ok_or_else(|| StoreError::Corrupt("hold vanished".into()))?;
    let amount = h.i64(0)?;
    let state = decode_hold_state(&h.text(1)?)?;
    let stored_reason = h.opt_text(2)?.as_deref().and_then(ReleaseReason::parse);
    let (key, route, prefix) = (h.opt_text(3)?, h.opt_text(4)?, h.opt_text(5)?);
    let wanted = if release.is_some() {
        HoldState::Released
    } else {
        HoldState::Captured
    };
    let settled = |state, cur: AccountSummary, reason| {
        SettleOutcome::Settled(SettledHold {
            hold_id: hold_id.to_string(),
            state,
            account: account.clone(),
            amount,
            balance: cur.balance,
            held: cur.held,
            release_reason: reason,
        })
    };
    if state == wanted {
        return Ok(settled(state, cur, stored_reason));
    }
    if state != HoldState::Open {
        return Ok(SettleOutcome::NotOpen { state });
    }
    let (kind, reason) = match release {
        Some(r) => {
            tx.exec(
                "UPDATE holds SET state = 'released', release_reason = $2, settled_at = $3 \
                 WHERE id = $1 AND state = 'open'",
                &vals![hold_id, r.as_str(), now],
            )
            .await?;
            (Kind::Release, Some(r))
        }
        None => {
            tx.exec(
                "UPDATE holds SET state = 'captured', settled_at = $2 WHERE id = $1 AND state = 'open'",
                &vals![hold_id, now],
            )
            .await?;
            (Kind::Capture, None)
        }
    };
    let after = apply(
        tx,
        cur,
        &Entry {
            hold_id: Some(hold_id),
            idempotency_key: key.as_deref(),
            route: route.as_deref(),
            key_prefix: prefix.as_deref(),
            note: reason.map(ReleaseReason::as_str),
            ..Entry::new(&account, kind, amount, now)
        },
    )
    .await?;
    Ok(settled(wanted, after, reason))
}

job!(
    /// [`settle`]: capture (`release: None`) or release.
    Settle { hold_id: String, release: Option<ReleaseReason>, now: i64 } -> SettleOutcome,
    batch_by |j| crate::rules::BatchKey::Hold(&j.hold_id),
    |j, tx| settle(tx, &j.hold_id, j.release, j.now).await
);

/// Accounts with an open hold past its expiry (the sweeper's work list).
pub async fn due_accounts<S: Sql>(tx: &mut S, now: i64) -> Result<Vec<String>> {
    tx.rows(
        "SELECT DISTINCT account FROM holds WHERE state = 'open' AND expires_at <= $1 ORDER BY account",
        &vals![now],
    )
    .await?
    .iter()
    .map(|r| r.text(0))
    .collect()
}

job!(
    /// [`due_accounts`] (read).
    DueAccounts { now: i64 } -> Vec<String>,
    |j, tx| due_accounts(tx, j.now).await
);

/// Release the account's holds past their expiry; returns how many.
pub async fn expire_account<S: Sql>(tx: &mut S, account: &str, now: i64) -> Result<usize> {
    match lock_account(tx, account).await? {
        None => Ok(0),
        Some(cur) => Ok(expire_account_holds(tx, account, cur, now).await?.1),
    }
}

job!(
    /// [`expire_account`].
    ExpireAccount { account: String, now: i64 } -> usize,
    |j, tx| expire_account(tx, &j.account, j.now).await
);

job!(
    /// Every due account's holds and leases in one transaction (the operator API's sweep).
    ExpireAll { now: i64 } -> usize,
    |j, tx| {
        let mut released = 0;
        for account in due_accounts(tx, j.now).await? {
            released += expire_account(tx, &account, j.now).await?;
        }
        for account in super::leases::due_lease_accounts(tx, j.now).await? {
            if let Some(cur) = lock_account(tx, &account).await? {
                released += super::leases::expire_account_leases(tx, &account, cur, j.now).await?.1;
            }
        }
        Ok(released)
    }
);

job!(
    /// State of a hold (read).
    HoldStateOf { hold_id: String } -> Option<(HoldState, Option<ReleaseReason>)>,
    |j, tx| match tx.row("SELECT state, release_reason FROM holds WHERE id = $1", &vals![&j.hold_id]).await? {
        None => Ok(None),
        Some(r) => Ok(Some((
            decode_hold_state(&r.text(0)?)?,
            r.opt_text(1)?.as_deref().and_then(ReleaseReason::parse),
        ))),
    }
);

job!(
    /// Number of open holds (read; the `open_holds` gauge).
    OpenHolds {} -> i64,
    |_j, tx| tx.int("SELECT COUNT(*) FROM holds WHERE state = 'open'", &[]).await
);
