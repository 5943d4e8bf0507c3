//! Uplink frame decoding under hostile input: every failure is a specific [`FrameError`],
//! and decompression bombs are refused without allocating what they claim.
//!
//! A counting global allocator records the peak heap use of the current thread, so the
//! bomb tests prove the decoder never allocates anywhere near the bomb's size. (zstd's own
//! context comes from C `malloc`, not counted: a fixed ~100 KiB with one-shot decoding.)

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use outpost_protocol::frame::{
    self, decode_ack, decode_batch, decode_payload, encode_ack, encode_batch, encode_batch_auto,
    encode_payload, Codec, FrameError, DICT_BATCH_V1, HEADER_LEN, MAGIC, VERSION,
};
use outpost_protocol::Ack;

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn track(grow: usize, shrink: usize) {
    // try_with: allocations during thread teardown must not touch dead thread-locals.
    let _ = LIVE.try_with(|live| {
        let v = live.get().saturating_add(grow).saturating_sub(shrink);
        live.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(layout.size(), 0);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        track(0, layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size, layout.size());
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the most heap it held at once on this thread.
fn peak_heap<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    (out, PEAK.with(Cell::get) - start)
}

const MIB: u32 = 1 << 20;
const GIB: u64 = 1 << 30;

fn header(codec: u8, dict_id: u32, raw_len: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.push(VERSION);
    h.push(codec);
    h.extend_from_slice(&dict_id.to_be_bytes());
    h.extend_from_slice(&raw_len.to_be_bytes());
    h
}

/// A hand-made zstd frame of RLE blocks (4 bytes each, 128 KiB of zeros each) that inflates
/// to `inflated` bytes: 1 GiB fits in 32 KiB. With `declare`, the zstd frame header also
/// states the content size, as an honest encoder would.
fn zstd_bomb(inflated: u64, declare: bool) -> Vec<u8> {
    const BLOCK: u64 = 128 * 1024;
    let mut z = vec![0x28, 0xb5, 0x2f, 0xfd]; // zstd magic, little-endian
    if declare {
        z.push(0b1000_0000); // FCS field 4 bytes, not single-segment, no checksum, no dict
        z.push(7 << 3); // window 128 KiB
        z.extend_from_slice(&(inflated as u32).to_le_bytes());
    } else {
        z.push(0); // no content size, not single-segment, no checksum, no dict
        z.push(7 << 3); // window 128 KiB
    }
    let blocks = inflated.div_ceil(BLOCK);
    for i in 0..blocks {
        let size = BLOCK.min(inflated - i * BLOCK);
        let last = u64::from(i + 1 == blocks);
        let h = (size << 3) | (1 << 1) | last; // block type 1 = RLE
        z.extend_from_slice(&(h as u32).to_le_bytes()[..3]);
        z.push(0);
    }
    z
}

#[test]
fn zstd_bomb_claiming_a_small_raw_len_is_refused_without_allocating() {
    let body = zstd_bomb(GIB, false);
    assert!(body.len() < 40 * 1024);
    let mut f = header(1, 0, MIB);
    f.extend_from_slice(&body);
    let (r, peak) = peak_heap(|| decode_payload(&f, 16 * MIB));
    assert_eq!(r, Err(FrameError::Overflow { claimed: MIB }));
    assert!(peak <= 2 * MIB as usize, "peak heap {peak} bytes");
    // The same through the batch decoder.
    let (r, peak) = peak_heap(|| decode_batch(&f, 16 * MIB));
    assert_eq!(r, Err(FrameError::Overflow { claimed: MIB }));
    assert!(peak <= 2 * MIB as usize, "peak heap {peak} bytes");
}

#[test]
fn zstd_bomb_declaring_its_size_is_refused_before_inflating() {
    let mut f = header(1, 0, 1000);
    f.extend_from_slice(&zstd_bomb(GIB, true));
    let (r, peak) = peak_heap(|| decode_payload(&f, 16 * MIB));
    assert_eq!(r, Err(FrameError::Overflow { claimed: 1000 }));
    assert!(peak < 64 * 1024, "peak heap {peak} bytes");
}

#[test]
fn zstd_bomb_claiming_a_huge_raw_len_is_refused_from_the_header() {
    let mut f = header(1, 0, u32::MAX);
    f.extend_from_slice(&zstd_bomb(GIB, false));
    let (r, peak) = peak_heap(|| decode_payload(&f, 16 * MIB));
    assert_eq!(
        r,
        Err(FrameError::TooLarge {
            claimed: u32::MAX,
            max: 16 * MIB
        })
    );
    assert!(peak < 4096, "peak heap {peak} bytes");
}

#[test]
fn zstd_bomb_body_inflates_fine_when_honestly_declared() {
    // Control for the bomb builder: a 256 KiB "bomb" within its claim decodes.
    let mut f = header(1, 0, 256 * 1024);
    f.extend_from_slice(&zstd_bomb(256 * 1024, false));
    assert_eq!(decode_payload(&f, MIB).unwrap(), vec![0u8; 256 * 1024]);
}

#[test]
fn truncated_frames_fail_at_every_prefix_length() {
    let b = common::batch();
    for codec in [Codec::None, Codec::Zstd, Codec::ZstdDict(DICT_BATCH_V1)] {
        let f = encode_batch(&b, codec).unwrap();
        assert_eq!(decode_batch(&f, MIB).unwrap(), b);
        for len in 0..f.len() {
            let e = decode_batch(&f[..len], MIB).unwrap_err();
            if len < HEADER_LEN {
                assert_eq!(e, FrameError::Truncated(len));
            } else if codec == Codec::None || len == HEADER_LEN {
                // An empty zstd body is zero bytes of payload, not corrupt zstd.
                assert!(
                    matches!(e, FrameError::SizeMismatch { actual, .. } if actual == len - HEADER_LEN),
                    "{codec:?} prefix {len}: {e:?}"
                );
            } else {
                assert!(
                    matches!(e, FrameError::Inflate(_)),
                    "{codec:?} prefix {len}: {e:?}"
                );
            }
        }
    }
}

#[test]
fn wrong_magic_is_refused() {
    let mut f = encode_batch(&common::batch(), Codec::Zstd).unwrap();
    f[0] = b'X';
    assert_eq!(decode_batch(&f, MIB), Err(FrameError::BadMagic));
    assert_eq!(
        decode_batch(b"GET / HTTP/1.1\r\n\r\n", MIB),
        Err(FrameError::BadMagic)
    );
}

#[test]
fn unsupported_version_is_refused() {
    let mut f = encode_batch(&common::batch(), Codec::Zstd).unwrap();
    f[4] = 2;
    assert_eq!(
        decode_batch(&f, MIB),
        Err(FrameError::UnsupportedVersion(2))
    );
}

#[test]
fn unknown_codec_is_refused() {
    let mut f = encode_batch(&common::batch(), Codec::Zstd).unwrap();
    f[5] = 9;
    assert_eq!(decode_batch(&f, MIB), Err(FrameError::UnknownCodec(9)));
}

#[test]
fn unknown_dictionary_is_refused() {
    let mut f = encode_batch(&common::batch(), Codec::ZstdDict(DICT_BATCH_V1)).unwrap();
    f[6..10].copy_from_slice(&77u32.to_be_bytes());
    assert_eq!(
        decode_batch(&f, MIB),
        Err(FrameError::UnknownDictionary(77))
    );
    assert_eq!(
        encode_batch(&common::batch(), Codec::ZstdDict(77)),
        Err(FrameError::UnknownDictionary(77))
    );
    assert_eq!(frame::dictionary(0), None);
}

#[test]
fn oversized_raw_len_is_refused() {
    let f = encode_batch(&common::batch(), Codec::None).unwrap();
    let raw = (f.len() - HEADER_LEN) as u32;
    assert_eq!(
        decode_batch(&f, raw - 1),
        Err(FrameError::TooLarge {
            claimed: raw,
            max: raw - 1
        })
    );
    assert!(decode_batch(&f, raw).is_ok());
}

#[test]
fn size_mismatch_is_refused() {
    // Codec 0: the header claims more than the body holds.
    let mut f = encode_batch(&common::batch(), Codec::None).unwrap();
    let raw = (f.len() - HEADER_LEN) as u32;
    f[10..14].copy_from_slice(&(raw + 5).to_be_bytes());
    assert_eq!(
        decode_batch(&f, MIB),
        Err(FrameError::SizeMismatch {
            claimed: raw + 5,
            actual: raw as usize
        })
    );
    // zstd: the payload inflates to less than claimed.
    let mut f = encode_batch(&common::batch(), Codec::Zstd).unwrap();
    f[10..14].copy_from_slice(&(raw + 5).to_be_bytes());
    assert_eq!(
        decode_batch(&f, MIB),
        Err(FrameError::SizeMismatch {
            claimed: raw + 5,
            actual: raw as usize
        })
    );
    // zstd: the payload inflates to more than claimed.
    f[10..14].copy_from_slice(&(raw - 1).to_be_bytes());
    assert_eq!(
        decode_batch(&f, MIB),
        Err(FrameError::Overflow { claimed: raw - 1 })
    );
}

#[test]
fn non_contiguous_batch_is_refused_by_the_encoder() {
    let mut b = common::batch();
    b.records[2].gateway_seq = 21;
    assert_eq!(
        encode_batch(&b, Codec::Zstd),
        Err(FrameError::NotContiguous)
    );
    assert_eq!(encode_batch_auto(&b), Err(FrameError::NotContiguous));
    b.records[2].gateway_seq = 18;
    assert_eq!(
        encode_batch(&b, Codec::None),
        Err(FrameError::NotContiguous)
    );
}

/// A small deterministic generator (xorshift64*) so the "random" inputs are reproducible.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

#[test]
fn random_bytes_are_refused() {
    for seed in 1..200u64 {
        let junk = noise(seed, (seed as usize * 7) % 300 + 14);
        // Without a valid header: bad magic (the odds of "OPF1" are nil).
        assert_eq!(decode_batch(&junk, MIB), Err(FrameError::BadMagic));
        // Behind a valid zstd header: not zstd.
        let mut f = header(1, 0, 1000);
        f.extend_from_slice(&junk);
        assert!(
            matches!(decode_batch(&f, MIB), Err(FrameError::Inflate(_))),
            "seed {seed}"
        );
        // Behind a valid uncompressed header: not a batch.
        let mut f = header(0, 0, junk.len() as u32);
        f.extend_from_slice(&junk);
        assert!(
            matches!(decode_batch(&f, MIB), Err(FrameError::Cbor(_))),
            "seed {seed}"
        );
        assert!(matches!(decode_ack(&f), Err(FrameError::Cbor(_))));
    }
}

#[test]
fn every_codec_round_trips() {
    for b in [common::batch(), common::empty_batch()] {
        for codec in [Codec::None, Codec::Zstd, Codec::ZstdDict(DICT_BATCH_V1)] {
            let f = encode_batch(&b, codec).unwrap();
            assert_eq!(f[5], codec.code());
            assert_eq!(decode_batch(&f, MIB).unwrap(), b);
        }
        let f = encode_batch_auto(&b).unwrap();
        assert_eq!(f[5], 2, "small batches use the dictionary");
        assert_eq!(decode_batch(&f, MIB).unwrap(), b);
    }
}

#[test]
fn acks_round_trip_and_a_batch_is_not_an_ack() {
    let ack = Ack {
        gateway_id: common::id("gw-hc001-01"),
        journal_epoch: 9,
        acked_through: 19,
        server_time_ms: 1_795_327_090_000,
        duplicates: Some(1),
        conflicts: None,
    };
    assert_eq!(decode_ack(&encode_ack(&ack)).unwrap(), ack);
    let f = encode_payload(&outpost_protocol::cbor::to_vec(&ack), Codec::Zstd).unwrap();
    assert_eq!(decode_ack(&f).unwrap(), ack);
    let b = encode_batch(&common::batch(), Codec::None).unwrap();
    assert!(matches!(decode_ack(&b), Err(FrameError::Cbor(_))));
    assert!(matches!(
        decode_batch(&encode_ack(&ack), MIB),
        Err(FrameError::Cbor(_))
    ));
}

#[test]
fn error_kinds_are_distinct() {
    let errors = [
        FrameError::Truncated(0),
        FrameError::BadMagic,
        FrameError::UnsupportedVersion(0),
        FrameError::UnknownCodec(0),
        FrameError::UnknownDictionary(0),
        FrameError::TooLarge { claimed: 0, max: 0 },
        FrameError::Inflate(String::new()),
        FrameError::Overflow { claimed: 0 },
        FrameError::SizeMismatch {
            claimed: 0,
            actual: 0,
        },
        FrameError::Cbor(String::new()),
        FrameError::NotContiguous,
        FrameError::Encode(String::new()),
    ];
    let mut kinds: Vec<_> = errors.iter().map(FrameError::kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(kinds.len(), errors.len());
}
