//! Credit leases: a hold of N credits that one Envoy (one wasm VM) spends
//! locally, with no callout per paid request, and reports in batches.
//!
//! - **Grant** ([`grant_lease`]): only while the account's available credits
//!   are at least `min_balance_factor × N`, and never while one of its leases
//!   is being recalled. The grant is a `lease` ledger row (N moves from
//!   available to held). Idempotent by the request's key.
//! - **Report** ([`report_lease`]): each spend becomes its own
//!   `lease_spend` ledger row (idempotency key, route, key prefix), so the
//!   ledger shows every charged request; a spend already recorded is a
//!   replay and records nothing; a lease never pays out more than N. A
//!   `final` report closes the lease and gives the rest back
//!   (`lease_return`).
//! - **Recall**: when a per-request hold or debit of the account is refused
//!   for want of credits while a lease holds some, the lease is flagged and
//!   its holder's next report answer says `recall`: it stops spending and
//!   gives the rest back.
//! - **Expiry**: a lease open past `expires_at` is closed by the sweeper (or
//!   the account's next grant) and its rest given back. Spends reported
//!   after that are refused (never charged against credits the account has
//!   back): that is the bounded loss when an Envoy dies.

use std::collections::{HashMap, HashSet};

use super::ledger::{apply, apply_all, Entry, Kind};
use super::{lock_account, lock_and_expire};
use crate::db::{Sql, Val};
use crate::keys;
use crate::store::{
    validate_account_id, validate_idempotency_key, validate_optional_text, AccountSummary, Result,
    StoreError,
};
use crate::vals;

/// Bounds of a lease request.
pub const LEASE_CREDITS: std::ops::RangeInclusive<i64> = 1..=1_000_000;
pub const LEASE_TTL_SECONDS: std::ops::RangeInclusive<i64> = 1..=3600;
pub const LEASE_FACTOR: std::ops::RangeInclusive<i64> = 1..=1000;
/// Spends in one report.
pub const MAX_SPENDS_PER_REPORT: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    pub account: String,
    pub credits: i64,
    pub ttl_seconds: i64,
    pub min_balance_factor: i64,
    pub idempotency_key: String,
    /// Who holds it (an Envoy/VM name, for operators), optional.
    pub holder: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseReceipt {
    pub lease_id: String,
    pub account: String,
    pub credits: i64,
    /// Available credits after the grant.
    pub balance: i64,
    pub expires_at: i64,
    pub open: bool,
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    Granted(LeaseReceipt),
    /// Not now: available credits below `needed`, or a recall is under way.
    Declined { balance: i64, needed: i64, recalling: bool },
    /// The idempotency key names another lease request.
    Conflict,
}

/// One charged request spent from a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spend {
    pub idempotency_key: String,
    pub amount: i64,
    pub route: Option<String>,
    pub key_prefix: Option<String>,
}

/// Why a reported spend was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendRefusal {
    /// The lease was already closed (expired or returned).
    Closed,
    /// It would take the lease past its credits.
    OverLease,
    /// Its idempotency key is recorded with another lease or amount.
    Conflict,
}

impl SpendRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            SpendRefusal::Closed => "lease_closed",
            SpendRefusal::OverLease => "over_lease",
            SpendRefusal::Conflict => "idempotency_conflict",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportReceipt {
    pub lease_id: String,
    pub account: String,
    pub open: bool,
    pub close_reason: Option<String>,
    pub credits: i64,
    pub spent: i64,
    /// Credits given back by this report (a `final` one).
    pub returned: i64,
    /// The holder should stop spending and send a `final` report.
    pub recall: bool,
    pub expires_at: i64,
    /// Available credits of the account now.
    pub balance: i64,
    pub recorded: usize,
    pub replayed: usize,
    pub refused: Vec<(String, SpendRefusal)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportOutcome {
    Reported(ReportReceipt),
    NotFound,
}

fn random_lease_id() -> Result<String> {
    Ok(format!("lease_{}", keys::random_hex(12)?))
}

fn invalid(msg: String) -> StoreError {
    StoreError::Invalid(msg)
}

fn check_range(field: &str, v: i64, r: &std::ops::RangeInclusive<i64>) -> Result<()> {
    if r.contains(&v) {
        Ok(())
    } else {
        Err(invalid(format!("{field} must be {}..={}", r.start(), r.end())))
    }
}

impl LeaseRequest {
    pub fn validate(&self) -> Result<()> {
        validate_account_id(&self.account)?;
        check_range("credits", self.credits, &LEASE_CREDITS)?;
        check_range("ttl_seconds", self.ttl_seconds, &LEASE_TTL_SECONDS)?;
        check_range("min_balance_factor", self.min_balance_factor, &LEASE_FACTOR)?;
        validate_idempotency_key("idempotency_key", &self.idempotency_key)?;
        validate_optional_text("holder", self.holder.as_deref())
    }
}

/// Validates a report's spends (before anything is read).
pub fn validate_spends(spends: &[Spend]) -> Result<()> {
    if spends.len() > MAX_SPENDS_PER_REPORT {
        return Err(invalid(format!("at most {MAX_SPENDS_PER_REPORT} spends per report")));
    }
    for s in spends {
        if s.amount < 1 {
            return Err(invalid("spend amount must be an integer >= 1".into()));
        }
        validate_idempotency_key("idempotency_key", &s.idempotency_key)?;
        validate_optional_text("route", s.route.as_deref())?;
        validate_optional_text("key_prefix", s.key_prefix.as_deref())?;
    }
    Ok(())
}

/// Flags the account's open leases for recall (a per-request charge was
/// just refused for want of credits). Costs one statement, only on a refusal.
pub(super) async fn recall_leases<S: Sql>(tx: &mut S, account: &str) -> Result<u64> {
    tx.exec(
        "UPDATE leases SET recall = 1 WHERE account = $1 AND state = 'open' AND recall = 0",
        &vals![account],
    )
    .await
}

/// Closes the account's open leases past their expiry and gives back what
/// they did not spend. The caller holds the account's lock.
pub(super) async fn expire_account_leases<S: Sql>(
    tx: &mut S,
    account: &str,
    mut cur: AccountSummary,
    now: i64,
) -> Result<(AccountSummary, usize)> {
    let due = tx
        .rows(
            "SELECT id, credits, spent FROM leases WHERE account = $1 AND state = 'open' AND expires_at <= $2 \
             ORDER BY expires_at, id",
            &vals![account, now],
        )
        .await?;
    let n = due.len();
    for r in due {
        let (id, credits, spent) = (r.text(0)?, r.i64(1)?, r.i64(2)?);
        cur = close(tx, cur, account, &id, credits - spent, "expired", now).await?;
    }
    Ok((cur, n))
}

async fn close<S: Sql>(
    tx: &mut S,
    cur: AccountSummary,
    account: &str,
    lease_id: &str,
    rest: i64,
    reason: &str,
    now: i64,
) -> Result<AccountSummary> {
    tx.exec(
        "UPDATE leases SET state = 'closed', close_reason = $2, closed_at = $3 WHERE id = $1 AND state = 'open'",
        &vals![lease_id, reason, now],
    )
    .await?;
    if rest <= 0 {
        return Ok(cur);
    }
    let note = if reason == "expired" { "lease expired" } else { "lease returned" };
    apply(
        tx,
        cur,
        &Entry { hold_id: Some(lease_id), note: Some(note), ..Entry::new(account, Kind::LeaseReturn, rest, now) },
    )
    .await
}

/// Grants a lease of `credits` if the account can spare it (see the module).
pub async fn grant_lease<S: Sql>(tx: &mut S, req: &LeaseRequest, now: i64) -> Result<LeaseOutcome> {
    req.validate()?;
    let Some(cur) = lock_and_expire(tx, &req.account, now).await? else {
        return Ok(LeaseOutcome::Declined { balance: 0, needed: req.credits, recalling: false });
    };
    let (cur, _) = expire_account_leases(tx, &req.account, cur, now).await?;
    if let Some(prior) = tx
        .row(
            "SELECT id, account, credits, expires_at, state FROM leases WHERE idempotency_key = $1",
            &vals![&req.idempotency_key],
        )
        .await?
    {
        let (account, credits) = (prior.text(1)?, prior.i64(2)?);
        if account != req.account || credits != req.credits {
            return Ok(LeaseOutcome::Conflict);
        }
        return Ok(LeaseOutcome::Granted(LeaseReceipt {
            lease_id: prior.text(0)?,
            account,
            credits,
            balance: cur.balance,
            expires_at: prior.i64(3)?,
            open: prior.text(4)? == "open",
            replayed: true,
        }));
    }
    let needed = req
        .credits
        .checked_mul(req.min_balance_factor)
        .ok_or_else(|| invalid("credits × min_balance_factor overflows".into()))?;
    let recalling = tx
        .int(
            "SELECT COUNT(*) FROM leases WHERE account = $1 AND state = 'open' AND recall = 1",
            &vals![&req.account],
        )
        .await?
        > 0;
    if recalling || cur.balance < needed {
        return Ok(LeaseOutcome::Declined { balance: cur.balance, needed, recalling });
    }
    let lease_id = random_lease_id()?;
    let expires_at = now.saturating_add(req.ttl_seconds);
    tx.exec(
        "INSERT INTO leases (id, account, credits, spent, state, recall, idempotency_key, holder, created_at, expires_at) \
         VALUES ($1, $2, $3, 0, 'open', 0, $4, $5, $6, $7)",
        &vals![&lease_id, &req.account, req.credits, &req.idempotency_key, &req.holder, now, expires_at],
    )
    .await?;
    let after = apply(
        tx,
        cur,
        &Entry {
            hold_id: Some(&lease_id),
            idempotency_key: Some(&req.idempotency_key),
            note: req.holder.as_deref(),
            ..Entry::new(&req.account, Kind::Lease, req.credits, now)
        },
    )
    .await?;
    Ok(LeaseOutcome::Granted(LeaseReceipt {
        lease_id,
        account: req.account.clone(),
        credits: req.credits,
        balance: after.balance,
        expires_at,
        open: true,
        replayed: false,
    }))
}

job!(
    /// [`grant_lease`].
    GrantLease { req: LeaseRequest, now: i64 } -> LeaseOutcome,
    batch_by |j| crate::rules::BatchKey::Account(&j.req.account),
    |j, tx| grant_lease(tx, &j.req, j.now).await
);

/// Records a lease's spends (each once) and, when `final`, closes it.
pub async fn report_lease<S: Sql>(
    tx: &mut S,
    lease_id: &str,
    spends: &[Spend],
    final_report: bool,
    now: i64,
) -> Result<ReportOutcome> {
    validate_spends(spends)?;
    if lease_id.is_empty() || lease_id.chars().count() > crate::store::MAX_TEXT_CHARS {
        return Ok(ReportOutcome::NotFound);
    }
    let Some(l) = tx.row("SELECT account FROM leases WHERE id = $1", &vals![lease_id]).await? else {
        return Ok(ReportOutcome::NotFound);
    };
    let account = l.text(0)?;
    let cur = lock_account(tx, &account)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("lease {lease_id} has no account")))?;
    let l = tx
        .row(
            "SELECT credits, spent, state, recall, expires_at, close_reason FROM leases WHERE id = $1",
            &vals![lease_id],
        )
        .await?
        .ok_or_else(|| StoreError::Corrupt("lease vanished".into()))?;
    let (credits, mut spent) = (l.i64(0)?, l.i64(1)?);
    let mut open = l.text(2)? == "open";
    let recall = l.i64(3)? == 1;
    let expires_at = l.i64(4)?;
    let mut close_reason = l.opt_text(5)?;

    // The spends already recorded under these keys (by any lease).
    let mut stored: HashMap<String, (Option<String>, i64)> = HashMap::new();
    if !spends.is_empty() {
        let mut sql = String::from(
            "SELECT idempotency_key, hold_id, amount FROM ledger WHERE kind = 'lease_spend' AND idempotency_key IN (",
        );
        let mut keys: Vec<Val> = Vec::with_capacity(spends.len());
        for (n, s) in spends.iter().enumerate() {
            if n > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", n + 1));
            keys.push(Val::from(s.idempotency_key.as_str()));
        }
        sql.push(')');
        for row in tx.rows(&sql, &keys).await? {
            stored.insert(row.text(0)?, (row.opt_text(1)?, row.i64(2)?));
        }
    }
    let (mut replayed, mut refused) = (0, Vec::new());
    let mut seen: HashSet<&str> = HashSet::new();
    let mut entries: Vec<Entry<'_>> = Vec::new();
    for s in spends {
        if let Some((lease, amount)) = stored.get(&s.idempotency_key) {
            if lease.as_deref() == Some(lease_id) && *amount == s.amount {
                replayed += 1;
            } else {
                refused.push((s.idempotency_key.clone(), SpendRefusal::Conflict));
            }
            continue;
        }
        if !seen.insert(s.idempotency_key.as_str()) {
            // The same key twice in one report: the first is the charge.
            replayed += 1;
            continue;
        }
        if !open {
            refused.push((s.idempotency_key.clone(), SpendRefusal::Closed));
            continue;
        }
        if spent + s.amount > credits {
            refused.push((s.idempotency_key.clone(), SpendRefusal::OverLease));
            continue;
        }
        spent += s.amount;
        entries.push(Entry {
            hold_id: Some(lease_id),
            idempotency_key: Some(&s.idempotency_key),
            route: s.route.as_deref(),
            key_prefix: s.key_prefix.as_deref(),
            ..Entry::new(&account, Kind::LeaseSpend, s.amount, now)
        });
    }
    let recorded = entries.len();
    let mut cur = cur;
    if recorded > 0 {
        cur = apply_all(tx, cur, &entries).await?;
        tx.exec("UPDATE leases SET spent = $2 WHERE id = $1", &vals![lease_id, spent]).await?;
    }
    let mut returned = 0;
    if final_report && open {
        returned = credits - spent;
        cur = close(tx, cur, &account, lease_id, returned, "returned", now).await?;
        open = false;
        close_reason = Some("returned".into());
    }
    Ok(ReportOutcome::Reported(ReportReceipt {
        lease_id: lease_id.to_string(),
        account,
        open,
        close_reason,
        credits,
        spent,
        returned,
        recall: open && recall,
        expires_at,
        balance: cur.balance,
        recorded,
        replayed,
        refused,
    }))
}

job!(
    /// [`report_lease`].
    ReportLease { lease_id: String, spends: Vec<Spend>, final_report: bool, now: i64 } -> ReportOutcome,
    |j, tx| report_lease(tx, &j.lease_id, &j.spends, j.final_report, j.now).await
);

/// Accounts with an open lease past its expiry (the sweeper's work list).
pub async fn due_lease_accounts<S: Sql>(tx: &mut S, now: i64) -> Result<Vec<String>> {
    tx.rows(
        "SELECT DISTINCT account FROM leases WHERE state = 'open' AND expires_at <= $1 ORDER BY account",
        &vals![now],
    )
    .await?
    .iter()
    .map(|r| r.text(0))
    .collect()
}

job!(
    /// [`due_lease_accounts`] (read).
    DueLeaseAccounts { now: i64 } -> Vec<String>,
    |j, tx| due_lease_accounts(tx, j.now).await
);

job!(
    /// Closes the account's expired leases; returns how many.
    ExpireAccountLeases { account: String, now: i64 } -> usize,
    |j, tx| match lock_account(tx, &j.account).await? {
        None => Ok(0),
        Some(cur) => Ok(expire_account_leases(tx, &j.account, cur, j.now).await?.1),
    }
);

/// One lease as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    pub lease_id: String,
    pub credits: i64,
    pub spent: i64,
    pub open: bool,
    pub recall: bool,
    pub holder: Option<String>,
    pub expires_at: i64,
    pub close_reason: Option<String>,
}

job!(
    /// The account's open leases, oldest first (read).
    OpenLeases { account: String } -> Vec<LeaseView>,
    |j, tx| tx.rows(
        "SELECT id, credits, spent, state, recall, holder, expires_at, close_reason FROM leases \
         WHERE account = $1 AND state = 'open' ORDER BY created_at, id",
        &vals![&j.account],
    ).await?.iter().map(|r| Ok(LeaseView {
        lease_id: r.text(0)?,
        credits: r.i64(1)?,
        spent: r.i64(2)?,
        open: r.text(3)? == "open",
        recall: r.i64(4)? == 1,
        holder: r.opt_text(5)?,
        expires_at: r.i64(6)?,
        close_reason: r.opt_text(7)?,
    })).collect()
);

job!(
    /// Number of open leases (read; the `open_leases` gauge).
    OpenLeaseCount {} -> i64,
    |_j, tx| tx.int("SELECT COUNT(*) FROM leases WHERE state = 'open'", &[]).await
);
