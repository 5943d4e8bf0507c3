//! Exponential backoff with jitter and a cap, between connection attempts (the gateway's
//! uplink to the relay, its MQTT client to the broker).
//!
//! The n-th consecutive failure waits a random time in `[d/2, d]` with
//! `d = min(min · 2ⁿ, max)`. The jitter keeps a fleet of gateways that lost the same relay
//! or broker from reconnecting in lockstep; the floor of `d/2` keeps the growth.
//!
//! The MQTT client's copy counted in whole milliseconds, stopped doubling after 2²⁰ and
//! never waited less than 1 ms; this one (the uplink's) works in [`Duration`]s, stops
//! doubling at 2³⁰ and raises a `max` below `min` to `min`. Both configs refuse a zero
//! minimum (`uplink.backoff_min`, `mqtt.reconnect_min_ms`), so the 1 ms floor never
//! applied, and with either cap reached long before 2²⁰ the delays are the same.

use std::time::Duration;

/// Backoff state: how many failures in a row.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Starts with no failures.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The wait after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let lo = d / 2;
        let spread = (d - lo).as_millis() as u64;
        lo + Duration::from_millis(if spread == 0 {
            0
        } else {
            rand::random_range(0..=spread)
        })
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        Backoff::ceiling_after(self.min, self.max, self.failures)
    }

    /// The upper bound of the delay after `failures` earlier failures in a row,
    /// `min(min · 2^failures, max)`, without keeping state: for a caller that counts the
    /// failures itself (an output worker asks its sink for retry number n).
    pub fn ceiling_after(min: Duration, max: Duration, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.min(30)).unwrap_or(u32::MAX);
        min.saturating_mul(factor).min(max.max(min))
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_max_below_min_is_raised_to_min() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_millis(100));
        assert_eq!(b.ceiling(), Duration::from_millis(500));
        b.next_delay();
        assert_eq!(b.ceiling(), Duration::from_millis(500));
        assert_eq!(b.failures(), 1);
    }

    #[test]
    fn grows_jitters_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut prev_ceiling = Duration::ZERO;
        for _ in 0..40 {
            let ceiling = b.ceiling();
            assert!(ceiling >= prev_ceiling);
            let d = b.next_delay();
            assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
            prev_ceiling = ceiling;
        }
        assert_eq!(b.ceiling(), Duration::from_secs(2));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        assert_eq!(b.failures(), 0);
    }

    #[test]
    fn ceiling_after_doubles_from_min_to_max() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        let got: Vec<u64> = (0..9)
            .map(|n| Backoff::ceiling_after(min, max, n).as_millis() as u64)
            .collect();
        assert_eq!(
            got,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(Backoff::ceiling_after(min, max, u32::MAX), max);
        assert_eq!(Backoff::ceiling_after(min, Duration::ZERO, 3), min);
    }
}
