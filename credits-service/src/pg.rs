//! The PostgreSQL backend: one synchronous connection (`postgres` crate, no
//! TLS: meant for loopback or a private network), versioned migrations, and
//! transactions retried on serialization failures.
//!
//! Concurrency: every money transaction locks the account row with
//! `SELECT … FOR UPDATE` before reading the balance (READ COMMITTED), so
//! debits and holds from any number of service processes on one database
//! are serialised per account and can never overdraw. Races on a unique key
//! (two processes inserting the same idempotency key for different accounts),
//! deadlocks and serialization failures roll the transaction back and run it
//! again from the start, where it then sees the winner's row.

use crate::db::{to_postgres, Dialect, Row, Sql, Val};
use crate::store::{Result, StoreError};
use postgres::types::{ToSql, Type};
use postgres::{Client, NoTls, Statement};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// How often a transaction is re-run after a retryable failure.
const MAX_ATTEMPTS: usize = 30;
/// Arbitrary constant for the advisory lock that serialises migrations.
const MIGRATION_LOCK: i64 = 0x6469_616c_746f_6e65; // "dialtone"

/// PostgreSQL migrations, applied in order; the version is recorded in
/// `dialtone_schema`. Append new entries; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    // v1: the whole schema (same tables and rules as SQLite v1 + v2).
    r#"
    CREATE TABLE accounts (
        id          TEXT PRIMARY KEY,
        balance     BIGINT NOT NULL CHECK (balance >= 0),
        held        BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0),
        created_at  BIGINT NOT NULL
    );

    CREATE TABLE keys (
        seq          BIGSERIAL UNIQUE,
        key_sha256   TEXT PRIMARY KEY CHECK (length(key_sha256) = 64),
        prefix       TEXT NOT NULL,
        account      TEXT NOT NULL REFERENCES accounts(id),
        kind         TEXT NOT NULL CHECK (kind IN ('api_key', 'api_token')),
        scopes       TEXT NOT NULL DEFAULT '[]',
        name         TEXT,
        created_at   BIGINT NOT NULL,
        expires_at   BIGINT,
        revoked_at   BIGINT,
        last_used_at BIGINT
    );
    CREATE INDEX keys_prefix ON keys(prefix);
    CREATE INDEX keys_account ON keys(account);

    CREATE TABLE debits (
        idempotency_key TEXT PRIMARY KEY,
        account         TEXT NOT NULL REFERENCES accounts(id),
        amount          BIGINT NOT NULL CHECK (amount >= 1),
        balance_after   BIGINT NOT NULL CHECK (balance_after >= 0),
        route           TEXT,
        key_prefix      TEXT,
        created_at      BIGINT NOT NULL
    );
    CREATE INDEX debits_account ON debits(account, created_at);

    CREATE TABLE topups (
        id              BIGSERIAL PRIMARY KEY,
        account         TEXT NOT NULL REFERENCES accounts(id),
        amount          BIGINT NOT NULL CHECK (amount >= 1),
        created_at      BIGINT NOT NULL,
        note            TEXT,
        idempotency_key TEXT UNIQUE
    );
    CREATE INDEX topups_account ON topups(account, created_at);

    CREATE TABLE ledger (
        id              BIGSERIAL PRIMARY KEY,
        account         TEXT NOT NULL REFERENCES accounts(id),
        kind            TEXT NOT NULL CHECK (kind IN ('topup', 'debit', 'refund', 'hold', 'capture', 'release')),
        delta_available BIGINT NOT NULL,
        delta_held      BIGINT NOT NULL,
        amount          BIGINT NOT NULL CHECK (amount >= 1),
        hold_id         TEXT,
        idempotency_key TEXT,
        route           TEXT,
        key_prefix      TEXT,
        note            TEXT,
        created_at      BIGINT NOT NULL,
        CHECK (
            (kind IN ('topup', 'refund') AND delta_available = amount AND delta_held = 0) OR
            (kind = 'debit' AND delta_available = -amount AND delta_held = 0) OR
            (kind = 'hold' AND hold_id IS NOT NULL AND delta_available = -amount AND delta_held = amount) OR
            (kind = 'capture' AND hold_id IS NOT NULL AND delta_available = 0 AND delta_held = -amount) OR
            (kind = 'release' AND hold_id IS NOT NULL AND delta_available = amount AND delta_held = -amount)
        )
    );
    CREATE INDEX ledger_account ON ledger(account, id);
    CREATE INDEX ledger_hold ON ledger(hold_id);
    CREATE INDEX ledger_key ON ledger(idempotency_key);
    CREATE UNIQUE INDEX ledger_debit_once ON ledger(idempotency_key) WHERE kind = 'debit';
    CREATE UNIQUE INDEX ledger_refund_once ON ledger(idempotency_key, COALESCE(hold_id, '')) WHERE kind = 'refund';
    CREATE UNIQUE INDEX ledger_hold_once ON ledger(hold_id, kind) WHERE kind IN ('hold', 'capture', 'release');
    CREATE FUNCTION dialtone_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        RAISE EXCEPTION 'ledger is append-only: % refused', TG_OP;
    END
    $fn$;
    CREATE TRIGGER ledger_no_update_delete BEFORE UPDATE OR DELETE ON ledger
        FOR EACH ROW EXECUTE FUNCTION dialtone_ledger_append_only();
    CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
        FOR EACH STATEMENT EXECUTE FUNCTION dialtone_ledger_append_only();

    CREATE TABLE holds (
        id              TEXT PRIMARY KEY,
        account         TEXT NOT NULL REFERENCES accounts(id),
        amount          BIGINT NOT NULL CHECK (amount >= 1),
        state           TEXT NOT NULL CHECK (state IN ('open', 'captured', 'released')),
        idempotency_key TEXT NOT NULL UNIQUE,
        balance_after   BIGINT NOT NULL CHECK (balance_after >= 0),
        route           TEXT,
        key_prefix      TEXT,
        created_at      BIGINT NOT NULL,
        expires_at      BIGINT NOT NULL,
        settled_at      BIGINT,
        release_reason  TEXT CHECK (release_reason IN ('upstream_error', 'expired', 'requested')),
        CHECK ((state = 'open') = (settled_at IS NULL)),
        CHECK ((state = 'released') = (release_reason IS NOT NULL))
    );
    CREATE INDEX holds_account_open ON holds(account, state, expires_at);
    CREATE INDEX holds_expiry ON holds(state, expires_at);

    CREATE TABLE rate_buckets (
        account    TEXT PRIMARY KEY,
        units      BIGINT NOT NULL CHECK (units >= 0),
        scale      BIGINT NOT NULL CHECK (scale >= 1),
        updated_ms BIGINT NOT NULL
    );
    "#,
];

/// Schema version this binary brings a PostgreSQL database to.
pub fn supported_schema_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

/// One PostgreSQL connection. Interior mutability lets the shared [`Sql`]
/// trait take `&self`; a `Store` is used by one thread at a time.
pub struct PgConn {
    url: String,
    client: RefCell<Client>,
    statements: RefCell<HashMap<String, Statement>>,
    /// Inside BEGIN…COMMIT: never silently reconnect there.
    in_tx: Cell<bool>,
}

fn is_retryable(e: &StoreError) -> bool {
    let StoreError::Pg(e) = e else {
        return false;
    };
    e.code().is_some_and(|c| {
        matches!(
            c.code(),
            "40001" // serialization_failure
                | "40P01" // deadlock_detected
                | "23505" // unique_violation (a concurrent insert of the same key)
        )
    })
}

/// A typed parameter, chosen from the prepared statement's parameter type.
fn param(v: &Val, ty: &Type) -> Result<Box<dyn ToSql + Sync>> {
    Ok(match (v, ty) {
        (Val::Int(i), t) if *t == Type::INT4 => Box::new(
            i32::try_from(*i)
                .map_err(|_| StoreError::Invalid(format!("{i} does not fit a 32-bit integer")))?,
        ),
        (Val::Int(i), _) => Box::new(*i),
        (Val::Text(s), _) => Box::new(s.clone()),
        (Val::Null, t) if *t == Type::INT8 => Box::new(None::<i64>),
        (Val::Null, t) if *t == Type::INT4 => Box::new(None::<i32>),
        (Val::Null, _) => Box::new(None::<String>),
    })
}

fn read_row(row: &postgres::Row) -> Result<Row> {
    let mut out = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let ty = col.type_();
        let v = if *ty == Type::INT8 {
            row.try_get::<_, Option<i64>>(i)?.map_or(Val::Null, Val::Int)
        } else if *ty == Type::INT4 {
            row.try_get::<_, Option<i32>>(i)?
                .map_or(Val::Null, |x| Val::Int(i64::from(x)))
        } else if *ty == Type::INT2 {
            row.try_get::<_, Option<i16>>(i)?
                .map_or(Val::Null, |x| Val::Int(i64::from(x)))
        } else if *ty == Type::BOOL {
            row.try_get::<_, Option<bool>>(i)?
                .map_or(Val::Null, |x| Val::Int(i64::from(x)))
        } else if *ty == Type::TEXT || *ty == Type::VARCHAR || *ty == Type::NAME || *ty == Type::BPCHAR {
            row.try_get::<_, Option<String>>(i)?.map_or(Val::Null, Val::Text)
        } else {
            return Err(StoreError::Corrupt(format!(
                "column {} has unsupported type {ty}",
                col.name()
            )));
        };
        out.push(v);
    }
    Ok(Row(out))
}

impl PgConn {
    /// Connect (`postgres://user[:password]@host:port/db`).
    pub fn connect(url: &str) -> Result<PgConn> {
        let client = Client::connect(url, NoTls)?;
        Ok(PgConn {
            url: url.to_string(),
            client: RefCell::new(client),
            statements: RefCell::new(HashMap::new()),
            in_tx: Cell::new(false),
        })
    }

    /// Reconnect if the server closed the connection (restart, idle
    /// timeout), so a long-running service recovers on the next request.
    fn ensure_open(&self) -> Result<()> {
        if !self.in_tx.get() && self.client.borrow().is_closed() {
            let fresh = Client::connect(&self.url, NoTls)?;
            *self.client.borrow_mut() = fresh;
            self.statements.borrow_mut().clear();
        }
        Ok(())
    }

    fn statement(&self, sql: &str) -> Result<Statement> {
        if let Some(s) = self.statements.borrow().get(sql) {
            return Ok(s.clone());
        }
        let stmt = self.client.borrow_mut().prepare(&to_postgres(sql))?;
        self.statements
            .borrow_mut()
            .insert(sql.to_string(), stmt.clone());
        Ok(stmt)
    }

    fn bind(stmt: &Statement, params: &[Val]) -> Result<Vec<Box<dyn ToSql + Sync>>> {
        if stmt.params().len() != params.len() {
            return Err(StoreError::Corrupt(format!(
                "statement takes {} parameters, {} given",
                stmt.params().len(),
                params.len()
            )));
        }
        params
            .iter()
            .zip(stmt.params())
            .map(|(v, ty)| param(v, ty))
            .collect()
    }

    fn batch(&self, sql: &str) -> Result<()> {
        self.client.borrow_mut().batch_execute(sql)?;
        Ok(())
    }

    /// Apply pending migrations, serialised across processes by an advisory
    /// lock (PostgreSQL DDL is transactional: all or nothing).
    pub fn migrate(&self) -> Result<()> {
        self.ensure_open()?;
        self.batch("BEGIN")?;
        let result = (|| -> Result<()> {
            self.client
                .borrow_mut()
                .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            self.batch("CREATE TABLE IF NOT EXISTS dialtone_schema (version BIGINT NOT NULL)")?;
            let found = self.int("SELECT COALESCE(MAX(version), 0) FROM dialtone_schema", &[])?;
            let supported = supported_schema_version();
            if found > supported {
                return Err(StoreError::SchemaTooNew { found, supported });
            }
            let done = usize::try_from(found).unwrap_or(0);
            for sql in MIGRATIONS.iter().skip(done) {
                self.batch(sql)?;
            }
            if found < supported {
                self.client.borrow_mut().execute(
                    "INSERT INTO dialtone_schema (version) VALUES ($1)",
                    &[&supported],
                )?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => self.batch("COMMIT"),
            Err(e) => {
                let _ = self.batch("ROLLBACK");
                Err(e)
            }
        }?;
        self.statements.borrow_mut().clear();
        Ok(())
    }

    /// Schema version recorded in the database.
    pub fn schema_version(&self) -> Result<i64> {
        self.int("SELECT COALESCE(MAX(version), 0) FROM dialtone_schema", &[])
    }

    /// Run `f` in a transaction, re-running it on retryable failures.
    /// `read_only` uses one REPEATABLE READ snapshot.
    pub fn transaction<T>(
        &self,
        read_only: bool,
        f: &mut dyn FnMut(&dyn Sql) -> Result<T>,
    ) -> Result<T> {
        let begin = if read_only {
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        } else {
            "BEGIN ISOLATION LEVEL READ COMMITTED"
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.ensure_open()?;
            self.batch(begin)?;
            self.in_tx.set(true);
            let outcome = f(self).and_then(|v| self.batch("COMMIT").map(|()| v));
            self.in_tx.set(false);
            match outcome {
                Ok(v) => return Ok(v),
                Err(e) => {
                    // After a failed COMMIT the transaction is already gone;
                    // ROLLBACK then only warns.
                    let _ = self.batch("ROLLBACK");
                    if attempt >= MAX_ATTEMPTS || !is_retryable(&e) {
                        return Err(e);
                    }
                    // Back off a little (jitter from the attempt number) so
                    // racing processes do not collide in lock-step.
                    let ms = u64::try_from(attempt.min(10)).unwrap_or(10);
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
            }
        }
    }
}

impl Sql for PgConn {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn exec(&self, sql: &str, params: &[Val]) -> Result<u64> {
        self.ensure_open()?;
        let stmt = self.statement(sql)?;
        let bound = Self::bind(&stmt, params)?;
        let refs: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|b| b.as_ref()).collect();
        Ok(self.client.borrow_mut().execute(&stmt, &refs)?)
    }

    fn rows(&self, sql: &str, params: &[Val]) -> Result<Vec<Row>> {
        self.ensure_open()?;
        let stmt = self.statement(sql)?;
        let bound = Self::bind(&stmt, params)?;
        let refs: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|b| b.as_ref()).collect();
        let rows = self.client.borrow_mut().query(&stmt, &refs)?;
        rows.iter().map(read_row).collect()
    }
}
