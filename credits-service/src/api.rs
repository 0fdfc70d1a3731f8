//! The credits HTTP API (documented in `docs/credits-service.openapi.yaml`).
//!
//! Called by the filter (no authentication: bind it where only Envoy reaches):
//! - `POST /v1/keys/lookup`              resolve a key hash to account, scopes, state, balance
//! - `POST /v1/debit`                    charge credits, idempotently (optional `rate_limit`)
//! - `POST /v1/holds`                    reserve credits (charge on success; optional `rate_limit`)
//! - `POST /v1/holds/{id}/capture`       charge a hold
//! - `POST /v1/holds/{id}/release`       give a hold back (e.g. the upstream failed)
//! - `POST /v1/ratelimit`                take one request from the account's bucket
//! - `GET  /v1/accounts/{id}`            balance of an account
//! - `GET  /healthz`                     liveness
//!
//! Operator admin API under `/v1/admin/`, behind `Authorization: Bearer
//! <DIAL_ADMIN_API_KEY>` (see [`AdminAuth`]): keys, top-ups, ledger,
//! refunds, `check`.
//!
//! The filter never sends secrets here, only SHA-256 hashes of them.

use crate::http::{percent_decode, Handler, Reply, RequestCtx, RunningServer};
use crate::keys::{self, Expiry, KeyKind};
use crate::store::{
    DebitOutcome, DebitRequest, HoldOutcome, HoldRequest, KeyRecord, NewKey,
    RateDecision, RateLimit, RefundOutcome, ReleaseReason, SettleOutcome, Store, StoreError,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

/// The store shared by all worker threads. SQLite serialises writers anyway,
/// and every request is a few short statements, so one connection is enough.
pub type SharedStore = Arc<Mutex<Store>>;

/// Source of the current unix time in seconds; injectable for tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Source of the current unix time in milliseconds; injectable for tests.
pub type ClockMs = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Environment variable holding the operator admin key.
pub const ADMIN_KEY_ENV: &str = "DIAL_ADMIN_API_KEY";
/// Shortest admin key accepted; shorter (or unset) disables the admin API.
pub const MIN_ADMIN_KEY_CHARS: usize = 16;
/// Realm of the admin API's `WWW-Authenticate` challenge.
pub const ADMIN_REALM: &str = "dialtone-admin";
/// Default and largest page of `GET /v1/admin/accounts/{a}/ledger`.
pub const DEFAULT_LEDGER_LIMIT: i64 = 100;

/// The production clock (seconds).
pub fn system_clock() -> Clock {
    Arc::new(crate::store::unix_now)
}

/// The production clock (milliseconds).
pub fn system_clock_ms() -> ClockMs {
    Arc::new(crate::store::unix_now_ms)
}

/// Who may use `/v1/admin/*`: nobody (`Disabled`), or the holder of the key
/// whose SHA-256 is kept here (the key itself is not kept).
#[derive(Clone)]
pub enum AdminAuth {
    Disabled,
    Key([u8; 32]),
}

impl AdminAuth {
    /// From the configured key: unset or shorter than 16 characters disables.
    pub fn from_key(key: Option<&str>) -> AdminAuth {
        match key {
            Some(k) if k.chars().count() >= MIN_ADMIN_KEY_CHARS => {
                AdminAuth::Key(Sha256::digest(k.as_bytes()).into())
            }
            _ => AdminAuth::Disabled,
        }
    }

    /// From `DIAL_ADMIN_API_KEY`.
    pub fn from_env() -> AdminAuth {
        let key = std::env::var(ADMIN_KEY_ENV).ok();
        AdminAuth::from_key(key.as_deref())
    }

    /// `Ok` when the request carries the admin key; otherwise the reply.
    fn authorize(&self, req: &RequestCtx) -> Result<(), Reply> {
        let AdminAuth::Key(expected) = self else {
            return Err(Reply::error(403, "admin_disabled"));
        };
        let unauthorized = || {
            Reply::error(401, "unauthorized")
                .with_header("WWW-Authenticate", format!("Bearer realm=\"{ADMIN_REALM}\""))
        };
        let presented = req
            .header("authorization")
            .and_then(|h| {
                let (scheme, token) = h.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(unauthorized)?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Constant time: fold every byte difference, branch once.
        let diff = digest
            .iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            Ok(())
        } else {
            Err(unauthorized())
        }
    }
}

/// Everything a handler needs besides the store.
#[derive(Clone)]
pub struct ApiConfig {
    pub clock_ms: ClockMs,
    pub admin: AdminAuth,
}

impl ApiConfig {
    /// System clock, admin key from `DIAL_ADMIN_API_KEY`.
    pub fn from_env() -> ApiConfig {
        ApiConfig {
            clock_ms: system_clock_ms(),
            admin: AdminAuth::from_env(),
        }
    }

    /// A seconds clock (tests), admin key from the environment.
    pub fn with_clock(clock: Clock) -> ApiConfig {
        ApiConfig {
            clock_ms: Arc::new(move || clock().saturating_mul(1000)),
            admin: AdminAuth::from_env(),
        }
    }
}

/// Start the credits API on `listen` with `workers` threads.
pub fn start(listen: &str, workers: usize, store: SharedStore) -> io::Result<RunningServer> {
    start_with_config(listen, workers, store, ApiConfig::from_env())
}

/// Like [`start`], with an explicit clock (seconds).
pub fn start_with_clock(
    listen: &str,
    workers: usize,
    store: SharedStore,
    clock: Clock,
) -> io::Result<RunningServer> {
    start_with_config(listen, workers, store, ApiConfig::with_clock(clock))
}

/// Like [`start`], with an explicit configuration.
pub fn start_with_config(
    listen: &str,
    workers: usize,
    store: SharedStore,
    config: ApiConfig,
) -> io::Result<RunningServer> {
    let handler: Handler = Arc::new(move |req: &RequestCtx| handle(&store, &config, req));
    RunningServer::start(listen, workers, "credits", handler)
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
struct ReleaseBody {
    #[serde(default)]
    reason: Option<String>,
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

/// Route one request with an explicit seconds clock and the admin key from
/// the environment. Never panics; storage failures become 500 JSON.
pub fn handle_with_clock(store: &Mutex<Store>, clock: Clock, req: &RequestCtx) -> Reply {
    handle(store, &ApiConfig::with_clock(clock), req)
}

/// Route one request. Never panics; storage failures become 500 JSON.
pub fn handle(store: &Mutex<Store>, config: &ApiConfig, req: &RequestCtx) -> Reply {
    let path = req.path.as_str();
    let method = req.method.as_str();
    let now_ms = (config.clock_ms)();
    let result = route(store, config, now_ms, req);
    result.unwrap_or_else(|e| match e {
        StoreError::Invalid(msg) => Reply::bad_request(msg),
        StoreError::AccountNotFound(_) => Reply::error(404, "account_not_found"),
        other => {
            eprintln!("credits: {method} {path}: {other}");
            Reply::internal()
        }
    })
}

fn route(
    store: &Mutex<Store>,
    config: &ApiConfig,
    now_ms: i64,
    req: &RequestCtx,
) -> Result<Reply, StoreError> {
    let path = req.path.as_str();
    let method = req.method.as_str();
    let post = |f: &dyn Fn() -> Result<Reply, StoreError>| match method {
        "POST" => f(),
        _ => Ok(Reply::method_not_allowed("POST")),
    };
    let get = |f: &dyn Fn() -> Result<Reply, StoreError>| match method {
        "GET" => f(),
        _ => Ok(Reply::method_not_allowed("GET")),
    };
    match path {
        "/healthz" => return get(&|| Ok(Reply::ok(json!({ "ok": true })))),
        "/v1/keys/lookup" => return post(&|| lookup(store, now_ms, req)),
        "/v1/debit" => return post(&|| debit(store, now_ms, req)),
        "/v1/holds" => return post(&|| hold(store, now_ms, req)),
        "/v1/ratelimit" => return post(&|| ratelimit(store, now_ms, req)),
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/v1/holds/") {
        let parts: Vec<&str> = rest.split('/').collect();
        return match parts.as_slice() {
            [id, "capture"] if !id.is_empty() => post(&|| settle(store, now_ms, id, None, req)),
            [id, "release"] if !id.is_empty() => {
                post(&|| settle(store, now_ms, id, Some(()), req))
            }
            _ => Ok(Reply::error(404, "not_found")),
        };
    }
    if path == "/v1/admin" || path.starts_with("/v1/admin/") {
        if let Err(reply) = config.admin.authorize(req) {
            return Ok(reply);
        }
        return admin(store, now_ms, req);
    }
    match path.strip_prefix("/v1/accounts/") {
        Some(encoded) if !encoded.is_empty() && !encoded.contains('/') => {
            get(&|| account(store, now_ms, encoded))
        }
        _ => Ok(Reply::error(404, "not_found")),
    }
}

fn lock(store: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    // A panic while holding the lock cannot leave the database
    // mid-transaction (the transaction guard rolls back on unwind), so
    // poisoning is harmless.
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

fn parse_json<T: serde::de::DeserializeOwned>(req: &RequestCtx) -> Result<T, Reply> {
    serde_json::from_slice(&req.body)
        .map_err(|e| Reply::bad_request(format!("invalid JSON body: {e}")))
}

macro_rules! body_or_reply {
    ($req:expr) => {
        match parse_json($req) {
            Ok(b) => b,
            Err(reply) => return Ok(reply),
        }
    };
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

fn lookup(store: &Mutex<Store>, now_ms: i64, req: &RequestCtx) -> Result<Reply, StoreError> {
    let body: LookupBody = body_or_reply!(req);
    // Reads the key row on every call (no cache): a revoked key is refused
    // on its very next request.
    let found = lock(store).lookup_key(&body.key_sha256, now_ms.div_euclid(1000))?;
    Ok(match found {
        None => Reply::error(404, "key_not_found"),
        Some(l) => Reply::ok(json!({
            "account": l.key.account,
            "key_prefix": l.key.prefix,
            "kind": l.key.kind.as_str(),
            "scopes": l.key.scopes,
            "state": l.key.state.as_str(),
            "expires_at": l.key.expires_at,
            "balance": l.balance,
        })),
    })
}

fn debit(store: &Mutex<Store>, now_ms: i64, req: &RequestCtx) -> Result<Reply, StoreError> {
    let body: DebitBody = body_or_reply!(req);
    let rate = body.rate_limit.as_ref().map(RateLimitBody::limit);
    let request = DebitRequest {
        account: body.account,
        amount: body.amount,
        idempotency_key: body.idempotency_key,
        route: body.route,
        key_prefix: body.key_prefix,
    };
    let outcome = lock(store).debit_limited(&request, rate.as_ref(), now_ms)?;
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

fn hold(store: &Mutex<Store>, now_ms: i64, req: &RequestCtx) -> Result<Reply, StoreError> {
    let body: HoldBody = body_or_reply!(req);
    let rate = body.rate_limit.as_ref().map(RateLimitBody::limit);
    let request = HoldRequest {
        account: body.account,
        amount: body.amount,
        idempotency_key: body.idempotency_key,
        ttl_seconds: body.ttl_seconds,
        route: body.route,
        key_prefix: body.key_prefix,
    };
    let outcome = lock(store).create_hold(&request, rate.as_ref(), now_ms)?;
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

/// Capture (`release == None`) or release a hold.
fn settle(
    store: &Mutex<Store>,
    now_ms: i64,
    encoded_id: &str,
    release: Option<()>,
    req: &RequestCtx,
) -> Result<Reply, StoreError> {
    let Some(hold_id) = percent_decode(encoded_id) else {
        return Ok(Reply::error(404, "hold_not_found"));
    };
    let now = now_ms.div_euclid(1000);
    let outcome = match release {
        None => lock(store).capture_hold(&hold_id, now)?,
        Some(()) => {
            let reason = if req.body.iter().all(u8::is_ascii_whitespace) {
                ReleaseReason::Requested
            } else {
                let body: ReleaseBody = body_or_reply!(req);
                match body.reason.as_deref() {
                    None => ReleaseReason::Requested,
                    Some(r @ ("upstream_error" | "requested")) => {
                        ReleaseReason::parse(r).unwrap_or(ReleaseReason::Requested)
                    }
                    Some(other) => {
                        return Ok(Reply::bad_request(format!(
                            "reason must be upstream_error or requested, got {other:?}"
                        )))
                    }
                }
            };
            lock(store).release_hold(&hold_id, reason, now)?
        }
    };
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

fn ratelimit(store: &Mutex<Store>, now_ms: i64, req: &RequestCtx) -> Result<Reply, StoreError> {
    let body: RateBody = body_or_reply!(req);
    let decision = lock(store).rate_limit(&body.account, &body.rate_limit.limit(), now_ms)?;
    Ok(match decision {
        RateDecision::Allowed { remaining } => {
            Reply::ok(json!({ "allowed": true, "remaining": remaining }))
        }
        RateDecision::Limited {
            retry_after_seconds,
        } => rate_limited(retry_after_seconds),
    })
}

fn account(store: &Mutex<Store>, now_ms: i64, encoded: &str) -> Result<Reply, StoreError> {
    let Some(account) = percent_decode(encoded) else {
        return Ok(Reply::bad_request(
            "account path segment has an invalid percent-encoding",
        ));
    };
    let summary = lock(store).account_summary(&account, now_ms.div_euclid(1000))?;
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
        Some(other) => return Err(format!("unknown preset {other:?}; the only preset is agent")),
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
        (KeyKind::ApiToken, None) => crate::cli::DEFAULT_TOKEN_EXPIRY,
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
        None if agent => keys::AGENT_SCOPES.iter().map(|s| (*s).to_string()).collect(),
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

fn admin(store: &Mutex<Store>, now_ms: i64, req: &RequestCtx) -> Result<Reply, StoreError> {
    let now = now_ms.div_euclid(1000);
    let method = req.method.as_str();
    let rest = req.path.strip_prefix("/v1/admin").unwrap_or_default();
    let parts: Vec<&str> = rest.split('/').skip(1).collect();
    let not_allowed = |allow: &str| Ok(Reply::method_not_allowed(allow));
    match (parts.as_slice(), method) {
        (["keys"], "POST") => admin_create_key(store, now, req),
        (["keys"], "GET") => {
            let Some(account) = query_param(&req.url, "account").filter(|a| !a.is_empty()) else {
                return Ok(Reply::bad_request("query parameter account is required"));
            };
            let keys = lock(store).list_keys(&account, now)?;
            Ok(Reply::ok(json!({
                "account": account,
                "keys": keys.iter().map(key_json).collect::<Vec<_>>(),
            })))
        }
        (["keys"], _) => not_allowed("GET, POST"),
        (["keys", prefix, "revoke"], "POST") => {
            match lock(store).revoke_by_prefix(prefix, now) {
                Ok(r) => Ok(Reply::ok(json!({
                    "prefix": r.prefix,
                    "account": r.account,
                    "kind": r.kind.as_str(),
                    "revoked_at": r.revoked_at,
                }))),
                Err(StoreError::KeyNotFound(_)) => Ok(Reply::error(404, "key_not_found")),
                Err(StoreError::AmbiguousPrefix { matches, .. }) => Ok(Reply::json(
                    409,
                    json!({ "error": "ambiguous_prefix", "matches": matches }),
                )),
                Err(e) => Err(e),
            }
        }
        (["keys", _, "revoke"], _) => not_allowed("POST"),
        (["accounts", enc], "GET") => {
            let Some(account) = percent_decode(enc) else {
                return Ok(Reply::bad_request("invalid percent-encoding"));
            };
            Ok(match lock(store).account_summary(&account, now)? {
                None => Reply::error(404, "account_not_found"),
                Some(s) => Reply::ok(json!({
                    "account": account,
                    "balance": s.balance,
                    "held": s.held,
                    "total": s.total(),
                })),
            })
        }
        (["accounts", _], _) => not_allowed("GET"),
        (["accounts", enc, "topup"], "POST") => {
            let Some(account) = percent_decode(enc) else {
                return Ok(Reply::bad_request("invalid percent-encoding"));
            };
            let body: AdminTopupBody = body_or_reply!(req);
            match lock(store).topup(
                &account,
                body.amount,
                body.note.as_deref(),
                body.idempotency_key.as_deref(),
                now,
            ) {
                Ok(r) => Ok(Reply::ok(json!({
                    "account": r.account,
                    "credited": if r.replayed { 0 } else { r.amount },
                    "balance": r.balance,
                    "replayed": r.replayed,
                }))),
                Err(StoreError::IdempotencyConflict(_)) => {
                    Ok(Reply::error(409, "idempotency_conflict"))
                }
                Err(e) => Err(e),
            }
        }
        (["accounts", _, "topup"], _) => not_allowed("POST"),
        (["accounts", enc, "ledger"], "GET") => {
            let Some(account) = percent_decode(enc) else {
                return Ok(Reply::bad_request("invalid percent-encoding"));
            };
            let limit = match query_param(&req.url, "limit") {
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
            let store = lock(store);
            if store.balance(&account)?.is_none() {
                return Ok(Reply::error(404, "account_not_found"));
            }
            let entries = store.ledger(&account, limit)?;
            Ok(Reply::ok(json!({
                "account": account,
                "entries": entries.iter().map(ledger_json).collect::<Vec<_>>(),
            })))
        }
        (["accounts", _, "ledger"], _) => not_allowed("GET"),
        (["refund"], "POST") => {
            let body: AdminRefundBody = body_or_reply!(req);
            let outcome = lock(store).refund(&body.idempotency_key, body.note.as_deref(), now)?;
            Ok(refund_reply(&outcome))
        }
        (["refund"], _) => not_allowed("POST"),
        (["check"], "GET") => {
            let report = lock(store).check()?;
            Ok(Reply::ok(json!({
                "ok": report.is_ok(),
                "accounts": report.accounts,
                "ledger_rows": report.ledger_rows,
                "problems": report.problems,
            })))
        }
        (["check"], _) => not_allowed("GET"),
        _ => Ok(Reply::error(404, "not_found")),
    }
}

fn admin_create_key(store: &Mutex<Store>, now: i64, req: &RequestCtx) -> Result<Reply, StoreError> {
    let body: AdminKeyBody = body_or_reply!(req);
    let new = match new_key_from_options(
        body.account,
        body.kind.as_deref(),
        body.scopes,
        body.preset.as_deref(),
        body.expires.as_deref(),
        body.name,
    ) {
        Ok(n) => n,
        Err(msg) => return Ok(Reply::bad_request(msg)),
    };
    match lock(store).create_key(&new, now) {
        Ok(k) => Ok(Reply::json(
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
        )),
        Err(StoreError::TooManyTokens { limit, .. }) => Ok(Reply::json(
            409,
            json!({ "error": "token_limit", "limit": limit }),
        )),
        Err(e) => Err(e),
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
        RefundOutcome::Refunded { account, amount, balance, idempotency_key, hold_id } => Some(json!({
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
