//! Two `dialtone-credits serve` processes on one database (a SQLite file,
//! and a PostgreSQL database when DIALTONE_TEST_PG_URL is set): concurrent
//! holds/captures through both never overdraw, and the rate limit is exact
//! across instances because its state lives in the database.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{each_backend, post};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};

const BIN: &str = env!("CARGO_BIN_EXE_dialtone-credits");

/// A running `serve`; killed on drop.
struct Instance {
    child: Child,
    base: String,
}

impl Instance {
    fn start(db: &str) -> Instance {
        let mut child = Command::new(BIN)
            .env("DIAL_SERVICE_KEY", common::SERVICE_KEY)
            .args(["--db", db, "serve", "--listen", "127.0.0.1:0", "--workers", "4"])
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
            .to_string();
        Instance {
            child,
            base: format!("http://{addr}"),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_processes_share_balances_and_rate_limits_exactly() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 30;
    each_backend(|b| {
        b.open().create_account("shared", 100, 1_700_000_000).unwrap();
        let instances = [Instance::start(&b.db_arg()), Instance::start(&b.db_arg())];
        let bases: Vec<String> = instances.iter().map(|i| i.base.clone()).collect();

        let barrier = Arc::new(Barrier::new(THREADS));
        let results: Vec<(usize, usize)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let barrier = Arc::clone(&barrier);
                    let bases = &bases;
                    scope.spawn(move || {
                        barrier.wait();
                        let (mut captured, mut allowed) = (0, 0);
                        for i in 0..PER_THREAD {
                            // Alternate instances: a hold placed on one is
                            // captured on the other.
                            let (a, c) = (&bases[(t + i) % 2], &bases[(t + i + 1) % 2]);
                            let r = post(
                                &format!("{a}/v1/holds"),
                                &json!({ "account": "shared", "amount": 1, "idempotency_key": format!("t{t}-{i}"),
                                         "ttl_seconds": 60 })
                                .to_string(),
                            );
                            match r.status {
                                200 => {
                                    let id = r.json["hold_id"].as_str().unwrap();
                                    let cap = post(&format!("{c}/v1/holds/{id}/capture"), "");
                                    assert_eq!(cap.status, 200, "{:?}", cap.json);
                                    captured += 1;
                                }
                                402 => {}
                                s => panic!("unexpected {s}: {:?}", r.json),
                            }
                            // burst 5, refill 1/day: exactly 5 allowed in total.
                            let r = post(
                                &format!("{a}/v1/ratelimit"),
                                &json!({ "account": "shared",
                                         "rate_limit": { "requests": 1, "window_seconds": 86400, "burst": 5 } })
                                .to_string(),
                            );
                            match r.status {
                                200 => allowed += 1,
                                429 => assert!(r.json["retry_after_seconds"].as_i64().unwrap() >= 1),
                                s => panic!("unexpected {s}: {:?}", r.json),
                            }
                        }
                        (captured, allowed)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let captured: usize = results.iter().map(|r| r.0).sum();
        let allowed: usize = results.iter().map(|r| r.1).sum();
        assert_eq!(captured, 100);
        assert_eq!(allowed, 5);

        drop(instances);
        let mut store = b.open();
        let s = store.account_summary("shared", 1_700_000_000).unwrap().unwrap();
        assert_eq!((s.balance, s.held), (0, 0));
        let report = store.check().unwrap();
        assert!(report.is_ok(), "{:?}", report.problems);
        assert_eq!(report.ledger_rows, 1 + 2 * 100);
    });
}
