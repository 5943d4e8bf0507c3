//! Per-device rate limiting (token buckets).
//!
//! Each device has a bucket of `burst` tokens that refills at `per_second`. The device is
//! the token's; in lab mode (no tokens) it is each punch's `device_id`, and a request with
//! no valid punch is keyed by the client's address (see `ingest::http`). A request takes one token; an empty bucket means 429 with a
//! `Retry-After` of the seconds until the next token. Buckets that have been full for a
//! while are forgotten, so the table stays as small as the set of active devices.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A set of token buckets keyed by device.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    // A plain mutex: the critical section is a hash lookup and a few float operations.
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Forget buckets when the table grows past this many and they are full again.
const PRUNE_AT: usize = 4096;

impl RateLimiter {
    /// A limiter allowing `per_second` sustained and `burst` at once; `per_second == 0`
    /// disables limiting.
    pub fn new(per_second: u32, burst: u32) -> Self {
        RateLimiter {
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`. `Err(wait)` says how long until one is available.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let mut buckets = match self.buckets.lock() {
            Ok(b) => b,
            // A panic while holding this lock cannot leave a bucket half-updated in a way
            // that matters; keep limiting with what is there.
            Err(poisoned) => poisoned.into_inner(),
        };
        if buckets.len() >= PRUNE_AT {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.updated).as_secs_f64() * rate < burst
            });
        }
        let b = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let elapsed = now.duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_second).min(self.burst);
        b.updated = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let rl = RateLimiter::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(rl.check_at("d", t0).is_ok());
        }
        let wait = rl.check_at("d", t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100));
        assert!(rl.check_at("other", t0).is_ok(), "buckets are per device");
        assert!(rl.check_at("d", t0 + Duration::from_millis(150)).is_ok());
    }

    #[test]
    fn zero_rate_disables() {
        let rl = RateLimiter::new(0, 0);
        for _ in 0..1000 {
            assert!(rl.check("d").is_ok());
        }
    }
}
