//! No lost answers on reused connections (the old tiny_http servers lost one
//! in about 200 under bursts; see README "The lost keep-alive answer"): 10,000
//! requests over 16 keep-alive client connections through Envoy, half of
//! them paid (a hold and a capture at the key/credits service over Envoy's
//! h2c pool, then the demo upstream), half free (the demo upstream), and
//! every one of them answered 200; the balance and the ledger agree.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use dialtone_e2e::TestStack;

const USER: &str = "did:privy:e2e-keepalive";

const CONNECTIONS: usize = 16;
const REQUESTS: usize = 10_000;

/// One HTTP/1.1 keep-alive connection to Envoy.
struct KeepAlive {
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    fn connect(port: u16) -> KeepAlive {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        // A failure deadline, not a pacing: an answer normally takes ms.
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        KeepAlive { reader: BufReader::new(s) }
    }

    /// Sends one request on this connection and reads its whole answer.
    fn send(&mut self, method: &str, path: &str, key: &str) -> (u16, String) {
        let body = r#"{"to":"+18148835337","message":"hi"}"#;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: api.test\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        self.reader.get_mut().write_all(req.as_bytes()).unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status line {line:?}"));
        let mut length = None;
        let mut close = false;
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (name, value) = l.split_once(':').unwrap_or((l, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse::<usize>().ok(),
                "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut buf = vec![0; length.unwrap_or_else(|| panic!("no content-length on {path}"))];
        self.reader.read_exact(&mut buf).unwrap();
        assert!(!close, "Envoy closed a keep-alive connection");
        (status, String::from_utf8_lossy(&buf).into_owned())
    }
}

#[test]
fn ten_thousand_requests_over_sixteen_reused_connections_lose_none() {
    let t = TestStack::start("keepalive");
    t.stack.create_account(USER, 6_000).unwrap();
    let key = t.stack.create_key(USER, &["sms:send"], &[]).unwrap();
    let port = t.stack.opts.ports.listen;
    let per = REQUESTS / CONNECTIONS;
    let results: Vec<Vec<(u16, String, bool)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CONNECTIONS)
            .map(|c| {
                let key = key.clone();
                scope.spawn(move || {
                    let mut conn = KeepAlive::connect(port);
                    (0..per)
                        .map(|i| {
                            let paid = (c + i) % 2 == 0;
                            let (method, path) = if paid { ("POST", "/echo/paid/ka") } else { ("GET", "/echo/free/ka") };
                            let (status, body) = conn.send(method, path, &key);
                            (status, body, paid)
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: Vec<&(u16, String, bool)> = results.iter().flatten().collect();
    assert_eq!(all.len(), REQUESTS);
    let failed: Vec<_> = all.iter().filter(|(s, _, _)| *s != 200).take(5).collect();
    assert!(failed.is_empty(), "{} of {REQUESTS} not 200, e.g. {failed:?}", all.iter().filter(|(s, _, _)| *s != 200).count());
    let paid = all.iter().filter(|(_, _, p)| *p).count() as i64;
    assert_eq!(paid, (REQUESTS / 2) as i64);
    // Each paid request was held and captured exactly once.
    assert_eq!(t.stack.balance(USER).unwrap(), 6_000 - paid);
    let check = t.stack.cli(&["check"]).unwrap();
    assert!(check.starts_with("ok:"), "{check}");
    assert!(t.stack.log("envoy").matches("retrying").count() == 0, "a callout failed in transport and was retried");
}
