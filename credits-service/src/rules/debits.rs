//! Debits: charging credits in one step, atomically and idempotently.

use super::ledger::{apply, Entry, Kind};
use super::limits::rate_take;
use super::lock_and_expire;
use crate::db::Sql;
use crate::store::{
    validate_charge, AccountSummary, DebitOutcome, DebitRecord, DebitRequest, RateDecision, RateLimit, Result,
};
use crate::vals;

/// Charge credits, atomically and idempotently, after an optional rate check.
pub async fn debit<S: Sql>(
    tx: &mut S,
    req: &DebitRequest,
    rate: Option<&RateLimit>,
    now_ms: i64,
) -> Result<DebitOutcome> {
    validate_charge(
        &req.account,
        req.amount,
        &req.idempotency_key,
        req.route.as_deref(),
        req.key_prefix.as_deref(),
        rate,
    )?;
    let now = now_ms.div_euclid(1000);
    // The lock is taken here, before the balance is read, so no other
    // connection can change it between our check and our update.
    let cur = lock_and_expire(tx, &req.account, now).await?;
    // The usual case in one round trip: no rate limit, enough credits, a
    // new key. The insert is the idempotency check (the key is the primary
    // key): when it inserts nothing, a charge with this key exists and the
    // path below replays it (or calls it a conflict) as before.
    if rate.is_none() {
        if let Some(cur) = cur.filter(|c| c.balance >= req.amount) {
            let balance_after = cur.balance - req.amount;
            if insert_debit(tx, req, balance_after, now, true).await? == 1 {
                return charged(tx, req, cur, balance_after, now).await;
            }
        }
    }
    if let Some(prior) = tx
        .row(
            "SELECT account, amount, balance_after FROM debits WHERE idempotency_key = $1",
            &vals![&req.idempotency_key],
        )
        .await?
    {
        let (account, amount) = (prior.text(0)?, prior.i64(1)?);
        // A retry must describe the same charge; anything else is a client
        // bug that must not be silently "replayed".
        if account != req.account || amount != req.amount {
            return Ok(DebitOutcome::Conflict);
        }
        return Ok(DebitOutcome::Charged {
            account,
            charged: amount,
            balance: prior.i64(2)?,
            replayed: true,
        });
    }
    if let Some(rl) = rate {
        if let RateDecision::Limited {
            retry_after_seconds,
        } = rate_take(tx, &req.account, rl, now_ms).await?
        {
            return Ok(DebitOutcome::RateLimited {
                retry_after_seconds,
            });
        }
    }
    let balance = cur.map_or(0, |c| c.balance);
    let Some(cur) = cur.filter(|c| c.balance >= req.amount) else {
        return Ok(DebitOutcome::Insufficient {
            balance,
            required: req.amount,
        });
    };
    let balance_after = balance - req.amount;
    insert_debit(tx, req, balance_after, now, false).await?;
    charged(tx, req, cur, balance_after, now).await
}

/// The debit's own row; with `if_new`, nothing (0) when its idempotency key
/// is taken.
async fn insert_debit<S: Sql>(
    tx: &mut S,
    req: &DebitRequest,
    balance_after: i64,
    now: i64,
    if_new: bool,
) -> Result<u64> {
    let sql = if if_new {
        "INSERT INTO debits (idempotency_key, account, amount, balance_after, route, key_prefix, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (idempotency_key) DO NOTHING"
    } else {
        "INSERT INTO debits (idempotency_key, account, amount, balance_after, route, key_prefix, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)"
    };
    tx.exec(
        sql,
        &vals![
            &req.idempotency_key,
            &req.account,
            req.amount,
            balance_after,
            &req.route,
            &req.key_prefix,
            now
        ],
    )
    .await
}

/// The balance change and ledger row of a debit whose row is written.
async fn charged<S: Sql>(
    tx: &mut S,
    req: &DebitRequest,
    cur: AccountSummary,
    balance_after: i64,
    now: i64,
) -> Result<DebitOutcome> {
    apply(
        tx,
        cur,
        &Entry {
            idempotency_key: Some(&req.idempotency_key),
            route: req.route.as_deref(),
            key_prefix: req.key_prefix.as_deref(),
            ..Entry::new(&req.account, Kind::Debit, req.amount, now)
        },
    )
    .await?;
    Ok(DebitOutcome::Charged {
        account: req.account.clone(),
        charged: req.amount,
        balance: balance_after,
        replayed: false,
    })
}

job!(
    /// [`debit`].
    Debit { req: DebitRequest, rate: Option<RateLimit>, now_ms: i64 } -> DebitOutcome,
    batch_by |j| crate::rules::BatchKey::Account(&j.req.account),
    |j, tx| debit(tx, &j.req, j.rate.as_ref(), j.now_ms).await
);

job!(
    /// The stored debit of an idempotency key (read).
    DebitRecordOf { idempotency_key: String } -> Option<DebitRecord>,
    |j, tx| {
        let Some(r) = tx.row(
            "SELECT idempotency_key, account, amount, balance_after, route, key_prefix, created_at \
             FROM debits WHERE idempotency_key = $1",
            &vals![&j.idempotency_key],
        ).await? else {
            return Ok(None);
        };
        Ok(Some(DebitRecord {
            idempotency_key: r.text(0)?,
            account: r.text(1)?,
            amount: r.i64(2)?,
            balance_after: r.i64(3)?,
            route: r.opt_text(4)?,
            key_prefix: r.opt_text(5)?,
            created_at: r.i64(6)?,
        }))
    }
);

job!(
    /// Number of debits of an account (read).
    DebitCount { account: String } -> i64,
    |j, tx| tx.int("SELECT COUNT(*) FROM debits WHERE account = $1", &vals![&j.account]).await
);
