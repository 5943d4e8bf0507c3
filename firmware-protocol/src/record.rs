//! A record: a punch as the gateway journal holds it, stamped on arrival.

use minicbor::{Decode, Encode};

use crate::punch::Punch;

/// The Linux boot id (`/proc/sys/kernel/random/boot_id`) as 16 raw bytes. Monotonic
/// timestamps are only comparable within one boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode)]
#[cbor(transparent)]
pub struct BootId(#[cbor(n(0), with = "minicbor::bytes")] pub [u8; 16]);

/// Where the gateway received the punch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
#[cbor(index_only)]
pub enum Source {
    /// `POST /v1/punches`.
    #[n(0)]
    Http,
    /// MQTT `outpost/v1/{site}/{device}/punch`.
    #[n(1)]
    Mqtt,
    /// ZKTeco ADMS push (`/iclock/cdata`).
    #[n(2)]
    Adms,
}

impl Source {
    /// Every source, in wire order.
    pub const ALL: [Source; 3] = [Source::Http, Source::Mqtt, Source::Adms];

    /// The wire code (the CBOR value).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The source for a wire code; `None` for an unknown code.
    pub fn from_code(c: u8) -> Option<Self> {
        Self::ALL.get(c as usize).copied()
    }

    /// The name used in exports and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::Mqtt => "mqtt",
            Source::Adms => "adms",
        }
    }
}

/// When the gateway received a punch, by the clocks it has.
///
/// CBOR: `[boot_id (bytes 16), mono_ms, wall_ms, clock_synced]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
pub struct Received {
    /// The boot during which `mono_ms` was taken.
    #[n(0)]
    pub boot_id: BootId,
    /// Milliseconds since boot (CLOCK_BOOTTIME), immune to wall-clock jumps.
    #[n(1)]
    pub mono_ms: u64,
    /// The gateway's wall clock, Unix ms; may be wrong if `clock_synced` is false.
    #[n(2)]
    pub wall_ms: i64,
    /// Whether the wall clock was known to be synchronised (NTP) at that moment.
    #[n(3)]
    pub clock_synced: bool,
}

/// A punch plus the gateway's stamp. `gateway_seq` is dense within a journal epoch.
///
/// CBOR: `[punch, gateway_seq, received, source]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
pub struct Record {
    /// What the device said.
    #[n(0)]
    pub punch: Punch,
    /// Position in the gateway journal, assigned at commit.
    #[n(1)]
    pub gateway_seq: u64,
    /// When it arrived.
    #[n(2)]
    pub received: Received,
    /// How it arrived.
    #[n(3)]
    pub source: Source,
}
