//! Small shared HTTP plumbing on top of tiny_http: a fixed pool of worker
//! threads, capped request bodies, JSON replies and one log line per request.
//!
//! Handlers are plain functions `&RequestCtx -> Reply`, which keeps the
//! routing logic independent of the socket layer and easy to read.

use serde_json::{json, Value};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest accepted request body. Both APIs take small JSON documents.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Declared bodies above this are treated as hostile (see [`refuse_hostile`]).
pub const HOSTILE_BODY_BYTES: usize = 64 * 1024 * 1024;

/// A request as handlers see it: method, path, headers and the whole body.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    /// Upper-case method (`GET`, `POST`, ...).
    pub method: String,
    /// The request target exactly as received (path plus any query).
    pub url: String,
    /// The path without the query string (still percent-encoded).
    pub path: String,
    /// Headers in arrival order, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RequestCtx {
    /// Build a context (also used by unit tests that bypass the socket).
    pub fn new(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> RequestCtx {
        RequestCtx {
            method: method.to_ascii_uppercase(),
            url: url.to_string(),
            path: url.split('?').next().unwrap_or_default().to_string(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), (*v).to_string()))
                .collect(),
            body: body.to_vec(),
        }
    }

    /// First value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A JSON reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body,
            headers: Vec::new(),
        }
    }

    pub fn ok(body: Value) -> Reply {
        Reply::json(200, body)
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    /// `{"error": code}` with the given status.
    pub fn error(status: u16, code: &str) -> Reply {
        Reply::json(status, json!({ "error": code }))
    }

    /// 400 `{"error":"bad_request","message":...}`.
    pub fn bad_request(message: impl Into<String>) -> Reply {
        Reply::json(
            400,
            json!({ "error": "bad_request", "message": message.into() }),
        )
    }

    /// 405 with an `Allow` header.
    pub fn method_not_allowed(allow: &str) -> Reply {
        Reply::error(405, "method_not_allowed").with_header("Allow", allow)
    }

    /// 500 `{"error":"internal"}`; details go to the log, not the client.
    pub fn internal() -> Reply {
        Reply::error(500, "internal")
    }
}

/// Decode `%XX` escapes in a URL path segment. `+` is kept literally (it only
/// means space in form bodies). Fails on bad escapes or non-UTF-8 results.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = bytes.get(i + 1).and_then(|c| (*c as char).to_digit(16))?;
            let lo = bytes.get(i + 2).and_then(|c| (*c as char).to_digit(16))?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A request handler shared by all worker threads.
pub type Handler = Arc<dyn Fn(&RequestCtx) -> Reply + Send + Sync>;

/// A listening server and its worker threads. Dropping it stops the workers.
pub struct RunningServer {
    addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    stopping: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Bind `listen` (port 0 picks a free port) and start `workers` threads.
    /// `name` tags the log lines (`credits`, `upstream`).
    pub fn start(
        listen: &str,
        workers: usize,
        name: &'static str,
        handler: Handler,
    ) -> io::Result<RunningServer> {
        let server = tiny_http::Server::http(listen)
            .map_err(|e| io::Error::other(format!("cannot listen on {listen}: {e}")))?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| io::Error::other("listener has no IP address"))?;
        let server = Arc::new(server);
        let stopping = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::with_capacity(workers.max(1));
        for i in 0..workers.max(1) {
            let server = Arc::clone(&server);
            let stopping = Arc::clone(&stopping);
            let handler = Arc::clone(&handler);
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker_loop(&server, &stopping, &handler, name))?;
            handles.push(handle);
        }
        Ok(RunningServer {
            addr,
            server,
            stopping,
            workers: handles,
        })
    }

    /// The bound address (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Block until the workers exit (they only do once stopped).
    pub fn wait(mut self) {
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }

    /// Stop accepting work and join the workers.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Each unblock() wakes exactly one thread waiting in recv().
        for _ in 0..self.workers.len() {
            self.server.unblock();
        }
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn worker_loop(server: &tiny_http::Server, stopping: &AtomicBool, handler: &Handler, name: &str) {
    loop {
        match server.recv() {
            Ok(request) => serve_one(request, handler, name),
            Err(e) => {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                eprintln!("{name}: accept error: {e}");
                // Avoid spinning if accept keeps failing (e.g. out of fds).
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

enum BodyError {
    TooLarge,
    Io(io::Error),
}

fn read_body(request: &mut tiny_http::Request) -> Result<Vec<u8>, BodyError> {
    // Refuse early on a declared oversize body, before sending `100 Continue`.
    if request.body_length().is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    // Chunked bodies have no declared length: read one byte past the cap to
    // detect overflow without buffering an unbounded amount.
    let limit = u64::try_from(MAX_BODY_BYTES)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    request
        .as_reader()
        .take(limit)
        .read_to_end(&mut body)
        .map_err(BodyError::Io)?;
    if body.len() > MAX_BODY_BYTES {
        return Err(BodyError::TooLarge);
    }
    Ok(body)
}

fn serve_one(mut request: tiny_http::Request, handler: &Handler, name: &str) {
    let started = Instant::now();
    let method = request.method().as_str().to_ascii_uppercase();
    let url = request.url().to_string();
    let path = url.split('?').next().unwrap_or_default().to_string();

    if request
        .body_length()
        .is_some_and(|n| n > HOSTILE_BODY_BYTES)
    {
        refuse_hostile(request, name, &method, &path);
        return;
    }

    let reply = match read_body(&mut request) {
        Err(BodyError::TooLarge) => Reply::json(
            413,
            json!({ "error": "payload_too_large", "max_bytes": MAX_BODY_BYTES }),
        ),
        Err(BodyError::Io(e)) => Reply::bad_request(format!("could not read request body: {e}")),
        Ok(body) => {
            let ctx = RequestCtx {
                method: method.clone(),
                url,
                path: path.clone(),
                headers: request
                    .headers()
                    .iter()
                    .map(|h| {
                        (
                            h.field.as_str().as_str().to_ascii_lowercase(),
                            h.value.as_str().to_string(),
                        )
                    })
                    .collect(),
                body,
            };
            // Handlers return errors as replies; this only guards against a
            // bug panicking a worker (with panic=unwind builds) so the pool
            // keeps its size and the client still gets JSON.
            catch_unwind(AssertUnwindSafe(|| handler(&ctx))).unwrap_or_else(|_| {
                eprintln!("{name}: handler panicked on {method} {path}");
                Reply::internal()
            })
        }
    };

    let status = reply.status;
    if let Err(e) = request.respond(to_response(reply)) {
        eprintln!("{name}: failed to send response: {e}");
    }
    // One line per request. Only method, path (no query string: it could
    // carry credentials), status and latency: never headers or bodies.
    eprintln!(
        "{name} {method} {path} {status} {:.1}ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
}

/// Answer 413 to a request declaring an absurd `Content-Length` WITHOUT
/// letting tiny_http drop its body reader.
///
/// Why: tiny_http 0.12 drains an unread body when the request is dropped by
/// allocating a buffer of the *declared* remaining size
/// (`EqualReader::drop`, tiny-http/tiny-http#290). `Content-Length: 10^14`
/// would make that allocation fail and abort the whole process. `upgrade()`
/// is the only public API that writes a response and hands the body reader
/// to us; we then deliberately leak it (and so that one connection) instead
/// of dropping it. A leaked connection per hostile request is far better
/// than a crash; remove this once tiny_http drains with a fixed buffer.
fn refuse_hostile(request: tiny_http::Request, name: &str, method: &str, path: &str) {
    let started = Instant::now();
    let reply = Reply::json(
        413,
        json!({ "error": "payload_too_large", "max_bytes": MAX_BODY_BYTES }),
    );
    let stream = request.upgrade("close", to_response(reply));
    std::mem::forget(stream);
    eprintln!(
        "{name} {method} {path} 413 {:.1}ms (hostile Content-Length; connection abandoned)",
        started.elapsed().as_secs_f64() * 1000.0
    );
}

fn to_response(reply: Reply) -> tiny_http::Response<io::Cursor<Vec<u8>>> {
    let bytes =
        serde_json::to_vec(&reply.body).unwrap_or_else(|_| b"{\"error\":\"internal\"}".to_vec());
    let mut response = tiny_http::Response::from_data(bytes).with_status_code(reply.status);
    let headers =
        std::iter::once(("Content-Type", "application/json".to_string())).chain(reply.headers);
    for (name, value) in headers {
        if let Ok(h) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(h);
        }
    }
    response
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("did%3Aprivy%3Acm1").unwrap(),
            "did:privy:cm1"
        );
        assert_eq!(percent_decode("a+b%20c").unwrap(), "a+b c");
        assert_eq!(percent_decode("%e2%82%AC").unwrap(), "€");
        assert!(percent_decode("%zz").is_none());
        assert!(percent_decode("%4").is_none());
        assert!(percent_decode("%ff").is_none());
    }

    #[test]
    fn ctx_strips_query_and_lowercases_headers() {
        let ctx = RequestCtx::new("get", "/a/b?x=1", &[("X-Thing", "v")], b"");
        assert_eq!(ctx.method, "GET");
        assert_eq!(ctx.path, "/a/b");
        assert_eq!(ctx.header("x-thing"), Some("v"));
        assert_eq!(ctx.header("X-THING"), Some("v"));
    }
}
