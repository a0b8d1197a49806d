//! What the cache as a whole has done, kept once: evictions (also exported as metrics from here) and the most
//! pulled artifacts, for `/api/status` and the status page.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Artifacts whose pulls are counted at most: beyond, the least counted is replaced (the Space-Saving
/// algorithm), so the memory stays this size however many artifacts are pulled, and an artifact pulled more
/// than a 1/`TRACKED` share of all pulls is always among them.
const TRACKED: usize = 1000;

/// The cache's counters.
#[derive(Debug, Default)]
pub struct Activity {
    /// Blobs removed by eviction, and their bytes.
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    /// Pulls by artifact (`repository:reference`), at most `TRACKED` of them.
    pulls: Mutex<HashMap<String, u64>>,
}

/// An artifact and how often it was pulled (an upper bound once more than `TRACKED` artifacts were seen).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pulled {
    pub artifact: String,
    pub pulls: u64,
}

impl Activity {
    /// A blob of `size` bytes was evicted: `breakwater_cache_evictions_total` and `..._evicted_bytes_total`.
    pub fn evicted(&self, size: u64) {
        self.evictions.fetch_add(1, Ordering::Relaxed);
        self.evicted_bytes.fetch_add(size, Ordering::Relaxed);
        metrics::counter!("breakwater_cache_evictions_total").increment(1);
        metrics::counter!("breakwater_cache_evicted_bytes_total").increment(size);
    }

    /// Blobs evicted and their bytes.
    pub fn evictions(&self) -> (u64, u64) {
        (self.evictions.load(Ordering::Relaxed), self.evicted_bytes.load(Ordering::Relaxed))
    }

    /// `artifact` was pulled once more.
    pub fn pulled(&self, artifact: &str) {
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = pulls.get_mut(artifact) {
            *n += 1;
            return;
        }
        let mut start = 0;
        if pulls.len() >= TRACKED {
            // The new artifact takes the place of the least counted and inherits its count (Space-Saving).
            if let Some((least, n)) = pulls.iter().min_by_key(|(_, n)| **n).map(|(k, n)| (k.clone(), *n)) {
                pulls.remove(&least);
                start = n;
            }
        }
        pulls.insert(artifact.to_string(), start + 1);
    }

    /// The `n` most pulled artifacts, most pulled first (ties by name).
    pub fn most_pulled(&self, n: usize) -> Vec<Pulled> {
        let pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<Pulled> = pulls.iter().map(|(a, p)| Pulled { artifact: a.clone(), pulls: *p }).collect();
        all.sort_unstable_by(|a, b| b.pulls.cmp(&a.pulls).then_with(|| a.artifact.cmp(&b.artifact)));
        all.truncate(n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_pulled_is_bounded_and_keeps_the_heavy_hitters() {
        let a = Activity::default();
        for i in 0..5 * TRACKED {
            a.pulled(&format!("once/{i}:x"));
            if i % 10 == 0 {
                a.pulled("hot:latest");
            }
        }
        assert_eq!(a.pulls.lock().unwrap().len(), TRACKED);
        let top = a.most_pulled(3);
        assert_eq!(top[0].artifact, "hot:latest");
        assert!(top[0].pulls >= (5 * TRACKED / 10) as u64);
        assert_eq!(top.len(), 3);
    }
}
