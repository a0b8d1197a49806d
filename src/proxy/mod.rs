//! Pull-through policy: which upstream a name maps to, how long a tag is trusted, what is served when the
//! upstream fails, and which requests share one upstream fetch.
//!
//! A cached artifact is an ordinary repository of the local registry named `<upstream>/<repository>`
//! (`docker.io/library/alpine`), so it can be listed and pulled like pushed content; only pushes into an
//! upstream's namespace are refused.
//!
//! Architecture invariant: for a given (upstream, repository, reference) at most one manifest request, and for a
//! given blob digest at most one download, is in flight at any time, whatever the number of clients.

mod activity;
mod evict;
mod listing;
mod referrers;
mod tags;

pub use activity::{Activity, Pulled};
pub use evict::{EvictionPolicy, Evicted};
pub use referrers::{ReferrersPage, MAX_LISTED_REFERRERS};
pub use tags::{TagPage, MAX_LISTED_TAGS};

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::checks::Turn;
use crate::bounded::BoundedMap;
use crate::flight::{BlobFlight, BlobFlights, FetchBody, FetchError, Fetcher, FlightError, Group, Join};
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::registry::{Registry, RegistryError};
use crate::storage::OpenBlob;
use crate::upstream::stats::{Lookup, Stats};
use crate::upstream::{Upstream, UpstreamError};

type Result<T> = std::result::Result<T, RegistryError>;

/// Where a repository name leads.
pub enum Target {
    /// Pushed content only.
    Local(RepoName),
    /// An upstream's namespace: served from the cache, filled from the upstream.
    Cached(Cached),
    /// A mirror request without a prefix: local content if the repository has it, else the default upstream.
    LocalOrCached(RepoName, Cached),
}

/// A repository of an upstream, and the local repository that caches it.
#[derive(Clone)]
pub struct Cached {
    pub upstream: Arc<Upstream>,
    pub remote: RepoName,
    pub local: RepoName,
}

/// A manifest the proxy resolved: it is in the local repository `Cached::local` under `digest`.
pub struct Resolved {
    pub digest: Digest,
    /// Served from the cache without the revalidation its TTL called for, because the upstream could not be asked
    /// or its rate limit is nearly spent (the response gets a `Warning`).
    pub stale: bool,
}

/// A blob the proxy can serve.
pub enum ProxiedBlob {
    /// In the cache: opened for a GET, its size only for a HEAD.
    Stored(OpenBlob),
    Flight(Arc<BlobFlight>, u64),
    /// Known only from an upstream HEAD, with this size: enough for a HEAD, which is the only request answered so
    /// (nothing is cached; a GET starts the download).
    Upstream(u64),
}

/// The key of a manifest flight: one upstream request at a time per (upstream, repository, reference).
type ManifestKey = (String, String, String);

/// How a manifest flight ended; shared by value with every waiter.
type ManifestOutcome = std::result::Result<Digest, UpstreamError>;

/// The key of a blob HEAD: one upstream HEAD at a time per (upstream, repository, digest). The repository is in
/// the key (unlike a download's, keyed by digest alone) because the answer is about the blob *in that
/// repository*: a 404 in one repository says nothing about another, and it is remembered per repository.
type BlobHeadKey = (String, String, Digest);

/// How a blob HEAD ended: the blob's size upstream.
type BlobHeadOutcome = std::result::Result<u64, UpstreamError>;

/// The `missing` map's reference for a blob: distinct from a manifest's digest reference, since a digest
/// missing as a manifest may exist as a blob (and the other way round).
fn blob_reference(digest: &Digest) -> String {
    format!("blob {digest}")
}

pub struct Proxy {
    registry: Arc<Registry>,
    upstreams: Vec<Arc<Upstream>>,
    flights: Arc<BlobFlights>,
    manifests: Group<ManifestKey, ManifestOutcome>,
    /// Upstream HEADs of blobs in progress, shared by every HEAD of the same blob meanwhile.
    blob_heads: Group<BlobHeadKey, BlobHeadOutcome>,
    /// When each cached tag was last confirmed upstream; a tag is trusted for its upstream's TTL after that.
    /// In memory: after a restart (or once forgotten) a tag is revalidated once, which costs one HEAD.
    validated: BoundedMap<(RepoName, Tag), Instant>,
    /// References the upstream said do not exist, until when (stops storms of requests for missing tags).
    missing: BoundedMap<(RepoName, String), Instant>,
    negative_ttl: Duration,
    eviction: EvictionPolicy,
    /// Serialises eviction passes.
    eviction_pass: tokio::sync::Mutex<()>,
    /// Evictions and the most pulled artifacts, for `/api/status`.
    activity: Activity,
    /// Blobs whose access time was written recently: a herd of hits costs one write, not one per client.
    touched: BoundedMap<Digest, ()>,
    /// Un-prefixed names that may be pushed although a default upstream serves un-prefixed names (a local
    /// image would shadow the upstream's for every client); empty by default, so a mirror cannot be poisoned.
    shadowing: globset::GlobSet,
    /// Upstream tag lists by cached repository, held for the tag TTL (`tags.rs`).
    tag_lists: listing::Listings<RepoName, String>,
    /// Upstream referrers by (cached repository, subject), held for the tag TTL (`referrers.rs`).
    referrer_lists: listing::Listings<(RepoName, Digest), crate::meta::ManifestRecord>,
    /// In a cluster, where flights get their bytes (one upstream download per blob for all members); `None`
    /// alone.
    cluster: Option<Arc<crate::cluster::flights::ClusterFlights>>,
    /// In a cluster, the upstream's answers about tags and missing references that every member shares.
    checks: Option<Arc<crate::cluster::checks::SharedChecks>>,
}

/// How many listed tags the tag-list cache holds in all, per `memory_entries`: a tag is a few tens of bytes,
/// so ten per entry keeps the map within the tens of MB every bounded map allows itself.
const LISTED_TAGS_PER_ENTRY: u64 = 10;

/// How often a cache hit refreshes a blob's access time at most.
const TOUCH_INTERVAL: Duration = Duration::from_secs(30);

fn fetch_error(e: UpstreamError) -> FetchError {
    match e {
        UpstreamError::NotFound => FetchError::NotFound,
        UpstreamError::Unavailable(m) | UpstreamError::Invalid(m) => FetchError::Retryable(m),
        UpstreamError::Refused(m) => FetchError::Fatal(m),
        e @ (UpstreamError::RateLimited | UpstreamError::Unauthorized(_)) => FetchError::Fatal(e.to_string()),
    }
}

/// The error a client sees when the upstream failed and nothing is cached.
fn client_error(upstream: &Upstream, e: UpstreamError, not_found: RegistryError) -> RegistryError {
    match e {
        UpstreamError::NotFound => not_found,
        UpstreamError::RateLimited => RegistryError::TooManyRequests,
        e => RegistryError::UpstreamUnavailable(format!("upstream {}: {e}", upstream.name())),
    }
}

impl Proxy {
    /// `memory_entries` bounds each of the proxy's in-memory maps (tag validations, not-found answers, recent
    /// accesses).
    pub fn new(
        registry: Arc<Registry>,
        upstreams: Vec<Upstream>,
        flights: Arc<BlobFlights>,
        negative_ttl: Duration,
        eviction: EvictionPolicy,
        memory_entries: u64,
    ) -> Proxy {
        // A validation is worth keeping as long as the longest tag TTL of any upstream.
        let longest_ttl = upstreams.iter().map(|u| u.config.tag_ttl).max().unwrap_or(Duration::ZERO);
        Proxy {
            registry,
            upstreams: upstreams.into_iter().map(Arc::new).collect(),
            flights,
            manifests: Group::default(),
            blob_heads: Group::default(),
            validated: BoundedMap::new("tag_validations", memory_entries, Some(longest_ttl)),
            missing: BoundedMap::new("not_found", memory_entries, Some(negative_ttl)),
            negative_ttl,
            eviction,
            eviction_pass: tokio::sync::Mutex::new(()),
            activity: Activity::default(),
            touched: BoundedMap::new("blob_accesses", memory_entries, Some(TOUCH_INTERVAL)),
            shadowing: globset::GlobSet::empty(),
            tag_lists: listing::Listings::new("tags", "tag_lists", memory_entries.saturating_mul(LISTED_TAGS_PER_ENTRY), longest_ttl),
            // A referrer descriptor (with its annotations) is about ten tags' worth: one per entry.
            referrer_lists: listing::Listings::new("referrers", "referrer_lists", memory_entries, longest_ttl),
            cluster: None,
            checks: None,
        }
    }

    /// Makes the cache cluster-wide: flights take their bytes from the member holding their lease, and tag
    /// freshness and negative answers are shared.
    pub fn in_cluster(
        mut self,
        flights: Arc<crate::cluster::flights::ClusterFlights>,
        checks: Arc<crate::cluster::checks::SharedChecks>,
    ) -> Proxy {
        self.cluster = Some(flights);
        self.checks = Some(checks);
        self
    }

    /// How long a shared check can still count: the longest tag TTL or the negative TTL.
    pub fn checks_keep(&self) -> Duration {
        let longest = self.upstreams.iter().map(|u| u.config.tag_ttl).max().unwrap_or(Duration::ZERO);
        longest.max(self.negative_ttl)
    }

    /// Evictions and the most pulled artifacts.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// The limits on cached content.
    pub fn eviction_policy(&self) -> EvictionPolicy {
        self.eviction
    }

    /// The flights of this instance (other members stream from them).
    pub fn flights(&self) -> &Arc<BlobFlights> {
        &self.flights
    }

    /// Allows pushes of un-prefixed names matching `globs` while a default upstream is configured.
    pub fn allow_shadowing(mut self, globs: &[String]) -> std::result::Result<Proxy, String> {
        self.shadowing = crate::pattern::glob_set(globs)?;
        Ok(self)
    }

    /// Sets the `breakwater_cache_entries{kind}` gauges: what each in-memory map holds now.
    pub fn report_entries(&self) {
        self.validated.report();
        self.missing.report();
        self.touched.report();
        self.tag_lists.report();
        self.referrer_lists.report();
        crate::bounded::report("upstream_tokens", self.upstreams.iter().map(|u| u.cached_tokens()).sum());
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    fn by_name(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name() == name)
    }

    /// The cached repository of `remote` on `upstream`; `None` if the upstream's allow-list leaves it out.
    fn cached(&self, upstream: &Arc<Upstream>, remote: &str) -> Result<Option<Cached>> {
        let remote = if upstream.config.library_shorthand && !remote.contains('/') {
            format!("library/{remote}")
        } else {
            remote.to_string()
        };
        let remote: RepoName = remote.parse()?;
        if !upstream.allows(&remote) {
            return Ok(None);
        }
        let local: RepoName = format!("{}/{remote}", upstream.name()).parse()?;
        Ok(Some(Cached { upstream: Arc::clone(upstream), remote, local }))
    }

    /// Maps a repository name (and containerd's `ns=` query, if any) to where it is served from. A name in an
    /// upstream's namespace that its `repositories` leave out is `NAME_UNKNOWN` (nothing is asked upstream); an
    /// un-prefixed one is then only local.
    pub fn target(&self, name: &str, ns: Option<&str>) -> Result<Target> {
        let repo: RepoName = name.parse()?;
        let upstream_of = |upstream, remote| match self.cached(upstream, remote)? {
            Some(c) => Ok(Target::Cached(c)),
            None => Err(RegistryError::NameUnknown),
        };
        if let Some(upstream) = ns.and_then(|ns| self.by_name(ns)) {
            // containerd names the upstream in `ns` and sends the name without it.
            return upstream_of(upstream, name);
        }
        if let Some((first, rest)) = name.split_once('/') {
            if let Some(upstream) = self.by_name(first) {
                return upstream_of(upstream, rest);
            }
        }
        match self.upstreams.iter().find(|u| u.config.default) {
            Some(upstream) => Ok(match self.cached(upstream, name)? {
                Some(c) => Target::LocalOrCached(repo, c),
                None => Target::Local(repo),
            }),
            None => Ok(Target::Local(repo)),
        }
    }

    /// Refuses writes into an upstream's namespace (the cache owns those repositories), and, when a default
    /// upstream serves un-prefixed names, writes of names that would shadow its images unless allowed.
    pub fn check_writable(&self, name: &str) -> Result<()> {
        let first = name.split('/').next().unwrap_or(name);
        if let Some(u) = self.by_name(first) {
            return Err(RegistryError::Denied(format!(
                "{name} is in the namespace of upstream {}, a read-only pull-through cache",
                u.name()
            )));
        }
        match self.upstreams.iter().find(|u| u.config.default) {
            Some(u) if !self.shadowing.is_match(name) => Err(RegistryError::Denied(format!(
                "{name} would shadow the default upstream {}'s image of that name; allow it with allow_shadowing",
                u.name()
            ))),
            _ => Ok(()),
        }
    }

    /// Whether the upstream said lately (this member, or in a cluster any member) that it has no `reference`.
    async fn is_missing(&self, repo: &RepoName, reference: &str) -> bool {
        let key = (repo.clone(), reference.to_string());
        if self.missing.get(&key).is_some_and(|until| until > Instant::now()) {
            return true;
        }
        let Some(checks) = &self.checks else { return false };
        match checks.answered(repo, reference, false, self.negative_ttl).await {
            Some(age) => {
                self.missing.insert(key, Instant::now() + self.negative_ttl.saturating_sub(age));
                true
            }
            None => false,
        }
    }

    /// Remembers that the upstream has no `reference`, here only.
    fn remember_missing(&self, repo: &RepoName, reference: &str) {
        self.missing.insert((repo.clone(), reference.to_string()), Instant::now() + self.negative_ttl);
    }

    /// Remembers that the upstream has no `reference`, and in a cluster tells the other members (once: every
    /// waiter of a failed flight comes here).
    async fn mark_missing(&self, repo: &RepoName, reference: &str) {
        let known = self.missing.get(&(repo.clone(), reference.to_string())).is_some_and(|until| until > Instant::now());
        self.remember_missing(repo, reference);
        if let (Some(checks), false) = (&self.checks, known) {
            checks.record(repo, reference, false).await;
        }
    }

    /// Whether `tag` was confirmed upstream within its TTL (by this member, or in a cluster by any member).
    async fn fresh(&self, c: &Cached, tag: &Tag) -> bool {
        // Each upstream has its own TTL; the map keeps entries for the longest of them.
        let key = (c.local.clone(), tag.clone());
        if self.validated.get(&key).is_some_and(|t| t.elapsed() < c.upstream.config.tag_ttl) {
            return true;
        }
        let Some(checks) = &self.checks else { return false };
        match checks.answered(&c.local, tag.as_str(), true, c.upstream.config.tag_ttl).await {
            Some(age) => {
                self.validated.insert(key, Instant::now().checked_sub(age).unwrap_or_else(Instant::now));
                true
            }
            None => false,
        }
    }

    /// Remembers that `tag` was just confirmed. (In a cluster, the member that asked upstream has told the others
    /// already: `fetch_manifest`.)
    fn mark_fresh(&self, c: &Cached, tag: &Tag) {
        self.validated.insert((c.local.clone(), tag.clone()), Instant::now());
    }

    /// Resolves a manifest reference through the cache: after this, the manifest is in `c.local`. `accept` is
    /// what the client's `Accept` listed, forwarded upstream besides the types the cache stores (see
    /// `fetch_manifest`); whether the client may be served the result is the caller's to judge.
    pub async fn manifest(&self, c: &Cached, reference: &Reference, accept: &[String]) -> Result<Resolved> {
        self.activity.pulled(&match reference {
            Reference::Tag(t) => format!("{}:{t}", c.local),
            Reference::Digest(d) => format!("{}@{d}", c.local),
        });
        match reference {
            Reference::Digest(d) => {
                if self.registry.manifest_record(&c.local, reference).await.is_ok() {
                    count_cache(c.upstream.stats(), "manifest", "hit");
                    return Ok(Resolved { digest: d.clone(), stale: false });
                }
                self.fetch_manifest(c, &d.to_string(), None, None, accept).await.map(|digest| Resolved { digest, stale: false })
            }
            Reference::Tag(t) => {
                let held = self.registry.resolve_tag(&c.local, t).await?;
                if let Some(d) = &held {
                    if self.fresh(c, t).await {
                        count_cache(c.upstream.stats(), "manifest", "hit");
                        return Ok(Resolved { digest: d.clone(), stale: false });
                    }
                    // Near the end of the upstream's rate-limit window a revalidation is the request to save:
                    // the cached tag is served, with a `Warning`, since it was not checked.
                    if c.upstream.ratelimit_low() {
                        count_cache(c.upstream.stats(), "manifest", "deferred");
                        metrics::counter!("breakwater_cache_deferred_revalidations_total", "upstream" => c.upstream.name().to_string())
                            .increment(1);
                        return Ok(Resolved { digest: d.clone(), stale: true });
                    }
                }
                match self.fetch_manifest(c, t.as_str(), Some(t), held.clone(), accept).await {
                    Ok(digest) => {
                        self.mark_fresh(c, t);
                        Ok(Resolved { digest, stale: false })
                    }
                    Err(RegistryError::ManifestUnknown) => Err(RegistryError::ManifestUnknown),
                    Err(e) => match held {
                        Some(digest) => {
                            tracing::warn!(upstream = c.upstream.name(), repo = %c.remote, tag = %t, error = %e,
                                "upstream unavailable; serving the cached tag");
                            c.upstream.stats().stale_serve();
                            Ok(Resolved { digest, stale: true })
                        }
                        None => Err(e),
                    },
                }
            }
        }
    }

    /// One coalesced upstream exchange for a manifest reference. With `held` (the digest the cache has for the
    /// tag), a HEAD revalidates it and the manifest is only downloaded if it changed.
    ///
    /// Content negotiation: the upstream is always asked with every manifest type the cache stores (OCI and
    /// Docker schema2, image and index), followed by whatever else the client's `Accept` listed. So the answer
    /// is the manifest as the upstream holds it, never a representation converted down for one client (Docker
    /// Hub answers a client that takes no lists with one platform's manifest, and a HEAD with that manifest's
    /// digest): the cache keeps one digest per tag and it must be right for every client. That is also why the
    /// flight's key has no `Accept` in it: clients asking at once share one request and one answer, and each is
    /// then served or refused by the media type it accepts (`http::v2`). A joiner's extra types are not sent
    /// (the first request's are); they could only matter for types the cache cannot store anyway.
    async fn fetch_manifest(
        &self,
        c: &Cached,
        reference: &str,
        tag: Option<&Tag>,
        held: Option<Digest>,
        accept: &[String],
    ) -> Result<Digest> {
        if self.is_missing(&c.local, reference).await {
            count_cache(c.upstream.stats(), "manifest", "negative");
            return Err(RegistryError::ManifestUnknown);
        }
        let key = (c.upstream.name().to_string(), c.remote.to_string(), reference.to_string());
        let (registry, cached, reference_owned, tag_owned, accept, checks) =
            (Arc::clone(&self.registry), c.clone(), reference.to_string(), tag.cloned(), accept.to_vec(), self.checks.clone());
        let ttls = (c.upstream.config.tag_ttl, self.negative_ttl);
        let (outcome, joined) = self.manifests.join(key, move || async move {
                let local = &cached.local;
                // In a cluster, one member at a time asks upstream; the others serve what it cached.
                let _turn = match &checks {
                    Some(checks) => match checks.turn(local, &reference_owned, ttls).await {
                        Turn::Answered(false) => return Err(UpstreamError::NotFound),
                        Turn::Answered(true) => match cached_answer(&registry, local, &reference_owned, tag_owned.as_ref()).await {
                            Some(digest) => return Ok(digest),
                            None => None,
                        },
                        mine => Some(mine),
                    },
                    None => None,
                };
                let answer = exchange(&registry, &cached, &reference_owned, tag_owned.as_ref(), held, &accept).await;
                // Told before the turn (the lease) is given up, so that no member waiting for it asks again.
                if let Some(checks) = &checks {
                    match &answer {
                        Ok(_) => checks.record(local, &reference_owned, true).await,
                        Err(UpstreamError::NotFound) => checks.record(local, &reference_owned, false).await,
                        Err(_) => {}
                    }
                }
                answer
            });
        count_cache(c.upstream.stats(), "manifest", if joined { "coalesced" } else { "miss" });
        match outcome.await.unwrap_or_else(|e| Err(e.into())) {
            Ok(d) => Ok(d),
            Err(e) => {
                if e == UpstreamError::NotFound {
                    // The member that asked upstream has told the others (above).
                    self.remember_missing(&c.local, reference);
                }
                Err(client_error(&c.upstream, e, RegistryError::ManifestUnknown))
            }
        }
    }

    /// A HEAD of a blob through the cache: from storage or a download in flight if either has it, else from one
    /// coalesced upstream HEAD, which downloads nothing (unless the upstream has `prefetch_on_head`, which
    /// answers a HEAD like a GET: from the download it starts).
    pub async fn blob_head(self: &Arc<Self>, c: &Cached, digest: &Digest) -> Result<ProxiedBlob> {
        if c.upstream.config.prefetch_on_head {
            return self.blob(c, digest).await;
        }
        if let Ok(size) = self.registry.blob_size(&c.local, digest).await {
            count_cache(c.upstream.stats(), "blob", "hit");
            self.touch(digest).await;
            return Ok(ProxiedBlob::Stored(OpenBlob::sized(size)));
        }
        match self.flights.peek(digest).await? {
            Some(Join::Flight { flight, .. }) => {
                count_cache(c.upstream.stats(), "blob", "coalesced");
                let size = match flight.size().await {
                    Ok(size) => size,
                    Err(e) => return Err(self.flight_failed(c, digest, e).await),
                };
                return Ok(ProxiedBlob::Flight(flight, size));
            }
            // Cached for another repository: content is shared, only the link is new (as for a GET). If the link
            // fails, the bytes were evicted meanwhile, and the upstream says whether the blob exists.
            Some(Join::Stored(size)) if self.registry.link_blob(&c.local, digest, size).await.is_ok() => {
                count_cache(c.upstream.stats(), "blob", "hit");
                self.touch(digest).await;
                return Ok(ProxiedBlob::Stored(OpenBlob::sized(size)));
            }
            Some(Join::Stored(_)) | None => {}
        }
        self.head_upstream(c, digest).await.map(ProxiedBlob::Upstream)
    }

    /// One coalesced upstream HEAD of a blob; a 404 is remembered for the negative TTL like a manifest's.
    async fn head_upstream(&self, c: &Cached, digest: &Digest) -> Result<u64> {
        if self.is_missing(&c.local, &blob_reference(digest)).await {
            count_cache(c.upstream.stats(), "blob_head", "negative");
            return Err(RegistryError::BlobUnknown);
        }
        let key = (c.upstream.name().to_string(), c.remote.to_string(), digest.clone());
        let (upstream, remote, d) = (Arc::clone(&c.upstream), c.remote.clone(), digest.clone());
        let (outcome, joined) = self.blob_heads.join(key, move || async move { upstream.blob_head(&remote, &d).await });
        count_cache(c.upstream.stats(), "blob_head", if joined { "coalesced" } else { "miss" });
        match outcome.await.unwrap_or_else(|e| Err(e.into())) {
            Ok(size) => Ok(size),
            Err(e) => {
                if e == UpstreamError::NotFound {
                    self.mark_missing(&c.local, &blob_reference(digest)).await;
                }
                Err(client_error(&c.upstream, e, RegistryError::BlobUnknown))
            }
        }
    }

    /// The client's error for a failed flight; a 404 upstream is remembered for the negative TTL.
    async fn flight_failed(&self, c: &Cached, digest: &Digest, e: FlightError) -> RegistryError {
        if e == FlightError::NotFound {
            self.mark_missing(&c.local, &blob_reference(digest)).await;
        }
        flight_error(c, e)
    }

    /// A blob through the cache: from storage if it is there, else from the one download of it in flight.
    pub async fn blob(self: &Arc<Self>, c: &Cached, digest: &Digest) -> Result<ProxiedBlob> {
        if let Ok(blob) = self.registry.open_blob(&c.local, digest).await {
            count_cache(c.upstream.stats(), "blob", "hit");
            self.touch(digest).await;
            return Ok(ProxiedBlob::Stored(blob));
        }
        if self.is_missing(&c.local, &blob_reference(digest)).await {
            count_cache(c.upstream.stats(), "blob", "negative");
            return Err(RegistryError::BlobUnknown);
        }
        let (upstream, remote, d) = (Arc::clone(&c.upstream), c.remote.clone(), digest.clone());
        let fetch: Fetcher = Arc::new(move |offset| {
            let (upstream, remote, d) = (Arc::clone(&upstream), remote.clone(), d.clone());
            Box::pin(async move {
                let b = upstream.flight_blob(&remote, &d, offset).await.map_err(fetch_error)?;
                Ok(FetchBody { total: b.total, from_offset: b.from_offset, body: b.body })
            })
        });
        let fetch = match &self.cluster {
            Some(cluster) => cluster.fetcher(digest, fetch),
            None => fetch,
        };
        // Bytes found in storage may be evicted before they are linked here; then a second join fetches them.
        let mut attempts = 0;
        let joined = loop {
            attempts += 1;
            match self.flights.join(digest, c.local.as_str(), Arc::clone(&fetch)).await? {
                Join::Stored(size) => match self.registry.link_blob(&c.local, digest, size).await {
                    Ok(()) => break Join::Stored(size),
                    Err(RegistryError::BlobUnknown) if attempts < 3 => continue,
                    Err(e) => return Err(e),
                },
                flight => break flight,
            }
        };
        match joined {
            Join::Stored(size) => {
                // Cached for another repository already: content is shared, only the link is new.
                count_cache(c.upstream.stats(), "blob", "hit");
                self.touch(digest).await;
                Ok(ProxiedBlob::Stored(OpenBlob::sized(size)))
            }
            Join::Flight { flight, joined } => {
                count_cache(c.upstream.stats(), "blob", if joined { "coalesced" } else { "miss" });
                let size = match flight.size().await {
                    Ok(size) => size,
                    Err(e) => return Err(self.flight_failed(c, digest, e).await),
                };
                let (proxy, local, f) = (Arc::clone(self), c.local.clone(), Arc::clone(&flight));
                // Among the server's tasks, so that a shutdown waits for it: a blob stored without its link and
                // cache record would be an orphan that only an offline `fsck --repair` removes.
                self.flights.tasks().spawn("cache adoption", async move {
                    if f.finished().await.is_ok() {
                        proxy.adopt(&local, &f.digest, size, !joined).await;
                    }
                });
                Ok(ProxiedBlob::Flight(flight, size))
            }
        }
    }
}

impl Proxy {
    /// After a flight: links the blob into the cache repository and, for the request that started the flight,
    /// accounts it as cache content and evicts if the cache is now over budget.
    async fn adopt(&self, local: &RepoName, digest: &Digest, size: u64, started: bool) {
        // Every waiter of a herd gets here; one durable write per repository is enough (a read is cheaper).
        let linked = !started && self.registry.blob_size(local, digest).await.is_ok();
        if !linked {
            if let Err(e) = self.registry.link_blob(local, digest, size).await {
                // Evicted already (BlobUnknown), or the metadata store failed: nothing to account either way.
                tracing::warn!(error = %e, "linking a cached blob failed");
                return;
            }
        }
        if started {
            if let Err(e) = self.registry.meta().cache_record(digest, size).await {
                tracing::warn!(error = %e, "recording a cached blob failed");
            }
            if let Err(e) = self.evict().await {
                tracing::warn!(error = %e, "cache eviction failed");
            }
        }
    }

    /// Refreshes a cached blob's access time, at most once per `TOUCH_INTERVAL`.
    async fn touch(&self, digest: &Digest) {
        // The map forgets an entry TOUCH_INTERVAL after it was written: present means written recently.
        if self.touched.get(digest).is_some() {
            return;
        }
        self.touched.insert(digest.clone(), ());
        if let Err(e) = self.registry.meta().cache_touch(digest).await {
            tracing::warn!(error = %e, "recording a cache access failed");
        }
    }
}

/// What the cache holds for `reference` of `local` after another cluster member asked upstream about it: the
/// tag's digest, or the digest itself if its manifest is cached. `None` if it holds nothing (evicted meanwhile).
async fn cached_answer(registry: &Registry, local: &RepoName, reference: &str, tag: Option<&Tag>) -> Option<Digest> {
    match tag {
        Some(tag) => registry.resolve_tag(local, tag).await.ok().flatten(),
        None => {
            let digest: Digest = reference.parse().ok()?;
            registry.manifest_record(local, &Reference::Digest(digest.clone())).await.ok().map(|_| digest)
        }
    }
}

/// One exchange with upstream about a manifest reference, and the caching of what it answered. With `held` (the
/// digest the cache has for the tag), a HEAD revalidates it and the manifest is only downloaded if it changed.
async fn exchange(
    registry: &Registry,
    c: &Cached,
    reference: &str,
    tag: Option<&Tag>,
    held: Option<Digest>,
    accept: &[String],
) -> std::result::Result<Digest, UpstreamError> {
    let (upstream, remote, local) = (&c.upstream, &c.remote, &c.local);
    if let Some(held) = held {
        let head = upstream.manifest_accepting(remote, reference, true, accept).await?;
        if head.digest == held {
            return Ok(held);
        }
        if let Some(tag) = tag {
            if registry.tag_manifest(local, &head.digest, tag).await.is_ok() {
                return Ok(head.digest);
            }
        }
    }
    let m = upstream.manifest_accepting(remote, reference, false, accept).await?;
    let bytes = m.bytes.clone().unwrap_or_default();
    registry
        .cache_manifest(local, &m.digest, &m.media_type, bytes, tag)
        .await
        .map_err(|e| UpstreamError::Invalid(format!("caching the manifest failed: {e}")))?;
    Ok(m.digest)
}

fn flight_error(c: &Cached, e: FlightError) -> RegistryError {
    match e {
        FlightError::NotFound => RegistryError::BlobUnknown,
        FlightError::Failed(m) => RegistryError::UpstreamUnavailable(format!("upstream {}: {m}", c.upstream.name())),
        FlightError::ShuttingDown => RegistryError::UpstreamUnavailable("the server is shutting down".into()),
    }
}

/// One cache answer: `breakwater_cache_requests_total`, and the hit ratio of the upstream whose namespace it is.
fn count_cache(stats: &Stats, kind: &'static str, result: &'static str) {
    metrics::counter!("breakwater_cache_requests_total", "kind" => kind, "result" => result).increment(1);
    match result {
        "hit" | "deferred" => stats.lookup(Lookup::Hit),
        "coalesced" => stats.lookup(Lookup::Coalesced),
        "miss" => stats.lookup(Lookup::Miss),
        _ => {}
    }
}
