//! The plugin-config loader, `Config::from_json(bytes, env_admin_key)`.
//!
//! Input: the configuration JSON; if the input holds a NUL byte (which JSON
//! text cannot), what follows the first NUL is `DIAL_ADMIN_API_KEY`.
//!
//! Checks: every error names a JSON path; a config that loads keeps every
//! promise the README makes about validation; and the loaded config is then
//! driven through `decide` (no credential, the admin key, an API key) for
//! one request per route, every refusal rendered and checked.
#![no_main]

use dialtone::decision::{self, Decision, Request};
use dialtone::identity::AuthMethod;
use dialtone::policy::path::{PathMatcher, Segment};
use dialtone::policy::{Config, Route};
use dialtone_fuzz::{check_denial, sha256};
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
            has_x402_payment: false,
            fetched_keys: &[],
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
