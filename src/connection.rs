//! Serving connections: the accept loop and what bounds every connection's waits.
//!
//! `axum::serve` bounds nothing: a client that sends half a request head, never sends the rest of a body, or
//! stops reading a response holds its socket (and whatever file the response reads) forever, and there is no
//! limit on how many it may hold. Here every wait on a client is bounded:
//! - a request head must arrive whole within the header timeout (counted from the connection's accept, or from
//!   the first byte of a later request on a kept-alive connection);
//! - a kept-alive connection with no request in progress is closed after the idle timeout;
//! - a request body that makes no progress for the idle timeout fails (the handler sees an error and keeps what
//!   it received, as for any broken body), and so does a response write that the socket has not accepted for the
//!   idle timeout (the client stopped reading). A slow transfer that keeps moving is never cut;
//! - at most `max_connections` are served at once; further connections wait in the listen backlog, unaccepted,
//!   until a served one closes.
//!
//! With TLS the same bounds hold, from the same timers, which sit under the TLS layer on the raw socket:
//! - the handshake's reads are under the header timeout, counted from the accept: a client that sends nothing,
//!   or half a ClientHello, is closed when it expires, and the request head must have come by then too;
//! - an HTTP/2 connection (ALPN `h2`) serves at most [`H2_MAX_CONCURRENT_STREAMS`] requests at once. Its first
//!   request must start within the header timeout and, whenever no request is in progress, it is closed after
//!   the idle timeout (frames that start no request, such as pings, do not keep it open). Request bodies have
//!   their idle timeout as on HTTP/1; a response the client grants no flow-control window for the idle timeout
//!   (it stopped reading) closes the connection, as does a socket write stuck for that long.
//!
//! Shutdown stops accepting, asks every connection to finish its request in progress and close (HTTP/2: a
//! GOAWAY), and waits for them (all of which the timeouts above bound).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// The bounds on a client's connection; see the module documentation for what each one bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Connections served at once; each costs a socket, and a blob download also an open file.
    pub max_connections: u32,
}

/// Defaults: a request head is a few hundred bytes, so 30 s is generous for any live client; 60 s without
/// progress is nginx's body and send timeout; 8192 connections are far more than a registry's clients keep
/// open, while 2 descriptors each (socket and open blob file) stay below a 20,000 descriptor limit with room
/// for upstream sockets, the database pool and the spool.
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8192;

/// Requests in progress at once on one HTTP/2 connection; more wait for one to end. nginx's default, and more
/// than the blobs a client pulls in parallel (a few layers at a time).
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 128;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(DEFAULT_HEADER_TIMEOUT_SECS),
            idle_timeout: Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS),
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Connections the kernel may hold completed but not yet accepted (capped by `net.core.somaxconn`, 4096 by default
/// on Linux). `TcpListener::bind` asks for 128: a herd of hundreds of clients connecting at once overflowed it, and
/// every SYN the kernel dropped was retried by its client a second (then three) later, which was the slowest
/// first bytes of an 800-client herd. nginx asks for 511.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` for [`serve`], with a listen backlog of [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as
/// `TcpListener::bind` sets it, so a restart does not wait out the old sockets' TIME_WAIT).
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `router` on `listener` within `limits` (over TLS when `tls` is given) until `shutdown` resolves, then
/// stops accepting and lets the requests in progress finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let max = limits.max_connections.max(1);
    // A permit per served connection: the cap, and at shutdown the count of connections still draining.
    let permits = Arc::new(Semaphore::new(max as usize));
    let (stop, stopped) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let spawn = |stream: TcpStream, permit: tokio::sync::OwnedSemaphorePermit| {
            let (router, stopped, tls) = (router.clone(), stopped.clone(), tls.clone());
            tokio::spawn(async move {
                serve_one(stream, router, limits, tls, stopped).await;
                drop(permit);
            });
        };
        spawn(stream, permit);
        accept_waiting(&listener, &permits, spawn);
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection holds a permit until it has closed.
    let _ = permits.acquire_many(max).await;
}

/// Connections taken from the backlog at most per wake-up of the accept loop.
const ACCEPT_BATCH: usize = 256;

/// Accepts, without waiting, the connections already waiting in the backlog (at most [`ACCEPT_BATCH`], each with a
/// free permit), and hands each to `spawn`. The accept loop is one task among the connections it has accepted:
/// each time it waits, it goes to the back of the run queue behind every busy download, so taking one
/// connection per turn (or the runtime's cooperative budget's worth) would let a herd of hundreds wait in the
/// backlog for many turns, their first bytes with it. Unconstrained by that budget, because the point is to
/// empty the backlog in one turn; bounded, so that the loop still lets the others run.
fn accept_waiting(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    spawn: impl Fn(TcpStream, tokio::sync::OwnedSemaphorePermit),
) {
    use futures_util::FutureExt;
    for _ in 0..ACCEPT_BATCH {
        let Ok(permit) = Arc::clone(permits).try_acquire_owned() else { return };
        // `now_or_never` polls once: a connection in the backlog is taken, an empty backlog ends the batch (and
        // the loop's next `accept` waits for readiness with its own waker).
        match tokio::task::unconstrained(listener.accept()).now_or_never() {
            Some(Ok((stream, _))) => spawn(stream, permit),
            // An error is left to the loop's next `accept`, which handles it (or it was a transient one).
            Some(Err(_)) | None => return,
        }
    }
}

/// A failed `accept`: a connection that died in the backlog is nothing; running out of descriptors is waited
/// out (connections closing free some) instead of spinning.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn serve_one(stream: TcpStream, router: Router, limits: Limits, tls: Option<TlsAcceptor>, stopped: watch::Receiver<bool>) {
    let state = Arc::new(Mutex::new(ConnState {
        phase: Phase::Head { since: Instant::now() },
        busy: 0,
        parked_reader: None,
        bytes_start_head: true,
        unpolled: None,
    }));
    let peer = stream.peer_addr().ok();
    let io = Watched::new(stream, Arc::clone(&state), limits);
    let service = ConnService { router, state: Arc::clone(&state), idle: limits.idle_timeout, peer };
    let Some(acceptor) = tls else {
        return serve_http1(TokioIo::new(io), service, stopped).await;
    };
    // The handshake reads through `Watched`, under the head deadline: it is bounded like a request head.
    let tls = match acceptor.accept(io).await {
        Ok(tls) => tls,
        Err(e) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
    };
    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
        {
            let mut state = lock(&state);
            // Pings and window updates arrive between requests; only a new stream ends idleness.
            state.bytes_start_head = false;
            state.unpolled = Some(Unpolled::default());
        }
        serve_http2(TokioIo::new(tls), service, state, limits, stopped).await
    } else {
        serve_http1(TokioIo::new(tls), service, stopped).await
    }
}

async fn serve_http1<I>(io: I, service: ConnService, stopped: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Our own timers bound the head (hyper's would also count the idle time before it).
    builder.header_read_timeout(None);
    drive(builder.serve_connection(io, service), stopped, None).await
}

async fn serve_http2<I>(io: I, service: ConnService, state: SharedPhase, limits: Limits, stopped: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        // While requests are in progress the connection's reads wait unbounded: pings find a vanished peer.
        .keep_alive_interval(Some(limits.idle_timeout))
        .keep_alive_timeout(limits.idle_timeout);
    drive(builder.serve_connection(io, service), stopped, Some((state, limits.idle_timeout))).await
}

/// A served connection: it ends by itself, or drains when asked to.
trait Connection: Future<Output = Result<(), hyper::Error>> {
    fn drain(self: Pin<&mut Self>);
}

impl<I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static> Connection
    for hyper::server::conn::http1::Connection<I, ConnService>
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

impl<I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static> Connection
    for hyper::server::conn::http2::Connection<I, ConnService, TokioExecutor>
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

/// Runs `conn` to its end, draining it at shutdown. With `stalls` (HTTP/2), it is closed once a response has
/// waited the idle timeout for the client's flow-control window.
async fn drive(conn: impl Connection, mut stopped: watch::Receiver<bool>, stalls: Option<(SharedPhase, Duration)>) {
    let mut conn = pin!(conn);
    let mut draining = false;
    // A response's wait is noticed within a quarter of the timeout after it is over.
    let mut check = tokio::time::interval(stalls.as_ref().map_or(Duration::from_secs(3600), |(_, idle)| *idle / 4));
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended");
                }
                return;
            }
            _ = stopped.wait_for(|s| *s), if !draining => {
                draining = true;
                conn.as_mut().drain();
            }
            _ = check.tick(), if stalls.is_some() => {
                if let Some((state, idle)) = &stalls {
                    if stalled(state, *idle) {
                        tracing::debug!("closing an HTTP/2 connection: the client stopped reading a response");
                        return;
                    }
                }
            }
        }
    }
}

/// Whether a response on the connection has waited `idle` for the client to take more of it.
fn stalled(state: &SharedPhase, idle: Duration) -> bool {
    let now = Instant::now();
    lock(state).unpolled.as_ref().is_some_and(|u| u.waiting.values().any(|since| after(*since, idle) <= now))
}

/// Where a connection is between requests; decides which timeout its reads are under.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// A request head is arriving (or, on a fresh connection, expected) since then: the header timeout runs.
    Head { since: Instant },
    /// A request is being handled or its response written: bodies are under their own idle bounds.
    Busy,
    /// The last response is written and nothing has arrived since then: the idle timeout runs.
    Idle { since: Instant },
}

/// A connection's phase, shared by its socket (which times reads by it) and its service (which moves it).
#[derive(Debug)]
struct ConnState {
    phase: Phase,
    /// Requests in progress: HTTP/1 has at most one, HTTP/2 many; the connection is idle when none is.
    busy: usize,
    /// The read that waits, unbounded, while a request is in progress: woken when the connection goes idle so
    /// that it is retried under the idle deadline (nothing else would wake it before the client sends).
    parked_reader: Option<std::task::Waker>,
    /// Whether bytes on an idle connection start a request head (HTTP/1). On HTTP/2 they may be pings or window
    /// updates, and only a request ends idleness.
    bytes_start_head: bool,
    /// HTTP/2 only: the responses waiting for the client's flow-control window.
    unpolled: Option<Unpolled>,
}

/// The responses of an HTTP/2 connection that handed hyper a frame and have not been asked for the next one
/// since. hyper asks as soon as the client's window has room, so a long wait means the client stopped reading;
/// a response waiting for its own source (an upstream) is being asked, and is not here.
#[derive(Debug, Default)]
struct Unpolled {
    /// Since when each response (by its number on the connection) has waited.
    waiting: HashMap<u64, Instant>,
    /// The number the next response gets.
    next: u64,
}

type SharedPhase = Arc<Mutex<ConnState>>;

fn lock(p: &SharedPhase) -> std::sync::MutexGuard<'_, ConnState> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// `since + d`, saturating at a year away (a configured timeout may be huge; `Instant + Duration` panics on
/// overflow).
fn after(since: Instant, d: Duration) -> Instant {
    since.checked_add(d).unwrap_or_else(|| since + Duration::from_secs(365 * 24 * 3600))
}

/// The socket, with the connection's read deadline (head or idle) and the bound on a stuck write.
struct Watched {
    io: TcpStream,
    phase: SharedPhase,
    limits: Limits,
    /// Armed while a read waits under a deadline.
    read_timer: Option<Pin<Box<Sleep>>>,
    /// Armed while a write waits for the socket to take bytes.
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl Watched {
    fn new(io: TcpStream, phase: SharedPhase, limits: Limits) -> Watched {
        Watched { io, phase, limits, read_timer: None, write_timer: None }
    }

    /// When the current wait for the client's bytes must end, and why; `None` while a request is in progress
    /// (then the waiting read is parked, to be woken when the connection goes idle).
    fn read_deadline(&self, cx: &Context<'_>) -> Option<(Instant, &'static str)> {
        let mut state = lock(&self.phase);
        match state.phase {
            Phase::Head { since } => Some((after(since, self.limits.header_timeout), "request head not received in time")),
            Phase::Idle { since } => Some((after(since, self.limits.idle_timeout), "idle connection")),
            Phase::Busy => {
                state.parked_reader = Some(cx.waker().clone());
                None
            }
        }
    }

    /// Bytes arrived: on an idle connection that starts a request head.
    fn received(&self) {
        let mut state = lock(&self.phase);
        if let (Phase::Idle { .. }, true) = (state.phase, state.bytes_start_head) {
            state.phase = Phase::Head { since: Instant::now() };
        }
    }

    fn poll_write_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match write(Pin::new(&mut self.io), cx) {
            Poll::Ready(r) => {
                self.write_timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let idle = self.limits.idle_timeout;
                let timer = self.write_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "client stopped reading")))
            }
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.read_timer = None;
                if buf.filled().len() > before {
                    this.received();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let Some((deadline, why)) = this.read_deadline(cx) else {
                    this.read_timer = None;
                    return Poll::Pending;
                };
                let timer = this.read_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)))
            }
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_write_with(cx, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The router as hyper's service, marking the connection busy from a request's head to its response's end.
#[derive(Clone)]
struct ConnService {
    router: Router,
    state: SharedPhase,
    idle: Duration,
    /// The client's address, handed to handlers as `ConnectInfo` (failed logins are counted per address).
    peer: Option<std::net::SocketAddr>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnService {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        {
            let mut state = lock(&self.state);
            state.phase = Phase::Busy;
            state.busy += 1;
        }
        let busy = BusyGuard(Arc::clone(&self.state));
        let idle = self.idle;
        let mut req: Request = req.map(|body| Body::new(IdleBody { inner: body, idle, timer: None }));
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        }
        let router = self.router.clone();
        Box::pin(async move {
            let resp = match router.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let id = lock(&busy.0).unpolled.as_mut().map(|u| {
                u.next += 1;
                u.next
            });
            Ok(resp.map(|body| Body::new(UntilEnd { inner: body, id, busy: Some(busy) })))
        })
    }
}

/// Ends a request's busy mark when dropped: its response is written (or the request was abandoned). The last
/// one puts the connection back to idle.
struct BusyGuard(SharedPhase);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut state = lock(&self.0);
        state.busy = state.busy.saturating_sub(1);
        if state.busy > 0 {
            return;
        }
        state.phase = Phase::Idle { since: Instant::now() };
        if let Some(reader) = state.parked_reader.take() {
            reader.wake();
        }
    }
}

/// A response body that releases its request's busy mark at its end and, on HTTP/2, tells the connection while
/// it waits for the client to take more.
struct UntilEnd {
    inner: Body,
    /// Its number in the connection's `Unpolled`, on HTTP/2.
    id: Option<u64>,
    busy: Option<BusyGuard>,
}

impl UntilEnd {
    /// Marks the response as waiting for hyper to ask for more (`Some(now)`), or not (`None`).
    fn waiting(&self, since: Option<Instant>) {
        let (Some(id), Some(busy)) = (self.id, &self.busy) else { return };
        if let Some(u) = lock(&busy.0).unpolled.as_mut() {
            match since {
                Some(t) => u.waiting.insert(id, t),
                None => u.waiting.remove(&id),
            };
        }
    }
}

impl Drop for UntilEnd {
    fn drop(&mut self) {
        self.waiting(None);
    }
}

impl hyper::body::Body for UntilEnd {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.waiting(None);
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match frame {
            None => {
                self.busy = None;
            }
            Some(_) => self.waiting(Some(Instant::now())),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request body ended early.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("request body made no progress for {0:?}")]
    Stalled(Duration),
    #[error(transparent)]
    Transport(#[from] hyper::Error),
}

/// A request body that fails when the client sends nothing for the idle timeout while the handler waits for it.
struct IdleBody {
    inner: Incoming,
    idle: Duration,
    /// Armed from the first wait after the last frame.
    timer: Option<Pin<Box<Sleep>>>,
}

impl hyper::body::Body for IdleBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.timer = None;
                Poll::Ready(frame.map(|f| f.map_err(BodyError::from)))
            }
            Poll::Pending => {
                let idle = self.idle;
                let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(BodyError::Stalled(idle))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
