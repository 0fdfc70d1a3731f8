//! Holds, rate limits and the operator admin API over HTTP, with an injected
//! millisecond clock (on SQLite, and on PostgreSQL when configured).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{call, each_backend, get, post, TestBackend};
use dialtone_credits::api::{self, AdminAuth, ApiConfig};
use dialtone_credits::http::RunningServer;
use dialtone_credits::keys;
use serde_json::json;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

const T0: i64 = 1_700_000_000;
const ADMIN_KEY: &str = "test-admin-key-0123456789";

struct Fixture<'a> {
    db: &'a TestBackend,
    _server: RunningServer,
    base: String,
    clock_ms: Arc<AtomicI64>,
}

impl Fixture<'_> {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn advance_ms(&self, ms: i64) {
        self.clock_ms.fetch_add(ms, Ordering::SeqCst);
    }

    fn admin(&self, method: &str, path: &str, body: Option<&str>) -> common::Resp {
        let auth = format!("Bearer {ADMIN_KEY}");
        call(method, &self.url(path), &[("Authorization", &auth)], body)
    }
}

fn start(db: &TestBackend, admin: AdminAuth) -> Fixture<'_> {
    let clock_ms = Arc::new(AtomicI64::new(T0 * 1000));
    let c = Arc::clone(&clock_ms);
    let config = ApiConfig {
        clock_ms: Arc::new(move || c.load(Ordering::SeqCst)),
        admin,
        service: common::service_auth(),
    };
    let server = api::start_with_config("127.0.0.1:0", 4, &db.shared(), config).unwrap();
    let base = format!("http://{}", server.addr());
    Fixture {
        db,
        _server: server,
        base,
        clock_ms,
    }
}

fn with_admin(db: &TestBackend) -> Fixture<'_> {
    start(db, AdminAuth::from_key(Some(ADMIN_KEY)))
}

#[test]
fn holds_over_http() {
    each_backend(|b| {
        let f = with_admin(b);
        f.db.open().create_account("did:privy:x", 10, T0).unwrap();
        let body = json!({
            "account": "did:privy:x", "amount": 3, "idempotency_key": "sms_send:req-1",
            "ttl_seconds": 30, "route": "sms_send", "key_prefix": "abc12345"
        })
        .to_string();
        let r = post(&f.url("/v1/holds"), &body);
        assert_eq!(r.status, 200, "{:?}", r.json);
        let hold_id = r.json["hold_id"].as_str().unwrap().to_string();
        assert!(hold_id.starts_with("hold_") && hold_id.len() == 29);
        assert_eq!(
            r.json,
            json!({ "hold_id": hold_id, "account": "did:privy:x", "amount": 3, "balance": 7,
                    "expires_at": T0 + 30, "replayed": false })
        );
        let again = post(&f.url("/v1/holds"), &body);
        assert_eq!(again.status, 200);
        assert_eq!(again.json["replayed"], true);
        assert_eq!(again.json["hold_id"], hold_id.as_str());
        assert_eq!(again.json["balance"], 7);

        let conflict = json!({ "account": "did:privy:x", "amount": 4, "idempotency_key": "sms_send:req-1", "ttl_seconds": 30 });
        let r = post(&f.url("/v1/holds"), &conflict.to_string());
        assert_eq!((r.status, r.json.clone()), (409, json!({ "error": "idempotency_conflict" })));

        let big = json!({ "account": "did:privy:x", "amount": 8, "idempotency_key": "k2", "ttl_seconds": 30 });
        let r = post(&f.url("/v1/holds"), &big.to_string());
        assert_eq!(
            (r.status, r.json.clone()),
            (402, json!({ "error": "insufficient_credits", "balance": 7, "required": 8 }))
        );
        for bad in [
            json!({ "account": "did:privy:x", "amount": 1, "idempotency_key": "k", "ttl_seconds": 0 }),
            json!({ "account": "did:privy:x", "amount": 1, "idempotency_key": "k", "ttl_seconds": 3601 }),
            json!({ "account": "did:privy:x", "amount": 1, "idempotency_key": "k" }),
            json!({ "account": "did:privy:x", "amount": 0, "idempotency_key": "k", "ttl_seconds": 5 }),
        ] {
            let r = post(&f.url("/v1/holds"), &bad.to_string());
            assert_eq!(r.status, 400, "{bad}");
            assert_eq!(r.json["error"], "bad_request");
        }
        assert_eq!(get(&f.url("/v1/holds")).status, 405);

        // Capture: 200, idempotent; then release is 409.
        let cap = f.url(&format!("/v1/holds/{hold_id}/capture"));
        let r = post(&cap, "");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json,
            json!({ "hold_id": hold_id, "state": "captured", "account": "did:privy:x",
                    "amount": 3, "balance": 7, "held": 0 })
        );
        assert_eq!(post(&cap, "").json, r.json);
        let r = post(&f.url(&format!("/v1/holds/{hold_id}/release")), r#"{"reason":"upstream_error"}"#);
        assert_eq!((r.status, r.json.clone()), (409, json!({ "error": "hold_not_open", "state": "captured" })));
        let r = post(&f.url("/v1/holds/hold_ffffffffffffffffffffffff/capture"), "");
        assert_eq!((r.status, r.json.clone()), (404, json!({ "error": "hold_not_found" })));
        assert_eq!(get(&cap).status, 405);

        // Release with a reason, idempotent; capture afterwards is 409.
        let r = post(
            &f.url("/v1/holds"),
            &json!({ "account": "did:privy:x", "amount": 2, "idempotency_key": "k3", "ttl_seconds": 30 }).to_string(),
        );
        let id2 = r.json["hold_id"].as_str().unwrap().to_string();
        let rel = f.url(&format!("/v1/holds/{id2}/release"));
        let r = post(&rel, r#"{"reason":"upstream_error"}"#);
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json,
            json!({ "hold_id": id2, "state": "released", "account": "did:privy:x", "amount": 2,
                    "balance": 7, "held": 0, "reason": "upstream_error" })
        );
        assert_eq!(post(&rel, "").json, r.json);
        assert_eq!(post(&rel, r#"{"reason":"bogus"}"#).status, 400);
        let r = post(&f.url(&format!("/v1/holds/{id2}/capture")), "");
        assert_eq!((r.status, r.json.clone()), (409, json!({ "error": "hold_not_open", "state": "released" })));

        // Expiry by the server's clock: a capture after expires_at is 409.
        let r = post(
            &f.url("/v1/holds"),
            &json!({ "account": "did:privy:x", "amount": 1, "idempotency_key": "k4", "ttl_seconds": 5 }).to_string(),
        );
        let id3 = r.json["hold_id"].as_str().unwrap().to_string();
        assert_eq!(get(&f.url("/v1/accounts/did%3Aprivy%3Ax")).json["balance"], 6);
        f.advance_ms(5000);
        let r = post(&f.url(&format!("/v1/holds/{id3}/capture")), "");
        assert_eq!((r.status, r.json.clone()), (409, json!({ "error": "hold_not_open", "state": "released" })));
        assert_eq!(get(&f.url("/v1/accounts/did%3Aprivy%3Ax")).json["balance"], 7);
        let r = f.admin("GET", "/v1/admin/check", None);
        assert_eq!(r.json["ok"], true, "{:?}", r.json);
    });
}

#[test]
fn rate_limits_over_http_shared_by_all_keys_of_an_account() {
    each_backend(|b| {
        let f = with_admin(b);
        f.db.open().create_account("acct", 100, T0).unwrap();
        let rl = json!({ "requests": 1, "window_seconds": 2, "burst": 2 });
        let debit = |key: &str, prefix: &str| {
            post(
                &f.url("/v1/debit"),
                &json!({ "account": "acct", "amount": 1, "idempotency_key": key,
                         "route": "sms_send", "key_prefix": prefix, "rate_limit": rl })
                .to_string(),
            )
        };
        // Two different keys of the same account share one bucket.
        assert_eq!(debit("r1", "aaaaaaaa").status, 200);
        assert_eq!(debit("r2", "bbbbbbbb").status, 200);
        let r = call(
            "POST",
            &f.url("/v1/debit"),
            &[],
            Some(&json!({ "account": "acct", "amount": 1, "idempotency_key": "r3",
                          "key_prefix": "aaaaaaaa", "rate_limit": rl }).to_string()),
        );
        assert_eq!(r.status, 429);
        assert_eq!(r.json, json!({ "error": "rate_limited", "retry_after_seconds": 2 }));
        // Not charged.
        assert_eq!(get(&f.url("/v1/accounts/acct")).json["balance"], 98);
        // The hold endpoint shares the same bucket and the same 429 body.
        let hold = json!({ "account": "acct", "amount": 1, "idempotency_key": "h1", "ttl_seconds": 10, "rate_limit": rl });
        let r = post(&f.url("/v1/holds"), &hold.to_string());
        assert_eq!((r.status, r.json["error"].clone()), (429, json!("rate_limited")));
        // And the standalone endpoint.
        let check = json!({ "account": "acct", "rate_limit": rl }).to_string();
        let r = post(&f.url("/v1/ratelimit"), &check);
        assert_eq!(r.json, json!({ "error": "rate_limited", "retry_after_seconds": 2 }));
        f.advance_ms(1500);
        assert_eq!(post(&f.url("/v1/ratelimit"), &check).json["retry_after_seconds"], 1);
        f.advance_ms(500);
        let r = post(&f.url("/v1/ratelimit"), &check);
        assert_eq!((r.status, r.json.clone()), (200, json!({ "allowed": true, "remaining": 0 })));
        f.advance_ms(2000);
        assert_eq!(post(&f.url("/v1/holds"), &hold.to_string()).status, 200);
        // Without rate_limit: no rate check at all.
        let plain = json!({ "account": "acct", "amount": 1, "idempotency_key": "p1" }).to_string();
        assert_eq!(post(&f.url("/v1/debit"), &plain).status, 200);
        let bad = json!({ "account": "acct", "rate_limit": { "requests": 0, "window_seconds": 1, "burst": 1 } });
        assert_eq!(post(&f.url("/v1/ratelimit"), &bad.to_string()).status, 400);
    });
}

#[test]
fn admin_api_needs_the_admin_key() {
    let db = TestBackend::sqlite();
    for disabled in [AdminAuth::Disabled, AdminAuth::from_key(Some("short-key")), AdminAuth::from_key(None)] {
        let f = start(&db, disabled);
        let r = f.admin("GET", "/v1/admin/check", None);
        assert_eq!((r.status, r.json.clone()), (403, json!({ "error": "admin_disabled" })));
    }
    let f = with_admin(&db);
    for auth in [None, Some("Bearer wrong-key-0123456789"), Some("Basic abc"), Some("Bearer ")] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        let url = f.url("/v1/admin/check");
        let agent = common::agent();
        let mut req = agent.get(&url);
        for (n, v) in &headers {
            req = req.set(n, v);
        }
        let resp = match req.call() {
            Err(ureq::Error::Status(_, r)) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert_eq!(
            resp.header("www-authenticate"),
            Some("Bearer realm=\"dialtone-admin\"")
        );
        let body: serde_json::Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
        assert_eq!(body, json!({ "error": "unauthorized" }));
    }
    // Scheme is case-insensitive; the right key works.
    let r = call(
        "GET",
        &f.url("/v1/admin/check"),
        &[("Authorization", &format!("bearer {ADMIN_KEY}"))],
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json, json!({ "ok": true, "accounts": 0, "ledger_rows": 0, "problems": [] }));
    // Unknown admin paths are 404 only after authentication.
    assert_eq!(call("GET", &f.url("/v1/admin/nope"), &[], None).status, 401);
    assert_eq!(f.admin("GET", "/v1/admin/nope", None).status, 404);
}

#[test]
fn admin_keys_accounts_ledger_refund_and_check() {
    each_backend(|b| {
        let f = with_admin(b);
        // Quick: agent key.
        let r = f.admin("POST", "/v1/admin/keys", Some(r#"{"account":"did:privy:a","preset":"agent"}"#));
        assert_eq!(r.status, 201, "{:?}", r.json);
        let secret = r.json["secret"].as_str().unwrap().to_string();
        assert!(secret.starts_with("dial_live_"));
        assert_eq!(r.json["kind"], "api_key");
        assert_eq!(r.json["scopes"], json!(["sms:send"]));
        assert_eq!(r.json["name"], "agent key");
        assert_eq!(r.json["expires_at"], json!(null));
        let prefix = r.json["prefix"].as_str().unwrap().to_string();

        let r = f.admin(
            "POST",
            "/v1/admin/keys",
            Some(r#"{"account":"did:privy:a","kind":"api_token","scopes":["a:b"],"expires":"30d","name":"ci"}"#),
        );
        assert_eq!(r.status, 201);
        assert_eq!(r.json["expires_at"], T0 + 30 * 86_400);
        for bad in [
            r#"{"account":"did:privy:a","preset":"other"}"#,
            r#"{"account":"did:privy:a","kind":"api_key","expires":"30d"}"#,
            r#"{"account":"did:privy:a","scopes":["bad scope"]}"#,
            r#"{"account":"did:privy:a","surprise":1}"#,
        ] {
            assert_eq!(f.admin("POST", "/v1/admin/keys", Some(bad)).status, 400, "{bad}");
        }

        let r = f.admin("GET", "/v1/admin/keys?account=did%3Aprivy%3Aa", None);
        assert_eq!(r.status, 200);
        let listed = r.json["keys"].as_array().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0]["prefix"], prefix.as_str());
        assert_eq!(listed[0]["state"], "active");
        for k in listed {
            let text = k.to_string();
            assert!(!text.contains(&secret) && !text.contains(&keys::sha256_hex(&secret)));
            for field in ["prefix", "kind", "scopes", "state", "created_at", "last_used_at", "expires_at"] {
                assert!(k.get(field).is_some(), "{field}");
            }
        }
        assert_eq!(f.admin("GET", "/v1/admin/keys", None).status, 400);

        // Revocation is immediate: the very next lookup says revoked.
        let lookup = json!({ "key_sha256": keys::sha256_hex(&secret) }).to_string();
        assert_eq!(post(&f.url("/v1/keys/lookup"), &lookup).json["state"], "active");
        let r = f.admin("POST", &format!("/v1/admin/keys/{prefix}/revoke"), Some(""));
        assert_eq!(r.status, 200);
        assert_eq!(r.json["prefix"], prefix.as_str());
        assert_eq!(r.json["revoked_at"], T0);
        assert_eq!(post(&f.url("/v1/keys/lookup"), &lookup).json["state"], "revoked");
        let r = f.admin("POST", &format!("/v1/admin/keys/{prefix}/revoke"), Some(""));
        assert_eq!((r.status, r.json.clone()), (404, json!({ "error": "key_not_found" })));

        // Top-up, idempotent.
        let topup = f.url("/v1/admin/accounts/did%3Aprivy%3Aa/topup");
        let auth = format!("Bearer {ADMIN_KEY}");
        let h = [("Authorization", auth.as_str())];
        let r = call("POST", &topup, &h, Some(r#"{"amount":50,"idempotency_key":"inv-1","note":"invoice 1"}"#));
        assert_eq!(
            (r.status, r.json.clone()),
            (200, json!({ "account": "did:privy:a", "credited": 50, "balance": 50, "replayed": false }))
        );
        let r = call("POST", &topup, &h, Some(r#"{"amount":50,"idempotency_key":"inv-1"}"#));
        assert_eq!(r.json, json!({ "account": "did:privy:a", "credited": 0, "balance": 50, "replayed": true }));
        let r = call("POST", &topup, &h, Some(r#"{"amount":51,"idempotency_key":"inv-1"}"#));
        assert_eq!((r.status, r.json.clone()), (409, json!({ "error": "idempotency_conflict" })));
        assert_eq!(call("POST", &topup, &h, Some(r#"{"amount":0}"#)).status, 400);

        // Spend via a debit and a captured hold, then look at the account.
        post(&f.url("/v1/debit"), r#"{"account":"did:privy:a","amount":5,"idempotency_key":"d-1"}"#);
        let r = post(
            &f.url("/v1/holds"),
            r#"{"account":"did:privy:a","amount":7,"idempotency_key":"h-1","ttl_seconds":60}"#,
        );
        let hold_id = r.json["hold_id"].as_str().unwrap().to_string();
        let r = f.admin("GET", "/v1/admin/accounts/did%3Aprivy%3Aa", None);
        assert_eq!(r.json, json!({ "account": "did:privy:a", "balance": 38, "held": 7, "total": 45, "open_leases": [] }));
        post(&f.url(&format!("/v1/holds/{hold_id}/capture")), "");
        assert_eq!(f.admin("GET", "/v1/admin/accounts/nobody", None).status, 404);

        // Refunds: once each.
        let r = f.admin("POST", "/v1/admin/refund", Some(r#"{"idempotency_key":"h-1"}"#));
        assert_eq!(
            (r.status, r.json.clone()),
            (200, json!({ "refunded": 7, "account": "did:privy:a", "balance": 45,
                          "idempotency_key": "h-1", "hold_id": hold_id }))
        );
        let r = f.admin("POST", "/v1/admin/refund", Some(r#"{"idempotency_key":"h-1"}"#));
        assert_eq!((r.status, r.json.clone()), (409, json!({ "error": "already_refunded" })));
        let r = f.admin("POST", "/v1/admin/refund", Some(r#"{"idempotency_key":"d-1","note":"sorry"}"#));
        assert_eq!(r.json["balance"], 50);
        let r = f.admin("POST", "/v1/admin/refund", Some(r#"{"idempotency_key":"nope"}"#));
        assert_eq!((r.status, r.json.clone()), (404, json!({ "error": "nothing_to_refund" })));

        // The ledger, newest first.
        let r = f.admin("GET", "/v1/admin/accounts/did%3Aprivy%3Aa/ledger?limit=3", None);
        assert_eq!(r.status, 200);
        let entries = r.json["entries"].as_array().unwrap();
        let kinds: Vec<&str> = entries.iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["refund", "refund", "capture"]);
        assert_eq!(entries[0]["note"], "sorry");
        assert_eq!(entries[0]["delta_available"], 5);
        let all = f.admin("GET", "/v1/admin/accounts/did%3Aprivy%3Aa/ledger", None);
        assert_eq!(all.json["entries"].as_array().unwrap().len(), 6);
        assert_eq!(f.admin("GET", "/v1/admin/accounts/did%3Aprivy%3Aa/ledger?limit=0", None).status, 400);
        assert_eq!(f.admin("GET", "/v1/admin/accounts/ghost/ledger", None).status, 404);

        let r = f.admin("GET", "/v1/admin/check", None);
        assert_eq!(r.json, json!({ "ok": true, "accounts": 1, "ledger_rows": 6, "problems": [] }));
        assert_eq!(f.admin("POST", "/v1/admin/check", Some("")).status, 405);
    });
}

#[test]
fn admin_token_limit_is_409_over_http() {
    each_backend(|b| {
        let f = with_admin(b);
        let body = r#"{"account":"did:privy:many","kind":"api_token","expires":"never"}"#;
        for _ in 0..25 {
            assert_eq!(f.admin("POST", "/v1/admin/keys", Some(body)).status, 201);
        }
        let r = f.admin("POST", "/v1/admin/keys", Some(body));
        assert_eq!((r.status, r.json.clone()), (409, json!({ "error": "token_limit", "limit": 25 })));
        // API keys are not counted.
        let r = f.admin("POST", "/v1/admin/keys", Some(r#"{"account":"did:privy:many"}"#));
        assert_eq!(r.status, 201);
    });
}
