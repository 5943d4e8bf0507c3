//! Golden vectors: the byte-exact encodings in `tests/vectors/*.hex` pin the wire format, so
//! firmware (in any language) can check its encoder and decoder against them.
//!
//! Each file holds one hex string (whitespace ignored) after optional `#` comment lines.
//! Both directions are checked: our encoding must equal the file, and decoding the file must
//! give the value. A deliberate format change is re-blessed with
//! `OUTPOST_BLESS_VECTORS=1 cargo test -p outpost-protocol --test vectors` and reviewed in
//! the diff. The zstd frames (codec 1 and 2) also pin the zstd version in `Cargo.lock`: a
//! zstd upgrade may legitimately compress differently, but must still decode the old files.

mod common;

use std::path::PathBuf;

use minicbor::{Decode, Encode};
use outpost_protocol::frame::{self, Codec, DICT_BATCH_V1};
use outpost_protocol::{cbor, Ack, Batch, DeviceAck, RejectCode};

fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(format!("{name}.hex"))
}

fn read(name: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(path(name)).unwrap_or_else(|e| panic!("{name}.hex: {e}"));
    let hex: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    hex::decode(hex).unwrap_or_else(|e| panic!("{name}.hex is not hex: {e}"))
}

/// Checks `encoded` against the vector `name` (or writes it when blessing).
fn check_bytes(name: &str, comment: &str, encoded: &[u8]) -> Vec<u8> {
    if std::env::var_os("OUTPOST_BLESS_VECTORS").is_some() {
        let body = format!("# {comment}\n{}\n", hex::encode(encoded));
        std::fs::write(path(name), body).unwrap();
    }
    let golden = read(name);
    assert_eq!(
        hex::encode(encoded),
        hex::encode(&golden),
        "{name}: encoding differs from the golden vector"
    );
    golden
}

fn check<T>(name: &str, comment: &str, value: &T)
where
    T: Encode<()> + for<'b> Decode<'b, ()> + PartialEq + std::fmt::Debug,
{
    let golden = check_bytes(name, comment, &cbor::to_vec(value));
    let decoded: T = cbor::decode_exact(&golden).unwrap();
    assert_eq!(&decoded, value, "{name}: decoding differs");
    // The no-alloc encoder writes the same bytes.
    let mut buf = [0u8; 512];
    if let Ok(n) = cbor::encode_to_slice(value, &mut buf) {
        assert_eq!(&buf[..n], &golden[..], "{name}: encode_to_slice differs");
    }
}

#[test]
fn punch() {
    check(
        "punch",
        "Punch: door-1, seq 42, EMP-0042, in, card, 2026-11-22T07:58:03+02:00 (offset 120)",
        &common::punch(),
    );
}

#[test]
fn punch_without_utc_offset() {
    let mut p = common::punch();
    p.utc_offset_min = None;
    check(
        "punch-no-offset",
        "Punch: as punch.hex with no UTC offset (field 6 absent)",
        &p,
    );
}

#[test]
fn device_acks() {
    check(
        "device-ack-accepted",
        "DeviceAck: seq 42 accepted as gateway_seq 17",
        &DeviceAck::accepted(42, 17),
    );
    check(
        "device-ack-duplicate",
        "DeviceAck: seq 42 duplicate",
        &DeviceAck::duplicate(42),
    );
    check(
        "device-ack-rejected",
        "DeviceAck: seq 42 rejected, storage_full (code 12)",
        &DeviceAck::rejected(42, RejectCode::StorageFull),
    );
}

#[test]
fn record() {
    check(
        "record",
        "Record: punch.hex, gateway_seq 17, boot 8f1e542a…, mono 86400123, wall +412 ms, synced, mqtt",
        &common::record(),
    );
}

#[test]
fn time_anchor() {
    check(
        "time-anchor",
        "TimeAnchor: boot 8f1e542a…, mono 86401000, true 1795327084290, uncertainty 35",
        &common::anchor(),
    );
}

#[test]
fn ack() {
    check(
        "ack",
        "Ack: gw-hc001-01, epoch 0x0123456789abcdef, acked_through 19, server time, 1 duplicate",
        &Ack {
            gateway_id: common::id("gw-hc001-01"),
            journal_epoch: 0x0123_4567_89ab_cdef,
            acked_through: 19,
            server_time_ms: 1_795_327_090_000,
            duplicates: Some(1),
            conflicts: None,
        },
    );
}

#[test]
fn batch() {
    check(
        "batch",
        "Batch (columnar): 3 records from door-1 and gate-2, gateway_seq 17-19, one anchor",
        &common::batch(),
    );
    check(
        "batch-empty",
        "Batch (columnar): no records, no anchors",
        &common::empty_batch(),
    );
}

#[test]
fn frames() {
    let b = common::batch();
    for (name, codec, what) in [
        ("frame-none", Codec::None, "codec 0 (raw CBOR)"),
        ("frame-zstd", Codec::Zstd, "codec 1 (zstd)"),
        (
            "frame-zstd-dict",
            Codec::ZstdDict(DICT_BATCH_V1),
            "codec 2 (zstd, dictionary 1)",
        ),
    ] {
        let golden = check_bytes(
            name,
            &format!("Frame, {what}, holding batch.hex"),
            &frame::encode_batch(&b, codec).unwrap(),
        );
        assert_eq!(frame::decode_batch(&golden, 1 << 20).unwrap(), b, "{name}");
        assert_eq!(
            frame::decode_payload(&golden, 1 << 20).unwrap(),
            read("batch"),
            "{name}"
        );
    }
}

#[test]
fn batch_vector_is_columnar() {
    // Spot-check the layout documented in outpost_protocol::batch: a map whose keys are
    // ascending, with first_seq 17 and the gateway_seq column absent.
    let bytes = read("batch");
    let mut d = minicbor::Decoder::new(&bytes);
    let entries = d.map().unwrap().unwrap();
    let mut keys = Vec::new();
    for _ in 0..entries {
        let k = d.u64().unwrap();
        if k == 4 {
            assert_eq!(d.u64().unwrap(), 17);
        } else {
            d.skip().unwrap();
        }
        keys.push(k);
    }
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
    let b: Batch = cbor::decode_exact(&bytes).unwrap();
    assert_eq!(b.records.len(), 3);
}
