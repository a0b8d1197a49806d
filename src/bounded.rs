//! `BoundedMap`, the one kind of in-memory map whose keys come from input (repository names, tags, digests, token
//! scopes): at most a fixed number of entries, each kept at most a fixed time, so no stream of requests can make
//! memory grow without bound. Forgetting an entry only costs a repeated upstream request, never correctness.
//!
//! Built on `moka`'s concurrent cache (TinyLFU admission, LRU eviction): once full, an entry that is rarely used
//! may not be admitted, which is the right trade for caches of answers.

use std::hash::Hash;
use std::time::Duration;

/// How many entries each bounded map holds at most, by default (a few tens of MB at worst per map).
pub const DEFAULT_ENTRIES: u64 = 100_000;

pub struct BoundedMap<K, V> {
    /// The `kind` label of its `breakwater_cache_entries` gauge.
    kind: &'static str,
    cache: moka::sync::Cache<K, V>,
}

impl<K, V> BoundedMap<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// At most `capacity` entries, each forgotten `ttl` after it was inserted (if given).
    pub fn new(kind: &'static str, capacity: u64, ttl: Option<Duration>) -> BoundedMap<K, V> {
        let mut b = moka::sync::Cache::builder().max_capacity(capacity);
        if let Some(ttl) = ttl {
            // moka refuses a zero time to live; an entry kept for a millisecond is as good as none.
            b = b.time_to_live(ttl.max(Duration::from_millis(1)));
        }
        BoundedMap { kind, cache: b.build() }
    }

    /// At most `max_weight` in all, each entry weighing what `weigher` says (at least 1): for entries whose size
    /// varies with input (a cached listing of up to thousands of names), so that the bound is on what is held,
    /// not on how many entries hold it. An entry heavier than `max_weight` is not kept.
    pub fn weighted(kind: &'static str, max_weight: u64, ttl: Option<Duration>, weigher: fn(&K, &V) -> u32) -> BoundedMap<K, V> {
        let mut b = moka::sync::Cache::builder().max_capacity(max_weight).weigher(move |k, v| weigher(k, v).max(1));
        if let Some(ttl) = ttl {
            b = b.time_to_live(ttl.max(Duration::from_millis(1)));
        }
        BoundedMap { kind, cache: b.build() }
    }

    /// The value under `key`, looked up by anything the key borrows as (a `&str` for a `String` key: no copy
    /// of the key per lookup).
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.cache.get(key)
    }

    pub fn insert(&self, key: K, value: V) {
        self.cache.insert(key, value);
    }

    pub fn remove<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.cache.invalidate(key);
    }

    /// Removes the entry under `key` only if `stale` says it is the one to go, deciding and removing in one step:
    /// two callers that both found one stale entry cannot remove the fresh entry a third put there meanwhile.
    pub fn remove_if(&self, key: &K, stale: impl FnOnce(&V) -> bool)
    where
        K: Clone,
    {
        use moka::ops::compute::Op;
        self.cache.entry_by_ref(key).and_compute_with(|entry| match entry {
            Some(e) if stale(e.value()) => Op::Remove,
            _ => Op::Nop,
        });
    }

    /// Forgets every entry (what they were computed from changed).
    pub fn clear(&self) {
        self.cache.invalidate_all();
    }

    /// Entries held now (after pending evictions are applied).
    pub fn len(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets its `breakwater_cache_entries{kind}` gauge to the entries it holds.
    pub fn report(&self) {
        report(self.kind, self.len());
    }
}

/// Sets the `breakwater_cache_entries{kind}` gauge (for maps of one kind that are several, e.g. one token cache
/// per upstream, whose caller sums them).
pub fn report(kind: &'static str, entries: u64) {
    metrics::gauge!("breakwater_cache_entries", "kind" => kind).set(entries as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_if_removes_only_the_entry_it_is_told_is_stale() {
        let m: BoundedMap<String, String> = BoundedMap::new("test", 10, None);
        m.insert("k".into(), "fresh".into());
        m.remove_if(&"k".to_string(), |v| v == "stale");
        assert_eq!(m.get("k").as_deref(), Some("fresh"), "a fresh entry stays");
        m.remove_if(&"k".to_string(), |v| v == "fresh");
        assert_eq!(m.get("k"), None);
        m.remove_if(&"absent".to_string(), |_| true);
    }

    #[test]
    fn holds_at_most_its_capacity() {
        let m: BoundedMap<u64, u64> = BoundedMap::new("test", 100, None);
        for i in 0..10_000 {
            m.insert(i, i);
            // Reading what was just written must work while the map is below capacity.
            if i < 50 {
                assert_eq!(m.get(&i), Some(i));
            }
        }
        let held = m.len();
        assert!(held <= 100 && held > 0, "{held} entries held");
    }

    #[test]
    fn weighted_maps_bound_the_total_weight() {
        let m: BoundedMap<u64, Vec<u8>> = BoundedMap::weighted("test", 1000, None, |_, v| v.len() as u32);
        for i in 0..100 {
            m.insert(i, vec![0; 100]);
        }
        m.cache.run_pending_tasks();
        assert!(m.cache.weighted_size() <= 1000, "{} held", m.cache.weighted_size());
        assert!(m.len() <= 10);
    }

    #[test]
    fn entries_expire() {
        let m: BoundedMap<&str, u64> = BoundedMap::new("test", 100, Some(Duration::from_millis(20)));
        m.insert("a", 1);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(m.get(&"a"), None);
        assert_eq!(m.len(), 0);
    }
}
