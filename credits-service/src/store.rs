//! Storage, schema migrations and the money rules, on SQLite (default) or
//! PostgreSQL (see [`crate::db`] for how one body of SQL serves both).
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

use crate::db::{Dialect, Row, Sql, Val};
use crate::keys::{self, Expiry, KeyKind, KeyState, MAX_ACTIVE_API_TOKENS};
use crate::vals;
use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a connection waits for another writer's lock before giving up.
/// Transactions here are a handful of statements, so this is only reached
/// under pathological contention.
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
/// Prefix collisions are astronomically rare; retrying a few times is plenty.
const PREFIX_ATTEMPTS: usize = 8;

/// SQLite schema migrations, applied in order. `PRAGMA user_version` records
/// how many have run. Append new entries; never edit an entry that has shipped.
const MIGRATIONS: &[&str] = &[
    // v1: initial schema. STRICT tables make SQLite reject non-integer money.
    r#"
    CREATE TABLE accounts (
        id          TEXT PRIMARY KEY,
        balance     INTEGER NOT NULL CHECK (balance >= 0),
        created_at  INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE keys (
        key_sha256   TEXT PRIMARY KEY CHECK (length(key_sha256) = 64),
        prefix       TEXT NOT NULL,
        account      TEXT NOT NULL REFERENCES accounts(id),
        kind         TEXT NOT NULL CHECK (kind IN ('api_key', 'api_token')),
        scopes       TEXT NOT NULL DEFAULT '[]',
        name         TEXT,
        created_at   INTEGER NOT NULL,
        expires_at   INTEGER,
        revoked_at   INTEGER,
        last_used_at INTEGER
    ) STRICT;
    CREATE INDEX keys_prefix ON keys(prefix);
    CREATE INDEX keys_account ON keys(account);

    CREATE TABLE debits (
        idempotency_key TEXT PRIMARY KEY,
        account         TEXT NOT NULL REFERENCES accounts(id),
        amount          INTEGER NOT NULL CHECK (amount >= 1),
        balance_after   INTEGER NOT NULL CHECK (balance_after >= 0),
        route           TEXT,
        key_prefix      TEXT,
        created_at      INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX debits_account ON debits(account, created_at);

    CREATE TABLE topups (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        account         TEXT NOT NULL REFERENCES accounts(id),
        amount          INTEGER NOT NULL CHECK (amount >= 1),
        created_at      INTEGER NOT NULL,
        note            TEXT,
        idempotency_key TEXT UNIQUE
    ) STRICT;
    CREATE INDEX topups_account ON topups(account, created_at);
    "#,
    // v2: append-only ledger, holds, rate-limit buckets; backfill the ledger
    // from the v1 history so `check` passes on an upgraded database.
    r#"
    ALTER TABLE accounts ADD COLUMN held INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0);

    CREATE TABLE ledger (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        account         TEXT NOT NULL REFERENCES accounts(id),
        kind            TEXT NOT NULL CHECK (kind IN ('topup', 'debit', 'refund', 'hold', 'capture', 'release')),
        delta_available INTEGER NOT NULL,
        delta_held      INTEGER NOT NULL,
        amount          INTEGER NOT NULL CHECK (amount >= 1),
        hold_id         TEXT,
        idempotency_key TEXT,
        route           TEXT,
        key_prefix      TEXT,
        note            TEXT,
        created_at      INTEGER NOT NULL,
        CHECK (
            (kind IN ('topup', 'refund') AND delta_available = amount AND delta_held = 0) OR
            (kind = 'debit' AND delta_available = -amount AND delta_held = 0) OR
            (kind = 'hold' AND hold_id IS NOT NULL AND delta_available = -amount AND delta_held = amount) OR
            (kind = 'capture' AND hold_id IS NOT NULL AND delta_available = 0 AND delta_held = -amount) OR
            (kind = 'release' AND hold_id IS NOT NULL AND delta_available = amount AND delta_held = -amount)
        )
    ) STRICT;
    CREATE INDEX ledger_account ON ledger(account, id);
    CREATE INDEX ledger_hold ON ledger(hold_id);
    CREATE INDEX ledger_key ON ledger(idempotency_key);
    CREATE UNIQUE INDEX ledger_debit_once ON ledger(idempotency_key) WHERE kind = 'debit';
    CREATE UNIQUE INDEX ledger_refund_once ON ledger(idempotency_key, COALESCE(hold_id, '')) WHERE kind = 'refund';
    CREATE UNIQUE INDEX ledger_hold_once ON ledger(hold_id, kind) WHERE kind IN ('hold', 'capture', 'release');
    CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
        BEGIN SELECT RAISE(ABORT, 'ledger is append-only: UPDATE refused'); END;
    CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
        BEGIN SELECT RAISE(ABORT, 'ledger is append-only: DELETE refused'); END;

    CREATE TABLE holds (
        id              TEXT PRIMARY KEY,
        account         TEXT NOT NULL REFERENCES accounts(id),
        amount          INTEGER NOT NULL CHECK (amount >= 1),
        state           TEXT NOT NULL CHECK (state IN ('open', 'captured', 'released')),
        idempotency_key TEXT NOT NULL UNIQUE,
        balance_after   INTEGER NOT NULL CHECK (balance_after >= 0),
        route           TEXT,
        key_prefix      TEXT,
        created_at      INTEGER NOT NULL,
        expires_at      INTEGER NOT NULL,
        settled_at      INTEGER,
        release_reason  TEXT CHECK (release_reason IN ('upstream_error', 'expired', 'requested')),
        CHECK ((state = 'open') = (settled_at IS NULL)),
        CHECK ((state = 'released') = (release_reason IS NOT NULL))
    ) STRICT;
    CREATE INDEX holds_account_open ON holds(account, state, expires_at);
    CREATE INDEX holds_expiry ON holds(state, expires_at);

    CREATE TABLE rate_buckets (
        account    TEXT PRIMARY KEY,
        units      INTEGER NOT NULL CHECK (units >= 0),
        scale      INTEGER NOT NULL CHECK (scale >= 1),
        updated_ms INTEGER NOT NULL
    ) STRICT;

    -- Backfill. Where an account's top-ups explain its balance
    -- (Σ topups = balance + Σ debits) copy them one by one; otherwise write
    -- one opening top-up of balance + Σ debits. Then every debit.
    INSERT INTO ledger (account, kind, delta_available, delta_held, amount, idempotency_key, note, created_at)
    SELECT t.account, 'topup', t.amount, 0, t.amount, t.idempotency_key, t.note, t.created_at
    FROM topups t JOIN accounts a ON a.id = t.account
    WHERE (SELECT COALESCE(SUM(amount), 0) FROM topups WHERE account = a.id)
        = a.balance + (SELECT COALESCE(SUM(amount), 0) FROM debits WHERE account = a.id)
    ORDER BY t.created_at, t.id;

    INSERT INTO ledger (account, kind, delta_available, delta_held, amount, note, created_at)
    SELECT id, 'topup', opening, 0, opening, 'opening balance (ledger migration)', created_at
    FROM (
        SELECT a.id, a.created_at,
               a.balance + (SELECT COALESCE(SUM(amount), 0) FROM debits WHERE account = a.id) AS opening,
               (SELECT COALESCE(SUM(amount), 0) FROM topups WHERE account = a.id) AS topped
        FROM accounts a
    )
    WHERE opening >= 1 AND opening <> topped
    ORDER BY id;

    INSERT INTO ledger (account, kind, delta_available, delta_held, amount, idempotency_key, route, key_prefix, created_at)
    SELECT account, 'debit', -amount, 0, amount, idempotency_key, route, key_prefix, created_at
    FROM debits ORDER BY created_at, rowid;
    "#,
];

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
    /// SQLite failure (I/O, lock timeout, constraint...).
    Db(rusqlite::Error),
    /// PostgreSQL failure (connection, constraint, serialization...).
    Pg(postgres::Error),
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
    /// The file was written by a newer binary.
    SchemaTooNew {
        found: i64,
        supported: i64,
    },
    /// Stored data could not be decoded.
    Corrupt(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Db(e) => write!(f, "database error: {e}"),
            StoreError::Pg(e) => match e.as_db_error() {
                Some(db) => write!(f, "database error: {} ({})", db.message(), db.code().code()),
                None => write!(f, "database error: {e}"),
            },
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
        StoreError::Db(e)
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Pg(e)
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
    Insufficient { balance: i64, required: i64 },
    /// The idempotency key was used for a different account/amount.
    Conflict,
    RateLimited { retry_after_seconds: i64 },
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
    NotOpen { state: HoldState },
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
fn validate_charge(
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

fn validate_optional_text(field: &str, value: Option<&str>) -> Result<()> {
    if let Some(v) = value {
        if v.chars().count() > MAX_TEXT_CHARS || v.chars().any(char::is_control) {
            return Err(StoreError::Invalid(format!(
                "{field} must be at most {MAX_TEXT_CHARS} characters without control characters"
            )));
        }
    }
    Ok(())
}

fn validate_idempotency_key(field: &str, key: &str) -> Result<()> {
    let n = key.chars().count();
    if n == 0 || n > MAX_IDEMPOTENCY_KEY_CHARS {
        return Err(StoreError::Invalid(format!(
            "{field} must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} characters"
        )));
    }
    Ok(())
}

fn decode_kind(s: &str) -> Result<KeyKind> {
    KeyKind::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown key kind {s:?}")))
}

fn decode_hold_state(s: &str) -> Result<HoldState> {
    HoldState::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown hold state {s:?}")))
}

fn decode_scopes(s: &str) -> Result<Vec<String>> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("scopes column: {e}")))
}

fn encode_scopes(scopes: &[String]) -> Result<String> {
    serde_json::to_string(scopes).map_err(|e| StoreError::Corrupt(format!("scopes: {e}")))
}

/// Key columns in the order [`key_from_row`] expects (alias `k`).
const KEY_COLUMNS: &str = "k.prefix, k.account, k.kind, k.scopes, k.name, k.created_at, \
                           k.expires_at, k.revoked_at, k.last_used_at";

fn key_from_row(row: &Row, now: i64) -> Result<KeyRecord> {
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

/// SQL condition selecting active keys (alias `k`), `now` bound as `?{n}`.
fn active_sql(n: usize) -> String {
    format!("k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > ?{n})")
}

/// Ledger columns in the order [`ledger_from_row`] expects.
const LEDGER_COLUMNS: &str = "id, account, kind, delta_available, delta_held, amount, hold_id, \
                              idempotency_key, route, key_prefix, note, created_at";

fn ledger_from_row(row: &Row) -> Result<LedgerEntry> {
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

// ----- building blocks run inside a transaction ---------------------------

/// The ledger kinds and the (available, held) change each makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Topup,
    Debit,
    Refund,
    Hold,
    Capture,
    Release,
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
        }
    }

    fn deltas(self, amount: i64) -> (i64, i64) {
        match self {
            Kind::Topup | Kind::Refund => (amount, 0),
            Kind::Debit => (-amount, 0),
            Kind::Hold => (-amount, amount),
            Kind::Capture => (0, -amount),
            Kind::Release => (amount, -amount),
        }
    }
}

/// One balance change to apply and record.
struct Entry<'a> {
    account: &'a str,
    kind: Kind,
    amount: i64,
    hold_id: Option<&'a str>,
    idempotency_key: Option<&'a str>,
    route: Option<&'a str>,
    key_prefix: Option<&'a str>,
    note: Option<&'a str>,
    created_at: i64,
}

impl<'a> Entry<'a> {
    fn new(account: &'a str, kind: Kind, amount: i64, created_at: i64) -> Entry<'a> {
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
fn apply(tx: &dyn Sql, cur: AccountSummary, e: &Entry<'_>) -> Result<AccountSummary> {
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
    tx.exec(
        "UPDATE accounts SET balance = ?2, held = ?3 WHERE id = ?1",
        &vals![e.account, balance, held],
    )?;
    tx.exec(
        "INSERT INTO ledger (account, kind, delta_available, delta_held, amount, hold_id, \
         idempotency_key, route, key_prefix, note, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        &vals![
            e.account,
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
        ],
    )?;
    Ok(AccountSummary { balance, held })
}

/// Lock the account row (PostgreSQL: `FOR UPDATE`; SQLite already holds the
/// database write lock) and read it. `None` for an unknown account.
fn lock_account(tx: &dyn Sql, account: &str) -> Result<Option<AccountSummary>> {
    match tx.row(
        "SELECT balance, held FROM accounts WHERE id = ?1 FOR UPDATE",
        &vals![account],
    )? {
        None => Ok(None),
        Some(r) => Ok(Some(AccountSummary {
            balance: r.i64(0)?,
            held: r.i64(1)?,
        })),
    }
}

/// Create the account with nothing in it if it does not exist. Returns true
/// when it was created.
fn ensure_account(tx: &dyn Sql, account: &str, now: i64) -> Result<bool> {
    Ok(tx.exec(
        "INSERT INTO accounts (id, balance, held, created_at) VALUES (?1, 0, 0, ?2) \
         ON CONFLICT DO NOTHING",
        &vals![account, now],
    )? == 1)
}

/// Release every open hold of `account` whose time is up (`expires_at <=
/// now`). The caller holds the account's lock and passes its state.
fn expire_account_holds(
    tx: &dyn Sql,
    account: &str,
    mut cur: AccountSummary,
    now: i64,
) -> Result<AccountSummary> {
    let due = tx.rows(
        "SELECT id, amount, idempotency_key, route, key_prefix FROM holds \
         WHERE account = ?1 AND state = 'open' AND expires_at <= ?2 ORDER BY expires_at, id",
        &vals![account, now],
    )?;
    for r in due {
        let (id, amount) = (r.text(0)?, r.i64(1)?);
        let (key, route, prefix) = (r.opt_text(2)?, r.opt_text(3)?, r.opt_text(4)?);
        tx.exec(
            "UPDATE holds SET state = 'released', release_reason = 'expired', settled_at = ?2 \
             WHERE id = ?1 AND state = 'open'",
            &vals![&id, now],
        )?;
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
        )?;
    }
    Ok(cur)
}

/// Lock the account and expire its due holds: the start of every money
/// transaction on an existing account.
fn lock_and_expire(tx: &dyn Sql, account: &str, now: i64) -> Result<Option<AccountSummary>> {
    match lock_account(tx, account)? {
        None => Ok(None),
        Some(cur) => Ok(Some(expire_account_holds(tx, account, cur, now)?)),
    }
}

/// Take one token from the account's bucket.
///
/// Exact integer arithmetic: one token is `scale = window_seconds * 1000`
/// units, the bucket holds up to `burst * scale` units and refills `requests`
/// units per millisecond (= requests / window_seconds tokens per second).
fn rate_take(tx: &dyn Sql, account: &str, rl: &RateLimit, now_ms: i64) -> Result<RateDecision> {
    rl.validate()?;
    let scale = rl.window_seconds.saturating_mul(1000);
    let capacity = i128::from(rl.burst) * i128::from(scale);
    let cap_i64 = i64::try_from(capacity).unwrap_or(i64::MAX);
    tx.exec(
        "INSERT INTO rate_buckets (account, units, scale, updated_ms) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT DO NOTHING",
        &vals![account, cap_i64, scale, now_ms],
    )?;
    let row = tx
        .row(
            "SELECT units, scale, updated_ms FROM rate_buckets WHERE account = ?1 FOR UPDATE",
            &vals![account],
        )?
        .ok_or_else(|| StoreError::Corrupt("rate bucket vanished".into()))?;
    let (mut units, old_scale, updated_ms) = (
        i128::from(row.i64(0)?),
        i128::from(row.i64(1)?.max(1)),
        row.i64(2)?,
    );
    if old_scale != i128::from(scale) {
        // The limit changed: keep the same fraction of a token.
        units = units * i128::from(scale) / old_scale;
    }
    let elapsed = i128::from(now_ms.saturating_sub(updated_ms).max(0));
    units = (units + elapsed * i128::from(rl.requests)).min(capacity);
    let cost = i128::from(scale);
    let decision = if units >= cost {
        units -= cost;
        RateDecision::Allowed {
            remaining: i64::try_from(units / cost).unwrap_or(i64::MAX),
        }
    } else {
        let missing = cost - units;
        let rate = i128::from(rl.requests);
        let wait_ms = (missing + rate - 1) / rate;
        let secs = ((wait_ms + 999) / 1000).max(1);
        RateDecision::Limited {
            retry_after_seconds: i64::try_from(secs).unwrap_or(i64::MAX),
        }
    };
    tx.exec(
        "UPDATE rate_buckets SET units = ?2, scale = ?3, updated_ms = ?4 WHERE account = ?1",
        &vals![
            account,
            i64::try_from(units).unwrap_or(i64::MAX),
            scale,
            updated_ms.max(now_ms)
        ],
    )?;
    Ok(decision)
}

fn random_hold_id() -> Result<String> {
    Ok(format!("hold_{}", keys::random_hex(12)?))
}

/// The connection behind a [`Store`].
enum Backend {
    Sqlite(rusqlite::Connection),
    Postgres(Box<crate::pg::PgConn>),
}

impl Sql for Backend {
    fn dialect(&self) -> Dialect {
        match self {
            Backend::Sqlite(c) => c.dialect(),
            Backend::Postgres(c) => c.dialect(),
        }
    }

    fn exec(&self, sql: &str, params: &[Val]) -> Result<u64> {
        match self {
            Backend::Sqlite(c) => c.exec(sql, params),
            Backend::Postgres(c) => c.exec(sql, params),
        }
    }

    fn rows(&self, sql: &str, params: &[Val]) -> Result<Vec<Row>> {
        match self {
            Backend::Sqlite(c) => c.rows(sql, params),
            Backend::Postgres(c) => c.rows(sql, params),
        }
    }
}

/// Rolls an open SQLite transaction back unless disarmed (also on unwind).
struct SqliteTx<'a> {
    conn: &'a rusqlite::Connection,
    open: bool,
}

impl Drop for SqliteTx<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

fn sqlite_transaction<T>(
    conn: &rusqlite::Connection,
    begin: &str,
    f: &mut dyn FnMut(&dyn Sql) -> Result<T>,
) -> Result<T> {
    conn.execute_batch(begin)?;
    let mut guard = SqliteTx { conn, open: true };
    let value = f(conn)?;
    conn.execute_batch("COMMIT")?;
    guard.open = false;
    Ok(value)
}

/// True for a `--db` value that names a PostgreSQL database.
pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// One connection to the credits database.
pub struct Store {
    backend: Backend,
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
        let conn = crate::pg::PgConn::connect(url)?;
        conn.migrate()?;
        Ok(Store {
            backend: Backend::Postgres(Box::new(conn)),
        })
    }

    /// Open (creating if needed) the database file, switch it to WAL and bring
    /// the schema up to date.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        let conn = rusqlite::Connection::open(path)?;
        Self::configure(conn)
    }

    /// A private in-memory database (handy for quick tests; not shared).
    pub fn open_in_memory() -> Result<Store> {
        Self::configure(rusqlite::Connection::open_in_memory()?)
    }

    fn configure(conn: rusqlite::Connection) -> Result<Store> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL lets readers proceed while one writer commits; the mode is
        // persistent in the file, so this is a no-op after the first open.
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        // FULL: a committed top-up or debit survives power loss, not just a
        // process crash. The cost (one fsync per commit) is fine at this scale.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = Store {
            backend: Backend::Sqlite(conn),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Which database this store talks to.
    pub fn dialect(&self) -> Dialect {
        self.backend.dialect()
    }

    /// Schema version of this binary (number of SQLite migrations).
    pub fn supported_schema_version() -> i64 {
        i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
    }

    /// Schema version recorded in the database.
    pub fn schema_version(&self) -> Result<i64> {
        match &self.backend {
            Backend::Sqlite(c) => Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?),
            Backend::Postgres(c) => c.schema_version(),
        }
    }

    fn migrate(&mut self) -> Result<()> {
        let Backend::Sqlite(conn) = &mut self.backend else {
            return Ok(());
        };
        let supported = Self::supported_schema_version();
        let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if current == supported {
            return Ok(());
        }
        // Immediate: if two processes open a fresh file at once, one migrates
        // and the other waits, then re-reads the version and does nothing.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > supported {
            return Err(StoreError::SchemaTooNew { found, supported });
        }
        let done = usize::try_from(found).unwrap_or(0);
        for sql in MIGRATIONS.iter().skip(done) {
            tx.execute_batch(sql)?;
        }
        tx.pragma_update(None, "user_version", supported)?;
        tx.commit()?;
        Ok(())
    }

    /// Run `f` in a write transaction: SQLite `BEGIN IMMEDIATE`; PostgreSQL
    /// `BEGIN` (callers lock account rows with `FOR UPDATE`), retried on
    /// serialization failures, deadlocks and unique-key races. Commits when
    /// `f` returns `Ok`, rolls back otherwise.
    fn write<T>(&mut self, mut f: impl FnMut(&dyn Sql) -> Result<T>) -> Result<T> {
        match &mut self.backend {
            Backend::Sqlite(conn) => sqlite_transaction(conn, "BEGIN IMMEDIATE", &mut f),
            Backend::Postgres(conn) => conn.transaction(false, &mut f),
        }
    }

    /// Run `f` on one consistent snapshot (read-only).
    fn read<T>(&mut self, mut f: impl FnMut(&dyn Sql) -> Result<T>) -> Result<T> {
        match &mut self.backend {
            Backend::Sqlite(conn) => sqlite_transaction(conn, "BEGIN", &mut f),
            Backend::Postgres(conn) => conn.transaction(true, &mut f),
        }
    }

    /// Run one raw statement (operators' and tests' escape hatch; the
    /// ledger triggers still apply).
    #[doc(hidden)]
    pub fn raw_execute(&mut self, sql: &str) -> Result<u64> {
        self.backend.exec(sql, &[])
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
        validate_account_id(account)?;
        if initial_credits < 0 {
            return Err(StoreError::Invalid("credits must be >= 0".into()));
        }
        self.write(|tx| {
            let created = ensure_account(tx, account, now)?;
            let mut cur = lock_account(tx, account)?
                .ok_or_else(|| StoreError::Corrupt("account vanished".into()))?;
            if created && initial_credits > 0 {
                tx.exec(
                    "INSERT INTO topups (account, amount, created_at, note) VALUES (?1, ?2, ?3, 'initial credits')",
                    &vals![account, initial_credits, now],
                )?;
                cur = apply(
                    tx,
                    cur,
                    &Entry {
                        note: Some("initial credits"),
                        ..Entry::new(account, Kind::Topup, initial_credits, now)
                    },
                )?;
            }
            Ok(AccountOutcome {
                account: account.to_string(),
                balance: cur.balance,
                created,
            })
        })
    }

    /// Current available balance, or `None` for an unknown account (as
    /// stored: holds past their expiry are released by the next write).
    pub fn balance(&self, account: &str) -> Result<Option<i64>> {
        match self
            .backend
            .row("SELECT balance FROM accounts WHERE id = ?1", &vals![account])?
        {
            None => Ok(None),
            Some(r) => Ok(Some(r.i64(0)?)),
        }
    }

    /// Balance and held credits, after releasing holds past their expiry.
    pub fn account_summary(&mut self, account: &str, now: i64) -> Result<Option<AccountSummary>> {
        self.write(|tx| lock_and_expire(tx, account, now))
    }

    /// Σ delta_available over the account's ledger: must always equal the
    /// balance (see [`Store::check`]).
    pub fn ledger_balance(&self, account: &str) -> Result<i64> {
        self.backend.int(
            "SELECT CAST(COALESCE(SUM(delta_available), 0) AS BIGINT) FROM ledger WHERE account = ?1",
            &vals![account],
        )
    }

    /// The newest `limit` ledger rows of an account, newest first.
    pub fn ledger(&self, account: &str, limit: i64) -> Result<Vec<LedgerEntry>> {
        let limit = limit.clamp(1, MAX_LEDGER_LIMIT);
        self.backend
            .rows(
                &format!(
                    "SELECT {LEDGER_COLUMNS} FROM ledger WHERE account = ?1 ORDER BY id DESC LIMIT ?2"
                ),
                &vals![account, limit],
            )?
            .iter()
            .map(ledger_from_row)
            .collect()
    }

    /// Number of ledger rows (all accounts).
    pub fn ledger_row_count(&self) -> Result<i64> {
        self.backend.int("SELECT COUNT(*) FROM ledger", &[])
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
        validate_account_id(account)?;
        validate_optional_text("note", note)?;
        if amount < 1 {
            return Err(StoreError::Invalid("top-up amount must be >= 1".into()));
        }
        if let Some(k) = idempotency_key {
            validate_idempotency_key("idempotency key", k)?;
        }
        self.write(|tx| {
            ensure_account(tx, account, now)?;
            let cur = lock_and_expire(tx, account, now)?
                .ok_or_else(|| StoreError::Corrupt("account vanished".into()))?;
            if let Some(k) = idempotency_key {
                if let Some(prior) = tx.row(
                    "SELECT account, amount FROM topups WHERE idempotency_key = ?1",
                    &vals![k],
                )? {
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
                "INSERT INTO topups (account, amount, created_at, note, idempotency_key) VALUES (?1, ?2, ?3, ?4, ?5)",
                &vals![account, amount, now, note, idempotency_key],
            )?;
            let after = apply(
                tx,
                cur,
                &Entry {
                    idempotency_key,
                    note,
                    ..Entry::new(account, Kind::Topup, amount, now)
                },
            )?;
            Ok(TopupReceipt {
                account: account.to_string(),
                amount,
                balance: after.balance,
                replayed: false,
            })
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
        validate_charge(&req.account, req.amount, &req.idempotency_key, req.route.as_deref(), req.key_prefix.as_deref(), rate)?;
        let now = now_ms.div_euclid(1000);
        self.write(|tx| {
            // The lock is taken here, before the balance is read, so no other
            // connection can change it between our check and our update.
            let cur = lock_and_expire(tx, &req.account, now)?;
            if let Some(prior) = tx.row(
                "SELECT account, amount, balance_after FROM debits WHERE idempotency_key = ?1",
                &vals![&req.idempotency_key],
            )? {
                let (account, amount) = (prior.text(0)?, prior.i64(1)?);
                // A retry must describe the same charge; anything else is a
                // client bug that must not be silently "replayed".
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
                } = rate_take(tx, &req.account, rl, now_ms)?
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
            tx.exec(
                "INSERT INTO debits (idempotency_key, account, amount, balance_after, route, key_prefix, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                &vals![
                    &req.idempotency_key,
                    &req.account,
                    req.amount,
                    balance_after,
                    &req.route,
                    &req.key_prefix,
                    now
                ],
            )?;
            apply(
                tx,
                cur,
                &Entry {
                    idempotency_key: Some(&req.idempotency_key),
                    route: req.route.as_deref(),
                    key_prefix: req.key_prefix.as_deref(),
                    ..Entry::new(&req.account, Kind::Debit, req.amount, now)
                },
            )?;
            Ok(DebitOutcome::Charged {
                account: req.account.clone(),
                charged: req.amount,
                balance: balance_after,
                replayed: false,
            })
        })
    }

    /// The stored debit for an idempotency key, if any.
    pub fn debit_record(&self, idempotency_key: &str) -> Result<Option<DebitRecord>> {
        let Some(r) = self.backend.row(
            "SELECT idempotency_key, account, amount, balance_after, route, key_prefix, created_at \
             FROM debits WHERE idempotency_key = ?1",
            &vals![idempotency_key],
        )?
        else {
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

    /// Number of debits recorded for an account.
    pub fn debit_count(&self, account: &str) -> Result<i64> {
        self.backend.int(
            "SELECT COUNT(*) FROM debits WHERE account = ?1",
            &vals![account],
        )
    }

    // ----- rate limits ----------------------------------------------------

    /// Take one request from the account's token bucket (shared by all its
    /// keys and sessions, and by every service instance on this database).
    pub fn rate_limit(&mut self, account: &str, rl: &RateLimit, now_ms: i64) -> Result<RateDecision> {
        validate_account_id(account)?;
        rl.validate()?;
        self.write(|tx| rate_take(tx, account, rl, now_ms))
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
        validate_charge(&req.account, req.amount, &req.idempotency_key, req.route.as_deref(), req.key_prefix.as_deref(), rate)?;
        if !HOLD_TTL_SECONDS.contains(&req.ttl_seconds) {
            return Err(StoreError::Invalid(format!(
                "ttl_seconds must be {}..={}",
                HOLD_TTL_SECONDS.start(),
                HOLD_TTL_SECONDS.end()
            )));
        }
        let now = now_ms.div_euclid(1000);
        self.write(|tx| {
            let cur = lock_and_expire(tx, &req.account, now)?;
            if let Some(prior) = tx.row(
                "SELECT id, account, amount, balance_after, expires_at FROM holds WHERE idempotency_key = ?1",
                &vals![&req.idempotency_key],
            )? {
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
                } = rate_take(tx, &req.account, rl, now_ms)?
                {
                    return Ok(HoldOutcome::RateLimited {
                        retry_after_seconds,
                    });
                }
            }
            let balance = cur.map_or(0, |c| c.balance);
            let Some(cur) = cur.filter(|c| c.balance >= req.amount) else {
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
                 key_prefix, created_at, expires_at) VALUES (?1, ?2, ?3, 'open', ?4, ?5, ?6, ?7, ?8, ?9)",
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
            )?;
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
            )?;
            Ok(HoldOutcome::Held(HoldReceipt {
                hold_id: hold_id.clone(),
                account: req.account.clone(),
                amount: req.amount,
                balance: balance_after,
                expires_at,
                replayed: false,
            }))
        })
    }

    /// Charge an open hold. Capturing a captured hold answers the same
    /// again; a released (or expired) hold cannot be captured.
    pub fn capture_hold(&mut self, hold_id: &str, now: i64) -> Result<SettleOutcome> {
        self.settle(hold_id, None, now)
    }

    /// Give an open hold's credits back. Releasing a released hold answers
    /// the same again; a captured hold cannot be released (refund it).
    pub fn release_hold(
        &mut self,
        hold_id: &str,
        reason: ReleaseReason,
        now: i64,
    ) -> Result<SettleOutcome> {
        self.settle(hold_id, Some(reason), now)
    }

    /// `release == None` captures.
    fn settle(
        &mut self,
        hold_id: &str,
        release: Option<ReleaseReason>,
        now: i64,
    ) -> Result<SettleOutcome> {
        if hold_id.is_empty() || hold_id.chars().count() > MAX_TEXT_CHARS {
            return Ok(SettleOutcome::NotFound);
        }
        self.write(|tx| {
            let Some(h) = tx.row("SELECT account FROM holds WHERE id = ?1", &vals![hold_id])? else {
                return Ok(SettleOutcome::NotFound);
            };
            let account = h.text(0)?;
            // Expire first: an expired hold is released, never captured.
            let cur = lock_and_expire(tx, &account, now)?
                .ok_or_else(|| StoreError::Corrupt(format!("hold {hold_id} has no account")))?;
            let h = tx
                .row(
                    "SELECT amount, state, release_reason, idempotency_key, route, key_prefix \
                     FROM holds WHERE id = ?1",
                    &vals![hold_id],
                )?
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
                        "UPDATE holds SET state = 'released', release_reason = ?2, settled_at = ?3 \
                         WHERE id = ?1 AND state = 'open'",
                        &vals![hold_id, r.as_str(), now],
                    )?;
                    (Kind::Release, Some(r))
                }
                None => {
                    tx.exec(
                        "UPDATE holds SET state = 'captured', settled_at = ?2 WHERE id = ?1 AND state = 'open'",
                        &vals![hold_id, now],
                    )?;
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
            )?;
            Ok(settled(wanted, after, reason))
        })
    }

    /// Release every open hold past its expiry (the sweeper). Returns how
    /// many were released.
    pub fn expire_holds(&mut self, now: i64) -> Result<usize> {
        let accounts = self.backend.rows(
            "SELECT DISTINCT account FROM holds WHERE state = 'open' AND expires_at <= ?1 ORDER BY account",
            &vals![now],
        )?;
        let mut released = 0usize;
        for r in accounts {
            let account = r.text(0)?;
            released += self.write(|tx| {
                let due = tx.int(
                    "SELECT COUNT(*) FROM holds WHERE account = ?1 AND state = 'open' AND expires_at <= ?2",
                    &vals![&account, now],
                )?;
                lock_and_expire(tx, &account, now)?;
                Ok(usize::try_from(due).unwrap_or(0))
            })?;
        }
        Ok(released)
    }

    /// State of a hold (for operators and tests).
    pub fn hold_state(&self, hold_id: &str) -> Result<Option<(HoldState, Option<ReleaseReason>)>> {
        match self.backend.row(
            "SELECT state, release_reason FROM holds WHERE id = ?1",
            &vals![hold_id],
        )? {
            None => Ok(None),
            Some(r) => Ok(Some((
                decode_hold_state(&r.text(0)?)?,
                r.opt_text(1)?.as_deref().and_then(ReleaseReason::parse),
            ))),
        }
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
        validate_idempotency_key("idempotency_key", idempotency_key)?;
        validate_optional_text("note", note)?;
        self.write(|tx| {
            let debit = tx.row(
                "SELECT account, amount, route, key_prefix FROM debits WHERE idempotency_key = ?1",
                &vals![idempotency_key],
            )?;
            let hold = tx.row(
                "SELECT id, account, amount, state, route, key_prefix FROM holds WHERE idempotency_key = ?1",
                &vals![idempotency_key],
            )?;
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
            let cur = lock_and_expire(tx, &account, now)?
                .ok_or_else(|| StoreError::Corrupt(format!("account {account} vanished")))?;
            let done = tx.int(
                "SELECT COUNT(*) FROM ledger WHERE kind = 'refund' AND idempotency_key = ?1 \
                 AND COALESCE(hold_id, '') = ?2",
                &vals![idempotency_key, hold_id.as_deref().unwrap_or("")],
            )?;
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
            )?;
            Ok(RefundOutcome::Refunded {
                account: account.clone(),
                amount,
                balance: after.balance,
                idempotency_key: idempotency_key.to_string(),
                hold_id: hold_id.clone(),
            })
        })
    }

    // ----- consistency ----------------------------------------------------

    /// Verify the money invariants on one snapshot. See [`CheckReport`].
    pub fn check(&mut self) -> Result<CheckReport> {
        self.read(|tx| {
            let mut problems = Vec::new();
            let accounts = tx.int("SELECT COUNT(*) FROM accounts", &[])?;
            let ledger_rows = tx.int("SELECT COUNT(*) FROM ledger", &[])?;
            for r in tx.rows(
                "SELECT a.id, a.balance, a.held, \
                 CAST(COALESCE((SELECT SUM(l.delta_available) FROM ledger l WHERE l.account = a.id), 0) AS BIGINT), \
                 CAST(COALESCE((SELECT SUM(l.delta_held) FROM ledger l WHERE l.account = a.id), 0) AS BIGINT), \
                 CAST(COALESCE((SELECT SUM(h.amount) FROM holds h WHERE h.account = a.id AND h.state = 'open'), 0) AS BIGINT) \
                 FROM accounts a ORDER BY a.id",
                &[],
            )? {
                let (id, balance, held) = (r.text(0)?, r.i64(1)?, r.i64(2)?);
                let (sum_avail, sum_held, open) = (r.i64(3)?, r.i64(4)?, r.i64(5)?);
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
                        "account {id}: held {held} != sum of open holds {open}"
                    ));
                }
                if balance < 0 {
                    problems.push(format!("account {id}: negative balance {balance}"));
                }
                if held < 0 {
                    problems.push(format!("account {id}: negative held {held}"));
                }
            }
            for r in tx.rows(
                "SELECT h.id, h.state, h.amount, \
                 (SELECT COUNT(*) FROM ledger l WHERE l.hold_id = h.id AND l.kind = 'hold'), \
                 (SELECT COUNT(*) FROM ledger l WHERE l.hold_id = h.id AND l.kind = 'capture'), \
                 (SELECT COUNT(*) FROM ledger l WHERE l.hold_id = h.id AND l.kind = 'release'), \
                 (SELECT COUNT(*) FROM ledger l WHERE l.hold_id = h.id AND l.amount <> h.amount) \
                 FROM holds h ORDER BY h.id",
                &[],
            )? {
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
                    problems.push(format!("hold {id}: {wrong} ledger rows with another amount"));
                }
            }
            for r in tx.rows(
                "SELECT l.id, COALESCE(l.idempotency_key, '') FROM ledger l WHERE l.kind = 'debit' AND NOT EXISTS \
                 (SELECT 1 FROM debits d WHERE d.idempotency_key = l.idempotency_key \
                  AND d.account = l.account AND d.amount = l.amount) ORDER BY l.id",
                &[],
            )? {
                problems.push(format!(
                    "ledger row {}: debit {:?} has no matching debits record",
                    r.i64(0)?,
                    r.text(1)?
                ));
            }
            for r in tx.rows(
                "SELECT d.idempotency_key FROM debits d WHERE NOT EXISTS \
                 (SELECT 1 FROM ledger l WHERE l.kind = 'debit' AND l.idempotency_key = d.idempotency_key) \
                 ORDER BY d.idempotency_key",
                &[],
            )? {
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
            )? {
                problems.push(format!(
                    "ledger row {}: refund of {:?} {} matches no debit or captured hold",
                    r.i64(0)?,
                    r.text(1)?,
                    r.text(2)?
                ));
            }
            Ok(CheckReport {
                accounts,
                ledger_rows,
                problems,
            })
        })
    }

    // ----- keys -----------------------------------------------------------

    /// Mint a credential with fresh OS randomness. See [`Store::create_key_with`].
    pub fn create_key(&mut self, new: &NewKey, now: i64) -> Result<CreatedKey> {
        self.create_key_with(new, now, &mut |kind| Ok(keys::generate_secret(kind)?))
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
        validate_account_id(&new.account)?;
        validate_optional_text("name", new.name.as_deref())?;
        for scope in &new.scopes {
            keys::validate_scope(scope).map_err(StoreError::Invalid)?;
        }
        if new.kind == KeyKind::ApiKey && new.expiry != Expiry::Never {
            return Err(StoreError::Invalid(
                "api keys never expire; an expiry applies to api tokens only".into(),
            ));
        }
        let expires_at = new.expiry.expires_at(now);
        let scopes_json = encode_scopes(&new.scopes)?;

        // The token-count check and the prefix-uniqueness check must hold at
        // the moment of insert, even with concurrent minting: both run under
        // the account's lock.
        self.write(|tx| {
            ensure_account(tx, &new.account, now)?;
            lock_account(tx, &new.account)?;
            if new.kind == KeyKind::ApiToken {
                let active = tx.int(
                    &format!(
                        "SELECT COUNT(*) FROM keys k WHERE k.account = ?1 AND k.kind = 'api_token' AND {}",
                        active_sql(2)
                    ),
                    &vals![&new.account, now],
                )?;
                if active >= MAX_ACTIVE_API_TOKENS {
                    return Err(StoreError::TooManyTokens {
                        account: new.account.clone(),
                        limit: MAX_ACTIVE_API_TOKENS,
                    });
                }
            }

            let mut minted = None;
            for _ in 0..PREFIX_ATTEMPTS {
                let secret = generate(new.kind)?;
                let (kind, prefix) = keys::parse_secret(&secret)
                    .filter(|(kind, _)| *kind == new.kind)
                    .ok_or_else(|| StoreError::Invalid("generated secret is malformed".into()))?;
                // Prefixes identify keys to operators (`key revoke PREFIX`), so
                // they must be unique across all stored keys: regenerate on clash.
                let taken = tx.int("SELECT COUNT(*) FROM keys WHERE prefix = ?1", &vals![&prefix])?;
                if taken == 0 {
                    minted = Some((secret, kind, prefix));
                    break;
                }
            }
            let (secret, kind, prefix) = minted.ok_or_else(|| {
                StoreError::Invalid("could not find an unused key prefix; try again".into())
            })?;

            tx.exec(
                "INSERT INTO keys (key_sha256, prefix, account, kind, scopes, name, created_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                &vals![
                    keys::sha256_hex(&secret),
                    &prefix,
                    &new.account,
                    kind.as_str(),
                    &scopes_json,
                    &new.name,
                    now,
                    expires_at
                ],
            )?;
            Ok(CreatedKey {
                secret,
                prefix,
                account: new.account.clone(),
                kind,
                scopes: new.scopes.clone(),
                name: new.name.clone(),
                created_at: now,
                expires_at,
            })
        })
    }

    /// Look a key up by the SHA-256 of its secret. Revoked and expired keys
    /// are returned too (their `state` tells) so the filter can answer 401
    /// precisely. Marks active keys as used at `now`. Reads the key row on
    /// every call (no cache), so a revocation applies to the next request.
    /// Releases the account's expired holds first, so `balance` is current.
    pub fn lookup_key(&mut self, key_sha256: &str, now: i64) -> Result<Option<KeyLookup>> {
        if !keys::is_sha256_hex(key_sha256) {
            return Err(StoreError::Invalid(
                "key_sha256 must be 64 lowercase hex characters".into(),
            ));
        }
        self.write(|tx| {
            let Some(row) = tx.row(
                &format!("SELECT {KEY_COLUMNS} FROM keys k WHERE k.key_sha256 = ?1"),
                &vals![key_sha256],
            )?
            else {
                return Ok(None);
            };
            let mut key = key_from_row(&row, now)?;
            let due = tx.int(
                "SELECT COUNT(*) FROM holds WHERE account = ?1 AND state = 'open' AND expires_at <= ?2",
                &vals![&key.account, now],
            )?;
            if due > 0 {
                lock_and_expire(tx, &key.account, now)?;
            }
            if key.state == KeyState::Active {
                tx.exec(
                    "UPDATE keys SET last_used_at = ?2 WHERE key_sha256 = ?1",
                    &vals![key_sha256, now],
                )?;
                key.last_used_at = Some(now);
            }
            let balance = match tx.row(
                "SELECT balance FROM accounts WHERE id = ?1",
                &vals![&key.account],
            )? {
                Some(r) => r.i64(0)?,
                None => 0,
            };
            Ok(Some(KeyLookup { key, balance }))
        })
    }

    /// All keys of an account, oldest first (creation order; never hashes or secrets).
    pub fn list_keys(&self, account: &str, now: i64) -> Result<Vec<KeyRecord>> {
        let order = match self.dialect() {
            Dialect::Sqlite => "k.rowid",
            Dialect::Postgres => "k.seq",
        };
        self.backend
            .rows(
                &format!(
                    "SELECT {KEY_COLUMNS} FROM keys k WHERE k.account = ?1 ORDER BY k.created_at, {order}"
                ),
                &vals![account],
            )?
            .iter()
            .map(|r| key_from_row(r, now))
            .collect()
    }

    /// Number of active API tokens an account holds at `now`.
    pub fn active_token_count(&self, account: &str, now: i64) -> Result<i64> {
        self.backend.int(
            &format!(
                "SELECT COUNT(*) FROM keys k WHERE k.account = ?1 AND k.kind = 'api_token' AND {}",
                active_sql(2)
            ),
            &vals![account, now],
        )
    }

    /// Revoke the single active key with this prefix.
    pub fn revoke_by_prefix(&mut self, prefix: &str, now: i64) -> Result<RevokedKey> {
        if !keys::is_valid_prefix(prefix) {
            return Err(StoreError::Invalid(
                "a key prefix is 8 lowercase hex characters".into(),
            ));
        }
        self.write(|tx| {
            let matches = tx.rows(
                &format!(
                    "SELECT k.key_sha256, k.account, k.kind FROM keys k WHERE k.prefix = ?1 AND {} FOR UPDATE",
                    active_sql(2)
                ),
                &vals![prefix, now],
            )?;
            let one = match matches.as_slice() {
                [] => return Err(StoreError::KeyNotFound(prefix.to_string())),
                [one] => one,
                many => {
                    return Err(StoreError::AmbiguousPrefix {
                        prefix: prefix.to_string(),
                        matches: many.len(),
                    })
                }
            };
            let (hash, account, kind) = (one.text(0)?, one.text(1)?, one.text(2)?);
            tx.exec(
                "UPDATE keys SET revoked_at = ?2 WHERE key_sha256 = ?1",
                &vals![&hash, now],
            )?;
            Ok(RevokedKey {
                prefix: prefix.to_string(),
                account,
                kind: decode_kind(&kind)?,
                revoked_at: now,
            })
        })
    }
}
