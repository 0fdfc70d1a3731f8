//! Debits: charging credits in one step, atomically and idempotently.

use std::collections::HashMap;

use super::ledger::{apply, apply_all_after, Entry, Kind};
use super::limits::rate_take;
use super::lock_and_expire;
use crate::db::Sql;
use crate::store::{
    validate_charge, AccountSummary, DebitOutcome, DebitRecord, DebitRequest, RateDecision, RateLimit, Result,
    StoreError,
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
        if cur.is_some() {
            super::leases::recall_leases(tx, &req.account).await?;
        }
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

/// Several debits of one account, none rate-limited, in one transaction
/// with a fixed number of statements, whatever their number: one lock (and
/// expiry of due holds), one read of their idempotency keys, one insert of
/// the new charges, one balance update with their ledger rows. Each request
/// gets exactly the outcome [`debit`] would give it run after the ones
/// before it (a key repeated within the group is a replay of its first
/// charge; once the credits run out, the rest are refused). PostgreSQL's
/// group commit runs a batch's debits of one busy account this way: each
/// statement is a round trip inside the account's row lock.
///
/// `reqs` are `(request, now_ms)`; all must name `account`. A request that
/// fails validation gets its error and touches nothing. `Err`: a database
/// error (the caller rolls back this group's work).
pub async fn debit_many<S: Sql>(
    tx: &mut S,
    account: &str,
    reqs: &[(&DebitRequest, i64)],
) -> Result<Vec<Result<DebitOutcome>>> {
    let mut out: Vec<Result<DebitOutcome>> = reqs
        .iter()
        .map(|(r, _)| {
            validate_charge(&r.account, r.amount, &r.idempotency_key, r.route.as_deref(), r.key_prefix.as_deref(), None)
                .and_then(|()| {
                    if r.account == account {
                        Ok(DebitOutcome::Conflict) // placeholder, decided below
                    } else {
                        Err(StoreError::Invalid("a fused debit names another account".into()))
                    }
                })
        })
        .collect();
    let valid: Vec<usize> = (0..reqs.len()).filter(|&i| out.get(i).is_some_and(|o| o.is_ok())).collect();
    if valid.is_empty() {
        return Ok(out);
    }
    // Holds due by the latest request's clock are expired first: it only
    // ever frees credits for the earlier ones.
    let now = reqs.iter().map(|(_, ms)| ms.div_euclid(1000)).max().unwrap_or(0);
    let cur = lock_and_expire(tx, account, now).await?;
    // The charges already stored under these keys (any account).
    let mut sql = String::from("SELECT idempotency_key, account, amount, balance_after FROM debits WHERE idempotency_key IN (");
    let mut keys = Vec::with_capacity(valid.len());
    for (n, &i) in valid.iter().enumerate() {
        if n > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("${}", n + 1));
        if let Some((r, _)) = reqs.get(i) {
            keys.push(crate::db::Val::from(r.idempotency_key.as_str()));
        }
    }
    sql.push(')');
    let mut stored: HashMap<String, (String, i64, i64)> = HashMap::new();
    for row in tx.rows(&sql, &keys).await? {
        stored.insert(row.text(0)?, (row.text(1)?, row.i64(2)?, row.i64(3)?));
    }
    let mut balance = cur.map(|c| c.balance);
    let mut new_rows: Vec<(&DebitRequest, i64, i64)> = Vec::new(); // (request, balance_after, now)
    let mut refused_for_credits = false;
    for &i in &valid {
        let Some(&(r, now_ms)) = reqs.get(i) else { continue };
        let outcome = if let Some((acct, amount, after)) = stored.get(&r.idempotency_key) {
            if *acct != r.account || *amount != r.amount {
                DebitOutcome::Conflict
            } else {
                DebitOutcome::Charged { account: acct.clone(), charged: *amount, balance: *after, replayed: true }
            }
        } else {
            match balance {
                Some(b) if b >= r.amount => {
                    let after = b - r.amount;
                    balance = Some(after);
                    stored.insert(r.idempotency_key.clone(), (r.account.clone(), r.amount, after));
                    new_rows.push((r, after, now_ms.div_euclid(1000)));
                    DebitOutcome::Charged { account: r.account.clone(), charged: r.amount, balance: after, replayed: false }
                }
                b => {
                    refused_for_credits |= b.is_some();
                    DebitOutcome::Insufficient { balance: b.unwrap_or(0), required: r.amount }
                }
            }
        };
        if let Some(slot) = out.get_mut(i) {
            *slot = Ok(outcome);
        }
    }
    if refused_for_credits {
        super::leases::recall_leases(tx, account).await?;
    }
    let (Some(cur), false) = (cur, new_rows.is_empty()) else {
        return Ok(out);
    };
    // The debits' own rows, written with their ledger rows and the balance
    // (one round trip on PostgreSQL).
    let insert = |base: usize| {
        let mut sql = String::from(
            "INSERT INTO debits (idempotency_key, account, amount, balance_after, route, key_prefix, created_at) VALUES ",
        );
        let mut values = Vec::with_capacity(new_rows.len() * 7);
        for (n, (r, after, now)) in new_rows.iter().enumerate() {
            let b = base + n * 7;
            if n > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("(${}, ${}, ${}, ${}, ${}, ${}, ${})", b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7));
            values.extend(vals![&r.idempotency_key, &r.account, r.amount, *after, &r.route, &r.key_prefix, *now]);
        }
        (sql, values)
    };
    let entries: Vec<Entry<'_>> = new_rows
        .iter()
        .map(|(r, _, now)| Entry {
            idempotency_key: Some(&r.idempotency_key),
            route: r.route.as_deref(),
            key_prefix: r.key_prefix.as_deref(),
            ..Entry::new(&r.account, Kind::Debit, r.amount, *now)
        })
        .collect();
    apply_all_after(tx, cur, &entries, Some(&insert)).await?;
    Ok(out)
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
