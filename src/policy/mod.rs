//! The plugin configuration: parsed from JSON, validated and compiled once
//! (in `on_configure`), then only read on the request path.

pub mod path;
pub mod raw;

use std::fmt;

use crate::bearer::{self, DEFAULT_MAX_TOKEN_BYTES};
use crate::privy_jwt::{self, EsKey, PrivyVerifier};
use path::{PathError, PathMatcher};
pub use raw::{Charge, CredentialKind, PaymentMode, RateLimit, RawConfig, Settle, Unmatched, X402Accept};
use sha2::{Digest, Sha256};

/// Admin keys shorter than this are refused: the key bypasses every check.
pub const MIN_ADMIN_KEY_LEN: usize = 16;
/// The longest a key lookup may be reused: the revocation delay's bound.
pub const MAX_KEY_CACHE_TTL_MS: u64 = 1000;
/// Fetched JWKS keys are dropped after this long without a good fetch,
/// unless the policy says otherwise (`privy.jwks_fetch.max_stale_seconds`).
pub const DEFAULT_JWKS_MAX_STALE_SECS: u64 = 6 * 3600;
/// Per cache, per VM (a few hundred bytes each).
pub const MAX_CACHE_ENTRIES: usize = 65_536;

#[derive(Debug)]
pub struct Config {
    pub service: ServiceConfig,
    /// SHA-256 digests of the admin key(s); the plaintext is never kept.
    pub admin_digests: Vec<[u8; 32]>,
    pub privy: Option<PrivyConfig>,
    pub unmatched: Unmatched,
    pub forward_authorization: bool,
    pub max_token_bytes: usize,
    pub rate_limit: Option<RateLimit>,
    pub facilitator: Option<FacilitatorConfig>,
    pub routes: Vec<Route>,
}

/// The x402 facilitator's cluster and limits.
#[derive(Debug, Clone)]
pub struct FacilitatorConfig {
    pub cluster: String,
    pub authority: String,
    pub verify_path: String,
    pub settle_path: String,
    pub timeout_ms: u64,
    pub max_response_bytes: usize,
    pub max_payment_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub cluster: String,
    pub authority: String,
    pub timeout_ms: u64,
    pub lookup_path: String,
    pub debit_path: String,
    pub max_response_bytes: usize,
    pub holds_path: String,
    pub ratelimit_path: String,
    pub x402_claims_path: String,
    pub hold_ttl_seconds: u64,
    pub key_cache_ttl_ms: u64,
    pub key_cache_entries: usize,
    pub lease: Option<LeaseConfig>,
}

/// Credit leases (`credits_service.lease`), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub credits: u64,
    pub report_ms: u64,
    pub ttl_seconds: u64,
    pub min_balance_factor: u64,
    /// `POST <path>` grants, `POST <path>/<id>/report` reports.
    pub path: String,
}

#[derive(Debug)]
pub struct PrivyConfig {
    pub verifier: PrivyVerifier,
    pub accept_cookie: bool,
    pub jwks_fetch: Option<JwksFetch>,
    pub token_cache_entries: usize,
    /// What a shared verified-token slot is bound to: issuer, audience,
    /// leeway and pinned keys (fetched keys extend it per key set).
    pub fingerprint: crate::cache::Digest32,
}

/// Where and how often the issuer's JWKS is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksFetch {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub refresh_seconds: u64,
    pub timeout_ms: u64,
    pub max_bytes: usize,
    pub unknown_kid_cooldown_seconds: u64,
    pub max_stale_seconds: u64,
    /// At most this many keys in a fetched document (`privy.max_keys`).
    pub max_keys: usize,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// `None` = any method.
    pub methods: Option<Vec<String>>,
    pub path: PathMatcher,
    pub scope: Option<String>,
    pub cost: u64,
    pub public: bool,
    /// Bearer credentials may pay (debit credits).
    pub credits: bool,
    /// x402 payment accepted; the offer is what the 402 announces.
    pub x402: Option<X402Offer>,
    pub charge: Charge,
    /// The credential kinds accepted (`None`: all, and none needed on x402).
    pub credentials: Option<Vec<CredentialKind>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct X402Offer {
    pub description: String,
    pub mime_type: String,
    pub accepts: Vec<X402Accept>,
    pub settle: Settle,
}

impl Route {
    pub fn matches(&self, method: &str, path: &str) -> bool {
        let method_ok = match &self.methods {
            None => true,
            Some(ms) => ms.iter().any(|m| m == method),
        };
        method_ok && self.path.matches(path)
    }
}

impl Config {
    /// The first route (in config order) that matches.
    pub fn route_for(&self, method: &str, path_and_query: &str) -> Option<&Route> {
        let path = path::strip_query(path_and_query);
        self.routes.iter().find(|r| r.matches(method, path))
    }

    /// Parses and validates the plugin configuration. `env_admin_key` is the
    /// value of `DIAL_ADMIN_API_KEY` in the VM environment, if set.
    pub fn from_json(bytes: &[u8], env_admin_key: Option<&str>) -> Result<Config, ConfigErrors> {
        // serde_path_to_error names the JSON path of the first structural
        // error (unknown field, wrong type); the semantic checks in `compile`
        // then report every remaining problem at once.
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let raw: RawConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let at = if path == "." { "$".to_owned() } else { format!("$.{path}") };
            ConfigErrors(vec![ConfigError::new(at, inner.to_string())])
        })?;
        de.end().map_err(|e| ConfigErrors(vec![ConfigError::new("$", e.to_string())]))?;
        compile(raw, env_admin_key)
    }
}

/// One problem in the configuration, with the JSON path where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { path: path.into(), message: message.into() }
    }
}

/// Every problem found, so an operator fixes them in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{}: {}", e.path, e.message)?;
        }
        Ok(())
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.'))
}

/// Scopes as API owners write them: `sms:send`, `contacts_read`.
pub fn is_scope(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.' | b'-'))
}

fn is_visible_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// What is wrong with one x402 payment option (field, problem).
fn x402_problems(a: &X402Accept) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    if a.scheme.trim().is_empty() {
        out.push(("scheme", "must name the x402 scheme (e.g. \"exact\")"));
    }
    // CAIP-2: namespace:reference, e.g. eip155:8453.
    let caip2 = a.network.split_once(':').is_some_and(|(ns, r)| {
        !ns.is_empty() && !r.is_empty() && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    if !caip2 {
        out.push(("network", "must be a CAIP-2 network id such as \"eip155:8453\""));
    }
    if a.amount.is_empty() || !a.amount.bytes().all(|b| b.is_ascii_digit()) || a.amount.bytes().all(|b| b == b'0') {
        out.push(("amount", "must be a positive whole number of the asset's atomic units, as a string"));
    }
    if a.asset.trim().is_empty() {
        out.push(("asset", "must name the asset (e.g. a token contract address)"));
    }
    if a.pay_to.trim().is_empty() {
        out.push(("payTo", "must be the address that receives the payment"));
    }
    if a.max_timeout_seconds == 0 {
        out.push(("maxTimeoutSeconds", "must be at least 1"));
    }
    out
}

/// Does `earlier` match every request `later` could match?
fn shadows(earlier: &Route, later: &Route) -> bool {
    let methods_covered = match (&earlier.methods, &later.methods) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(e), Some(l)) => l.iter().all(|m| e.contains(m)),
    };
    if !methods_covered {
        return false;
    }
    match (&earlier.path, &later.path) {
        (PathMatcher::Exact(e), PathMatcher::Exact(l)) => e == l,
        (PathMatcher::Prefix(p), PathMatcher::Exact(l) | PathMatcher::Prefix(l)) => l.starts_with(p.as_str()),
        (PathMatcher::Prefix(p), PathMatcher::Template(segs)) => {
            // The template's literal start, up to its first variable.
            let mut lit = String::new();
            for s in segs {
                match s {
                    path::Segment::Literal(l) => {
                        lit.push('/');
                        lit.push_str(l);
                    }
                    path::Segment::Variable(_) => {
                        lit.push('/');
                        break;
                    }
                }
            }
            lit.starts_with(p.as_str())
        }
        (PathMatcher::Template(a), PathMatcher::Template(b)) => a == b,
        _ => false,
    }
}

fn is_method(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_uppercase())
}

pub fn compile(raw: RawConfig, env_admin_key: Option<&str>) -> Result<Config, ConfigErrors> {
    let mut errs: Vec<ConfigError> = Vec::new();
    let mut err = |path: String, msg: String| errs.push(ConfigError::new(path, msg));

    // Credits service.
    let s = &raw.credits_service;
    if s.cluster.is_empty() || !is_visible_ascii(&s.cluster) {
        err("$.credits_service.cluster".into(), "must name the Envoy cluster of the key/credits service (visible ASCII, no spaces)".into());
    }
    if let Some(a) = &s.authority {
        if a.is_empty() || !is_visible_ascii(a) {
            err("$.credits_service.authority".into(), "must be a host[:port] (visible ASCII, no spaces)".into());
        }
    }
    // Envoy treats a 0 ms callout timeout as "no timeout": never allow it.
    if !(1..=60_000).contains(&s.timeout_ms) {
        err("$.credits_service.timeout_ms".into(), "must be between 1 and 60000 (0 would mean no timeout)".into());
    }
    for (field, p) in [
        ("lookup_path", &s.lookup_path),
        ("debit_path", &s.debit_path),
        ("holds_path", &s.holds_path),
        ("ratelimit_path", &s.ratelimit_path),
        ("x402_claims_path", &s.x402_claims_path),
    ] {
        if !p.starts_with('/') {
            err(format!("$.credits_service.{field}"), "must start with '/'".into());
        }
    }
    if !(1024..=1024 * 1024).contains(&s.max_response_bytes) {
        err("$.credits_service.max_response_bytes".into(), "must be between 1024 and 1048576".into());
    }
    if !(1..=3600).contains(&s.hold_ttl_seconds) {
        err("$.credits_service.hold_ttl_seconds".into(), "must be between 1 and 3600".into());
    }
    if s.key_cache_ttl_ms > MAX_KEY_CACHE_TTL_MS {
        err(
            "$.credits_service.key_cache_ttl_ms".into(),
            format!("must be between 0 and {MAX_KEY_CACHE_TTL_MS} (a revoked key must be refused within a second)"),
        );
    }
    if s.key_cache_entries > MAX_CACHE_ENTRIES {
        err("$.credits_service.key_cache_entries".into(), format!("must be between 0 and {MAX_CACHE_ENTRIES}"));
    }
    let lease = s.lease.as_ref().map(|l| {
        let at = |field: &str| format!("$.credits_service.lease.{field}");
        if !(1..=1_000_000).contains(&l.credits) {
            err(at("credits"), "must be between 1 and 1000000".into());
        }
        if !(50..=60_000).contains(&l.report_ms) {
            err(at("report_ms"), "must be between 50 and 60000".into());
        }
        // A lease must outlive a few report rounds, so the VM returns it
        // (with its last spends) well before the service closes it.
        let min_ttl = (l.report_ms * 5).div_ceil(1000).max(2);
        if !(min_ttl..=3600).contains(&l.ttl_seconds) {
            err(at("ttl_seconds"), format!("must be between {min_ttl} (5 × report_ms) and 3600"));
        }
        if !(2..=1000).contains(&l.min_balance_factor) {
            err(at("min_balance_factor"), "must be between 2 and 1000 (a lease must leave credits for the others)".into());
        }
        if !l.path.starts_with('/') || !is_visible_ascii(&l.path) {
            err(at("path"), "must be a path starting with '/'".into());
        }
        if raw.rate_limit.is_some() {
            err(
                "$.credits_service.lease".to_owned(),
                "cannot be combined with rate_limit: a leased request makes no callout, so a per-account limit could not hold across Envoys".into(),
            );
        }
        LeaseConfig {
            credits: l.credits,
            report_ms: l.report_ms,
            ttl_seconds: l.ttl_seconds,
            min_balance_factor: l.min_balance_factor,
            path: l.path.trim_end_matches('/').to_owned(),
        }
    });
    let service = ServiceConfig {
        lease,
        cluster: s.cluster.clone(),
        authority: s.authority.clone().unwrap_or_else(|| s.cluster.clone()),
        timeout_ms: s.timeout_ms,
        lookup_path: s.lookup_path.clone(),
        debit_path: s.debit_path.clone(),
        max_response_bytes: s.max_response_bytes,
        holds_path: s.holds_path.trim_end_matches('/').to_owned(),
        ratelimit_path: s.ratelimit_path.clone(),
        x402_claims_path: s.x402_claims_path.trim_end_matches('/').to_owned(),
        hold_ttl_seconds: s.hold_ttl_seconds,
        key_cache_ttl_ms: s.key_cache_ttl_ms,
        key_cache_entries: s.key_cache_entries,
    };
    let facilitator = raw.x402_facilitator.as_ref().map(|f| {
        let at = |field: &str| format!("$.x402_facilitator.{field}");
        if f.cluster.is_empty() || !is_visible_ascii(&f.cluster) {
            err(at("cluster"), "must name the Envoy cluster of the x402 facilitator".into());
        }
        if f.authority.as_ref().is_some_and(|a| a.is_empty() || !is_visible_ascii(a)) {
            err(at("authority"), "must be a host[:port]".into());
        }
        for (field, path) in [("verify_path", &f.verify_path), ("settle_path", &f.settle_path)] {
            if !path.starts_with('/') || !is_visible_ascii(path) {
                err(at(field), "must be a path starting with '/'".into());
            }
        }
        if !(1..=60_000).contains(&f.timeout_ms) {
            err(at("timeout_ms"), "must be between 1 and 60000 (0 would mean no timeout)".into());
        }
        if !(1024..=1024 * 1024).contains(&f.max_response_bytes) {
            err(at("max_response_bytes"), "must be between 1024 and 1048576".into());
        }
        if !(512..=64 * 1024).contains(&f.max_payment_bytes) {
            err(at("max_payment_bytes"), "must be between 512 and 65536".into());
        }
        FacilitatorConfig {
            cluster: f.cluster.clone(),
            authority: f.authority.clone().unwrap_or_else(|| f.cluster.clone()),
            verify_path: f.verify_path.clone(),
            settle_path: f.settle_path.clone(),
            timeout_ms: f.timeout_ms,
            max_response_bytes: f.max_response_bytes,
            max_payment_bytes: f.max_payment_bytes,
        }
    });
    let rate_limit = raw.rate_limit.map(|rl| RateLimit { burst: Some(rl.burst.unwrap_or(rl.requests)), ..rl });
    if let Some(rl) = &rate_limit {
        if rl.requests == 0 || rl.requests > 1_000_000 {
            err("$.rate_limit.requests".into(), "must be between 1 and 1000000".into());
        }
        if !(1..=86_400).contains(&rl.window_seconds) {
            err("$.rate_limit.window_seconds".into(), "must be between 1 and 86400".into());
        }
        if rl.burst.is_some_and(|b| b == 0 || b > 1_000_000) {
            err("$.rate_limit.burst".into(), "must be between 1 and 1000000".into());
        }
    }

    // Admin key(s).
    let mut admin_digests = Vec::new();
    if let Some(hex) = &raw.admin_key_sha256 {
        match bearer::parse_sha256_hex(hex) {
            Some(d) => admin_digests.push(d),
            None => err("$.admin_key_sha256".into(), "must be 64 hex digits (SHA-256 of the admin key)".into()),
        }
    }
    if let Some(key) = env_admin_key.filter(|k| !k.is_empty()) {
        if key.len() < MIN_ADMIN_KEY_LEN {
            err("env DIAL_ADMIN_API_KEY".into(), format!("the admin key must be at least {MIN_ADMIN_KEY_LEN} characters"));
        } else {
            admin_digests.push(Sha256::digest(key.as_bytes()).into());
        }
    }

    // Privy.
    let privy = raw.privy.as_ref().and_then(|p| {
        let mut keys: Vec<EsKey> = Vec::new();
        if p.app_id.trim().is_empty() {
            err("$.privy.app_id".into(), "must be the Privy app id (the token audience)".into());
        }
        if p.issuer.trim().is_empty() {
            err("$.privy.issuer".into(), "must not be empty".into());
        }
        if !(0..=600).contains(&p.leeway_seconds) {
            err("$.privy.leeway_seconds".into(), "must be between 0 and 600".into());
        }
        if p.token_cache_entries > MAX_CACHE_ENTRIES {
            err("$.privy.token_cache_entries".into(), format!("must be between 0 and {MAX_CACHE_ENTRIES}"));
        }
        let max_keys = p.max_keys.clamp(1, privy_jwt::MAX_KEYS_LIMIT);
        if max_keys != p.max_keys {
            err("$.privy.max_keys".into(), format!("must be between 1 and {}", privy_jwt::MAX_KEYS_LIMIT));
        }
        if let Some(pem) = &p.verification_key {
            match privy_jwt::key_from_pem(pem) {
                Ok(k) => keys.push(k),
                Err(e) => err("$.privy.verification_key".into(), e.to_string()),
            }
        }
        if let Some(jwks) = &p.jwks {
            match privy_jwt::keys_from_jwks(jwks, max_keys) {
                Ok(ks) => keys.extend(ks),
                Err(e) => err("$.privy.jwks".into(), e.to_string()),
            }
        }
        let jwks_fetch = p.jwks_fetch.as_ref().map(|f| {
            let at = |field: &str| format!("$.privy.jwks_fetch.{field}");
            if f.cluster.is_empty() || !is_visible_ascii(&f.cluster) {
                err(at("cluster"), "must name the Envoy cluster of the JWKS host".into());
            }
            if f.authority.as_ref().is_some_and(|a| a.is_empty() || !is_visible_ascii(a)) {
                err(at("authority"), "must be a host[:port]".into());
            }
            if !f.path.starts_with('/') || !is_visible_ascii(&f.path) {
                err(at("path"), "must be a path starting with '/'".into());
            }
            if !(10..=86_400).contains(&f.refresh_seconds) {
                err(at("refresh_seconds"), "must be between 10 and 86400".into());
            }
            if !(1..=60_000).contains(&f.timeout_ms) {
                err(at("timeout_ms"), "must be between 1 and 60000 (0 would mean no timeout)".into());
            }
            if !(1024..=1024 * 1024).contains(&f.max_bytes) {
                err(at("max_bytes"), "must be between 1024 and 1048576".into());
            }
            if !(1..=3600).contains(&f.unknown_kid_cooldown_seconds) {
                err(at("unknown_kid_cooldown_seconds"), "must be between 1 and 3600".into());
            }
            let max_stale_seconds =
                f.max_stale_seconds.unwrap_or(DEFAULT_JWKS_MAX_STALE_SECS.max(f.refresh_seconds.saturating_mul(4)));
            if !(60..=7 * 86_400).contains(&max_stale_seconds) || max_stale_seconds <= f.refresh_seconds {
                err(
                    at("max_stale_seconds"),
                    "must be between 60 and 604800, and longer than refresh_seconds (a refresh must be able to succeed first)"
                        .into(),
                );
            }
            JwksFetch {
                cluster: f.cluster.clone(),
                authority: f.authority.clone().unwrap_or_else(|| f.cluster.clone()),
                path: f.path.clone(),
                refresh_seconds: f.refresh_seconds,
                timeout_ms: f.timeout_ms,
                max_bytes: f.max_bytes,
                unknown_kid_cooldown_seconds: f.unknown_kid_cooldown_seconds,
                max_stale_seconds,
                max_keys,
            }
        });
        if p.verification_key.is_none() && p.jwks.is_none() && jwks_fetch.is_none() {
            err("$.privy".into(), "needs a verification_key (PEM), a jwks document or jwks_fetch".into());
        }
        let usable = !keys.is_empty() || jwks_fetch.is_some();
        let fingerprint = crate::cache::keys_fingerprint(
            &[p.issuer.as_bytes(), b"\0", p.app_id.as_bytes(), b"\0", &p.leeway_seconds.to_le_bytes(), b"\0"].concat(),
            &keys,
        );
        usable.then(|| PrivyConfig {
            verifier: PrivyVerifier {
                keys,
                issuer: p.issuer.clone(),
                app_id: p.app_id.clone(),
                leeway_secs: p.leeway_seconds,
            },
            accept_cookie: p.accept_cookie,
            jwks_fetch,
            token_cache_entries: p.token_cache_entries,
            fingerprint,
        })
    });

    let max_token_bytes = raw.max_token_bytes.unwrap_or(DEFAULT_MAX_TOKEN_BYTES);
    if !(256..=16 * 1024).contains(&max_token_bytes) {
        err("$.max_token_bytes".into(), "must be between 256 and 16384".into());
    }

    // Routes.
    if raw.routes.is_empty() {
        err("$.routes".into(), "needs at least one route".into());
    }
    let mut routes = Vec::with_capacity(raw.routes.len());
    for (i, r) in raw.routes.iter().enumerate() {
        let at = |field: &str| format!("$.routes[{i}].{field}");
        if !is_name(&r.name) {
            err(at("name"), "must be 1-64 characters of a-z, 0-9, '_', '-', '.'".into());
        } else if raw.routes.iter().take(i).any(|o| o.name == r.name) {
            err(at("name"), format!("duplicate route name {:?}", r.name));
        }
        if let Some(ms) = &r.methods {
            if ms.is_empty() {
                err(at("methods"), "must list at least one method (omit it for any method)".into());
            }
            for (j, m) in ms.iter().enumerate() {
                if !is_method(m) {
                    err(format!("$.routes[{i}].methods[{j}]"), format!("{m:?} is not an upper-case HTTP method"));
                } else if ms.iter().take(j).any(|o| o == m) {
                    err(format!("$.routes[{i}].methods[{j}]"), format!("{m:?} is listed twice"));
                }
            }
        }
        let path = match &r.path {
            // `{id}` in an exact or prefix path would be matched literally and never hit.
            raw::RawPath::Exact(p) if p.contains(['{', '}']) => {
                Err((at("path.exact"), PathError::BracesOutsideTemplate))
            }
            raw::RawPath::Prefix(p) if p.contains(['{', '}']) => {
                Err((at("path.prefix"), PathError::BracesOutsideTemplate))
            }
            raw::RawPath::Exact(p) => PathMatcher::exact(p).map_err(|e| (at("path.exact"), e)),
            raw::RawPath::Prefix(p) => PathMatcher::prefix(p).map_err(|e| (at("path.prefix"), e)),
            raw::RawPath::Template(p) => PathMatcher::template(p).map_err(|e| (at("path.template"), e)),
        };
        let path = match path {
            Ok(p) => Some(p),
            Err((where_, e)) => {
                err(where_, e.to_string());
                None
            }
        };
        if let Some(scope) = &r.scope {
            if !is_scope(scope) {
                err(at("scope"), "must be 1-128 characters of letters, digits, ':', '_', '.', '-'".into());
            }
        }
        let modes = r.payment.clone().unwrap_or_else(|| vec![PaymentMode::Credits]);
        for (j, m) in modes.iter().enumerate() {
            if modes.iter().take(j).any(|o| o == m) {
                err(format!("$.routes[{i}].payment[{j}]"), format!("{m:?} is listed twice"));
            }
        }
        let credits = modes.contains(&PaymentMode::Credits);
        let takes_x402 = modes.contains(&PaymentMode::X402);
        if r.public {
            if r.scope.is_some() || r.cost > 0 || r.payment.is_some() || r.x402.is_some() {
                err(at("public"), "a public route takes no scope, cost, payment or x402".into());
            }
        } else {
            if modes.is_empty() {
                err(at("payment"), "must list at least one of \"credits\", \"x402\"".into());
            }
            if r.cost > 0 && !credits {
                err(at("cost"), "a cost in credits needs \"credits\" in payment".into());
            }
            if credits && r.cost > 0 && r.scope.is_none() {
                err(at("scope"), "a route that charges credits must name the scope API keys need (any key could spend otherwise)".into());
            }
            match (&r.x402, takes_x402) {
                (None, true) => err(at("x402"), "payment includes \"x402\": describe the payment requirements here".into()),
                (Some(_), false) => err(at("x402"), "x402 requirements given but payment does not include \"x402\"".into()),
                (Some(x), true) if x.accepts.is_empty() => err(at("x402.accepts"), "needs at least one payment option".into()),
                (Some(x), true) => {
                    for (j, a) in x.accepts.iter().enumerate() {
                        for (field, problem) in x402_problems(a) {
                            err(format!("$.routes[{i}].x402.accepts[{j}].{field}"), problem.into());
                        }
                    }
                }
                _ => {}
            }
        }
        let x402 = r.x402.as_ref().filter(|_| takes_x402 && !r.public).map(|x| X402Offer {
            description: x.description.clone().unwrap_or_default(),
            mime_type: x.mime_type.clone().unwrap_or_else(|| "application/json".into()),
            accepts: x.accepts.clone(),
            settle: x.settle,
        });
        if let Some(kinds) = &r.credentials {
            if r.public {
                err(at("credentials"), "a public route takes no credentials".into());
            } else if kinds.is_empty() {
                err(at("credentials"), "must list at least one of \"privy\", \"api_key\", \"api_token\" (or be left out)".into());
            }
            for (j, k) in kinds.iter().enumerate() {
                if kinds.iter().take(j).any(|o| o == k) {
                    err(format!("$.routes[{i}].credentials[{j}]"), format!("{k:?} is listed twice"));
                }
            }
        }
        if x402.is_some() && raw.x402_facilitator.is_none() {
            err(at("payment"), "takes \"x402\" but no x402_facilitator is configured: payments could not be verified".into());
        }
        if let Some(path) = path {
            routes.push(Route {
                name: r.name.clone(),
                methods: r.methods.clone(),
                path,
                scope: r.scope.clone(),
                cost: r.cost,
                public: r.public,
                credits: credits && !r.public,
                x402,
                charge: r.charge,
                credentials: r.credentials.clone().filter(|_| !r.public),
            });
        }
    }
    // A route an earlier route always matches first can never be reached.
    for (j, later) in routes.iter().enumerate() {
        if let Some(earlier) = routes.iter().take(j).find(|e| shadows(e, later)) {
            let i = raw.routes.iter().position(|r| r.name == later.name).unwrap_or(j);
            err(
                format!("$.routes[{i}].path"),
                format!("never matches: route {:?} comes first and matches every request this one would", earlier.name),
            );
        }
    }

    if !errs.is_empty() {
        return Err(ConfigErrors(errs));
    }
    Ok(Config {
        service,
        admin_digests,
        privy,
        unmatched: raw.unmatched,
        forward_authorization: raw.forward_authorization,
        max_token_bytes,
        rate_limit,
        facilitator,
        routes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(routes: &str) -> String {
        format!(r#"{{"credits_service":{{"cluster":"credits"}},"routes":{routes}}}"#)
    }

    fn errors(json: &str) -> Vec<ConfigError> {
        Config::from_json(json.as_bytes(), None).unwrap_err().0
    }

    #[test]
    fn loads_a_minimal_config() {
        let c = Config::from_json(minimal(r#"[{"name":"h","path":{"exact":"/healthz"},"public":true}]"#).as_bytes(), None).unwrap();
        assert_eq!(c.service.authority, "credits");
        assert_eq!(c.service.timeout_ms, 1000);
        assert_eq!(c.max_token_bytes, DEFAULT_MAX_TOKEN_BYTES);
        assert_eq!(c.unmatched, Unmatched::Deny);
        assert!(c.route_for("GET", "/healthz?x=1").is_some());
        assert!(c.route_for("GET", "/healthzz").is_none());
    }

    #[test]
    fn unknown_field_is_an_error() {
        let e = errors(r#"{"credits_service":{"cluster":"c","timeout":5},"routes":[]}"#);
        assert!(e[0].message.contains("unknown field `timeout`"), "{e:?}");
        assert_eq!(e[0].path, "$.credits_service.timeout");
        let e = errors(&minimal(r#"[{"name":"h","path":{"exact":"/"},"cost":"one"}]"#));
        assert_eq!(e[0].path, "$.routes[0].cost", "{e:?}");
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let e = errors(&minimal(
            r#"[{"name":"a","path":{"template":"/k/{id"},"cost":1},
                {"name":"a","path":{"exact":"x"},"methods":["get"]},
                {"name":"p","path":{"exact":"/p"},"public":true,"cost":2},
                {"name":"x","path":{"exact":"/x"},"payment":["x402"]}]"#,
        ));
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"$.routes[0].path.template"), "{paths:?}");
        assert!(paths.contains(&"$.routes[0].scope"), "{paths:?}");
        assert!(paths.contains(&"$.routes[1].name"), "{paths:?}");
        assert!(paths.contains(&"$.routes[1].methods[0]"), "{paths:?}");
        assert!(paths.contains(&"$.routes[1].path.exact"), "{paths:?}");
        assert!(paths.contains(&"$.routes[2].public"), "{paths:?}");
        assert!(paths.contains(&"$.routes[3].x402"), "{paths:?}");
    }

    #[test]
    fn refuses_what_would_silently_never_work() {
        let x = r#""x402":{"accepts":[{"scheme":"exact","network":"base","amount":"1.5","asset":"","payTo":" ","maxTimeoutSeconds":0}]}"#;
        let e = errors(&format!(
            r#"{{"credits_service":{{"cluster":"c","authority":"a b"}},"routes":[
                {{"name":"a","path":{{"exact":"/k/{{id}}"}}}},
                {{"name":"b","methods":["GET","GET"],"path":{{"prefix":"/api/"}},"payment":["credits","credits"]}},
                {{"name":"c","methods":["GET"],"path":{{"exact":"/api/v1/x"}}}},
                {{"name":"d","path":{{"template":"/api/v1/{{id}}"}},"payment":["x402"],{x}}}]}}"#
        ));
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "$.credits_service.authority",
            "$.routes[0].path.exact",
            "$.routes[1].methods[1]",
            "$.routes[1].payment[1]",
            "$.routes[2].path",
            "$.routes[3].x402.accepts[0].network",
            "$.routes[3].x402.accepts[0].amount",
            "$.routes[3].x402.accepts[0].asset",
            "$.routes[3].x402.accepts[0].payTo",
            "$.routes[3].x402.accepts[0].maxTimeoutSeconds",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
        // Route d is shadowed only for GET: b takes GET only, d takes any method.
        assert!(!paths.contains(&"$.routes[3].path"), "{paths:?}");
    }

    #[test]
    fn zero_timeout_is_refused() {
        let e = errors(r#"{"credits_service":{"cluster":"c","timeout_ms":0},"routes":[{"name":"h","path":{"exact":"/"},"public":true}]}"#);
        assert_eq!(e[0].path, "$.credits_service.timeout_ms");
    }

    #[test]
    fn admin_key_from_env_and_digest() {
        let json = minimal(r#"[{"name":"h","path":{"exact":"/"},"public":true}]"#);
        let c = Config::from_json(json.as_bytes(), Some("0123456789abcdef-admin")).unwrap();
        assert_eq!(c.admin_digests.len(), 1);
        let e = Config::from_json(json.as_bytes(), Some("short")).unwrap_err();
        assert_eq!(e.0[0].path, "env DIAL_ADMIN_API_KEY");
        let bad = r#"{"credits_service":{"cluster":"c"},"admin_key_sha256":"nothex","routes":[{"name":"h","path":{"exact":"/"},"public":true}]}"#;
        assert_eq!(errors(bad)[0].path, "$.admin_key_sha256");
    }

    #[test]
    fn privy_needs_a_key() {
        let e = errors(r#"{"credits_service":{"cluster":"c"},"privy":{"app_id":"a"},"routes":[{"name":"h","path":{"exact":"/"},"public":true}]}"#);
        assert_eq!(e[0].path, "$.privy");
        let e = errors(r#"{"credits_service":{"cluster":"c"},"privy":{"app_id":"a","verification_key":"nope"},"routes":[{"name":"h","path":{"exact":"/"},"public":true}]}"#);
        assert_eq!(e[0].path, "$.privy.verification_key");
    }

    #[test]
    fn first_matching_route_wins() {
        let c = Config::from_json(minimal(
            r#"[{"name":"one","methods":["GET"],"path":{"template":"/k/{id}"}},
                {"name":"two","path":{"prefix":"/k/"}}]"#).as_bytes(), None).unwrap();
        assert_eq!(c.route_for("GET", "/k/1").map(|r| r.name.as_str()), Some("one"));
        assert_eq!(c.route_for("POST", "/k/1").map(|r| r.name.as_str()), Some("two"));
        assert_eq!(c.route_for("GET", "/k/1/2").map(|r| r.name.as_str()), Some("two"));
    }
}
