//! Cluster-wide blob flights: one upstream download per digest for the whole cluster.
//!
//! ```text
//!  member A (owner)                    member B (follower)                  member C (follower)
//!  lease blob:D ✓ ── upstream GET      lease blob:D ✗ (A holds it)          lease blob:D ✗
//!  local flight, spool ◄──────────── GET /internal/blobs/D?offset=N ──── the same, from C's offset
//!  clients of A                        local flight, spool: clients of B    clients of C
//! ```
//! Each member still coalesces its own clients into one local flight (`flight::BlobFlights`); what changes is
//! where a flight's bytes come from. Its fetcher (`ClusterFlights::fetcher`) takes the lease `blob:<digest>` in
//! the metadata store: the member that gets it downloads from upstream and renews the lease while its flight
//! runs; every other member streams from the holder's spool over a signed internal request, offset based, so it
//! relays bytes as they arrive and spools them itself (its clients, and a take-over, read from there).
//!
//! If the holder dies, the follower's stream breaks; the local flight resumes at the bytes it holds (as after any
//! broken download), and its fetcher waits for the dead holder's lease to lapse (`lease_ttl`), takes it and
//! resumes from upstream with a `Range`. Each member verifies the digest of what it spooled before serving the
//! last byte, as for any flight, so a relay cannot corrupt what clients get. The holder serves its own last byte
//! only once its blob is stored, so a follower that ends finds the blob in the shared store, and does not store it
//! again (`BlobFlights`' adoption skips a digest already stored).
//!
//! Architecture invariant: a member downloads a blob from upstream only while it holds the blob's lease (or
//! after it could not reach the metadata store to ask: then it fetches, as an instance alone would, rather than
//! fail its clients).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{peer, Cluster};
use crate::flight::{FetchBody, FetchError, Fetcher};
use crate::meta::Meta;
use crate::oci::Digest;
use crate::storage::{BlobStore, ByteRange};

/// The header of an internal blob answer giving the whole blob's size (its body starts at the asked offset).
pub const SIZE_HEADER: &str = "x-breakwater-blob-size";
/// How often a follower without a holder to follow looks at the lease again.
const POLL: Duration = Duration::from_millis(250);

/// What the members' flights share: this member, the metadata store holding the leases, the shared store.
pub struct ClusterFlights {
    cluster: Arc<Cluster>,
    meta: Arc<dyn Meta>,
    store: Arc<dyn BlobStore>,
    /// For the internal requests to other members (no proxy settings, no redirects: members talk directly).
    /// Used only from flights' downloads, so its connections live on the download runtime.
    client: reqwest::Client,
    /// How long a lease lasts unrenewed: how long a dead owner's flight waits to be taken over.
    lease_ttl: Duration,
}

/// What the names of blob download leases start with; the digest follows.
pub const LEASE_PREFIX: &str = "blob:";

/// The name of the lease on `digest`'s download.
pub fn lease_name(digest: &Digest) -> String {
    format!("{LEASE_PREFIX}{digest}")
}

impl ClusterFlights {
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    pub fn new(cluster: Arc<Cluster>, meta: Arc<dyn Meta>, store: Arc<dyn BlobStore>) -> Arc<ClusterFlights> {
        let lease_ttl = cluster.heartbeat() * super::ALIVE_BEATS;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // A holder that stops sending (an upstream pause longer than this, or a member cut off) is asked again,
            // which also looks at the lease: who holds it may have changed.
            .read_timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .expect("a client without TLS settings always builds");
        Arc::new(ClusterFlights { cluster, meta, store, client, lease_ttl })
    }

    /// The fetcher of a local flight of `digest` in a cluster: from `upstream` while this member holds the lease,
    /// else from the member holding it, else from the shared store once the blob is there.
    pub fn fetcher(self: &Arc<Self>, digest: &Digest, upstream: Fetcher) -> Fetcher {
        let state = Arc::new(FlightLease { flights: Arc::clone(self), digest: digest.clone(), upstream, held: Mutex::new(None) });
        Arc::new(move |offset| {
            let state = Arc::clone(&state);
            Box::pin(async move { state.fetch(offset).await })
        })
    }
}

/// One local flight's view of the cluster: which member to fetch from, and the lease while this member holds it.
struct FlightLease {
    flights: Arc<ClusterFlights>,
    digest: Digest,
    upstream: Fetcher,
    /// Set once this member holds the lease; renewed until the flight (which owns the fetcher) is dropped.
    held: Mutex<Option<Renewal>>,
}

impl FlightLease {
    fn holds(&self) -> bool {
        self.held.lock().map(|h| h.is_some()).unwrap_or(false)
    }

    async fn fetch(&self, offset: u64) -> Result<FetchBody, FetchError> {
        let f = &self.flights;
        let name = lease_name(&self.digest);
        // A dead holder's lease lapses within `lease_ttl`; past twice that (and a poll), something else is wrong.
        let deadline = Instant::now() + f.lease_ttl * 2 + POLL;
        loop {
            if self.holds() {
                return (self.upstream)(offset).await;
            }
            if let Some(size) = f.store.size(&self.digest).await.map_err(|e| FetchError::Retryable(e.to_string()))? {
                return self.from_store(offset, size).await;
            }
            match f.meta.lease(&name, f.cluster.id(), f.lease_ttl.as_millis() as i64).await {
                Ok(true) => {
                    self.hold(name.clone());
                    // Looked at again now that the lease is held: the last holder may have stored the blob and let
                    // go between the look above and the lease.
                    if let Some(size) = f.store.size(&self.digest).await.map_err(|e| FetchError::Retryable(e.to_string()))? {
                        self.let_go();
                        return self.from_store(offset, size).await;
                    }
                    tracing::info!(digest = %self.digest, offset, "this member fetches the blob for the cluster");
                    count_flight(if offset == 0 { "led" } else { "taken_over" });
                    return (self.upstream)(offset).await;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, digest = %self.digest, "no lease to ask (metadata store): fetching from upstream");
                    count_flight("unleased");
                    return (self.upstream)(offset).await;
                }
            }
            match self.from_holder(&name, offset).await {
                Ok(Some(body)) => {
                    count_flight("followed");
                    return Ok(body);
                }
                Ok(None) => {}
                Err(e) => tracing::info!(digest = %self.digest, offset, error = %e, "the member fetching the blob did not serve it"),
            }
            if Instant::now() > deadline {
                return Err(FetchError::Retryable(format!("no cluster member served {} and its lease stayed taken", self.digest)));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Takes the lease into this flight's keeping: renewed from now on, released when the flight ends.
    fn hold(&self, name: String) {
        let f = &self.flights;
        let renewal = Renewal::start(Arc::clone(&f.meta), name, f.cluster.id().to_string(), f.lease_ttl);
        if let Ok(mut held) = self.held.lock() {
            *held = Some(renewal);
        }
    }

    /// Gives the lease up (its renewal's drop does).
    fn let_go(&self) {
        if let Ok(mut held) = self.held.lock() {
            held.take();
        }
    }

    async fn from_store(&self, offset: u64, size: u64) -> Result<FetchBody, FetchError> {
        let range = ByteRange { start: offset.min(size), end: size };
        let body = self.flights.store.read(&self.digest, Some(range)).await.map_err(|e| FetchError::Retryable(e.to_string()))?;
        Ok(FetchBody { total: Some(size), from_offset: true, body })
    }

    /// The blob from `offset` from the member holding the lease; `None` when nobody live holds it.
    async fn from_holder(&self, name: &str, offset: u64) -> Result<Option<FetchBody>, String> {
        let f = &self.flights;
        let leases = f.meta.leases(name).await.map_err(|e| e.to_string())?;
        let Some(lease) = leases.into_iter().find(|l| l.name == name) else { return Ok(None) };
        let members = f.cluster.members().await.map_err(|e| e.to_string())?;
        let Some(holder) = members.into_iter().find(|m| m.member.id == lease.holder && m.alive) else { return Ok(None) };
        let path = format!("/internal/blobs/{}?offset={offset}", self.digest);
        let now = crate::clock::now_ms() / 1000;
        let signature = peer::sign(f.cluster.secret(), f.cluster.id(), "GET", &path, now);
        let resp = f
            .client
            .get(format!("{}{path}", holder.member.url))
            .header(peer::HEADER, signature)
            .send()
            .await
            .map_err(|e| format!("member {}: {e}", holder.member.url))?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(format!("member {} answered {}", holder.member.url, resp.status()));
        }
        let total = resp.headers().get(SIZE_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let Some(total) = total else { return Err(format!("member {} gave no {SIZE_HEADER}", holder.member.url)) };
        let body = resp.bytes_stream().map(|r| {
            if let Ok(chunk) = &r {
                metrics::counter!("breakwater_cluster_peer_bytes_total").increment(chunk.len() as u64);
            }
            r.map_err(std::io::Error::other)
        });
        Ok(Some(FetchBody { total: Some(total), from_offset: true, body: Box::pin(body) }))
    }
}

/// Counts a flight attempt by where its bytes came from: `led` (this member downloaded from upstream),
/// `taken_over` (it resumed a dead holder's download), `followed` (it streamed another member's), `unleased` (the
/// metadata store could not be asked).
fn count_flight(role: &'static str) {
    metrics::counter!("breakwater_cluster_flight_attempts_total", "role" => role).increment(1);
}

/// A lease kept alive by a task renewing it every third of its life; dropped, it stops and gives the lease up.
pub struct Renewal {
    stop: CancellationToken,
    /// The renewing task, which releases the lease as it ends: [`Renewal::end`] waits for it.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Renewal {
    pub fn start(meta: Arc<dyn Meta>, name: String, holder: String, ttl: Duration) -> Renewal {
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(ttl / 3);
            ticks.tick().await;
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => break,
                    _ = ticks.tick() => match meta.lease(&name, &holder, ttl.as_millis() as i64).await {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!(lease = %name, "another member took this lease (a renewal came too late)"),
                        Err(e) => tracing::warn!(lease = %name, error = %e, "renewing a lease failed"),
                    },
                }
            }
            if let Err(e) = meta.release(&name, &holder).await {
                tracing::warn!(lease = %name, error = %e, "releasing a lease failed; it lapses");
            }
        });
        Renewal { stop, task: Some(task) }
    }

    /// Stops renewing and waits until the lease is released (a process about to exit, whose drop would leave the
    /// release unsent).
    pub async fn end(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
