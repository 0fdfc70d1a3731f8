//! Bursts of concurrent requests over an Envoy-like HTTP/1.1 keep-alive
//! pool (at most 64 connections, reused, never closed between bursts), with
//! idle pauses between bursts. Reports every request that got no answer.
//!
//! This is how the old tiny_http server's "lost answer on a reused
//! keep-alive connection" was reproduced: point it at a server (or at an
//! Envoy in front of one) and look for `lost`:
//!
//! ```sh
//! cargo run --release -p dialtone-credits --example burst -- \
//!     127.0.0.1:8082 /api/v1/sms/send '{"to":"+18148835337","message":"hi"}' 30 200
//! # ADDR PATH BODY ROUNDS BURST
//! ```
//!
//! A request without an answer within 5 s is counted `lost`; at the end the
//! idle pooled connections are closed and the lost requests are waited on
//! again, to show whether their answers were merely parked.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

struct Pool {
    addr: String,
    idle: Mutex<Vec<TcpStream>>,
    lost: Mutex<Vec<TcpStream>>,
    slots: tokio::sync::Semaphore,
}

async fn read_response(s: &mut TcpStream) -> std::io::Result<u16> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status = head
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
            while buf.len() < end + 4 + len {
                let n = s.read(&mut tmp).await?;
                if n == 0 {
                    return Err(std::io::Error::other("closed mid-body"));
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            return Ok(status);
        }
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before an answer"));
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:8082".into());
    let path = args.get(2).cloned().unwrap_or_else(|| "/healthz".into());
    let body = args.get(3).cloned().unwrap_or_default();
    let rounds: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(30);
    let burst: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(200);
    let pool = Arc::new(Pool {
        addr,
        idle: Mutex::new(Vec::new()),
        lost: Mutex::new(Vec::new()),
        slots: tokio::sync::Semaphore::new(64),
    });
    let (mut ok, mut lost, mut errors) = (0usize, 0usize, 0usize);
    for round in 0..rounds {
        let tasks: Vec<_> = (0..burst)
            .map(|_| {
                let (pool, path, body) = (Arc::clone(&pool), path.clone(), body.clone());
                tokio::spawn(async move {
                    let _slot = pool.slots.acquire().await.unwrap();
                    let pooled = pool.idle.lock().await.pop();
                    let reused = pooled.is_some();
                    let mut s = match pooled {
                        Some(s) => s,
                        None => TcpStream::connect(&pool.addr).await.unwrap(),
                    };
                    let req = if body.is_empty() {
                        format!("GET {path} HTTP/1.1\r\nhost: burst\r\n\r\n")
                    } else {
                        format!(
                            "POST {path} HTTP/1.1\r\nhost: burst\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    if let Err(e) = s.write_all(req.as_bytes()).await {
                        return Err(format!("write (reused {reused}): {e}"));
                    }
                    match tokio::time::timeout(Duration::from_secs(5), read_response(&mut s)).await {
                        Err(_) => {
                            pool.lost.lock().await.push(s);
                            Err(format!("LOST: no answer in 5 s (reused connection: {reused})"))
                        }
                        Ok(Err(e)) => Err(format!("read (reused {reused}): {e}")),
                        Ok(Ok(status)) => {
                            pool.idle.lock().await.push(s);
                            Ok(status)
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => {
                    if e.starts_with("LOST") {
                        lost += 1;
                    } else {
                        errors += 1;
                    }
                    eprintln!("round {round}: {e}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50 + (round as u64 % 7) * 30)).await;
    }
    println!("ok {ok} lost {lost} errors {errors}");
    let mut parked = std::mem::take(&mut *pool.lost.lock().await);
    if !parked.is_empty() {
        let idle = std::mem::take(&mut *pool.idle.lock().await);
        println!(
            "closing the {} idle keep-alive connections; waiting for the lost answers...",
            idle.len()
        );
        drop(idle);
        for s in &mut parked {
            let started = Instant::now();
            match tokio::time::timeout(Duration::from_secs(15), read_response(s)).await {
                Ok(Ok(status)) => println!(
                    "  a lost answer arrived {:?} later: status {status}",
                    started.elapsed()
                ),
                other => println!(
                    "  still nothing: {:?}",
                    other.map(|r| r.map_err(|e| e.to_string()))
                ),
            }
        }
    }
}
