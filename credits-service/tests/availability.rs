//! When the database goes away the service answers 503 (nothing done) and
//! recovers by itself when it is back, with no restart: SQLite locked by
//! another process past the busy timeout (reads still served: lookups never
//! wait behind writes), and a PostgreSQL server stopped and started again.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{eventually, ledger_fingerprint, RawConn, TempDb, SERVICE_KEY};
use dialtone_credits::api::{self, AdminAuth, ApiConfig};
use dialtone_credits::backend::DbOptions;
use dialtone_credits::http::HttpConfig;
use dialtone_credits::keys;
use dialtone_credits::pg::PgOptions;
use dialtone_credits::sqlite::SqliteOptions;
use serde_json::json;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const T0: i64 = 1_700_000_000;

fn config() -> ApiConfig {
    ApiConfig {
        service: common::service_auth(),
        admin: AdminAuth::Disabled,
        ..ApiConfig::with_clock(Arc::new(|| T0))
    }
}

fn debit(key: &str) -> String {
    json!({ "account": "acct", "amount": 1, "idempotency_key": key }).to_string()
}

#[test]
fn a_locked_sqlite_database_answers_503_for_writes_serves_reads_and_recovers() {
    let db = TempDb::new();
    let mut store = db.open();
    store.create_account("acct", 10, T0).unwrap();
    let key = store
        .create_key(
            &dialtone_credits::store::NewKey {
                account: "acct".into(),
                kind: keys::KeyKind::ApiKey,
                scopes: vec![],
                name: None,
                expiry: keys::Expiry::Never,
            },
            T0,
        )
        .unwrap();
    let options = DbOptions {
        sqlite: SqliteOptions {
            busy_timeout: Duration::from_millis(200),
            ..SqliteOptions::default()
        },
        ..DbOptions::default()
    };
    let server = api::start_server(
        "127.0.0.1:0",
        2,
        &db.shared(),
        config(),
        HttpConfig::default(),
        options,
    )
    .unwrap();
    let before = ledger_fingerprint(&mut store);
    // Another process holds the write lock (a long operator transaction).
    let blocker = rusqlite::Connection::open(&db.path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut c = RawConn::connect(server.addr());
    let r = c.request(
        "POST",
        "/v1/debit",
        Some(SERVICE_KEY),
        &debit("while-locked"),
    );
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json(),
        json!({ "success": false, "error": "unavailable" })
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    // Reads go on: lookups, balances, readiness.
    let lookup = json!({ "key_sha256": keys::sha256_hex(&key.secret) }).to_string();
    let r = c.request("POST", "/v1/keys/lookup", Some(SERVICE_KEY), &lookup);
    assert_eq!((r.status, r.json()["balance"].clone()), (200, json!(10)));
    assert_eq!(
        c.request("GET", "/v1/accounts/acct", Some(SERVICE_KEY), "")
            .status,
        200
    );
    assert_eq!(c.request("GET", "/readyz", None, "").status, 200);
    blocker.execute_batch("COMMIT").unwrap();
    // Back: the same request now succeeds, once.
    let r = c.request(
        "POST",
        "/v1/debit",
        Some(SERVICE_KEY),
        &debit("while-locked"),
    );
    assert_eq!(
        (r.status, r.json()["replayed"].clone()),
        (200, json!(false))
    );
    let after = ledger_fingerprint(&mut db.open());
    assert_eq!(after.1, before.1 + 1);
    assert_eq!(db.open().balance("acct").unwrap(), Some(9));
}

/// A throwaway PostgreSQL server of this test's own (it is stopped and
/// started), via scripts/postgres.sh; stopped on drop.
struct OwnPostgres {
    dir: tempfile::TempDir,
    port: u16,
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/postgres.sh");

impl OwnPostgres {
    fn start() -> (OwnPostgres, String) {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = OwnPostgres { dir, port };
        let url = pg.script("start");
        (pg, url)
    }

    fn script(&self, cmd: &str) -> String {
        let out = Command::new(SCRIPT)
            .args([
                cmd,
                self.dir.path().to_str().unwrap(),
                &self.port.to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "postgres.sh {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = Command::new(SCRIPT)
            .args([
                "stop",
                self.dir.path().to_str().unwrap(),
                &self.port.to_string(),
            ])
            .output();
    }
}

#[test]
fn a_postgres_restart_is_503_then_recovers_without_a_service_restart() {
    // Runs with the PostgreSQL suite (DIALTONE_TEST_PG_URL), which has the
    // server binaries installed.
    if common::pg_url().is_none() {
        eprintln!("PostgreSQL not configured; covered by the PostgreSQL run");
        return;
    }
    let (pg, url) = OwnPostgres::start();
    dialtone_credits::store::Store::connect(&url)
        .unwrap()
        .create_account("acct", 10, T0)
        .unwrap();
    let options = DbOptions {
        pg: PgOptions {
            max_connections: 4,
            acquire_timeout: Duration::from_millis(500),
            ..PgOptions::default()
        },
        ..DbOptions::default()
    };
    let server = api::start_server(
        "127.0.0.1:0",
        2,
        &url,
        config(),
        HttpConfig::default(),
        options,
    )
    .unwrap();
    let mut c = RawConn::connect(server.addr());
    assert_eq!(
        c.request("POST", "/v1/debit", Some(SERVICE_KEY), &debit("before"))
            .status,
        200
    );
    assert_eq!(c.request("GET", "/readyz", None, "").status, 200);

    pg.script("stop");
    let r = c.request("POST", "/v1/debit", Some(SERVICE_KEY), &debit("during"));
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json(),
        json!({ "success": false, "error": "unavailable" })
    );
    let r = c.request("GET", "/v1/accounts/acct", Some(SERVICE_KEY), "");
    assert_eq!(r.status, 503);
    assert_eq!(c.request("GET", "/readyz", None, "").status, 503);
    assert_eq!(
        c.request("GET", "/healthz", None, "").status,
        200,
        "alive while the database is down"
    );

    pg.script("start");
    // The same service process recovers on its own.
    eventually(
        Duration::from_secs(60),
        "the service to reach PostgreSQL again",
        || {
            c.request("POST", "/v1/debit", Some(SERVICE_KEY), &debit("during"))
                .status
                == 200
        },
    );
    assert_eq!(c.request("GET", "/readyz", None, "").status, 200);
    let mut store = dialtone_credits::store::Store::connect(&url).unwrap();
    assert_eq!(store.balance("acct").unwrap(), Some(8));
    assert_eq!(store.debit_count("acct").unwrap(), 2);
    ledger_fingerprint(&mut store);
}
