//! `dialtone-devstack run`: the local stack behind `make run`.
//! `dialtone-devstack mint-token`: a Privy-shaped token signed by the dev key.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use dialtone_devstack::{self as devstack, tokens, Options, Paths, Ports, Stack, X402Options};

const USAGE: &str = "usage:
  dialtone-devstack run                 start Envoy + filter + key/credits service + demo API (foreground)
  dialtone-devstack mint-token [--sub DID] [--ttl SECONDS]
                                        print a Privy-shaped access token signed by the dev key

environment: DIALTONE_PORT (10000), DIALTONE_ADMIN_PORT (9901), DIALTONE_CREDITS_PORT (8081),
             DIALTONE_UPSTREAM_PORT (8082), DIALTONE_FACILITATOR_PORT (4022), DIALTONE_ANVIL_PORT (8545),
             DIALTONE_CONCURRENCY (2)
             DIALTONE_X402=0: no local x402 stack (anvil + TestUSDC + facilitator; needs node and npm)
             DIALTONE_ROOT: the dialtone checkout (default: the one holding the current directory);
             ENVOY_BIN, DIALTONE_WASM, DIALTONE_CREDITS_BIN (default: .venv/bin/envoy,
             target/wasm32-wasip1/wasm-release/dialtone.wasm, target/release/dialtone-credits in it)";

fn env_u16(var: &str, default: u16) -> Result<u16, String> {
    match std::env::var(var) {
        Ok(v) => v.parse().map_err(|_| format!("{var}={v:?} is not a port number")),
        Err(_) => Ok(default),
    }
}

fn run_dir(paths: &Paths) -> PathBuf {
    paths.root.join("target/run")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(),
        Some("mint-token") => mint_token(&args[1..]),
        _ => Err(USAGE.to_owned()),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn mint_token(args: &[String]) -> Result<(), String> {
    let paths = Paths::discover()?;
    let (key, cfg) = devstack::demo_setup(&paths.root, &run_dir(&paths))?;
    let (mut sub, mut ttl) = (devstack::DEMO_USER.to_owned(), 3600i64);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--sub" => sub = value.clone(),
            "--ttl" => ttl = value.parse().map_err(|_| format!("--ttl {value:?} is not a number"))?,
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    println!("{}", tokens::privy_token(&key, &devstack::app_id(&cfg), &sub, tokens::now_unix(), ttl));
    Ok(())
}

fn run() -> Result<(), String> {
    let paths = Paths::discover()?;
    let dir = run_dir(&paths);
    let (key, plugin_config) = devstack::demo_setup(&paths.root, &dir)?;
    // A fresh database each run, so the demo credentials always match it.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.join(format!("dialtone.db{suffix}")));
    }
    let _ = std::fs::remove_file(dir.join("envoy.log"));
    let _ = std::fs::remove_file(dir.join("credits.log"));
    let admin_key = format!("dial_admin_{}", devstack::random_hex(24)?);
    let concurrency = std::env::var("DIALTONE_CONCURRENCY").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let x402 = match std::env::var("DIALTONE_X402").as_deref() {
        Ok("0") => None,
        _ => Some(X402Options { anvil_port: env_u16("DIALTONE_ANVIL_PORT", 8545)? }),
    };
    let opts = Options {
        ports: Ports {
            listen: env_u16("DIALTONE_PORT", 10000)?,
            admin: env_u16("DIALTONE_ADMIN_PORT", 9901)?,
            credits: env_u16("DIALTONE_CREDITS_PORT", 8081)?,
            upstream: env_u16("DIALTONE_UPSTREAM_PORT", 8082)?,
            facilitator: env_u16("DIALTONE_FACILITATOR_PORT", 4022)?,
            self_service: env_u16("DIALTONE_SELF_SERVICE_PORT", 8083)?,
        },
        run_dir: dir.clone(),
        plugin_config: plugin_config.clone(),
        admin_key: Some(admin_key.clone()),
        concurrency,
        database: None,
        extra_credits: Vec::new(),
        credits_http1: false,
        x402,
        dev_sign_in_key: Some(dir.join("dev-signing-key.pem")),
    };
    // Stop on Ctrl-C / SIGTERM; the Stack's Drop stops every child.
    let (tx, rx) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .map_err(|e| format!("cannot install the signal handler: {e}"))?;

    let stack = Stack::start(paths.clone(), opts)?;
    let creds = devstack::seed_demo(&stack)?;
    let app_id = devstack::app_id(&plugin_config);
    let privy_token = tokens::privy_token(&key, &app_id, devstack::DEMO_USER, tokens::now_unix(), 3600);
    let url = stack.url();

    let mut env = String::new();
    let _ = writeln!(env, "# dialtone demo credentials, written by `make run` (valid while it runs)");
    for (k, v) in [
        ("DIALTONE_URL", url.as_str()),
        ("DEMO_PRIVY_TOKEN", privy_token.as_str()),
        ("DEMO_PRIVY_APP_ID", app_id.as_str()),
        ("DEMO_SIGNING_KEY", &dir.join("dev-signing-key.pem").display().to_string()),
        ("DEMO_API_KEY", creds.api_key.as_str()),
        ("DEMO_NOSCOPE_API_KEY", creds.noscope_api_key.as_str()),
        ("DEMO_BROKE_API_KEY", creds.broke_api_key.as_str()),
        ("DEMO_ADMIN_KEY", admin_key.as_str()),
    ] {
        let _ = writeln!(env, "export {k}='{v}'");
    }
    if let Some(x) = stack.x402() {
        let _ = writeln!(env, "# the local x402 stack (anvil's public dev keys: never use them elsewhere)");
        for (k, v) in &x.vars {
            let _ = writeln!(env, "export {k}='{v}'");
        }
        let _ = writeln!(env, "export X402_STACK='{}'", x.dir.display());
    }
    let env_path = dir.join("demo.env");
    std::fs::write(&env_path, env).map_err(|e| format!("{}: {e}", env_path.display()))?;

    println!(
        r#"
dialtone is up: Envoy {url} (admin {admin}), key/credits service {credits}
dashboard: {url}/dashboard (dev sign-in: {url}/dev/sign-in, any did:privy:… id; {user} has the demo credits)
logs: {dir}/envoy.log, {dir}/credits.log   database: {db}
demo credentials: {env}

Try (in another shell):
  source {env}
  # Privy session (~1 h): charged, no scope check
  curl -sS -X POST "$DIALTONE_URL/api/v1/sms/send" -H "Authorization: Bearer $DEMO_PRIVY_TOKEN" \
       -H 'content-type: application/json' -d '{{"to":"+18148835337","message":"Hello via credits"}}'
  # API key with sms:send: charged 1 credit
  curl -sS -X POST "$DIALTONE_URL/api/v1/sms/send" -H "Authorization: Bearer $DEMO_API_KEY" \
       -H 'content-type: application/json' -d '{{"to":"+18148835337","message":"hi"}}'
  curl -sS "$DIALTONE_URL/api/v1/account" -H "Authorization: Bearer $DEMO_API_KEY"
  # 403 insufficient_scope / 402 insufficient_credits / 402 payment_required (x402)
  curl -sS -X POST "$DIALTONE_URL/api/v1/sms/send" -H "Authorization: Bearer $DEMO_NOSCOPE_API_KEY" -d '{{}}'
  curl -sS -X POST "$DIALTONE_URL/api/v1/sms/send" -H "Authorization: Bearer $DEMO_BROKE_API_KEY" -d '{{}}'
  curl -sS -X POST "$DIALTONE_URL/api/v1/sms/send" -d '{{}}'
  # operator: mint, list, revoke keys; top up
  {bin} --db {db} key list {user}
{x402}
Ctrl-C stops everything."#,
        admin = stack.admin_url(),
        credits = stack.credits_url(),
        dir = dir.display(),
        db = stack.db.display(),
        env = env_path.display(),
        bin = paths.credits_bin.display(),
        user = devstack::DEMO_USER,
        x402 = x402_help(&stack, &paths),
    );

    let mut stack = stack;
    loop {
        if rx.recv_timeout(Duration::from_millis(500)).is_ok() {
            println!("\nstopping…");
            break;
        }
        if let Some(dead) = stack.exited().or_else(|| stack.x402_exited()) {
            return Err(format!("{dead} stopped unexpectedly:\n{}", stack.log_tail(dead)));
        }
    }
    drop(stack);
    Ok(())
}

/// The x402 part of what `run` prints: where the chain and the facilitator
/// are, and how to pay with the reference client.
fn x402_help(stack: &Stack, paths: &Paths) -> String {
    let Some(x) = stack.x402() else {
        return "\n(x402: no local stack (DIALTONE_X402=0): x402 payments get 503 payment_unavailable)\n".to_owned();
    };
    let pay = paths.root.join("x402/pay.mjs");
    let balance = paths.root.join("x402/balance.mjs");
    format!(
        r#"
x402 (USDC on a local chain): anvil {rpc} ({network}), TestUSDC {asset}, facilitator {facilitator}
  payer $X402_PAYER_ADDRESS (1,000 USDC), payTo $X402_PAYTO_ADDRESS; logs: {dir}/anvil.log, {dir}/facilitator.log
  # pay for one SMS with x402 (no Bearer): the 402 carries the requirements, the reference client signs them
  PAYMENT=$(curl -sS -X POST "$DIALTONE_URL/api/v1/sms/send" -d '{{}}' | node {pay})
  curl -sS -i -X POST "$DIALTONE_URL/api/v1/sms/send" -H "PAYMENT-SIGNATURE: $PAYMENT" \
       -H 'content-type: application/json' -d '{{"to":"+18148835337","message":"Hello via x402"}}'
  # → 200 with a PAYMENT-RESPONSE header (base64 JSON: the settlement's transaction); the same PAYMENT again → 402
  node {balance} $X402_PAYER_ADDRESS $X402_PAYTO_ADDRESS
  # top up 100 credits with 1 USDC: the Bearer says whose account, the payment pays
  PAYMENT=$(curl -sS -X POST "$DIALTONE_URL/api/v1/credits/top-up" -H "Authorization: Bearer $DEMO_API_KEY" -d '{{}}' | node {pay})
  curl -sS -X POST "$DIALTONE_URL/api/v1/credits/top-up" -H "Authorization: Bearer $DEMO_API_KEY" \
       -H "PAYMENT-SIGNATURE: $PAYMENT" -d '{{}}'
"#,
        rpc = x.rpc_url,
        network = x.network,
        asset = x.asset,
        facilitator = x.facilitator_url,
        dir = x.dir.display(),
        pay = pay.display(),
        balance = balance.display(),
    )
}
