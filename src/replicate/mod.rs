//! The replication engine: copies repositories from a source registry to a destination, page by page, with a
//! checkpoint that lets a crashed run resume where it stopped.
//!
//! ```text
//! catalog pages (N walkers, one key range each) ──> filter ──> tag listing (N tasks) ──> artifact copies (N workers)
//!        bounded channels between the stages: a slow destination slows the walk; memory stays flat
//! ```
//! The catalog is split into key ranges (`ranges.rs`), each listed by its own walker from `last=<its start>` to
//! past its end; a walker that finishes takes over half of the largest range left. A source listed otherwise
//! (Harbor) or whose catalog turns out not to be sorted is walked as one range, in its own order.
//!
//! Architecture invariant: the checkpoint never claims unfinished work. It holds, per range left, the walk's
//! position in it (the last name of the range's last page whose repositories were all handed on) and its end,
//! and the repositories handed on but not yet finished; every matched repository outside the ranges left is
//! either finished or among those. A resumed run re-queues the unfinished ones and continues each range after its
//! position, so no catalog page is listed twice but the one page per walker that was in flight at the crash, and
//! finished artifacts are not redone (a repository that finished after the last save costs one HEAD per tag:
//! copies are idempotent). The low-water mark (every repository up to it finished) is kept too, for people.
//!
//! A run is stopped by cancelling its token (SIGTERM to `serve` or to `replicate`): every stage stops at its
//! next await, dropping the item in hand unfinished (a listing or copy cut short finishes nothing, so its
//! repository stays outstanding), and the run saves its checkpoint with the status `interrupted`, which the
//! next run resumes like a crashed one.

mod copy;
pub mod distributed;
mod events;
mod filter;
mod listing;
mod progress;
mod ranges;
mod scheduler;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use copy::{Copier, Outcome};
pub use events::{EventCounts, EventError, EventQueue, Received};
pub use filter::{natural_cmp, Latest, LatestBy, NewestCreated, RepoFilter, Rewrite, TagFilter};
pub use listing::SourceKind;
pub use progress::{Progress, Reporter};
pub use scheduler::{JobStatus, Scheduler, StartError, FAILURES_SHOWN};

use crate::meta::{JobFailure, JobRecord, Meta, Unit, UnitCounts};
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
    /// What `latest` counts: tag order, or the image configs' `created`.
    pub latest_by: LatestBy,
    pub rewrite: Vec<String>,
    pub platforms: Vec<String>,
    pub referrers: bool,
    pub override_tags: bool,
    /// Tag listings and artifact copies in flight at once (each).
    pub concurrency: usize,
    /// Catalog page size asked of the source.
    pub page_size: u64,
    /// Catalog walkers: key ranges listed at once (a Harbor source is always walked by one).
    pub walkers: usize,
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
    #[error("job {job} is a distributed job with {open} units pending or claimed: work it with `breakwater worker` or `replicate --distributed`, or wait until they are done")]
    Distributed { job: String, open: usize },
}

/// A repository in the pipeline: its artifacts still pending, and the page it belongs to.
struct RepoWork {
    name: RepoName,
    page: Arc<PageState>,
    /// Tags still to copy, plus one for the listing itself while it runs.
    pending: AtomicUsize,
    /// Re-queued from a previous run's checkpoint: some of its items may have recorded failures, which a success
    /// now clears. (Other repositories cannot have any: a new pass forgets failures, a resumed one has not
    /// reached them.)
    requeued: bool,
}

struct PageState {
    /// Repositories of this page not yet finished.
    pending: AtomicUsize,
    /// Told when the page is finished, so the checkpoint saves what finished.
    done: mpsc::UnboundedSender<()>,
    cursor: Arc<Mutex<Cursor>>,
}

/// Where the run is: what the checkpoint saves.
#[derive(Default)]
struct Cursor {
    /// Low-water mark: every repository up to it is finished.
    mark: Option<String>,
    /// The catalog's ranges left to list; `None` until the walk starts (a fresh job is split then).
    walk: Option<ranges::Walk>,
    /// Repositories handed on and not finished yet.
    outstanding: BTreeSet<String>,
    /// The greatest name this run handed on: the mark once everything is finished.
    max_listed: Option<String>,
}

impl Cursor {
    /// Moves the low-water mark up to the walk's frontier (everything before the lowest range left is handed on)
    /// if nothing outstanding is before it. Once the walk has ended, the frontier is the last name handed on.
    fn advance_mark(&mut self) {
        let frontier = match self.walk.as_ref().map(|w| w.frontier()) {
            None | Some(Some(None)) => return,
            Some(Some(Some(p))) => p.to_string(),
            Some(None) => match &self.max_listed {
                Some(m) => m.clone(),
                None => return,
            },
        };
        if self.outstanding.first().is_some_and(|o| *o <= frontier) {
            return;
        }
        if self.mark.as_ref().is_none_or(|m| *m < frontier) {
            self.mark = Some(frontier);
        }
    }
}

impl PageState {
    fn repo_finished(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = self.done.send(());
        }
    }
}

impl RepoWork {
    /// One of the repository's items (its listing, a tag's copy) is done; counts the repository as finished in
    /// `progress` when it was the last.
    fn item_finished(&self, progress: &Progress) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.page.cursor.lock().unwrap_or_else(|p| p.into_inner()).outstanding.remove(self.name.as_str());
            self.page.repo_finished();
            progress.repo_finished();
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
    cursor: Arc<Mutex<Cursor>>,
    /// Serialises checkpoint writes, so a slower write of an older state never lands after a newer one.
    save_lock: tokio::sync::Mutex<()>,
    /// Saved with the checkpoint: the job's runs that retried failures after the pass's walk ended (0 once
    /// this run walks).
    retries: AtomicU64,
    /// Cancelled when the run must stop (shutdown): each stage stops at its next await.
    cancel: CancellationToken,
    /// Set by a stage that stopped with work left because of `cancel`: the run ends `interrupted`.
    interrupted: std::sync::atomic::AtomicBool,
    /// Told whenever the walk's ranges change (a page taken in, a range finished or failed, a walker gone): a
    /// walker with nothing to take over waits for it, since a range becomes worth cutting once its first page is in.
    walk_changed: tokio::sync::Notify,
    /// Set when the run walks one unit of a distributed job: its checkpoint goes to the unit, not the job.
    unit: Option<UnitRun>,
}

/// A distributed job's unit as its run holds it (`distributed` has the protocol).
struct UnitRun {
    /// The unit as claimed: its range, and the epoch every save carries.
    claim: Unit,
    /// A save was refused (another worker claimed the unit since): the run stopped, and must not settle it.
    lost: std::sync::atomic::AtomicBool,
    /// The catalog failures of the walk, (where, why): the unit's attempt failed (the worker decides whether it is
    /// retried or recorded as the job's failure).
    failures: Mutex<Vec<(String, String)>>,
}

impl Run {
    /// Runs `work` unless the run is cancelled first; `None` (and the run marked interrupted) if it is. The
    /// token is looked at before `work` each time: a copy that fails *because* of the cancellation (its blob
    /// transfer was stopped) is dropped, not recorded as a failure.
    async fn unless_cancelled<T>(&self, work: impl std::future::Future<Output = T>) -> Option<T> {
        let r = tokio::select! {
            biased;
            () = self.cancel.cancelled() => None,
            r = work => Some(r),
        };
        if r.is_none() {
            self.interrupted.store(true, Ordering::Relaxed);
        }
        r
    }

    async fn fail(&self, repo: &str, tag: &str, reason: String) {
        tracing::warn!(job = %self.policy.job, repo, tag, %reason, "replication item failed");
        self.progress.failed(&self.policy.job);
        let f = JobFailure { repo: repo.to_string(), tag: tag.to_string(), reason };
        if let Err(e) = self.meta.record_failure(&self.policy.job, &f).await {
            tracing::error!(error = %e, "recording a replication failure failed");
        }
    }

    /// Lists a repository's tags page by page (where the source pages them) and hands the ones to copy to
    /// `sink`, a page at a time, so a repository with a million tags never has them all in memory. With
    /// `--latest N` the last N (in tag order, across every page) are kept in a bounded set and handed on at the
    /// end; with `--latest-by created` the N newest by creation time, each page's candidates dated a few at a time
    /// (`concurrency` in flight), so memory holds a page, N tags and those in flight. Returns false if `sink` asked
    /// to stop.
    async fn list_tags<F, Fut>(&self, repo: &RepoName, mut sink: F) -> Result<bool, UpstreamError>
    where
        F: FnMut(Vec<String>) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        inject_panic("listing", repo.as_str());
        let src = &self.copier.src;
        let by_created = self.policy.latest_by == LatestBy::Created;
        let mut latest = self.tags.latest().filter(|_| !by_created).map(Latest::new);
        let mut newest = self.tags.latest().filter(|_| by_created).map(NewestCreated::new);
        let mut last: Option<String> = None;
        loop {
            let page = match copy::retry([src, src], || src.tags_page(repo, last.as_deref(), 1000)).await {
                Ok(p) => p,
                // distribution lists repositories whose every tag was deleted (or that were pushed by digest
                // only) and answers their tag list with NAME_UNKNOWN: nothing to copy, not a failure.
                Err(UpstreamError::NotFound) if last.is_none() => return Ok(true),
                Err(e) => return Err(e),
            };
            let selected = self.tags.select_page(page.items);
            match (&mut latest, &mut newest) {
                (Some(l), _) => {
                    selected.into_iter().for_each(|t| l.offer(t));
                    self.progress.tags_held(l.len());
                }
                (None, Some(n)) => {
                    self.date_tags(repo, selected, n).await?;
                    self.progress.tags_held(n.len());
                }
                (None, None) => {
                    self.progress.tags_held(selected.len());
                    if !selected.is_empty() && !sink(selected).await {
                        return Ok(false);
                    }
                }
            }
            match page.next {
                Some(n) if Some(&n) != last.as_ref() => last = Some(n),
                _ => break,
            }
        }
        match (latest, newest) {
            (Some(l), _) if !l.is_empty() => Ok(sink(l.into_sorted()).await),
            (_, Some(n)) if !n.is_empty() => Ok(sink(n.into_sorted()).await),
            _ => Ok(true),
        }
    }

    /// Offers `tags` to `newest` with their creation times, read from the source `concurrency` at a time.
    async fn date_tags(&self, repo: &RepoName, tags: Vec<String>, newest: &mut NewestCreated) -> Result<(), UpstreamError> {
        use futures_util::StreamExt;
        let mut dated = futures_util::stream::iter(tags)
            .map(|t| async move { self.copier.created(repo, &t).await.map(|c| (c, t)) })
            .buffer_unordered(self.policy.concurrency.max(1));
        while let Some(r) = dated.next().await {
            let (created, tag) = r?;
            newest.offer(created, tag);
        }
        Ok(())
    }

    /// Forgets the failure recorded for an item that has now succeeded, and uncounts it.
    async fn forget_failure(&self, repo: &str, tag: &str) {
        match self.meta.clear_failure(&self.policy.job, repo, tag).await {
            Ok(true) => {
                let _ = self.progress.failed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "clearing a replication failure failed"),
        }
    }

    /// Copies one tag and accounts for it (a failure is recorded, not returned: the run goes on). True if it
    /// did not fail. A panic is a failure of this tag like any other, so the worker goes on and the tag is
    /// retried with the failed ones. `ask_first`: an earlier run may have copied part of it (see
    /// [`Copier::copy_tag`]).
    async fn copy(&self, repo: &RepoName, tag: &str, ask_first: bool) -> bool {
        match caught(self.copy_one(repo, tag, ask_first)).await {
            Ok(ok) => ok,
            Err(panic) => {
                self.fail(repo.as_str(), tag, format!("copying panicked: {panic}")).await;
                false
            }
        }
    }

    async fn copy_one(&self, repo: &RepoName, tag: &str, ask_first: bool) -> bool {
        inject_panic("copy", tag);
        let dst_name = self.rewrite.apply(repo.as_str());
        let dst: RepoName = match dst_name.parse() {
            Ok(d) => d,
            Err(e) => {
                self.fail(repo.as_str(), tag, format!("rewritten name {dst_name:?} is invalid: {e}")).await;
                return false;
            }
        };
        match self.copier.copy_tag(repo, &dst, tag, ask_first).await {
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

    /// Saves the checkpoint and counters; returns what was saved.
    async fn save(&self, status: &str) -> JobRecord {
        let _one_at_a_time = self.save_lock.lock().await;
        if let Some(unit) = &self.unit {
            return self.save_unit(unit, status).await;
        }
        let mut r = self.progress.record(&self.policy.job);
        {
            let mut c = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
            c.advance_mark();
            r.mark = c.mark.clone();
            match &c.walk {
                Some(w) => {
                    r.position = w.frontier().flatten().map(str::to_string);
                    r.walk = Some(w.record());
                }
                None => r.position = None,
            }
            r.pending = c.outstanding.iter().cloned().collect();
        }
        r.status = status.to_string();
        r.retries = self.retries.load(Ordering::Relaxed);
        if let Err(e) = self.meta.save_job(&r).await {
            tracing::error!(error = %e, "saving the replication checkpoint failed");
        }
        r
    }

    /// Saves a unit's checkpoint (its range's position and its outstanding repositories) under its epoch; a
    /// refused save means another worker holds the unit now: this run stops at once.
    async fn save_unit(&self, unit: &UnitRun, status: &str) -> JobRecord {
        let mut r = self.progress.record(&self.policy.job);
        let (position, pending) = {
            let c = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
            let position = match c.walk.as_ref().and_then(|w| w.frontier()) {
                Some(p) => p.map(str::to_string),
                // The range is walked: its last name handed on (or where it was before this attempt).
                None => c.max_listed.clone().or_else(|| unit.claim.position.clone()),
            };
            (position, c.outstanding.iter().cloned().collect::<Vec<_>>())
        };
        let counts = UnitCounts { copied: r.copied, skipped: r.skipped, bytes: r.bytes };
        let c = &unit.claim;
        match self.meta.save_unit(&c.job, c.unit, c.epoch, position.as_deref(), &pending, counts).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(job = %c.job, unit = c.unit, epoch = c.epoch, "the unit was claimed by another worker (this one's lease lapsed): stopping it");
                unit.lost.store(true, Ordering::Relaxed);
                self.cancel.cancel();
            }
            Err(e) => tracing::error!(error = %e, "saving the unit's checkpoint failed"),
        }
        r.position = position;
        r.pending = pending;
        r.status = status.to_string();
        r
    }

    /// Forgets the job's catalog failures (the walk is about to list those pages again) and uncounts them.
    async fn clear_catalog_failures(&self) -> Result<bool, ReplicateError> {
        // The catalog's own rows, read in the store's order from (CATALOG, ""): they come first and together,
        // whatever the collation, so the first row of another repository ends them.
        let job = &self.policy.job;
        let uncount = || {
            let _ = self.progress.failed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        };
        let mut any = self.meta.clear_failure(job, CATALOG, "").await?;
        if any {
            uncount();
        }
        let mut last = String::new();
        loop {
            let page = self.meta.failures(job, Some((CATALOG, &last)), FAILURE_PAGE).await?;
            for f in &page.items {
                if f.repo != CATALOG {
                    return Ok(any);
                }
                if self.meta.clear_failure(job, &f.repo, &f.tag).await? {
                    uncount();
                    any = true;
                }
                last = f.tag.clone();
            }
            if !page.more {
                return Ok(any);
            }
        }
    }
}

/// Runs `policy` and returns the job's final record. Progress is visible through `progress` as it goes.
/// Cancelling `cancel` stops the run: it saves its checkpoint and returns with the status `interrupted`.
pub async fn run(
    policy: Policy,
    meta: Arc<dyn Meta>,
    mode: Mode,
    progress: Option<Arc<Progress>>,
    cancel: CancellationToken,
) -> Result<JobRecord, ReplicateError> {
    // Built first: a policy that cannot run (a bad filter) fails before the job's state is touched.
    let progress = progress.unwrap_or_default();
    let (run, repos) = engine(policy, Arc::clone(&meta), Arc::clone(&progress), cancel, Cursor::default(), 0, None)?;
    let policy = &run.policy;
    // A job whose units workers share is theirs: a plain run would reset (fresh) or overwrite (resume) the
    // checkpoint and counters they keep.
    let open = meta.units(&policy.job).await?.iter().filter(|u| u.state == "pending" || u.state == "claimed").count();
    if open > 0 {
        return Err(ReplicateError::Distributed { job: policy.job.clone(), open });
    }
    let saved = meta.job(&policy.job).await?;
    // A retry of failures counts; any walk (below) starts the count again.
    let retries = match (mode, &saved) {
        (Mode::RetryFailed, Some(s)) => s.retries.saturating_add(1),
        _ => 0,
    };
    let start = match mode {
        Mode::Fresh => {
            meta.reset_job(&policy.job).await?;
            Cursor::default()
        }
        Mode::Resume | Mode::RetryFailed => {
            // The run goes on counting from the job's totals.
            if let Some(s) = &saved {
                progress.restore(s);
            }
            let linear = policy.from_kind != SourceKind::Registry;
            saved
                .map(|s| Cursor {
                    walk: Some(ranges::Walk::restore(s.walk.as_ref(), s.position.clone().or_else(|| s.mark.clone()), linear)),
                    mark: s.mark,
                    outstanding: s.pending.into_iter().collect(),
                    max_listed: None,
                })
                .unwrap_or_default()
        }
    };
    *run.cursor.lock().unwrap_or_else(|p| p.into_inner()) = start;
    run.retries.store(retries, Ordering::Relaxed);
    match mode {
        Mode::Fresh => walk(run, repos).await,
        Mode::Resume => {
            run.clear_catalog_failures().await?;
            walk(run, repos).await
        }
        Mode::RetryFailed => {
            retry_items(&run).await?;
            if run.interrupted.load(Ordering::Relaxed) {
                return Ok(finish(&run).await);
            }
            // A walk that stopped at a catalog page the source would not give is taken up again from there.
            if run.clear_catalog_failures().await? {
                run.retries.store(0, Ordering::Relaxed);
                walk(run, repos).await
            } else {
                Ok(finish(&run).await)
            }
        }
    }
}

/// The run's shared state from a policy: clients of the source and destination, filters, and where to start.
fn engine(
    policy: Policy,
    meta: Arc<dyn Meta>,
    progress: Arc<Progress>,
    cancel: CancellationToken,
    start: Cursor,
    retries: u64,
    unit: Option<UnitRun>,
) -> Result<(Arc<Run>, RepoFilter), ReplicateError> {
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
    copier.cancel = cancel.clone();
    copier.bandwidth = policy.bandwidth.filter(|b| *b > 0).map(|b| Arc::new(crate::pace::Pacer::per_second(b as f64)));
    let run = Arc::new(Run {
        policy,
        meta,
        progress,
        copier: Arc::new(copier),
        tags,
        rewrite,
        cursor: Arc::new(Mutex::new(start)),
        save_lock: tokio::sync::Mutex::new(()),
        retries: AtomicU64::new(retries),
        cancel,
        interrupted: Default::default(),
        walk_changed: tokio::sync::Notify::new(),
        unit,
    });
    Ok((run, repos))
}

/// How one attempt at a distributed job's unit ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitOutcome {
    /// The range is walked and every repository of it finished (failed items are recorded as the job's).
    Done,
    /// Stopped (the worker is stopping) with work left: the checkpoint is saved.
    Interrupted,
    /// A save was refused: another worker claimed the unit after this one's lease lapsed.
    Lost,
    /// The walk could not go on: the catalog failed at `at`.
    Failed { at: String, reason: String },
}

/// Walks and copies one claimed unit of a distributed job: the existing pipeline over the unit's key range alone,
/// from its checkpoint (its position, and the repositories its last attempt left unfinished, copied asking the
/// destination first). One walker: the unit's checkpoint is one position.
pub async fn run_unit(mut policy: Policy, meta: Arc<dyn Meta>, claim: Unit, cancel: CancellationToken) -> Result<UnitOutcome, ReplicateError> {
    policy.walkers = 1;
    let linear = policy.from_kind != SourceKind::Registry;
    let range = crate::meta::RangeRecord { position: claim.position.clone(), end: claim.end.clone() };
    let record = crate::meta::WalkRecord { ranges: vec![range], unsorted: false };
    let start = Cursor {
        walk: Some(ranges::Walk::restore(Some(&record), None, linear)),
        outstanding: claim.pending.iter().cloned().collect(),
        ..Cursor::default()
    };
    let progress = Arc::new(Progress::default());
    progress.restore(&JobRecord { copied: claim.copied, skipped: claim.skipped, bytes: claim.bytes, ..JobRecord::default() });
    let unit = UnitRun { claim, lost: Default::default(), failures: Mutex::new(Vec::new()) };
    let (run, repos) = engine(policy, meta, progress, cancel, start, 0, Some(unit))?;
    walk(Arc::clone(&run), repos).await?;
    let Some(unit) = &run.unit else { return Ok(UnitOutcome::Interrupted) };
    if unit.lost.load(Ordering::Relaxed) {
        return Ok(UnitOutcome::Lost);
    }
    if run.interrupted.load(Ordering::Relaxed) {
        return Ok(UnitOutcome::Interrupted);
    }
    let failed = unit.failures.lock().unwrap_or_else(|p| p.into_inner()).first().cloned();
    Ok(match failed {
        Some((at, reason)) => UnitOutcome::Failed { at, reason },
        None => UnitOutcome::Done,
    })
}

/// The new walk of a distributed job, cut into `units` key ranges (one if the source is not listed by its
/// catalog): what its queue is filled with.
pub fn unit_ranges(policy: &Policy, units: usize) -> Vec<crate::meta::RangeRecord> {
    let linear = policy.from_kind != SourceKind::Registry;
    ranges::Walk::fresh(units, linear).record().ranges
}

/// The name failures of the catalog walk are recorded under.
pub const CATALOG: &str = "<catalog>";

/// Failures read from the metadata store at a time (a job may have recorded millions).
const FAILURE_PAGE: u64 = 500;

/// Saves the final state: `interrupted` if the run was stopped with work left, else `finished`, or `failed` if
/// anything is recorded as failed. The records decide, not the run's counter: they include what earlier runs of
/// the job left and is not copied since.
async fn finish(run: &Run) -> JobRecord {
    if run.unit.is_some() {
        // The job's status is the queue's to decide (`distributed`); the unit's checkpoint is saved.
        return run.save("running").await;
    }
    match run.meta.count_failures(&run.policy.job).await {
        Ok(n) => run.progress.failed.store(n, Ordering::Relaxed),
        Err(e) => tracing::error!(error = %e, "counting the replication failures failed; the run's count stands"),
    }
    let failed = run.progress.failed.load(Ordering::Relaxed) > 0;
    let status = match (run.interrupted.load(Ordering::Relaxed), failed) {
        (true, _) => INTERRUPTED,
        (false, true) => "failed",
        (false, false) => "finished",
    };
    run.save(status).await
}

/// The status of a run stopped by shutdown with work left; the next run resumes from its checkpoint.
pub const INTERRUPTED: &str = "interrupted";

/// The streaming pipeline over the catalog, from the run's cursor: its outstanding repositories first, then the
/// catalog after its position.
async fn walk(run: Arc<Run>, filter: RepoFilter) -> Result<JobRecord, ReplicateError> {
    let concurrency = run.policy.concurrency.max(1);
    let (repo_tx, repo_rx) = mpsc::channel::<Arc<RepoWork>>(concurrency * 2);
    let (art_tx, art_rx) = mpsc::channel::<Artifact>(concurrency * 4);
    // Finished pages: each is a reason to save the checkpoint.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();

    // Stage 2: tag listing.
    let repo_rx = Arc::new(tokio::sync::Mutex::new(repo_rx));
    let mut listers = Vec::new();
    for _ in 0..concurrency {
        let (run, repo_rx, art_tx) = (Arc::clone(&run), Arc::clone(&repo_rx), art_tx.clone());
        listers.push(tokio::spawn(async move {
            loop {
                let Some(Some(repo)) = run.unless_cancelled(async { repo_rx.lock().await.recv().await }).await else { break };
                inject_panic("stage", repo.name.as_str());
                let (r, tx) = (&repo, &art_tx);
                // Each page's tags are counted as pending before they are handed on; the listing's own count
                // keeps the repository unfinished until the last page.
                let listed = caught(run.list_tags(&repo.name, |tags| async move {
                        r.pending.fetch_add(tags.len(), Ordering::AcqRel);
                        for tag in tags {
                            if tx.send(Artifact { repo: Arc::clone(r), tag }).await.is_err() {
                                return false;
                            }
                        }
                        true
                    }));
                // A listing cut short finishes nothing: the repository stays outstanding for the next run.
                let Some(listed) = run.unless_cancelled(listed).await else { return };
                match listed {
                    Ok(Ok(true)) => {
                        if repo.requeued {
                            run.forget_failure(repo.name.as_str(), "").await;
                        }
                    }
                    Ok(Ok(false)) => return,
                    Ok(Err(e)) => run.fail(repo.name.as_str(), "", format!("listing tags: {e}")).await,
                    Err(panic) => run.fail(repo.name.as_str(), "", format!("listing tags panicked: {panic}")).await,
                }
                repo.item_finished(&run.progress);
            }
        }));
    }
    // Only the listers hold the receiver: if every one of them dies, the walk's sends fail instead of waiting.
    drop(repo_rx);
    drop(art_tx);

    // Stage 3: artifact copies.
    let art_rx = Arc::new(tokio::sync::Mutex::new(art_rx));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (run, art_rx) = (Arc::clone(&run), Arc::clone(&art_rx));
        workers.push(tokio::spawn(async move {
            loop {
                let Some(Some(a)) = run.unless_cancelled(async { art_rx.lock().await.recv().await }).await else { break };
                // A copy cut short is not finished (copies are idempotent: the next run does it again).
                let Some(copied) = run.unless_cancelled(run.copy(&a.repo.name, &a.tag, a.repo.requeued)).await else { break };
                if copied && a.repo.requeued {
                    run.forget_failure(a.repo.name.as_str(), &a.tag).await;
                }
                a.repo.item_finished(&run.progress);
            }
        }));
    }
    // Likewise for the copiers, so listers are not left waiting on copiers that are all gone.
    drop(art_rx);

    // Stage 4: the checkpoint. Saves when pages finish (several finished at once are one save), so that the
    // repositories they finished are not redone by a resumed run, and the mark moves.
    let checkpoint = {
        let run = Arc::clone(&run);
        tokio::spawn(async move {
            while done_rx.recv().await.is_some() {
                while done_rx.try_recv().is_ok() {}
                run.save("running").await;
            }
        })
    };

    // Stage 1: the catalog walk (here, so that its back-pressure is the channel to the listers). A resumed run
    // first hands on the repositories its predecessor left unfinished.
    let leftover = {
        let mut c = run.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let linear = run.policy.from_kind != SourceKind::Registry;
        c.walk.get_or_insert_with(|| ranges::Walk::fresh(run.policy.walkers, linear));
        c.outstanding.iter().filter_map(|n| n.parse().ok()).collect::<Vec<RepoName>>()
    };
    let mut ended = Vec::new();
    if !leftover.is_empty() && !hand_on(&run, leftover, &repo_tx, &done_tx, true).await {
        ended.push(WalkerEnd::Stopped);
    }
    let filter = Arc::new(filter);
    let mut walkers = Vec::new();
    if ended.is_empty() {
        for me in 0..run.policy.walkers.max(1) {
            let (run, filter, repo_tx, done_tx) = (Arc::clone(&run), Arc::clone(&filter), repo_tx.clone(), done_tx.clone());
            walkers.push(tokio::spawn(async move { walker(&run, me, &filter, &repo_tx, &done_tx).await }));
        }
    }
    drop(repo_tx);
    drop(done_tx);
    // A stage task that died (a panic outside any one item) took the repositories it held with it: they were
    // never finished, so they stay among the outstanding ones and the run must say it failed.
    let mut crashes = Vec::new();
    let panic_of = |e: tokio::task::JoinError| if e.is_panic() { crate::flight::panic_message(e.into_panic().as_ref()) } else { e.to_string() };
    for h in walkers {
        match h.await {
            Ok(end) => ended.push(end),
            Err(e) => crashes.push(panic_of(e)),
        }
    }
    run.progress.walk_ended();
    for h in listers.into_iter().chain(workers).chain([checkpoint]) {
        if let Err(e) = h.await {
            crashes.push(panic_of(e));
        }
    }
    let mut stopped = Vec::new();
    for end in ended {
        if let WalkerEnd::Failed { at, error } = end {
            // The walk stops at a catalog page the source will not give; the range's position stays before it, so
            // a resumed run (or --retry-failed) picks it up again.
            let at = at.unwrap_or_default();
            stopped.push((at.clone(), format!("listing the catalog after {at:?}: {error}")));
        }
    }
    if !crashes.is_empty() {
        // Recorded as a catalog failure: a resumed run (or --retry-failed) clears it and re-queues the pending.
        let at = {
            let c = run.cursor.lock().unwrap_or_else(|p| p.into_inner());
            c.walk.as_ref().and_then(|w| w.frontier().flatten().map(str::to_string)).or_else(|| c.max_listed.clone()).unwrap_or_default()
        };
        stopped.push((
            at,
            format!("{} pipeline task(s) panicked ({}); their repositories stay pending for a resumed run", crashes.len(), crashes.join("; ")),
        ));
    }
    for (at, why) in stopped {
        match &run.unit {
            // A unit's attempt failed: its worker retries it, and records the failure once it gives up.
            Some(unit) => unit.failures.lock().unwrap_or_else(|p| p.into_inner()).push((at, why)),
            None => run.fail(CATALOG, &at, why).await,
        }
    }
    Ok(finish(&run).await)
}

/// How a walker ended.
enum WalkerEnd {
    /// No range left to list or take over.
    Done,
    /// Cancelled, or the listers are gone: the run stops.
    Stopped,
    /// A catalog page failed for good; `at` is the `last` it was asked with.
    Failed { at: Option<String>, error: UpstreamError },
}

/// One catalog walker: lists a range to its end, then takes over another (or half of one), until none is left.
async fn walker(
    run: &Run,
    me: usize,
    filter: &RepoFilter,
    repo_tx: &mpsc::Sender<Arc<RepoWork>>,
    done_tx: &mpsc::UnboundedSender<()>,
) -> WalkerEnd {
    let _leaving = Leaving { run, me };
    loop {
        let Some(id) = next_range(run, me).await else { return WalkerEnd::Done };
        let end = walk_range(run, id, filter, repo_tx, done_tx).await;
        run.walk_changed.notify_waiters();
        match end {
            WalkerEnd::Done => {}
            end => return end,
        }
    }
}

/// Hands back the ranges walker `me` holds when it ends, however it ends (a panic included), and wakes the walkers
/// waiting: one of them takes the range over, or, with nobody listing any more, they end too (rather than wait
/// for a walker that is gone).
struct Leaving<'a> {
    run: &'a Run,
    me: usize,
}

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.run.cursor.lock().unwrap_or_else(|p| p.into_inner()).walk.as_mut() {
            w.release(self.me);
        }
        self.run.walk_changed.notify_waiters();
    }
}

/// A range for walker `me`: one nobody lists, or half of another walker's. While none can be had but other walkers
/// are listing, waits for their ranges to change (a range is cut only once a page of it shows how dense it is);
/// `None` once no walker lists anything (or the run is cancelled).
async fn next_range(run: &Run, me: usize) -> Option<u64> {
    loop {
        // Registered before looking, so a change between the look and the wait is not missed.
        let changed = run.walk_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        {
            let mut c = run.cursor.lock().unwrap_or_else(|p| p.into_inner());
            let w = c.walk.as_mut()?;
            if let Some(id) = w.claim(me) {
                return Some(id);
            }
            if !w.listing() {
                return None;
            }
        }
        run.unless_cancelled(changed).await?;
    }
}

/// Lists range `id` page by page until it is finished (or no longer this walker's). Each page is saved in the
/// checkpoint, then handed on, before the next is asked for.
async fn walk_range(
    run: &Run,
    mut id: u64,
    filter: &RepoFilter,
    repo_tx: &mpsc::Sender<Arc<RepoWork>>,
    done_tx: &mpsc::UnboundedSender<()>,
) -> WalkerEnd {
    let src = &run.copier.src;
    let (start, linear) = {
        let c = run.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let w = c.walk.as_ref();
        (w.and_then(|w| w.range(id)).and_then(|r| r.position.clone()), w.is_some_and(|w| w.linear))
    };
    // A linear walk follows the source's own `Link`s (a Harbor walk its own pages): its lister keeps its place.
    let mut lister = linear.then(|| listing::Lister::new(run.policy.from_kind, start));
    loop {
        let asked = {
            let c = run.cursor.lock().unwrap_or_else(|p| p.into_inner());
            match c.walk.as_ref().and_then(|w| w.range(id)) {
                Some(r) => r.position.clone(),
                None => return WalkerEnd::Done,
            }
        };
        let n = run.policy.page_size;
        let page = match &mut lister {
            Some(l) => match run.unless_cancelled(l.next_page(src, n)).await {
                None => None,
                Some(Ok(Some(items))) => Some(Ok((!l.exhausted(), items))),
                Some(Ok(None)) => {
                    // The walk is over without another page (Harbor learns it by asking): nothing to count.
                    if let Some(w) = run.cursor.lock().unwrap_or_else(|p| p.into_inner()).walk.as_mut() {
                        w.accept(id, asked.as_deref(), Vec::new(), false);
                    }
                    run.save("running").await;
                    return WalkerEnd::Done;
                }
                Some(Err(e)) => Some(Err(e)),
            },
            None => run
                .unless_cancelled(copy::retry([src, src], || src.catalog_page(asked.as_deref(), n)))
                .await
                .map(|r| r.map(|p| (p.next.is_some(), p.items))),
        };
        let (more, items) = match page {
            None => return WalkerEnd::Stopped,
            Some(Ok(page)) => page,
            Some(Err(error)) => {
                let mut c = run.cursor.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(w) = c.walk.as_mut() {
                    w.fail(id);
                }
                return WalkerEnd::Failed { at: asked, error };
            }
        };
        let (matched, done) = {
            let mut c = run.cursor.lock().unwrap_or_else(|p| p.into_inner());
            let Some(w) = c.walk.as_mut() else { return WalkerEnd::Done };
            let (names, done) = match w.accept(id, asked.as_deref(), items, more) {
                ranges::Accepted::Names { names, done } => (names, done),
                ranges::Accepted::Gone => return WalkerEnd::Done,
                ranges::Accepted::Unsorted { id: one } => {
                    tracing::warn!(job = %run.policy.job, after = ?asked,
                        "the source's catalog is not sorted (a page out of order): walking it with one walker, from its start");
                    id = one;
                    lister = Some(listing::Lister::new(run.policy.from_kind, None));
                    continue;
                }
            };
            // Registered in the same lock as the position moved: a save in between never claims them handed on.
            let matched: Vec<RepoName> = names.iter().filter(|n| filter.matches(n)).filter_map(|n| n.parse().ok()).collect();
            c.outstanding.extend(matched.iter().map(|m| m.to_string()));
            if let Some(last) = names.last() {
                if c.max_listed.as_ref().is_none_or(|m| m < last) {
                    c.max_listed = Some(last.clone());
                }
            }
            run.progress.page(&run.policy.job, names.len() as u64, matched.len() as u64);
            (matched, done)
        };
        run.walk_changed.notify_waiters();
        // Saved before its repositories are handed on: copies that a crash cuts short are then of repositories the
        // checkpoint holds as outstanding, which a resumed run re-queues and copies asking first (nothing is
        // uploaded twice); and the page is never listed again.
        run.save("running").await;
        if !hand_on(run, matched, repo_tx, done_tx, false).await {
            return WalkerEnd::Stopped;
        }
        if done {
            return WalkerEnd::Done;
        }
    }
}

/// Hands a page's repositories on to the listers (already among the outstanding ones); false if the run must stop
/// (cancelled, or every lister died: walking on would only pile up pending names). A page cut short is saved as
/// is: its repositories not handed on are outstanding. `requeued`: they come from a previous run's checkpoint.
async fn hand_on(
    run: &Run,
    repos: Vec<RepoName>,
    repo_tx: &mpsc::Sender<Arc<RepoWork>>,
    done_tx: &mpsc::UnboundedSender<()>,
    requeued: bool,
) -> bool {
    let state = Arc::new(PageState { pending: AtomicUsize::new(repos.len() + 1), done: done_tx.clone(), cursor: Arc::clone(&run.cursor) });
    let mut going = true;
    for name in repos {
        let repo = Arc::new(RepoWork { name, page: Arc::clone(&state), pending: AtomicUsize::new(1), requeued });
        if !matches!(run.unless_cancelled(repo_tx.send(repo)).await, Some(Ok(()))) {
            going = false;
            break;
        }
        run.progress.repo_handed();
    }
    // The page's own token: released once all its repositories were handed on.
    state.repo_finished();
    going
}

/// Retries the items (repositories and tags) a job recorded as failed; each one that now succeeds is cleared.
/// Failures are counted anew: what fails again is recorded again. They are read a page at a time; an item that
/// fails again while its repository is retried may be met again further on, and is then retried once more.
async fn retry_items(run: &Run) -> Result<(), ReplicateError> {
    let mut last: Option<(String, String)> = None;
    loop {
        let page = run.meta.failures(&run.policy.job, last.as_ref().map(|(r, t)| (r.as_str(), t.as_str())), FAILURE_PAGE).await?;
        for f in &page.items {
            if run.cancel.is_cancelled() {
                run.interrupted.store(true, Ordering::Relaxed);
                return Ok(());
            }
            if f.repo != CATALOG {
                retry_item(run, f).await?;
            }
        }
        match page.items.last() {
            Some(f) if page.more => last = Some((f.repo.clone(), f.tag.clone())),
            _ => return Ok(()),
        }
    }
}

/// Retries one recorded failure: a tag, or a whole repository (its listing failed).
async fn retry_item(run: &Run, f: &JobFailure) -> Result<(), ReplicateError> {
    let _ = run.progress.failed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(1)));
    let Ok(repo) = f.repo.parse::<RepoName>() else { return Ok(()) };
    run.meta.clear_failure(&run.policy.job, &f.repo, &f.tag).await?;
    if run.unless_cancelled(retry_cleared(run, f, &repo)).await.is_none() {
        // Cut short: the item is as failed as before, and kept for the next retry.
        run.progress.failed(&run.policy.job);
        run.meta.record_failure(&run.policy.job, f).await?;
    }
    Ok(())
}

/// Retries a failure already cleared: what fails again is recorded again.
async fn retry_cleared(run: &Run, f: &JobFailure, repo: &RepoName) {
    if !f.tag.is_empty() {
        run.copy(repo, &f.tag, true).await;
        return;
    }
    copy_repository(run, repo).await;
}

/// Lists `repo`'s tags and copies the ones the policy selects, as the walk does for one repository (asking the
/// destination first); a listing that fails is recorded as the repository's failure.
async fn copy_repository(run: &Run, repo: &RepoName) {
    let r = repo;
    let copied = caught(run.list_tags(r, |tags| async move {
        for tag in tags {
            run.copy(r, &tag, true).await;
        }
        true
    }));
    match copied.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => run.fail(repo.as_str(), "", format!("listing tags: {e}")).await,
        Err(panic) => run.fail(repo.as_str(), "", format!("listing tags panicked: {panic}")).await,
    }
}

/// Runs one item of work and gives its panic, if it panics, as a message.
async fn caught<T>(work: impl std::future::Future<Output = T>) -> Result<T, String> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(work).catch_unwind().await.map_err(|panic| {
        let message = crate::flight::panic_message(panic.as_ref());
        tracing::error!(%message, "a replication item panicked; it is recorded as failed");
        message
    })
}

/// Test-only fault injection: panics where a name asks for it (`panic-copy` in a tag, `panic-listing` or
/// `panic-stage` in a repository name), to prove that a panic never advances the checkpoint. Compiled out of
/// every build but this crate's unit tests.
#[cfg(test)]
fn inject_panic(point: &str, name: &str) {
    if name.contains(&format!("panic-{point}")) {
        panic!("injected fault: {point} {name}");
    }
}

#[cfg(not(test))]
fn inject_panic(_point: &str, _name: &str) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    /// A real Debian `docker-registry`, killed on drop (the integration tests' harness is not reachable from here).
    struct Registry {
        child: Child,
        url: String,
        _dir: tempfile::TempDir,
    }

    impl Registry {
        fn start() -> Registry {
            let dir = tempfile::tempdir().unwrap();
            let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                    dir.path().join("storage").display()
                ),
            )
            .unwrap();
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("docker-registry (apt-get install docker-registry)");
            for _ in 0..400 {
                if std::net::TcpStream::connect(&addr).is_ok() {
                    return Registry { child, url: format!("http://{addr}"), _dir: dir };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            panic!("docker-registry did not listen on {addr}");
        }

        async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
            let digest = crate::oci::Digest::of(crate::oci::Algorithm::Sha256, bytes).to_string();
            let client = reqwest::Client::new();
            let r = client.post(format!("{}/v2/{repo}/blobs/uploads/", self.url)).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 202);
            let location = r.headers()["location"].to_str().unwrap().to_string();
            let location = if location.starts_with("http") { location } else { format!("{}{location}", self.url) };
            let sep = if location.contains('?') { '&' } else { '?' };
            let r = client.put(format!("{location}{sep}digest={digest}")).body(bytes.to_vec()).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 201);
            digest
        }

        /// Pushes a one-layer image as `repo:tag`.
        async fn push_image(&self, repo: &str, tag: &str) {
            let config = format!(r#"{{"architecture":"amd64","os":"linux","image":"{repo}:{tag}"}}"#);
            let layer = format!("layer of {repo}:{tag}");
            let (c, l) = (self.push_blob(repo, config.as_bytes()).await, self.push_blob(repo, layer.as_bytes()).await);
            let manifest = format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{c}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{l}","size":{}}}]}}"#,
                config.len(),
                layer.len()
            );
            let r = reqwest::Client::new()
                .put(format!("{}/v2/{repo}/manifests/{tag}", self.url))
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                .body(manifest)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201);
        }

        async fn has(&self, repo: &str, tag: &str) -> bool {
            let r = reqwest::Client::new()
                .head(format!("{}/v2/{repo}/manifests/{tag}", self.url))
                .header("accept", "application/vnd.oci.image.manifest.v1+json")
                .send()
                .await
                .unwrap();
            r.status().is_success()
        }
    }

    impl Drop for Registry {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Replicates everything from `src` to `dst` with `concurrency` listers and copiers, one repository per page.
    async fn replicate(src: &Registry, dst: &Registry, meta: Arc<dyn Meta>, concurrency: usize) -> JobRecord {
        let file = crate::config::FileReplication {
            name: "panics".into(),
            from: src.url.clone(),
            to: dst.url.clone(),
            concurrency: Some(concurrency),
            page_size: Some(1),
            ..Default::default()
        };
        let run = run(file.policy("").unwrap(), meta, Mode::Fresh, None, CancellationToken::new());
        tokio::time::timeout(Duration::from_secs(120), run).await.expect("the run ends").unwrap()
    }

    async fn sqlite(dir: &tempfile::TempDir) -> Arc<dyn Meta> {
        crate::meta::open(&format!("sqlite://{}?mode=rwc", dir.path().join("meta.db").display())).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_copy_or_listing_is_a_recorded_failure_and_the_run_fails() {
        let (src, dst, dir) = (Registry::start(), Registry::start(), tempfile::tempdir().unwrap());
        for (repo, tag) in [("a/one", "good"), ("a/one", "panic-copy"), ("a/panic-listing", "good"), ("a/two", "good")] {
            src.push_image(repo, tag).await;
        }
        let meta = sqlite(&dir).await;
        let record = replicate(&src, &dst, Arc::clone(&meta), 2).await;
        assert_eq!(record.status, "failed", "a run with panicked items reports failure: {record:?}");
        let mut failures: Vec<(String, String)> =
            meta.failures("panics", None, 1000).await.unwrap().items.into_iter().map(|f| (f.repo, f.tag)).collect();
        failures.sort();
        assert_eq!(failures, [("a/one".to_string(), "panic-copy".to_string()), ("a/panic-listing".to_string(), String::new())]);
        for f in meta.failures("panics", None, 1000).await.unwrap().items {
            assert!(f.reason.contains("panicked"), "{f:?}");
        }
        // The other items were copied by the same (surviving) workers; the panicked ones are recorded, so the
        // walk is complete and --retry-failed knows what to redo.
        assert_eq!((record.copied, record.failed), (2, 2), "{record:?}");
        assert!(dst.has("a/one", "good").await && dst.has("a/two", "good").await);
        assert_eq!(record.mark.as_deref(), Some("a/two"));
        assert!(record.pending.is_empty(), "{record:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pipeline_task_that_dies_keeps_its_repository_pending_and_the_mark_before_it() {
        let (src, dst) = (Registry::start(), Registry::start());
        for repo in ["b/one", "b/panic-stage", "b/two"] {
            src.push_image(repo, "good").await;
        }
        // With one lister its death stops the whole walk; with two the other goes on.
        for concurrency in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let meta = sqlite(&dir).await;
            let record = replicate(&src, &dst, Arc::clone(&meta), concurrency).await;
            assert_eq!(record.status, "failed", "{record:?}");
            assert!(record.pending.contains(&"b/panic-stage".to_string()), "the unfinished repository stays pending: {record:?}");
            assert!(
                record.mark.as_deref().is_none_or(|m| m < "b/panic-stage"),
                "the low-water mark never passes unfinished work: {record:?}"
            );
            let saved = meta.job("panics").await.unwrap().unwrap();
            assert_eq!((saved.mark, saved.pending), (record.mark.clone(), record.pending.clone()), "what was saved");
            assert!(meta.failures("panics", None, 1000).await.unwrap().items.iter().any(|f| f.repo == CATALOG && f.reason.contains("panicked")));
            if concurrency == 2 {
                // (Copied now, or found up to date from the first run: both are done.)
                assert_eq!(record.copied + record.skipped, 2, "the surviving lister handled the others: {record:?}");
            }
        }
    }
}
