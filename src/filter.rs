//! The proxy-wasm glue: host events in, [`decision`] calls, host actions out.
//! No policy lives here. Compiled only for wasm32.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use crate::cache::{Caches, SlotKey};
use crate::lease::{LeaseBook, LeaseCallKind};
use crate::credits_api::{self, CallOutcome, ServiceError};
use crate::decision::{self, CallTarget, Decision, Pending, Request, ServiceCall};
use crate::x402::{self as x402_wire, Payment};
use crate::denial::Denial;
use crate::denial::AuthFailure;
use crate::identity;
use crate::jwks::{JwksCache, JwksError};
use crate::policy::JwksFetch;
use crate::privy_jwt::JwtError;
use crate::metrics;
use crate::policy::Config;

/// The VM environment variable holding the operator admin key
/// (Envoy: `vm_config.environment_variables`).
const ADMIN_KEY_ENV: &str = "DIAL_ADMIN_API_KEY";

/// A callout that failed in transport is sent at most this many times.
const MAX_ATTEMPTS: u32 = 2;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root {
            context_id,
            lease_calls: Vec::new(),
            lease_policy: None,
            config: None,
            metrics: Rc::new(Metrics::default()),
            jwks: Rc::new(RefCell::new(JwksCache::default())),
            jwks_token: None,
            caches: Rc::new(RefCell::new(Caches::disabled())),
            slot_key: None,
            service_key: None,
        })
    });
}}

struct Root {
    context_id: u32,
    /// Lease calls in flight (token → what it is about).
    lease_calls: Vec<(u32, LeaseCallKind)>,
    /// The last policy with leasing on: kept when a reload turns leasing
    /// off, so the leases this VM still holds are reported and returned.
    lease_policy: Option<Rc<Config>>,
    config: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
    jwks: Rc<RefCell<JwksCache>>,
    jwks_token: Option<u32>,
    /// This VM's verified-token and key-lookup caches, shared with its requests.
    caches: Rc<RefCell<Caches>>,
    /// The key of shared verified-token slots (from the VM environment's
    /// secret); None: tokens are cached per VM only.
    slot_key: Option<Rc<SlotKey>>,
    /// The key proving to the key/credits service that a callout is ours
    /// (from the VM environment; never logged).
    service_key: Option<Rc<str>>,
}

impl Root {
    fn now(&self) -> i64 {
        unix_secs(self.get_current_time())
    }

    /// Fetches the issuer's JWKS if a scheduled fetch is due, and drops
    /// fetched keys that are too old to trust.
    fn refresh_keys(&mut self) {
        let Some(fetch) = self.config.as_ref().and_then(|c| c.privy.as_ref()).and_then(|p| p.jwks_fetch.clone()) else {
            return;
        };
        let now = self.now();
        let dropped = self.jwks.borrow_mut().drop_stale(&fetch, now);
        if dropped > 0 {
            self.caches.borrow_mut().keys_changed();
            self.metrics.add(metrics::JWKS_EXPIRED, u32::try_from(dropped).unwrap_or(u32::MAX));
            log::warn!(
                "dropped {dropped} fetched JWKS key(s): no good fetch for {} s (jwks_fetch.max_stale_seconds); only pinned keys verify now",
                fetch.max_stale_seconds
            );
        }
        if !self.jwks.borrow().due(&fetch, now) {
            return;
        }
        match dispatch_jwks(self, &fetch) {
            Ok(token) => {
                self.jwks.borrow_mut().started(&fetch, now, false);
                self.jwks_token = Some(token);
            }
            Err(status) => {
                self.jwks.borrow_mut().not_sent(now, false);
                log::warn!("cannot fetch the JWKS from cluster {:?}: {status:?}", fetch.cluster)
            }
        }
    }
}

impl Root {
    /// Sends the lease requests and reports that are due (from the tick).
    fn lease_round(&mut self) {
        let Some(cfg) = self.config.clone() else { return };
        let Some(policy) = self.lease_policy.clone() else { return };
        let Some(lease_cfg) = policy.service.lease.as_ref() else { return };
        let now_ms = unix_millis(self.get_current_time());
        let calls = self.caches.borrow_mut().leases.due(lease_cfg, now_ms);
        for call in calls {
            let mut headers = vec![
                (":method", "POST"),
                (":path", call.path.as_str()),
                (":authority", cfg.service.authority.as_str()),
                ("content-type", "application/json"),
            ];
            if let Some(key) = &self.service_key {
                headers.push((credits_api::SERVICE_KEY_HEADER, key));
            }
            let timeout = Duration::from_millis(cfg.service.timeout_ms);
            self.metrics.count(metrics::LEASE_CALLS);
            match self.dispatch_http_call(&cfg.service.cluster, headers, Some(&call.body), vec![], timeout) {
                Ok(token) => {
                    self.lease_calls.push((token, call.kind));
                }
                Err(status) => {
                    log::warn!("cannot call cluster {:?} for a lease: {status:?}", cfg.service.cluster);
                    self.lease_answered(lease_cfg, call.kind, CallOutcome::Failed, now_ms);
                }
            }
        }
        self.count_lease_stats();
    }

    /// `true`: more is due now (see `LeaseBook::reported`).
    fn lease_answered(&self, lease_cfg: &crate::policy::LeaseConfig, kind: LeaseCallKind, outcome: CallOutcome, now_ms: i64) -> bool {
        let mut caches = self.caches.borrow_mut();
        match kind {
            LeaseCallKind::Grant { account } => {
                caches.leases.granted(lease_cfg, &account, outcome, now_ms);
                false
            }
            LeaseCallKind::Report { account, lease_id } => caches.leases.reported(&account, &lease_id, outcome),
        }
    }

    fn count_lease_stats(&self) {
        let stats = self.caches.borrow_mut().leases.take_stats();
        for (n, name) in [
            (stats.spends, metrics::LEASE_SPENT),
            (stats.granted, metrics::LEASE_GRANTED),
            (stats.declined, metrics::LEASE_DECLINED),
            (stats.reports, metrics::LEASE_REPORTS),
            (stats.returned, metrics::LEASE_RETURNED),
            (stats.recalled, metrics::LEASE_RECALLED),
            (stats.lost, metrics::LEASE_LOST),
        ] {
            if n > 0 {
                self.metrics.add(name, n);
            }
        }
        if stats.lost > 0 {
            log::warn!("{} leased spend(s) could not be recorded (their lease closed first)", stats.lost);
        }
    }
}

/// GETs the issuer's JWKS (from the root context, or from a request whose
/// token named an unknown kid).
fn dispatch_jwks(ctx: &dyn Context, fetch: &JwksFetch) -> Result<u32, proxy_wasm::types::Status> {
    let headers = vec![(":method", "GET"), (":path", fetch.path.as_str()), (":authority", fetch.authority.as_str()), ("accept", "application/json")];
    ctx.dispatch_http_call(&fetch.cluster, headers, None, vec![], Duration::from_millis(fetch.timeout_ms))
}

/// The cluster a callout goes to (for log lines).
fn target_cluster(cfg: &Config, to: CallTarget) -> &str {
    match (to, cfg.facilitator.as_ref()) {
        (CallTarget::Facilitator, Some(f)) => &f.cluster,
        _ => &cfg.service.cluster,
    }
}

/// Reads a callout's answer, capped at `cap` bytes.
fn read_outcome(ctx: &dyn Context, num_headers: usize, body_size: usize, cap: usize) -> CallOutcome {
    let status = ctx
        .get_http_call_response_header_bytes(":status")
        .and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| s.parse::<u16>().ok()));
    match status {
        Some(status) if num_headers > 0 => {
            let body = if body_size == 0 { Vec::new() } else { ctx.get_http_call_response_body(0, body_size.min(cap)).unwrap_or_default() };
            CallOutcome::Answered { status, body, truncated: body_size > cap }
        }
        _ => CallOutcome::Failed,
    }
}

/// Logs a JWKS fetch's result. A changed key set makes every cached token
/// be verified again (entries are bound to the key set; this frees them);
/// the same keys again change nothing.
fn jwks_fetched(result: Result<crate::jwks::Accepted, JwksError>, caches: &RefCell<Caches>, metrics: &Metrics) {
    match result {
        Ok(accepted) => {
            if accepted.changed {
                caches.borrow_mut().keys_changed();
                log::info!("JWKS fetched: {} ES256 key(s), changed", accepted.keys)
            } else {
                log::debug!("JWKS fetched: {} ES256 key(s), unchanged", accepted.keys)
            }
            metrics.count(metrics::JWKS_FETCHED);
        }
        Err(e) => {
            metrics.count(metrics::JWKS_FAILED);
            log::warn!("JWKS fetch failed ({e}); keeping the last good keys")
        }
    }
}

/// Envoy's shared data: one store for every VM with this plugin's VM id.
struct HostShared;

impl crate::cache::SharedStore for HostShared {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        proxy_wasm::hostcalls::get_shared_data(key).ok().and_then(|(value, _cas)| value)
    }

    fn set(&self, key: &str, value: &[u8]) {
        // Last writer wins: a slot only ever holds a verified token.
        let _ = proxy_wasm::hostcalls::set_shared_data(key, Some(value), None);
    }
}

fn unix_millis(t: std::time::SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

fn unix_secs(t: std::time::SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// The metric ids of this VM (defined once, in `on_vm_start`).
#[derive(Default)]
struct Metrics {
    counters: Vec<(&'static str, u32)>,
    latency: Option<u32>,
}

impl Metrics {
    fn define() -> Metrics {
        use proxy_wasm::types::MetricType;
        let counters = metrics::all_counters()
            .filter_map(|name| proxy_wasm::hostcalls::define_metric(MetricType::Counter, name).ok().map(|id| (name, id)))
            .collect();
        let latency = proxy_wasm::hostcalls::define_metric(MetricType::Histogram, metrics::CALLOUT_LATENCY_MS).ok();
        Metrics { counters, latency }
    }

    fn count(&self, name: &str) {
        self.add(name, 1);
    }

    fn add(&self, name: &str, n: u32) {
        if let Some((_, id)) = self.counters.iter().find(|(n, _)| *n == name) {
            // A metric that cannot be counted is not worth failing a request for.
            let _ = proxy_wasm::hostcalls::increment_metric(*id, i64::from(n));
        }
    }

    fn latency_ms(&self, ms: u64) {
        if let Some(id) = self.latency {
            let _ = proxy_wasm::hostcalls::record_metric(id, ms);
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        if let Some(i) = self.lease_calls.iter().position(|(t, _)| *t == token_id) {
            let (_, kind) = self.lease_calls.swap_remove(i);
            if let (Some(cfg), Some(policy)) = (self.config.clone(), self.lease_policy.clone()) {
                let Some(lease_cfg) = policy.service.lease.as_ref() else { return };
                let outcome = read_outcome(self, num_headers, body_size, cfg.service.max_response_bytes);
                let now_ms = unix_millis(self.get_current_time());
                if self.lease_answered(lease_cfg, kind, outcome, now_ms) {
                    self.lease_round();
                }
                self.count_lease_stats();
            }
            return;
        }
        if self.jwks_token != Some(token_id) {
            return;
        }
        self.jwks_token = None;
        let Some(fetch) = self.config.as_ref().and_then(|c| c.privy.as_ref()).and_then(|p| p.jwks_fetch.clone()) else {
            return;
        };
        let Some(base) = self.config.as_ref().and_then(|c| c.privy.as_ref()).map(|p| p.fingerprint) else {
            return;
        };
        let outcome = read_outcome(self, num_headers, body_size, fetch.max_bytes);
        let now = self.now();
        let result = self.jwks.borrow_mut().accept(outcome, &fetch, &base, now);
        jwks_fetched(result, &self.caches, &self.metrics);
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        self.metrics = Rc::new(Metrics::define());
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let Some(bytes) = self.get_plugin_configuration() else {
            log::error!("no plugin configuration: refusing to start");
            return false;
        };
        let env_key = std::env::var(ADMIN_KEY_ENV).ok();
        let slot_key = match SlotKey::from_env(std::env::var(crate::cache::SHARED_SECRET_ENV).ok().as_deref()) {
            Ok(key) => key,
            Err(e) => {
                log::error!("invalid plugin configuration: env {e}");
                return false;
            }
        };
        let service_key = match credits_api::service_key_from_env(std::env::var(credits_api::SERVICE_KEY_ENV).ok().as_deref()) {
            Ok(key) => key,
            Err(e) => {
                log::error!("invalid plugin configuration: env {e}");
                return false;
            }
        };
        if service_key.is_none() {
            log::warn!(
                "{} is not set: callouts to the key/credits service carry no service key (a service that requires one refuses them, and paid requests get 503)",
                credits_api::SERVICE_KEY_ENV
            );
        }
        match Config::from_json(&bytes, env_key.as_deref()) {
            Ok(cfg) => {
                log::info!(
                    "dialtone {} configured {} routes, privy={}, admin_keys={}, credits cluster {:?}, shared token cache={}",
                    crate::BUILD_ID,
                    cfg.routes.len(),
                    cfg.privy.is_some(),
                    cfg.admin_digests.len(),
                    cfg.service.cluster,
                    if slot_key.is_some() { "on" } else { "off (no DIAL_SHARED_CACHE_SECRET)" }
                );
                let fetches = cfg.privy.as_ref().is_some_and(|p| p.jwks_fetch.is_some());
                let token_entries = cfg.privy.as_ref().map_or(0, |p| p.token_cache_entries);
                // A new policy starts with nothing of the old one: no fetched
                // keys, no fetch in flight, no cached token or lookup. Requests
                // still in flight keep the state they started with.
                let mut caches = Caches::new(token_entries, cfg.service.key_cache_entries, cfg.service.key_cache_ttl_ms);
                // The leases (and their unreported spends) outlive a policy
                // reload; a VM names itself in its lease requests once.
                caches.leases = std::mem::take(&mut self.caches.borrow_mut().leases);
                if caches.leases.holder().is_empty() {
                    let nanos = self.get_current_time().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
                    caches.leases = LeaseBook::new(format!("vm-{nanos:x}-{}", self.context_id));
                }
                self.caches = Rc::new(RefCell::new(caches));
                self.jwks = Rc::new(RefCell::new(JwksCache::default()));
                self.jwks_token = None;
                self.slot_key = slot_key.map(Rc::new);
                self.service_key = service_key.map(Rc::from);
                let lease_ms = cfg.service.lease.as_ref().map(|l| l.report_ms.min(1000));
                let cfg = Rc::new(cfg);
                if lease_ms.is_some() {
                    self.lease_policy = Some(cfg.clone());
                }
                self.config = Some(cfg);
                match (fetches, lease_ms) {
                    (_, Some(ms)) => self.set_tick_period(Duration::from_millis(ms)),
                    (true, None) => self.set_tick_period(Duration::from_secs(1)),
                    // A reload that turned leasing off still reports and
                    // returns the leases this VM holds.
                    (false, None) if self.caches.borrow().leases.is_busy() => self.set_tick_period(Duration::from_secs(1)),
                    (false, None) => {}
                }
                if fetches {
                    self.refresh_keys();
                }
                true
            }
            Err(e) => {
                log::error!("invalid plugin configuration: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        self.refresh_keys();
        self.lease_round();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Without a valid config Envoy does not create contexts; if it ever
        // does, fail closed rather than pass traffic unchecked.
        Some(Box::new(Gate {
            context_id,
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            dispatched_at: UNIX_EPOCH,
            jwks: self.jwks.clone(),
            jwks_token: None,
            caches: self.caches.clone(),
            slot_key: self.slot_key.clone(),
            service_key: self.service_key.clone(),
            pending: None,
            call_token: None,
            request_id: String::new(),
            released: false,
            hold: None,
            settling: None,
            in_flight: None,
            x402_settle: None,
            x402_settling: None,
            receipt: None,
            x402_claim: None,
            lease: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Gate {
    context_id: u32,
    config: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
    /// When the callout in flight was sent (for the latency histogram).
    dispatched_at: std::time::SystemTime,
    /// The issuer's keys, shared with the root context of this VM.
    jwks: Rc<RefCell<JwksCache>>,
    /// A JWKS fetch this request waits for (its token named an unknown kid).
    jwks_token: Option<u32>,
    caches: Rc<RefCell<Caches>>,
    slot_key: Option<Rc<SlotKey>>,
    service_key: Option<Rc<str>>,
    pending: Option<Pending>,
    call_token: Option<u32>,
    /// `x-request-id` (or our stand-in): the debit idempotency key derives
    /// from it, and the callouts carry it for tracing.
    request_id: String,
    /// The request was allowed upstream. Until then every body and trailer
    /// callback answers Pause. Envoy's proxy-wasm host already holds the body
    /// of a request whose headers are paused (it turns Pause into
    /// StopAllIterationAndWatermark), but a host that delivered the body
    /// would otherwise continue the request, unpaid: defence in depth.
    released: bool,
    /// The hold to capture or release when the upstream answers.
    hold: Option<String>,
    /// The capture/release callout in flight and its hold (the response waits for it).
    settling: Option<(u32, String, bool)>,
    /// The callout in flight and how many times it was sent (for one retry).
    in_flight: Option<(ServiceCall, u32)>,
    /// A verified x402 payment to settle when the upstream answers 2xx/3xx.
    x402_settle: Option<Box<Payment>>,
    /// The facilitator's `/settle` in flight (the response waits for it).
    x402_settling: Option<(u32, Box<Payment>)>,
    /// `PAYMENT-RESPONSE` of a payment settled before the upstream.
    receipt: Option<String>,
    /// The claim held on this request's x402 payment.
    x402_claim: Option<String>,
    /// This request's spend from the VM's credit lease, settled when the
    /// upstream answers.
    lease: Option<crate::lease::Ticket>,
}

fn header_str(headers: &[(String, Vec<u8>)], name: &str) -> String {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
        .unwrap_or_default()
        .to_owned()
}

impl Gate {
    fn now(&self) -> i64 {
        unix_secs(self.get_current_time())
    }

    /// Carries out a decision. Returns the action for the current host callback.
    fn apply(&mut self, cfg: &Config, decision: Decision) -> Action {
        match decision {
            Decision::Allow(grant) => {
                // On every allowed path (public and unmatched routes too): a
                // credential reaches the upstream only if the policy says so.
                if !cfg.forward_authorization {
                    self.set_http_request_header("authorization", None);
                }
                // Added, not replaced: every client-sent x-dialtone-* header
                // was removed in on_http_request_headers (an add is one map
                // insertion; a replace is a removal and an insertion).
                for (name, value) in grant.identity.headers(grant.route.as_deref()) {
                    self.add_http_request_header(name, &value);
                }
                log::debug!(
                    "allow route={} method={} prefix={} charged={}",
                    grant.route.as_deref().unwrap_or("-"),
                    grant.identity.method.as_str(),
                    grant.identity.key_prefix.as_deref().unwrap_or("-"),
                    grant.identity.charged
                );
                self.released = true;
                self.hold = grant.hold;
                self.x402_settle = grant.x402_settle;
                self.x402_claim = grant.x402_claim;
                self.lease = grant.lease;
                if grant.identity.payment.is_some() {
                    self.metrics.count(metrics::X402_VERIFIED);
                }
                if grant.receipt.is_some() {
                    self.metrics.count(metrics::X402_SETTLED);
                }
                self.receipt = grant.receipt;
                self.metrics.count(metrics::allowed(grant.identity.method));
                Action::Continue
            }
            Decision::Deny(denial) => {
                self.deny(&denial);
                Action::Pause
            }
            Decision::Call(call, pending) => {
                match self.dispatch(cfg, &call) {
                    Ok(token) => {
                        self.pending = Some(pending);
                        self.call_token = Some(token);
                        self.in_flight = Some((call, 1));
                        Action::Pause
                    }
                    Err(status) => {
                        log::error!("cannot call cluster {:?}: {status:?}", target_cluster(cfg, call.to));
                        self.deny(&match call.to {
                            CallTarget::Credits => Denial::CreditsUnavailable(ServiceError::DispatchFailed),
                            CallTarget::Facilitator => Denial::PaymentUnavailable(x402_wire::FacilitatorError::DispatchFailed),
                        });
                        Action::Pause
                    }
                }
            }
        }
    }

    /// The decision for the request as it stands (headers read from the host).
    fn decide(&self, cfg: &Config) -> Decision {
        self.decide_on(cfg, &self.get_http_request_headers_bytes())
    }

    /// The decision for the request with these headers (read once per
    /// callback: each read copies every header into the VM).
    fn decide_on(&self, cfg: &Config, headers: &[(String, Vec<u8>)]) -> Decision {
        let values = |name: &str| -> Vec<&[u8]> {
            headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_slice()).collect()
        };
        let (method, path) = (header_str(headers, ":method"), header_str(headers, ":path"));
        let (scheme, authority) = (header_str(headers, ":scheme"), header_str(headers, ":authority"));
        let jwks = self.jwks.borrow();
        let now = self.now();
        let fetch = cfg.privy.as_ref().and_then(|p| p.jwks_fetch.as_ref());
        let (fetched_keys, fetched_fingerprint) = jwks.usable(fetch, now);
        let req = Request {
            method: &method,
            path: &path,
            scheme: if scheme.is_empty() { "http" } else { &scheme },
            authority: &authority,
            authorization: values("authorization"),
            cookies: values("cookie"),
            request_id: &self.request_id,
            payment_signature: values(x402_wire::PAYMENT_SIGNATURE),
            x_payment: headers.iter().any(|(n, _)| n == x402_wire::X_PAYMENT),
            fetched_keys,
            fetched_fingerprint,
            refetch_unknown_kid: fetch.is_some_and(|f| jwks.may_fetch_for_unknown_kid(f, now)),
        };
        let now_ms = unix_millis(self.get_current_time());
        let sharing = self.slot_key.as_deref().map(|key| crate::cache::Sharing { store: &HostShared, key });
        let decision = decision::decide_shared(cfg, &req, now_ms, &mut self.caches.borrow_mut(), sharing);
        self.count_cache_use();
        decision
    }

    fn count_cache_use(&self) {
        let stats = self.caches.borrow_mut().take_stats();
        for (n, name) in [
            (stats.token_hits, metrics::CACHE_TOKEN_HIT),
            (stats.token_shared_hits, metrics::CACHE_TOKEN_SHARED_HIT),
            (stats.token_misses, metrics::CACHE_TOKEN_MISS),
            (stats.key_hits, metrics::CACHE_KEY_HIT),
            (stats.key_misses, metrics::CACHE_KEY_MISS),
        ] {
            if n > 0 {
                self.metrics.add(name, n);
            }
        }
    }

    /// Carries out a decision, except that a Privy token naming a `kid` we do
    /// not know first makes us fetch the issuer's JWKS (at most once per
    /// cooldown), so a key rotation costs no 401.
    fn apply_or_fetch_keys(&mut self, cfg: &Config, decision: Decision) -> Action {
        let unknown_kid = matches!(decision, Decision::Deny(Denial::Unauthorized(AuthFailure::Jwt(JwtError::UnknownKid))));
        let fetch = cfg.privy.as_ref().and_then(|p| p.jwks_fetch.clone());
        if let (true, Some(fetch)) = (unknown_kid, fetch) {
            let now = self.now();
            if self.jwks.borrow().may_fetch_for_unknown_kid(&fetch, now) {
                match dispatch_jwks(self, &fetch) {
                    Ok(token) => {
                        self.jwks.borrow_mut().started(&fetch, now, true);
                        self.jwks_token = Some(token);
                        return Action::Pause;
                    }
                    Err(status) => {
                        self.jwks.borrow_mut().not_sent(now, true);
                        log::warn!("cannot fetch the JWKS from cluster {:?}: {status:?}", fetch.cluster);
                        // The cooldown has started: decide again, now trying
                        // the kid-less pinned keys as well.
                        let decision = self.decide(cfg);
                        return self.apply(cfg, decision);
                    }
                }
            }
        }
        self.apply(cfg, decision)
    }

    /// Sends one callout, to the key/credits service or the x402 facilitator.
    fn dispatch(&mut self, cfg: &Config, call: &ServiceCall) -> Result<u32, proxy_wasm::types::Status> {
        self.dispatched_at = self.get_current_time();
        let (cluster, authority, timeout_ms) = match (call.to, cfg.facilitator.as_ref()) {
            (CallTarget::Credits, _) => (&cfg.service.cluster, &cfg.service.authority, cfg.service.timeout_ms),
            (CallTarget::Facilitator, Some(f)) => (&f.cluster, &f.authority, f.timeout_ms),
            (CallTarget::Facilitator, None) => return Err(proxy_wasm::types::Status::NotFound),
        };
        let mut headers = vec![
            (":method", "POST"),
            (":path", call.path.as_str()),
            (":authority", authority.as_str()),
            ("content-type", "application/json"),
            ("x-request-id", self.request_id.as_str()),
        ];
        // The service key proves the filter to the key/credits service only.
        if let (CallTarget::Credits, Some(key)) = (call.to, &self.service_key) {
            headers.push((credits_api::SERVICE_KEY_HEADER, key));
        }
        self.dispatch_http_call(cluster, headers, Some(&call.body), vec![], Duration::from_millis(timeout_ms))
    }

    /// After a transport failure, sends the same callout once more (every
    /// call of the contract is idempotent). Returns the new token.
    fn retry(&mut self, cfg: &Config, outcome: &CallOutcome) -> Option<u32> {
        let (call, attempts) = self.in_flight.take()?;
        if attempts >= MAX_ATTEMPTS || !credits_api::is_transport_failure(outcome) {
            return None;
        }
        // A settlement that may have gone through is never sent again: a
        // second /settle of the same payment fails (its nonce is used).
        if call.to == CallTarget::Facilitator && cfg.facilitator.as_ref().is_some_and(|f| f.settle_path == call.path) {
            return None;
        }
        match self.dispatch(cfg, &call) {
            Ok(token) => {
                if call.to == CallTarget::Credits {
                    self.metrics.count(metrics::CALLOUT_RETRIED);
                }
                log::info!("retrying {} after a transport failure", call.path);
                self.in_flight = Some((call, attempts + 1));
                Some(token)
            }
            Err(_) => None,
        }
    }

    fn deny(&self, denial: &Denial) {
        self.metrics.count(metrics::denied(denial));
        if let Some(reason) = metrics::denied_reason(denial) {
            self.metrics.count(reason);
        }
        if let Some(outcome) = metrics::x402_outcome(denial) {
            self.metrics.count(outcome);
        }
        let reply = denial.reply();
        match denial {
            Denial::CreditsUnavailable(e) => {
                log::warn!("credits service unusable ({}): 503", e.reason());
            }
            Denial::Unauthorized(why) => log::info!("401 {}", why.reason()),
            Denial::PaymentRequired { refused: Some(why), .. } => log::info!("402 payment refused: {}", why.message()),
            Denial::PaymentFailed { reason, .. } => log::warn!("402 settlement failed: {reason}"),
            Denial::PaymentUnavailable(e) => log::warn!("x402 facilitator unusable ({}): 503", e.reason()),
            other => log::info!("{} {}", reply.status, other.code()),
        }
        let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        self.send_http_response(reply.status, headers, Some(reply.body.as_bytes()));
    }
}

impl Gate {
    fn response_status(&self) -> Option<u16> {
        self.get_http_response_header_bytes(":status")
            .and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| s.parse::<u16>().ok()))
    }

    /// An x402 payment is settled only when the upstream answered 2xx/3xx
    /// (the client pays nothing for a failure); the response waits for the
    /// settlement and carries its receipt, or is replaced by the refusal.
    fn settle_payment(&mut self, cfg: &Config, payment: Box<Payment>) -> Action {
        if !matches!(self.response_status(), Some(200..=399)) {
            log::info!("upstream failed: the x402 payment is not settled");
            self.release_claim(cfg);
            return Action::Continue;
        }
        let Some(call) = decision::settle_call(cfg, &payment) else {
            self.deny(&Denial::PaymentUnavailable(x402_wire::FacilitatorError::DispatchFailed));
            return Action::Pause;
        };
        match self.dispatch(cfg, &call) {
            Ok(token) => {
                self.x402_settling = Some((token, payment));
                self.in_flight = Some((call, 1));
                Action::Pause
            }
            Err(status) => {
                log::error!("cannot call cluster {:?}: {status:?}", target_cluster(cfg, call.to));
                self.deny(&Denial::PaymentUnavailable(x402_wire::FacilitatorError::DispatchFailed));
                Action::Pause
            }
        }
    }

    /// Gives the payment's claim back (nothing was settled): the client may
    /// send the same payment again. Not waited for: an unreleased claim
    /// expires after the requirement's `maxTimeoutSeconds`.
    fn release_claim(&mut self, cfg: &Config) {
        if let Some(claim) = self.x402_claim.take() {
            let call = decision::release_claim(cfg, &claim);
            if let Err(status) = self.dispatch(cfg, &call) {
                log::warn!("cannot release x402 claim: {status:?}; it expires by itself");
            }
        }
    }

    /// The facilitator answered the `/settle` a response waits for.
    fn payment_settled(&mut self, cfg: &Config, payment: &Payment, num_headers: usize, body_size: usize) {
        let outcome = self.call_outcome(cfg, num_headers, body_size);
        self.in_flight = None;
        match decision::x402_settled(outcome, payment) {
            Ok((transaction, receipt)) => {
                self.metrics.count(metrics::X402_SETTLED);
                log::info!("x402 payment settled in {transaction}");
                self.add_http_response_header(x402_wire::PAYMENT_RESPONSE, &receipt);
                self.resume_http_response();
            }
            // The upstream's response is not delivered unpaid.
            Err(denial) => self.deny(&denial),
        }
    }

    /// Sends the capture or release of the request's hold. Returns whether a
    /// callout is now in flight.
    fn settle(&mut self, cfg: &Config, hold: &str, upstream_status: Option<u16>) -> bool {
        let call = decision::settle(cfg, hold, upstream_status);
        match self.dispatch(cfg, &call) {
            Ok(token) => {
                self.settling = Some((token, hold.to_owned(), decision::is_capture(&call)));
                self.in_flight = Some((call, 1));
                true
            }
            Err(status) => {
                // The service releases holds nobody settles when they expire:
                // the client is not charged.
                log::warn!("cannot settle hold {hold}: {status:?}; it will expire and be released");
                false
            }
        }
    }

    fn settled(&mut self, cfg: &Config, hold: &str, capturing: bool, num_headers: usize, body_size: usize) {
        let outcome = self.call_outcome(cfg, num_headers, body_size);
        if let Some(token) = self.retry(cfg, &outcome) {
            self.settling = Some((token, hold.to_owned(), capturing));
            return;
        }
        let result = credits_api::parse_settlement(outcome, hold);
        match &result {
            Ok(credits_api::Settlement::Done) => {
                self.metrics.count(if capturing { metrics::HOLD_CAPTURED } else { metrics::HOLD_RELEASED })
            }
            Ok(credits_api::Settlement::NotOpen) => log::warn!("hold {hold} was no longer open"),
            Err(e) => log::warn!("settling hold {hold} failed ({}); the service releases it when it expires", e.reason()),
        }
        match decision::after_settlement(capturing, result) {
            decision::AfterSettlement::Deliver => self.resume_http_response(),
            decision::AfterSettlement::Refuse(denial) => self.deny(&denial),
        }
    }

    /// What a callout's answer was, as the decision logic needs it (and
    /// counted in the callout metrics).
    fn call_outcome(&self, cfg: &Config, num_headers: usize, body_size: usize) -> CallOutcome {
        if let Some((call, _)) = &self.in_flight {
            if call.to == CallTarget::Facilitator {
                let cap = cfg.facilitator.as_ref().map_or(0, |f| f.max_response_bytes);
                return read_outcome(self, num_headers, body_size, cap);
            }
        }
        let outcome = self.read_call_outcome(cfg, num_headers, body_size);
        let elapsed = self.get_current_time().duration_since(self.dispatched_at).unwrap_or_default();
        self.metrics.latency_ms(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
        self.metrics.count(if credits_api::is_transport_failure(&outcome) {
            metrics::CALLOUT_FAILED
        } else {
            metrics::CALLOUT_ANSWERED
        });
        outcome
    }

    fn read_call_outcome(&self, cfg: &Config, num_headers: usize, body_size: usize) -> CallOutcome {
        // A failed callout arrives with no headers (Envoy) or as a local
        // 503/504 from Envoy itself: both are "service unavailable".
        let outcome = read_outcome(self, num_headers, body_size, cfg.service.max_response_bytes);
        if let CallOutcome::Answered { status: 401, .. } = outcome {
            // Fail closed (503) like any status the contract does not
            // define here; say what an operator must fix.
            log::error!(
                "the key/credits service refused this filter's service key ({}): check the rotation of both sides",
                credits_api::SERVICE_KEY_ENV
            );
        }
        outcome
    }
}

impl Context for Gate {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some(cfg) = self.config.clone() else { return };
        if self.jwks_token == Some(token_id) {
            self.jwks_token = None;
            if let Some(privy) = cfg.privy.as_ref() {
                if let Some(fetch) = privy.jwks_fetch.as_ref() {
                    let outcome = read_outcome(self, num_headers, body_size, fetch.max_bytes);
                    let now = self.now();
                    let result = self.jwks.borrow_mut().accept(outcome, fetch, &privy.fingerprint, now);
                    jwks_fetched(result, &self.caches, &self.metrics);
                }
            }
            // Decide again with whatever keys we now have (no second fetch:
            // the cooldown has just started).
            let decision = self.decide(&cfg);
            if let Action::Continue = self.apply(&cfg, decision) {
                self.resume_http_request();
            }
            return;
        }
        if let Some((token, payment)) = self.x402_settling.take() {
            if token == token_id {
                self.payment_settled(&cfg, &payment, num_headers, body_size);
                return;
            }
            self.x402_settling = Some((token, payment));
        }
        if let Some((token, hold, capturing)) = self.settling.take() {
            if token == token_id {
                self.settled(&cfg, &hold, capturing, num_headers, body_size);
                return;
            }
            self.settling = Some((token, hold, capturing));
        }
        let Some(pending) = self.pending.take() else {
            return;
        };
        if self.call_token != Some(token_id) {
            log::warn!("unexpected callout answer {token_id}");
            self.deny(&Denial::CreditsUnavailable(ServiceError::Inconsistent));
            return;
        }
        self.call_token = None;
        let outcome = self.call_outcome(&cfg, num_headers, body_size);
        if let Some(token) = self.retry(&cfg, &outcome) {
            self.pending = Some(pending);
            self.call_token = Some(token);
            return;
        }
        let now_ms = unix_millis(self.get_current_time());
        let decision = decision::resume_cached(&cfg, pending, outcome, now_ms, &mut self.caches.borrow_mut());
        if let Action::Continue = self.apply(&cfg, decision) {
            self.resume_http_request();
        }
    }
}

impl HttpContext for Gate {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(cfg) = self.config.clone() else {
            self.deny(&Denial::CreditsUnavailable(ServiceError::DispatchFailed));
            return Action::Pause;
        };
        let headers = self.get_http_request_headers_bytes();
        // Strip every client-sent identity header before anything else, so
        // none survives on any path (public routes and x402 included).
        for (name, _) in headers.iter().filter(|(n, _)| identity::is_identity_header(n)) {
            self.set_http_request_header(name, None);
        }
        self.request_id = header_str(&headers, "x-request-id");
        if self.request_id.is_empty() {
            // Envoy always sets one unless told not to; without it, make one
            // that is unique per request on this VM.
            let nanos = self.get_current_time().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            self.request_id = format!("dialtone-{nanos}-{}", self.context_id);
        }
        // The identity headers just removed are not read by the decision.
        let decision = self.decide_on(&cfg, &headers);
        self.apply_or_fetch_keys(&cfg, decision)
    }

    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        // Buffer the body while the decision is pending (or after a refusal).
        if self.released {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(receipt) = self.receipt.take() {
            self.add_http_response_header(x402_wire::PAYMENT_RESPONSE, &receipt);
        }
        if let (Some(cfg), Some(payment)) = (self.config.clone(), self.x402_settle.take()) {
            return self.settle_payment(&cfg, payment);
        }
        if let Some(ticket) = self.lease.take() {
            // Charge on success, from the lease: no callout, nothing to wait for.
            let charged = matches!(self.response_status(), Some(200..=399));
            self.caches.borrow_mut().leases.settle(ticket, charged);
            return Action::Continue;
        }
        let (Some(cfg), Some(hold)) = (self.config.clone(), self.hold.take()) else {
            return Action::Continue;
        };
        // Charge on success: the response waits until the hold is captured
        // (2xx/3xx) or released (anything else, including Envoy's own 503/504
        // for an upstream reset or timeout).
        let status = self
            .get_http_response_header_bytes(":status")
            .and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| s.parse::<u16>().ok()));
        if self.settle(&cfg, &hold, status) {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_log(&mut self) {
        // The stream ended with no response (client gone): try to release at
        // once; if Envoy cancels this callout with the stream, the hold
        // expires and is released by the service (an x402 claim likewise).
        if let (Some(cfg), Some(_)) = (self.config.clone(), self.x402_settle.take()) {
            self.release_claim(&cfg);
        }
        if let (Some(cfg), Some(hold)) = (self.config.clone(), self.hold.take()) {
            self.settle(&cfg, &hold, None);
        }
        // No response reached the client: the lease gets the credits back.
        if let Some(ticket) = self.lease.take() {
            self.caches.borrow_mut().leases.settle(ticket, false);
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.released {
            Action::Continue
        } else {
            Action::Pause
        }
    }
}
