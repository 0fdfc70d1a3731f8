//! Helpers for the end-to-end tests: a stack per test (its own Envoy, its own
//! key/credits service and database, on free ports) and a raw HTTP/1.1
//! client, so tests can send what a hostile client sends (duplicate headers,
//! non-UTF-8 bytes) exactly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use dialtone_devstack::{self as devstack, tokens, Options, Paths, Ports, Stack, X402Env, X402Options};
use serde_json::{json, Value};

pub const ADMIN_KEY: &str = "e2e-operator-admin-key-0123456789";

/// A running stack plus what the tests need to mint tokens.
pub struct TestStack {
    pub stack: Stack,
    pub signing_key: devstack::p256_key::SigningKey,
    pub app_id: String,
}

/// The demo policy plus routes that echo what the upstream received, so a
/// test can see the headers that passed the filter.
pub fn test_plugin_config(demo: &Value) -> Value {
    let mut cfg = demo.clone();
    let routes = cfg["routes"].as_array_mut().unwrap();
    routes.push(json!({"name": "echo_public", "path": {"prefix": "/echo/public"}, "public": true}));
    routes.push(json!({"name": "echo_free", "path": {"prefix": "/echo/free"}}));
    routes.push(json!({"name": "echo_paid", "path": {"prefix": "/echo/paid"}, "scope": "sms:send", "cost": 1,
        "payment": ["credits", "x402"], "x402": demo["routes"][0]["x402"].clone()}));
    cfg
}

impl TestStack {
    /// Starts a stack for the test called `name`, with `edit` applied to the plugin config.
    pub fn start_with(name: &str, edit: impl FnOnce(&mut Value)) -> Result<TestStack, String> {
        Self::start_full(name, edit, |_| Ok(()))
    }

    /// Like `start_with`, and `options` may change the stack's shape
    /// (Envoy workers, more credits-service instances, the database).
    pub fn start_full(
        name: &str,
        edit: impl FnOnce(&mut Value),
        options: impl FnOnce(&mut Options) -> Result<(), String>,
    ) -> Result<TestStack, String> {
        let paths = Paths::discover()?;
        let run_dir = paths.root.join("target/e2e").join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run_dir);
        // One dev key for all e2e stacks; each stack gets its own database.
        let (key, demo) = devstack::demo_setup(&paths.root, &paths.root.join("target/e2e"))?;
        let mut cfg = test_plugin_config(&demo);
        edit(&mut cfg);
        let app_id = devstack::app_id(&cfg);
        let mut opts = Options {
            ports: Ports::free()?,
            run_dir,
            plugin_config: cfg,
            admin_key: Some(ADMIN_KEY.to_owned()),
            concurrency: 1,
            database: None,
            extra_credits: Vec::new(),
            x402: None,
            credits_http1: false,
            dev_sign_in_key: Some(paths.root.join("target/e2e/dev-signing-key.pem")),
        };
        options(&mut opts)?;
        let stack = Stack::start(paths, opts)?;
        Ok(TestStack { stack, signing_key: key, app_id })
    }

    pub fn start(name: &str) -> TestStack {
        Self::start_with(name, |_| {}).unwrap_or_else(|e| panic!("starting the stack: {e}"))
    }

    /// A stack with its own local x402 stack (anvil + TestUSDC + the
    /// reference facilitator, on free ports).
    pub fn start_x402(name: &str) -> TestStack {
        Self::start_full(name, |_| {}, with_x402).unwrap_or_else(|e| panic!("starting the stack: {e}"))
    }

    /// The x402 stack this test stack started (see [`with_x402`]).
    pub fn x402(&self) -> &X402Env {
        self.stack.x402().expect("this stack was started without x402 (TestStack::start_x402 or with_x402)")
    }

    /// Signs a payment for `payment_required` (the base64 `PAYMENT-REQUIRED`
    /// value, or a 402 JSON body) with the reference client, `node
    /// x402/pay.mjs`, as the stack's payer; `args` go to pay.mjs (e.g.
    /// `--valid-before`, or `--key-env X402_UNFUNDED_KEY` for the unfunded
    /// payer). Returns the `PAYMENT-SIGNATURE` value.
    pub fn pay(&self, payment_required: &str, args: &[&str]) -> String {
        let x = self.x402();
        let out = std::process::Command::new("node")
            .arg(self.stack.paths.root.join("x402/pay.mjs"))
            .arg(payment_required)
            .args(args)
            .env("X402_PAYER_KEY", &x.payer.key)
            .env("X402_UNFUNDED_KEY", &x.unfunded.key)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running node x402/pay.mjs: {e}"));
        assert!(out.status.success(), "pay.mjs {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// The TestUSDC balance of `address`, read on chain.
    pub fn token_balance(&self, address: &str) -> u128 {
        self.x402().token_balance(address).unwrap_or_else(|e| panic!("reading the balance of {address}: {e}"))
    }

    /// A valid Privy access token for `sub`.
    pub fn privy_token(&self, sub: &str) -> String {
        tokens::privy_token(&self.signing_key, &self.app_id, sub, tokens::now_unix(), 3600)
    }

    /// GET `path` on the Envoy at `port` with a Bearer credential.
    pub fn get_from(&self, port: u16, path: &str, credential: &str) -> Resp {
        let auth = bearer(credential);
        self.send_to(port, "GET", path, &[("authorization", &auth)], None)
    }

    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.send("GET", path, headers, None)
    }

    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        self.send("POST", path, headers, Some(body.as_bytes()))
    }

    pub fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Resp {
        self.send_to(self.stack.opts.ports.listen, method, path, headers, body)
    }

    /// The same, to another Envoy of the stack (see `Stack::add_envoy`).
    pub fn send_to(&self, port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Resp {
        let raw: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        raw_request(port, method, path, &raw, body)
    }

    pub fn send_raw(&self, method: &str, path: &str, headers: &[(&str, &[u8])]) -> Resp {
        raw_request(self.stack.opts.ports.listen, method, path, headers, None)
    }
}

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// Asserts a refusal written by the filter: status, JSON, `success: false`, the error code.
    pub fn assert_refusal(&self, status: u16, error: &str) -> Value {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert_eq!(self.header("content-type"), Some("application/json"), "{self:?}");
        let body = self.json();
        assert_eq!(body["success"], false, "{body}");
        assert_eq!(body["error"], error, "{body}");
        if status == 401 {
            let www = self.header("www-authenticate").unwrap_or_else(|| panic!("401 without WWW-Authenticate: {self:?}"));
            assert!(www.starts_with("Bearer realm=\"dialtone\""), "{www}");
        }
        body
    }

    /// The upstream `/echo` answer: the headers it received.
    pub fn echoed_header(&self, name: &str) -> Option<String> {
        assert_eq!(self.status, 200, "echo failed: {}", self.body);
        self.json()["headers"][name].as_str().map(str::to_owned)
    }
}

/// One HTTP/1.1 request on its own connection, bytes exactly as given.
pub fn raw_request(port: u16, method: &str, path: &str, headers: &[(&str, &[u8])], body: Option<&[u8]>) -> Resp {
    let mut s = send_request(port, method, path, headers, body);
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        panic!("{method} {path} on port {port}: reading the response: {e}; got {:?}", String::from_utf8_lossy(&raw));
    }
    parse_response(&raw)
}

/// Connects and writes the request (`connection: close`).
fn send_request(port: u16, method: &str, path: &str, headers: &[(&str, &[u8])], body: Option<&[u8]>) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req: Vec<u8> = format!("{method} {path} HTTP/1.1\r\nhost: dialtone.test\r\nconnection: close\r\n").into_bytes();
    for (k, v) in headers {
        req.extend_from_slice(k.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() || method == "POST" {
        req.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    s.write_all(&req).unwrap();
    s
}

/// `n` requests sent at once, one thread each, spread over `ports` in
/// turn: `POST path` with `Bearer key` and a `{}` body. Their (status, body).
pub fn concurrent_posts(ports: &[u16], path: &str, key: &str, n: usize) -> Vec<(u16, String)> {
    let auth = bearer(key);
    std::thread::scope(|scope| {
        let sent: Vec<_> = (0..n)
            .filter_map(|i| ports.get(i % ports.len().max(1)).copied())
            .map(|port| {
                let auth = auth.as_str();
                scope.spawn(move || {
                    let r = raw_request_complete(port, "POST", path, &[("authorization", auth.as_bytes())], Some(b"{}"));
                    (r.status, r.body)
                })
            })
            .collect();
        sent.into_iter().map(|h| h.join().unwrap_or((0, "the sending thread panicked".into()))).collect()
    })
}

/// Like [`raw_request`], but stops reading once the response is complete (its
/// `content-length` is in) instead of waiting for the server to close: after
/// a local reply to a `connection: close` request Envoy holds the connection
/// up to its delayed-close timeout (1 s), which adds up over many refusals.
pub fn raw_request_complete(port: u16, method: &str, path: &str, headers: &[(&str, &[u8])], body: Option<&[u8]>) -> Resp {
    let mut s = send_request(port, method, path, headers, body);
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let len = head.lines().find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()));
            if len.is_some_and(|len| raw.len() >= end + 4 + len) {
                break;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("{method} {path} on port {port}: reading the response: {e}; got {:?}", String::from_utf8_lossy(&raw)),
        }
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Resp {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned())))
        .collect();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body);
    }
    Resp { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// Envoy's `/stats` for the filter's metrics (kept under `wasmcustom.`).
pub struct EnvoyStats(pub String);

impl EnvoyStats {
    /// Reads `/stats?filter=…` from the admin port.
    pub fn read(admin_port: u16, filter: &str) -> EnvoyStats {
        EnvoyStats(raw_request(admin_port, "GET", &format!("/stats?filter={filter}"), &[], None).body)
    }

    /// A counter's value, or None when Envoy does not show it.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.lines().find_map(|l| l.strip_prefix(&format!("wasmcustom.{name}: "))).and_then(|v| v.trim().parse().ok())
    }

    /// A counter that must exist.
    pub fn value(&self, name: &str) -> u64 {
        self.get(name).unwrap_or_else(|| panic!("{name} not in stats:\n{}", self.0))
    }
}

/// `Options` for a stack that starts its own x402 stack (anvil on a free port).
pub fn with_x402(o: &mut Options) -> Result<(), String> {
    o.x402 = Some(X402Options { anvil_port: devstack::free_port()? });
    Ok(())
}

/// Standard base64 of JSON, decoded (the x402 headers' encoding).
pub fn decode_b64_json(value: &str) -> Value {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(value.trim()).unwrap_or_else(|e| panic!("not base64 ({e}): {value:?}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&bytes)))
}

/// JSON, as standard base64 (the x402 headers' encoding).
pub fn encode_b64_json(value: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(value.to_string())
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

pub fn e2e_dir() -> PathBuf {
    Paths::discover().map(|p| p.root.join("target/e2e")).unwrap_or_default()
}

/// How a scripted stand-in for the key/credits service misbehaves.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answers only after this long (past the filter's callout timeout).
    Slow(Duration),
    /// 500 with a JSON error body.
    ServerError,
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with valid-looking JSON of this many bytes (past the response cap).
    Huge(usize),
    /// Closes the connection without answering.
    Reset,
}

/// A scripted answer: `answer(path, lower-cased request head)` → status and JSON body.
pub type Answer = Arc<dyn Fn(&str, &str) -> (u16, Vec<u8>) + Send + Sync>;

/// What a [`FaultServer`] answers: a fault, or a scripted answer per request.
#[derive(Clone)]
pub enum Behaviour {
    Fault(Fault),
    Answer(Answer),
}

impl Behaviour {
    pub fn answer(f: impl Fn(&str, &str) -> (u16, Vec<u8>) + Send + Sync + 'static) -> Behaviour {
        Behaviour::Answer(Arc::new(f))
    }
}

/// How long a port another socket still holds may keep us waiting (a
/// listener being torn down, a parallel test's port probe): a failure
/// deadline, not a pace.
const BIND_DEADLINE: Duration = Duration::from_secs(30);

/// Binds `127.0.0.1:port`, retrying while another socket holds it.
pub fn bind_retrying(port: u16) -> TcpListener {
    let start = Instant::now();
    loop {
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => return l,
            Err(e) if start.elapsed() > BIND_DEADLINE => panic!("port {port} still taken after {BIND_DEADLINE:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A scripted stand-in bound where the key/credits service (or another
/// process of the stack) was: it exists only to script failures a real
/// service will not produce on demand. One listener for its whole life:
/// change what it answers with [`FaultServer::set`] instead of binding the
/// port again. Counts the requests it read, by path.
pub struct FaultServer {
    stop: Arc<AtomicBool>,
    port: u16,
    behaviour: Arc<Mutex<Behaviour>>,
    hits: Arc<Mutex<Vec<String>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl FaultServer {
    /// Takes `port` (waiting while another socket lets go of it) and answers with `fault`.
    pub fn start(port: u16, fault: Fault) -> FaultServer {
        Self::with(port, Behaviour::Fault(fault))
    }

    /// Takes `port` and answers every request with `answer(path, head)`.
    pub fn answering(port: u16, answer: impl Fn(&str, &str) -> (u16, Vec<u8>) + Send + Sync + 'static) -> FaultServer {
        Self::with(port, Behaviour::answer(answer))
    }

    pub fn with(port: u16, behaviour: Behaviour) -> FaultServer {
        let listener = bind_retrying(port);
        let stop = Arc::new(AtomicBool::new(false));
        let behaviour = Arc::new(Mutex::new(behaviour));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let (flag, current, log) = (stop.clone(), behaviour.clone(), hits.clone());
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let (current, log) = (current.clone(), log.clone());
                std::thread::spawn(move || {
                    let Some((path, head)) = read_request(&mut conn) else { return };
                    log.lock().unwrap().push(path.clone());
                    let behaviour = current.lock().unwrap().clone();
                    let reply = |status: u16, body: &[u8]| {
                        let mut out = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        out.extend_from_slice(body);
                        out
                    };
                    let bytes = match behaviour {
                        Behaviour::Answer(answer) => {
                            let (status, body) = answer(&path, &head);
                            reply(status, &body)
                        }
                        Behaviour::Fault(Fault::Slow(d)) => {
                            std::thread::sleep(d);
                            reply(200, br#"{"error":"too late"}"#)
                        }
                        Behaviour::Fault(Fault::ServerError) => reply(500, br#"{"error":"internal"}"#),
                        Behaviour::Fault(Fault::Garbage) => reply(200, b"<html>definitely not json</html>"),
                        Behaviour::Fault(Fault::Huge(n)) => {
                            let mut body = br#"{"account":"did:privy:x","pad":""#.to_vec();
                            body.resize(n, b'a');
                            body.extend_from_slice(br#""}"#);
                            reply(200, &body)
                        }
                        Behaviour::Fault(Fault::Reset) => Vec::new(),
                    };
                    let _ = conn.write_all(&bytes);
                });
            }
        });
        FaultServer { stop, port, behaviour, hits, accept: Some(accept) }
    }

    /// Answers the next requests with `fault`.
    pub fn set(&self, fault: Fault) {
        *self.behaviour.lock().unwrap() = Behaviour::Fault(fault);
    }

    /// Answers the next requests with `answer(path, head)`.
    pub fn set_answer(&self, answer: impl Fn(&str, &str) -> (u16, Vec<u8>) + Send + Sync + 'static) {
        *self.behaviour.lock().unwrap() = Behaviour::answer(answer);
    }

    /// Requests read so far for `path`.
    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().iter().filter(|p| *p == path).count()
    }

    /// Requests read so far, any path.
    pub fn requests(&self) -> usize {
        self.hits.lock().unwrap().len()
    }
}

impl Drop for FaultServer {
    /// Returns once the listener is closed: the port refuses connections
    /// (or is free for the next owner) when this returns.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag and drops the listener.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request (head and `content-length` body); returns its path and
/// its head, lower-cased.
fn read_request(conn: &mut TcpStream) -> Option<(String, String)> {
    // A failure deadline only: Envoy writes the request as soon as it connects.
    conn.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
            let head = head.to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = conn.read(&mut chunk).ok()?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some((path, head));
        }
    }
}

/// Polls `check` until it gives a value; panics after `limit` (a failure
/// deadline: on a healthy machine the event comes long before), saying
/// what never happened and, from `state`, how things stood.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>, state: impl Fn() -> String) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("{what}: not after {limit:?}; {}", state());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until nothing accepts connections on `127.0.0.1:port` (a killed
/// process's listener is gone).
pub fn wait_until_refused(port: u16) {
    wait_for(
        &format!("port {port} refusing connections"),
        Duration::from_secs(30),
        || TcpStream::connect(("127.0.0.1", port)).is_err().then_some(()),
        String::new,
    );
}

/// The key lookup cache's TTL in a plugin config (the filter's default: 500 ms).
pub fn key_cache_ttl(plugin_config: &Value) -> Duration {
    Duration::from_millis(plugin_config["credits_service"]["key_cache_ttl_ms"].as_u64().unwrap_or(500))
}

/// How much later than a cache entry's TTL a request must reach the filter
/// to be sure the entry is gone (or earlier, to be sure it is still there):
/// the filter compares whole milliseconds.
pub const CACHE_CLOCK_SLACK: Duration = Duration::from_millis(2);

/// Returns once every key lookup answered before `looked_up` has left the
/// VMs' caches: `key_cache_ttl_ms` after it (the bound the revocation test
/// proves), measured from the last lookup, not from a later event.
pub fn wait_out_key_cache(looked_up: Instant, plugin_config: &Value) {
    let until = looked_up + key_cache_ttl(plugin_config) + CACHE_CLOCK_SLACK;
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
}

/// One HTTP/1.1 keep-alive connection: every request on it reaches the same
/// Envoy worker, so the same wasm VM and its caches.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Conn { stream, buf: Vec::new() }
    }

    /// Sends a request without a body and reads the whole response.
    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut req = format!("GET {path} HTTP/1.1\r\nhost: dialtone.test\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.stream.write_all(req.as_bytes()).unwrap();
        self.read_response()
    }

    fn fill(&mut self) {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).unwrap_or_else(|e| panic!("reading the response: {e}"));
        assert!(n > 0, "the connection closed mid-response: {:?}", String::from_utf8_lossy(&self.buf));
        self.buf.extend_from_slice(&chunk[..n]);
    }

    fn read_response(&mut self) -> Resp {
        let end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            self.fill();
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        let body_at = end + 4;
        let total = if let Some(len) =
            head.lines().find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()))
        {
            while self.buf.len() < body_at + len {
                self.fill();
            }
            body_at + len
        } else if head.contains("transfer-encoding: chunked") {
            loop {
                if let Some(done) = self.buf[body_at..].windows(5).position(|w| w == b"0\r\n\r\n") {
                    break body_at + done + 5;
                }
                self.fill();
            }
        } else {
            body_at
        };
        let raw: Vec<u8> = self.buf.drain(..total).collect();
        parse_response(&raw)
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        // The x402 stack stops by the PID files in the run directory: before it goes.
        self.stack.stop_x402();
        // Keep the logs of a failed test for a look; tidy up after a pass.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.stack.opts.run_dir);
        }
    }
}
