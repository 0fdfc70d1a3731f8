//! Accounts: opening one, topping it up, and reading its balance.

use super::ledger::{apply, Entry, Kind};
use super::{ensure_account, lock_account, lock_and_expire};
use crate::db::{Row, Sql};
use crate::store::{
    validate_account_id, validate_idempotency_key, validate_optional_text, AccountOutcome,
    AccountSummary, Result, StoreError, TopupReceipt,
};
use crate::vals;

/// Create an account with `initial_credits` (recorded as a top-up).
/// Idempotent: an existing account is left exactly as it is.
pub async fn create_account<S: Sql>(
    tx: &mut S,
    account: &str,
    initial_credits: i64,
    now: i64,
) -> Result<AccountOutcome> {
    validate_account_id(account)?;
    if initial_credits < 0 {
        return Err(StoreError::Invalid("credits must be >= 0".into()));
    }
    let created = ensure_account(tx, account, now).await?;
    let mut cur = lock_account(tx, account)
        .await?
        .ok_or_else(|| StoreError::Corrupt("account vanished".into()))?;
    if created && initial_credits > 0 {
        tx.exec(
            "INSERT INTO topups (account, amount, created_at, note) VALUES ($1, $2, $3, 'initial credits')",
            &vals![account, initial_credits, now],
        )
        .await?;
        cur = apply(
            tx,
            cur,
            &Entry {
                note: Some("initial credits"),
                ..Entry::new(account, Kind::Topup, initial_credits, now)
            },
        )
        .await?;
    }
    Ok(AccountOutcome {
        account: account.to_string(),
        balance: cur.balance,
        created,
    })
}

job!(
    /// [`create_account`].
    CreateAccount { account: String, initial_credits: i64, now: i64 } -> AccountOutcome,
    |j, tx| create_account(tx, &j.account, j.initial_credits, j.now).await
);

/// Credit `amount` (>= 1) to `account`, creating the account if missing;
/// with an idempotency key, at most once.
pub async fn topup<S: Sql>(
    tx: &mut S,
    account: &str,
    amount: i64,
    note: Option<&str>,
    idempotency_key: Option<&str>,
    now: i64,
) -> Result<TopupReceipt> {
    validate_account_id(account)?;
    validate_optional_text("note", note)?;
    if amount < 1 {
        return Err(StoreError::Invalid("top-up amount must be >= 1".into()));
    }
    if let Some(k) = idempotency_key {
        validate_idempotency_key("idempotency key", k)?;
    }
    ensure_account(tx, account, now).await?;
    let cur = lock_and_expire(tx, account, now)
        .await?
        .ok_or_else(|| StoreError::Corrupt("account vanished".into()))?;
    if let Some(k) = idempotency_key {
        if let Some(prior) = tx
            .row(
                "SELECT account, amount FROM topups WHERE idempotency_key = $1",
                &vals![k],
            )
            .await?
        {
            if prior.text(0)? != account || prior.i64(1)? != amount {
                return Err(StoreError::IdempotencyConflict(k.to_string()));
            }
            return Ok(TopupReceipt {
                account: account.to_string(),
                amount,
                balance: cur.balance,
                replayed: true,
            });
        }
    }
    if cur.balance.checked_add(amount).is_none() {
        return Err(StoreError::Invalid(
            "top-up would overflow the balance".into(),
        ));
    }
    tx.exec(
        "INSERT INTO topups (account, amount, created_at, note, idempotency_key) VALUES ($1, $2, $3, $4, $5)",
        &vals![account, amount, now, note, idempotency_key],
    )
    .await?;
    let after = apply(
        tx,
        cur,
        &Entry {
            idempotency_key,
            note,
            ..Entry::new(account, Kind::Topup, amount, now)
        },
    )
    .await?;
    Ok(TopupReceipt {
        account: account.to_string(),
        amount,
        balance: after.balance,
        replayed: false,
    })
}

job!(
    /// [`topup`].
    Topup { account: String, amount: i64, note: Option<String>, idempotency_key: Option<String>, now: i64 } -> TopupReceipt,
    |j, tx| topup(tx, &j.account, j.amount, j.note.as_deref(), j.idempotency_key.as_deref(), j.now).await
);

/// Available balance and held credits as they are once every hold past its
/// expiry is released (which the next write on the account, or the sweeper,
/// records): a read, so lookups never wait for the writer.
pub async fn account_view<S: Sql>(
    tx: &mut S,
    account: &str,
    now: i64,
) -> Result<Option<AccountSummary>> {
    let Some(r) = tx
        .row(
            "SELECT a.balance, a.held, CAST(COALESCE((SELECT SUM(h.amount) FROM holds h \
             WHERE h.account = a.id AND h.state = 'open' AND h.expires_at <= $2), 0) AS BIGINT) \
             FROM accounts a WHERE a.id = $1",
            &vals![account, now],
        )
        .await?
    else {
        return Ok(None);
    };
    let (balance, held, due) = (r.i64(0)?, r.i64(1)?, r.i64(2)?);
    Ok(Some(AccountSummary {
        balance: balance.saturating_add(due),
        held: held.saturating_sub(due),
    }))
}

job!(
    /// [`account_view`] (read).
    AccountView { account: String, now: i64 } -> Option<AccountSummary>,
    |j, tx| account_view(tx, &j.account, j.now).await
);

fn one_i64(row: Option<Row>) -> Result<Option<i64>> {
    row.map(|r| r.i64(0)).transpose()
}

job!(
    /// The stored available balance (read).
    Balance { account: String } -> Option<i64>,
    |j, tx| one_i64(tx.row("SELECT balance FROM accounts WHERE id = $1", &vals![&j.account]).await?)
);
