//! The money rules, written once as async functions over [`Sql`] and run
//! unchanged on SQLite (rusqlite in the writer, sqlx in the readers) and
//! PostgreSQL (sqlx). Each function runs inside a transaction its caller
//! opened; see [`crate::store`] for the rules themselves.
//!
//! [`Job`] wraps one operation with its inputs so a backend can run it where
//! it belongs: a write in the SQLite group-commit writer or in a PostgreSQL
//! transaction (re-run on serialization failures), a read on a pooled reader.
//!
//! One file per money concern, each with its rules and their jobs:
//! `accounts` (opening, top-ups, balances), `debits` (one-step
//! charges), `holds` (reserve, capture, release, expiry), `refunds`,
//! `ledger` (balance changes and the consistency check), `limits` (rate
//! limiting), `keys` (API keys and tokens) and `x402_claims` (x402
//! payment claims). This file holds what they share: [`Job`], the `job!`
//! macro and the account-locking building blocks.

use crate::db::{Dialect, Sql};
use crate::store::{AccountSummary, Result};
use crate::vals;
use std::future::Future;

/// One operation on the database, with its inputs. `run` may be called more
/// than once (PostgreSQL re-runs a transaction after a serialization
/// failure), each time in a fresh transaction.
pub trait Job: Send + Sync {
    type Out: Send + 'static;
    fn run<S: Sql>(&self, tx: &mut S) -> impl Future<Output = Result<Self::Out>> + Send;

    /// The account whose row this write locks, so PostgreSQL's group commit
    /// can put it in one transaction with other writes ([`crate::pg`]).
    /// [`BatchKey::Alone`] (the default): its own transaction.
    fn batch_key(&self) -> BatchKey<'_> {
        BatchKey::Alone
    }
}

/// What a write job locks, for PostgreSQL's group commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKey<'a> {
    /// Runs in a transaction of its own.
    Alone,
    /// Locks this account's row (and touches only that account's rows).
    Account(&'a str),
    /// Locks the row of the account that owns this hold.
    Hold(&'a str),
}

/// Declare a job: a struct with public fields and its `run` body.
macro_rules! job {
    ($(#[$m:meta])* $name:ident { $($field:ident : $ty:ty),* $(,)? } -> $out:ty, batch_by |$bthis:ident| $key:expr, |$this:ident, $tx:ident| $body:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone)]
        pub struct $name { $(pub $field: $ty),* }
        impl $crate::rules::Job for $name {
            type Out = $out;
            #[allow(clippy::redundant_async_block)]
            fn run<S: $crate::db::Sql>(
                &self,
                $tx: &mut S,
            ) -> impl ::std::future::Future<Output = $crate::store::Result<$out>> + Send {
                let $this = self;
                async move { $body }
            }
            fn batch_key(&self) -> $crate::rules::BatchKey<'_> {
                let $bthis = self;
                $key
            }
        }
    };
    // No `batch_by`: the job runs in a transaction of its own.
    ($(#[$m:meta])* $name:ident { $($field:ident : $ty:ty),* $(,)? } -> $out:ty, |$this:ident, $tx:ident| $body:expr) => {
        job!(
            $(#[$m])* $name { $($field : $ty),* } -> $out,
            batch_by |_j| $crate::rules::BatchKey::Alone,
            |$this, $tx| $body
        );
    };
}

// Declared after `job!`: a `macro_rules!` macro is in scope only below its
// definition.
mod accounts;
mod debits;
mod holds;
mod keys;
mod leases;
mod ledger;
mod limits;
mod refunds;
mod x402_claims;

pub use accounts::{
    account_view, create_account, topup, AccountView, Balance, CreateAccount, Topup,
};
pub use debits::{debit, debit_many, Debit, DebitCount, DebitRecordOf};
pub use holds::{
    create_hold, due_accounts, expire_account, settle, CreateHold, DueAccounts, ExpireAccount,
    ExpireAll, HoldStateOf, OpenHolds, Settle,
};
pub use keys::{
    create_key, list_keys, lookup_key, revoke_by_prefix, revoke_prefix_of, touch_key,
    ActiveTokenCount, CreateKey, ListKeys, LookupKey, Revoke, RevokeOwn, TouchKey,
};
pub use leases::{
    grant_lease, report_lease, validate_spends, DueLeaseAccounts, ExpireAccountLeases, GrantLease, LeaseOutcome,
    LeaseReceipt, LeaseRequest, LeaseView, OpenLeaseCount, OpenLeases, ReportLease, ReportOutcome, ReportReceipt,
    Spend, SpendRefusal, LEASE_CREDITS, LEASE_FACTOR, LEASE_TTL_SECONDS, MAX_SPENDS_PER_REPORT,
};
pub use ledger::{check, Check, Ledger, LedgerBalance, LedgerPage, LedgerRowCount};
pub use limits::{rate_limit, RateTake};
pub use refunds::{refund, Refund};
pub use x402_claims::{claim_payment, release_claim, ClaimOutcome, ClaimPayment, ReleaseClaim};

// ----- building blocks run inside a transaction ---------------------------

/// Lock the account row and read it; `None` for an unknown account.
///
/// The one place the dialects differ in locking: PostgreSQL takes the row
/// lock (`FOR UPDATE`); SQLite's writer already holds the database write
/// lock from `BEGIN IMMEDIATE`.
async fn lock_account<S: Sql>(tx: &mut S, account: &str) -> Result<Option<AccountSummary>> {
    let sql = match tx.dialect() {
        Dialect::Postgres => "SELECT balance, held FROM accounts WHERE id = $1 FOR UPDATE",
        Dialect::Sqlite => "SELECT balance, held FROM accounts WHERE id = $1",
    };
    match tx.row(sql, &vals![account]).await? {
        None => Ok(None),
        Some(r) => Ok(Some(AccountSummary {
            balance: r.i64(0)?,
            held: r.i64(1)?,
        })),
    }
}

/// Create the account with nothing in it if it does not exist. Returns true
/// when it was created.
async fn ensure_account<S: Sql>(tx: &mut S, account: &str, now: i64) -> Result<bool> {
    Ok(tx
        .exec(
            "INSERT INTO accounts (id, balance, held, created_at) VALUES ($1, 0, 0, $2) \
             ON CONFLICT DO NOTHING",
            &vals![account, now],
        )
        .await?
        == 1)
}

/// Lock the account and expire its due holds: the start of every money
/// transaction on an existing account.
///
/// One round trip when no hold is due (nearly always): the lock's statement
/// also says whether one is. On PostgreSQL that `EXISTS` reads the snapshot
/// the statement started with, so a hold committed while we waited for the
/// lock is not seen by it; such a hold was created after this statement
/// began and is not due yet (holds live at least a second), and a hold it
/// does miss is only expired by the next transaction or the sweeper, never
/// charged. A `true` for a hold released meanwhile costs the second read
/// only (it finds nothing).
async fn lock_and_expire<S: Sql>(
    tx: &mut S,
    account: &str,
    now: i64,
) -> Result<Option<AccountSummary>> {
    let sql = match tx.dialect() {
        Dialect::Postgres => {
            "SELECT balance, held, EXISTS (SELECT 1 FROM holds WHERE account = $1 AND state = 'open' \
             AND expires_at <= $2) FROM accounts WHERE id = $1 FOR UPDATE"
        }
        Dialect::Sqlite => {
            "SELECT balance, held, EXISTS (SELECT 1 FROM holds WHERE account = $1 AND state = 'open' \
             AND expires_at <= $2) FROM accounts WHERE id = $1"
        }
    };
    let Some(r) = tx.row(sql, &vals![account, now]).await? else {
        return Ok(None);
    };
    let cur = AccountSummary {
        balance: r.i64(0)?,
        held: r.i64(1)?,
    };
    if r.i64(2)? == 0 {
        return Ok(Some(cur));
    }
    Ok(Some(holds::expire_account_holds(tx, account, cur, now).await?.0))
}

// ----- jobs -----------------------------------------------------------------

job!(
    /// One raw statement (operators' and tests' escape hatch; the ledger
    /// triggers still apply).
    Raw { sql: String } -> u64,
    |j, tx| tx.exec(&j.sql, &[]).await
);

job!(
    /// The database answers (read; `/readyz`).
    Ping {} -> i64,
    |_j, tx| tx.int("SELECT 1", &[]).await
);
