//! The gateway's clocks, and the stamp put on every punch at arrival.
//!
//! A Raspberry Pi has no real-time clock: after a power cut without network its wall clock
//! may be hours or years wrong. So every record carries three readings ([`Received`]):
//!
//! - `boot_id`: `/proc/sys/kernel/random/boot_id`, new at every boot;
//! - `mono_ms`: `CLOCK_BOOTTIME` in ms, which never jumps and keeps counting in suspend;
//! - `wall_ms`: the wall clock, possibly wrong, and `clock_synced`.
//!
//! `clock_synced` comes from the kernel's NTP state (`adjtimex(2)`): the clock counts as
//! synchronised when the call does not return `TIME_ERROR` and the `STA_UNSYNC` flag is
//! clear. systemd-timesyncd, chrony and ntpd all maintain that state, so it is more reliable
//! than `/run/systemd/timesync/synchronized`, which exists only with timesyncd.
//! The relay later corrects unsynchronised records with time anchors (boot, mono ↔ true).

use std::time::{SystemTime, UNIX_EPOCH};

use outpost_protocol::{BootId, Received};

/// Reads the stamp clocks. Cheap to clone; `now` costs two syscalls.
#[derive(Clone, Debug)]
pub struct Clock {
    boot_id: BootId,
    /// Added to the wall clock: non-zero only in test builds that simulate a wrong clock.
    wall_offset_ms: i64,
}

impl Clock {
    /// Reads the boot id once. Falls back to a random id if `/proc` is unavailable (then
    /// monotonic times are only trusted within this process's life).
    pub fn new() -> Self {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .and_then(|s| parse_boot_id(s.trim()))
            .unwrap_or_else(|| BootId(rand::random()));
        Clock {
            boot_id,
            wall_offset_ms: test_wall_offset(),
        }
    }

    /// This boot's id.
    pub fn boot_id(&self) -> BootId {
        self.boot_id
    }

    /// Milliseconds since boot (`CLOCK_BOOTTIME`).
    pub fn mono_ms(&self) -> u64 {
        boottime_ms()
    }

    /// The wall clock in Unix ms (as the box believes it).
    pub fn wall_ms(&self) -> i64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        real + self.wall_offset_ms
    }

    /// Whether the wall clock is synchronised (see the module docs).
    pub fn synced(&self) -> bool {
        self.wall_offset_ms == 0 && kernel_clock_synced()
    }

    /// The stamp for a punch arriving now.
    pub fn now(&self) -> Received {
        Received {
            boot_id: self.boot_id,
            mono_ms: self.mono_ms(),
            wall_ms: self.wall_ms(),
            clock_synced: self.synced(),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Parses the kernel's boot id (a UUID with dashes) into 16 bytes.
pub fn parse_boot_id(s: &str) -> Option<BootId> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let bytes = hex::decode(hex).ok()?;
    Some(BootId(bytes.try_into().ok()?))
}

fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_BOOTTIME exists on every
    // Linux since 2.6.39.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

fn kernel_clock_synced() -> bool {
    // SAFETY: a zeroed timex with modes = 0 asks adjtimex to only read the state.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::adjtimex(&mut tx) };
    rc >= 0 && rc != libc::TIME_ERROR && (tx.status & libc::STA_UNSYNC) == 0
}

#[cfg(feature = "test-hooks")]
fn test_wall_offset() -> i64 {
    std::env::var("OUTPOST_TEST_WALL_OFFSET_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(not(feature = "test-hooks"))]
fn test_wall_offset() -> i64 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_id_parses() {
        let id = parse_boot_id("0f6b2e1c-3a44-4d1e-9c55-7e0d2a1b3c4d").unwrap();
        assert_eq!(id.0[0], 0x0f);
        assert_eq!(id.0[15], 0x4d);
        assert!(parse_boot_id("nope").is_none());
    }

    #[test]
    fn monotonic_does_not_go_back() {
        let c = Clock::new();
        let a = c.now();
        let b = c.now();
        assert!(b.mono_ms >= a.mono_ms);
        assert_eq!(a.boot_id, b.boot_id);
        assert!(a.wall_ms > 1_600_000_000_000);
    }
}
