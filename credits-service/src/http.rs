//! HTTP plumbing shared by the credits API and the demo upstream: axum
//! routers served by hyper (HTTP/1.1 keep-alive and HTTP/2 cleartext with
//! prior knowledge, detected per connection by hyper-util's auto builder)
//! from our own accept loop, so that every connection is watched:
//!
//! - **header-read timeout**: a connection must deliver its first complete
//!   request head within `header_read_timeout` of being accepted, and on
//!   HTTP/1.1 every later request head within `header_read_timeout` of its
//!   first byte; otherwise it is closed (a slowloris client holds a task and
//!   a socket for that long, never a worker thread). Request bodies get the
//!   same bound in [`read_body`] (408).
//! - **idle timeout**: a connection with no request in flight and none
//!   started or finished for `idle_timeout` is shut down gracefully
//!   (HTTP/1.1: closed while idle; HTTP/2: GOAWAY). It must be LONGER than
//!   the client's own idle timeout (Envoy's cluster `idle_timeout`), so that
//!   the client, not the server, closes an idle keep-alive connection and
//!   never sends a request on a connection the server is closing.
//! - hyper's own header-read timer is off: it also runs while a keep-alive
//!   connection sits idle between requests, which would close idle
//!   connections after `header_read_timeout` — far sooner than clients
//!   expect.
//! - request head size (`max_header_bytes`, 431), header count, body size
//!   (`max_body_bytes`, 413 JSON), connection count (`max_connections`:
//!   beyond it, new connections wait in the kernel's backlog).
//! - **graceful shutdown**: stop accepting, let each connection finish its
//!   in-flight requests (idle keep-alive connections close at once, HTTP/2
//!   ones get GOAWAY), close whatever is left after `shutdown_timeout`.
//!
//! Handlers return [`Reply`] (a JSON body and status); [`router_layers`]
//! adds request ids (`x-request-id`, kept or made), one tracing span per
//! request (method, route template, request id, key prefix when a handler
//! learns it), the request metrics and the body limit.

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{self, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Instrument;

/// Largest accepted request body by default. Both APIs take small JSON documents.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Limits and timeouts of one listener.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Deadline for a request head (from accept, or from its first byte).
    pub header_read_timeout: Duration,
    /// A connection without requests for this long is shut down.
    pub idle_timeout: Duration,
    /// Largest request head (request line + headers), in bytes (>= 8192).
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// Most open connections; more wait in the listen backlog.
    pub max_connections: usize,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_body_bytes: MAX_BODY_BYTES,
            h2_max_concurrent_streams: 1024,
            max_connections: 10_000,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

// ----- replies ---------------------------------------------------------------

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

    /// 500 `{"error":"internal"}`; details go to the log, not the client.
    pub fn internal() -> Reply {
        Reply::error(500, "internal")
    }

    /// 503 `{"success":false,"error":"unavailable"}` with `Retry-After: 1`:
    /// the database is unreachable or busy; nothing was done.
    pub fn unavailable() -> Reply {
        Reply::json(503, json!({ "success": false, "error": "unavailable" }))
            .with_header("Retry-After", "1")
    }

    /// 413 with the limit.
    pub fn payload_too_large(max_bytes: usize) -> Reply {
        Reply::json(
            413,
            json!({ "error": "payload_too_large", "max_bytes": max_bytes }),
        )
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let bytes =
            serde_json::to_vec(&self.body).unwrap_or_else(|_| b"{\"error\":\"internal\"}".to_vec());
        let mut response = Response::new(Body::from(bytes));
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.append(name, v);
            }
        }
        response
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

fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Read a whole request body: at most `limit` bytes (413), within `timeout`
/// (408), complete (400 if the client stopped short or the framing is bad).
pub async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, Reply> {
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(Reply::error(408, "request_timeout")),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            if is_length_limit(&e) {
                Err(Reply::payload_too_large(limit))
            } else {
                Err(Reply::bad_request(format!(
                    "could not read request body: {e}"
                )))
            }
        }
    }
}

// ----- middleware --------------------------------------------------------------

/// The route template of a request (`/v1/holds/{id}/capture`), or
/// `unmatched` for the fallback: the metrics' `endpoint` label.
fn endpoint(req: &Request) -> String {
    req.extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string())
}

async fn count_request(req: Request, next: axum::middleware::Next) -> Response {
    let _in_flight = crate::metrics::in_flight();
    let started = Instant::now();
    let endpoint = endpoint(&req);
    let response = next.run(req).await;
    crate::metrics::request(&endpoint, response.status().as_u16(), started.elapsed());
    response
}

/// The request metrics, body limit (413 answered in the contract's JSON),
/// one tracing span and log line per request, and request ids. `name` tags
/// the span (`credits`, `upstream`).
pub fn router_layers(router: Router, name: &'static str, config: &HttpConfig) -> Router {
    let max_body = config.max_body_bytes;
    router
        .layer(tower_http::limit::RequestBodyLimitLayer::new(max_body))
        .layer(axum::middleware::map_response(
            move |response: Response| async move {
                // tower-http answers a declared oversize body itself, in plain text.
                let json = response
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
                if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !json {
                    Reply::payload_too_large(max_body).into_response()
                } else {
                    response
                }
            },
        ))
        .layer(axum::middleware::from_fn(count_request))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(move |req: &Request| {
                    // Client-chosen ids are kept; the log gets at most 64 characters.
                    let request_id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .map_or("-", |v| v.get(..64).unwrap_or(v));
                    tracing::info_span!(
                        "request",
                        listener = name,
                        method = %req.method(),
                        route = %endpoint(req),
                        request_id,
                        key_prefix = tracing::field::Empty,
                    )
                })
                .on_request(())
                .on_response(
                    DefaultOnResponse::new()
                        .level(tracing::Level::INFO)
                        .latency_unit(tower_http::LatencyUnit::Micros),
                ),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// Note the key prefix in the current request's span (never a secret: the
/// 8-hex display prefix only).
pub fn record_key_prefix(prefix: &str) {
    if crate::keys::is_valid_prefix(prefix) {
        tracing::Span::current().record("key_prefix", prefix);
    }
}

// ----- serving -----------------------------------------------------------------

/// What one connection's watchdog knows about it.
struct ConnState {
    origin: Instant,
    /// Requests whose handler has not finished yet.
    in_flight: AtomicUsize,
    /// Requests started on this connection.
    requests: AtomicU64,
    /// Millis since `origin` of the last request start or end.
    last_request_ms: AtomicU64,
    /// 1 + millis since `origin` when bytes of a new HTTP/1 request head
    /// arrived with nothing in flight; 0 = none pending.
    pending_ms: AtomicU64,
    h2: AtomicBool,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            origin: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_request_ms: AtomicU64::new(0),
            pending_ms: AtomicU64::new(0),
            h2: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.pending_ms.load(Ordering::Acquire) == 0
        {
            self.pending_ms
                .store(self.now_ms().saturating_add(1), Ordering::Release);
        }
    }

    fn request_started(&self, h2: bool) {
        if h2 {
            self.h2.store(true, Ordering::Release);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.pending_ms.store(0, Ordering::Release);
        self.last_request_ms.store(self.now_ms(), Ordering::Release);
    }

    fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.last_request_ms.store(self.now_ms(), Ordering::Release);
    }

    /// When the watchdog must look again, and what it finds now.
    fn verdict(&self, config: &HttpConfig) -> (Verdict, Duration) {
        let now = self.now_ms();
        let header = u64::try_from(config.header_read_timeout.as_millis()).unwrap_or(u64::MAX);
        let idle = u64::try_from(config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let in_flight = self.in_flight.load(Ordering::Acquire);
        let mut next = idle;
        if self.requests.load(Ordering::Acquire) == 0 {
            if now >= header {
                return (Verdict::Close("no request head"), Duration::ZERO);
            }
            next = next.min(header - now);
        } else {
            let pending = self.pending_ms.load(Ordering::Acquire);
            if pending != 0 && in_flight == 0 && !self.h2.load(Ordering::Acquire) {
                let since = now.saturating_sub(pending - 1);
                if since >= header {
                    return (Verdict::Close("request head too slow"), Duration::ZERO);
                }
                next = next.min(header - since);
            }
        }
        if in_flight == 0 {
            let since = now.saturating_sub(self.last_request_ms.load(Ordering::Acquire));
            if since >= idle {
                return (Verdict::Idle, Duration::ZERO);
            }
            next = next.min(idle - since);
        }
        (Verdict::Fine, Duration::from_millis(next.max(1)))
    }
}

enum Verdict {
    Fine,
    Idle,
    Close(&'static str),
}

/// Decrements the in-flight count even if the handler is dropped (HTTP/2
/// stream reset, client gone).
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// The accepted socket, noting when bytes of a new request head arrive.
struct Watched {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.bytes_read();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn connection_builder(config: &HttpConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        // Our watchdog times request heads (hyper's timer would also close
        // idle keep-alive connections).
        .header_read_timeout(None)
        .max_buf_size(config.max_header_bytes.max(8192))
        .max_headers(config.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}

/// Serve one connection until it ends, times out, or shutdown has drained it.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    config: Arc<HttpConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let state = Arc::new(ConnState::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        state: Arc::clone(&state),
    });
    let st = Arc::clone(&state);
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        st.request_started(req.version() == http::Version::HTTP_2);
        let guard = InFlight(Arc::clone(&st));
        let router = router.clone();
        async move {
            let response = router.oneshot(req.map(Body::new)).await;
            drop(guard);
            response
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining: Option<tokio::time::Instant> = None;
    if *shutdown.borrow() {
        // Accepted as the server began to stop.
        conn.as_mut().graceful_shutdown();
        draining = Some(tokio::time::Instant::now() + config.shutdown_timeout);
    }
    loop {
        let (verdict, wait) = state.verdict(&config);
        match verdict {
            Verdict::Close(why) => {
                tracing::debug!(why, "closing connection");
                return;
            }
            Verdict::Idle if draining.is_none() => {
                conn.as_mut().graceful_shutdown();
                draining = Some(tokio::time::Instant::now() + config.shutdown_timeout);
                continue;
            }
            Verdict::Idle | Verdict::Fine => {}
        }
        let deadline = match draining {
            Some(d) => d.min(tokio::time::Instant::now() + wait),
            None => tokio::time::Instant::now() + wait,
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(deadline) => {
                if draining.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    tracing::debug!("closing a connection that did not drain in time");
                    return;
                }
            }
            changed = shutdown.changed(), if draining.is_none() => {
                if changed.is_err() || *shutdown.borrow() {
                    conn.as_mut().graceful_shutdown();
                    draining = Some(tokio::time::Instant::now() + config.shutdown_timeout);
                }
            }
        }
    }
}

/// Serve `router` on `listener` until `shutdown` turns true, then stop
/// accepting and drain (at most `shutdown_timeout`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: Arc<HttpConfig>,
    mut shutdown: watch::Receiver<bool>,
    name: &'static str,
) {
    let builder = Arc::new(connection_builder(&config));
    let max = config.max_connections.clamp(1, 1 << 20);
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let span = tracing::debug_span!("connection", listener = name, %peer);
                let (router, builder, config, shutdown) = (
                    router.clone(),
                    Arc::clone(&builder),
                    Arc::clone(&config),
                    shutdown.clone(),
                );
                tokio::spawn(
                    async move {
                        serve_connection(stream, router, builder, config, shutdown).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(listener = name, error = %e, "accept failed");
                drop(permit);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if *shutdown.borrow() {
            break;
        }
    }
    drop(listener);
    // Every connection holds a slot: all slots back means all drained.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(
        config.shutdown_timeout + Duration::from_secs(1),
        slots.acquire_many(all),
    )
    .await;
    if drained.is_err() {
        tracing::warn!(
            listener = name,
            "shutdown: connections still open after the drain timeout"
        );
    }
}

/// Bind `listen` (`host:port`; port 0 picks a free port).
pub async fn bind(listen: &str) -> io::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .map_err(|e| io::Error::other(format!("cannot listen on {listen}: {e}")))
}

// ----- an in-process server (tests, embedding) --------------------------------

/// A listening server on its own runtime thread. Dropping it shuts it down
/// gracefully.
pub struct RunningServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

/// What a server needs once its runtime runs: the router and what to close
/// after shutdown.
pub type Setup =
    Pin<Box<dyn Future<Output = io::Result<(Router, Option<crate::backend::Db>)>> + Send>>;

impl RunningServer {
    /// Start a runtime with `workers` threads, run `setup` on it (open the
    /// database, build the router), bind `listen` and serve.
    pub fn start(
        listen: &str,
        workers: usize,
        name: &'static str,
        config: HttpConfig,
        setup: impl FnOnce() -> Setup + Send + 'static,
    ) -> io::Result<RunningServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.clamp(1, 64))
            .thread_name(format!("{name}-worker"))
            .enable_all()
            .build()?;
        let (stop, stopped) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<SocketAddr>>();
        let listen = listen.to_string();
        let config = Arc::new(config);
        let thread = std::thread::Builder::new()
            .name(format!("{name}-server"))
            .spawn(move || {
                runtime.block_on(async move {
                    crate::metrics::install();
                    let (router, db) = match setup().await {
                        Ok(v) => v,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let listener = match bind(&listen).await.and_then(|l| {
                        let addr = l.local_addr()?;
                        Ok((l, addr))
                    }) {
                        Ok((l, addr)) => {
                            let _ = ready_tx.send(Ok(addr));
                            l
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    serve(listener, router, config, stopped, name).await;
                    if let Some(db) = db {
                        db.close().await;
                    }
                });
            })?;
        let addr = ready_rx
            .recv()
            .map_err(|_| io::Error::other("the server thread ended before listening"))??;
        Ok(RunningServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Block until the server stops.
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Stop accepting, drain in-flight requests, close the database.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
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
    fn watchdog_closes_slow_heads_and_idles_keep_alive() {
        let config = HttpConfig {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..HttpConfig::default()
        };
        let s = ConnState::new();
        // Fresh: the first request head is due within the header timeout.
        let (v, wait) = s.verdict(&config);
        assert!(matches!(v, Verdict::Fine) && wait <= Duration::from_secs(10));
        s.request_started(false);
        // In flight: never idle, never a slow head.
        s.bytes_read();
        assert!(matches!(s.verdict(&config).0, Verdict::Fine));
        s.request_finished();
        // Between requests: idle until the next head's first byte.
        let (v, wait) = s.verdict(&config);
        assert!(matches!(v, Verdict::Fine) && wait > Duration::from_secs(50));
        s.bytes_read();
        let (_, wait) = s.verdict(&config);
        assert!(wait <= Duration::from_secs(10));
        // Deadlines are relative to the connection's clock.
        s.pending_ms.store(1, Ordering::Release);
        let shifted = ConnState {
            origin: Instant::now() - Duration::from_secs(11),
            ..ConnState::new()
        };
        shifted.requests.store(1, Ordering::Release);
        shifted.pending_ms.store(1, Ordering::Release);
        assert!(matches!(shifted.verdict(&config).0, Verdict::Close(_)));
        let idle = ConnState {
            origin: Instant::now() - Duration::from_secs(61),
            ..ConnState::new()
        };
        idle.requests.store(1, Ordering::Release);
        assert!(matches!(idle.verdict(&config).0, Verdict::Idle));
        // HTTP/2 frames between streams are not request heads.
        let h2 = ConnState {
            origin: Instant::now() - Duration::from_secs(11),
            ..ConnState::new()
        };
        h2.requests.store(1, Ordering::Release);
        h2.h2.store(true, Ordering::Release);
        h2.pending_ms.store(1, Ordering::Release);
        h2.last_request_ms.store(10_000, Ordering::Release);
        assert!(matches!(h2.verdict(&config).0, Verdict::Fine));
    }
}
