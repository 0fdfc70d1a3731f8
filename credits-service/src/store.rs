//! The money rules' vocabulary and the synchronous operator API, on SQLite
//! (default) or PostgreSQL. The rules themselves are in [`crate::rules`]
//! (one body of async code over [`crate::db::Sql`]); the service's async
//! backends in [`crate::sqlite`] and [`crate::pg`], behind [`crate::backend::Db`].
//!
//! Rules enforced here (and by the schema as a last line of defence):
//! - balances are integers and never negative (`CHECK(balance >= 0)`,
//!   `CHECK(held >= 0)`);
//! - every balance change is one row in the append-only `ledger` (kinds
//!   `topup`, `debit`, `refund`, `hold`, `capture`, `release`), written in the
//!   same transaction as the change; triggers refuse UPDATE and DELETE on it,
//!   and [`Store::check`] proves `balance == Σ delta_available` and
//!   `held == Σ delta_held == Σ open holds` for every account;
//! - every write that reads-then-writes runs in one transaction that holds
//!   the account's lock *before* reading: SQLite's `BEGIN IMMEDIATE` (the
//!   single database write lock) or PostgreSQL's `SELECT … FOR UPDATE` on the
//!   account row; so two connections — even in two processes — can never
//!   both see the same balance and overdraw it;
//! - debits and holds are idempotent on `idempotency_key`: a retry returns the
//!   original result and charges nothing; reusing a key for a different charge
//!   is a conflict;
//! - a refused debit or hold (insufficient credits, rate limited) records
//!   nothing, so the same idempotency key can succeed later;
//! - holds past `expires_at` are released (reason `expired`) lazily inside
//!   every transaction that touches the account, and by a sweeper in `serve`,
//!   so correctness never depends on the sweeper running.
//!
//! Time is always passed in (`now`, unix seconds, or `now_ms`, unix
//! milliseconds) rather than read here, so tests drive expiry and rate limits
//! deterministically.

use crate::db::{Dialect, Row};
use crate::keys::{Expiry, KeyKind, KeyState};
use crate::rules::{self, Job};
use std::cell::RefCell;
use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a SQLite connection waits for another writer's lock before
/// giving up (the service's `--sqlite-busy-timeout-ms` overrides it).
/// Transactions here are short, so this is only reached under pathological
/// contention, e.g. an operator holding a write transaction open.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest accepted idempotency key, in characters.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 200;
/// Longest accepted account id, in characters.
pub const MAX_ACCOUNT_CHARS: usize = 256;
/// Longest accepted free-text field (route, key name, note), in characters.
pub const MAX_TEXT_CHARS: usize = 200;
/// Accepted hold lifetimes, in seconds.
pub const HOLD_TTL_SECONDS: std::ops::RangeInclusive<i64> = 1..=3600;
/// Accepted `rate_limit.requests` and `rate_limit.burst`.
pub const RATE_COUNT_RANGE: std::ops::RangeInclusive<i64> = 1..=1_000_000;
/// Accepted `rate_limit.window_seconds` (up to a day).
pub const RATE_WINDOW_RANGE: std::ops::RangeInclusive<i64> = 1..=86_400;
/// Most ledger rows returned by one [`Store::ledger`] call.
pub const MAX_LEDGER_LIMIT: i64 = 1000;

/// Current unix time in seconds (the production clock; tests pass their own).
pub fn unix_now() -> i64 {
    unix_now_ms().div_euclid(1000)
}

/// Current unix time in milliseconds.
pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Everything that can go wrong in the store.
#[derive(Debug)]
pub enum StoreError {
    /// SQLite failure through rusqlite (the writer, the operator API).
    Sqlite(rusqlite::Error),
    /// Failure through sqlx (PostgreSQL, SQLite readers, migrations' I/O).
    Sqlx(sqlx::Error),
    /// A migration could not be applied.
    Migrate(String),
    /// The database cannot be reached or is busy right now (HTTP 503); a
    /// later retry may succeed.
    Unavailable(String),
    /// The OS random source failed.
    Random(getrandom::Error),
    /// Caller input broke a rule; the message says which.
    Invalid(String),
    AccountNotFound(String),
    /// No *active* key has this prefix (revoke).
    KeyNotFound(String),
    /// More than one active key shares this prefix (revoke).
    AmbiguousPrefix {
        prefix: String,
        matches: usize,
    },
    /// The account already holds the maximum number of active API tokens.
    TooManyTokens {
        account: String,
        limit: i64,
    },
    /// An idempotency key was reused for a different operation.
    IdempotencyConflict(String),
    /// The database was written by a newer binary.
    SchemaTooNew {
        found: i64,
        supported: i64,
    },
    /// Stored data could not be decoded.
    Corrupt(String),
}

/// SQLite primary result codes that mean "not now" rather than "wrong":
/// BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN.
fn sqlite_code_unavailable(code: i32) -> bool {
    matches!(code & 0xff, 5 | 6 | 8 | 10 | 13 | 14)
}

/// PostgreSQL SQLSTATEs that mean the server is going away, restarting,
/// out of resources, or (after our retries) still contended.
fn pg_code_unavailable(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "55P03"
        )
}

impl StoreError {
    /// The database is unreachable, restarting or busy: answer 503 and let
    /// the caller retry, rather than 500.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                sqlite_code_unavailable(e.extended_code)
            }
            StoreError::Sqlx(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(db) => db.code().is_some_and(|c| {
                    c.parse::<i32>()
                        .map_or_else(|_| pg_code_unavailable(&c), sqlite_code_unavailable)
                }),
                _ => false,
            },
            _ => false,
        }
    }

    /// A PostgreSQL transaction that failed this way is re-run from the
    /// start: serialization failure, deadlock, or a concurrent insert of the
    /// same unique key (the re-run sees the winner's row).
    pub(crate) fn is_retryable(&self) -> bool {
        let StoreError::Sqlx(sqlx::Error::Database(db)) = self else {
            return false;
        };
        db.code()
            .is_some_and(|c| matches!(c.as_ref(), "40001" | "40P01" | "23505"))
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Sqlite(e) => write!(f, "database error: {e}"),
            StoreError::Sqlx(sqlx::Error::Database(db)) => match db.code() {
                Some(code) => write!(f, "database error: {} ({code})", db.message()),
                None => write!(f, "database error: {}", db.message()),
            },
            StoreError::Sqlx(e) => write!(f, "database error: {e}"),
            StoreError::Migrate(m) => write!(f, "migration failed: {m}"),
            StoreError::Unavailable(m) => write!(f, "database unavailable: {m}"),
            StoreError::Random(e) => write!(f, "random source failed: {e}"),
            StoreError::Invalid(msg) => f.write_str(msg),
            StoreError::AccountNotFound(a) => write!(f, "account not found: {a}"),
            StoreError::KeyNotFound(p) => write!(f, "no active key with prefix {p}"),
            StoreError::AmbiguousPrefix { prefix, matches } => write!(
                f,
                "prefix {prefix} is ambiguous: {matches} active keys share it"
            ),
            StoreError::TooManyTokens { account, limit } => write!(
                f,
                "account {account} already has {limit} active api tokens (the maximum); revoke one first"
            ),
            StoreError::IdempotencyConflict(k) => write!(
                f,
                "idempotency key {k:?} was already used for a different operation"
            ),
            StoreError::SchemaTooNew { found, supported } => write!(
                f,
                "database schema version {found} is newer than this binary supports ({supported})"
            ),
            StoreError::Corrupt(msg) => write!(f, "corrupt data: {msg}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e)
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Sqlx(e)
    }
}

impl From<getrandom::Error> for StoreError {
    fn from(e: getrandom::Error) -> Self {
        StoreError::Random(e)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;
/// Input for [`Store::create_key`].
#[derive(Debug, Clone)]
pub struct NewKey {
    pub account: String,
    pub kind: KeyKind,
    pub scopes: Vec<String>,
    pub name: Option<String>,
    /// Must be `Expiry::Never` for API keys.
    pub expiry: Expiry,
}

/// A freshly minted credential. `secret` exists only in this value: it is
/// never written anywhere, so show it to the operator once and drop it.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub secret: String,
    pub prefix: String,
    pub account: String,
    pub kind: KeyKind,
    pub scopes: Vec<String>,
    pub name: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

/// A stored key as seen by operators and the filter (never the hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub prefix: String,
    pub account: String,
    pub kind: KeyKind,
    pub scopes: Vec<String>,
    pub name: Option<String>,
    pub state: KeyState,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

/// Result of a successful key lookup: the key plus its account's balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLookup {
    pub key: KeyRecord,
    pub balance: i64,
}

/// Input for [`Store::debit`].
#[derive(Debug, Clone)]
pub struct DebitRequest {
    pub account: String,
    pub amount: i64,
    pub idempotency_key: String,
    pub route: Option<String>,
    pub key_prefix: Option<String>,
}

/// What a debit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DebitOutcome {
    /// Charged now, or (`replayed`) charged by an earlier call with this key.
    Charged {
        account: String,
        charged: i64,
        balance: i64,
        replayed: bool,
    },
    /// Not enough credits; nothing was recorded.
    Insufficient { balance: i64, required: i64 },
    /// The idempotency key was used before for a different account/amount.
    Conflict,
    /// The account's rate limit refused the request; nothing was charged.
    RateLimited { retry_after_seconds: i64 },
}

/// A stored debit row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebitRecord {
    pub idempotency_key: String,
    pub account: String,
    pub amount: i64,
    pub balance_after: i64,
    pub route: Option<String>,
    pub key_prefix: Option<String>,
    pub created_at: i64,
}

/// What a top-up did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopupReceipt {
    pub account: String,
    pub amount: i64,
    /// Balance after this call.
    pub balance: i64,
    /// True when the idempotency key had already credited this top-up.
    pub replayed: bool,
}

/// Result of [`Store::create_account`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountOutcome {
    pub account: String,
    pub balance: i64,
    /// False when the account already existed (it is then left unchanged).
    pub created: bool,
}

/// A revoked key, as reported by [`Store::revoke_by_prefix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedKey {
    pub prefix: String,
    pub account: String,
    pub kind: KeyKind,
    pub revoked_at: i64,
}

/// Balance (available) and held credits of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountSummary {
    /// Credits available to spend.
    pub balance: i64,
    /// Credits reserved by open holds.
    pub held: i64,
}

impl AccountSummary {
    /// Everything the account owns: available + held.
    pub fn total(&self) -> i64 {
        self.balance.saturating_add(self.held)
    }
}

/// A per-account token bucket: `burst` requests at once, refilled at
/// `requests / window_seconds` per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: i64,
    pub window_seconds: i64,
    pub burst: i64,
}

impl RateLimit {
    pub fn validate(&self) -> Result<()> {
        if !RATE_COUNT_RANGE.contains(&self.requests)
            || !RATE_COUNT_RANGE.contains(&self.burst)
            || !RATE_WINDOW_RANGE.contains(&self.window_seconds)
        {
            return Err(StoreError::Invalid(format!(
                "rate_limit: requests and burst must be {}..={}, window_seconds {}..={}",
                RATE_COUNT_RANGE.start(),
                RATE_COUNT_RANGE.end(),
                RATE_WINDOW_RANGE.start(),
                RATE_WINDOW_RANGE.end()
            )));
        }
        Ok(())
    }
}

/// What a rate-limit check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    /// Allowed; `remaining` whole tokens are left.
    Allowed { remaining: i64 },
    /// Refused; one token will be available in `retry_after_seconds` (>= 1).
    Limited { retry_after_seconds: i64 },
}

/// Input for [`Store::create_hold`].
#[derive(Debug, Clone)]
pub struct HoldRequest {
    pub account: String,
    pub amount: i64,
    pub idempotency_key: String,
    pub ttl_seconds: i64,
    pub route: Option<String>,
    pub key_prefix: Option<String>,
}

/// The answer to a successful (or replayed) hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldReceipt {
    pub hold_id: String,
    pub account: String,
    pub amount: i64,
    /// Available balance right after the hold was placed (for a replay:
    /// after the original).
    pub balance: i64,
    pub expires_at: i64,
    pub replayed: bool,
}

/// What [`Store::create_hold`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    Held(HoldReceipt),
    /// Available credits below the amount; nothing was recorded.
    Insufficient {
        balance: i64,
        required: i64,
    },
    /// The idempotency key was used for a different account/amount.
    Conflict,
    RateLimited {
        retry_after_seconds: i64,
    },
}

/// State of a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    Open,
    Captured,
    Released,
}

impl HoldState {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldState::Open => "open",
            HoldState::Captured => "captured",
            HoldState::Released => "released",
        }
    }

    pub fn parse(s: &str) -> Option<HoldState> {
        match s {
            "open" => Some(HoldState::Open),
            "captured" => Some(HoldState::Captured),
            "released" => Some(HoldState::Released),
            _ => None,
        }
    }
}

/// Why a hold was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    /// The upstream failed: the client must not pay for it.
    UpstreamError,
    /// Not settled before `expires_at`.
    Expired,
    /// Released on request for another reason.
    Requested,
}

impl ReleaseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::UpstreamError => "upstream_error",
            ReleaseReason::Expired => "expired",
            ReleaseReason::Requested => "requested",
        }
    }

    pub fn parse(s: &str) -> Option<ReleaseReason> {
        match s {
            "upstream_error" => Some(ReleaseReason::UpstreamError),
            "expired" => Some(ReleaseReason::Expired),
            "requested" => Some(ReleaseReason::Requested),
            _ => None,
        }
    }
}

/// A hold after capture/release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledHold {
    pub hold_id: String,
    pub state: HoldState,
    pub account: String,
    pub amount: i64,
    /// The account's available balance now.
    pub balance: i64,
    /// The account's held credits now.
    pub held: i64,
    pub release_reason: Option<ReleaseReason>,
}

/// What capture/release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleOutcome {
    /// Settled now, or already settled the same way (idempotent).
    Settled(SettledHold),
    /// Already settled the other way (or expired): `state` says how.
    NotOpen {
        state: HoldState,
    },
    NotFound,
}

/// What a refund did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    Refunded {
        account: String,
        amount: i64,
        balance: i64,
        idempotency_key: String,
        hold_id: Option<String>,
    },
    /// This debit/hold was refunded before; nothing was done.
    AlreadyRefunded { idempotency_key: String },
    /// No debit and no hold has this idempotency key.
    NotFound,
    /// A hold with this key exists but was never captured (nothing was spent).
    NotRefundable { state: HoldState },
}

/// One ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub id: i64,
    pub account: String,
    pub kind: String,
    pub delta_available: i64,
    pub delta_held: i64,
    pub amount: i64,
    pub hold_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub route: Option<String>,
    pub key_prefix: Option<String>,
    pub note: Option<String>,
    pub created_at: i64,
}

/// Result of [`Store::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub accounts: i64,
    pub ledger_rows: i64,
    /// Every discrepancy found, one sentence each; empty when consistent.
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Account ids are opaque (e.g. `did:privy:cm123…`) but bounded and printable.
pub fn validate_account_id(account: &str) -> Result<()> {
    let chars = account.chars().count();
    if chars == 0 || chars > MAX_ACCOUNT_CHARS || account.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "account must be 1-{MAX_ACCOUNT_CHARS} characters without control characters"
        )));
    }
    Ok(())
}

/// The checks every charge (debit or hold) makes on its request.
/// A group-committed job's answer (both backends' writers): the batch's
/// failure if its transaction failed, else the job's own result.
pub(crate) fn batch_answer<T>(batch_error: Option<&str>, result: Option<Result<T>>) -> Result<T> {
    match (batch_error, result) {
        (Some(e), _) => Err(StoreError::Unavailable(e.to_string())),
        (None, Some(r)) => r,
        (None, None) => Err(StoreError::Corrupt("write job was never run".into())),
    }
}

pub(crate) fn validate_charge(
    account: &str,
    amount: i64,
    idempotency_key: &str,
    route: Option<&str>,
    key_prefix: Option<&str>,
    rate: Option<&RateLimit>,
) -> Result<()> {
    validate_account_id(account)?;
    if amount < 1 {
        return Err(StoreError::Invalid("amount must be an integer >= 1".into()));
    }
    validate_idempotency_key("idempotency_key", idempotency_key)?;
    validate_optional_text("route", route)?;
    validate_optional_text("key_prefix", key_prefix)?;
    if let Some(rl) = rate {
        rl.validate()?;
    }
    Ok(())
}

pub(crate) fn validate_optional_text(field: &str, value: Option<&str>) -> Result<()> {
    if let Some(v) = value {
        if v.chars().count() > MAX_TEXT_CHARS || v.chars().any(char::is_control) {
            return Err(StoreError::Invalid(format!(
                "{field} must be at most {MAX_TEXT_CHARS} characters without control characters"
            )));
        }
    }
    Ok(())
}

pub(crate) fn validate_idempotency_key(field: &str, key: &str) -> Result<()> {
    let n = key.chars().count();
    if n == 0 || n > MAX_IDEMPOTENCY_KEY_CHARS {
        return Err(StoreError::Invalid(format!(
            "{field} must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} characters"
        )));
    }
    Ok(())
}

pub(crate) fn decode_kind(s: &str) -> Result<KeyKind> {
    KeyKind::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown key kind {s:?}")))
}

pub(crate) fn decode_hold_state(s: &str) -> Result<HoldState> {
    HoldState::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown hold state {s:?}")))
}

pub(crate) fn decode_scopes(s: &str) -> Result<Vec<String>> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("scopes column: {e}")))
}

pub(crate) fn encode_scopes(scopes: &[String]) -> Result<String> {
    serde_json::to_string(scopes).map_err(|e| StoreError::Corrupt(format!("scopes: {e}")))
}

/// Key columns in the order [`key_from_row`] expects (alias `k`).
pub(crate) const KEY_COLUMNS: &str =
    "k.prefix, k.account, k.kind, k.scopes, k.name, k.created_at, \
                           k.expires_at, k.revoked_at, k.last_used_at";

pub(crate) fn key_from_row(row: &Row, now: i64) -> Result<KeyRecord> {
    let revoked_at = row.opt_i64(7)?;
    let expires_at = row.opt_i64(6)?;
    Ok(KeyRecord {
        prefix: row.text(0)?,
        account: row.text(1)?,
        kind: decode_kind(&row.text(2)?)?,
        scopes: decode_scopes(&row.text(3)?)?,
        name: row.opt_text(4)?,
        state: KeyState::compute(revoked_at, expires_at, now),
        created_at: row.i64(5)?,
        expires_at,
        revoked_at,
        last_used_at: row.opt_i64(8)?,
    })
}

/// Ledger columns in the order [`ledger_from_row`] expects.
pub(crate) const LEDGER_COLUMNS: &str =
    "id, account, kind, delta_available, delta_held, amount, hold_id, \
                              idempotency_key, route, key_prefix, note, created_at";

pub(crate) fn ledger_from_row(row: &Row) -> Result<LedgerEntry> {
    Ok(LedgerEntry {
        id: row.i64(0)?,
        account: row.text(1)?,
        kind: row.text(2)?,
        delta_available: row.i64(3)?,
        delta_held: row.i64(4)?,
        amount: row.i64(5)?,
        hold_id: row.opt_text(6)?,
        idempotency_key: row.opt_text(7)?,
        route: row.opt_text(8)?,
        key_prefix: row.opt_text(9)?,
        note: row.opt_text(10)?,
        created_at: row.i64(11)?,
    })
}

// ----- the synchronous operator API -----------------------------------------

/// True for a `--db` value that names a PostgreSQL database.
pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// The connection behind a [`Store`].
enum Inner {
    /// One rusqlite connection: each call is one transaction on this thread.
    Sqlite(RefCell<rusqlite::Connection>),
    /// A small sqlx pool driven by a runtime of its own.
    Postgres {
        rt: tokio::runtime::Runtime,
        db: crate::pg::PgDb,
    },
}

/// The credits database for operators, the CLI and tests: the same money
/// rules as the service, called synchronously, one transaction per call.
///
/// The service itself uses [`crate::backend::Db`] (async, pooled, the
/// SQLite group-commit writer); both run [`crate::rules`].
pub struct Store {
    inner: Inner,
}

impl Store {
    /// Open `--db`: a `postgres://` / `postgresql://` URL, or else a SQLite
    /// file path.
    pub fn connect(db: &str) -> Result<Store> {
        if is_postgres_url(db) {
            Self::open_postgres(db)
        } else {
            Self::open(db)
        }
    }

    /// Connect to PostgreSQL and bring the schema up to date.
    pub fn open_postgres(url: &str) -> Result<Store> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot start a runtime: {e}")))?;
        let options = crate::pg::PgOptions {
            max_connections: 2,
            // One operator command at a time: nothing to commit together.
            max_batch: 1,
            ..crate::pg::PgOptions::default()
        };
        let db = rt.block_on(crate::pg::PgDb::connect(url, &options))?;
        Ok(Store {
            inner: Inner::Postgres { rt, db },
        })
    }

    /// Open (creating if needed) the database file, switch it to WAL and bring
    /// the schema up to date.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        let conn = crate::sqlite::open_migrated(path.as_ref(), BUSY_TIMEOUT)?;
        Ok(Store {
            inner: Inner::Sqlite(RefCell::new(conn)),
        })
    }

    /// Which database this store talks to.
    pub fn dialect(&self) -> Dialect {
        match self.inner {
            Inner::Sqlite(_) => Dialect::Sqlite,
            Inner::Postgres { .. } => Dialect::Postgres,
        }
    }

    /// Schema version of this binary (number of SQLite migrations).
    pub fn supported_schema_version() -> i64 {
        crate::sqlite::supported_schema_version()
    }

    /// Schema version recorded in the database.
    pub fn schema_version(&self) -> Result<i64> {
        match &self.inner {
            Inner::Sqlite(conn) => crate::sqlite::schema_version(&conn.borrow()),
            Inner::Postgres { rt, db } => rt.block_on(db.schema_version()),
        }
    }

    /// Run a job in a write transaction (SQLite `BEGIN IMMEDIATE`;
    /// PostgreSQL, re-run on serialization failures).
    fn write<J: Job>(&self, job: J) -> Result<J::Out> {
        match &self.inner {
            Inner::Sqlite(conn) => crate::sqlite::write_one(&mut conn.borrow_mut(), &job),
            Inner::Postgres { rt, db } => rt.block_on(db.write_here(&job)),
        }
    }

    /// Run a job on one consistent snapshot (read-only).
    fn read<J: Job>(&self, job: J) -> Result<J::Out> {
        match &self.inner {
            Inner::Sqlite(conn) => crate::sqlite::read_one(&mut conn.borrow_mut(), &job),
            Inner::Postgres { rt, db } => rt.block_on(db.read(&job)),
        }
    }

    /// Run one raw statement (operators' and tests' escape hatch; the
    /// ledger triggers still apply).
    #[doc(hidden)]
    pub fn raw_execute(&mut self, sql: &str) -> Result<u64> {
        self.write(rules::Raw {
            sql: sql.to_string(),
        })
    }

    // ----- accounts -------------------------------------------------------

    /// Create an account with `initial_credits` (recorded as a top-up).
    /// Idempotent: an existing account is left exactly as it is.
    pub fn create_account(
        &mut self,
        account: &str,
        initial_credits: i64,
        now: i64,
    ) -> Result<AccountOutcome> {
        self.write(rules::CreateAccount {
            account: account.to_string(),
            initial_credits,
            now,
        })
    }

    /// Current available balance, or `None` for an unknown account (as
    /// stored: holds past their expiry are released by the next write).
    pub fn balance(&self, account: &str) -> Result<Option<i64>> {
        self.read(rules::Balance {
            account: account.to_string(),
        })
    }

    /// Balance and held credits as they are once holds past their expiry are
    /// released (which the next write on the account, or the sweeper, does).
    pub fn account_summary(&mut self, account: &str, now: i64) -> Result<Option<AccountSummary>> {
        self.read(rules::AccountView {
            account: account.to_string(),
            now,
        })
    }

    /// Σ delta_available over the account's ledger: must always equal the
    /// balance (see [`Store::check`]).
    pub fn ledger_balance(&self, account: &str) -> Result<i64> {
        self.read(rules::LedgerBalance {
            account: account.to_string(),
        })
    }

    /// The newest `limit` ledger rows of an account, newest first.
    pub fn ledger(&self, account: &str, limit: i64) -> Result<Vec<LedgerEntry>> {
        self.read(rules::Ledger {
            account: account.to_string(),
            limit,
        })
    }

    /// Number of ledger rows (all accounts).
    pub fn ledger_row_count(&self) -> Result<i64> {
        self.read(rules::LedgerRowCount {})
    }

    /// Credit `amount` (>= 1) to `account`, creating the account if missing.
    ///
    /// With an `idempotency_key`, the same key credits at most once: a repeat
    /// with the same account and amount is reported as `replayed`; with a
    /// different account or amount it is an [`StoreError::IdempotencyConflict`].
    pub fn topup(
        &mut self,
        account: &str,
        amount: i64,
        note: Option<&str>,
        idempotency_key: Option<&str>,
        now: i64,
    ) -> Result<TopupReceipt> {
        self.write(rules::Topup {
            account: account.to_string(),
            amount,
            note: note.map(str::to_string),
            idempotency_key: idempotency_key.map(str::to_string),
            now,
        })
    }

    // ----- debits ---------------------------------------------------------

    /// Charge `amount` credits, atomically and idempotently. See module docs.
    pub fn debit(&mut self, req: &DebitRequest, now: i64) -> Result<DebitOutcome> {
        self.debit_limited(req, None, now.saturating_mul(1000))
    }

    /// [`Store::debit`] with an optional rate limit, checked before the
    /// charge (a retry of an already-recorded debit replays without spending
    /// a token or being refused).
    pub fn debit_limited(
        &mut self,
        req: &DebitRequest,
        rate: Option<&RateLimit>,
        now_ms: i64,
    ) -> Result<DebitOutcome> {
        self.write(rules::Debit {
            req: req.clone(),
            rate: rate.copied(),
            now_ms,
        })
    }

    /// The stored debit for an idempotency key, if any.
    pub fn debit_record(&self, idempotency_key: &str) -> Result<Option<DebitRecord>> {
        self.read(rules::DebitRecordOf {
            idempotency_key: idempotency_key.to_string(),
        })
    }

    /// Number of debits recorded for an account.
    pub fn debit_count(&self, account: &str) -> Result<i64> {
        self.read(rules::DebitCount {
            account: account.to_string(),
        })
    }

    // ----- rate limits ----------------------------------------------------

    /// Take one request from the account's token bucket (shared by all its
    /// keys and sessions, and by every service instance on this database).
    pub fn rate_limit(
        &mut self,
        account: &str,
        rl: &RateLimit,
        now_ms: i64,
    ) -> Result<RateDecision> {
        self.write(rules::RateTake {
            account: account.to_string(),
            limit: *rl,
            now_ms,
        })
    }

    // ----- holds ----------------------------------------------------------

    /// Reserve `amount` credits for `ttl_seconds` (charge on success: capture
    /// it after the upstream answered, release it when it failed).
    /// Idempotent on `idempotency_key`, like a debit.
    pub fn create_hold(
        &mut self,
        req: &HoldRequest,
        rate: Option<&RateLimit>,
        now_ms: i64,
    ) -> Result<HoldOutcome> {
        self.write(rules::CreateHold {
            req: req.clone(),
            rate: rate.copied(),
            now_ms,
        })
    }

    /// Charge an open hold. Capturing a captured hold answers the same
    /// again; a released (or expired) hold cannot be captured.
    pub fn capture_hold(&mut self, hold_id: &str, now: i64) -> Result<SettleOutcome> {
        self.write(rules::Settle {
            hold_id: hold_id.to_string(),
            release: None,
            now,
        })
    }

    /// Give an open hold's credits back. Releasing a released hold answers
    /// the same again; a captured hold cannot be released (refund it).
    pub fn release_hold(
        &mut self,
        hold_id: &str,
        reason: ReleaseReason,
        now: i64,
    ) -> Result<SettleOutcome> {
        self.write(rules::Settle {
            hold_id: hold_id.to_string(),
            release: Some(reason),
            now,
        })
    }

    /// Release every open hold past its expiry (what the service's sweeper
    /// does every second). Returns how many were released.
    pub fn expire_holds(&mut self, now: i64) -> Result<usize> {
        self.write(rules::ExpireAll { now })
    }

    /// State of a hold (for operators and tests).
    pub fn hold_state(&self, hold_id: &str) -> Result<Option<(HoldState, Option<ReleaseReason>)>> {
        self.read(rules::HoldStateOf {
            hold_id: hold_id.to_string(),
        })
    }

    // ----- refunds --------------------------------------------------------

    /// Give back a recorded debit or a captured hold, found by its
    /// idempotency key. At most once: a second refund is
    /// [`RefundOutcome::AlreadyRefunded`].
    pub fn refund(
        &mut self,
        idempotency_key: &str,
        note: Option<&str>,
        now: i64,
    ) -> Result<RefundOutcome> {
        self.write(rules::Refund {
            idempotency_key: idempotency_key.to_string(),
            note: note.map(str::to_string),
            now,
        })
    }

    // ----- consistency ----------------------------------------------------

    /// Verify the money invariants on one snapshot. See [`CheckReport`].
    pub fn check(&mut self) -> Result<CheckReport> {
        self.read(rules::Check {})
    }

    // ----- keys -----------------------------------------------------------

    /// Mint a credential with fresh OS randomness. See [`Store::create_key_with`].
    pub fn create_key(&mut self, new: &NewKey, now: i64) -> Result<CreatedKey> {
        self.write(rules::CreateKey {
            new: new.clone(),
            now,
        })
    }

    /// Mint a credential using `generate` for the secret (tests inject it to
    /// force prefix collisions). Creates the account if missing. Only the
    /// SHA-256 and the prefix are stored.
    pub fn create_key_with(
        &mut self,
        new: &NewKey,
        now: i64,
        generate: &mut dyn FnMut(KeyKind) -> Result<String>,
    ) -> Result<CreatedKey> {
        match &self.inner {
            Inner::Sqlite(conn) => crate::sqlite::write_with(&mut conn.borrow_mut(), |tx| {
                crate::db::run_ready(rules::create_key(tx, new, now, &mut *generate))?
            }),
            Inner::Postgres { rt, db } => rt.block_on(db.transaction(false, async |tx| {
                rules::create_key(tx, new, now, &mut *generate).await
            })),
        }
    }

    /// Look a key up by the SHA-256 of its secret. Revoked and expired keys
    /// are returned too (their `state` tells) so the filter can answer 401
    /// precisely; `balance` counts holds past their expiry as released.
    /// Marks active keys as used at `now` (the service records that after
    /// answering, off the lookup's path).
    pub fn lookup_key(&mut self, key_sha256: &str, now: i64) -> Result<Option<KeyLookup>> {
        let found = self.read(rules::LookupKey {
            key_sha256: key_sha256.to_string(),
            now,
        })?;
        let Some(mut l) = found else {
            return Ok(None);
        };
        if l.key.state == KeyState::Active {
            self.write(rules::TouchKey {
                key_sha256: key_sha256.to_string(),
                now,
            })?;
            l.key.last_used_at = Some(l.key.last_used_at.map_or(now, |t| t.max(now)));
        }
        Ok(Some(l))
    }

    /// All keys of an account, oldest first (creation order; never hashes or secrets).
    pub fn list_keys(&self, account: &str, now: i64) -> Result<Vec<KeyRecord>> {
        self.read(rules::ListKeys {
            account: account.to_string(),
            now,
        })
    }

    /// Number of active API tokens an account holds at `now`.
    pub fn active_token_count(&self, account: &str, now: i64) -> Result<i64> {
        self.read(rules::ActiveTokenCount {
            account: account.to_string(),
            now,
        })
    }

    /// Revoke the single active key with this prefix.
    pub fn revoke_by_prefix(&mut self, prefix: &str, now: i64) -> Result<RevokedKey> {
        self.write(rules::Revoke {
            prefix: prefix.to_string(),
            now,
        })
    }
}
