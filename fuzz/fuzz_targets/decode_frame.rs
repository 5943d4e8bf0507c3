//! Any bytes as an uplink frame: the batch and ack decoders must fail cleanly, never panic,
//! and never hold more than the raw-size limit. A decoded batch must re-encode and decode
//! to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::frame::{self, Codec};

fuzz_target!(|data: &[u8]| {
    let _ = frame::decode_ack(data);
    if let Ok(batch) = frame::decode_batch(data, 1 << 20) {
        let again = frame::encode_batch(&batch, Codec::None).expect("a decoded batch encodes");
        assert_eq!(frame::decode_batch(&again, 1 << 24).ok(), Some(batch));
    }
});
