//! Self-service: the signed-in end user's own balance, ledger and
//! credentials (seed 000's dashboard, seed 003's "Settings > API Tokens"),
//! and the page that shows them (`/dashboard`).
//!
//! Served on a listener of its own (`serve --self-service-listen`), never on
//! the credits API's: it sits **behind Envoy and dialtone** like any other
//! upstream. Who the caller is comes only from the filter's
//! `x-dialtone-account` (the filter removes every client-sent `x-dialtone-*`
//! header before it adds its own). A request that did not come through the
//! gate is refused: Envoy's route adds `x-dialtone-gate-key` from a secret
//! (`--gate-key-file` / `DIAL_GATE_KEY`, one or two accepted at once, so it
//! rotates like the service key), compared in constant time; and the
//! listener should be reachable by Envoy only (loopback, or a
//! NetworkPolicy / Istio AuthorizationPolicy in a mesh).
//!
//! Who may call which endpoint is the policy's business (a route's
//! `credentials`: managing credentials takes a Privy session unless the
//! operator grants an API-key scope); this module only needs an account.
//!
//! - `GET  /dashboard`                    the page (and `/dashboard/app.js`, `/dashboard/app.css`, `/dashboard/config.json`)
//! - `GET  /self/v1/me`                   account, balance, held, limits, the scopes and expiries on offer
//! - `GET  /self/v1/ledger?limit=&before=` newest first; `next_before` pages on
//! - `GET  /self/v1/keys`                 keys and tokens, never secrets or hashes
//! - `POST /self/v1/keys`                 mint (`{"preset":"agent"}`, or kind/name/scopes/expires); the secret is in this answer only
//! - `POST /self/v1/keys/{prefix}/revoke` revoke one of the caller's own keys
//!
//! State-changing calls are CSRF-checked ([`check_same_origin`]): the page
//! is signed in by a cookie (`privy-token`), which a browser sends with
//! cross-site requests too.

use crate::auth::ServiceAuth;
use crate::backend::Db;
use crate::http::{read_body, record_key_prefix, HttpConfig, Reply};
use crate::keys::{self, Expiry, KeyKind, MAX_ACTIVE_API_TOKENS};
use crate::rules;
use crate::store::{KeyRecord, NewKey, StoreError};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Header Envoy's route adds (from a secret) to prove a request came through the gate.
pub const GATE_KEY_HEADER: &str = "x-dialtone-gate-key";
/// Environment variable holding the gate secret (`DIAL_GATE_KEY_PREVIOUS` during a rotation).
pub const GATE_KEY_ENV: &str = "DIAL_GATE_KEY";
/// The account the filter charged: the only identity this module trusts.
pub const ACCOUNT_HEADER: &str = "x-dialtone-account";
/// How the filter authenticated the caller (`privy`, `apikey`, `admin`).
pub const AUTH_METHOD_HEADER: &str = "x-dialtone-auth-method";
/// Longest key or token name.
pub const MAX_NAME_CHARS: usize = 64;
/// Default and largest ledger page.
pub const DEFAULT_LEDGER_PAGE: i64 = 20;
pub const MAX_LEDGER_PAGE: i64 = 100;
/// Scopes an end user may give a key unless the operator says otherwise.
pub const DEFAULT_ALLOWED_SCOPES: &[&str] = &["sms:send", "contacts_read"];

/// The expiries seed 003 offers, as the API spells them.
pub const TOKEN_EXPIRIES: &[&str] = &["30d", "60d", "90d", "365d", "never"];

/// What the operator decides about self-service.
#[derive(Clone, Debug)]
pub struct SelfServiceConfig {
    /// Scopes a user may put on a key (`--self-service-scopes`).
    pub allowed_scopes: Vec<String>,
    /// Where a signed-out visitor signs in (the team's Privy login page);
    /// `None` with the dev sign-in on: `/dev/sign-in`.
    pub sign_in_url: Option<String>,
    /// The x402 top-up route, shown on the page with its price.
    pub top_up_path: String,
}

impl Default for SelfServiceConfig {
    fn default() -> Self {
        SelfServiceConfig {
            allowed_scopes: DEFAULT_ALLOWED_SCOPES.iter().map(|s| (*s).to_string()).collect(),
            sign_in_url: None,
            top_up_path: "/api/v1/credits/top-up".to_string(),
        }
    }
}

// ----- the rules, testable without a socket ---------------------------------

/// Why a self-service request is refused. Every variant is answered before
/// anything is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelfError {
    /// No `x-dialtone-gate-key`, or a wrong one: the request did not come through Envoy.
    NotThroughGate,
    /// No account from the filter (signed out, or the operator's admin key).
    SignInRequired,
    /// A cross-site state-changing request (cookie-authenticated CSRF).
    CrossOrigin,
    /// A state-changing request whose body is not `application/json`.
    NotJson,
    BadRequest(String),
    UnknownScope(String),
    NoScopes,
    BadExpiry(String),
    NameTooLong,
    TokenLimit,
    KeyNotFound,
}

impl SelfError {
    /// The one mapping from a refusal to status + JSON body.
    pub fn reply(&self) -> Reply {
        let (status, code, message) = match self {
            SelfError::NotThroughGate => (403, "gate_required", "this API is served only through the dialtone gate".to_string()),
            SelfError::SignInRequired => (401, "sign_in_required", "sign in with Privy to manage your credentials".to_string()),
            SelfError::CrossOrigin => (403, "cross_origin", "a state-changing request must come from this site's own pages".to_string()),
            SelfError::NotJson => (415, "unsupported_media_type", "send the body as application/json".to_string()),
            SelfError::BadRequest(m) => (400, "bad_request", m.clone()),
            SelfError::UnknownScope(s) => (400, "unknown_scope", format!("scope {s:?} is not offered here")),
            SelfError::NoScopes => (400, "no_scopes", "choose at least one scope".to_string()),
            SelfError::BadExpiry(e) => (
                400,
                "invalid_expiry",
                format!("expiry {e:?} is not offered: choose one of 30d, 60d, 90d, 365d, never"),
            ),
            SelfError::NameTooLong => (
                400,
                "name_too_long",
                format!("a name is at most {MAX_NAME_CHARS} characters, without control characters"),
            ),
            SelfError::TokenLimit => (
                409,
                "token_limit",
                format!("you already have {MAX_ACTIVE_API_TOKENS} active API tokens, the most an account may hold: revoke one to create another"),
            ),
            SelfError::KeyNotFound => (404, "key_not_found", "you have no active key with that prefix".to_string()),
        };
        let mut body = json!({ "success": false, "error": code, "message": message });
        if *self == SelfError::TokenLimit {
            body["limit"] = json!(MAX_ACTIVE_API_TOKENS);
        }
        let reply = Reply::json(status, body);
        if *self == SelfError::SignInRequired {
            reply.with_header("WWW-Authenticate", "Bearer realm=\"dialtone\"")
        } else {
            reply
        }
    }
}

/// The caller as the filter described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub account: String,
    /// `privy` or `apikey`.
    pub auth_method: String,
}

/// The account from the filter's headers; the admin key (no account) and a
/// request with none are [`SelfError::SignInRequired`].
pub fn caller(headers: &HeaderMap) -> Result<Caller, SelfError> {
    let account = headers
        .get(ACCOUNT_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|a| !a.is_empty())
        .ok_or(SelfError::SignInRequired)?;
    let auth_method = headers
        .get(AUTH_METHOD_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !matches!(auth_method, "privy" | "apikey") {
        return Err(SelfError::SignInRequired);
    }
    Ok(Caller {
        account: account.to_string(),
        auth_method: auth_method.to_string(),
    })
}

/// CSRF defence for state-changing requests. A browser signed in by cookie
/// sends it on cross-site requests too, so:
/// - the body must be `application/json`: a cross-site form cannot send
///   that, and a cross-site `fetch` that does needs a CORS preflight, which
///   this service never grants;
/// - `Sec-Fetch-Site`, when the browser sends it, must be `same-origin` (or
///   `none`: typed by the user);
/// - `Origin`, when sent, must name this host (the `Host` the client used).
///
/// Non-browser clients (a Bearer over `curl`) send neither header and pass
/// on the content type alone.
pub fn check_same_origin(method: &Method, headers: &HeaderMap) -> Result<(), SelfError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        if !matches!(site.as_bytes(), b"same-origin" | b"none") {
            return Err(SelfError::CrossOrigin);
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or(SelfError::CrossOrigin)?;
        let origin = origin.to_str().map_err(|_| SelfError::CrossOrigin)?;
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .ok_or(SelfError::CrossOrigin)?;
        if !origin_host.eq_ignore_ascii_case(host) {
            return Err(SelfError::CrossOrigin);
        }
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(SelfError::NotJson);
    }
    Ok(())
}

/// A mint request as the page (or a client) sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// `agent`: seed 000's "Quick: Cursor / agent key".
    #[serde(default)]
    pub preset: Option<String>,
    /// `api_key` (default) or `api_token`.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// Tokens only: `30d`, `60d`, `90d`, `365d` or `never`.
    #[serde(default)]
    pub expires: Option<String>,
}

/// Check a mint request against the seeds' rules and the operator's scopes.
pub fn new_key(account: &str, req: KeyRequest, config: &SelfServiceConfig) -> Result<NewKey, SelfError> {
    if let Some(name) = &req.name {
        if name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
            return Err(SelfError::NameTooLong);
        }
    }
    let name = req.name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty());
    if req.preset.is_some() && (req.kind.is_some() || req.expires.is_some()) {
        return Err(SelfError::BadRequest("the agent preset takes only a name and scopes".into()));
    }
    if let Some(scopes) = &req.scopes {
        if scopes.is_empty() {
            return Err(SelfError::NoScopes);
        }
        if let Some(unknown) = scopes.iter().find(|s| !config.allowed_scopes.contains(s)) {
            return Err(SelfError::UnknownScope(unknown.clone()));
        }
    }
    match (req.kind.as_deref(), req.expires.as_deref()) {
        // (An expiry on an API key is refused by `new_key_from_options`.)
        (Some("api_token"), Some(e)) if Expiry::parse(e).is_err() => return Err(SelfError::BadExpiry(e.to_string())),
        (Some("api_token"), None) => {
            return Err(SelfError::BadRequest("choose an expiry: 30d, 60d, 90d, 365d or never".into()))
        }
        _ => {}
    }
    if req.preset.is_none() && req.scopes.is_none() {
        return Err(SelfError::NoScopes);
    }
    let new = crate::api::new_key_from_options(
        account.to_string(),
        req.kind.as_deref(),
        req.scopes,
        req.preset.as_deref(),
        req.expires.as_deref(),
        name,
    )
    .map_err(SelfError::BadRequest)?;
    // The agent preset's own scopes must be on offer too.
    if let Some(unknown) = new.scopes.iter().find(|s| !config.allowed_scopes.contains(s)) {
        return Err(SelfError::UnknownScope(unknown.clone()));
    }
    Ok(new)
}

/// A key as the user sees it: the operator's view of it (never a secret or
/// a hash) without the account (it is the caller's), plus how the page
/// shows it (`dial_live_1a2b3c4d…`).
pub fn key_view(k: &KeyRecord) -> Value {
    let mut v = crate::api::key_json(k);
    if let Some(o) = v.as_object_mut() {
        o.remove("account");
        o.insert("display".into(), json!(format!("{}{}…", k.kind.marker(), k.prefix)));
    }
    v
}

/// A ledger row as the user sees it: the operator's view without the hold
/// id and the idempotency key (internal handles: request ids, x402 claims).
pub fn ledger_view(e: &crate::store::LedgerEntry) -> Value {
    let mut v = crate::api::ledger_json(e);
    if let Some(o) = v.as_object_mut() {
        o.remove("hold_id");
        o.remove("idempotency_key");
    }
    v
}

// ----- HTTP -------------------------------------------------------------------

/// What the self-service handlers share.
#[derive(Clone)]
pub struct SelfState {
    pub db: Db,
    pub config: Arc<SelfServiceConfig>,
    /// The accepted gate secrets; [`ServiceAuth::none`] refuses everything.
    pub gate: ServiceAuth,
    pub http: Arc<HttpConfig>,
    pub clock: crate::api::Clock,
    /// The dev sign-in (only `make run` and the tests turn it on).
    pub dev_sign_in: Option<Arc<crate::dev_sign_in::DevSignIn>>,
}

impl SelfState {
    fn now(&self) -> i64 {
        (self.clock)()
    }
}

/// The self-service router (see the module docs).
pub fn router(state: SelfState) -> Router {
    let http = Arc::clone(&state.http);
    let mut routes = Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/app.js", get(app_js))
        .route("/dashboard/app.css", get(app_css))
        .route("/dashboard/config.json", get(page_config))
        .route("/self/v1/me", get(me))
        .route("/self/v1/ledger", get(ledger))
        .route("/self/v1/keys", get(list_keys).post(create_key))
        .route("/self/v1/keys/{prefix}/revoke", post(revoke));
    if state.dev_sign_in.is_some() {
        routes = routes
            .route("/dev/sign-in", get(crate::dev_sign_in::page).post(crate::dev_sign_in::sign_in))
            .route("/dev/sign-out", post(crate::dev_sign_in::sign_out));
    }
    let routes = routes
        .route("/healthz", get(|| async { Reply::ok(json!({ "ok": true })) }))
        .fallback(|| async { Reply::error(404, "not_found") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state);
    crate::http::router_layers(routes, "self_service", &http)
}

/// Only requests that came through the gate (and, for writes, from this
/// site's own pages) reach a handler.
async fn gate(State(state): State<SelfState>, req: Request, next: Next) -> Response {
    if req.uri().path() != "/healthz" {
        let presented = req.headers().get(GATE_KEY_HEADER).map(|v| v.as_bytes());
        if !state.gate.allows(presented) {
            crate::metrics::gate_key_rejected();
            return SelfError::NotThroughGate.reply().into_response();
        }
        if let Err(e) = check_same_origin(req.method(), req.headers()) {
            return e.reply().into_response();
        }
    }
    next.run(req).await
}

fn store_error(e: StoreError) -> Reply {
    if e.is_unavailable() {
        return Reply::unavailable();
    }
    match e {
        StoreError::Invalid(m) => SelfError::BadRequest(m).reply(),
        StoreError::TooManyTokens { .. } => SelfError::TokenLimit.reply(),
        StoreError::KeyNotFound(_) | StoreError::AmbiguousPrefix { .. } => SelfError::KeyNotFound.reply(),
        other => {
            tracing::error!(error = %other, "self-service storage failure");
            Reply::internal()
        }
    }
}

fn no_store(reply: Reply) -> Reply {
    reply.with_header("Cache-Control", "no-store")
}

type Answer = Result<Reply, Reply>;

fn done(a: Answer) -> Reply {
    no_store(a.unwrap_or_else(|r| r))
}

fn who(headers: &HeaderMap) -> Result<Caller, Reply> {
    caller(headers).map_err(|e| e.reply())
}

async fn me(State(state): State<SelfState>, headers: HeaderMap) -> Reply {
    done(
        async {
            let c = who(&headers)?;
            let now = state.now();
            let summary = state
                .db
                .read(rules::AccountView { account: c.account.clone(), now })
                .await
                .map_err(store_error)?;
            let active_tokens = state
                .db
                .read(rules::ActiveTokenCount { account: c.account.clone(), now })
                .await
                .map_err(store_error)?;
            Ok(Reply::ok(json!({
                "account": c.account,
                "auth_method": c.auth_method,
                "balance": summary.as_ref().map_or(0, |s| s.balance),
                "held": summary.as_ref().map_or(0, |s| s.held),
                "limits": {"max_active_tokens": MAX_ACTIVE_API_TOKENS, "active_tokens": active_tokens},
                "offer": {
                    "scopes": state.config.allowed_scopes,
                    "token_expiries": TOKEN_EXPIRIES,
                    "agent_scopes": keys::AGENT_SCOPES,
                    "max_name_chars": MAX_NAME_CHARS,
                },
            })))
        }
        .await,
    )
}

async fn ledger(State(state): State<SelfState>, headers: HeaderMap, uri: Uri) -> Reply {
    done(
        async {
            let c = who(&headers)?;
            let query = uri.query().unwrap_or_default();
            let mut limit = DEFAULT_LEDGER_PAGE;
            let mut before = None;
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                match k {
                    "limit" => match v.parse::<i64>() {
                        Ok(n) if (1..=MAX_LEDGER_PAGE).contains(&n) => limit = n,
                        _ => return Err(SelfError::BadRequest(format!("limit must be 1..={MAX_LEDGER_PAGE}")).reply()),
                    },
                    "before" => match v.parse::<i64>() {
                        Ok(n) if n > 0 => before = Some(n),
                        _ => return Err(SelfError::BadRequest("before must be a ledger id".into()).reply()),
                    },
                    _ => return Err(SelfError::BadRequest(format!("unknown query parameter {k:?}")).reply()),
                }
            }
            let entries = state
                .db
                .read(rules::LedgerPage { account: c.account.clone(), limit, before })
                .await
                .map_err(store_error)?;
            let next_before = if entries.len() as i64 == limit { entries.last().map(|e| e.id) } else { None };
            Ok(Reply::ok(json!({
                "account": c.account,
                "entries": entries.iter().map(ledger_view).collect::<Vec<_>>(),
                "next_before": next_before,
            })))
        }
        .await,
    )
}

async fn list_keys(State(state): State<SelfState>, headers: HeaderMap) -> Reply {
    done(
        async {
            let c = who(&headers)?;
            let keys = state
                .db
                .read(rules::ListKeys { account: c.account.clone(), now: state.now() })
                .await
                .map_err(store_error)?;
            let active_tokens = keys
                .iter()
                .filter(|k| k.kind == KeyKind::ApiToken && k.state == keys::KeyState::Active)
                .count();
            Ok(Reply::ok(json!({
                "account": c.account,
                // Newest first, as a dashboard lists them.
                "keys": keys.iter().rev().map(key_view).collect::<Vec<_>>(),
                "limits": {"max_active_tokens": MAX_ACTIVE_API_TOKENS, "active_tokens": active_tokens},
            })))
        }
        .await,
    )
}

async fn create_key(State(state): State<SelfState>, headers: HeaderMap, body: Body) -> Reply {
    done(
        async {
            let c = who(&headers)?;
            let bytes = read_body(body, state.http.max_body_bytes, state.http.header_read_timeout).await?;
            let req: KeyRequest = serde_json::from_slice(&bytes)
                .map_err(|e| SelfError::BadRequest(format!("invalid request: {e}")).reply())?;
            let new = new_key(&c.account, req, &state.config).map_err(|e| e.reply())?;
            let k = state
                .db
                .write(rules::CreateKey { new, now: state.now() })
                .await
                .map_err(store_error)?;
            record_key_prefix(&k.prefix);
            tracing::info!(account = %k.account, kind = k.kind.as_str(), "self-service key created");
            Ok(Reply::json(
                201,
                json!({
                    "secret": k.secret,
                    "prefix": k.prefix,
                    "kind": k.kind.as_str(),
                    "scopes": k.scopes,
                    "name": k.name,
                    "created_at": k.created_at,
                    "expires_at": k.expires_at,
                    "notice": "This is the only time the secret is shown: copy it now.",
                }),
            ))
        }
        .await,
    )
}

async fn revoke(State(state): State<SelfState>, headers: HeaderMap, uri: Uri) -> Reply {
    done(
        async {
            let c = who(&headers)?;
            let prefix = uri.path().split('/').nth(4).unwrap_or_default().to_string();
            if !keys::is_valid_prefix(&prefix) {
                return Err(SelfError::BadRequest("a key prefix is 8 lowercase hex characters".into()).reply());
            }
            record_key_prefix(&prefix);
            let r = state
                .db
                .write(rules::RevokeOwn { account: c.account.clone(), prefix, now: state.now() })
                .await
                .map_err(store_error)?;
            tracing::info!(account = %r.account, kind = r.kind.as_str(), "self-service key revoked");
            Ok(Reply::ok(json!({
                "prefix": r.prefix,
                "kind": r.kind.as_str(),
                "revoked_at": r.revoked_at,
            })))
        }
        .await,
    )
}

// ----- the page ---------------------------------------------------------------

const PAGE_HTML: &str = include_str!("../dashboard/index.html");
const APP_JS: &str = include_str!("../dashboard/app.js");
const APP_CSS: &str = include_str!("../dashboard/app.css");

/// Headers every page asset gets: no caching of anything personal, no
/// framing (clickjacking), a strict CSP (no inline script, no third party).
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                 connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            ),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// What the page needs to know about this deployment.
async fn page_config(State(state): State<SelfState>) -> Reply {
    let dev = state.dev_sign_in.is_some();
    no_store(Reply::ok(json!({
        "sign_in_url": state.config.sign_in_url.clone().or_else(|| dev.then(|| "/dev/sign-in".to_string())),
        "dev_sign_in": dev,
        "top_up_path": state.config.top_up_path,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn req(json: &str) -> KeyRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_account_comes_only_from_the_filter_and_never_for_the_admin_key() {
        let ok = headers(&[(ACCOUNT_HEADER, "did:privy:a"), (AUTH_METHOD_HEADER, "privy")]);
        assert_eq!(caller(&ok).unwrap(), Caller { account: "did:privy:a".into(), auth_method: "privy".into() });
        assert_eq!(caller(&headers(&[])), Err(SelfError::SignInRequired));
        assert_eq!(caller(&headers(&[(ACCOUNT_HEADER, "did:privy:a")])), Err(SelfError::SignInRequired));
        assert_eq!(
            caller(&headers(&[(ACCOUNT_HEADER, "did:privy:a"), (AUTH_METHOD_HEADER, "admin")])),
            Err(SelfError::SignInRequired)
        );
        assert_eq!(caller(&headers(&[(ACCOUNT_HEADER, ""), (AUTH_METHOD_HEADER, "privy")])), Err(SelfError::SignInRequired));
    }

    #[test]
    fn writes_need_json_from_the_same_origin() {
        let post = Method::POST;
        let json = ("content-type", "application/json");
        assert_eq!(check_same_origin(&Method::GET, &headers(&[])), Ok(()));
        assert_eq!(check_same_origin(&post, &headers(&[json])), Ok(()));
        assert_eq!(check_same_origin(&post, &headers(&[("content-type", "application/json; charset=utf-8")])), Ok(()));
        assert_eq!(check_same_origin(&post, &headers(&[])), Err(SelfError::NotJson));
        assert_eq!(check_same_origin(&post, &headers(&[("content-type", "text/plain")])), Err(SelfError::NotJson));
        let same = headers(&[json, ("host", "127.0.0.1:10000"), ("origin", "http://127.0.0.1:10000"), ("sec-fetch-site", "same-origin")]);
        assert_eq!(check_same_origin(&post, &same), Ok(()));
        let evil = headers(&[json, ("host", "127.0.0.1:10000"), ("origin", "https://evil.example")]);
        assert_eq!(check_same_origin(&post, &evil), Err(SelfError::CrossOrigin));
        let sneaky = headers(&[json, ("host", "127.0.0.1:10000"), ("origin", "http://127.0.0.1:10000.evil.example")]);
        assert_eq!(check_same_origin(&post, &sneaky), Err(SelfError::CrossOrigin));
        let cross = headers(&[json, ("sec-fetch-site", "cross-site")]);
        assert_eq!(check_same_origin(&post, &cross), Err(SelfError::CrossOrigin));
        let null_origin = headers(&[json, ("host", "a"), ("origin", "null")]);
        assert_eq!(check_same_origin(&post, &null_origin), Err(SelfError::CrossOrigin));
    }

    #[test]
    fn mint_requests_follow_the_seeds() {
        let cfg = SelfServiceConfig::default();
        let agent = new_key("did:privy:a", req(r#"{"preset":"agent"}"#), &cfg).unwrap();
        assert_eq!((agent.kind, agent.scopes.clone(), agent.expiry), (KeyKind::ApiKey, vec!["sms:send".to_string()], Expiry::Never));
        assert_eq!(agent.name.as_deref(), Some("agent key"));
        let token = new_key(
            "did:privy:a",
            req(r#"{"kind":"api_token","name":"CI","scopes":["contacts_read"],"expires":"30d"}"#),
            &cfg,
        )
        .unwrap();
        assert_eq!((token.kind, token.expiry), (KeyKind::ApiToken, Expiry::Days(30)));
        let custom = new_key("did:privy:a", req(r#"{"name":"  ","scopes":["sms:send","contacts_read"]}"#), &cfg).unwrap();
        assert_eq!((custom.kind, custom.name), (KeyKind::ApiKey, None));

        let refused = |json: &str| new_key("did:privy:a", req(json), &cfg).unwrap_err();
        assert_eq!(refused(r#"{"scopes":["admin:all"]}"#), SelfError::UnknownScope("admin:all".into()));
        assert_eq!(refused(r#"{"scopes":[]}"#), SelfError::NoScopes);
        assert_eq!(refused(r#"{"name":"x"}"#), SelfError::NoScopes);
        assert_eq!(
            refused(r#"{"kind":"api_token","scopes":["sms:send"],"expires":"45d"}"#),
            SelfError::BadExpiry("45d".into())
        );
        assert!(matches!(refused(r#"{"kind":"api_token","scopes":["sms:send"]}"#), SelfError::BadRequest(_)));
        assert!(matches!(refused(r#"{"scopes":["sms:send"],"expires":"30d"}"#), SelfError::BadRequest(_)));
        assert!(matches!(refused(r#"{"kind":"root","scopes":["sms:send"]}"#), SelfError::BadRequest(_)));
        assert!(matches!(refused(r#"{"preset":"agent","kind":"api_token"}"#), SelfError::BadRequest(_)));
        assert!(matches!(refused(r#"{"preset":"admin"}"#), SelfError::BadRequest(_)));
        let long = format!(r#"{{"name":"{}","scopes":["sms:send"]}}"#, "n".repeat(MAX_NAME_CHARS + 1));
        assert_eq!(refused(&long), SelfError::NameTooLong);
        assert_eq!(refused(r#"{"name":"a\u0000b","scopes":["sms:send"]}"#), SelfError::NameTooLong);
        // An operator that offers no sms:send has no quick agent key.
        let narrow = SelfServiceConfig { allowed_scopes: vec!["contacts_read".into()], ..SelfServiceConfig::default() };
        assert_eq!(
            new_key("did:privy:a", req(r#"{"preset":"agent"}"#), &narrow).unwrap_err(),
            SelfError::UnknownScope("sms:send".into())
        );
        assert!(serde_json::from_str::<KeyRequest>(r#"{"scopes":["sms:send"],"account":"did:privy:b"}"#).is_err());
    }

    #[test]
    fn a_key_view_has_no_secret_hash_or_account() {
        let k = KeyRecord {
            prefix: "1a2b3c4d".into(),
            account: "did:privy:a".into(),
            kind: KeyKind::ApiKey,
            scopes: vec!["sms:send".into()],
            name: None,
            state: keys::KeyState::Active,
            created_at: 1,
            expires_at: None,
            revoked_at: None,
            last_used_at: Some(2),
        };
        let v = key_view(&k);
        assert_eq!(v["display"], "dial_live_1a2b3c4d…");
        assert_eq!((v["prefix"].as_str(), v["last_used_at"].as_i64(), v["state"].as_str()), (Some("1a2b3c4d"), Some(2), Some("active")));
        for absent in ["account", "secret", "key_sha256", "hash"] {
            assert!(v.get(absent).is_none(), "{absent} in {v}");
        }
    }

    #[test]
    fn a_ledger_view_has_no_internal_handles() {
        let e = crate::store::LedgerEntry {
            id: 7,
            account: "did:privy:a".into(),
            kind: "capture".into(),
            delta_available: 0,
            delta_held: -1,
            amount: 1,
            hold_id: Some("hold_1".into()),
            idempotency_key: Some("sms_send:req-1".into()),
            route: Some("sms_send".into()),
            key_prefix: Some("1a2b3c4d".into()),
            note: None,
            created_at: 5,
        };
        let v = ledger_view(&e);
        assert_eq!((v["id"].as_i64(), v["kind"].as_str(), v["route"].as_str()), (Some(7), Some("capture"), Some("sms_send")));
        assert!(v.get("hold_id").is_none() && v.get("idempotency_key").is_none(), "{v}");
    }

    #[test]
    fn every_refusal_is_json_with_its_status() {
        for (e, status) in [
            (SelfError::NotThroughGate, 403),
            (SelfError::SignInRequired, 401),
            (SelfError::CrossOrigin, 403),
            (SelfError::NotJson, 415),
            (SelfError::TokenLimit, 409),
            (SelfError::KeyNotFound, 404),
            (SelfError::UnknownScope("x".into()), 400),
        ] {
            let r = e.reply();
            assert_eq!(r.status, status, "{e:?}");
            assert_eq!(r.body["success"], false);
            assert!(r.body["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        assert_eq!(SelfError::TokenLimit.reply().body["limit"], 25);
    }
}
