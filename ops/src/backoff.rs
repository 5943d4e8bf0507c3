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
        let factor = 1u32.checked_shl(self.failures.min(30)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
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
}
