//! Group commit (SQLite's writer; PostgreSQL's per-account writers when
//! DIALTONE_TEST_PG_URL is set), driven through the service's database handle:
//! concurrent writes share one transaction and one fsync, a job that fails
//! is rolled back alone, and a batch whose COMMIT fails applies nothing and
//! answers every job with an error.
//!
//! Batches are made deterministic by holding the database write lock from
//! outside: the writer takes the first job and waits for the lock while the
//! others queue; once the lock is released they all go in one batch.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{eventually, ledger_fingerprint, TempDb};
use dialtone_credits::backend::{Db, DbOptions};
use dialtone_credits::rules;
use dialtone_credits::sqlite::{SqliteOptions, WriterStats};
use dialtone_credits::store::{DebitOutcome, DebitRequest};
use std::time::Duration;

const T0: i64 = 1_700_000_000;

fn debit(key: &str) -> rules::Debit {
    rules::Debit {
        req: DebitRequest {
            account: "acct".into(),
            amount: 1,
            idempotency_key: key.into(),
            route: None,
            key_prefix: None,
        },
        rate: None,
        now_ms: T0 * 1000,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn open(db: &TempDb) -> Db {
    let options = DbOptions {
        sqlite: SqliteOptions {
            busy_timeout: Duration::from_secs(60),
            ..SqliteOptions::default()
        },
        ..DbOptions::default()
    };
    Db::open(&db.shared(), &options).await.unwrap()
}

/// Hold the database write lock from another connection (COMMIT it to let
/// the writer go).
fn lock_writes(db: &TempDb) -> rusqlite::Connection {
    let blocker = rusqlite::Connection::open(&db.path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    blocker
}

#[test]
fn concurrent_writes_share_one_commit_and_a_failing_job_fails_alone() {
    let db = TempDb::new();
    db.open().create_account("acct", 1000, T0).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let handle = open(&db).await;
        let blocker = lock_writes(&db);
        let h = handle.clone();
        let first = tokio::spawn(async move { h.write(debit("first")).await });
        eventually(
            Duration::from_secs(30),
            "the writer to take the first job",
            || handle.sqlite_writer_stats().unwrap().jobs == 1,
        );
        let mut jobs = Vec::new();
        for i in 0..98 {
            let h = handle.clone();
            jobs.push(tokio::spawn(async move {
                h.write(debit(&format!("d-{i}"))).await
            }));
        }
        let h = handle.clone();
        let failing = tokio::spawn(async move {
            h.write(rules::Raw {
                sql: "INSERT INTO no_such_table VALUES (1)".into(),
            })
            .await
        });
        eventually(Duration::from_secs(30), "99 jobs to queue", || {
            handle.sqlite_queued() == Some(99)
        });
        blocker.execute_batch("COMMIT").unwrap();

        assert!(matches!(
            first.await.unwrap(),
            Ok(DebitOutcome::Charged {
                replayed: false,
                ..
            })
        ));
        for j in jobs {
            assert!(matches!(
                j.await.unwrap(),
                Ok(DebitOutcome::Charged {
                    replayed: false,
                    ..
                })
            ));
        }
        let err = failing.await.unwrap().unwrap_err();
        assert!(
            !err.is_unavailable(),
            "its own error, not the batch's: {err}"
        );
        assert_eq!(
            handle.sqlite_writer_stats().unwrap(),
            WriterStats {
                commits: 2,
                failed_batches: 0,
                jobs: 100
            }
        );
        handle.close().await;
    });
    let mut store = db.open();
    assert_eq!(store.balance("acct").unwrap(), Some(1000 - 99));
    // Every debit is its own ledger row: 1 top-up + 99 debits.
    assert_eq!(ledger_fingerprint(&mut store).1, 100);
}

#[test]
fn a_batch_whose_commit_fails_applies_nothing_and_fails_every_job() {
    let db = TempDb::new();
    db.open().create_account("acct", 10, T0).unwrap();
    let before = ledger_fingerprint(&mut db.open());
    let rt = runtime();
    rt.block_on(async {
        let handle = open(&db).await;
        let blocker = lock_writes(&db);
        let h = handle.clone();
        let first = tokio::spawn(async move { h.write(rules::Ping {}).await });
        eventually(
            Duration::from_secs(30),
            "the writer to take the first job",
            || handle.sqlite_writer_stats().unwrap().jobs == 1,
        );
        // A foreign-key violation checked only at COMMIT makes it fail.
        let h = handle.clone();
        let defer = tokio::spawn(async move {
            h.write(rules::Raw {
                sql: "PRAGMA defer_foreign_keys = ON".into(),
            })
            .await
        });
        eventually(Duration::from_secs(30), "the pragma to queue", || {
            handle.sqlite_queued() == Some(1)
        });
        let h = handle.clone();
        let orphan = tokio::spawn(async move {
            h.write(rules::Raw {
                sql: format!(
                    "INSERT INTO keys (key_sha256, prefix, account, kind, created_at) \
                     VALUES ('{}', 'deadbeef', 'no-such-account', 'api_key', 0)",
                    "a".repeat(64)
                ),
            })
            .await
        });
        eventually(Duration::from_secs(30), "the insert to queue", || {
            handle.sqlite_queued() == Some(2)
        });
        let h = handle.clone();
        let innocent = tokio::spawn(async move { h.write(debit("innocent")).await });
        eventually(Duration::from_secs(30), "the debit to queue", || {
            handle.sqlite_queued() == Some(3)
        });
        blocker.execute_batch("COMMIT").unwrap();

        first.await.unwrap().unwrap();
        for (what, result) in [
            ("pragma", defer.await.unwrap().map(|_| ())),
            ("orphan", orphan.await.unwrap().map(|_| ())),
            ("debit", innocent.await.unwrap().map(|_| ())),
        ] {
            let err = result.expect_err(what);
            assert!(err.is_unavailable(), "{what}: {err}");
        }
        assert_eq!(
            handle.sqlite_writer_stats().unwrap(),
            WriterStats {
                commits: 1,
                failed_batches: 1,
                jobs: 4
            }
        );
        // Nothing of the batch was applied; the debit can be retried.
        let retried = handle.write(debit("innocent")).await.unwrap();
        assert!(matches!(
            retried,
            DebitOutcome::Charged {
                replayed: false,
                balance: 9,
                ..
            }
        ));
        handle.close().await;
    });
    let after = ledger_fingerprint(&mut db.open());
    assert_eq!(after.1, before.1 + 1);
}

// ----- PostgreSQL: group commit by account ----------------------------------
//
// Needs DIALTONE_TEST_PG_URL (`make pg`); skipped without it unless
// DIALTONE_TEST_PG_REQUIRED=1. The batch is made deterministic the same way:
// another connection holds the account's row lock, the writer takes the
// first job and waits for it while the others queue behind.

fn pg_backend() -> Option<common::TestBackend> {
    match common::pg_url() {
        Some(url) => Some(common::TestBackend::postgres(&url)),
        None => {
            assert!(
                std::env::var(common::PG_REQUIRED_ENV).as_deref() != Ok("1"),
                "{} is required",
                common::PG_URL_ENV
            );
            eprintln!("skipped: no {}", common::PG_URL_ENV);
            None
        }
    }
}

/// [`eventually`] from async code (off the runtime's threads).
async fn wait_for(what: &'static str, f: impl FnMut() -> bool + Send + 'static) {
    tokio::task::spawn_blocking(move || eventually(Duration::from_secs(30), what, f))
        .await
        .unwrap();
}

fn hold(key: &str) -> rules::CreateHold {
    rules::CreateHold {
        req: dialtone_credits::store::HoldRequest {
            account: "acct".into(),
            amount: 2,
            idempotency_key: key.into(),
            ttl_seconds: 60,
            route: None,
            key_prefix: None,
        },
        rate: None,
        now_ms: T0 * 1000,
    }
}

#[test]
fn pg_one_accounts_writes_share_one_transaction_and_a_failing_job_fails_alone() {
    use dialtone_credits::pg::WriterStats as PgStats;
    use dialtone_credits::store::{HoldOutcome, SettleOutcome};
    use sqlx::Connection as _;

    let Some(backend) = pg_backend() else { return };
    backend.open().create_account("acct", 1000, T0).unwrap();
    let url = backend.shared();
    let rt = runtime();
    rt.block_on(async {
        let handle = Db::open(&url, &DbOptions::default()).await.unwrap();
        // A hold made before the batch, captured inside it (its queue is
        // found from the hold's account).
        let HoldOutcome::Held(earlier) = handle.write(hold("earlier")).await.unwrap() else {
            panic!("hold refused")
        };
        let before = handle.pg_writer_stats().unwrap();

        let mut blocker = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql("BEGIN; SELECT balance FROM accounts WHERE id = 'acct' FOR UPDATE")
            .execute(&mut blocker)
            .await
            .unwrap();
        let h = handle.clone();
        let first = tokio::spawn(async move { h.write(debit("first")).await });
        let h = handle.clone();
        wait_for("the writer to take the first job", move || {
            h.pg_writer_stats().unwrap().jobs == before.jobs + 1
        })
        .await;

        let mut jobs = Vec::new();
        for i in 0..50 {
            let h = handle.clone();
            jobs.push(tokio::spawn(async move {
                h.write(debit(&format!("d-{i}"))).await
            }));
        }
        let h = handle.clone();
        wait_for("50 debits to queue", move || h.pg_queued() == Some(50)).await;
        // The same key again, queued behind its twin: answered from the row
        // the twin wrote earlier in the same transaction.
        let h = handle.clone();
        let replay = tokio::spawn(async move { h.write(debit("d-7")).await });
        // Refused by the rules (amount 0) after its savepoint: rolled back
        // alone.
        let h = handle.clone();
        let invalid = tokio::spawn(async move {
            let mut bad = debit("bad");
            bad.req.amount = 0;
            h.write(bad).await
        });
        let h = handle.clone();
        let new_hold = tokio::spawn(async move { h.write(hold("in-batch")).await });
        let h = handle.clone();
        let hold_id = earlier.hold_id.clone();
        let capture = tokio::spawn(async move {
            h.write(rules::Settle {
                hold_id,
                release: None,
                now: T0,
            })
            .await
        });
        let h = handle.clone();
        wait_for("54 jobs to queue", move || h.pg_queued() == Some(54)).await;
        sqlx::raw_sql("COMMIT").execute(&mut blocker).await.unwrap();

        assert!(matches!(
            first.await.unwrap(),
            Ok(DebitOutcome::Charged {
                replayed: false,
                ..
            })
        ));
        for j in jobs {
            assert!(matches!(
                j.await.unwrap(),
                Ok(DebitOutcome::Charged {
                    replayed: false,
                    ..
                })
            ));
        }
        assert!(matches!(
            replay.await.unwrap(),
            Ok(DebitOutcome::Charged { replayed: true, .. })
        ));
        let err = invalid.await.unwrap().unwrap_err();
        assert!(
            !err.is_unavailable(),
            "its own error, not the batch's: {err}"
        );
        assert!(matches!(new_hold.await.unwrap(), Ok(HoldOutcome::Held(_))));
        assert!(matches!(
            capture.await.unwrap(),
            Ok(SettleOutcome::Settled(_))
        ));
        assert_eq!(
            handle.pg_writer_stats().unwrap(),
            PgStats {
                commits: before.commits + 2,
                failed_batches: 0,
                jobs: before.jobs + 55,
                alone: 0,
            }
        );
        handle.close().await;
    });
    let mut store = backend.open();
    // 51 debits of 1, the earlier hold captured (2), the new one held (2:
    // out of the balance, counted in `held` until it is settled).
    let view = store.account_summary("acct", T0).unwrap().unwrap();
    assert_eq!((view.balance, view.held), (1000 - 51 - 2 - 2, 2));
    ledger_fingerprint(&mut store);
}

#[test]
fn pg_two_handles_batching_one_account_never_overdraw() {
    let Some(backend) = pg_backend() else { return };
    backend.open().create_account("acct", 50, T0).unwrap();
    let url = backend.shared();
    let rt = runtime();
    let charged = rt.block_on(async {
        // Two handles: two processes' pools and writers on one database.
        let a = Db::open(&url, &DbOptions::default()).await.unwrap();
        let b = Db::open(&url, &DbOptions::default()).await.unwrap();
        let mut jobs = Vec::new();
        for i in 0..200 {
            let h = if i % 2 == 0 { a.clone() } else { b.clone() };
            jobs.push(tokio::spawn(async move {
                h.write(debit(&format!("n-{i}"))).await
            }));
        }
        let mut charged = 0;
        for j in jobs {
            match j.await.unwrap().unwrap() {
                DebitOutcome::Charged {
                    replayed: false, ..
                } => charged += 1,
                DebitOutcome::Insufficient { required: 1, .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let stats = (a.pg_writer_stats().unwrap(), b.pg_writer_stats().unwrap());
        assert_eq!(stats.0.failed_batches + stats.1.failed_batches, 0);
        a.close().await;
        b.close().await;
        charged
    });
    assert_eq!(charged, 50);
    let mut store = backend.open();
    assert_eq!(store.balance("acct").unwrap(), Some(0));
    ledger_fingerprint(&mut store);
}
