//! The operator CLI (clap): `serve`, accounts, keys, refunds, `check`.
//!
//! `--db` (or `DIALTONE_DB`) names the database: a SQLite file or a
//! `postgres://` URL. `--json` prints machine-readable output. Usage errors
//! exit 2 with one `error: …` line; failures exit 1.

use crate::api::{self, ApiConfig};
use crate::auth::{AdminAuth, ServiceAuth};
use crate::backend::{Db, DbOptions};
use crate::demo_upstream;
use crate::dev_sign_in::DevSignIn;
use crate::self_service::{self, SelfServiceConfig, GATE_KEY_ENV};
use crate::http::HttpConfig;
use crate::keys;
use crate::pg::PgOptions;
use crate::sqlite::SqliteOptions;
use crate::store::{unix_now, RefundOutcome, Store, StoreError};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use std::fmt;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Default database file.
pub const DEFAULT_DB: &str = "dialtone.db";
/// Default API token lifetime when `--expires` is not given.
pub const DEFAULT_TOKEN_EXPIRY: keys::Expiry = api::DEFAULT_TOKEN_EXPIRY;

const HELP_TEMPLATE: &str = "usage: {usage}\n\n{about}\n\n{all-args}{after-help}";

#[derive(Parser, Debug)]
#[command(
    name = "dialtone-credits",
    version,
    about = "The dialtone key/credits service, its demo upstream API, and the operator commands.",
    help_template = HELP_TEMPLATE,
    subcommand_required = true,
    arg_required_else_help = false,
    color = clap::ColorChoice::Never,
    after_help = "The admin API (/v1/admin/*) is enabled by DIAL_ADMIN_API_KEY (>= 16 chars).\n\
                  Each command has its own --help."
)]
struct Cli {
    /// SQLite database file, or a postgres://user@host:port/db URL.
    #[arg(long, global = true, env = "DIALTONE_DB", default_value = DEFAULT_DB, value_name = "PATH|URL")]
    db: String,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the credits API (and the demo upstream API with --upstream-listen).
    ///
    /// Prints `listening credits=ADDR upstream=ADDR|none self_service=ADDR|none` once bound. Calls
    /// to /v1/* (except /v1/admin/*) must carry x-dialtone-service-key: one
    /// of the secrets in DIAL_SERVICE_KEY / DIAL_SERVICE_KEY_PREVIOUS or the
    /// --service-key-file (re-read on SIGHUP). SIGTERM/SIGINT stop accepting,
    /// finish in-flight requests, then exit.
    Serve(ServeArgs),
    /// Accounts: create, top up, show, ledger.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Credentials: create (the secret is printed once), list, revoke.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Refund a debit or a captured hold, once.
    Refund {
        /// The idempotency key of the debit or hold.
        idempotency_key: String,
        /// A note for the ledger.
        #[arg(long)]
        note: Option<String>,
    },
    /// Verify balances against the ledger; exit 1 on any discrepancy.
    Check,
}

#[derive(Subcommand, Debug)]
enum AccountCommand {
    /// Create an account (a no-op if it exists).
    Create {
        account: String,
        /// Initial credits (recorded as a top-up).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..))]
        credits: i64,
    },
    /// Add N credits.
    Topup {
        account: String,
        #[arg(value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
        amount: i64,
        #[arg(long)]
        note: Option<String>,
    },
    /// Show the balance.
    Show { account: String },
    /// The newest ledger rows (default 100).
    Ledger {
        account: String,
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        limit: Option<i64>,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Mint a credential (creates the account if missing). The secret is
    /// printed once and never stored. API keys never expire; API tokens
    /// default to --expires 90d. --preset agent: an api_key with scopes
    /// sms:send named "agent key" (unless given).
    Create {
        account: String,
        /// api_key (default) or api_token.
        #[arg(long)]
        kind: Option<String>,
        /// Comma-separated scopes, e.g. sms:send,contacts_read.
        #[arg(long)]
        scopes: Option<String>,
        /// 30d, 60d, 90d, 365d or never (api_token only).
        #[arg(long)]
        expires: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// agent: the dashboard's quick agent key.
        #[arg(long)]
        preset: Option<String>,
    },
    /// List an account's keys (never secrets or hashes).
    List { account: String },
    /// Revoke the active key with this prefix.
    Revoke { prefix: String },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// The credits API's address, e.g. 127.0.0.1:8081.
    #[arg(long, env = "DIALTONE_LISTEN", value_name = "ADDR")]
    listen: String,
    /// Also serve the demo upstream API here.
    #[arg(long, env = "DIALTONE_UPSTREAM_LISTEN", value_name = "ADDR")]
    upstream_listen: Option<String>,
    /// Runtime worker threads (default: one per CPU).
    #[arg(long, env = "DIALTONE_WORKERS", value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: Option<u16>,
    /// Close a keep-alive connection idle this long. Must exceed the
    /// client's own idle timeout (Envoy's cluster idle_timeout).
    #[arg(long, env = "DIALTONE_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    idle_timeout_ms: u64,
    /// Deadline for a request head (and for its body).
    #[arg(
        long,
        env = "DIALTONE_HEADER_READ_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    header_read_timeout_ms: u64,
    /// Largest request body (413 above it).
    #[arg(long, env = "DIALTONE_MAX_BODY_BYTES", default_value_t = crate::http::MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Largest request head, in bytes (431 above it; at least 8192).
    #[arg(long, env = "DIALTONE_MAX_HEADER_BYTES", default_value_t = 32 * 1024)]
    max_header_bytes: usize,
    /// Most open connections per listener (more wait in the backlog).
    #[arg(long, env = "DIALTONE_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Longest wait for in-flight requests on SIGTERM.
    #[arg(long, env = "DIALTONE_SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000)]
    shutdown_timeout_ms: u64,
    /// File with the accepted service key(s): one or two non-empty lines,
    /// re-read on SIGHUP. Replaces DIAL_SERVICE_KEY(_PREVIOUS).
    #[arg(long, env = "DIAL_SERVICE_KEY_FILE", value_name = "PATH")]
    service_key_file: Option<PathBuf>,
    /// Serve /v1/* without any service key (local experiments only).
    #[arg(long)]
    insecure_no_service_key: bool,
    /// PostgreSQL: most pooled connections.
    #[arg(long, env = "DIALTONE_PG_POOL_SIZE", default_value_t = 32)]
    pg_pool_size: u32,
    /// PostgreSQL: longest wait for a connection before answering 503.
    #[arg(long, env = "DIALTONE_PG_ACQUIRE_TIMEOUT_MS", default_value_t = 2_000)]
    pg_acquire_timeout_ms: u64,
    /// PostgreSQL: most account writes (debits, holds, captures) committed
    /// together in one transaction (1: each in its own).
    #[arg(long, env = "DIALTONE_PG_MAX_BATCH", default_value_t = 64)]
    pg_max_batch: usize,
    /// PostgreSQL: group-commit writers (accounts are spread over them).
    #[arg(long, env = "DIALTONE_PG_WRITERS", default_value_t = 4)]
    pg_writers: usize,
    /// SQLite: reader connections.
    #[arg(long, env = "DIALTONE_SQLITE_READERS", default_value_t = 4)]
    sqlite_readers: u32,
    /// SQLite: longest wait for a lock held by another process before 503.
    #[arg(
        long,
        env = "DIALTONE_SQLITE_BUSY_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    sqlite_busy_timeout_ms: u64,
    /// SQLite: most write requests committed together.
    #[arg(long, env = "DIALTONE_SQLITE_MAX_BATCH", default_value_t = 256)]
    sqlite_max_batch: usize,
    /// Also serve the end user's self-service API and /dashboard here. Put
    /// it where only Envoy reaches it: every request must carry the gate
    /// key that Envoy's route adds (x-dialtone-gate-key).
    #[arg(long, env = "DIALTONE_SELF_SERVICE_LISTEN", value_name = "ADDR")]
    self_service_listen: Option<String>,
    /// File with the accepted gate key(s) (one or two lines of >= 32
    /// characters, re-read on SIGHUP). Replaces DIAL_GATE_KEY(_PREVIOUS).
    #[arg(long, env = "DIAL_GATE_KEY_FILE", value_name = "PATH")]
    gate_key_file: Option<PathBuf>,
    /// Scopes an end user may put on a self-service key, comma-separated.
    #[arg(long, env = "DIALTONE_SELF_SERVICE_SCOPES", default_value = "sms:send,contacts_read")]
    self_service_scopes: String,
    /// Where the dashboard sends a signed-out visitor (your app's Privy login).
    #[arg(long, env = "DIALTONE_SIGN_IN_URL", value_name = "URL")]
    sign_in_url: Option<String>,
    /// The x402 top-up route the dashboard shows (with its price).
    #[arg(long, env = "DIALTONE_TOP_UP_PATH", default_value = "/api/v1/credits/top-up")]
    top_up_path: String,
    /// LOCAL STACK ONLY: serve /dev/sign-in, which mints Privy-shaped tokens
    /// with this dev key (PKCS#8 PEM) for anyone who asks. Never in production.
    #[arg(long, value_name = "PEM", requires = "dev_app_id")]
    dev_sign_in_key: Option<PathBuf>,
    /// The Privy app id (`aud`) of dev tokens.
    #[arg(long, value_name = "ID")]
    dev_app_id: Option<String>,
    /// Log lines as text or JSON (levels from RUST_LOG, default info).
    #[arg(long, env = "DIALTONE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

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

/// Parse `argv` (without the program name). `Ok(None)`: help or version was
/// printed to `out`.
fn parse(argv: &[String], out: &mut dyn Write) -> Result<Option<Cli>, CliError> {
    let args = std::iter::once("dialtone-credits".to_string()).chain(argv.iter().cloned());
    match Cli::try_parse_from(args) {
        Ok(cli) => Ok(Some(cli)),
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                write!(out, "{e}")?;
                Ok(None)
            }
            _ => {
                // One line, like every other error of this CLI.
                let text = e.to_string();
                let first = text
                    .lines()
                    .find(|l| l.starts_with("error:"))
                    .map(|l| l.trim_start_matches("error:").trim().to_string())
                    .unwrap_or_else(|| "a subcommand is missing".to_string());
                Err(usage(first))
            }
        },
    }
}

/// Run the CLI with `argv` (without the program name), writing normal output
/// to `out`. Warnings and the serve log go to stderr.
pub fn run(argv: &[String], out: &mut dyn Write) -> Result<(), CliError> {
    let Some(cli) = parse(argv, out)? else {
        return Ok(());
    };
    let (db, json) = (cli.db.as_str(), cli.json);
    match cli.command {
        Command::Serve(args) => serve(args, db, out),
        Command::Account(AccountCommand::Create { account, credits }) => {
            account_create(db, json, out, &account, credits)
        }
        Command::Account(AccountCommand::Topup {
            account,
            amount,
            note,
        }) => account_topup(db, json, out, &account, amount, note.as_deref()),
        Command::Account(AccountCommand::Show { account }) => account_show(db, json, out, &account),
        Command::Account(AccountCommand::Ledger { account, limit }) => {
            account_ledger(db, json, out, &account, limit)
        }
        Command::Key(KeyCommand::Create {
            account,
            kind,
            scopes,
            expires,
            name,
            preset,
        }) => {
            let scopes = match scopes {
                None => None,
                Some(s) => Some(keys::parse_scopes(&s).map_err(usage)?),
            };
            let new = api::new_key_from_options(
                account,
                kind.as_deref(),
                scopes,
                preset.as_deref(),
                expires.as_deref(),
                name,
            )
            .map_err(usage)?;
            key_create(db, json, out, &new)
        }
        Command::Key(KeyCommand::List { account }) => key_list(db, json, out, &account),
        Command::Key(KeyCommand::Revoke { prefix }) => key_revoke(db, json, out, &prefix),
        Command::Refund {
            idempotency_key,
            note,
        } => refund(db, json, out, &idempotency_key, note.as_deref()),
        Command::Check => check(db, json, out),
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

// ----- serve ----------------------------------------------------------------

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
}

/// The service keys `serve` accepts, from the file, the environment, or
/// (explicitly) none.
fn service_auth(args: &ServeArgs) -> Result<ServiceAuth, CliError> {
    if let Some(path) = &args.service_key_file {
        if std::env::var_os(crate::auth::SERVICE_KEY_ENV).is_some() {
            tracing::warn!("--service-key-file is set: DIAL_SERVICE_KEY(_PREVIOUS) are ignored");
        }
        return ServiceAuth::from_file(path).map_err(usage);
    }
    match ServiceAuth::from_env().map_err(usage)? {
        Some(auth) => Ok(auth),
        None if args.insecure_no_service_key => Ok(ServiceAuth::insecure()),
        None => Err(usage(
            "no service key: set DIAL_SERVICE_KEY (at least 32 characters) or --service-key-file, \
             or pass --insecure-no-service-key for a local experiment",
        )),
    }
}

/// The self-service listener's settings: its gate keys, the scopes on
/// offer, the dev sign-in.
type SelfServiceSetup = (ServiceAuth, SelfServiceConfig, Option<Arc<DevSignIn>>);

/// [`SelfServiceSetup`] from the arguments (a gate key is required); `None`
/// without `--self-service-listen`.
fn self_service_setup(args: &ServeArgs) -> Result<Option<SelfServiceSetup>, CliError> {
    if args.self_service_listen.is_none() {
        return Ok(None);
    }
    let gate = match &args.gate_key_file {
        Some(path) => ServiceAuth::from_file(path).map_err(usage)?,
        None => ServiceAuth::from_env_vars(GATE_KEY_ENV, "DIAL_GATE_KEY_PREVIOUS")
            .map_err(usage)?
            .ok_or_else(|| {
                usage(
                    "--self-service-listen needs a gate key: set DIAL_GATE_KEY (at least 32 characters) \
                     or --gate-key-file, and have Envoy's route add it as x-dialtone-gate-key",
                )
            })?,
    };
    let allowed_scopes = keys::parse_scopes(&args.self_service_scopes).map_err(usage)?;
    let dev = match (&args.dev_sign_in_key, &args.dev_app_id) {
        (Some(key), Some(app)) => {
            let dev = DevSignIn::load(key, app, crate::dev_sign_in::DEFAULT_TTL_SECONDS).map_err(usage)?;
            tracing::warn!("DEV SIGN-IN ON: /dev/sign-in mints a session for any account; local stack only");
            Some(Arc::new(dev))
        }
        _ => None,
    };
    let config = SelfServiceConfig {
        allowed_scopes,
        sign_in_url: args.sign_in_url.clone(),
        top_up_path: args.top_up_path.clone(),
    };
    Ok(Some((gate, config, dev)))
}

fn serve(args: ServeArgs, db: &str, out: &mut dyn Write) -> Result<(), CliError> {
    init_logging(args.log_format);
    let service = service_auth(&args)?;
    if service.is_insecure() {
        tracing::error!(
            "INSECURE: --insecure-no-service-key: /v1/* answers anyone who can reach this port; \
             never run it like this outside a local experiment"
        );
    }
    let http = HttpConfig {
        header_read_timeout: Duration::from_millis(args.header_read_timeout_ms.max(1)),
        idle_timeout: Duration::from_millis(args.idle_timeout_ms.max(1)),
        max_header_bytes: args.max_header_bytes.max(8192),
        max_body_bytes: args.max_body_bytes,
        max_connections: args.max_connections.max(1),
        shutdown_timeout: Duration::from_millis(args.shutdown_timeout_ms),
        ..HttpConfig::default()
    };
    let db_options = DbOptions {
        sqlite: SqliteOptions {
            readers: args.sqlite_readers.max(1),
            busy_timeout: Duration::from_millis(args.sqlite_busy_timeout_ms),
            max_batch: args.sqlite_max_batch.max(1),
            ..SqliteOptions::default()
        },
        pg: PgOptions {
            max_connections: args.pg_pool_size.max(1),
            acquire_timeout: Duration::from_millis(args.pg_acquire_timeout_ms.max(1)),
            max_batch: args.pg_max_batch.max(1),
            writers: args.pg_writers.max(1),
            ..PgOptions::default()
        },
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(w) = args.workers {
        runtime.worker_threads(usize::from(w));
    }
    let self_service = self_service_setup(&args)?;
    let runtime = runtime
        .thread_name("dialtone-credits")
        .enable_all()
        .build()?;
    let config = ApiConfig {
        clock_ms: api::system_clock_ms(),
        admin: AdminAuth::from_env(),
        service,
    };
    let result = runtime.block_on(serve_async(args, db, config, http, db_options, self_service, out));
    // Tasks still parked on idle sockets are not waited for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve_async(
    args: ServeArgs,
    db_arg: &str,
    config: ApiConfig,
    http: HttpConfig,
    db_options: DbOptions,
    self_service: Option<SelfServiceSetup>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    crate::metrics::install();
    let db = Db::open(db_arg, &db_options).await?;
    let credits_listener = crate::http::bind(&args.listen).await?;
    let upstream_listener = match &args.upstream_listen {
        Some(addr) => Some(crate::http::bind(addr).await?),
        None => None,
    };
    let self_listener = match &args.self_service_listen {
        Some(addr) => Some(crate::http::bind(addr).await?),
        None => None,
    };
    let self_addr = match &self_listener {
        Some(l) => l.local_addr()?.to_string(),
        None => "none".to_string(),
    };
    let credits_addr = credits_listener.local_addr()?;
    let upstream_addr = match &upstream_listener {
        Some(l) => l.local_addr()?.to_string(),
        None => "none".to_string(),
    };
    let http = Arc::new(http);
    let service = config.service.clone();
    let admin_enabled = config.admin.is_enabled();
    let (stop, stopped) = watch::channel(false);

    let credits = tokio::spawn(crate::http::serve(
        credits_listener,
        api::router(api::AppState {
            db: db.clone(),
            config: Arc::new(config),
            http: Arc::clone(&http),
        }),
        Arc::clone(&http),
        stopped.clone(),
        "credits",
    ));
    let upstream = upstream_listener.map(|listener| {
        tokio::spawn(crate::http::serve(
            listener,
            demo_upstream::router(demo_upstream::DemoState::new(
                db.clone(),
                api::system_clock(),
                Arc::clone(&http),
            )),
            Arc::clone(&http),
            stopped.clone(),
            "upstream",
        ))
    });
    let gate = self_service.as_ref().map(|(gate, _, _)| gate.clone());
    let self_task = match (self_listener, self_service) {
        (Some(listener), Some((gate, config, dev_sign_in))) => Some(tokio::spawn(crate::http::serve(
            listener,
            self_service::router(self_service::SelfState {
                db: db.clone(),
                config: Arc::new(config),
                gate,
                http: Arc::clone(&http),
                clock: api::system_clock(),
                dev_sign_in,
            }),
            Arc::clone(&http),
            stopped.clone(),
            "self_service",
        ))),
        _ => None,
    };
    let sweeper = tokio::spawn(sweep(db.clone(), stopped.clone()));

    // Tests and scripts wait for this exact line; flush so they see it now.
    writeln!(
        out,
        "listening credits={credits_addr} upstream={upstream_addr} self_service={self_addr}"
    )?;
    out.flush()?;
    tracing::info!(
        database = if crate::store::is_postgres_url(db_arg) { "postgres" } else { db_arg },
        credits = %credits_addr,
        upstream = %upstream_addr,
        service_keys = %service.describe(),
        admin_api = if admin_enabled { "enabled" } else { "disabled (DIAL_ADMIN_API_KEY unset or shorter than 16 characters)" },
        idle_timeout_ms = http.idle_timeout.as_millis() as u64,
        header_read_timeout_ms = http.header_read_timeout.as_millis() as u64,
        "dialtone-credits serving"
    );

    wait_for_shutdown(&service, gate.as_ref()).await;
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    let _ = stop.send(true);
    let _ = credits.await;
    if let Some(u) = upstream {
        let _ = u.await;
    }
    if let Some(t) = self_task {
        let _ = t.await;
    }
    let _ = sweeper.await;
    db.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Until SIGTERM or SIGINT; SIGHUP re-reads the service key file.
#[cfg(unix)]
async fn wait_for_shutdown(service: &ServiceAuth, gate: Option<&ServiceAuth>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                match service.reload() {
                    Ok(n) => tracing::info!(keys = n, "service keys reloaded"),
                    Err(e) => tracing::error!(error = %e, "service keys NOT reloaded; the previous keys stay"),
                }
                match gate.map(ServiceAuth::reload) {
                    None => {}
                    Some(Ok(n)) => tracing::info!(keys = n, "gate keys reloaded"),
                    Some(Err(e)) => tracing::error!(error = %e, "gate keys NOT reloaded; the previous keys stay"),
                }
            }
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_shutdown(_service: &ServiceAuth, _gate: Option<&ServiceAuth>) {
    let _ = tokio::signal::ctrl_c().await;
}

/// Release expired holds every second (holds are also expired lazily by
/// every write on their account, so this only keeps idle accounts tidy).
async fn sweep(db: Db, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        match db.expire_holds(unix_now()).await {
            Ok(n) => {
                crate::metrics::sweeper_run(Some(n));
                if n > 0 {
                    tracing::info!(released = n, "released expired holds");
                }
            }
            Err(e) => {
                crate::metrics::sweeper_run(None);
                tracing::warn!(error = %e, "hold sweeper failed; next run in a second");
            }
        }
        crate::metrics::upkeep();
    }
}

// ----- operator commands ----------------------------------------------------

fn account_create(
    db: &str,
    json: bool,
    out: &mut dyn Write,
    account: &str,
    credits: i64,
) -> Result<(), CliError> {
    let mut store = Store::connect(db)?;
    let outcome = store.create_account(account, credits, unix_now())?;
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

fn account_topup(
    db: &str,
    json: bool,
    out: &mut dyn Write,
    account: &str,
    amount: i64,
    note: Option<&str>,
) -> Result<(), CliError> {
    let mut store = Store::connect(db)?;
    let receipt = store.topup(account, amount, note, None, unix_now())?;
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

fn account_show(db: &str, json: bool, out: &mut dyn Write, account: &str) -> Result<(), CliError> {
    let store = Store::connect(db)?;
    let balance = store
        .balance(account)?
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

fn key_create(
    db: &str,
    json: bool,
    out: &mut dyn Write,
    new: &crate::store::NewKey,
) -> Result<(), CliError> {
    let mut store = Store::connect(db)?;
    let created = store.create_key(new, unix_now())?;
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

fn key_list(db: &str, json: bool, out: &mut dyn Write, account: &str) -> Result<(), CliError> {
    let store = Store::connect(db)?;
    let keys = store.list_keys(account, unix_now())?;
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

fn key_revoke(db: &str, json: bool, out: &mut dyn Write, prefix: &str) -> Result<(), CliError> {
    let mut store = Store::connect(db)?;
    let revoked = store.revoke_by_prefix(prefix, unix_now())?;
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

fn account_ledger(
    db: &str,
    json: bool,
    out: &mut dyn Write,
    account: &str,
    limit: Option<i64>,
) -> Result<(), CliError> {
    let limit = limit.map_or(api::DEFAULT_LEDGER_LIMIT, |l| {
        l.min(crate::store::MAX_LEDGER_LIMIT)
    });
    let store = Store::connect(db)?;
    if store.balance(account)?.is_none() {
        return Err(CliError::Failed(format!("account not found: {account}")));
    }
    let entries = store.ledger(account, limit)?;
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

fn refund(
    db: &str,
    json: bool,
    out: &mut dyn Write,
    key: &str,
    note: Option<&str>,
) -> Result<(), CliError> {
    let mut store = Store::connect(db)?;
    let outcome = store.refund(key, note, unix_now())?;
    match &outcome {
        RefundOutcome::Refunded {
            account,
            amount,
            balance,
            idempotency_key,
            ..
        } => {
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

fn check(db: &str, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
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
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| (*x).to_string()).collect()
    }

    fn parsed(s: &[&str]) -> Result<Option<Cli>, CliError> {
        parse(&argv(s), &mut Vec::new())
    }

    #[test]
    fn parses_options_anywhere() {
        let cli = parsed(&[
            "key",
            "--db=x.db",
            "create",
            "acct",
            "--kind",
            "api_token",
            "--json",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(cli.db, "x.db");
        assert!(cli.json);
        match cli.command {
            Command::Key(KeyCommand::Create { account, kind, .. }) => {
                assert_eq!(account, "acct");
                assert_eq!(kind.as_deref(), Some("api_token"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_bad_options_in_one_line() {
        for bad in [
            &["--bogus"][..],
            &["--db"],
            &["--json=1", "check"],
            &["--db", "a", "--db", "b", "check"],
            &[],
            &["account", "topup", "a", "0"],
        ] {
            match parsed(bad) {
                Err(CliError::Usage(m)) => assert_eq!(m.lines().count(), 1, "{bad:?}: {m}"),
                other => panic!("{bad:?}: {:?}", other.map(|c| c.map(|c| c.command))),
            }
        }
    }

    #[test]
    fn help_and_version_are_printed() {
        let mut out = Vec::new();
        assert!(parse(&argv(&["--help"]), &mut out).unwrap().is_none());
        assert!(String::from_utf8(out)
            .unwrap()
            .starts_with("usage: dialtone-credits"));
        let mut out = Vec::new();
        assert!(parse(&argv(&["serve", "--help"]), &mut out)
            .unwrap()
            .is_none());
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("--idle-timeout-ms") && text.contains("--service-key-file"),
            "{text}"
        );
    }

    #[test]
    fn formats_times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13:20Z");
    }
}
