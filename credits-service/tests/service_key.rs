//! Callout authentication: every `/v1/*` call except the operator API needs
//! `x-dialtone-service-key`; two secrets are accepted at once (rotation); a
//! refused call is 401 and touches nothing. On SQLite, and on PostgreSQL
//! when configured.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{each_backend, ledger_fingerprint, RawConn, SERVICE_KEY};
use dialtone_credits::api::{self, AdminAuth, ApiConfig, ServiceAuth};
use dialtone_credits::keys;
use serde_json::json;
use std::sync::Arc;

const T0: i64 = 1_700_000_000;
const PREVIOUS_KEY: &str = "previous-service-key-0123456789abcdef";
const ADMIN_KEY: &str = "test-admin-key-0123456789";

#[test]
fn calls_without_the_service_key_are_401_and_touch_nothing() {
    each_backend(|b| {
        let mut store = b.open();
        store.create_account("acct", 10, T0).unwrap();
        let key = store
            .create_key(
                &dialtone_credits::store::NewKey {
                    account: "acct".into(),
                    kind: keys::KeyKind::ApiKey,
                    scopes: vec![],
                    name: None,
                    expiry: keys::Expiry::Never,
                },
                T0,
            )
            .unwrap();
        let held = store
            .create_hold(
                &dialtone_credits::store::HoldRequest {
                    account: "acct".into(),
                    amount: 2,
                    idempotency_key: "existing".into(),
                    ttl_seconds: 60,
                    route: None,
                    key_prefix: None,
                },
                None,
                T0 * 1000,
            )
            .unwrap();
        let dialtone_credits::store::HoldOutcome::Held(existing) = held else {
            panic!()
        };
        let config = ApiConfig {
            service: ServiceAuth::from_keys(&[SERVICE_KEY, PREVIOUS_KEY]).unwrap(),
            admin: AdminAuth::from_key(Some(ADMIN_KEY)),
            ..ApiConfig::with_clock(Arc::new(|| T0))
        };
        let server = api::start_with_config("127.0.0.1:0", 2, &b.shared(), config).unwrap();
        let before = ledger_fingerprint(&mut store);
        let lookup = json!({ "key_sha256": keys::sha256_hex(&key.secret) }).to_string();
        let hold = json!({ "account": "acct", "amount": 1, "idempotency_key": "h-401", "ttl_seconds": 60 }).to_string();
        let debit =
            json!({ "account": "acct", "amount": 1, "idempotency_key": "d-401" }).to_string();
        let rate =
            json!({ "account": "acct", "rate_limit": { "requests": 1, "window_seconds": 3600 } })
                .to_string();
        let calls = [
            ("POST", "/v1/holds".to_string(), hold.as_str()),
            ("POST", "/v1/debit".to_string(), debit.as_str()),
            ("POST", "/v1/keys/lookup".to_string(), lookup.as_str()),
            ("POST", "/v1/ratelimit".to_string(), rate.as_str()),
            (
                "POST",
                format!("/v1/holds/{}/capture", existing.hold_id),
                "",
            ),
            (
                "POST",
                format!("/v1/holds/{}/release", existing.hold_id),
                "",
            ),
            ("GET", "/v1/accounts/acct".to_string(), ""),
            ("GET", "/v1/nope".to_string(), ""),
        ];
        let mut conn = RawConn::connect(server.addr());
        for presented in [
            None,
            Some(""),
            Some("wrong-service-key-0123456789abcdef0123"),
            Some(&SERVICE_KEY[1..]),
        ] {
            for (method, path, body) in &calls {
                let r = conn.request(method, path, presented, body);
                assert_eq!(r.status, 401, "{method} {path} with {presented:?}");
                assert_eq!(
                    r.json(),
                    json!({ "success": false, "error": "unauthorized" })
                );
                assert!(r.header("www-authenticate").is_some());
            }
        }
        // Nothing moved: no hold, no debit, no ledger row, no rate bucket,
        // no last-used mark, the existing hold still open.
        assert_eq!(before, ledger_fingerprint(&mut store));
        assert!(store.debit_record("d-401").unwrap().is_none());
        assert_eq!(
            store.hold_state(&existing.hold_id).unwrap().map(|s| s.0),
            Some(dialtone_credits::store::HoldState::Open)
        );
        assert_eq!(store.list_keys("acct", T0).unwrap()[0].last_used_at, None);
        assert_eq!(
            store
                .account_summary("acct", T0)
                .unwrap()
                .map(|s| (s.balance, s.held)),
            Some((8, 2))
        );

        // Either accepted key works; the refused hold's key was never used.
        let r = conn.request("POST", "/v1/holds", Some(SERVICE_KEY), &hold);
        assert_eq!(
            (r.status, r.json()["replayed"].clone()),
            (200, json!(false))
        );
        let r = conn.request("POST", "/v1/ratelimit", Some(PREVIOUS_KEY), &rate);
        assert_eq!(r.json(), json!({ "allowed": true, "remaining": 0 }));
        // No service key needed: health, readiness, metrics, and the admin
        // API (which has its own key).
        for path in ["/healthz", "/readyz", "/metrics"] {
            assert_eq!(conn.request("GET", path, None, "").status, 200, "{path}");
        }
        let admin = common::agent()
            .get(&format!("http://{}/v1/admin/check", server.addr()))
            .set("Authorization", &format!("Bearer {ADMIN_KEY}"))
            .call()
            .unwrap();
        assert_eq!(admin.status(), 200);
    });
}

#[test]
fn without_any_configured_key_every_v1_call_is_refused() {
    let db = common::TempDb::new();
    let config = ApiConfig {
        service: ServiceAuth::none(),
        ..ApiConfig::with_clock(Arc::new(|| T0))
    };
    let server = api::start_with_config("127.0.0.1:0", 2, &db.shared(), config).unwrap();
    let mut conn = RawConn::connect(server.addr());
    let r = conn.request("POST", "/v1/debit", Some(SERVICE_KEY), "{}");
    assert_eq!(r.status, 401);
    assert_eq!(conn.request("GET", "/healthz", None, "").status, 200);
}
