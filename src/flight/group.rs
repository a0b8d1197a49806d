//! A single-flight group for results that are small enough to share by value.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

/// Why a run gave no value. Its waiters all get this, and the key is free for the next caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// The work panicked (a bug): the message, for the log and the error the caller reports.
    #[error("the shared work panicked: {0}")]
    Panicked(Arc<str>),
    /// The work's task was cancelled (the runtime is shutting down).
    #[error("the shared work was cancelled")]
    Cancelled,
}

/// What every caller of one run awaits.
type Outcome<V> = Shared<BoxFuture<'static, Result<V, GroupError>>>;

/// At most one running computation per key; everyone asking for a key while it runs gets the same result.
pub struct Group<K, V: Clone> {
    inflight: Arc<Mutex<HashMap<K, Outcome<V>>>>,
}

impl<K, V> Default for Group<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn default() -> Self {
        Group { inflight: Arc::new(Mutex::new(HashMap::new())) }
    }
}

impl<K, V> Group<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `make()` for `key` unless a run is already in flight, and returns its result, plus whether this call
    /// joined a run someone else started.
    pub async fn run<F, Fut>(&self, key: K, make: F) -> (Result<V, GroupError>, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let (result, joined) = self.join(key, make);
        (result.await, joined)
    }

    /// Like `run`, but says at once whether the call joined a run in flight, before its result is there.
    ///
    /// The work runs as a spawned task that removes its own entry when done, so it completes (and its result is
    /// stored by whatever `make` does) even if every caller goes away. If it panics, its entry goes all the same
    /// and every waiter gets `GroupError::Panicked`: a bug fails one run, not every later run of the key.
    pub fn join<F, Fut>(&self, key: K, make: F) -> (Outcome<V>, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let (shared, joined) = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&key) {
                Some(s) => (s.clone(), true),
                None => {
                    let work = make();
                    let inflight = Arc::clone(&self.inflight);
                    let k = key.clone();
                    let task = tokio::spawn(async move {
                        // Caught rather than left to the task, so that the entry is removed whatever happens.
                        let v = AssertUnwindSafe(work).catch_unwind().await;
                        inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&k);
                        v.map_err(|panic| {
                            let message = super::panic_message(panic.as_ref());
                            tracing::error!(%message, "a shared task panicked; its waiters get an error");
                            GroupError::Panicked(message.into())
                        })
                    });
                    let fut: BoxFuture<'static, Result<V, GroupError>> =
                        Box::pin(async move { task.await.unwrap_or(Err(GroupError::Cancelled)) });
                    let shared = fut.shared();
                    map.insert(key, shared.clone());
                    (shared, false)
                }
            }
        };
        (shared, joined)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let group: Arc<Group<&'static str, u32>> = Arc::new(Group::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let arrived = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let mut handles = Vec::new();
        for _ in 0..20 {
            let (group, runs, mut gate, arrived) = (group.clone(), runs.clone(), gate.clone(), arrived.clone());
            handles.push(tokio::spawn(async move {
                arrived.fetch_add(1, Ordering::SeqCst);
                group
                    .run("k", move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = gate.wait_for(|open| *open).await;
                        7
                    })
                    .await
            }));
        }
        // The test runtime is single-threaded: a caller that counted itself has also entered the group (nothing
        // between the two yields), so once all have arrived, all are waiting on the same run.
        while arrived.load(Ordering::SeqCst) < 20 {
            tokio::task::yield_now().await;
        }
        release.send(true).unwrap();
        let mut joined = 0;
        for h in handles {
            let (v, j) = h.await.unwrap();
            assert_eq!(v, Ok(7));
            joined += j as usize;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(joined, 19);
        // Once finished, the next call runs again.
        let (v, j) = group.run("k", || async { 8 }).await;
        assert_eq!((v, j), (Ok(8), false));
    }

    #[tokio::test]
    async fn work_outlives_a_cancelled_caller() {
        let group: Arc<Group<u8, u8>> = Arc::new(Group::default());
        let (done_tx, mut done) = tokio::sync::watch::channel(false);
        let caller = tokio::spawn({
            let group = group.clone();
            async move {
                group
                    .run(1, move || async move {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        done_tx.send_replace(true);
                        1
                    })
                    .await
            }
        });
        tokio::task::yield_now().await;
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        let finished = tokio::time::timeout(Duration::from_secs(10), done.wait_for(|d| *d)).await;
        assert!(finished.is_ok(), "the work finished although its caller went away");
    }

    #[tokio::test]
    async fn a_panicking_run_fails_its_waiters_and_releases_its_key() {
        let group: Arc<Group<u8, u8>> = Arc::new(Group::default());
        let (first, joined) = group.join(1, || async { panic!("injected fault") });
        assert!(!joined);
        let (second, joined) = group.join(1, || async { 0 });
        assert!(joined, "the second caller waits on the same run");
        for waiter in [first, second] {
            let outcome = tokio::time::timeout(Duration::from_secs(10), tokio::spawn(waiter)).await.expect("no hang");
            let error = outcome.expect("a waiter does not panic").expect_err("a waiter gets an error");
            assert_eq!(error, GroupError::Panicked("injected fault".into()));
        }
        // The key is free again: the next call starts a new run and gets its value.
        let next = tokio::time::timeout(Duration::from_secs(10), tokio::spawn({
            let group = group.clone();
            async move { group.run(1, || async { 5 }).await }
        }))
        .await
        .expect("the next call does not hang")
        .expect("the next call does not panic");
        assert_eq!(next, (Ok(5), false));
    }
}
