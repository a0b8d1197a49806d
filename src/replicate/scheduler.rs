//! Replication inside `breakwater serve`: the `[[replication]]` policies of the config file, run on their
//! schedules or on request through the HTTP API, one run per policy at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::events::{EventCounts, EventQueue};
use super::{Mode, Progress, INTERRUPTED};
use crate::config::FileReplication;
use crate::meta::{JobFailure, JobRecord, Meta, MetaError, Page};
use crate::shutdown::Tasks;

/// Why a run could not be started.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartError {
    #[error("no replication policy named {0}")]
    Unknown(String),
    #[error("replication {0} is already running")]
    Running(String),
    #[error("replication {0}: {1}")]
    Invalid(String, String),
    /// The server is shutting down: a run started now would only be interrupted.
    #[error("the server is shutting down; replication {0} was not started")]
    ShuttingDown(String),
}

/// A job as the API shows it: its saved state, whether it runs now, and its live counters if so.
#[derive(Debug, serde::Serialize)]
pub struct JobStatus {
    pub name: String,
    pub running: bool,
    pub schedule_secs: Option<u64>,
    /// Counters of the run in progress, or of the last run.
    pub progress: JobRecord,
    /// How fast the run in progress goes; `None` when none runs.
    pub rate: Option<super::progress::Rate>,
    /// How many items the job has recorded as failed.
    pub failure_count: u64,
    /// The first `FAILURES_SHOWN` of them in (repository, tag) order; the rest are paged through
    /// [`Scheduler::failures`], so a status never grows with the number of failures.
    pub failures: Vec<JobFailure>,
    /// Whether failures follow those shown.
    #[serde(skip)]
    pub more_failures: bool,
    /// What its notifications (`POST /api/replication/NAME/events`) came to since the server started.
    pub events: Option<EventCounts>,
}

/// How a run goes on from the job its predecessor left (README, "Replicate a registry"):
/// - `interrupted` (stopped by a shutdown), or still `running` (a crash, a `kill -9`): resume from the
///   checkpoint;
/// - `failed`: retry the failed items, and continue the walk if it stopped at a catalog page; but only once
///   after a walk: if that retry fails too, a new pass starts, so an item that keeps failing cannot stop the
///   schedule from copying what is new (the new pass tries it again anyway);
/// - `finished`: a new pass over the whole source.
fn next_mode(job: &JobRecord) -> Mode {
    match job.status.as_str() {
        "running" | INTERRUPTED => Mode::Resume,
        "failed" if job.retries == 0 => Mode::RetryFailed,
        _ => Mode::Fresh,
    }
}

/// Failures shown with a job's status.
pub const FAILURES_SHOWN: u64 = 100;

pub struct Scheduler {
    policies: Vec<FileReplication>,
    meta: Arc<dyn Meta>,
    /// This breakwater's own URL, for policies whose destination (or source) is `local`.
    local_url: String,
    /// The runs in progress, by policy name.
    running: Mutex<HashMap<String, Arc<Progress>>>,
    /// The server's background tasks: runs and schedules are among them, and stop at its shutdown.
    tasks: Tasks,
    /// Each policy's event queue, or why the policy cannot take events (it could not run either).
    events: HashMap<String, Result<Arc<EventQueue>, String>>,
}

impl Scheduler {
    pub fn new(policies: Vec<FileReplication>, meta: Arc<dyn Meta>, local_url: String, tasks: Tasks) -> Arc<Scheduler> {
        let events = policies
            .iter()
            .map(|p| (p.name.clone(), EventQueue::new(p, &local_url, Arc::clone(&meta), tasks.closing())))
            .collect();
        Arc::new(Scheduler { policies, meta, local_url, running: Mutex::new(HashMap::new()), tasks, events })
    }

    /// Policy `name`'s event queue: unknown, invalid, or refused once shutdown has begun (its worker is stopping).
    pub fn events_of(&self, name: &str) -> Result<Arc<EventQueue>, StartError> {
        match self.events.get(name) {
            None => Err(StartError::Unknown(name.to_string())),
            Some(Err(e)) => Err(StartError::Invalid(name.to_string(), e.clone())),
            Some(Ok(_)) if self.tasks.is_closing() => Err(StartError::ShuttingDown(name.to_string())),
            Some(Ok(q)) => Ok(Arc::clone(q)),
        }
    }

    /// Starts every policy's event worker; each stops when shutdown begins, dropping the events still queued
    /// (the scheduled walk is the safety net).
    pub fn spawn_event_workers(&self) {
        for q in self.events.values().flatten() {
            self.tasks.spawn("replication events", Arc::clone(q).work(self.tasks.closing()));
        }
    }

    /// Starts a run of policy `name` in the background, continuing what the job's last run left (`next_mode`).
    /// Refused once shutdown has begun.
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<(), StartError> {
        if self.tasks.is_closing() {
            return Err(StartError::ShuttingDown(name.to_string()));
        }
        let file = self.policies.iter().find(|p| p.name == name).ok_or_else(|| StartError::Unknown(name.to_string()))?;
        let policy = file.policy(&self.local_url).map_err(|e| StartError::Invalid(name.to_string(), e.to_string()))?;
        let mode = match self.meta.job(name).await {
            Ok(Some(j)) => next_mode(&j),
            _ => Mode::Fresh,
        };
        let progress = Arc::new(Progress::default());
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if running.contains_key(name) {
                return Err(StartError::Running(name.to_string()));
            }
            running.insert(name.to_string(), Arc::clone(&progress));
        }
        // Stopped when shutdown begins, not after the drain: no request waits on a run, and a run into `local`
        // could only fail its copies against the closed listener meanwhile.
        let (this, name, cancel) = (Arc::clone(self), name.to_string(), self.tasks.closing());
        self.tasks.spawn("replication run", async move {
            tracing::info!(job = %name, ?mode, "replication started");
            match super::run(policy, Arc::clone(&this.meta), mode, Some(progress), cancel).await {
                Ok(r) => tracing::info!(job = %name, copied = r.copied, skipped = r.skipped, failed = r.failed, status = %r.status, "replication ended"),
                Err(e) => tracing::error!(job = %name, error = %e, "replication could not run"),
            }
            this.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
        });
        Ok(())
    }

    /// Runs every policy that has a schedule, every `schedule_secs`, from now on until shutdown begins.
    pub fn spawn_schedules(self: &Arc<Self>) {
        for p in &self.policies {
            let Some(secs) = p.schedule_secs.filter(|s| *s > 0) else { continue };
            let (this, name) = (Arc::clone(self), p.name.clone());
            let schedule = crate::shutdown::every(Duration::from_secs(secs), self.tasks.closing(), move || {
                let (this, name) = (Arc::clone(&this), name.clone());
                async move {
                    match this.start(&name).await {
                        Ok(()) | Err(StartError::Running(_)) | Err(StartError::ShuttingDown(_)) => {}
                        Err(e) => tracing::error!(error = %e, "scheduled replication"),
                    }
                }
            });
            self.tasks.spawn("replication schedule", schedule);
        }
    }

    /// The status of every configured policy.
    pub async fn status(&self) -> Vec<JobStatus> {
        let mut out = Vec::new();
        for p in &self.policies {
            out.push(self.job_status(p).await);
        }
        out
    }

    /// The status of one policy.
    pub async fn status_of(&self, name: &str) -> Option<JobStatus> {
        let p = self.policies.iter().find(|p| p.name == name)?;
        Some(self.job_status(p).await)
    }

    async fn job_status(&self, p: &FileReplication) -> JobStatus {
        let live = self.running.lock().unwrap_or_else(|e| e.into_inner()).get(&p.name).cloned();
        let saved = self.meta.job(&p.name).await.ok().flatten();
        let progress = match (&live, saved) {
            (Some(live), saved) => {
                let mut r = live.record(&p.name);
                r.mark = saved.as_ref().and_then(|s| s.mark.clone());
                r.status = "running".into();
                r
            }
            (None, Some(saved)) => saved,
            (None, None) => JobRecord { name: p.name.clone(), status: "never run".into(), ..JobRecord::default() },
        };
        let first = self.meta.failures(&p.name, None, FAILURES_SHOWN).await.unwrap_or(Page { items: Vec::new(), more: false });
        JobStatus {
            name: p.name.clone(),
            running: live.is_some(),
            rate: live.as_ref().map(|l| l.rate()),
            schedule_secs: p.schedule_secs,
            progress,
            failure_count: self.meta.count_failures(&p.name).await.unwrap_or(first.items.len() as u64),
            failures: first.items,
            more_failures: first.more,
            events: self.events.get(&p.name).and_then(|q| q.as_ref().ok()).map(|q| q.counts()),
        }
    }

    /// A page of policy `name`'s failures after `last` (repository, tag); `None` if there is no such policy.
    pub async fn failures(&self, name: &str, last: Option<(&str, &str)>, n: u64) -> Option<Result<Page<JobFailure>, MetaError>> {
        self.policies.iter().find(|p| p.name == name)?;
        Some(self.meta.failures(name, last, n).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_run_starts_once_shutdown_has_begun() {
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::meta::open(&format!("sqlite://{}?mode=rwc", dir.path().join("meta.db").display())).await.unwrap();
        let policy = FileReplication { name: "p".into(), from: "http://127.0.0.1:9".into(), to: "local".into(), ..Default::default() };
        let tasks = Tasks::new();
        let scheduler = Scheduler::new(vec![policy], meta, "http://127.0.0.1:9".into(), tasks.clone());
        tasks.close();
        assert_eq!(scheduler.start("p").await, Err(StartError::ShuttingDown("p".into())));
        assert!(scheduler.status_of("p").await.is_some_and(|s| !s.running));
    }

    #[test]
    fn an_interrupted_run_is_resumed() {
        let job = |status: &str| JobRecord { status: status.into(), ..JobRecord::default() };
        assert_eq!(next_mode(&job(INTERRUPTED)), Mode::Resume);
        assert_eq!(next_mode(&job("running")), Mode::Resume);
        assert_eq!(next_mode(&job("finished")), Mode::Fresh);
    }
}
