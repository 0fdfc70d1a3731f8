//! The plugin-config loader, `Config::from_json(bytes, env_admin_key)`.
//!
//! Input: the configuration JSON; if the input holds a NUL byte (which JSON
//! text cannot), what follows the first NUL is `DIAL_ADMIN_API_KEY`.
//!
//! Checks: every error names a JSON path; a config that loads keeps every
//! promise the README makes about validation; and the loaded config is then
//! driven through `decide` (no credential, the admin key, an API key) for
//! one request per route, every refusal rendered and checked.
//!
//! The other way: from the same input, a valid configuration is built
//! (every documented member present or left to its default, values inside
//! their documented ranges, up to six routes of every kind that cannot
//! shadow each other, x402 offers, the admin key in the config and/or the
//! environment, Privy with a pinned key, a JWKS and/or a JWKS fetch, its
//! `max_keys` and the fetch's `max_stale_seconds`) and
//! must load, with exactly those values, and then pass the checks above.
#![no_main]

use dialtone::decision::{self, Decision, Request};
use dialtone::identity::AuthMethod;
use dialtone::policy::path::{PathMatcher, Segment};
use dialtone::policy::{
    Charge, Config, CredentialKind, JwksFetch, RateLimit, Route, Settle, Unmatched, X402Accept, X402Offer,
    DEFAULT_JWKS_MAX_STALE_SECS,
};
use dialtone::privy_jwt::{DEFAULT_MAX_KEYS, MAX_KEYS_LIMIT};
use dialtone_fuzz::{check_denial, jwks, pem_public_key, sha256, Choices, VISIBLE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (json, env) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], Some(String::from_utf8_lossy(&data[i + 1..]).into_owned())),
        None => (data, None),
    };
    match Config::from_json(json, env.as_deref()) {
        Ok(cfg) => check_config(&cfg, env.as_deref()),
        Err(errs) => {
            assert!(!errs.0.is_empty(), "an error without a problem");
            for e in &errs.0 {
                assert!(e.path.starts_with('$') || e.path.starts_with("env "), "{e:?}");
                assert!(!e.message.is_empty(), "{e:?}");
            }
            assert!(!errs.to_string().is_empty());
        }
    }
    valid_config_is_accepted(&mut Choices::new(data));
});

fn visible(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn check_config(cfg: &Config, env: Option<&str>) {
    let s = &cfg.service;
    assert!(visible(&s.cluster) && visible(&s.authority), "{s:?}");
    assert!((1..=60_000).contains(&s.timeout_ms), "{s:?}");
    assert!((1024..=1024 * 1024).contains(&s.max_response_bytes), "{s:?}");
    assert!((1..=3600).contains(&s.hold_ttl_seconds), "{s:?}");
    for p in [&s.lookup_path, &s.debit_path, &s.ratelimit_path] {
        assert!(p.starts_with('/'), "{s:?}");
    }
    assert!(!s.holds_path.ends_with('/'), "{s:?}");
    assert!((256..=16 * 1024).contains(&cfg.max_token_bytes));
    if let Some(rl) = &cfg.rate_limit {
        assert!((1..=1_000_000).contains(&rl.requests) && (1..=86_400).contains(&rl.window_seconds), "{rl:?}");
        assert!(rl.burst.is_some_and(|b| (1..=1_000_000).contains(&b)), "{rl:?}");
    }
    if let Some(k) = env.filter(|k| !k.is_empty()) {
        assert!(k.len() >= 16, "short admin key accepted");
        assert!(cfg.admin_digests.contains(&sha256(k.as_bytes())));
    }
    if let Some(p) = &cfg.privy {
        // Configured keys, or keys fetched from the issuer later.
        assert!(!p.verifier.keys.is_empty() || p.jwks_fetch.is_some());
        if let Some(f) = &p.jwks_fetch {
            assert!(visible(&f.cluster) && visible(&f.authority) && f.path.starts_with('/'), "{f:?}");
            assert!((10..=86_400).contains(&f.refresh_seconds) && (1..=60_000).contains(&f.timeout_ms), "{f:?}");
            assert!((1024..=1024 * 1024).contains(&f.max_bytes) && (1..=3600).contains(&f.unknown_kid_cooldown_seconds), "{f:?}");
        }
        assert!((0..=600).contains(&p.verifier.leeway_secs));
        assert!(!p.verifier.app_id.trim().is_empty() && !p.verifier.issuer.trim().is_empty());
    }

    assert!(!cfg.routes.is_empty());
    for (i, r) in cfg.routes.iter().enumerate() {
        assert!(!r.name.is_empty() && r.name.len() <= 64, "{r:?}");
        assert!(cfg.routes[..i].iter().all(|o| o.name != r.name), "duplicate route name {:?}", r.name);
        if let Some(ms) = &r.methods {
            assert!(!ms.is_empty() && ms.iter().all(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase())), "{r:?}");
        }
        if r.public {
            assert!(r.scope.is_none() && r.cost == 0 && !r.credits && r.x402.is_none(), "{r:?}");
        }
        if r.cost > 0 {
            assert!(r.credits, "a cost without credits payment: {r:?}");
            assert!(r.scope.is_some(), "a route that charges credits without a scope: {r:?}");
        }
        if let Some(x) = &r.x402 {
            assert!(!x.accepts.is_empty(), "{r:?}");
        }
        check_route(cfg, i, r, env);
    }
}

/// A request path the route's matcher matches.
fn sample_path(m: &PathMatcher) -> String {
    match m {
        PathMatcher::Exact(p) => p.clone(),
        PathMatcher::Prefix(p) => format!("{p}x"),
        PathMatcher::Template(segs) => {
            let mut out = String::new();
            for s in segs {
                out.push('/');
                match s {
                    Segment::Literal(l) => out.push_str(l),
                    Segment::Variable(_) => out.push_str("v1"),
                }
            }
            if out.is_empty() {
                out.push('/');
            }
            out
        }
    }
}

fn check_route(cfg: &Config, i: usize, r: &Route, env: Option<&str>) {
    let method = r.methods.as_ref().and_then(|m| m.first().cloned()).unwrap_or_else(|| "GET".into());
    let path = sample_path(&r.path);
    assert!(r.matches(&method, &path), "route {:?} does not match its own sample {method} {path:?}", r.name);
    // First match wins: the route found is this one or an earlier one.
    let found = cfg.route_for(&method, &format!("{path}?q=1")).unwrap_or_else(|| panic!("no route for {method} {path:?}"));
    let found_idx = cfg.routes.iter().position(|o| o.name == found.name).unwrap_or(usize::MAX);
    assert!(found_idx <= i, "route_for skipped route {i}");

    let api_key = "Bearer dial_live_abc12345deadbeefdeadbeefdeadbeef00000000".to_owned();
    // The operator's key, when it is one a client can send as a Bearer token.
    let admin = env.filter(|k| {
        k.len() >= 16
            && k.len() <= cfg.max_token_bytes
            && k.trim_end_matches('=').bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
            && !k.starts_with('=')
    });
    let admin_auth = admin.map(|k| format!("Bearer {k}"));
    for auth in [None, Some(&api_key), admin_auth.as_ref()] {
        let is_admin = auth.is_some() && auth == admin_auth.as_ref();
        let req = Request {
            method: &method,
            path: &path,
            scheme: "https",
            authority: "api.test",
            authorization: auth.map(|a| vec![a.as_bytes()]).unwrap_or_default(),
            cookies: Vec::new(),
            request_id: "req-1",
            payment_signature: vec![],
            x_payment: false,
            fetched_keys: &[],
            fetched_fingerprint: None,
            refetch_unknown_kid: false,
        };
        match decision::decide(cfg, &req, 1_700_000_000) {
            Decision::Deny(d) => {
                // The admin key bypasses every check.
                assert!(!is_admin, "the admin key was refused: {d:?}");
                check_denial(&d)
            }
            Decision::Allow(g) => {
                // Without the admin key only a public route passes (this
                // request carries no x402 payment).
                let route = g.route.as_deref().and_then(|n| cfg.routes.iter().find(|r| r.name == n));
                let public = route.is_some_and(|r| r.public);
                if g.identity.method == AuthMethod::Admin {
                    assert!(is_admin, "admin without the admin key: {g:?}");
                } else {
                    assert_eq!(g.identity.method, AuthMethod::Anonymous, "{g:?}");
                    assert!(public, "{g:?}");
                }
                assert!(g.hold.is_none() && g.identity.charged == 0, "{g:?}");
            }
            Decision::Call(call, _) => {
                assert!(auth.is_some() && !is_admin, "a callout without a credential, or for the admin");
                assert_eq!(call.path, cfg.service.lookup_path);
                let body = String::from_utf8_lossy(&call.body);
                assert!(!body.contains("dial_live_"), "the secret left the filter: {body}");
            }
        }
    }
}

// --- the other way: valid configurations load --------------------------------

const NAME: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_-";
const PATH: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_-./";
const DIGITS: &[u8] = b"0123456789";

/// An optional number member: absent (its default) or a value in `lo..=hi`
/// (often an end of the range).
fn number(c: &mut Choices, members: &mut Vec<(&'static str, String)>, name: &'static str, default: u64, lo: u64, hi: u64) -> u64 {
    if !c.bool() {
        return default;
    }
    let v = match c.below(4) {
        0 => lo,
        1 => hi,
        _ => lo + c.u64() % (hi - lo + 1),
    };
    members.push((name, v.to_string()));
    v
}

fn service_path(c: &mut Choices, members: &mut Vec<(&'static str, String)>, name: &'static str, default: &str) -> String {
    if !c.bool() {
        return default.into();
    }
    let p = format!("/{}", c.text(PATH, 0, 30));
    members.push((name, c.json_string(&p)));
    p
}

fn flag(c: &mut Choices, members: &mut Vec<(&'static str, String)>, name: &'static str) -> bool {
    if !c.bool() {
        return false;
    }
    let v = c.bool();
    members.push((name, v.to_string()));
    v
}

/// One x402 payment option, valid, and what it loads as.
fn x402_accept(c: &mut Choices) -> (String, X402Accept) {
    let mut amount = c.text(DIGITS, 1, 30);
    if amount.bytes().all(|b| b == b'0') {
        amount.push('7');
    }
    let want = X402Accept {
        scheme: c.pick(&["exact", "upto", "x"]).to_owned(),
        network: format!("{}:{}", c.pick(&["eip155", "solana", "fuzz-1"]), c.text(DIGITS, 1, 12)),
        amount,
        asset: c.text(VISIBLE, 1, 42),
        pay_to: c.text(VISIBLE, 1, 42),
        max_timeout_seconds: 1 + c.u64() % 86_400,
        extra: if c.bool() { Some(serde_json::json!({"name": "USDC", "version": "2"})) } else { None },
    };
    let mut members = vec![
        ("scheme", c.json_string(&want.scheme)),
        ("network", c.json_string(&want.network)),
        ("amount", c.json_string(&want.amount)),
        ("asset", c.json_string(&want.asset)),
        ("payTo", c.json_string(&want.pay_to)),
        ("maxTimeoutSeconds", want.max_timeout_seconds.to_string()),
    ];
    if let Some(extra) = &want.extra {
        members.push(("extra", extra.to_string()));
    }
    (c.json_object(members), want)
}

/// Route `i`, valid, and what it loads as. Every path of route `i` starts
/// with `/r<i>/`, so no route can shadow another.
fn route(c: &mut Choices, i: usize) -> (String, Route) {
    let mut m: Vec<(&'static str, String)> = Vec::new();
    let name = format!("r{i}.{}", c.text(NAME, 0, 40));
    m.push(("name", c.json_string(&name)));
    let methods = c.bool().then(|| {
        let all = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "PURGE"];
        let mut ms: Vec<String> = Vec::new();
        for _ in 0..1 + c.below(4) {
            let method = c.pick(&all);
            if !ms.iter().any(|x| x == method) {
                ms.push(method.into());
            }
        }
        ms
    });
    if let Some(ms) = &methods {
        let list: Vec<String> = ms.iter().map(|x| format!("\"{x}\"")).collect();
        m.push(("methods", format!("[{}]", list.join(","))));
    }
    let base = format!("/r{i}/");
    let (path_json, path) = match c.below(3) {
        0 => {
            let p = format!("{base}{}", c.text(PATH, 0, 20));
            (format!("{{\"exact\":{}}}", c.json_string(&p)), PathMatcher::Exact(p))
        }
        1 => {
            let p = format!("{base}{}", c.text(PATH, 0, 20));
            (format!("{{\"prefix\":{}}}", c.json_string(&p)), PathMatcher::Prefix(p))
        }
        _ => {
            let mut segs = vec![Segment::Literal(format!("r{i}"))];
            let mut text = format!("/r{i}");
            for j in 0..1 + c.below(4) {
                if c.bool() {
                    let var = format!("{}{j}", c.pick(&["id", "_", "Key", "v"]));
                    text.push_str(&format!("/{{{var}}}"));
                    segs.push(Segment::Variable(var));
                } else {
                    let lit = c.text(b"abcdefghijklmnopqrstuvwxyz0123456789_-.", 1, 12);
                    text.push_str(&format!("/{lit}"));
                    segs.push(Segment::Literal(lit));
                }
            }
            if c.bool() {
                text.push('/');
                segs.push(Segment::Literal(String::new()));
            }
            (format!("{{\"template\":{}}}", c.json_string(&text)), PathMatcher::Template(segs))
        }
    };
    m.push(("path", path_json));
    let charge = match c.below(3) {
        0 => Charge::OnSuccess,
        1 => {
            m.push(("charge", "\"on_success\"".into()));
            Charge::OnSuccess
        }
        _ => {
            m.push(("charge", "\"up_front\"".into()));
            Charge::UpFront
        }
    };
    let scope_text = |c: &mut Choices| c.text(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.-", 1, 128);
    let mut want = Route { name, methods, path, scope: None, cost: 0, public: false, credits: false, x402: None, charge, credentials: None };
    match c.below(3) {
        // Public: no credential, nothing charged.
        0 => {
            m.push(("public", "true".into()));
            want.public = true;
        }
        // Paid (or free) with credits, maybe x402 too.
        1 => {
            want.credits = true;
            want.cost = match c.below(3) {
                0 => 0,
                1 => 1 + u64::from(c.byte()),
                _ => c.u64(),
            };
            if want.cost > 0 || c.bool() {
                m.push(("cost", want.cost.to_string()));
            }
            if want.cost > 0 || c.bool() {
                let scope = scope_text(c);
                m.push(("scope", c.json_string(&scope)));
                want.scope = Some(scope);
            }
            match c.below(4) {
                0 => {}
                1 => m.push(("payment", "[\"credits\"]".into())),
                _ => {
                    let order = c.pick(&["[\"credits\",\"x402\"]", "[\"x402\",\"credits\"]"]);
                    m.push(("payment", order.into()));
                    want.x402 = Some(x402_offer(c, &mut m));
                }
            }
            if c.bool() {
                m.push(("public", "false".into()));
            }
        }
        // x402 only.
        _ => {
            m.push(("payment", "[\"x402\"]".into()));
            if c.bool() {
                m.push(("cost", "0".into()));
            }
            if c.bool() {
                let scope = scope_text(c);
                m.push(("scope", c.json_string(&scope)));
                want.scope = Some(scope);
            }
            want.x402 = Some(x402_offer(c, &mut m));
        }
    }
    // Which credential kinds the route takes (non-public routes).
    if !want.public && c.bool() {
        let all = [CredentialKind::Privy, CredentialKind::ApiKey, CredentialKind::ApiToken];
        let names = ["privy", "api_key", "api_token"];
        let mut kinds = Vec::new();
        let mut texts = Vec::new();
        for (k, n) in all.iter().zip(names) {
            if c.bool() || (kinds.is_empty() && n == "api_token") {
                kinds.push(*k);
                texts.push(format!("\"{n}\""));
            }
        }
        m.push(("credentials", format!("[{}]", texts.join(","))));
        want.credentials = Some(kinds);
    }
    (c.json_object(m), want)
}

fn x402_offer(c: &mut Choices, m: &mut Vec<(&'static str, String)>) -> X402Offer {
    let mut x: Vec<(&'static str, String)> = Vec::new();
    let description = if c.bool() {
        let d = c.text(VISIBLE, 0, 40);
        x.push(("description", c.json_string(&d)));
        d
    } else {
        String::new()
    };
    let mime_type = if c.bool() {
        let t = c.pick(&["application/json", "text/plain", "image/png"]).to_owned();
        x.push(("mime_type", c.json_string(&t)));
        t
    } else {
        "application/json".into()
    };
    let mut accepts = Vec::new();
    let mut texts = Vec::new();
    for _ in 0..1 + c.below(3) {
        let (text, a) = x402_accept(c);
        texts.push(text);
        accepts.push(a);
    }
    x.push(("accepts", format!("[{}]", texts.join(","))));
    let settle = match c.below(3) {
        0 => Settle::AfterResponse,
        1 => {
            x.push(("settle", "\"after_response\"".into()));
            Settle::AfterResponse
        }
        _ => {
            x.push(("settle", "\"before_upstream\"".into()));
            Settle::BeforeUpstream
        }
    };
    m.push(("x402", c.json_object(x)));
    X402Offer { description, mime_type, accepts, settle }
}

/// Builds a valid configuration from `c` and checks that it loads as built.
fn valid_config_is_accepted(c: &mut Choices) {
    let mut top: Vec<(&'static str, String)> = Vec::new();

    let mut svc: Vec<(&'static str, String)> = Vec::new();
    let cluster = c.text(VISIBLE, 1, 40);
    svc.push(("cluster", c.json_string(&cluster)));
    let authority = if c.bool() {
        let a = c.text(VISIBLE, 1, 40);
        svc.push(("authority", c.json_string(&a)));
        a
    } else {
        cluster.clone()
    };
    let timeout_ms = number(c, &mut svc, "timeout_ms", 1000, 1, 60_000);
    let lookup_path = service_path(c, &mut svc, "lookup_path", "/v1/keys/lookup");
    let debit_path = service_path(c, &mut svc, "debit_path", "/v1/debit");
    let max_response_bytes = number(c, &mut svc, "max_response_bytes", 64 * 1024, 1024, 1024 * 1024);
    let holds_path = service_path(c, &mut svc, "holds_path", "/v1/holds");
    let ratelimit_path = service_path(c, &mut svc, "ratelimit_path", "/v1/ratelimit");
    let hold_ttl_seconds = number(c, &mut svc, "hold_ttl_seconds", 300, 1, 3600);
    let key_cache_ttl_ms = number(c, &mut svc, "key_cache_ttl_ms", 500, 0, 1000);
    let key_cache_entries = number(c, &mut svc, "key_cache_entries", 1024, 0, 65_536);
    top.push(("credits_service", c.json_object(svc)));

    let mut admin_digests = Vec::new();
    if c.bool() {
        let digest: [u8; 32] = std::array::from_fn(|_| c.byte());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let hex = if c.bool() { hex.to_ascii_uppercase() } else { hex };
        top.push(("admin_key_sha256", c.json_string(&hex)));
        admin_digests.push(digest);
    }
    let env = c.bool().then(|| c.text(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~+/", 16, 64));
    if let Some(k) = &env {
        admin_digests.push(sha256(k.as_bytes()));
    }

    let privy = c.bool().then(|| {
        let mut p: Vec<(&'static str, String)> = Vec::new();
        let app_id = c.text(VISIBLE, 1, 40);
        p.push(("app_id", c.json_string(&app_id)));
        let issuer = if c.bool() {
            let i = c.text(VISIBLE, 1, 40);
            p.push(("issuer", c.json_string(&i)));
            i
        } else {
            "privy.io".to_owned()
        };
        let leeway = number(c, &mut p, "leeway_seconds", 60, 0, 600) as i64;
        let accept_cookie = flag(c, &mut p, "accept_cookie");
        let token_cache_entries = number(c, &mut p, "token_cache_entries", 1024, 0, 65_536) as usize;
        // Key sources (at least one): each pinned source builds a key table.
        let (mut pem, jwks_doc, mut fetch) = (c.bool(), c.byte() < 64, c.bool());
        if !pem && !jwks_doc && !fetch {
            if c.bool() { pem = true } else { fetch = true }
        }
        // Room for the pinned JWKS's two ES256 keys.
        let max_keys = number(c, &mut p, "max_keys", DEFAULT_MAX_KEYS as u64, if jwks_doc { 2 } else { 1 }, MAX_KEYS_LIMIT as u64) as usize;
        let mut keys = 0;
        if pem {
            p.push(("verification_key", c.json_string(&pem_public_key())));
            keys += 1;
        }
        if jwks_doc {
            p.push(("jwks", jwks().to_string()));
            keys += 2;
        }
        let jwks_fetch = fetch.then(|| {
            let mut f: Vec<(&'static str, String)> = Vec::new();
            let cluster = c.text(VISIBLE, 1, 40);
            f.push(("cluster", c.json_string(&cluster)));
            let authority = if c.bool() {
                let a = c.text(VISIBLE, 1, 40);
                f.push(("authority", c.json_string(&a)));
                a
            } else {
                cluster.clone()
            };
            let path = format!("/{}", c.text(PATH, 0, 40));
            f.push(("path", c.json_string(&path)));
            let refresh_seconds = number(c, &mut f, "refresh_seconds", 300, 10, 86_400);
            let want = JwksFetch {
                cluster,
                authority,
                path,
                refresh_seconds,
                timeout_ms: number(c, &mut f, "timeout_ms", 2000, 1, 60_000),
                max_bytes: number(c, &mut f, "max_bytes", 64 * 1024, 1024, 1024 * 1024) as usize,
                unknown_kid_cooldown_seconds: number(c, &mut f, "unknown_kid_cooldown_seconds", 30, 1, 3600),
                // Longer than a refresh, at most a week; by default 6 h or 4 refreshes.
                max_stale_seconds: number(
                    c,
                    &mut f,
                    "max_stale_seconds",
                    DEFAULT_JWKS_MAX_STALE_SECS.max(4 * refresh_seconds),
                    60.max(refresh_seconds + 1),
                    7 * 86_400,
                ),
                max_keys,
            };
            p.push(("jwks_fetch", c.json_object(f)));
            want
        });
        top.push(("privy", c.json_object(p)));
        (app_id, issuer, leeway, accept_cookie, token_cache_entries, keys, jwks_fetch)
    });

    let unmatched = match c.below(3) {
        0 => Unmatched::Deny,
        1 => {
            top.push(("unmatched", "\"deny\"".into()));
            Unmatched::Deny
        }
        _ => {
            top.push(("unmatched", "\"allow\"".into()));
            Unmatched::Allow
        }
    };
    let forward_authorization = flag(c, &mut top, "forward_authorization");
    let max_token_bytes = number(c, &mut top, "max_token_bytes", 4096, 256, 16 * 1024) as usize;
    let rate_limit = c.bool().then(|| {
        let mut r: Vec<(&'static str, String)> = Vec::new();
        let requests = 1 + c.u64() % 1_000_000;
        r.push(("requests", requests.to_string()));
        let window_seconds = 1 + c.u64() % 86_400;
        r.push(("window_seconds", window_seconds.to_string()));
        let burst = number(c, &mut r, "burst", requests, 1, 1_000_000);
        top.push(("rate_limit", c.json_object(r)));
        RateLimit { requests, window_seconds, burst: Some(burst) }
    });

    let mut texts = Vec::new();
    let mut routes = Vec::new();
    for i in 0..1 + c.below(6) {
        let (text, r) = route(c, i);
        texts.push(text);
        routes.push(r);
    }
    top.push(("routes", format!("[{}]", texts.join(","))));
    // A route that takes x402 needs a facilitator (and any config may name one).
    let facilitator = (routes.iter().any(|r| r.x402.is_some()) || c.bool()).then(|| {
        let mut f: Vec<(&'static str, String)> = Vec::new();
        let cluster = c.text(VISIBLE, 1, 40);
        f.push(("cluster", c.json_string(&cluster)));
        let authority = if c.bool() {
            let a = c.text(VISIBLE, 1, 40);
            f.push(("authority", c.json_string(&a)));
            a
        } else {
            cluster.clone()
        };
        let verify_path = service_path(c, &mut f, "verify_path", "/verify");
        let settle_path = service_path(c, &mut f, "settle_path", "/settle");
        let timeout_ms = number(c, &mut f, "timeout_ms", 10_000, 1, 60_000);
        let max_response_bytes = number(c, &mut f, "max_response_bytes", 64 * 1024, 1024, 1024 * 1024) as usize;
        let max_payment_bytes = number(c, &mut f, "max_payment_bytes", 8 * 1024, 512, 64 * 1024) as usize;
        top.push(("x402_facilitator", c.json_object(f)));
        (cluster, authority, verify_path, settle_path, timeout_ms, max_response_bytes, max_payment_bytes)
    });
    let json = c.json_object(top);

    let cfg = Config::from_json(json.as_bytes(), env.as_deref())
        .unwrap_or_else(|e| panic!("a valid config was refused: {e}\n{json}\nenv: {env:?}"));
    let s = &cfg.service;
    assert_eq!(
        (&s.cluster, &s.authority, s.timeout_ms, &s.lookup_path, &s.debit_path, s.max_response_bytes as u64),
        (&cluster, &authority, timeout_ms, &lookup_path, &debit_path, max_response_bytes),
        "{json}"
    );
    assert_eq!(s.holds_path, holds_path.trim_end_matches('/'), "{json}");
    assert_eq!(
        (&s.ratelimit_path, s.hold_ttl_seconds, s.key_cache_ttl_ms, s.key_cache_entries as u64),
        (&ratelimit_path, hold_ttl_seconds, key_cache_ttl_ms, key_cache_entries),
        "{json}"
    );
    assert_eq!(cfg.admin_digests, admin_digests, "{json}");
    match (&cfg.privy, &privy) {
        (None, None) => {}
        (Some(got), Some((app_id, issuer, leeway, accept_cookie, token_cache_entries, keys, jwks_fetch))) => {
            let v = &got.verifier;
            assert_eq!((&v.app_id, &v.issuer, v.leeway_secs), (app_id, issuer, *leeway), "{json}");
            assert_eq!((got.accept_cookie, got.token_cache_entries, v.keys.len()), (*accept_cookie, *token_cache_entries, *keys), "{json}");
            assert_eq!(&got.jwks_fetch, jwks_fetch, "{json}");
        }
        (got, want) => panic!("privy loaded as {got:?}, built {want:?}: {json}"),
    }
    assert_eq!((cfg.unmatched, cfg.forward_authorization, cfg.max_token_bytes), (unmatched, forward_authorization, max_token_bytes), "{json}");
    assert_eq!(cfg.rate_limit, rate_limit, "{json}");
    let got_facilitator = cfg.facilitator.as_ref().map(|f| {
        (f.cluster.clone(), f.authority.clone(), f.verify_path.clone(), f.settle_path.clone(), f.timeout_ms, f.max_response_bytes, f.max_payment_bytes)
    });
    assert_eq!(got_facilitator, facilitator, "{json}");
    assert_eq!(cfg.routes.len(), routes.len(), "{json}");
    for (got, want) in cfg.routes.iter().zip(&routes) {
        assert_eq!((&got.name, &got.methods, &got.path, &got.scope), (&want.name, &want.methods, &want.path, &want.scope), "{json}");
        assert_eq!((got.cost, got.public, got.credits, got.charge), (want.cost, want.public, want.credits, want.charge), "{json}");
        assert_eq!(got.x402, want.x402, "{json}");
        assert_eq!(got.credentials, want.credentials, "{json}");
    }
    check_config(&cfg, env.as_deref());
}
