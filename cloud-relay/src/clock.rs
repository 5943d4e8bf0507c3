//! The relay's wall clock.
//!
//! One function in its own module so that the handlers (`intake`) and the credential files
//! (`auth`) read time the same way without importing each other.

use std::time::SystemTime;

/// The relay's clock, Unix ms (0 if the system clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
