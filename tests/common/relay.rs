//! A counting, fault-injecting HTTP relay for tests of the pull-through cache.
//!
//! `Relay::start("127.0.0.1:PORT")` puts an HTTP/1.1 proxy in front of a real upstream registry (usually a
//! [`super::Distribution`]). Point breakwater at `relay.addr` instead of the upstream, and the test can then
//! - see exactly what breakwater asked upstream: [`Relay::requests`], [`Relay::count`], [`Relay::body_bytes`]
//!   (e.g. "N concurrent pulls of one blob made exactly one upstream GET"), and
//! - break the upstream on purpose, at any moment, from any thread: throttle, delay, hang, stall or cut a body
//!   mid-way, corrupt a byte, answer 503/429 with `Retry-After`, refuse connections, require Bearer (with a
//!   [`super::auth::TokenServer`]) or Basic credentials, redirect blob GETs to another host (a "CDN").
//!
//! Everything streams: request and response bodies are never buffered whole. Redirects from the upstream are passed
//! through, not followed. `Location` headers that point at the upstream are rewritten to point at the relay.
//!
//! Fault matchers: every fault takes a `path_contains` string, matched as a substring of `"METHOD /path?query"`,
//! so `"/blobs/sha256:"` matches any blob request and `"GET /v2/lib/alpine/blobs/"` only GETs of one repository's
//! blobs; `""` matches everything. Body faults (`cut_after`, `stall_after`, `corrupt`) only fire on (and only count)
//! 2xx responses to non-HEAD requests, i.e. responses that carry a body.
//!
//! The relay runs on its own thread with its own multi-thread tokio runtime, so it works from plain `#[test]`s and
//! from `#[tokio::test]`s alike and is never starved by the test's runtime. Dropping it shuts it down (hung requests
//! and open connections included).
#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::serve::{IncomingStream, Listener};
use axum::Router;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{oneshot, watch};

use super::auth::{base64, TokenServer, TokenState};

/// One request the relay received, as seen so far (status and body bytes fill in as the answer streams).
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path with query, e.g. `/v2/lib/a/blobs/sha256:...?ns=docker.io`.
    pub path: String,
    /// The request's `Range` header.
    pub range: Option<String>,
    /// Whether the request carried an `Authorization` header.
    pub authorization: bool,
    /// All request headers (names lower-case), in order.
    pub headers: Vec<(String, String)>,
    /// Response status; 0 while the request has not been answered (delayed, hung, waiting for upstream).
    pub status: u16,
    /// Response body bytes relayed to the client so far.
    pub body_bytes: u64,
    /// The response body was relayed to its end.
    pub complete: bool,
    /// The response body ended early: cut, upstream error, or client gone.
    pub aborted: bool,
}

impl Recorded {
    /// A request header by (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A running relay; stops when dropped.
pub struct Relay {
    /// `127.0.0.1:PORT` the relay listens on.
    pub addr: String,
    shared: Arc<Shared>,
    _background: Background,
}

impl Relay {
    /// Starts a relay in front of `target` (`127.0.0.1:PORT`, plain HTTP).
    pub fn start(target: &str) -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr").to_string();
        let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).no_proxy().build().expect("reqwest client");
        let (changed, _) = watch::channel(());
        let shared = Arc::new(Shared {
            target: Mutex::new(target.to_string()),
            self_addr: addr.clone(),
            client,
            t0: Instant::now(),
            log: Mutex::new(Vec::new()),
            body_total: AtomicU64::new(0),
            faults: Mutex::new(Faults::default()),
            changed,
            down: AtomicBool::new(false),
            kill_epoch: watch::channel(0).0,
            connections: AtomicU64::new(0),
        });
        let app_shared = shared.clone();
        let background = Background::spawn("relay", 2, move || async move {
            let inner = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let listener = RelayListener { inner, shared: app_shared.clone() };
            let app = Router::new().fallback(handle).with_state(app_shared);
            let _ = axum::serve(listener, app.into_make_service_with_connect_info::<Conn>()).await;
        });
        Relay { addr, shared, _background: background }
    }

    /// Relays to `target` from now on: for an upstream that must know who talks to it before it starts (a
    /// registry whose notifications go to the server the relay serves), the relay starts first, in front of
    /// nothing.
    pub fn retarget(&self, target: &str) {
        *self.shared.target.lock().unwrap() = target.to_string();
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// TCP connections accepted since the start (not reset by [`Relay::reset`]).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Every request received since the start (or the last [`Relay::reset`]), in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log.lock().unwrap().iter().map(|e| e.snapshot()).collect()
    }

    /// How many requests with this method (case-insensitive; `""` for any) had a path (with query) containing
    /// `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.shared
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|e| (method.is_empty() || e.method.eq_ignore_ascii_case(method)) && e.path.contains(path_contains))
            .count()
    }

    /// Total response body bytes relayed to clients (all requests, including synthetic error bodies).
    pub fn body_bytes(&self) -> u64 {
        self.shared.body_total.load(Ordering::SeqCst)
    }

    /// Forgets the recorded requests and the byte counter (faults stay as they are).
    pub fn reset(&self) {
        self.shared.log.lock().unwrap().clear();
        self.shared.body_total.store(0, Ordering::SeqCst);
    }

    /// Blocks until `count(method, path_contains) >= n`, or `timeout`; returns whether it got there. In an async test,
    /// prefer [`Relay::wait_for_async`].
    pub fn wait_for(&self, method: &str, path_contains: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count(method, path_contains) >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// [`Relay::wait_for`] without blocking the caller's runtime.
    pub async fn wait_for_async(&self, method: &str, path_contains: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count(method, path_contains) >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn set(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.shared.faults.lock().unwrap());
        self.shared.changed.send_replace(());
    }

    /// Removes every fault and auth requirement, releases hung requests and brings the relay back up.
    pub fn clear_faults(&self) {
        self.shared.down.store(false, Ordering::SeqCst);
        self.set(|f| *f = Faults::default());
    }

    /// Paces every response body to `bytes_per_sec` (per response, i.e. per connection); 0 turns it off. Takes
    /// effect immediately, also on bodies already streaming.
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.throttle_on("", bytes_per_sec);
    }

    /// [`Relay::throttle`], only for requests matching `path_contains`.
    pub fn throttle_on(&self, path_contains: &str, bytes_per_sec: u64) {
        let v = (bytes_per_sec > 0).then(|| (path_contains.to_string(), bytes_per_sec));
        self.set(|f| f.throttle = v);
    }

    /// Waits `d` before handling each request (after recording it); `Duration::ZERO` turns it off.
    pub fn delay(&self, d: Duration) {
        self.delay_on("", d);
    }

    /// [`Relay::delay`], only for requests matching `path_contains`.
    pub fn delay_on(&self, path_contains: &str, d: Duration) {
        let v = (!d.is_zero()).then(|| (path_contains.to_string(), d));
        self.set(|f| f.delay = v);
    }

    /// With `true`, requests are accepted (and recorded) but not answered until `hang(false)` (then they proceed
    /// normally) or the relay is dropped.
    pub fn hang(&self, on: bool) {
        let v = on.then(String::new);
        self.set(|f| f.hang = v);
    }

    /// Hangs only requests matching `path_contains` (until `hang(false)`).
    pub fn hang_on(&self, path_contains: &str) {
        let v = Some(path_contains.to_string());
        self.set(|f| f.hang = v);
    }

    /// The next `times` matching responses send exactly `k_bytes` body bytes (after full headers, Content-Length
    /// included) and then the connection is aborted.
    pub fn cut_after(&self, path_contains: &str, k_bytes: u64, times: usize) {
        let a = Armed { matcher: path_contains.to_string(), at: k_bytes, times };
        self.set(|f| f.cut.push(a));
    }

    /// The next `times` matching responses send `k_bytes` body bytes and then nothing more, keeping the connection
    /// open (a stalled upstream), until the client gives up or the relay is dropped.
    pub fn stall_after(&self, path_contains: &str, k_bytes: u64, times: usize) {
        let a = Armed { matcher: path_contains.to_string(), at: k_bytes, times };
        self.set(|f| f.stall.push(a));
    }

    /// The next `times` matching responses have the byte at body offset `offset` flipped (XOR 0xff).
    pub fn corrupt(&self, path_contains: &str, offset: u64, times: usize) {
        let a = Armed { matcher: path_contains.to_string(), at: offset, times };
        self.set(|f| f.corrupt.push(a));
    }

    /// The next `times` matching requests are answered with `status` (and `Retry-After`, if given) and an OCI error
    /// body, without contacting the target. Checked after auth: a request the relay answers 401 does not count.
    pub fn fail(&self, path_contains: &str, status: u16, retry_after: Option<&str>, times: usize) {
        let a = ArmedFail { matcher: path_contains.to_string(), status, retry_after: retry_after.map(str::to_string), times };
        self.set(|f| f.fail.push(a));
    }

    /// With `true`, new connections are closed as soon as they are accepted and open connections die on their next
    /// read or write; `false` accepts connections again.
    pub fn down(&self, on: bool) {
        self.shared.down.store(on, Ordering::SeqCst);
        if on {
            self.shared.kill_epoch.send_modify(|e| *e += 1);
        }
        self.shared.changed.send_replace(());
    }

    /// Requires a bearer token from `issuer` on every request. Without one (or with an expired, revoked, or
    /// wrong-scope one) the answer is 401 with
    /// `WWW-Authenticate: Bearer realm="http://TOKEN_ADDR/token",service="relay",scope="repository:<repo>:pull"`
    /// (`pull,push` for methods other than GET/HEAD; no scope for paths without a repository, e.g. `/v2/`). The
    /// `Authorization` header is not forwarded to the target.
    pub fn require_bearer(&self, issuer: &TokenServer) {
        let auth = AuthMode::Bearer { realm: issuer.realm(), tokens: issuer.state() };
        self.set(|f| f.auth = auth);
    }

    /// Requires HTTP Basic `user:pass` on every request; otherwise 401 with `WWW-Authenticate: Basic realm="relay"`.
    pub fn require_basic(&self, user: &str, pass: &str) {
        let auth = AuthMode::Basic(base64(format!("{user}:{pass}").as_bytes()));
        self.set(|f| f.auth = auth);
    }

    /// Stops requiring credentials.
    pub fn no_auth(&self) {
        self.set(|f| f.auth = AuthMode::None);
    }

    /// Answers blob GETs (`/v2/<repo>/blobs/<digest>`, not uploads) with `307 Location: http://OTHER_ADDR<same path
    /// and query>` (after the auth check). `""` turns it off. Pair with a second relay in front of the same target,
    /// whose [`Recorded::authorization`] shows whether credentials leaked to the "CDN".
    pub fn redirect_blobs_to(&self, other_relay_addr: &str) {
        let v = (!other_relay_addr.is_empty()).then(|| other_relay_addr.to_string());
        self.set(|f| f.redirect_blobs = v);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Background thread + runtime (shared with the token server).

/// A future running on its own thread and multi-thread runtime; dropping this shuts the runtime down (cancelling
/// every task: listeners close, hung requests are dropped) and joins the thread.
pub struct Background {
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    pub fn spawn<F, Fut>(name: &str, worker_threads: usize, run: F) -> Background
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(worker_threads)
                    .thread_name(thread_name)
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    tokio::spawn(run());
                    let _ = rx.await;
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .expect("spawn thread");
        Background { shutdown: Some(tx), thread: Some(thread) }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        drop(self.shutdown.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// State.

struct Shared {
    /// `127.0.0.1:PORT` of the upstream; replaced by [`Relay::retarget`].
    target: Mutex<String>,
    self_addr: String,
    client: reqwest::Client,
    t0: Instant,
    log: Mutex<Vec<Arc<Entry>>>,
    body_total: AtomicU64,
    faults: Mutex<Faults>,
    /// Bumped on every fault change (wakes hung requests).
    changed: watch::Sender<()>,
    down: AtomicBool,
    /// Connections accepted under an older epoch are dead (and are woken to close at once).
    kill_epoch: watch::Sender<u64>,
    /// Connections accepted so far: a client that reuses its connections opens few.
    connections: AtomicU64,
}

impl Shared {
    fn nanos(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn throttle_for(&self, key: &str) -> Option<u64> {
        let f = self.faults.lock().unwrap();
        f.throttle.as_ref().filter(|(m, _)| key.contains(m.as_str())).map(|(_, r)| *r)
    }
}

struct Entry {
    method: String,
    path: String,
    range: Option<String>,
    authorization: bool,
    headers: Vec<(String, String)>,
    status: AtomicU16,
    body: AtomicU64,
    complete: AtomicBool,
    aborted: AtomicBool,
}

impl Entry {
    fn snapshot(&self) -> Recorded {
        Recorded {
            method: self.method.clone(),
            path: self.path.clone(),
            range: self.range.clone(),
            authorization: self.authorization,
            headers: self.headers.clone(),
            status: self.status.load(Ordering::SeqCst),
            body_bytes: self.body.load(Ordering::SeqCst),
            complete: self.complete.load(Ordering::SeqCst),
            aborted: self.aborted.load(Ordering::SeqCst),
        }
    }
}

#[derive(Default)]
struct Faults {
    throttle: Option<(String, u64)>,
    delay: Option<(String, Duration)>,
    hang: Option<String>,
    cut: Vec<Armed>,
    stall: Vec<Armed>,
    corrupt: Vec<Armed>,
    fail: Vec<ArmedFail>,
    auth: AuthMode,
    redirect_blobs: Option<String>,
}

struct Armed {
    matcher: String,
    at: u64,
    times: usize,
}

struct ArmedFail {
    matcher: String,
    status: u16,
    retry_after: Option<String>,
    times: usize,
}

#[derive(Clone, Default)]
enum AuthMode {
    #[default]
    None,
    /// base64(user:pass)
    Basic(String),
    Bearer {
        realm: String,
        tokens: Arc<TokenState>,
    },
}

fn take_armed(list: &mut Vec<Armed>, key: &str) -> Option<u64> {
    let i = list.iter().position(|a| a.times > 0 && key.contains(a.matcher.as_str()))?;
    let at = list[i].at;
    list[i].times -= 1;
    if list[i].times == 0 {
        list.remove(i);
    }
    Some(at)
}

// ---------------------------------------------------------------------------------------------------------------
// Listener and connections: a TcpListener that drops connections while the relay is down, and a TcpStream wrapper
// that dies when the relay goes down and reports when its writes have drained (so a cut delivers exactly k bytes).

struct RelayListener {
    inner: tokio::net::TcpListener,
    shared: Arc<Shared>,
}

impl Listener for RelayListener {
    type Io = ConnIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ConnIo, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    if self.shared.down.load(Ordering::SeqCst) {
                        drop(stream);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    self.shared.connections.fetch_add(1, Ordering::Relaxed);
                    let mut epochs = self.shared.kill_epoch.subscribe();
                    let epoch = *epochs.borrow_and_update();
                    let state = Arc::new(ConnState { blocked: AtomicBool::new(false), last_write: AtomicU64::new(self.shared.nanos()) });
                    let killed = Box::pin(async move {
                        let _ = epochs.wait_for(|e| *e != epoch).await;
                    });
                    return (ConnIo { inner: stream, state, shared: self.shared.clone(), killed, dead: false }, addr);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

struct ConnState {
    /// The last write attempt returned Pending (socket buffer full).
    blocked: AtomicBool,
    /// `Shared::nanos()` of the last successful write.
    last_write: AtomicU64,
}

#[derive(Clone)]
struct Conn(Arc<ConnState>);

impl Connected<IncomingStream<'_, RelayListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, RelayListener>) -> Self {
        Conn(stream.io().state.clone())
    }
}

struct ConnIo {
    inner: tokio::net::TcpStream,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
    /// Resolves when the relay goes down after this connection was accepted; polled on every read and write, so
    /// even an idle keep-alive connection is woken and closed at once.
    killed: Pin<Box<dyn Future<Output = ()> + Send>>,
    dead: bool,
}

impl ConnIo {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.dead && self.killed.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        if self.dead {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "relay is down"));
        }
        Ok(())
    }

    fn note_write<T>(&self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match &r {
            Poll::Pending => self.state.blocked.store(true, Ordering::SeqCst),
            Poll::Ready(_) => {
                self.state.blocked.store(false, Ordering::SeqCst);
                self.state.last_write.store(self.shared.nanos(), Ordering::SeqCst);
            }
        }
        r
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.note_write(r)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.note_write(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Waits until the connection has written everything handed to it (no blocked write, quiet for a moment).
async fn wait_drained(conn: &ConnState, shared: &Shared) {
    const QUIET: u64 = 20_000_000; // 20 ms
    let deadline = Instant::now() + Duration::from_secs(10);
    tokio::time::sleep(Duration::from_millis(20)).await;
    while Instant::now() < deadline {
        let quiet = shared.nanos().saturating_sub(conn.last_write.load(Ordering::SeqCst)) >= QUIET;
        if quiet && !conn.blocked.load(Ordering::SeqCst) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The handler.

const HOP_BY_HOP: &[&str] = &["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"];

fn hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// `<repo>` of `/v2/<repo>/(manifests|blobs|tags)/...`.
fn repo_of(path: &str) -> Option<String> {
    let p = path.split('?').next()?.strip_prefix("/v2/")?;
    let segs: Vec<&str> = p.split('/').collect();
    (1..segs.len().saturating_sub(1)).find(|&i| matches!(segs[i], "manifests" | "blobs" | "tags")).map(|i| segs[..i].join("/"))
}

fn is_blob_get(method: &Method, path: &str) -> bool {
    let p = path.split('?').next().unwrap_or("");
    *method == Method::GET && p.starts_with("/v2/") && p.contains("/blobs/") && !p.contains("/blobs/uploads")
}

fn error_json(code: &str, message: &str) -> Bytes {
    Bytes::from(serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]}).to_string())
}

/// A response the relay makes up itself (not from the target).
fn synthetic(shared: &Shared, entry: &Entry, status: u16, headers: Vec<(HeaderName, String)>, body: Bytes) -> Response {
    entry.status.store(status, Ordering::SeqCst);
    entry.body.store(body.len() as u64, Ordering::SeqCst);
    entry.complete.store(true, Ordering::SeqCst);
    shared.body_total.fetch_add(body.len() as u64, Ordering::SeqCst);
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(k, v);
    }
    b.header(header::CONTENT_LENGTH, body.len()).body(Body::from(body)).expect("response")
}

async fn handle(State(shared): State<Arc<Shared>>, ConnectInfo(conn): ConnectInfo<Conn>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let key = format!("{method} {path}");
    let h = req.headers();
    let entry = Arc::new(Entry {
        method: method.to_string(),
        path: path.clone(),
        range: h.get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_string),
        authorization: h.contains_key(header::AUTHORIZATION),
        headers: h.iter().map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect(),
        status: AtomicU16::new(0),
        body: AtomicU64::new(0),
        complete: AtomicBool::new(false),
        aborted: AtomicBool::new(false),
    });
    shared.log.lock().unwrap().push(entry.clone());

    // Latency.
    let delay = {
        let f = shared.faults.lock().unwrap();
        f.delay.as_ref().filter(|(m, _)| key.contains(m.as_str())).map(|(_, d)| *d)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }

    // A hung upstream: wait while a matching hang is set.
    let mut changes = shared.changed.subscribe();
    loop {
        let hung = shared.faults.lock().unwrap().hang.as_ref().is_some_and(|m| key.contains(m.as_str()));
        if !hung {
            break;
        }
        if changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    // Auth in front of the target.
    let auth = shared.faults.lock().unwrap().auth.clone();
    let presented = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let enforced = !matches!(auth, AuthMode::None);
    match &auth {
        AuthMode::None => {}
        AuthMode::Basic(expected) => {
            let ok = presented
                .as_deref()
                .is_some_and(|p| p.split_once(' ').is_some_and(|(s, c)| s.eq_ignore_ascii_case("basic") && c.trim() == expected));
            if !ok {
                return synthetic(
                    &shared,
                    &entry,
                    401,
                    vec![(header::WWW_AUTHENTICATE, "Basic realm=\"relay\"".into()), (header::CONTENT_TYPE, "application/json".into())],
                    error_json("UNAUTHORIZED", "authentication required"),
                );
            }
        }
        AuthMode::Bearer { realm, tokens } => {
            let repo = repo_of(&path);
            let actions: &[&str] = if method == Method::GET || method == Method::HEAD { &["pull"] } else { &["pull", "push"] };
            let ok = presented.as_deref().is_some_and(|p| {
                p.split_once(' ').is_some_and(|(s, t)| s.eq_ignore_ascii_case("bearer") && tokens.check(t.trim(), repo.as_deref(), actions))
            });
            if !ok {
                let mut challenge = format!("Bearer realm=\"{realm}\",service=\"relay\"");
                if let Some(repo) = &repo {
                    challenge.push_str(&format!(",scope=\"repository:{repo}:{}\"", actions.join(",")));
                }
                return synthetic(
                    &shared,
                    &entry,
                    401,
                    vec![(header::WWW_AUTHENTICATE, challenge), (header::CONTENT_TYPE, "application/json".into())],
                    error_json("UNAUTHORIZED", "authentication required"),
                );
            }
        }
    }

    // Injected failures.
    let failure = {
        let mut f = shared.faults.lock().unwrap();
        let i = f.fail.iter().position(|a| a.times > 0 && key.contains(a.matcher.as_str()));
        i.map(|i| {
            f.fail[i].times -= 1;
            let out = (f.fail[i].status, f.fail[i].retry_after.clone());
            if f.fail[i].times == 0 {
                f.fail.remove(i);
            }
            out
        })
    };
    if let Some((status, retry_after)) = failure {
        let code = match status {
            401 => "UNAUTHORIZED",
            403 => "DENIED",
            404 => "NOT_FOUND",
            429 => "TOOMANYREQUESTS",
            _ if status >= 500 => "UNAVAILABLE",
            _ => "UNKNOWN",
        };
        let mut headers = vec![(header::CONTENT_TYPE, "application/json".to_string())];
        if let Some(r) = retry_after {
            headers.push((header::RETRY_AFTER, r));
        }
        let body = if method == Method::HEAD { Bytes::new() } else { error_json(code, "injected by the test relay") };
        return synthetic(&shared, &entry, status, headers, body);
    }

    // Blob GETs redirected to a "CDN".
    let redirect = shared.faults.lock().unwrap().redirect_blobs.clone();
    if let Some(other) = redirect.filter(|_| is_blob_get(&method, &path)) {
        return synthetic(&shared, &entry, 307, vec![(header::LOCATION, format!("http://{other}{path}"))], Bytes::new());
    }

    // Forward.
    let (parts, body) = req.into_parts();
    let mut headers = HeaderMap::new();
    for (k, v) in parts.headers.iter() {
        if *k == header::HOST || hop_by_hop(k) || (enforced && *k == header::AUTHORIZATION) {
            continue;
        }
        headers.append(k.clone(), v.clone());
    }
    let content_length = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let chunked = parts
        .headers
        .get(header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let target = shared.target.lock().unwrap().clone();
    let mut rb = shared.client.request(method.clone(), format!("http://{target}{path}")).headers(headers);
    if content_length == Some(0) {
        rb = rb.body(Bytes::new());
    } else if content_length.is_some() || chunked {
        rb = rb.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    }
    let resp = match rb.send().await {
        Ok(resp) => resp,
        Err(e) => {
            return synthetic(
                &shared,
                &entry,
                502,
                vec![(header::CONTENT_TYPE, "application/json".into())],
                error_json("UNAVAILABLE", &format!("relay: target unreachable: {e}")),
            );
        }
    };

    let status = resp.status();
    entry.status.store(status.as_u16(), Ordering::SeqCst);
    let mut out = Response::builder().status(status);
    let upstream_prefix = format!("http://{target}");
    for (k, v) in resp.headers() {
        if hop_by_hop(k) {
            continue;
        }
        if *k == header::LOCATION {
            if let Some(rest) = v.to_str().ok().and_then(|s| s.strip_prefix(&upstream_prefix)) {
                let rewritten = format!("http://{}{}", shared.self_addr, rest);
                out = out.header(k, HeaderValue::from_str(&rewritten).expect("location"));
                continue;
            }
        }
        out = out.header(k, v);
    }

    // Bodies hyper will not poll to their end: none at all (HEAD, 204, 304), or stopped at Content-Length.
    if method == Method::HEAD || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        entry.complete.store(true, Ordering::SeqCst);
    }
    let expected_len = resp.content_length();
    let body_faults = status.is_success() && method != Method::HEAD;
    let (cut, stall, corrupt) = if body_faults {
        let mut f = shared.faults.lock().unwrap();
        (take_armed(&mut f.cut, &key), take_armed(&mut f.stall, &key), take_armed(&mut f.corrupt, &key))
    } else {
        (None, None, None)
    };
    let pump = Pump {
        upstream: Box::pin(resp.bytes_stream()),
        leftover: None,
        offset: 0,
        expected_len,
        cut,
        stall,
        corrupt,
        key,
        shared: shared.clone(),
        entry,
        conn: conn.0,
        next_at: None,
        done: false,
    };
    let stream = futures_util::stream::unfold(pump, |mut p| async move {
        let item = p.next().await?;
        Some((item, p))
    });
    out.body(Body::from_stream(stream)).expect("response")
}

/// Streams one upstream body to the client, applying throttle, cut, stall and corrupt on the way.
struct Pump {
    upstream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    leftover: Option<Bytes>,
    offset: u64,
    /// The upstream's Content-Length: once that many bytes went out, the body is complete.
    expected_len: Option<u64>,
    cut: Option<u64>,
    stall: Option<u64>,
    corrupt: Option<u64>,
    key: String,
    shared: Arc<Shared>,
    entry: Arc<Entry>,
    conn: Arc<ConnState>,
    next_at: Option<Instant>,
    done: bool,
}

impl Pump {
    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        if self.done {
            return None;
        }
        if let Some(k) = self.cut {
            if self.offset >= k {
                self.done = true;
                // Let the k bytes reach the client before the connection is aborted.
                wait_drained(&self.conn, &self.shared).await;
                self.entry.aborted.store(true, Ordering::SeqCst);
                return Some(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "relay: injected cut")));
            }
        }
        if let Some(k) = self.stall {
            if self.offset >= k {
                std::future::pending::<()>().await;
            }
        }
        let mut chunk = loop {
            let c = match self.leftover.take() {
                Some(c) => c,
                None => match self.upstream.next().await {
                    None => {
                        self.done = true;
                        self.entry.complete.store(true, Ordering::SeqCst);
                        return None;
                    }
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(io::Error::other(e)));
                    }
                    Some(Ok(c)) => c,
                },
            };
            if !c.is_empty() {
                break c;
            }
        };
        let mut limit = chunk.len() as u64;
        if let Some(k) = self.cut {
            limit = limit.min(k - self.offset);
        }
        if let Some(k) = self.stall {
            limit = limit.min(k - self.offset);
        }
        let rate = self.shared.throttle_for(&self.key);
        if let Some(r) = rate {
            limit = limit.min((r / 50).max(1)); // slices of ~20 ms
        }
        if (limit as usize) < chunk.len() {
            self.leftover = Some(chunk.split_off(limit as usize));
        }
        let len = chunk.len() as u64;
        match rate {
            Some(r) => {
                let now = Instant::now();
                let at = self.next_at.filter(|t| *t > now).unwrap_or(now);
                tokio::time::sleep_until(at.into()).await;
                self.next_at = Some(at + Duration::from_secs_f64(len as f64 / r as f64));
            }
            None => self.next_at = None,
        }
        if let Some(off) = self.corrupt {
            if off >= self.offset && off < self.offset + len {
                let mut b = BytesMut::from(&chunk[..]);
                b[(off - self.offset) as usize] ^= 0xff;
                chunk = b.freeze();
                self.corrupt = None;
            }
        }
        self.offset += len;
        self.entry.body.fetch_add(len, Ordering::SeqCst);
        self.shared.body_total.fetch_add(len, Ordering::SeqCst);
        if self.expected_len.is_some_and(|n| self.offset >= n) && self.cut.is_none_or(|k| k > self.offset) {
            self.entry.complete.store(true, Ordering::SeqCst);
        }
        Some(Ok(chunk))
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        if !self.entry.complete.load(Ordering::SeqCst) {
            self.entry.aborted.store(true, Ordering::SeqCst);
        }
    }
}
