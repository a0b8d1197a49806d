//! Rate limits: spacing events (requests, bytes) so that at most `rate` of them happen per second, across
//! every task that shares the pacer.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

pub struct Pacer {
    /// Seconds one unit costs.
    per_unit: f64,
    /// When the next unit may go.
    next: Mutex<Instant>,
}

impl Pacer {
    /// A pacer for `rate` units per second (`rate` > 0).
    pub fn per_second(rate: f64) -> Pacer {
        Pacer { per_unit: 1.0 / rate, next: Mutex::new(Instant::now()) }
    }

    /// Waits until `units` may go, and books them.
    pub async fn spend(&self, units: f64) {
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(Instant::now());
            *next = at + Duration::from_secs_f64(units * self.per_unit);
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spaces_units_at_the_rate() {
        let p = Pacer::per_second(10.0);
        let start = Instant::now();
        for _ in 0..5 {
            p.spend(1.0).await;
        }
        // The first goes at once, the next four 100 ms apart (virtual time: the test does not wait).
        assert_eq!(start.elapsed(), Duration::from_millis(400));
        p.spend(20.0).await;
        p.spend(1.0).await;
        assert_eq!(start.elapsed(), Duration::from_millis(2500));
    }
}
