//! The plugin configuration as the operator writes it (JSON), before
//! validation. Every struct refuses unknown fields so a typo is an error at
//! load, not a silently ignored setting.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Where API keys are looked up and credits are debited.
    pub credits_service: RawService,
    /// SHA-256 (hex) of the operator admin key, as an alternative to (or in
    /// addition to) the `DIAL_ADMIN_API_KEY` VM environment variable.
    #[serde(default)]
    pub admin_key_sha256: Option<String>,
    /// Privy access-token verification; absent = Privy tokens get 401.
    #[serde(default)]
    pub privy: Option<RawPrivy>,
    /// What to do with a request no route matches.
    #[serde(default)]
    pub unmatched: Unmatched,
    /// Pass the `Authorization` header upstream after a successful check.
    /// Off by default: the upstream gets trusted identity headers instead,
    /// and the secret stays at the edge.
    #[serde(default)]
    pub forward_authorization: bool,
    #[serde(default)]
    pub max_token_bytes: Option<usize>,
    /// One request budget per account, shared by all its keys and sessions,
    /// counted by the key/credits service (so it holds across Envoy workers
    /// and replicas). Absent = no rate limit.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// The x402 facilitator that verifies and settles payments (required as
    /// soon as a route takes `x402`).
    #[serde(default)]
    pub x402_facilitator: Option<RawFacilitator>,
    pub routes: Vec<RawRoute>,
}

/// Where x402 payments are verified and settled (an Envoy cluster, called
/// like the key/credits service).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFacilitator {
    pub cluster: String,
    /// `:authority` of the callouts; defaults to the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default = "default_verify_path")]
    pub verify_path: String,
    #[serde(default = "default_settle_path")]
    pub settle_path: String,
    /// Settlement waits for the chain: give it time.
    #[serde(default = "default_facilitator_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// A bigger `PAYMENT-SIGNATURE` is refused with 402 before any callout.
    #[serde(default = "default_max_payment_bytes")]
    pub max_payment_bytes: usize,
}

fn default_verify_path() -> String {
    "/verify".into()
}
fn default_settle_path() -> String {
    "/settle".into()
}
fn default_facilitator_timeout() -> u64 {
    10_000
}
fn default_max_payment_bytes() -> usize {
    8 * 1024
}

/// A token bucket: `burst` requests at once, refilled at `requests` per
/// `window_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests: u64,
    pub window_seconds: u64,
    /// Default: `requests`.
    #[serde(default)]
    pub burst: Option<u64>,
}

/// When a paid route's credits are taken.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Charge {
    /// Hold the cost before the request goes upstream; capture it when the
    /// upstream answers 2xx/3xx, release it on 5xx, reset or timeout. A
    /// client never pays for the server's failure.
    #[default]
    OnSuccess,
    /// Debit before the request goes upstream, whatever the upstream answers.
    UpFront,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    /// The Envoy cluster the callouts go to.
    pub cluster: String,
    /// `:authority` of the callouts; defaults to the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_lookup_path")]
    pub lookup_path: String,
    #[serde(default = "default_debit_path")]
    pub debit_path: String,
    /// Answers larger than this are treated as garbage (fail closed).
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Where holds are placed (charge on success); capture and release are
    /// `<holds_path>/<hold id>/capture` and `…/release`.
    #[serde(default = "default_holds_path")]
    pub holds_path: String,
    #[serde(default = "default_ratelimit_path")]
    pub ratelimit_path: String,
    /// Where an x402 payment is claimed by the one request it pays for
    /// (`<path>/<claim>/release` gives it back when the upstream failed).
    #[serde(default = "default_x402_claims_path")]
    pub x402_claims_path: String,
    /// A hold nobody settles is released by the service after this long.
    #[serde(default = "default_hold_ttl")]
    pub hold_ttl_seconds: u64,
    /// How long an active key's lookup is reused by a VM, in ms (0 = ask the
    /// service on every request). At most 1000: a revoked key is refused
    /// within this long on every Envoy worker and replica.
    #[serde(default = "default_key_cache_ttl_ms")]
    pub key_cache_ttl_ms: u64,
    /// Key lookups a VM keeps at most.
    #[serde(default = "default_cache_entries")]
    pub key_cache_entries: usize,
    /// Credit leases: paid requests of an account with credits to spare
    /// are charged from a lease the VM holds, with no callout (off when
    /// absent).
    #[serde(default)]
    pub lease: Option<RawLease>,
}

/// `credits_service.lease`.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawLease {
    /// Credits a lease holds (N).
    pub credits: u64,
    /// Spends are reported at least this often (and the lease's state read).
    #[serde(default = "default_lease_report_ms")]
    pub report_ms: u64,
    /// The service closes a lease after this long and gives the rest back.
    #[serde(default = "default_lease_ttl")]
    pub ttl_seconds: u64,
    /// A lease is granted only while available credits ≥ this × N.
    #[serde(default = "default_lease_factor")]
    pub min_balance_factor: u64,
    #[serde(default = "default_leases_path")]
    pub path: String,
}

fn default_lease_report_ms() -> u64 {
    200
}
fn default_lease_ttl() -> u64 {
    30
}
fn default_lease_factor() -> u64 {
    4
}
fn default_leases_path() -> String {
    "/v1/leases".into()
}

fn default_key_cache_ttl_ms() -> u64 {
    500
}
fn default_cache_entries() -> usize {
    1024
}

fn default_holds_path() -> String {
    "/v1/holds".into()
}
fn default_x402_claims_path() -> String {
    "/v1/x402/claims".into()
}
fn default_ratelimit_path() -> String {
    "/v1/ratelimit".into()
}
fn default_hold_ttl() -> u64 {
    300
}

fn default_timeout_ms() -> u64 {
    1000
}
fn default_lookup_path() -> String {
    "/v1/keys/lookup".into()
}
fn default_debit_path() -> String {
    "/v1/debit".into()
}
fn default_max_response_bytes() -> usize {
    64 * 1024
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrivy {
    /// The Privy app id: the required `aud`.
    pub app_id: String,
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// The verification key the Privy dashboard shows (PEM, SPKI).
    #[serde(default)]
    pub verification_key: Option<String>,
    /// A JWKS document (`{"keys":[…]}`); keys are selected by `kid`.
    #[serde(default)]
    pub jwks: Option<Value>,
    #[serde(default = "default_leeway")]
    pub leeway_seconds: i64,
    /// Also read the token from the `privy-token` cookie (Privy's HttpOnly
    /// cookie mode) when there is no `Authorization` header.
    #[serde(default)]
    pub accept_cookie: bool,
    /// Fetch the issuer's JWKS (Privy: `/v1/apps/<app id>/jwks.json` on
    /// `api.privy.io`) over a callout: at start, every `refresh_seconds`, and
    /// at once (with a cooldown) when a token names an unknown `kid`. The
    /// last good keys stay in use when a fetch fails; pinned keys above keep
    /// working alongside.
    #[serde(default)]
    pub jwks_fetch: Option<RawJwksFetch>,
    /// Verified tokens a VM keeps (keyed by the token's SHA-256, until its
    /// `exp`), so a repeated token skips the signature check. 0 = verify
    /// every request.
    #[serde(default = "default_cache_entries")]
    pub token_cache_entries: usize,
    /// The most ES256 keys taken from one JWKS (the pinned `jwks`, and each
    /// fetched document): a bigger set is refused. Each key costs a
    /// 152 KB table per VM, and a token without `kid` is tried against at
    /// most 3 keys.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

fn default_max_keys() -> usize {
    crate::privy_jwt::DEFAULT_MAX_KEYS
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwksFetch {
    /// The Envoy cluster of the JWKS host.
    pub cluster: String,
    /// `:authority` of the fetch; defaults to the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    pub path: String,
    #[serde(default = "default_jwks_refresh")]
    pub refresh_seconds: u64,
    #[serde(default = "default_jwks_timeout")]
    pub timeout_ms: u64,
    /// Documents larger than this are refused (the last good keys stay).
    #[serde(default = "default_jwks_max_bytes")]
    pub max_bytes: usize,
    /// At most one fetch for an unknown `kid` per this many seconds.
    #[serde(default = "default_jwks_cooldown")]
    pub unknown_kid_cooldown_seconds: u64,
    /// Fetched keys are dropped (and counted) when no fetch has succeeded
    /// for this long: a key the issuer removed must not stay trusted while
    /// every refetch fails. Pinned keys are never dropped. Default: 6 hours,
    /// or 4 × `refresh_seconds` if that is longer.
    #[serde(default)]
    pub max_stale_seconds: Option<u64>,
}

fn default_jwks_refresh() -> u64 {
    300
}
fn default_jwks_timeout() -> u64 {
    2000
}
fn default_jwks_max_bytes() -> usize {
    64 * 1024
}
fn default_jwks_cooldown() -> u64 {
    30
}

fn default_issuer() -> String {
    "privy.io".into()
}
fn default_leeway() -> i64 {
    60
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// 403 `route_not_allowed` (the default: a route nobody wrote a policy
    /// for is not exposed by accident).
    #[default]
    Deny,
    /// Pass through without any check, like a `public` route.
    Allow,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    /// HTTP methods, upper case; absent = any method.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    pub path: RawPath,
    /// The scope an API key or token must hold. Privy sessions skip it.
    #[serde(default)]
    pub scope: Option<String>,
    /// Credits debited per request (0 = free, but still authenticated).
    #[serde(default)]
    pub cost: u64,
    /// How the route may be paid: `credits` (Bearer), `x402`. Default `["credits"]`.
    #[serde(default)]
    pub payment: Option<Vec<PaymentMode>>,
    /// No credential needed, nothing charged.
    #[serde(default)]
    pub public: bool,
    /// Payment requirements announced in the 402 for x402 routes.
    #[serde(default)]
    pub x402: Option<RawX402>,
    /// `on_success` (default) or `up_front`.
    #[serde(default)]
    pub charge: Charge,
    /// The Bearer credential kinds this route accepts (absent = every kind).
    /// When set, a request without one is refused (401) even if it carries
    /// an x402 payment: a credits top-up must name the account it credits,
    /// and a dashboard's key management may demand a Privy session. The
    /// operator admin key is always accepted.
    #[serde(default)]
    pub credentials: Option<Vec<CredentialKind>>,
}

/// A kind of Bearer credential (see the README's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// A Privy access token (a session).
    Privy,
    /// `dial_live_…`.
    ApiKey,
    /// `privy_` + 40 hex.
    ApiToken,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawPath {
    Exact(String),
    Prefix(String),
    Template(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentMode {
    Credits,
    X402,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawX402 {
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub mime_type: Option<String>,
    pub accepts: Vec<X402Accept>,
    /// When the payment is settled: `after_response` (default: only when the
    /// upstream answered 2xx/3xx, so a client never pays for a failure) or
    /// `before_upstream` (the upstream gets the settled transaction, e.g. a
    /// credits top-up that must credit exactly once per transaction).
    #[serde(default)]
    pub settle: Settle,
}

/// When an x402 payment is settled.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Settle {
    #[default]
    AfterResponse,
    BeforeUpstream,
}

/// One x402 v2 `PaymentRequirements` entry, in the protocol's own field names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct X402Accept {
    pub scheme: String,
    /// CAIP-2 network id, e.g. `eip155:8453` (Base).
    pub network: String,
    /// Atomic units of `asset`, as a decimal string.
    pub amount: String,
    pub asset: String,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Value>,
}
