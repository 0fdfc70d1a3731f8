//! Helpers shared by the integration tests.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use dialtone_credits::api::ServiceAuth;
use dialtone_credits::store::Store;
use serde_json::Value;
use std::path::PathBuf;

/// The service key the tests' servers accept and their clients send.
pub const SERVICE_KEY: &str = "test-service-key-0123456789abcdef0123";
/// The header that carries it.
pub const SERVICE_KEY_HEADER: &str = "x-dialtone-service-key";

/// What an in-process test server accepts: [`SERVICE_KEY`].
pub fn service_auth() -> ServiceAuth {
    ServiceAuth::from_keys(&[SERVICE_KEY]).unwrap()
}

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

    /// The database a test server opens (its `--db`).
    pub fn shared(&self) -> String {
        self.path.display().to_string()
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

/// Send `method url` with optional body and extra headers, and the
/// service key (as the filter does on every callout).
pub fn call(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
    let mut req = agent()
        .request(method, url)
        .set(SERVICE_KEY_HEADER, SERVICE_KEY);
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
/// `postgres://postgres@127.0.0.1:15432/dialtone` (`scripts/postgres.sh url`).
pub const PG_URL_ENV: &str = "DIALTONE_TEST_PG_URL";
/// When `1`, a missing PG URL is a test failure rather than a skip.
pub const PG_REQUIRED_ENV: &str = "DIALTONE_TEST_PG_REQUIRED";

pub fn pg_url() -> Option<String> {
    std::env::var(PG_URL_ENV)
        .ok()
        .filter(|u| !u.trim().is_empty())
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
        let name = format!("test_{}", dialtone_credits::keys::random_hex(8).unwrap());
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

    /// The database a test server opens (its `--db`).
    pub fn shared(&self) -> String {
        self.db_arg()
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

// ----- a raw HTTP/1.1 client over one connection (keep-alive, bad input) ----

/// An answer read off a raw connection.
#[derive(Debug)]
pub struct RawResp {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "non-JSON body {:?}: {e}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A response header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One client connection. Reads are bounded (`READ_BOUND`) so that a lost
/// answer fails the test instead of hanging it.
pub struct RawConn {
    pub stream: std::net::TcpStream,
    buf: Vec<u8>,
}

/// The longest a test waits for any single answer.
pub const READ_BOUND: std::time::Duration = std::time::Duration::from_secs(30);

impl RawConn {
    pub fn connect(addr: std::net::SocketAddr) -> RawConn {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(READ_BOUND)).unwrap();
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.stream.write_all(bytes)
    }

    /// Send one request (with the service key unless `key` is None).
    pub fn request(&mut self, method: &str, path: &str, key: Option<&str>, body: &str) -> RawResp {
        let key_line = key.map_or(String::new(), |k| format!("{SERVICE_KEY_HEADER}: {k}\r\n"));
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: test\r\n{key_line}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        self.send(req.as_bytes()).unwrap();
        self.read_response()
            .unwrap_or_else(|e| panic!("no answer to {method} {path}: {e}"))
    }

    /// Read one response (Content-Length framed, as this server answers).
    pub fn read_response(&mut self) -> std::io::Result<RawResp> {
        use std::io::Read;
        let mut tmp = [0u8; 8192];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    let n = self.stream.read(&mut tmp)?;
                    if n == 0 {
                        return Err(std::io::Error::other("closed mid-body"));
                    }
                    self.buf.extend_from_slice(&tmp[..n]);
                }
                let body = self.buf[end + 4..end + 4 + len].to_vec();
                self.buf.drain(..end + 4 + len);
                return Ok(RawResp { status, head, body });
            }
            let n = self.stream.read(&mut tmp)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before an answer",
                ));
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    /// Wait (at most `READ_BOUND`) until the server closes the connection;
    /// true if it did (EOF or reset), false on timeout. Data is discarded.
    pub fn closed_by_server(&mut self) -> bool {
        use std::io::Read;
        let mut tmp = [0u8; 4096];
        loop {
            match self.stream.read(&mut tmp) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// Poll `f` until it returns true or `bound` passes (deadline-bounded
/// polling of an observable condition; never a sleep-then-assert).
pub fn eventually(bound: std::time::Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + bound;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "gave up waiting for: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The ledger and the money as `check` sees them (to prove a refused
/// request changed nothing).
pub fn ledger_fingerprint(store: &mut Store) -> (i64, i64, Vec<String>) {
    let report = store.check().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    (report.accounts, report.ledger_rows, report.problems)
}
