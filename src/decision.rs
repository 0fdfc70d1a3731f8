//! The per-request decision: given the request and the compiled config, what
//! to do next. Pure logic; the proxy-wasm glue only carries it out.
//!
//! A request ends in [`Decision::Allow`] or [`Decision::Deny`], possibly after
//! one or two callouts to the key/credits service ([`Decision::Call`]), each
//! resumed with [`resume`].

use crate::bearer::{self, Credential, KeyCredential};
use crate::cache::{self, Caches, Sharing};
use crate::credits_api::{
    self, CallOutcome, Debit, DebitRequest, Hold, HoldRequest, KeyState, Lookup, LookupRequest, RateCheck,
    RateLimitRequest, ReleaseRequest, ServiceError,
};
use crate::denial::{AuthFailure, Denial};
use crate::identity::{AuthMethod, Identity};
use crate::policy::{Charge, Config, Route, Unmatched};

/// The name of the cookie Privy's HttpOnly-cookie mode uses.
pub const PRIVY_COOKIE: &str = "privy-token";

/// What the filter needs to know about a request.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    pub method: &'a str,
    /// `:path`, with the query string.
    pub path: &'a str,
    pub scheme: &'a str,
    pub authority: &'a str,
    /// Every `Authorization` header value, raw.
    pub authorization: Vec<&'a [u8]>,
    /// Every `Cookie` header value, raw.
    pub cookies: Vec<&'a [u8]>,
    /// `x-request-id` (Envoy sets one); the debit's idempotency key derives from it.
    pub request_id: &'a str,
    /// A `PAYMENT-SIGNATURE` or v1 `X-PAYMENT` header is present.
    pub has_x402_payment: bool,
    /// Keys fetched from the issuer's JWKS (besides the configured ones).
    pub fetched_keys: &'a [crate::privy_jwt::EsKey],
    /// The verifier's fingerprint with `fetched_keys`, as the JWKS cache
    /// computed it when they were fetched (computed here when absent).
    pub fetched_fingerprint: Option<&'a cache::Digest32>,
    /// A token naming an unknown `kid` should make the glue fetch the
    /// issuer's JWKS first (a fetch may be sent now) instead of trying the
    /// kid-less pinned keys.
    pub refetch_unknown_kid: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Forward upstream with these identity headers.
    Allow(Grant),
    /// Answer the client locally.
    Deny(Denial),
    /// Ask the key/credits service, then `resume` with `then`.
    Call(ServiceCall, Pending),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub identity: Identity,
    /// The matched route's name (`None` for unmatched requests let through).
    pub route: Option<String>,
    /// A hold to settle when the upstream answers (charge on success).
    pub hold: Option<String>,
}

/// One HTTP callout to the key/credits service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCall {
    pub path: String,
    pub body: Vec<u8>,
}

/// What the request is waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// `key_sha256`: what the answer is cached under.
    Lookup { route: usize, prefix: String, idempotency_key: String, key_sha256: cache::Digest32 },
    Debit { route: usize, identity: Identity, amount: u64 },
    Hold { route: usize, identity: Identity, amount: u64 },
    RateLimit { route: usize, identity: Identity },
}

/// First decision, at request headers. `now` is the host clock in seconds.
/// Caches nothing (see [`decide_cached`]).
pub fn decide(cfg: &Config, req: &Request<'_>, now: i64) -> Decision {
    decide_cached(cfg, req, now.saturating_mul(1000), &mut Caches::disabled())
}

/// Continues a request after its callout answered (or failed). Caches
/// nothing (see [`resume_cached`]).
pub fn resume(cfg: &Config, pending: Pending, outcome: CallOutcome, now: i64) -> Decision {
    resume_cached(cfg, pending, outcome, now.saturating_mul(1000), &mut Caches::disabled())
}

/// First decision, at request headers, with the VM's caches: a repeated
/// Privy token skips verification, a recently looked-up key skips the
/// lookup. `now_ms` is the host clock in milliseconds.
pub fn decide_cached(cfg: &Config, req: &Request<'_>, now_ms: i64, caches: &mut Caches) -> Decision {
    decide_shared(cfg, req, now_ms, caches, None)
}

/// [`decide_cached`], with verified tokens also shared by the VMs of one
/// Envoy through `shared` (proxy-wasm shared data in the filter, its slots
/// authenticated with the shared secret's key).
pub fn decide_shared(cfg: &Config, req: &Request<'_>, now_ms: i64, caches: &mut Caches, shared: Option<Sharing<'_>>) -> Decision {
    let now = now_ms.div_euclid(1000);
    let Some((idx, route)) = cfg
        .routes
        .iter()
        .enumerate()
        .find(|(_, r)| r.matches(req.method, crate::policy::path::strip_query(req.path)))
    else {
        return match cfg.unmatched {
            Unmatched::Deny => Decision::Deny(Denial::RouteNotAllowed),
            Unmatched::Allow => Decision::Allow(Grant { identity: Identity::anonymous(), route: None, hold: None }),
        };
    };
    if route.public {
        return allow(route, Identity::anonymous());
    }
    let token = match bearer::bearer_token(&req.authorization, cfg.max_token_bytes) {
        Ok(Some(t)) => Some(t),
        Ok(None) => match privy_cookie(cfg, req) {
            Ok(t) => t,
            Err(d) => return Decision::Deny(d),
        },
        Err(e) => return unauthorized(AuthFailure::Header(e)),
    };
    let Some(token) = token else {
        // No credential at all: the x402 fall-through.
        return match &route.x402 {
            Some(_) if req.has_x402_payment => allow(route, Identity::anonymous()),
            Some(offer) => payment_required(offer, req),
            None => unauthorized(AuthFailure::Missing),
        };
    };
    let credential = match bearer::classify(token, &cfg.admin_digests) {
        Ok(c) => c,
        Err(e) => return unauthorized(AuthFailure::Format(e)),
    };
    let idem = idempotency_key(route, req.request_id);
    match credential {
        // Operator bypass: no scope check, no payment.
        Credential::Admin => allow(route, Identity::admin()),
        // An x402-only route (a top-up): the Bearer says who pays, but only an
        // x402 payment pays. Without one, ask for it before any lookup.
        _ if !route.credits && !req.has_x402_payment && route.x402.is_some() => match &route.x402 {
            Some(offer) => payment_required(offer, req),
            None => unauthorized(AuthFailure::Missing),
        },
        Credential::PrivyAccessToken(jwt) => {
            let Some(privy) = &cfg.privy else {
                return unauthorized(AuthFailure::PrivyNotConfigured);
            };
            let digest = cache::sha256(jwt.as_bytes());
            let verifier = match (req.fetched_keys, req.fetched_fingerprint) {
                ([], _) => privy.fingerprint,
                (_, Some(f)) => *f,
                (fetched, None) => cache::keys_fingerprint(&privy.fingerprint, fetched),
            };
            let verified = match caches.verified_token(&digest, &verifier, now) {
                Some(session) => Ok(session),
                None => verify_sharing(privy, jwt, digest, &verifier, now, req, caches, shared),
            };
            match verified {
                Ok(session) => {
                    let identity = Identity {
                        method: AuthMethod::Privy,
                        account: Some(session.account),
                        key_prefix: None,
                        credits_remaining: None,
                        charged: 0,
                    };
                    // Privy sessions skip scope checks but pay like everyone else.
                    charge_or_allow(cfg, idx, route, identity, idem)
                }
                Err(e) => unauthorized(AuthFailure::Jwt(e)),
            }
        }
        Credential::Key(key) => {
            let digest = cache::sha256(key.secret.as_bytes());
            match caches.looked_up_key(&digest, now_ms) {
                // The record was checked when it was cached; the route's
                // scope and the key's expiry are checked again here.
                Some(rec) => authorized_key(cfg, idx, route, rec, now, idem),
                None => lookup(cfg, idx, &key, digest, idem),
            }
        }
    }
}

/// Continues a request after its callout answered (or failed), with the
/// VM's caches (an active key's lookup is remembered).
pub fn resume_cached(cfg: &Config, pending: Pending, outcome: CallOutcome, now_ms: i64, caches: &mut Caches) -> Decision {
    let now = now_ms.div_euclid(1000);
    match pending {
        Pending::Lookup { route: idx, prefix, idempotency_key, key_sha256 } => {
            let Some(route) = cfg.routes.get(idx) else {
                return unavailable(ServiceError::Inconsistent);
            };
            let rec = match credits_api::parse_lookup(outcome) {
                Ok(Lookup::Found(rec)) => rec,
                Ok(Lookup::NotFound) => return unauthorized(AuthFailure::UnknownKey),
                Err(e) => return unavailable(e),
            };
            // The service answered for a different key: never trust that.
            if rec.key_prefix != prefix {
                return unavailable(ServiceError::Inconsistent);
            }
            if rec.state == KeyState::Active {
                caches.key_looked_up(key_sha256, &rec, now_ms);
            }
            authorized_key(cfg, idx, route, rec, now, idempotency_key)
        }
        Pending::Debit { route: idx, mut identity, amount } => {
            let Some(route) = cfg.routes.get(idx) else {
                return unavailable(ServiceError::Inconsistent);
            };
            let account = identity.account.clone().unwrap_or_default();
            match credits_api::parse_debit(outcome, &account, amount) {
                Ok(Debit::Charged { balance }) => {
                    identity.credits_remaining = Some(balance);
                    identity.charged = amount;
                    allow(route, identity)
                }
                Ok(Debit::Insufficient { balance }) => {
                    Decision::Deny(Denial::InsufficientCredits { credits: balance, required: amount })
                }
                Ok(Debit::RateLimited { retry_after }) => Decision::Deny(Denial::RateLimited { retry_after }),
                Err(e) => unavailable(e),
            }
        }
        Pending::Hold { route: idx, mut identity, amount } => {
            let Some(route) = cfg.routes.get(idx) else {
                return unavailable(ServiceError::Inconsistent);
            };
            let account = identity.account.clone().unwrap_or_default();
            match credits_api::parse_hold(outcome, &account, amount) {
                Ok(Hold::Held { hold_id, balance }) => {
                    identity.credits_remaining = Some(balance);
                    identity.charged = amount;
                    Decision::Allow(Grant { identity, route: Some(route.name.clone()), hold: Some(hold_id) })
                }
                Ok(Hold::Insufficient { balance }) => {
                    Decision::Deny(Denial::InsufficientCredits { credits: balance, required: amount })
                }
                Ok(Hold::RateLimited { retry_after }) => Decision::Deny(Denial::RateLimited { retry_after }),
                Err(e) => unavailable(e),
            }
        }
        Pending::RateLimit { route: idx, identity } => {
            let Some(route) = cfg.routes.get(idx) else {
                return unavailable(ServiceError::Inconsistent);
            };
            match credits_api::parse_ratelimit(outcome) {
                Ok(RateCheck::Allowed) => allow(route, identity),
                Ok(RateCheck::Limited { retry_after }) => Decision::Deny(Denial::RateLimited { retry_after }),
                Err(e) => unavailable(e),
            }
        }
    }
}

/// What to do with the upstream's response once its hold was settled (or not).
#[derive(Debug, Clone, PartialEq)]
pub enum AfterSettlement {
    /// Let the response go to the client.
    Deliver,
    /// The capture was not confirmed: the client would be served unpaid (the
    /// service releases an unsettled hold). Fail closed: replace the response.
    Refuse(Denial),
}

/// Decides the response's fate from the capture or release answer.
pub fn after_settlement(capturing: bool, result: Result<credits_api::Settlement, ServiceError>) -> AfterSettlement {
    match (capturing, result) {
        (true, Ok(credits_api::Settlement::Done)) | (false, _) => AfterSettlement::Deliver,
        // Captured by nobody: expired and released, or settled the other way.
        (true, Ok(credits_api::Settlement::NotOpen)) => {
            AfterSettlement::Refuse(Denial::CreditsUnavailable(ServiceError::Inconsistent))
        }
        (true, Err(e)) => AfterSettlement::Refuse(Denial::CreditsUnavailable(e)),
    }
}

/// Whether a settlement call is a capture.
pub fn is_capture(call: &ServiceCall) -> bool {
    call.path.ends_with("/capture")
}

/// Settles a hold once the upstream answered: capture on 2xx/3xx (the client
/// got what it paid for), release on anything else or on no answer at all.
pub fn settle(cfg: &Config, hold_id: &str, upstream_status: Option<u16>) -> ServiceCall {
    let base = &cfg.service.holds_path;
    match upstream_status {
        Some(200..=399) => ServiceCall { path: format!("{base}/{hold_id}/capture"), body: b"{}".to_vec() },
        _ => ServiceCall {
            path: format!("{base}/{hold_id}/release"),
            body: serde_json::to_vec(&ReleaseRequest { reason: "upstream_error" }).unwrap_or_default(),
        },
    }
}

/// The idempotency key of a request's debit: one debit per route per
/// request id, so a retried callout is answered from the service's record.
pub fn idempotency_key(route: &Route, request_id: &str) -> String {
    format!("{}:{}", route.name, request_id)
}

/// A token the local cache does not know: another VM of this Envoy may have
/// verified it (its shared slot), else verify it here and share the result.
#[allow(clippy::too_many_arguments)]
fn verify_sharing(
    privy: &crate::policy::PrivyConfig,
    jwt: &str,
    digest: cache::Digest32,
    verifier: &cache::Digest32,
    now: i64,
    req: &Request<'_>,
    caches: &mut Caches,
    shared: Option<Sharing<'_>>,
) -> Result<crate::privy_jwt::Session, crate::privy_jwt::JwtError> {
    let unknown_kid = if req.refetch_unknown_kid {
        crate::privy_jwt::UnknownKid::Refetch
    } else {
        crate::privy_jwt::UnknownKid::TryKidless
    };
    let verify = || privy.verifier.verify_full(jwt, now, req.fetched_keys, unknown_kid);
    if !caches.caches_tokens() {
        return verify();
    }
    let shared = shared.map(|s| (s, cache::shared_slot(&digest)));
    if let Some((sharing, slot)) = &shared {
        let found = sharing.store.get(slot).and_then(|v| cache::decode_shared(sharing.key, &v, &digest, verifier, now));
        if let Some((session, expired_from)) = found {
            caches.token_from_shared(digest, verifier, &session, expired_from);
            return Ok(session);
        }
    }
    caches.verifying_token();
    let session = verify()?;
    let expired_from = caches.token_verified(digest, verifier, &session, privy.verifier.leeway_secs);
    if let Some((sharing, slot)) = &shared {
        if let Some(value) = cache::encode_shared(sharing.key, &digest, verifier, &session, expired_from) {
            sharing.store.set(slot, &value);
        }
    }
    Ok(session)
}

fn lookup(cfg: &Config, idx: usize, key: &KeyCredential<'_>, digest: cache::Digest32, idempotency_key: String) -> Decision {
    let hash = bearer::hex_lower(&digest);
    let body = serde_json::to_vec(&LookupRequest { key_sha256: &hash }).unwrap_or_default();
    Decision::Call(
        ServiceCall { path: cfg.service.lookup_path.clone(), body },
        Pending::Lookup { route: idx, prefix: key.prefix.to_owned(), idempotency_key, key_sha256: digest },
    )
}

/// A key the service knows (answered now, or cached): its state, expiry and
/// the route's scope decide; then the route's charge.
fn authorized_key(cfg: &Config, idx: usize, route: &Route, rec: credits_api::KeyRecord, now: i64, idem: String) -> Decision {
    match rec.state {
        KeyState::Revoked => return unauthorized(AuthFailure::Revoked),
        KeyState::Expired => return unauthorized(AuthFailure::Expired),
        KeyState::Active => {}
    }
    // Belt and braces: an expiry the service reported but did not apply
    // (and the one that passes while a lookup is cached).
    if rec.expires_at.is_some_and(|exp| exp <= now) {
        return unauthorized(AuthFailure::Expired);
    }
    if let Some(scope) = &route.scope {
        if !rec.scopes.iter().any(|s| s == scope) {
            return Decision::Deny(Denial::InsufficientScope { scope: scope.clone() });
        }
    }
    let identity = Identity {
        method: AuthMethod::ApiKey,
        account: Some(rec.account),
        key_prefix: Some(rec.key_prefix),
        credits_remaining: Some(rec.balance),
        charged: 0,
    };
    charge_or_allow(cfg, idx, route, identity, idem)
}

/// After authentication: hold or debit the route's cost (with the account's
/// rate limit checked first by the service), or, on a free route, check the
/// rate limit alone, or let it through.
fn charge_or_allow(cfg: &Config, idx: usize, route: &Route, identity: Identity, idempotency_key: String) -> Decision {
    let account = identity.account.clone().unwrap_or_default();
    if route.credits && route.cost > 0 {
        let key_prefix = identity.key_prefix.as_deref();
        let (path, body, pending) = match route.charge {
            Charge::OnSuccess => (
                cfg.service.holds_path.clone(),
                serde_json::to_vec(&HoldRequest {
                    account: &account,
                    amount: route.cost,
                    idempotency_key: &idempotency_key,
                    ttl_seconds: cfg.service.hold_ttl_seconds,
                    route: &route.name,
                    key_prefix,
                    rate_limit: cfg.rate_limit,
                }),
                Pending::Hold { route: idx, identity: identity.clone(), amount: route.cost },
            ),
            Charge::UpFront => (
                cfg.service.debit_path.clone(),
                serde_json::to_vec(&DebitRequest {
                    account: &account,
                    amount: route.cost,
                    idempotency_key: &idempotency_key,
                    route: &route.name,
                    key_prefix,
                    rate_limit: cfg.rate_limit,
                }),
                Pending::Debit { route: idx, identity: identity.clone(), amount: route.cost },
            ),
        };
        return Decision::Call(ServiceCall { path, body: body.unwrap_or_default() }, pending);
    }
    match (cfg.rate_limit, identity.account.is_some()) {
        (Some(rate_limit), true) => {
            let body = serde_json::to_vec(&RateLimitRequest { account: &account, rate_limit }).unwrap_or_default();
            Decision::Call(
                ServiceCall { path: cfg.service.ratelimit_path.clone(), body },
                Pending::RateLimit { route: idx, identity },
            )
        }
        _ => allow(route, identity),
    }
}

fn payment_required(offer: &crate::policy::X402Offer, req: &Request<'_>) -> Decision {
    let path = crate::policy::path::strip_query(req.path);
    Decision::Deny(Denial::PaymentRequired {
        offer: offer.clone(),
        resource_url: format!("{}://{}{}", req.scheme, req.authority, path),
    })
}

fn privy_cookie<'a>(cfg: &Config, req: &Request<'a>) -> Result<Option<&'a str>, Denial> {
    let Some(privy) = &cfg.privy else { return Ok(None) };
    if !privy.accept_cookie {
        return Ok(None);
    }
    let Some(raw) = bearer::cookie_value(&req.cookies, PRIVY_COOKIE) else { return Ok(None) };
    // Same rules as a Bearer token: reuse the header parser on "Bearer <value>".
    let Ok(value) = std::str::from_utf8(raw) else {
        return Err(Denial::Unauthorized(AuthFailure::Header(bearer::BearerError::BadCharacters)));
    };
    if value.len() > cfg.max_token_bytes {
        return Err(Denial::Unauthorized(AuthFailure::Header(bearer::BearerError::TooLong)));
    }
    if !value.starts_with("eyJ") || !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return Err(Denial::Unauthorized(AuthFailure::Format(bearer::ClassifyError::UnknownFormat)));
    }
    Ok(Some(value))
}

fn allow(route: &Route, identity: Identity) -> Decision {
    Decision::Allow(Grant { identity, route: Some(route.name.clone()), hold: None })
}

fn unauthorized(why: AuthFailure) -> Decision {
    Decision::Deny(Denial::Unauthorized(why))
}

fn unavailable(e: ServiceError) -> Decision {
    Decision::Deny(Denial::CreditsUnavailable(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bearer::sha256_hex;
    use crate::credits_api::ServiceError;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::{Signature, SigningKey};
    use p256::pkcs8::{EncodePublicKey, LineEnding};

    const NOW: i64 = 1_800_000_000;
    const ADMIN: &str = "operator-admin-key-for-tests";
    // An API key in the shape the service mints: dial_live_ + 40 hex; prefix "abc12345".
    const API_KEY: &str = "dial_live_abc12345deadbeefdeadbeefdeadbeef00000000";

    fn signing_key() -> SigningKey {
        SigningKey::from_slice(&[7u8; 32]).unwrap()
    }

    fn config() -> Config {
        let pem = signing_key().verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
        let json = serde_json::json!({
            "credits_service": {"cluster": "credits", "timeout_ms": 500},
            "privy": {"app_id": "app-1", "verification_key": pem, "accept_cookie": true},
            "routes": [
                {"name": "sms", "methods": ["POST"], "path": {"exact": "/sms"}, "scope": "sms:send", "cost": 2,
                 "payment": ["credits", "x402"], "charge": "up_front",
                 "x402": {"accepts": [{"scheme": "exact", "network": "eip155:8453", "amount": "1000", "asset": "0xA", "payTo": "0xB", "maxTimeoutSeconds": 60}]}},
                {"name": "account", "methods": ["GET"], "path": {"exact": "/account"}},
                {"name": "topup", "path": {"exact": "/topup"}, "payment": ["x402"],
                 "x402": {"accepts": [{"scheme": "exact", "network": "eip155:8453", "amount": "5", "asset": "0xA", "payTo": "0xB", "maxTimeoutSeconds": 60}]}},
                {"name": "health", "path": {"exact": "/healthz"}, "public": true},
                {"name": "report", "methods": ["POST"], "path": {"exact": "/report"}, "scope": "sms:send", "cost": 3}
            ]
        });
        Config::from_json(json.to_string().as_bytes(), Some(ADMIN)).unwrap()
    }

    fn privy_token(exp: i64) -> String {
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","typ":"JWT"}"#);
        let c = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"sid":"s","iss":"privy.io","iat":{},"aud":"app-1","sub":"did:privy:u1","exp":{exp}}}"#,
            NOW - 5
        ));
        let sig: Signature = signing_key().sign(format!("{h}.{c}").as_bytes());
        format!("{h}.{c}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    fn request<'a>(method: &'a str, path: &'a str, auth: Option<&'a str>) -> Request<'a> {
        Request {
            method,
            path,
            scheme: "https",
            authority: "api.test",
            authorization: auth.map(|a| vec![a.as_bytes()]).unwrap_or_default(),
            cookies: vec![],
            request_id: "req-1",
            has_x402_payment: false,
            fetched_keys: &[],
            fetched_fingerprint: None,
            refetch_unknown_kid: false,
        }
    }

    fn answer(status: u16, body: &str) -> CallOutcome {
        CallOutcome::Answered { status, body: body.as_bytes().to_vec(), truncated: false }
    }

    fn record(scopes: &str, state: &str, balance: i64) -> String {
        format!(r#"{{"account":"did:privy:owner","key_prefix":"abc12345","kind":"api_key","scopes":{scopes},"state":"{state}","expires_at":null,"balance":{balance}}}"#)
    }

    fn denial(d: Decision) -> Denial {
        match d {
            Decision::Deny(d) => d,
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    fn with_rate_limit() -> Config {
        let mut c = config();
        c.rate_limit = Some(crate::policy::RateLimit { requests: 10, window_seconds: 60, burst: Some(5) });
        c
    }

    #[test]
    fn charge_on_success_holds_then_settles() {
        let c = config();
        let auth = format!("Bearer {API_KEY}");
        let Decision::Call(_, pending) = decide(&c, &request("POST", "/report", Some(&auth)), NOW) else { panic!() };
        let Decision::Call(hold, pending) = resume(&c, pending, answer(200, &record(r#"["sms:send"]"#, "active", 10)), NOW)
        else {
            panic!()
        };
        assert_eq!(hold.path, "/v1/holds");
        let body: serde_json::Value = serde_json::from_slice(&hold.body).unwrap();
        assert_eq!(body["amount"], 3);
        assert_eq!(body["ttl_seconds"], 300);
        assert_eq!(body["idempotency_key"], "report:req-1");
        assert!(body.get("rate_limit").is_none());
        let held = r#"{"hold_id":"hold_abc","account":"did:privy:owner","amount":3,"balance":7,"expires_at":0,"replayed":false}"#;
        match resume(&c, pending.clone(), answer(200, held), NOW) {
            Decision::Allow(g) => {
                assert_eq!(g.hold.as_deref(), Some("hold_abc"));
                assert_eq!((g.identity.charged, g.identity.credits_remaining), (3, Some(7)));
            }
            other => panic!("{other:?}"),
        }
        let broke = r#"{"error":"insufficient_credits","balance":2,"required":3}"#;
        assert_eq!(denial(resume(&c, pending, answer(402, broke), NOW)), Denial::InsufficientCredits { credits: 2, required: 3 });
        // A capture that is not confirmed never lets the response through; a
        // release that fails does (the response is already a failure).
        use crate::credits_api::Settlement;
        assert_eq!(after_settlement(true, Ok(Settlement::Done)), AfterSettlement::Deliver);
        assert!(matches!(after_settlement(true, Ok(Settlement::NotOpen)), AfterSettlement::Refuse(_)));
        assert!(matches!(after_settlement(true, Err(ServiceError::Unavailable)), AfterSettlement::Refuse(_)));
        assert_eq!(after_settlement(false, Err(ServiceError::Unavailable)), AfterSettlement::Deliver);
        // Settling: capture on 2xx/3xx, release on 5xx or no answer.
        for (status, action) in [(Some(200), "capture"), (Some(302), "capture"), (Some(404), "release"), (Some(500), "release"), (None, "release")] {
            assert_eq!(settle(&c, "hold_abc", status).path, format!("/v1/holds/hold_abc/{action}"), "{status:?}");
        }
    }

    #[test]
    fn rate_limit_is_checked_by_the_service() {
        let c = with_rate_limit();
        let auth = format!("Bearer {}", privy_token(NOW + 3600));
        // Free route: a rate-limit callout on its own.
        let Decision::Call(call, pending) = decide(&c, &request("GET", "/account", Some(&auth)), NOW) else { panic!() };
        assert_eq!(call.path, "/v1/ratelimit");
        let body: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(body, serde_json::json!({"account": "did:privy:u1", "rate_limit": {"requests": 10, "window_seconds": 60, "burst": 5}}));
        assert!(matches!(resume(&c, pending.clone(), answer(200, r#"{"allowed":true,"remaining":4}"#), NOW), Decision::Allow(_)));
        assert_eq!(
            denial(resume(&c, pending, answer(429, r#"{"error":"rate_limited","retry_after_seconds":6}"#), NOW)),
            Denial::RateLimited { retry_after: 6 }
        );
        // Paid route: folded into the hold, so still one callout.
        let Decision::Call(call, pending) = decide(&c, &request("POST", "/report", Some(&auth)), NOW) else { panic!() };
        assert_eq!(call.path, "/v1/holds");
        let body: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(body["rate_limit"]["burst"], 5);
        assert_eq!(
            denial(resume(&c, pending, answer(429, r#"{"error":"rate_limited","retry_after_seconds":2}"#), NOW)),
            Denial::RateLimited { retry_after: 2 }
        );
        // Admin: no budget.
        let admin = format!("Bearer {ADMIN}");
        assert!(matches!(decide(&c, &request("GET", "/account", Some(&admin)), NOW), Decision::Allow(_)));
    }

    #[test]
    fn public_and_unmatched() {
        let c = config();
        assert!(matches!(decide(&c, &request("GET", "/healthz", None), NOW), Decision::Allow(_)));
        assert_eq!(denial(decide(&c, &request("GET", "/nope", None), NOW)), Denial::RouteNotAllowed);
    }

    #[test]
    fn admin_bypasses_scope_and_payment() {
        let c = config();
        let auth = format!("Bearer {ADMIN}");
        match decide(&c, &request("POST", "/sms", Some(&auth)), NOW) {
            Decision::Allow(g) => {
                assert_eq!(g.identity.method, AuthMethod::Admin);
                assert_eq!(g.identity.charged, 0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn api_key_lookup_scope_then_debit() {
        let c = config();
        let auth = format!("Bearer {API_KEY}");
        let req = request("POST", "/sms?x=1", Some(&auth));
        let Decision::Call(call, pending) = decide(&c, &req, NOW) else { panic!() };
        assert_eq!(call.path, "/v1/keys/lookup");
        let body = String::from_utf8(call.body).unwrap();
        // The key leaves the filter only as its SHA-256.
        assert!(!body.contains(API_KEY) && !body.contains("abc12345dead"));
        assert!(body.contains(&sha256_hex(API_KEY.as_bytes())));

        let Decision::Call(debit, pending) =
            resume(&c, pending, answer(200, &record(r#"["sms:send"]"#, "active", 10)), NOW)
        else {
            panic!()
        };
        assert_eq!(debit.path, "/v1/debit");
        let body: serde_json::Value = serde_json::from_slice(&debit.body).unwrap();
        assert_eq!(body["amount"], 2);
        assert_eq!(body["account"], "did:privy:owner");
        assert_eq!(body["idempotency_key"], "sms:req-1");
        assert_eq!(body["key_prefix"], "abc12345");

        let ok = r#"{"account":"did:privy:owner","charged":2,"balance":8,"replayed":false}"#;
        match resume(&c, pending.clone(), answer(200, ok), NOW) {
            Decision::Allow(g) => {
                assert_eq!(g.identity.credits_remaining, Some(8));
                assert_eq!(g.identity.charged, 2);
                assert_eq!(g.identity.key_prefix.as_deref(), Some("abc12345"));
            }
            other => panic!("{other:?}"),
        }
        let broke = r#"{"error":"insufficient_credits","balance":1,"required":2}"#;
        assert_eq!(
            denial(resume(&c, pending.clone(), answer(402, broke), NOW)),
            Denial::InsufficientCredits { credits: 1, required: 2 }
        );
        for failure in [CallOutcome::Failed, answer(500, "oops"), answer(200, "garbage"), answer(503, "")] {
            assert!(matches!(denial(resume(&c, pending.clone(), failure, NOW)), Denial::CreditsUnavailable(_)));
        }
    }

    #[test]
    fn api_key_refusals() {
        let c = config();
        let auth = format!("Bearer {API_KEY}");
        let req = request("POST", "/sms", Some(&auth));
        let Decision::Call(_, pending) = decide(&c, &req, NOW) else { panic!() };
        let cases = [
            (answer(404, r#"{"error":"key_not_found"}"#), Denial::Unauthorized(AuthFailure::UnknownKey)),
            (answer(200, &record(r#"["sms:send"]"#, "revoked", 5)), Denial::Unauthorized(AuthFailure::Revoked)),
            (answer(200, &record(r#"["sms:send"]"#, "expired", 5)), Denial::Unauthorized(AuthFailure::Expired)),
            (answer(200, &record(r#"["contacts_read"]"#, "active", 5)), Denial::InsufficientScope { scope: "sms:send".into() }),
            (answer(200, &record("[]", "active", 5).replace("abc12345", "zzz99999")), Denial::CreditsUnavailable(ServiceError::Inconsistent)),
            (answer(200, &record(r#"["sms:send"]"#, "active", 5).replace("null", &(NOW - 1).to_string())), Denial::Unauthorized(AuthFailure::Expired)),
        ];
        for (outcome, want) in cases {
            assert_eq!(denial(resume(&c, pending.clone(), outcome, NOW)), want);
        }
    }

    #[test]
    fn free_route_needs_no_debit() {
        let c = config();
        let auth = format!("Bearer {API_KEY}");
        let Decision::Call(_, pending) = decide(&c, &request("GET", "/account", Some(&auth)), NOW) else { panic!() };
        match resume(&c, pending, answer(200, &record("[]", "active", 42)), NOW) {
            Decision::Allow(g) => assert_eq!((g.identity.charged, g.identity.credits_remaining), (0, Some(42))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn privy_session_skips_scope_but_pays() {
        let c = config();
        let auth = format!("Bearer {}", privy_token(NOW + 3600));
        let Decision::Call(call, _) = decide(&c, &request("POST", "/sms", Some(&auth)), NOW) else { panic!() };
        assert_eq!(call.path, "/v1/debit");
        let body: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(body["account"], "did:privy:u1");
        // Free route: no callout at all.
        match decide(&c, &request("GET", "/account", Some(&auth)), NOW) {
            Decision::Allow(g) => assert_eq!(g.identity.method, AuthMethod::Privy),
            other => panic!("{other:?}"),
        }
        let expired = format!("Bearer {}", privy_token(NOW - 3600));
        assert_eq!(
            denial(decide(&c, &request("GET", "/account", Some(&expired)), NOW)),
            Denial::Unauthorized(AuthFailure::Jwt(crate::privy_jwt::JwtError::Expired))
        );
    }

    #[test]
    fn privy_cookie_when_allowed() {
        let c = config();
        let cookie = format!("theme=dark; privy-token={}", privy_token(NOW + 60));
        let mut req = request("GET", "/account", None);
        req.cookies = vec![cookie.as_bytes()];
        assert!(matches!(decide(&c, &req, NOW), Decision::Allow(_)));
        let bad = "privy-token=not-a-jwt";
        req.cookies = vec![bad.as_bytes()];
        assert!(matches!(denial(decide(&c, &req, NOW)), Denial::Unauthorized(_)));
    }

    #[test]
    fn x402_fall_through() {
        let c = config();
        // No Bearer, x402 route, no payment: 402 with requirements.
        match denial(decide(&c, &request("POST", "/sms?a=b", None), NOW)) {
            Denial::PaymentRequired { resource_url, .. } => assert_eq!(resource_url, "https://api.test/sms"),
            other => panic!("{other:?}"),
        }
        // With a payment header: straight through, unchanged.
        let mut paid = request("POST", "/sms", None);
        paid.has_x402_payment = true;
        assert!(matches!(decide(&c, &paid, NOW), Decision::Allow(_)));
        // A route without x402: 401.
        assert_eq!(denial(decide(&c, &request("GET", "/account", None), NOW)), Denial::Unauthorized(AuthFailure::Missing));
        // x402-only route with a Bearer but no payment: 402 before any lookup.
        let auth = format!("Bearer {API_KEY}");
        assert!(matches!(denial(decide(&c, &request("POST", "/topup", Some(&auth)), NOW)), Denial::PaymentRequired { .. }));
        let mut topup = request("POST", "/topup", Some(&auth));
        topup.has_x402_payment = true;
        let Decision::Call(call, pending) = decide(&c, &topup, NOW) else { panic!() };
        assert_eq!(call.path, "/v1/keys/lookup");
        // Identified, not charged in credits.
        assert!(matches!(resume(&c, pending, answer(200, &record("[]", "active", 0)), NOW), Decision::Allow(_)));
    }

    #[test]
    fn malformed_credentials_are_401() {
        let c = config();
        for auth in ["Basic abc", "Bearer", "Bearer a b", "Bearer dial_live_x", "Bearer nonsense"] {
            assert!(matches!(denial(decide(&c, &request("POST", "/sms", Some(auth)), NOW)), Denial::Unauthorized(_)), "{auth}");
        }
        let mut two = request("POST", "/sms", None);
        two.authorization = vec![b"Bearer a", b"Bearer b"];
        assert!(matches!(denial(decide(&c, &two, NOW)), Denial::Unauthorized(AuthFailure::Header(_))));
    }

    #[test]
    fn a_repeated_token_is_verified_once_and_still_expires_on_time() {
        let c = config();
        let mut caches = Caches::new(16, 0, 0);
        let token = privy_token(NOW + 10);
        let auth = format!("Bearer {token}");
        let now_ms = NOW * 1000;
        for _ in 0..3 {
            assert!(matches!(decide_cached(&c, &request("GET", "/account", Some(&auth)), now_ms, &mut caches), Decision::Allow(_)));
        }
        let stats = caches.take_stats();
        assert_eq!((stats.token_misses, stats.token_hits), (1, 2), "verified once, served twice from the cache");
        // At exp + leeway (60 s) the cached entry no longer vouches: 401 as without a cache.
        let later = (NOW + 70) * 1000;
        assert_eq!(
            denial(decide_cached(&c, &request("GET", "/account", Some(&auth)), later, &mut caches)),
            Denial::Unauthorized(AuthFailure::Jwt(crate::privy_jwt::JwtError::Expired))
        );
        // A forged token never enters the cache: flipping a signature byte gives 401 every time.
        let mut forged = token.clone().into_bytes();
        let last = forged.len() - 2;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let forged = format!("Bearer {}", String::from_utf8(forged).unwrap());
        for _ in 0..2 {
            assert!(matches!(
                denial(decide_cached(&c, &request("GET", "/account", Some(&forged)), now_ms, &mut caches)),
                Denial::Unauthorized(_)
            ));
        }
    }

    #[test]
    fn a_looked_up_key_is_reused_within_the_ttl_with_scope_checked_per_route() {
        let c = config();
        let mut caches = Caches::new(0, 16, 500);
        let auth = format!("Bearer {API_KEY}");
        let t0 = NOW * 1000;
        let Decision::Call(call, pending) = decide_cached(&c, &request("GET", "/account", Some(&auth)), t0, &mut caches) else {
            panic!()
        };
        assert_eq!(call.path, "/v1/keys/lookup");
        assert!(matches!(
            resume_cached(&c, pending, answer(200, &record(r#"["other:scope"]"#, "active", 10)), t0, &mut caches),
            Decision::Allow(_)
        ));
        // Within the TTL: no lookup; the paid route goes straight to its charge
        // (one callout), and the scope the cached key lacks is still refused.
        let report = request("POST", "/report", Some(&auth));
        assert_eq!(
            denial(decide_cached(&c, &report, t0 + 499, &mut caches)),
            Denial::InsufficientScope { scope: "sms:send".into() }
        );
        match decide_cached(&c, &request("GET", "/account", Some(&auth)), t0 + 499, &mut caches) {
            Decision::Allow(g) => assert_eq!(g.identity.key_prefix.as_deref(), Some("abc12345")),
            other => panic!("{other:?}"),
        }
        // At the TTL: asked again.
        let Decision::Call(call, pending) = decide_cached(&c, &request("GET", "/account", Some(&auth)), t0 + 500, &mut caches) else {
            panic!()
        };
        assert_eq!(call.path, "/v1/keys/lookup");
        // A revoked answer is refused and not cached: the next request asks again.
        assert_eq!(
            denial(resume_cached(&c, pending, answer(200, &record("[]", "revoked", 0)), t0 + 500, &mut caches)),
            Denial::Unauthorized(AuthFailure::Revoked)
        );
        assert!(matches!(
            decide_cached(&c, &request("GET", "/account", Some(&auth)), t0 + 501, &mut caches),
            Decision::Call(ServiceCall { ref path, .. }, _) if path == "/v1/keys/lookup"
        ));
    }

    #[test]
    fn a_cached_key_on_a_paid_route_costs_one_callout() {
        let c = config();
        let mut caches = Caches::new(0, 16, 500);
        let auth = format!("Bearer {API_KEY}");
        let t0 = NOW * 1000;
        let Decision::Call(_, pending) = decide_cached(&c, &request("POST", "/sms", Some(&auth)), t0, &mut caches) else { panic!() };
        let Decision::Call(debit, _) =
            resume_cached(&c, pending, answer(200, &record(r#"["sms:send"]"#, "active", 10)), t0, &mut caches)
        else {
            panic!()
        };
        assert_eq!(debit.path, "/v1/debit");
        let Decision::Call(second, _) = decide_cached(&c, &request("POST", "/sms", Some(&auth)), t0 + 100, &mut caches) else {
            panic!()
        };
        assert_eq!(second.path, "/v1/debit", "straight to the debit: the lookup came from the cache");
    }

    /// proxy-wasm shared data, as the VMs of one Envoy see it, and the key
    /// they all derived from the shared secret.
    struct Shared(std::cell::RefCell<std::collections::HashMap<String, Vec<u8>>>, cache::SlotKey);
    impl Default for Shared {
        fn default() -> Self {
            Shared(Default::default(), cache::SlotKey::derive(b"0123456789abcdef0123456789abcdef", crate::BUILD_ID).unwrap())
        }
    }
    impl Shared {
        fn sharing(&self) -> Option<Sharing<'_>> {
            Some(Sharing { store: self, key: &self.1 })
        }
    }
    impl cache::SharedStore for Shared {
        fn get(&self, key: &str) -> Option<Vec<u8>> {
            self.0.borrow().get(key).cloned()
        }
        fn set(&self, key: &str, value: &[u8]) {
            self.0.borrow_mut().insert(key.to_owned(), value.to_vec());
        }
    }

    #[test]
    fn a_token_is_verified_once_per_envoy_not_once_per_worker() {
        let c = config();
        let shared = Shared::default();
        let (mut worker1, mut worker2) = (Caches::new(16, 0, 0), Caches::new(16, 0, 0));
        let auth = format!("Bearer {}", privy_token(NOW + 100));
        let req = request("GET", "/account", Some(&auth));
        let now_ms = NOW * 1000;
        assert!(matches!(decide_shared(&c, &req, now_ms, &mut worker1, shared.sharing()), Decision::Allow(_)));
        assert_eq!(worker1.take_stats().token_misses, 1, "verified on the first worker");
        match decide_shared(&c, &req, now_ms, &mut worker2, shared.sharing()) {
            Decision::Allow(g) => assert_eq!(g.identity.account.as_deref(), Some("did:privy:u1")),
            other => panic!("{other:?}"),
        }
        let s2 = worker2.take_stats();
        assert_eq!((s2.token_misses, s2.token_shared_hits, s2.token_hits), (0, 1, 0), "the second worker read the slot");
        assert!(matches!(decide_shared(&c, &req, now_ms, &mut worker2, shared.sharing()), Decision::Allow(_)));
        assert_eq!(worker2.take_stats().token_hits, 1, "and keeps it locally");
        // Expiry still applies to an entry read from the slot.
        let mut worker3 = Caches::new(16, 0, 0);
        assert_eq!(
            denial(decide_shared(&c, &req, (NOW + 200) * 1000, &mut worker3, shared.sharing())),
            Denial::Unauthorized(AuthFailure::Jwt(crate::privy_jwt::JwtError::Expired))
        );
    }

    #[test]
    fn a_slot_written_under_another_policy_is_not_trusted() {
        let c = config();
        let shared = Shared::default();
        let auth = format!("Bearer {}", privy_token(NOW + 100));
        let req = request("GET", "/account", Some(&auth));
        assert!(matches!(decide_shared(&c, &req, NOW * 1000, &mut Caches::new(16, 0, 0), shared.sharing()), Decision::Allow(_)));
        // Another policy on the same VM id: another audience. The slot the
        // first one wrote must not let this token (aud app-1) through here.
        let pem = signing_key().verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
        let other = serde_json::json!({
            "credits_service": {"cluster": "credits"},
            "privy": {"app_id": "app-2", "verification_key": pem},
            "routes": [{"name": "account", "methods": ["GET"], "path": {"exact": "/account"}}]
        });
        let other = Config::from_json(other.to_string().as_bytes(), None).unwrap();
        let mut caches = Caches::new(16, 0, 0);
        assert_eq!(
            denial(decide_shared(&other, &req, NOW * 1000, &mut caches, shared.sharing())),
            Denial::Unauthorized(AuthFailure::Jwt(crate::privy_jwt::JwtError::Audience))
        );
        assert_eq!(caches.take_stats().token_shared_hits, 0);
        // A forged token is never written to a slot.
        let slots_before = shared.0.borrow().len();
        let last = if auth.ends_with('A') { "B" } else { "A" };
        let forged = format!("{}{last}", &auth[..auth.len() - 1]);
        let _ = decide_shared(&c, &request("GET", "/account", Some(&forged)), NOW * 1000, &mut Caches::new(16, 0, 0), shared.sharing());
        assert_eq!(shared.0.borrow().len(), slots_before);
    }

    #[test]
    fn a_forged_shared_slot_is_not_a_verified_token() {
        // Everything but the MAC in a slot is public: the token's digest, the
        // verifier's fingerprint (issuer, app id, leeway, public keys), an
        // expiry, an account. Another module on the same vm_id writes one
        // for a JWT-shaped string that was never signed.
        let c = config();
        let shared = Shared::default();
        let token = "eyJhIn0.eyJhIn0.AA";
        let digest = cache::sha256(token.as_bytes());
        let verifier = c.privy.as_ref().unwrap().fingerprint;
        let victim = crate::privy_jwt::Session { account: "did:privy:victim".into(), session_id: "s".into(), expires_at: 0 };
        let forger = cache::SlotKey::derive(b"not the deployment's shared secret", crate::BUILD_ID).unwrap();
        let forged = cache::encode_shared(&forger, &digest, &verifier, &victim, i64::MAX).unwrap();
        cache::SharedStore::set(&shared, &cache::shared_slot(&digest), &forged);
        let auth = format!("Bearer {token}");
        let mut caches = Caches::new(16, 0, 0);
        assert!(matches!(
            denial(decide_shared(&c, &request("GET", "/account", Some(&auth)), NOW * 1000, &mut caches, shared.sharing())),
            Denial::Unauthorized(AuthFailure::Jwt(_))
        ));
        assert_eq!(caches.take_stats().token_shared_hits, 0);
        // Without sharing configured the slot is not even read.
        assert!(matches!(
            denial(decide_shared(&c, &request("GET", "/account", Some(&auth)), NOW * 1000, &mut caches, None)),
            Denial::Unauthorized(AuthFailure::Jwt(_))
        ));
    }

    #[test]
    fn a_token_cached_under_fetched_keys_is_verified_again_when_they_change() {
        let c = config();
        let auth = format!("Bearer {}", privy_token(NOW + 100));
        let mut caches = Caches::new(16, 0, 0);
        let (f1, f2) = ([1u8; 32], [2u8; 32]);
        let other = crate::privy_jwt::EsKey::new(Some("other".into()), *SigningKey::from_slice(&[5; 32]).unwrap().verifying_key());
        let fetched = [other];
        let mut req = request("GET", "/account", Some(&auth));
        req.fetched_keys = &fetched;
        req.fetched_fingerprint = Some(&f1);
        assert!(matches!(decide_cached(&c, &req, NOW * 1000, &mut caches), Decision::Allow(_)));
        assert_eq!(caches.take_stats().token_misses, 1);
        assert!(matches!(decide_cached(&c, &req, NOW * 1000, &mut caches), Decision::Allow(_)));
        assert_eq!(caches.take_stats().token_hits, 1, "same key set: served from the cache");
        req.fetched_fingerprint = Some(&f2);
        assert!(matches!(decide_cached(&c, &req, NOW * 1000, &mut caches), Decision::Allow(_)));
        let s = caches.take_stats();
        assert_eq!((s.token_hits, s.token_misses), (0, 1), "another key set: verified again");
    }
}
