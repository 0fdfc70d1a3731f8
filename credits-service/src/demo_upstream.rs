//! A small demo of the paid API the filter protects, on the same stack as
//! the credits API (axum on hyper, [`crate::http`]).
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
//! - `GET  /_demo/requests`           what reached the upstream (tests)

use crate::api::Clock;
use crate::backend::{Db, DbOptions};
use crate::http::{read_body, HttpConfig, Reply, RunningServer};
use crate::keys;
use crate::rules;
use crate::store::StoreError;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

/// A top-up credits one credit per this many atomic units of the paid
/// asset (1 USDC = 1,000,000 units = 100 credits).
pub const TOPUP_UNITS_PER_CREDIT: u128 = 10_000;
/// One SMS segment holds 160 characters.
pub const SEGMENT_CHARS: usize = 160;
/// Longest accepted message (10 segments).
pub const MAX_MESSAGE_CHARS: usize = 1600;
/// Note stored with x402 top-ups.
pub const TOPUP_NOTE: &str = "x402 top-up";
/// `GET` here on the upstream's own port lists the requests it received.
pub const REQUEST_LOG_PATH: &str = "/_demo/requests";
const REQUEST_LOG_LEN: usize = 1000;

/// What the demo's handlers share.
#[derive(Clone)]
pub struct DemoState {
    pub db: Db,
    pub clock: Clock,
    pub http: Arc<HttpConfig>,
    /// What reached the upstream, newest last: tests read it (directly on
    /// this port, never through the filter) to prove a refused request
    /// never arrived here.
    seen: Arc<Mutex<VecDeque<Value>>>,
}

impl DemoState {
    pub fn new(db: Db, clock: Clock, http: Arc<HttpConfig>) -> DemoState {
        DemoState {
            db,
            clock,
            http,
            seen: Arc::new(Mutex::new(VecDeque::new())),
        }
    }
}

/// Start the demo upstream on `listen` with `workers` runtime threads.
pub fn start(listen: &str, workers: usize, db: &str, clock: Clock) -> io::Result<RunningServer> {
    let db = db.to_string();
    let http = HttpConfig::default();
    let http_for_router = Arc::new(http.clone());
    RunningServer::start(listen, workers, "upstream", http, move || {
        Box::pin(async move {
            let db = Db::open(&db, &DbOptions::default())
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            Ok((
                router(DemoState::new(db.clone(), clock, http_for_router)),
                Some(db),
            ))
        })
    })
}

/// The demo API.
pub fn router(state: DemoState) -> Router {
    let http = Arc::clone(&state.http);
    let routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/api/v1/sms/send", post(sms_send))
        .route("/api/v1/account", get(account))
        .route("/api/v1/credits/top-up", post(top_up))
        .route(REQUEST_LOG_PATH, any(request_log))
        .fallback(echo_or_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            log_request,
        ))
        .with_state(state);
    crate::http::router_layers(routes, "upstream", &http)
}

fn fail(status: u16, error: &str, message: Option<String>) -> Reply {
    let mut body = json!({ "success": false, "error": error });
    if let (Some(m), Some(obj)) = (message, body.as_object_mut()) {
        obj.insert("message".into(), Value::String(m));
    }
    Reply::json(status, body)
}

fn store_failure(e: StoreError) -> Reply {
    if e.is_unavailable() {
        if crate::api::warn_now() {
            tracing::warn!(error = %e, "database unavailable (logged at most every 10 s)");
        }
        return Reply::unavailable();
    }
    match e {
        StoreError::Invalid(msg) => fail(400, "invalid_request", Some(msg)),
        other => {
            tracing::error!(error = %other, "storage failure");
            fail(500, "internal", None)
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Buffer the body (within the limits), note the request, pass it on.
async fn log_request(State(state): State<DemoState>, req: Request, next: Next) -> Response {
    if req.uri().path() == REQUEST_LOG_PATH {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match read_body(
        body,
        state.http.max_body_bytes,
        state.http.header_read_timeout,
    )
    .await
    {
        Ok(b) => b,
        Err(reply) => return reply.into_response(),
    };
    {
        let mut log = state.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() == REQUEST_LOG_LEN {
            log.pop_front();
        }
        let h = |n: &str| {
            header(&parts.headers, n).map_or(Value::Null, |v| Value::String(v.to_owned()))
        };
        log.push_back(json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "account": h("x-dialtone-account"),
            "route": h("x-dialtone-route"),
            "body_bytes": bytes.len(),
        }));
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

async fn request_log(State(state): State<DemoState>) -> Reply {
    let log = state.seen.lock().unwrap_or_else(PoisonError::into_inner);
    Reply::ok(Value::Array(log.iter().cloned().collect()))
}

async fn healthz() -> Reply {
    Reply::ok(json!({ "ok": true }))
}

async fn method_not_allowed() -> Reply {
    fail(405, "method_not_allowed", None)
}

/// The local stack's stand-in for the issuer's JWKS endpoint (Privy serves
/// its own at `/v1/apps/<app id>/jwks.json`): the file named by
/// `DIALTONE_DEMO_JWKS_FILE`, read on every request so a test can rotate keys.
async fn jwks() -> Reply {
    let doc = std::env::var_os("DIALTONE_DEMO_JWKS_FILE")
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    match doc {
        Some(d) => Reply::ok(d),
        None => fail(404, "not_found", Some("no JWKS published".into())),
    }
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

async fn sms_send(body: Body) -> Reply {
    let invalid = |m: &str| fail(400, "invalid_request", Some(m.to_string()));
    // The body was buffered (and bounded) by `log_request`.
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return invalid("could not read request body");
    };
    let body: Value = match serde_json::from_slice(&bytes) {
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
    let message_id = match keys::random_hex(8) {
        Ok(hex) => format!("msg_{hex}"),
        Err(e) => return store_failure(StoreError::Random(e)),
    };
    Reply::ok(json!({
        "success": true,
        "provider": "dial",
        "messageId": message_id,
        "to": to,
        "segments": segments,
    }))
}

async fn account(State(state): State<DemoState>, headers: HeaderMap) -> Reply {
    let Some(account) = header(&headers, "x-dialtone-account").filter(|a| !a.is_empty()) else {
        return fail(400, "no_identity", None);
    };
    // An account that never topped up simply has no credits yet.
    let credits = match state
        .db
        .read(rules::Balance {
            account: account.to_string(),
        })
        .await
    {
        Ok(b) => b.unwrap_or(0),
        Err(e) => return store_failure(e),
    };
    let mut body = json!({
        "privyUserId": account,
        "credits": credits,
        "totalCredits": credits,
    });
    if header(&headers, "x-dialtone-auth-method") == Some("apikey") {
        if let Some(obj) = body.as_object_mut() {
            obj.insert("authMethod".into(), json!("apikey"));
            obj.insert(
                "apiKeyPrefix".into(),
                json!(header(&headers, "x-dialtone-key-prefix").unwrap_or_default()),
            );
        }
    }
    Reply::ok(body)
}

/// `POST /api/v1/credits/top-up`: credits the account the filter names for
/// an x402 payment the filter **settled** before forwarding the request
/// (the route's `settle: before_upstream`): `x-dialtone-account`,
/// `x-dialtone-x402-transaction`, `-network`, `-amount` come from the filter
/// only (it removes every client-sent `x-dialtone-*` header). Once per
/// settled transaction: the ledger's top-up row carries
/// `x402:<network>:<transaction>` as its idempotency key, so a replay
/// credits nothing. Without those headers nothing is credited (402).
async fn top_up(State(state): State<DemoState>, headers: HeaderMap) -> Reply {
    let paid = (
        header(&headers, "x-dialtone-x402-transaction").filter(|v| !v.is_empty()),
        header(&headers, "x-dialtone-x402-network").filter(|v| !v.is_empty()),
        header(&headers, "x-dialtone-x402-amount").and_then(|v| v.parse::<u128>().ok()),
    );
    let (Some(transaction), Some(network), Some(units)) = paid else {
        return fail(402, "payment_required", Some("no payment settled by the gate".into()));
    };
    let Some(account) = header(&headers, "x-dialtone-account").filter(|a| !a.is_empty()) else {
        return fail(400, "no_identity", Some("a top-up credits the Bearer's account".into()));
    };
    let credits = i64::try_from(units / TOPUP_UNITS_PER_CREDIT).unwrap_or(i64::MAX);
    if credits < 1 {
        return fail(400, "payment_too_small", Some(format!("one credit costs {TOPUP_UNITS_PER_CREDIT} units")));
    }
    let receipt = state
        .db
        .write(rules::Topup {
            account: account.to_string(),
            amount: credits,
            note: Some(TOPUP_NOTE.to_string()),
            idempotency_key: Some(format!("x402:{network}:{transaction}")),
            now: (state.clock)(),
        })
        .await;
    match receipt {
        Ok(r) => {
            let mut body = json!({
                "success": true,
                "credited": if r.replayed { 0 } else { r.amount },
                "credits": r.balance,
                "transaction": transaction,
            });
            if let (true, Some(obj)) = (r.replayed, body.as_object_mut()) {
                obj.insert("replayed".into(), json!(true));
            }
            Reply::ok(body)
        }
        Err(StoreError::IdempotencyConflict(_)) => fail(
            409,
            "payment_already_used",
            Some("this transaction already credited another account".into()),
        ),
        Err(e) => store_failure(e),
    }
}

/// Echo what arrived, so tests can see exactly what passed the filter.
/// Repeated headers are joined with ", " in arrival order.
async fn echo_or_not_found(req: Request) -> Reply {
    if !req.uri().path().starts_with("/echo") {
        return fail(404, "not_found", None);
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let mut headers = Map::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_string(), Value::String(value));
            }
        }
    }
    let path = parts.uri.path_and_query().map_or_else(
        || parts.uri.path().to_string(),
        |pq| pq.as_str().to_string(),
    );
    let body = json!({
        "method": parts.method.as_str(),
        "path": path,
        "headers": headers,
        "body": String::from_utf8_lossy(&bytes),
    });
    // Tests ask the upstream to fail on purpose (charge on success must not
    // charge for it): `x-demo-status: 500`.
    match header(&parts.headers, "x-demo-status").and_then(|s| s.parse::<u16>().ok()) {
        Some(status) if (200..=599).contains(&status) => Reply::json(status, body),
        _ => Reply::ok(body),
    }
}
