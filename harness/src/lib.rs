//! A proxy-wasm host for tests: loads the **compiled** `dialtone.wasm` in
//! wasmtime, implements the proxy-wasm ABI 0.2.1 the Rust SDK uses (and the
//! WASI preview1 calls a `wasm32-wasip1` build imports), and lets a test
//! drive requests, answer callouts, set the clock and read logs and metrics.
//! Host state is per plugin instance: tests run in parallel.
//!
//! [`cases`] runs YAML case files against a policy: what CI pipelines use
//! before a policy rolls out.

pub mod abi;
pub mod cases;
pub mod host;
pub mod plugin;

pub use abi::{Action, LogLevel};
pub use host::{Callout, LocalReply, LogLine};
pub use plugin::{CallAnswer, HttpStream, Outcome, Plugin, PluginOptions, StartError, Wasm};

use std::path::PathBuf;

/// Where `make wasm` leaves the filter, relative to the checkout.
pub const BUILT_WASM: &str = "target/wasm32-wasip1/wasm-release/dialtone.wasm";

/// Where the built filter is when none is named: `$DIALTONE_WASM`, else
/// [`BUILT_WASM`] in the dialtone checkout (`$DIALTONE_ROOT`, else the one
/// holding the current directory). Never the tree the harness was built in.
pub fn default_wasm_path() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("DIALTONE_WASM").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    dialtone_devstack::repo_root()
        .map(|root| root.join(BUILT_WASM))
        .map_err(|e| format!("no --wasm FILE or DIALTONE_WASM given, and {e}"))
}
