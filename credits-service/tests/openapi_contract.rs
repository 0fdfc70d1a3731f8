//! The published contract (`docs/credits-service.openapi.yaml`) and the
//! servers agree on which operations exist: every documented path and method
//! is routed (by the credits API or, for paths whose `servers` name the demo
//! upstream, by the demo upstream), and a documented path with an
//! undocumented method is 405. A route added or renamed without updating the
//! document fails here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::TempDb;
use dialtone_credits::api::{self, ApiConfig};
use dialtone_credits::auth::AdminAuth;
use dialtone_credits::demo_upstream;
use serde_json::{json, Value};
use std::sync::Arc;

/// The document, compiled in: the test reads only the repository.
const OPENAPI: &str = include_str!("../../docs/credits-service.openapi.yaml");
const ADMIN_KEY: &str = "test-admin-key-0123456789";
const T0: i64 = 1_700_000_000;
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// A concrete value for each path parameter the document uses.
fn fill(path: &str) -> String {
    path.replace("{account}", "acct-1")
        .replace("{hold_id}", "hold_0123456789abcdef01234567")
        .replace("{prefix}", "abcd1234")
        .replace("{claim}", &"a".repeat(64))
        .replace("{rest}", "x")
}

/// Status and body (JSON, or `Null` for `/metrics`' text) of one call.
fn call(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> (u16, Value) {
    let mut req = common::agent().request(method, url);
    for (name, value) in headers {
        req = req.set(name, value);
    }
    let result = match body {
        Some(b) => req.send_string(b),
        None => req.call(),
    };
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: transport error: {e}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The documented operations: (path, documented methods, served by the demo
/// upstream?).
fn operations() -> Vec<(String, Vec<String>, bool)> {
    let doc: serde_yaml::Value = serde_yaml::from_str(OPENAPI).unwrap();
    let paths = doc["paths"].as_mapping().unwrap();
    let mut out = Vec::new();
    for (path, item) in paths {
        let path = path.as_str().unwrap().to_string();
        let demo = item["servers"]
            .as_sequence()
            .is_some_and(|s| s.iter().any(|srv| srv["url"].as_str().is_some_and(|u| u.ends_with(":8082"))));
        let methods = METHODS
            .iter()
            .filter(|m| item.get(**m).is_some())
            .map(|m| (*m).to_string())
            .collect::<Vec<_>>();
        assert!(!methods.is_empty(), "{path} documents no operation");
        out.push((path, methods, demo));
    }
    out
}

#[test]
fn every_documented_operation_is_served_and_nothing_else_on_its_path() {
    let db = TempDb::new();
    let config = ApiConfig {
        service: common::service_auth(),
        admin: AdminAuth::from_key(Some(ADMIN_KEY)),
        ..ApiConfig::with_clock(Arc::new(|| T0))
    };
    let credits = api::start_with_config("127.0.0.1:0", 4, &db.shared(), config).unwrap();
    let demo = demo_upstream::start("127.0.0.1:0", 4, &db.shared(), Arc::new(|| T0)).unwrap();
    let bearer = format!("Bearer {ADMIN_KEY}");
    let headers = [
        (common::SERVICE_KEY_HEADER, common::SERVICE_KEY),
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let ops = operations();
    assert!(ops.len() >= 20, "only {} paths parsed", ops.len());
    for (path, methods, is_demo) in &ops {
        let base = if *is_demo { demo.addr() } else { credits.addr() };
        let url = format!("http://{base}{}", fill(path));
        for method in METHODS {
            let documented = methods.iter().any(|m| m == method);
            // An empty JSON object: enough to reach the handler, which may
            // refuse it (400), find nothing (404 with its own error) or serve.
            let body = (method != "get").then_some("{}");
            let (status, answer) = call(&method.to_uppercase(), &url, &headers, body);
            if documented {
                assert_ne!(status, 405, "{method} {path} is documented but answered 405");
                assert_ne!(answer, json!({ "error": "not_found" }), "{method} {path} is documented but not routed");
                assert_ne!(status, 401, "{method} {path}: {answer:?}");
            } else {
                assert_eq!(status, 405, "{method} {path} is not documented but answered {status} {answer:?}");
            }
        }
    }
}
