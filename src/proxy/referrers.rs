//! Referrers through the cache: the upstream's referrers of a subject (its referrers API, or the referrers tag
//! schema where it has none), fetched once per subject at a time and held for the tag TTL, merged with the
//! referrers the cache holds (manifests pulled through it), filtered by `artifactType` and paged by us. The
//! referring manifests themselves are fetched on demand, when a client asks for them by digest.

use std::sync::Arc;

use super::listing::{merge_page, Listing};
use super::{client_error, count_cache, Cached, Proxy, Target};
use crate::meta::{ManifestRecord, Page};
use crate::oci::Digest;
use crate::registry::RegistryError;
use crate::upstream::RemoteReferrer;

type Result<T> = std::result::Result<T, RegistryError>;

/// The most referrers one cached listing holds (a referrers index is a manifest of at most 4 MiB, some
/// ten thousand descriptors); beyond, the first this many are the answer (logged).
pub const MAX_LISTED_REFERRERS: usize = 10_000;

/// A page of referrers through the cache.
pub struct ReferrersPage {
    pub page: Page<ManifestRecord>,
    /// Served from the referrers the cache holds alone, because the upstream could not be asked.
    pub stale: bool,
}

impl Proxy {
    /// At most `n` referrers of `subject` in the repository `target` names, after `last`, of `artifact_type` if
    /// given. A mirror-mode name (`LocalOrCached`) lists the local repository of that name if there is one,
    /// else the default upstream's.
    pub async fn referrer_list(
        &self,
        target: Target,
        subject: &Digest,
        artifact_type: Option<&str>,
        last: Option<&Digest>,
        n: u64,
    ) -> Result<ReferrersPage> {
        let c = match target {
            Target::Cached(c) => c,
            Target::LocalOrCached(repo, c) if !self.registry.meta().repo_exists(&repo).await? => c,
            Target::Local(repo) | Target::LocalOrCached(repo, _) => {
                let page = self.registry.referrers(&repo, subject, artifact_type, last, n).await?;
                return Ok(ReferrersPage { page, stale: false });
            }
        };
        self.referrers(&c, subject, artifact_type, last, n).await
    }

    /// At most `n` referrers of `subject` in `c` after `last`, of `artifact_type` if given.
    pub async fn referrers(
        &self,
        c: &Cached,
        subject: &Digest,
        artifact_type: Option<&str>,
        last: Option<&Digest>,
        n: u64,
    ) -> Result<ReferrersPage> {
        let held = self.registry.referrers(&c.local, subject, artifact_type, last, n).await?;
        let listed = match self.upstream_referrers(c, subject).await {
            Ok(listed) => listed,
            // Nothing of the repository held: the upstream's failure is the answer.
            Err(e) if !self.registry.meta().repo_exists(&c.local).await? => return Err(e),
            Err(e) => {
                tracing::warn!(upstream = c.upstream.name(), repo = %c.remote, %subject, error = %e,
                    "upstream unavailable; listing the cached referrers");
                count_cache(c.upstream.stats(), "referrers", "stale");
                c.upstream.stats().stale_serve();
                return Ok(ReferrersPage { page: held, stale: true });
            }
        };
        let wanted: Vec<ManifestRecord> = match artifact_type {
            Some(t) => listed.items.iter().filter(|r| r.artifact_type.as_deref() == Some(t)).cloned().collect(),
            None => listed.items.clone(),
        };
        let (items, more) = merge_page(&wanted, held.items, held.more, last, n, |r| &r.digest);
        Ok(ReferrersPage { page: Page { items, more }, stale: false })
    }

    /// The upstream's referrers of `subject` in `c`, sorted by digest: held if listed within the tag TTL, else
    /// from the one fetch of them in progress.
    async fn upstream_referrers(&self, c: &Cached, subject: &Digest) -> Result<Arc<Listing<ManifestRecord>>> {
        let key = (c.local.clone(), subject.clone());
        if let Some(listed) = self.referrer_lists.fresh(&key, c.upstream.config.tag_ttl, c.upstream.stats()) {
            return Ok(listed);
        }
        let (upstream, remote, subject) = (Arc::clone(&c.upstream), c.remote.clone(), subject.clone());
        self.referrer_lists
            .fetch(key, c.upstream.stats(), move || async move {
                let found = upstream.referrers_of(&remote, &subject, MAX_LISTED_REFERRERS).await?;
                if found.truncated {
                    tracing::warn!(upstream = upstream.name(), repo = %remote, %subject, held = MAX_LISTED_REFERRERS,
                        "the upstream lists more referrers than a cached listing holds; answering with the first");
                }
                Ok(records(&subject, found.items))
            })
            .await
            .map_err(|e| client_error(&c.upstream, e, RegistryError::NameUnknown))
    }
}

/// Upstream descriptors as the records the referrers answer is written from, sorted by digest, once each.
fn records(subject: &Digest, found: Vec<RemoteReferrer>) -> Vec<ManifestRecord> {
    let mut out: Vec<ManifestRecord> = found
        .into_iter()
        .map(|r| ManifestRecord {
            digest: r.digest,
            media_type: r.media_type,
            size: r.size,
            subject: Some(subject.clone()),
            artifact_type: r.artifact_type,
            annotations: r.annotations.and_then(|a| serde_json::to_string(&a).ok()),
        })
        .collect();
    out.sort_by(|a, b| a.digest.cmp(&b.digest));
    out.dedup_by(|a, b| a.digest == b.digest);
    out
}
