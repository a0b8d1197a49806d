//! Cache eviction: keeps the bytes fetched from upstreams under a budget and an age, least recently pulled first.
//!
//! Only blobs are evicted (manifests are small, and keeping them keeps tags resolvable; an evicted layer is
//! simply fetched again when next pulled). A blob is never evicted while its download is in flight, and its bytes
//! are never removed while a repository outside the upstreams' namespaces (pushed content) links it or any
//! repository holds a manifest record of its digest (manifest bytes a client pulled through `/blobs/` are
//! accounted as cache content, but belong to the manifest once one is recorded).
//!
//! The check and the removal happen under the digest's exclusive lock (`registry::DigestLocks`), which every
//! path that makes bytes referenced shares: a push, mount or manifest push of the digest being evicted waits
//! until the bytes are gone (and then uploads them again, or is refused for lack of them), and a digest being
//! pushed at this instant is skipped rather than waited for. Those locks are this process's; against writes on
//! other instances sharing the metadata store, eviction marks the digest as the collector does (`crate::gc`,
//! `Meta::evict_mark`): a digest a push claimed recently is skipped, and once marked, pushes of it wait. In a
//! cluster, one member evicts at a time (the turn `evict`), and a digest another member is downloading (its
//! flight's lease) is skipped like a flight of this one.

use std::time::Duration;

use super::Proxy;
use crate::oci::Digest;
use crate::registry::RegistryError;

/// Limits on cached content.
#[derive(Debug, Clone, Copy, Default)]
pub struct EvictionPolicy {
    pub max_bytes: Option<u64>,
    pub max_age: Option<Duration>,
}

/// What one eviction pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub blobs: u64,
    pub bytes: u64,
}

/// What became of one eviction candidate.
enum Eviction {
    /// Its bytes are gone.
    Removed,
    /// Something refers to its bytes: they stay, and the cache no longer accounts for them.
    Kept,
    /// Being downloaded or referenced right now: left for a later pass.
    Busy,
}


/// The cluster-wide turn an eviction pass takes (`Cluster::take_turn`).
const EVICTION_TURN: &str = "evict";

/// Entries examined per query; eviction walks the cache oldest first in pages of this size.
const PAGE: u64 = 256;

impl Proxy {
    /// Whether `repo` is a cache repository (`<upstream>/...`).
    fn is_cache_repo(&self, repo: &str) -> bool {
        repo.split_once('/').is_some_and(|(first, _)| self.upstreams.iter().any(|u| u.name() == first))
    }

    /// Evicts until the cache is within the policy. Concurrent calls do not overlap: one pass at a time.
    pub async fn evict(&self) -> Result<Evicted, RegistryError> {
        let policy = self.eviction;
        if policy.max_bytes.is_none() && policy.max_age.is_none() {
            return Ok(Evicted::default());
        }
        let _pass = self.eviction_pass.lock().await;
        // The cache's budget is the cluster's (one metadata store): one member evicts at a time, or two would
        // each evict what the budget asks for.
        let _turn = match &self.cluster {
            Some(c) => match c.cluster().take_turn(EVICTION_TURN).await {
                Some(turn) => Some(turn),
                None => return Ok(Evicted::default()),
            },
            None => None,
        };
        let meta = self.registry.meta();
        let mut total = meta.cache_bytes().await?;
        let now_ms = crate::clock::now_ms();
        let too_old = |last_access: i64| policy.max_age.is_some_and(|age| now_ms - last_access > age.as_millis() as i64);
        let over = |total: u64| policy.max_bytes.is_some_and(|max| total > max);
        let mut done = Evicted::default();
        // Entries skipped in this pass (running flights, digests being referenced) are not offered again.
        let mut skipped: u64 = 0;
        loop {
            let page = meta.cache_oldest(PAGE + skipped).await?;
            let candidates: Vec<_> = page.into_iter().skip(skipped as usize).collect();
            if candidates.is_empty() {
                break;
            }
            let mut progressed = false;
            for (digest, size, last_access) in candidates {
                if !over(total) && !too_old(last_access) {
                    return Ok(done);
                }
                match self.evict_one(&digest).await? {
                    Eviction::Busy => {
                        skipped += 1;
                        continue;
                    }
                    Eviction::Removed => {
                        done.blobs += 1;
                        done.bytes += size;
                        self.activity.evicted(size);
                    }
                    Eviction::Kept => {}
                }
                total = total.saturating_sub(size);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        Ok(done)
    }

    /// Drops `digest` from the cache: its bytes too, unless something refers to them (then only the cache's
    /// accounting of it goes, for good: the bytes are no longer the cache's to remove).
    async fn evict_one(&self, digest: &Digest) -> Result<Eviction, RegistryError> {
        // Under this lock nothing in this instance can make the digest referenced until its bytes are gone (or
        // kept); the mark below does the same for every instance sharing the metadata store.
        let Some(removal) = self.registry.try_removal(digest) else { return Ok(Eviction::Busy) };
        if self.flights.is_running(digest).await {
            return Ok(Eviction::Busy);
        }
        if let Some(c) = &self.cluster {
            if c.cluster().is_fetching(digest).await? {
                return Ok(Eviction::Busy);
            }
        }
        let meta = self.registry.meta();
        // The collector's protocol (`crate::gc`): a write elsewhere that claimed the digest recently may be about
        // to refer to it (its claim came before its checks), so the digest is left for a later pass; once marked,
        // such writes are refused until the mark is cleared.
        let claims_before = crate::clock::now_ms() - crate::gc::CLAIM_HOLD.as_millis() as i64;
        if !meta.evict_mark(digest, claims_before).await? {
            return Ok(Eviction::Busy);
        }
        let outcome = self.evict_marked(digest, &removal).await;
        // Cleared whatever happened: a mark left behind would refuse every later write of the digest (until a
        // collection finished it).
        let cleared = meta.gc_finish(std::slice::from_ref(digest)).await;
        let outcome = outcome?;
        cleared?;
        Ok(outcome)
    }

    /// `evict_one`'s work once the digest is marked: nothing can come to refer to it meanwhile.
    async fn evict_marked(&self, digest: &Digest, removal: &crate::registry::Removal) -> Result<Eviction, RegistryError> {
        let meta = self.registry.meta();
        let repos = meta.blob_repos(digest).await?;
        let referenced = repos.iter().any(|r| !self.is_cache_repo(r)) || meta.manifest_held(digest).await?;
        meta.cache_forget(digest).await?;
        if referenced {
            return Ok(Eviction::Kept);
        }
        for repo in &repos {
            if let Ok(name) = repo.parse() {
                meta.unlink_blob(&name, digest).await?;
            }
        }
        self.registry.remove_content(removal).await?;
        tracing::info!(%digest, "evicted from the cache");
        Ok(Eviction::Removed)
    }
}
