//! The credits HTTP API (documented in `docs/credits-service.openapi.yaml`).
//!
//! Called by the filter, with `x-dialtone-service-key` (see [`ServiceAuth`]):
//! - `POST /v1/keys/lookup`              resolve a key hash to account, scopes, state, balance
//! - `POST /v1/debit`                    charge credits, idempotently (optional `rate_limit`)
//! - `POST /v1/holds`                    reserve credits (charge on success; optional `rate_limit`)
//! - `POST /v1/holds/{id}/capture`       charge a hold
//! - `POST /v1/holds/{id}/release`       give a hold back (e.g. the upstream failed)
//! - `POST /v1/ratelimit`                take one request from the account's bucket
//! - `GET  /v1/accounts/{id}`            balance of an account
//!
//! Operator admin API under `/v1/admin/`, behind `Authorization: Bearer
//! <DIAL_ADMIN_API_KEY>` (see [`AdminAuth`]): keys, top-ups, ledger,
//! refunds, `check`.
//!
//! Without a key: `GET /healthz` (alive), `GET /readyz` (the database
//! answers), `GET /metrics` (Prometheus text; keep it off public networks).
//!
//! Handlers are thin: read the body, call the database, map the outcome.
//! The filter never sends secrets here, only SHA-256 hashes of them.

use crate::auth::AdminRefusal;
pub use crate::auth::{
    AdminAuth, ServiceAuth, ADMIN_KEY_ENV, ADMIN_REALM, MIN_ADMIN_KEY_CHARS, SERVICE_KEY_HEADER,
};
use crate::backend::{Db, DbOptions};
use crate::http::{percent_decode, read_body, record_key_prefix, HttpConfig, Reply, RunningServer};
use crate::keys::{self, Expiry, KeyKind, KeyState};
use crate::rules;
use crate::store::{
    DebitOutcome, DebitRequest, HoldOutcome, HoldRequest, KeyRecord, NewKey, RateDecision,
    RateLimit, RefundOutcome, ReleaseReason, SettleOutcome, StoreError,
};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io;
use std::sync::Arc;

/// Source of the current unix time in seconds; injectable for tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Source of the current unix time in milliseconds; injectable for tests.
pub type ClockMs = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Default and largest page of `GET /v1/admin/accounts/{a}/ledger`.
pub const DEFAULT_LEDGER_LIMIT: i64 = 100;
/// Default lifetime of an API token when none is given.
pub const DEFAULT_TOKEN_EXPIRY: Expiry = Expiry::Days(90);

/// The production clock (seconds).
pub fn system_clock() -> Clock {
    Arc::new(crate::store::unix_now)
}

/// The production clock (milliseconds).
pub fn system_clock_ms() -> ClockMs {
    Arc::new(crate::store::unix_now_ms)
}

/// Everything a handler needs besides the database.
#[derive(Clone)]
pub struct ApiConfig {
    pub clock_ms: ClockMs,
    pub admin: AdminAuth,
    /// Secrets accepted on `/v1/*` (not `/v1/admin/*`).
    pub service: ServiceAuth,
}

impl ApiConfig {
    /// System clock; admin key from `DIAL_ADMIN_API_KEY`; service keys from
    /// `DIAL_SERVICE_KEY` (+ `_PREVIOUS`), none (every `/v1/*` call
    /// refused) if unset or invalid.
    pub fn from_env() -> ApiConfig {
        ApiConfig {
            clock_ms: system_clock_ms(),
            admin: AdminAuth::from_env(),
            service: ServiceAuth::from_env()
                .ok()
                .flatten()
                .unwrap_or_else(ServiceAuth::none),
        }
    }

    /// A seconds clock (tests); keys as [`ApiConfig::from_env`].
    pub fn with_clock(clock: Clock) -> ApiConfig {
        ApiConfig {
            clock_ms: Arc::new(move || clock().saturating_mul(1000)),
            ..ApiConfig::from_env()
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub config: Arc<ApiConfig>,
    pub http: Arc<HttpConfig>,
}

impl AppState {
    fn now_ms(&self) -> i64 {
        (self.config.clock_ms)()
    }

    fn now(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }

    async fn body(&self, body: Body) -> Result<bytes::Bytes, Reply> {
        read_body(
            body,
            self.http.max_body_bytes,
            self.http.header_read_timeout,
        )
        .await
    }
}

/// Start the credits API on `listen` with `workers` runtime threads, on the
/// database `db` (a SQLite path or a `postgres://` URL).
pub fn start(listen: &str, workers: usize, db: &str) -> io::Result<RunningServer> {
    start_with_config(listen, workers, db, ApiConfig::from_env())
}

/// Like [`start`], with an explicit clock (seconds).
pub fn start_with_clock(
    listen: &str,
    workers: usize,
    db: &str,
    clock: Clock,
) -> io::Result<RunningServer> {
    start_with_config(listen, workers, db, ApiConfig::with_clock(clock))
}

/// Like [`start`], with an explicit configuration.
pub fn start_with_config(
    listen: &str,
    workers: usize,
    db: &str,
    config: ApiConfig,
) -> io::Result<RunningServer> {
    start_server(
        listen,
        workers,
        db,
        config,
        HttpConfig::default(),
        DbOptions::default(),
    )
}

/// Like [`start`], with every setting explicit.
pub fn start_server(
    listen: &str,
    workers: usize,
    db: &str,
    config: ApiConfig,
    http: HttpConfig,
    db_options: DbOptions,
) -> io::Result<RunningServer> {
    let db = db.to_string();
    let http_for_router = Arc::new(http.clone());
    RunningServer::start(listen, workers, "credits", http, move || {
        Box::pin(async move {
            let db = Db::open(&db, &db_options)
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            let state = AppState {
                db: db.clone(),
                config: Arc::new(config),
                http: http_for_router,
            };
            Ok((router(state), Some(db)))
        })
    })
}

/// The credits API.
pub fn router(state: AppState) -> Router {
    let http = Arc::clone(&state.http);
    let routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/keys/lookup", post(lookup))
        .route("/v1/debit", post(debit))
        .route("/v1/holds", post(hold))
        .route("/v1/holds/{id}/capture", post(capture))
        .route("/v1/holds/{id}/release", post(release))
        .route("/v1/leases", post(grant_lease))
        .route("/v1/leases/{id}/report", post(report_lease))
        .route("/v1/ratelimit", post(ratelimit))
        .route("/v1/x402/claims", post(claim_payment))
        .route("/v1/x402/claims/{claim}/release", post(release_claim))
        .route("/v1/accounts/{account}", get(account))
        .route(
            "/v1/admin/keys",
            get(admin_list_keys).post(admin_create_key),
        )
        .route("/v1/admin/keys/{prefix}/revoke", post(admin_revoke))
        .route("/v1/admin/accounts/{account}", get(admin_account))
        .route("/v1/admin/accounts/{account}/topup", post(admin_topup))
        .route("/v1/admin/accounts/{account}/ledger", get(admin_ledger))
        .route("/v1/admin/refund", post(admin_refund))
        .route("/v1/admin/check", get(admin_check))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state);
    crate::http::router_layers(routes, "credits", &http)
}

async fn not_found() -> Reply {
    Reply::error(404, "not_found")
}

/// 405 with the JSON body (axum adds the `Allow` header).
async fn method_not_allowed() -> Reply {
    Reply::error(405, "method_not_allowed")
}

fn is_admin_path(path: &str) -> bool {
    path == "/v1/admin" || path.starts_with("/v1/admin/")
}

/// `/v1/admin/*` needs the admin key; every other `/v1/*` path the service
/// key. A refused call never reaches a handler: nothing is read or written.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if is_admin_path(path) {
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match state.config.admin.authorize(authorization) {
            Ok(()) => {}
            Err(AdminRefusal::Disabled) => {
                return Reply::error(403, "admin_disabled").into_response()
            }
            Err(AdminRefusal::Unauthorized) => {
                return Reply::error(401, "unauthorized")
                    .with_header(
                        "WWW-Authenticate",
                        format!("Bearer realm=\"{ADMIN_REALM}\""),
                    )
                    .into_response()
            }
        }
    } else if path.starts_with("/v1/") {
        let presented = req.headers().get(SERVICE_KEY_HEADER).map(|v| v.as_bytes());
        if !state.config.service.allows(presented) {
            crate::metrics::service_key_rejected();
            if warn_now() {
                tracing::warn!(
                    presented = presented.is_some(),
                    "refused a call without a valid {SERVICE_KEY_HEADER} (logged at most every 10 s; \
                     dialtone_credits_service_key_rejections_total counts them all)"
                );
            }
            return Reply::json(401, json!({ "success": false, "error": "unauthorized" }))
                .with_header(
                    "WWW-Authenticate",
                    format!("{SERVICE_KEY_HEADER} realm=\"dialtone-credits\""),
                )
                .into_response();
        }
    }
    next.run(req).await
}

/// At most one such warning per 10 s, so a flood of refused calls (or an
/// outage under load) cannot flood the log; the metrics count them all.
pub(crate) fn warn_now() -> bool {
    static LAST: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(i64::MIN);
    let now = crate::store::unix_now();
    let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
    now.saturating_sub(last) >= 10
        && LAST
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
}

/// A store error as an answer: 400 for broken rules, 503 when the database
/// is unreachable or busy, 500 (logged) otherwise.
fn store_error(e: StoreError) -> Reply {
    if e.is_unavailable() {
        if warn_now() {
            tracing::warn!(error = %e, "database unavailable (logged at most every 10 s)");
        }
        return Reply::unavailable();
    }
    match e {
        StoreError::Invalid(msg) => Reply::bad_request(msg),
        StoreError::AccountNotFound(_) => Reply::error(404, "account_not_found"),
        other => {
            tracing::error!(error = %other, "storage failure");
            Reply::internal()
        }
    }
}

/// `Ok(value)` or the answer to give instead.
type Answer<T> = Result<T, Reply>;

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Answer<T> {
    serde_json::from_slice(body).map_err(|e| Reply::bad_request(format!("invalid JSON body: {e}")))
}

fn done(answer: Answer<Reply>) -> Reply {
    answer.unwrap_or_else(|reply| reply)
}

/// The `n`-th segment of the raw (still percent-encoded) path.
fn segment(uri: &Uri, n: usize) -> &str {
    uri.path().split('/').nth(n).unwrap_or_default()
}

async fn healthz() -> Reply {
    Reply::ok(json!({ "ok": true }))
}

async fn readyz(State(state): State<AppState>) -> Reply {
    match state.db.ping(std::time::Duration::from_secs(2)).await {
        Ok(()) => Reply::ok(json!({ "ok": true })),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            Reply::json(503, json!({ "ok": false, "error": "unavailable" }))
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let open_holds = state.db.read(rules::OpenHolds {}).await.ok();
    let text = crate::metrics::render(state.db.pool_stats(), open_holds);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response()
}

#[derive(Deserialize)]
struct LookupBody {
    key_sha256: String,
}

#[derive(Deserialize)]
struct RateLimitBody {
    requests: i64,
    window_seconds: i64,
    /// Defaults to `requests`.
    #[serde(default)]
    burst: Option<i64>,
}

impl RateLimitBody {
    fn limit(&self) -> RateLimit {
        RateLimit {
            requests: self.requests,
            window_seconds: self.window_seconds,
            burst: self.burst.unwrap_or(self.requests),
        }
    }
}

#[derive(Deserialize)]
struct DebitBody {
    account: String,
    amount: i64,
    idempotency_key: String,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    key_prefix: Option<String>,
    #[serde(default)]
    rate_limit: Option<RateLimitBody>,
}

#[derive(Deserialize)]
struct HoldBody {
    account: String,
    amount: i64,
    idempotency_key: String,
    ttl_seconds: i64,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    key_prefix: Option<String>,
    #[serde(default)]
    rate_limit: Option<RateLimitBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseBody {
    account: String,
    credits: i64,
    ttl_seconds: i64,
    min_balance_factor: i64,
    idempotency_key: String,
    #[serde(default)]
    holder: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpendBody {
    idempotency_key: String,
    amount: i64,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    key_prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportBody {
    #[serde(default)]
    spends: Vec<SpendBody>,
    #[serde(default, rename = "final")]
    final_report: bool,
}

#[derive(Deserialize)]
struct ReleaseBody {
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    claim: String,
    owner: String,
    ttl_seconds: i64,
    route: String,
}

#[derive(Deserialize)]
struct RateBody {
    account: String,
    rate_limit: RateLimitBody,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminKeyBody {
    account: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    preset: Option<String>,
    #[serde(default)]
    expires: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminTopupBody {
    amount: i64,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminRefundBody {
    idempotency_key: String,
    #[serde(default)]
    note: Option<String>,
}

fn rate_limited(retry_after_seconds: i64) -> Reply {
    Reply::json(
        429,
        json!({ "error": "rate_limited", "retry_after_seconds": retry_after_seconds }),
    )
    .with_header("Retry-After", retry_after_seconds.to_string())
}

fn insufficient(balance: i64, required: i64) -> Reply {
    Reply::json(
        402,
        json!({ "error": "insufficient_credits", "balance": balance, "required": required }),
    )
}

async fn lookup(State(state): State<AppState>, body: Body) -> Reply {
    done(
        async {
            let body: LookupBody = parse_json(&state.body(body).await?)?;
            let now = state.now();
            // A read on a pooled reader (no cache): a revoked key is refused on
            // its very next request, and a lookup never waits for the writer.
            let found = state
                .db
                .read(rules::LookupKey {
                    key_sha256: body.key_sha256.clone(),
                    now,
                })
                .await
                .map_err(store_error)?;
            Ok(match found {
                None => Reply::error(404, "key_not_found"),
                Some(l) => {
                    record_key_prefix(&l.key.prefix);
                    if l.key.state == KeyState::Active {
                        state.db.touch_key_later(&body.key_sha256, now);
                    }
                    Reply::ok(json!({
                        "account": l.key.account,
                        "key_prefix": l.key.prefix,
                        "kind": l.key.kind.as_str(),
                        "scopes": l.key.scopes,
                        "state": l.key.state.as_str(),
                        "expires_at": l.key.expires_at,
                        "balance": l.balance,
                    }))
                }
            })
        }
        .await,
    )
}

async fn debit(State(state): State<AppState>, body: Body) -> Reply {
    done(
        async {
            let body: DebitBody = parse_json(&state.body(body).await?)?;
            if let Some(p) = &body.key_prefix {
                record_key_prefix(p);
            }
            let rate = body.rate_limit.as_ref().map(RateLimitBody::limit);
            let req = DebitRequest {
                account: body.account,
                amount: body.amount,
                idempotency_key: body.idempotency_key,
                route: body.route,
                key_prefix: body.key_prefix,
            };
            let outcome = state
                .db
                .write(rules::Debit {
                    req,
                    rate,
                    now_ms: state.now_ms(),
                })
                .await
                .map_err(store_error)?;
            Ok(match outcome {
                DebitOutcome::Charged {
                    account,
                    charged,
                    balance,
                    replayed,
                } => Reply::ok(json!({
                    "account": account,
                    "charged": charged,
                    "balance": balance,
                    "replayed": replayed,
                })),
                DebitOutcome::Insufficient { balance, required } => insufficient(balance, required),
                DebitOutcome::Conflict => Reply::error(409, "idempotency_conflict"),
                DebitOutcome::RateLimited {
                    retry_after_seconds,
                } => rate_limited(retry_after_seconds),
            })
        }
        .await,
    )
}

async fn hold(State(state): State<AppState>, body: Body) -> Reply {
    done(
        async {
            let body: HoldBody = parse_json(&state.body(body).await?)?;
            if let Some(p) = &body.key_prefix {
                record_key_prefix(p);
            }
            let rate = body.rate_limit.as_ref().map(RateLimitBody::limit);
            let req = HoldRequest {
                account: body.account,
                amount: body.amount,
                idempotency_key: body.idempotency_key,
                ttl_seconds: body.ttl_seconds,
                route: body.route,
                key_prefix: body.key_prefix,
            };
            let outcome = state
                .db
                .write(rules::CreateHold {
                    req,
                    rate,
                    now_ms: state.now_ms(),
                })
                .await
                .map_err(store_error)?;
            Ok(match outcome {
                HoldOutcome::Held(h) => Reply::ok(json!({
                    "hold_id": h.hold_id,
                    "account": h.account,
                    "amount": h.amount,
                    "balance": h.balance,
                    "expires_at": h.expires_at,
                    "replayed": h.replayed,
                })),
                HoldOutcome::Insufficient { balance, required } => insufficient(balance, required),
                HoldOutcome::Conflict => Reply::error(409, "idempotency_conflict"),
                HoldOutcome::RateLimited {
                    retry_after_seconds,
                } => rate_limited(retry_after_seconds),
            })
        }
        .await,
    )
}

/// `POST /v1/leases`: a lease of credits for one Envoy to spend locally
/// (see `rules::leases`). 200 with `granted: true` and the lease, or
/// `granted: false` when the account cannot spare it now.
async fn grant_lease(State(state): State<AppState>, body: Body) -> Reply {
    done(
        async {
            let body: LeaseBody = parse_json(&state.body(body).await?)?;
            let req = rules::LeaseRequest {
                account: body.account,
                credits: body.credits,
                ttl_seconds: body.ttl_seconds,
                min_balance_factor: body.min_balance_factor,
                idempotency_key: body.idempotency_key,
                holder: body.holder,
            };
            let outcome = state
                .db
                .write(rules::GrantLease { req, now: state.now() })
                .await
                .map_err(store_error)?;
            Ok(match outcome {
                rules::LeaseOutcome::Granted(l) => {
                    crate::metrics::lease_requested(l.open);
                    tracing::debug!(account = %l.account, lease = %l.lease_id, credits = l.credits, "lease granted");
                    Reply::ok(json!({
                        "granted": l.open,
                        "lease_id": l.lease_id,
                        "account": l.account,
                        "credits": l.credits,
                        "balance": l.balance,
                        "expires_at": l.expires_at,
                        "ttl_seconds": (l.expires_at - state.now()).max(0),
                        "replayed": l.replayed,
                    }))
                }
                rules::LeaseOutcome::Declined { balance, needed, recalling } => {
                    crate::metrics::lease_requested(false);
                    Reply::ok(json!({
                        "granted": false,
                        "balance": balance,
                        "needed": needed,
                        "recalling": recalling,
                    }))
                }
                rules::LeaseOutcome::Conflict => Reply::error(409, "idempotency_conflict"),
            })
        }
        .await,
    )
}

/// `POST /v1/leases/{id}/report`: the spends of a lease since the last
/// report (each recorded once), and with `final: true` its closing.
async fn report_lease(State(state): State<AppState>, uri: Uri, body: Body) -> Reply {
    done(
        async {
            let Some(lease_id) = percent_decode(segment(&uri, 3)) else {
                return Ok(Reply::error(404, "lease_not_found"));
            };
            let body: ReportBody = parse_json(&state.body(body).await?)?;
            let spends: Vec<rules::Spend> = body
                .spends
                .into_iter()
                .map(|s| rules::Spend {
                    idempotency_key: s.idempotency_key,
                    amount: s.amount,
                    route: s.route,
                    key_prefix: s.key_prefix,
                })
                .collect();
            let outcome = state
                .db
                .write(rules::ReportLease {
                    lease_id,
                    spends,
                    final_report: body.final_report,
                    now: state.now(),
                })
                .await
                .map_err(store_error)?;
            Ok(match outcome {
                rules::ReportOutcome::NotFound => Reply::error(404, "lease_not_found"),
                rules::ReportOutcome::Reported(r) => {
                    crate::metrics::lease_spends(r.recorded, r.replayed, r.refused.len());
                    if !r.refused.is_empty() {
                        tracing::warn!(
                            lease = %r.lease_id,
                            refused = r.refused.len(),
                            first = r.refused.first().map(|(_, why)| why.as_str()).unwrap_or_default(),
                            "lease spends refused"
                        );
                    }
                    let refused: Vec<serde_json::Value> = r
                        .refused
                        .iter()
                        .map(|(key, why)| json!({ "idempotency_key": key, "reason": why.as_str() }))
                        .collect();
                    Reply::ok(json!({
                        "lease_id": r.lease_id,
                        "account": r.account,
                        "state": if r.open { "open" } else { "closed" },
                        "close_reason": r.close_reason,
                        "credits": r.credits,
                        "spent": r.spent,
                        "remaining": r.credits - r.spent,
                        "returned": r.returned,
                        "recall": r.recall,
                        "expires_at": r.expires_at,
                        "balance": r.balance,
                        "recorded": r.recorded,
                        "replayed": r.replayed,
                        "refused": refused,
                    }))
                }
            })
        }
        .await,
    )
}

async fn capture(State(state): State<AppState>, uri: Uri) -> Reply {
    done(settle(&state, segment(&uri, 3), None).await)
}

async fn release(State(state): State<AppState>, uri: Uri, body: Body) -> Reply {
    done(
        async {
            let body = state.body(body).await?;
            let reason = if body.iter().all(u8::is_ascii_whitespace) {
                ReleaseReason::Requested
            } else {
                let body: ReleaseBody = parse_json(&body)?;
                match body.reason.as_deref() {
                    None => ReleaseReason::Requested,
                    Some(r @ ("upstream_error" | "requested")) => {
                        ReleaseReason::parse(r).unwrap_or(ReleaseReason::Requested)
                    }
                    Some(other) => {
                        return Err(Reply::bad_request(format!(
                            "reason must be upstream_error or requested, got {other:?}"
                        )))
                    }
                }
            };
            settle(&state, segment(&uri, 3), Some(reason)).await
        }
        .await,
    )
}

/// Capture (`release == None`) or release a hold.
async fn settle(
    state: &AppState,
    encoded_id: &str,
    release: Option<ReleaseReason>,
) -> Answer<Reply> {
    let Some(hold_id) = percent_decode(encoded_id) else {
        return Ok(Reply::error(404, "hold_not_found"));
    };
    let outcome = state
        .db
        .write(rules::Settle {
            hold_id,
            release,
            now: state.now(),
        })
        .await
        .map_err(store_error)?;
    Ok(match outcome {
        SettleOutcome::Settled(s) => {
            let mut body = json!({
                "hold_id": s.hold_id,
                "state": s.state.as_str(),
                "account": s.account,
                "amount": s.amount,
                "balance": s.balance,
                "held": s.held,
            });
            if let (Some(r), Some(obj)) = (s.release_reason, body.as_object_mut()) {
                obj.insert("reason".into(), json!(r.as_str()));
            }
            Reply::ok(body)
        }
        SettleOutcome::NotOpen { state } => Reply::json(
            409,
            json!({ "error": "hold_not_open", "state": state.as_str() }),
        ),
        SettleOutcome::NotFound => Reply::error(404, "hold_not_found"),
    })
}

async fn ratelimit(State(state): State<AppState>, body: Body) -> Reply {
    done(
        async {
            let body: RateBody = parse_json(&state.body(body).await?)?;
            let decision = state
                .db
                .write(rules::RateTake {
                    account: body.account,
                    limit: body.rate_limit.limit(),
                    now_ms: state.now_ms(),
                })
                .await
                .map_err(store_error)?;
            Ok(match decision {
                RateDecision::Allowed { remaining } => {
                    Reply::ok(json!({ "allowed": true, "remaining": remaining }))
                }
                RateDecision::Limited {
                    retry_after_seconds,
                } => rate_limited(retry_after_seconds),
            })
        }
        .await,
    )
}

/// `POST /v1/x402/claims`: one request at a time on one x402 payment.
async fn claim_payment(State(state): State<AppState>, body: Body) -> Reply {
    done(
        async {
            let body: ClaimBody = parse_json(&state.body(body).await?)?;
            let outcome = state
                .db
                .write(rules::ClaimPayment {
                    claim: body.claim.clone(),
                    owner: body.owner,
                    route: body.route,
                    ttl_seconds: body.ttl_seconds,
                    now: state.now(),
                })
                .await
                .map_err(store_error)?;
            Ok(match outcome {
                rules::ClaimOutcome::Claimed { replayed } => Reply::json(
                    if replayed { 200 } else { 201 },
                    json!({ "claim": body.claim, "claimed": true, "replayed": replayed }),
                ),
                rules::ClaimOutcome::InUse => {
                    Reply::json(409, json!({ "claim": body.claim, "error": "claim_in_use" }))
                }
            })
        }
        .await,
    )
}

/// `POST /v1/x402/claims/{claim}/release`: the upstream failed, nothing was
/// settled; the same payment may be sent again.
async fn release_claim(State(state): State<AppState>, uri: Uri) -> Reply {
    done(
        async {
            let claim = segment(&uri, 4).to_string();
            let released = state
                .db
                .write(rules::ReleaseClaim { claim: claim.clone(), now: state.now() })
                .await
                .map_err(store_error)?;
            Ok(if released {
                Reply::ok(json!({ "claim": claim, "released": true }))
            } else {
                Reply::json(404, json!({ "claim": claim, "error": "claim_not_found" }))
            })
        }
        .await,
    )
}

async fn account(State(state): State<AppState>, uri: Uri) -> Reply {
    done(
        async {
            let Some(account) = percent_decode(segment(&uri, 3)) else {
                return Ok(Reply::bad_request(
                    "account path segment has an invalid percent-encoding",
                ));
            };
            let summary = state
                .db
                .read(rules::AccountView {
                    account: account.clone(),
                    now: state.now(),
                })
                .await
                .map_err(store_error)?;
            Ok(match summary {
                None => Reply::error(404, "account_not_found"),
                // total_credits is the balance across all credit sources; there is
                // only one source today, so it equals the (available) balance.
                Some(s) => Reply::ok(json!({
                    "account": account,
                    "balance": s.balance,
                    "total_credits": s.balance,
                })),
            })
        }
        .await,
    )
}

// ----- admin ----------------------------------------------------------------

/// Value of a query-string parameter (percent-decoded), if present.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v)).flatten()
    })
}

/// JSON of a key as operators see it (never the hash or the secret).
pub fn key_json(k: &KeyRecord) -> Value {
    json!({
        "prefix": k.prefix,
        "account": k.account,
        "kind": k.kind.as_str(),
        "scopes": k.scopes,
        "name": k.name,
        "state": k.state.as_str(),
        "created_at": k.created_at,
        "last_used_at": k.last_used_at,
        "expires_at": k.expires_at,
        "revoked_at": k.revoked_at,
    })
}

/// Resolve kind, scopes, name and expiry of a new key from the operator's
/// choices and an optional preset (`agent`). Shared by the CLI and the API.
pub fn new_key_from_options(
    account: String,
    kind: Option<&str>,
    scopes: Option<Vec<String>>,
    preset: Option<&str>,
    expires: Option<&str>,
    name: Option<String>,
) -> Result<NewKey, String> {
    let agent = match preset {
        None => false,
        Some(keys::AGENT_PRESET) => true,
        Some(other) => {
            return Err(format!(
                "unknown preset {other:?}; the only preset is agent"
            ))
        }
    };
    let kind = match kind {
        None => KeyKind::ApiKey,
        Some(k) => KeyKind::parse(k)
            .ok_or_else(|| format!("kind must be api_key or api_token, got {k:?}"))?,
    };
    if agent && kind != KeyKind::ApiKey {
        return Err("the agent preset makes an api_key".into());
    }
    let expiry = match (kind, expires) {
        (KeyKind::ApiKey, Some(_)) => {
            return Err("api keys never expire; an expiry applies to api_token only".into())
        }
        (KeyKind::ApiKey, None) => Expiry::Never,
        (KeyKind::ApiToken, None) => DEFAULT_TOKEN_EXPIRY,
        (KeyKind::ApiToken, Some(e)) => Expiry::parse(e)?,
    };
    let scopes = match scopes {
        Some(list) => {
            let mut out: Vec<String> = Vec::new();
            for s in list {
                keys::validate_scope(&s)?;
                if !out.contains(&s) {
                    out.push(s);
                }
            }
            out
        }
        None if agent => keys::AGENT_SCOPES
            .iter()
            .map(|s| (*s).to_string())
            .collect(),
        None => Vec::new(),
    };
    let name = name.or_else(|| agent.then(|| keys::AGENT_NAME.to_string()));
    Ok(NewKey {
        account,
        kind,
        scopes,
        name,
        expiry,
    })
}

async fn admin_list_keys(State(state): State<AppState>, uri: Uri) -> Reply {
    done(
        async {
            let url = uri.to_string();
            let Some(account) = query_param(&url, "account").filter(|a| !a.is_empty()) else {
                return Ok(Reply::bad_request("query parameter account is required"));
            };
            let keys = state
                .db
                .read(rules::ListKeys {
                    account: account.clone(),
                    now: state.now(),
                })
                .await
                .map_err(store_error)?;
            Ok(Reply::ok(json!({
                "account": account,
                "keys": keys.iter().map(key_json).collect::<Vec<_>>(),
            })))
        }
        .await,
    )
}

async fn admin_create_key(State(state): State<AppState>, body: Body) -> Reply {
    done(
        async {
            let body: AdminKeyBody = parse_json(&state.body(body).await?)?;
            let new = new_key_from_options(
                body.account,
                body.kind.as_deref(),
                body.scopes,
                body.preset.as_deref(),
                body.expires.as_deref(),
                body.name,
            )
            .map_err(Reply::bad_request)?;
            match state
                .db
                .write(rules::CreateKey {
                    new,
                    now: state.now(),
                })
                .await
            {
                Ok(k) => {
                    record_key_prefix(&k.prefix);
                    Ok(Reply::json(
                        201,
                        json!({
                            "secret": k.secret,
                            "prefix": k.prefix,
                            "account": k.account,
                            "kind": k.kind.as_str(),
                            "scopes": k.scopes,
                            "name": k.name,
                            "created_at": k.created_at,
                            "expires_at": k.expires_at,
                        }),
                    ))
                }
                Err(StoreError::TooManyTokens { limit, .. }) => Ok(Reply::json(
                    409,
                    json!({ "error": "token_limit", "limit": limit }),
                )),
                Err(e) => Err(store_error(e)),
            }
        }
        .await,
    )
}

async fn admin_revoke(State(state): State<AppState>, uri: Uri) -> Reply {
    let prefix = segment(&uri, 4).to_string();
    record_key_prefix(&prefix);
    match state
        .db
        .write(rules::Revoke {
            prefix,
            now: state.now(),
        })
        .await
    {
        Ok(r) => Reply::ok(json!({
            "prefix": r.prefix,
            "account": r.account,
            "kind": r.kind.as_str(),
            "revoked_at": r.revoked_at,
        })),
        Err(StoreError::KeyNotFound(_)) => Reply::error(404, "key_not_found"),
        Err(StoreError::AmbiguousPrefix { matches, .. }) => Reply::json(
            409,
            json!({ "error": "ambiguous_prefix", "matches": matches }),
        ),
        Err(e) => store_error(e),
    }
}

fn admin_account_name(uri: &Uri) -> Answer<String> {
    percent_decode(segment(uri, 4)).ok_or_else(|| Reply::bad_request("invalid percent-encoding"))
}

async fn admin_account(State(state): State<AppState>, uri: Uri) -> Reply {
    done(
        async {
            let account = admin_account_name(&uri)?;
            let summary = state
                .db
                .read(rules::AccountView {
                    account: account.clone(),
                    now: state.now(),
                })
                .await
                .map_err(store_error)?;
            let Some(s) = summary else {
                return Ok(Reply::error(404, "account_not_found"));
            };
            let leases = state
                .db
                .read(rules::OpenLeases { account: account.clone() })
                .await
                .map_err(store_error)?;
            let leases: Vec<serde_json::Value> = leases
                .iter()
                .map(|l| {
                    json!({
                        "lease_id": l.lease_id,
                        "credits": l.credits,
                        "spent": l.spent,
                        "recall": l.recall,
                        "holder": l.holder,
                        "expires_at": l.expires_at,
                    })
                })
                .collect();
            Ok(Reply::ok(json!({
                "account": account,
                "balance": s.balance,
                "held": s.held,
                "total": s.total(),
                "open_leases": leases,
            })))
        }
        .await,
    )
}

async fn admin_topup(State(state): State<AppState>, uri: Uri, body: Body) -> Reply {
    done(
        async {
            let account = admin_account_name(&uri)?;
            let body: AdminTopupBody = parse_json(&state.body(body).await?)?;
            match state
                .db
                .write(rules::Topup {
                    account,
                    amount: body.amount,
                    note: body.note,
                    idempotency_key: body.idempotency_key,
                    now: state.now(),
                })
                .await
            {
                Ok(r) => Ok(Reply::ok(json!({
                    "account": r.account,
                    "credited": if r.replayed { 0 } else { r.amount },
                    "balance": r.balance,
                    "replayed": r.replayed,
                }))),
                Err(StoreError::IdempotencyConflict(_)) => {
                    Ok(Reply::error(409, "idempotency_conflict"))
                }
                Err(e) => Err(store_error(e)),
            }
        }
        .await,
    )
}

async fn admin_ledger(State(state): State<AppState>, uri: Uri) -> Reply {
    done(
        async {
            let account = admin_account_name(&uri)?;
            let url = uri.to_string();
            let limit = match query_param(&url, "limit") {
                None => DEFAULT_LEDGER_LIMIT,
                Some(l) => match l.parse::<i64>() {
                    Ok(n) if (1..=crate::store::MAX_LEDGER_LIMIT).contains(&n) => n,
                    _ => {
                        return Ok(Reply::bad_request(format!(
                            "limit must be 1..={}",
                            crate::store::MAX_LEDGER_LIMIT
                        )))
                    }
                },
            };
            let balance = state
                .db
                .read(rules::Balance {
                    account: account.clone(),
                })
                .await
                .map_err(store_error)?;
            if balance.is_none() {
                return Ok(Reply::error(404, "account_not_found"));
            }
            let entries = state
                .db
                .read(rules::Ledger {
                    account: account.clone(),
                    limit,
                })
                .await
                .map_err(store_error)?;
            Ok(Reply::ok(json!({
                "account": account,
                "entries": entries.iter().map(ledger_json).collect::<Vec<_>>(),
            })))
        }
        .await,
    )
}

async fn admin_refund(State(state): State<AppState>, body: Body) -> Reply {
    done(
        async {
            let body: AdminRefundBody = parse_json(&state.body(body).await?)?;
            let outcome = state
                .db
                .write(rules::Refund {
                    idempotency_key: body.idempotency_key,
                    note: body.note,
                    now: state.now(),
                })
                .await
                .map_err(store_error)?;
            Ok(refund_reply(&outcome))
        }
        .await,
    )
}

async fn admin_check(State(state): State<AppState>) -> Reply {
    match state.db.read(rules::Check {}).await {
        Ok(report) => Reply::ok(json!({
            "ok": report.is_ok(),
            "accounts": report.accounts,
            "ledger_rows": report.ledger_rows,
            "problems": report.problems,
        })),
        Err(e) => store_error(e),
    }
}

/// JSON of one ledger row.
pub fn ledger_json(e: &crate::store::LedgerEntry) -> Value {
    json!({
        "id": e.id,
        "kind": e.kind,
        "delta_available": e.delta_available,
        "delta_held": e.delta_held,
        "amount": e.amount,
        "hold_id": e.hold_id,
        "idempotency_key": e.idempotency_key,
        "route": e.route,
        "key_prefix": e.key_prefix,
        "note": e.note,
        "created_at": e.created_at,
    })
}

/// A done refund as the admin API and `dialtone-credits refund --json` show it.
pub fn refunded_json(outcome: &RefundOutcome) -> Option<Value> {
    match outcome {
        RefundOutcome::Refunded {
            account,
            amount,
            balance,
            idempotency_key,
            hold_id,
        } => Some(json!({
            "refunded": amount,
            "account": account,
            "balance": balance,
            "idempotency_key": idempotency_key,
            "hold_id": hold_id,
        })),
        _ => None,
    }
}

/// The admin API's answer to a refund.
pub fn refund_reply(outcome: &RefundOutcome) -> Reply {
    match outcome {
        RefundOutcome::Refunded { .. } => Reply::ok(refunded_json(outcome).unwrap_or_default()),
        RefundOutcome::AlreadyRefunded { .. } => Reply::error(409, "already_refunded"),
        RefundOutcome::NotFound => Reply::error(404, "nothing_to_refund"),
        RefundOutcome::NotRefundable { state } => Reply::json(
            409,
            json!({ "error": "not_refundable", "state": state.as_str() }),
        ),
    }
}
