//! A small demo of the paid API the filter protects.
//!
//! It does no authentication of its own: it trusts the identity headers the
//! filter sets after it has verified the caller (`x-dialtone-account`,
//! `x-dialtone-auth-method`, `x-dialtone-key-prefix`,
//! `x-dialtone-credits-remaining`, `x-dialtone-route`). It must therefore only
//! ever be reachable through the filter.
//!
//! - `POST /api/v1/sms/send`          pretend to send an SMS
//! - `GET  /api/v1/account`           the caller's identity and credits
//! - `POST /api/v1/credits/top-up`    demo x402 top-up (payment NOT verified)
//! - `GET  /healthz`                  liveness
//! - `GET  /.well-known/jwks.json`    the issuer's JWKS stand-in (`DIALTONE_DEMO_JWKS_FILE`)
//! - `ANY  /echo...`                  echo method, path, headers and body;
//!   `x-demo-status: N` makes it answer with status N

use crate::api::{Clock, SharedStore};
use crate::http::{Handler, Reply, RequestCtx, RunningServer};
use crate::keys;
use crate::store::{Store, StoreError};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

/// Credits granted per (unverified) demo top-up.
pub const TOPUP_CREDITS: i64 = 100;
/// One SMS segment holds 160 characters.
pub const SEGMENT_CHARS: usize = 160;
/// Longest accepted message (10 segments).
pub const MAX_MESSAGE_CHARS: usize = 1600;
/// Note stored with, and returned for, demo top-ups.
pub const TOPUP_NOTE: &str = "demo: x402 payment not verified";

/// Start the demo upstream on `listen` with `workers` threads.
pub fn start(
    listen: &str,
    workers: usize,
    store: SharedStore,
    clock: Clock,
) -> io::Result<RunningServer> {
    // What reached the upstream, newest last: tests read it (directly on this
    // port, never through the filter) to prove a refused request never
    // arrived here.
    let seen: Arc<Mutex<VecDeque<Value>>> = Arc::new(Mutex::new(VecDeque::new()));
    let handler: Handler = Arc::new(move |req: &RequestCtx| {
        if req.path == REQUEST_LOG_PATH {
            let log = seen.lock().unwrap_or_else(PoisonError::into_inner);
            return Reply::ok(Value::Array(log.iter().cloned().collect()));
        }
        {
            let mut log = seen.lock().unwrap_or_else(PoisonError::into_inner);
            if log.len() == REQUEST_LOG_LEN {
                log.pop_front();
            }
            let header = |n: &str| req.header(n).map(|v| Value::String(v.to_owned())).unwrap_or(Value::Null);
            log.push_back(json!({
                "method": req.method,
                "path": req.path,
                "account": header("x-dialtone-account"),
                "route": header("x-dialtone-route"),
                "body_bytes": req.body.len(),
            }));
        }
        handle(&store, &*clock, req)
    });
    RunningServer::start(listen, workers, "upstream", handler)
}

/// `GET` here on the upstream's own port lists the requests it received.
pub const REQUEST_LOG_PATH: &str = "/_demo/requests";
const REQUEST_LOG_LEN: usize = 1000;

fn fail(status: u16, error: &str, message: Option<String>) -> Reply {
    let mut body = json!({ "success": false, "error": error });
    if let (Some(m), Some(obj)) = (message, body.as_object_mut()) {
        obj.insert("message".into(), Value::String(m));
    }
    Reply::json(status, body)
}

/// The local stack's stand-in for the issuer's JWKS endpoint (Privy serves
/// its own at `/v1/apps/<app id>/jwks.json`): the file named by
/// `DIALTONE_DEMO_JWKS_FILE`, read on every request so a test can rotate keys.
fn jwks() -> Reply {
    let doc = std::env::var_os("DIALTONE_DEMO_JWKS_FILE")
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    match doc {
        Some(d) => Reply::ok(d),
        None => fail(404, "not_found", Some("no JWKS published".into())),
    }
}

fn method_not_allowed(allow: &str) -> Reply {
    fail(405, "method_not_allowed", None).with_header("Allow", allow)
}

/// Route one request.
pub fn handle(store: &Mutex<Store>, clock: &dyn Fn() -> i64, req: &RequestCtx) -> Reply {
    let path = req.path.as_str();
    let method = req.method.as_str();
    if path.starts_with("/echo") {
        return echo(req);
    }
    let result = match (path, method) {
        ("/healthz", "GET") => Ok(Reply::ok(json!({ "ok": true }))),
        ("/.well-known/jwks.json", "GET") => Ok(jwks()),
        ("/healthz", _) => Ok(method_not_allowed("GET")),
        ("/api/v1/sms/send", "POST") => sms_send(req),
        ("/api/v1/sms/send", _) => Ok(method_not_allowed("POST")),
        ("/api/v1/account", "GET") => account(store, req),
        ("/api/v1/account", _) => Ok(method_not_allowed("GET")),
        ("/api/v1/credits/top-up", "POST") => top_up(store, clock(), req),
        ("/api/v1/credits/top-up", _) => Ok(method_not_allowed("POST")),
        _ => Ok(fail(404, "not_found", None)),
    };
    result.unwrap_or_else(|e| match e {
        StoreError::Invalid(msg) => fail(400, "invalid_request", Some(msg)),
        other => {
            eprintln!("upstream: {method} {path}: {other}");
            fail(500, "internal", None)
        }
    })
}

fn lock(store: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

/// E.164: `+`, a non-zero digit, then 6..=14 more digits.
fn is_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else {
        return false;
    };
    (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

fn sms_send(req: &RequestCtx) -> Result<Reply, StoreError> {
    let invalid = |m: &str| Ok(fail(400, "invalid_request", Some(m.to_string())));
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return invalid(&format!("invalid JSON body: {e}")),
    };
    let Some(to) = body.get("to").and_then(Value::as_str) else {
        return invalid("`to` is required and must be a string");
    };
    if !is_e164(to) {
        return invalid("`to` must be an E.164 phone number like +18148835337");
    }
    let Some(message) = body.get("message").and_then(Value::as_str) else {
        return invalid("`message` is required and must be a string");
    };
    let chars = message.chars().count();
    if chars == 0 || chars > MAX_MESSAGE_CHARS {
        return invalid(&format!(
            "`message` must be 1-{MAX_MESSAGE_CHARS} characters"
        ));
    }
    let segments = chars.div_ceil(SEGMENT_CHARS).max(1);
    let message_id = format!("msg_{}", keys::random_hex(8).map_err(StoreError::Random)?);
    Ok(Reply::ok(json!({
        "success": true,
        "provider": "dial",
        "messageId": message_id,
        "to": to,
        "segments": segments,
    })))
}

fn account(store: &Mutex<Store>, req: &RequestCtx) -> Result<Reply, StoreError> {
    let Some(account) = req.header("x-dialtone-account").filter(|a| !a.is_empty()) else {
        return Ok(fail(400, "no_identity", None));
    };
    // An account that never topped up simply has no credits yet.
    let credits = lock(store).balance(account)?.unwrap_or(0);
    let mut body = json!({
        "privyUserId": account,
        "credits": credits,
        "totalCredits": credits,
    });
    if req.header("x-dialtone-auth-method") == Some("apikey") {
        if let Some(obj) = body.as_object_mut() {
            obj.insert("authMethod".into(), json!("apikey"));
            obj.insert(
                "apiKeyPrefix".into(),
                json!(req.header("x-dialtone-key-prefix").unwrap_or_default()),
            );
        }
    }
    Ok(Reply::ok(body))
}

/// DEMO ONLY: this endpoint does NOT verify x402 payments. It only checks that
/// a payment header is present (the filter in front lets the request through
/// only with one) and credits a fixed amount. A real deployment must verify
/// and settle the payment with a facilitator before crediting anything.
fn top_up(store: &Mutex<Store>, now: i64, req: &RequestCtx) -> Result<Reply, StoreError> {
    let payment = ["payment-signature", "x-payment"]
        .iter()
        .find_map(|h| req.header(h).filter(|v| !v.trim().is_empty()));
    let Some(payment) = payment else {
        return Ok(fail(402, "payment_required", None));
    };
    let Some(account) = req.header("x-dialtone-account").filter(|a| !a.is_empty()) else {
        return Ok(Reply::ok(json!({
            "success": true,
            "credited": 0,
            "note": format!("{TOPUP_NOTE}; no x-dialtone-account, nothing credited"),
        })));
    };
    // The same payment header must credit only once, however often the
    // client retries: key the top-up on its hash (never store the header).
    let idempotency_key = format!("x402:{}", keys::sha256_hex(payment));
    let receipt = lock(store).topup(
        account,
        TOPUP_CREDITS,
        Some(TOPUP_NOTE),
        Some(&idempotency_key),
        now,
    );
    match receipt {
        Ok(r) if r.replayed => Ok(Reply::ok(json!({
            "success": true,
            "credited": 0,
            "credits": r.balance,
            "replayed": true,
            "note": format!("{TOPUP_NOTE}; this payment was already credited"),
        }))),
        Ok(r) => Ok(Reply::ok(json!({
            "success": true,
            "credited": r.amount,
            "credits": r.balance,
            "note": TOPUP_NOTE,
        }))),
        Err(StoreError::IdempotencyConflict(_)) => Ok(fail(
            409,
            "payment_already_used",
            Some("this payment header already credited another account".into()),
        )),
        Err(e) => Err(e),
    }
}

/// Echo what arrived, so tests can see exactly what passed the filter.
/// Repeated headers are joined with ", " in arrival order.
fn echo(req: &RequestCtx) -> Reply {
    let mut headers = Map::new();
    for (name, value) in &req.headers {
        match headers.get_mut(name) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(value);
            }
            _ => {
                headers.insert(name.clone(), Value::String(value.clone()));
            }
        }
    }
    let body = json!({
        "method": req.method,
        "path": req.url,
        "headers": headers,
        "body": String::from_utf8_lossy(&req.body),
    });
    // Tests ask the upstream to fail on purpose (charge on success must not
    // charge for it): `x-demo-status: 500`.
    match req.header("x-demo-status").and_then(|s| s.parse::<u16>().ok()) {
        Some(status) if (200..=599).contains(&status) => Reply::json(status, body),
        _ => Reply::ok(body),
    }
}
