//! Load generator for the credits API: N clients, each on its own HTTP/1.1
//! keep-alive connection, sending paid requests as the filter does.
//!
//! ```sh
//! cargo run --release -p dialtone-credits --example loadgen -- \
//!     --url http://127.0.0.1:8081 [--url http://127.0.0.1:8083] \
//!     --service-key "$DIAL_SERVICE_KEY" --clients 64 --seconds 10 \
//!     --mode hold-capture|debit|lookup --accounts 1 [--account-prefix bench-] [--key-sha256 HEX]
//! ```
//!
//! Modes: `hold-capture` (a hold, then its capture: one paid request in
//! charge-on-success mode), `debit` (one up-front debit), `lookup`. Client
//! `i` uses account `PREFIX{i % accounts}` and URL `i % urls`; accounts must
//! exist with enough credits. Prints requests/s, paid requests/s, latency
//! percentiles per call, and every non-2xx status seen; `--json` prints the
//! same as one JSON object.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Clone)]
struct Opts {
    urls: Vec<String>,
    key: String,
    clients: usize,
    seconds: u64,
    mode: String,
    accounts: usize,
    prefix: String,
    key_sha256: String,
    json: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        urls: Vec::new(),
        key: std::env::var("DIAL_SERVICE_KEY").unwrap_or_default(),
        clients: 64,
        seconds: 10,
        mode: "hold-capture".into(),
        accounts: 1,
        prefix: "bench-".into(),
        key_sha256: String::new(),
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--url" => o.urls.push(
                v().trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_string(),
            ),
            "--service-key" => o.key = v(),
            "--clients" => o.clients = v().parse().unwrap(),
            "--seconds" => o.seconds = v().parse().unwrap(),
            "--mode" => o.mode = v(),
            "--accounts" => o.accounts = v().parse().unwrap(),
            "--account-prefix" => o.prefix = v(),
            "--key-sha256" => o.key_sha256 = v(),
            "--json" => o.json = true,
            other => panic!("unknown option {other}"),
        }
    }
    if o.urls.is_empty() {
        o.urls.push("127.0.0.1:8081".into());
    }
    o
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    addr: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    async fn post(&mut self, path: &str, key: &str, body: &str) -> std::io::Result<(u16, Vec<u8>)> {
        if self.stream.is_none() {
            let s = TcpStream::connect(&self.addr).await?;
            s.set_nodelay(true)?;
            self.stream = Some(s);
        }
        let s = self.stream.as_mut().unwrap();
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\nx-dialtone-service-key: {key}\r\ncontent-length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let result = async {
            s.write_all(req.as_bytes()).await?;
            self.buf.clear();
            let mut tmp = [0u8; 8192];
            loop {
                if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = std::str::from_utf8(&self.buf[..end]).unwrap_or("");
                    let status: u16 = head
                        .split(' ')
                        .nth(1)
                        .and_then(|x| x.parse().ok())
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
                        let n = s.read(&mut tmp).await?;
                        if n == 0 {
                            return Err(std::io::Error::other("closed mid-body"));
                        }
                        self.buf.extend_from_slice(&tmp[..n]);
                    }
                    return Ok((status, self.buf[end + 4..end + 4 + len].to_vec()));
                }
                let n = s.read(&mut tmp).await?;
                if n == 0 {
                    return Err(std::io::Error::other("closed before an answer"));
                }
                self.buf.extend_from_slice(&tmp[..n]);
            }
        }
        .await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }
}

#[derive(Default)]
struct Stats {
    lat: BTreeMap<&'static str, Vec<u32>>,
    statuses: BTreeMap<String, u64>,
    paid: u64,
    requests: u64,
}

fn pct(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    f64::from(v[i]) / 1000.0
}

async fn client(i: usize, o: Opts, stop: Arc<AtomicBool>) -> Stats {
    let mut conn = Conn {
        addr: o.urls[i % o.urls.len()].clone(),
        stream: None,
        buf: Vec::with_capacity(8192),
    };
    let account = format!("{}{}", o.prefix, i % o.accounts.max(1));
    let mut st = Stats::default();
    let mut n = 0u64;
    // Unique across runs on one database (`make bench` runs several in a
    // row against the same accounts): the wall clock, and the pid.
    let run = format!(
        "{:x}-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
        std::process::id()
    );
    let timed = |st: &mut Stats, what: &'static str, t: Instant, status: u16| {
        st.requests += 1;
        st.lat
            .entry(what)
            .or_default()
            .push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
        if !(200..300).contains(&status) {
            *st.statuses.entry(format!("{what} {status}")).or_default() += 1;
        }
    };
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let idem = format!("lg-{run}-{i}-{n}");
        match o.mode.as_str() {
            "hold-capture" => {
                let t = Instant::now();
                let body = format!(
                    r#"{{"account":"{account}","amount":1,"idempotency_key":"{idem}","ttl_seconds":60,"route":"bench","key_prefix":"abcdef01"}}"#
                );
                match conn.post("/v1/holds", &o.key, &body).await {
                    Ok((200, b)) => {
                        timed(&mut st, "hold", t, 200);
                        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
                        let id = v["hold_id"].as_str().unwrap().to_string();
                        let t = Instant::now();
                        match conn
                            .post(&format!("/v1/holds/{id}/capture"), &o.key, "")
                            .await
                        {
                            Ok((s, _)) => {
                                timed(&mut st, "capture", t, s);
                                if s == 200 {
                                    st.paid += 1;
                                }
                            }
                            Err(e) => {
                                *st.statuses.entry(format!("capture io: {e}")).or_default() += 1
                            }
                        }
                    }
                    Ok((s, _)) => timed(&mut st, "hold", t, s),
                    Err(e) => *st.statuses.entry(format!("hold io: {e}")).or_default() += 1,
                }
            }
            "debit" => {
                let t = Instant::now();
                let body = format!(
                    r#"{{"account":"{account}","amount":1,"idempotency_key":"{idem}","route":"bench","key_prefix":"abcdef01"}}"#
                );
                match conn.post("/v1/debit", &o.key, &body).await {
                    Ok((s, _)) => {
                        timed(&mut st, "debit", t, s);
                        if s == 200 {
                            st.paid += 1;
                        }
                    }
                    Err(e) => *st.statuses.entry(format!("debit io: {e}")).or_default() += 1,
                }
            }
            "lookup" => {
                let t = Instant::now();
                let body = format!(r#"{{"key_sha256":"{}"}}"#, o.key_sha256);
                match conn.post("/v1/keys/lookup", &o.key, &body).await {
                    Ok((s, _)) => timed(&mut st, "lookup", t, s),
                    Err(e) => *st.statuses.entry(format!("lookup io: {e}")).or_default() += 1,
                }
            }
            other => panic!("unknown mode {other}"),
        }
    }
    st
}

#[tokio::main]
async fn main() {
    let o = opts();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handles: Vec<_> = (0..o.clients)
        .map(|i| tokio::spawn(client(i, o.clone(), Arc::clone(&stop))))
        .collect();
    tokio::time::sleep(Duration::from_secs(o.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Stats::default();
    for h in handles {
        let s = h.await.unwrap();
        all.paid += s.paid;
        all.requests += s.requests;
        for (k, mut v) in s.lat {
            all.lat.entry(k).or_default().append(&mut v);
        }
        for (k, v) in s.statuses {
            *all.statuses.entry(k).or_default() += v;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let mut lat = serde_json::Map::new();
    for (k, v) in &mut all.lat {
        lat.insert(
            (*k).to_string(),
            serde_json::json!({ "count": v.len(), "p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99) }),
        );
    }
    let summary = serde_json::json!({
        "mode": o.mode,
        "clients": o.clients,
        "accounts": o.accounts,
        "urls": o.urls,
        "seconds": secs,
        "requests_per_s": all.requests as f64 / secs,
        "paid_per_s": all.paid as f64 / secs,
        "paid": all.paid,
        "latency": lat,
        "non_2xx": all.statuses,
    });
    if o.json {
        println!("{summary}");
    } else {
        println!("{}", serde_json::to_string_pretty(&summary).unwrap());
    }
}
