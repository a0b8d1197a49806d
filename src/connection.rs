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
//! Shutdown stops accepting, asks every connection to finish its request in progress and close, and waits for
//! them (all of which the timeouts above bound).

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
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};
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

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(DEFAULT_HEADER_TIMEOUT_SECS),
            idle_timeout: Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS),
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then stops accepting and lets the
/// requests in progress finish.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, shutdown: impl Future<Output = ()>) {
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
        let (router, stopped) = (router.clone(), stopped.clone());
        tokio::spawn(async move {
            serve_one(stream, router, limits, stopped).await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection holds a permit until it has closed.
    let _ = permits.acquire_many(max).await;
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

async fn serve_one(stream: TcpStream, router: Router, limits: Limits, mut stopped: watch::Receiver<bool>) {
    let state = Arc::new(Mutex::new(ConnState { phase: Phase::Head { since: Instant::now() }, parked_reader: None }));
    let peer = stream.peer_addr().ok();
    let io = TokioIo::new(Watched::new(stream, Arc::clone(&state), limits));
    let service = ConnService { router, state, idle: limits.idle_timeout, peer };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Our own timers bound the head (hyper's would also count the idle time before it).
    builder.header_read_timeout(None);
    let mut conn = pin!(builder.serve_connection(io, service));
    let mut draining = false;
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
                conn.as_mut().graceful_shutdown();
            }
        }
    }
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
    /// The read that waits, unbounded, while a request is in progress: woken when the connection goes idle so
    /// that it is retried under the idle deadline (nothing else would wake it before the client sends).
    parked_reader: Option<std::task::Waker>,
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
        if let Phase::Idle { .. } = state.phase {
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
        lock(&self.state).phase = Phase::Busy;
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
            Ok(resp.map(|body| Body::new(UntilEnd { inner: body, busy: Some(busy) })))
        })
    }
}

/// Puts the connection back to idle when dropped: the response is written (or the request was abandoned).
struct BusyGuard(SharedPhase);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut state = lock(&self.0);
        state.phase = Phase::Idle { since: Instant::now() };
        if let Some(reader) = state.parked_reader.take() {
            reader.wake();
        }
    }
}

/// A response body that releases the connection's busy mark at its end.
struct UntilEnd {
    inner: Body,
    busy: Option<BusyGuard>,
}

impl hyper::body::Body for UntilEnd {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if frame.is_none() {
            self.busy = None;
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
