//! The HTTP layer under real sockets: keep-alive never loses an answer,
//! h2c multiplexes, and bad clients (malformed, oversized, lying, truncated,
//! slow, idle by the thousand) get a clear 4xx or a closed connection while
//! the service goes on serving and the ledger does not move. The services
//! run in-process on SQLite, on free ports.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{ledger_fingerprint, RawConn, TempDb, SERVICE_KEY};
use dialtone_credits::api::{self, AdminAuth, ApiConfig};
use dialtone_credits::backend::DbOptions;
use dialtone_credits::demo_upstream;
use dialtone_credits::http::{HttpConfig, RunningServer};
use serde_json::json;
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

fn start(db: &TempDb, http: HttpConfig) -> RunningServer {
    api::start_server(
        "127.0.0.1:0",
        4,
        &db.shared(),
        config(),
        http,
        DbOptions::default(),
    )
    .unwrap()
}

fn debit_body(account: &str, key: &str) -> String {
    json!({ "account": account, "amount": 1, "idempotency_key": key }).to_string()
}

/// 10,000 requests over 16 reused keep-alive connections: every one is
/// answered, in order, and every debit is charged exactly once.
#[test]
fn ten_thousand_requests_over_sixteen_keep_alive_connections_lose_none() {
    const CONNS: usize = 16;
    const PER_CONN: usize = 625;
    let db = TempDb::new();
    db.open()
        .create_account("busy", (CONNS * PER_CONN) as i64, T0)
        .unwrap();
    let server = start(&db, HttpConfig::default());
    let addr = server.addr();
    let handles: Vec<_> = (0..CONNS)
        .map(|c| {
            std::thread::spawn(move || {
                let mut conn = RawConn::connect(addr);
                for i in 0..PER_CONN {
                    let r = conn.request(
                        "POST",
                        "/v1/debit",
                        Some(SERVICE_KEY),
                        &debit_body("busy", &format!("ka-{c}-{i}")),
                    );
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    assert_eq!(r.json()["replayed"], false);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut store = db.open();
    assert_eq!(store.balance("busy").unwrap(), Some(0));
    assert_eq!(
        store.debit_count("busy").unwrap(),
        (CONNS * PER_CONN) as i64
    );
    ledger_fingerprint(&mut store);
}

/// The same for the demo upstream (the workaround in the Envoy bootstrap,
/// `max_requests_per_connection: 1`, was for it).
#[test]
fn the_demo_upstream_loses_no_answer_on_keep_alive_connections() {
    const CONNS: usize = 16;
    const PER_CONN: usize = 625;
    let db = TempDb::new();
    let server = demo_upstream::start("127.0.0.1:0", 4, &db.shared(), Arc::new(|| T0)).unwrap();
    let addr = server.addr();
    let handles: Vec<_> = (0..CONNS)
        .map(|_| {
            std::thread::spawn(move || {
                let mut conn = RawConn::connect(addr);
                for _ in 0..PER_CONN {
                    let r = conn.request(
                        "POST",
                        "/api/v1/sms/send",
                        None,
                        r#"{"to":"+18148835337","message":"hi"}"#,
                    );
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// The root cause of the old lost answers: tiny_http ran each connection on
/// a pool thread for the connection's whole life, and a race in its pool
/// could park a newly accepted connection until another connection closed.
/// With Envoy's keep-alive pool, none closes: the request waited for the
/// route timeout (504). Here: 64 keep-alive connections stay open and idle
/// while 64 new connections arrive at once; every new one is answered.
#[test]
fn new_connections_are_answered_while_many_keep_alive_connections_sit_idle() {
    let db = TempDb::new();
    let server = start(&db, HttpConfig::default());
    let addr = server.addr();
    let mut idle: Vec<RawConn> = (0..64)
        .map(|_| {
            let mut c = RawConn::connect(addr);
            assert_eq!(c.request("GET", "/healthz", None, "").status, 200);
            c
        })
        .collect();
    let burst: Vec<_> = (0..64)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = RawConn::connect(addr);
                c.request("GET", "/healthz", None, "").status
            })
        })
        .collect();
    for h in burst {
        assert_eq!(h.join().unwrap(), 200);
    }
    // And the idle ones are still good for another request.
    for c in &mut idle {
        assert_eq!(c.request("GET", "/healthz", None, "").status, 200);
    }
}

/// HTTP/2 with prior knowledge (h2c, as Envoy's callout cluster speaks it):
/// many concurrent streams on ONE connection.
#[test]
fn h2c_prior_knowledge_multiplexes_requests_on_one_connection() {
    let db = TempDb::new();
    db.open().create_account("h2", 100, T0).unwrap();
    let server = start(&db, HttpConfig::default());
    let addr = server.addr();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let statuses: Vec<(u16, String)> = rt.block_on(async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let mut sender = sender.clone();
                tokio::spawn(async move {
                    let req = axum::http::Request::builder()
                        .method("POST")
                        .uri(format!("http://{addr}/v1/debit"))
                        .header("content-type", "application/json")
                        .header(common::SERVICE_KEY_HEADER, SERVICE_KEY)
                        .body(http_body_util::Full::new(bytes::Bytes::from(debit_body(
                            "h2",
                            &format!("h2-{i}"),
                        ))))
                        .unwrap();
                    let resp = sender.send_request(req).await.unwrap();
                    let status = resp.status().as_u16();
                    let version = format!("{:?}", resp.version());
                    (status, version)
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    assert!(
        statuses.iter().all(|(s, v)| *s == 200 && v == "HTTP/2.0"),
        "{statuses:?}"
    );
    let mut store = db.open();
    assert_eq!(store.balance("h2").unwrap(), Some(0));
    ledger_fingerprint(&mut store);
}

fn short_timeouts() -> HttpConfig {
    HttpConfig {
        header_read_timeout: Duration::from_millis(300),
        ..HttpConfig::default()
    }
}

/// Malformed JSON, wrong types, absurd numbers, invalid UTF-8, a head too
/// large: each a clear 4xx; the connection stays usable where HTTP allows;
/// the ledger does not move.
#[test]
fn malformed_and_ill_typed_requests_get_4xx_and_change_nothing() {
    let db = TempDb::new();
    db.open().create_account("a", 10, T0).unwrap();
    let server = start(&db, HttpConfig::default());
    let before = ledger_fingerprint(&mut db.open());
    let mut conn = RawConn::connect(server.addr());
    for bad in [
        "{",
        "[]",
        "null",
        "\"text\"",
        r#"{"account":1,"amount":1,"idempotency_key":"k"}"#,
        r#"{"account":"a","amount":"1","idempotency_key":"k"}"#,
        r#"{"account":"a","amount":1e309,"idempotency_key":"k"}"#,
        r#"{"account":"a","amount":9223372036854775808,"idempotency_key":"k"}"#,
        r#"{"account":"a","amount":-9223372036854775808,"idempotency_key":"k"}"#,
        r#"{"account":"a","amount":1,"idempotency_key":["k"]}"#,
        r#"{"account":"a\u0000b","amount":1,"idempotency_key":"k"}"#,
    ] {
        for path in ["/v1/debit", "/v1/holds", "/v1/keys/lookup", "/v1/ratelimit"] {
            let r = conn.request("POST", path, Some(SERVICE_KEY), bad);
            assert_eq!(
                r.status,
                400,
                "{path} {bad}: {}",
                String::from_utf8_lossy(&r.body)
            );
            assert_eq!(r.json()["error"], "bad_request", "{path} {bad}");
        }
    }
    // Invalid UTF-8 in a body.
    let mut raw = format!(
        "POST /v1/debit HTTP/1.1\r\nhost: t\r\n{}: {SERVICE_KEY}\r\ncontent-length: 4\r\n\r\n",
        common::SERVICE_KEY_HEADER
    )
    .into_bytes();
    raw.extend_from_slice(&[0xff, 0xfe, 0x7b, 0x7d]);
    conn.send(&raw).unwrap();
    assert_eq!(conn.read_response().unwrap().status, 400);
    // Still the same connection, still serving.
    assert_eq!(conn.request("GET", "/healthz", None, "").status, 200);
    // A request head over the limit: 431, connection closed.
    let mut big = RawConn::connect(server.addr());
    let huge = "x".repeat(40 * 1024);
    // The server answers 431 once the limit is passed and closes: the end
    // of this write may meet a closed socket, which is not a failure.
    let _ = big.send(format!("GET /healthz HTTP/1.1\r\nhost: t\r\nx-big: {huge}\r\n\r\n").as_bytes());
    assert_eq!(big.read_response().unwrap().status, 431);
    assert_eq!(before, ledger_fingerprint(&mut db.open()));
    assert_eq!(db.open().balance("a").unwrap(), Some(10));
}

/// A Content-Length that lies: shorter than the body (the rest is taken as
/// the next request and refused), longer (the body never completes: 408 after
/// the read timeout), or a body cut off by the client closing.
#[test]
fn lying_content_length_and_truncated_requests_change_nothing() {
    let db = TempDb::new();
    db.open().create_account("a", 10, T0).unwrap();
    let server = start(&db, short_timeouts());
    let addr = server.addr();
    let before = ledger_fingerprint(&mut db.open());
    let key_line = format!("{}: {SERVICE_KEY}", common::SERVICE_KEY_HEADER);
    let body = debit_body("a", "lie");

    // Shorter: the server reads 5 bytes of JSON (400), then refuses the rest.
    let mut c = RawConn::connect(addr);
    c.send(
        format!(
            "POST /v1/debit HTTP/1.1\r\nhost: t\r\n{key_line}\r\ncontent-length: 5\r\n\r\n{body}"
        )
        .as_bytes(),
    )
    .unwrap();
    let first = c.read_response().unwrap();
    assert_eq!(first.status, 400);
    assert_eq!(first.json()["error"], "bad_request");
    assert!(
        c.closed_by_server(),
        "the bytes after the declared body are not a request"
    );

    // Longer: the body never completes; 408 after the read timeout.
    let mut c = RawConn::connect(addr);
    c.send(
        format!(
            "POST /v1/debit HTTP/1.1\r\nhost: t\r\n{key_line}\r\ncontent-length: 500\r\n\r\n{body}"
        )
        .as_bytes(),
    )
    .unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 408);
    assert_eq!(r.json(), json!({ "error": "request_timeout" }));

    // Truncated head, then close; truncated body, then close.
    let mut c = RawConn::connect(addr);
    c.send(b"POST /v1/debit HTTP/1.1\r\nhost: t\r\ncontent-le")
        .unwrap();
    drop(c);
    let mut c = RawConn::connect(addr);
    c.send(
        format!(
            "POST /v1/debit HTTP/1.1\r\nhost: t\r\n{key_line}\r\ncontent-length: {}\r\n\r\n{}",
            body.len(),
            &body[..10]
        )
        .as_bytes(),
    )
    .unwrap();
    drop(c);

    // Still serving; nothing moved.
    let mut c = RawConn::connect(addr);
    assert_eq!(c.request("GET", "/healthz", None, "").status, 200);
    assert_eq!(before, ledger_fingerprint(&mut db.open()));
    assert_eq!(db.open().balance("a").unwrap(), Some(10));
    assert!(db.open().debit_record("lie").unwrap().is_none());
}

/// Slowloris: a request head trickled a byte at a time is cut off after the
/// header-read timeout, and meanwhile others are served.
#[test]
fn a_slow_request_head_is_closed_after_the_header_timeout_and_blocks_nobody() {
    let db = TempDb::new();
    let server = start(&db, short_timeouts());
    let addr = server.addr();
    let mut slow = RawConn::connect(addr);
    slow.send(b"POST /v1/debit HTTP/1.1\r\nhost: t\r\n")
        .unwrap();
    let mut writer = slow.stream.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        use std::io::Write;
        // One byte every 50 ms until the server hangs up.
        for b in b"x-slow: ".iter().cycle().take(10_000) {
            if writer.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut other = RawConn::connect(addr);
    assert_eq!(other.request("GET", "/healthz", None, "").status, 200);
    assert!(slow.closed_by_server(), "the slow head was never cut off");
    trickle.join().unwrap();
    // A connection that never sends anything is closed the same way.
    let mut silent = RawConn::connect(addr);
    assert!(silent.closed_by_server());
    assert_eq!(other.request("GET", "/healthz", None, "").status, 200);
}

/// Thousands of idle connections: 2,000 keep-alive connections sit idle
/// after one request each while new clients debit; then every idle one is
/// still served. (Needs about 4,100 file descriptors in this process.)
#[test]
fn two_thousand_idle_connections_do_not_stop_the_service() {
    let db = TempDb::new();
    db.open().create_account("a", 1000, T0).unwrap();
    let server = start(&db, HttpConfig::default());
    let addr = server.addr();
    let before = ledger_fingerprint(&mut db.open());
    let mut idle: Vec<RawConn> = (0..2000)
        .map(|_| {
            let mut c = RawConn::connect(addr);
            assert_eq!(c.request("GET", "/healthz", None, "").status, 200);
            c
        })
        .collect();
    for i in 0..100 {
        let mut c = RawConn::connect(addr);
        let r = c.request(
            "POST",
            "/v1/debit",
            Some(SERVICE_KEY),
            &debit_body("a", &format!("busy-{i}")),
        );
        assert_eq!(r.status, 200);
    }
    for c in idle.iter_mut().step_by(50) {
        assert_eq!(c.request("GET", "/healthz", None, "").status, 200);
    }
    let after = ledger_fingerprint(&mut db.open());
    assert_eq!(after.1, before.1 + 100);
    assert_eq!(db.open().balance("a").unwrap(), Some(900));
}

/// A keep-alive connection idle for longer than the idle timeout is closed
/// by the server (gracefully: no request is cut).
#[test]
fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let db = TempDb::new();
    let server = start(
        &db,
        HttpConfig {
            idle_timeout: Duration::from_millis(300),
            ..HttpConfig::default()
        },
    );
    let mut c = RawConn::connect(server.addr());
    assert_eq!(c.request("GET", "/healthz", None, "").status, 200);
    assert!(c.closed_by_server());
}

/// Oversized bodies: a declared one is refused at once, a chunked one as it
/// passes the cap; both 413 in the contract's JSON.
#[test]
fn oversized_bodies_are_413_json() {
    let db = TempDb::new();
    let server = start(&db, HttpConfig::default());
    let mut c = RawConn::connect(server.addr());
    c.send(
        format!(
            "POST /v1/debit HTTP/1.1\r\nhost: t\r\n{}: {SERVICE_KEY}\r\ncontent-length: 65537\r\n\r\n",
            common::SERVICE_KEY_HEADER
        )
        .as_bytes(),
    )
    .unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.json(),
        json!({ "error": "payload_too_large", "max_bytes": 65536 })
    );
}
