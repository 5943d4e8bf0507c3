//! Derived device sequence numbers for sources that have no counter of their own.
//!
//! ADMS terminals and plain HTTP clients do not number their punches. The gateway derives a
//! `device_seq` from the punch's content, so that a resend of the same punch gets the same
//! number and is recognised as a duplicate.
//!
//! Algorithm (stable, part of the contract so firmware and other tools can reproduce it):
//! 64-bit FNV-1a over the UTF-8 parts, each followed by the byte `0x1F`; then the top bit is
//! set. Real device counters stay below 2^63, so a derived number can never collide with one.

/// The bit that marks a derived `device_seq`.
pub const DERIVED_BIT: u64 = 1 << 63;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Derives a `device_seq` from the given parts (for example device, subject, time, kind).
pub fn derive_seq(parts: &[&[u8]]) -> u64 {
    let mut h = FNV_OFFSET;
    for part in parts {
        for &b in part.iter().chain(core::iter::once(&0x1f)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
    }
    h | DERIVED_BIT
}

/// `true` if `seq` was derived from content rather than counted by a device.
pub fn is_derived(seq: u64) -> bool {
    seq & DERIVED_BIT != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_marked() {
        // Pinned: changing the algorithm would turn every resend into a new punch.
        assert_eq!(derive_seq(&[b"zk:ABC", b"1001"]), 0xe932_33a2_e133_7f88);
        assert!(is_derived(derive_seq(&[])));
        assert_ne!(derive_seq(&[b"ab", b"c"]), derive_seq(&[b"a", b"bc"]));
    }
}
