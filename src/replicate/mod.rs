//! The replication engine: copies repositories from a source registry to a destination, page by page, with a
//! checkpoint that lets a crashed run resume where it stopped.
//!
//! ```text
//! catalog pages ──> filter ──> tag listing (N tasks) ──> artifact copies (N workers) ──> checkpoint
//!        bounded channels between the stages: a slow destination slows the walk; memory stays flat
//! ```
//! Architecture invariant: the checkpoint is a low-water mark. Pages finish out of order; the mark only moves
//! over a prefix of pages whose every repository is finished (copied, up to date, or recorded as failed). A
//! resumed run restarts the walk after the mark, so at most the pages in flight at the crash are listed again,
//! and their finished artifacts cost one HEAD each (copies are idempotent).

mod copy;
mod filter;
mod listing;
mod progress;
mod scheduler;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

pub use copy::{Copier, Outcome};
pub use filter::{natural_cmp, RepoFilter, Rewrite, TagFilter};
pub use listing::SourceKind;
pub use progress::{Progress, Reporter};
pub use scheduler::{JobStatus, Scheduler, StartError};

use crate::meta::{JobFailure, JobRecord, Meta};
use crate::oci::RepoName;
use crate::upstream::{Upstream, UpstreamConfig, UpstreamError};

/// A replication policy: what to copy from where to where, and how.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The job name: the checkpoint and failures are kept under it.
    pub job: String,
    pub from: UpstreamConfig,
    /// How the source's repositories are listed.
    pub from_kind: SourceKind,
    pub to: UpstreamConfig,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub tags: Vec<String>,
    pub exclude_tags: Vec<String>,
    pub latest: Option<usize>,
    pub rewrite: Vec<String>,
    pub platforms: Vec<String>,
    pub referrers: bool,
    pub override_tags: bool,
    /// Tag listings and artifact copies in flight at once (each).
    pub concurrency: usize,
    /// Catalog page size asked of the source.
    pub page_size: u64,
    pub dry_run: bool,
    /// Bytes per second read from the source, at most.
    pub bandwidth: Option<u64>,
}

/// How a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// From the start of the catalog, forgetting any previous state of the job.
    Fresh,
    /// From the job's checkpoint.
    Resume,
    /// Only the items the job recorded as failed.
    RetryFailed,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error("invalid policy: {0}")]
    Policy(String),
    #[error(transparent)]
    Meta(#[from] crate::meta::MetaError),
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
}

/// A repository in the pipeline: its artifacts still pending, and the page it belongs to.
struct RepoWork {
    name: RepoName,
    page: Arc<PageState>,
    /// Tags still to copy, plus one for the listing itself while it runs.
    pending: AtomicUsize,
}

struct PageState {
    index: u64,
    /// Repositories of this page not yet finished.
    pending: AtomicUsize,
    done: mpsc::UnboundedSender<u64>,
}

impl PageState {
    fn repo_finished(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = self.done.send(self.index);
        }
    }
}

impl RepoWork {
    fn item_finished(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.page.repo_finished();
        }
    }
}

struct Artifact {
    repo: Arc<RepoWork>,
    tag: String,
}

/// Everything the stages share.
struct Run {
    policy: Policy,
    meta: Arc<dyn Meta>,
    progress: Arc<Progress>,
    copier: Arc<Copier>,
    tags: TagFilter,
    rewrite: Rewrite,
}

impl Run {
    async fn fail(&self, repo: &str, tag: &str, reason: String) {
        tracing::warn!(job = %self.policy.job, repo, tag, %reason, "replication item failed");
        self.progress.failed(&self.policy.job);
        let f = JobFailure { repo: repo.to_string(), tag: tag.to_string(), reason };
        if let Err(e) = self.meta.record_failure(&self.policy.job, &f).await {
            tracing::error!(error = %e, "recording a replication failure failed");
        }
    }

    /// Lists a repository's tags, page by page where the source pages them, and selects the ones to copy.
    async fn list_tags(&self, repo: &RepoName) -> Result<Vec<String>, UpstreamError> {
        let src = &self.copier.src;
        let mut all = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let page = copy::retry([src, src], || src.tags_page(repo, last.as_deref(), 1000)).await?;
            all.extend(page.items);
            match page.next {
                Some(n) if Some(&n) != last.as_ref() => last = Some(n),
                _ => break,
            }
        }
        Ok(self.tags.select(all))
    }

    /// Copies one tag and accounts for it.
    async fn copy(&self, repo: &RepoName, tag: &str) -> bool {
        let dst_name = self.rewrite.apply(repo.as_str());
        let dst: RepoName = match dst_name.parse() {
            Ok(d) => d,
            Err(e) => {
                self.fail(repo.as_str(), tag, format!("rewritten name {dst_name:?} is invalid: {e}")).await;
                return false;
            }
        };
        match self.copier.copy_tag(repo, &dst, tag).await {
            Ok(Outcome::Copied { bytes }) => self.progress.copied(&self.policy.job, bytes),
            Ok(Outcome::UpToDate) => self.progress.skipped(&self.policy.job),
            Ok(Outcome::Conflict { existing }) => {
                tracing::warn!(repo = %dst, tag, %existing, "destination tag points elsewhere; left alone (use --override)");
                self.progress.conflicts.fetch_add(1, Ordering::Relaxed);
                self.progress.skipped(&self.policy.job);
            }
            Err(e) => {
                self.fail(repo.as_str(), tag, e.to_string()).await;
                return false;
            }
        }
        true
    }

    async fn save(&self, mark: Option<String>, status: &str) {
        let mut r = self.progress.record(&self.policy.job);
        r.mark = mark;
        r.status = status.to_string();
        if let Err(e) = self.meta.save_job(&r).await {
            tracing::error!(error = %e, "saving the replication checkpoint failed");
        }
    }
}

/// Runs `policy` and returns the job's final record. Progress is visible through `progress` as it goes.
pub async fn run(policy: Policy, meta: Arc<dyn Meta>, mode: Mode, progress: Option<Arc<Progress>>) -> Result<JobRecord, ReplicateError> {
    let src = Arc::new(Upstream::new(policy.from.clone())?);
    let dst = Arc::new(Upstream::new(policy.to.clone())?);
    let repos = RepoFilter::new(&policy.include, &policy.exclude).map_err(ReplicateError::Policy)?;
    let tags = TagFilter::new(&policy.tags, &policy.exclude_tags, policy.latest).map_err(ReplicateError::Policy)?;
    let rewrite = Rewrite::new(&policy.rewrite).map_err(ReplicateError::Policy)?;
    let mut copier = Copier::new(src, dst);
    copier.platforms = policy.platforms.clone();
    copier.referrers = policy.referrers;
    copier.override_tags = policy.override_tags;
    copier.dry_run = policy.dry_run;
    copier.bandwidth = policy.bandwidth.filter(|b| *b > 0).map(|b| Arc::new(crate::pace::Pacer::per_second(b as f64)));

    let saved = meta.job(&policy.job).await?;
    let (start_mark, progress) = match mode {
        Mode::Fresh => {
            meta.reset_job(&policy.job).await?;
            (None, progress.unwrap_or_default())
        }
        Mode::Resume | Mode::RetryFailed => {
            let counters = saved.as_ref().map(Progress::from_record).unwrap_or_default();
            let p = match progress {
                Some(p) => {
                    // The caller's progress starts from the saved counters too.
                    let r = counters.record("");
                    for (a, v) in [(&p.pages, r.pages), (&p.repos_seen, r.repos_seen), (&p.repos_matched, r.repos_matched),
                        (&p.copied, r.copied), (&p.skipped, r.skipped), (&p.failed, r.failed), (&p.bytes, r.bytes)] {
                        a.store(v, Ordering::Relaxed);
                    }
                    p
                }
                None => Arc::new(counters),
            };
            (saved.as_ref().and_then(|s| s.mark.clone()), p)
        }
    };
    let run = Arc::new(Run { policy, meta, progress, copier: Arc::new(copier), tags, rewrite });
    if mode == Mode::RetryFailed {
        return retry_failed(run, saved).await;
    }
    walk(run, repos, start_mark).await
}

/// The streaming pipeline over the catalog, from `start` (exclusive).
async fn walk(run: Arc<Run>, filter: RepoFilter, start: Option<String>) -> Result<JobRecord, ReplicateError> {
    let concurrency = run.policy.concurrency.max(1);
    let (repo_tx, repo_rx) = mpsc::channel::<Arc<RepoWork>>(concurrency * 2);
    let (art_tx, art_rx) = mpsc::channel::<Artifact>(concurrency * 4);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u64>();
    // Pages registered by the walker, waiting to complete: (index → last name of the page).
    let (page_tx, mut page_rx) = mpsc::unbounded_channel::<(u64, Option<String>)>();

    // Stage 2: tag listing.
    let repo_rx = Arc::new(tokio::sync::Mutex::new(repo_rx));
    let mut listers = Vec::new();
    for _ in 0..concurrency {
        let (run, repo_rx, art_tx) = (Arc::clone(&run), Arc::clone(&repo_rx), art_tx.clone());
        listers.push(tokio::spawn(async move {
            loop {
                let Some(repo) = repo_rx.lock().await.recv().await else { break };
                match run.list_tags(&repo.name).await {
                    Ok(tags) => {
                        repo.pending.fetch_add(tags.len(), Ordering::AcqRel);
                        for tag in tags {
                            if art_tx.send(Artifact { repo: Arc::clone(&repo), tag }).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => run.fail(repo.name.as_str(), "", format!("listing tags: {e}")).await,
                }
                repo.item_finished();
            }
        }));
    }
    drop(art_tx);

    // Stage 3: artifact copies.
    let art_rx = Arc::new(tokio::sync::Mutex::new(art_rx));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (run, art_rx) = (Arc::clone(&run), Arc::clone(&art_rx));
        workers.push(tokio::spawn(async move {
            loop {
                let Some(a) = art_rx.lock().await.recv().await else { break };
                run.copy(&a.repo.name, &a.tag).await;
                a.repo.item_finished();
            }
        }));
    }

    // Stage 4: the checkpoint. Moves the mark over the finished prefix of pages.
    let checkpoint = {
        let run = Arc::clone(&run);
        let start = start.clone();
        tokio::spawn(async move {
            let mut names: BTreeMap<u64, Option<String>> = BTreeMap::new();
            let mut finished = std::collections::BTreeSet::new();
            let mut next = 0u64;
            let mut mark = start;
            let (mut pages_open, mut done_open) = (true, true);
            while pages_open || done_open || !names.is_empty() {
                tokio::select! {
                    p = page_rx.recv(), if pages_open => match p {
                        Some((i, last)) => { names.insert(i, last); }
                        None => pages_open = false,
                    },
                    d = done_rx.recv(), if done_open => match d {
                        Some(i) => { finished.insert(i); }
                        None => done_open = false,
                    },
                    else => break,
                }
                let mut moved = false;
                while finished.contains(&next) && names.contains_key(&next) {
                    finished.remove(&next);
                    if let Some(Some(last)) = names.remove(&next) {
                        mark = Some(last);
                    }
                    next += 1;
                    moved = true;
                }
                if moved {
                    run.save(mark.clone(), "running").await;
                }
                if !pages_open && !done_open {
                    break;
                }
            }
            mark
        })
    };

    // Stage 1: the catalog walk (here, so that its back-pressure is the channel to the listers).
    let mut lister = listing::Lister::new(run.policy.from_kind, start);
    let mut index = 0u64;
    let mut walk_error = None;
    loop {
        let items = match lister.next_page(&run.copier.src, run.policy.page_size).await {
            Ok(Some(items)) => items,
            Ok(None) => break,
            Err(e) => {
                walk_error = Some(e);
                break;
            }
        };
        let matched: Vec<RepoName> = items.iter().filter(|n| filter.matches(n)).filter_map(|n| n.parse().ok()).collect();
        run.progress.page(&run.policy.job, items.len() as u64, matched.len() as u64);
        let state = Arc::new(PageState { index, pending: AtomicUsize::new(matched.len() + 1), done: done_tx.clone() });
        let _ = page_tx.send((index, items.last().cloned()));
        for name in matched {
            let repo = Arc::new(RepoWork { name, page: Arc::clone(&state), pending: AtomicUsize::new(1) });
            if repo_tx.send(repo).await.is_err() {
                break;
            }
        }
        // The page's own token: released once all its repositories were handed on.
        state.repo_finished();
        index += 1;
    }
    drop(repo_tx);
    drop(page_tx);
    drop(done_tx);
    for h in listers.into_iter().chain(workers) {
        let _ = h.await;
    }
    let mark = checkpoint.await.unwrap_or(None);
    if let Some(e) = &walk_error {
        // The walk stops at a catalog page the source will not give; the mark stays before it, so a resumed run
        // picks it up again.
        let at = mark.clone().unwrap_or_default();
        run.fail("<catalog>", &at, format!("listing the catalog after {at:?}: {e}")).await;
    }
    let failed = run.progress.failed.load(Ordering::Relaxed) > 0;
    let status = if walk_error.is_some() || failed { "failed" } else { "finished" };
    run.save(mark.clone(), status).await;
    let mut r = run.progress.record(&run.policy.job);
    r.mark = mark;
    r.status = status.to_string();
    Ok(r)
}

/// Retries only the items a job recorded as failed; each one that now succeeds is cleared.
async fn retry_failed(run: Arc<Run>, saved: Option<JobRecord>) -> Result<JobRecord, ReplicateError> {
    let failures = run.meta.failures(&run.policy.job).await?;
    // Failures are counted anew: what fails again is recorded again.
    run.progress.failed.store(0, Ordering::Relaxed);
    for f in failures {
        if f.repo == "<catalog>" {
            // A catalog failure is retried by resuming the walk; leave it for --resume.
            run.progress.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let Ok(repo) = f.repo.parse::<RepoName>() else { continue };
        run.meta.clear_failure(&run.policy.job, &f.repo, &f.tag).await?;
        let tags = if f.tag.is_empty() {
            match run.list_tags(&repo).await {
                Ok(t) => t,
                Err(e) => {
                    run.fail(&f.repo, "", format!("listing tags: {e}")).await;
                    continue;
                }
            }
        } else {
            vec![f.tag.clone()]
        };
        for tag in tags {
            run.copy(&repo, &tag).await;
        }
    }
    let mark = saved.and_then(|s| s.mark);
    let status = if run.progress.failed.load(Ordering::Relaxed) > 0 { "failed" } else { "finished" };
    run.save(mark.clone(), status).await;
    let mut r = run.progress.record(&run.policy.job);
    r.mark = mark;
    r.status = status.to_string();
    Ok(r)
}
