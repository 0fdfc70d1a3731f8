//! The whole per-request decision: `decide`, then `resume` after each
//! callout (with the glue's one retry after a transport failure), then, for
//! a hold, `settle` + `after_settlement` — driven by arbitrary request
//! headers and arbitrary service answers, on the two fixed policies of
//! `dialtone_fuzz` (every kind of route, PEM + JWKS keys, admin key).
//!
//! Credentials and answers are drawn structurally (valid-looking keys, Privy
//! tokens minted with any key of the set or an attacker's, answers that echo
//! or contradict what was asked) or as raw bytes, so the fuzzer reaches the
//! deep paths quickly.
//!
//! Invariants:
//! - nothing panics;
//! - an Allow on a paid route (credits, cost > 0) is the admin key, an x402
//!   payment without a Bearer, or comes right after a hold/debit answer that,
//!   checked independently, held/charged exactly this route's cost on this
//!   account (untruncated, contract status); an API key's Allow also needs a
//!   lookup answer for its prefix, active, with the route's scope;
//! - free routes never hold or charge; at most two callouts per request;
//!   callouts go to the configured paths with JSON bodies that never carry
//!   the secret; identity headers are header-safe;
//! - every denial (including a refused capture) renders as a JSON body with
//!   `"success": false`, checked by `dialtone_fuzz::check_denial`;
//! - a response is delivered after a capture only if the capture answer
//!   confirmed this hold.
#![no_main]

use arbitrary::Arbitrary;
use dialtone::bearer::{self, Credential};
use dialtone::credits_api::{self, CallOutcome};
use dialtone::cache::Caches;
use dialtone::decision::{self, AfterSettlement, Decision, Grant, Pending, Request, PRIVY_COOKIE};
use dialtone::identity::AuthMethod;
use base64::Engine;
use dialtone::policy::{Charge, Config, CredentialKind, Route, Settle, Unmatched};
use dialtone_fuzz::{
    answer_field, answer_json, check_denial, decision_configs, header_value_ok, hex, mint, sha256, Key, ADMIN_KEY, APP_ID,
    ISSUER, NOW,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

#[derive(Arbitrary, Debug)]
// Enums list their "well-formed" variant first: `arbitrary` picks variant 0
// when the input runs out, so short inputs are well-formed requests and the
// fuzzer spends its bytes on the deviations.
struct Input {
    /// Policy B instead of A.
    policy_b: bool,
    path: PathChoice,
    /// `None`: the method the route takes.
    method: Option<Method>,
    query: Option<String>,
    https: bool,
    authorization: Authorization,
    cookie: Option<CookieSpec>,
    request_id: String,
    /// `PAYMENT-SIGNATURE` / `X-PAYMENT`.
    payment: Option<PaymentChoice>,
    /// The VM holds keys fetched from the issuer (the `Fetched` signer's).
    fetched: bool,
    clock: Clock,
    /// The service's answers, in order (a transport failure is retried once).
    answers: [Answer; 4],
    /// The upstream's status, `None` for a reset/timeout.
    upstream_status: Option<u16>,
    settlement: [Answer; 2],
    /// The glue may still fetch the JWKS for an unknown kid (so the
    /// verifier says UnknownKid instead of trying kid-less pinned keys).
    refetch_unknown_kid: bool,
    /// The fingerprint the JWKS cache computed for the fetched keys (any
    /// value: it only binds cache entries; `None`: computed by `decide`).
    fetched_fingerprint: Option<u8>,
}

#[derive(Arbitrary, Debug)]
enum PaymentChoice {
    /// A PaymentPayload whose `accepted` is the route's first requirement.
    Matching,
    /// The same, with `accepted` edited.
    Edited { field: u8, value: String },
    /// Any bytes.
    Raw(Vec<u8>),
    /// Only the v1 header.
    V1,
    /// Twice.
    Twice,
}

#[derive(Arbitrary, Debug)]
enum Authorization {
    One(AuthHeader),
    Absent,
    Several(Vec<AuthHeader>),
}

#[derive(Arbitrary, Debug)]
enum Method {
    Get,
    Post,
    Put,
    Delete,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum PathChoice {
    SmsSend,
    Report,
    Account,
    Key(String),
    TopUp,
    Files(String),
    Healthz,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Clock {
    /// Seconds around the minted tokens' times.
    Near(i8),
    Minutes(i16),
    Any(i64),
}

#[derive(Arbitrary, Debug)]
enum AuthHeader {
    Bearer(Cred),
    Raw(Vec<u8>),
    /// Another spelling of the scheme, odd whitespace.
    Spelled { scheme: Scheme, spaces: u8, trailing: bool, cred: Cred },
}

#[derive(Arbitrary, Debug)]
enum Scheme {
    Lower,
    Upper,
    Basic,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Cred {
    /// `dial_live_` + this many alphanumerics (default 40, from the seed),
    /// maybe with one odd byte.
    ApiKey { seed: u64, len: Option<u8>, odd: Option<(u8, u8)> },
    Privy(TokenSpec),
    /// `privy_` + 40 hex digits from these bytes.
    ApiToken { bytes: [u8; 20], upper: bool },
    Admin,
    Text(String),
}

#[derive(Arbitrary, Debug)]
struct TokenSpec {
    signer: Signer,
    kid: Kid,
    header: HeaderKind,
    claims: ClaimsSpec,
    tamper: Tamper,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Signer {
    Pem,
    Jwks1,
    Jwks2,
    Attacker,
    Fetched,
}

#[derive(Arbitrary, Debug)]
enum Kid {
    None,
    OfSigner,
    Jwks1,
    Jwks2,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum HeaderKind {
    Standard,
    NoTyp,
    Typ(String),
    Alg(String),
    Crit,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
struct ClaimsSpec {
    iss: Choice,
    aud: Aud,
    sub: Sub,
    sid: Option<String>,
    exp: Exp,
    nbf: Option<i32>,
    iat: Option<i32>,
    extra: Option<(String, String)>,
}

#[derive(Arbitrary, Debug)]
enum Exp {
    /// An hour after the minting time.
    Hour,
    At(i32),
    Fraction(i32),
    Missing,
    Text,
}

#[derive(Arbitrary, Debug)]
enum Choice {
    Right,
    Missing,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Aud {
    Right,
    InArray(Vec<String>),
    Missing,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Sub {
    Privy(u16),
    Missing,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Tamper {
    None,
    FlipSignature(u8),
    FlipPayload(u8),
    DropSignature,
    ExtraDot,
    Truncate(u16),
}

#[derive(Arbitrary, Debug)]
enum CookieSpec {
    Privy(TokenSpec),
    Raw(Vec<u8>),
    Pairs { before: String, value: String, after: String },
}

#[derive(Arbitrary, Debug)]
enum Answer {
    /// The contract's success answer to the call that was made.
    Right,
    Failed,
    /// Envoy's own 503/504 with a text body.
    EnvoyError { timeout: bool },
    Raw { status: u16, body: Vec<u8>, truncated: bool },
    Lookup { account: AccountChoice, prefix: Echo, scopes: Scopes, state: State, expires: Option<i32>, balance: Balance },
    Held { hold_id: HoldId, account: Echo, amount: Amount, balance: Balance, created: bool },
    Charged { account: Echo, amount: Amount, balance: Balance },
    Insufficient { balance: Balance, right_code: bool },
    RateLimited { retry_after: u64, right_code: bool },
    Allowed(bool),
    Conflict,
    NotFound,
    Settled { hold_ok: bool },
    NotOpen,
    Truncated(Box<Answer>),
}

/// A value the service should echo (account, key prefix), or another one.
#[derive(Arbitrary, Debug)]
enum Echo {
    Right,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Amount {
    Right,
    Delta(i8),
}

#[derive(Arbitrary, Debug)]
enum Balance {
    Small(u8),
    Any(i64),
}

impl Balance {
    fn get(&self) -> i64 {
        match self {
            Balance::Small(b) => i64::from(*b),
            Balance::Any(b) => *b,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum State {
    Active,
    Revoked,
    Expired,
    Zombie,
}

#[derive(Arbitrary, Debug)]
enum Scopes {
    All,
    Listed(Vec<ScopeChoice>),
}

#[derive(Arbitrary, Debug)]
enum AccountChoice {
    Privy(u16),
    Injected,
    Empty,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum ScopeChoice {
    SmsSend,
    KeysRead,
    FilesRead,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum HoldId {
    Good(u32),
    PathTraversal,
    Other(String),
}

fuzz_target!(|input: Input| run(input));

/// `DIALTONE_FUZZ_OUTCOMES=1` prints one line per input saying how the
/// request ended (`outcome: allow privy paid hold`, `outcome: deny 402
/// insufficient_credits after 2 calls`, …): run the binary over a corpus
/// with `-runs=0` to see which paths the corpus reaches.
fn report(what: impl FnOnce() -> String) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("DIALTONE_FUZZ_OUTCOMES").is_some()) {
        eprintln!("outcome: {}", what());
    }
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

fn key_body(len: u8, seed: u64) -> String {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALNUM[(x % ALNUM.len() as u64) as usize] as char
        })
        .collect()
}

fn cred_text(c: &Cred, now: i64) -> String {
    match c {
        Cred::Admin => ADMIN_KEY.to_owned(),
        Cred::ApiKey { seed, len, odd } => {
            let mut s = format!("dial_live_{}", key_body(len.unwrap_or(40), *seed));
            if let Some((pos, byte)) = odd {
                let i = 10 + usize::from(*pos) % (s.len() - 9);
                if s.is_char_boundary(i) {
                    s.insert(i, char::from(*byte));
                }
            }
            s
        }
        Cred::ApiToken { bytes, upper } => {
            let h = hex(bytes);
            format!("privy_{}", if *upper { h.to_uppercase() } else { h })
        }
        Cred::Privy(spec) => token(spec, now),
        Cred::Text(t) => t.clone(),
    }
}

fn token(spec: &TokenSpec, now: i64) -> String {
    let key = match spec.signer {
        Signer::Pem => Key::Pem,
        Signer::Jwks1 => Key::Jwks1,
        Signer::Jwks2 => Key::Jwks2,
        Signer::Attacker => Key::Attacker,
        Signer::Fetched => Key::Fetched,
    };
    let kid = match &spec.kid {
        Kid::None => None,
        Kid::OfSigner => match spec.signer {
            Signer::Jwks1 => Some(dialtone_fuzz::CONFORMANCE_KID.to_owned()),
            Signer::Jwks2 => Some(dialtone_fuzz::JWKS2_KID.to_owned()),
            Signer::Fetched => Some(dialtone_fuzz::FETCHED_KID.to_owned()),
            Signer::Pem | Signer::Attacker => None,
        },
        Kid::Jwks1 => Some(dialtone_fuzz::CONFORMANCE_KID.to_owned()),
        Kid::Jwks2 => Some(dialtone_fuzz::JWKS2_KID.to_owned()),
        Kid::Other(k) => Some(k.clone()),
    };
    let mut h = serde_json::Map::new();
    match &spec.header {
        HeaderKind::Raw(raw) => return finish(mint(key, raw, &claims(&spec.claims, now)), &spec.tamper),
        HeaderKind::Alg(a) => {
            h.insert("alg".into(), json!(a));
        }
        _ => {
            h.insert("alg".into(), json!("ES256"));
        }
    }
    match &spec.header {
        HeaderKind::Standard | HeaderKind::Crit => {
            h.insert("typ".into(), json!("JWT"));
        }
        HeaderKind::Typ(t) => {
            h.insert("typ".into(), json!(t));
        }
        _ => {}
    }
    if matches!(spec.header, HeaderKind::Crit) {
        h.insert("crit".into(), json!(["exp"]));
    }
    if let Some(k) = kid {
        h.insert("kid".into(), json!(k));
    }
    finish(mint(key, &Value::Object(h).to_string(), &claims(&spec.claims, now)), &spec.tamper)
}

fn claims(c: &ClaimsSpec, now: i64) -> String {
    let mut m = serde_json::Map::new();
    match &c.iss {
        Choice::Right => {
            m.insert("iss".into(), json!(ISSUER));
        }
        Choice::Missing => {}
        Choice::Other(s) => {
            m.insert("iss".into(), json!(s));
        }
    }
    match &c.aud {
        Aud::Right => {
            m.insert("aud".into(), json!(APP_ID));
        }
        Aud::InArray(others) => {
            let mut list: Vec<Value> = others.iter().map(|s| json!(s)).collect();
            list.push(json!(APP_ID));
            m.insert("aud".into(), Value::Array(list));
        }
        Aud::Missing => {}
        Aud::Other(s) => {
            m.insert("aud".into(), json!(s));
        }
    }
    match &c.sub {
        Sub::Privy(n) => {
            m.insert("sub".into(), json!(format!("did:privy:user{n}")));
        }
        Sub::Missing => {}
        Sub::Other(s) => {
            m.insert("sub".into(), json!(s));
        }
    }
    m.insert("sid".into(), json!(c.sid.clone().unwrap_or_else(|| "session-1".into())));
    let at = |d: i32| now.saturating_add(i64::from(d));
    match c.exp {
        Exp::Hour => {
            m.insert("exp".into(), json!(at(3600)));
        }
        Exp::At(d) => {
            m.insert("exp".into(), json!(at(d)));
        }
        Exp::Fraction(d) => {
            m.insert("exp".into(), json!(at(d) as f64 + 0.5));
        }
        Exp::Missing => {}
        Exp::Text => {
            m.insert("exp".into(), json!(at(3600).to_string()));
        }
    }
    if let Some(d) = c.nbf {
        m.insert("nbf".into(), json!(at(d)));
    }
    m.insert("iat".into(), json!(at(c.iat.unwrap_or(-10))));
    if let Some((k, v)) = &c.extra {
        m.insert(k.clone(), json!(v));
    }
    Value::Object(m).to_string()
}

fn finish(t: String, tamper: &Tamper) -> String {
    let flip = |t: &str, seg: usize, pos: u8| -> String {
        let parts: Vec<&str> = t.split('.').collect();
        let mut parts: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
        if let Some(s) = parts.get_mut(seg) {
            if !s.is_empty() {
                let i = usize::from(pos) % s.len();
                let mut bytes = s.clone().into_bytes();
                bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
                *s = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
        parts.join(".")
    };
    match tamper {
        Tamper::None => t,
        Tamper::FlipSignature(p) => flip(&t, 2, *p),
        Tamper::FlipPayload(p) => flip(&t, 1, *p),
        Tamper::DropSignature => t.rsplit_once('.').map(|(a, _)| format!("{a}.")).unwrap_or(t),
        Tamper::ExtraDot => format!("{t}."),
        Tamper::Truncate(n) => t.chars().take(usize::from(*n)).collect(),
    }
}

fn header_value(h: &AuthHeader, now: i64) -> Vec<u8> {
    match h {
        AuthHeader::Raw(b) => b.clone(),
        AuthHeader::Bearer(c) => format!("Bearer {}", cred_text(c, now)).into_bytes(),
        AuthHeader::Spelled { scheme, spaces, trailing, cred } => {
            let scheme = match scheme {
                Scheme::Lower => "bearer".to_owned(),
                Scheme::Upper => "BEARER".to_owned(),
                Scheme::Basic => "Basic".to_owned(),
                Scheme::Raw(s) => s.clone(),
            };
            let gap = " ".repeat(usize::from(spaces % 4));
            let tail = if *trailing { " \t" } else { "" };
            format!("{scheme}{gap}{}{tail}", cred_text(cred, now)).into_bytes()
        }
    }
}

/// What the service answers to the call `pending` made.
fn outcome(a: Option<&Answer>, pending: Option<&Pending>) -> CallOutcome {
    let Some(a) = a else { return CallOutcome::Failed };
    let json = |status: u16, v: Value| CallOutcome::Answered { status, body: v.to_string().into_bytes(), truncated: false };
    let (account, amount, prefix) = match pending {
        Some(Pending::Hold { identity, amount, .. }) | Some(Pending::Debit { identity, amount, .. }) => {
            (identity.account.clone().unwrap_or_default(), *amount, String::new())
        }
        Some(Pending::RateLimit { identity, .. }) => (identity.account.clone().unwrap_or_default(), 0, String::new()),
        Some(Pending::Lookup { prefix, .. }) => (String::new(), 0, prefix.clone()),
        Some(Pending::X402Verify { .. } | Pending::X402Settle { .. }) => (String::new(), 0, String::new()),
        Some(Pending::X402Claim { claim, .. }) => (String::new(), 0, claim.clone()),
        None => (String::new(), 0, String::new()),
    };
    let pick_amount = |a: &Amount| match a {
        Amount::Right => amount,
        Amount::Delta(d) => amount.wrapping_add_signed(i64::from(*d)),
    };
    let echo = |e: &Echo, right: &str| match e {
        Echo::Right => right.to_owned(),
        Echo::Other(s) => s.clone(),
    };
    match a {
        Answer::Right => match pending {
            Some(Pending::Lookup { .. }) => json(200, json!({"account": "did:privy:owner1", "key_prefix": prefix,
                "kind": "api_key", "scopes": ["sms:send", "keys:read", "files:read"], "state": "active",
                "expires_at": null, "balance": 50})),
            Some(Pending::Hold { .. }) => json(200, json!({"hold_id": "hold_00000001", "account": account,
                "amount": amount, "balance": 10, "expires_at": NOW + 300, "replayed": false})),
            Some(Pending::Debit { .. }) => json(200, json!({"account": account, "charged": amount, "balance": 10,
                "replayed": false})),
            Some(Pending::RateLimit { .. }) => json(200, json!({"allowed": true, "remaining": 5})),
            Some(Pending::X402Verify { .. }) => json(200, json!({"isValid": true, "payer": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"})),
            Some(Pending::X402Claim { claim, .. }) => json(201, json!({"claim": claim, "claimed": true})),
            Some(Pending::X402Settle { payment, .. }) => json(200, json!({"success": true,
                "transaction": "0x5240caeb76e008a016ccfacb8faab06934f2937e25313e2923fb1ce9fd1d6009",
                "network": payment.requirement.network})),
            None => json(200, json!({"hold_id": "SETTLE_ME", "state": "captured"})),
        },
        Answer::Failed => CallOutcome::Failed,
        Answer::EnvoyError { timeout } => CallOutcome::Answered {
            status: if *timeout { 504 } else { 503 },
            body: if *timeout { b"upstream request timeout".to_vec() } else { b"no healthy upstream".to_vec() },
            truncated: false,
        },
        Answer::Raw { status, body, truncated } => {
            CallOutcome::Answered { status: *status, body: body.clone(), truncated: *truncated }
        }
        Answer::Lookup { account, prefix: prefix_echo, scopes, state, expires, balance } => {
            let account = match account {
                AccountChoice::Privy(n) => format!("did:privy:owner{n}"),
                AccountChoice::Injected => "did:privy:a\r\nx-dialtone-auth-method: admin".into(),
                AccountChoice::Empty => String::new(),
                AccountChoice::Other(s) => s.clone(),
            };
            let scopes: Vec<String> = match scopes {
                Scopes::All => vec!["sms:send".into(), "keys:read".into(), "files:read".into()],
                Scopes::Listed(list) => list
                    .iter()
                    .map(|s| match s {
                        ScopeChoice::SmsSend => "sms:send".into(),
                        ScopeChoice::KeysRead => "keys:read".into(),
                        ScopeChoice::FilesRead => "files:read".into(),
                        ScopeChoice::Other(s) => s.clone(),
                    })
                    .collect(),
            };
            let state = match state {
                State::Active => "active",
                State::Revoked => "revoked",
                State::Expired => "expired",
                State::Zombie => "zombie",
            };
            let prefix = echo(prefix_echo, &prefix);
            let expires = expires.map(|d| NOW + i64::from(d));
            json(200, json!({"account": account, "key_prefix": prefix, "kind": "api_key", "scopes": scopes,
                             "state": state, "expires_at": expires, "balance": balance.get()}))
        }
        Answer::Held { hold_id, account: acct, amount: amt, balance, created } => {
            let hold_id = match hold_id {
                HoldId::Good(n) => format!("hold_{n:08x}"),
                HoldId::PathTraversal => "../../v1/debit".into(),
                HoldId::Other(s) => s.clone(),
            };
            json(if *created { 201 } else { 200 }, json!({"hold_id": hold_id, "account": echo(acct, &account),
                "amount": pick_amount(amt), "balance": balance.get(), "expires_at": NOW + 300, "replayed": false}))
        }
        Answer::Charged { account: acct, amount: amt, balance } => json(200, json!({"account": echo(acct, &account),
            "charged": pick_amount(amt), "balance": balance.get(), "replayed": false})),
        Answer::Insufficient { balance, right_code } => json(402, json!({
            "error": if *right_code { "insufficient_credits" } else { "nope" }, "balance": balance.get(), "required": amount})),
        Answer::RateLimited { retry_after, right_code } => json(429, json!({
            "error": if *right_code { "rate_limited" } else { "slow_down" }, "retry_after_seconds": retry_after})),
        Answer::Allowed(allowed) => json(200, json!({"allowed": allowed, "remaining": 3})),
        Answer::Conflict => json(409, json!({"error": "idempotency_conflict"})),
        Answer::NotFound => json(404, json!({"error": "key_not_found"})),
        Answer::Settled { hold_ok } => json(200, json!({"hold_id": if *hold_ok { "SETTLE_ME" } else { "hold_other" },
            "state": "captured"})),
        Answer::NotOpen => json(409, json!({"error": "hold_not_open", "state": "released"})),
        Answer::Truncated(inner) => match outcome(Some(inner), pending) {
            CallOutcome::Answered { status, body, .. } => CallOutcome::Answered { status, body, truncated: true },
            CallOutcome::Failed => CallOutcome::Failed,
        },
    }
}

/// One callout as the glue makes it: the answer, and after a transport
/// failure a second try (`MAX_ATTEMPTS` = 2 in `filter.rs`).
fn call<'a>(answers: &mut impl Iterator<Item = &'a Answer>, pending: Option<&Pending>) -> CallOutcome {
    let first = outcome(answers.next(), pending);
    if credits_api::is_transport_failure(&first) {
        outcome(answers.next(), pending)
    } else {
        first
    }
}

fn path_of(p: &PathChoice) -> String {
    match p {
        PathChoice::SmsSend => "/api/v1/sms/send".into(),
        PathChoice::Report => "/api/v1/report".into(),
        PathChoice::Account => "/api/v1/account".into(),
        PathChoice::Key(id) => format!("/api/v1/keys/{id}"),
        PathChoice::TopUp => "/api/v1/credits/top-up".into(),
        PathChoice::Files(rest) => format!("/files/{rest}"),
        PathChoice::Healthz => "/healthz".into(),
        PathChoice::Raw(p) => p.clone(),
    }
}

fn run(input: Input) {
    let cfg = &decision_configs()[usize::from(input.policy_b)];
    let now = match input.clock {
        Clock::Near(d) => NOW + i64::from(d),
        Clock::Minutes(m) => NOW + 60 * i64::from(m),
        Clock::Any(t) => t,
    };
    let natural = match input.path {
        PathChoice::SmsSend | PathChoice::Report | PathChoice::TopUp => "POST",
        _ => "GET",
    };
    let method = match &input.method {
        None => natural.to_owned(),
        Some(Method::Get) => "GET".to_owned(),
        Some(Method::Post) => "POST".to_owned(),
        Some(Method::Put) => "PUT".to_owned(),
        Some(Method::Delete) => "DELETE".to_owned(),
        Some(Method::Other(m)) => m.clone(),
    };
    let mut path = path_of(&input.path);
    if let Some(q) = &input.query {
        path.push('?');
        path.push_str(q);
    }
    // Tokens are minted against the fixed clock so `Clock::Near` is meaningful.
    let auth: Vec<Vec<u8>> = match &input.authorization {
        Authorization::One(h) => vec![header_value(h, NOW)],
        Authorization::Absent => Vec::new(),
        Authorization::Several(hs) => hs.iter().take(3).map(|h| header_value(h, NOW)).collect(),
    };
    let cookie: Option<Vec<u8>> = input.cookie.as_ref().map(|c| match c {
        CookieSpec::Privy(spec) => format!("theme=dark; {PRIVY_COOKIE}={}", token(spec, NOW)).into_bytes(),
        CookieSpec::Raw(b) => b.clone(),
        CookieSpec::Pairs { before, value, after } => format!("{before}; {PRIVY_COOKIE}={value}; {after}").into_bytes(),
    });
    let fingerprint = input.fetched_fingerprint.map(|b| [b; 32]);
    let payment_header: Option<Vec<u8>> = input.payment.as_ref().and_then(|p| {
        let accepted = cfg.route_for(&method, &path).and_then(|r| r.x402.as_ref()).and_then(|o| o.accepts.first());
        let mut accepted = accepted.map(|a| serde_json::to_value(a).unwrap_or(Value::Null)).unwrap_or(json!({}));
        match p {
            PaymentChoice::Matching | PaymentChoice::Twice => {}
            PaymentChoice::Edited { field, value } => {
                let names = ["scheme", "network", "amount", "asset", "payTo", "maxTimeoutSeconds", "extra", "bonus"];
                accepted[names[usize::from(*field) % names.len()]] = json!(value);
            }
            PaymentChoice::Raw(b) => return Some(b.clone()),
            PaymentChoice::V1 => return None,
        }
        let payload = json!({"x402Version": 2, "accepted": accepted, "payload": {"signature": "0x01"}});
        Some(base64::engine::general_purpose::STANDARD.encode(payload.to_string()).into_bytes())
    });
    let payment_values: Vec<&[u8]> = match (&input.payment, &payment_header) {
        (Some(PaymentChoice::Twice), Some(h)) => vec![h, h],
        (_, Some(h)) => vec![h],
        _ => vec![],
    };
    let req = Request {
        method: &method,
        path: &path,
        scheme: if input.https { "https" } else { "http" },
        authority: "api.test",
        authorization: auth.iter().map(Vec::as_slice).collect(),
        cookies: cookie.iter().map(Vec::as_slice).collect(),
        request_id: &input.request_id,
        payment_signature: payment_values.clone(),
        x_payment: matches!(input.payment, Some(PaymentChoice::V1)),
        fetched_keys: if input.fetched { dialtone_fuzz::fetched_keys() } else { &[] },
        fetched_fingerprint: fingerprint.as_ref(),
        // With a refetch possible an unknown kid is refused (the glue then
        // fetches and decides again without it): every Allow of that mode is
        // one of the other mode too, which `check_privy_verifies` checks.
        refetch_unknown_kid: input.refetch_unknown_kid,
    };

    // The credential the request carries, as the filter will read it.
    let bearer = bearer::bearer_token(&req.authorization, cfg.max_token_bytes).ok().flatten();
    let route = cfg.route_for(req.method, req.path);

    let mut answers = input.answers.iter();
    // The request twice on one VM's caches (verified tokens, key lookups;
    // the same clock, so the second pass can be served from them): every
    // invariant holds on both passes, and a cached lookup still needs the
    // lookup answer that filled it (the first pass's) as its evidence.
    let now_ms = now.checked_mul(1000);
    let mut caches = if now_ms.is_some() { Caches::new(8, 8, 1000) } else { Caches::disabled() };
    let first = run_pass(cfg, &req, route, bearer, now, &mut answers, &mut caches, None, &input);
    if now_ms.is_some() {
        run_pass(cfg, &req, route, bearer, now, &mut answers, &mut caches, first, &input);
    }
}

/// One request through decide/resume. Returns the lookup answer the VM's
/// key cache may now hold (the evidence a cached key's later Allow rests on).
#[allow(clippy::too_many_arguments)]
fn run_pass<'a>(
    cfg: &Config,
    req: &Request<'_>,
    route: Option<&Route>,
    bearer: Option<&str>,
    now: i64,
    answers: &mut impl Iterator<Item = &'a Answer>,
    caches: &mut Caches,
    cached_lookup: Option<(Pending, CallOutcome)>,
    input: &Input,
) -> Option<(Pending, CallOutcome)> {
    let now_ms = now.saturating_mul(1000);
    let mut history: Vec<(Pending, CallOutcome)> = Vec::new();
    let mut d = decision::decide_cached(cfg, req, now_ms, caches);
    loop {
        match d {
            Decision::Call(c, pending) => {
                assert!(history.len() < 3, "a fourth callout for one request (lookup, verify, settle at most): {history:?}");
                check_call(cfg, req, route, bearer, &c, &pending);
                let out = call(answers, Some(&pending));
                history.push((pending.clone(), out.clone()));
                d = decision::resume_cached(cfg, pending, out, now_ms, caches);
            }
            Decision::Deny(denial) => {
                check_denial(&denial);
                report(|| format!("deny {} {} after {} calls", denial.reply().status, denial.code(), history.len()));
                // A refusal after the lookup (no credits, say) still cached the key.
                return history.into_iter().find(|(p, _)| matches!(p, Pending::Lookup { .. })).or(cached_lookup);
            }
            Decision::Allow(grant) => {
                // A key served from the cache made no lookup in this pass:
                // the answer that filled the cache is its evidence.
                let looked_up = matches!(history.first(), Some((Pending::Lookup { .. }, _)));
                let evidence: Vec<(Pending, CallOutcome)> = match (&cached_lookup, looked_up, grant.identity.method) {
                    (Some(l), false, AuthMethod::ApiKey) => std::iter::once(l.clone()).chain(history.iter().cloned()).collect(),
                    _ => history.clone(),
                };
                check_allow(cfg, req, route, bearer, &grant, &evidence, now);
                if grant.identity.method == AuthMethod::Privy {
                    check_privy_verifies(cfg, req, bearer, &grant, now);
                }
                report(|| {
                    let paid = route.is_some_and(is_paid);
                    format!(
                        "allow {} {}{} after {} calls",
                        grant.identity.method.as_str(),
                        if paid { "paid" } else { "free" },
                        if grant.hold.is_some() { " hold" } else { "" },
                        history.len()
                    )
                });
                if let Some(hold) = &grant.hold {
                    check_settlement(cfg, hold, input.upstream_status, &input.settlement);
                }
                return evidence.into_iter().find(|(p, _)| matches!(p, Pending::Lookup { .. }));
            }
        }
    }
}

/// A Privy identity, cached or not, is a token that verifies now, for
/// exactly that account (checked with the verifier directly).
fn check_privy_verifies(cfg: &Config, req: &Request<'_>, bearer: Option<&str>, g: &Grant, now: i64) {
    let Some(token) = bearer else { return }; // the cookie form is checked by the first pass's path
    let privy = cfg.privy.as_ref().unwrap_or_else(|| panic!("a Privy identity without a privy config"));
    match privy.verifier.verify_with(token, now, req.fetched_keys) {
        Ok(session) => assert_eq!(Some(session.account.as_str()), g.identity.account.as_deref(), "another account"),
        Err(e) => panic!("a Privy identity for a token that does not verify: {e:?}"),
    }
}

fn check_call(
    cfg: &Config,
    req: &Request<'_>,
    route: Option<&Route>,
    bearer: Option<&str>,
    c: &decision::ServiceCall,
    pending: &Pending,
) {
    let s = &cfg.service;
    let route = route.unwrap_or_else(|| panic!("a callout for an unmatched request"));
    assert!(!route.public, "a callout for a public route");
    let body: Value = serde_json::from_slice(&c.body).unwrap_or_else(|e| panic!("callout body is not JSON: {e}"));
    // The secret never leaves the filter (unless the request id or the
    // account the service named happens to contain it).
    if let Some(b) = bearer {
        let text = String::from_utf8_lossy(&c.body);
        let account = match pending {
            Pending::Hold { identity, .. } | Pending::Debit { identity, .. } | Pending::RateLimit { identity, .. } => {
                identity.account.as_deref()
            }
            Pending::Lookup { .. } | Pending::X402Verify { .. } | Pending::X402Settle { .. } | Pending::X402Claim { .. } => None,
        };
        let echoed = req.request_id.contains(b) || account.is_some_and(|a| a.contains(b));
        assert!(echoed || !text.contains(b), "the credential is in a callout body: {text}");
    }
    let idem = format!("{}:{}", route.name, req.request_id);
    match pending {
        Pending::Lookup { prefix, idempotency_key, .. } => {
            assert_eq!(c.path, s.lookup_path);
            let b = bearer.unwrap_or_else(|| panic!("a lookup without a Bearer token"));
            assert_eq!(body["key_sha256"].as_str(), Some(hex(&sha256(b.as_bytes())).as_str()));
            assert!(b.contains(prefix.as_str()) && prefix.len() == 8, "{prefix:?}");
            assert_eq!(*idempotency_key, idem);
        }
        Pending::Hold { amount, identity, .. } => {
            assert_eq!(c.path, s.holds_path);
            assert!(route.credits && route.cost > 0 && route.charge == Charge::OnSuccess, "a hold on {route:?}");
            assert_eq!(*amount, route.cost);
            assert_eq!(body["amount"].as_u64(), Some(route.cost));
            assert_eq!(body["account"].as_str(), identity.account.as_deref());
            assert_eq!(body["idempotency_key"].as_str(), Some(idem.as_str()));
            assert_eq!(body["ttl_seconds"].as_u64(), Some(s.hold_ttl_seconds));
        }
        Pending::Debit { amount, identity, .. } => {
            assert_eq!(c.path, s.debit_path);
            assert!(route.credits && route.cost > 0 && route.charge == Charge::UpFront, "a debit on {route:?}");
            assert_eq!(*amount, route.cost);
            assert_eq!(body["amount"].as_u64(), Some(route.cost));
            assert_eq!(body["account"].as_str(), identity.account.as_deref());
            assert_eq!(body["idempotency_key"].as_str(), Some(idem.as_str()));
        }
        Pending::RateLimit { identity, .. } => {
            assert_eq!(c.path, s.ratelimit_path);
            assert!(cfg.rate_limit.is_some());
            assert!(!(route.credits && route.cost > 0), "a paid route only asks for the rate limit");
            assert_eq!(body["account"].as_str(), identity.account.as_deref());
        }
        Pending::X402Claim { .. } => {}
        Pending::X402Verify { payment, .. } | Pending::X402Settle { payment, .. } => {
            let f = cfg.facilitator.as_ref().unwrap_or_else(|| panic!("a facilitator call without a facilitator"));
            assert_eq!(c.to, decision::CallTarget::Facilitator);
            let want = if matches!(pending, Pending::X402Verify { .. }) { &f.verify_path } else { &f.settle_path };
            assert_eq!(&c.path, want);
            let offer = route.x402.as_ref().unwrap_or_else(|| panic!("a payment on {route:?}"));
            // The route's own requirement, never the client's copy.
            assert!(offer.accepts.contains(&payment.requirement));
            assert_eq!(body["paymentRequirements"], serde_json::to_value(&payment.requirement).unwrap_or(Value::Null));
            assert_eq!(body["x402Version"], 2);
            assert!(!req.payment_signature.is_empty(), "a payment without PAYMENT-SIGNATURE");
        }
    }
    if let Pending::X402Claim { claim, payment, .. } = pending {
        assert_eq!(c.path, s.x402_claims_path);
        assert_eq!(body["claim"].as_str(), Some(claim.as_str()));
        assert_eq!(*claim, dialtone::x402::claim_id(payment));
        assert_eq!(body["owner"].as_str(), Some(idem.as_str()));
        assert!(route.x402.as_ref().is_some_and(|o| o.settle == Settle::AfterResponse), "a claim on {route:?}");
    }
    if !matches!(pending, Pending::X402Verify { .. } | Pending::X402Settle { .. }) {
        assert_eq!(c.to, decision::CallTarget::Credits);
    }
}

fn is_paid(r: &Route) -> bool {
    r.credits && r.cost > 0
}

fn check_allow(
    cfg: &Config,
    req: &Request<'_>,
    route: Option<&Route>,
    bearer: Option<&str>,
    g: &Grant,
    history: &[(Pending, CallOutcome)],
    now: i64,
) {
    let id = &g.identity;
    for (name, value) in id.headers(g.route.as_deref()) {
        assert!(header_value_ok(&value) && !value.is_empty(), "identity header {name} is unsafe: {value:?}");
    }
    let Some(route) = route else {
        assert_eq!(cfg.unmatched, Unmatched::Allow, "an unmatched request let through");
        assert!(g.route.is_none() && g.hold.is_none() && id.method == AuthMethod::Anonymous, "{g:?}");
        assert!(history.is_empty());
        return;
    };
    assert_eq!(g.route.as_deref(), Some(route.name.as_str()), "allowed under another route");
    if route.public {
        assert!(id.method == AuthMethod::Anonymous && history.is_empty() && g.hold.is_none(), "{g:?}");
        return;
    }
    let is_admin = bearer.is_some_and(|b| matches!(bearer::classify(b, &cfg.admin_digests), Ok(Credential::Admin)));
    // A route that names its credential kinds passed only one of them (or the admin key).
    if let Some(kinds) = &route.credentials {
        let kind = match bearer.map(|b| bearer::classify(b, &cfg.admin_digests)) {
            Some(Ok(Credential::PrivyAccessToken(_))) => Some(CredentialKind::Privy),
            Some(Ok(Credential::Key(k))) if k.kind == bearer::KeyKind::ApiKey => Some(CredentialKind::ApiKey),
            Some(Ok(Credential::Key(_))) => Some(CredentialKind::ApiToken),
            _ => None,
        };
        let cookie_session = bearer.is_none() && id.method == AuthMethod::Privy;
        assert!(
            is_admin || cookie_session && kinds.contains(&CredentialKind::Privy) || kind.is_some_and(|k| kinds.contains(&k)),
            "{:?} passed a route that takes {kinds:?}: {g:?}",
            id.method
        );
    }
    match id.method {
        AuthMethod::Admin => {
            assert!(is_admin, "admin identity without the admin key: {g:?}");
            assert!(history.is_empty() && g.hold.is_none() && id.charged == 0 && id.account.is_none(), "{g:?}");
            return;
        }
        AuthMethod::Anonymous => panic!("an anonymous pass on a non-public route: {g:?}"),
        AuthMethod::X402 => {
            // Only an x402 payment the facilitator verified, on an x402
            // route, without any credential, for the route's own requirement.
            assert!(route.x402.is_some() && !req.payment_signature.is_empty(), "x402 pass on {route:?}");
            assert!(req.authorization.is_empty(), "a Bearer request passed as x402");
            assert!(g.hold.is_none() && id.charged == 0 && id.account.is_none(), "{g:?}");
            check_x402_evidence(route, g, history);
            return;
        }
        AuthMethod::Privy => {
            assert!(!is_admin);
            let account = id.account.as_deref().unwrap_or_else(|| panic!("privy identity without account"));
            assert!(account.len() <= 256 && !account.is_empty());
        }
        AuthMethod::ApiKey => {
            assert!(!is_admin);
            // A lookup for this key's prefix said: active, unexpired, with the scope.
            let b = bearer.unwrap_or_else(|| panic!("API key identity without a Bearer token"));
            let Some((Pending::Lookup { prefix, .. }, CallOutcome::Answered { status: 200, body, truncated: false })) =
                history.first()
            else {
                panic!("API key allowed without a successful lookup: {history:?}");
            };
            let key_body = b.strip_prefix("dial_live_").or_else(|| b.strip_prefix("privy_"));
            assert_eq!(key_body.and_then(|k| k.get(..8)), Some(prefix.as_str()), "prefix of another key");
            let v = answer_json(body).unwrap_or_else(|| panic!("lookup body is not JSON"));
            let f = |n: &str| answer_field(&v, n).cloned().unwrap_or(Value::Null);
            assert_eq!(f("key_prefix").as_str(), Some(prefix.as_str()));
            assert_eq!(id.key_prefix.as_deref(), Some(prefix.as_str()));
            assert_eq!(f("state").as_str(), Some("active"));
            assert_eq!(f("account").as_str(), id.account.as_deref());
            if let Some(exp) = f("expires_at").as_i64() {
                assert!(exp > now, "an expired key let through");
            }
            if let Some(scope) = &route.scope {
                let scopes = f("scopes");
                let has = scopes.as_array().is_some_and(|a| a.iter().any(|s| s.as_str() == Some(scope.as_str())));
                assert!(has, "allowed without the scope {scope}: {scopes}");
            }
        }
    }

    if route.x402.is_some() && !route.credits {
        // An x402-only route (a top-up): the Bearer named the account, the
        // payment paid.
        check_x402_evidence(route, g, history);
        assert!(g.hold.is_none() && id.charged == 0, "{g:?}");
        return;
    }
    assert!(id.payment.is_none() && g.x402_settle.is_none() && g.receipt.is_none(), "an x402 payment on a credits pass: {g:?}");
    if !is_paid(route) {
        assert!(g.hold.is_none() && id.charged == 0, "a free route charged: {g:?}");
        if cfg.rate_limit.is_some() && id.account.is_some() {
            let Some((Pending::RateLimit { .. }, CallOutcome::Answered { status: 200, body, truncated: false })) = history.last()
            else {
                panic!("free route with a rate limit allowed without a rate check: {history:?}");
            };
            let v = answer_json(body).unwrap_or(Value::Null);
            assert_eq!(answer_field(&v, "allowed"), Some(&Value::Bool(true)), "{v}");
        }
        return;
    }

    // A paid route: right after a successful hold or debit of exactly this cost on this account.
    let account = id.account.as_deref().unwrap_or_else(|| panic!("charged without an account: {g:?}"));
    assert_eq!(id.charged, route.cost, "{g:?}");
    let Some((pending, CallOutcome::Answered { status, body, truncated: false })) = history.last() else {
        panic!("paid route allowed without a hold/debit answer: {history:?}");
    };
    let v = answer_json(body).unwrap_or_else(|| panic!("paid on an answer that is not JSON"));
    match (pending, route.charge) {
        (Pending::Hold { amount, .. }, Charge::OnSuccess) => {
            assert!(*status == 200 || *status == 201, "held on status {status}");
            let f = |n: &str| answer_field(&v, n).cloned().unwrap_or(Value::Null);
            assert_eq!(*amount, route.cost);
            assert_eq!(f("amount").as_u64(), Some(route.cost), "held another amount: {v}");
            assert_eq!(f("account").as_str(), Some(account), "held on another account: {v}");
            assert_eq!(f("hold_id").as_str(), g.hold.as_deref(), "{v}");
            assert!(f("balance").as_i64().is_some_and(|b| b >= 0 && Some(b) == id.credits_remaining), "{v}");
            assert!(g.hold.is_some());
        }
        (Pending::Debit { amount, .. }, Charge::UpFront) => {
            assert_eq!(*status, 200, "charged on status {status}");
            let f = |n: &str| answer_field(&v, n).cloned().unwrap_or(Value::Null);
            assert_eq!(*amount, route.cost);
            assert_eq!(f("charged").as_u64(), Some(route.cost), "charged another amount: {v}");
            assert_eq!(f("account").as_str(), Some(account), "charged another account: {v}");
            assert!(f("balance").as_i64().is_some_and(|b| b >= 0 && Some(b) == id.credits_remaining), "{v}");
            assert!(g.hold.is_none());
        }
        other => panic!("paid route allowed after {other:?}"),
    }
}

/// A pass paid with x402: the facilitator verified exactly this route's
/// requirement (and settled it, for `settle: before_upstream`).
fn check_x402_evidence(route: &Route, g: &Grant, history: &[(Pending, CallOutcome)]) {
    let offer = route.x402.as_ref().unwrap_or_else(|| panic!("x402 evidence on a route without x402"));
    let paid = g.identity.payment.as_ref().unwrap_or_else(|| panic!("x402 pass without a payment: {g:?}"));
    let verified = history.iter().find_map(|(p, out)| match (p, out) {
        (Pending::X402Verify { payment, .. }, CallOutcome::Answered { status: 200, body, truncated: false }) => Some((payment, body)),
        _ => None,
    });
    let Some((payment, body)) = verified else { panic!("x402 pass without a verify answer: {history:?}") };
    assert!(offer.accepts.contains(&payment.requirement), "verified against another requirement: {payment:?}");
    let v = answer_json(body).unwrap_or(Value::Null);
    assert_eq!(answer_field(&v, "isValid"), Some(&Value::Bool(true)), "passed on {v}");
    assert_eq!(answer_field(&v, "payer").and_then(Value::as_str), Some(paid.payer.as_str()));
    assert_eq!((paid.amount.as_str(), paid.network.as_str()), (payment.requirement.amount.as_str(), payment.requirement.network.as_str()));
    match offer.settle {
        Settle::AfterResponse => {
            assert!(g.x402_settle.is_some() && g.receipt.is_none() && paid.transaction.is_none(), "{g:?}");
            // Claimed for this request alone, right before the pass.
            let Some((Pending::X402Claim { claim, .. }, CallOutcome::Answered { status: 200 | 201, body, truncated: false })) = history.last()
            else {
                panic!("an x402 pass without a claim: {history:?}");
            };
            let v = answer_json(body).unwrap_or(Value::Null);
            assert_eq!(answer_field(&v, "claimed"), Some(&Value::Bool(true)), "passed on {v}");
            assert_eq!(g.x402_claim.as_deref(), Some(claim.as_str()));
        }
        Settle::BeforeUpstream => {
            let Some((Pending::X402Settle { .. }, CallOutcome::Answered { status: 200, body, truncated: false })) = history.last() else {
                panic!("settled-first pass without a settle answer: {history:?}");
            };
            let v = answer_json(body).unwrap_or(Value::Null);
            assert_eq!(answer_field(&v, "success"), Some(&Value::Bool(true)), "passed on {v}");
            assert_eq!(answer_field(&v, "transaction").and_then(Value::as_str), paid.transaction.as_deref());
            assert!(g.receipt.is_some() && g.x402_settle.is_none(), "{g:?}");
        }
    }
}

fn check_settlement(cfg: &Config, hold: &str, upstream: Option<u16>, answers: &[Answer]) {
    let c = decision::settle(cfg, hold, upstream);
    let capturing = decision::is_capture(&c);
    assert_eq!(capturing, matches!(upstream, Some(200..=399)), "{upstream:?} -> {}", c.path);
    let want = format!("{}/{hold}/{}", cfg.service.holds_path, if capturing { "capture" } else { "release" });
    assert_eq!(c.path, want);
    assert!(serde_json::from_slice::<Value>(&c.body).is_ok_and(|v| v.is_object()));
    // `Settled { hold_ok }` answers for this hold or another one.
    let mut it = answers.iter();
    let out = match call(&mut it, None) {
        CallOutcome::Answered { status, body, truncated } => {
            let body = String::from_utf8_lossy(&body).replace("SETTLE_ME", hold).into_bytes();
            CallOutcome::Answered { status, body, truncated }
        }
        CallOutcome::Failed => CallOutcome::Failed,
    };
    let result = credits_api::parse_settlement(out.clone(), hold);
    match decision::after_settlement(capturing, result) {
        AfterSettlement::Deliver => {
            if capturing {
                let CallOutcome::Answered { status: 200, body, truncated: false } = &out else {
                    panic!("delivered after an unconfirmed capture: {out:?}");
                };
                let v = answer_json(body).unwrap_or(Value::Null);
                assert_eq!(answer_field(&v, "hold_id").and_then(Value::as_str), Some(hold), "{v}");
            }
        }
        AfterSettlement::Refuse(d) => {
            assert!(capturing, "a release refused the response");
            check_denial(&d);
        }
    }
}
