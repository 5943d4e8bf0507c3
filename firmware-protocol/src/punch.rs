//! A punch: what a clock-in device says happened.

use core::fmt;

use minicbor::{Decode, Encode};

use crate::id::{Id, IdError};

/// Earliest accepted device time: 2000-01-01T00:00:00Z in Unix milliseconds.
pub const MIN_TIME_MS: i64 = 946_684_800_000;
/// Latest accepted device time: 2100-01-01T00:00:00Z in Unix milliseconds.
pub const MAX_TIME_MS: i64 = 4_102_444_800_000;
/// Largest accepted UTC offset magnitude, in minutes (±18 hours, as RFC 3339 allows).
pub const MAX_UTC_OFFSET_MIN: i16 = 18 * 60;

/// What the punch records. Wire values are the `#[n]` indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
#[cbor(index_only)]
pub enum PunchKind {
    /// Kind not given by the device.
    #[n(0)]
    Unspecified,
    /// Clock in (start of shift).
    #[n(1)]
    In,
    /// Clock out (end of shift).
    #[n(2)]
    Out,
    /// Leaving for a break.
    #[n(3)]
    BreakOut,
    /// Back from a break.
    #[n(4)]
    BreakIn,
    /// Start of overtime.
    #[n(5)]
    OvertimeIn,
    /// End of overtime.
    #[n(6)]
    OvertimeOut,
}

impl PunchKind {
    /// Every kind, in wire order.
    pub const ALL: [PunchKind; 7] = [
        PunchKind::Unspecified,
        PunchKind::In,
        PunchKind::Out,
        PunchKind::BreakOut,
        PunchKind::BreakIn,
        PunchKind::OvertimeIn,
        PunchKind::OvertimeOut,
    ];

    /// The JSON name (`in`, `out`, `break_out`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            PunchKind::Unspecified => "unspecified",
            PunchKind::In => "in",
            PunchKind::Out => "out",
            PunchKind::BreakOut => "break_out",
            PunchKind::BreakIn => "break_in",
            PunchKind::OvertimeIn => "overtime_in",
            PunchKind::OvertimeOut => "overtime_out",
        }
    }

    /// Parses a JSON name; `None` for anything else.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The wire code (the CBOR value).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The kind for a wire code; `None` for an unknown code.
    pub fn from_code(c: u8) -> Option<Self> {
        Self::ALL.get(c as usize).copied()
    }
}

/// How the device identified the person. Wire values are the `#[n]` indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
#[cbor(index_only)]
pub enum VerifyMethod {
    /// Not known or not reported.
    #[n(0)]
    Unknown,
    /// RFID or NFC card.
    #[n(1)]
    Card,
    /// Fingerprint.
    #[n(2)]
    Fingerprint,
    /// Face recognition.
    #[n(3)]
    Face,
    /// PIN or password typed on the device.
    #[n(4)]
    Pin,
    /// Palm vein.
    #[n(5)]
    Palm,
    /// Entered by a supervisor.
    #[n(6)]
    Manual,
}

impl VerifyMethod {
    /// Every method, in wire order.
    pub const ALL: [VerifyMethod; 7] = [
        VerifyMethod::Unknown,
        VerifyMethod::Card,
        VerifyMethod::Fingerprint,
        VerifyMethod::Face,
        VerifyMethod::Pin,
        VerifyMethod::Palm,
        VerifyMethod::Manual,
    ];

    /// The JSON name (`card`, `fingerprint`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMethod::Unknown => "unknown",
            VerifyMethod::Card => "card",
            VerifyMethod::Fingerprint => "fingerprint",
            VerifyMethod::Face => "face",
            VerifyMethod::Pin => "pin",
            VerifyMethod::Palm => "palm",
            VerifyMethod::Manual => "manual",
        }
    }

    /// Parses a JSON name; `None` for anything else.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The wire code (the CBOR value).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The method for a wire code; `None` for an unknown code.
    pub fn from_code(c: u8) -> Option<Self> {
        Self::ALL.get(c as usize).copied()
    }
}

/// One clock-in or clock-out event as reported by a device.
///
/// CBOR: an array `[device_id, device_seq, subject_id, kind, verify, device_time_ms,
/// utc_offset_min]`; the last element may be `null` or absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
pub struct Punch {
    /// The device, unique within a site (ADMS terminals are `zk:<serial>`).
    #[n(0)]
    pub device_id: Id,
    /// Monotonic per device; derived from a content hash for sources without a counter
    /// (see [`crate::seq`]).
    #[n(1)]
    pub device_seq: u64,
    /// Badge or employee code.
    #[n(2)]
    pub subject_id: Id,
    /// In, out, break, overtime.
    #[n(3)]
    pub kind: PunchKind,
    /// Card, fingerprint, face, …
    #[n(4)]
    pub verify: VerifyMethod,
    /// When the device says it happened, in Unix ms by the device's clock.
    #[n(5)]
    pub device_time_ms: i64,
    /// The device's UTC offset in minutes, if it knows it.
    #[n(6)]
    pub utc_offset_min: Option<i16>,
}

/// Why a punch is invalid. Each variant names the offending field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PunchError {
    /// `device_id` is not a valid topic-safe identifier.
    DeviceId(IdError),
    /// `subject_id` is not a valid identifier.
    SubjectId(IdError),
    /// `device_time_ms` is before 2000 or after 2100.
    TimeOutOfRange,
    /// `utc_offset_min` is beyond ±18 hours.
    UtcOffsetOutOfRange,
}

impl PunchError {
    /// The JSON field name the error is about (`device_id`, `subject`, `time`).
    pub fn field(&self) -> &'static str {
        match self {
            PunchError::DeviceId(_) => "device_id",
            PunchError::SubjectId(_) => "subject",
            PunchError::TimeOutOfRange | PunchError::UtcOffsetOutOfRange => "time",
        }
    }

    /// The machine-readable code, as used in rejections.
    pub fn reject_code(&self) -> crate::RejectCode {
        use crate::RejectCode;
        match self {
            PunchError::DeviceId(_) => RejectCode::InvalidDeviceId,
            PunchError::SubjectId(_) => RejectCode::InvalidSubject,
            PunchError::TimeOutOfRange => RejectCode::TimeOutOfRange,
            PunchError::UtcOffsetOutOfRange => RejectCode::InvalidUtcOffset,
        }
    }
}

impl fmt::Display for PunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PunchError::DeviceId(e) => write!(f, "device_id {e}"),
            PunchError::SubjectId(e) => write!(f, "subject {e}"),
            PunchError::TimeOutOfRange => {
                f.write_str("time must be between 2000-01-01 and 2100-01-01")
            }
            PunchError::UtcOffsetOutOfRange => f.write_str("UTC offset must be within ±18:00"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for PunchError {}

impl Punch {
    /// Applies the semantic limits that the CBOR decoder does not: topic-safe device id,
    /// time range and UTC offset range. Decoded punches must be validated before use.
    pub fn validate(&self) -> Result<(), PunchError> {
        self.device_id
            .check_topic_safe()
            .map_err(PunchError::DeviceId)?;
        if !(MIN_TIME_MS..MAX_TIME_MS).contains(&self.device_time_ms) {
            return Err(PunchError::TimeOutOfRange);
        }
        if let Some(off) = self.utc_offset_min {
            if off.unsigned_abs() > MAX_UTC_OFFSET_MIN as u16 {
                return Err(PunchError::UtcOffsetOutOfRange);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn punch() -> Punch {
        Punch {
            device_id: Id::new("door-1").unwrap(),
            device_seq: 42,
            subject_id: Id::new("EMP-0042").unwrap(),
            kind: PunchKind::In,
            verify: VerifyMethod::Card,
            device_time_ms: 1_795_500_000_000,
            utc_offset_min: Some(120),
        }
    }

    #[test]
    fn validation() {
        assert_eq!(punch().validate(), Ok(()));
        let mut p = punch();
        p.device_time_ms = 0;
        assert_eq!(p.validate(), Err(PunchError::TimeOutOfRange));
        let mut p = punch();
        p.utc_offset_min = Some(18 * 60 + 1);
        assert_eq!(p.validate(), Err(PunchError::UtcOffsetOutOfRange));
        let mut p = punch();
        p.device_id = Id::new("a/b").unwrap();
        assert_eq!(p.validate(), Err(PunchError::DeviceId(IdError::TopicChar)));
    }

    #[test]
    fn names_round_trip() {
        for k in PunchKind::ALL {
            assert_eq!(PunchKind::from_name(k.as_str()), Some(k));
            assert_eq!(PunchKind::from_code(k.code()), Some(k));
        }
        for v in VerifyMethod::ALL {
            assert_eq!(VerifyMethod::from_name(v.as_str()), Some(v));
            assert_eq!(VerifyMethod::from_code(v.code()), Some(v));
        }
        assert_eq!(PunchKind::from_code(7), None);
    }
}
