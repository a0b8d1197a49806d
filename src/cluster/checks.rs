//! Cluster-wide tag freshness and negative caching: what one member learnt from upstream about a cached
//! reference holds for every member. A tag confirmed upstream by any member is fresh for the upstream's tag TTL
//! on all of them (one revalidation per tag per TTL for the cluster, not per member), and a reference the
//! upstream did not have is answered 404 by all of them for the negative TTL.
//!
//! Each member keeps its in-memory maps (`proxy`'s `validated` and `missing`) in front: this is asked only when
//! they have no answer, and told whenever the upstream was asked.
//!
//! Asking upstream is coalesced across members too (`turn`): a member takes the lease
//! `manifest:<repo>:<reference>` before it asks; a member that finds it taken waits for the holder's answer to
//! appear here, and then serves what the holder cached in the shared metadata store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::flights::Renewal;
use super::Cluster;
use crate::flight::Group;
use crate::meta::{Check, Meta};
use crate::oci::RepoName;
use crate::shutdown::Tasks;

/// How often a member waiting for another's answer looks for it.
const POLL: Duration = Duration::from_millis(100);

/// The checks the members share, in the metadata store.
pub struct SharedChecks {
    cluster: Arc<Cluster>,
    meta: Arc<dyn Meta>,
    /// The life of an unrenewed lease on asking upstream (as for flights: three heartbeats).
    lease_ttl: Duration,
    /// Lookups of one reference at once share one query: a herd of requests for a cold blob each asks whether
    /// the upstream lately said it was missing.
    lookups: Group<(RepoName, String), Option<Check>>,
}

/// Whose turn it is to ask upstream about a reference.
pub enum Turn {
    /// This member's: it holds the lease while the value lives.
    Mine(#[allow(dead_code)] Renewal),
    /// Another member asked meanwhile; upstream had the reference (`true`) or not. What it learnt is in the
    /// shared metadata store.
    Answered(bool),
}

impl SharedChecks {
    pub fn new(cluster: Arc<Cluster>, meta: Arc<dyn Meta>) -> SharedChecks {
        let lease_ttl = cluster.heartbeat() * super::ALIVE_BEATS;
        SharedChecks { cluster, meta, lease_ttl, lookups: Group::default() }
    }

    /// Waits for this member's turn to ask upstream about `reference` of `repo`, or for an answer that still
    /// holds: one that upstream had it within `ttls.0` (the tag TTL), or had not within `ttls.1` (the negative
    /// TTL). A holder that gives its lease up without answering (its upstream failed) passes the turn on; past
    /// twice a lease's life, or with a metadata store that fails, it is this member's turn whatever the others do.
    pub async fn turn(&self, repo: &RepoName, reference: &str, ttls: (Duration, Duration)) -> Turn {
        let name = format!("manifest:{repo}:{reference}");
        let (me, ttl) = (self.cluster.id().to_string(), self.lease_ttl);
        let deadline = Instant::now() + ttl * 2;
        loop {
            // The answer first: a holder records it before it gives the lease up.
            if let Some(found) = self.answer(repo, reference, ttls).await {
                return Turn::Answered(found);
            }
            match self.meta.lease(&name, &me, ttl.as_millis() as i64).await {
                Ok(true) => {
                    let turn = Renewal::start(Arc::clone(&self.meta), name, me, ttl);
                    // Looked at again now that the lease is held: the last holder may have answered and let go
                    // between the look above and the lease.
                    return match self.answer(repo, reference, ttls).await {
                        Some(found) => Turn::Answered(found),
                        None => Turn::Mine(turn),
                    };
                }
                Ok(false) => {}
                Err(_) => return Turn::Mine(Renewal::start(Arc::clone(&self.meta), name, me, ttl)),
            }
            if Instant::now() > deadline {
                tracing::warn!(%repo, reference, "another member held the turn to ask upstream too long; asking too");
                return Turn::Mine(Renewal::start(Arc::clone(&self.meta), name, me, ttl));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The answer about `reference` some member recorded, if it still holds (`turn`'s `ttls`).
    async fn answer(&self, repo: &RepoName, reference: &str, ttls: (Duration, Duration)) -> Option<bool> {
        let check = self.meta.cache_check(repo, reference).await.ok()??;
        let age = Duration::from_millis(crate::clock::now_ms().saturating_sub(check.checked_at).max(0) as u64);
        (age < if check.found { ttls.0 } else { ttls.1 }).then_some(check.found)
    }

    /// How long ago some member learnt from upstream that `reference` of `repo` exists (`found`) or does not,
    /// if that answer is younger than `ttl`. A metadata store that fails is no answer: the caller asks upstream.
    pub async fn answered(&self, repo: &RepoName, reference: &str, found: bool, ttl: Duration) -> Option<Duration> {
        let (meta, r, reference_owned) = (Arc::clone(&self.meta), repo.clone(), reference.to_string());
        let (looked_up, _) = self
            .lookups
            .run((repo.clone(), reference.to_string()), move || async move {
                match meta.cache_check(&r, &reference_owned).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, repo = %r, reference = reference_owned, "reading the cluster's upstream checks failed");
                        None
                    }
                }
            })
            .await;
        let check = looked_up.ok()??;
        let age = Duration::from_millis(crate::clock::now_ms().saturating_sub(check.checked_at).max(0) as u64);
        (check.found == found && age < ttl).then_some(age)
    }

    /// Tells the other members what upstream just said about `reference`.
    pub async fn record(&self, repo: &RepoName, reference: &str, found: bool) {
        let check = Check { checked_at: crate::clock::now_ms(), found };
        if let Err(e) = self.meta.record_check(repo, reference, check).await {
            tracing::warn!(error = %e, %repo, reference, "recording an upstream check for the cluster failed");
        }
    }

    /// Forgets, every minute, the checks older than `keep` (the longest TTL they could still count for).
    pub fn spawn_pruning(self: &Arc<Self>, keep: Duration, tasks: &Tasks) {
        let checks = Arc::clone(self);
        tasks.spawn(
            "cluster check pruning",
            crate::shutdown::every(Duration::from_secs(60), tasks.closing(), move || {
                let checks = Arc::clone(&checks);
                async move {
                    let before = crate::clock::now_ms() - keep.as_millis() as i64;
                    if let Err(e) = checks.meta.forget_checks(before).await {
                        tracing::warn!(error = %e, "forgetting old upstream checks failed");
                    }
                }
            }),
        );
    }
}
