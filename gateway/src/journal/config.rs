//! The `[journal]` section of the gateway config.

use std::time::Duration;

use outpost_ops::duration::deserialize_duration;
/// Parses `"500ms"`, `"45s"`, `"30m"`, `"12h"`, `"7d"` or a bare number of seconds (the
/// same rules as every other duration key, e.g. `uplink.batch_max_age`).
pub use outpost_ops::duration::parse_duration;
use serde::Deserialize;

/// What to do with new punches when the journal reaches `journal.max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Refuse new punches with `storage_full` (HTTP 507); devices keep them and retry.
    #[default]
    Reject,
    /// Evict the oldest records not yet acknowledged by the relay to make room; each
    /// eviction is counted (`outpost_gateway_journal_evicted`) and logged.
    DropOldest,
}

impl OnFull {
    /// The config spelling (`reject`, `drop_oldest`).
    pub fn as_str(self) -> &'static str {
        match self {
            OnFull::Reject => "reject",
            OnFull::DropOldest => "drop_oldest",
        }
    }
}

/// How long the journal remembers the (device_id, device_seq) of records after the relay
/// acknowledged them, so a late resend is still answered `duplicate`. Keys of records still
/// in the journal are always remembered; these limits apply only to trimmed ones.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupWindow {
    /// `journal.dedup_window.max_age`: forget a trimmed key this long after its trim.
    /// Integer seconds, or a string with a unit: `"7d"`, `"12h"`, `"30m"`, `"45s"`, `"500ms"`.
    /// Default 7 days.
    #[serde(deserialize_with = "deserialize_duration")]
    pub max_age: Duration,
    /// `journal.dedup_window.max_keys`: remember at most this many trimmed keys (oldest
    /// forgotten first). Default 1,000,000.
    pub max_keys: u64,
}

impl Default for DedupWindow {
    fn default() -> Self {
        DedupWindow {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_keys: 1_000_000,
        }
    }
}

/// `[journal]`: the durable store's limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JournalConfig {
    /// `journal.max_bytes`: quota on the logical size of the records held, i.e. the unsent
    /// backlog (the dedup window is bounded by `dedup_window.max_keys` instead; sled's files
    /// are larger than the logical size, see the module docs). Plain integer bytes.
    /// Default 1 GiB (1073741824).
    pub max_bytes: u64,
    /// `journal.on_full`: `"reject"` (default) or `"drop_oldest"`.
    pub on_full: OnFull,
    /// `journal.cache_capacity_bytes`: sled's page cache. Default 4 MiB (4194304); sled's
    /// own default of 1 GiB would not fit a Raspberry Pi.
    pub cache_capacity_bytes: u64,
    /// `[journal.dedup_window]`.
    pub dedup_window: DedupWindow,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            max_bytes: 1 << 30,
            on_full: OnFull::Reject,
            cache_capacity_bytes: 4 << 20,
            dedup_window: DedupWindow::default(),
        }
    }
}

/// Smallest accepted `journal.max_bytes`.
pub const MIN_MAX_BYTES: u64 = 64 * 1024;
/// Smallest accepted `journal.cache_capacity_bytes`.
pub const MIN_CACHE_BYTES: u64 = 256 * 1024;

impl JournalConfig {
    /// Checks the values. The error is `(key, message)`, with the key relative to
    /// `[journal]` (`max_bytes`, `dedup_window.max_age`, …) and a message saying what to
    /// change.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_bytes < MIN_MAX_BYTES {
            return Err((
                "max_bytes",
                format!(
                    "{} is too small: set it to at least {MIN_MAX_BYTES} bytes",
                    self.max_bytes
                ),
            ));
        }
        if self.cache_capacity_bytes < MIN_CACHE_BYTES {
            return Err((
                "cache_capacity_bytes",
                format!(
                    "{} is too small: set it to at least {MIN_CACHE_BYTES} bytes",
                    self.cache_capacity_bytes
                ),
            ));
        }
        if self.dedup_window.max_age.is_zero() {
            return Err((
                "dedup_window.max_age",
                "must be more than 0 (for example \"7d\")".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_parsing() {
        let c: JournalConfig = toml::from_str("").unwrap();
        assert_eq!(c, JournalConfig::default());
        assert_eq!(c.max_bytes, 1 << 30);
        let c: JournalConfig = toml::from_str(
            "max_bytes = 1000000\non_full = \"drop_oldest\"\n[dedup_window]\nmax_age = \"12h\"\nmax_keys = 5",
        )
        .unwrap();
        assert_eq!(c.on_full, OnFull::DropOldest);
        assert_eq!(c.dedup_window.max_age, Duration::from_secs(12 * 3600));
        let c: JournalConfig = toml::from_str("[dedup_window]\nmax_age = 60").unwrap();
        assert_eq!(c.dedup_window.max_age, Duration::from_secs(60));
        assert!(toml::from_str::<JournalConfig>("max_byte = 1").is_err());
        assert!(toml::from_str::<JournalConfig>("[dedup_window]\nmax_age = \"7w\"").is_err());
        let c: JournalConfig = toml::from_str("[dedup_window]\nmax_age = \"500ms\"").unwrap();
        assert_eq!(c.dedup_window.max_age, Duration::from_millis(500));
        assert!(c.validate().is_ok());
        let c: JournalConfig = toml::from_str("[dedup_window]\nmax_age = \"0ms\"").unwrap();
        let (key, _) = c.validate().unwrap_err();
        assert_eq!(key, "dedup_window.max_age");
        assert!(JournalConfig {
            max_bytes: 10,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(JournalConfig::default().validate().is_ok());
    }
}
