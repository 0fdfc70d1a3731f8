//! Credit leases over HTTP (on SQLite, and on PostgreSQL when configured):
//! grant only with room to spare, one ledger row per reported spend, a
//! retried report records nothing twice, a lease never pays out more than
//! it holds, recall when a per-request charge is refused, expiry gives the
//! rest back and refuses late spends, and `check` proves it all.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{each_backend, post, TestBackend};
use dialtone_credits::api::{self, AdminAuth, ApiConfig};
use dialtone_credits::http::RunningServer;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

const T0: i64 = 1_700_000_000;
const ACCOUNT: &str = "did:privy:leases";

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
    fn now(&self) -> i64 {
        self.clock_ms.load(Ordering::SeqCst) / 1000
    }
    fn advance(&self, secs: i64) {
        self.clock_ms.fetch_add(secs * 1000, Ordering::SeqCst);
    }
    fn lease(&self, credits: i64, factor: i64, key: &str) -> (u16, Value) {
        let body = json!({
            "account": ACCOUNT, "credits": credits, "ttl_seconds": 30,
            "min_balance_factor": factor, "idempotency_key": key, "holder": "envoy-a/vm-1"
        });
        let r = post(&self.url("/v1/leases"), &body.to_string());
        (r.status, r.json)
    }
    fn report(&self, lease: &str, spends: &[(&str, i64)], final_report: bool) -> (u16, Value) {
        let spends: Vec<Value> = spends
            .iter()
            .map(|(k, a)| json!({ "idempotency_key": k, "amount": a, "route": "sms_send", "key_prefix": "abcd1234" }))
            .collect();
        let body = json!({ "spends": spends, "final": final_report });
        let r = post(&self.url(&format!("/v1/leases/{lease}/report")), &body.to_string());
        (r.status, r.json)
    }
    /// (available, held), read from the database.
    fn balance(&self) -> (i64, i64) {
        let s = self.db.open().account_summary(ACCOUNT, self.now()).unwrap().unwrap();
        (s.balance, s.held)
    }
}

fn start(db: &TestBackend) -> Fixture<'_> {
    let clock_ms = Arc::new(AtomicI64::new(T0 * 1000));
    let c = Arc::clone(&clock_ms);
    let config = ApiConfig {
        clock_ms: Arc::new(move || c.load(Ordering::SeqCst)),
        admin: AdminAuth::from_key(None),
        service: common::service_auth(),
    };
    let server = api::start_with_config("127.0.0.1:0", 2, &db.shared(), config).unwrap();
    let base = format!("http://{}", server.addr());
    Fixture { db, _server: server, base, clock_ms }
}

fn assert_checks(db: &TestBackend) {
    let report = db.open().check().unwrap();
    assert!(report.is_ok(), "check: {:?}", report.problems);
}

#[test]
fn a_lease_is_granted_only_with_room_to_spare_and_each_spend_is_one_ledger_row() {
    each_backend(|b| {
        b.open().create_account(ACCOUNT, 100, T0).unwrap();
        let f = start(b);
        // 100 available, 30 × 4 = 120 needed: declined, nothing moves.
        let (status, body) = f.lease(30, 4, "lease-req-1");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["granted"], json!(false), "{body}");
        assert_eq!(body["needed"], json!(120));
        assert_eq!(f.balance(), (100, 0));
        // 20 × 4 = 80 <= 100: granted; 20 move from available to held.
        let (status, body) = f.lease(20, 4, "lease-req-2");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["granted"], json!(true), "{body}");
        assert_eq!(body["balance"], json!(80));
        assert_eq!(body["expires_at"], json!(T0 + 30));
        let lease = body["lease_id"].as_str().unwrap().to_string();
        assert!(lease.starts_with("lease_"));
        assert_eq!(f.balance(), (80, 20));
        // The same request again (a retried callout) is the same lease.
        let (_, again) = f.lease(20, 4, "lease-req-2");
        assert_eq!(again["lease_id"], json!(lease));
        assert_eq!(again["replayed"], json!(true));
        assert_eq!(f.balance(), (80, 20));
        // The same key for another size is a conflict.
        assert_eq!(f.lease(21, 4, "lease-req-2").0, 409);

        // Three spends: three ledger rows, balance unchanged (they were held).
        let (status, r) = f.report(&lease, &[("sms_send:r1", 3), ("sms_send:r2", 3), ("sms_send:r3", 3)], false);
        assert_eq!(status, 200, "{r}");
        assert_eq!((r["recorded"].as_i64(), r["spent"].as_i64(), r["remaining"].as_i64()), (Some(3), Some(9), Some(11)));
        assert_eq!(r["state"], json!("open"));
        assert_eq!(f.balance(), (80, 11));
        // The same report retried twice records nothing twice.
        for _ in 0..2 {
            let (_, r) = f.report(&lease, &[("sms_send:r1", 3), ("sms_send:r2", 3), ("sms_send:r3", 3)], false);
            assert_eq!((r["recorded"].as_i64(), r["replayed"].as_i64(), r["spent"].as_i64()), (Some(0), Some(3), Some(9)));
        }
        // A spend past the lease is refused, never charged.
        let (_, r) = f.report(&lease, &[("sms_send:r4", 10), ("sms_send:r5", 5)], false);
        assert_eq!(r["recorded"], json!(1), "{r}");
        assert_eq!(r["refused"][0]["reason"], json!("over_lease"));
        assert_eq!(r["spent"], json!(19));
        // Final: one more spend, then the rest (0 here) comes back and it closes.
        let (_, r) = f.report(&lease, &[("sms_send:r6", 1)], true);
        assert_eq!((r["state"].as_str(), r["spent"].as_i64(), r["returned"].as_i64()), (Some("closed"), Some(20), Some(0)));
        assert_eq!(f.balance(), (80, 0));
        // After closing, a late spend is refused and changes nothing.
        let (_, r) = f.report(&lease, &[("sms_send:r7", 1)], false);
        assert_eq!(r["refused"][0]["reason"], json!("lease_closed"), "{r}");
        assert_eq!(f.balance(), (80, 0));

        let store = b.open();
        let rows = store.ledger(ACCOUNT, 100).unwrap();
        let spends: Vec<_> = rows.iter().filter(|e| e.kind == "lease_spend").collect();
        assert_eq!(spends.len(), 5, "one ledger row per charged request");
        assert!(spends.iter().all(|e| e.route.as_deref() == Some("sms_send") && e.key_prefix.as_deref() == Some("abcd1234")));
        assert_eq!(rows.iter().filter(|e| e.kind == "lease").count(), 1);
        assert_checks(b);
        // A spend key reported under another lease is a conflict, not a charge.
        let (_, body) = f.lease(10, 2, "lease-req-3");
        let other = body["lease_id"].as_str().unwrap().to_string();
        let (_, r) = f.report(&other, &[("sms_send:r1", 3)], true);
        assert_eq!(r["refused"][0]["reason"], json!("idempotency_conflict"), "{r}");
        assert_eq!(r["returned"], json!(10));
        assert_eq!(f.balance(), (80, 0));
        assert_checks(b);
    });
}

#[test]
fn a_refused_charge_recalls_leases_and_expiry_gives_the_rest_back() {
    each_backend(|b| {
        b.open().create_account(ACCOUNT, 40, T0).unwrap();
        let f = start(b);
        let (_, body) = f.lease(10, 2, "lease-a");
        let lease = body["lease_id"].as_str().unwrap().to_string();
        let (_, body) = f.lease(10, 2, "lease-b");
        assert_eq!(body["granted"], json!(true), "{body}");
        let second = body["lease_id"].as_str().unwrap().to_string();
        // 20 available: a third lease of 10 needs 20 × 1... with factor 2 it needs 20: granted would leave 10.
        let (_, body) = f.lease(10, 3, "lease-c");
        assert_eq!(body["granted"], json!(false), "{body}");
        assert_eq!(f.balance(), (20, 20));
        // Per-request debits take the 20 available; the 21st is refused, which
        // recalls the open leases.
        for i in 0..20 {
            let body = json!({ "account": ACCOUNT, "amount": 1, "idempotency_key": format!("sms_send:d{i}") });
            assert_eq!(post(&f.url("/v1/debit"), &body.to_string()).status, 200);
        }
        let body = json!({ "account": ACCOUNT, "amount": 1, "idempotency_key": "sms_send:d-last" });
        assert_eq!(post(&f.url("/v1/debit"), &body.to_string()).status, 402);
        let (_, r) = f.report(&lease, &[("sms_send:l1", 2)], false);
        assert_eq!(r["recall"], json!(true), "{r}");
        // While a recall is under way no lease is granted, however large the factor room.
        let (_, body) = f.lease(1, 1, "lease-d");
        assert_eq!((body["granted"].as_bool(), body["recalling"].as_bool()), (Some(false), Some(true)), "{body}");
        // The holder gives the rest back.
        let (_, r) = f.report(&lease, &[], true);
        assert_eq!((r["state"].as_str(), r["returned"].as_i64()), (Some("closed"), Some(8)));
        assert_eq!(f.balance(), (8, 10));
        // The other lease's holder died: past its expiry the sweep closes it
        // and gives everything back; its late spends are refused.
        f.advance(31);
        let released = b.open().expire_holds(f.now()).unwrap();
        assert_eq!(released, 1);
        assert_eq!(f.balance(), (18, 0));
        let (_, r) = f.report(&second, &[("sms_send:late", 1)], false);
        assert_eq!(r["refused"][0]["reason"], json!("lease_closed"), "{r}");
        assert_eq!(r["close_reason"], json!("expired"));
        assert_eq!(f.balance(), (18, 0));
        assert_checks(b);
    });
}

#[test]
fn hostile_lease_calls_are_refused_and_change_nothing() {
    each_backend(|b| {
        b.open().create_account(ACCOUNT, 100, T0).unwrap();
        let f = start(b);
        let before = f.balance();
        for body in [
            json!({ "account": ACCOUNT, "credits": 0, "ttl_seconds": 30, "min_balance_factor": 2, "idempotency_key": "k" }),
            json!({ "account": ACCOUNT, "credits": 5, "ttl_seconds": 0, "min_balance_factor": 2, "idempotency_key": "k" }),
            json!({ "account": ACCOUNT, "credits": 5, "ttl_seconds": 30, "min_balance_factor": 0, "idempotency_key": "k" }),
            json!({ "account": ACCOUNT, "credits": 5, "ttl_seconds": 30, "min_balance_factor": 2, "idempotency_key": "" }),
            json!({ "account": ACCOUNT, "credits": "5", "ttl_seconds": 30, "min_balance_factor": 2, "idempotency_key": "k" }),
            json!({ "account": ACCOUNT, "credits": 5, "ttl_seconds": 30, "min_balance_factor": 2, "idempotency_key": "k", "extra": 1 }),
            json!({ "account": ACCOUNT, "credits": 1_000_001, "ttl_seconds": 30, "min_balance_factor": 2, "idempotency_key": "k" }),
        ] {
            let r = post(&f.url("/v1/leases"), &body.to_string());
            assert_eq!(r.status, 400, "{body}: {:?}", r.json);
        }
        let (_, body) = f.lease(10, 2, "ok");
        let lease = body["lease_id"].as_str().unwrap().to_string();
        for body in [
            json!({ "spends": [{ "idempotency_key": "x", "amount": 0 }] }),
            json!({ "spends": [{ "idempotency_key": "x", "amount": -3 }] }),
            json!({ "spends": [{ "idempotency_key": "", "amount": 1 }] }),
            json!({ "spends": [{ "idempotency_key": "x", "amount": 1, "account": "someone-else" }] }),
            json!({ "spends": "all of them" }),
            json!({ "spends": (0..1001).map(|i| json!({ "idempotency_key": format!("k{i}"), "amount": 1 })).collect::<Vec<_>>() }),
        ] {
            let r = post(&f.url(&format!("/v1/leases/{lease}/report")), &body.to_string());
            assert_eq!(r.status, 400, "{body}: {:?}", r.json);
        }
        let r = post(&f.url("/v1/leases/lease_nope/report"), r#"{"spends":[],"final":true}"#);
        assert_eq!(r.status, 404);
        assert_eq!(f.balance(), (before.0 - 10, 10));
        assert_checks(b);
    });
}
