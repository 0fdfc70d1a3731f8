//! SQLite: one file in WAL mode, a pool of readers and ONE writer that
//! commits concurrent writes together (group commit).
//!
//! - **Readers** (sqlx `SqlitePool`, `query_only`): key lookups, balances,
//!   ledgers, `check`. In WAL mode a reader never waits for the writer: it
//!   reads the last committed snapshot.
//! - **The writer** (a dedicated thread with one rusqlite connection): takes
//!   the first queued write job, then every job already queued (up to
//!   `max_batch`; no artificial delay, so batches form only under load), and
//!   runs them in one `BEGIN IMMEDIATE` transaction, each inside its own
//!   `SAVEPOINT`: a job that fails is rolled back to its savepoint and gets
//!   its own error while the others stay. One `COMMIT` — one fsync with
//!   `synchronous = FULL` — then every job gets its answer. If the `COMMIT`
//!   fails, nothing of the batch was applied and every job gets the error.
//!   Idempotency is unchanged: each job's rules see the effects of the jobs
//!   before it in the same transaction.
//! - **Fused debits**: consecutive debits of one account in a batch (a busy
//!   paid route) run as one group through [`crate::rules::debit_many`], a
//!   fixed number of statements however many there are, each answered as
//!   if run alone after the ones before it; PostgreSQL's writers do the
//!   same. If the group fails it is rolled back and its debits run one by
//!   one.
//!
//! Why rusqlite for the writer: sqlx's SQLite driver runs every statement on
//! a worker thread of its own and answers over a channel, two thread
//! switches per statement. A hold is about eight statements; measured on
//! this project's 2-core machine that is 116–590 µs per job through sqlx
//! against 8–10 µs through rusqlite on the writer's own thread (see the
//! README's Speed section), and the single writer is the one place every
//! SQLite write passes through.
//!
//! Migrations are sqlx's (`migrations/sqlite`), embedded in the binary.
//! `PRAGMA user_version` is kept equal to the number of applied migrations,
//! as the pre-sqlx binary recorded it, so a database written by that binary
//! is adopted (its migrations are marked applied) and a database written by
//! a newer binary is refused.

use crate::db::{run_ready, SqliteConn, SqlxSqliteConn};
use crate::rules::Job;
use crate::store::{DebitOutcome, DebitRequest, Result, StoreError};
use std::any::Any;
use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection, SqlitePool};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// The SQLite schema, in order (`migrations/sqlite/NNNN_*.sql`).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Schema version of this binary: the highest SQLite migration.
pub fn supported_schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The schema version recorded in the file (`PRAGMA user_version`).
pub fn schema_version(conn: &rusqlite::Connection) -> Result<i64> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}

/// Settings of the SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Reader connections (lookups, balances, ledgers, `check`).
    pub readers: u32,
    /// How long to wait for a lock held by another connection or process.
    pub busy_timeout: Duration,
    /// Most write jobs committed together.
    pub max_batch: usize,
    /// Write jobs that may wait for the writer before callers wait to queue.
    pub queue: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            readers: 4,
            busy_timeout: crate::store::BUSY_TIMEOUT,
            max_batch: 256,
            queue: 8192,
        }
    }
}

fn configure(conn: &rusqlite::Connection, busy_timeout: Duration) -> Result<()> {
    conn.busy_timeout(busy_timeout)?;
    // WAL lets readers proceed while the writer commits; the mode is
    // persistent in the file.
    let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    // FULL: a committed top-up or debit survives power loss, not just a
    // process crash. Group commit pays this fsync once per batch.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.set_prepared_statement_cache_capacity(256);
    Ok(())
}

/// The writer's own settings on top of [`configure`].
/// Checkpoints are mostly left to the checkpointer thread, off the commit
/// path (the writer only checkpoints itself if the WAL grows past ~40 MB).
fn configure_writer(conn: &rusqlite::Connection) -> Result<()> {
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    // Statement journals (a multi-row statement inside a transaction with
    // savepoints keeps one, to undo just that statement, as a batch's fused
    // debits do) in memory: in a temporary file each costs a create, writes
    // and an unlink, which measured as a fifth of the writer's time.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

/// True when the file's schema is exactly this binary's (no sqlx needed).
fn up_to_date(conn: &rusqlite::Connection) -> Result<bool> {
    let supported = supported_schema_version();
    if schema_version(conn)? != supported {
        return Ok(false);
    }
    let has_table: i64 = conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        [],
        |r| r.get(0),
    )?;
    if has_table == 0 {
        return Ok(false);
    }
    let applied: i64 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success = 1",
        [],
        |r| r.get(0),
    )?;
    Ok(applied == supported)
}

/// Open a rusqlite connection on an up-to-date file (migrating it first with
/// sqlx if needed): the operator API's connection.
pub fn open_migrated(path: &Path, busy_timeout: Duration) -> Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    configure(&conn, busy_timeout)?;
    if !up_to_date(&conn)? {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot start a runtime: {e}")))?;
        rt.block_on(async {
            let mut c =
                SqliteConnection::connect_with(&connect_options(path, busy_timeout, true)).await?;
            let result = migrate(&mut c).await;
            let _ = c.close().await;
            result
        })?;
    }
    Ok(conn)
}

fn connect_options(path: &Path, busy_timeout: Duration, create: bool) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(create)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(busy_timeout)
}

/// Bring the schema up to date, serialised across processes by the database
/// write lock (`BEGIN IMMEDIATE`): a second process opening a fresh file
/// waits, then finds nothing to do.
pub async fn migrate(conn: &mut SqliteConnection) -> Result<()> {
    let supported = supported_schema_version();
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let found: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&mut *tx)
        .await?;
    if found > supported {
        return Err(StoreError::SchemaTooNew { found, supported });
    }
    let has_sqlx: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
    )
    .fetch_one(&mut *tx)
    .await?;
    if has_sqlx == 0 && found > 0 {
        // Written by the binary that recorded versions in user_version: its
        // migrations 1..=found are exactly ours; mark them applied.
        tx.ensure_migrations_table().await.map_err(migrate_error)?;
        for m in MIGRATOR.iter().filter(|m| m.version <= found) {
            sqlx::query(
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                 VALUES ($1, $2, TRUE, $3, 0)",
            )
            .bind(m.version)
            .bind(m.description.as_ref())
            .bind(m.checksum.as_ref())
            .execute(&mut *tx)
            .await?;
        }
    }
    MIGRATOR.run_direct(&mut *tx).await.map_err(|e| match e {
        MigrateError::VersionMissing(v) => StoreError::SchemaTooNew {
            found: v,
            supported,
        },
        other => migrate_error(other),
    })?;
    // PRAGMA takes no parameters; `supported` is our own integer.
    sqlx::query(&format!("PRAGMA user_version = {supported}"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

fn migrate_error(e: MigrateError) -> StoreError {
    match e {
        MigrateError::Execute(e) => StoreError::Sqlx(e),
        other => StoreError::Migrate(other.to_string()),
    }
}

// ----- one transaction on a rusqlite connection (the operator API) --------

/// Run `f` in a transaction opened with `begin`; commit on `Ok`.
fn with_tx<T>(
    conn: &mut rusqlite::Connection,
    begin: &str,
    f: impl FnOnce(&mut SqliteConn<'_>) -> Result<T>,
) -> Result<T> {
    conn.execute_batch(begin)?;
    let result = f(&mut SqliteConn::new(conn));
    match result {
        Ok(v) => match conn.execute_batch("COMMIT") {
            Ok(()) => Ok(v),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e.into())
            }
        },
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// A write transaction (`BEGIN IMMEDIATE`: the database write lock first).
pub fn write_with<T>(
    conn: &mut rusqlite::Connection,
    f: impl FnOnce(&mut SqliteConn<'_>) -> Result<T>,
) -> Result<T> {
    with_tx(conn, "BEGIN IMMEDIATE", f)
}

/// One job in a write transaction.
pub fn write_one<J: Job>(conn: &mut rusqlite::Connection, job: &J) -> Result<J::Out> {
    write_with(conn, |tx| run_ready(job.run(tx))?)
}

/// One job on one read snapshot.
pub fn read_one<J: Job>(conn: &mut rusqlite::Connection, job: &J) -> Result<J::Out> {
    with_tx(conn, "BEGIN", |tx| run_ready(job.run(tx))?)
}

// ----- the service's backend ------------------------------------------------

/// A write job waiting for the writer, its inputs and where to answer.
trait Pending: Send {
    /// Run inside the batch's transaction; false if the job failed (the
    /// writer then rolls back to the job's savepoint).
    fn run(&mut self, conn: &mut rusqlite::Connection) -> bool;
    /// Answer the caller: the job's own result, or the batch's failure.
    fn finish(self: Box<Self>, batch_error: Option<&str>);
    /// This job as a debit that may run fused with the debits next to it
    /// ([`crate::rules::debit_many`]): one with no rate limit, and its clock.
    fn fusable_debit(&self) -> Option<(&DebitRequest, i64)>;
    /// A fused debit's answer.
    fn set_debit_result(&mut self, result: Result<DebitOutcome>);
}

struct PendingJob<J: Job> {
    job: J,
    result: Option<Result<J::Out>>,
    reply: oneshot::Sender<Result<J::Out>>,
}

impl<J: Job + 'static> Pending for PendingJob<J> {
    fn run(&mut self, conn: &mut rusqlite::Connection) -> bool {
        let result = run_ready(self.job.run(&mut SqliteConn::new(conn))).and_then(|r| r);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, batch_error: Option<&str>) {
        // The caller may have gone away (its request was cancelled): the
        // write stands, like any idempotent request whose answer was lost.
        let _ = self.reply.send(crate::store::batch_answer(batch_error, self.result));
    }

    fn fusable_debit(&self) -> Option<(&DebitRequest, i64)> {
        let debit = (&self.job as &dyn Any).downcast_ref::<crate::rules::Debit>()?;
        debit.rate.is_none().then_some((&debit.req, debit.now_ms))
    }

    fn set_debit_result(&mut self, result: Result<DebitOutcome>) {
        if let Some(slot) = (&mut self.result as &mut dyn Any).downcast_mut::<Option<Result<DebitOutcome>>>() {
            *slot = Some(result);
        }
    }
}

enum Msg {
    Job(Box<dyn Pending>),
    Stop,
}

/// What the writer has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions committed (each one fsync with `synchronous = FULL`).
    pub commits: u64,
    /// Batches whose `BEGIN` or `COMMIT` failed (nothing of them applied).
    pub failed_batches: u64,
    /// Jobs run (committed or not).
    pub jobs: u64,
    /// Debits that ran fused with their neighbours
    /// ([`crate::rules::debit_many`]).
    pub fused: u64,
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    failed_batches: AtomicU64,
    jobs: AtomicU64,
    fused: AtomicU64,
}

/// SQLite for the service: the reader pool and the group-commit writer.
pub struct SqliteDb {
    path: PathBuf,
    readers: SqlitePool,
    writer: mpsc::Sender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
    /// Dropping the sender stops the checkpointer.
    checkpointer: Mutex<Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>>,
}

impl SqliteDb {
    /// Open (creating and migrating if needed) the file, start the writer.
    pub async fn open(path: &Path, options: &SqliteOptions) -> Result<SqliteDb> {
        {
            let mut c =
                SqliteConnection::connect_with(&connect_options(path, options.busy_timeout, true))
                    .await?;
            let result = migrate(&mut c).await;
            let _ = c.close().await;
            result?;
        }
        let readers = SqlitePoolOptions::new()
            .max_connections(options.readers.max(1))
            .min_connections(0)
            .acquire_timeout(options.busy_timeout.max(Duration::from_secs(1)))
            .test_before_acquire(false)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(false)
                    .busy_timeout(options.busy_timeout)
                    .pragma("query_only", "ON"),
            )
            .await?;
        let mut conn = rusqlite::Connection::open(path)?;
        configure(&conn, options.busy_timeout)?;
        configure_writer(&conn)?;
        let (tx, rx) = mpsc::channel(options.queue.max(1));
        let max_batch = options.max_batch.max(1);
        let counters = Arc::new(Counters::default());
        let c = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(&mut conn, rx, max_batch, &c))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer: {e}")))?;
        let checkpoint_conn = rusqlite::Connection::open(path)?;
        configure(&checkpoint_conn, options.busy_timeout)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let checkpointer = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpoint_conn, &stopped))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the checkpointer: {e}")))?;
        Ok(SqliteDb {
            path: path.to_path_buf(),
            readers,
            writer: tx,
            thread: Mutex::new(Some(thread)),
            counters,
            checkpointer: Mutex::new(Some((stop, checkpointer))),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queue a write job for the writer and wait for its answer (given after
    /// its batch committed). If the caller stops waiting, the job still runs.
    pub async fn write<J: Job + 'static>(&self, job: J) -> Result<J::Out> {
        let (reply, answer) = oneshot::channel();
        let pending = Box::new(PendingJob {
            job,
            result: None,
            reply,
        });
        self.writer
            .send(Msg::Job(pending))
            .await
            .map_err(|_| StoreError::Unavailable("the SQLite writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the SQLite writer has stopped".into()))?
    }

    /// Run a read job on a pooled reader, on one snapshot.
    pub async fn read<J: Job>(&self, job: &J) -> Result<J::Out> {
        let mut conn = self.readers.acquire().await?;
        let mut tx = conn.begin().await?;
        let out = job.run(&mut SqlxSqliteConn::new(&mut tx)).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Commits and jobs so far.
    pub fn writer_stats(&self) -> WriterStats {
        WriterStats {
            commits: self.counters.commits.load(Ordering::Acquire),
            failed_batches: self.counters.failed_batches.load(Ordering::Acquire),
            jobs: self.counters.jobs.load(Ordering::Acquire),
            fused: self.counters.fused.load(Ordering::Acquire),
        }
    }

    /// False once the writer thread has stopped (it never does before
    /// [`SqliteDb::close`] unless it crashed).
    pub fn writer_alive(&self) -> bool {
        !self.writer.is_closed()
    }

    /// Write jobs waiting for the writer right now.
    pub fn queued(&self) -> usize {
        self.writer.max_capacity() - self.writer.capacity()
    }

    /// Reader pool: (open connections, idle connections, max).
    pub fn pool_stats(&self) -> (u32, usize, u32) {
        (
            self.readers.size(),
            self.readers.num_idle(),
            self.readers.options().get_max_connections(),
        )
    }

    /// Let the writer finish every job already queued, then stop it and
    /// close the readers.
    pub async fn close(&self) {
        let _ = self.writer.send(Msg::Stop).await;
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        let checkpointer = self
            .checkpointer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((stop, thread)) = checkpointer {
            drop(stop);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.readers.close().await;
    }
}

/// Copy committed WAL frames into the database file twice a second, off the
/// writer's commit path (`PASSIVE`: never waits for, nor blocks, the writer
/// or the readers). Stops when `stop`'s sender is dropped.
fn checkpoint_loop(conn: &rusqlite::Connection, stop: &std::sync::mpsc::Receiver<()>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        stop.recv_timeout(Duration::from_millis(500))
    {
        let result: rusqlite::Result<(i64, i64, i64)> =
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            });
        if let Err(e) = result {
            tracing::debug!(error = %e, "WAL checkpoint skipped");
        }
    }
}

/// The writer: batch, commit once, answer.
fn writer_loop(
    conn: &mut rusqlite::Connection,
    mut rx: mpsc::Receiver<Msg>,
    max_batch: usize,
    counters: &Counters,
) {
    let mut stop = false;
    while !stop {
        let Some(first) = rx.blocking_recv() else {
            return;
        };
        let mut batch: Vec<Box<dyn Pending>> = Vec::new();
        match first {
            Msg::Job(j) => batch.push(j),
            Msg::Stop => stop = true,
        }
        while batch.len() < max_batch && !stop {
            match rx.try_recv() {
                Ok(Msg::Job(j)) => batch.push(j),
                Ok(Msg::Stop) => stop = true,
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let started = Instant::now();
        let size = batch.len();
        counters
            .jobs
            .fetch_add(u64::try_from(size).unwrap_or(u64::MAX), Ordering::AcqRel);
        match run_batch(conn, &mut batch, counters) {
            Ok(()) => {
                counters.commits.fetch_add(1, Ordering::AcqRel);
                crate::metrics::group_commit(size, started.elapsed(), true);
                for job in batch {
                    job.finish(None);
                }
            }
            Err(e) => {
                counters.failed_batches.fetch_add(1, Ordering::AcqRel);
                crate::metrics::group_commit(size, started.elapsed(), false);
                tracing::error!(error = %e, jobs = size, "SQLite group commit failed; nothing of the batch was applied");
                let message = format!("the batch's commit failed: {e}");
                for job in batch {
                    job.finish(Some(&message));
                }
            }
        }
    }
    // Stop: answer anything queued after it.
    rx.close();
    while let Ok(Msg::Job(j)) = rx.try_recv() {
        j.finish(Some("the service is shutting down"));
    }
}

fn exec_cached(conn: &rusqlite::Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Where the run of debits that can be fused with `batch[start]` ends
/// (exclusive): consecutive debits of one account, none rate-limited.
/// `start + 1` when there is nothing to fuse.
fn fused_end(batch: &[Box<dyn Pending>], start: usize) -> usize {
    let Some((first, _)) = batch.get(start).and_then(|j| j.fusable_debit()) else {
        return start + 1;
    };
    start
        + batch
            .get(start..)
            .unwrap_or_default()
            .iter()
            .take_while(|j| j.fusable_debit().is_some_and(|(r, _)| r.account == first.account))
            .count()
}

/// A run of debits of one account through [`crate::rules::debit_many`]: a
/// fixed number of statements for all of them, each answered as it would
/// be run alone after the ones before it. False on a database error (the
/// caller rolls the run back and runs its jobs one by one).
fn run_fused(conn: &mut rusqlite::Connection, group: &mut [Box<dyn Pending>]) -> bool {
    let reqs: Vec<(DebitRequest, i64)> =
        group.iter().filter_map(|j| j.fusable_debit().map(|(r, now)| (r.clone(), now))).collect();
    let (Some((first, _)), true) = (reqs.first(), reqs.len() == group.len()) else {
        return false;
    };
    let account = first.account.clone();
    let refs: Vec<(&DebitRequest, i64)> = reqs.iter().map(|(r, now)| (r, *now)).collect();
    match run_ready(crate::rules::debit_many(&mut SqliteConn::new(conn), &account, &refs)).and_then(|r| r) {
        Ok(outcomes) if outcomes.len() == group.len() => {
            for (job, outcome) in group.iter_mut().zip(outcomes) {
                job.set_debit_result(outcome);
            }
            true
        }
        Ok(_) => false,
        Err(e) => {
            tracing::warn!(error = %e, jobs = group.len(), "fused debits failed; running them one by one");
            false
        }
    }
}

/// One transaction, one savepoint per job (or per run of fused debits),
/// one commit.
fn run_batch(conn: &mut rusqlite::Connection, batch: &mut [Box<dyn Pending>], counters: &Counters) -> Result<()> {
    exec_cached(conn, "BEGIN IMMEDIATE")?;
    let body = (|| -> Result<()> {
        let mut start = 0;
        while start < batch.len() {
            let end = fused_end(batch, start).min(batch.len());
            let group = batch.get_mut(start..end).unwrap_or_default();
            start = end;
            if group.len() > 1 {
                exec_cached(conn, "SAVEPOINT job")?;
                let fused = run_fused(conn, group);
                if !fused {
                    exec_cached(conn, "ROLLBACK TO job")?;
                }
                exec_cached(conn, "RELEASE job")?;
                if fused {
                    counters.fused.fetch_add(u64::try_from(group.len()).unwrap_or(u64::MAX), Ordering::AcqRel);
                    continue;
                }
            }
            for job in group.iter_mut() {
                exec_cached(conn, "SAVEPOINT job")?;
                if !job.run(conn) {
                    exec_cached(conn, "ROLLBACK TO job")?;
                }
                exec_cached(conn, "RELEASE job")?;
            }
        }
        exec_cached(conn, "COMMIT")?;
        Ok(())
    })();
    if body.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    body
}
