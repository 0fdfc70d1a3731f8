//! `make bench`: what dialtone costs per request, next to what Envoy already
//! offers, in one run on one machine.
//!
//! The Envoy under test runs with one worker (`--concurrency 1`) pinned to
//! CPU 0; wrk (one thread, 16 connections) and a second "backend" Envoy that
//! plays the upstream, the ext_authz server and the trivial credits stand-in
//! (all `direct_response`) are pinned to CPU 1. Each variant gets a fresh
//! Envoy, a warm-up, then a timed wrk run. Results are printed as a table
//! with ratios to A (passthrough) and W0 (an empty wasm filter) and written
//! to `target/bench/results.json`.
//!
//! Variants:
//! - A   passthrough (router only)
//! - W0  an empty proxy-wasm filter (bench/empty-filter), same V8 runtime
//! - W2  the same filter making the host calls of a cached free request (headers read, 1 removed, 4 added, 2 counters): the floor of a free route
//! - W1  the same filter making one callout per request (to the stand-in) and nothing else: the floor of a paid route
//! - B1  jwt_authn, ES256, with its JWT cache, one repeated token
//! - B2  jwt_authn, ES256, no cache (verifies every request), one repeated token
//! - B2f jwt_authn, no cache, a fresh token every request
//! - C   ext_authz over HTTP to a trivial server
//! - D1  dialtone, a repeated Privy token, free route
//! - D2  dialtone, a fresh Privy token every request, free route
//! - D3  dialtone, an API key, free scoped route (lookups from the real key/credits service, cached ≤ 500 ms)
//! - D4  dialtone, an API key, paid route (up-front debit), credits callout to the trivial stand-in
//! - D5  dialtone, a Privy token, paid route, credits callout to the trivial stand-in
//! - D4r dialtone, an API key, paid route, the real key/credits service (SQLite, one ledger write per request)
//! - D4p the same on PostgreSQL (when BENCH_PG_URL is set: `make bench` starts one)
//! - D4l, D4rl, D4pl: D4, D4r, D4p with credit leases (`credits_service.lease`:
//!   leases of LEASE_CREDITS, reported every 200 ms): paid requests spend a
//!   lease with no callout
//! - X1  dialtone, an x402 payment (no Bearer): verify (stand-in facilitator), claim (stand-in credits service), upstream, settle (stand-in facilitator): three callouts
//!
//! Then the key/credits service alone, no Envoy: `dialtone-credits serve`
//! instance(s) pinned to CPU 0 (idle once the Envoy variants are done), the
//! load from `credits-service/examples/loadgen.rs` (64 clients, each on its
//! own keep-alive HTTP/1.1 connection, as many tokio tasks on one process)
//! pinned to CPU 1; PostgreSQL is not pinned (it is whatever
//! `scripts/with-postgres.sh` started). Each row gets a warm-up run, then a
//! timed one. Accounts `svc-0`…`svc-63` hold 10^9 credits each (1 credit
//! per paid request); client `i` uses `svc-{i % accounts}`. Reported: paid
//! requests/s (a hold and its capture = one paid request; a debit in the
//! debit rows), p50/p99 of the hold call (of the debit call in the debit
//! rows), and every non-2xx answer, which fails the run. Rows:
//! - S1  SQLite (a fresh db file in target/bench), 1 instance, hold + capture, 64 accounts
//! - S1h the same, every client on one account
//! - S1d the same as S1, up-front debits
//! - S2  PostgreSQL (BENCH_PG_URL), 1 instance, hold + capture, 64 accounts
//! - S2h the same, every client on one account (its row lock is the bound)
//! - S2d the same as S2, up-front debits
//! - S3  2 instances on the same PostgreSQL database, clients split between them, 64 accounts
//! - S3h the same, every client on one account
//!
//! Without BENCH_PG_URL, D4p and S2*/S3* say "not measured".
//!
//! For every variant with a key/credits cluster, the calls it made to it
//! during the timed run (Envoy's `cluster.dialtone_credits.upstream_rq_total`)
//! are reported per 10,000 requests.
//!
//! Environment: BENCH_SECONDS (10), BENCH_WARMUP_SECONDS (2),
//! BENCH_CONNECTIONS (16), BENCH_ONLY ("A,W0,D1" or "S1,S2,S3": run only
//! these, Envoy variants and service rows alike), BENCH_NO_X402 (1: a policy
//! without x402, for an older DIALTONE_WASM), BENCH_RESULTS
//! (target/bench/results.json), BENCH_PERF (1: perf record the Envoy under
//! test), BENCH_PG_URL (PostgreSQL for D4p and S2*/S3*; `make bench` sets
//! it), BENCH_NO_SERVICE (1: skip the service-alone rows),
//! BENCH_SERVICE_CLIENTS (64), BENCH_CREDITS_H1 (1: the filter's
//! key/credits cluster speaks HTTP/1.1 instead of h2c), BENCH_LOADGEN (the loadgen binary;
//! target/release/examples/loadgen next to the service by default, built
//! by `make bench-build`).

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dialtone_devstack::{free_port, tokens, Paths};
use serde_json::{json, Value};

const APP_ID: &str = "bench-app";
/// The service key the bench's services accept and its filters send.
const SERVICE_KEY: &str = "bench-service-key-0123456789abcdef-0123";
const ACCOUNT: &str = "did:privy:bench";
const SCOPE: &str = "bench:read";
/// Fresh tokens minted for D2/B2f: more than any run sends at their rate,
/// and far more than the token cache holds, so none is ever seen twice.
const FRESH_TOKENS: usize = 60_000;
/// Credits per lease in the leasing variants: a little over a second of a
/// paid route at full speed (the next lease is asked for at a quarter left).
const LEASE_CREDITS: u64 = 10_000;

fn main() {
    if let Err(e) = run() {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

struct Setup {
    paths: Paths,
    dir: PathBuf,
    empty_wasm: PathBuf,
    seconds: u64,
    warmup: u64,
    connections: u32,
    backend: Backend,
    credits_port: u16,
    /// The service on PostgreSQL (BENCH_PG_URL), and its API key.
    pg_port: Option<u16>,
    pg_api_key: String,
    /// BENCH_PG_URL, for D4p and the service-alone rows S2*/S3*.
    pg_url: Option<String>,
    pem: String,
    jwks: String,
    token: String,
    api_key: String,
}

/// The second Envoy: upstream, ext_authz server and credits stand-in.
struct Backend {
    upstream: u16,
    authz: u16,
    standin: u16,
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone)]
enum Load {
    /// The same `Authorization` on every request (or none).
    Fixed(Option<String>),
    /// The same `PAYMENT-SIGNATURE` on every request (the stand-in
    /// facilitator takes it every time).
    Payment(String),
    /// A fresh token per request, from this file (one per line).
    Fresh(PathBuf),
}

struct Variant {
    id: &'static str,
    what: &'static str,
    filters: String,
    path: &'static str,
    load: Load,
    credits_cluster_port: Option<u16>,
}

#[derive(Debug, Clone)]
struct Measured {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    non_2xx: u64,
    errors: u64,
    rss_kib: u64,
    /// Busy share of CPU 0 (the Envoy under test) and CPU 1 (load + backend)
    /// during the timed run, from /proc/stat: which side was the bottleneck.
    cpu_busy: [f64; 2],
    /// Calls to the key/credits cluster during the timed run.
    service_calls: Option<u64>,
}

fn run() -> Result<(), String> {
    let paths = Paths::discover()?;
    let dir = paths.root.join("target/bench");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let empty_wasm = paths.root.join("target/wasm32-wasip1/wasm-release/dialtone_bench_empty_filter.wasm");
    if !empty_wasm.exists() {
        return Err(format!("{} missing: run `make bench` (it builds it)", empty_wasm.display()));
    }
    for tool in ["wrk", "taskset"] {
        if Command::new("sh").args(["-c", &format!("command -v {tool}")]).stdout(Stdio::null()).status().map_or(true, |s| !s.success()) {
            return Err(format!("{tool} not found: `make bench` installs it (apt-get install wrk util-linux)"));
        }
    }
    let env_num = |var: &str, default: u64| std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default);

    // Keys and tokens.
    let key = tokens::load_or_create_key(&dir.join("bench-signing-key.pem"))?;
    let pem = tokens::public_pem(&key)?;
    let point = key.verifying_key().to_encoded_point(false);
    let (x, y) = (point.x().ok_or("no x")?, point.y().ok_or("no y")?);
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "bench",
        "x": tokens::b64(x), "y": tokens::b64(y)}]})
    .to_string();
    let now = tokens::now_unix();
    let mint = |i: usize| {
        tokens::sign_es256(
            &key,
            &json!({"alg": "ES256", "typ": "JWT", "kid": "bench"}),
            &json!({"sid": format!("bench-session-{i}"), "iss": "privy.io", "iat": now - 5, "aud": APP_ID, "sub": ACCOUNT, "exp": now + 7200}),
        )
    };
    let token = mint(0);
    let fresh_file = dir.join("fresh-tokens.txt");
    let started = Instant::now();
    let mut fresh = String::with_capacity(FRESH_TOKENS * 300);
    for i in 1..=FRESH_TOKENS {
        let _ = writeln!(fresh, "{}", mint(i));
    }
    std::fs::write(&fresh_file, fresh).map_err(|e| e.to_string())?;
    eprintln!("bench: minted {FRESH_TOKENS} tokens in {:?}", started.elapsed());

    // The real key/credits service (SQLite), on CPU 1; with BENCH_PG_URL
    // (`make bench` runs under scripts/with-postgres.sh) a second one on
    // PostgreSQL for D4p.
    let db = dir.join("credits.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let start_service = |db: &str, name: &str| -> Result<(u16, String, Proc), String> {
        credits_cli(&paths, db, &["account", "create", ACCOUNT, "--credits", "100000000"])?;
        let created: Value = serde_json::from_str(credits_cli(&paths, db, &["key", "create", ACCOUNT, "--json", "--scopes", SCOPE])?.trim())
            .map_err(|e| e.to_string())?;
        let api_key = created["secret"].as_str().ok_or("no secret")?.to_owned();
        let (port, proc) = serve_credits(&paths, &dir, db, name, "1", true)?;
        Ok((port, api_key, proc))
    };
    let (credits_port, api_key, _credits) = start_service(&db.display().to_string(), "credits")?;
    let pg_url = std::env::var("BENCH_PG_URL").ok().filter(|u| !u.is_empty());
    let pg = match &pg_url {
        Some(url) => Some(start_service(url, "credits-pg")?),
        None => None,
    };
    let (pg_port, pg_api_key) = pg.as_ref().map(|(port, key, _)| (Some(*port), key.clone())).unwrap_or((None, String::new()));

    // The backend Envoy.
    let backend = Backend { upstream: free_port()?, authz: free_port()?, standin: free_port()? };
    let backend_admin = free_port()?;
    let prefix = api_key.get(10..18).ok_or("short key")?;
    let backend_yaml = backend_config(&backend, backend_admin, prefix);
    let backend_cfg = dir.join("backend.yaml");
    std::fs::write(&backend_cfg, backend_yaml).map_err(|e| e.to_string())?;
    let _backend = spawn_envoy(&paths, &backend_cfg, backend_admin, "1", &dir.join("backend.log"))?;

    let setup = Setup {
        paths,
        dir,
        empty_wasm,
        seconds: env_num("BENCH_SECONDS", 10),
        warmup: env_num("BENCH_WARMUP_SECONDS", 2),
        connections: u32::try_from(env_num("BENCH_CONNECTIONS", 16)).unwrap_or(16),
        backend,
        credits_port,
        pg_port,
        pg_api_key,
        pg_url,
        pem,
        jwks,
        token,
        api_key,
    };
    let only: Option<Vec<String>> =
        std::env::var("BENCH_ONLY").ok().map(|v| v.split(',').map(|s| s.trim().to_owned()).collect());
    let mut results: Vec<(Variant, Measured)> = Vec::new();
    for v in variants(&setup, &fresh_file) {
        if only.as_ref().is_some_and(|o| !o.iter().any(|id| id == v.id)) {
            continue;
        }
        if (v.id == "D4p" || v.id == "D4pl") && setup.pg_port.is_none() {
            eprintln!("bench: {} skipped (no BENCH_PG_URL)", v.id);
            continue;
        }
        eprintln!("bench: {} — {}", v.id, v.what);
        let m = measure(&setup, &v)?;
        eprintln!("bench: {} {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs", v.id, m.rps, m.p50_us, m.p99_us);
        results.push((v, m));
    }
    let memory = if only.is_none() { vm_memory(&setup, &fresh_file)? } else { Vec::new() };
    let service = if std::env::var("BENCH_NO_SERVICE").as_deref() == Ok("1") {
        eprintln!("bench: service-alone rows skipped (BENCH_NO_SERVICE=1)");
        Vec::new()
    } else {
        service_alone(&setup, only.as_deref())?
    };
    report(&setup, &results, &memory, &service)
}

/// Memory per VM: Envoy's RSS, idle after 20 requests, with 1 and with 4
/// workers (one VM each, besides the main thread's); the difference over 3
/// is what one more worker's VM costs, with its tables and caches.
fn vm_memory(s: &Setup, fresh: &Path) -> Result<Vec<(String, u64, u64)>, String> {
    let mut out = Vec::new();
    for v in variants(s, fresh).into_iter().filter(|v| ["A", "W0", "D1"].contains(&v.id)) {
        let mut rss = Vec::new();
        for workers in [1u32, 4] {
            let (listen, admin) = (free_port()?, free_port()?);
            let cfg = s.dir.join(format!("envoy-mem-{}.yaml", v.id));
            std::fs::write(&cfg, tested_config(s, &v, listen, admin)).map_err(|e| e.to_string())?;
            let envoy = spawn_envoy_workers(&s.paths, &cfg, admin, "0", &s.dir.join(format!("envoy-mem-{}.log", v.id)), workers)?;
            for _ in 0..20 {
                let mut r = ureq::get(&format!("http://127.0.0.1:{listen}{}", v.path));
                if v.id == "D1" {
                    r = r.set("authorization", &format!("Bearer {}", s.token));
                }
                r.call().map_err(|e| format!("{}: {e}", v.id))?;
            }
            std::thread::sleep(Duration::from_secs(1));
            rss.push(rss_kib(envoy.0.id()).unwrap_or(0));
        }
        if let [one, four] = rss[..] {
            out.push((v.id.to_owned(), one, four.saturating_sub(one) / 3));
        }
    }
    Ok(out)
}

fn variants(s: &Setup, fresh: &Path) -> Vec<Variant> {
    let bearer = |t: &str| Some(format!("Bearer {t}"));
    let jwt = |cache: bool| {
        let cache = if cache { "\n          jwt_cache_config: { jwt_cache_size: 1000 }" } else { "" };
        format!(
            r#"
  - name: envoy.filters.http.jwt_authn
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
      providers:
        privy:
          issuer: privy.io
          audiences: ["{APP_ID}"]
          local_jwks:
            inline_string: '{jwks}'
          forward: false{cache}
      rules:
      - match: {{ prefix: "/" }}
        requires: {{ provider_name: privy }}"#,
            jwks = s.jwks
        )
    };
    let authz = format!(
        r#"
  - name: envoy.filters.http.ext_authz
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
      transport_api_version: V3
      failure_mode_allow: false
      http_service:
        server_uri: {{ uri: "http://127.0.0.1:{port}", cluster: authz, timeout: 1s }}
        authorization_request:
          allowed_headers:
            patterns: [{{ exact: authorization }}]"#,
        port = s.backend.authz
    );
    let dialtone = |_: u16| wasm_filter(&s.paths.wasm, Some(&plugin_config(s)));
    let leasing = wasm_filter(&s.paths.wasm, Some(&leasing_config(s)));
    let standin = s.backend.standin;
    vec![
        Variant { id: "A", what: "Envoy passthrough (router only)", filters: String::new(), path: "/free", load: Load::Fixed(None), credits_cluster_port: None },
        Variant { id: "W0", what: "an empty wasm filter (V8)", filters: wasm_filter(&s.empty_wasm, None), path: "/free", load: Load::Fixed(None), credits_cluster_port: None },
        Variant { id: "W1", what: "a wasm filter making one callout per request to the trivial stand-in, no logic", filters: wasm_filter(&s.empty_wasm, Some("callout")), path: "/free", load: Load::Fixed(None), credits_cluster_port: Some(standin) },
        Variant { id: "W2", what: "a wasm filter making dialtone's host calls of a cached free request, no logic", filters: wasm_filter(&s.empty_wasm, Some("hostcalls")), path: "/free", load: Load::Fixed(bearer(&s.token)), credits_cluster_port: None },
        Variant { id: "B1", what: "jwt_authn ES256, JWT cache on, repeated token", filters: jwt(true), path: "/free", load: Load::Fixed(bearer(&s.token)), credits_cluster_port: None },
        Variant { id: "B2", what: "jwt_authn ES256, no cache, repeated token", filters: jwt(false), path: "/free", load: Load::Fixed(bearer(&s.token)), credits_cluster_port: None },
        Variant { id: "B2f", what: "jwt_authn ES256, no cache, fresh token per request", filters: jwt(false), path: "/free", load: Load::Fresh(fresh.to_path_buf()), credits_cluster_port: None },
        Variant { id: "C", what: "ext_authz over HTTP to a trivial server", filters: authz, path: "/free", load: Load::Fixed(bearer(&s.token)), credits_cluster_port: None },
        Variant { id: "D1", what: "dialtone: repeated Privy token, free route", filters: dialtone(standin), path: "/free", load: Load::Fixed(bearer(&s.token)), credits_cluster_port: Some(standin) },
        Variant { id: "D2", what: "dialtone: fresh Privy token per request, free route", filters: dialtone(standin), path: "/free", load: Load::Fresh(fresh.to_path_buf()), credits_cluster_port: Some(standin) },
        Variant { id: "D3", what: "dialtone: API key, free scoped route (real service, cached lookups)", filters: dialtone(s.credits_port), path: "/free", load: Load::Fixed(bearer(&s.api_key)), credits_cluster_port: Some(s.credits_port) },
        Variant { id: "D4", what: "dialtone: API key, paid route, debit callout to the trivial stand-in", filters: dialtone(standin), path: "/paid", load: Load::Fixed(bearer(&s.api_key)), credits_cluster_port: Some(standin) },
        Variant { id: "D5", what: "dialtone: Privy token, paid route, debit callout to the trivial stand-in", filters: dialtone(standin), path: "/paid", load: Load::Fixed(bearer(&s.token)), credits_cluster_port: Some(standin) },
        Variant { id: "D4r", what: "dialtone: API key, paid route, real key/credits service (SQLite ledger)", filters: dialtone(s.credits_port), path: "/paid", load: Load::Fixed(bearer(&s.api_key)), credits_cluster_port: Some(s.credits_port) },
        Variant { id: "D4p", what: "dialtone: API key, paid route, real key/credits service (PostgreSQL)", filters: dialtone(s.pg_port.unwrap_or(0)), path: "/paid", load: Load::Fixed(bearer(&s.pg_api_key)), credits_cluster_port: s.pg_port },
        Variant { id: "D4l", what: "dialtone: API key, paid route, credit leases from the trivial stand-in", filters: leasing.clone(), path: "/paid", load: Load::Fixed(bearer(&s.api_key)), credits_cluster_port: Some(standin) },
        Variant { id: "D4rl", what: "dialtone: API key, paid route, credit leases from the real service (SQLite)", filters: leasing.clone(), path: "/paid", load: Load::Fixed(bearer(&s.api_key)), credits_cluster_port: Some(s.credits_port) },
        Variant { id: "D4pl", what: "dialtone: API key, paid route, credit leases from the real service (PostgreSQL)", filters: leasing, path: "/paid", load: Load::Fixed(bearer(&s.pg_api_key)), credits_cluster_port: s.pg_port },
        Variant { id: "X1", what: "dialtone: x402 payment: verify, claim, settle callouts to trivial stand-ins", filters: dialtone(standin), path: "/x402", load: Load::Payment(payment_signature()), credits_cluster_port: Some(standin) },
    ]
}

/// dialtone's policy for the bench: a free scoped route and a paid one
/// (up-front debit: one callout per request).
fn plugin_config(s: &Setup) -> String {
    // BENCH_NO_X402=1: a policy an older build (no x402 facilitator) loads,
    // to compare builds variant by variant (DIALTONE_WASM=<old .wasm>).
    if std::env::var("BENCH_NO_X402").as_deref() == Ok("1") {
        return json!({
            "credits_service": {"cluster": "dialtone_credits", "timeout_ms": 2000},
            "privy": {"app_id": APP_ID, "verification_key": s.pem},
            "routes": [
                {"name": "free", "path": {"prefix": "/free"}, "scope": SCOPE},
                {"name": "paid", "path": {"prefix": "/paid"}, "scope": SCOPE, "cost": 1, "charge": "up_front"}
            ]
        })
        .to_string();
    }
    json!({
        "credits_service": {"cluster": "dialtone_credits", "timeout_ms": 2000},
        "privy": {"app_id": APP_ID, "verification_key": s.pem},
        "x402_facilitator": {"cluster": "x402_facilitator", "timeout_ms": 2000},
        "routes": [
            {"name": "free", "path": {"prefix": "/free"}, "scope": SCOPE},
            {"name": "paid", "path": {"prefix": "/paid"}, "scope": SCOPE, "cost": 1, "charge": "up_front"},
            {"name": "x402", "path": {"prefix": "/x402"}, "payment": ["x402"], "x402": {"accepts": [x402_requirement()]}}
        ]
    })
    .to_string()
}

/// [`plugin_config`] with credit leases of [`LEASE_CREDITS`], reported every
/// 200 ms.
fn leasing_config(s: &Setup) -> String {
    let mut cfg: Value = serde_json::from_str(&plugin_config(s)).unwrap_or_default();
    cfg["credits_service"]["lease"] = json!({"credits": LEASE_CREDITS, "report_ms": 200, "ttl_seconds": 30, "min_balance_factor": 4});
    cfg.to_string()
}

/// The bench's x402 requirement (the local test chain's values).
fn x402_requirement() -> Value {
    json!({"scheme": "exact", "network": "eip155:31337", "amount": "10000",
           "asset": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
           "payTo": "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC", "maxTimeoutSeconds": 60,
           "extra": {"name": "USDC", "version": "2"}})
}

/// A PAYMENT-SIGNATURE matching [`x402_requirement`]; the stand-in
/// facilitator accepts it every time (its signature is never checked).
fn payment_signature() -> String {
    use base64::Engine;
    let payload = json!({"x402Version": 2, "accepted": x402_requirement(), "payload": signed_part()});
    base64::engine::general_purpose::STANDARD.encode(payload.to_string())
}

/// The signed part of the bench's payment (what its claim id hashes).
fn signed_part() -> Value {
    json!({"authorization": {"from": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8", "value": "10000"},
           "signature": format!("0x{}", "ab".repeat(65))})
}

/// The id the filter claims the bench's payment under (`x402::claim_id`).
fn claim_id() -> String {
    use sha2::Digest;
    sha2::Sha256::digest(signed_part().to_string().as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn wasm_filter(wasm: &Path, configuration: Option<&str>) -> String {
    let configuration = configuration
        .map(|c| {
            format!(
                "\n        configuration:\n          \"@type\": type.googleapis.com/google.protobuf.StringValue\n          value: {}",
                serde_json::to_string(c).unwrap_or_default()
            )
        })
        .unwrap_or_default();
    format!(
        r#"
  - name: envoy.filters.http.wasm
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
      config:
        name: bench
        fail_open: false{configuration}
        vm_config:
          vm_id: bench
          runtime: envoy.wasm.runtime.v8
          code: {{ local: {{ filename: "{}" }} }}
          environment_variables: {{ key_values: {{ DIAL_SERVICE_KEY: "{SERVICE_KEY}" }} }}"#,
        wasm.display()
    )
}

/// The key/credits cluster: h2c (as the bootstraps configure it), idle
/// connections closed before the service's own 60 s.
fn h2_cluster(name: &str, port: u16) -> String {
    format!(
        r#"
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: {{ idle_timeout: 30s }}
        explicit_http_config: {{ http2_protocol_options: {{ max_concurrent_streams: 1024 }} }}
    circuit_breakers:
      thresholds: [{{ max_connections: 1024, max_pending_requests: 8192, max_requests: 8192 }}]
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"#
    )
}

fn cluster(name: &str, port: u16) -> String {
    format!(
        r#"
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    circuit_breakers:
      thresholds: [{{ max_connections: 1024, max_pending_requests: 8192, max_requests: 8192 }}]
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"#
    )
}

fn tested_config(s: &Setup, v: &Variant, listen: u16, admin: u16) -> String {
    let mut clusters = cluster("upstream", s.backend.upstream);
    clusters.push_str(&cluster("authz", s.backend.authz));
    let credits_port = v.credits_cluster_port.unwrap_or(s.backend.standin);
    if std::env::var("BENCH_CREDITS_H1").as_deref() == Ok("1") {
        clusters.push_str(&cluster("dialtone_credits", credits_port));
    } else {
        clusters.push_str(&h2_cluster("dialtone_credits", credits_port));
    }
    clusters.push_str(&cluster("x402_facilitator", s.backend.standin));
    format!(
        r#"# Written by `make bench` (bench/src/main.rs): variant {id}, {what}.
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:{clusters}
"#,
        id = v.id,
        what = v.what,
        filters = indent(&v.filters, 8),
    )
}

fn indent(block: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    block.lines().map(|l| if l.is_empty() { String::new() } else { format!("\n{pad}{l}") }).collect::<Vec<_>>().join("")
}

/// The backend Envoy: the upstream (`ok`), the ext_authz server (200 for
/// everything) and the credits stand-in (a fixed lookup record and a fixed
/// debit answer for the bench account), each a `direct_response`.
fn backend_config(b: &Backend, admin: u16, key_prefix: &str) -> String {
    let lookup = json!({"account": ACCOUNT, "key_prefix": key_prefix, "kind": "api_key", "scopes": [SCOPE],
        "state": "active", "expires_at": null, "balance": 1_000_000})
    .to_string();
    let debit = json!({"account": ACCOUNT, "charged": 1, "balance": 999_999, "replayed": false}).to_string();
    // Leases: a granted lease needs an id of its own and a report's answer
    // names the lease of its path, which a direct_response cannot do; a
    // few lines of Lua in the stand-in answer both (and keep no balance: a
    // report is answered "open", a final one "closed").
    let leases = format!(
        r#"
          - name: envoy.filters.http.lua
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              default_source_code:
                inline_string: |
                  local n = 0
                  function envoy_on_request(h)
                    local path = h:headers():get(":path")
                    if path == "/v1/leases" then
                      n = n + 1
                      h:respond({{[":status"] = "200", ["content-type"] = "application/json"}},
                        '{{"granted":true,"lease_id":"lease_bench_' .. n .. '","account":"{ACCOUNT}","credits":{LEASE_CREDITS},"balance":999999,"ttl_seconds":30,"replayed":false}}')
                      return
                    end
                    local id = string.match(path, "^/v1/leases/([%w_]+)/report$")
                    if id then
                      local body = h:body()
                      local text = body and body:getBytes(0, body:length()) or ""
                      local state = string.find(text, '"final":true', 1, true) and "closed" or "open"
                      h:respond({{[":status"] = "200", ["content-type"] = "application/json"}},
                        '{{"lease_id":"' .. id .. '","account":"{ACCOUNT}","state":"' .. state .. '","recall":false,"balance":999999,"refused":[]}}')
                    end
                  end"#
    );
    let verify = json!({"isValid": true, "payer": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"}).to_string();
    let settle = json!({"success": true, "network": "eip155:31337", "payer": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
        "transaction": "0x5240caeb76e008a016ccfacb8faab06934f2937e25313e2923fb1ce9fd1d6009"})
    .to_string();
    // The stand-in reads the whole callout (its JSON body) before answering:
    // an Envoy that answers before the request is complete closes the
    // connection, and every callout would pay a new connection.
    let buffer = "\n          - name: envoy.filters.http.buffer\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer\n              max_request_bytes: 65536";
    let listener = |name: &str, port: u16, routes: String, extra_filters: &str| {
        format!(
            r#"
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:{routes}
          http_filters:{extra_filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#
        )
    };
    let answer = |prefix: &str, body: &str| {
        format!(
            "\n              - match: {{ prefix: \"{prefix}\" }}\n                direct_response: {{ status: 200, body: {{ inline_string: {} }} }}",
            serde_json::to_string(body).unwrap_or_default()
        )
    };
    // The Lua filter runs on the lease routes only: the other stand-in
    // answers cost what they did before leases existed.
    let no_lua = |route: String| {
        format!(
            "{route}\n                typed_per_filter_config:\n                  envoy.filters.http.lua:\n                    \"@type\": type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute\n                    disabled: true"
        )
    };
    let mut listeners = listener("upstream", b.upstream, answer("/", "ok"), "");
    listeners.push_str(&listener("authz", b.authz, answer("/", ""), buffer));
    listeners.push_str(&listener(
        "standin",
        b.standin,
        format!(
            "{}{}{}{}{}{}",
            no_lua(answer("/v1/keys/lookup", &lookup)),
            no_lua(answer("/v1/debit", &debit)),
            no_lua(answer("/verify", &verify)),
            no_lua(answer("/settle", &settle)),
            no_lua(answer("/v1/x402/claims", &json!({"claim": claim_id(), "claimed": true}).to_string())),
            // Answered by the Lua filter before the router.
            "\n              - match: { prefix: \"/v1/leases\" }\n                direct_response: { status: 404 }"
        ),
        &format!("{buffer}{leases}"),
    ));
    format!(
        "# Written by `make bench`: the backend (upstream, ext_authz server, credits stand-in).\nadmin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}\nstatic_resources:\n  listeners:{listeners}\n"
    )
}

/// `dialtone-credits --db DB ARGS…`, its stdout.
fn credits_cli(paths: &Paths, db: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(&paths.credits_bin).arg("--db").arg(db).args(args).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("dialtone-credits {args:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `dialtone-credits serve` on DB, pinned to `cpu`, accepting SERVICE_KEY,
/// ready; with `upstream`, also the demo upstream API. Its log is
/// target/bench/NAME.log.
fn serve_credits(paths: &Paths, dir: &Path, db: &str, name: &str, cpu: &str, upstream: bool) -> Result<(u16, Proc), String> {
    let port = free_port()?;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpu])
        .arg(&paths.credits_bin)
        .env("DIAL_SERVICE_KEY", SERVICE_KEY)
        .env("RUST_LOG", "warn")
        .arg("--db")
        .arg(db)
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")]);
    if upstream {
        cmd.args(["--upstream-listen", &format!("127.0.0.1:{}", free_port()?)]);
    }
    let proc = spawn("dialtone-credits", &mut cmd, &dir.join(format!("{name}.log")))?;
    wait_http(&format!("http://127.0.0.1:{port}/readyz"))?;
    Ok((port, proc))
}

/// The service-alone section: no Envoy, loadgen against the service.
struct ServiceRow {
    id: &'static str,
    what: &'static str,
    postgres: bool,
    instances: usize,
    mode: &'static str,
    accounts: usize,
}

#[derive(Debug)]
struct ServiceMeasured {
    clients: usize,
    paid_per_s: f64,
    requests_per_s: f64,
    paid: u64,
    /// The hold call (the debit call in debit mode).
    p50_us: f64,
    p99_us: f64,
    /// The capture call, in hold + capture mode.
    capture_p50_us: Option<f64>,
    capture_p99_us: Option<f64>,
    /// Non-2xx answers and I/O errors, by call and status, and their sum.
    non_2xx: Value,
    errors: u64,
    /// CPU 0 (the service) and CPU 1 (loadgen); PostgreSQL runs on either.
    cpu_busy: [f64; 2],
}

/// A measured row, or why it was not measured.
type ServiceResult = (ServiceRow, Result<ServiceMeasured, &'static str>);

/// Accounts `svc-0`…`svc-63`, made before a backend's first instance starts.
const SERVICE_ACCOUNT_PREFIX: &str = "svc-";
const SERVICE_ACCOUNTS: usize = 64;
/// Each account's credits: far beyond any run (1 credit per paid request;
/// the one-hot rows spend everything from `svc-0`, the three of them on
/// PostgreSQL together, at well under 10^5/s).
const SERVICE_CREDITS: &str = "1000000000";

fn service_rows() -> Vec<ServiceRow> {
    let row = |id, what, postgres, instances, mode, accounts| ServiceRow { id, what, postgres, instances, mode, accounts };
    vec![
        row("S1", "service alone, SQLite, hold + capture, 64 accounts", false, 1, "hold-capture", SERVICE_ACCOUNTS),
        row("S1h", "service alone, SQLite, hold + capture, one hot account", false, 1, "hold-capture", 1),
        row("S1d", "service alone, SQLite, debit, 64 accounts", false, 1, "debit", SERVICE_ACCOUNTS),
        row("S2", "service alone, PostgreSQL, hold + capture, 64 accounts", true, 1, "hold-capture", SERVICE_ACCOUNTS),
        row("S2h", "service alone, PostgreSQL, hold + capture, one hot account", true, 1, "hold-capture", 1),
        row("S2d", "service alone, PostgreSQL, debit, 64 accounts", true, 1, "debit", SERVICE_ACCOUNTS),
        row("S3", "2 instances on one PostgreSQL, hold + capture, 64 accounts", true, 2, "hold-capture", SERVICE_ACCOUNTS),
        row("S3h", "2 instances on one PostgreSQL, hold + capture, one hot account", true, 2, "hold-capture", 1),
    ]
}

/// The instances serving one database, started as rows need them.
struct Instances {
    db: String,
    label: &'static str,
    ports: Vec<u16>,
    procs: Vec<Proc>,
}

impl Instances {
    fn ensure(&mut self, s: &Setup, n: usize) -> Result<&[u16], String> {
        if self.ports.is_empty() {
            let started = Instant::now();
            for i in 0..SERVICE_ACCOUNTS {
                let account = format!("{SERVICE_ACCOUNT_PREFIX}{i}");
                credits_cli(&s.paths, &self.db, &["account", "create", &account, "--credits", SERVICE_CREDITS])?;
            }
            eprintln!("bench: {SERVICE_ACCOUNTS} accounts on {} in {:?}", self.label, started.elapsed());
        }
        while self.ports.len() < n {
            // Every instance on CPU 0: two instances share the CPU one had,
            // so S3 against S2 is the cost of the arrangement, not more CPU.
            let name = format!("service-{}-{}", self.label, self.ports.len() + 1);
            let (port, proc) = serve_credits(&s.paths, &s.dir, &self.db, &name, "0", false)?;
            self.ports.push(port);
            self.procs.push(proc);
        }
        Ok(self.ports.get(..n).unwrap_or(&[]))
    }
}

fn service_alone(s: &Setup, only: Option<&[String]>) -> Result<Vec<ServiceResult>, String> {
    let rows: Vec<ServiceRow> =
        service_rows().into_iter().filter(|r| only.is_none_or(|o| o.iter().any(|id| id == r.id))).collect();
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let loadgen = std::env::var_os("BENCH_LOADGEN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| s.paths.credits_bin.with_file_name("examples").join("loadgen"));
    if !loadgen.exists() {
        return Err(format!("{} missing: run `make bench-build` (it builds it)", loadgen.display()));
    }
    let clients = usize::try_from(std::env::var("BENCH_SERVICE_CLIENTS").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(64))
        .unwrap_or(64)
        .max(1);
    let db = s.dir.join("service.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let mut sqlite = Instances { db: db.display().to_string(), label: "sqlite", ports: Vec::new(), procs: Vec::new() };
    let mut pg = s.pg_url.as_ref().map(|url| Instances { db: url.clone(), label: "pg", ports: Vec::new(), procs: Vec::new() });
    let mut out = Vec::new();
    for row in rows {
        let instances = if row.postgres { pg.as_mut() } else { Some(&mut sqlite) };
        let Some(instances) = instances else {
            eprintln!("bench: {} not measured (no BENCH_PG_URL)", row.id);
            out.push((row, Err("no BENCH_PG_URL")));
            continue;
        };
        let ports = instances.ensure(s, row.instances)?.to_vec();
        eprintln!("bench: {} — {}", row.id, row.what);
        let m = measure_service(s, &loadgen, &row, &ports, clients)?;
        eprintln!(
            "bench: {} {:.0} paid/s, {} p50 {:.0} µs, p99 {:.0} µs, {} errors",
            row.id,
            m.paid_per_s,
            hold_call(&row),
            m.p50_us,
            m.p99_us,
            m.errors
        );
        out.push((row, Ok(m)));
    }
    Ok(out)
}

/// The call whose latency a row reports.
fn hold_call(row: &ServiceRow) -> &'static str {
    if row.mode == "debit" {
        "debit"
    } else {
        "hold"
    }
}

fn measure_service(s: &Setup, loadgen: &Path, row: &ServiceRow, ports: &[u16], clients: usize) -> Result<ServiceMeasured, String> {
    let run = |seconds: u64| -> Result<Value, String> {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "1"]).arg(loadgen).env("DIAL_SERVICE_KEY", SERVICE_KEY);
        for port in ports {
            cmd.args(["--url", &format!("http://127.0.0.1:{port}")]);
        }
        cmd.args(["--clients", &clients.to_string(), "--seconds", &seconds.to_string(), "--mode", row.mode])
            .args(["--accounts", &row.accounts.to_string(), "--account-prefix", SERVICE_ACCOUNT_PREFIX, "--json"]);
        let out = cmd.output().map_err(|e| format!("{}: loadgen: {e}", row.id))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!("{}: loadgen failed: {stdout}{}", row.id, String::from_utf8_lossy(&out.stderr)));
        }
        serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .map_err(|e| format!("{}: cannot read loadgen's output ({e}):\n{stdout}", row.id))
    };
    let errors = |v: &Value| v["non_2xx"].as_object().map_or(0, |m| m.values().filter_map(Value::as_u64).sum::<u64>());
    if s.warmup > 0 {
        let w = run(s.warmup)?;
        if errors(&w) > 0 {
            eprintln!("bench: {} warm-up: non-2xx answers: {}", row.id, w["non_2xx"]);
        }
    }
    let before = cpu_times();
    let v = run(s.seconds)?;
    let after = cpu_times();
    let us = |call: &str, p: &str| v["latency"][call][p].as_f64().map(|ms| ms * 1000.0);
    let call = hold_call(row);
    let capture = row.mode == "hold-capture";
    Ok(ServiceMeasured {
        clients,
        paid_per_s: v["paid_per_s"].as_f64().unwrap_or(0.0),
        requests_per_s: v["requests_per_s"].as_f64().unwrap_or(0.0),
        paid: v["paid"].as_u64().unwrap_or(0),
        p50_us: us(call, "p50_ms").unwrap_or(0.0),
        p99_us: us(call, "p99_ms").unwrap_or(0.0),
        capture_p50_us: us("capture", "p50_ms").filter(|_| capture),
        capture_p99_us: us("capture", "p99_ms").filter(|_| capture),
        errors: errors(&v),
        non_2xx: v["non_2xx"].clone(),
        cpu_busy: cpu_busy(&before, &after),
    })
}

/// The service-alone table; its rows for results.json.
fn report_service(s: &Setup, service: &[ServiceResult]) -> Vec<Value> {
    let mut rows = Vec::new();
    if service.is_empty() {
        return rows;
    }
    let clients = service.iter().find_map(|(_, m)| m.as_ref().ok().map(|m| m.clients)).unwrap_or(64);
    println!(
        "\nservice alone: the instance(s) on CPU 0, loadgen ({clients} clients, keep-alive HTTP/1.1) on CPU 1, PostgreSQL unpinned; {} s each",
        s.seconds
    );
    println!(
        "{:<4} {:>9} {:>9} {:>11} {:>11} {:>7} {:>6} {:>6}  what (latency: of the hold call; of the debit in S*d)",
        "id", "paid/s", "req/s", "p50 µs", "p99 µs", "errors", "cpu0", "cpu1"
    );
    for (row, m) in service {
        let base = json!({"id": row.id, "what": row.what, "backend": if row.postgres { "postgres" } else { "sqlite" },
            "instances": row.instances, "mode": row.mode, "accounts": row.accounts, "latency_of": hold_call(row)});
        let mut doc = base;
        match m {
            Ok(m) => {
                println!(
                    "{:<4} {:>9.0} {:>9.0} {:>11.0} {:>11.0} {:>7} {:>5.0}% {:>5.0}%  {}",
                    row.id,
                    m.paid_per_s,
                    m.requests_per_s,
                    m.p50_us,
                    m.p99_us,
                    m.errors,
                    m.cpu_busy[0] * 100.0,
                    m.cpu_busy[1] * 100.0,
                    row.what
                );
                if m.errors > 0 {
                    println!("     non-2xx: {}", m.non_2xx);
                }
                if let Some(obj) = doc.as_object_mut() {
                    for (k, v) in [
                        ("measured", json!(true)),
                        ("clients", json!(m.clients)),
                        ("paid_per_second", json!(m.paid_per_s)),
                        ("requests_per_second", json!(m.requests_per_s)),
                        ("paid", json!(m.paid)),
                        ("p50_us", json!(m.p50_us)),
                        ("p99_us", json!(m.p99_us)),
                        ("capture_p50_us", json!(m.capture_p50_us)),
                        ("capture_p99_us", json!(m.capture_p99_us)),
                        ("errors", json!(m.errors)),
                        ("non_2xx", m.non_2xx.clone()),
                        ("cpu0_busy", json!(m.cpu_busy[0])),
                        ("cpu1_busy", json!(m.cpu_busy[1])),
                    ] {
                        obj.insert(k.to_owned(), v);
                    }
                }
            }
            Err(why) => {
                println!("{:<4} {:>9}  not measured ({why})  {}", row.id, "-", row.what);
                if let Some(obj) = doc.as_object_mut() {
                    obj.insert("measured".to_owned(), json!(false));
                    obj.insert("not_measured_because".to_owned(), json!(why));
                }
            }
        }
        rows.push(doc);
    }
    rows
}

fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Result<Proc, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().map_err(|e| format!("starting {name}: {e}"))?;
    Ok(Proc(child))
}

fn spawn_envoy(paths: &Paths, cfg: &Path, admin: u16, cpu: &str, log: &Path) -> Result<Proc, String> {
    spawn_envoy_workers(paths, cfg, admin, cpu, log, 1)
}

fn spawn_envoy_workers(paths: &Paths, cfg: &Path, admin: u16, cpu: &str, log: &Path, workers: u32) -> Result<Proc, String> {
    let p = spawn(
        "envoy",
        Command::new("taskset")
            .args(["-c", cpu])
            .arg(&paths.envoy)
            .arg("-c")
            .arg(cfg)
            .args(["--concurrency", &workers.to_string(), "--log-level", "warn", "--disable-hot-restart"])
            .args(["--base-id", &admin.to_string()]),
        log,
    )?;
    wait_http(&format!("http://127.0.0.1:{admin}/ready")).map_err(|e| {
        let mut s = String::new();
        let _ = std::fs::File::open(log).and_then(|mut f| f.read_to_string(&mut s));
        format!("{e}\n{s}")
    })?;
    Ok(p)
}

fn wait_http(url: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if ureq::get(url).timeout(Duration::from_secs(1)).call().is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{url} not ready after 30 s"))
}

fn measure(s: &Setup, v: &Variant) -> Result<Measured, String> {
    let (listen, admin) = (free_port()?, free_port()?);
    let cfg = s.dir.join(format!("envoy-{}.yaml", v.id));
    std::fs::write(&cfg, tested_config(s, v, listen, admin)).map_err(|e| e.to_string())?;
    let envoy = spawn_envoy(&s.paths, &cfg, admin, "0", &s.dir.join(format!("envoy-{}.log", v.id)))?;
    let url = format!("http://127.0.0.1:{listen}{}", v.path);
    // A request that must pass before anything is timed: a misconfigured
    // variant fails here, not as a fast stream of errors.
    let mut probe = ureq::get(&url);
    if let Load::Fixed(Some(auth)) = &v.load {
        probe = probe.set("authorization", auth);
    }
    if let Load::Fresh(_) = &v.load {
        probe = probe.set("authorization", &format!("Bearer {}", s.token));
    }
    if let Load::Payment(p) = &v.load {
        probe = probe.set("payment-signature", p);
    }
    probe.call().map_err(|e| format!("{}: the probe request failed: {e}", v.id))?;
    let script = s.dir.join(format!("wrk-{}.lua", v.id));
    std::fs::write(&script, wrk_script(&v.load)).map_err(|e| e.to_string())?;
    let _ = wrk(s, &url, &script, s.warmup)?;
    // BENCH_PERF=1: a CPU profile of the Envoy under test during the timed
    // run (perf record, software clock), in target/bench/perf-<id>.data.
    let perf = match std::env::var("BENCH_PERF").as_deref() {
        Ok("1") => Command::new("perf")
            .args(["record", "-e", "cpu-clock", "-F", "4000", "-g", "-o"])
            .arg(s.dir.join(format!("perf-{}.data", v.id)))
            .args(["-p", &envoy.0.id().to_string(), "--", "sleep", &s.seconds.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok(),
        _ => None,
    };
    let calls_before = v.credits_cluster_port.and_then(|_| service_calls(admin));
    let before = cpu_times();
    let out = wrk(s, &url, &script, s.seconds)?;
    let after = cpu_times();
    let calls_after = v.credits_cluster_port.and_then(|_| service_calls(admin));
    if let Some(mut p) = perf {
        let _ = p.wait();
    }
    let mut m = parse_wrk(&out).ok_or_else(|| format!("{}: cannot read wrk's output:\n{out}", v.id))?;
    m.cpu_busy = cpu_busy(&before, &after);
    m.rss_kib = rss_kib(envoy.0.id()).unwrap_or(0);
    m.service_calls = calls_before.zip(calls_after).map(|(b, a)| a.saturating_sub(b));
    if m.non_2xx > 0 || m.errors > 0 {
        return Err(format!("{}: {} non-2xx answers and {} socket errors: the numbers would lie\n{out}", v.id, m.non_2xx, m.errors));
    }
    std::fs::write(s.dir.join(format!("stats-{}.txt", v.id)), stats(admin)).map_err(|e| e.to_string())?;
    drop(envoy);
    Ok(m)
}

/// Requests the Envoy under test has sent to the key/credits cluster.
fn service_calls(admin: u16) -> Option<u64> {
    let text = ureq::get(&format!("http://127.0.0.1:{admin}/stats?filter=dialtone_credits.upstream_rq_total"))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    text.lines().find_map(|l| l.strip_prefix("cluster.dialtone_credits.upstream_rq_total:")).and_then(|v| v.trim().parse().ok())
}

fn stats(admin: u16) -> String {
    ureq::get(&format!("http://127.0.0.1:{admin}/stats?filter=dialtone|jwt_authn|ext_authz|authz|upstream_cx_total|upstream_rq_total"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default()
}

fn wrk_script(load: &Load) -> String {
    let done = "\nfunction done(summary, latency, requests)\n  io.write(string.format(\"DIALTONE p50=%d p99=%d non2xx=%d\\n\", latency:percentile(50), latency:percentile(99), summary.errors.status))\nend\n";
    match load {
        Load::Fixed(None) => done.to_owned(),
        Load::Fixed(Some(auth)) => format!("wrk.headers[\"Authorization\"] = \"{auth}\"\n{done}"),
        Load::Payment(p) => format!("wrk.headers[\"PAYMENT-SIGNATURE\"] = \"{p}\"\n{done}"),
        Load::Fresh(file) => format!(
            r#"local tokens = {{}}
for line in io.lines("{}") do tokens[#tokens + 1] = "Bearer " .. line end
local i = 0
request = function()
  i = i + 1
  if i > #tokens then i = 1 end
  return wrk.format(nil, nil, {{ ["Authorization"] = tokens[i] }})
end
{done}"#,
            file.display()
        ),
    }
}

fn wrk(s: &Setup, url: &str, script: &Path, seconds: u64) -> Result<String, String> {
    let out = Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1"])
        .arg(format!("-c{}", s.connections))
        .arg(format!("-d{seconds}s"))
        .arg("-s")
        .arg(script)
        .arg(url)
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(text)
}

fn parse_wrk(out: &str) -> Option<Measured> {
    let rps = out.lines().find_map(|l| l.strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok())?;
    let requests = out.lines().find_map(|l| l.split_once(" requests in ").and_then(|(n, _)| n.trim().parse().ok()))?;
    let line = out.lines().find(|l| l.starts_with("DIALTONE "))?;
    let field = |name: &str| -> Option<f64> {
        line.split_whitespace().find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')).and_then(|v| v.parse().ok()))
    };
    let errors = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|l| l.split(',').filter_map(|p| p.split_whitespace().last().and_then(|n| n.parse::<u64>().ok())).sum())
        .unwrap_or(0);
    Some(Measured {
        rps,
        p50_us: field("p50")?,
        p99_us: field("p99")?,
        requests,
        non_2xx: field("non2xx")? as u64,
        errors,
        rss_kib: 0,
        cpu_busy: [0.0; 2],
        service_calls: None,
    })
}

/// The busy share of CPUs 0 and 1 between two [`cpu_times`].
fn cpu_busy(before: &[(u64, u64)], after: &[(u64, u64)]) -> [f64; 2] {
    let mut out = [0.0; 2];
    for (cpu, slot) in out.iter_mut().enumerate() {
        if let (Some(b), Some(a)) = (before.get(cpu), after.get(cpu)) {
            let (busy, total) = (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1));
            *slot = if total == 0 { 0.0 } else { busy as f64 / total as f64 };
        }
    }
    out
}

/// (busy, total) jiffies per CPU, from /proc/stat.
fn cpu_times() -> Vec<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            let total: u64 = v.iter().sum();
            // idle + iowait
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total.saturating_sub(idle), total)
        })
        .collect()
}

/// Calls to the key/credits service per 10,000 requests of the timed run.
fn per_10k(m: &Measured) -> Option<f64> {
    m.service_calls.filter(|_| m.requests > 0).map(|c| c as f64 * 10_000.0 / m.requests as f64)
}

fn rss_kib(pid: u32) -> Option<u64> {
    // taskset execs Envoy in place, so the pid is Envoy's.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|n| n.parse().ok())
}

fn report(s: &Setup, results: &[(Variant, Measured)], memory: &[(String, u64, u64)], service: &[ServiceResult]) -> Result<(), String> {
    let rps = |id: &str| results.iter().find(|(v, _)| v.id == id).map(|(_, m)| m.rps);
    let (a, w0) = (rps("A"), rps("W0"));
    let ratio = |x: f64, base: Option<f64>| base.filter(|b| *b > 0.0).map(|b| x / b);
    let wasm_bytes = std::fs::metadata(&s.paths.wasm).map(|m| m.len()).unwrap_or(0);
    let rss_w0 = results.iter().find(|(v, _)| v.id == "W0").map(|(_, m)| m.rss_kib);
    // With BENCH_ONLY naming service rows only, no Envoy table.
    let envoy = !results.is_empty();
    println!();
    if envoy {
        println!(
            "make bench: 1 Envoy worker on CPU 0; wrk -t1 -c{} -d{}s and the backend on CPU 1; dialtone.wasm {} bytes",
            s.connections, s.seconds, wasm_bytes
        );
        println!(
            "{:<4} {:>9} {:>7} {:>7} {:>8} {:>8} {:>9} {:>6} {:>6}  what",
            "id", "req/s", "×A", "×W0", "p50 µs", "p99 µs", "RSS MiB", "cpu0", "cpu1"
        );
    }
    let mut rows = Vec::new();
    for (v, m) in results {
        let (ra, rw) = (ratio(m.rps, a), ratio(m.rps, w0));
        let f = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{r:.2}"));
        println!(
            "{:<4} {:>9.0} {:>7} {:>7} {:>8.0} {:>8.0} {:>9.1} {:>5.0}% {:>5.0}%  {}",
            v.id,
            m.rps,
            f(ra),
            f(rw),
            m.p50_us,
            m.p99_us,
            m.rss_kib as f64 / 1024.0,
            m.cpu_busy[0] * 100.0,
            m.cpu_busy[1] * 100.0,
            v.what
        );
        rows.push(json!({"id": v.id, "what": v.what, "requests_per_second": m.rps, "ratio_to_A": ra, "ratio_to_W0": rw,
            "p50_us": m.p50_us, "p99_us": m.p99_us, "requests": m.requests, "envoy_rss_kib": m.rss_kib,
            "cpu0_busy": m.cpu_busy[0], "cpu1_busy": m.cpu_busy[1],
            "envoy_rss_kib_over_W0": rss_w0.map(|w| m.rss_kib as i64 - w as i64),
            "service_calls": m.service_calls, "service_calls_per_10k_requests": per_10k(m)}));
    }
    // The issue's targets, as ratios within this run.
    let target = |name: &str, id: &str, base_id: &str, min: f64| {
        let (x, b) = (rps(id), rps(base_id));
        let r = match (x, b) {
            (Some(x), Some(b)) if b > 0.0 => Some(x / b),
            _ => None,
        };
        let met = r.map(|r| r >= min);
        if envoy {
            println!(
                "target {name:<44} {id} / {base_id} = {} (≥ {min}) {}",
                r.map_or("-".into(), |r| format!("{r:.2}")),
                match met {
                    Some(true) => "met",
                    Some(false) => "NOT met",
                    None => "not measured",
                }
            );
        }
        json!({"target": name, "variant": id, "baseline": base_id, "ratio": r, "minimum": min, "met": met})
    };
    if envoy {
        println!();
    }
    // What leases save the key/credits service.
    let with_calls: Vec<&(Variant, Measured)> = results.iter().filter(|(v, m)| v.path == "/paid" && m.service_calls.is_some()).collect();
    if envoy && !with_calls.is_empty() {
        println!("calls to the key/credits service per 10,000 paid requests (timed run):");
        for (v, m) in with_calls {
            println!("  {:<4} {:>9.1}  ({} calls, {} requests)", v.id, per_10k(m).unwrap_or(0.0), m.service_calls.unwrap_or(0), m.requests);
        }
        println!();
    }
    let targets = vec![
        target("repeated Privy token, free route", "D1", "W0", 0.9),
        target("API key, free scoped route", "D3", "W0", 0.9),
        target("API key, paid route", "D4", "C", 1.0),
        target("real service on SQLite vs the stand-in, paid route", "D4r", "D4", 0.8),
        target("real service on PostgreSQL vs the stand-in, paid route", "D4p", "D4", 0.6),
        target("Privy token, paid route", "D5", "C", 1.0),
        target("API key, paid route, credit leases", "D4l", "C", 1.2),
        target("paid with leases vs free (API key)", "D4l", "D3", 0.85),
        target("real service (SQLite) with leases vs the stand-in", "D4rl", "D4l", 0.8),
        target("(for reference) real service (PostgreSQL) with leases", "D4pl", "D4l", 0.0),
        target("(for reference) the floor of one wasm callout", "W1", "C", 1.0),
        target("(for reference) the host-call floor of a free route", "W2", "W0", 0.9),
        target("fresh token every request", "D2", "B2", 0.5),
        target("(for reference) x402 payment, verify + claim + settle callouts", "X1", "C", 0.0),
    ];
    if !memory.is_empty() {
        println!("\nmemory (Envoy RSS, idle): with 1 worker, and per additional worker (its VM)");
        for (id, one, per_worker) in memory {
            println!("  {id:<3} {:>7.1} MiB with 1 worker, +{:>6.1} MiB per worker", *one as f64 / 1024.0, *per_worker as f64 / 1024.0);
        }
    }
    let size_ok = wasm_bytes <= 512 * 1024;
    println!("target {:<44} {wasm_bytes} bytes (≤ 524288) {}", ".wasm size", if size_ok { "met" } else { "NOT met" });
    let service_rows = report_service(s, service);
    let out = std::env::var_os("BENCH_RESULTS").map_or_else(|| s.dir.join("results.json"), PathBuf::from);
    let doc = json!({
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "setup": {"envoy_workers": 1, "envoy_cpu": 0, "load_cpu": 1, "wrk_threads": 1, "connections": s.connections,
                  "seconds": s.seconds, "warmup_seconds": s.warmup,
                  "service_cpu": 0, "service_loadgen_cpu": 1},
        "wasm_bytes": wasm_bytes,
        "variants": rows,
        "targets": targets,
        "memory": memory.iter().map(|(id, one, per)| json!({"id": id, "rss_kib_one_worker": one, "rss_kib_per_additional_worker": per})).collect::<Vec<_>>(),
        "service": service_rows,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap_or_default()).map_err(|e| e.to_string())?;
    println!("\nwritten: {}", out.display());
    // As for the Envoy variants: a row that saw a non-2xx answer measured
    // something else than it says.
    let failed: Vec<String> = service
        .iter()
        .filter_map(|(row, m)| m.as_ref().ok().filter(|m| m.errors > 0).map(|m| format!("{} ({} non-2xx: {})", row.id, m.errors, m.non_2xx)))
        .collect();
    if !failed.is_empty() {
        return Err(format!("service rows with non-2xx answers, the numbers would lie: {}", failed.join(", ")));
    }
    Ok(())
}
