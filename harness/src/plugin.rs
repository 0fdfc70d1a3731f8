//! The Rust API tests use: load the compiled filter with a plugin config,
//! drive HTTP streams through it, answer its callouts, control the clock.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use wasmtime::{Config, Engine, Instance, InstancePre, Linker, Module, Store, TypedFunc};

use crate::abi::{Action, HeaderMap, LogLevel};
use crate::host::{self, CallResponse, Callout, HostState, LocalReply, LogLine, Metric, Stream};

/// A compiled filter module, shareable across threads and plugin instances
/// (compiling is the slow part; instantiating is cheap).
#[derive(Clone)]
pub struct Wasm {
    engine: Engine,
    pre: Arc<InstancePre<HostState>>,
    metered: bool,
}

impl Wasm {
    pub fn from_file(path: &Path) -> Result<Wasm> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_bytes(&bytes)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Wasm> {
        Self::compile(bytes, false)
    }

    /// The same, counting the WebAssembly instructions the filter executes
    /// (wasmtime's fuel; [`Plugin::instructions`]): a cost measure that,
    /// unlike a wall clock, is the same on every run and every machine.
    /// Slower to run: for measuring, not for the test suites.
    pub fn metered_from_file(path: &Path) -> Result<Wasm> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::compile(&bytes, true)
    }

    fn compile(bytes: &[u8], metered: bool) -> Result<Wasm> {
        let mut config = Config::new();
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        config.consume_fuel(metered);
        let engine = Engine::new(&config)?;
        let module = Module::new(&engine, bytes)?;
        let mut linker = Linker::new(&engine);
        host::define(&mut linker)?;
        // Fails here, naming the import, if the filter needs a host call this
        // harness does not provide.
        let pre = linker.instantiate_pre(&module)?;
        Ok(Wasm { engine, pre: Arc::new(pre), metered })
    }
}

/// How to start a plugin: what Envoy would hand the VM.
#[derive(Debug, Clone)]
pub struct PluginOptions {
    /// The plugin `configuration` (for dialtone: the policy JSON).
    pub configuration: Vec<u8>,
    /// `vm_config.configuration`.
    pub vm_configuration: Vec<u8>,
    /// `vm_config.environment_variables`.
    pub env: Vec<(String, String)>,
    /// The host clock at start, nanoseconds since the epoch.
    pub now_nanos: u64,
}

impl PluginOptions {
    pub fn new(configuration: impl Into<Vec<u8>>) -> PluginOptions {
        PluginOptions {
            configuration: configuration.into(),
            vm_configuration: Vec::new(),
            env: Vec::new(),
            now_nanos: 1_800_000_000 * 1_000_000_000,
        }
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn clock_secs(mut self, unix_secs: i64) -> Self {
        self.now_nanos = (unix_secs.max(0) as u64).saturating_mul(1_000_000_000);
        self
    }
}

/// Why a plugin did not start.
#[derive(Debug)]
pub enum StartError {
    /// `proxy_on_configure` returned false: Envoy refuses the plugin. The
    /// filter's log lines say why.
    ConfigRefused { logs: Vec<LogLine> },
    /// `proxy_on_vm_start` returned false.
    VmStartRefused { logs: Vec<LogLine> },
    /// The module trapped (a panic in the filter) or could not be instantiated.
    Crashed(anyhow::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::ConfigRefused { logs } | StartError::VmStartRefused { logs } => {
                write!(f, "plugin refused to start")?;
                for l in logs {
                    write!(f, "\n  [{:?}] {}", l.level, l.message)?;
                }
                Ok(())
            }
            StartError::Crashed(e) => write!(f, "plugin crashed: {e:#}"),
        }
    }
}

impl std::error::Error for StartError {}

const ROOT_CONTEXT: u32 = 1;

/// The fuel a metered plugin starts with: more than any run spends.
const FUEL: u64 = u64::MAX / 2;

struct Exports {
    on_context_create: TypedFunc<(i32, i32), ()>,
    on_vm_start: TypedFunc<(i32, i32), i32>,
    on_configure: TypedFunc<(i32, i32), i32>,
    on_request_headers: TypedFunc<(i32, i32, i32), i32>,
    on_request_body: TypedFunc<(i32, i32, i32), i32>,
    on_response_headers: TypedFunc<(i32, i32, i32), i32>,
    on_http_call_response: TypedFunc<(i32, i32, i32, i32, i32), ()>,
    on_tick: TypedFunc<i32, ()>,
    on_done: TypedFunc<i32, i32>,
    on_log: TypedFunc<i32, ()>,
    on_delete: TypedFunc<i32, ()>,
}

/// One running plugin: a VM instance with its root context configured.
pub struct Plugin {
    store: Store<HostState>,
    exports: Exports,
    next_context: u32,
    /// Set when the module trapped: like Envoy, the VM is then dead.
    crashed: Option<String>,
}

fn typed<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
    inst: &Instance,
    store: &mut Store<HostState>,
    name: &str,
) -> Result<TypedFunc<P, R>> {
    inst.get_typed_func::<P, R>(&mut *store, name).with_context(|| format!("export {name}"))
}

impl Plugin {
    /// Instantiates the module and runs what Envoy runs at plugin start:
    /// `_initialize`, the root context, `proxy_on_vm_start`, `proxy_on_configure`.
    pub fn start(wasm: &Wasm, opts: PluginOptions) -> Result<Plugin, StartError> {
        let state = HostState {
            now_nanos: opts.now_nanos,
            env: opts.env,
            vm_configuration: opts.vm_configuration,
            plugin_configuration: opts.configuration,
            rng_state: 0x9E37_79B9_7F4A_7C15,
            log_level: 0,
            ..HostState::default()
        };
        let mut store = Store::new(&wasm.engine, state);
        if wasm.metered {
            store.set_fuel(FUEL).map_err(StartError::Crashed)?;
        }
        let inst = wasm.pre.instantiate(&mut store).map_err(StartError::Crashed)?;
        let exports = (|| -> Result<Exports> {
            Ok(Exports {
                on_context_create: typed(&inst, &mut store, "proxy_on_context_create")?,
                on_vm_start: typed(&inst, &mut store, "proxy_on_vm_start")?,
                on_configure: typed(&inst, &mut store, "proxy_on_configure")?,
                on_request_headers: typed(&inst, &mut store, "proxy_on_request_headers")?,
                on_request_body: typed(&inst, &mut store, "proxy_on_request_body")?,
                on_response_headers: typed(&inst, &mut store, "proxy_on_response_headers")?,
                on_http_call_response: typed(&inst, &mut store, "proxy_on_http_call_response")?,
                on_tick: typed(&inst, &mut store, "proxy_on_tick")?,
                on_done: typed(&inst, &mut store, "proxy_on_done")?,
                on_log: typed(&inst, &mut store, "proxy_on_log")?,
                on_delete: typed(&inst, &mut store, "proxy_on_delete")?,
            })
        })()
        .map_err(StartError::Crashed)?;
        if let Ok(init) = inst.get_typed_func::<(), ()>(&mut store, "_initialize") {
            init.call(&mut store, ()).map_err(StartError::Crashed)?;
        }
        let mut plugin = Plugin { store, exports, next_context: ROOT_CONTEXT + 1, crashed: None };
        let root = ROOT_CONTEXT as i32;
        plugin.store.data_mut().effective_context = ROOT_CONTEXT;
        let f = plugin.exports.on_context_create.clone();
        f.call(&mut plugin.store, (root, 0)).map_err(StartError::Crashed)?;
        let vm_size = plugin.store.data().vm_configuration.len() as i32;
        let f = plugin.exports.on_vm_start.clone();
        if f.call(&mut plugin.store, (root, vm_size)).map_err(StartError::Crashed)? == 0 {
            return Err(StartError::VmStartRefused { logs: plugin.store.data().logs.clone() });
        }
        let cfg_size = plugin.store.data().plugin_configuration.len() as i32;
        let f = plugin.exports.on_configure.clone();
        if f.call(&mut plugin.store, (root, cfg_size)).map_err(StartError::Crashed)? == 0 {
            return Err(StartError::ConfigRefused { logs: plugin.store.data().logs.clone() });
        }
        Ok(plugin)
    }

    /// Runs a guest callback, turning a trap into a dead VM.
    fn guard<T>(&mut self, f: impl FnOnce(&mut Store<HostState>) -> Result<T>) -> Result<T> {
        if let Some(why) = &self.crashed {
            bail!("the VM crashed earlier: {why}");
        }
        f(&mut self.store).map_err(|e| {
            let msg = format!("{e:#}");
            self.crashed = Some(msg.clone());
            anyhow!("the filter crashed (the VM is dead): {msg}")
        })
    }

    /// The WebAssembly instructions this plugin has executed so far (each
    /// costs one unit of wasmtime fuel), if its module is
    /// [`Wasm::metered_from_file`].
    pub fn instructions(&self) -> Option<u64> {
        self.store.get_fuel().ok().map(|left| FUEL - left)
    }

    pub fn crashed(&self) -> Option<&str> {
        self.crashed.as_deref()
    }

    /// Sets the host clock.
    pub fn set_time_secs(&mut self, unix_secs: i64) {
        self.store.data_mut().now_nanos = (unix_secs.max(0) as u64).saturating_mul(1_000_000_000);
    }

    pub fn set_time_nanos(&mut self, nanos: u64) {
        self.store.data_mut().now_nanos = nanos;
    }

    pub fn advance(&mut self, by: Duration) {
        let st = self.store.data_mut();
        st.now_nanos = st.now_nanos.saturating_add(by.as_nanos() as u64);
    }

    pub fn now_nanos(&self) -> u64 {
        self.store.data().now_nanos
    }

    /// The tick period the filter asked for (0 = none).
    pub fn tick_period(&self) -> Duration {
        Duration::from_millis(u64::from(self.store.data().tick_period_ms))
    }

    /// Fires `proxy_on_tick` on the root context.
    pub fn tick(&mut self) -> Result<()> {
        let f = self.exports.on_tick.clone();
        self.store.data_mut().effective_context = ROOT_CONTEXT;
        self.guard(|s| f.call(s, ROOT_CONTEXT as i32))
    }

    pub fn logs(&self) -> &[LogLine] {
        &self.store.data().logs
    }

    /// All log text at or above `level`, one line per entry.
    pub fn log_text(&self, level: LogLevel) -> String {
        self.logs().iter().filter(|l| l.level >= level).map(|l| l.message.as_str()).collect::<Vec<_>>().join("\n")
    }

    pub fn metrics(&self) -> &[Metric] {
        &self.store.data().metrics
    }

    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.metrics().iter().find(|m| m.name == name)
    }

    /// Every callout dispatched by any stream of this plugin, in order.
    pub fn callout_log(&self) -> &[Callout] {
        &self.store.data().callout_log
    }

    pub fn shared_data(&self, key: &str) -> Option<Vec<u8>> {
        self.store.data().shared_data.get(key).map(|(v, _)| v.clone())
    }

    /// Writes a shared-data entry as another VM with the same `vm_id` would
    /// (another worker of this Envoy, another plugin, an older build): the
    /// compare-and-swap counter moves on, as in Envoy.
    pub fn set_shared_data(&mut self, key: &str, value: &[u8]) {
        let data = &mut self.store.data_mut().shared_data;
        let cas = data.get(key).map_or(1, |(_, cas)| cas.wrapping_add(1));
        data.insert(key.to_owned(), (value.to_vec(), cas));
    }

    /// Every shared-data entry, sorted by key (to copy one VM's writes into
    /// another's view, as two workers of one Envoy see one store).
    pub fn shared_entries(&self) -> Vec<(String, Vec<u8>)> {
        let mut all: Vec<_> = self.store.data().shared_data.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect();
        all.sort();
        all
    }

    /// Hands the root context a new plugin configuration, as a host may on
    /// a config update (`proxy_on_configure` again on the same VM). Returns
    /// whether the filter took it.
    pub fn reconfigure(&mut self, configuration: impl Into<Vec<u8>>) -> Result<bool> {
        self.store.data_mut().plugin_configuration = configuration.into();
        let size = self.store.data().plugin_configuration.len() as i32;
        let f = self.exports.on_configure.clone();
        self.store.data_mut().effective_context = ROOT_CONTEXT;
        self.guard(|s| f.call(s, (ROOT_CONTEXT as i32, size))).map(|ok| ok != 0)
    }

    /// The guest's stdout/stderr (WASI fd 1 and 2).
    pub fn stdio(&self) -> (String, String) {
        let st = self.store.data();
        (String::from_utf8_lossy(&st.stdout).into_owned(), String::from_utf8_lossy(&st.stderr).into_owned())
    }

    /// Every callout not answered yet, of any context (the root context's
    /// own, e.g. a JWKS fetch, included).
    pub fn pending_callouts(&self) -> Vec<Callout> {
        self.store.data().callouts.clone()
    }

    /// Answers the callout `token`, whichever context made it.
    pub fn answer(&mut self, token: u32, answer: CallAnswer) -> Result<()> {
        let st = self.store.data_mut();
        let Some(pos) = st.callouts.iter().position(|c| c.token == token) else {
            bail!("no pending callout with token {token}");
        };
        let callout = st.callouts.remove(pos);
        let (resp, n_headers, body_size) = match answer {
            CallAnswer::Failed => (CallResponse::default(), 0, 0),
            CallAnswer::Response { status, headers, body } => {
                let mut map: HeaderMap = vec![(":status".into(), status.to_string().into_bytes())];
                map.extend(headers.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v.into_bytes())));
                let (n, b) = (map.len(), body.len());
                (CallResponse { headers: map, body, trailers: vec![] }, n, b)
            }
        };
        st.call_response = Some(resp);
        st.effective_context = callout.context_id;
        let f = self.exports.on_http_call_response.clone();
        let r = self.guard(|s| f.call(s, (callout.context_id as i32, token as i32, n_headers as i32, body_size as i32, 0)));
        self.store.data_mut().call_response = None;
        r
    }

    /// Opens a new HTTP stream (an HTTP context).
    pub fn http(&mut self) -> Result<HttpStream<'_>> {
        let id = self.next_context;
        self.next_context += 1;
        self.store.data_mut().streams.insert(id, Stream::default());
        self.store.data_mut().effective_context = id;
        let f = self.exports.on_context_create.clone();
        self.guard(|s| f.call(s, (id as i32, ROOT_CONTEXT as i32)))?;
        Ok(HttpStream { plugin: self, id, headers_action: None })
    }
}

/// How a stream stands after the filter ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The request went upstream, with these headers.
    Passed(HeaderMap),
    /// The filter answered itself.
    Replied(LocalReply),
    /// Waiting (for a callout).
    Paused,
}

/// The answer to a callout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallAnswer {
    Response { status: u16, headers: Vec<(String, String)>, body: Vec<u8> },
    /// No answer (refused, reset, timed out): Envoy calls back with no headers.
    Failed,
}

impl CallAnswer {
    pub fn json(status: u16, body: &serde_json::Value) -> CallAnswer {
        CallAnswer::Response {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    pub fn raw(status: u16, body: &[u8]) -> CallAnswer {
        CallAnswer::Response { status, headers: vec![], body: body.to_vec() }
    }
}

/// One HTTP stream through the filter.
pub struct HttpStream<'p> {
    plugin: &'p mut Plugin,
    id: u32,
    headers_action: Option<Action>,
}

impl HttpStream<'_> {
    pub fn context_id(&self) -> u32 {
        self.id
    }

    fn stream(&self) -> Option<&Stream> {
        self.plugin.store.data().streams.get(&self.id)
    }

    /// Sends the request headers (names are lower-cased, as Envoy does).
    /// Returns the filter's action.
    pub fn send_request_headers(&mut self, headers: &[(&str, &[u8])], end_of_stream: bool) -> Result<Action> {
        let map: HeaderMap = headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.to_vec())).collect();
        let n = map.len() as i32;
        let id = self.id;
        if let Some(s) = self.plugin.store.data_mut().streams.get_mut(&id) {
            s.request_headers = map;
        }
        self.plugin.store.data_mut().effective_context = id;
        let f = self.plugin.exports.on_request_headers.clone();
        let raw = self.plugin.guard(|s| f.call(s, (id as i32, n, i32::from(end_of_stream))))?;
        let action = Action::from_raw(raw);
        self.headers_action = Some(action);
        Ok(action)
    }

    /// Convenience: headers as text.
    pub fn request(&mut self, headers: &[(&str, &str)]) -> Result<Action> {
        let raw: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        self.send_request_headers(&raw, true)
    }

    /// Sends a request body chunk. Like Envoy (whose proxy-wasm host turns a
    /// paused `on_request_headers` into StopAllIterationAndWatermark), the
    /// body of a request whose headers are paused is buffered, not shown to
    /// the filter; it is delivered, whole, once the filter resumes the request.
    pub fn send_request_body(&mut self, body: &[u8], end_of_stream: bool) -> Result<Action> {
        let id = self.id;
        if let Some(s) = self.plugin.store.data_mut().streams.get_mut(&id) {
            s.request_body.extend_from_slice(body);
        }
        let headers_paused = self.headers_action == Some(Action::Pause) && !self.stream().is_some_and(|s| s.request_resumed);
        if headers_paused || self.local_reply().is_some() {
            return Ok(Action::Pause);
        }
        let size = self.stream().map(|s| s.request_body.len()).unwrap_or(0) as i32;
        self.plugin.store.data_mut().effective_context = id;
        let f = self.plugin.exports.on_request_body.clone();
        let raw = self.plugin.guard(|s| f.call(s, (id as i32, size, i32::from(end_of_stream))))?;
        Ok(Action::from_raw(raw))
    }

    /// The upstream's response headers, for filters that look at them.
    pub fn send_response_headers(&mut self, headers: &[(&str, &str)]) -> Result<Action> {
        let map: HeaderMap = headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec())).collect();
        let n = map.len() as i32;
        let id = self.id;
        if let Some(s) = self.plugin.store.data_mut().streams.get_mut(&id) {
            s.response_headers = map;
        }
        self.plugin.store.data_mut().effective_context = id;
        let f = self.plugin.exports.on_response_headers.clone();
        let raw = self.plugin.guard(|s| f.call(s, (id as i32, n, 1)))?;
        Ok(Action::from_raw(raw))
    }

    /// Callouts this stream dispatched that have not been answered yet.
    pub fn pending_callouts(&self) -> Vec<Callout> {
        self.plugin.store.data().callouts.iter().filter(|c| c.context_id == self.id).cloned().collect()
    }

    /// Every callout this stream dispatched.
    pub fn callouts(&self) -> Vec<Callout> {
        self.plugin.store.data().callout_log.iter().filter(|c| c.context_id == self.id).cloned().collect()
    }

    /// Answers the callout `token`.
    pub fn answer(&mut self, token: u32, answer: CallAnswer) -> Result<()> {
        self.plugin.answer(token, answer)
    }

    /// Answers the oldest pending callout.
    pub fn answer_next(&mut self, answer: CallAnswer) -> Result<Callout> {
        let callout = self.pending_callouts().into_iter().next().ok_or_else(|| anyhow!("no pending callout"))?;
        self.answer(callout.token, answer)?;
        Ok(callout)
    }

    /// The filter resumed a response it had paused (`proxy_continue_stream`).
    pub fn response_resumed(&self) -> bool {
        self.stream().is_some_and(|s| s.response_resumed)
    }

    pub fn local_reply(&self) -> Option<LocalReply> {
        self.stream().and_then(|s| s.local_reply.clone())
    }

    /// The upstream's response headers as they stand after the filter (what
    /// the client gets unless the filter replied locally instead).
    pub fn response_headers(&self) -> HeaderMap {
        self.stream().map(|s| s.response_headers.clone()).unwrap_or_default()
    }

    /// The request headers as they stand (what the upstream gets if passed).
    pub fn request_headers(&self) -> HeaderMap {
        self.stream().map(|s| s.request_headers.clone()).unwrap_or_default()
    }

    pub fn upstream_header(&self, name: &str) -> Option<String> {
        host::header_value(&self.request_headers(), name)
    }

    pub fn outcome(&self) -> Outcome {
        let Some(s) = self.stream() else { return Outcome::Paused };
        if let Some(r) = &s.local_reply {
            return Outcome::Replied(r.clone());
        }
        if self.headers_action == Some(Action::Continue) || s.request_resumed {
            return Outcome::Passed(s.request_headers.clone());
        }
        Outcome::Paused
    }

    /// Ends the stream as Envoy does: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`.
    pub fn close(self) -> Result<()> {
        let id = self.id as i32;
        let (done, log, delete) = (self.plugin.exports.on_done.clone(), self.plugin.exports.on_log.clone(), self.plugin.exports.on_delete.clone());
        self.plugin.store.data_mut().effective_context = self.id;
        self.plugin.guard(|s| {
            done.call(&mut *s, id)?;
            log.call(&mut *s, id)?;
            delete.call(&mut *s, id)?;
            Ok(())
        })?;
        self.plugin.store.data_mut().streams.remove(&self.id);
        Ok(())
    }
}
