//! Graceful shutdown of an in-process server. Alone in its test binary:
//! it watches the process-wide in-flight gauge, which tests running in
//! parallel would move.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{eventually, RawConn, TempDb, SERVICE_KEY};
use dialtone_credits::api::{self, AdminAuth, ApiConfig};
use dialtone_credits::backend::DbOptions;
use dialtone_credits::http::HttpConfig;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const T0: i64 = 1_700_000_000;

fn debit_body(account: &str, key: &str) -> String {
    json!({ "account": account, "amount": 1, "idempotency_key": key }).to_string()
}

/// Graceful shutdown: a request in flight when the server is told to stop is
/// finished and answered; new connections are refused; then it exits.
#[test]
fn shutdown_finishes_the_request_in_flight() {
    let db = TempDb::new();
    db.open().create_account("a", 10, T0).unwrap();
    let config = ApiConfig {
        service: common::service_auth(),
        admin: AdminAuth::Disabled,
        ..ApiConfig::with_clock(Arc::new(|| T0))
    };
    let server = api::start_server(
        "127.0.0.1:0",
        2,
        &db.shared(),
        config,
        HttpConfig::default(),
        DbOptions::default(),
    )
    .unwrap();
    let addr: SocketAddr = server.addr();
    let body = debit_body("a", "in-flight");
    let (head, tail) = body.split_at(10);
    let mut c = RawConn::connect(addr);
    c.send(
        format!(
            "POST /v1/debit HTTP/1.1\r\nhost: t\r\n{}: {SERVICE_KEY}\r\ncontent-length: {}\r\n\r\n{head}",
            common::SERVICE_KEY_HEADER,
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    // Wait until the request is in its handler (reading the body): the
    // in-flight gauge counts it and the scrape itself.
    let mut probe = RawConn::connect(addr);
    eventually(
        Duration::from_secs(30),
        "the request to be in flight",
        || {
            let r = probe.request("GET", "/metrics", None, "");
            let text = String::from_utf8_lossy(&r.body).to_string();
            text.lines()
                .find_map(|l| l.strip_prefix("dialtone_credits_requests_in_flight "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|v| v >= 2.0)
        },
    );
    drop(probe);
    let stopping = std::thread::spawn(move || server.shutdown());
    eventually(Duration::from_secs(30), "the listener to close", || {
        std::net::TcpStream::connect(addr).is_err()
    });
    c.send(tail.as_bytes()).unwrap();
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close")),
        "{}",
        r.head
    );
    assert!(c.closed_by_server());
    stopping.join().unwrap();
    assert_eq!(db.open().balance("a").unwrap(), Some(9));
}
