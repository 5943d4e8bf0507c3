//! The handshake: the option text a terminal asks for with `GET /iclock/cdata?options=all`.
//!
//! ```text
//! GET OPTION FROM: CQUJ230160001
//! ATTLOGStamp=1716192600      ← "Stamp=" on firmware that sends no `pushver`
//! OPERLOGStamp=0              ← "OpStamp="
//! ATTPHOTOStamp=0             ← "PhotoStamp="
//! ErrorDelay=30
//! Delay=10
//! TransTimes=00:00;14:05
//! TransInterval=1
//! TransFlag=TransData AttLog  ← "1000000000" without `pushver`
//! TimeZone=2
//! Realtime=1
//! Encrypt=0
//! ServerVer=2.4.1             ← only with `pushver`
//! ```
//!
//! - The stamps are the last ones the terminal sent us (persisted, see `stamps`): the
//!   terminal only pushes records newer than the stamp. 0 means "everything you hold",
//!   which is what a gateway that has never seen the terminal wants: old records that
//!   were already stored come back as duplicates and cost nothing.
//! - `ErrorDelay`: seconds before retrying after an error reply (journal full).
//! - `Delay`: seconds between `getrequest` polls (the heartbeat behind "last seen").
//! - `TransTimes` / `TransInterval`: scheduled batch uploads (times of day; minutes), a
//!   safety net behind `Realtime=1`, which pushes each punch as it happens.
//! - `TransFlag`: which tables to push. We ask only for attendance logs, plus the
//!   operation log when `adms.other_tables = "log"`. Legacy firmware reads a bit string
//!   (AttLog, OpLog, AttPhoto, EnrollUser, ChgUser, EnrollFP, ChgFP, FPImag, …); PUSH 2.x
//!   firmware reads `TransData` followed by tab-separated table names.
//! - `TimeZone`: the terminal's UTC offset, in hours when whole and within ±12 (`2`, `-5`),
//!   otherwise in minutes (`330`, `345`, `780`); PUSH firmware reads values beyond ±12 as
//!   minutes. Together with
//!   the HTTP `Date` header (GMT) it sets the terminal's clock.
//! - `Encrypt=0`: plain text.
//!
//! Lines end with LF, as ZKTeco's own servers send them.

use super::config::{OtherTables, UtcOffset};

/// The stamps handed back to one terminal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandshakeStamps {
    /// Last ATTLOG stamp stored.
    pub attlog: u64,
    /// Last OPERLOG stamp seen.
    pub operlog: u64,
    /// Last ATTPHOTO stamp seen.
    pub attphoto: u64,
}

/// Seconds a terminal waits after an error reply before retrying.
pub const ERROR_DELAY_SECS: u32 = 30;
/// Seconds between a terminal's `getrequest` polls.
pub const POLL_DELAY_SECS: u32 = 10;

/// Builds the option text for terminal `sn`. `push_protocol` is true when the terminal
/// sent a `pushver` parameter (PUSH 2.x firmware and later).
pub fn options_text(
    sn: &str,
    push_protocol: bool,
    stamps: HandshakeStamps,
    offset: UtcOffset,
    other_tables: OtherTables,
) -> String {
    let (att, op, photo) = if push_protocol {
        ("ATTLOGStamp", "OPERLOGStamp", "ATTPHOTOStamp")
    } else {
        ("Stamp", "OpStamp", "PhotoStamp")
    };
    let want_oplog = other_tables == OtherTables::Log;
    let trans_flag = match (push_protocol, want_oplog) {
        (true, false) => "TransData AttLog",
        (true, true) => "TransData AttLog\tOpLog",
        (false, false) => "1000000000",
        (false, true) => "1100000000",
    };
    let mut s = format!(
        "GET OPTION FROM: {sn}\n\
         {att}={}\n\
         {op}={}\n\
         {photo}={}\n\
         ErrorDelay={ERROR_DELAY_SECS}\n\
         Delay={POLL_DELAY_SECS}\n\
         TransTimes=00:00;14:05\n\
         TransInterval=1\n\
         TransFlag={trans_flag}\n\
         TimeZone={}\n\
         Realtime=1\n\
         Encrypt=0\n",
        stamps.attlog,
        stamps.operlog,
        stamps.attphoto,
        time_zone_value(offset),
    );
    if push_protocol {
        s.push_str("ServerVer=2.4.1\n");
    }
    s
}

/// The `TimeZone` value: whole hours within ±12 as hours, otherwise minutes.
pub fn time_zone_value(offset: UtcOffset) -> String {
    let m = offset.minutes();
    if m % 60 == 0 && (-12..=12).contains(&(m / 60)) {
        (m / 60).to_string()
    } else {
        m.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn off(m: i16) -> UtcOffset {
        UtcOffset::from_minutes(m).unwrap()
    }

    #[test]
    fn old_firmware() {
        let s = options_text(
            "ABC123",
            false,
            HandshakeStamps {
                attlog: 42,
                operlog: 7,
                attphoto: 0,
            },
            off(120),
            OtherTables::Ignore,
        );
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "GET OPTION FROM: ABC123");
        assert!(lines.contains(&"Stamp=42"));
        assert!(lines.contains(&"OpStamp=7"));
        assert!(lines.contains(&"PhotoStamp=0"));
        assert!(lines.contains(&"TransFlag=1000000000"));
        assert!(lines.contains(&"TimeZone=2"));
        assert!(!s.contains("ATTLOGStamp"));
        assert!(!s.contains("ServerVer"));
        assert!(!s.contains('\r'));
        for key in [
            "ErrorDelay=",
            "Delay=",
            "TransTimes=",
            "TransInterval=",
            "Realtime=1",
            "Encrypt=0",
        ] {
            assert!(lines.iter().any(|l| l.starts_with(key)), "{key}");
        }
    }

    #[test]
    fn push_firmware() {
        let s = options_text(
            "ABC123",
            true,
            HandshakeStamps::default(),
            off(330),
            OtherTables::Log,
        );
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "GET OPTION FROM: ABC123");
        assert!(lines.contains(&"ATTLOGStamp=0"));
        assert!(lines.contains(&"OPERLOGStamp=0"));
        assert!(lines.contains(&"ATTPHOTOStamp=0"));
        assert!(lines.contains(&"TransFlag=TransData AttLog\tOpLog"));
        assert!(lines.contains(&"TimeZone=330"));
        assert!(lines.contains(&"ServerVer=2.4.1"));
        assert!(!lines.iter().any(|l| l.starts_with("Stamp=")));
    }

    #[test]
    fn time_zones() {
        assert_eq!(time_zone_value(off(0)), "0");
        assert_eq!(time_zone_value(off(-300)), "-5");
        assert_eq!(time_zone_value(off(345)), "345");
        assert_eq!(time_zone_value(off(-570)), "-570");
        assert_eq!(time_zone_value(off(720)), "12");
        assert_eq!(time_zone_value(off(780)), "780");
    }
}
