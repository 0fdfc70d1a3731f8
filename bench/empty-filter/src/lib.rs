//! The floors of `make bench`, as proxy-wasm filters built with the same
//! `wasm-release` profile as dialtone and run in the same V8 runtime:
//!
//! - W0 (no configuration): an HTTP filter that does nothing. Every
//!   proxy-wasm filter pays at least this (a VM call per callback).
//! - W1 (configuration `callout`): one `dispatch_http_call` per request to
//!   the `dialtone_credits` cluster, a pause, and a resume when it answers,
//!   with no logic at all: what any wasm filter pays for one callout, the
//!   floor of dialtone's paid routes.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { mode: Rc::new(Mode::Nothing) }) });
}}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Nothing,
    Callout,
    Hostcalls { counters: [u32; 2] },
}

struct Root {
    mode: Rc<Mode>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let define = |name| {
            proxy_wasm::hostcalls::define_metric(proxy_wasm::types::MetricType::Counter, name).unwrap_or_default()
        };
        self.mode = Rc::new(match config.as_slice() {
            b"callout" => Mode::Callout,
            b"hostcalls" => Mode::Hostcalls { counters: [define("bench.w2.allowed"), define("bench.w2.cache_hit")] },
            _ => Mode::Nothing,
        });
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Pass { mode: *self.mode }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Pass {
    mode: Mode,
}

impl Context for Pass {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, _body: usize, _trailers: usize) {
        self.resume_http_request();
    }
}

impl HttpContext for Pass {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.mode {
            Mode::Nothing => return Action::Continue,
            Mode::Hostcalls { counters } => {
                let headers = self.get_http_request_headers_bytes();
                let _ = std::hint::black_box((headers, self.get_current_time()));
                self.set_http_request_header("authorization", None);
                for (name, value) in [
                    ("x-dialtone-auth-method", "privy"),
                    ("x-dialtone-charged", "0"),
                    ("x-dialtone-account", "did:privy:bench"),
                    ("x-dialtone-route", "free"),
                ] {
                    self.add_http_request_header(name, value);
                }
                for id in counters {
                    let _ = proxy_wasm::hostcalls::increment_metric(id, 1);
                }
                return Action::Continue;
            }
            Mode::Callout => {}
        }
        let headers = vec![(":method", "POST"), (":path", "/v1/debit"), (":authority", "credits"), ("content-type", "application/json")];
        match self.dispatch_http_call("dialtone_credits", headers, Some(b"{}"), vec![], Duration::from_secs(2)) {
            Ok(_) => Action::Pause,
            Err(_) => Action::Continue,
        }
    }
}
