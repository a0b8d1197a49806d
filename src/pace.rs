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

/// The longest wait that can be booked: rates so small (1e-300, 0) that one unit would cost more than this are
/// taken as this slow, rather than overflowing `Duration` or `Instant` arithmetic (which panics).
const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

impl Pacer {
    /// A pacer for `rate` units per second. A rate that is not a positive number lets one unit go per
    /// `MAX_WAIT`, i.e. practically nothing.
    pub fn per_second(rate: f64) -> Pacer {
        // An infinite rate makes units free; NaN, zero and negative rates fail `rate > 0`.
        let per_unit = if rate > 0.0 { 1.0 / rate } else { f64::INFINITY };
        Pacer { per_unit, next: Mutex::new(Instant::now()) }
    }

    /// What `units` cost, capped at `MAX_WAIT` (an infinite or huge product included); nothing (or NaN) is free.
    fn cost(&self, units: f64) -> Duration {
        if units.is_nan() || units <= 0.0 {
            return Duration::ZERO;
        }
        let secs = units * self.per_unit;
        Duration::try_from_secs_f64(secs).map_or(MAX_WAIT, |d| d.min(MAX_WAIT))
    }

    /// Waits until `units` may go, and books them.
    pub async fn spend(&self, units: f64) {
        let cost = self.cost(units);
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(Instant::now());
            // At most MAX_WAIT beyond now, so the booking never overflows however many units are spent.
            *next = (at + cost).min(Instant::now() + MAX_WAIT);
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

    #[tokio::test(start_paused = true)]
    async fn tiny_zero_and_nonsense_rates_do_not_overflow() {
        for rate in [1e-300, 0.0, -5.0, f64::NAN, f64::NEG_INFINITY, f64::MIN_POSITIVE, 5e-324] {
            let p = Pacer::per_second(rate);
            assert_eq!(p.cost(1.0), MAX_WAIT, "rate {rate}");
            assert_eq!(p.cost(f64::MAX), MAX_WAIT, "rate {rate}");
            // Booking again and again stays within MAX_WAIT of now instead of running past Instant's range.
            let start = Instant::now();
            p.spend(1.0).await;
            p.spend(1e300).await;
            assert_eq!(start.elapsed(), MAX_WAIT, "rate {rate}");
        }
        // An infinite rate costs nothing, and so do no units (or NaN of them), whatever the rate.
        assert_eq!(Pacer::per_second(f64::INFINITY).cost(1e300), Duration::ZERO);
        assert_eq!(Pacer::per_second(0.0).cost(0.0), Duration::ZERO);
        assert_eq!(Pacer::per_second(1.0).cost(f64::NAN), Duration::ZERO);
    }
}
