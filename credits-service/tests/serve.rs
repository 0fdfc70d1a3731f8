//! `dialtone-credits serve` as a process: service-key configuration and
//! rotation (SIGHUP), graceful shutdown (SIGTERM), the sweeper and
//! `/metrics`, and the CLI's environment and help.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{eventually, RawConn, TempDb, SERVICE_KEY};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_dialtone-credits");
const KEY_2: &str = "rotated-service-key-abcdefabcdefabcdef01";

/// A running `serve`; killed on drop.
struct Serve {
    child: Child,
    addr: SocketAddr,
}

impl Serve {
    fn start(db: &TempDb, envs: &[(&str, &str)], extra: &[&str]) -> Serve {
        let mut cmd = Command::new(BIN);
        cmd.env_remove("DIAL_SERVICE_KEY")
            .env_remove("DIAL_SERVICE_KEY_PREVIOUS");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .arg("--db")
            .arg(&db.path)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening credits=")
            .and_then(|r| r.split(' ').next())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Serve { child, addr }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn metrics(&self) -> String {
        let mut c = RawConn::connect(self.addr);
        let r = c.request("GET", "/metrics", None, "");
        assert_eq!(r.status, 200);
        assert!(r
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")));
        String::from_utf8(r.body).unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn serve_refuses_to_start_without_a_service_key_unless_told_insecure() {
    let db = TempDb::new();
    let out = Command::new(BIN)
        .env_remove("DIAL_SERVICE_KEY")
        .arg("--db")
        .arg(&db.path)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("error: no service key") && stderr.contains("DIAL_SERVICE_KEY"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    let out = Command::new(BIN)
        .env("DIAL_SERVICE_KEY", "too-short")
        .arg("--db")
        .arg(&db.path)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("at least 32 characters"));

    let s = Serve::start(&db, &[], &["--insecure-no-service-key"]);
    let mut c = RawConn::connect(s.addr);
    let r = c.request("POST", "/v1/keys/lookup", None, r#"{"key_sha256":"x"}"#);
    assert_eq!(r.status, 400, "no key needed when explicitly insecure");
}

/// The rotation procedure, with a client calling all along: accept both
/// keys (file with the new key and the old, SIGHUP), move the client to the
/// new key, drop the old key (SIGHUP). No call fails at any point.
#[test]
fn the_service_key_file_rotates_on_sighup_with_no_failed_request() {
    let db = TempDb::new();
    db.open()
        .create_account("acct", 1_000_000, 1_700_000_000)
        .unwrap();
    let file = db.dir.path().join("service-keys");
    std::fs::write(&file, format!("{SERVICE_KEY}\n")).unwrap();
    let s = Serve::start(&db, &[], &["--service-key-file", file.to_str().unwrap()]);
    let addr = s.addr;
    let key_in_use = Arc::new(Mutex::new(SERVICE_KEY.to_string()));
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let client = {
        let (key_in_use, stop, calls) = (
            Arc::clone(&key_in_use),
            Arc::clone(&stop),
            Arc::clone(&calls),
        );
        std::thread::spawn(move || {
            let mut c = RawConn::connect(addr);
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let key = key_in_use.lock().unwrap().clone();
                let body = json!({ "account": "acct", "amount": 1, "idempotency_key": format!("rot-{n}") }).to_string();
                let r = c.request("POST", "/v1/debit", Some(&key), &body);
                assert_eq!(
                    r.status,
                    200,
                    "call {n} failed during the rotation: {}",
                    String::from_utf8_lossy(&r.body)
                );
                calls.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let accepted = |key: &str| {
        let mut c = RawConn::connect(addr);
        c.request("GET", "/v1/accounts/acct", Some(key), "").status != 401
    };
    eventually(Duration::from_secs(30), "the client to run", || {
        calls.load(Ordering::SeqCst) > 10
    });
    // 1. Accept both.
    std::fs::write(&file, format!("{KEY_2}\n{SERVICE_KEY}\n")).unwrap();
    s.signal("-HUP");
    eventually(
        Duration::from_secs(30),
        "the new key to be accepted",
        || accepted(KEY_2),
    );
    // 2. The filter moves to the new key.
    *key_in_use.lock().unwrap() = KEY_2.to_string();
    let moved = calls.load(Ordering::SeqCst);
    eventually(Duration::from_secs(30), "calls with the new key", || {
        calls.load(Ordering::SeqCst) > moved + 10
    });
    // 3. Drop the old key.
    std::fs::write(&file, format!("{KEY_2}\n")).unwrap();
    s.signal("-HUP");
    eventually(Duration::from_secs(30), "the old key to be refused", || {
        !accepted(SERVICE_KEY)
    });
    // A broken file is refused and the keys stay.
    std::fs::write(&file, "short\n").unwrap();
    s.signal("-HUP");
    let done = calls.load(Ordering::SeqCst);
    eventually(Duration::from_secs(30), "more calls", || {
        calls.load(Ordering::SeqCst) > done + 10
    });
    assert!(accepted(KEY_2) && !accepted(SERVICE_KEY));
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();
}

/// SIGTERM: stop accepting, finish the request in flight, exit 0.
#[test]
fn sigterm_finishes_the_request_in_flight_then_exits() {
    let db = TempDb::new();
    db.open().create_account("acct", 10, 1_700_000_000).unwrap();
    let mut s = Serve::start(&db, &[("DIAL_SERVICE_KEY", SERVICE_KEY)], &[]);
    let body =
        json!({ "account": "acct", "amount": 1, "idempotency_key": "at-sigterm" }).to_string();
    let (head, tail) = body.split_at(10);
    let mut c = RawConn::connect(s.addr);
    c.send(
        format!(
            "POST /v1/debit HTTP/1.1\r\nhost: t\r\n{}: {SERVICE_KEY}\r\ncontent-length: {}\r\n\r\n{head}",
            common::SERVICE_KEY_HEADER,
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    eventually(
        Duration::from_secs(30),
        "the request to be in flight",
        || metric(&s.metrics(), "dialtone_credits_requests_in_flight ").is_some_and(|v| v >= 2.0),
    );
    s.signal("-TERM");
    let addr = s.addr;
    eventually(Duration::from_secs(30), "the listener to close", || {
        std::net::TcpStream::connect(addr).is_err()
    });
    c.send(tail.as_bytes()).unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let mut status = None;
    eventually(Duration::from_secs(30), "the process to exit", || {
        status = s.child.try_wait().unwrap();
        status.is_some()
    });
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert_eq!(db.open().balance("acct").unwrap(), Some(9));
}

/// `/metrics` after traffic: requests and latency by endpoint and status,
/// open holds, pool usage, group commits, and the sweeper releasing an
/// expired hold.
#[test]
fn metrics_show_requests_holds_pools_commits_and_the_sweeper() {
    let db = TempDb::new();
    db.open().create_account("acct", 10, 1_700_000_000).unwrap();
    let s = Serve::start(&db, &[("DIAL_SERVICE_KEY", SERVICE_KEY)], &[]);
    let mut c = RawConn::connect(s.addr);
    let hold = |key: &str, ttl: i64| {
        json!({ "account": "acct", "amount": 1, "idempotency_key": key, "ttl_seconds": ttl })
            .to_string()
    };
    let r = c.request("POST", "/v1/holds", Some(SERVICE_KEY), &hold("m-1", 60));
    let id = r.json()["hold_id"].as_str().unwrap().to_string();
    assert_eq!(
        c.request(
            "POST",
            &format!("/v1/holds/{id}/capture"),
            Some(SERVICE_KEY),
            ""
        )
        .status,
        200
    );
    // Open for now, released by the sweeper within about two seconds.
    assert_eq!(
        c.request("POST", "/v1/holds", Some(SERVICE_KEY), &hold("m-2", 1))
            .status,
        200
    );
    assert_eq!(c.request("POST", "/v1/debit", None, "{}").status, 401);
    let text = s.metrics();
    for needle in [
        "dialtone_credits_requests_total{endpoint=\"/v1/holds\",status=\"200\"} 2",
        "dialtone_credits_requests_total{endpoint=\"/v1/holds/{id}/capture\",status=\"200\"} 1",
        "dialtone_credits_requests_total{endpoint=\"/v1/debit\",status=\"401\"} 1",
        "dialtone_credits_request_duration_seconds_bucket{endpoint=\"/v1/holds\",le=",
        "dialtone_credits_request_duration_seconds_count{endpoint=\"/v1/holds\"} 2",
        "dialtone_credits_db_pool_connections{pool=\"sqlite_readers\",state=\"max\"} 4",
        "dialtone_credits_db_pool_connections{pool=\"sqlite_readers\",state=\"in_use\"}",
        "dialtone_credits_group_commits_total{result=\"ok\"}",
        "dialtone_credits_group_commit_batch_size_count",
        "dialtone_credits_service_key_rejections_total 1",
        "dialtone_credits_db_up 1",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    eventually(
        Duration::from_secs(30),
        "the sweeper to release the expired hold",
        || {
            let text = s.metrics();
            metric(&text, "dialtone_credits_holds_expired_total").is_some_and(|v| v >= 1.0)
                && metric(&text, "dialtone_credits_open_holds").is_some_and(|v| v == 0.0)
        },
    );
    let text = s.metrics();
    assert!(
        metric(&text, "dialtone_credits_sweeper_runs_total{result=\"ok\"}")
            .is_some_and(|v| v >= 1.0),
        "{text}"
    );
    let mut store = db.open();
    assert_eq!(
        store
            .account_summary("acct", dialtone_credits::store::unix_now())
            .unwrap()
            .map(|x| (x.balance, x.held)),
        Some((9, 0))
    );
    common::ledger_fingerprint(&mut store);
}

#[test]
fn readyz_and_healthz() {
    let db = TempDb::new();
    let s = Serve::start(&db, &[("DIAL_SERVICE_KEY", SERVICE_KEY)], &[]);
    let mut c = RawConn::connect(s.addr);
    assert_eq!(
        c.request("GET", "/healthz", None, "").json(),
        json!({ "ok": true })
    );
    assert_eq!(
        c.request("GET", "/readyz", None, "").json(),
        json!({ "ok": true })
    );
}

#[test]
fn dialtone_db_names_the_database_like_db() {
    let db = TempDb::new();
    let out = Command::new(BIN)
        .env("DIALTONE_DB", &db.path)
        .args(["account", "create", "from-env", "--credits", "5", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(db.open().balance("from-env").unwrap(), Some(5));
    // --db wins over the environment.
    let other = TempDb::new();
    let out = Command::new(BIN)
        .env("DIALTONE_DB", &db.path)
        .arg("--db")
        .arg(&other.path)
        .args(["account", "create", "from-flag", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(other.open().balance("from-flag").unwrap(), Some(0));
    assert_eq!(db.open().balance("from-flag").unwrap(), None);
}

#[test]
fn every_subcommand_has_its_own_help() {
    for args in [
        &["serve", "--help"][..],
        &["account", "--help"],
        &["account", "create", "--help"],
        &["account", "topup", "--help"],
        &["account", "show", "--help"],
        &["account", "ledger", "--help"],
        &["key", "--help"],
        &["key", "create", "--help"],
        &["key", "list", "--help"],
        &["key", "revoke", "--help"],
        &["refund", "--help"],
        &["check", "--help"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("Usage: dialtone-credits"), "{args:?}: {text}");
    }
}
