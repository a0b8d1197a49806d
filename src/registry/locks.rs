//! Per-digest locks between the one path that removes bytes (cache eviction) and every path that makes a
//! digest's bytes referenced (blob push, upload commit, mount, manifest push, caching a manifest, linking a cache
//! fill).
//!
//! Referencing paths share a digest's lock: any number may run at once, and they wait only while an eviction of
//! that very digest is between its check for references and the removal of its bytes. Eviction takes the lock
//! exclusively, and only if it is free at once (`try_remove`): a digest something is being pushed under is
//! skipped, never waited for, so eviction never stalls a push and a push never stalls a whole eviction pass.
//!
//! The locks live in this process, which is enough while every instance has its own content store (instances on
//! one PostgreSQL with their own disks share no bytes). Instances sharing one content store (object storage)
//! need the same exclusion across processes: a lease row per digest in the metadata store (or a PostgreSQL
//! advisory lock keyed by the digest) taken in the same places.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use crate::oci::Digest;

/// The locks of the digests someone holds or waits for; entries go when the last holder does, so the table is
/// as large as the number of digests in use at this moment.
type Table = Arc<Mutex<HashMap<Digest, Arc<RwLock<()>>>>>;

#[derive(Default)]
pub struct DigestLocks {
    table: Table,
}

/// Held while a path makes the bytes of some digests referenced: eviction cannot remove them meanwhile.
pub struct Referencing {
    _held: Vec<Entry<OwnedRwLockReadGuard<()>>>,
}

/// Held by eviction while it checks that nothing refers to `digest` and removes its bytes.
pub struct Removal {
    pub(crate) digest: Digest,
    _held: Entry<OwnedRwLockWriteGuard<()>>,
}

/// One digest's lock as one holder (or waiter) has it; dropping it releases the lock and, if nobody else holds or
/// waits for it, forgets the digest.
struct Entry<G> {
    table: Table,
    digest: Digest,
    lock: Arc<RwLock<()>>,
    /// `None` while waiting for the lock (a cancelled wait still cleans up).
    guard: Option<G>,
}

impl<G> Drop for Entry<G> {
    fn drop(&mut self) {
        self.guard.take();
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        // Every clone of the lock is made under the table's mutex: two left (the table's and ours) means nobody
        // else holds it or waits for it, and nobody can start to while we hold the mutex.
        if table.get(&self.digest).is_some_and(|l| Arc::ptr_eq(l, &self.lock)) && Arc::strong_count(&self.lock) == 2 {
            table.remove(&self.digest);
        }
    }
}

impl DigestLocks {
    fn entry<G>(&self, digest: &Digest) -> Entry<G> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let lock = Arc::clone(table.entry(digest.clone()).or_default());
        Entry { table: Arc::clone(&self.table), digest: digest.clone(), lock, guard: None }
    }

    /// Shares the locks of `digests` (duplicates are fine), waiting for any eviction of one of them to finish.
    pub async fn referencing<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) -> Referencing {
        // No lock order is needed: eviction never waits for a lock, so holders of shared locks never deadlock.
        let digests: std::collections::HashSet<&Digest> = digests.into_iter().collect();
        let mut held = Vec::with_capacity(digests.len());
        for d in digests {
            let mut entry = self.entry(d);
            entry.guard = Some(Arc::clone(&entry.lock).read_owned().await);
            held.push(entry);
        }
        Referencing { _held: held }
    }

    /// The exclusive lock of `digest`, if nobody is referencing it right now.
    pub fn try_remove(&self, digest: &Digest) -> Option<Removal> {
        let mut entry = self.entry(digest);
        entry.guard = Some(Arc::clone(&entry.lock).try_write_owned().ok()?);
        Some(Removal { digest: digest.clone(), _held: entry })
    }

    /// Digests with a lock held or waited for (to check that the table does not grow).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;
    use std::time::Duration;

    fn d(s: &str) -> Digest {
        Digest::of(Algorithm::Sha256, s.as_bytes())
    }

    #[tokio::test]
    async fn references_exclude_removal_and_removal_makes_references_wait() {
        let locks = Arc::new(DigestLocks::default());
        let (a, b) = (d("a"), d("b"));
        let refs = locks.referencing([&a, &a, &b]).await;
        let more = locks.referencing([&a]).await;
        assert!(locks.try_remove(&a).is_none(), "a referenced digest cannot be removed");
        drop(refs);
        assert!(locks.try_remove(&b).is_some(), "b is free again");
        assert!(locks.try_remove(&a).is_none(), "a is still referenced once");
        drop(more);
        let removal = locks.try_remove(&a).expect("nobody references a");
        // A push of `a` now waits for the removal to be over.
        let waiter = tokio::spawn({
            let locks = Arc::clone(&locks);
            async move {
                let _r = locks.referencing([&d("a")]).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "the reference waits for the removal");
        drop(removal);
        tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("released").unwrap();
        assert_eq!(locks.len(), 0, "digests nobody holds are forgotten");
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_nothing_behind() {
        let locks = DigestLocks::default();
        let a = d("a");
        let removal = locks.try_remove(&a).unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(10), locks.referencing([&a])).await.is_err());
        drop(removal);
        assert_eq!(locks.len(), 0);
    }
}
