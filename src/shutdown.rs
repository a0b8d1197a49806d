//! Stopping the background work of a process: flights, replication runs and schedules, eviction, upload purge
//! and the reconciliation sweep.
//!
//! Shutdown has two steps, and every task is told which one it listens to:
//! 1. `close` (at the signal): no new work may start. Schedules and periodic tasks stop; a request that would
//!    start a replication run is refused (`StartError::ShuttingDown`). Replication runs stop too: no request
//!    waits on one, and a run into this server (`local`) could only fail its copies against the closed
//!    listener. Flights go on, because the HTTP server is still draining requests that may be streaming them.
//! 2. `shutdown(grace)` (once the drain is over): the rest of the work in progress (flights) is cancelled, and
//!    every task is joined. Each stops at its next await point in the way that keeps its invariants (a
//!    replication run saves its checkpoint as `interrupted`, a flight removes its spool). Tasks still running
//!    after `grace` are logged and abandoned to the runtime's drop, which is no worse than a crash.
//!
//! Architecture invariant: the shutdown order is stop accepting (and stop starting background work) → drain
//! connections → cancel and join background tasks → exit. A task is never cancelled while a request in
//! progress may still wait on it.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the server hands its background tasks: a way to be spawned, joined and told to stop.
#[derive(Clone, Default)]
pub struct Tasks {
    /// Cancelled at the signal (step 1): no new work starts.
    closing: CancellationToken,
    /// Cancelled after the drain (step 2): work in progress stops. Tasks get child tokens of it.
    cancel: CancellationToken,
    /// Every task spawned here, to be joined at step 2.
    tracker: TaskTracker,
    /// How many tasks of each name are running: what is logged if some outlive the grace period.
    running: Arc<Mutex<BTreeMap<&'static str, usize>>>,
}

/// What `shutdown` came to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Abandoned {
    /// Tasks still running when the grace period ended, by name.
    pub tasks: BTreeMap<&'static str, usize>,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Runs `task` as a tracked background task named `name` (for the log, if it outlives the grace period).
    pub fn spawn<F>(&self, name: &'static str, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let guard = Running::new(Arc::clone(&self.running), name);
        self.tracker.spawn(async move {
            let _guard = guard;
            task.await
        })
    }

    /// A token cancelled once the drain is over (step 2), for work a request in progress may wait on (flights).
    pub fn token(&self) -> CancellationToken {
        self.cancel.child_token()
    }

    /// A token cancelled when shutdown begins (step 1), for work no request waits on: schedules, periodic
    /// tasks, replication runs.
    pub fn closing(&self) -> CancellationToken {
        self.closing.child_token()
    }

    /// Whether shutdown has begun: new work must not start.
    pub fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// Step 1: no new work starts from now on.
    pub fn close(&self) {
        self.closing.cancel();
        self.tracker.close();
    }

    /// Step 2: cancels the work in progress and waits for it, at most `grace`. Returns what was abandoned.
    pub async fn shutdown(&self, grace: Duration) -> Abandoned {
        self.close();
        self.cancel.cancel();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_ok() {
            return Abandoned::default();
        }
        let tasks = self.running.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (name, n) in &tasks {
            tracing::warn!(task = name, count = n, ?grace, "background task did not stop within the grace period; abandoned");
        }
        Abandoned { tasks }
    }
}

/// Counts a task among the running ones until it ends (or panics, or is dropped by the runtime).
struct Running {
    running: Arc<Mutex<BTreeMap<&'static str, usize>>>,
    name: &'static str,
}

impl Running {
    fn new(running: Arc<Mutex<BTreeMap<&'static str, usize>>>, name: &'static str) -> Running {
        *running.lock().unwrap_or_else(|p| p.into_inner()).entry(name).or_default() += 1;
        Running { running, name }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = running.get_mut(self.name) {
            *n -= 1;
            if *n == 0 {
                running.remove(self.name);
            }
        }
    }
}

/// Runs `pass` every `every` (the first at once) until `stop` is cancelled, which is looked at between passes:
/// a pass in progress runs to its end (eviction, for one, must not stop between forgetting a digest and removing
/// its bytes), bounded by the grace period. A pass that may stop anywhere races `stop` itself.
pub async fn every<F, Fut>(every: Duration, stop: CancellationToken, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        pass().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_cancels_and_joins_and_reports_what_outlives_the_grace() {
        let tasks = Tasks::new();
        let token = tasks.token();
        let stopped = tasks.spawn("obedient", async move { token.cancelled().await });
        tasks.spawn("stubborn", std::future::pending::<()>());
        let closing = tasks.closing();
        assert!(!tasks.is_closing());
        tasks.close();
        assert!(tasks.is_closing() && closing.is_cancelled());
        let abandoned = tasks.shutdown(Duration::from_millis(50)).await;
        assert!(stopped.is_finished() || stopped.await.is_ok());
        assert_eq!(abandoned.tasks.into_iter().collect::<Vec<_>>(), [("stubborn", 1)]);
    }

    #[tokio::test]
    async fn periodic_work_finishes_its_pass_and_starts_no_other() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let tasks = Tasks::new();
        let (started, ended) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s, e) = (Arc::clone(&started), Arc::clone(&ended));
        let (release, released) = tokio::sync::watch::channel(false);
        tasks.spawn(
            "periodic",
            every(Duration::from_millis(1), tasks.closing(), move || {
                let (s, e, mut released) = (Arc::clone(&s), Arc::clone(&e), released.clone());
                async move {
                    s.fetch_add(1, SeqCst);
                    let _ = released.wait_for(|r| *r).await;
                    e.fetch_add(1, SeqCst);
                }
            }),
        );
        while started.load(SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        tasks.close();
        let _ = release.send(true);
        assert_eq!(tasks.shutdown(Duration::from_secs(10)).await, Abandoned::default());
        assert_eq!((started.load(SeqCst), ended.load(SeqCst)), (1, 1), "the pass in progress ended; no other began");
    }
}
