//! [`Db`]: the service's database handle, SQLite or PostgreSQL, shared by
//! every request, the sweeper and both listeners of one process.

use crate::db::Dialect;
use crate::pg::{PgDb, PgOptions};
use crate::rules::{self, Job};
use crate::sqlite::{SqliteDb, SqliteOptions};
use crate::store::{is_postgres_url, Result};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Settings of both backends (only the one in use matters).
#[derive(Debug, Clone, Default)]
pub struct DbOptions {
    pub sqlite: SqliteOptions,
    pub pg: PgOptions,
}

enum Backend {
    Sqlite(SqliteDb),
    Postgres(PgDb),
}

/// Keys whose use was recorded this second (see [`Db::touch_key_later`]).
const TOUCHED_CAPACITY: usize = 65_536;

struct Inner {
    backend: Backend,
    /// key_sha256 → the `now` last recorded, so a busy key costs one write
    /// per second, not one per lookup.
    touched: Mutex<HashMap<String, i64>>,
}

/// A connection pool and the group-commit writer(s). Cheap to clone.
#[derive(Clone)]
pub struct Db(Arc<Inner>);

/// Connection counts of one pool, for the metrics.
#[derive(Debug, Clone, Copy)]
pub struct PoolStats {
    pub name: &'static str,
    pub open: u32,
    pub idle: usize,
    pub max: u32,
}

impl Db {
    /// Open `--db` (a SQLite path or a `postgres://` URL), migrating it.
    pub async fn open(db: &str, options: &DbOptions) -> Result<Db> {
        let backend = if is_postgres_url(db) {
            Backend::Postgres(PgDb::connect(db, &options.pg).await?)
        } else {
            Backend::Sqlite(SqliteDb::open(Path::new(db), &options.sqlite).await?)
        };
        Ok(Db(Arc::new(Inner {
            backend,
            touched: Mutex::new(HashMap::new()),
        })))
    }

    pub fn dialect(&self) -> Dialect {
        match self.0.backend {
            Backend::Sqlite(_) => Dialect::Sqlite,
            Backend::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Run a write job: SQLite's writer (group commit), or on PostgreSQL
    /// its account's group-commit writer or a transaction of its own, on a
    /// task of its own so a request cancelled mid-way (its client went away)
    /// never cuts a transaction short.
    pub async fn write<J: Job + 'static>(&self, job: J) -> Result<J::Out> {
        match &self.0.backend {
            Backend::Sqlite(db) => db.write(job).await,
            Backend::Postgres(_) => {
                let this = self.clone();
                let task = tokio::spawn(async move {
                    match &this.0.backend {
                        Backend::Postgres(db) => db.write(job).await,
                        Backend::Sqlite(db) => db.write(job).await,
                    }
                });
                task.await.map_err(|e| {
                    crate::store::StoreError::Unavailable(format!("write task failed: {e}"))
                })?
            }
        }
    }

    /// Run a read job on a pooled reader, on one snapshot.
    pub async fn read<J: Job>(&self, job: J) -> Result<J::Out> {
        match &self.0.backend {
            Backend::Sqlite(db) => db.read(&job).await,
            Backend::Postgres(db) => db.read(&job).await,
        }
    }

    /// Record that an active key was used at `now`, off the lookup's path:
    /// queued to the writer and not waited for, at most once per key per
    /// second. (`last_used_at` is informational; the lookup's answer does
    /// not depend on it.)
    pub fn touch_key_later(&self, key_sha256: &str, now: i64) {
        {
            let mut touched = self
                .0
                .touched
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if touched.get(key_sha256).is_some_and(|t| *t >= now) {
                return;
            }
            if touched.len() >= TOUCHED_CAPACITY {
                touched.clear();
            }
            touched.insert(key_sha256.to_string(), now);
        }
        let this = self.clone();
        let job = rules::TouchKey {
            key_sha256: key_sha256.to_string(),
            now,
        };
        tokio::spawn(async move {
            if let Err(e) = this.write(job).await {
                tracing::warn!(error = %e, "could not record a key's last use");
            }
        });
    }

    /// Release every hold past its expiry (the sweeper): one job per due
    /// account, all queued at once so SQLite commits them together.
    pub async fn expire_holds(&self, now: i64) -> Result<usize> {
        let accounts = self.read(rules::DueAccounts { now }).await?;
        let jobs = accounts.into_iter().map(|account| {
            let this = self.clone();
            async move { this.write(rules::ExpireAccount { account, now }).await }
        });
        let mut released = 0;
        for r in futures_util::future::join_all(jobs).await {
            released += r?;
        }
        // Leases past their expiry: closed, their unspent credits given back.
        let accounts = self.read(rules::DueLeaseAccounts { now }).await?;
        let jobs = accounts.into_iter().map(|account| {
            let this = self.clone();
            async move { this.write(rules::ExpireAccountLeases { account, now }).await }
        });
        for r in futures_util::future::join_all(jobs).await {
            let n = r?;
            crate::metrics::leases_expired(n);
            released += n;
        }
        Ok(released)
    }

    /// The database answers a query, and on SQLite the writer runs (`/readyz`).
    pub async fn ping(&self, timeout: Duration) -> Result<()> {
        if let Backend::Sqlite(db) = &self.0.backend {
            if !db.writer_alive() {
                return Err(crate::store::StoreError::Unavailable(
                    "the SQLite writer has stopped".into(),
                ));
            }
        }
        match tokio::time::timeout(timeout, self.read(rules::Ping {})).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(crate::store::StoreError::Unavailable(
                "the database did not answer in time".into(),
            )),
        }
    }

    /// The SQLite writer's counters (`None` on PostgreSQL).
    pub fn sqlite_writer_stats(&self) -> Option<crate::sqlite::WriterStats> {
        match &self.0.backend {
            Backend::Sqlite(db) => Some(db.writer_stats()),
            Backend::Postgres(_) => None,
        }
    }

    /// PostgreSQL's group-commit counters (`None` on SQLite).
    pub fn pg_writer_stats(&self) -> Option<crate::pg::WriterStats> {
        match &self.0.backend {
            Backend::Postgres(db) => Some(db.writer_stats()),
            Backend::Sqlite(_) => None,
        }
    }

    /// Write jobs waiting for PostgreSQL's group-commit writers (`None` on
    /// SQLite).
    pub fn pg_queued(&self) -> Option<usize> {
        match &self.0.backend {
            Backend::Postgres(db) => Some(db.queued()),
            Backend::Sqlite(_) => None,
        }
    }

    /// Write jobs waiting for the SQLite writer (`None` on PostgreSQL).
    pub fn sqlite_queued(&self) -> Option<usize> {
        match &self.0.backend {
            Backend::Sqlite(db) => Some(db.queued()),
            Backend::Postgres(_) => None,
        }
    }

    /// Connection counts of the pool(s).
    pub fn pool_stats(&self) -> PoolStats {
        let (name, (open, idle, max)) = match &self.0.backend {
            Backend::Sqlite(db) => ("sqlite_readers", db.pool_stats()),
            Backend::Postgres(db) => ("postgres", db.pool_stats()),
        };
        PoolStats {
            name,
            open,
            idle,
            max,
        }
    }

    /// Finish queued writes and close every connection.
    pub async fn close(&self) {
        match &self.0.backend {
            Backend::Sqlite(db) => db.close().await,
            Backend::Postgres(db) => db.close().await,
        }
    }
}
