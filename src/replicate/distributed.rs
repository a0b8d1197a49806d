//! Distributed replication (issue 13 item 4): a job's work as units in a queue in the metadata store, worked by
//! any number of processes (`replicate --distributed`, `worker`) at once.
//!
//! ```text
//! replicate --distributed ──enqueue (once per job: the job's row is locked)──> replication_units
//!                                                                               unit 0..4×walkers: (start, end]
//! every worker: claim (SKIP LOCKED) + lease replicate:<job>:<n>, epoch+1 ──> run_unit over (position, end]
//!               saves (position, pending) under its epoch ──> done │ failed attempt (backoff; 4th: failed for good)
//! ```
//! A unit is one key range of the catalog, cut as a partitioned walk cuts it (`ranges.rs`, before anything is
//! listed); its walk is the ordinary pipeline restricted to the range (`run_unit`), whose checkpoint is saved in
//! the unit. A claim takes the unit's lease (renewed by `cluster::flights::Renewal`, the flights' lease
//! mechanism) and bumps its epoch.
//!
//! Architecture invariant: a unit's checkpoint is only written under the epoch of its current claim. A worker
//! whose lease lapsed (it stalled or was cut off) and whose unit another worker claimed has every save refused
//! and stops; a worker that dies leaves its lease to lapse, and the next claim continues from the unit's last
//! checkpoint: its outstanding repositories are copied asking the destination first, so nothing is uploaded or
//! pushed twice.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{run_unit, unit_ranges, Policy, ReplicateError, UnitOutcome, CATALOG, INTERRUPTED};
use crate::cluster::flights::Renewal;
use crate::meta::{JobFailure, JobRecord, Meta, Unit, UnitEnd};

/// What the names of the units' leases start with: `replicate:<job>:<unit>`.
pub const LEASE_PREFIX: &str = "replicate:";

/// Attempts a unit is given; after the last one fails, the job records a `<catalog>` failure for it.
pub const MAX_ATTEMPTS: u64 = 4;

/// Units per catalog walker the job's policy asks for: enough that a unit left by a dead worker, or a slow one,
/// is a small part of the job.
pub const UNITS_PER_WALKER: usize = 4;

/// How a process takes part in a distributed job.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Names this worker in the units it claims and the leases it holds (unique per process).
    pub id: String,
    /// How long a claim lasts unrenewed: how long a dead worker's unit waits to be taken over.
    pub lease: Duration,
    /// Fill the queue if the job has none (`replicate --distributed`); a `worker` only works it.
    pub enqueue: bool,
    /// The wait before a failed unit's second attempt; doubled at each further one.
    pub backoff: Duration,
}

impl Worker {
    /// A worker named after this process (pid and a random part: pids repeat across machines).
    pub fn new(lease: Duration, enqueue: bool) -> Worker {
        let id = format!("worker-{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
        Worker { id, lease, enqueue, backoff: Duration::from_millis(500) }
    }
}

/// How often a worker with nothing to claim looks at the queue again.
const POLL: Duration = Duration::from_millis(250);

/// A `serve` cluster member's share (issue 13 item 4): until `cancel`, works every job of `policies` that has
/// units left (enqueued by a `replicate --distributed` of the job's name), one job at a time, through `work`
/// (its claims, leases and give-back at `cancel`). A job without units, or whose units are all settled, is
/// looked at again every `POLL`: a member never enqueues, so it starts nothing the operator did not.
pub async fn work_policies(policies: Vec<Policy>, meta: Arc<dyn Meta>, me: Worker, cancel: CancellationToken) {
    let me = Worker { enqueue: false, ..me };
    while !cancel.is_cancelled() {
        for policy in &policies {
            if cancel.is_cancelled() {
                return;
            }
            let job = policy.job.clone();
            match meta.units(&job).await {
                Ok(units) if units.iter().any(|u| u.state != "done" && u.state != "failed") => {}
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(%job, error = %e, "reading the job's queue failed");
                    continue;
                }
            }
            tracing::info!(%job, worker = %me.id, "working the job's queue");
            match work(policy.clone(), Arc::clone(&meta), me.clone(), cancel.clone()).await {
                Ok(r) => tracing::info!(%job, status = %r.status, copied = r.copied, "stopped working the job's queue"),
                Err(e) => tracing::warn!(%job, error = %e, "working the job's queue failed"),
            }
        }
        tokio::select! {
            () = cancel.cancelled() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Works job `policy.job`'s queue until every unit is done or failed for good (then returns the job's record,
/// `finished` or `failed`), or until `cancel` (then it gives its unit back and returns `interrupted`).
pub async fn work(policy: Policy, meta: Arc<dyn Meta>, me: Worker, cancel: CancellationToken) -> Result<JobRecord, ReplicateError> {
    let job = policy.job.clone();
    if me.enqueue {
        let ranges = unit_ranges(&policy, policy.walkers.max(1) * UNITS_PER_WALKER);
        if meta.enqueue_units(&job, &ranges).await? {
            tracing::info!(%job, units = ranges.len(), "enqueued the job's units");
        }
    }
    let mut waiting_logged = false;
    loop {
        if cancel.is_cancelled() {
            return interrupted(&*meta, &job).await;
        }
        let ttl = me.lease.as_millis() as i64;
        if let Some(unit) = meta.claim_unit(&job, &me.id, LEASE_PREFIX, ttl).await? {
            work_unit(&policy, &meta, &me, unit, &cancel).await?;
            continue;
        }
        let units = meta.units(&job).await?;
        if !units.is_empty() && units.iter().all(|u| u.state == "done" || u.state == "failed") {
            return settle_job(&*meta, &job, &units).await;
        }
        if units.is_empty() && !waiting_logged {
            tracing::info!(%job, "the job has no units yet: waiting for a `replicate --distributed` to enqueue them");
            waiting_logged = true;
        }
        tokio::select! {
            () = cancel.cancelled() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// One claimed unit: walked under its lease, then settled under its epoch.
async fn work_unit(policy: &Policy, meta: &Arc<dyn Meta>, me: &Worker, unit: Unit, cancel: &CancellationToken) -> Result<(), ReplicateError> {
    let (job, n, epoch, attempts) = (unit.job.clone(), unit.unit, unit.epoch, unit.attempts);
    let at = unit.position.clone().unwrap_or_default();
    tracing::info!(%job, unit = n, epoch, from = ?unit.position, to = ?unit.end, "claimed a unit");
    let renewal = Renewal::start(Arc::clone(meta), format!("{LEASE_PREFIX}{job}:{n}"), me.id.clone(), me.lease);
    // Its own token: a lost claim stops this unit, not the worker.
    let outcome = run_unit(policy.clone(), Arc::clone(meta), unit, cancel.child_token()).await;
    let end = match &outcome {
        Ok(UnitOutcome::Done) => Some(UnitEnd::Done),
        Ok(UnitOutcome::Interrupted) => Some(UnitEnd::Released),
        Ok(UnitOutcome::Lost) => None,
        Ok(UnitOutcome::Failed { reason, .. }) => Some(failed(me, reason, attempts)),
        Err(e) => {
            tracing::warn!(%job, unit = n, error = %e, "the unit's attempt could not start");
            None
        }
    };
    let settled = match end {
        Some(end) => meta.settle_unit(&job, n, epoch, end).await?,
        None => false,
    };
    if let (true, Ok(UnitOutcome::Failed { at: where_, reason })) = (settled, &outcome) {
        tracing::warn!(%job, unit = n, attempt = attempts + 1, %reason, "the unit's attempt failed");
        if attempts + 1 >= MAX_ATTEMPTS {
            let failure = JobFailure {
                repo: CATALOG.to_string(),
                tag: if where_.is_empty() { at } else { where_.clone() },
                reason: format!("unit {n} gave up after {MAX_ATTEMPTS} attempts: {reason}"),
            };
            meta.record_failure(&job, &failure).await?;
        }
    }
    // Waited for: a worker that stops leaves no lease behind for the others to wait out.
    renewal.end().await;
    outcome.map(|_| ())
}

/// A failed attempt: retried after a backoff that doubles with each attempt, or failed for good after the last.
fn failed<'a>(me: &Worker, reason: &'a str, attempts: u64) -> UnitEnd<'a> {
    let backoff = me.backoff.saturating_mul(1 << attempts.min(16) as u32);
    UnitEnd::Failed { reason, not_before: crate::clock::now_ms().saturating_add(backoff.as_millis() as i64), max_attempts: MAX_ATTEMPTS }
}

/// Every unit is settled: the job's record gets its totals and its status (`failed` if anything is recorded as
/// failed). Whichever worker sees it first writes it; any other writes the same.
async fn settle_job(meta: &dyn Meta, job: &str, units: &[Unit]) -> Result<JobRecord, ReplicateError> {
    let failed = meta.count_failures(job).await?;
    let record = JobRecord {
        name: job.to_string(),
        status: if failed > 0 { "failed" } else { "finished" }.to_string(),
        copied: units.iter().map(|u| u.copied).sum(),
        skipped: units.iter().map(|u| u.skipped).sum(),
        bytes: units.iter().map(|u| u.bytes).sum(),
        failed,
        ..JobRecord::default()
    };
    meta.save_job(&record).await?;
    Ok(record)
}

/// What a stopped worker reports: the job as it stands, `interrupted` (the job's own status is left alone:
/// other workers may be at it).
async fn interrupted(meta: &dyn Meta, job: &str) -> Result<JobRecord, ReplicateError> {
    let units = meta.units(job).await?;
    Ok(JobRecord {
        name: job.to_string(),
        status: INTERRUPTED.to_string(),
        copied: units.iter().map(|u| u.copied).sum(),
        skipped: units.iter().map(|u| u.skipped).sum(),
        bytes: units.iter().map(|u| u.bytes).sum(),
        failed: meta.count_failures(job).await?,
        ..JobRecord::default()
    })
}
