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
//! needed while the stack starts. After that a scripted JWKS host (the
//! project's `FaultServer`, switched between a good document and each fault)
//! answers there, and a plain stand-in answers for the demo upstream.
//!
//! A token naming an unknown kid fetches at once, but at most once per
//! cooldown (1 s here). Nothing waits the cooldown out on the clock: each
//! probe is sent again until Envoy's `dialtone.jwks.*` counters show that a
//! fetch happened (every probe is refused the same way meanwhile).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dialtone_e2e::devstack::p256_key::SigningKey;
use dialtone_e2e::{bearer, raw_request_complete, tokens, wait_until_refused, EnvoyStats, Fault, FaultServer, Resp, TestStack};
use serde_json::{json, Value};

const USER: &str = "did:privy:e2e-jwks";
const JWKS_PATH: &str = "/.well-known/jwks.json";
const FETCH_TIMEOUT_MS: u64 = 500;
/// A failure deadline: the cooldown is 1 s.
const PATIENCE: Duration = Duration::from_secs(120);

fn jwk(kid: &str, k: &SigningKey) -> Value {
    let p = k.verifying_key().to_encoded_point(false);
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256", "x": tokens::b64(p.x().unwrap()), "y": tokens::b64(p.y().unwrap())})
}

/// The JWKS host in good health, publishing `doc`.
fn good_host(doc: &Value) -> impl Fn(&str, &str) -> (u16, Vec<u8>) + Send + Sync + 'static {
    let body = doc.to_string().into_bytes();
    move |path, _| if path == JWKS_PATH { (200, body.clone()) } else { (404, b"{}".to_vec()) }
}

/// Envoy's JWKS counters: (documents taken, fetches failed).
fn jwks_counts(t: &TestStack) -> (u64, u64) {
    let s = EnvoyStats::read(t.stack.opts.ports.admin, "dialtone.jwks");
    (s.value("dialtone.jwks.fetched"), s.value("dialtone.jwks.failed"))
}

/// Sends `probe` until it `passes` (then returns its response), each answer
/// otherwise `refused`: the unknown-kid cooldown decides when a probe may
/// fetch, and nothing but the outcome says when it did.
fn probe_until(what: &str, mut probe: impl FnMut() -> Resp, passes: impl Fn(&Resp) -> bool, refused: impl Fn(&Resp)) -> (Resp, usize) {
    let start = Instant::now();
    let mut refusals = 0;
    loop {
        let r = probe();
        if passes(&r) {
            return (r, refusals);
        }
        refused(&r);
        refusals += 1;
        assert!(start.elapsed() < PATIENCE, "{what}: {refusals} probes in {PATIENCE:?}, none fetched");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn jwks_host_faults_keep_the_last_good_keys() {
    // The fault stand-ins speak HTTP/1.1: so does Envoy to the credits port here.
    let mut t = TestStack::start_full(
        "jwksfaults",
        |cfg| {
            let privy = cfg["privy"].as_object_mut().unwrap();
            privy.remove("verification_key");
            privy.insert(
                "jwks_fetch".into(),
                json!({"cluster": "dialtone_credits", "authority": "issuer.local", "path": JWKS_PATH,
                       "refresh_seconds": 300, "unknown_kid_cooldown_seconds": 1, "timeout_ms": FETCH_TIMEOUT_MS}),
            );
        },
        |o| {
            o.credits_http1 = true;
            Ok(())
        },
    )
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
    let refused = |what: &str, r: &Resp| {
        let b = r.assert_refusal(401, "unauthorized");
        assert_eq!(b["message"], unknown_key, "{what}");
        assert!(r.header("www-authenticate").unwrap().contains("error=\"invalid_token\""), "{what}");
    };
    // Every 401 of the run, for Envoy's count at the end.
    let mut refusals = 0u64;

    // --- No good keys at all. At start the JWKS "host" is the real key/credits
    // service, which has no such document (404): no pinned key, no keys.
    let r = get(&t, &token("k1", &issuer_key));
    refused("first fetch failed, no pinned key", &r);
    refusals += 1;
    assert!(t.stack.log("envoy").contains("JWKS fetch failed (status 404); keeping the last good keys"), "{}", t.stack.log_tail("envoy"));
    // The VM lives: public routes answer.
    assert_eq!(t.get("/healthz", &[]).status, 200);

    // Take the ports over: a plain upstream for the free route, and the JWKS host.
    let (credits_port, upstream_port) = (t.stack.opts.ports.credits, t.stack.opts.ports.upstream);
    t.stack.stop_credits();
    wait_until_refused(credits_port);
    let upstream = FaultServer::answering(upstream_port, |path, head| {
        let account = head.lines().find_map(|l| l.strip_prefix("x-dialtone-account:")).map(str::trim).unwrap_or_default().to_owned();
        (200, json!({"ok": true, "path": path, "account": account}).to_string().into_bytes())
    });
    // Host stopped (nothing listens) and still no keys: 401, never a 5xx,
    // until a probe has fetched from the stopped host (and more after).
    let (_, failed) = jwks_counts(&t);
    let (_, n) = probe_until(
        "a fetch from the stopped host",
        || get(&t, &token("k1", &issuer_key)),
        |r| {
            refused("JWKS host down, no keys", r);
            jwks_counts(&t).1 > failed
        },
        |_| {},
    );
    refusals += n as u64 + 1;

    // --- The host comes up; once the cooldown allows, the first token with
    // its kid fetches at once and passes (the ones before are refused).
    let doc = json!({"keys": [jwk("k1", &issuer_key)]});
    let host = FaultServer::answering(credits_port, good_host(&doc));
    let (r, n) = probe_until("the first token with the kid", || get(&t, &token("k1", &issuer_key)), |r| r.status == 200, |r| refused("cooldown", r));
    refusals += n as u64;
    assert_eq!(r.json()["account"], USER);
    assert!(host.hits(JWKS_PATH) >= 1, "fetched for the unknown kid");

    // --- Every fault: a token naming an unknown kid makes the filter refetch
    // (once the cooldown allows); the fetch fails; the stranger is refused,
    // and a token signed with the known key still passes.
    let faults: Vec<(&str, Option<Fault>, &str)> = vec![
        ("stopped", None, "status 503"),
        // Far past the fetch timeout: only Envoy's timeout (504) ends it.
        ("slow past the timeout", Some(Fault::Slow(Duration::from_secs(90))), "status 504"),
        ("500", Some(Fault::ServerError), "status 500"),
        ("200 with garbage", Some(Fault::Garbage), "not JSON"),
        ("huge body", Some(Fault::Huge(300_000)), "document too large"),
        ("reset", Some(Fault::Reset), "status 503"),
    ];
    let mut host = Some(host);
    for (what, fault, reason) in &faults {
        match fault {
            None => {
                // Stopped: the listener closed, the port refusing.
                drop(host.take());
                wait_until_refused(credits_port);
            }
            Some(f) => host.get_or_insert_with(|| FaultServer::start(credits_port, *f)).set(*f),
        }
        let log_before = t.stack.log("envoy").len();
        let (_, failed) = jwks_counts(&t);
        let (_, n) = probe_until(
            what,
            || get(&t, &token("k-stranger", &stranger)),
            |r| {
                refused(what, r);
                jwks_counts(&t).1 > failed
            },
            |_| {},
        );
        refusals += n as u64 + 1;
        let log = t.stack.log("envoy");
        let new_lines = log.get(log_before..).unwrap_or_default();
        let line = format!("JWKS fetch failed ({reason}); keeping the last good keys");
        assert!(new_lines.contains(&line), "{what}: no {line:?} in\n{new_lines}");
        // The last good keys keep serving, with the host still broken.
        let r = get(&t, &token("k1", &issuer_key));
        assert_eq!(r.status, 200, "{what}: {}", r.body);
        assert_eq!(r.json()["account"], USER, "{what}");
    }

    // --- Back to health, with a rotated set: the next unknown kid fetches it
    // (once the cooldown allows; the probes before are refused).
    let new_key = SigningKey::from_slice(&[33u8; 32]).unwrap();
    let rotated = json!({"keys": [jwk("k1", &issuer_key), jwk("k2", &new_key)]});
    let host = host.unwrap_or_else(|| FaultServer::answering(credits_port, good_host(&rotated)));
    host.set_answer(good_host(&rotated));
    let hits = host.hits(JWKS_PATH);
    let (_, n) = probe_until("the first token with the new kid", || get(&t, &token("k2", &new_key)), |r| r.status == 200, |r| refused("cooldown", r));
    refusals += n as u64;
    assert_eq!(get(&t, &token("k1", &issuer_key)).status, 200);
    assert!(host.hits(JWKS_PATH) > hits, "fetched for the new kid");
    assert_eq!(t.get("/healthz", &[]).status, 200);
    assert!(t.stack.exited().is_none(), "a process died");

    // Envoy's stats: every refusal counted, every pass counted, and the
    // fetches: at least the 404 at start, the host down, the 6 faults failed;
    // at least 2 documents taken. (At least: the root context's own
    // scheduled retries may add some.)
    let envoy = EnvoyStats::read(t.stack.opts.ports.admin, "dialtone");
    let (stats, value) = (&envoy.0, |name: &str| envoy.value(name));
    assert_eq!(value("dialtone.denied.unauthorized"), refusals, "{stats}");
    assert_eq!(value("dialtone.denied.unauthorized.token_unknown_kid"), refusals, "{stats}");
    assert_eq!(value("dialtone.allowed.privy"), 1 + 6 + 2, "{stats}");
    assert!(value("dialtone.jwks.failed") >= 1 + 1 + 6, "{stats}");
    assert!(value("dialtone.jwks.fetched") >= 2, "{stats}");
    let seen = upstream.hits("/echo/free/jwks");
    assert_eq!(seen, 1 + 6 + 2, "only allowed requests reach the upstream");
}
