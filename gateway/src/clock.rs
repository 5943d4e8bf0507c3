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

use std::sync::{Arc, Mutex};

use outpost_protocol::{BootId, Received, TimeAnchor};

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
        outpost_ops::time::now_ms() + self.wall_offset_ms
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

impl Clock {
    /// The best estimate of the true time, Unix ms: the wall clock when it is synchronised,
    /// else the relay's time from `relay` (an anchor of this boot), else `None`.
    pub fn trusted_now_ms(&self, relay: &RelayTime) -> Option<i64> {
        if self.synced() {
            Some(self.wall_ms())
        } else {
            relay.now_ms(self)
        }
    }
}

/// The true time as the uplink learned it from the relay's acks: the best anchor of this
/// boot (monotonic ms ↔ relay time). The uplink writes it; whoever must tell others the
/// time reads it (the ADMS `Date` header, from which terminals set their clocks). Cheap to
/// clone; all clones share one value.
#[derive(Clone, Default, Debug)]
pub struct RelayTime(Arc<Mutex<Option<TimeAnchor>>>);

impl RelayTime {
    /// Records the current anchor (`None` forgets it).
    pub fn set(&self, anchor: Option<TimeAnchor>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = anchor;
    }

    /// The relay's time now, Unix ms, if an anchor of this boot is known.
    pub fn now_ms(&self, clock: &Clock) -> Option<i64> {
        let a = (*self.0.lock().unwrap_or_else(|p| p.into_inner()))?;
        if a.boot_id != clock.boot_id() {
            return None;
        }
        anchored_ms(&a, clock.mono_ms())
    }
}

/// The true time at monotonic `mono_ms` by anchor `a` (same boot); `None` on overflow.
pub fn anchored_ms(a: &TimeAnchor, mono_ms: u64) -> Option<i64> {
    let t = i128::from(a.true_ms) + i128::from(mono_ms) - i128::from(a.mono_ms);
    i64::try_from(t).ok()
}

/// The wall clock's error by anchor `a`: true time − `wall_ms`, both read at `mono_ms`.
pub fn wall_error_ms(a: &TimeAnchor, mono_ms: u64, wall_ms: i64) -> Option<i64> {
    anchored_ms(a, mono_ms)?.checked_sub(wall_ms)
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
    fn relay_time_counts_from_an_anchor_of_this_boot_only() {
        let clock = Clock::new();
        let rt = RelayTime::default();
        assert_eq!(rt.now_ms(&clock), None);
        let mono = clock.mono_ms();
        rt.set(Some(TimeAnchor {
            boot_id: clock.boot_id(),
            mono_ms: mono,
            true_ms: 1_900_000_000_000,
            uncertainty_ms: 5,
        }));
        let t = rt.now_ms(&clock).unwrap();
        // Counted on from the anchor by the monotonic clock (this test takes < 60 s).
        assert!((1_900_000_000_000..1_900_000_060_000).contains(&t), "{t}");
        // A clone shares the value; another boot's anchor tells nothing.
        rt.clone().set(Some(TimeAnchor {
            boot_id: BootId([9; 16]),
            mono_ms: mono,
            true_ms: 1_900_000_000_000,
            uncertainty_ms: 5,
        }));
        assert_eq!(rt.now_ms(&clock), None);
        assert_eq!(
            anchored_ms(
                &TimeAnchor {
                    boot_id: BootId([1; 16]),
                    mono_ms: 1_000,
                    true_ms: 5_000,
                    uncertainty_ms: 0
                },
                3_500
            ),
            Some(7_500)
        );
    }

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
