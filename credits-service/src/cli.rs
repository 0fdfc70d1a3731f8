//! The operator CLI. Arguments are parsed by hand (no framework): options may
//! appear anywhere, as `--name value` or `--name=value`; everything else is a
//! positional argument; `--` ends option parsing.

use crate::api;
use crate::demo_upstream;
use crate::keys::{self, Expiry};
use crate::store::{unix_now, RefundOutcome, Store, StoreError};
use serde_json::json;
use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

pub const USAGE: &str = "\
usage: dialtone-credits [--db PATH|URL] [--json] COMMAND ...

commands:
  serve --listen ADDR [--upstream-listen ADDR] [--workers N]
        run the credits API (and the demo upstream API if --upstream-listen);
        prints `listening credits=ADDR upstream=ADDR|none` once bound. The
        admin API (/v1/admin/*) is enabled by DIAL_ADMIN_API_KEY (>= 16 chars)
  account create ACCOUNT [--credits N]     create (no-op if it exists)
  account topup ACCOUNT N [--note TEXT]    add N credits
  account show ACCOUNT                     show the balance
  account ledger ACCOUNT [--limit N]       the newest ledger rows (default 100)
  key create ACCOUNT [--kind api_key|api_token] [--scopes a,b] [--expires 30d|60d|90d|365d|never] [--name TEXT] [--preset agent]
        mint a credential (creates the account if missing); the secret is
        printed once and never stored. api keys never expire; api tokens
        default to --expires 90d. --preset agent: an api_key with scopes
        sms:send named \"agent key\" (unless given)
  key list ACCOUNT                         list keys (never secrets or hashes)
  key revoke PREFIX                        revoke the active key with this prefix
  refund IDEMPOTENCY_KEY [--note TEXT]     refund a debit or captured hold, once
  check                                    verify balances against the ledger;
                                           exit 1 on any discrepancy

global options:
  --db PATH|URL  SQLite database file (default: dialtone.db), or a
                 postgres://user@host:port/db URL
  --json         machine-readable output
  --help         show this help
";

/// Default database file.
pub const DEFAULT_DB: &str = "dialtone.db";
/// Default API token lifetime when `--expires` is not given.
pub const DEFAULT_TOKEN_EXPIRY: Expiry = Expiry::Days(90);
/// Default worker threads per listener.
pub const DEFAULT_WORKERS: usize = 8;

/// A CLI failure: usage mistakes exit 2, everything else exits 1.
#[derive(Debug)]
pub enum CliError {
    Usage(String),
    Failed(String),
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(m) => write!(f, "{m} (see --help)"),
            CliError::Failed(m) => f.write_str(m),
        }
    }
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
        }
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        CliError::Failed(e.to_string())
    }
}

impl From<io::Error> for CliError {
    fn from(e: io::Error) -> Self {
        CliError::Failed(e.to_string())
    }
}

fn usage(msg: impl Into<String>) -> CliError {
    CliError::Usage(msg.into())
}

/// Options that take a value.
const VALUE_OPTIONS: &[&str] = &[
    "--db",
    "--listen",
    "--upstream-listen",
    "--workers",
    "--credits",
    "--note",
    "--kind",
    "--scopes",
    "--expires",
    "--name",
    "--preset",
    "--limit",
];
/// Options that are plain switches.
const SWITCHES: &[&str] = &["--json", "--help"];
/// Options valid for every command.
const GLOBAL_OPTIONS: &[&str] = &["--db", "--json", "--help"];

/// Parsed command line.
#[derive(Debug, Default)]
struct Args {
    positionals: Vec<String>,
    options: Vec<(String, String)>,
}

impl Args {
    fn parse(argv: &[String]) -> Result<Args, CliError> {
        let mut args = Args::default();
        let mut iter = argv.iter();
        while let Some(arg) = iter.next() {
            if arg == "--" {
                args.positionals.extend(iter.by_ref().cloned());
                break;
            }
            if arg == "-h" {
                args.options.push(("--help".into(), String::new()));
                continue;
            }
            if !arg.starts_with("--") {
                // Includes things like "-5": reported later as a bad number.
                args.positionals.push(arg.clone());
                continue;
            }
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            let value = if VALUE_OPTIONS.contains(&name.as_str()) {
                match inline {
                    Some(v) => v,
                    None => iter
                        .next()
                        .cloned()
                        .ok_or_else(|| usage(format!("{name} needs a value")))?,
                }
            } else if SWITCHES.contains(&name.as_str()) {
                if inline.is_some() {
                    return Err(usage(format!("{name} takes no value")));
                }
                String::new()
            } else {
                return Err(usage(format!("unknown option {name}")));
            };
            if args.options.iter().any(|(n, _)| *n == name) {
                return Err(usage(format!("{name} given more than once")));
            }
            args.options.push((name, value));
        }
        Ok(args)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Reject options that do not apply to the chosen command.
    fn allow_only(&self, command: &str, allowed: &[&str]) -> Result<(), CliError> {
        for (name, _) in &self.options {
            if !GLOBAL_OPTIONS.contains(&name.as_str()) && !allowed.contains(&name.as_str()) {
                return Err(usage(format!("{name} does not apply to `{command}`")));
            }
        }
        Ok(())
    }

    /// Exactly the positional arguments after the command words.
    fn operands<const N: usize>(
        &self,
        command: &str,
        skip: usize,
        names: [&str; N],
    ) -> Result<[String; N], CliError> {
        let rest = self.positionals.get(skip..).unwrap_or_default();
        if rest.len() != N {
            let expected = names.join(" ");
            return Err(usage(format!("`{command}` expects: {expected}")));
        }
        let mut out: [String; N] = std::array::from_fn(|_| String::new());
        for (slot, value) in out.iter_mut().zip(rest) {
            slot.clone_from(value);
        }
        Ok(out)
    }
}

fn parse_int(what: &str, s: &str, min: i64) -> Result<i64, CliError> {
    match s.parse::<i64>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(usage(format!(
            "{what} must be an integer >= {min}, got {s:?}"
        ))),
    }
}

/// Run the CLI with `argv` (without the program name), writing normal output
/// to `out`. Warnings and the serve log go to stderr.
pub fn run(argv: &[String], out: &mut dyn Write) -> Result<(), CliError> {
    let args = Args::parse(argv)?;
    if args.has("--help") || args.positionals.first().is_some_and(|c| c == "help") {
        out.write_all(USAGE.as_bytes())?;
        return Ok(());
    }
    let db = args.get("--db").unwrap_or(DEFAULT_DB).to_string();
    let json = args.has("--json");
    let words: Vec<&str> = args.positionals.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["serve", ..] => serve(&args, &db, out),
        ["account", "create", ..] => account_create(&args, &db, json, out),
        ["account", "topup", ..] => account_topup(&args, &db, json, out),
        ["account", "show", ..] => account_show(&args, &db, json, out),
        ["account", "ledger", ..] => account_ledger(&args, &db, json, out),
        ["refund", ..] => refund(&args, &db, json, out),
        ["check", ..] => check(&args, &db, json, out),
        ["key", "create", ..] => key_create(&args, &db, json, out),
        ["key", "list", ..] => key_list(&args, &db, json, out),
        ["key", "revoke", ..] => key_revoke(&args, &db, json, out),
        [] => Err(usage("no command given")),
        [_, ..] => {
            let shown: Vec<&str> = words.iter().take(2).copied().collect();
            Err(usage(format!("unknown command `{}`", shown.join(" "))))
        }
    }
}

/// Entry point for the binary: returns the process exit code.
pub fn main_exit() -> i32 {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match run(&argv, &mut out).and_then(|()| out.flush().map_err(CliError::from)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

fn serve(args: &Args, db: &str, out: &mut dyn Write) -> Result<(), CliError> {
    args.allow_only("serve", &["--listen", "--upstream-listen", "--workers"])?;
    args.operands("serve", 1, [])?;
    let listen = args
        .get("--listen")
        .ok_or_else(|| usage("serve needs --listen ADDR (e.g. 127.0.0.1:8081)"))?;
    let workers = match args.get("--workers") {
        None => DEFAULT_WORKERS,
        Some(w) => match w.parse::<usize>() {
            Ok(n) if (1..=64).contains(&n) => n,
            _ => return Err(usage(format!("--workers must be 1..=64, got {w:?}"))),
        },
    };

    let credits_store = Arc::new(Mutex::new(Store::connect(db)?));
    let config = api::ApiConfig::from_env();
    let admin_enabled = !matches!(config.admin, api::AdminAuth::Disabled);
    let credits = api::start_with_config(listen, workers, credits_store, config)?;
    start_sweeper(db)?;
    // The upstream gets its own connection so the two listeners do not
    // queue behind one mutex; SQLite arbitrates between them.
    let upstream = match args.get("--upstream-listen") {
        Some(addr) => {
            let store = Arc::new(Mutex::new(Store::connect(db)?));
            Some(demo_upstream::start(
                addr,
                workers,
                store,
                api::system_clock(),
            )?)
        }
        None => None,
    };
    let upstream_addr = upstream
        .as_ref()
        .map_or_else(|| "none".to_string(), |u| u.addr().to_string());
    // Tests and scripts wait for this exact line; flush so they see it now.
    writeln!(
        out,
        "listening credits={} upstream={upstream_addr}",
        credits.addr()
    )?;
    out.flush()?;
    eprintln!(
        "dialtone-credits: database {}, {workers} workers per listener, admin API {}",
        if crate::store::is_postgres_url(db) { "postgres" } else { db },
        if admin_enabled {
            "enabled"
        } else {
            "disabled (DIAL_ADMIN_API_KEY unset or shorter than 16 characters)"
        }
    );
    // Workers run until the process is killed. SQLite in WAL mode with
    // transactional writes is crash-safe, so a plain SIGTERM/SIGKILL is fine.
    credits.wait();
    if let Some(u) = upstream {
        u.wait();
    }
    Ok(())
}

fn account_create(args: &Args, db: &str, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    args.allow_only("account create", &["--credits"])?;
    let [account] = args.operands("account create", 2, ["ACCOUNT"])?;
    let credits = match args.get("--credits") {
        Some(c) => parse_int("--credits", c, 0)?,
        None => 0,
    };
    let mut store = Store::connect(db)?;
    let outcome = store.create_account(&account, credits, unix_now())?;
    if json {
        writeln!(
            out,
            "{}",
            json!({ "account": outcome.account, "balance": outcome.balance, "created": outcome.created })
        )?;
    } else if outcome.created {
        writeln!(
            out,
            "created account {account} with {} credits",
            outcome.balance
        )?;
    } else {
        writeln!(
            out,
            "account {account} already exists with {} credits; left unchanged",
            outcome.balance
        )?;
    }
    Ok(())
}

fn account_topup(args: &Args, db: &str, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    args.allow_only("account topup", &["--note"])?;
    let [account, amount] = args.operands("account topup", 2, ["ACCOUNT", "N"])?;
    let amount = parse_int("N", &amount, 1)?;
    let mut store = Store::connect(db)?;
    let receipt = store.topup(&account, amount, args.get("--note"), None, unix_now())?;
    if json {
        writeln!(
            out,
            "{}",
            json!({ "account": receipt.account, "credited": receipt.amount, "balance": receipt.balance })
        )?;
    } else {
        writeln!(
            out,
            "credited {amount} to {account}; balance {}",
            receipt.balance
        )?;
    }
    Ok(())
}

fn account_show(args: &Args, db: &str, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    args.allow_only("account show", &[])?;
    let [account] = args.operands("account show", 2, ["ACCOUNT"])?;
    let store = Store::connect(db)?;
    let balance = store
        .balance(&account)?
        .ok_or_else(|| CliError::Failed(format!("account not found: {account}")))?;
    if json {
        writeln!(
            out,
            "{}",
            json!({ "account": account, "balance": balance, "total_credits": balance })
        )?;
    } else {
        writeln!(out, "account {account} balance {balance}")?;
    }
    Ok(())
}

fn key_create(args: &Args, db: &str, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    args.allow_only(
        "key create",
        &["--kind", "--scopes", "--expires", "--name", "--preset"],
    )?;
    let [account] = args.operands("key create", 2, ["ACCOUNT"])?;
    let scopes = match args.get("--scopes") {
        None => None,
        Some(s) => Some(keys::parse_scopes(s).map_err(usage)?),
    };
    let new = api::new_key_from_options(
        account,
        args.get("--kind"),
        scopes,
        args.get("--preset"),
        args.get("--expires"),
        args.get("--name").map(str::to_string),
    )
    .map_err(usage)?;
    let mut store = Store::connect(db)?;
    let created = store.create_key(&new, unix_now())?;
    if json {
        writeln!(
            out,
            "{}",
            json!({
                "secret": created.secret,
                "prefix": created.prefix,
                "account": created.account,
                "kind": created.kind.as_str(),
                "scopes": created.scopes,
                "expires_at": created.expires_at,
            })
        )?;
    } else {
        writeln!(
            out,
            "created {} {} for {} (scopes: {}; expires: {})",
            created.kind,
            created.prefix,
            created.account,
            display_scopes(&created.scopes),
            created
                .expires_at
                .map_or_else(|| "never".to_string(), format_time),
        )?;
        writeln!(out, "secret: {}", created.secret)?;
    }
    eprintln!("warning: the secret is shown only this once and is not stored; save it now");
    Ok(())
}

fn display_scopes(scopes: &[String]) -> String {
    if scopes.is_empty() {
        "-".to_string()
    } else {
        scopes.join(",")
    }
}

fn key_list(args: &Args, db: &str, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    args.allow_only("key list", &[])?;
    let [account] = args.operands("key list", 2, ["ACCOUNT"])?;
    let store = Store::connect(db)?;
    let keys = store.list_keys(&account, unix_now())?;
    if json {
        let rows: Vec<_> = keys.iter().map(api::key_json).collect();
        writeln!(out, "{}", serde_json::Value::Array(rows))?;
        return Ok(());
    }
    if keys.is_empty() {
        writeln!(out, "no keys for {account}")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<8}  {:<9}  {:<7}  {:<20}  {:<20}  {:<20}  {:<20}  NAME",
        "PREFIX", "KIND", "STATE", "SCOPES", "CREATED", "LAST USED", "EXPIRES"
    )?;
    for k in &keys {
        writeln!(
            out,
            "{:<8}  {:<9}  {:<7}  {:<20}  {:<20}  {:<20}  {:<20}  {}",
            k.prefix,
            k.kind.as_str(),
            k.state.as_str(),
            display_scopes(&k.scopes),
            format_time(k.created_at),
            k.last_used_at
                .map_or_else(|| "never".to_string(), format_time),
            k.expires_at
                .map_or_else(|| "never".to_string(), format_time),
            k.name.as_deref().unwrap_or("-"),
        )?;
    }
    Ok(())
}

fn key_revoke(args: &Args, db: &str, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    args.allow_only("key revoke", &[])?;
    let [prefix] = args.operands("key revoke", 2, ["PREFIX"])?;
    let mut store = Store::connect(db)?;
    let revoked = store.revoke_by_prefix(&prefix, unix_now())?;
    if json {
        writeln!(
            out,
            "{}",
            json!({
                "prefix": revoked.prefix,
                "account": revoked.account,
                "kind": revoked.kind.as_str(),
                "revoked_at": revoked.revoked_at,
            })
        )?;
    } else {
        writeln!(
            out,
            "revoked {} {} (account {})",
            revoked.kind, revoked.prefix, revoked.account
        )?;
    }
    Ok(())
}

/// Release expired holds every second in the background (holds are also
/// expired lazily by every transaction touching their account, so this only
/// keeps idle accounts tidy). Uses its own connection.
fn start_sweeper(db: &str) -> Result<(), CliError> {
    let mut store = Store::connect(db)?;
    std::thread::Builder::new()
        .name("hold-sweeper".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            match store.expire_holds(unix_now()) {
                Ok(0) => {}
                Ok(n) => eprintln!("dialtone-credits: released {n} expired hold(s)"),
                Err(e) => eprintln!("dialtone-credits: hold sweeper: {e}"),
            }
        })?;
    Ok(())
}

fn account_ledger(args: &Args, db: &str, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    args.allow_only("account ledger", &["--limit"])?;
    let [account] = args.operands("account ledger", 2, ["ACCOUNT"])?;
    let limit = match args.get("--limit") {
        Some(l) => parse_int("--limit", l, 1)?.min(crate::store::MAX_LEDGER_LIMIT),
        None => api::DEFAULT_LEDGER_LIMIT,
    };
    let store = Store::connect(db)?;
    if store.balance(&account)?.is_none() {
        return Err(CliError::Failed(format!("account not found: {account}")));
    }
    let entries = store.ledger(&account, limit)?;
    if json {
        let rows: Vec<_> = entries.iter().map(api::ledger_json).collect();
        writeln!(out, "{}", json!({ "account": account, "entries": rows }))?;
        return Ok(());
    }
    if entries.is_empty() {
        writeln!(out, "no ledger rows for {account}")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>6}  {:<20}  {:<7}  {:>9}  {:>9}  {:<29}  {:<24}  NOTE",
        "ID", "TIME", "KIND", "AVAILABLE", "HELD", "HOLD", "IDEMPOTENCY KEY"
    )?;
    for e in &entries {
        writeln!(
            out,
            "{:>6}  {:<20}  {:<7}  {:>+9}  {:>+9}  {:<29}  {:<24}  {}",
            e.id,
            format_time(e.created_at),
            e.kind,
            e.delta_available,
            e.delta_held,
            e.hold_id.as_deref().unwrap_or("-"),
            e.idempotency_key.as_deref().unwrap_or("-"),
            e.note.as_deref().unwrap_or("-"),
        )?;
    }
    Ok(())
}

fn refund(args: &Args, db: &str, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    args.allow_only("refund", &["--note"])?;
    let [key] = args.operands("refund", 1, ["IDEMPOTENCY_KEY"])?;
    let mut store = Store::connect(db)?;
    let outcome = store.refund(&key, args.get("--note"), unix_now())?;
    match &outcome {
        RefundOutcome::Refunded { account, amount, balance, idempotency_key, .. } => {
            if json {
                writeln!(out, "{}", api::refunded_json(&outcome).unwrap_or_default())?;
            } else {
                writeln!(
                    out,
                    "refunded {amount} to {account} for {idempotency_key:?}; balance {balance}"
                )?;
            }
            Ok(())
        }
        RefundOutcome::AlreadyRefunded { idempotency_key } => Err(CliError::Failed(format!(
            "{idempotency_key:?} was already refunded; nothing done"
        ))),
        RefundOutcome::NotFound => Err(CliError::Failed(format!(
            "no debit or hold has idempotency key {key:?}; nothing to refund"
        ))),
        RefundOutcome::NotRefundable { state } => Err(CliError::Failed(format!(
            "the hold with idempotency key {key:?} is {}: nothing was charged, nothing to refund",
            state.as_str()
        ))),
    }
}

fn check(args: &Args, db: &str, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    args.allow_only("check", &[])?;
    args.operands("check", 1, [])?;
    let mut store = Store::connect(db)?;
    let report = store.check()?;
    if json {
        writeln!(
            out,
            "{}",
            json!({
                "ok": report.is_ok(),
                "accounts": report.accounts,
                "ledger_rows": report.ledger_rows,
                "problems": report.problems,
            })
        )?;
    } else if report.is_ok() {
        writeln!(
            out,
            "ok: {} accounts, {} ledger rows",
            report.accounts, report.ledger_rows
        )?;
    } else {
        for p in &report.problems {
            writeln!(out, "{p}")?;
        }
    }
    if report.is_ok() {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "check failed: {} discrepancies in {} accounts, {} ledger rows",
            report.problems.len(),
            report.accounts,
            report.ledger_rows
        )))
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SSZ` (UTC), without a date crate.
pub fn format_time(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| (*x).to_string()).collect()
    }

    #[test]
    fn parses_options_anywhere() {
        let a = Args::parse(&argv(&[
            "key",
            "--db=x.db",
            "create",
            "acct",
            "--kind",
            "api_token",
            "--json",
        ]))
        .unwrap();
        assert_eq!(a.positionals, vec!["key", "create", "acct"]);
        assert_eq!(a.get("--db"), Some("x.db"));
        assert_eq!(a.get("--kind"), Some("api_token"));
        assert!(a.has("--json"));
    }

    #[test]
    fn rejects_bad_options() {
        assert!(matches!(
            Args::parse(&argv(&["--bogus"])),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            Args::parse(&argv(&["--db"])),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            Args::parse(&argv(&["--json=1"])),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            Args::parse(&argv(&["--db", "a", "--db", "b"])),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn formats_times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13:20Z");
    }
}
