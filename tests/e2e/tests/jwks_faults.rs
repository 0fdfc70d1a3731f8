//! The issuer's JWKS host misbehaving, through a real Envoy: stopped, slow
//! past the fetch timeout, 500, 200 with garbage, a body over the size cap,
//! connections reset. The filter keeps verifying with the last good keys,
//! and with no good keys at all (no pinned key, every fetch failed) a token
//! is a plain 401 `token signed by an unknown key`; the VM lives throughout.
//!
//! Where the JWKS comes from: the bootstrap's `dialtone_jwks` cluster shares
//! the demo upstream's port, which the free route needs while the JWKS host
//! is down. So this test points `privy.jwks_fetch` at the `dialtone_credits`
//! cluster instead, and takes over that port: Privy sessions on a free route
//! (`/echo/free`) need no key/credits callout, so the real service is only
//! needed while the stack starts. After that a scripted JWKS host (and the
//! project's `FaultServer` for the faults) answers there, and a plain stand-in
//! answers for the demo upstream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dialtone_e2e::devstack::p256_key::SigningKey;
use dialtone_e2e::{bearer, raw_request_complete, tokens, Fault, FaultServer, TestStack};
use serde_json::{json, Value};

const USER: &str = "did:privy:e2e-jwks";
const JWKS_PATH: &str = "/.well-known/jwks.json";
const FETCH_TIMEOUT_MS: u64 = 500;
/// The unknown-kid refetch cooldown (its minimum): each probe below waits it out.
const COOLDOWN: Duration = Duration::from_millis(1100);

/// A tiny HTTP/1.1 server on a fixed port: one request per connection,
/// answered by `answer(path)`; counts requests per path.
struct Server {
    stop: Arc<AtomicBool>,
    port: u16,
    hits: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(port: u16, answer: impl Fn(&str, &str) -> (u16, Vec<u8>) + Send + Sync + 'static) -> Server {
        let listener = bind(port);
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let (flag, log) = (stop.clone(), hits.clone());
        let answer = Arc::new(answer);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let (log, answer) = (log.clone(), answer.clone());
                std::thread::spawn(move || {
                    let Some((path, head)) = read_head(&mut conn) else { return };
                    log.lock().unwrap().push(path.clone());
                    let (status, body) = answer(&path, &head);
                    let mut out = format!("HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len()).into_bytes();
                    out.extend_from_slice(&body);
                    let _ = conn.write_all(&out);
                });
            }
        });
        Server { stop, port, hits }
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().iter().filter(|p| *p == path).count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Binds `port`, retrying while the previous owner lets go of it.
fn bind(port: u16) -> TcpListener {
    let start = Instant::now();
    loop {
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => return l,
            Err(e) if start.elapsed() > Duration::from_secs(5) => panic!("bind {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn read_head(conn: &mut TcpStream) -> Option<(String, String)> {
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let path = head.split(' ').nth(1)?.to_owned();
    Some((path, head.to_ascii_lowercase()))
}

fn jwk(kid: &str, k: &SigningKey) -> Value {
    let p = k.verifying_key().to_encoded_point(false);
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256", "x": tokens::b64(p.x().unwrap()), "y": tokens::b64(p.y().unwrap())})
}

/// The JWKS host in good health, publishing `doc`.
fn good_host(port: u16, doc: &Value) -> Server {
    let body = doc.to_string().into_bytes();
    Server::start(port, move |path, _| if path == JWKS_PATH { (200, body.clone()) } else { (404, b"{}".to_vec()) })
}

#[test]
fn jwks_host_faults_keep_the_last_good_keys() {
    let mut t = TestStack::start_with("jwksfaults", |cfg| {
        let privy = cfg["privy"].as_object_mut().unwrap();
        privy.remove("verification_key");
        privy.insert(
            "jwks_fetch".into(),
            json!({"cluster": "dialtone_credits", "authority": "issuer.local", "path": JWKS_PATH,
                   "refresh_seconds": 300, "unknown_kid_cooldown_seconds": 1, "timeout_ms": FETCH_TIMEOUT_MS}),
        );
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let app_id = t.app_id.clone();
    let issuer_key = SigningKey::from_slice(&[31u8; 32]).unwrap();
    let stranger = SigningKey::from_slice(&[32u8; 32]).unwrap();
    let serial = AtomicUsize::new(0);
    // A fresh token (its own session id: no cache can answer for it).
    let token = |kid: &str, k: &SigningKey| {
        let now = tokens::now_unix();
        let mut c = tokens::privy_claims(&app_id, USER, now - 5, now + 3600);
        c["sid"] = json!(format!("jwks-{}", serial.fetch_add(1, Ordering::SeqCst)));
        tokens::sign_es256(k, &json!({"alg": "ES256", "typ": "JWT", "kid": kid}), &c)
    };
    let unknown_key = "token signed by an unknown key";
    let get = |t: &TestStack, tok: &str| raw_request_complete(t.stack.opts.ports.listen, "GET", "/echo/free/jwks", &[("authorization", bearer(tok).as_bytes())], None);
    let refused = |what: &str, r: &dialtone_e2e::Resp| {
        let b = r.assert_refusal(401, "unauthorized");
        assert_eq!(b["message"], unknown_key, "{what}");
        assert!(r.header("www-authenticate").unwrap().contains("error=\"invalid_token\""), "{what}");
    };

    // --- No good keys at all. At start the JWKS "host" is the real key/credits
    // service, which has no such document (404): no pinned key, no keys.
    let r = get(&t, &token("k1", &issuer_key));
    refused("first fetch failed, no pinned key", &r);
    assert!(t.stack.log("envoy").contains("JWKS fetch failed (status 404); keeping the last good keys"), "{}", t.stack.log_tail("envoy"));
    // The VM lives: public routes answer.
    assert_eq!(t.get("/healthz", &[]).status, 200);

    // Take the ports over: a plain upstream for the free route, and the JWKS host.
    let (credits_port, upstream_port) = (t.stack.opts.ports.credits, t.stack.opts.ports.upstream);
    t.stack.stop_credits();
    let upstream = Server::start(upstream_port, |path, head| {
        let account = head.lines().find_map(|l| l.strip_prefix("x-dialtone-account:")).map(str::trim).unwrap_or_default().to_owned();
        (200, json!({"ok": true, "path": path, "account": account}).to_string().into_bytes())
    });
    // Host stopped (nothing listens) and still no keys: 401, never a 5xx.
    std::thread::sleep(COOLDOWN);
    refused("JWKS host down, no keys", &get(&t, &token("k1", &issuer_key)));

    // --- The host comes up; the first token with its kid fetches at once.
    std::thread::sleep(COOLDOWN);
    let doc = json!({"keys": [jwk("k1", &issuer_key)]});
    let host = good_host(credits_port, &doc);
    let r = get(&t, &token("k1", &issuer_key));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["account"], USER);
    assert!(host.hits(JWKS_PATH) >= 1, "fetched for the unknown kid");
    drop(host);

    // --- Every fault: a token naming an unknown kid makes the filter refetch
    // (past the 1 s cooldown); the fetch fails; the stranger is refused, and a
    // token signed with the known key still passes.
    let mut faults: Vec<(&str, Option<Fault>, &str)> = vec![
        ("stopped", None, "status 503"),
        ("slow past the timeout", Some(Fault::Slow(Duration::from_millis(FETCH_TIMEOUT_MS * 4))), "status 504"),
        ("500", Some(Fault::ServerError), "status 500"),
        ("200 with garbage", Some(Fault::Garbage), "not JSON"),
        ("huge body", Some(Fault::Huge(300_000)), "document too large"),
        ("reset", Some(Fault::Reset), "status 503"),
    ];
    for (what, fault, reason) in faults.drain(..) {
        let _server = fault.map(|f| FaultServer::start(credits_port, f));
        std::thread::sleep(COOLDOWN);
        let log_before = t.stack.log("envoy").len();
        let started = Instant::now();
        refused(what, &get(&t, &token("k-stranger", &stranger)));
        assert!(started.elapsed() < Duration::from_millis(FETCH_TIMEOUT_MS + 2000), "{what}: took {:?}", started.elapsed());
        let log = t.stack.log("envoy");
        let new_lines = log.get(log_before..).unwrap_or_default();
        let line = format!("JWKS fetch failed ({reason}); keeping the last good keys");
        assert!(new_lines.contains(&line), "{what}: no {line:?} in\n{new_lines}");
        // The last good keys keep serving, with the host still broken.
        let r = get(&t, &token("k1", &issuer_key));
        assert_eq!(r.status, 200, "{what}: {}", r.body);
        assert_eq!(r.json()["account"], USER, "{what}");
    }

    // --- Back to health, with a rotated set: the next unknown kid fetches it.
    std::thread::sleep(COOLDOWN);
    let new_key = SigningKey::from_slice(&[33u8; 32]).unwrap();
    let host = good_host(credits_port, &json!({"keys": [jwk("k1", &issuer_key), jwk("k2", &new_key)]}));
    assert_eq!(get(&t, &token("k2", &new_key)).status, 200);
    assert_eq!(get(&t, &token("k1", &issuer_key)).status, 200);
    assert!(host.hits(JWKS_PATH) >= 1);
    assert_eq!(t.get("/healthz", &[]).status, 200);
    assert!(t.stack.exited().is_none(), "a process died");

    // Envoy's stats: every refusal counted, every pass counted, and the
    // fetches: at least the 404 at start, the host down, the 6 faults failed;
    // at least 2 documents taken. (At least: the root context's own
    // scheduled retries may add some.)
    let envoy = dialtone_e2e::EnvoyStats::read(t.stack.opts.ports.admin, "dialtone");
    let (stats, value) = (&envoy.0, |name: &str| envoy.value(name));
    assert_eq!(value("dialtone.denied.unauthorized"), 2 + 6, "{stats}");
    assert_eq!(value("dialtone.denied.unauthorized.token_unknown_kid"), 2 + 6, "{stats}");
    assert_eq!(value("dialtone.allowed.privy"), 1 + 6 + 2, "{stats}");
    assert!(value("dialtone.jwks.failed") >= 1 + 1 + 6, "{stats}");
    assert!(value("dialtone.jwks.fetched") >= 2, "{stats}");
    let seen = upstream.hits("/echo/free/jwks");
    assert_eq!(seen, 1 + 6 + 2, "only allowed requests reach the upstream");
}
