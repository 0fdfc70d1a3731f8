//! Self-service through the gate: the key/credits service's `/self/v1/*` API
//! and `/dashboard`, behind a real Envoy and the filter.
//!
//! - `the_dashboard_in_a_real_browser`: Debian's headless Chromium, driven by
//!   `tests/browser/dashboard.mjs` (playwright-core, no browser download):
//!   sign in, balance, quick agent key, send an SMS with it, ledger, revoke →
//!   401, a 30-day token, the 25-token limit, session token, sign out.
//!   Screenshots in `target/browser/`.
//! - `hostile_self_service_requests_change_nothing`: forged identity, direct
//!   calls that skip the gate, API keys, another account's prefix, unknown
//!   scopes, expiries off the list, the 26th token, CSRF, oversized names:
//!   each a clear 4xx, with the keys and the ledger unchanged.
//! - `production_configs_have_no_dev_sign_in`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::Path;
use std::process::Command;

use dialtone_e2e::{bearer, raw_request, Resp, TestStack};
use serde_json::Value;

const ALICE: &str = "did:privy:dash-alice";
const BOB: &str = "did:privy:dash-bob";

/// `dialtone-credits --json key list ACCOUNT`: every key, with its state.
fn keys_of(t: &TestStack, account: &str) -> Vec<Value> {
    let out = t.stack.cli(&["--json", "key", "list", account]).unwrap();
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    v.as_array().cloned().unwrap_or_else(|| panic!("not a list of keys: {v}"))
}

/// Everything a refused request must leave alone: the account's keys (with
/// their states) and its ledger.
fn snapshot(t: &TestStack, account: &str) -> (Vec<Value>, String) {
    let ledger = t.stack.cli(&["--json", "account", "ledger", account]).unwrap();
    (keys_of(t, account), ledger)
}

fn session(t: &TestStack, account: &str) -> String {
    bearer(&t.privy_token(account))
}

fn post_json(t: &TestStack, path: &str, auth: &str, extra: &[(&str, &str)], body: &str) -> Resp {
    let mut headers = vec![("authorization", auth), ("content-type", "application/json")];
    headers.extend_from_slice(extra);
    t.post(path, &headers, body)
}

/// POST a body over the service's 64 KiB cap to `/self/v1/keys` through
/// Envoy and read the answer to the end. The 413 may come before the body is
/// all sent, and the connection close after it: a failed end of the write is
/// not the test's failure, the answer is what counts.
fn send_tolerating_early_close(port: u16, auth: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let request = format!(
        "POST /self/v1/keys HTTP/1.1\r\nhost: dialtone.test\r\nauthorization: {auth}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(request.as_bytes());
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = conn.read(&mut buf) {
        raw.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&raw).into_owned()
}

/// A self-service refusal: status, JSON, `success: false`, the error code.
fn assert_self_refusal(r: &Resp, status: u16, error: &str) {
    assert_eq!(r.status, status, "{r:?}");
    let body = r.json();
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"], error, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

#[test]
fn the_dashboard_in_a_real_browser() {
    let t = TestStack::start("dashboard");
    t.stack.create_account(ALICE, 10).unwrap();
    t.stack.create_account(BOB, 5).unwrap();
    let bob_key = t.stack.create_key(BOB, &["sms:send"], &[]).unwrap();
    let bob_prefix = &bob_key["dial_live_".len().."dial_live_".len() + 8];

    let root = &t.stack.paths.root;
    let shots = root.join("target/browser");
    let _ = std::fs::remove_dir_all(&shots);
    let out = Command::new("node")
        .arg(root.join("tests/browser/dashboard.mjs"))
        .current_dir(root.join("tests/browser"))
        .env("DIALTONE_URL", t.stack.url())
        .env("ACCOUNT", ALICE)
        .env("START_BALANCE", "10")
        .env("OTHER_PREFIX", bob_prefix)
        .env("SCREENSHOT_DIR", &shots)
        .output()
        .unwrap_or_else(|e| panic!("running node tests/browser/dashboard.mjs: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser test failed ({}):\n{stdout}\n{}\nenvoy:\n{}\ncredits:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        t.stack.log_tail("envoy"),
        t.stack.log_tail("credits")
    );
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();

    // What the browser did is what the database says.
    // One credit per SMS served: the first, plus any sent within the key
    // cache's bound after the revocation (key_cache_ttl_ms, 500 ms).
    let served = summary["sms_served"].as_i64().unwrap();
    assert!((1..=20).contains(&served), "{summary}");
    assert_eq!(t.stack.balance(ALICE).unwrap(), 10 - served, "one credit per SMS served");
    assert_eq!(t.stack.balance(BOB).unwrap(), 5);
    let keys = keys_of(&t, ALICE);
    let revoked = keys.iter().find(|k| k["prefix"] == summary["revoked_prefix"]).unwrap();
    assert_eq!(revoked["state"], "revoked");
    let tokens: Vec<&Value> = keys.iter().filter(|k| k["kind"] == "api_token").collect();
    assert_eq!(tokens.len(), 25, "the 26th token was refused");
    let token = tokens.iter().find(|k| k["prefix"] == summary["token_prefix"]).unwrap();
    assert_eq!(token["scopes"], serde_json::json!(["contacts_read"]));
    let days = (token["expires_at"].as_i64().unwrap() - token["created_at"].as_i64().unwrap()) / 86_400;
    assert_eq!(days, 30);
    assert_eq!(keys_of(&t, BOB).len(), 1);
    let check: Value = serde_json::from_str(t.stack.cli(&["--json", "check"]).unwrap().trim()).unwrap();
    assert_eq!(check["ok"], true, "{check}");
    for shot in ["01-signed-out", "02-dashboard", "03-secret-once", "04-confirm-revoke", "05-token-limit", "06-after-an-sms"] {
        let path = shots.join(format!("{shot}.png"));
        assert!(std::fs::metadata(&path).is_ok_and(|m| m.len() > 1000), "no screenshot {}", path.display());
    }
}

#[test]
fn hostile_self_service_requests_change_nothing() {
    let t = TestStack::start("self-service-hostile");
    t.stack.create_account(ALICE, 10).unwrap();
    t.stack.create_account(BOB, 5).unwrap();
    let bob_key = t.stack.create_key(BOB, &["sms:send"], &[]).unwrap();
    let bob_prefix = bob_key["dial_live_".len().."dial_live_".len() + 8].to_string();
    let alice = session(&t, ALICE);
    let before = (snapshot(&t, ALICE), snapshot(&t, BOB));
    let unchanged = |what: &str| assert_eq!((snapshot(&t, ALICE), snapshot(&t, BOB)), before, "{what} changed something");

    // Through the gate, a forged x-dialtone-account is replaced by the
    // filter's own: Alice sees Alice.
    let me = t.get("/self/v1/me", &[("authorization", &alice), ("x-dialtone-account", BOB)]);
    assert_eq!(me.status, 200, "{me:?}");
    assert_eq!((me.json()["account"].as_str(), me.json()["balance"].as_i64()), (Some(ALICE), Some(10)));
    assert_eq!(me.header("cache-control"), Some("no-store"));
    let listed = t.get("/self/v1/keys", &[("authorization", &alice), ("x-dialtone-account", BOB)]);
    assert_eq!(listed.json()["keys"], serde_json::json!([]), "Alice saw keys that are not hers");
    assert!(!listed.body.contains(&bob_prefix));

    // Skipping the gate: the service's self-service port, with a forged
    // account, with no gate key, a wrong one, and a client's copy sent
    // through Envoy (replaced by Envoy's own): refused, or Alice's.
    let direct = t.stack.opts.ports.self_service;
    let forged: &[(&str, &[u8])] = &[("x-dialtone-account", BOB.as_bytes()), ("x-dialtone-auth-method", b"privy")];
    assert_self_refusal(&raw_request(direct, "GET", "/self/v1/keys", forged, None), 403, "gate_required");
    let wrong_gate = [forged, &[("x-dialtone-gate-key", b"0123456789abcdef0123456789abcdef0123" as &[u8])]].concat();
    assert_self_refusal(&raw_request(direct, "GET", "/self/v1/keys", &wrong_gate, None), 403, "gate_required");
    let mint_direct = [&wrong_gate[..], &[("content-type", b"application/json" as &[u8])]].concat();
    assert_self_refusal(&raw_request(direct, "POST", "/self/v1/keys", &mint_direct, Some(br#"{"preset":"agent"}"#)), 403, "gate_required");
    assert_self_refusal(&raw_request(direct, "GET", "/dashboard", &[], None), 403, "gate_required");
    let smuggled = t.get("/self/v1/me", &[("authorization", &alice), ("x-dialtone-gate-key", "guess")]);
    assert_eq!(smuggled.json()["account"], ALICE);
    unchanged("skipping the gate");

    // Signed out, an API key, the operator's admin key: no self-service.
    t.get("/self/v1/me", &[]).assert_refusal(401, "unauthorized");
    let bob_bearer = bearer(&bob_key);
    t.get("/self/v1/keys", &[("authorization", &bob_bearer)]).assert_refusal(401, "unauthorized");
    post_json(&t, "/self/v1/keys", &bob_bearer, &[], r#"{"preset":"agent"}"#).assert_refusal(401, "unauthorized");
    post_json(&t, &format!("/self/v1/keys/{bob_prefix}/revoke"), &bob_bearer, &[], "{}").assert_refusal(401, "unauthorized");
    let admin = bearer(dialtone_e2e::ADMIN_KEY);
    assert_self_refusal(&t.get("/self/v1/me", &[("authorization", &admin)]), 401, "sign_in_required");
    unchanged("an API key or the admin key");

    // Another account's prefix: the same answer as an unknown one.
    let theirs = post_json(&t, &format!("/self/v1/keys/{bob_prefix}/revoke"), &alice, &[], "{}");
    assert_self_refusal(&theirs, 404, "key_not_found");
    assert_self_refusal(&post_json(&t, "/self/v1/keys/00000000/revoke", &alice, &[], "{}"), 404, "key_not_found");
    assert_self_refusal(&post_json(&t, "/self/v1/keys/NOTAPREFIX/revoke", &alice, &[], "{}"), 400, "bad_request");
    unchanged("revoking another account's key");

    // Mint requests outside the rules.
    for (body, status, error) in [
        (r#"{"scopes":["admin:all"]}"#, 400, "unknown_scope"),
        (r#"{"scopes":[]}"#, 400, "no_scopes"),
        (r#"{"kind":"api_token","scopes":["contacts_read"],"expires":"45d"}"#, 400, "invalid_expiry"),
        (r#"{"kind":"api_token","scopes":["contacts_read"],"expires":"-1"}"#, 400, "invalid_expiry"),
        (r#"{"scopes":["sms:send"],"expires":"30d"}"#, 400, "bad_request"),
        (r#"{"scopes":["sms:send"],"account":"did:privy:dash-bob"}"#, 400, "bad_request"),
        (r#"{"preset":"agent""#, 400, "bad_request"),
    ] {
        assert_self_refusal(&post_json(&t, "/self/v1/keys", &alice, &[], body), status, error);
    }
    let long_name = format!(r#"{{"name":"{}","scopes":["sms:send"]}}"#, "n".repeat(65));
    assert_self_refusal(&post_json(&t, "/self/v1/keys", &alice, &[], &long_name), 400, "name_too_long");
    let huge = format!(r#"{{"name":"{}","scopes":["sms:send"]}}"#, "n".repeat(70 * 1024));
    let answer = send_tolerating_early_close(t.stack.opts.ports.listen, &alice, &huge);
    assert!(answer.starts_with("HTTP/1.1 413"), "a 70 KiB body: {}", answer.chars().take(300).collect::<String>());
    unchanged("refused mint requests");

    // CSRF: a cookie-signed-in browser on another site.
    let cookie = format!("privy-token={}", t.privy_token(ALICE));
    let csrf = |extra: &[(&str, &str)], content_type: &str| {
        let mut h = vec![("cookie", cookie.as_str()), ("content-type", content_type)];
        h.extend_from_slice(extra);
        t.post("/self/v1/keys", &h, r#"{"preset":"agent"}"#)
    };
    assert_self_refusal(&csrf(&[("origin", "https://evil.example")], "application/json"), 403, "cross_origin");
    assert_self_refusal(&csrf(&[("sec-fetch-site", "cross-site")], "application/json"), 403, "cross_origin");
    assert_self_refusal(&csrf(&[], "text/plain"), 415, "unsupported_media_type");
    assert_self_refusal(&csrf(&[], "application/x-www-form-urlencoded"), 415, "unsupported_media_type");
    unchanged("cross-site requests");
    // The same request from the site itself is served.
    let same = csrf(&[("origin", "http://dialtone.test"), ("sec-fetch-site", "same-origin")], "application/json");
    assert_eq!(same.status, 201, "{same:?}");

    // The 26th active token.
    for i in 0..25 {
        let body = format!(r#"{{"kind":"api_token","name":"t{i}","scopes":["contacts_read"],"expires":"30d"}}"#);
        assert_eq!(post_json(&t, "/self/v1/keys", &alice, &[], &body).status, 201, "token {i}");
    }
    let full = snapshot(&t, ALICE);
    let r = post_json(&t, "/self/v1/keys", &alice, &[], r#"{"kind":"api_token","name":"26","scopes":["contacts_read"],"expires":"never"}"#);
    assert_self_refusal(&r, 409, "token_limit");
    assert_eq!(r.json()["limit"], 25);
    assert_eq!(snapshot(&t, ALICE), full, "the 26th token changed something");
    // API keys do not count against the token limit.
    assert_eq!(post_json(&t, "/self/v1/keys", &alice, &[], r#"{"preset":"agent"}"#).status, 201);

    // Ledger pages: newest first, then older.
    let page = t.get("/self/v1/ledger?limit=1", &[("authorization", &alice)]).json();
    let first = &page["entries"][0];
    assert_eq!((first["kind"].as_str(), first["delta_available"].as_i64()), (Some("topup"), Some(10)));
    assert!(t.get("/self/v1/ledger?limit=1000", &[("authorization", &alice)]).status == 400);
    assert!(t.get("/self/v1/ledger?account=did:privy:dash-bob", &[("authorization", &alice)]).status == 400);
}

/// The dev sign-in exists only in the dev stack: the shipped Envoy bootstrap,
/// the manifests and the demo policy have no `/dev/` route, and the service
/// does not serve it unless started with `--dev-sign-in-key`.
#[test]
fn production_configs_have_no_dev_sign_in() {
    let root = dialtone_e2e::devstack::repo_root().unwrap();
    for file in [
        "envoy/envoy-static.yaml",
        "envoy/istio/30-wasmplugin.yaml",
        "envoy/gateway/40-httproute.yaml",
        "envoy/gateway/60-envoyextensionpolicy.yaml",
        "policy/demo.json",
        "policy/examples/sms-credits.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(!text.contains("/dev/"), "{file} routes /dev/");
        assert!(!text.contains("dev_sign_in") && !text.contains("dev-sign-in"), "{file} names the dev sign-in");
    }
    // The self-service routes are there (so the page works in production).
    let demo: Value = serde_json::from_str(&std::fs::read_to_string(root.join("policy/demo.json")).unwrap()).unwrap();
    let names: Vec<&str> = demo["routes"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"self_service") && names.contains(&"dashboard"), "{names:?}");

    // A service started without the flag has no dev sign-in, even when
    // called with the gate key.
    let t = TestStack::start_full("no-dev-sign-in", |_| {}, |o| {
        o.dev_sign_in_key = None;
        Ok(())
    })
    .unwrap();
    let gate = t.stack.gate_key.clone();
    let headers: &[(&str, &[u8])] = &[("x-dialtone-gate-key", gate.as_bytes()), ("content-type", b"application/json")];
    let direct = t.stack.opts.ports.self_service;
    assert_eq!(raw_request(direct, "GET", "/dev/sign-in", headers, None).status, 404);
    let r = raw_request(direct, "POST", "/dev/sign-in", headers, Some(br#"{"account":"did:privy:x"}"#));
    assert_eq!(r.status, 404);
    assert!(r.header("set-cookie").is_none());
    // …while the dashboard is served (and says where to sign in: nowhere set).
    let config = raw_request(direct, "GET", "/dashboard/config.json", headers, None);
    assert_eq!(config.json()["dev_sign_in"], false);
    assert!(Path::new(&root.join("credits-service/dashboard/index.html")).exists());
}
