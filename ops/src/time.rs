//! The wall clock as the daemons store it: Unix milliseconds in an `i64`.
//!
//! The copies this replaces differed at the edges: one saturated a time past the year
//! 292 million at `i64::MAX`, the others wrapped (`as i64`). Saturating is the behaviour
//! kept; a clock before 1970 (a box with no RTC and no network time yet) reads as 0, as
//! it did in every copy.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch by the system clock; 0 before the epoch.
pub fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// `t` as Unix milliseconds, saturating at `i64::MAX`; 0 for a time before the epoch.
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn edges_saturate_or_read_as_zero() {
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(1234)), 1234);
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
        if let Some(far) = UNIX_EPOCH.checked_add(Duration::from_secs(u64::MAX / 1000)) {
            assert_eq!(unix_ms(far), i64::MAX);
        }
        // 2020-01-01 < now: the system clock of any machine running the tests.
        assert!(now_ms() > 1_577_836_800_000);
    }
}
