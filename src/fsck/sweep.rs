//! Reconciliation inside `serve`: at start-up and then periodically, fsck's cheap checks (no hashing, no
//! manifest parsing) with repair limited to what nothing can be using once the grace period has passed: upload
//! files without sessions and sessions without files, staging and spool files no running write or flight owns,
//! and cache records whose bytes are gone.
//!
//! Blob files that nothing refers to are counted and logged, never removed here: a cross-repository mount
//! checks that the bytes exist and then links them, so removing them while serving could leave a link to
//! nothing. `breakwater fsck --repair` removes them with the server stopped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{check, Action, Kind, Options, Plan, Problem, Repair, StoreLock};
use crate::flight::BlobFlights;
use crate::meta::Meta;

/// Problems of one kind logged one by one per sweep; the rest are only counted.
const LOGGED_PER_KIND: u64 = 20;

/// What a sweep needs from the server it runs in.
pub struct SweepContext {
    /// The content store's root.
    pub root: PathBuf,
    pub meta: Arc<dyn Meta>,
    /// The server's flights: their spools are never touched.
    pub flights: Arc<BlobFlights>,
    /// Upstream names (their repositories are caches).
    pub cache_namespaces: Vec<String>,
    /// The server's lock on the store, held as long as the sweep task (the server's lifetime).
    pub lock: StoreLock,
    /// How long a file or upload session must be left alone to count as abandoned.
    pub grace: Duration,
}

/// Runs a sweep now and then every `every`, as a task of `tasks`, until shutdown begins. A sweep in progress is
/// dropped then, at its next await: each of its repairs is one filesystem or database step that is complete or
/// not begun, and what it leaves undone the next start-up's sweep does.
pub fn spawn_sweep(ctx: SweepContext, every: Duration, tasks: &crate::shutdown::Tasks) {
    let stop = tasks.closing();
    tasks.spawn("reconciliation sweep", async move {
        let SweepContext { root, meta, flights, cache_namespaces, lock, grace } = ctx;
        let _lock = lock;
        // A handle that creates and removes nothing: the server's own store opened the directory already.
        let store = Arc::new(crate::storage::LocalStore::existing(&root));
        let opts = Options {
            store,
            local: Some(root),
            cache_namespaces,
            grace,
            // In the background: a couple of lookups at a time leave the server its cores.
            concurrency: 2,
            plan: Plan { hash_blobs: false, records: false, repair: Repair::Leftovers, remove_unreferenced_bytes: false },
            flights: Some(flights),
            progress: indicatif::ProgressBar::hidden(),
        };
        let (opts, meta) = (&opts, meta.as_ref());
        let pass_stop = stop.clone();
        crate::shutdown::every(every.max(Duration::from_secs(1)), stop, || {
            let stop = pass_stop.clone();
            async move {
                if stop.run_until_cancelled(sweep(opts, meta)).await.is_none() {
                    tracing::info!("sweep stopped by shutdown");
                }
            }
        })
        .await;
    });
}

async fn sweep(opts: &Options, meta: &dyn Meta) {
    let mut logged: BTreeMap<Kind, u64> = BTreeMap::new();
    let mut sink = |p: &Problem| {
        let n = logged.entry(p.kind).or_default();
        *n += 1;
        if *n <= LOGGED_PER_KIND {
            match &p.action {
                Action::Repaired(_) => tracing::info!(problem = %p, "sweep"),
                _ => tracing::warn!(problem = %p, "sweep"),
            }
        }
    };
    match check(opts, meta, &mut sink).await {
        Ok(report) if report.found() == 0 => tracing::debug!("sweep found nothing to reconcile"),
        Ok(report) => {
            let counts: Vec<String> = report.counts.iter().map(|(k, c)| format!("{k}={}/{}", c.repaired, c.found)).collect();
            tracing::info!(found = report.found(), repaired = report.repaired(), counts = %counts.join(" "), "sweep done");
            let orphans = report.counts.get(&Kind::OrphanBlob).map_or(0, |c| c.found);
            if orphans > 0 {
                tracing::warn!(orphans, "blob files nothing refers to are left in place; `breakwater fsck --repair` removes them with the server stopped");
            }
        }
        Err(e) => tracing::warn!(error = %e, "sweep failed"),
    }
}
