//! The per-request decision: given the request and the compiled config, what
//! to do next. Pure logic; the proxy-wasm glue only carries it out.
//!
//! A request ends in [`Decision::Allow`] or [`Decision::Deny`], possibly after
//! one or two callouts to the key/credits service ([`Decision::Call`]), each
//! resumed with [`resume`].

use crate::bearer::{self, Credential, KeyCredential};
use crate::cache::{self, Caches, Sharing};
use crate::credits_api::{
    self, CallOutcome, Claim, ClaimRequest, Debit, DebitRequest, Hold, HoldRequest, KeyState, Lookup, LookupRequest,
    RateCheck, RateLimitRequest, ReleaseRequest, ServiceError,
};
use crate::denial::{AuthFailure, Denial, PaymentRefusal};
use crate::identity::{AuthMethod, Identity, PaidWith};
use crate::lease::Spend;
use crate::policy::{Charge, Config, CredentialKind, Route, Settle, Unmatched, X402Offer};
use crate::x402::{self, Payment, PaymentError, Settlement, Verification};

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
    /// Every `PAYMENT-SIGNATURE` header value, raw (x402 v2).
    pub payment_signature: Vec<&'a [u8]>,
    /// A v1 `X-PAYMENT` header is present (refused: never passed unchecked).
    pub x_payment: bool,
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
    /// A verified x402 payment to settle when the upstream answers 2xx/3xx.
    pub x402_settle: Option<Box<Payment>>,
    /// The `PAYMENT-RESPONSE` of a payment already settled (before the
    /// upstream), to add to the response.
    pub receipt: Option<String>,
    /// The claim this request holds on its x402 payment (released if the
    /// upstream fails, so the same payment may be tried again).
    pub x402_claim: Option<String>,
    /// Paid from this VM's credit lease, charged when the upstream answers
    /// 2xx/3xx (returned to the lease otherwise).
    pub lease: Option<crate::lease::Ticket>,
}

/// An x402 payment waiting for the Bearer's account (an x402-only route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToPay {
    pub payment: Box<Payment>,
    pub resource_url: String,
}

/// Where a callout goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallTarget {
    /// The key/credits service (`credits_service`).
    Credits,
    /// The x402 facilitator (`x402_facilitator`).
    Facilitator,
}

/// One HTTP callout (to the key/credits service unless `to` says otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCall {
    pub path: String,
    pub body: Vec<u8>,
    pub to: CallTarget,
}

impl ServiceCall {
    fn credits(path: String, body: Vec<u8>) -> ServiceCall {
        ServiceCall { path, body, to: CallTarget::Credits }
    }
}

/// What the request is waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// `key_sha256`: what the answer is cached under. `payment`: the x402
    /// payment an x402-only route (a top-up) is paid with, once the key says
    /// whose account it is.
    Lookup {
        route: usize,
        prefix: String,
        idempotency_key: String,
        key_sha256: cache::Digest32,
        payment: Option<ToPay>,
    },
    /// The facilitator's `/verify` of an x402 payment (`resource_url`: what a
    /// fresh 402 names as the resource).
    X402Verify { route: usize, identity: Identity, payment: Box<Payment>, resource_url: String, idempotency_key: String },
    /// Its `/settle`, before the upstream (`settle: before_upstream`).
    X402Settle { route: usize, identity: Identity, payment: Box<Payment> },
    /// The claim of a verified payment at the key/credits service: one
    /// request per payment, across every Envoy and worker.
    X402Claim { route: usize, identity: Identity, payment: Box<Payment>, resource_url: String, claim: String },
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
            Unmatched::Allow => Decision::Allow(Grant {
                identity: Identity::anonymous(),
                route: None,
                hold: None,
                x402_settle: None,
                receipt: None,
                x402_claim: None,
                lease: None,
            }),
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
        // A route that names the credentials it takes needs one, payment or not.
        if route.credentials.is_some() {
            return unauthorized(AuthFailure::Missing);
        }
        // No credential at all: the x402 fall-through.
        return match &route.x402 {
            Some(offer) => match payment(cfg, offer, req) {
                Ok(p) => verify_payment(cfg, idx, Identity::anonymous(), p, resource_url(req), idempotency_key(route, req.request_id)),
                Err(d) => Decision::Deny(d),
            },
            None => unauthorized(AuthFailure::Missing),
        };
    };
    let credential = match bearer::classify(token, &cfg.admin_digests) {
        Ok(c) => c,
        Err(e) => return unauthorized(AuthFailure::Format(e)),
    };
    if let Some(kinds) = &route.credentials {
        let kind = match &credential {
            Credential::Admin => None,
            Credential::PrivyAccessToken(_) => Some(CredentialKind::Privy),
            Credential::Key(k) if k.kind == bearer::KeyKind::ApiKey => Some(CredentialKind::ApiKey),
            Credential::Key(_) => Some(CredentialKind::ApiToken),
        };
        // Refused before any verification or lookup.
        if kind.is_some_and(|k| !kinds.contains(&k)) {
            return unauthorized(AuthFailure::KindNotAccepted);
        }
    }
    let idem = idempotency_key(route, req.request_id);
    // An x402-only route (a top-up): the Bearer says whose account it is,
    // but only an x402 payment pays. A missing or malformed payment is
    // refused before any lookup.
    let x402_payment = match (&route.x402, route.credits, &credential) {
        (Some(offer), false, Credential::PrivyAccessToken(_) | Credential::Key(_)) => match payment(cfg, offer, req) {
            Ok(p) => Some(ToPay { payment: p, resource_url: resource_url(req) }),
            Err(d) => return Decision::Deny(d),
        },
        _ => None,
    };
    match credential {
        // Operator bypass: no scope check, no payment.
        Credential::Admin => allow(route, Identity::admin()),
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
                        ..Identity::anonymous()
                    };
                    // Privy sessions skip scope checks but pay like everyone else.
                    charge_or_allow(cfg, idx, route, identity, idem, x402_payment, caches, now_ms)
                }
                Err(e) => unauthorized(AuthFailure::Jwt(e)),
            }
        }
        Credential::Key(key) => {
            let digest = cache::sha256(key.secret.as_bytes());
            match caches.looked_up_key(&digest, now_ms) {
                // The record was checked when it was cached; the route's
                // scope and the key's expiry are checked again here.
                Some(rec) => authorized_key(cfg, idx, route, rec, now_ms, idem, x402_payment, caches),
                None => lookup(cfg, idx, &key, digest, idem, x402_payment),
            }
        }
    }
}

/// Continues a request after its callout answered (or failed), with the
/// VM's caches (an active key's lookup is remembered).
pub fn resume_cached(cfg: &Config, pending: Pending, outcome: CallOutcome, now_ms: i64, caches: &mut Caches) -> Decision {
    match pending {
        Pending::Lookup { route: idx, prefix, idempotency_key, key_sha256, payment } => {
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
            authorized_key(cfg, idx, route, rec, now_ms, idempotency_key, payment, caches)
        }
        Pending::Debit { route: idx, mut identity, amount } => {
            let Some(route) = cfg.routes.get(idx) else {
                return unavailable(ServiceError::Inconsistent);
            };
            let account = identity.account.clone().unwrap_or_default();
            match credits_api::parse_debit(outcome, &account, amount) {
                Ok(Debit::Charged { balance }) => {
                    if let Some(lease) = &cfg.service.lease {
                        caches.leases.charged(lease, &account, balance, now_ms);
                    }
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
                    if let Some(lease) = &cfg.service.lease {
                        caches.leases.charged(lease, &account, balance, now_ms);
                    }
                    identity.credits_remaining = Some(balance);
                    identity.charged = amount;
                    Decision::Allow(Grant { hold: Some(hold_id), ..grant(route, identity) })
                }
                Ok(Hold::Insufficient { balance }) => {
                    Decision::Deny(Denial::InsufficientCredits { credits: balance, required: amount })
                }
                Ok(Hold::RateLimited { retry_after }) => Decision::Deny(Denial::RateLimited { retry_after }),
                Err(e) => unavailable(e),
            }
        }
        Pending::X402Verify { route: idx, mut identity, payment, resource_url, idempotency_key } => {
            let Some((route, offer)) = cfg.routes.get(idx).and_then(|r| r.x402.as_ref().map(|o| (r, o))) else {
                return unavailable(ServiceError::Inconsistent);
            };
            match x402::parse_verify(outcome) {
                Ok(Verification::Valid { payer }) => {
                    let r = &payment.requirement;
                    identity.payment = Some(PaidWith {
                        payer,
                        network: r.network.clone(),
                        amount: r.amount.clone(),
                        asset: r.asset.clone(),
                        transaction: None,
                    });
                    if identity.method == AuthMethod::Anonymous {
                        identity.method = AuthMethod::X402;
                    }
                    match offer.settle {
                        // Settled after the upstream: first make sure no copy
                        // of this payment is being served elsewhere.
                        Settle::AfterResponse => claim_payment(cfg, idx, route, identity, payment, resource_url, idempotency_key),
                        // Settled first: a second settle of a copy fails.
                        Settle::BeforeUpstream => settle_payment(cfg, idx, identity, payment),
                    }
                }
                Ok(Verification::Invalid { reason }) => Decision::Deny(Denial::PaymentRequired {
                    offer: Box::new(offer.clone()),
                    resource_url,
                    refused: Some(PaymentRefusal::Facilitator(reason)),
                }),
                Err(e) => Decision::Deny(Denial::PaymentUnavailable(e)),
            }
        }
        Pending::X402Claim { route: idx, identity, payment, resource_url, claim } => {
            let Some((route, offer)) = cfg.routes.get(idx).and_then(|r| r.x402.as_ref().map(|o| (r, o))) else {
                return unavailable(ServiceError::Inconsistent);
            };
            match credits_api::parse_claim(outcome, &claim) {
                Ok(Claim::Claimed) => {
                    Decision::Allow(Grant { x402_settle: Some(payment), x402_claim: Some(claim), ..grant(route, identity) })
                }
                Ok(Claim::InUse) => Decision::Deny(Denial::PaymentRequired {
                    offer: Box::new(offer.clone()),
                    resource_url,
                    refused: Some(PaymentRefusal::Local(PaymentError::InUse)),
                }),
                Err(e) => unavailable(e),
            }
        }
        Pending::X402Settle { route: idx, mut identity, payment } => {
            let Some(route) = cfg.routes.get(idx) else {
                return unavailable(ServiceError::Inconsistent);
            };
            match x402_settled(outcome, &payment) {
                Ok((transaction, receipt)) => {
                    if let Some(p) = identity.payment.as_mut() {
                        p.transaction = Some(transaction);
                    }
                    Decision::Allow(Grant { receipt: Some(receipt), ..grant(route, identity) })
                }
                Err(denial) => Decision::Deny(denial),
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

/// The facilitator's `/settle` of a verified payment, once the upstream
/// answered 2xx/3xx (a client never pays for a failure).
pub fn settle_call(cfg: &Config, payment: &Payment) -> Option<ServiceCall> {
    let f = cfg.facilitator.as_ref()?;
    Some(ServiceCall { path: f.settle_path.clone(), body: x402::facilitator_body(payment), to: CallTarget::Facilitator })
}

/// What a `/settle` answer means for the request: the transaction and the
/// `PAYMENT-RESPONSE` receipt, or the refusal that replaces the response
/// (402 with the failed receipt, or 503 when the facilitator is unusable).
pub fn x402_settled(outcome: CallOutcome, payment: &Payment) -> Result<(String, String), Denial> {
    match x402::parse_settle(outcome, &payment.requirement.network) {
        Ok(Settlement::Settled { transaction, header, .. }) => Ok((transaction, header)),
        Ok(Settlement::Failed { reason, header }) => Err(Denial::PaymentFailed { reason, receipt: header }),
        Err(e) => Err(Denial::PaymentUnavailable(e)),
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
        Some(200..=399) => ServiceCall::credits(format!("{base}/{hold_id}/capture"), b"{}".to_vec()),
        _ => ServiceCall::credits(
            format!("{base}/{hold_id}/release"),
            serde_json::to_vec(&ReleaseRequest { reason: "upstream_error" }).unwrap_or_default(),
        ),
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

fn lookup(
    cfg: &Config,
    idx: usize,
    key: &KeyCredential<'_>,
    digest: cache::Digest32,
    idempotency_key: String,
    payment: Option<ToPay>,
) -> Decision {
    let hash = bearer::hex_lower(&digest);
    let body = serde_json::to_vec(&LookupRequest { key_sha256: &hash }).unwrap_or_default();
    Decision::Call(
        ServiceCall::credits(cfg.service.lookup_path.clone(), body),
        Pending::Lookup { route: idx, prefix: key.prefix.to_owned(), idempotency_key, key_sha256: digest, payment },
    )
}

/// The request's x402 payment for `offer`: decoded and matched, or the 402
/// that says why not (no payment, v1 only, malformed, not this resource's).
fn payment(cfg: &Config, offer: &X402Offer, req: &Request<'_>) -> Result<Box<Payment>, Denial> {
    let refuse = |refused: Option<PaymentRefusal>| Denial::PaymentRequired {
        offer: Box::new(offer.clone()),
        resource_url: resource_url(req),
        refused,
    };
    if req.payment_signature.is_empty() {
        return Err(refuse(req.x_payment.then_some(PaymentRefusal::Local(PaymentError::V1))));
    }
    let max = cfg.facilitator.as_ref().map_or(0, |f| f.max_payment_bytes);
    match x402::parse_payment(&req.payment_signature, &offer.accepts, max) {
        Ok(p) => Ok(Box::new(p)),
        Err(e) => Err(refuse(Some(PaymentRefusal::Local(e)))),
    }
}

/// Asks the facilitator whether `payment` is good (nothing is charged yet).
fn verify_payment(cfg: &Config, idx: usize, identity: Identity, payment: Box<Payment>, resource_url: String, idempotency_key: String) -> Decision {
    // A route that takes x402 always has a facilitator (checked at load).
    let Some(f) = cfg.facilitator.as_ref() else {
        return Decision::Deny(Denial::PaymentUnavailable(x402::FacilitatorError::DispatchFailed));
    };
    Decision::Call(
        ServiceCall { path: f.verify_path.clone(), body: x402::facilitator_body(&payment), to: CallTarget::Facilitator },
        Pending::X402Verify { route: idx, identity, payment, resource_url, idempotency_key },
    )
}

/// Claims a verified payment for this request (settled after the upstream).
#[allow(clippy::too_many_arguments)]
fn claim_payment(
    cfg: &Config,
    idx: usize,
    route: &Route,
    identity: Identity,
    payment: Box<Payment>,
    resource_url: String,
    owner: String,
) -> Decision {
    let claim = x402::claim_id(&payment);
    let body = serde_json::to_vec(&ClaimRequest {
        claim: &claim,
        owner: &owner,
        ttl_seconds: payment.requirement.max_timeout_seconds.clamp(1, 3600),
        route: &route.name,
    })
    .unwrap_or_default();
    Decision::Call(
        ServiceCall::credits(cfg.service.x402_claims_path.clone(), body),
        Pending::X402Claim { route: idx, identity, payment, resource_url, claim },
    )
}

/// Gives back a payment's claim (the upstream failed: nothing was settled,
/// and the same payment may be sent again).
pub fn release_claim(cfg: &Config, claim: &str) -> ServiceCall {
    ServiceCall::credits(format!("{}/{claim}/release", cfg.service.x402_claims_path), b"{}".to_vec())
}

/// Settles a verified payment before the upstream is called.
fn settle_payment(cfg: &Config, idx: usize, identity: Identity, payment: Box<Payment>) -> Decision {
    match settle_call(cfg, &payment) {
        Some(call) => Decision::Call(call, Pending::X402Settle { route: idx, identity, payment }),
        None => Decision::Deny(Denial::PaymentUnavailable(x402::FacilitatorError::DispatchFailed)),
    }
}



/// A key the service knows (answered now, or cached): its state, expiry and
/// the route's scope decide; then the route's charge.
#[allow(clippy::too_many_arguments)]
fn authorized_key(
    cfg: &Config,
    idx: usize,
    route: &Route,
    rec: credits_api::KeyRecord,
    now_ms: i64,
    idem: String,
    payment: Option<ToPay>,
    caches: &mut Caches,
) -> Decision {
    let now = now_ms.div_euclid(1000);
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
        ..Identity::anonymous()
    };
    charge_or_allow(cfg, idx, route, identity, idem, payment, caches, now_ms)
}

/// After authentication: hold or debit the route's cost (with the account's
/// rate limit checked first by the service), or, on a free route, check the
/// rate limit alone, or let it through.
#[allow(clippy::too_many_arguments)]
fn charge_or_allow(
    cfg: &Config,
    idx: usize,
    route: &Route,
    identity: Identity,
    idempotency_key: String,
    payment: Option<ToPay>,
    caches: &mut Caches,
    now_ms: i64,
) -> Decision {
    // An x402-only route: the payment pays, for the account the Bearer named.
    if let (false, Some(_)) = (route.credits, &route.x402) {
        return match payment {
            Some(p) => verify_payment(cfg, idx, identity, p.payment, p.resource_url, idempotency_key),
            None => unavailable(ServiceError::Inconsistent),
        };
    }
    let account = identity.account.clone().unwrap_or_default();
    if route.credits && route.cost > 0 && cfg.service.lease.is_some() && !account.is_empty() {
        // Paid from this VM's lease of the account's credits: no callout.
        let spend = Spend {
            idempotency_key: idempotency_key.clone(),
            amount: route.cost,
            route: Some(route.name.clone()),
            key_prefix: identity.key_prefix.clone(),
        };
        if let Some(ticket) = caches.leases.try_spend(&account, spend, now_ms) {
            let mut identity = identity;
            identity.charged = route.cost;
            identity.credits_remaining = caches.leases.believed_balance(&account);
            return match route.charge {
                Charge::OnSuccess => Decision::Allow(Grant { lease: Some(ticket), ..grant(route, identity) }),
                Charge::UpFront => {
                    caches.leases.settle(ticket, true);
                    allow(route, identity)
                }
            };
        }
    }
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
        return Decision::Call(ServiceCall::credits(path, body.unwrap_or_default()), pending);
    }
    match (cfg.rate_limit, identity.account.is_some()) {
        (Some(rate_limit), true) => {
            let body = serde_json::to_vec(&RateLimitRequest { account: &account, rate_limit }).unwrap_or_default();
            Decision::Call(
                ServiceCall::credits(cfg.service.ratelimit_path.clone(), body),
                Pending::RateLimit { route: idx, identity },
            )
        }
        _ => allow(route, identity),
    }
}

fn resource_url(req: &Request<'_>) -> String {
    let path = crate::policy::path::strip_query(req.path);
    format!("{}://{}{}", req.scheme, req.authority, path)
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

fn grant(route: &Route, identity: Identity) -> Grant {
    Grant { identity, route: Some(route.name.clone()), hold: None, x402_settle: None, receipt: None, x402_claim: None, lease: None }
}

fn allow(route: &Route, identity: Identity) -> Decision {
    Decision::Allow(grant(route, identity))
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
            "x402_facilitator": {"cluster": "facilitator"},
            "routes": [
                {"name": "sms", "methods": ["POST"], "path": {"exact": "/sms"}, "scope": "sms:send", "cost": 2,
                 "payment": ["credits", "x402"], "charge": "up_front",
                 "x402": {"accepts": [{"scheme": "exact", "network": "eip155:8453", "amount": "1000", "asset": "0xA", "payTo": "0xB", "maxTimeoutSeconds": 60}]}},
                {"name": "account", "methods": ["GET"], "path": {"exact": "/account"}},
                {"name": "topup", "path": {"exact": "/topup"}, "payment": ["x402"], "credentials": ["privy", "api_key"],
                 "x402": {"settle": "before_upstream",
                          "accepts": [{"scheme": "exact", "network": "eip155:8453", "amount": "5", "asset": "0xA", "payTo": "0xB", "maxTimeoutSeconds": 60}]}},
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
            payment_signature: vec![],
            x_payment: false,
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

    /// A PAYMENT-SIGNATURE for route `accepted` (as the client copies it).
    fn payment_header(amount: &str) -> String {
        use base64::engine::general_purpose::STANDARD;
        let accepted = serde_json::json!({"scheme": "exact", "network": "eip155:8453", "amount": amount, "asset": "0xA",
                                         "payTo": "0xB", "maxTimeoutSeconds": 60});
        STANDARD.encode(serde_json::json!({"x402Version": 2, "accepted": accepted, "payload": {"signature": "0x1"}}).to_string())
    }

    fn facilitator(body: serde_json::Value) -> CallOutcome {
        answer(200, &body.to_string())
    }

    #[test]
    fn x402_is_verified_before_and_settled_after_the_upstream() {
        let c = config();
        // No Bearer, x402 route, no payment: 402 with requirements.
        match denial(decide(&c, &request("POST", "/sms?a=b", None), NOW)) {
            Denial::PaymentRequired { resource_url, refused: None, .. } => assert_eq!(resource_url, "https://api.test/sms"),
            other => panic!("{other:?}"),
        }
        // A payment: verified by the facilitator with the route's own requirement.
        let h = payment_header("1000");
        let mut paid = request("POST", "/sms", None);
        paid.payment_signature = vec![h.as_bytes()];
        let Decision::Call(call, pending) = decide(&c, &paid, NOW) else { panic!() };
        assert_eq!((call.to, call.path.as_str()), (CallTarget::Facilitator, "/verify"));
        let body: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(body["paymentRequirements"]["amount"], "1000");
        let payer = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
        // Valid: claimed at the key/credits service (one request per payment).
        let Decision::Call(claim, claimed) = resume(&c, pending.clone(), facilitator(serde_json::json!({"isValid": true, "payer": payer})), NOW)
        else {
            panic!()
        };
        assert_eq!((claim.to, claim.path.as_str()), (CallTarget::Credits, "/v1/x402/claims"));
        let cbody: serde_json::Value = serde_json::from_slice(&claim.body).unwrap();
        let id = cbody["claim"].as_str().unwrap().to_owned();
        assert_eq!((id.len(), cbody["owner"].as_str(), cbody["ttl_seconds"].as_u64()), (64, Some("sms:req-1"), Some(60)));
        let in_use = answer(409, &format!(r#"{{"claim":"{id}","error":"claim_in_use"}}"#));
        assert!(matches!(
            denial(resume(&c, claimed.clone(), in_use, NOW)),
            Denial::PaymentRequired { refused: Some(PaymentRefusal::Local(PaymentError::InUse)), .. }
        ));
        assert!(matches!(denial(resume(&c, claimed.clone(), CallOutcome::Failed, NOW)), Denial::CreditsUnavailable(_)));
        let ok = answer(201, &format!(r#"{{"claim":"{id}","claimed":true}}"#));
        let Decision::Allow(g) = resume(&c, claimed, ok, NOW) else { panic!() };
        assert_eq!(g.x402_claim.as_deref(), Some(id.as_str()));
        assert_eq!(release_claim(&c, &id).path, format!("/v1/x402/claims/{id}/release"));
        assert_eq!(g.identity.method, AuthMethod::X402);
        let p = g.identity.payment.clone().unwrap();
        assert_eq!((p.payer.as_str(), p.network.as_str(), p.amount.as_str(), p.transaction), (payer, "eip155:8453", "1000", None));
        let settle = settle_call(&c, g.x402_settle.as_ref().unwrap()).unwrap();
        assert_eq!((settle.to, settle.path.as_str(), settle.body.clone()), (CallTarget::Facilitator, "/settle", call.body.clone()));
        // The facilitator says no: a fresh 402 with its reason.
        match denial(resume(&c, pending.clone(), facilitator(serde_json::json!({"isValid": false, "invalidReason": "nonce_used"})), NOW)) {
            Denial::PaymentRequired { refused: Some(PaymentRefusal::Facilitator(r)), resource_url, .. } => {
                assert_eq!((r.as_str(), resource_url.as_str()), ("nonce_used", "https://api.test/sms"))
            }
            other => panic!("{other:?}"),
        }
        // Unusable: 503, never passed unpaid.
        assert!(matches!(denial(resume(&c, pending, CallOutcome::Failed, NOW)), Denial::PaymentUnavailable(_)));
        // A payment for another amount, or v1 only: 402 before any callout.
        let wrong = payment_header("1");
        paid.payment_signature = vec![wrong.as_bytes()];
        assert!(matches!(
            denial(decide(&c, &paid, NOW)),
            Denial::PaymentRequired { refused: Some(PaymentRefusal::Local(PaymentError::Mismatch)), .. }
        ));
        let mut v1 = request("POST", "/sms", None);
        v1.x_payment = true;
        assert!(matches!(
            denial(decide(&c, &v1, NOW)),
            Denial::PaymentRequired { refused: Some(PaymentRefusal::Local(PaymentError::V1)), .. }
        ));
        // A route without x402: 401.
        assert_eq!(denial(decide(&c, &request("GET", "/account", None), NOW)), Denial::Unauthorized(AuthFailure::Missing));
    }

    #[test]
    fn a_route_that_names_its_credentials_refuses_the_others_and_none() {
        let c = config();
        let h = payment_header("5");
        // A payment alone credits nobody: 401 before any callout.
        let mut anonymous = request("POST", "/topup", None);
        anonymous.payment_signature = vec![h.as_bytes()];
        assert_eq!(denial(decide(&c, &anonymous, NOW)), Denial::Unauthorized(AuthFailure::Missing));
        // An API token (privy_…) is not listed: refused before any lookup.
        let token = format!("Bearer privy_{}", "a".repeat(40));
        let mut other = request("POST", "/topup", Some(&token));
        other.payment_signature = vec![h.as_bytes()];
        assert_eq!(denial(decide(&c, &other, NOW)), Denial::Unauthorized(AuthFailure::KindNotAccepted));
        // The admin key is always accepted.
        let admin = format!("Bearer {ADMIN}");
        assert!(matches!(decide(&c, &request("POST", "/topup", Some(&admin)), NOW), Decision::Allow(_)));
    }

    #[test]
    fn a_top_up_identifies_the_account_then_settles_before_the_upstream() {
        let c = config();
        let auth = format!("Bearer {API_KEY}");
        // x402-only route with a Bearer but no payment: 402 before any lookup.
        assert!(matches!(denial(decide(&c, &request("POST", "/topup", Some(&auth)), NOW)), Denial::PaymentRequired { .. }));
        let h = payment_header("5");
        let mut topup = request("POST", "/topup", Some(&auth));
        topup.payment_signature = vec![h.as_bytes()];
        let Decision::Call(call, pending) = decide(&c, &topup, NOW) else { panic!() };
        assert_eq!(call.path, "/v1/keys/lookup");
        // The key names the account; then the payment is verified…
        let Decision::Call(verify, pending) = resume(&c, pending, answer(200, &record("[]", "active", 0)), NOW) else { panic!() };
        assert_eq!((verify.to, verify.path.as_str()), (CallTarget::Facilitator, "/verify"));
        // …and settled before the upstream, which gets the transaction.
        let payer = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
        let Decision::Call(settle, pending) = resume(&c, pending, facilitator(serde_json::json!({"isValid": true, "payer": payer})), NOW)
        else {
            panic!()
        };
        assert_eq!(settle.path, "/settle");
        let tx = "0x5240caeb76e008a016ccfacb8faab06934f2937e25313e2923fb1ce9fd1d6009";
        let ok = serde_json::json!({"success": true, "transaction": tx, "network": "eip155:8453", "payer": payer});
        let Decision::Allow(g) = resume(&c, pending.clone(), facilitator(ok), NOW) else { panic!() };
        assert_eq!(g.identity.method, AuthMethod::ApiKey, "the Bearer's account is credited");
        assert_eq!(g.identity.account.as_deref(), Some("did:privy:owner"));
        assert_eq!(g.identity.payment.as_ref().and_then(|p| p.transaction.as_deref()), Some(tx));
        assert!(g.receipt.is_some() && g.x402_settle.is_none(), "settled once, before the upstream");
        let headers = g.identity.headers(g.route.as_deref());
        assert!(headers.contains(&(crate::identity::X402_TRANSACTION, tx.to_owned())));
        // Settlement refused: 402 with the failed receipt, nothing upstream.
        let failed = serde_json::json!({"success": false, "errorReason": "insufficient_funds", "network": "eip155:8453"});
        assert!(matches!(denial(resume(&c, pending, facilitator(failed), NOW)), Denial::PaymentFailed { .. }));
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

    fn with_leases(credits: u64) -> Config {
        let mut c = config();
        c.service.lease = Some(crate::policy::LeaseConfig {
            credits,
            report_ms: 200,
            ttl_seconds: 30,
            min_balance_factor: 4,
            path: "/v1/leases".into(),
        });
        c
    }

    #[test]
    fn with_a_lease_a_paid_request_makes_no_callout_until_the_lease_runs_out() {
        let c = with_leases(4);
        let mut caches = Caches::new(0, 16, 500);
        let auth = format!("Bearer {API_KEY}");
        let t0 = NOW * 1000;
        // First request: lookup, then the per-request debit (2 credits of 100).
        let Decision::Call(_, pending) = decide_cached(&c, &request("POST", "/sms", Some(&auth)), t0, &mut caches) else { panic!() };
        let Decision::Call(_, pending) =
            resume_cached(&c, pending, answer(200, &record(r#"["sms:send"]"#, "active", 100)), t0, &mut caches)
        else {
            panic!()
        };
        let debit = answer(200, r#"{"account":"did:privy:owner","charged":2,"balance":98,"replayed":false}"#);
        assert!(matches!(resume_cached(&c, pending, debit, t0, &mut caches), Decision::Allow(_)));
        // 98 ≥ 4 × 4: the next round asks for a lease.
        let lease_cfg = c.service.lease.clone().unwrap();
        let calls = caches.leases.due(&lease_cfg, t0 + 1);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].path, "/v1/leases");
        let granted = r#"{"granted":true,"lease_id":"lease_1","account":"did:privy:owner","credits":4,"balance":94,"ttl_seconds":30}"#;
        caches.leases.granted(&lease_cfg, "did:privy:owner", answer(200, granted), t0 + 2);
        // Two requests (up front, 2 each) come out of the lease: no callout.
        for (n, remaining) in [(1, 96), (2, 94)] {
            let mut req = request("POST", "/sms", Some(&auth));
            let id = format!("req-{n}");
            req.request_id = &id;
            let Decision::Allow(g) = decide_cached(&c, &req, t0 + 10 + n, &mut caches) else { panic!("leased request {n}") };
            assert_eq!(g.identity.charged, 2);
            assert_eq!(g.identity.credits_remaining, Some(remaining));
            assert!(g.lease.is_none() && g.hold.is_none(), "charged up front, from the lease");
        }
        // The lease is spent: back to a per-request debit.
        let Decision::Call(call, _) = decide_cached(&c, &request("POST", "/sms", Some(&auth)), t0 + 20, &mut caches) else {
            panic!()
        };
        assert_eq!(call.path, "/v1/debit");
        // Its two spends go in the final report, each with its own key.
        let calls = caches.leases.due(&lease_cfg, t0 + 21);
        let body: serde_json::Value = serde_json::from_slice(&calls[0].body).unwrap();
        assert_eq!(calls[0].path, "/v1/leases/lease_1/report");
        assert_eq!(body["final"], true);
        let keys: Vec<&str> = body["spends"].as_array().unwrap().iter().map(|s| s["idempotency_key"].as_str().unwrap()).collect();
        assert_eq!(keys, ["sms:req-1", "sms:req-2"]);
        // A charge-on-success route holds its spend on the ticket until the upstream answers.
        caches.leases.granted(&lease_cfg, "did:privy:owner", answer(200, &granted.replace("lease_1", "lease_2")), t0 + 30);
        let Decision::Allow(g) = decide_cached(&c, &request("POST", "/report", Some(&auth)), t0 + 31, &mut caches) else { panic!() };
        let ticket = g.lease.expect("a ticket to settle");
        assert_eq!((ticket.lease_id.as_str(), ticket.spend.amount), ("lease_2", 3));
        assert_eq!(caches.leases.active("did:privy:owner"), Some(("lease_2", 1, 3)));
        caches.leases.settle(ticket, false);
        assert_eq!(caches.leases.active("did:privy:owner"), Some(("lease_2", 4, 0)), "a failed upstream pays nothing");
    }

    #[test]
    fn a_lease_with_a_rate_limit_is_refused_at_load() {
        let json = serde_json::json!({
            "credits_service": {"cluster": "credits", "lease": {"credits": 10}},
            "rate_limit": {"requests": 10, "window_seconds": 1},
            "routes": [{"name": "sms", "path": {"exact": "/sms"}, "cost": 1}]
        });
        let err = Config::from_json(json.to_string().as_bytes(), None).unwrap_err().to_string();
        assert!(err.contains("$.credits_service.lease: cannot be combined with rate_limit"), "{err}");
        for (lease, field) in [
            (serde_json::json!({"credits": 0}), "lease.credits"),
            (serde_json::json!({"credits": 5, "report_ms": 10}), "lease.report_ms"),
            (serde_json::json!({"credits": 5, "report_ms": 1000, "ttl_seconds": 4}), "lease.ttl_seconds"),
            (serde_json::json!({"credits": 5, "min_balance_factor": 1}), "lease.min_balance_factor"),
            (serde_json::json!({"credits": 5, "surprise": 1}), "surprise"),
        ] {
            let json = serde_json::json!({
                "credits_service": {"cluster": "credits", "lease": lease},
                "routes": [{"name": "sms", "path": {"exact": "/sms"}, "cost": 1}]
            });
            let err = Config::from_json(json.to_string().as_bytes(), None).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
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
