//! Blob flights: one upstream download per digest, streamed to every waiting client from a spool file.
//!
//! ```text
//! client 1 ─┐                        ┌─ spool file (grows) ─┐
//! client 2 ─┼─> BlobFlights::join ───┤                      ├─> verify digest, adopt into storage
//! client N ─┘    one fetch task      └─ watch: Progress ────┘
//! ```
//! The fetch task appends to the spool and publishes how many bytes are there; the spool is mapped once for the
//! blob's whole size, and each client hands hyper slices of that one map below the published count, then waits
//! for the next change. So late joiners replay from disk (page cache), a slow client only slows itself, and a
//! client costs no buffer of ours whatever N is: its slices are page cache, shared with every other reader, not
//! the process's anonymous memory; and one map means the page tables and first-touch faults are paid once per
//! flight, not once per client.
//!
//! A flight outlives the clients that wait on it (it fills the cache), but not the server: at shutdown, after
//! the HTTP drain, its download is cancelled and it ends as a failed flight does, its spool removed. Only the
//! download is cancelled, never the adoption of a verified spool, so no partial file ever gets a digest's name.

use std::collections::HashMap;
use std::io;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::StreamExt;
use tokio::fs::File;
use tokio::sync::{watch, Mutex};

use crate::oci::Digest;
use crate::storage::{BlobStore, ByteRange, ByteStream, StorageError};

/// Bytes gathered from upstream before they are written to the spool and announced to readers; announcing every
/// small network chunk would wake every reader thousands of times a second.
const PUBLISH_BYTES: usize = 256 * 1024;
/// ...unless this long has passed since the last announcement, so a slow upstream still streams promptly.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(20);
/// How much of the mapped spool one slice handed to hyper holds, as for stored blobs (`storage::local`): a
/// slice costs no memory, and between two slices the reader yields, so that a socket that takes megabytes at
/// once does not hold a runtime thread while other clients wait for their first bytes.
const SERVE_SLICE: usize = 256 * 1024;
/// How many times a broken download is resumed (with `Range`) before the flight fails.
const RESUME_ATTEMPTS: u32 = 3;

/// An upstream response body for a blob, starting at the offset it was asked for.
pub struct FetchBody {
    /// Size of the whole blob, when the upstream says (`Content-Length` of a 200, or the total of a 206).
    pub total: Option<u64>,
    /// Whether the body starts at the requested offset (a 206) or at 0 (a 200 that ignored `Range`).
    pub from_offset: bool,
    pub body: ByteStream,
}

/// Why a fetch attempt gave no body.
#[derive(Debug, Clone)]
pub enum FetchError {
    /// The upstream does not have the blob: no point retrying.
    NotFound,
    /// Worth another attempt (connection trouble, 5xx).
    Retryable(String),
    /// Not worth another attempt (auth refused, rate-limited).
    Fatal(String),
}

/// Starts a download of the blob from byte `offset`. Given by the caller (the proxy), which knows the upstream.
pub type Fetcher = Arc<dyn Fn(u64) -> BoxFuture<'static, Result<FetchBody, FetchError>> + Send + Sync>;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FlightError {
    #[error("blob not found upstream")]
    NotFound,
    #[error("upstream fetch failed: {0}")]
    Failed(Arc<str>),
    /// The server is shutting down: the download was stopped, nothing was cached.
    #[error("the server is shutting down")]
    ShuttingDown,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// Waiting for the upstream's response headers.
    Connecting,
    Streaming,
    /// Verified and adopted into storage.
    Done,
    Failed(FlightError),
}

#[derive(Debug, Clone)]
struct Progress {
    /// Bytes in the spool file that readers may read.
    written: u64,
    total: Option<u64>,
    phase: Phase,
}

/// One blob being downloaded.
pub struct BlobFlight {
    pub digest: Digest,
    spool: PathBuf,
    progress: watch::Receiver<Progress>,
    /// Where the blob lives once the flight is done (readers that arrive after the spool was moved read it there).
    store: Arc<dyn BlobStore>,
    /// When it started, for the status page (age, rate).
    started: Instant,
    /// The repository whose pull started it, for the status page (later pulls of the digest from other
    /// repositories join it: content is shared).
    repository: String,
    /// Clients streaming from it now (for the status page; a reader's stream counts until it is dropped).
    readers: Arc<std::sync::atomic::AtomicUsize>,
    /// The spool mapped for the blob's whole size, made by the first reader once the size is known and shared by
    /// all: a map per reader cost each client of a herd its own page tables and a fault per 64 KiB it sent.
    map: std::sync::OnceLock<Bytes>,
}

/// A flight in progress as `/api/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FlightStatus {
    /// The repository whose pull started the flight.
    pub repository: String,
    pub digest: String,
    /// Bytes downloaded so far.
    pub bytes: u64,
    /// The blob's size, once the upstream said.
    pub total: Option<u64>,
    /// Clients streaming it now.
    pub clients: usize,
    pub age_ms: u64,
    /// Bytes per second since the flight started.
    pub rate: u64,
}

/// How a request for a blob is served.
pub enum Join {
    /// The blob is in storage already, with this size.
    Stored(u64),
    /// A flight is running; `joined` is true if someone else started it (a coalesced request).
    Flight { flight: Arc<BlobFlight>, joined: bool },
}

/// The flights in progress, by digest.
pub struct BlobFlights {
    store: Arc<dyn BlobStore>,
    spool_dir: PathBuf,
    /// A tokio mutex because the miss path checks storage (async) under it: see `join`.
    inflight: Mutex<HashMap<Digest, Arc<BlobFlight>>>,
    /// The requests for a digest that arrive together share one pass through `inflight` (`join_or_start`): a
    /// herd of hundreds queued on the mutex would be let through one per round of the run queue, each round
    /// longer than the last as the ones let through start streaming.
    starts: super::Group<Digest, Result<Started, Arc<str>>>,
    /// The server's background tasks: flights run among them, and stop when they are cancelled.
    tasks: crate::shutdown::Tasks,
    /// Where downloads run: the runtime of `flight::downloads` in a server, so that serving clients never
    /// delays the bytes they wait for.
    downloads: tokio::runtime::Handle,
}

impl BlobFlights {
    /// Flights spool into `spool_dir`, which must be on the same filesystem as a local store so that adopting a
    /// finished spool is a rename. Spools left by a previous process are removed: flights do not survive restarts.
    /// Flights run as tasks of `tasks`; their downloads on `downloads`.
    pub async fn new(
        store: Arc<dyn BlobStore>,
        spool_dir: PathBuf,
        tasks: crate::shutdown::Tasks,
        downloads: tokio::runtime::Handle,
    ) -> io::Result<Arc<BlobFlights>> {
        tokio::fs::create_dir_all(&spool_dir).await?;
        let mut entries = tokio::fs::read_dir(&spool_dir).await?;
        while let Some(e) = entries.next_entry().await? {
            let _ = tokio::fs::remove_file(e.path()).await;
        }
        Ok(Arc::new(BlobFlights {
            store,
            spool_dir,
            inflight: Mutex::new(HashMap::new()),
            starts: super::Group::default(),
            tasks,
            downloads,
        }))
    }

    /// The tasks flights run among; for work that must follow a flight to its end (linking what it cached).
    pub fn tasks(&self) -> &crate::shutdown::Tasks {
        &self.tasks
    }

    /// Number of flights running now.
    pub async fn running(&self) -> usize {
        self.inflight.lock().await.len()
    }

    /// The flights in progress, oldest first, at most `limit` of them, and how many there are in all.
    pub async fn status(&self, limit: usize) -> (usize, Vec<FlightStatus>) {
        let flights: Vec<Arc<BlobFlight>> = self.inflight.lock().await.values().cloned().collect();
        let mut shown: Vec<FlightStatus> = flights.iter().map(|f| f.status()).collect();
        shown.sort_unstable_by(|a, b| b.age_ms.cmp(&a.age_ms).then_with(|| a.digest.cmp(&b.digest)));
        shown.truncate(limit);
        (flights.len(), shown)
    }

    /// Whether `digest` is being downloaded (eviction must not remove it).
    pub async fn is_running(&self, digest: &Digest) -> bool {
        self.inflight.lock().await.contains_key(digest)
    }

    /// `digest` from the flight already running or from storage, without starting a flight: `None` when neither
    /// has it (a HEAD asks the upstream then, rather than download what it only wants the size of).
    pub async fn peek(&self, digest: &Digest) -> Result<Option<Join>, StorageError> {
        let inflight = self.inflight.lock().await;
        if let Some(f) = inflight.get(digest) {
            return Ok(Some(Join::Flight { flight: Arc::clone(f), joined: true }));
        }
        // Under the lock for the same reason as in `join`: a finishing flight is in storage before it leaves.
        Ok(self.store.size(digest).await?.map(Join::Stored))
    }

    /// What this instance has of `digest` from byte `offset` on, for another cluster member: the flight running
    /// here (bytes as they arrive, the last one once the blob is verified and stored) or storage; with the whole
    /// blob's size. `None` when neither has it, or `offset` is past its end.
    pub async fn read_from(&self, digest: &Digest, offset: u64) -> Result<Option<(u64, ByteStream)>, FlightError> {
        let failed = |e: StorageError| FlightError::Failed(e.to_string().into());
        match self.peek(digest).await.map_err(failed)? {
            Some(Join::Flight { flight, .. }) => {
                let size = flight.size().await?;
                if offset > size {
                    return Ok(None);
                }
                Ok(Some((size, flight.reader(Some(ByteRange { start: offset, end: size })).await?)))
            }
            Some(Join::Stored(size)) if offset <= size => {
                let body = self.store.read(digest, Some(ByteRange { start: offset, end: size })).await.map_err(failed)?;
                Ok(Some((size, body)))
            }
            Some(Join::Stored(_)) | None => Ok(None),
        }
    }

    /// Serves `digest` from storage, from the flight already running, or from a new flight using `fetch`.
    /// Exactly one caller is told it started a new flight (`joined: false`).
    /// `repository` is the one pulling, shown with the flight if this starts it.
    pub async fn join(self: &Arc<Self>, digest: &Digest, repository: &str, fetch: Fetcher) -> Result<Join, StorageError> {
        let (flights, d, repository) = (Arc::clone(self), digest.clone(), repository.to_string());
        let (shared, joined_pass) = self
            .starts
            .run(digest.clone(), move || async move {
                flights.join_or_start(&d, repository, fetch).await.map_err(|e| Arc::<str>::from(e.to_string()))
            })
            .await;
        match shared {
            Ok(Ok(Started::Stored(size))) => Ok(Join::Stored(size)),
            // The caller whose pass started the flight is its starter; the others of that pass joined it.
            Ok(Ok(Started::Flight { flight, new })) => Ok(Join::Flight { flight, joined: !new || joined_pass }),
            Ok(Err(e)) => Err(StorageError::Io(io::Error::other(e.to_string()))),
            Err(e) => Err(StorageError::Io(io::Error::other(e.to_string()))),
        }
    }

    async fn join_or_start(self: &Arc<Self>, digest: &Digest, repository: String, fetch: Fetcher) -> Result<Started, StorageError> {
        let mut inflight = self.inflight.lock().await;
        if let Some(f) = inflight.get(digest) {
            return Ok(Started::Flight { flight: Arc::clone(f), new: false });
        }
        // Checked under the lock: a finishing flight adopts its blob into storage *before* it leaves the map
        // (also under the lock), so a miss here cannot race with a flight that just finished.
        if let Some(size) = self.store.size(digest).await? {
            return Ok(Started::Stored(size));
        }
        let spool = self.spool_dir.join(format!("{}-{}", digest.hex(), uuid::Uuid::new_v4().simple()));
        let file = File::create(&spool).await?;
        let (tx, rx) = watch::channel(Progress { written: 0, total: None, phase: Phase::Connecting });
        let flight = Arc::new(BlobFlight {
            digest: digest.clone(),
            spool: spool.clone(),
            progress: rx,
            store: Arc::clone(&self.store),
            started: Instant::now(),
            repository,
            readers: Arc::default(),
            map: std::sync::OnceLock::new(),
        });
        inflight.insert(digest.clone(), Arc::clone(&flight));
        drop(inflight);
        metrics::gauge!("breakwater_flights_in_progress").increment(1.0);
        let flights = Arc::clone(self);
        let digest = digest.clone();
        let cancel = self.tasks.token();
        self.tasks.spawn("blob flight", async move {
            let work = async {
                let download = {
                    let (digest, tx) = (digest.clone(), tx.clone());
                    async move { cancel.run_until_cancelled(download(&digest, file, &fetch, &tx)).await }
                };
                // A panic of the download is raised again here, where it fails the flight like any other.
                let downloaded = flights.downloads.spawn(download).await.unwrap_or_else(|e| match e.try_into_panic() {
                    Ok(panic) => std::panic::resume_unwind(panic),
                    Err(_) => None,
                });
                match downloaded.unwrap_or(Err(FlightError::ShuttingDown)) {
                    Ok(()) => match flights.store_spool(&digest, &spool).await {
                        Ok(()) => Phase::Done,
                        Err(e) => Phase::Failed(FlightError::Failed(format!("storing the blob failed: {e}").into())),
                    },
                    Err(e) => Phase::Failed(e),
                }
            };
            // A panic (a bug in the fetcher or the store) fails this flight like any error, so that its digest is
            // released below and its waiters are told, rather than a dead entry answering every later request.
            let phase = AssertUnwindSafe(work).catch_unwind().await.unwrap_or_else(|panic| {
                Phase::Failed(FlightError::Failed(format!("the download panicked: {}", super::panic_message(panic.as_ref())).into()))
            });
            if let Phase::Failed(reason) = &phase {
                if *reason == FlightError::ShuttingDown {
                    tracing::info!(%digest, "blob flight cancelled by shutdown; nothing was cached");
                } else {
                    tracing::warn!(%digest, error = %reason, "blob flight failed; nothing was cached");
                }
                let _ = tokio::fs::remove_file(&spool).await;
            } else {
                tracing::info!(%digest, "blob flight done");
            }
            let mut inflight = flights.inflight.lock().await;
            tx.send_modify(|p| p.phase = phase);
            inflight.remove(&digest);
            metrics::gauge!("breakwater_flights_in_progress").decrement(1.0);
        });
        Ok(Started::Flight { flight, new: true })
    }
}

impl BlobFlights {
    /// Stores a verified spool under its digest, unless the digest is stored already: another cluster member's
    /// flight (which this one followed) or a push stored it meanwhile, and content is stored once. The spool is
    /// then removed; readers still streaming it hold their own handles.
    async fn store_spool(&self, digest: &Digest, spool: &std::path::Path) -> Result<(), StorageError> {
        if self.store.size(digest).await?.is_some() {
            let _ = tokio::fs::remove_file(spool).await;
            return Ok(());
        }
        self.store.adopt_file(digest, spool).await.map(|_| ())
    }
}

/// What one pass through `BlobFlights::inflight` found, shared by the requests of that pass.
#[derive(Clone)]
enum Started {
    Stored(u64),
    /// `new`: this pass started the flight.
    Flight { flight: Arc<BlobFlight>, new: bool },
}

/// Downloads into `file`, resuming after breaks, and verifies size and digest. Readers see bytes as they land.
async fn download(digest: &Digest, file: File, fetch: &Fetcher, tx: &watch::Sender<Progress>) -> Result<(), FlightError> {
    download_inner(digest, file, fetch, tx).await.map_err(|e| match e {
        Stop::NotFound => FlightError::NotFound,
        Stop::Failed(m) => FlightError::Failed(m.into()),
    })
}

/// Why a download stopped for good.
enum Stop {
    NotFound,
    Failed(String),
}

impl From<String> for Stop {
    fn from(m: String) -> Self {
        Stop::Failed(m)
    }
}

async fn download_inner(digest: &Digest, file: File, fetch: &Fetcher, tx: &watch::Sender<Progress>) -> Result<(), Stop> {
    let mut writer = SpoolWriter::start(file.into_std().await, digest.algorithm().hasher(), tx.clone());
    // Bytes handed to the writer, which writes every one of them or fails the flight: where a resumed request
    // starts.
    let mut written = 0u64;
    let mut total: Option<u64> = None;
    let mut failures = 0u32;
    let mut last_error = String::new();
    'attempts: loop {
        if failures > RESUME_ATTEMPTS {
            return Err(Stop::Failed(format!("gave up after {failures} attempts: {last_error}")));
        }
        let resp = match fetch(written).await {
            Ok(r) => r,
            Err(FetchError::NotFound) => return Err(Stop::NotFound),
            Err(FetchError::Fatal(e)) => return Err(Stop::Failed(e)),
            Err(FetchError::Retryable(e)) => {
                failures += 1;
                last_error = e;
                continue;
            }
        };
        match (total, resp.total) {
            (None, Some(t)) => total = Some(t),
            (Some(a), Some(b)) if a != b => {
                return Err(Stop::Failed(format!("upstream changed the blob's size from {a} to {b}")))
            }
            _ => {}
        }
        tx.send_modify(|p| {
            p.total = total;
            p.phase = Phase::Streaming;
        });
        // A resumed request that got the whole body again: skip what we already have.
        let mut skip = if resp.from_offset { 0 } else { written };
        let mut body = resp.body;
        let mut pending = BytesMut::new();
        let mut last_publish = Instant::now();
        loop {
            let chunk = match body.next().await {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    writer.write(&mut pending, &mut written).await?;
                    failures += 1;
                    last_error = format!("upstream body broke at byte {written}: {e}");
                    tracing::info!(%digest, written, "upstream body broke; resuming with a range request");
                    continue 'attempts;
                }
                None => break,
            };
            let mut chunk: Bytes = chunk;
            if skip > 0 {
                let n = (skip as usize).min(chunk.len());
                chunk = chunk.slice(n..);
                skip -= n as u64;
            }
            if let Some(t) = total {
                if written + pending.len() as u64 + chunk.len() as u64 > t {
                    return Err(Stop::Failed(format!("upstream sent more than the {t} bytes it announced")));
                }
            }
            pending.extend_from_slice(&chunk);
            metrics::counter!("breakwater_upstream_blob_bytes_total").increment(chunk.len() as u64);
            if pending.len() >= PUBLISH_BYTES || last_publish.elapsed() >= PUBLISH_INTERVAL {
                writer.write(&mut pending, &mut written).await?;
                last_publish = Instant::now();
            }
        }
        writer.write(&mut pending, &mut written).await?;
        if let Some(t) = total {
            if written != t {
                failures += 1;
                last_error = format!("upstream body ended at {written} of {t} bytes");
                continue 'attempts;
            }
        }
        break;
    }
    // Every byte handed over is written (and announced) once the writer has finished.
    let actual = writer.finish().await?.finish();
    if &actual != digest {
        return Err(Stop::Failed(format!("upstream content has digest {actual}, not {digest}")));
    }
    tx.send_modify(|p| p.total = Some(written));
    Ok(())
}

/// Batches of at most about `PUBLISH_BYTES` that may wait for a flight's writer: what a flight holds in memory
/// beyond its spool, whatever the number of its clients.
const WRITE_QUEUE: usize = 8;

/// Writes a flight's bytes to its spool, and hashes them, on a thread of the blocking pool, and announces each
/// write to the readers when it has landed (in page cache, where every other handle on the file reads it).
/// Off the runtime because the download must keep its pace while hundreds of clients are served: an async
/// write is a trip to the blocking pool and back per batch, and coming back costs a round of a run queue full
/// of busy downloads (which had a 100 MB/s download crawl at a few MB/s under an 800-client herd); the hashing
/// is CPU the serving threads then keep.
struct SpoolWriter {
    batches: Option<tokio::sync::mpsc::Sender<Bytes>>,
    done: Option<tokio::task::JoinHandle<Result<crate::oci::Hasher, String>>>,
}

impl SpoolWriter {
    fn start(mut file: std::fs::File, mut hasher: crate::oci::Hasher, progress: watch::Sender<Progress>) -> SpoolWriter {
        let (batches, mut rx) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
        let done = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            while let Some(batch) = rx.blocking_recv() {
                hasher.update(&batch);
                file.write_all(&batch).map_err(|e| format!("writing the spool failed: {e}"))?;
                let n = batch.len() as u64;
                progress.send_modify(|p| p.written += n);
            }
            Ok(hasher)
        });
        SpoolWriter { batches: Some(batches), done: Some(done) }
    }

    /// Hands what is pending to the writer (it counts as `written` from now: it will be written, or the flight
    /// fails).
    async fn write(&mut self, pending: &mut BytesMut, written: &mut u64) -> Result<(), String> {
        if pending.is_empty() {
            return Ok(());
        }
        let batch = pending.split().freeze();
        let n = batch.len() as u64;
        let sent = match &self.batches {
            Some(tx) => tx.send(batch).await.is_ok(),
            None => false,
        };
        if !sent {
            // The writer stopped: its error says why.
            return Err(self.finish().await.err().unwrap_or_else(|| "the spool writer stopped".into()));
        }
        *written += n;
        Ok(())
    }

    /// Waits for every batch handed over to be written; the hash of all of them.
    async fn finish(&mut self) -> Result<crate::oci::Hasher, String> {
        drop(self.batches.take());
        match self.done.take() {
            Some(done) => done.await.map_err(|e| format!("the spool writer failed: {e}"))?,
            None => Err("the spool writer stopped".into()),
        }
    }
}

impl BlobFlight {
    fn status(&self) -> FlightStatus {
        let p = self.progress.borrow();
        let age = self.started.elapsed();
        FlightStatus {
            repository: self.repository.clone(),
            digest: self.digest.to_string(),
            bytes: p.written,
            total: p.total,
            clients: self.readers.load(std::sync::atomic::Ordering::Relaxed),
            age_ms: age.as_millis() as u64,
            rate: (p.written as f64 / age.as_secs_f64().max(0.001)) as u64,
        }
    }

    /// The blob's size, once the upstream has said it (or, if it never does, once the download is done).
    pub async fn size(&self) -> Result<u64, FlightError> {
        let mut rx = self.progress.clone();
        loop {
            {
                let p = rx.borrow_and_update();
                match (&p.phase, p.total) {
                    (Phase::Failed(e), _) => return Err(e.clone()),
                    (_, Some(t)) => return Ok(t),
                    _ => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(FlightError::Failed("the download task ended unexpectedly".into()));
            }
        }
    }

    /// Waits until the blob is verified and in storage, or the flight has failed.
    pub async fn finished(&self) -> Result<(), FlightError> {
        let mut rx = self.progress.clone();
        let phase = rx
            .wait_for(|p| matches!(p.phase, Phase::Done | Phase::Failed(_)))
            .await
            .map(|p| p.phase.clone())
            .map_err(|_| FlightError::Failed("the download task ended unexpectedly".into()))?;
        match phase {
            Phase::Failed(e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Streams the blob (or `range` of it) as it arrives. If the flight fails, the stream ends with an error,
    /// which cuts the client's connection: it has been promised `Content-Length` bytes and must not take a short
    /// body for a whole one. The last byte is held back until the digest has been verified, for the same reason.
    pub async fn reader(self: &Arc<Self>, range: Option<ByteRange>) -> Result<ByteStream, FlightError> {
        let size = self.size().await?;
        let range = range.unwrap_or(ByteRange { start: 0, end: size });
        let rx = self.progress.clone();
        let Some(map) = self.map(size).await? else {
            return self.store.read(&self.digest, Some(range)).await.map_err(|e| FlightError::Failed(e.to_string().into()));
        };
        let counted = ReaderCount::new(&self.readers);
        // Clamped to the map, whatever the caller resolved the range against.
        let end = range.end.min(size);
        let state = ReadState { map, pos: range.start.min(end), end, rx, rest: Bytes::new(), yielded: true, _counted: counted };
        Ok(Box::pin(futures_util::stream::unfold(Some(state), read_next)))
    }

    /// The flight's map of its spool (`size` bytes), made now if no reader has made it yet; `None` if the spool
    /// has just been moved into storage, where the blob is to be read instead.
    async fn map(&self, size: u64) -> Result<Option<Bytes>, FlightError> {
        if let Some(map) = self.map.get() {
            return Ok(Some(map.clone()));
        }
        // Opened in place: one metadata operation, where a trip to the blocking pool would put this client's first
        // byte behind a full round of the run queue.
        let file = match std::fs::File::open(&self.spool) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The spool has just been moved into storage (or removed after a failure).
                let mut rx = self.progress.clone();
                let phase = rx.wait_for(|p| matches!(p.phase, Phase::Done | Phase::Failed(_))).await.map(|p| p.phase.clone());
                return match phase {
                    Ok(Phase::Done) => Ok(None),
                    Ok(Phase::Failed(e)) => Err(e),
                    _ => Err(FlightError::Failed("the download task ended unexpectedly".into())),
                };
            }
            Err(e) => return Err(FlightError::Failed(format!("opening the spool: {e}").into())),
        };
        let map = if size == 0 { Bytes::new() } else { map_spool(&file, size).map_err(|e| FlightError::Failed(format!("mapping the spool: {e}").into()))? };
        // Two first readers may both map; one map is kept, the other is dropped unused.
        Ok(Some(self.map.get_or_init(|| map).clone()))
    }
}

struct ReadState {
    /// The flight's map of the whole spool, as long as the blob (it stays valid when the spool is renamed into
    /// storage or removed).
    /// Only what lies below the published `written` is ever sliced from it, so only that is touched.
    map: Bytes,
    /// The first byte not yet handed out.
    pos: u64,
    end: u64,
    rx: watch::Receiver<Progress>,
    /// What is readable and not yet handed out: a view of `map` ending at `pos`.
    rest: Bytes,
    /// Whether the task has let others run since its last slice.
    yielded: bool,
    /// Counts this reader among the flight's clients while it lives.
    _counted: ReaderCount,
}

/// One client counted in a flight's `readers` until dropped.
struct ReaderCount(Arc<std::sync::atomic::AtomicUsize>);

impl ReaderCount {
    fn new(readers: &Arc<std::sync::atomic::AtomicUsize>) -> ReaderCount {
        readers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ReaderCount(Arc::clone(readers))
    }
}

impl Drop for ReaderCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Maps the first `size` bytes of the spool (a non-empty blob, which the download may not have written yet) as
/// `Bytes`, unmapped when the last slice of it is dropped. Only the part below the published `written` may be
/// read: a page past the file's end raises SIGBUS when touched.
fn map_spool(file: &std::fs::File, size: u64) -> io::Result<Bytes> {
    let len = usize::try_from(size).map_err(io::Error::other)?;
    // SAFETY: a map is sound while nothing truncates the file under it or writes what is read through it. A
    // spool's bytes below the published `written` are written once and never again: the download only appends
    // (a resumed download skips what it has), the file was created empty before the flight was visible, and what
    // follows its end is an unlink (a failed flight, or one whose digest was stored meanwhile) or a link into
    // storage (a stored blob is never written: the storage invariant), neither of which touches a mapped page or
    // shortens the file. `written` is published only after the write has completed, so what `read_next` slices
    // (below it) is within the file; the rest of the map is not touched until it is.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map(file)? };
    Ok(Bytes::from_owner(map))
}

async fn read_next(state: Option<ReadState>) -> Option<(io::Result<Bytes>, Option<ReadState>)> {
    let mut st = state?;
    loop {
        if !st.rest.is_empty() {
            if !st.yielded {
                tokio::task::yield_now().await;
            }
            st.yielded = false;
            let slice = st.rest.split_to(SERVE_SLICE.min(st.rest.len()));
            return Some((Ok(slice), Some(st)));
        }
        if st.pos >= st.end {
            return None;
        }
        let (readable, failed) = {
            let p = st.rx.borrow_and_update();
            // Until verified, the blob's final byte is withheld (see `reader`).
            let limit = if p.phase == Phase::Done { p.written } else { p.written.min((st.map.len() as u64).saturating_sub(1)) };
            let failed = match &p.phase {
                Phase::Failed(e) => Some(e.to_string()),
                _ => None,
            };
            (limit.min(st.end), failed)
        };
        if let Some(reason) = failed {
            return Some((Err(io::Error::other(reason)), None));
        }
        if readable > st.pos {
            // Within the map: `readable` is at most `end`, which is at most the blob's size, the map's length.
            st.rest = st.map.slice(st.pos as usize..readable as usize);
            st.pos = readable;
            continue;
        }
        // Fresh from a wait, the next slice goes out at once: other tasks ran meanwhile.
        st.yielded = true;
        if st.rx.changed().await.is_err() {
            // The task is gone; its last word is still readable.
            let p = st.rx.borrow().clone();
            if p.phase != Phase::Done || p.written < st.end {
                return Some((Err(io::Error::other("the download task ended unexpectedly")), None));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;
    use crate::storage::LocalStore;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A `LocalStore` whose first `adopt_file` panics (a bug in a storage backend), to see that a flight survives it.
    struct PanicOnFirstAdopt {
        inner: LocalStore,
        adopts: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl BlobStore for PanicOnFirstAdopt {
        async fn size(&self, d: &Digest) -> Result<Option<u64>, StorageError> {
            self.inner.size(d).await
        }
        async fn read(&self, d: &Digest, range: Option<ByteRange>) -> Result<ByteStream, StorageError> {
            self.inner.read(d, range).await
        }
        async fn put(&self, d: &Digest, body: ByteStream) -> Result<u64, StorageError> {
            self.inner.put(d, body).await
        }
        async fn adopt_file(&self, d: &Digest, path: &std::path::Path) -> Result<u64, StorageError> {
            if self.adopts.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("injected fault: adopt_file");
            }
            self.inner.adopt_file(d, path).await
        }
        async fn list(&self, after: Option<&Digest>, limit: usize) -> Result<Vec<crate::storage::StoredBlob>, StorageError> {
            self.inner.list(after, limit).await
        }
        async fn delete(&self, d: &Digest) -> Result<(), StorageError> {
            self.inner.delete(d).await
        }
        async fn upload_start(&self, id: &str) -> Result<(), StorageError> {
            self.inner.upload_start(id).await
        }
        async fn upload_size(&self, id: &str) -> Result<Option<u64>, StorageError> {
            self.inner.upload_size(id).await
        }
        fn upload_claim(&self, id: &str) -> Result<crate::storage::UploadClaim, StorageError> {
            self.inner.upload_claim(id)
        }
        async fn upload_append(
            &self,
            claim: crate::storage::UploadClaim,
            body: ByteStream,
        ) -> Result<(u64, crate::storage::UploadClaim), StorageError> {
            self.inner.upload_append(claim, body).await
        }
        async fn upload_commit(&self, claim: crate::storage::UploadClaim, d: &Digest) -> Result<u64, StorageError> {
            self.inner.upload_commit(claim, d).await
        }
        async fn upload_abort(&self, claim: crate::storage::UploadClaim) -> Result<(), StorageError> {
            self.inner.upload_abort(claim).await
        }
    }

    /// A fetcher serving `blob` whole, after panicking on its first `panics` calls.
    fn fetcher(blob: Bytes, panics: usize) -> Fetcher {
        let calls = Arc::new(AtomicUsize::new(0));
        Arc::new(move |_offset| {
            let (blob, calls) = (blob.clone(), Arc::clone(&calls));
            Box::pin(async move {
                if calls.fetch_add(1, Ordering::SeqCst) < panics {
                    panic!("injected fault: fetch");
                }
                let total = Some(blob.len() as u64);
                let body: ByteStream = Box::pin(futures_util::stream::once(async move { Ok(blob) }));
                Ok(FetchBody { total, from_offset: false, body })
            })
        })
    }

    async fn read_all(mut s: ByteStream) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    /// Joins `digest` and expects a new flight (not a join of a dead one) that delivers `blob`.
    async fn fresh_flight_delivers(flights: &Arc<BlobFlights>, digest: &Digest, fetch: Fetcher, blob: &[u8]) {
        let Join::Flight { flight, joined } = flights.join(digest, "test", fetch).await.unwrap() else {
            panic!("nothing is stored yet")
        };
        assert!(!joined, "the key was released: this call starts a new flight");
        let body = tokio::time::timeout(Duration::from_secs(10), async { read_all(flight.reader(None).await.unwrap()).await })
            .await
            .expect("no hang")
            .unwrap();
        assert_eq!(body, blob);
        flight.finished().await.unwrap();
        assert!(matches!(flights.join(digest, "test", fetcher(Bytes::new(), 0)).await.unwrap(), Join::Stored(n) if n == blob.len() as u64));
    }

    /// Every waiter of a flight whose task panicked gets an error, and nothing is left running.
    async fn waiters_fail(flights: &Arc<BlobFlights>, flight: &Arc<BlobFlight>) {
        let outcome = tokio::time::timeout(Duration::from_secs(10), flight.finished()).await.expect("no hang");
        assert!(outcome.is_err(), "a panicked flight is a failed flight");
        for _ in 0..1000 {
            if !flights.is_running(&flight.digest).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the panicked flight still holds its digest");
    }

    /// A fetcher serving `blob` in `chunk`-byte pieces, pausing after each, so that readers find the spool
    /// growing under them.
    fn trickling(blob: Bytes, chunk: usize) -> Fetcher {
        Arc::new(move |offset| {
            let blob = blob.slice(offset as usize..);
            Box::pin(async move {
                let total = Some(offset + blob.len() as u64);
                let pieces: Vec<io::Result<Bytes>> = (0..blob.len()).step_by(chunk).map(|i| Ok(blob.slice(i..(i + chunk).min(blob.len())))).collect();
                let body: ByteStream = Box::pin(futures_util::stream::iter(pieces).then(|p| async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    p
                }));
                Ok(FetchBody { total, from_offset: offset > 0, body })
            })
        })
    }

    /// Readers of a flight in progress (the whole blob, ranges, one that joins late) get exactly their bytes while
    /// the spool grows, in slices of at most `SERVE_SLICE` (views of the mapped spool, not copies).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_of_a_growing_spool_get_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(LocalStore::open(&dir.path().join("content")).await.unwrap());
        let flights = BlobFlights::new(store, dir.path().join("spool"), crate::shutdown::Tasks::new(), crate::flight::downloads()).await.unwrap();
        let blob = Bytes::from((0..3 * SERVE_SLICE + 12_345).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>());
        let digest = Digest::of(Algorithm::Sha256, &blob);
        let Join::Flight { flight, .. } = flights.join(&digest, "test", trickling(blob.clone(), 40_000)).await.unwrap() else {
            panic!("not stored")
        };
        let len = blob.len() as u64;
        let ranges = [None, Some((0, 1)), Some((5, 100_000)), Some((len - 10, len)), Some((SERVE_SLICE as u64 - 3, len))];
        let mut readers = Vec::new();
        for (i, r) in ranges.into_iter().enumerate() {
            let flight = Arc::clone(&flight);
            readers.push(tokio::spawn(async move {
                if i == 4 {
                    // Joins once part of the spool is there: maps a prefix, then what follows.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let range = r.map(|(start, end)| ByteRange { start, end });
                let mut stream = flight.reader(range).await.unwrap();
                let (mut out, mut largest) = (Vec::new(), 0);
                while let Some(c) = stream.next().await {
                    let c = c.unwrap();
                    largest = largest.max(c.len());
                    out.extend_from_slice(&c);
                }
                (r, out, largest)
            }));
        }
        for reader in readers {
            let (r, out, largest) = tokio::time::timeout(Duration::from_secs(30), reader).await.expect("no hang").unwrap();
            let (start, end) = r.unwrap_or((0, len));
            assert_eq!(out, &blob[start as usize..end as usize], "range {r:?}");
            assert!(largest <= SERVE_SLICE, "slices of at most SERVE_SLICE, got {largest}");
        }
        flight.finished().await.unwrap();
    }

    /// A download goes on while the runtime that serves clients is too busy to poll anything: it runs on the
    /// download runtime. (Here the serving runtime's only thread blocks, polling the flight's progress, from the
    /// first byte until the last; with the download on that runtime, no byte would arrive after the first.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_download_keeps_going_while_the_serving_runtime_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(LocalStore::open(&dir.path().join("content")).await.unwrap());
        let flights = BlobFlights::new(store, dir.path().join("spool"), crate::shutdown::Tasks::new(), crate::flight::downloads()).await.unwrap();
        let blob = Bytes::from((0..2_000_000).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
        let digest = Digest::of(Algorithm::Sha256, &blob);
        let Join::Flight { flight, .. } = flights.join(&digest, "test", trickling(blob.clone(), 50_000)).await.unwrap() else {
            panic!("not stored")
        };
        tokio::time::timeout(Duration::from_secs(30), async {
            while flight.status().bytes == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the first bytes arrive");
        let deadline = Instant::now() + Duration::from_secs(30);
        while flight.status().bytes < blob.len() as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(flight.status().bytes, blob.len() as u64, "every byte arrived while the serving thread was blocked");
        let body = read_all(flight.reader(None).await.unwrap()).await.unwrap();
        assert_eq!(body, blob);
        flight.finished().await.unwrap();
    }

    #[tokio::test]
    async fn a_panicking_fetch_fails_the_flight_and_releases_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(LocalStore::open(&dir.path().join("content")).await.unwrap());
        let flights = BlobFlights::new(store, dir.path().join("spool"), crate::shutdown::Tasks::new(), crate::flight::downloads()).await.unwrap();
        let blob = Bytes::from(vec![7u8; 100_000]);
        let digest = Digest::of(Algorithm::Sha256, &blob);
        let fetch = fetcher(blob.clone(), 1);
        let Join::Flight { flight, .. } = flights.join(&digest, "test", Arc::clone(&fetch)).await.unwrap() else { panic!("not stored") };
        waiters_fail(&flights, &flight).await;
        fresh_flight_delivers(&flights, &digest, fetch, &blob).await;
    }

    #[tokio::test]
    async fn a_store_that_panics_fails_the_flight_and_releases_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let inner = LocalStore::open(&dir.path().join("content")).await.unwrap();
        let store: Arc<dyn BlobStore> = Arc::new(PanicOnFirstAdopt { inner, adopts: AtomicUsize::new(0) });
        let flights = BlobFlights::new(store, dir.path().join("spool"), crate::shutdown::Tasks::new(), crate::flight::downloads()).await.unwrap();
        let blob = Bytes::from(vec![9u8; 100_000]);
        let digest = Digest::of(Algorithm::Sha256, &blob);
        let Join::Flight { flight, .. } = flights.join(&digest, "test", fetcher(blob.clone(), 0)).await.unwrap() else { panic!("not stored") };
        // A client streaming the flight when it dies is cut, not left waiting. (The flight may also have died
        // before the client began: the download and the panicking adoption race the client's first read.)
        if let Ok(reader) = flight.reader(None).await {
            let read = tokio::time::timeout(Duration::from_secs(10), read_all(reader)).await.expect("no hang");
            assert!(read.is_err(), "the stream of a failed flight ends with an error");
        }
        waiters_fail(&flights, &flight).await;
        fresh_flight_delivers(&flights, &digest, fetcher(blob.clone(), 0), &blob).await;
    }
}
