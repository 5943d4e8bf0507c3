//! Property tests: every message round-trips, and no decoder panics on any input.

mod common;

use outpost_protocol::frame::{self, Codec, DICT_BATCH_V1};
use outpost_protocol::{
    cbor, Ack, AckStatus, Batch, BootId, DeviceAck, Id, Punch, PunchKind, Received, Record,
    RejectCode, Source, TimeAnchor, VerifyMethod,
};
use proptest::prelude::*;

fn arb_id() -> impl Strategy<Value = Id> {
    prop_oneof![
        "[A-Za-z0-9:._-]{1,64}",
        // Multi-byte UTF-8, kept within 64 bytes.
        "[a-zé€漢😀 ]{1,16}",
    ]
    .prop_map(|s| Id::new(&s).unwrap())
}

fn arb_punch() -> impl Strategy<Value = Punch> {
    (
        arb_id(),
        any::<u64>(),
        arb_id(),
        prop::sample::select(PunchKind::ALL.to_vec()),
        prop::sample::select(VerifyMethod::ALL.to_vec()),
        any::<i64>(),
        any::<Option<i16>>(),
    )
        .prop_map(
            |(device_id, device_seq, subject_id, kind, verify, device_time_ms, utc_offset_min)| {
                Punch {
                    device_id,
                    device_seq,
                    subject_id,
                    kind,
                    verify,
                    device_time_ms,
                    utc_offset_min,
                }
            },
        )
}

fn arb_boot() -> impl Strategy<Value = BootId> {
    // Few distinct boots, as in real batches, plus arbitrary ones.
    prop_oneof![
        3 => Just(common::BOOT),
        1 => any::<[u8; 16]>().prop_map(BootId),
    ]
}

fn arb_record() -> impl Strategy<Value = Record> {
    (
        arb_punch(),
        any::<u64>(),
        arb_boot(),
        any::<u64>(),
        any::<i64>(),
        any::<bool>(),
        prop::sample::select(Source::ALL.to_vec()),
    )
        .prop_map(
            |(punch, gateway_seq, boot_id, mono_ms, wall_ms, clock_synced, source)| Record {
                punch,
                gateway_seq,
                received: Received {
                    boot_id,
                    mono_ms,
                    wall_ms,
                    clock_synced,
                },
                source,
            },
        )
}

fn arb_anchor() -> impl Strategy<Value = TimeAnchor> {
    (arb_boot(), any::<u64>(), any::<i64>(), any::<u32>()).prop_map(
        |(boot_id, mono_ms, true_ms, uncertainty_ms)| TimeAnchor {
            boot_id,
            mono_ms,
            true_ms,
            uncertainty_ms,
        },
    )
}

/// Records that look like a real site (few devices and subjects, small deltas) mixed with
/// arbitrary ones, so both the compact and the extreme paths of the codec are exercised.
fn arb_batch() -> impl Strategy<Value = Batch> {
    let realistic = (
        0usize..4,
        0usize..6,
        0u64..3,
        -5_000i64..5_000,
        0u64..100_000,
    )
        .prop_map(|(dev, subj, seq_step, skew, gap)| (dev, subj, seq_step, skew, gap));
    (
        arb_id(),
        arb_id(),
        any::<u64>(),
        prop::collection::vec(
            prop_oneof![arb_record().prop_map(Err), realistic.prop_map(Ok)],
            0..40,
        ),
        prop::collection::vec(arb_anchor(), 0..3),
        any::<u64>(),
    )
        .prop_map(
            |(gateway_id, site_id, journal_epoch, specs, anchors, first)| {
                let first = first.min(u64::MAX - specs.len() as u64);
                let mut records = Vec::new();
                let mut base = common::record();
                for (i, spec) in specs.into_iter().enumerate() {
                    let mut r = match spec {
                        Err(r) => r,
                        Ok((dev, subj, seq_step, skew, gap)) => {
                            base.punch.device_id = Id::new(&format!("dev-{dev}")).unwrap();
                            base.punch.subject_id = Id::new(&format!("EMP-{subj:04}")).unwrap();
                            base.punch.device_seq = base.punch.device_seq.wrapping_add(seq_step);
                            base.received.mono_ms = base.received.mono_ms.wrapping_add(gap);
                            base.received.wall_ms = base.received.wall_ms.wrapping_add(gap as i64);
                            base.punch.device_time_ms =
                                (base.received.wall_ms + skew).div_euclid(1000) * 1000;
                            base
                        }
                    };
                    r.gateway_seq = first + i as u64;
                    records.push(r);
                }
                Batch {
                    gateway_id,
                    site_id,
                    journal_epoch,
                    records,
                    anchors,
                }
            },
        )
}

fn arb_device_ack() -> impl Strategy<Value = DeviceAck> {
    (
        any::<u64>(),
        prop::sample::select(vec![
            AckStatus::Accepted,
            AckStatus::Duplicate,
            AckStatus::Rejected,
        ]),
        any::<Option<u64>>(),
        prop::option::of(prop::sample::select(RejectCode::ALL.to_vec())),
    )
        .prop_map(|(device_seq, status, gateway_seq, code)| DeviceAck {
            device_seq,
            status,
            gateway_seq,
            code,
        })
}

fn arb_ack() -> impl Strategy<Value = Ack> {
    (
        arb_id(),
        any::<u64>(),
        any::<u64>(),
        any::<i64>(),
        any::<Option<u32>>(),
        any::<Option<u32>>(),
    )
        .prop_map(
            |(gateway_id, journal_epoch, acked_through, server_time_ms, duplicates, conflicts)| {
                Ack {
                    gateway_id,
                    journal_epoch,
                    acked_through,
                    server_time_ms,
                    duplicates,
                    conflicts,
                }
            },
        )
}

fn round_trip<T>(v: &T) -> Result<(), TestCaseError>
where
    T: minicbor::Encode<()> + for<'b> minicbor::Decode<'b, ()> + PartialEq + std::fmt::Debug,
{
    let bytes = cbor::try_to_vec(v).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: T = cbor::decode_exact(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, v);
    Ok(())
}

/// Feeds `bytes` to every decoder; they may fail but must not panic.
fn decode_everything(bytes: &[u8]) {
    let _ = cbor::decode_exact::<Punch>(bytes);
    let _ = cbor::decode_exact::<Record>(bytes);
    let _ = cbor::decode_exact::<DeviceAck>(bytes);
    let _ = cbor::decode_exact::<Ack>(bytes);
    let _ = cbor::decode_exact::<TimeAnchor>(bytes);
    let _ = cbor::decode_exact::<Batch>(bytes);
    let _ = frame::decode_payload(bytes, 1 << 20);
    let _ = frame::decode_batch(bytes, 1 << 20);
    let _ = frame::decode_ack(bytes);
}

proptest! {
    #[test]
    fn punches_round_trip(p in arb_punch()) { round_trip(&p)?; }

    #[test]
    fn records_round_trip(r in arb_record()) { round_trip(&r)?; }

    #[test]
    fn anchors_round_trip(a in arb_anchor()) { round_trip(&a)?; }

    #[test]
    fn device_acks_round_trip(a in arb_device_ack()) { round_trip(&a)?; }

    #[test]
    fn acks_round_trip(a in arb_ack()) {
        round_trip(&a)?;
        prop_assert_eq!(frame::decode_ack(&frame::encode_ack(&a)).unwrap(), a);
    }

    #[test]
    fn batches_round_trip(b in arb_batch()) {
        round_trip(&b)?;
        for codec in [Codec::None, Codec::Zstd, Codec::ZstdDict(DICT_BATCH_V1)] {
            let f = frame::encode_batch(&b, codec).unwrap();
            prop_assert_eq!(&frame::decode_batch(&f, 1 << 24).unwrap(), &b);
        }
        let f = frame::encode_batch_auto(&b).unwrap();
        prop_assert_eq!(frame::decode_batch(&f, 1 << 24).unwrap(), b);
    }

    #[test]
    fn punch_cbor_round_trips_without_alloc(p in arb_punch()) {
        let mut buf = [0u8; 256];
        let n = cbor::encode_to_slice(&p, &mut buf).unwrap();
        prop_assert_eq!(cbor::decode_exact::<Punch>(&buf[..n]).unwrap(), p);
        prop_assert!(cbor::encode_to_slice(&p, &mut buf[..n - 1]).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }

    #[test]
    fn arbitrary_bytes_behind_a_frame_header_never_panic(
        codec in 0u8..4,
        raw_len in prop_oneof![0u32..600, any::<u32>()],
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut f = frame::MAGIC.to_vec();
        f.push(frame::VERSION);
        f.push(codec);
        f.extend_from_slice(&u32::from(codec == 2).to_be_bytes());
        f.extend_from_slice(&raw_len.to_be_bytes());
        f.extend_from_slice(&body);
        decode_everything(&f);
    }

    #[test]
    fn mutated_batches_never_panic(
        b in arb_batch(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        // Damage a valid encoding: decoders must fail cleanly or decode something valid.
        let mut bytes = cbor::to_vec(&b);
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        decode_everything(&bytes);
        decode_everything(&bytes[..cut.index(bytes.len() + 1)]);
        let f = frame::encode_payload(&bytes, Codec::None).unwrap();
        decode_everything(&f);
    }
}

#[test]
fn batch_claiming_more_records_than_bytes_is_refused() {
    // count = 100 000 but the mono array claims 100 000 elements with 3 bytes of input.
    let mut bytes = cbor::to_vec(&common::empty_batch());
    bytes[0] = 0xa6; // map of 6 entries
    let count = bytes.len() - 1;
    assert_eq!(bytes[count], 0x00);
    bytes.truncate(count);
    bytes.extend_from_slice(&[0x1a, 0x00, 0x01, 0x86, 0xa0]); // count 100 000
    bytes.extend_from_slice(&[0x04, 0x00]); // first_seq 0
    bytes.extend_from_slice(&[0x13, 0x9a, 0x00, 0x01, 0x86, 0xa0, 0x00]); // mono: array(100000)
    assert!(cbor::decode_exact::<Batch>(&bytes).is_err());
    // And a count over the limit is refused outright.
    let mut over = cbor::to_vec(&common::empty_batch());
    over.truncate(over.len() - 1);
    over.extend_from_slice(&[0x1a, 0x00, 0x01, 0x86, 0xa1]);
    assert!(cbor::decode_exact::<Batch>(&over).is_err());
}

#[test]
fn batch_table_indexes_and_codes_are_checked() {
    let good = cbor::to_vec(&common::batch());
    let b: Batch = cbor::decode_exact(&good).unwrap();
    assert_eq!(b, common::batch());
    // Find the subject column (key 13 = 0x0d, array of 3) and point past the table.
    let at = good
        .windows(2)
        .position(|w| w == [0x0d, 0x83])
        .expect("subject column");
    let mut bad = good.clone();
    bad[at + 2] = 0x05;
    assert!(cbor::decode_exact::<Batch>(&bad).is_err());
    // Kind column (key 14 = 0x0e): an unknown kind code.
    let at = good
        .windows(2)
        .position(|w| w == [0x0e, 0x83])
        .expect("kind column");
    let mut bad = good.clone();
    bad[at + 2] = 0x07;
    assert!(cbor::decode_exact::<Batch>(&bad).is_err());
}

#[test]
fn batch_keys_must_ascend() {
    let good = cbor::to_vec(&common::empty_batch());
    // Swap key 0 for key 2's position by making the first key 5 (then 1 follows).
    let mut bad = good.clone();
    bad[1] = 0x05;
    assert!(cbor::decode_exact::<Batch>(&bad).is_err());
}

#[test]
fn batch_with_extreme_values_round_trips() {
    let mut b = common::batch();
    b.records[0].punch.device_seq = u64::MAX;
    b.records[0].punch.device_time_ms = i64::MIN;
    b.records[0].received.mono_ms = u64::MAX;
    b.records[0].received.wall_ms = i64::MIN;
    b.records[1].punch.device_time_ms = i64::MAX;
    b.records[1].received.wall_ms = i64::MAX;
    b.records[1].received.mono_ms = 0;
    b.records[2].punch.device_seq = 0;
    let first = u64::MAX - 2;
    for (i, r) in b.records.iter_mut().enumerate() {
        r.gateway_seq = first + i as u64;
    }
    let bytes = cbor::try_to_vec(&b).unwrap();
    assert_eq!(cbor::decode_exact::<Batch>(&bytes).unwrap(), b);
    // One more record would overflow gateway_seq: refused by the encoder's contiguity check.
    let mut c = b.clone();
    let mut extra = c.records[2];
    extra.gateway_seq = 0;
    c.records.push(extra);
    assert!(cbor::try_to_vec(&c).is_err());
}

#[test]
fn batch_doc_example_is_accurate() {
    // The example in the outpost_protocol::batch module docs.
    let mut b = common::batch();
    b.gateway_id = common::id("gw-1");
    b.anchors.clear();
    b.records.truncate(2);
    let r0 = &mut b.records[0];
    r0.punch.subject_id = common::id("EMP-1");
    r0.punch.device_time_ms = r0.received.wall_ms - 412;
    let (m, w, t) = (
        r0.received.mono_ms,
        r0.received.wall_ms,
        r0.punch.device_time_ms,
    );
    b.records[1] = b.records[0];
    let r1 = &mut b.records[1];
    r1.gateway_seq = 18;
    r1.punch.device_seq = 43;
    r1.punch.subject_id = common::id("EMP-2");
    r1.received.mono_ms = m + 5003;
    r1.received.wall_ms = w + 5003;
    r1.punch.device_time_ms = t + 5000;
    check_keys(&cbor::to_vec(&b));
    fn check_keys(bytes: &[u8]) {
        let mut d = minicbor::Decoder::new(bytes);
        let n = d.map().unwrap().unwrap();
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..n {
            let k = d.u64().unwrap();
            let start = d.position();
            d.skip().unwrap();
            seen.insert(k, bytes[start..d.position()].to_vec());
        }
        assert_eq!(
            seen.keys().copied().collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
        );
        assert_eq!(seen[&9], [0x01]);
        assert_eq!(seen[&12], [0x82, 0x18, 0x2a, 0x01]);
        assert_eq!(seen[&16], [0x82, 0x39, 0x01, 0x9b, 0x39, 0x01, 0x9e]); // [-412, -415]
        assert_eq!(seen[&17], [0x18, 0x78]); // 120
        assert_eq!(seen[&21], [0xf5]);
    }
}

#[test]
fn batch_tables_longer_than_the_count_are_refused() {
    // A 2-record batch whose subject table claims 1000 entries: refused before allocating.
    let mut b = common::batch();
    b.records.truncate(2);
    let good = cbor::to_vec(&b);
    let at = good
        .windows(2)
        .position(|w| w == [0x07, 0x82])
        .expect("subjects table");
    let mut bad = good[..at + 1].to_vec();
    bad.extend_from_slice(&[0x99, 0x03, 0xe8]); // array(1000)
    bad.extend_from_slice(&good[at + 2..]);
    let e = cbor::decode_exact::<Batch>(&bad).unwrap_err();
    assert!(e.to_string().contains("longer than"), "{e}");
    // Too many anchors are refused by the encoder.
    let mut many = common::batch();
    many.anchors = vec![common::anchor(); 1025];
    assert!(cbor::try_to_vec(&many).is_err());
}
