//! Uplink frames: the envelope around every message between gateway and relay.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "OPF1"
//! 4       1     version (1)
//! 5       1     codec: 0 none, 1 zstd, 2 zstd with dictionary
//! 6       4     dict_id, u32 big-endian (0 unless codec = 2)
//! 10      4     raw_len, u32 big-endian: length of the payload after decompression
//! 14      ..    payload
//! ```
//!
//! The payload, once decompressed, is one CBOR message: a [`Batch`] from gateway to relay,
//! an [`Ack`] from relay to gateway. The same bytes travel as a WebSocket binary message on
//! `/v1/uplink` or as the body of `POST /v1/batches`.
//!
//! Decoding is bounded. The caller passes the largest raw size it accepts; a header that
//! claims more is refused before anything is allocated, the output buffer is exactly
//! `raw_len` bytes, and a payload that inflates past its claimed `raw_len` is refused by the
//! decompressor as soon as it overflows that buffer ([`FrameError::Overflow`]). A "zstd
//! bomb" therefore costs at most `raw_len` bytes of memory and the time to fill them.
//!
//! ## Compression
//!
//! zstd frames are written without the optional content size and dictionary id fields
//! (the frame header already carries both), and without a checksum (the transport has one).
//! Dictionary [`DICT_BATCH_V1`] was trained on realistic encoded batches
//! (`cargo run -p outpost-tests --bin train-dict`). It pays most for small batches, so
//! [`encode_batch_auto`] uses it up to [`DICT_MAX_RAW`] raw bytes and plain zstd above.

use crate::batch::{Ack, Batch};
use crate::cbor;

/// The four magic bytes at the start of every frame.
pub const MAGIC: [u8; 4] = *b"OPF1";
/// The frame format version this crate writes and reads.
pub const VERSION: u8 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 14;

/// How the payload is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Raw CBOR.
    None,
    /// zstd at the given level.
    Zstd,
    /// zstd with the dictionary named by `dict_id` (see [`dictionary`]).
    ZstdDict(u32),
}

impl Codec {
    /// The codec byte in the frame header.
    pub fn code(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Zstd => 1,
            Codec::ZstdDict(_) => 2,
        }
    }
}

/// The zstd level used for frames: fast enough for a Raspberry Pi, and most of the gain.
pub const ZSTD_LEVEL: i32 = 3;

/// Why a frame could not be encoded or decoded. Every variant is a distinct, stable kind
/// so that the relay can count and report them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the 14-byte header.
    #[error("frame truncated: {0} bytes, the header alone is 14")]
    Truncated(usize),
    /// The first four bytes are not `OPF1`.
    #[error("not an Outpost frame (bad magic)")]
    BadMagic,
    /// A version this build does not understand.
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    /// A codec byte this build does not understand.
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    /// A dictionary id this build does not ship.
    #[error("unknown zstd dictionary {0}")]
    UnknownDictionary(u32),
    /// The header claims a raw size above the caller's limit.
    #[error("frame claims {claimed} raw bytes, the limit is {max}")]
    TooLarge {
        /// What the header says.
        claimed: u32,
        /// The caller's limit.
        max: u32,
    },
    /// The payload is not valid zstd (corrupt or truncated).
    #[error("payload does not decompress: {0}")]
    Inflate(String),
    /// The payload inflates to more than the header's `raw_len` (a decompression bomb, or
    /// a wrong header). Decompression stopped when the `raw_len` buffer was full.
    #[error("payload inflates past its declared {claimed} raw bytes")]
    Overflow {
        /// What the header says.
        claimed: u32,
    },
    /// The payload decompressed to a different length than the header claims.
    #[error("payload is {actual} bytes, the header claims {claimed}")]
    SizeMismatch {
        /// What the header says.
        claimed: u32,
        /// What came out.
        actual: usize,
    },
    /// The decompressed payload is not the expected CBOR message.
    #[error("payload is not a valid message: {0}")]
    Cbor(String),
    /// Encoding a batch whose records are not contiguous by gateway_seq. (The batch wire
    /// format cannot express a gap, so decoding never returns this.)
    #[error("batch records are not contiguous by gateway_seq")]
    NotContiguous,
    /// The message is too large to frame (over 4 GiB) or compression failed.
    #[error("cannot encode frame: {0}")]
    Encode(String),
}

impl FrameError {
    /// A short stable name for metrics and WebSocket close reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            FrameError::Truncated(_) => "truncated",
            FrameError::BadMagic => "bad_magic",
            FrameError::UnsupportedVersion(_) => "unsupported_version",
            FrameError::UnknownCodec(_) => "unknown_codec",
            FrameError::UnknownDictionary(_) => "unknown_dictionary",
            FrameError::TooLarge { .. } => "too_large",
            FrameError::Inflate(_) => "inflate",
            FrameError::Overflow { .. } => "overflow",
            FrameError::SizeMismatch { .. } => "size_mismatch",
            FrameError::Cbor(_) => "cbor",
            FrameError::NotContiguous => "not_contiguous",
            FrameError::Encode(_) => "encode",
        }
    }
}

/// The id of the dictionary trained on encoded batches (see the module docs).
pub const DICT_BATCH_V1: u32 = 1;

/// The zstd dictionary named [`DICT_BATCH_V1`].
static BATCH_V1: &[u8] = include_bytes!("../dict/batch-v1.zdict");

/// Payloads up to this many raw bytes (about 1800 realistic records) use [`DICT_BATCH_V1`].
/// Measured with `wire-sizes`, it saves 34% at 1 record, 29% at 10, 16% at 100 and 4% at
/// 1000; beyond that the batch's own tables carry the context and plain zstd is as good.
pub const DICT_MAX_RAW: usize = 32 * 1024;

/// The zstd dictionaries this build ships, by id. Id 0 is never a dictionary.
pub fn dictionary(dict_id: u32) -> Option<&'static [u8]> {
    match dict_id {
        DICT_BATCH_V1 => Some(BATCH_V1),
        _ => None,
    }
}

/// The parsed fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Payload codec byte.
    pub codec: u8,
    /// Dictionary id (codec 2).
    pub dict_id: u32,
    /// Declared decompressed length.
    pub raw_len: u32,
}

/// Reads and checks the header without touching the payload.
pub fn read_header(frame: &[u8]) -> Result<Header, FrameError> {
    if frame.len() < HEADER_LEN {
        return Err(FrameError::Truncated(frame.len()));
    }
    if frame[0..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if frame[4] != VERSION {
        return Err(FrameError::UnsupportedVersion(frame[4]));
    }
    let word =
        |at: usize| u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
    Ok(Header {
        codec: frame[5],
        dict_id: word(6),
        raw_len: word(10),
    })
}

fn zstd_error(code: zstd::zstd_safe::ErrorCode) -> String {
    zstd::zstd_safe::get_error_name(code).to_string()
}

/// zstd's stable error number for "destination buffer is too small" (`ZSTD_error_dstSize_tooSmall`).
const ZSTD_DST_TOO_SMALL: usize = 70;

fn is_dst_too_small(code: zstd::zstd_safe::ErrorCode) -> bool {
    // zstd returns errors as (size_t)-errno.
    code.wrapping_neg() == ZSTD_DST_TOO_SMALL
}

fn compress(payload: &[u8], dict: Option<&[u8]>) -> Result<Vec<u8>, FrameError> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let fail = |c| FrameError::Encode(zstd_error(c));
    let mut cctx = CCtx::try_create()
        .ok_or_else(|| FrameError::Encode("cannot allocate a zstd context".into()))?;
    cctx.set_parameter(CParameter::CompressionLevel(ZSTD_LEVEL))
        .map_err(fail)?;
    // Both are in the Outpost header already; leaving them out saves up to 8 bytes a frame.
    cctx.set_parameter(CParameter::ContentSizeFlag(false))
        .map_err(fail)?;
    cctx.set_parameter(CParameter::DictIdFlag(false))
        .map_err(fail)?;
    cctx.set_parameter(CParameter::ChecksumFlag(false))
        .map_err(fail)?;
    if let Some(dict) = dict {
        cctx.load_dictionary(dict).map_err(fail)?;
    }
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(payload.len()));
    cctx.compress2(&mut out, payload).map_err(fail)?;
    Ok(out)
}

/// Wraps a CBOR payload in a frame, compressing it with `codec`.
pub fn encode_payload(payload: &[u8], codec: Codec) -> Result<Vec<u8>, FrameError> {
    let raw_len = u32::try_from(payload.len())
        .map_err(|_| FrameError::Encode("payload over 4 GiB".into()))?;
    let (dict_id, body) = match codec {
        Codec::None => (0, payload.to_vec()),
        Codec::Zstd => (0, compress(payload, None)?),
        Codec::ZstdDict(id) => {
            let dict = dictionary(id).ok_or(FrameError::UnknownDictionary(id))?;
            (id, compress(payload, Some(dict))?)
        }
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(codec.code());
    out.extend_from_slice(&dict_id.to_be_bytes());
    out.extend_from_slice(&raw_len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Unwraps a frame into its raw CBOR payload, never holding more than `max_raw` bytes.
pub fn decode_payload(frame: &[u8], max_raw: u32) -> Result<Vec<u8>, FrameError> {
    let h = read_header(frame)?;
    let body = &frame[HEADER_LEN..];
    let dict = match h.codec {
        0 | 1 => None,
        2 => Some(dictionary(h.dict_id).ok_or(FrameError::UnknownDictionary(h.dict_id))?),
        c => return Err(FrameError::UnknownCodec(c)),
    };
    if h.raw_len > max_raw {
        return Err(FrameError::TooLarge {
            claimed: h.raw_len,
            max: max_raw,
        });
    }
    let raw = if h.codec == 0 {
        body.to_vec()
    } else {
        // A zstd frame may state its own content size; a bomb that says so is caught here.
        if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(body) {
            if size > u64::from(h.raw_len) {
                return Err(FrameError::Overflow { claimed: h.raw_len });
            }
        }
        let mut dctx = zstd::zstd_safe::DCtx::try_create()
            .ok_or_else(|| FrameError::Inflate("cannot allocate a zstd context".into()))?;
        // The output buffer is exactly raw_len and never grows: zstd fails the moment it
        // would write more.
        let mut out = Vec::with_capacity(h.raw_len as usize);
        let written = match dict {
            None => dctx.decompress(&mut out, body),
            Some(dict) => dctx.decompress_using_dict(&mut out, body, dict),
        };
        match written {
            Ok(_) => out,
            Err(code) if is_dst_too_small(code) => {
                return Err(FrameError::Overflow { claimed: h.raw_len })
            }
            Err(code) => return Err(FrameError::Inflate(zstd_error(code))),
        }
    };
    if raw.len() != h.raw_len as usize {
        return Err(FrameError::SizeMismatch {
            claimed: h.raw_len,
            actual: raw.len(),
        });
    }
    Ok(raw)
}

fn batch_payload(batch: &Batch) -> Result<Vec<u8>, FrameError> {
    if !batch.is_contiguous() {
        return Err(FrameError::NotContiguous);
    }
    cbor::try_to_vec(batch).map_err(|e| FrameError::Encode(e.to_string()))
}

/// Encodes a batch as a frame with the given codec.
pub fn encode_batch(batch: &Batch, codec: Codec) -> Result<Vec<u8>, FrameError> {
    encode_payload(&batch_payload(batch)?, codec)
}

/// Encodes a batch as a frame with the codec that suits its size: zstd with
/// [`DICT_BATCH_V1`] up to [`DICT_MAX_RAW`] raw bytes, plain zstd above. What a gateway
/// should normally send.
pub fn encode_batch_auto(batch: &Batch) -> Result<Vec<u8>, FrameError> {
    let payload = batch_payload(batch)?;
    let codec = if payload.len() <= DICT_MAX_RAW {
        Codec::ZstdDict(DICT_BATCH_V1)
    } else {
        Codec::Zstd
    };
    encode_payload(&payload, codec)
}

/// Decodes a batch frame, holding at most `max_raw` decompressed bytes.
pub fn decode_batch(frame: &[u8], max_raw: u32) -> Result<Batch, FrameError> {
    let raw = decode_payload(frame, max_raw)?;
    cbor::decode_exact(&raw).map_err(|e| FrameError::Cbor(e.to_string()))
}

/// Encodes an ack as an uncompressed frame.
pub fn encode_ack(ack: &Ack) -> Vec<u8> {
    // An Ack is a few dozen bytes, far below any limit; codec None cannot fail.
    encode_payload(&cbor::to_vec(ack), Codec::None).unwrap_or_default()
}

/// Decodes an ack frame (any codec; an ack is never larger than [`MAX_ACK_RAW`]).
pub fn decode_ack(frame: &[u8]) -> Result<Ack, FrameError> {
    let raw = decode_payload(frame, MAX_ACK_RAW)?;
    cbor::decode_exact(&raw).map_err(|e| FrameError::Cbor(e.to_string()))
}

/// The largest raw ack payload [`decode_ack`] accepts.
pub const MAX_ACK_RAW: u32 = 4096;
