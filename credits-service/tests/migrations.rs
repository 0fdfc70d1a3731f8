//! Databases created by the pre-sqlx service are adopted: their recorded
//! version (SQLite `PRAGMA user_version`, PostgreSQL `dialtone_schema`)
//! marks the equivalent sqlx migrations applied, data and `check` intact.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{ledger_fingerprint, TempDb, TestBackend};
use dialtone_credits::backend::{Db, DbOptions};
use dialtone_credits::store::{DebitOutcome, DebitRequest, Store, StoreError};

const T0: i64 = 1_700_000_000;
const OLD_SQLITE: &str = include_str!("fixtures/old_sqlite_schema.sql");
const OLD_POSTGRES: &str = include_str!("fixtures/old_postgres_schema.sql");

/// Data as the old service wrote it: an account with a top-up and a debit.
const OLD_DATA: &str = "
    INSERT INTO accounts (id, balance, held, created_at) VALUES ('old', 7, 0, 100);
    INSERT INTO topups (account, amount, created_at, note) VALUES ('old', 10, 100, 'initial credits');
    INSERT INTO ledger (account, kind, delta_available, delta_held, amount, note, created_at)
        VALUES ('old', 'topup', 10, 0, 10, 'initial credits', 100);
    INSERT INTO debits VALUES ('old-d1', 'old', 3, 7, 'sms_send', 'abc12345', 101);
    INSERT INTO ledger (account, kind, delta_available, delta_held, amount, idempotency_key, route, key_prefix, created_at)
        VALUES ('old', 'debit', -3, 0, 3, 'old-d1', 'sms_send', 'abc12345', 101);
";

fn debit(key: &str, amount: i64) -> DebitRequest {
    DebitRequest {
        account: "old".into(),
        amount,
        idempotency_key: key.into(),
        route: None,
        key_prefix: None,
    }
}

fn assert_old_data_works(store: &mut Store) {
    assert_eq!(store.balance("old").unwrap(), Some(7));
    assert!(matches!(
        store.debit(&debit("old-d1", 3), T0).unwrap(),
        DebitOutcome::Charged {
            replayed: true,
            balance: 7,
            ..
        }
    ));
    assert!(matches!(
        store.debit(&debit("new-d1", 1), T0).unwrap(),
        DebitOutcome::Charged {
            replayed: false,
            balance: 6,
            ..
        }
    ));
    ledger_fingerprint(store);
}

#[test]
fn a_sqlite_file_from_the_previous_release_is_adopted() {
    let db = TempDb::new();
    let conn = rusqlite::Connection::open(&db.path).unwrap();
    conn.execute_batch(OLD_SQLITE).unwrap();
    conn.execute_batch(OLD_DATA).unwrap();
    drop(conn);

    let mut store = Store::open(&db.path).unwrap();
    assert_eq!(
        store.schema_version().unwrap(),
        Store::supported_schema_version()
    );
    assert_old_data_works(&mut store);
    drop(store);
    let conn = rusqlite::Connection::open(&db.path).unwrap();
    let applied: Vec<(i64, bool)> = conn
        .prepare("SELECT version, success FROM _sqlx_migrations ORDER BY version")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    // 1 and 2 adopted, the later ones (x402 claims, …) applied.
    let latest = Store::supported_schema_version();
    assert_eq!(applied, (1..=latest).map(|v| (v, true)).collect::<Vec<_>>());
    let user_version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        user_version, latest,
        "kept up to date for the previous release, which reads it (and refuses a newer schema)"
    );
    drop(conn);

    // The service opens it too, and opening again changes nothing.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let handle = Db::open(&db.shared(), &DbOptions::default()).await.unwrap();
        handle.close().await;
    });
    let mut store = Store::open(&db.path).unwrap();
    assert_eq!(store.balance("old").unwrap(), Some(6));
    ledger_fingerprint(&mut store);
}

#[test]
fn a_sqlite_file_from_a_newer_release_is_refused() {
    let db = TempDb::new();
    drop(Store::open(&db.path).unwrap());
    let conn = rusqlite::Connection::open(&db.path).unwrap();
    conn.execute(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99, 'from the future', 1, x'00', 0)",
        [],
    )
    .unwrap();
    drop(conn);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(Db::open(&db.shared(), &DbOptions::default()))
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
}

#[test]
fn a_postgres_database_from_the_previous_release_is_adopted() {
    let Some(admin) = common::pg_url() else {
        eprintln!("PostgreSQL not configured; covered by the PostgreSQL run");
        return;
    };
    let b = TestBackend::postgres(&admin);
    let mut client = postgres::Client::connect(&b.db_arg(), postgres::NoTls).unwrap();
    client.batch_execute(OLD_POSTGRES).unwrap();
    client.batch_execute(OLD_DATA).unwrap();
    let mut store = Store::connect(&b.db_arg()).unwrap();
    assert_eq!(
        store.schema_version().unwrap(),
        dialtone_credits::pg::supported_schema_version()
    );
    assert_old_data_works(&mut store);
    let applied: Vec<(i64, bool)> = client
        .query(
            "SELECT version, success FROM _sqlx_migrations ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let latest = dialtone_credits::pg::supported_schema_version();
    assert_eq!(applied, (1..=latest).map(|v| (v, true)).collect::<Vec<_>>(), "1 adopted, the later ones applied");
    let old: i64 = client
        .query_one("SELECT MAX(version) FROM dialtone_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(old, latest, "kept up to date for the previous release, which reads it");
    // Opening again is a no-op.
    drop(store);
    let mut store = Store::connect(&b.db_arg()).unwrap();
    assert_eq!(store.balance("old").unwrap(), Some(6));
    ledger_fingerprint(&mut store);
}

/// v5 dropped `ledger_key` and made `ledger_hold` partial (a debit writes
/// neither): every ledger lookup by idempotency key or hold id that the
/// rules and `check` make still finds its rows through an index, never by
/// reading the whole ledger.
#[test]
fn ledger_lookups_by_key_and_hold_use_an_index_after_v5() {
    let db = TempDb::new();
    db.open().create_account("acct", 10, T0).unwrap();
    let conn = rusqlite::Connection::open(&db.path).unwrap();
    let indexes: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'ledger' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(!indexes.iter().any(|n| n == "ledger_key"), "{indexes:?}");
    for sql in [
        "SELECT COUNT(*) FROM ledger WHERE kind = 'refund' AND idempotency_key = 'k' AND COALESCE(hold_id, '') = ''",
        "SELECT 1 FROM ledger l WHERE l.kind = 'debit' AND l.idempotency_key = 'k'",
        "SELECT idempotency_key FROM ledger WHERE kind = 'lease_spend' AND idempotency_key IN ('a', 'b')",
        "SELECT COUNT(*) FROM ledger l WHERE l.hold_id = 'h' AND l.kind = 'capture'",
        "SELECT SUM(l.amount) FROM ledger l WHERE l.hold_id = 'h' AND l.kind = 'lease_spend' AND l.account = 'acct'",
    ] {
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter().all(|step| !step.starts_with("SCAN")) && plan.iter().any(|step| step.starts_with("SEARCH") && step.contains("INDEX ledger_")),
            "{sql}: {plan:?}"
        );
    }
}
