//! The operator CLI. Arguments are parsed by hand (no framework): options may
//! appear anywhere, as `--name value` or `--name=value`; everything else is a
//! positional argument; `--` ends option parsing.

use crate::api;
use crate::demo_upstream;
use crate::keys::{self, Expiry, KeyKind};
use crate::store::{unix_now, KeyRecord, NewKey, Store, StoreError};
use serde_json::json;
use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

pub const USAGE: &str = "\
usage: dialtone-credits [--db PATH] [--json] COMMAND ...

commands:
  serve --listen ADDR [--upstream-listen ADDR] [--workers N]
        run the credits API (and the demo upstream API if --upstream-listen);
        prints `listening credits=ADDR upstream=ADDR|none` once bound
  account create ACCOUNT [--credits N]     create (no-op if it exists)
  account topup ACCOUNT N [--note TEXT]    add N credits
  account show ACCOUNT                     show the balance
  key create ACCOUNT [--kind api_key|api_token] [--scopes a,b] [--expires 30d|60d|90d|365d|never] [--name TEXT]
        mint a credential (creates the account if missing); the secret is
        printed once and never stored. api keys never expire; api tokens
        default to --expires 90d
  key list ACCOUNT                         list keys (never secrets or hashes)
  key revoke PREFIX                        revoke the active key with this prefix

global options:
  --db PATH   SQLite database file (default: dialtone.db)
  --json      machine-readable output
  --help      show this help
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

    let credits_store = Arc::new(Mutex::new(Store::open(db)?));
    let credits = api::start(listen, workers, credits_store)?;
    // The upstream gets its own connection so the two listeners do not
    // queue behind one mutex; SQLite arbitrates between them.
    let upstream = match args.get("--upstream-listen") {
        Some(addr) => {
            let store = Arc::new(Mutex::new(Store::open(db)?));
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
    eprintln!("dialtone-credits: database {db}, {workers} workers per listener");
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
    let mut store = Store::open(db)?;
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
    let mut store = Store::open(db)?;
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
    let store = Store::open(db)?;
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
    args.allow_only("key create", &["--kind", "--scopes", "--expires", "--name"])?;
    let [account] = args.operands("key create", 2, ["ACCOUNT"])?;
    let kind = match args.get("--kind") {
        None => KeyKind::ApiKey,
        Some(k) => KeyKind::parse(k)
            .ok_or_else(|| usage(format!("--kind must be api_key or api_token, got {k:?}")))?,
    };
    let expiry = match (kind, args.get("--expires")) {
        (KeyKind::ApiKey, Some(_)) => {
            return Err(usage(
                "api keys never expire; --expires applies to --kind api_token",
            ))
        }
        (KeyKind::ApiKey, None) => Expiry::Never,
        (KeyKind::ApiToken, None) => DEFAULT_TOKEN_EXPIRY,
        (KeyKind::ApiToken, Some(e)) => Expiry::parse(e).map_err(usage)?,
    };
    let scopes = match args.get("--scopes") {
        None => Vec::new(),
        Some(s) => keys::parse_scopes(s).map_err(usage)?,
    };
    let new = NewKey {
        account,
        kind,
        scopes,
        name: args.get("--name").map(str::to_string),
        expiry,
    };
    let mut store = Store::open(db)?;
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
    let store = Store::open(db)?;
    let keys = store.list_keys(&account, unix_now())?;
    if json {
        let rows: Vec<_> = keys.iter().map(key_json).collect();
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

fn key_json(k: &KeyRecord) -> serde_json::Value {
    json!({
        "prefix": k.prefix,
        "account": k.account,
        "kind": k.kind.as_str(),
        "scopes": k.scopes,
        "name": k.name,
        "state": k.state.as_str(),
        "created_at": k.created_at,
        "last_used_at": k.last_used_at,
        "expires_at": k.expires_at,
        "revoked_at": k.revoked_at,
    })
}

fn key_revoke(args: &Args, db: &str, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    args.allow_only("key revoke", &[])?;
    let [prefix] = args.operands("key revoke", 2, ["PREFIX"])?;
    let mut store = Store::open(db)?;
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
