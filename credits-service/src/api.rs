//! The credits HTTP API the filter calls (documented in
//! `docs/credits-service.openapi.yaml`):
//!
//! - `POST /v1/keys/lookup`      resolve a key hash to account, scopes, state, balance
//! - `POST /v1/debit`            charge credits, idempotently
//! - `GET  /v1/accounts/{id}`    balance of an account
//! - `GET  /healthz`             liveness
//!
//! The filter never sends secrets here, only SHA-256 hashes of them.

use crate::http::{percent_decode, Handler, Reply, RequestCtx, RunningServer};
use crate::store::{DebitOutcome, DebitRequest, Store, StoreError};
use serde::Deserialize;
use serde_json::json;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

/// The store shared by all worker threads. SQLite serialises writers anyway,
/// and every request is a few short statements, so one connection is enough.
pub type SharedStore = Arc<Mutex<Store>>;

/// Source of the current unix time; injectable for tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The production clock.
pub fn system_clock() -> Clock {
    Arc::new(crate::store::unix_now)
}

/// Start the credits API on `listen` with `workers` threads.
pub fn start(listen: &str, workers: usize, store: SharedStore) -> io::Result<RunningServer> {
    start_with_clock(listen, workers, store, system_clock())
}

/// Like [`start`], with an explicit clock.
pub fn start_with_clock(
    listen: &str,
    workers: usize,
    store: SharedStore,
    clock: Clock,
) -> io::Result<RunningServer> {
    let handler: Handler = Arc::new(move |req: &RequestCtx| handle(&store, &*clock, req));
    RunningServer::start(listen, workers, "credits", handler)
}

#[derive(Deserialize)]
struct LookupBody {
    key_sha256: String,
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
}

/// Route one request. Never panics; storage failures become 500 JSON.
pub fn handle(store: &Mutex<Store>, clock: &dyn Fn() -> i64, req: &RequestCtx) -> Reply {
    let path = req.path.as_str();
    let method = req.method.as_str();
    let result = match path {
        "/healthz" => match method {
            "GET" => Ok(Reply::ok(json!({ "ok": true }))),
            _ => Ok(Reply::method_not_allowed("GET")),
        },
        "/v1/keys/lookup" => match method {
            "POST" => lookup(store, clock(), req),
            _ => Ok(Reply::method_not_allowed("POST")),
        },
        "/v1/debit" => match method {
            "POST" => debit(store, clock(), req),
            _ => Ok(Reply::method_not_allowed("POST")),
        },
        _ => match path.strip_prefix("/v1/accounts/") {
            Some(encoded) if !encoded.is_empty() && !encoded.contains('/') => match method {
                "GET" => account(store, encoded),
                _ => Ok(Reply::method_not_allowed("GET")),
            },
            _ => Ok(Reply::error(404, "not_found")),
        },
    };
    result.unwrap_or_else(|e| match e {
        StoreError::Invalid(msg) => Reply::bad_request(msg),
        other => {
            eprintln!("credits: {method} {path}: {other}");
            Reply::internal()
        }
    })
}

fn lock(store: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    // A panic while holding the lock cannot leave SQLite mid-transaction
    // (the transaction guard rolls back on unwind), so poisoning is harmless.
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

fn parse_json<T: serde::de::DeserializeOwned>(req: &RequestCtx) -> Result<T, Reply> {
    serde_json::from_slice(&req.body)
        .map_err(|e| Reply::bad_request(format!("invalid JSON body: {e}")))
}

fn lookup(store: &Mutex<Store>, now: i64, req: &RequestCtx) -> Result<Reply, StoreError> {
    let body: LookupBody = match parse_json(req) {
        Ok(b) => b,
        Err(reply) => return Ok(reply),
    };
    let found = lock(store).lookup_key(&body.key_sha256, now)?;
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

fn debit(store: &Mutex<Store>, now: i64, req: &RequestCtx) -> Result<Reply, StoreError> {
    let body: DebitBody = match parse_json(req) {
        Ok(b) => b,
        Err(reply) => return Ok(reply),
    };
    let request = DebitRequest {
        account: body.account,
        amount: body.amount,
        idempotency_key: body.idempotency_key,
        route: body.route,
        key_prefix: body.key_prefix,
    };
    let outcome = lock(store).debit(&request, now)?;
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
        DebitOutcome::Insufficient { balance, required } => Reply::json(
            402,
            json!({ "error": "insufficient_credits", "balance": balance, "required": required }),
        ),
        DebitOutcome::Conflict => Reply::error(409, "idempotency_conflict"),
    })
}

fn account(store: &Mutex<Store>, encoded: &str) -> Result<Reply, StoreError> {
    let Some(account) = percent_decode(encoded) else {
        return Ok(Reply::bad_request(
            "account path segment has an invalid percent-encoding",
        ));
    };
    let balance = lock(store).balance(&account)?;
    Ok(match balance {
        None => Reply::error(404, "account_not_found"),
        // total_credits is the balance across all credit sources; there is
        // only one source today, so it equals the balance.
        Some(balance) => Reply::ok(json!({
            "account": account,
            "balance": balance,
            "total_credits": balance,
        })),
    })
}
