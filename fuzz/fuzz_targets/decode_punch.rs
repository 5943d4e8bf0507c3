//! Any bytes as a device's CBOR punch (and its ack): decoding must fail cleanly or give a
//! value that re-encodes to something that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::{cbor, DeviceAck, Punch};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = cbor::decode_exact::<Punch>(data) {
        let _ = p.validate();
        let mut buf = [0u8; 512];
        let n = cbor::encode_to_slice(&p, &mut buf).expect("a punch fits 512 bytes");
        assert_eq!(cbor::decode_exact::<Punch>(&buf[..n]).ok(), Some(p));
    }
    let _ = cbor::decode_exact::<DeviceAck>(data);
});
