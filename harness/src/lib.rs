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

/// Where the built filter is: `$DIALTONE_WASM`, else the workspace's
/// `target/wasm32-wasip1/wasm-release/dialtone.wasm` (built by `make wasm`).
pub fn default_wasm_path() -> PathBuf {
    std::env::var_os("DIALTONE_WASM").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip1/wasm-release/dialtone.wasm")
    })
}
