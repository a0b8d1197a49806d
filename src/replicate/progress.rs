//! What a replication run has done so far: counters shared by every stage, shown as a progress line on a
//! terminal or as periodic log lines, exported as metrics, and saved with the checkpoint.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::meta::JobRecord;

/// Counters of one run. Each field is what its name says; `copied`, `skipped` and `failed` count artifacts (tags).
pub struct Progress {
    pub pages: AtomicU64,
    pub repos_seen: AtomicU64,
    pub repos_matched: AtomicU64,
    pub copied: AtomicU64,
    pub skipped: AtomicU64,
    pub failed: AtomicU64,
    /// Destination tags left alone because they point elsewhere (without `--override`).
    pub conflicts: AtomicU64,
    pub bytes: AtomicU64,
    /// The most tags one repository's listing held at once (a page, or the `--latest` set): the listing's memory,
    /// which stays bounded whatever the number of tags.
    pub tags_held_max: AtomicU64,
    /// When the run started, and the artifacts and bytes it took over from a saved job (`restore`): its rate
    /// is of what it did itself.
    started: Instant,
    restored: (AtomicU64, AtomicU64),
    /// Repositories this run handed on to be listed and copied, and those of them finished; once the walk has
    /// ended, the first is this run's total, which gives its ETA.
    repos_handed: AtomicU64,
    repos_finished: AtomicU64,
    walk_ended: AtomicBool,
}

impl Default for Progress {
    fn default() -> Progress {
        Progress {
            pages: AtomicU64::new(0),
            repos_seen: AtomicU64::new(0),
            repos_matched: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            tags_held_max: AtomicU64::new(0),
            started: Instant::now(),
            restored: (AtomicU64::new(0), AtomicU64::new(0)),
            repos_handed: AtomicU64::new(0),
            repos_finished: AtomicU64::new(0),
            walk_ended: AtomicBool::new(false),
        }
    }
}

/// How fast a run goes, for `/api/status`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Rate {
    /// Artifacts settled (copied, skipped or failed) per second.
    pub artifacts_per_sec: f64,
    pub bytes_per_sec: f64,
    /// Seconds left, at the pace of the repositories finished so far, once the walk has ended (before, the
    /// total is not known); `None` until then.
    pub eta_secs: Option<u64>,
}

/// Metric names of the counters, in `Progress` order.
const METRICS: [&str; 7] = [
    "breakwater_replication_pages_total",
    "breakwater_replication_repos_seen_total",
    "breakwater_replication_repos_matched_total",
    "breakwater_replication_artifacts_copied_total",
    "breakwater_replication_artifacts_skipped_total",
    "breakwater_replication_artifacts_failed_total",
    "breakwater_replication_bytes_total",
];

impl Progress {
    /// Takes over a saved job's counters (a resumed run keeps counting where the crashed one stopped).
    pub fn restore(&self, r: &JobRecord) {
        self.pages.store(r.pages, Ordering::Relaxed);
        self.repos_seen.store(r.repos_seen, Ordering::Relaxed);
        self.repos_matched.store(r.repos_matched, Ordering::Relaxed);
        self.copied.store(r.copied, Ordering::Relaxed);
        self.skipped.store(r.skipped, Ordering::Relaxed);
        self.failed.store(r.failed, Ordering::Relaxed);
        self.bytes.store(r.bytes, Ordering::Relaxed);
        self.restored.0.store(r.copied + r.skipped + r.failed, Ordering::Relaxed);
        self.restored.1.store(r.bytes, Ordering::Relaxed);
    }

    /// Artifacts and bytes per second since the run started, of what it did itself.
    pub fn rate(&self) -> Rate {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let artifacts = (g(&self.copied) + g(&self.skipped) + g(&self.failed)).saturating_sub(g(&self.restored.0));
        let bytes = g(&self.bytes).saturating_sub(g(&self.restored.1));
        let (handed, finished) = (g(&self.repos_handed), g(&self.repos_finished));
        let eta_secs = (self.walk_ended.load(Ordering::Relaxed) && (finished > 0 || handed == 0))
            .then(|| (handed.saturating_sub(finished) as f64 * secs / finished.max(1) as f64).ceil() as u64);
        Rate { artifacts_per_sec: artifacts as f64 / secs, bytes_per_sec: bytes as f64 / secs, eta_secs }
    }

    /// A repository was handed on to be listed and copied.
    pub fn repo_handed(&self) {
        self.repos_handed.fetch_add(1, Ordering::Relaxed);
    }

    /// A repository handed on is finished (its tags listed and each copied, skipped or failed).
    pub fn repo_finished(&self) {
        self.repos_finished.fetch_add(1, Ordering::Relaxed);
    }

    /// The catalog walk is over: every repository this run will work on was handed on.
    pub fn walk_ended(&self) {
        self.walk_ended.store(true, Ordering::Relaxed);
    }

    fn counter(&self, i: usize) -> &AtomicU64 {
        [&self.pages, &self.repos_seen, &self.repos_matched, &self.copied, &self.skipped, &self.failed, &self.bytes][i]
    }

    /// Adds `n` to counter `which` (an index into `METRICS`), and to its metric for job `job`.
    fn add(&self, job: &str, which: usize, n: u64) {
        self.counter(which).fetch_add(n, Ordering::Relaxed);
        metrics::counter!(METRICS[which], "job" => job.to_string()).increment(n);
    }

    pub fn page(&self, job: &str, seen: u64, matched: u64) {
        self.add(job, 0, 1);
        self.add(job, 1, seen);
        self.add(job, 2, matched);
    }

    pub fn copied(&self, job: &str, bytes: u64) {
        self.add(job, 3, 1);
        self.add(job, 6, bytes);
    }

    pub fn skipped(&self, job: &str) {
        self.add(job, 4, 1);
    }

    /// A listing holds `n` tags now.
    pub fn tags_held(&self, n: usize) {
        self.tags_held_max.fetch_max(n as u64, Ordering::Relaxed);
    }

    pub fn failed(&self, job: &str) {
        self.add(job, 5, 1);
    }

    /// The counters as a job record (without mark and status).
    pub fn record(&self, name: &str) -> JobRecord {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        JobRecord {
            name: name.to_string(),
            pages: g(&self.pages),
            repos_seen: g(&self.repos_seen),
            repos_matched: g(&self.repos_matched),
            copied: g(&self.copied),
            skipped: g(&self.skipped),
            failed: g(&self.failed),
            bytes: g(&self.bytes),
            ..JobRecord::default()
        }
    }

    fn line(&self, started: Instant) -> String {
        let r = self.record("");
        let secs = started.elapsed().as_secs_f64().max(0.001);
        format!(
            "pages {} | repositories {} seen, {} matched | artifacts {} copied, {} skipped, {} failed | {:.1} MB ({:.1} MB/s, {:.1} artifacts/s)",
            r.pages,
            r.repos_seen,
            r.repos_matched,
            r.copied,
            r.skipped,
            r.failed,
            r.bytes as f64 / 1e6,
            r.bytes as f64 / 1e6 / secs,
            (r.copied + r.skipped) as f64 / secs
        )
    }
}

/// Shows progress until dropped: a live line on a terminal, a log line every few seconds otherwise.
pub struct Reporter {
    task: tokio::task::JoinHandle<()>,
    bar: Option<indicatif::ProgressBar>,
}

impl Reporter {
    pub fn start(job: &str, progress: Arc<Progress>) -> Reporter {
        let started = Instant::now();
        let job = job.to_string();
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {prefix} {elapsed} {wide_msg}").expect("valid template"));
            bar.set_prefix(job);
            let b = bar.clone();
            let task = tokio::spawn(async move {
                loop {
                    b.set_message(progress.line(started));
                    b.tick();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            Reporter { task, bar: Some(bar) }
        } else {
            let task = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    tracing::info!(job = %job, "{}", progress.line(started));
                }
            });
            Reporter { task, bar: None }
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_is_known_once_the_walk_has_ended() {
        let p = Progress::default();
        p.repo_handed();
        p.repo_handed();
        p.repo_finished();
        assert_eq!(p.rate().eta_secs, None, "the walk may hand on more");
        p.walk_ended();
        assert!(p.rate().eta_secs.is_some());
        p.repo_finished();
        assert_eq!(p.rate().eta_secs, Some(0));
        // A resumed run rates only what it did itself.
        let r = Progress::default();
        r.restore(&JobRecord { copied: 1_000_000, bytes: 1 << 40, ..JobRecord::default() });
        let rate = r.rate();
        assert_eq!((rate.artifacts_per_sec, rate.bytes_per_sec), (0.0, 0.0));
    }
}
