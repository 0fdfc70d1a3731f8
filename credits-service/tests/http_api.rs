//! The credits HTTP API, served in-process on a free port and called with ureq.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{call, get, post, TempDb};
use dialtone_credits::api::{self, ApiConfig};
use dialtone_credits::http::RunningServer;
use dialtone_credits::keys::{self, Expiry, KeyKind, DAY_SECS};
use dialtone_credits::store::NewKey;
use serde_json::json;
use std::io::{Read, Write};
use std::sync::Arc;

const T0: i64 = 1_700_000_000;

struct Fixture {
    db: TempDb,
    server: RunningServer,
    base: String,
}

/// Start the API with a fixed clock (T0) on a free port.
fn start() -> Fixture {
    start_at(T0)
}

fn start_at(now: i64) -> Fixture {
    let db = TempDb::new();
    let config = ApiConfig {
        service: common::service_auth(),
        ..ApiConfig::with_clock(Arc::new(move || now))
    };
    let server = api::start_with_config("127.0.0.1:0", 4, &db.shared(), config).unwrap();
    let base = format!("http://{}", server.addr());
    Fixture { db, server, base }
}

fn key(account: &str, kind: KeyKind, expiry: Expiry, scopes: &[&str]) -> NewKey {
    NewKey {
        account: account.into(),
        kind,
        scopes: scopes.iter().map(|s| (*s).to_string()).collect(),
        name: None,
        expiry,
    }
}

#[test]
fn healthz() {
    let f = start();
    let r = get(&format!("{}/healthz", f.base));
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, "application/json");
    assert_eq!(r.json, json!({ "ok": true }));
    assert_eq!(
        call("POST", &format!("{}/healthz", f.base), &[], Some("{}")).status,
        405
    );
    f.server.shutdown();
}

#[test]
fn lookup_active_key_returns_documented_shape() {
    let f = start();
    let mut store = f.db.open();
    store.create_account("did:privy:cm123", 100, T0).unwrap();
    let k = store
        .create_key(
            &key(
                "did:privy:cm123",
                KeyKind::ApiKey,
                Expiry::Never,
                &["sms:send"],
            ),
            T0 - 10,
        )
        .unwrap();

    let body = json!({ "key_sha256": keys::sha256_hex(&k.secret) }).to_string();
    let r = post(&format!("{}/v1/keys/lookup", f.base), &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, "application/json");
    assert_eq!(
        r.json,
        json!({
            "account": "did:privy:cm123",
            "key_prefix": k.prefix,
            "kind": "api_key",
            "scopes": ["sms:send"],
            "state": "active",
            "expires_at": null,
            "balance": 100
        })
    );
    // The lookup marked the key as used at the server's clock. The service
    // records that after answering (a lookup never waits for the writer), so
    // wait for it, within a bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let listed = store.list_keys("did:privy:cm123", T0).unwrap();
        if listed[0].last_used_at == Some(T0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "last_used_at never recorded: {listed:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn lookup_reports_revoked_and_expired_states() {
    // Server clock is 31 days after the token was minted.
    let f = start_at(T0 + 31 * DAY_SECS);
    let mut store = f.db.open();
    let token = store
        .create_key(&key("acct", KeyKind::ApiToken, Expiry::Days(30), &[]), T0)
        .unwrap();
    let revoked = store
        .create_key(&key("acct", KeyKind::ApiKey, Expiry::Never, &[]), T0)
        .unwrap();
    store.revoke_by_prefix(&revoked.prefix, T0 + 1).unwrap();

    let url = format!("{}/v1/keys/lookup", f.base);
    let r = post(
        &url,
        &json!({ "key_sha256": keys::sha256_hex(&token.secret) }).to_string(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json["state"], "expired");
    assert_eq!(r.json["kind"], "api_token");
    assert_eq!(r.json["expires_at"], T0 + 30 * DAY_SECS);
    assert_eq!(r.json["balance"], 0);

    let r = post(
        &url,
        &json!({ "key_sha256": keys::sha256_hex(&revoked.secret) }).to_string(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json["state"], "revoked");
}

#[test]
fn lookup_errors() {
    let f = start();
    let url = format!("{}/v1/keys/lookup", f.base);

    let r = post(
        &url,
        &json!({ "key_sha256": keys::sha256_hex("unknown") }).to_string(),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json, json!({ "error": "key_not_found" }));

    for bad in [
        json!({ "key_sha256": keys::sha256_hex("x").to_uppercase() }).to_string(),
        json!({ "key_sha256": "abc" }).to_string(),
        json!({ "key_sha256": 5 }).to_string(),
        json!({}).to_string(),
        "not json".to_string(),
        String::new(),
    ] {
        let r = post(&url, &bad);
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json["error"], "bad_request", "{bad}");
        assert!(
            r.json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{bad}"
        );
    }
    assert_eq!(get(&url).status, 405);
    assert_eq!(get(&url).json, json!({ "error": "method_not_allowed" }));
}

#[test]
fn debit_charges_replays_and_conflicts() {
    let f = start();
    f.db.open().create_account("did:privy:x", 100, T0).unwrap();
    let url = format!("{}/v1/debit", f.base);
    let body = json!({
        "account": "did:privy:x", "amount": 1, "idempotency_key": "req-1",
        "route": "sms_send", "key_prefix": "abc12345"
    })
    .to_string();

    let r = post(&url, &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, "application/json");
    assert_eq!(
        r.json,
        json!({ "account": "did:privy:x", "charged": 1, "balance": 99, "replayed": false })
    );

    let r = post(&url, &body);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json,
        json!({ "account": "did:privy:x", "charged": 1, "balance": 99, "replayed": true })
    );
    assert_eq!(f.db.open().balance("did:privy:x").unwrap(), Some(99));

    // route/key_prefix are optional and nullable.
    let r = post(
        &url,
        &json!({ "account": "did:privy:x", "amount": 2, "idempotency_key": "req-2", "route": null }).to_string(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json["balance"], 97);

    let r = post(
        &url,
        &json!({ "account": "did:privy:x", "amount": 5, "idempotency_key": "req-1" }).to_string(),
    );
    assert_eq!(r.status, 409);
    assert_eq!(r.json, json!({ "error": "idempotency_conflict" }));
    assert_eq!(f.db.open().balance("did:privy:x").unwrap(), Some(97));
}

#[test]
fn debit_insufficient_credits_is_402_and_records_nothing() {
    let f = start();
    let url = format!("{}/v1/debit", f.base);
    let body = json!({ "account": "did:privy:nobody", "amount": 1, "idempotency_key": "k-402" })
        .to_string();
    let r = post(&url, &body);
    assert_eq!(r.status, 402);
    assert_eq!(
        r.json,
        json!({ "error": "insufficient_credits", "balance": 0, "required": 1 })
    );
    assert!(f.db.open().debit_record("k-402").unwrap().is_none());

    // Top up, and the retry with the same key succeeds.
    f.db.open()
        .topup("did:privy:nobody", 3, None, None, T0)
        .unwrap();
    let r = post(&url, &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.json["balance"], 2);
    assert_eq!(r.json["replayed"], false);
}

#[test]
fn debit_rejects_bad_input() {
    let f = start();
    f.db.open().create_account("a", 10, T0).unwrap();
    let url = format!("{}/v1/debit", f.base);
    for bad in [
        json!({ "account": "a", "amount": 0, "idempotency_key": "k" }),
        json!({ "account": "a", "amount": -3, "idempotency_key": "k" }),
        json!({ "account": "a", "amount": 1.5, "idempotency_key": "k" }),
        json!({ "account": "a", "amount": "1", "idempotency_key": "k" }),
        json!({ "account": "a", "amount": 1, "idempotency_key": "" }),
        json!({ "account": "a", "amount": 1, "idempotency_key": "x".repeat(201) }),
        json!({ "account": "a", "amount": 1 }),
        json!({ "account": "", "amount": 1, "idempotency_key": "k" }),
        json!({ "amount": 1, "idempotency_key": "k" }),
        json!([1, 2]),
    ] {
        let r = post(&url, &bad.to_string());
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json["error"], "bad_request", "{bad}");
    }
    let ok = json!({ "account": "a", "amount": 1, "idempotency_key": "x".repeat(200) });
    assert_eq!(post(&url, &ok.to_string()).status, 200);
    assert_eq!(get(&url).status, 405);
}

#[test]
fn account_endpoint_decodes_path() {
    let f = start();
    f.db.open().create_account("did:privy:cm 1", 7, T0).unwrap();
    let r = get(&format!("{}/v1/accounts/did%3Aprivy%3Acm%201", f.base));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json,
        json!({ "account": "did:privy:cm 1", "balance": 7, "total_credits": 7 })
    );

    let r = get(&format!("{}/v1/accounts/did%3Aprivy%3Aunknown", f.base));
    assert_eq!(r.status, 404);
    assert_eq!(r.json, json!({ "error": "account_not_found" }));

    let r = get(&format!("{}/v1/accounts/bad%zzescape", f.base));
    assert_eq!(r.status, 400);
    assert_eq!(r.json["error"], "bad_request");

    let r = call("DELETE", &format!("{}/v1/accounts/x", f.base), &[], None);
    assert_eq!(r.status, 405);
}

#[test]
fn unknown_paths_are_404() {
    let f = start();
    for path in [
        "/",
        "/nope",
        "/v1/accounts/",
        "/v1/accounts/a/b",
        "/v1/debit/extra",
    ] {
        let r = get(&format!("{}{path}", f.base));
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.json, json!({ "error": "not_found" }), "{path}");
        assert_eq!(r.content_type, "application/json");
    }
}

/// Send `request` on a connection of its own and read the answer to the
/// end. The server answers 413 as soon as a body passes the cap (at once
/// for a declared Content-Length over it) and closes without reading the
/// rest: the end of our write may meet a closed socket (broken pipe), and
/// the close may be a reset. Neither is a failure; the 413 it sent before
/// is what must arrive. (An HTTP client that treats a failed write as the
/// request's failure, as ureq does, loses that race now and then.)
fn send_oversized(addr: std::net::SocketAddr, request: &str) -> String {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    let _ = conn.write_all(request.as_bytes());
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = conn.read(&mut buf) {
        raw.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn oversized_bodies_are_413_and_the_server_keeps_serving() {
    let f = start();
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(70 * 1024));
    let request = format!(
        "POST /v1/debit HTTP/1.1\r\nHost: x\r\n{}: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{huge}",
        common::SERVICE_KEY_HEADER,
        common::SERVICE_KEY,
        huge.len()
    );
    let raw = send_oversized(f.server.addr(), &request);
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    let body: serde_json::Value = serde_json::from_str(raw.split("\r\n\r\n").nth(1).unwrap_or_default()).unwrap();
    assert_eq!(body["error"], "payload_too_large");

    // A chunked body (no Content-Length) over the cap is refused as well.
    let chunk = "y".repeat(70 * 1024);
    let request = format!(
        "POST /v1/debit HTTP/1.1\r\nHost: x\r\n{}: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        common::SERVICE_KEY_HEADER,
        common::SERVICE_KEY,
        chunk.len()
    );
    let raw = send_oversized(f.server.addr(), &request);
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");

    assert_eq!(get(&format!("{}/healthz", f.base)).status, 200);
}

#[test]
fn concurrent_http_debits_never_overdraw() {
    let f = start();
    f.db.open().create_account("busy", 20, T0).unwrap();
    let url = format!("{}/v1/debit", f.base);
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let url = url.clone();
            std::thread::spawn(move || {
                (0..10)
                    .filter(|i| {
                        let body = json!({ "account": "busy", "amount": 1, "idempotency_key": format!("h{t}-{i}") });
                        post(&url, &body.to_string()).status == 200
                    })
                    .count()
            })
        })
        .collect();
    let ok: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(ok, 20);
    assert_eq!(f.db.open().balance("busy").unwrap(), Some(0));
}

#[test]
fn absurd_content_length_does_not_crash_the_server() {
    // tiny_http would try to allocate the declared size when draining the
    // unread body; the server must answer 413 and stay up.
    let f = start();
    for _ in 0..2 {
        let mut conn = std::net::TcpStream::connect(f.server.addr()).unwrap();
        write!(
            conn,
            "POST /v1/debit HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000000\r\n\r\n{{}}"
        )
        .unwrap();
        let mut head = [0u8; 12];
        conn.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 413");
    }
    let r = get(&format!("{}/healthz", f.base));
    assert_eq!(r.status, 200);
}

#[test]
fn an_x402_payment_is_claimed_by_one_request_at_a_time() {
    let claim = "0def2fc2e3aefc9a7dd7959679c887ff5176f4e741c0a848a5aeb1886000f99b";
    let body = |owner: &str, ttl: i64| json!({"claim": claim, "owner": owner, "ttl_seconds": ttl, "route": "sms_send"}).to_string();
    let f = start();
    let url = format!("{}/v1/x402/claims", f.base);
    let r = post(&url, &body("sms_send:req-1", 60));
    assert_eq!((r.status, r.json.clone()), (201, json!({"claim": claim, "claimed": true, "replayed": false})));
    // The same request again (a retried callout): still its claim.
    let r = post(&url, &body("sms_send:req-1", 60));
    assert_eq!((r.status, r.json["claimed"].clone(), r.json["replayed"].clone()), (200, json!(true), json!(true)));
    // A copy of the payment on another request: in use.
    let r = post(&url, &body("sms_send:req-2", 60));
    assert_eq!((r.status, r.json.clone()), (409, json!({"claim": claim, "error": "claim_in_use"})));
    // Given back (the upstream failed): the next request may take it.
    let r = post(&format!("{url}/{claim}/release"), "{}");
    assert_eq!((r.status, r.json.clone()), (200, json!({"claim": claim, "released": true})));
    assert_eq!(post(&format!("{url}/{claim}/release"), "{}").status, 404);
    assert_eq!(post(&url, &body("sms_send:req-2", 60)).status, 201);
    // Bad input: 400, nothing claimed.
    for bad in [
        json!({"claim": "XYZ", "owner": "o", "ttl_seconds": 60, "route": "r"}),
        json!({"claim": claim, "owner": "", "ttl_seconds": 60, "route": "r"}),
        json!({"claim": claim, "owner": "o", "ttl_seconds": 0, "route": "r"}),
        json!({"claim": claim, "owner": "o", "ttl_seconds": 60}),
    ] {
        assert_eq!(post(&url, &bad.to_string()).status, 400, "{bad}");
    }
    // A lapsed claim is taken over: the same database, a clock 61 s on.
    let config = ApiConfig { service: common::service_auth(), ..ApiConfig::with_clock(Arc::new(|| T0 + 61)) };
    let later = api::start_with_config("127.0.0.1:0", 2, &f.db.shared(), config).unwrap();
    let later_url = format!("http://{}/v1/x402/claims", later.addr());
    assert_eq!(post(&later_url, &body("sms_send:req-3", 60)).status, 201, "req-2's claim lapsed at T0 + 60");
    assert_eq!(post(&url, &body("sms_send:req-4", 60)).status, 409, "and req-3 holds it now");
}
