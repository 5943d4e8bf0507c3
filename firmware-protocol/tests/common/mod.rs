//! Sample messages shared by the integration tests.
#![allow(dead_code)]

use outpost_protocol::{
    Batch, BootId, Id, Punch, PunchKind, Received, Record, Source, TimeAnchor, VerifyMethod,
};

pub fn id(s: &str) -> Id {
    Id::new(s).unwrap()
}

pub const BOOT: BootId = BootId([
    0x8f, 0x1e, 0x54, 0x2a, 0x9c, 0x03, 0x4b, 0x61, 0xa7, 0x7d, 0x10, 0xe2, 0x35, 0xc8, 0x6b, 0x0f,
]);

/// The example punch of docs/design.md ("JSON form"): door-1, seq 42, EMP-0042, in, card, 2026-11-22T07:58:03+02:00.
pub fn punch() -> Punch {
    Punch {
        device_id: id("door-1"),
        device_seq: 42,
        subject_id: id("EMP-0042"),
        kind: PunchKind::In,
        verify: VerifyMethod::Card,
        device_time_ms: 1_795_327_083_000,
        utc_offset_min: Some(120),
    }
}

pub fn record() -> Record {
    Record {
        punch: punch(),
        gateway_seq: 17,
        received: Received {
            boot_id: BOOT,
            mono_ms: 86_400_123,
            wall_ms: 1_795_327_083_412,
            clock_synced: true,
        },
        source: Source::Mqtt,
    }
}

pub fn anchor() -> TimeAnchor {
    TimeAnchor {
        boot_id: BOOT,
        mono_ms: 86_401_000,
        true_ms: 1_795_327_084_290,
        uncertainty_ms: 35,
    }
}

/// Three records from two devices, contiguous from gateway_seq 17.
pub fn batch() -> Batch {
    let r0 = record();
    let mut r1 = record();
    r1.gateway_seq = 18;
    r1.punch.device_id = id("gate-2");
    r1.punch.device_seq = 7;
    r1.punch.subject_id = id("EMP-0107");
    r1.punch.verify = VerifyMethod::Fingerprint;
    r1.punch.device_time_ms += 4_000;
    r1.punch.utc_offset_min = None;
    r1.received.mono_ms += 3_950;
    r1.received.wall_ms += 3_950;
    r1.source = Source::Http;
    let mut r2 = record();
    r2.gateway_seq = 19;
    r2.punch.device_seq = 43;
    r2.punch.kind = PunchKind::Out;
    r2.punch.device_time_ms += 9_000;
    r2.received.mono_ms += 9_020;
    r2.received.wall_ms += 9_020;
    Batch {
        gateway_id: id("gw-hc001-01"),
        site_id: id("HC001"),
        journal_epoch: 0x0123_4567_89ab_cdef,
        records: vec![r0, r1, r2],
        anchors: vec![anchor()],
    }
}

pub fn empty_batch() -> Batch {
    Batch {
        records: vec![],
        anchors: vec![],
        ..batch()
    }
}
