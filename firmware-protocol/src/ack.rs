//! The device-level acknowledgement: the gateway's answer for one punch.
//!
//! A device keeps a punch in its outbox until a [`DeviceAck`] for that punch's `device_seq`
//! arrives with status `Accepted` or `Duplicate` (both mean "the gateway has it durably"),
//! or `Rejected` with a code that [`RejectCode::is_permanent`] says will never succeed.

use core::fmt;

use minicbor::{Decode, Encode};

/// What happened to one punch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
#[cbor(index_only)]
pub enum AckStatus {
    /// Stored durably (fsync returned) under `gateway_seq`.
    #[n(0)]
    Accepted,
    /// Already stored earlier; nothing new was written.
    #[n(1)]
    Duplicate,
    /// Not stored; `code` says why.
    #[n(2)]
    Rejected,
}

impl AckStatus {
    /// The JSON name (`accepted`, `duplicate`, `rejected`).
    pub fn as_str(self) -> &'static str {
        match self {
            AckStatus::Accepted => "accepted",
            AckStatus::Duplicate => "duplicate",
            AckStatus::Rejected => "rejected",
        }
    }
}

/// Why a punch or request was rejected. Wire values are the `#[n]` indexes; JSON uses
/// [`RejectCode::as_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
#[cbor(index_only)]
pub enum RejectCode {
    /// The payload is not a punch (bad CBOR or JSON, missing field, wrong type).
    #[n(0)]
    Malformed,
    /// `device_id` is empty, too long or has forbidden characters.
    #[n(1)]
    InvalidDeviceId,
    /// `subject` is empty, too long or has control characters.
    #[n(2)]
    InvalidSubject,
    /// `kind` is not one of the known kinds.
    #[n(3)]
    UnknownKind,
    /// `verify` is not one of the known methods.
    #[n(4)]
    UnknownVerify,
    /// `time` is not RFC 3339 with an offset.
    #[n(5)]
    InvalidTime,
    /// `time` is before 2000 or after 2100.
    #[n(6)]
    TimeOutOfRange,
    /// The UTC offset is beyond ±18 hours.
    #[n(7)]
    InvalidUtcOffset,
    /// The punch's device is not the one the credentials or topic belong to.
    #[n(8)]
    DeviceMismatch,
    /// Missing or wrong credentials.
    #[n(9)]
    Unauthorized,
    /// Too many punches from this device; retry later.
    #[n(10)]
    RateLimited,
    /// The message is larger than the configured limit.
    #[n(11)]
    TooLarge,
    /// The gateway's journal is full (or its disk is); keep the punch and retry later.
    #[n(12)]
    StorageFull,
    /// The gateway could not store the punch for another reason; retry later.
    #[n(13)]
    Internal,
    /// The gateway is shutting down; retry later.
    #[n(14)]
    Unavailable,
}

impl RejectCode {
    /// Every code, in wire order.
    pub const ALL: [RejectCode; 15] = [
        RejectCode::Malformed,
        RejectCode::InvalidDeviceId,
        RejectCode::InvalidSubject,
        RejectCode::UnknownKind,
        RejectCode::UnknownVerify,
        RejectCode::InvalidTime,
        RejectCode::TimeOutOfRange,
        RejectCode::InvalidUtcOffset,
        RejectCode::DeviceMismatch,
        RejectCode::Unauthorized,
        RejectCode::RateLimited,
        RejectCode::TooLarge,
        RejectCode::StorageFull,
        RejectCode::Internal,
        RejectCode::Unavailable,
    ];

    /// The machine-readable name used in JSON (`storage_full`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::Malformed => "malformed",
            RejectCode::InvalidDeviceId => "invalid_device_id",
            RejectCode::InvalidSubject => "invalid_subject",
            RejectCode::UnknownKind => "unknown_kind",
            RejectCode::UnknownVerify => "unknown_verify",
            RejectCode::InvalidTime => "invalid_time",
            RejectCode::TimeOutOfRange => "time_out_of_range",
            RejectCode::InvalidUtcOffset => "invalid_utc_offset",
            RejectCode::DeviceMismatch => "device_mismatch",
            RejectCode::Unauthorized => "unauthorized",
            RejectCode::RateLimited => "rate_limited",
            RejectCode::TooLarge => "too_large",
            RejectCode::StorageFull => "storage_full",
            RejectCode::Internal => "internal",
            RejectCode::Unavailable => "unavailable",
        }
    }

    /// Parses a JSON name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// `true` when resending the same punch can never succeed, so a device should drop it
    /// (and log it). `false` for conditions that pass: full storage, rate limits, restarts.
    pub fn is_permanent(self) -> bool {
        !matches!(
            self,
            RejectCode::RateLimited
                | RejectCode::StorageFull
                | RejectCode::Internal
                | RejectCode::Unavailable
                | RejectCode::Unauthorized
        )
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The gateway's answer for one punch, addressed by the device's own sequence number.
///
/// CBOR: `[device_seq, status, gateway_seq / null, code / null]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
pub struct DeviceAck {
    /// The `device_seq` of the punch this answers.
    #[n(0)]
    pub device_seq: u64,
    /// Accepted, duplicate or rejected.
    #[n(1)]
    pub status: AckStatus,
    /// The journal position, for `Accepted`.
    #[n(2)]
    pub gateway_seq: Option<u64>,
    /// The reason, for `Rejected`.
    #[n(3)]
    pub code: Option<RejectCode>,
}

impl DeviceAck {
    /// An `Accepted` ack.
    pub fn accepted(device_seq: u64, gateway_seq: u64) -> Self {
        DeviceAck {
            device_seq,
            status: AckStatus::Accepted,
            gateway_seq: Some(gateway_seq),
            code: None,
        }
    }

    /// A `Duplicate` ack.
    pub fn duplicate(device_seq: u64) -> Self {
        DeviceAck {
            device_seq,
            status: AckStatus::Duplicate,
            gateway_seq: None,
            code: None,
        }
    }

    /// A `Rejected` ack.
    pub fn rejected(device_seq: u64, code: RejectCode) -> Self {
        DeviceAck {
            device_seq,
            status: AckStatus::Rejected,
            gateway_seq: None,
            code: Some(code),
        }
    }

    /// `true` when the device may forget the punch: it is stored, or it never can be.
    pub fn settles(&self) -> bool {
        match self.status {
            AckStatus::Accepted | AckStatus::Duplicate => true,
            AckStatus::Rejected => self.code.is_none_or(RejectCode::is_permanent),
        }
    }
}
