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
                jobs: 100,
                // The 98 debits queued together ran as one statement group.
                fused: 98
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
                jobs: 4,
                fused: 0
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
                // The 50 debits, the replay and the invalid one, in one go.
                fused: before.fused + 52,
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

/// A batch's debits of one account run fused (`rules::debit_many`: a fixed
/// number of statements for all of them); each still gets the answer it
/// would get run alone after the ones before it: replays of a charge stored
/// earlier and of one made earlier in the batch, a conflict, the last
/// credits spent exactly, refusals with the balance they saw.
#[test]
fn pg_fused_debits_answer_as_one_by_one() {
    use sqlx::Connection as _;

    let Some(backend) = pg_backend() else { return };
    backend.open().create_account("acct", 10, T0).unwrap();
    let url = backend.shared();
    let charge = |key: &str, amount: i64| {
        let mut d = debit(key);
        d.req.amount = amount;
        d
    };
    let rt = runtime();
    let answers = rt.block_on(async {
        let handle = Db::open(&url, &DbOptions::default()).await.unwrap();
        let stored = handle.write(charge("old", 1)).await.unwrap();
        assert!(matches!(stored, DebitOutcome::Charged { balance: 9, .. }), "{stored:?}");
        let before = handle.pg_writer_stats().unwrap();
        let mut blocker = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql("BEGIN; SELECT balance FROM accounts WHERE id = 'acct' FOR UPDATE")
            .execute(&mut blocker)
            .await
            .unwrap();
        let h = handle.clone();
        let first = tokio::spawn(async move { h.write(charge("first", 1)).await });
        let h = handle.clone();
        wait_for("the writer to take the first job", move || h.pg_writer_stats().unwrap().jobs == before.jobs + 1).await;
        let queue = [("a", 3), ("old", 1), ("old", 2), ("b", 3), ("a", 3), ("c", 3), ("d", 2), ("e", 1)];
        let mut jobs = Vec::new();
        for (n, (key, amount)) in queue.into_iter().enumerate() {
            let h = handle.clone();
            jobs.push(tokio::spawn(async move { h.write(charge(key, amount)).await }));
            let h = handle.clone();
            // One at a time, so the batch keeps this order.
            wait_for("the debit to queue", move || h.pg_queued() == Some(n + 1)).await;
        }
        sqlx::raw_sql("COMMIT").execute(&mut blocker).await.unwrap();
        let mut answers = vec![first.await.unwrap().unwrap()];
        for j in jobs {
            answers.push(j.await.unwrap().unwrap());
        }
        let stats = handle.pg_writer_stats().unwrap();
        assert_eq!((stats.commits, stats.failed_batches, stats.alone), (before.commits + 2, 0, 0), "one batch after the first job");
        assert_eq!(stats.fused, before.fused + 8, "the batch's 8 debits ran fused");
        handle.close().await;
        answers
    });
    let charged = |balance: i64, charged: i64, replayed: bool| DebitOutcome::Charged { account: "acct".into(), charged, balance, replayed };
    assert_eq!(
        answers,
        vec![
            charged(8, 1, false),                                   // first, alone
            charged(5, 3, false),                                   // a
            charged(9, 1, true),                                    // old: stored before
            DebitOutcome::Conflict,                                 // old, another amount
            charged(2, 3, false),                                   // b
            charged(5, 3, true),                                    // a again: this batch's charge
            DebitOutcome::Insufficient { balance: 2, required: 3 }, // c
            charged(0, 2, false),                                   // d: the last credits
            DebitOutcome::Insufficient { balance: 0, required: 1 }, // e
        ]
    );
    let mut store = backend.open();
    let view = store.account_summary("acct", T0).unwrap().unwrap();
    assert_eq!((view.balance, view.held), (0, 0));
    ledger_fingerprint(&mut store);
}

/// SQLite's writer runs a batch's consecutive debits of one account fused
/// (`rules::debit_many`), and each still gets the answer it would get run
/// alone after the ones before it; a debit of another account or a
/// rate-limited one ends the run and runs alone.
#[test]
fn sqlite_fused_debits_answer_as_one_by_one() {
    let db = TempDb::new();
    {
        let mut store = db.open();
        store.create_account("acct", 10, T0).unwrap();
        store.create_account("other", 5, T0).unwrap();
    }
    let charge = |account: &str, key: &str, amount: i64| {
        let mut d = debit(key);
        d.req.account = account.into();
        d.req.amount = amount;
        d
    };
    let rt = runtime();
    let answers = rt.block_on(async {
        let handle = open(&db).await;
        let stored = handle.write(charge("acct", "old", 1)).await.unwrap();
        assert!(matches!(stored, DebitOutcome::Charged { balance: 9, .. }), "{stored:?}");
        let before = handle.sqlite_writer_stats().unwrap();
        let blocker = lock_writes(&db);
        let h = handle.clone();
        let first = tokio::spawn(async move { h.write(charge("acct", "first", 1)).await });
        eventually(Duration::from_secs(30), "the writer to take the first job", || {
            handle.sqlite_writer_stats().unwrap().jobs == before.jobs + 1
        });
        let queue = [
            ("acct", "a", 3),
            ("acct", "old", 1),
            ("acct", "old", 2),
            ("acct", "b", 3),
            ("acct", "a", 3),
            ("other", "o", 2), // another account: ends the run, runs alone
            ("acct", "c", 3),
            ("acct", "d", 2),
            ("acct", "e", 1),
        ];
        let mut jobs = Vec::new();
        for (n, (account, key, amount)) in queue.into_iter().enumerate() {
            let h = handle.clone();
            let d = charge(account, key, amount);
            jobs.push(tokio::spawn(async move { h.write(d).await }));
            // One at a time, so the batch keeps this order.
            eventually(Duration::from_secs(30), "the debit to queue", || handle.sqlite_queued() == Some(n + 1));
        }
        blocker.execute_batch("COMMIT").unwrap();
        let mut answers = vec![first.await.unwrap().unwrap()];
        for j in jobs {
            answers.push(j.await.unwrap().unwrap());
        }
        let stats = handle.sqlite_writer_stats().unwrap();
        assert_eq!((stats.commits, stats.failed_batches), (before.commits + 2, 0), "one batch after the first job");
        assert_eq!(stats.fused, before.fused + 8, "two runs of fused debits (5 and 3); the other account's alone");
        handle.close().await;
        answers
    });
    let charged = |account: &str, balance: i64, charged: i64, replayed: bool| DebitOutcome::Charged {
        account: account.into(),
        charged,
        balance,
        replayed,
    };
    assert_eq!(
        answers,
        vec![
            charged("acct", 8, 1, false),                           // first, alone
            charged("acct", 5, 3, false),                           // a
            charged("acct", 9, 1, true),                            // old: stored before
            DebitOutcome::Conflict,                                 // old, another amount
            charged("acct", 2, 3, false),                           // b
            charged("acct", 5, 3, true),                            // a again: this batch's charge
            charged("other", 3, 2, false),                          // o, alone
            DebitOutcome::Insufficient { balance: 2, required: 3 }, // c
            charged("acct", 0, 2, false),                           // d: the last credits
            DebitOutcome::Insufficient { balance: 0, required: 1 }, // e
        ]
    );
    let mut store = db.open();
    let view = store.account_summary("acct", T0).unwrap().unwrap();
    assert_eq!((view.balance, view.held), (0, 0));
    assert_eq!(store.balance("other").unwrap(), Some(3));
    ledger_fingerprint(&mut store);
}

/// `rules::debit_many` itself, on each backend (SQLite's two statements for
/// the balance and ledger rows, PostgreSQL's one): the same answers as one
/// debit after another, a request that fails validation answered alone, and
/// the ledger proves the balance.
struct Fused(Vec<(DebitRequest, i64)>);

impl rules::Job for Fused {
    type Out = Vec<Result<DebitOutcome, String>>;
    async fn run<S: dialtone_credits::db::Sql>(&self, tx: &mut S) -> dialtone_credits::store::Result<Self::Out> {
        let reqs: Vec<(&DebitRequest, i64)> = self.0.iter().map(|(r, t)| (r, *t)).collect();
        Ok(rules::debit_many(tx, "acct", &reqs).await?.into_iter().map(|r| r.map_err(|e| e.to_string())).collect())
    }
}

#[test]
fn debit_many_answers_as_one_by_one_on_each_backend() {
    let mut backends = vec![common::TestBackend::sqlite()];
    backends.extend(pg_backend());
    for backend in backends {
        backend.open().create_account("acct", 10, T0).unwrap();
        let url = backend.shared();
        let charge = |key: &str, amount: i64| {
            let d = debit(key);
            (DebitRequest { amount, ..d.req }, d.now_ms)
        };
        let answers = runtime().block_on(async {
            let handle = Db::open(&url, &DbOptions::default()).await.unwrap();
            handle.write(debit("old")).await.unwrap();
            let mut bad = charge("bad", 1);
            bad.0.amount = 0;
            let answers = handle
                .write(Fused(vec![charge("a", 3), charge("old", 1), charge("old", 2), bad, charge("a", 3), charge("b", 7), charge("c", 6)]))
                .await
                .unwrap();
            handle.close().await;
            answers
        });
        let charged = |balance: i64, charged: i64, replayed: bool| Ok(DebitOutcome::Charged { account: "acct".into(), charged, balance, replayed });
        assert_eq!(answers[..3], [charged(6, 3, false), charged(9, 1, true), Ok(DebitOutcome::Conflict)]);
        assert!(answers[3].as_ref().is_err_and(|e| e.contains("amount")), "{:?}", answers[3]);
        assert_eq!(answers[4..], [charged(6, 3, true), Ok(DebitOutcome::Insufficient { balance: 6, required: 7 }), charged(0, 6, false)]);
        let mut store = backend.open();
        let view = store.account_summary("acct", T0).unwrap().unwrap();
        assert_eq!((view.balance, view.held), (0, 0));
        let (_, ledger_rows, _) = ledger_fingerprint(&mut store);
        // The top-up, "old", "a" and "c": one row per charge, no more.
        assert_eq!(ledger_rows, 4);
    }
}
