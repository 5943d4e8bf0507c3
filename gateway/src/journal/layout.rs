//! On-disk layout: key prefixes, value encodings and the logical size of each entry.
//!
//! Everything lives in sled's default tree, so one `apply_batch` is atomic across records,
//! dedup keys, tombstones and the meta value.
//!
//! | key | value | meaning |
//! |---|---|---|
//! | `r` + gateway_seq (u64 BE) | CBOR [`Record`] | a record not yet trimmed |
//! | `d` + device_id + `0x00` + device_seq (u64 BE) | gateway_seq (u64 BE) | dedup key, for a record present or trimmed within the window |
//! | `t` + gateway_seq (u64 BE) | trimmed_at wall ms (i64 BE) + the `d` key | tombstone: a trimmed record's dedup key, kept for the window |
//! | `mstate` | CBOR [`Meta`] | format version, epoch, sequence watermarks and counters |
//!
//! Device ids contain no control characters ([`outpost_protocol::Id`]), so `0x00` cannot
//! occur inside one and the `d` key is unambiguous. Big-endian numbers make sled's key
//! order equal to numeric order, so `r` and `t` ranges iterate in gateway_seq order.

use minicbor::{Decode, Encode};
use outpost_protocol::Punch;

/// Prefix of record keys.
pub(crate) const RECORD: u8 = b'r';
/// Prefix of dedup keys.
pub(crate) const DEDUP: u8 = b'd';
/// Prefix of tombstones.
pub(crate) const TOMB: u8 = b't';
/// The single meta key.
pub(crate) const META_KEY: &[u8] = b"mstate";

/// The on-disk format this code writes and reads.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// A random journal epoch, never 0 and never `old`.
pub(crate) fn new_epoch(old: u64) -> u64 {
    loop {
        let e = rand::random::<u64>();
        if e != 0 && e != old {
            return e;
        }
    }
}

/// `r` + seq.
pub(crate) fn record_key(seq: u64) -> [u8; 9] {
    prefixed(RECORD, seq)
}

/// `t` + seq.
pub(crate) fn tomb_key(seq: u64) -> [u8; 9] {
    prefixed(TOMB, seq)
}

fn prefixed(prefix: u8, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The gateway_seq in an `r` or `t` key; `None` if the key is not one.
pub(crate) fn seq_of_key(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    (key.len() == 9).then(|| u64::from_be_bytes(bytes))
}

/// `d` + device_id + 0x00 + device_seq (BE).
pub(crate) fn dedup_key(punch: &Punch) -> Vec<u8> {
    let id = punch.device_id.as_str().as_bytes();
    let mut k = Vec::with_capacity(id.len() + 10);
    k.push(DEDUP);
    k.extend_from_slice(id);
    k.push(0);
    k.extend_from_slice(&punch.device_seq.to_be_bytes());
    k
}

/// A tombstone value: trimmed_at (i64 BE) + the dedup key.
pub(crate) fn tomb_value(trimmed_at_ms: i64, dedup_key: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + dedup_key.len());
    v.extend_from_slice(&trimmed_at_ms.to_be_bytes());
    v.extend_from_slice(dedup_key);
    v
}

/// Splits a tombstone value into (trimmed_at, dedup key).
pub(crate) fn parse_tomb_value(v: &[u8]) -> Option<(i64, &[u8])> {
    let at: [u8; 8] = v.get(..8)?.try_into().ok()?;
    Some((i64::from_be_bytes(at), &v[8..]))
}

/// The gateway_seq a dedup entry points at.
pub(crate) fn parse_seq_value(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

/// Logical bytes of a record entry (key + value).
pub(crate) fn record_size(value_len: usize) -> u64 {
    9 + value_len as u64
}

/// Logical bytes of a dedup entry (key + 8-byte value).
pub(crate) fn dedup_size(dedup_key_len: usize) -> u64 {
    dedup_key_len as u64 + 8
}

/// Logical bytes of a tombstone (key + trimmed_at + dedup key).
pub(crate) fn tomb_size(dedup_key_len: usize) -> u64 {
    9 + 8 + dedup_key_len as u64
}

/// The meta value, rewritten in every batch that changes the journal, so it always matches
/// the entries it describes (sled batches are atomic). Open reads it instead of scanning.
///
/// Invariants: records present are exactly `first_seq..next_seq` (both trim and eviction
/// remove a prefix); `trimmed_through < next_seq`; `records == next_seq - first_seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub(crate) struct Meta {
    /// [`FORMAT_VERSION`] of the writer.
    #[n(0)]
    pub format: u32,
    /// Random id of this journal, made at creation.
    #[n(1)]
    pub epoch: u64,
    /// The gateway_seq the next record gets (the first record gets 1).
    #[n(2)]
    pub next_seq: u64,
    /// Highest gateway_seq the relay acknowledged (0: none).
    #[n(3)]
    pub trimmed_through: u64,
    /// Lowest gateway_seq present; equals `next_seq` when empty.
    #[n(4)]
    pub first_seq: u64,
    /// Logical bytes of the records held: their `r` entries and their `d` keys. This is
    /// what `journal.max_bytes` limits.
    #[n(5)]
    pub record_bytes: u64,
    /// Number of `d` entries.
    #[n(6)]
    pub dedup_keys: u64,
    /// Number of `t` entries.
    #[n(7)]
    pub tombstones: u64,
    /// Logical bytes of the dedup window: `t` entries and the `d` keys of trimmed records
    /// (bounded by `dedup_window.max_keys`, not by the quota).
    #[n(8)]
    pub window_bytes: u64,
    /// Records evicted by `on_full = "drop_oldest"` over the journal's life.
    #[n(9)]
    pub evicted: u64,
}

impl Meta {
    /// The meta of a new, empty journal.
    pub(crate) fn new(epoch: u64) -> Self {
        Meta {
            format: FORMAT_VERSION,
            epoch,
            next_seq: 1,
            trimmed_through: 0,
            first_seq: 1,
            record_bytes: 0,
            dedup_keys: 0,
            tombstones: 0,
            window_bytes: 0,
            evicted: 0,
        }
    }

    /// Records present.
    pub(crate) fn records(&self) -> u64 {
        self.next_seq - self.first_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_numerically() {
        assert!(record_key(255) < record_key(256));
        assert_eq!(seq_of_key(&record_key(7)), Some(7));
        assert_eq!(seq_of_key(b"r12"), None);
        let v = tomb_value(-5, b"dx");
        let (at, k) = parse_tomb_value(&v).unwrap();
        assert_eq!((at, k), (-5, &b"dx"[..]));
    }
}
