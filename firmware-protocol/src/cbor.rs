//! CBOR helpers that work with or without a heap.

use minicbor::encode::write::{Cursor, EndOfSlice};
use minicbor::{Decode, Encode};

/// Encoding into a fixed buffer failed because the buffer is too small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferTooSmall;

impl core::fmt::Display for BufferTooSmall {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("buffer too small for the encoded message")
    }
}

#[cfg(feature = "std")]
impl std::error::Error for BufferTooSmall {}

/// Encodes `value` into `buf` without allocating; returns the number of bytes written.
pub fn encode_to_slice<T: Encode<()>>(value: &T, buf: &mut [u8]) -> Result<usize, BufferTooSmall> {
    let mut cursor = Cursor::new(buf);
    minicbor::encode(value, &mut cursor)
        .map_err(|_: minicbor::encode::Error<EndOfSlice>| BufferTooSmall)?;
    Ok(cursor.position())
}

/// Decodes one value from `bytes`, refusing trailing garbage.
pub fn decode_exact<'b, T: Decode<'b, ()>>(bytes: &'b [u8]) -> Result<T, minicbor::decode::Error> {
    let mut d = minicbor::Decoder::new(bytes);
    let v = d.decode()?;
    if d.position() != bytes.len() {
        return Err(minicbor::decode::Error::message(
            "trailing bytes after the message",
        ));
    }
    Ok(v)
}

/// Encodes `value` into a new `Vec<u8>`.
///
/// Writing into a `Vec` cannot fail, and every type in this crate encodes without error
/// except a [`crate::Batch`] that breaks its invariants (records not contiguous, or more
/// than [`crate::batch::MAX_BATCH_RECORDS`]); for such a batch this returns an empty
/// vector. Use [`try_to_vec`] (or `frame::encode_batch`) when that can happen.
#[cfg(feature = "alloc")]
pub fn to_vec<T: Encode<()>>(value: &T) -> alloc::vec::Vec<u8> {
    try_to_vec(value).unwrap_or_default()
}

/// Encodes `value` into a new `Vec<u8>`, reporting a value that refuses to encode.
#[cfg(feature = "alloc")]
pub fn try_to_vec<T: Encode<()>>(
    value: &T,
) -> Result<alloc::vec::Vec<u8>, minicbor::encode::Error<core::convert::Infallible>> {
    minicbor::to_vec(value)
}
