//! Shared helpers for the journal tests.
#![allow(dead_code)]

use outpost_gateway::journal::{JournalConfig, OnFull, Pending};
use outpost_protocol::{BootId, Id, Punch, PunchKind, Received, Source, VerifyMethod};

/// A valid punch from `device` with `seq`, stamped deterministically.
pub fn pending(device: &str, seq: u64) -> Pending {
    Pending {
        punch: Punch {
            device_id: Id::new(device).unwrap(),
            device_seq: seq,
            subject_id: Id::new(&format!("EMP-{:04}", seq % 10_000)).unwrap(),
            kind: PunchKind::In,
            verify: VerifyMethod::Card,
            device_time_ms: 1_795_500_000_000 + seq as i64,
            utc_offset_min: Some(120),
        },
        received: Received {
            boot_id: BootId([7; 16]),
            mono_ms: 1000 + seq,
            wall_ms: 1_795_500_000_000 + seq as i64,
            clock_synced: true,
        },
        source: Source::Http,
    }
}

/// Defaults with a small cache.
pub fn cfg() -> JournalConfig {
    JournalConfig {
        cache_capacity_bytes: 1 << 20,
        ..JournalConfig::default()
    }
}

/// A config whose quota is `max_bytes` with the given policy.
pub fn quota(max_bytes: u64, on_full: OnFull) -> JournalConfig {
    JournalConfig {
        max_bytes,
        on_full,
        ..cfg()
    }
}
