//! W0 of `make bench`: an HTTP filter that does nothing. Every proxy-wasm
//! filter pays at least this much in Envoy (a VM call per callback and the
//! ABI's header reads), so dialtone's cost is measured against it as well as
//! against no filter at all. Built with the same `wasm-release` profile as
//! dialtone, run in the same V8 runtime.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Pass) });
}}

struct Pass;

impl Context for Pass {}

// Every callback keeps its default: Action::Continue.
impl HttpContext for Pass {}
