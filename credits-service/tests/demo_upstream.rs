//! The demo upstream API, served in-process on a free port.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{call, get, TempDb};
use dialtone_credits::demo_upstream;
use dialtone_credits::http::RunningServer;
use serde_json::json;
use std::io::{Read, Write};
use std::sync::Arc;

const T0: i64 = 1_700_000_000;

struct Fixture {
    db: TempDb,
    server: RunningServer,
    base: String,
}

fn start() -> Fixture {
    let db = TempDb::new();
    let server = demo_upstream::start("127.0.0.1:0", 4, &db.shared(), Arc::new(|| T0)).unwrap();
    let base = format!("http://{}", server.addr());
    Fixture { db, server, base }
}

#[test]
fn sms_send_counts_segments() {
    let f = start();
    let url = format!("{}/api/v1/sms/send", f.base);
    let r = call(
        "POST",
        &url,
        &[],
        Some(r#"{"to":"+18148835337","message":"hi"}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, "application/json");
    assert_eq!(r.json["success"], true);
    assert_eq!(r.json["provider"], "dial");
    assert_eq!(r.json["to"], "+18148835337");
    assert_eq!(r.json["segments"], 1);
    let id = r.json["messageId"].as_str().unwrap();
    assert!(id.starts_with("msg_") && id.len() == 20, "{id}");
    assert!(id[4..]
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));

    for (chars, segments) in [(160, 1), (161, 2), (320, 2), (321, 3)] {
        // Multi-byte characters count as one character each.
        let body = json!({ "to": "+447700900123", "message": "é".repeat(chars) }).to_string();
        let r = call("POST", &url, &[], Some(&body));
        assert_eq!(r.json["segments"], segments, "{chars} chars");
    }
}

#[test]
fn sms_send_rejects_invalid_requests() {
    let f = start();
    let url = format!("{}/api/v1/sms/send", f.base);
    for bad in [
        r#"{"message":"hi"}"#,
        r#"{"to":"18148835337","message":"hi"}"#,
        r#"{"to":"+1","message":"hi"}"#,
        r#"{"to":12345678,"message":"hi"}"#,
        r#"{"to":"+18148835337"}"#,
        r#"{"to":"+18148835337","message":""}"#,
        r#"{"to":"+18148835337","message":7}"#,
        "nope",
    ] {
        let r = call("POST", &url, &[], Some(bad));
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json["success"], false, "{bad}");
        assert_eq!(r.json["error"], "invalid_request", "{bad}");
        assert!(r.json["message"].is_string(), "{bad}");
    }
    assert_eq!(get(&url).status, 405);
}

#[test]
fn account_reads_identity_headers() {
    let f = start();
    f.db.open()
        .create_account("did:privy:cm123", 42, T0)
        .unwrap();
    let url = format!("{}/api/v1/account", f.base);

    let r = call(
        "GET",
        &url,
        &[
            ("x-dialtone-account", "did:privy:cm123"),
            ("x-dialtone-auth-method", "privy"),
        ],
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json,
        json!({ "privyUserId": "did:privy:cm123", "credits": 42, "totalCredits": 42 })
    );

    let r = call(
        "GET",
        &url,
        &[
            ("x-dialtone-account", "did:privy:cm123"),
            ("x-dialtone-auth-method", "apikey"),
            ("x-dialtone-key-prefix", "abc12345"),
        ],
        None,
    );
    assert_eq!(
        r.json,
        json!({
            "privyUserId": "did:privy:cm123", "credits": 42, "totalCredits": 42,
            "authMethod": "apikey", "apiKeyPrefix": "abc12345"
        })
    );

    let r = call(
        "GET",
        &url,
        &[("x-dialtone-account", "did:privy:new")],
        None,
    );
    assert_eq!(
        r.json,
        json!({ "privyUserId": "did:privy:new", "credits": 0, "totalCredits": 0 })
    );

    let r = get(&url);
    assert_eq!(r.status, 400);
    assert_eq!(r.json, json!({ "success": false, "error": "no_identity" }));
}

#[test]
fn top_up_credits_once_per_settled_transaction() {
    let f = start();
    let url = format!("{}/api/v1/credits/top-up", f.base);
    let tx = "0x5240caeb76e008a016ccfacb8faab06934f2937e25313e2923fb1ce9fd1d6009";
    let settled = |account: &'static str, tx: &'static str, amount: &'static str| {
        vec![
            ("x-dialtone-account", account),
            ("x-dialtone-x402-transaction", tx),
            ("x-dialtone-x402-network", "eip155:31337"),
            ("x-dialtone-x402-amount", amount),
        ]
    };

    // A payment header alone (no settlement by the gate) credits nothing.
    for headers in [vec![("x-dialtone-account", "acct"), ("payment-signature", "sig-1")], vec![("x-dialtone-account", "acct")]] {
        let r = call("POST", &url, &headers, Some("{}"));
        assert_eq!(r.status, 402);
        assert_eq!(r.json["error"], "payment_required");
    }
    assert_eq!(f.db.open().balance("acct").unwrap(), None);

    let r = call("POST", &url, &settled("acct", tx, "1000000"), Some("{}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json, json!({ "success": true, "credited": 100, "credits": 100, "transaction": tx }));

    // The same transaction again credits nothing.
    let r = call("POST", &url, &settled("acct", tx, "1000000"), Some("{}"));
    assert_eq!(r.status, 200);
    assert_eq!((r.json["credited"].clone(), r.json["credits"].clone(), r.json["replayed"].clone()), (json!(0), json!(100), json!(true)));

    // Another transaction credits again; the ledger row names each one.
    let tx2 = "0x1111111111111111111111111111111111111111111111111111111111111111";
    let r = call("POST", &url, &settled("acct", tx2, "20000"), Some("{}"));
    assert_eq!((r.json["credited"].clone(), r.json["credits"].clone()), (json!(2), json!(102)));
    let mut store = f.db.open();
    assert_eq!(store.balance("acct").unwrap(), Some(102));
    let ledger = store.ledger("acct", 10).unwrap();
    let keys: Vec<Option<String>> = ledger.iter().filter(|e| e.kind == "topup").map(|e| e.idempotency_key.clone()).collect();
    assert!(keys.contains(&Some(format!("x402:eip155:31337:{tx}"))) && keys.contains(&Some(format!("x402:eip155:31337:{tx2}"))), "{keys:?}");
    assert!(store.check().unwrap().is_ok());

    // A transaction is never credited to a second account.
    let r = call("POST", &url, &settled("other", tx, "1000000"), Some("{}"));
    assert_eq!(r.status, 409);
    assert_eq!(r.json["error"], "payment_already_used");
    // Too small to buy a credit, or no account: refused, nothing credited.
    assert_eq!(call("POST", &url, &settled("acct", "0xsmall", "9999"), Some("{}")).status, 400);
    let r = call(
        "POST",
        &url,
        &[("x-dialtone-x402-transaction", "0xanon"), ("x-dialtone-x402-network", "eip155:31337"), ("x-dialtone-x402-amount", "1000000")],
        Some("{}"),
    );
    assert_eq!((r.status, r.json["error"].clone()), (400, json!("no_identity")));
    assert_eq!(f.db.open().balance("acct").unwrap(), Some(102));
}

#[test]
fn echo_returns_method_path_and_headers() {
    let f = start();
    let r = call(
        "PUT",
        &format!("{}/echo/some/path?q=1", f.base),
        &[
            ("X-Dialtone-Account", "did:privy:z"),
            ("x-multi", "a"),
            ("x-multi", "b"),
        ],
        Some(r#"{"k":1}"#),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json["method"], "PUT");
    assert_eq!(r.json["path"], "/echo/some/path?q=1");
    assert_eq!(r.json["headers"]["x-dialtone-account"], "did:privy:z");
    assert_eq!(r.json["headers"]["x-multi"], "a, b");
    assert_eq!(r.json["headers"]["content-type"], "application/json");
    assert_eq!(r.json["body"], r#"{"k":1}"#);

    // Any method, including ones ureq does not speak: use a raw socket.
    let mut conn = std::net::TcpStream::connect(f.server.addr()).unwrap();
    write!(
        conn,
        "PATCH /echo HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    let body = raw.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["method"], "PATCH");
    assert_eq!(v["path"], "/echo");
    assert_eq!(v["headers"]["x-a"], "1, 2");
    assert_eq!(v["headers"]["host"], "h");
}

#[test]
fn healthz_and_unknown_paths() {
    let f = start();
    let r = get(&format!("{}/healthz", f.base));
    assert_eq!((r.status, r.json.clone()), (200, json!({ "ok": true })));
    let r = get(&format!("{}/api/v1/nope", f.base));
    assert_eq!(r.status, 404);
    assert_eq!(r.json, json!({ "success": false, "error": "not_found" }));
    assert_eq!(r.content_type, "application/json");
}
