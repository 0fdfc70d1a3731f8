//! The ledger: the kinds of balance change, applying and recording one, the
//! ledger reads, and the consistency check over accounts, holds and debits.

use crate::db::{Dialect, Sql, Val};
use crate::store::{
    ledger_from_row, AccountSummary, CheckReport, LedgerEntry, Result, StoreError, LEDGER_COLUMNS,
    MAX_LEDGER_LIMIT,
};
use crate::vals;

/// The ledger kinds and the (available, held) change each makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Topup,
    Debit,
    Refund,
    Hold,
    Capture,
    Release,
    Lease,
    LeaseSpend,
    LeaseReturn,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Topup => "topup",
            Kind::Debit => "debit",
            Kind::Refund => "refund",
            Kind::Hold => "hold",
            Kind::Capture => "capture",
            Kind::Release => "release",
            Kind::Lease => "lease",
            Kind::LeaseSpend => "lease_spend",
            Kind::LeaseReturn => "lease_return",
        }
    }

    fn deltas(self, amount: i64) -> (i64, i64) {
        match self {
            Kind::Topup | Kind::Refund => (amount, 0),
            Kind::Debit => (-amount, 0),
            Kind::Hold | Kind::Lease => (-amount, amount),
            Kind::Capture | Kind::LeaseSpend => (0, -amount),
            Kind::Release | Kind::LeaseReturn => (amount, -amount),
        }
    }
}

/// One balance change to apply and record.
pub(super) struct Entry<'a> {
    pub(super) account: &'a str,
    pub(super) kind: Kind,
    pub(super) amount: i64,
    pub(super) hold_id: Option<&'a str>,
    pub(super) idempotency_key: Option<&'a str>,
    pub(super) route: Option<&'a str>,
    pub(super) key_prefix: Option<&'a str>,
    pub(super) note: Option<&'a str>,
    pub(super) created_at: i64,
}

impl<'a> Entry<'a> {
    pub(super) fn new(account: &'a str, kind: Kind, amount: i64, created_at: i64) -> Entry<'a> {
        Entry {
            account,
            kind,
            amount,
            hold_id: None,
            idempotency_key: None,
            route: None,
            key_prefix: None,
            note: None,
            created_at,
        }
    }
}

/// Apply `e` to the account (whose current state `cur` the caller read under
/// the lock) and append its ledger row. Returns the new state.
pub(super) async fn apply<S: Sql>(
    tx: &mut S,
    cur: AccountSummary,
    e: &Entry<'_>,
) -> Result<AccountSummary> {
    let (da, dh) = e.kind.deltas(e.amount);
    let balance = cur
        .balance
        .checked_add(da)
        .ok_or_else(|| StoreError::Invalid("amount would overflow the balance".into()))?;
    let held = cur
        .held
        .checked_add(dh)
        .ok_or_else(|| StoreError::Invalid("amount would overflow the held credits".into()))?;
    if balance < 0 || held < 0 {
        // Callers check first; reaching this is a bug, never an overdraft.
        return Err(StoreError::Corrupt(format!(
            "{} of {} on {} would leave balance {balance}, held {held}",
            e.kind.as_str(),
            e.amount,
            e.account
        )));
    }
    let values = vals![
        e.account,
        balance,
        held,
        e.kind.as_str(),
        da,
        dh,
        e.amount,
        e.hold_id,
        e.idempotency_key,
        e.route,
        e.key_prefix,
        e.note,
        e.created_at
    ];
    match tx.dialect() {
        // One round trip: the account's update and its ledger row in one
        // statement (a data-modifying CTE). Paid requests on one busy
        // account run one after another under its row lock, so each round
        // trip inside that lock bounds the account's requests per second.
        Dialect::Postgres => {
            tx.exec(
                "WITH changed AS (UPDATE accounts SET balance = $2, held = $3 WHERE id = $1 RETURNING id) \
                 INSERT INTO ledger (account, kind, delta_available, delta_held, amount, hold_id, \
                 idempotency_key, route, key_prefix, note, created_at) \
                 SELECT id, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13 FROM changed",
                &values,
            )
            .await?;
        }
        // SQLite has no data-modifying CTEs; its statements are in-process.
        Dialect::Sqlite => {
            tx.exec(
                "UPDATE accounts SET balance = $2, held = $3 WHERE id = $1",
                &values[..3],
            )
            .await?;
            tx.exec(
                "INSERT INTO ledger (account, kind, delta_available, delta_held, amount, hold_id, \
                 idempotency_key, route, key_prefix, note, created_at) \
                 VALUES ($1, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                &values,
            )
            .await?;
        }
    }
    Ok(AccountSummary { balance, held })
}

/// [`apply`] for several entries of one account at once: the state after
/// all of them (each checked in turn, as `apply` checks one), one update and
/// all their ledger rows, in order. One statement on PostgreSQL, two on
/// SQLite. Used by the fused debits of a busy account
/// ([`super::debits::debit_many`]).
pub(super) async fn apply_all<S: Sql>(
    tx: &mut S,
    cur: AccountSummary,
    entries: &[Entry<'_>],
) -> Result<AccountSummary> {
    apply_all_after(tx, cur, entries, None).await
}

/// A statement to run just before [`apply_all`]'s, in the same round trip
/// on PostgreSQL: given the number of parameters before its own, its text
/// (numbering its parameters from there) and their values.
pub(super) type Before<'f> = &'f (dyn Fn(usize) -> (String, Vec<Val>) + Sync);

/// [`apply_all`], with `before` run first: on PostgreSQL as a
/// data-modifying CTE of the same statement (one round trip inside the
/// account's row lock instead of two; it runs even though nothing reads
/// it), on SQLite as a statement of its own.
pub(super) async fn apply_all_after<S: Sql>(
    tx: &mut S,
    cur: AccountSummary,
    entries: &[Entry<'_>],
    before: Option<Before<'_>>,
) -> Result<AccountSummary> {
    let Some(first) = entries.first() else {
        return Ok(cur);
    };
    let (mut balance, mut held) = (cur.balance, cur.held);
    for e in entries {
        if e.account != first.account {
            return Err(StoreError::Invalid("ledger entries of several accounts at once".into()));
        }
        let (da, dh) = e.kind.deltas(e.amount);
        balance = balance
            .checked_add(da)
            .ok_or_else(|| StoreError::Invalid("amount would overflow the balance".into()))?;
        held = held
            .checked_add(dh)
            .ok_or_else(|| StoreError::Invalid("amount would overflow the held credits".into()))?;
        if balance < 0 || held < 0 {
            return Err(StoreError::Corrupt(format!(
                "{} of {} on {} would leave balance {balance}, held {held}",
                e.kind.as_str(),
                e.amount,
                e.account
            )));
        }
    }
    let mut values = vals![first.account, balance, held].to_vec();
    let mut rows = String::new();
    for (n, e) in entries.iter().enumerate() {
        let (da, dh) = e.kind.deltas(e.amount);
        let b = 3 + n * 10;
        if n > 0 {
            rows.push_str(", ");
        }
        rows.push('(');
        rows.push_str(&(1..=10).map(|k| format!("${}", b + k)).collect::<Vec<_>>().join(", "));
        rows.push(')');
        values.extend(vals![
            e.kind.as_str(),
            da,
            dh,
            e.amount,
            e.hold_id,
            e.idempotency_key,
            e.route,
            e.key_prefix,
            e.note,
            e.created_at
        ]);
    }
    const COLUMNS: &str = "kind, delta_available, delta_held, amount, hold_id, idempotency_key, route, key_prefix, note, created_at";
    match tx.dialect() {
        Dialect::Postgres => {
            let pre = match before {
                Some(f) => {
                    let (sql, vals) = f(values.len());
                    values.extend(vals);
                    format!("pre AS ({sql}), ")
                }
                None => String::new(),
            };
            let sql = format!(
                "WITH {pre}changed AS (UPDATE accounts SET balance = $2, held = $3 WHERE id = $1 RETURNING id) \
                 INSERT INTO ledger (account, {COLUMNS}) SELECT changed.id, v.* FROM changed \
                 CROSS JOIN (VALUES {rows}) AS v({COLUMNS})"
            );
            tx.exec(&sql, &values).await?;
        }
        Dialect::Sqlite => {
            if let Some(f) = before {
                let (sql, vals) = f(0);
                tx.exec(&sql, &vals).await?;
            }
            tx.exec("UPDATE accounts SET balance = $2, held = $3 WHERE id = $1", &values[..3]).await?;
            let rows = rows.replace('(', "($1, ");
            let sql = format!("INSERT INTO ledger (account, {COLUMNS}) VALUES {rows}");
            tx.exec(&sql, &values).await?;
        }
    }
    Ok(AccountSummary { balance, held })
}

/// Verify the money invariants on one snapshot. See [`CheckReport`].
pub async fn check<S: Sql>(tx: &mut S) -> Result<CheckReport> {
    let mut problems = Vec::new();
    let accounts = tx.int("SELECT COUNT(*) FROM accounts", &[]).await?;
    let ledger_rows = tx.int("SELECT COUNT(*) FROM ledger", &[]).await?;
    for r in tx.rows(
        "SELECT a.id, a.balance, a.held, \
         CAST(COALESCE((SELECT SUM(l.delta_available) FROM ledger l WHERE l.account = a.id), 0) AS BIGINT), \
         CAST(COALESCE((SELECT SUM(l.delta_held) FROM ledger l WHERE l.account = a.id), 0) AS BIGINT), \
         CAST(COALESCE((SELECT SUM(h.amount) FROM holds h WHERE h.account = a.id AND h.state = 'open'), 0) AS BIGINT), \
         CAST(COALESCE((SELECT SUM(s.credits - s.spent) FROM leases s WHERE s.account = a.id AND s.state = 'open'), 0) AS BIGINT) \
         FROM accounts a ORDER BY a.id",
        &[],
    ).await? {
        let (id, balance, held) = (r.text(0)?, r.i64(1)?, r.i64(2)?);
        let (sum_avail, sum_held, open_holds, leased) = (r.i64(3)?, r.i64(4)?, r.i64(5)?, r.i64(6)?);
        let open = open_holds + leased;
        if balance != sum_avail {
            problems.push(format!(
                "account {id}: balance {balance} != ledger sum of delta_available {sum_avail}"
            ));
        }
        if held != sum_held {
            problems.push(format!(
                "account {id}: held {held} != ledger sum of delta_held {sum_held}"
            ));
        }
        if held != open {
            problems.push(format!(
                "account {id}: held {held} != open holds {open_holds} + unspent open leases {leased}"
            ));
        }
        if balance < 0 {
            problems.push(format!("account {id}: negative balance {balance}"));
        }
        if held < 0 {
            problems.push(format!("account {id}: negative held {held}"));
        }
    }
    for r in tx
        .rows(
            "SELECT h.id, h.state, h.amount, \
         (SELECT COUNT(*) FROM ledger l WHERE l.hold_id = h.id AND l.kind = 'hold'), \
         (SELECT COUNT(*) FROM ledger l WHERE l.hold_id = h.id AND l.kind = 'capture'), \
         (SELECT COUNT(*) FROM ledger l WHERE l.hold_id = h.id AND l.kind = 'release'), \
         (SELECT COUNT(*) FROM ledger l WHERE l.hold_id = h.id AND l.amount <> h.amount) \
         FROM holds h ORDER BY h.id",
            &[],
        )
        .await?
    {
        let (id, state) = (r.text(0)?, r.text(1)?);
        let (holds, captures, releases, wrong) = (r.i64(3)?, r.i64(4)?, r.i64(5)?, r.i64(6)?);
        let expected = match state.as_str() {
            "open" => (1, 0, 0),
            "captured" => (1, 1, 0),
            _ => (1, 0, 1),
        };
        if (holds, captures, releases) != expected {
            problems.push(format!(
                "hold {id} ({state}): {holds} hold, {captures} capture, {releases} release ledger rows; expected {}, {}, {}",
                expected.0, expected.1, expected.2
            ));
        }
        if wrong > 0 {
            problems.push(format!(
                "hold {id}: {wrong} ledger rows with another amount"
            ));
        }
    }
    for r in tx.rows(
        "SELECT l.id, COALESCE(l.idempotency_key, '') FROM ledger l WHERE l.kind = 'debit' AND NOT EXISTS \
         (SELECT 1 FROM debits d WHERE d.idempotency_key = l.idempotency_key \
          AND d.account = l.account AND d.amount = l.amount) ORDER BY l.id",
        &[],
    ).await? {
        problems.push(format!(
            "ledger row {}: debit {:?} has no matching debits record",
            r.i64(0)?,
            r.text(1)?
        ));
    }
    for r in tx
        .rows(
            "SELECT d.idempotency_key FROM debits d WHERE NOT EXISTS \
         (SELECT 1 FROM ledger l WHERE l.kind = 'debit' AND l.idempotency_key = d.idempotency_key) \
         ORDER BY d.idempotency_key",
            &[],
        )
        .await?
    {
        problems.push(format!("debit {:?} has no ledger row", r.text(0)?));
    }
    for r in tx.rows(
        "SELECT l.id, COALESCE(l.idempotency_key, ''), COALESCE(l.hold_id, '') FROM ledger l \
         WHERE l.kind = 'refund' AND NOT ( \
           (l.hold_id IS NULL AND EXISTS (SELECT 1 FROM debits d WHERE d.idempotency_key = l.idempotency_key \
                AND d.account = l.account AND d.amount = l.amount)) OR \
           (l.hold_id IS NOT NULL AND EXISTS (SELECT 1 FROM holds h WHERE h.id = l.hold_id \
                AND h.state = 'captured' AND h.account = l.account AND h.amount = l.amount))) \
         ORDER BY l.id",
        &[],
    ).await? {
        problems.push(format!(
            "ledger row {}: refund of {:?} {} matches no debit or captured hold",
            r.i64(0)?,
            r.text(1)?,
            r.text(2)?
        ));
    }
    for r in tx
        .rows(
            "SELECT s.id, s.state, s.credits, s.spent, \
         (SELECT COUNT(*) FROM ledger l WHERE l.hold_id = s.id AND l.kind = 'lease' AND l.amount = s.credits AND l.account = s.account), \
         CAST(COALESCE((SELECT SUM(l.amount) FROM ledger l WHERE l.hold_id = s.id AND l.kind = 'lease_spend' AND l.account = s.account), 0) AS BIGINT), \
         CAST(COALESCE((SELECT SUM(l.amount) FROM ledger l WHERE l.hold_id = s.id AND l.kind = 'lease_return' AND l.account = s.account), 0) AS BIGINT) \
         FROM leases s ORDER BY s.id",
            &[],
        )
        .await?
    {
        let (id, state, credits, spent) = (r.text(0)?, r.text(1)?, r.i64(2)?, r.i64(3)?);
        let (grants, spends, returned) = (r.i64(4)?, r.i64(5)?, r.i64(6)?);
        if grants != 1 {
            problems.push(format!("lease {id}: {grants} lease ledger rows of {credits}; expected 1"));
        }
        if spends != spent {
            problems.push(format!("lease {id}: spent {spent} != ledger sum of its spends {spends}"));
        }
        let expected_return = if state == "open" { 0 } else { credits - spent };
        if returned != expected_return {
            problems.push(format!(
                "lease {id} ({state}): {returned} returned in the ledger; expected {expected_return}"
            ));
        }
    }
    for r in tx
        .rows(
            "SELECT l.id, COALESCE(l.hold_id, '') FROM ledger l WHERE l.kind IN ('lease', 'lease_spend', 'lease_return') \
             AND NOT EXISTS (SELECT 1 FROM leases s WHERE s.id = l.hold_id AND s.account = l.account) ORDER BY l.id",
            &[],
        )
        .await?
    {
        problems.push(format!("ledger row {}: names no lease of its account ({:?})", r.i64(0)?, r.text(1)?));
    }
    Ok(CheckReport {
        accounts,
        ledger_rows,
        problems,
    })
}

job!(
    /// [`check`] (read, one snapshot).
    Check {} -> CheckReport,
    |_j, tx| check(tx).await
);

job!(
    /// The newest `limit` ledger rows of an account, newest first (read).
    Ledger { account: String, limit: i64 } -> Vec<LedgerEntry>,
    |j, tx| {
        let limit = j.limit.clamp(1, MAX_LEDGER_LIMIT);
        tx.rows(
            &format!("SELECT {LEDGER_COLUMNS} FROM ledger WHERE account = $1 ORDER BY id DESC LIMIT $2"),
            &vals![&j.account, limit],
        )
        .await?
        .iter()
        .map(ledger_from_row)
        .collect()
    }
);

job!(
    /// A page of an account's ledger, newest first: at most `limit` rows
    /// with an id below `before` (all, when `None`). The last row's id is
    /// the next page's `before` (read).
    LedgerPage { account: String, limit: i64, before: Option<i64> } -> Vec<LedgerEntry>,
    |j, tx| {
        let limit = j.limit.clamp(1, MAX_LEDGER_LIMIT);
        let before = j.before.unwrap_or(i64::MAX);
        tx.rows(
            &format!("SELECT {LEDGER_COLUMNS} FROM ledger WHERE account = $1 AND id < $3 ORDER BY id DESC LIMIT $2"),
            &vals![&j.account, limit, before],
        )
        .await?
        .iter()
        .map(ledger_from_row)
        .collect()
    }
);

job!(
    /// Σ delta_available over an account's ledger (read).
    LedgerBalance { account: String } -> i64,
    |j, tx| tx.int(
        "SELECT CAST(COALESCE(SUM(delta_available), 0) AS BIGINT) FROM ledger WHERE account = $1",
        &vals![&j.account],
    ).await
);

job!(
    /// Number of ledger rows (read).
    LedgerRowCount {} -> i64,
    |_j, tx| tx.int("SELECT COUNT(*) FROM ledger", &[]).await
);
