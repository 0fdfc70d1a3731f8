//! SQLite storage, schema migrations and the money rules.
//!
//! Rules enforced here (and by the schema as a last line of defence):
//! - balances are integers and never negative (`CHECK(balance >= 0)`);
//! - every write that reads-then-writes runs in a `BEGIN IMMEDIATE`
//!   transaction, which takes SQLite's single write lock *before* reading, so
//!   two connections — even in two processes on the same file — can never
//!   both see the same balance and overdraw it;
//! - debits are idempotent on `idempotency_key`: a retry returns the original
//!   result and charges nothing; reusing a key for a different charge is a
//!   conflict;
//! - a refused debit (insufficient credits) records nothing, so the same
//!   idempotency key can succeed later after a top-up.
//!
//! Time is always passed in (`now`, unix seconds) rather than read here, so
//! tests can drive expiry deterministically.

use crate::keys::{self, Expiry, KeyKind, KeyState, MAX_ACTIVE_API_TOKENS};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
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
/// Prefix collisions are astronomically rare; retrying a few times is plenty.
const PREFIX_ATTEMPTS: usize = 8;

/// Schema migrations, applied in order. `PRAGMA user_version` records how many
/// have run. Append new entries; never edit an entry that has shipped.
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
];

/// Current unix time in seconds (the production clock; tests pass their own).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Everything that can go wrong in the store.
#[derive(Debug)]
pub enum StoreError {
    /// SQLite failure (I/O, lock timeout, constraint...).
    Db(rusqlite::Error),
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

fn decode_kind(s: &str) -> Result<KeyKind> {
    KeyKind::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown key kind {s:?}")))
}

fn decode_scopes(s: &str) -> Result<Vec<String>> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("scopes column: {e}")))
}

fn encode_scopes(scopes: &[String]) -> Result<String> {
    serde_json::to_string(scopes).map_err(|e| StoreError::Corrupt(format!("scopes: {e}")))
}

/// Raw key columns, decoded into a [`KeyRecord`] once outside rusqlite's
/// row closure (whose error type cannot carry our errors).
struct KeyRow {
    prefix: String,
    account: String,
    kind: String,
    scopes: String,
    name: Option<String>,
    created_at: i64,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    last_used_at: Option<i64>,
}

impl KeyRow {
    /// Columns in the order [`KeyRow::from_row`] expects.
    const COLUMNS: &'static str = "k.prefix, k.account, k.kind, k.scopes, k.name, k.created_at, \
                                   k.expires_at, k.revoked_at, k.last_used_at";

    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
        Ok(KeyRow {
            prefix: row.get(0)?,
            account: row.get(1)?,
            kind: row.get(2)?,
            scopes: row.get(3)?,
            name: row.get(4)?,
            created_at: row.get(5)?,
            expires_at: row.get(6)?,
            revoked_at: row.get(7)?,
            last_used_at: row.get(8)?,
        })
    }

    fn into_record(self, now: i64) -> Result<KeyRecord> {
        Ok(KeyRecord {
            state: KeyState::compute(self.revoked_at, self.expires_at, now),
            kind: decode_kind(&self.kind)?,
            scopes: decode_scopes(&self.scopes)?,
            prefix: self.prefix,
            account: self.account,
            name: self.name,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            last_used_at: self.last_used_at,
        })
    }
}

/// SQL condition selecting active keys (alias `k`, `?now` bound by name).
const ACTIVE_SQL: &str = "k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > :now)";

/// One connection to the credits database.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Open (creating if needed) the database file, switch it to WAL and bring
    /// the schema up to date.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        let conn = Connection::open(path)?;
        Self::configure(conn)
    }

    /// A private in-memory database (handy for quick tests; not shared).
    pub fn open_in_memory() -> Result<Store> {
        Self::configure(Connection::open_in_memory()?)
    }

    fn configure(conn: Connection) -> Result<Store> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL lets readers proceed while one writer commits; the mode is
        // persistent in the file, so this is a no-op after the first open.
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        // FULL: a committed top-up or debit survives power loss, not just a
        // process crash. The cost (one fsync per commit) is fine at this scale.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    /// Schema version of this binary (number of migrations).
    pub fn supported_schema_version() -> i64 {
        i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
    }

    /// Schema version recorded in the file.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    fn migrate(&mut self) -> Result<()> {
        let supported = Self::supported_schema_version();
        if self.schema_version()? == supported {
            return Ok(());
        }
        // Immediate: if two processes open a fresh file at once, one migrates
        // and the other waits, then re-reads the version and does nothing.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
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
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let created = tx.execute(
            "INSERT OR IGNORE INTO accounts (id, balance, created_at) VALUES (?1, ?2, ?3)",
            params![account, initial_credits, now],
        )? == 1;
        if created && initial_credits > 0 {
            tx.execute(
                "INSERT INTO topups (account, amount, created_at, note) VALUES (?1, ?2, ?3, 'initial credits')",
                params![account, initial_credits, now],
            )?;
        }
        let balance: i64 = tx.query_row(
            "SELECT balance FROM accounts WHERE id = ?1",
            [account],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(AccountOutcome {
            account: account.to_string(),
            balance,
            created,
        })
    }

    /// Current balance, or `None` for an unknown account.
    pub fn balance(&self, account: &str) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT balance FROM accounts WHERE id = ?1",
                [account],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Sum of top-ups minus sum of debits: must always equal the balance.
    /// Used by tests and as an audit aid.
    pub fn ledger_balance(&self, account: &str) -> Result<i64> {
        Ok(self.conn.query_row(
            "SELECT (SELECT COALESCE(SUM(amount), 0) FROM topups WHERE account = ?1) \
                  - (SELECT COALESCE(SUM(amount), 0) FROM debits WHERE account = ?1)",
            [account],
            |r| r.get(0),
        )?)
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
            let n = k.chars().count();
            if n == 0 || n > MAX_IDEMPOTENCY_KEY_CHARS {
                return Err(StoreError::Invalid(format!(
                    "idempotency key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} characters"
                )));
            }
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(k) = idempotency_key {
            let prior: Option<(String, i64)> = tx
                .query_row(
                    "SELECT account, amount FROM topups WHERE idempotency_key = ?1",
                    [k],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((prior_account, prior_amount)) = prior {
                if prior_account != account || prior_amount != amount {
                    return Err(StoreError::IdempotencyConflict(k.to_string()));
                }
                let balance: i64 = tx.query_row(
                    "SELECT balance FROM accounts WHERE id = ?1",
                    [account],
                    |r| r.get(0),
                )?;
                return Ok(TopupReceipt {
                    account: account.to_string(),
                    amount,
                    balance,
                    replayed: true,
                });
            }
        }
        tx.execute(
            "INSERT OR IGNORE INTO accounts (id, balance, created_at) VALUES (?1, 0, ?2)",
            params![account, now],
        )?;
        let current: i64 = tx.query_row(
            "SELECT balance FROM accounts WHERE id = ?1",
            [account],
            |r| r.get(0),
        )?;
        let balance = current
            .checked_add(amount)
            .ok_or_else(|| StoreError::Invalid("top-up would overflow the balance".into()))?;
        tx.execute(
            "UPDATE accounts SET balance = ?2 WHERE id = ?1",
            params![account, balance],
        )?;
        tx.execute(
            "INSERT INTO topups (account, amount, created_at, note, idempotency_key) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![account, amount, now, note, idempotency_key],
        )?;
        tx.commit()?;
        Ok(TopupReceipt {
            account: account.to_string(),
            amount,
            balance,
            replayed: false,
        })
    }

    // ----- debits ---------------------------------------------------------

    /// Charge `amount` credits, atomically and idempotently. See module docs.
    pub fn debit(&mut self, req: &DebitRequest, now: i64) -> Result<DebitOutcome> {
        validate_account_id(&req.account)?;
        if req.amount < 1 {
            return Err(StoreError::Invalid("amount must be an integer >= 1".into()));
        }
        let key_chars = req.idempotency_key.chars().count();
        if key_chars == 0 || key_chars > MAX_IDEMPOTENCY_KEY_CHARS {
            return Err(StoreError::Invalid(format!(
                "idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} characters"
            )));
        }
        validate_optional_text("route", req.route.as_deref())?;
        validate_optional_text("key_prefix", req.key_prefix.as_deref())?;

        // The write lock is taken here, before the balance is read, so no
        // other connection can change it between our check and our update.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;

        let prior: Option<(String, i64, i64)> = tx
            .query_row(
                "SELECT account, amount, balance_after FROM debits WHERE idempotency_key = ?1",
                [&req.idempotency_key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        if let Some((account, amount, balance_after)) = prior {
            // A retry must describe the same charge; anything else is a
            // client bug that must not be silently "replayed".
            if account != req.account || amount != req.amount {
                return Ok(DebitOutcome::Conflict);
            }
            return Ok(DebitOutcome::Charged {
                account,
                charged: amount,
                balance: balance_after,
                replayed: true,
            });
        }

        let balance: i64 = tx
            .query_row(
                "SELECT balance FROM accounts WHERE id = ?1",
                [&req.account],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        if balance < req.amount {
            // Dropping `tx` rolls back; nothing (not even the key) is recorded.
            return Ok(DebitOutcome::Insufficient {
                balance,
                required: req.amount,
            });
        }
        let balance_after = balance - req.amount;
        tx.execute(
            "UPDATE accounts SET balance = ?2 WHERE id = ?1",
            params![req.account, balance_after],
        )?;
        tx.execute(
            "INSERT INTO debits (idempotency_key, account, amount, balance_after, route, key_prefix, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                req.idempotency_key,
                req.account,
                req.amount,
                balance_after,
                req.route,
                req.key_prefix,
                now
            ],
        )?;
        tx.commit()?;
        Ok(DebitOutcome::Charged {
            account: req.account.clone(),
            charged: req.amount,
            balance: balance_after,
            replayed: false,
        })
    }

    /// The stored debit for an idempotency key, if any.
    pub fn debit_record(&self, idempotency_key: &str) -> Result<Option<DebitRecord>> {
        Ok(self
            .conn
            .query_row(
                "SELECT idempotency_key, account, amount, balance_after, route, key_prefix, created_at \
                 FROM debits WHERE idempotency_key = ?1",
                [idempotency_key],
                |r| {
                    Ok(DebitRecord {
                        idempotency_key: r.get(0)?,
                        account: r.get(1)?,
                        amount: r.get(2)?,
                        balance_after: r.get(3)?,
                        route: r.get(4)?,
                        key_prefix: r.get(5)?,
                        created_at: r.get(6)?,
                    })
                },
            )
            .optional()?)
    }

    /// Number of debits recorded for an account.
    pub fn debit_count(&self, account: &str) -> Result<i64> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM debits WHERE account = ?1",
            [account],
            |r| r.get(0),
        )?)
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

        // Immediate: the token-count check and the prefix-uniqueness check
        // must hold at the moment of insert, even with concurrent minting.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT OR IGNORE INTO accounts (id, balance, created_at) VALUES (?1, 0, ?2)",
            params![new.account, now],
        )?;
        if new.kind == KeyKind::ApiToken {
            let active: i64 = tx.query_row(
                &format!(
                    "SELECT COUNT(*) FROM keys k WHERE k.account = :account AND k.kind = 'api_token' AND {ACTIVE_SQL}"
                ),
                rusqlite::named_params! {":account": new.account, ":now": now},
                |r| r.get(0),
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
            let taken: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM keys WHERE prefix = ?1)",
                [&prefix],
                |r| r.get(0),
            )?;
            if !taken {
                minted = Some((secret, kind, prefix));
                break;
            }
        }
        let (secret, kind, prefix) = minted.ok_or_else(|| {
            StoreError::Invalid("could not find an unused key prefix; try again".into())
        })?;

        tx.execute(
            "INSERT INTO keys (key_sha256, prefix, account, kind, scopes, name, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                keys::sha256_hex(&secret),
                prefix,
                new.account,
                kind.as_str(),
                scopes_json,
                new.name,
                now,
                expires_at
            ],
        )?;
        tx.commit()?;
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
    }

    /// Look a key up by the SHA-256 of its secret. Revoked and expired keys
    /// are returned too (their `state` tells) so the filter can answer 401
    /// precisely. Marks active keys as used at `now`.
    pub fn lookup_key(&mut self, key_sha256: &str, now: i64) -> Result<Option<KeyLookup>> {
        if !keys::is_sha256_hex(key_sha256) {
            return Err(StoreError::Invalid(
                "key_sha256 must be 64 lowercase hex characters".into(),
            ));
        }
        let row: Option<(KeyRow, i64)> = self
            .conn
            .query_row(
                &format!(
                    "SELECT {}, COALESCE(a.balance, 0) FROM keys k \
                     LEFT JOIN accounts a ON a.id = k.account WHERE k.key_sha256 = ?1",
                    KeyRow::COLUMNS
                ),
                [key_sha256],
                |r| Ok((KeyRow::from_row(r)?, r.get(9)?)),
            )
            .optional()?;
        let Some((row, balance)) = row else {
            return Ok(None);
        };
        let mut key = row.into_record(now)?;
        if key.state == KeyState::Active {
            self.conn.execute(
                "UPDATE keys SET last_used_at = ?2 WHERE key_sha256 = ?1",
                params![key_sha256, now],
            )?;
            key.last_used_at = Some(now);
        }
        Ok(Some(KeyLookup { key, balance }))
    }

    /// All keys of an account, oldest first (creation order; never hashes or secrets).
    pub fn list_keys(&self, account: &str, now: i64) -> Result<Vec<KeyRecord>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {} FROM keys k WHERE k.account = ?1 ORDER BY k.created_at, k.rowid",
            KeyRow::COLUMNS
        ))?;
        let rows = stmt
            .query_map([account], KeyRow::from_row)?
            .collect::<rusqlite::Result<Vec<KeyRow>>>()?;
        rows.into_iter().map(|r| r.into_record(now)).collect()
    }

    /// Number of active API tokens an account holds at `now`.
    pub fn active_token_count(&self, account: &str, now: i64) -> Result<i64> {
        Ok(self.conn.query_row(
            &format!(
                "SELECT COUNT(*) FROM keys k WHERE k.account = :account AND k.kind = 'api_token' AND {ACTIVE_SQL}"
            ),
            rusqlite::named_params! {":account": account, ":now": now},
            |r| r.get(0),
        )?)
    }

    /// Revoke the single active key with this prefix.
    pub fn revoke_by_prefix(&mut self, prefix: &str, now: i64) -> Result<RevokedKey> {
        if !keys::is_valid_prefix(prefix) {
            return Err(StoreError::Invalid(
                "a key prefix is 8 lowercase hex characters".into(),
            ));
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let matches: Vec<(String, String, String)> = {
            let mut stmt = tx.prepare(&format!(
                "SELECT k.key_sha256, k.account, k.kind FROM keys k WHERE k.prefix = :prefix AND {ACTIVE_SQL}"
            ))?;
            let rows = stmt.query_map(
                rusqlite::named_params! {":prefix": prefix, ":now": now},
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let (hash, account, kind) = match matches.as_slice() {
            [] => return Err(StoreError::KeyNotFound(prefix.to_string())),
            [one] => one.clone(),
            many => {
                return Err(StoreError::AmbiguousPrefix {
                    prefix: prefix.to_string(),
                    matches: many.len(),
                })
            }
        };
        tx.execute(
            "UPDATE keys SET revoked_at = ?2 WHERE key_sha256 = ?1",
            params![hash, now],
        )?;
        tx.commit()?;
        Ok(RevokedKey {
            prefix: prefix.to_string(),
            account,
            kind: decode_kind(&kind)?,
            revoked_at: now,
        })
    }
}
