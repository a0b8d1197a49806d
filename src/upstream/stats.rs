//! What one upstream has done since the process started, kept once: `/api/status` (and the status page) read
//! these counters, and each one that Prometheus also exports is emitted from here, so the two never disagree.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// The counters of one upstream.
#[derive(Debug)]
pub struct Stats {
    /// The upstream's name: the `upstream` label of the metrics emitted from here.
    name: String,
    /// Requests sent (answered or not; token requests included).
    requests: AtomicU64,
    /// Blob body bytes received from the upstream.
    fetched: AtomicU64,
    /// Blob bytes sent to clients from this upstream's namespace (from storage or a flight): against
    /// `fetched`, what caching and coalescing saved.
    served: AtomicU64,
    /// Cache answers without an upstream request of their own (`hit`), joined to one in progress
    /// (`coalesced`), and those that asked upstream (`miss`): the hit ratio.
    hits: AtomicU64,
    coalesced: AtomicU64,
    misses: AtomicU64,
    /// Cached answers served because the upstream failed.
    stale: AtomicU64,
    /// The last answer of the upstream (any status it chose to send), as Unix milliseconds.
    last_success: Mutex<Option<u64>>,
    /// The last failure to get an answer (no connection, timeout, 5xx, 429, refused credentials), and why.
    last_error: Mutex<Option<(u64, String)>>,
}

/// A snapshot of [`Stats`] as `/api/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatsView {
    pub requests: u64,
    pub bytes_fetched: u64,
    pub bytes_served: u64,
    pub hits: u64,
    pub coalesced: u64,
    pub misses: u64,
    /// `(hits + coalesced) / (hits + coalesced + misses)`; `None` before the first cache answer.
    pub hit_ratio: Option<f64>,
    pub stale_serves: u64,
    pub last_success_ms: Option<u64>,
    pub last_error: Option<LastError>,
}

/// The last failure of an upstream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastError {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub message: String,
}

/// How a cache lookup was answered, for the hit ratio.
#[derive(Debug, Clone, Copy)]
pub enum Lookup {
    Hit,
    Coalesced,
    Miss,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Stats {
    pub fn new(name: &str) -> Stats {
        Stats {
            name: name.to_string(),
            requests: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            served: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            last_success: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    /// A request sent, with the status it got (or `timeout`, `error`): `breakwater_upstream_requests_total`.
    pub fn request(&self, method: &str, status: &str) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("breakwater_upstream_requests_total",
            "upstream" => self.name.clone(), "method" => method.to_string(), "status" => status.to_string())
        .increment(1);
    }

    /// Blob bytes received: `breakwater_upstream_bytes_total`.
    pub fn fetched(&self, n: u64) {
        self.fetched.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("breakwater_upstream_bytes_total", "upstream" => self.name.clone()).increment(n);
    }

    /// Blob bytes sent to a client.
    pub fn served(&self, n: u64) {
        self.served.fetch_add(n, Ordering::Relaxed);
    }

    pub fn lookup(&self, how: Lookup) {
        let counter = match how {
            Lookup::Hit => &self.hits,
            Lookup::Coalesced => &self.coalesced,
            Lookup::Miss => &self.misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A cached answer served because the upstream failed: `breakwater_cache_stale_serves_total`.
    pub fn stale_serve(&self) {
        self.stale.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("breakwater_cache_stale_serves_total", "upstream" => self.name.clone()).increment(1);
    }

    /// The upstream answered.
    pub fn succeeded(&self) {
        *self.last_success.lock().unwrap_or_else(|p| p.into_inner()) = Some(now_ms());
    }

    /// The upstream could not be asked, or answered that it cannot answer.
    pub fn failed(&self, message: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some((now_ms(), message));
    }

    pub fn view(&self) -> StatsView {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (hits, coalesced, misses) = (get(&self.hits), get(&self.coalesced), get(&self.misses));
        let answered = hits + coalesced + misses;
        let last_error = self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        StatsView {
            requests: get(&self.requests),
            bytes_fetched: get(&self.fetched),
            bytes_served: get(&self.served),
            hits,
            coalesced,
            misses,
            hit_ratio: (answered > 0).then(|| (hits + coalesced) as f64 / answered as f64),
            stale_serves: get(&self.stale),
            last_success_ms: *self.last_success.lock().unwrap_or_else(|p| p.into_inner()),
            last_error: last_error.map(|(at_ms, message)| LastError { at_ms, message }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_ratio_counts_coalesced_as_saved() {
        let s = Stats::new("u");
        assert_eq!(s.view().hit_ratio, None);
        s.lookup(Lookup::Miss);
        s.lookup(Lookup::Coalesced);
        s.lookup(Lookup::Coalesced);
        s.lookup(Lookup::Hit);
        assert_eq!(s.view().hit_ratio, Some(0.75));
        s.failed("down".into());
        assert_eq!(s.view().last_error.map(|e| e.message), Some("down".to_string()));
    }
}
