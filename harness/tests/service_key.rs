//! The filter proves itself to the key/credits service: the key from the VM
//! environment (`DIAL_SERVICE_KEY`) rides on every callout to the service and
//! on nothing else; a service that refuses it gets the request refused (503,
//! fail closed) and an operator-readable log line, never the key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use dialtone_harness::{CallAnswer, LogLevel, Plugin, PluginOptions, StartError};
use serde_json::json;

const SERVICE_KEY: &str = "harness-service-key-0123456789abcdef";

fn start_with(key: Option<&str>) -> Result<Plugin, StartError> {
    let mut opts = PluginOptions::new(demo_config().to_string()).clock_secs(NOW).env("DIAL_ADMIN_API_KEY", ADMIN_KEY);
    if let Some(k) = key {
        opts = opts.env("DIAL_SERVICE_KEY", k);
    }
    Plugin::start(wasm(), opts)
}

#[test]
fn every_service_callout_carries_the_service_key() {
    let mut p = start_with(Some(SERVICE_KEY)).unwrap();
    // A paid API-key request: lookup, hold, and (after the upstream) capture.
    let mut s = p.http().unwrap();
    s.request(&request("POST", "/api/v1/sms/send", &[("authorization", &format!("Bearer {API_KEY}"))])).unwrap();
    s.answer_next(key_record(&["sms:send"], "active", 10)).unwrap();
    s.answer_next(held("hold_1", 1, 9)).unwrap();
    s.send_response_headers(&[(":status", "200")]).unwrap();
    s.answer_next(settled("hold_1", "captured")).unwrap();
    let calls = s.callouts();
    assert_eq!(calls.len(), 3, "{calls:?}");
    for c in &calls {
        assert_eq!(c.header("x-dialtone-service-key").as_deref(), Some(SERVICE_KEY), "{}", c.path());
    }
    // Nothing else sees it: not the upstream request, not the logs.
    assert!(s.request_headers().iter().all(|(_, v)| v != SERVICE_KEY.as_bytes()));
    s.close().unwrap();
    assert!(!p.log_text(LogLevel::Trace).contains(SERVICE_KEY));
}

#[test]
fn a_refused_service_key_is_a_503_and_a_log_line_that_says_why() {
    let mut p = start_with(Some(SERVICE_KEY)).unwrap();
    let mut s = p.http().unwrap();
    s.request(&request("POST", "/api/v1/sms/send", &[("authorization", &format!("Bearer {API_KEY}"))])).unwrap();
    s.answer_next(CallAnswer::json(401, &json!({"success": false, "error": "unauthorized"}))).unwrap();
    let body = refused(&s, 503, "credits_unavailable");
    assert_eq!(body, json!({"success": false, "error": "credits_unavailable"}));
    s.close().unwrap();
    let errors = p.log_text(LogLevel::Error);
    assert!(errors.contains("refused this filter's service key (DIAL_SERVICE_KEY)"), "{errors}");
    assert!(!p.log_text(LogLevel::Trace).contains(SERVICE_KEY));
}

#[test]
fn without_a_key_callouts_carry_none_and_a_short_key_refuses_to_load() {
    let mut p = start_with(None).unwrap();
    assert!(p.log_text(LogLevel::Warn).contains("DIAL_SERVICE_KEY is not set"));
    let mut s = p.http().unwrap();
    s.request(&request("POST", "/api/v1/sms/send", &[("authorization", &format!("Bearer {API_KEY}"))])).unwrap();
    let call = s.pending_callouts().into_iter().next().expect("a lookup");
    assert_eq!(call.header("x-dialtone-service-key"), None);

    let Err(StartError::ConfigRefused { logs }) = start_with(Some("short-key")) else { panic!("a short key must refuse the config") };
    let text = logs.iter().map(|l| l.message.as_str()).collect::<Vec<_>>().join("\n");
    assert!(text.contains("invalid plugin configuration: env DIAL_SERVICE_KEY must be at least 32 characters"), "{text}");
    assert!(!text.contains("short-key"));
}
