//! Garbage collection: removes, online, the bytes that nothing refers to, and (by policy) manifests no tag
//! points at.
//!
//! References are kept in SQL rather than found by reading every manifest: each manifest record comes with
//! rows naming its config, layers and children (`manifest_refs`, written in the manifest's own transaction), so
//! whether a digest is in use is a few index lookups, and a run's memory does not grow with the store. A digest
//! is in use while a manifest record of it exists, a manifest lists it, the cache accounts for it (eviction's
//! to remove), or a link to it is younger than the grace period (a pushed layer whose manifest is still to come).
//!
//! The collector and the writes that make a digest referenced meet at the digest's `blob_state` row:
//! - A write claims every digest it relies on (`Meta::claim`: the row's `claimed_at` becomes now) before it
//!   checks that their bytes are there, and records its reference after. While a collector removes a digest
//!   (`deleting = 1`), the claim is refused; the write waits for the removal to end and then finds the bytes
//!   gone (a blob push fails and is retried, a manifest push gets `MANIFEST_BLOB_UNKNOWN`).
//! - The collector marks a digest (`Meta::gc_mark`) only if, with its row locked, nothing refers to it and no
//!   claim is younger than `max(grace, CLAIM_HOLD)`; the digest's stale links go in the same transaction. Then it
//!   removes the bytes, then the mark.
//!
//! Architecture invariant: a manifest stored is never left without its blobs by a collection. Its push claimed
//! them before checking them, so either a collector marked one first (and the push finds it unlinked and is
//! refused) or the claim came first (and no collector marks them until the manifest's references are recorded).
//!
//! A collector that stops halfway leaves marks; the next run removes their bytes first (nothing can have
//! referred to a marked digest since). One collector runs at a time per metadata store (a lease in SQL).

mod retention;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;

pub use retention::{Rule, RuleError};

use crate::meta::{Cutoffs, Meta, MetaError};
use crate::oci::{Digest, ManifestInfo};
use crate::storage::{BlobStore, StorageError};

/// The grace period by default: blobs stored and links made within it are left alone.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// How long a claim protects its digests at least, whatever the grace period: far longer than a write takes
/// from its claim to its reference (a few queries), so a collection with no grace at all is still safe.
pub const CLAIM_HOLD: Duration = Duration::from_secs(60);
/// Blobs, manifests or marks handled per query or transaction.
const BATCH: usize = 200;
/// A progress line is logged every this many blobs examined.
const PROGRESS_EVERY: u64 = 10_000;
/// The collector's lease lasts this long and is renewed at every batch: a collector that died lets another run
/// once it has lapsed.
const LEASE: Duration = Duration::from_secs(300);
/// Passes of the untagged policy at most (a pass can make the children of an index it removed untagged).
const UNTAGGED_PASSES: usize = 8;

/// What a collection does.
#[derive(Debug, Clone)]
pub struct Options {
    pub grace: Duration,
    /// Report what would go; remove nothing.
    pub dry_run: bool,
    /// Remove manifests no tag points at (except children of an index and referrers of a manifest their
    /// repository holds), outside the caches' namespaces.
    pub delete_untagged: bool,
    /// Upstream names: repositories `<name>/...` belong to the pull-through cache, whose content eviction
    /// manages; the untagged policy leaves them alone.
    pub cache_namespaces: Vec<String>,
    /// Retention policies (`[[gc.retention]]`): which tags go, with the manifests only they kept.
    pub retention: Vec<Rule>,
}

/// What a collection did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub dry_run: bool,
    /// Manifests stored before references were kept, whose references were read from their bytes.
    pub manifests_indexed: u64,
    /// Such manifests whose bytes could not be read or parsed: their repositories' links all stay in use.
    pub manifests_unreadable: u64,
    pub manifests_removed: u64,
    pub blobs_examined: u64,
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    /// Removals a collector that stopped halfway had left, finished by this run.
    pub pending_finished: u64,
    /// Blob deletions the store refused (the blobs stay, unreferenced, for the next run).
    pub delete_failures: u64,
    /// Tags the retention policies removed.
    pub tags_removed: u64,
    /// Manifests removed with those tags (with the index children and referrers only they kept).
    pub manifests_retired: u64,
    /// Bytes of those manifests and of the blobs only they referred to (`meta::Untagged::bytes`; part of
    /// `bytes_freed` once the sweep has removed them).
    pub retention_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("another garbage collection is running on this metadata store")]
    Busy,
    #[error("garbage collection lost its lease (it stalled for longer than {0:?}); another collector may run now")]
    LeaseLost(Duration),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("blob store: {0}")]
    Storage(#[from] StorageError),
}

/// One collection, holding the lease.
struct Run<'a> {
    store: &'a dyn BlobStore,
    meta: &'a dyn Meta,
    opts: &'a Options,
    cut: Cutoffs,
    /// The lease holder's name (unique per run).
    holder: String,
    report: Report,
}

/// Collects garbage from `store` as `meta` describes it. Fails with `Busy` if another collection runs.
pub async fn collect(store: &dyn BlobStore, meta: &dyn Meta, opts: &Options) -> Result<Report, GcError> {
    let holder = uuid::Uuid::new_v4().to_string();
    if !meta.lease("gc", &holder, LEASE.as_millis() as i64).await? {
        return Err(GcError::Busy);
    }
    let mut run = Run { store, meta, opts, cut: cutoffs(opts.grace), holder, report: Report { dry_run: opts.dry_run, ..Report::default() } };
    let outcome = run.phases().await;
    // Given up whatever happened: a failed run must not hold others off until the lease lapses.
    let released = meta.release("gc", &run.holder).await;
    outcome?;
    released?;
    let r = &run.report;
    metrics::counter!("breakwater_gc_runs_total").increment(1);
    if !opts.dry_run {
        metrics::counter!("breakwater_gc_blobs_removed_total").increment(r.blobs_removed);
        metrics::counter!("breakwater_gc_bytes_freed_total").increment(r.bytes_freed);
        metrics::counter!("breakwater_gc_manifests_removed_total").increment(r.manifests_removed);
        metrics::counter!("breakwater_gc_tags_removed_total").increment(r.tags_removed);
    }
    tracing::info!(dry_run = opts.dry_run, blobs_removed = r.blobs_removed, bytes_freed = r.bytes_freed,
        manifests_removed = r.manifests_removed, tags_removed = r.tags_removed, "garbage collection done");
    Ok(run.report)
}

/// The cut-offs of a run started now with `grace`. Fixed for the run: what is claimed, linked or stored during
/// it is younger than the cut-offs, so the run leaves it alone.
fn cutoffs(grace: Duration) -> Cutoffs {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let hold = grace.max(CLAIM_HOLD);
    Cutoffs {
        links_before: now.saturating_sub(grace).as_secs() as i64,
        claims_before: now.saturating_sub(hold).as_millis() as i64,
    }
}

impl Run<'_> {
    async fn phases(&mut self) -> Result<(), GcError> {
        if !self.opts.dry_run {
            self.finish_pending().await?;
        }
        self.index_manifests().await?;
        // After the indexing (an index's children must be known to be kept) and before the untagged policy
        // (which then finds nothing of what retention retired).
        if !self.opts.retention.is_empty() {
            self.apply_retention().await?;
        }
        if self.opts.delete_untagged {
            self.remove_untagged().await?;
        }
        self.sweep_blobs().await?;
        if !self.opts.dry_run {
            self.meta.gc_prune_claims(self.cut.claims_before).await?;
        }
        Ok(())
    }

    /// Renews the lease; called at every batch.
    async fn renew(&self) -> Result<(), GcError> {
        if self.meta.lease("gc", &self.holder, LEASE.as_millis() as i64).await? {
            Ok(())
        } else {
            Err(GcError::LeaseLost(LEASE))
        }
    }

    /// Removes the bytes of digests a stopped collector had marked.
    async fn finish_pending(&mut self) -> Result<(), GcError> {
        loop {
            let pending = self.meta.gc_pending(BATCH as u64).await?;
            if pending.is_empty() {
                return Ok(());
            }
            self.renew().await?;
            self.report.pending_finished += pending.len() as u64;
            let mut sizes = Vec::with_capacity(pending.len());
            for d in &pending {
                sizes.push(self.store.stat(d).await?);
            }
            let failed = self.delete(&pending).await?;
            for (d, size) in pending.iter().zip(sizes) {
                if let Some(size) = size.filter(|_| !failed.contains(d)) {
                    self.report.blobs_removed += 1;
                    self.report.bytes_freed += size;
                }
            }
        }
    }

    /// Records the references of manifests stored before references were kept, from their bytes.
    async fn index_manifests(&mut self) -> Result<(), GcError> {
        let mut after: Option<(String, String)> = None;
        loop {
            let page = self.meta.unindexed_manifests(after.as_ref().map(|(r, d)| (r.as_str(), d.as_str())), BATCH as u64).await?;
            let Some(last) = page.last() else { return Ok(()) };
            after = Some((last.repo.clone(), last.record.digest.to_string()));
            self.renew().await?;
            for row in &page {
                match self.references(&row.record.digest, &row.record.media_type).await? {
                    Some(refs) if !self.opts.dry_run => {
                        self.meta.index_manifest(&row.repo, &row.record.digest, &refs).await?;
                        self.report.manifests_indexed += 1;
                    }
                    Some(_) => self.report.manifests_indexed += 1,
                    None => {
                        tracing::warn!(repo = row.repo, digest = %row.record.digest,
                            "manifest bytes missing or unreadable; every link of its repository stays in use");
                        self.report.manifests_unreadable += 1;
                    }
                }
            }
        }
    }

    /// What the stored manifest `digest` refers to, or `None` if its bytes are gone or do not parse.
    async fn references(&self, digest: &Digest, media_type: &str) -> Result<Option<Vec<Digest>>, GcError> {
        let mut body = match self.store.read(digest, None).await {
            Ok(body) => body,
            Err(StorageError::NotFound) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            bytes.extend_from_slice(&chunk.map_err(StorageError::Io)?);
            if bytes.len() > crate::oci::MAX_MANIFEST_BYTES {
                return Ok(None);
            }
        }
        Ok(ManifestInfo::parse(&bytes, Some(media_type)).ok().map(|info| info.blobs.into_iter().chain(info.children).collect()))
    }

    /// The untagged policy: passes over the untagged manifests until one removes nothing (a dry run makes one
    /// pass, so it does not count children that only a removal in it would make untagged).
    async fn remove_untagged(&mut self) -> Result<(), GcError> {
        for _ in 0..UNTAGGED_PASSES {
            let before = self.report.manifests_removed;
            self.untagged_pass().await?;
            if self.opts.dry_run || self.report.manifests_removed == before {
                break;
            }
        }
        Ok(())
    }

    async fn untagged_pass(&mut self) -> Result<(), GcError> {
        let mut after: Option<(String, Digest)> = None;
        loop {
            let key = after.as_ref().map(|(r, d)| (r.clone(), d.to_string()));
            let page = self.meta.untagged_manifests(key.as_ref().map(|(r, d)| (r.as_str(), d.as_str())), BATCH as u64, self.cut).await?;
            let Some(last) = page.last() else { return Ok(()) };
            after = Some(last.clone());
            self.renew().await?;
            for (repo, digest) in &page {
                if self.is_cache_repo(repo) {
                    continue;
                }
                if self.meta.gc_remove_manifest(repo, digest, self.cut, self.opts.dry_run).await? {
                    tracing::info!(repo, %digest, dry_run = self.opts.dry_run, "untagged manifest removed");
                    self.report.manifests_removed += 1;
                }
            }
        }
    }

    fn is_cache_repo(&self, repo: &str) -> bool {
        repo.split_once('/').is_some_and(|(first, _)| self.opts.cache_namespaces.iter().any(|n| n == first))
    }

    /// Walks the store in digest order and removes every blob older than the grace period that nothing refers to.
    async fn sweep_blobs(&mut self) -> Result<(), GcError> {
        let stored_before = SystemTime::now().checked_sub(self.opts.grace).unwrap_or(UNIX_EPOCH);
        let mut after: Option<Digest> = None;
        loop {
            let page = self.store.list(after.as_ref(), BATCH).await?;
            let Some(last) = page.last() else { return Ok(()) };
            after = Some(last.digest.clone());
            self.renew().await?;
            self.report.blobs_examined += page.len() as u64;
            let old: Vec<_> = page.into_iter().filter(|b| b.stored_at < stored_before).collect();
            let digests: Vec<Digest> = old.iter().map(|b| b.digest.clone()).collect();
            let marked = if self.opts.dry_run {
                self.meta.gc_would_mark(&digests, self.cut).await?
            } else {
                self.meta.gc_mark(&digests, self.cut).await?
            };
            let failed = if self.opts.dry_run { Vec::new() } else { self.delete(&marked).await? };
            for b in old.iter().filter(|b| marked.contains(&b.digest) && !failed.contains(&b.digest)) {
                self.report.blobs_removed += 1;
                self.report.bytes_freed += b.size;
            }
            if self.report.blobs_examined % PROGRESS_EVERY < BATCH as u64 {
                let r = &self.report;
                tracing::info!(examined = r.blobs_examined, removed = r.blobs_removed, bytes = r.bytes_freed, "garbage collection in progress");
            }
        }
    }

    /// Removes the bytes of marked digests, then their marks, and returns the digests whose deletion the store
    /// refused: those blobs stay in place, unreferenced (their links went with the mark), for the next run; their
    /// marks go all the same, so that pushes of them are not held up.
    async fn delete(&mut self, marked: &[Digest]) -> Result<Vec<Digest>, GcError> {
        let mut failed = Vec::new();
        for (d, e) in self.store.delete_many(marked).await {
            tracing::warn!(digest = %d, error = %e, "garbage collection could not delete a blob");
            failed.push(d);
        }
        self.report.delete_failures += failed.len() as u64;
        self.meta.gc_finish(marked).await?;
        Ok(failed)
    }
}
