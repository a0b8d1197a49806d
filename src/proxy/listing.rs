//! Listings fetched from an upstream (a repository's tags, a subject's referrers): one upstream fetch per key at a
//! time, shared by everyone asking meanwhile, and the result held for the upstream's tag TTL in a `BoundedMap`
//! weighted by the listing's length, so that what is held is bounded in items, not only in listings.

use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bounded::BoundedMap;
use crate::flight::Group;
use crate::upstream::stats::Stats;
use crate::upstream::UpstreamError;

/// What the upstream listed, sorted as the answer is paged.
pub(super) struct Listing<T> {
    pub items: Vec<T>,
    /// When the upstream answered: the listing is trusted for the upstream's tag TTL after that.
    pub fetched: Instant,
}

/// How a listing fetch ended; shared by value with every waiter.
type Fetched<T> = Result<Arc<Listing<T>>, UpstreamError>;

pub(super) struct Listings<K, T> {
    /// The `kind` label of `breakwater_cache_requests_total` (`tags`, `referrers`).
    kind: &'static str,
    /// Listings fetched recently, at most `max_items` items in all.
    held: Arc<BoundedMap<K, Arc<Listing<T>>>>,
    /// The fetch in progress per key.
    flights: Group<K, Fetched<T>>,
}

impl<K, T> Listings<K, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: Send + Sync + 'static,
{
    /// `gauge` is the `breakwater_cache_entries{kind}` label; entries are forgotten `ttl` after their fetch.
    pub fn new(kind: &'static str, gauge: &'static str, max_items: u64, ttl: Duration) -> Listings<K, T> {
        let weigh = |_: &K, l: &Arc<Listing<T>>| u32::try_from(l.items.len()).unwrap_or(u32::MAX);
        Listings { kind, held: Arc::new(BoundedMap::weighted(gauge, max_items, Some(ttl), weigh)), flights: Group::default() }
    }

    /// The listing of `key` if it was fetched less than `ttl` ago.
    pub fn fresh(&self, key: &K, ttl: Duration, stats: &Stats) -> Option<Arc<Listing<T>>> {
        let held = self.held.get(key).filter(|l| l.fetched.elapsed() < ttl);
        if held.is_some() {
            super::count_cache(stats, self.kind, "hit");
        }
        held
    }

    /// Joins the fetch of `key` in progress, or starts `make()`'s. A listing is held before its waiters wake, so
    /// no request can miss both the fetch and what it fetched.
    pub async fn fetch<F, Fut>(&self, key: K, stats: &Stats, make: F) -> Fetched<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<T>, UpstreamError>> + Send + 'static,
    {
        let (held, k) = (Arc::clone(&self.held), key.clone());
        let (outcome, joined) = self.flights.join(key, move || {
            let work = make();
            async move {
                let listing = Arc::new(Listing { items: work.await?, fetched: Instant::now() });
                held.insert(k, Arc::clone(&listing));
                Ok(listing)
            }
        });
        super::count_cache(stats, self.kind, if joined { "coalesced" } else { "miss" });
        outcome.await.unwrap_or_else(|e| Err(e.into()))
    }

    /// Sets its `breakwater_cache_entries{kind}` gauge.
    pub fn report(&self) {
        self.held.report();
    }
}

/// The items of `listed` (sorted by `key`) after `last`, merged with `held` (the same order, already after
/// `last`; `held_more` if it was cut short), without duplicates (the listed one wins), at most `n`; and whether
/// more follow.
pub(super) fn merge_page<T: Clone, O: Ord>(listed: &[T], held: Vec<T>, held_more: bool, last: Option<&O>, n: u64, key: impl Fn(&T) -> &O) -> (Vec<T>, bool) {
    let start = last.map_or(0, |l| listed.partition_point(|t| key(t) <= l));
    let (mut a, mut b) = (listed[start..].iter().peekable(), held.into_iter().peekable());
    let mut out = Vec::new();
    while (out.len() as u64) < n {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => match key(x).cmp(key(y)) {
                std::cmp::Ordering::Less => a.next().cloned(),
                std::cmp::Ordering::Greater => b.next(),
                std::cmp::Ordering::Equal => {
                    b.next();
                    a.next().cloned()
                }
            },
            (Some(_), None) => a.next().cloned(),
            (None, _) => b.next(),
        };
        match next {
            Some(item) => out.push(item),
            None => break,
        }
    }
    let more = a.peek().is_some() || b.peek().is_some() || held_more;
    (out, more)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn page(listed: &[&str], held: &[&str], held_more: bool, last: Option<&str>, n: u64) -> (Vec<String>, bool) {
        let last = last.map(str::to_string);
        merge_page(&s(listed), s(held), held_more, last.as_ref(), n, |t| t)
    }

    #[test]
    fn pages_merge_in_order_without_duplicates() {
        assert_eq!(page(&["a", "c", "e"], &["b", "c", "f"], false, None, 10), (s(&["a", "b", "c", "e", "f"]), false));
        assert_eq!(page(&["a", "c", "e"], &["b"], false, None, 2), (s(&["a", "b"]), true));
        assert_eq!(page(&["a", "c", "e"], &[], false, Some("a"), 1), (s(&["c"]), true));
        assert_eq!(page(&["a", "c", "e"], &[], false, Some("c"), 5), (s(&["e"]), false));
        assert_eq!(page(&["a", "c", "e"], &[], false, Some("e"), 5), (s(&[]), false));
        assert_eq!(page(&["a"], &["b"], true, None, 2), (s(&["a", "b"]), true), "the held page was cut short");
        assert_eq!(page(&["a", "b"], &[], false, None, 0), (s(&[]), true));
        assert_eq!(page(&[], &["x"], false, Some("a"), 5), (s(&["x"]), false));
    }

    #[tokio::test]
    async fn a_fetched_listing_is_held_and_shared() {
        let l: Listings<u8, u8> = Listings::new("test", "test_lists", 100, Duration::from_secs(60));
        let stats = Stats::new("test");
        let got = l.fetch(1, &stats, || async { Ok(vec![1, 2, 3]) }).await.unwrap();
        assert_eq!(got.items, vec![1, 2, 3]);
        assert_eq!(l.fresh(&1, Duration::from_secs(60), &stats).map(|l| l.items.clone()), Some(vec![1, 2, 3]));
        assert!(l.fresh(&1, Duration::ZERO, &stats).is_none(), "older than a TTL of zero");
        assert!(l.fetch(2, &stats, || async { Err(UpstreamError::NotFound) }).await.is_err());
        assert!(l.fresh(&2, Duration::from_secs(60), &stats).is_none(), "a failed fetch holds nothing");
    }
}
