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
//! Group commit by account: PostgreSQL flushes the WAL of concurrent
//! commits together by itself, but that does not help the common case of a
//! busy account: each of its writes holds the account's row lock until its
//! own `COMMIT` is flushed, so one account's paid requests ran one commit
//! flush at a time (measured: 318 paid requests/s on one account against
//! 663 on 64; README, Speed). So the service commits writes that lock an
//! account row ([`BatchKey`]: debits, holds, captures and releases) in
//! batches, like the SQLite writer does:
//!
//! - `writers` tasks; a job goes to the one its account hashes to, so one
//!   account's writes queue in one place, in arrival order.
//! - A writer takes the first queued job and every job queued behind it (up
//!   to `max_batch`; no artificial delay, so batches form only under load),
//!   sorts them by account (every process locks account rows in the same
//!   order, so two instances' batches cannot deadlock on them), and runs
//!   them in ONE transaction, each inside a `SAVEPOINT`: a job that fails is
//!   rolled back to its savepoint and gets its own error while the others
//!   stay. One `COMMIT`, one WAL flush and one row lock per account per
//!   batch; then every job gets its answer. Each job's rules see the jobs
//!   before it in the batch, so idempotency and balances are unchanged.
//! - Consecutive debits of one account (no rate limit) run fused, as one
//!   job: [`rules::debit_many`] answers each as it would be answered alone,
//!   in a fixed number of statements for all of them (lock, idempotency
//!   read, one insert, one update with the ledger rows). A paid request on a
//!   busy account otherwise waits behind every round trip of the debits
//!   before it, inside the account's row lock. If the fused statements fail,
//!   the group is rolled back to its savepoint and its debits run one by
//!   one.
//! - A job that hits a retryable failure (deadlock, serialization, a racing
//!   insert of the same unique key) rolls the whole batch back and the batch
//!   runs again; after [`BATCH_ATTEMPTS`] tries each of its jobs runs alone,
//!   with the single-transaction retry loop. A failed `BEGIN` or `COMMIT`
//!   answers every job of the batch with the error (the filter fails
//!   closed; a retry with the same idempotency key is answered from what was
//!   stored, if the commit did land).
//!
//! Everything else (top-ups, keys, refunds, claims, the sweeper's
//! expiries) runs in a transaction of its own.
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
use crate::rules::{self, BatchKey, Job};
use crate::store::{batch_answer, DebitOutcome, DebitRequest, Result, StoreError};
use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::ConnectOptions;
use std::any::Any;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The PostgreSQL schema, in order (`migrations/postgres/NNNN_*.sql`).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// How often a transaction is re-run after a retryable failure.
const MAX_ATTEMPTS: usize = 30;
/// How often a batch is re-run after a retryable failure before its jobs
/// run alone.
const BATCH_ATTEMPTS: usize = 3;
/// Write jobs queued per writer before callers wait to queue.
const WRITER_QUEUE: usize = 4096;
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
    /// Most account writes committed together (1: every write in its own
    /// transaction, no writers).
    pub max_batch: usize,
    /// Group-commit writers (each uses one pooled connection while it
    /// commits a batch).
    pub writers: usize,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 32,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(300),
            max_batch: 64,
            writers: 4,
        }
    }
}

/// PostgreSQL for the service and the operator API.
pub struct PgDb {
    pool: PgPool,
    /// One queue per group-commit writer (empty: no batching; taken at
    /// close so the writers drain and stop).
    writers: Mutex<Vec<mpsc::Sender<Box<dyn Pending>>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    counters: Arc<Counters>,
}

/// What the group-commit writers have done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Batches committed.
    pub commits: u64,
    /// Batches whose transaction failed (every job answered with the error).
    pub failed_batches: u64,
    /// Jobs taken into a batch (counted again when a batch is re-run).
    pub jobs: u64,
    /// Jobs that ran alone after their batch kept colliding.
    pub alone: u64,
    /// Debits that ran fused with their neighbours ([`rules::debit_many`];
    /// counted again when a batch is re-run).
    pub fused: u64,
}

#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    failed_batches: AtomicU64,
    jobs: AtomicU64,
    alone: AtomicU64,
    fused: AtomicU64,
}

impl PgDb {
    /// Create the pool, connect once and bring the schema up to date.
    pub async fn connect(url: &str, options: &PgOptions) -> Result<PgDb> {
        let connect = PgConnectOptions::from_str(url)?
            .application_name("dialtone-credits")
            .statement_cache_capacity(256)
            // Statements stay prepared (one round trip each) but are planned
            // for their values every time. A generic plan is cached once a
            // statement has run five times, and it was kept: a fresh
            // database's lookups of a batch's idempotency keys planned as a
            // sequential scan of a then-small `debits` table went on
            // scanning all of it as it grew (measured in the bench, until
            // autovacuum's first ANALYZE). The statements are small; their
            // planning costs PostgreSQL microseconds, not a round trip.
            .options([("plan_cache_mode", "force_custom_plan")])
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
        let counters = Arc::new(Counters::default());
        let mut senders = Vec::new();
        let mut tasks = Vec::new();
        if options.max_batch > 1 {
            for _ in 0..options.writers.max(1) {
                let (tx, rx) = mpsc::channel(WRITER_QUEUE);
                senders.push(tx);
                tasks.push(tokio::spawn(writer_loop(
                    pool.clone(),
                    rx,
                    options.max_batch,
                    Arc::clone(&counters),
                )));
            }
        }
        let db = PgDb {
            pool,
            writers: Mutex::new(senders),
            tasks: Mutex::new(tasks),
            counters,
        };
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
        begin(&self.pool, statement).await
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
        write_alone(&self.pool, job).await
    }

    /// Run a write job: with the other writes of its account in a batch
    /// (group commit), or alone if it locks no account row or batching is
    /// off. If the caller stops waiting, the job still runs.
    pub async fn write<J: Job + 'static>(&self, job: J) -> Result<J::Out> {
        let account = match job.batch_key() {
            BatchKey::Alone => None,
            BatchKey::Account(a) => Some(a.to_string()),
            // The hold's account never changes: read it outside the
            // transaction to know which queue the capture belongs in. An
            // unknown hold runs alone (and is answered "not found"); a
            // database that does not answer is answered at once (503), not
            // waited for a second time.
            BatchKey::Hold(id) => {
                sqlx::query_scalar::<_, String>("SELECT account FROM holds WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?
            }
        };
        let sender = account.as_deref().and_then(|a| {
            let writers = self.writers.lock().unwrap_or_else(PoisonError::into_inner);
            if writers.is_empty() {
                return None;
            }
            let mut h = std::collections::hash_map::DefaultHasher::new();
            a.hash(&mut h);
            let n = u64::try_from(writers.len()).unwrap_or(1).max(1);
            let i = usize::try_from(h.finish() % n).unwrap_or(0);
            writers.get(i).cloned()
        });
        let (Some(account), Some(sender)) = (account, sender) else {
            return self.write_here(&job).await;
        };
        let (reply, answer) = oneshot::channel();
        let pending = Box::new(PendingJob {
            job,
            account,
            result: None,
            reply,
        });
        sender
            .send(pending)
            .await
            .map_err(|_| StoreError::Unavailable("the service is shutting down".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the group-commit writer stopped".into()))?
    }

    /// Run a read job on one snapshot.
    pub async fn read<J: Job>(&self, job: &J) -> Result<J::Out> {
        let mut tx = self.begin(READ_BEGIN).await?;
        let out = job.run(&mut PgConn::new(&mut tx)).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// The group-commit writers' counters.
    pub fn writer_stats(&self) -> WriterStats {
        let c = &self.counters;
        WriterStats {
            commits: c.commits.load(Ordering::Acquire),
            failed_batches: c.failed_batches.load(Ordering::Acquire),
            jobs: c.jobs.load(Ordering::Acquire),
            alone: c.alone.load(Ordering::Acquire),
            fused: c.fused.load(Ordering::Acquire),
        }
    }

    /// Jobs waiting in the writers' queues.
    pub fn queued(&self) -> usize {
        self.writers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|w| w.max_capacity().saturating_sub(w.capacity()))
            .sum()
    }

    /// Pool: (open connections, idle connections, max).
    pub fn pool_stats(&self) -> (u32, usize, u32) {
        (
            self.pool.size(),
            self.pool.num_idle(),
            self.pool.options().get_max_connections(),
        )
    }

    /// Let the writers finish every job already queued, then close every
    /// connection.
    pub async fn close(&self) {
        self.writers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for t in tasks {
            let _ = t.await;
        }
        self.pool.close().await;
    }
}

/// `BEGIN` on a pooled connection. A connection that died while idle (the
/// server restarted) fails here, before anything was sent, so the next one
/// is tried.
async fn begin(
    pool: &PgPool,
    statement: &'static str,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let attempts = pool.options().get_max_connections().saturating_add(1);
    let mut last = None;
    for _ in 0..attempts {
        match pool.begin_with(statement).await {
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

/// One write job in a transaction of its own, re-run on retryable failures.
async fn write_alone<J: Job>(pool: &PgPool, job: &J) -> Result<J::Out> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut tx = begin(pool, WRITE_BEGIN).await?;
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

// ----- group commit ---------------------------------------------------------

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How one job of a batch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ran {
    Ok,
    /// Its own error, kept for its answer; the batch goes on.
    Failed,
    /// A retryable failure: the whole batch runs again.
    Retry,
}

/// A write job waiting for a writer, its inputs and where to answer.
trait Pending: Send {
    fn account(&self) -> &str;
    /// Run inside the batch's transaction.
    fn run<'a>(&'a mut self, conn: &'a mut sqlx::PgConnection) -> BoxFuture<'a, Ran>;
    /// Answer the caller: the job's own result, or the batch's failure.
    fn finish(self: Box<Self>, batch_error: Option<&str>);
    /// Run in a transaction of its own (after the batch kept failing) and
    /// answer.
    fn run_alone(self: Box<Self>, pool: PgPool) -> BoxFuture<'static, ()>;
    /// This job as a debit that may run fused with the debits next to it
    /// ([`rules::debit_many`]): one with no rate limit, and its clock.
    fn fusable_debit(&self) -> Option<(&DebitRequest, i64)>;
    /// A fused debit's answer.
    fn set_debit_result(&mut self, result: Result<DebitOutcome>);
}

struct PendingJob<J: Job> {
    job: J,
    account: String,
    result: Option<Result<J::Out>>,
    reply: oneshot::Sender<Result<J::Out>>,
}

impl<J: Job + 'static> Pending for PendingJob<J> {
    fn account(&self) -> &str {
        &self.account
    }

    fn run<'a>(&'a mut self, conn: &'a mut sqlx::PgConnection) -> BoxFuture<'a, Ran> {
        Box::pin(async move {
            let result = self.job.run(&mut PgConn::new(conn)).await;
            let ran = match &result {
                Ok(_) => Ran::Ok,
                Err(e) if e.is_retryable() => Ran::Retry,
                Err(_) => Ran::Failed,
            };
            self.result = Some(result);
            ran
        })
    }

    fn finish(self: Box<Self>, batch_error: Option<&str>) {
        // The caller may have gone away (its request was cancelled): the
        // write stands, like any idempotent request whose answer was lost.
        let _ = self.reply.send(batch_answer(batch_error, self.result));
    }

    fn run_alone(self: Box<Self>, pool: PgPool) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let result = write_alone(&pool, &self.job).await;
            let _ = self.reply.send(result);
        })
    }

    fn fusable_debit(&self) -> Option<(&DebitRequest, i64)> {
        let debit = (&self.job as &dyn Any).downcast_ref::<rules::Debit>()?;
        debit.rate.is_none().then_some((&debit.req, debit.now_ms))
    }

    fn set_debit_result(&mut self, result: Result<DebitOutcome>) {
        if let Some(slot) = (&mut self.result as &mut dyn Any).downcast_mut::<Option<Result<DebitOutcome>>>() {
            *slot = Some(result);
        }
    }
}

/// Where the run of debits that can be fused with `batch[start]` ends
/// (exclusive): consecutive debits of one account, none rate-limited.
/// `start + 1` when there is nothing to fuse.
fn fused_end(batch: &[Box<dyn Pending>], start: usize) -> usize {
    let Some(first) = batch.get(start).filter(|j| j.fusable_debit().is_some()) else {
        return start + 1;
    };
    let account = first.account();
    start
        + batch
            .get(start..)
            .unwrap_or_default()
            .iter()
            .take_while(|j| j.fusable_debit().is_some() && j.account() == account)
            .count()
}

/// A run of debits of one account through [`rules::debit_many`]: a fixed
/// number of statements for all of them. `Ran::Failed`: a database error
/// (the caller rolls the group back and runs its jobs one by one).
async fn run_fused(conn: &mut sqlx::PgConnection, group: &mut [Box<dyn Pending>]) -> Ran {
    let reqs: Vec<(DebitRequest, i64)> =
        group.iter().filter_map(|j| j.fusable_debit().map(|(r, now)| (r.clone(), now))).collect();
    let (Some((first, _)), true) = (reqs.first(), reqs.len() == group.len()) else {
        return Ran::Failed;
    };
    let account = first.account.clone();
    let refs: Vec<(&DebitRequest, i64)> = reqs.iter().map(|(r, now)| (r, *now)).collect();
    match rules::debit_many(&mut PgConn::new(conn), &account, &refs).await {
        Ok(outcomes) => {
            for (job, outcome) in group.iter_mut().zip(outcomes) {
                job.set_debit_result(outcome);
            }
            Ran::Ok
        }
        Err(e) if e.is_retryable() => Ran::Retry,
        Err(e) => {
            tracing::warn!(error = %e, jobs = group.len(), "fused debits failed; running them one by one");
            Ran::Failed
        }
    }
}

/// A writer: batch what is queued, commit once, answer; until every sender
/// is gone and the queue is empty.
async fn writer_loop(
    pool: PgPool,
    mut rx: mpsc::Receiver<Box<dyn Pending>>,
    max_batch: usize,
    counters: Arc<Counters>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        // One lock order for every process: by account, then arrival.
        batch.sort_by(|a, b| a.account().cmp(b.account()));
        commit_batch(&pool, batch, &counters).await;
    }
}

/// Run a batch until it commits, fails for good, or is handed to
/// [`write_alone`] job by job; every job is answered.
async fn commit_batch(pool: &PgPool, mut batch: Vec<Box<dyn Pending>>, counters: &Counters) {
    let size = batch.len();
    for attempt in 1..=BATCH_ATTEMPTS {
        let started = Instant::now();
        counters
            .jobs
            .fetch_add(u64::try_from(size).unwrap_or(u64::MAX), Ordering::AcqRel);
        match run_batch(pool, &mut batch, counters).await {
            Ok(true) => {
                counters.commits.fetch_add(1, Ordering::AcqRel);
                crate::metrics::group_commit(size, started.elapsed(), true);
                for job in batch {
                    job.finish(None);
                }
                return;
            }
            Ok(false) => {
                crate::metrics::pg_retry();
                backoff(attempt).await;
            }
            Err(e) => {
                counters.failed_batches.fetch_add(1, Ordering::AcqRel);
                crate::metrics::group_commit(size, started.elapsed(), false);
                tracing::error!(error = %e, jobs = size, "PostgreSQL group commit failed");
                let message = format!("the batch's transaction failed: {e}");
                for job in batch {
                    job.finish(Some(&message));
                }
                return;
            }
        }
    }
    // Still colliding (with another instance, or a unique key raced twice):
    // each job alone, with the single-transaction retry loop.
    counters
        .alone
        .fetch_add(u64::try_from(size).unwrap_or(u64::MAX), Ordering::AcqRel);
    futures_util::future::join_all(batch.into_iter().map(|job| job.run_alone(pool.clone()))).await;
}

/// One transaction, one savepoint per job, one commit. `Ok(false)`: a job
/// hit a retryable failure and the transaction was rolled back.
async fn run_batch(pool: &PgPool, batch: &mut [Box<dyn Pending>], counters: &Counters) -> Result<bool> {
    let mut tx = begin(pool, WRITE_BEGIN).await?;
    if let [only] = batch {
        // Alone in its batch: no savepoint; its failure rolls back.
        return match only.run(&mut tx).await {
            Ran::Ok => tx.commit().await.map(|()| true).map_err(StoreError::from),
            Ran::Failed => tx.rollback().await.map(|()| true).map_err(StoreError::from),
            Ran::Retry => Ok(false),
        };
    }
    let len = batch.len();
    // The whole batch one run of fused debits (one busy account): no
    // savepoint, one round trip fewer inside its row lock. If the run
    // fails, a new transaction runs its debits one by one.
    let mut fuse = true;
    if fused_end(batch, 0) >= len {
        match run_fused(&mut tx, batch).await {
            Ran::Ok => {
                tx.commit().await?;
                counters.fused.fetch_add(u64::try_from(len).unwrap_or(u64::MAX), Ordering::AcqRel);
                return Ok(true);
            }
            Ran::Retry => return Ok(false),
            Ran::Failed => {
                tx.rollback().await?;
                tx = begin(pool, WRITE_BEGIN).await?;
                fuse = false;
            }
        }
    }
    simple(&mut tx, "SAVEPOINT job").await?;
    let mut start = 0;
    while start < len {
        // Consecutive debits of one account run fused, as one job here.
        let end = fused_end(batch, start).min(len);
        if fuse && end - start >= 2 {
            match run_fused(&mut tx, batch.get_mut(start..end).unwrap_or_default()).await {
                Ran::Ok => {
                    counters.fused.fetch_add(u64::try_from(end - start).unwrap_or(u64::MAX), Ordering::AcqRel);
                    if end < len {
                        simple(&mut tx, "RELEASE SAVEPOINT job; SAVEPOINT job").await?;
                    }
                    start = end;
                    continue;
                }
                Ran::Retry => return Ok(false),
                // Undo the group; its jobs run one by one below.
                Ran::Failed => simple(&mut tx, "ROLLBACK TO SAVEPOINT job").await?,
            }
        }
        for i in start..end.max(start + 1) {
            let Some(job) = batch.get_mut(i) else { break };
            match job.run(&mut tx).await {
                Ran::Ok if i + 1 < len => {
                    // One round trip: keep this job's work, open the next one's.
                    simple(&mut tx, "RELEASE SAVEPOINT job; SAVEPOINT job").await?;
                }
                Ran::Ok => {}
                // The savepoint stays, now marking where the next job starts.
                Ran::Failed => {
                    simple(&mut tx, "ROLLBACK TO SAVEPOINT job").await?;
                }
                Ran::Retry => return Ok(false),
            }
        }
        start = end.max(start + 1);
    }
    tx.commit().await?;
    Ok(true)
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

/// Statements sent as one simple query, one round trip (a `&str` with no
/// arguments goes through PostgreSQL's simple query protocol, which takes
/// several statements).
async fn simple(conn: &mut sqlx::PgConnection, sql: &'static str) -> Result<()> {
    sqlx::Executor::execute(conn, sql).await?;
    Ok(())
}
