//! Helpers shared by the integration tests.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use dialtone_credits::store::Store;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A temp directory holding one database file; removed on drop.
pub struct TempDb {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TempDb {
    pub fn new() -> TempDb {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credits.db");
        TempDb { dir, path }
    }

    pub fn open(&self) -> Store {
        Store::open(&self.path).unwrap()
    }

    pub fn shared(&self) -> Arc<Mutex<Store>> {
        Arc::new(Mutex::new(self.open()))
    }
}

/// Result of one HTTP call: status, content-type, parsed JSON body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub content_type: String,
    pub json: Value,
}

fn finish(result: Result<ureq::Response, ureq::Error>) -> Resp {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = response.status();
    let content_type = response
        .header("content-type")
        .unwrap_or_default()
        .to_string();
    let text = response.into_string().unwrap();
    let json =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON body {text:?}: {e}"));
    Resp {
        status,
        content_type,
        json,
    }
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().build()
}

/// Send `method url` with optional body and extra headers.
pub fn call(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
    let mut req = agent().request(method, url);
    for (n, v) in headers {
        req = req.set(n, v);
    }
    finish(match body {
        Some(b) => req.set("content-type", "application/json").send_string(b),
        None => req.call(),
    })
}

pub fn get(url: &str) -> Resp {
    call("GET", url, &[], None)
}

pub fn post(url: &str, body: &str) -> Resp {
    call("POST", url, &[], Some(body))
}

// ----- backends: every store test runs on SQLite, and on PostgreSQL when
// DIALTONE_TEST_PG_URL is set (each test in its own fresh database). -----

/// Env var naming a PostgreSQL server for the tests (a database URL the
/// tests may `CREATE DATABASE` with), e.g.
/// `postgres://postgres@127.0.0.1:55432/dialtone` (`scripts/postgres.sh url`).
pub const PG_URL_ENV: &str = "DIALTONE_TEST_PG_URL";
/// When `1`, a missing PG URL is a test failure rather than a skip.
pub const PG_REQUIRED_ENV: &str = "DIALTONE_TEST_PG_REQUIRED";

pub fn pg_url() -> Option<String> {
    std::env::var(PG_URL_ENV).ok().filter(|u| !u.trim().is_empty())
}

/// A database for one test.
pub enum TestBackend {
    Sqlite(TempDb),
    Postgres {
        /// URL of this test's own database.
        url: String,
        /// URL used to create/drop it.
        admin_url: String,
        name: String,
    },
}

/// `scheme://auth@host:port/DB?query` with DB replaced.
pub fn pg_url_with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}

impl TestBackend {
    pub fn sqlite() -> TestBackend {
        TestBackend::Sqlite(TempDb::new())
    }

    /// A fresh database `test_<random>` on the server at `admin_url`.
    pub fn postgres(admin_url: &str) -> TestBackend {
        let name = format!(
            "test_{}",
            dialtone_credits::keys::random_hex(8).unwrap()
        );
        let mut client = postgres::Client::connect(admin_url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to {PG_URL_ENV}: {e}"));
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        TestBackend::Postgres {
            url: pg_url_with_db(admin_url, &name),
            admin_url: admin_url.to_string(),
            name,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            TestBackend::Sqlite(_) => "sqlite",
            TestBackend::Postgres { .. } => "postgres",
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, TestBackend::Postgres { .. })
    }

    /// The `--db` argument for this database.
    pub fn db_arg(&self) -> String {
        match self {
            TestBackend::Sqlite(db) => db.path.display().to_string(),
            TestBackend::Postgres { url, .. } => url.clone(),
        }
    }

    /// A new connection (each call is a separate connection).
    pub fn open(&self) -> Store {
        Store::connect(&self.db_arg()).unwrap()
    }

    pub fn shared(&self) -> Arc<Mutex<Store>> {
        Arc::new(Mutex::new(self.open()))
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        if let TestBackend::Postgres {
            admin_url, name, ..
        } = self
        {
            if let Ok(mut c) = postgres::Client::connect(admin_url, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        }
    }
}

/// SQLite always; PostgreSQL too when `DIALTONE_TEST_PG_URL` is set.
pub fn backends() -> Vec<TestBackend> {
    let mut out = vec![TestBackend::sqlite()];
    if let Some(url) = pg_url() {
        out.push(TestBackend::postgres(&url));
    }
    out
}

/// Run `f` once per backend; failures name the backend.
pub fn each_backend(f: impl Fn(&TestBackend)) {
    for b in backends() {
        eprintln!("--- backend: {}", b.name());
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&b)));
        if let Err(e) = result {
            eprintln!("--- FAILED on backend {}", b.name());
            std::panic::resume_unwind(e);
        }
    }
}
