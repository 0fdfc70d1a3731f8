//! PostgreSQL: a sqlx connection pool, one transaction per request.
//!
//! Concurrency: every money transaction locks the account row with
//! `SELECT … FOR UPDATE` before reading the balance (READ COMMITTED), so
//! requests for different accounts run concurrently on different pooled
//! connections, requests for one account are serialised by its row lock,
//! and any number of service processes can share the database without ever
//! overdrawing. Races on a unique key (two processes inserting the same
//! idempotency key for different accounts), deadlocks and serialization
//! failures roll the transaction back and run it again from the start,
//! where it then sees the winner's row.
//!
//! Group commit: PostgreSQL already flushes the WAL of concurrent commits
//! together, so there is no batching writer here; `pg_stat_wal` shows how
//! many flushes a load really costs (README, Speed).
//!
//! Availability: the pool reconnects by itself. A request that finds the
//! database gone gets [`StoreError::Unavailable`] (HTTP 503) after at most
//! the acquire timeout; the first request after the database is back gets a
//! fresh connection. A connection that died while idle in the pool is
//! noticed at `BEGIN` (nothing has been sent yet) and replaced.
//!
//! Migrations are sqlx's (`migrations/postgres`), embedded in the binary. A
//! database made by the binary that recorded its version in
//! `dialtone_schema` is adopted (its migrations are marked applied); that
//! table is kept up to date for old binaries, which refuse newer schemas.

use crate::db::PgConn;
use crate::rules::Job;
use crate::store::{Result, StoreError};
use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::ConnectOptions;
use std::str::FromStr;
use std::time::Duration;

/// The PostgreSQL schema, in order (`migrations/postgres/NNNN_*.sql`).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// How often a transaction is re-run after a retryable failure.
const MAX_ATTEMPTS: usize = 30;
/// Arbitrary constant for the advisory lock that serialises migrations.
const MIGRATION_LOCK: i64 = 0x6469_616c_746f_6e65; // "dialtone"
const WRITE_BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";
const READ_BEGIN: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

/// Schema version this binary brings a PostgreSQL database to.
pub fn supported_schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Most connections this process opens (PostgreSQL's `max_connections`
    /// must cover every instance's pool).
    pub max_connections: u32,
    /// Connections kept open while idle.
    pub min_connections: u32,
    /// How long a request waits for a connection (including reconnecting
    /// to a database that is down) before it is answered 503.
    pub acquire_timeout: Duration,
    /// Idle connections above `min_connections` are closed after this.
    pub idle_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 32,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// PostgreSQL for the service and the operator API.
pub struct PgDb {
    pool: PgPool,
}

impl PgDb {
    /// Create the pool, connect once and bring the schema up to date.
    pub async fn connect(url: &str, options: &PgOptions) -> Result<PgDb> {
        let connect = PgConnectOptions::from_str(url)?
            .application_name("dialtone-credits")
            .statement_cache_capacity(256)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .min_connections(options.min_connections)
            .acquire_timeout(options.acquire_timeout)
            .idle_timeout(Some(options.idle_timeout))
            // A ping per checkout costs a round trip on every request; a
            // dead connection is caught at BEGIN instead (see `begin`).
            .test_before_acquire(false)
            .connect_lazy_with(connect);
        let db = PgDb { pool };
        db.migrate().await?;
        Ok(db)
    }

    /// The pool (metrics).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Apply pending migrations, serialised across processes by an advisory
    /// lock (PostgreSQL DDL is transactional: each migration all or nothing).
    pub async fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *conn)
            .await?;
        let result = migrate_locked(&mut conn).await;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *conn)
            .await;
        result?;
        unlocked?;
        Ok(())
    }

    /// Schema version recorded in the database.
    pub async fn schema_version(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// `BEGIN` on a pooled connection. A connection that died while idle
    /// (the server restarted) fails here, before anything was sent, so the
    /// next one is tried.
    async fn begin(
        &self,
        statement: &'static str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let attempts = self.pool.options().get_max_connections().saturating_add(1);
        let mut last = None;
        for _ in 0..attempts {
            match self.pool.begin_with(statement).await {
                Ok(tx) => return Ok(tx),
                Err(e @ (sqlx::Error::Io(_) | sqlx::Error::Protocol(_))) => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.map_or_else(
            || StoreError::Unavailable("no connection".into()),
            StoreError::Sqlx,
        ))
    }

    /// Run `f` in a transaction, re-running it on retryable failures.
    /// `read_only` uses one REPEATABLE READ snapshot.
    pub async fn transaction<T>(
        &self,
        read_only: bool,
        mut f: impl AsyncFnMut(&mut PgConn<'_>) -> Result<T>,
    ) -> Result<T> {
        let statement = if read_only { READ_BEGIN } else { WRITE_BEGIN };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut tx = self.begin(statement).await?;
            let outcome = match f(&mut PgConn::new(&mut tx)).await {
                Ok(v) => tx.commit().await.map(|()| v).map_err(StoreError::from),
                Err(e) => Err(e),
            };
            match outcome {
                Err(e) if attempt < MAX_ATTEMPTS && e.is_retryable() => backoff(attempt).await,
                other => return other,
            }
        }
    }

    /// Run a write job in a transaction on this task, re-run on retryable
    /// failures.
    pub async fn write_here<J: Job>(&self, job: &J) -> Result<J::Out> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut tx = self.begin(WRITE_BEGIN).await?;
            let outcome = match job.run(&mut PgConn::new(&mut tx)).await {
                Ok(v) => tx.commit().await.map(|()| v).map_err(StoreError::from),
                Err(e) => Err(e),
            };
            match outcome {
                Err(e) if attempt < MAX_ATTEMPTS && e.is_retryable() => {
                    crate::metrics::pg_retry();
                    backoff(attempt).await;
                }
                other => return other,
            }
        }
    }

    /// Run a read job on one snapshot.
    pub async fn read<J: Job>(&self, job: &J) -> Result<J::Out> {
        let mut tx = self.begin(READ_BEGIN).await?;
        let out = job.run(&mut PgConn::new(&mut tx)).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Pool: (open connections, idle connections, max).
    pub fn pool_stats(&self) -> (u32, usize, u32) {
        (
            self.pool.size(),
            self.pool.num_idle(),
            self.pool.options().get_max_connections(),
        )
    }

    /// Close every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Back off a little (growing with the attempt) so racing transactions do
/// not collide in lock-step.
async fn backoff(attempt: usize) {
    let ms = u64::try_from(attempt.min(10)).unwrap_or(10);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

fn migrate_error(e: MigrateError) -> StoreError {
    match e {
        MigrateError::Execute(e) => StoreError::Sqlx(e),
        other => StoreError::Migrate(other.to_string()),
    }
}

async fn migrate_locked(conn: &mut sqlx::PgConnection) -> Result<()> {
    let supported = supported_schema_version();
    let has_sqlx: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    let has_old: bool = sqlx::query_scalar("SELECT to_regclass('dialtone_schema') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if has_old {
        let found: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM dialtone_schema")
                .fetch_one(&mut *conn)
                .await?;
        if found > supported {
            return Err(StoreError::SchemaTooNew { found, supported });
        }
        if !has_sqlx && found > 0 {
            // Written by the binary that recorded versions in
            // dialtone_schema: its migrations 1..=found are exactly ours.
            conn.ensure_migrations_table()
                .await
                .map_err(migrate_error)?;
            for m in MIGRATOR.iter().filter(|m| m.version <= found) {
                sqlx::query(
                    "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                     VALUES ($1, $2, TRUE, $3, 0)",
                )
                .bind(m.version)
                .bind(m.description.as_ref())
                .bind(m.checksum.as_ref())
                .execute(&mut *conn)
                .await?;
            }
        }
    }
    MIGRATOR.run_direct(&mut *conn).await.map_err(|e| match e {
        MigrateError::VersionMissing(v) => StoreError::SchemaTooNew {
            found: v,
            supported,
        },
        other => migrate_error(other),
    })?;
    // Kept for binaries that read their version from here.
    sqlx::query("CREATE TABLE IF NOT EXISTS dialtone_schema (version BIGINT NOT NULL)")
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO dialtone_schema (version) SELECT $1 \
         WHERE (SELECT COALESCE(MAX(version), 0) FROM dialtone_schema) < $1",
    )
    .bind(supported)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
