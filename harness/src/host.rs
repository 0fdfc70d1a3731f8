//! The host side of the proxy-wasm ABI: per-instance state and the imported
//! functions (`env.proxy_*` and the WASI preview1 calls a wasm32-wasip1
//! build needs). Nothing here is global: every plugin instance owns its
//! `HostState`, so tests run in parallel.

use std::collections::{HashMap, VecDeque};

use anyhow::{anyhow, bail, Context as _, Result};
use wasmtime::{Caller, Extern, Linker, Memory};

use crate::abi::{self, buffer_type, map_type, status, stream_type, HeaderMap, LogLevel, MetricKind};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: LogLevel,
    pub message: String,
}

/// A reply the filter wrote itself (`proxy_send_local_response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub details: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl LocalReply {
    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.headers, name)
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// First value of a header (case-insensitive name), lossily as text.
pub fn header_value(map: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    map.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// An HTTP callout the filter dispatched (`proxy_http_call`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    pub token: u32,
    /// The context that was current when it was dispatched.
    pub context_id: u32,
    /// The Envoy cluster name.
    pub upstream: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub trailers: HeaderMap,
    pub timeout_ms: u32,
}

impl Callout {
    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.headers, name)
    }

    pub fn path(&self) -> String {
        self.header(":path").unwrap_or_default()
    }

    pub fn body_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One HTTP stream (an HTTP context) as the host sees it.
#[derive(Debug, Clone, Default)]
pub struct Stream {
    pub request_headers: HeaderMap,
    pub request_body: Vec<u8>,
    pub request_trailers: HeaderMap,
    pub response_headers: HeaderMap,
    pub response_body: Vec<u8>,
    pub response_trailers: HeaderMap,
    pub local_reply: Option<LocalReply>,
    /// The filter resumed a paused request (`proxy_continue_stream`).
    pub request_resumed: bool,
    pub response_resumed: bool,
    pub closed: bool,
}

#[derive(Debug, Clone)]
pub struct Metric {
    pub kind: MetricKind,
    pub name: String,
    pub value: i64,
    /// Histogram samples (for histograms).
    pub samples: Vec<u64>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Queue {
    vm_id: String,
    name: String,
    items: VecDeque<Vec<u8>>,
}

/// The answer a callout is waiting for, while `proxy_on_http_call_response` runs.
#[derive(Debug, Clone, Default)]
pub struct CallResponse {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub trailers: HeaderMap,
}

/// Everything the host knows about one plugin instance.
#[derive(Debug, Default)]
pub struct HostState {
    pub now_nanos: u64,
    pub env: Vec<(String, String)>,
    pub vm_configuration: Vec<u8>,
    pub plugin_configuration: Vec<u8>,
    pub logs: Vec<LogLine>,
    pub log_level: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub effective_context: u32,
    pub streams: HashMap<u32, Stream>,
    /// Dispatched and not yet answered, in dispatch order.
    pub callouts: Vec<Callout>,
    /// Every callout ever dispatched (for assertions).
    pub callout_log: Vec<Callout>,
    pub next_token: u32,
    pub call_response: Option<CallResponse>,
    pub tick_period_ms: u32,
    pub shared_data: HashMap<String, (Vec<u8>, u32)>,
    pub(crate) queues: Vec<Queue>,
    pub metrics: Vec<Metric>,
    pub properties: HashMap<String, Vec<u8>>,
    pub rng_state: u64,
    pub proxy_done_called: bool,
    pub exit_code: Option<i32>,
}

impl HostState {
    fn stream(&mut self) -> Result<&mut Stream> {
        let id = self.effective_context;
        self.streams.get_mut(&id).ok_or_else(|| anyhow!("no HTTP stream for context {id}"))
    }

    fn map(&mut self, mtype: i32) -> Result<Option<&mut HeaderMap>> {
        Ok(match mtype {
            map_type::HTTP_REQUEST_HEADERS => Some(&mut self.stream()?.request_headers),
            map_type::HTTP_REQUEST_TRAILERS => Some(&mut self.stream()?.request_trailers),
            map_type::HTTP_RESPONSE_HEADERS => Some(&mut self.stream()?.response_headers),
            map_type::HTTP_RESPONSE_TRAILERS => Some(&mut self.stream()?.response_trailers),
            map_type::HTTP_CALL_RESPONSE_HEADERS => self.call_response.as_mut().map(|r| &mut r.headers),
            map_type::HTTP_CALL_RESPONSE_TRAILERS => self.call_response.as_mut().map(|r| &mut r.trailers),
            _ => None,
        })
    }

    fn buffer(&mut self, btype: i32) -> Result<Option<Vec<u8>>> {
        Ok(match btype {
            buffer_type::HTTP_REQUEST_BODY => Some(self.stream()?.request_body.clone()),
            buffer_type::HTTP_RESPONSE_BODY => Some(self.stream()?.response_body.clone()),
            buffer_type::HTTP_CALL_RESPONSE_BODY => self.call_response.as_ref().map(|r| r.body.clone()),
            buffer_type::VM_CONFIGURATION => Some(self.vm_configuration.clone()),
            buffer_type::PLUGIN_CONFIGURATION => Some(self.plugin_configuration.clone()),
            _ => None,
        })
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic per instance, plenty for HashMap seeds.
        let mut x = self.rng_state | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng_state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

type C<'a> = Caller<'a, HostState>;

fn memory(caller: &mut C<'_>) -> Result<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => bail!("the module exports no memory"),
    }
}

fn u(v: i32) -> usize {
    v as u32 as usize
}

pub(crate) fn read(caller: &mut C<'_>, ptr: i32, len: i32) -> Result<Vec<u8>> {
    let mem = memory(caller)?;
    let (start, len) = (u(ptr), u(len));
    mem.data(&*caller)
        .get(start..start.checked_add(len).context("overflow")?)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| anyhow!("guest pointer out of bounds: {start}+{len}"))
}

fn read_str(caller: &mut C<'_>, ptr: i32, len: i32) -> Result<String> {
    Ok(String::from_utf8_lossy(&read(caller, ptr, len)?).into_owned())
}

fn write(caller: &mut C<'_>, ptr: i32, bytes: &[u8]) -> Result<()> {
    let mem = memory(caller)?;
    let start = u(ptr);
    mem.data_mut(&mut *caller)
        .get_mut(start..start + bytes.len())
        .ok_or_else(|| anyhow!("guest pointer out of bounds: {start}+{}", bytes.len()))?
        .copy_from_slice(bytes);
    Ok(())
}

fn write_u32(caller: &mut C<'_>, ptr: i32, v: u32) -> Result<()> {
    write(caller, ptr, &v.to_le_bytes())
}

fn write_u64(caller: &mut C<'_>, ptr: i32, v: u64) -> Result<()> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Copies `bytes` into memory the guest allocates, and returns pointer and
/// size through the guest's out-parameters.
fn give(caller: &mut C<'_>, bytes: &[u8], ret_ptr: i32, ret_size: i32) -> Result<()> {
    let alloc = match caller.get_export("proxy_on_memory_allocate") {
        Some(Extern::Func(f)) => f.typed::<i32, i32>(&*caller)?,
        _ => bail!("the module exports no proxy_on_memory_allocate"),
    };
    let ptr = alloc.call(&mut *caller, bytes.len() as i32)?;
    if ptr == 0 && !bytes.is_empty() {
        bail!("guest allocation of {} bytes failed", bytes.len());
    }
    write(caller, ptr, bytes)?;
    write_u32(caller, ret_ptr, ptr as u32)?;
    write_u32(caller, ret_size, bytes.len() as u32)
}

fn lower(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// Registers every host function on `linker`.
pub fn define(linker: &mut Linker<HostState>) -> Result<()> {
    define_proxy(linker)?;
    define_wasi(linker)?;
    Ok(())
}

fn define_proxy(l: &mut Linker<HostState>) -> Result<()> {
    const ENV: &str = "env";

    l.func_wrap(ENV, "proxy_log", |mut c: C<'_>, level: i32, ptr: i32, len: i32| -> Result<i32> {
        let message = read_str(&mut c, ptr, len)?;
        c.data_mut().logs.push(LogLine { level: LogLevel::from_raw(level), message });
        Ok(status::OK)
    })?;
    l.func_wrap(ENV, "proxy_get_log_level", |mut c: C<'_>, ret: i32| -> Result<i32> {
        let level = c.data().log_level as u32;
        write_u32(&mut c, ret, level)?;
        Ok(status::OK)
    })?;
    l.func_wrap(ENV, "proxy_get_current_time_nanoseconds", |mut c: C<'_>, ret: i32| -> Result<i32> {
        let now = c.data().now_nanos;
        write_u64(&mut c, ret, now)?;
        Ok(status::OK)
    })?;
    l.func_wrap(ENV, "proxy_set_tick_period_milliseconds", |mut c: C<'_>, period: i32| -> Result<i32> {
        c.data_mut().tick_period_ms = period as u32;
        Ok(status::OK)
    })?;
    l.func_wrap(
        ENV,
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, btype: i32, start: i32, max: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
            let Some(buf) = c.data_mut().buffer(btype)? else { return Ok(status::NOT_FOUND) };
            let start = u(start).min(buf.len());
            let end = start.saturating_add(u(max)).min(buf.len());
            let slice = buf.get(start..end).unwrap_or_default().to_vec();
            if slice.is_empty() {
                // The SDK reads a null pointer as "no bytes".
                write_u32(&mut c, ret_ptr, 0)?;
                write_u32(&mut c, ret_size, 0)?;
                return Ok(status::OK);
            }
            give(&mut c, &slice, ret_ptr, ret_size)?;
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, btype: i32, start: i32, size: i32, ptr: i32, len: i32| -> Result<i32> {
            let data = read(&mut c, ptr, len)?;
            let st = c.data_mut();
            let buf = match btype {
                buffer_type::HTTP_REQUEST_BODY => &mut st.stream()?.request_body,
                buffer_type::HTTP_RESPONSE_BODY => &mut st.stream()?.response_body,
                _ => return Ok(status::BAD_ARGUMENT),
            };
            let start = u(start).min(buf.len());
            let end = start.saturating_add(u(size)).min(buf.len());
            buf.splice(start..end, data);
            Ok(status::OK)
        },
    )?;
    l.func_wrap(ENV, "proxy_get_header_map_pairs", |mut c: C<'_>, mtype: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
        let Some(map) = c.data_mut().map(mtype)? else { return Ok(status::NOT_FOUND) };
        let bytes = abi::serialize_map(map);
        give(&mut c, &bytes, ret_ptr, ret_size)?;
        Ok(status::OK)
    })?;
    l.func_wrap(ENV, "proxy_set_header_map_pairs", |mut c: C<'_>, mtype: i32, ptr: i32, len: i32| -> Result<i32> {
        let bytes = read(&mut c, ptr, len)?;
        let Some(new) = abi::deserialize_map(&bytes) else { return Ok(status::BAD_ARGUMENT) };
        let Some(map) = c.data_mut().map(mtype)? else { return Ok(status::NOT_FOUND) };
        *map = new.into_iter().map(|(k, v)| (lower(&k), v)).collect();
        Ok(status::OK)
    })?;
    l.func_wrap(
        ENV,
        "proxy_get_header_map_value",
        |mut c: C<'_>, mtype: i32, kptr: i32, klen: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
            let key = lower(&read_str(&mut c, kptr, klen)?);
            let Some(map) = c.data_mut().map(mtype)? else { return Ok(status::NOT_FOUND) };
            let Some(value) = map.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()) else {
                return Ok(status::NOT_FOUND);
            };
            give(&mut c, &value, ret_ptr, ret_size)?;
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_replace_header_map_value",
        |mut c: C<'_>, mtype: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| -> Result<i32> {
            let key = lower(&read_str(&mut c, kptr, klen)?);
            let value = read(&mut c, vptr, vlen)?;
            let Some(map) = c.data_mut().map(mtype)? else { return Ok(status::NOT_FOUND) };
            // Envoy's setCopy: all existing values go, one remains.
            map.retain(|(k, _)| *k != key);
            map.push((key, value));
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_add_header_map_value",
        |mut c: C<'_>, mtype: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| -> Result<i32> {
            let key = lower(&read_str(&mut c, kptr, klen)?);
            let value = read(&mut c, vptr, vlen)?;
            let Some(map) = c.data_mut().map(mtype)? else { return Ok(status::NOT_FOUND) };
            map.push((key, value));
            Ok(status::OK)
        },
    )?;
    l.func_wrap(ENV, "proxy_remove_header_map_value", |mut c: C<'_>, mtype: i32, kptr: i32, klen: i32| -> Result<i32> {
        let key = lower(&read_str(&mut c, kptr, klen)?);
        let Some(map) = c.data_mut().map(mtype)? else { return Ok(status::NOT_FOUND) };
        map.retain(|(k, _)| *k != key);
        Ok(status::OK)
    })?;
    l.func_wrap(ENV, "proxy_get_property", |mut c: C<'_>, pptr: i32, plen: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
        let path = read(&mut c, pptr, plen)?;
        let key = String::from_utf8_lossy(&path).replace('\0', ".");
        let Some(value) = c.data().properties.get(&key).cloned() else { return Ok(status::NOT_FOUND) };
        give(&mut c, &value, ret_ptr, ret_size)?;
        Ok(status::OK)
    })?;
    l.func_wrap(ENV, "proxy_set_property", |mut c: C<'_>, pptr: i32, plen: i32, vptr: i32, vlen: i32| -> Result<i32> {
        let path = read(&mut c, pptr, plen)?;
        let value = read(&mut c, vptr, vlen)?;
        let key = String::from_utf8_lossy(&path).replace('\0', ".");
        c.data_mut().properties.insert(key, value);
        Ok(status::OK)
    })?;
    l.func_wrap(
        ENV,
        "proxy_get_shared_data",
        |mut c: C<'_>, kptr: i32, klen: i32, ret_ptr: i32, ret_size: i32, ret_cas: i32| -> Result<i32> {
            let key = read_str(&mut c, kptr, klen)?;
            let Some((value, cas)) = c.data().shared_data.get(&key).cloned() else { return Ok(status::NOT_FOUND) };
            give(&mut c, &value, ret_ptr, ret_size)?;
            write_u32(&mut c, ret_cas, cas)?;
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_set_shared_data",
        |mut c: C<'_>, kptr: i32, klen: i32, vptr: i32, vlen: i32, cas: i32| -> Result<i32> {
            let key = read_str(&mut c, kptr, klen)?;
            let value = read(&mut c, vptr, vlen)?;
            let cas = cas as u32;
            let data = &mut c.data_mut().shared_data;
            let current = data.get(&key).map(|(_, c)| *c).unwrap_or(0);
            if cas != 0 && cas != current {
                return Ok(status::CAS_MISMATCH);
            }
            data.insert(key, (value, current.wrapping_add(1).max(1)));
            Ok(status::OK)
        },
    )?;
    l.func_wrap(ENV, "proxy_register_shared_queue", |mut c: C<'_>, nptr: i32, nlen: i32, ret_id: i32| -> Result<i32> {
        let name = read_str(&mut c, nptr, nlen)?;
        let queues = &mut c.data_mut().queues;
        let id = match queues.iter().position(|q| q.name == name && q.vm_id.is_empty()) {
            Some(i) => i,
            None => {
                queues.push(Queue { name, ..Queue::default() });
                queues.len() - 1
            }
        };
        write_u32(&mut c, ret_id, id as u32 + 1)?;
        Ok(status::OK)
    })?;
    l.func_wrap(
        ENV,
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, vptr: i32, vlen: i32, nptr: i32, nlen: i32, ret_id: i32| -> Result<i32> {
            let _vm_id = read_str(&mut c, vptr, vlen)?;
            let name = read_str(&mut c, nptr, nlen)?;
            let Some(i) = c.data().queues.iter().position(|q| q.name == name) else { return Ok(status::NOT_FOUND) };
            write_u32(&mut c, ret_id, i as u32 + 1)?;
            Ok(status::OK)
        },
    )?;
    l.func_wrap(ENV, "proxy_dequeue_shared_queue", |mut c: C<'_>, id: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
        let Some(q) = c.data_mut().queues.get_mut((id as u32 as usize).wrapping_sub(1)) else {
            return Ok(status::NOT_FOUND);
        };
        let Some(item) = q.items.pop_front() else { return Ok(status::EMPTY) };
        give(&mut c, &item, ret_ptr, ret_size)?;
        Ok(status::OK)
    })?;
    l.func_wrap(ENV, "proxy_enqueue_shared_queue", |mut c: C<'_>, id: i32, vptr: i32, vlen: i32| -> Result<i32> {
        let value = read(&mut c, vptr, vlen)?;
        let Some(q) = c.data_mut().queues.get_mut((id as u32 as usize).wrapping_sub(1)) else {
            return Ok(status::NOT_FOUND);
        };
        q.items.push_back(value);
        Ok(status::OK)
    })?;
    l.func_wrap(ENV, "proxy_continue_stream", |mut c: C<'_>, stype: i32| -> Result<i32> {
        let s = c.data_mut().stream()?;
        match stype {
            stream_type::HTTP_REQUEST => s.request_resumed = true,
            stream_type::HTTP_RESPONSE => s.response_resumed = true,
            _ => return Ok(status::BAD_ARGUMENT),
        }
        Ok(status::OK)
    })?;
    l.func_wrap(ENV, "proxy_close_stream", |mut c: C<'_>, _stype: i32| -> Result<i32> {
        c.data_mut().stream()?.closed = true;
        Ok(status::OK)
    })?;
    l.func_wrap(
        ENV,
        "proxy_send_local_response",
        |mut c: C<'_>, code: i32, dptr: i32, dlen: i32, bptr: i32, blen: i32, hptr: i32, hlen: i32, _grpc: i32| -> Result<i32> {
            let details = read_str(&mut c, dptr, dlen)?;
            let body = read(&mut c, bptr, blen)?;
            let hbytes = read(&mut c, hptr, hlen)?;
            let Some(headers) = abi::deserialize_map(&hbytes) else { return Ok(status::BAD_ARGUMENT) };
            let headers = headers.into_iter().map(|(k, v)| (lower(&k), v)).collect();
            let s = c.data_mut().stream()?;
            s.local_reply = Some(LocalReply { status: code as u32, details, headers, body });
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_http_call",
        |mut c: C<'_>,
         uptr: i32,
         ulen: i32,
         hptr: i32,
         hlen: i32,
         bptr: i32,
         blen: i32,
         tptr: i32,
         tlen: i32,
         timeout: i32,
         ret_token: i32|
         -> Result<i32> {
            let upstream = read_str(&mut c, uptr, ulen)?;
            let headers = abi::deserialize_map(&read(&mut c, hptr, hlen)?);
            let body = read(&mut c, bptr, blen)?;
            let trailers = abi::deserialize_map(&read(&mut c, tptr, tlen)?);
            let (Some(headers), Some(trailers)) = (headers, trailers) else { return Ok(status::BAD_ARGUMENT) };
            // Envoy refuses a callout without these pseudo-headers.
            for required in [":method", ":path", ":authority"] {
                if header_value(&headers, required).is_none_or(|v| v.is_empty()) {
                    return Ok(status::BAD_ARGUMENT);
                }
            }
            let st = c.data_mut();
            st.next_token += 1;
            let token = st.next_token;
            let callout = Callout {
                token,
                context_id: st.effective_context,
                upstream,
                headers,
                body,
                trailers,
                timeout_ms: timeout as u32,
            };
            st.callouts.push(callout.clone());
            st.callout_log.push(callout);
            write_u32(&mut c, ret_token, token)?;
            Ok(status::OK)
        },
    )?;
    // gRPC is not offered by this host: the SDK maps these statuses to errors.
    l.func_wrap(
        ENV,
        "proxy_grpc_call",
        |_c: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| -> i32 {
            status::INTERNAL_FAILURE
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_grpc_stream",
        |_c: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| -> i32 { status::INTERNAL_FAILURE },
    )?;
    l.func_wrap(ENV, "proxy_grpc_send", |_c: C<'_>, _: i32, _: i32, _: i32, _: i32| -> i32 { status::NOT_FOUND })?;
    l.func_wrap(ENV, "proxy_grpc_cancel", |_c: C<'_>, _: i32| -> i32 { status::NOT_FOUND })?;
    l.func_wrap(ENV, "proxy_grpc_close", |_c: C<'_>, _: i32| -> i32 { status::NOT_FOUND })?;
    l.func_wrap(ENV, "proxy_get_status", |mut c: C<'_>, ret_code: i32, ret_ptr: i32, ret_size: i32| -> Result<i32> {
        write_u32(&mut c, ret_code, 0)?;
        write_u32(&mut c, ret_ptr, 0)?;
        write_u32(&mut c, ret_size, 0)?;
        Ok(status::OK)
    })?;
    l.func_wrap(ENV, "proxy_set_effective_context", |mut c: C<'_>, ctx: i32| -> i32 {
        c.data_mut().effective_context = ctx as u32;
        status::OK
    })?;
    l.func_wrap(
        ENV,
        "proxy_call_foreign_function",
        |_c: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| -> i32 { status::NOT_FOUND },
    )?;
    l.func_wrap(ENV, "proxy_done", |mut c: C<'_>| -> i32 {
        c.data_mut().proxy_done_called = true;
        status::OK
    })?;
    l.func_wrap(ENV, "proxy_define_metric", |mut c: C<'_>, kind: i32, nptr: i32, nlen: i32, ret_id: i32| -> Result<i32> {
        let name = read_str(&mut c, nptr, nlen)?;
        let kind = match kind {
            0 => MetricKind::Counter,
            1 => MetricKind::Gauge,
            2 => MetricKind::Histogram,
            _ => return Ok(status::BAD_ARGUMENT),
        };
        let metrics = &mut c.data_mut().metrics;
        let id = match metrics.iter().position(|m| m.name == name) {
            Some(i) => i,
            None => {
                metrics.push(Metric { kind, name, value: 0, samples: Vec::new() });
                metrics.len() - 1
            }
        };
        write_u32(&mut c, ret_id, id as u32 + 1)?;
        Ok(status::OK)
    })?;
    l.func_wrap(ENV, "proxy_get_metric", |mut c: C<'_>, id: i32, ret: i32| -> Result<i32> {
        let Some(m) = c.data().metrics.get((id as u32 as usize).wrapping_sub(1)) else { return Ok(status::NOT_FOUND) };
        let v = m.value as u64;
        write_u64(&mut c, ret, v)?;
        Ok(status::OK)
    })?;
    l.func_wrap(ENV, "proxy_record_metric", |mut c: C<'_>, id: i32, value: i64| -> i32 {
        let Some(m) = c.data_mut().metrics.get_mut((id as u32 as usize).wrapping_sub(1)) else { return status::NOT_FOUND };
        match m.kind {
            MetricKind::Histogram => m.samples.push(value as u64),
            _ => m.value = value,
        }
        status::OK
    })?;
    l.func_wrap(ENV, "proxy_increment_metric", |mut c: C<'_>, id: i32, offset: i64| -> i32 {
        let Some(m) = c.data_mut().metrics.get_mut((id as u32 as usize).wrapping_sub(1)) else { return status::NOT_FOUND };
        if m.kind == MetricKind::Histogram {
            return status::BAD_ARGUMENT;
        }
        m.value = m.value.saturating_add(offset);
        status::OK
    })?;
    Ok(())
}

/// WASI preview1 errno values used here.
mod errno {
    pub const SUCCESS: i32 = 0;
    pub const BADF: i32 = 8;
    pub const INVAL: i32 = 28;
    pub const NOSYS: i32 = 52;
}

/// The WASI preview1 calls a `wasm32-wasip1` Rust build imports (and a few
/// more it may): environment from the plugin's options, the host clock,
/// deterministic randomness, stdout/stderr captured, no files.
fn define_wasi(l: &mut Linker<HostState>) -> Result<()> {
    const WASI: &str = "wasi_snapshot_preview1";
    l.func_wrap(WASI, "random_get", |mut c: C<'_>, buf: i32, len: i32| -> Result<i32> {
        let mut bytes = Vec::with_capacity(u(len));
        while bytes.len() < u(len) {
            bytes.extend_from_slice(&c.data_mut().next_random().to_le_bytes());
        }
        bytes.truncate(u(len));
        write(&mut c, buf, &bytes)?;
        Ok(errno::SUCCESS)
    })?;
    l.func_wrap(WASI, "environ_sizes_get", |mut c: C<'_>, count: i32, size: i32| -> Result<i32> {
        let env = &c.data().env;
        let n = env.len() as u32;
        let bytes: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        write_u32(&mut c, count, n)?;
        write_u32(&mut c, size, bytes as u32)?;
        Ok(errno::SUCCESS)
    })?;
    l.func_wrap(WASI, "environ_get", |mut c: C<'_>, ptrs: i32, buf: i32| -> Result<i32> {
        let env = c.data().env.clone();
        let mut at = buf;
        for (i, (k, v)) in env.iter().enumerate() {
            let entry = format!("{k}={v}\0");
            write_u32(&mut c, ptrs + (i as i32) * 4, at as u32)?;
            write(&mut c, at, entry.as_bytes())?;
            at += entry.len() as i32;
        }
        Ok(errno::SUCCESS)
    })?;
    l.func_wrap(WASI, "args_sizes_get", |mut c: C<'_>, count: i32, size: i32| -> Result<i32> {
        write_u32(&mut c, count, 0)?;
        write_u32(&mut c, size, 0)?;
        Ok(errno::SUCCESS)
    })?;
    l.func_wrap(WASI, "args_get", |_c: C<'_>, _: i32, _: i32| -> i32 { errno::SUCCESS })?;
    l.func_wrap(WASI, "fd_write", |mut c: C<'_>, fd: i32, iovs: i32, iovs_len: i32, nwritten: i32| -> Result<i32> {
        if fd != 1 && fd != 2 {
            return Ok(errno::BADF);
        }
        let mut out = Vec::new();
        for i in 0..iovs_len {
            let iov = read(&mut c, iovs + i * 8, 8)?;
            let ptr = i32::from_le_bytes(iov.get(0..4).context("iov")?.try_into()?);
            let len = i32::from_le_bytes(iov.get(4..8).context("iov")?.try_into()?);
            out.extend(read(&mut c, ptr, len)?);
        }
        let n = out.len() as u32;
        if fd == 1 {
            c.data_mut().stdout.extend(out);
        } else {
            c.data_mut().stderr.extend(out);
        }
        write_u32(&mut c, nwritten, n)?;
        Ok(errno::SUCCESS)
    })?;
    l.func_wrap(WASI, "fd_read", |_c: C<'_>, _: i32, _: i32, _: i32, _: i32| -> i32 { errno::BADF })?;
    l.func_wrap(WASI, "fd_close", |_c: C<'_>, _: i32| -> i32 { errno::BADF })?;
    l.func_wrap(WASI, "fd_seek", |_c: C<'_>, _: i32, _: i64, _: i32, _: i32| -> i32 { errno::BADF })?;
    l.func_wrap(WASI, "fd_fdstat_get", |_c: C<'_>, _: i32, _: i32| -> i32 { errno::BADF })?;
    l.func_wrap(WASI, "fd_prestat_get", |_c: C<'_>, _: i32, _: i32| -> i32 { errno::BADF })?;
    l.func_wrap(WASI, "fd_prestat_dir_name", |_c: C<'_>, _: i32, _: i32, _: i32| -> i32 { errno::BADF })?;
    l.func_wrap(WASI, "clock_time_get", |mut c: C<'_>, id: i32, _precision: i64, ret: i32| -> Result<i32> {
        if !(0..=3).contains(&id) {
            return Ok(errno::INVAL);
        }
        let now = c.data().now_nanos;
        write_u64(&mut c, ret, now)?;
        Ok(errno::SUCCESS)
    })?;
    l.func_wrap(WASI, "clock_res_get", |mut c: C<'_>, _id: i32, ret: i32| -> Result<i32> {
        write_u64(&mut c, ret, 1)?;
        Ok(errno::SUCCESS)
    })?;
    l.func_wrap(WASI, "sched_yield", |_c: C<'_>| -> i32 { errno::SUCCESS })?;
    l.func_wrap(WASI, "poll_oneoff", |_c: C<'_>, _: i32, _: i32, _: i32, _: i32| -> i32 { errno::NOSYS })?;
    l.func_wrap(WASI, "proc_exit", |mut c: C<'_>, code: i32| -> Result<()> {
        c.data_mut().exit_code = Some(code);
        bail!("the module called proc_exit({code})")
    })?;
    Ok(())
}
