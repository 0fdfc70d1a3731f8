//! Deployment artifacts for dialtone.
//!
//! - [`oci`]: packages the filter `.wasm` as an OCI image layout that Istio's
//!   `WasmPlugin` and Envoy Gateway's `EnvoyExtensionPolicy` pull.
//! - [`k8s`]: checks the example manifests under `envoy/istio` and
//!   `envoy/gateway` against the published CRD schemas in `envoy/crds`, and
//!   the plugin configuration they embed against the filter's own validation.
//! - [`envoy_validate`]: runs `envoy --mode validate` on a bootstrap.

pub mod k8s;
pub mod oci;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The dialtone checkout: `DIALTONE_ROOT`, else the one holding the current
/// directory (never the tree this binary was built in); an error naming
/// `DIALTONE_ROOT` when there is none.
pub fn root() -> Result<PathBuf, String> {
    dialtone_devstack::repo_root()
}

/// The Envoy binary: `ENVOY_BIN`, else `<root>/.venv/bin/envoy` (`make envoy`).
pub fn envoy_bin(root: &Path) -> PathBuf {
    std::env::var_os("ENVOY_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv/bin/envoy"))
}

fn wasm_from_env() -> Option<PathBuf> {
    std::env::var_os("DIALTONE_WASM").filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The filter built by `make wasm`: `DIALTONE_WASM`, else the wasm-release artifact under `root`.
pub fn built_wasm(root: &Path) -> PathBuf {
    wasm_from_env().unwrap_or_else(|| root.join("target/wasm32-wasip1/wasm-release/dialtone.wasm"))
}

/// [`built_wasm`] in the checkout of [`root`], which is only looked for when
/// `DIALTONE_WASM` is unset.
pub fn default_wasm() -> Result<PathBuf, String> {
    match wasm_from_env() {
        Some(p) => Ok(p),
        None => root().map(|r| built_wasm(&r)),
    }
}

/// What `envoy --mode validate` said.
#[derive(Debug)]
pub struct EnvoyValidation {
    pub ok: bool,
    /// stdout and stderr together (the log goes to stderr).
    pub output: String,
}

/// The variables the filter reads from its VM environment (the bootstraps'
/// `host_env_keys`): the admin key, the shared-cache secret, the service key.
pub const FILTER_ENV: &[&str] = &["DIAL_ADMIN_API_KEY", "DIAL_SHARED_CACHE_SECRET", "DIAL_SERVICE_KEY"];

/// Runs `envoy --mode validate -c config`. `admin_key` sets (or, `None`,
/// removes) `DIAL_ADMIN_API_KEY` in Envoy's environment; the filter's other
/// variables ([`FILTER_ENV`]) are removed. Envoy 1.40 loads the `.wasm` in
/// this mode and runs the filter's `on_configure`, so an invalid plugin
/// configuration fails validation. Err only if Envoy cannot be run.
pub fn envoy_validate(envoy: &Path, config: &Path, admin_key: Option<&str>) -> Result<EnvoyValidation, String> {
    let env: Vec<(&str, &str)> = admin_key.map(|k| ("DIAL_ADMIN_API_KEY", k)).into_iter().collect();
    envoy_validate_env(envoy, config, &env)
}

/// [`envoy_validate`] with Envoy's environment holding exactly `env` of the
/// filter's variables ([`FILTER_ENV`]; the rest are removed, whatever the
/// caller's environment holds).
pub fn envoy_validate_env(envoy: &Path, config: &Path, env: &[(&str, &str)]) -> Result<EnvoyValidation, String> {
    if !envoy.exists() {
        return Err(format!("Envoy not found at {}: run `make envoy` (or set ENVOY_BIN)", envoy.display()));
    }
    let mut cmd = Command::new(envoy);
    cmd.args(["--mode", "validate", "--disable-hot-restart", "--log-level", "info", "-c"]).arg(config);
    for name in FILTER_ENV {
        cmd.env_remove(name);
    }
    for (name, value) in env {
        cmd.env(name, value);
    }
    let out = cmd.output().map_err(|e| format!("running {}: {e}", envoy.display()))?;
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(EnvoyValidation { ok: out.status.success(), output })
}
