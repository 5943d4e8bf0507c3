//! MQTT payloads: decoding punches and encoding the device acks.
//!
//! ## Punch messages (device → gateway, `outpost/v1/{site}/{device}/punch`)
//!
//! The encoding is recognised from the first byte that is not JSON white space: `{` or `[`
//! is JSON, anything else is CBOR. (No valid CBOR punch starts with those bytes: a punch is
//! a CBOR array, major type 4.) A payload that is printable text but not JSON is answered
//! as JSON too, so a person testing with `mosquitto_pub -m hello` reads the rejection.
//!
//! - **CBOR**: the protocol's [`Punch`], or an array of them.
//! - **JSON**: DESIGN.md's JSON form, one object or an array of objects.
//!
//! Each punch's `device_id` must equal the topic's device segment; a punch for another
//! device is rejected (`device_mismatch`) and the others in the same message still count.
//!
//! ## Ack messages (gateway → device, `outpost/v1/{site}/{device}/ack`)
//!
//! One ack message answers one punch message, in the device's encoding and shape: a single
//! punch gets a single ack, an array gets an array with one ack per punch, in order.
//!
//! - **CBOR**: [`DeviceAck`] (`[device_seq, status, gateway_seq, code]`), or an array.
//!   When a malformed message has no readable `device_seq`, the ack's first element is
//!   `null` (a device decoder that expects a number skips it, as it should: it cannot
//!   match any punch).
//! - **JSON**: `{"seq": 42, "status": "accepted", "gateway_seq": 17}`,
//!   `{"seq": 42, "status": "duplicate"}`, or
//!   `{"seq": 42, "status": "rejected", "code": "unknown_kind", "message": "…", "field": "kind"}`
//!   (`seq` is `null` when unknown; `field` only when one field is at fault).

use minicbor::data::Type;
use outpost_protocol::{json, AckStatus, DeviceAck, Punch, RejectCode};
use serde_json::{json, Value};

/// How a device encoded its message (and so how it gets its ack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// JSON text.
    Json,
    /// CBOR.
    Cbor,
}

impl Encoding {
    /// `json` or `cbor`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Cbor => "cbor",
        }
    }
}

/// Why one punch (or a whole message) was not accepted for commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The machine-readable reason.
    pub code: RejectCode,
    /// What is wrong, for people.
    pub message: String,
    /// The JSON field at fault, or empty.
    pub field: &'static str,
    /// The punch's `device_seq`, if it could be read.
    pub seq: Option<u64>,
}

impl Rejection {
    fn new(code: RejectCode, field: &'static str, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
            field,
            seq: None,
        }
    }

    fn with_seq(mut self, seq: Option<u64>) -> Self {
        self.seq = seq;
        self
    }
}

/// A decoded punch message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The device's encoding.
    pub encoding: Encoding,
    /// `true` when the device sent an array (its ack is an array too).
    pub many: bool,
    /// One entry per punch, in message order. A message that cannot be read at all is one
    /// `Err` with `many = false`.
    pub items: Vec<Result<Punch, Rejection>>,
}

impl Decoded {
    fn whole(encoding: Encoding, rej: Rejection) -> Decoded {
        Decoded {
            encoding,
            many: false,
            items: vec![Err(rej)],
        }
    }
}

/// Decodes a punch message published on the topic of `topic_device`, allowing at most
/// `max` punches. Never fails: every problem becomes a [`Rejection`] to answer.
pub fn decode(payload: &[u8], topic_device: &str, max: usize) -> Decoded {
    let first = payload
        .iter()
        .copied()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'));
    let mut d = match first {
        Some(b'{' | b'[') => decode_json(payload, max),
        None => Decoded::whole(
            Encoding::Cbor,
            Rejection::new(RejectCode::Malformed, "", "the message is empty"),
        ),
        // Printable text is never a CBOR punch: answer a text sender in JSON.
        Some(_) if is_text(payload) => decode_json(payload, max),
        Some(_) => decode_cbor(payload, max),
    };
    for item in d.items.iter_mut() {
        if let Ok(p) = item {
            if p.device_id.as_str() != topic_device {
                *item = Err(Rejection::new(
                    RejectCode::DeviceMismatch,
                    "device_id",
                    format!(
                        "punch for device {} published on the topic of device {topic_device}; publish on outpost/v1/<site>/{}/punch",
                        p.device_id, p.device_id
                    ),
                )
                .with_seq(Some(p.device_seq)));
            }
        }
    }
    d
}

/// UTF-8 without control characters other than white space.
fn is_text(payload: &[u8]) -> bool {
    std::str::from_utf8(payload).is_ok_and(|t| {
        t.chars()
            .all(|c| !c.is_control() || matches!(c, ' ' | '\t' | '\r' | '\n'))
    })
}

fn too_many(max: usize) -> Rejection {
    Rejection::new(
        RejectCode::TooLarge,
        "",
        format!("more than {max} punches in one message (mqtt.max_punches_per_message); split it"),
    )
}

fn decode_json(payload: &[u8], max: usize) -> Decoded {
    let v: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => {
            return Decoded::whole(
                Encoding::Json,
                Rejection::new(
                    RejectCode::Malformed,
                    "",
                    format!("the message is not valid JSON: {e}"),
                ),
            )
        }
    };
    let (many, values) = match v {
        Value::Array(a) => (true, a),
        other => (false, vec![other]),
    };
    if values.len() > max {
        return Decoded::whole(Encoding::Json, too_many(max));
    }
    if values.is_empty() {
        return Decoded::whole(
            Encoding::Json,
            Rejection::new(RejectCode::Malformed, "", "the array of punches is empty"),
        );
    }
    let items = values
        .iter()
        .map(|v| {
            json::punch_from_json(v).map_err(|e| {
                Rejection::new(e.code, e.field, e.message)
                    .with_seq(v.get("seq").and_then(Value::as_u64))
            })
        })
        .collect();
    Decoded {
        encoding: Encoding::Json,
        many,
        items,
    }
}

/// Best effort: the `device_seq` (element 1) of something shaped like a CBOR punch.
fn cbor_seq(bytes: &[u8]) -> Option<u64> {
    let mut d = minicbor::Decoder::new(bytes);
    d.array().ok()?;
    d.skip().ok()?;
    d.u64().ok()
}

fn decode_one_cbor(d: &mut minicbor::Decoder<'_>, bytes: &[u8]) -> Result<Punch, Rejection> {
    let start = d.position();
    match d.decode::<Punch>() {
        Ok(p) => p.validate().map(|_| p).map_err(|e| {
            Rejection::new(e.reject_code(), e.field(), e.to_string()).with_seq(Some(p.device_seq))
        }),
        Err(e) => {
            let seq = bytes.get(start..).and_then(cbor_seq);
            Err(
                Rejection::new(RejectCode::Malformed, "", format!("not a CBOR punch: {e}"))
                    .with_seq(seq),
            )
        }
    }
}

fn decode_cbor(bytes: &[u8], max: usize) -> Decoded {
    let malformed = |msg: String| {
        Decoded::whole(
            Encoding::Cbor,
            Rejection::new(RejectCode::Malformed, "", msg).with_seq(cbor_seq(bytes)),
        )
    };
    // Peek: is the first element of the outer array a string (one punch) or an array?
    let mut probe = minicbor::Decoder::new(bytes);
    let many = match probe.array() {
        Ok(_) => matches!(probe.datatype(), Ok(Type::Array | Type::ArrayIndef)),
        Err(e) => return malformed(format!("not a CBOR punch or array of punches: {e}")),
    };
    let mut d = minicbor::Decoder::new(bytes);
    let mut items = Vec::new();
    if many {
        let len = match d.array() {
            Ok(l) => l,
            Err(e) => return malformed(e.to_string()),
        };
        if len.is_some_and(|n| n > max as u64) {
            return Decoded::whole(Encoding::Cbor, too_many(max));
        }
        loop {
            match len {
                Some(n) if items.len() as u64 == n => break,
                Some(_) => {}
                None => match d.datatype() {
                    Ok(Type::Break) => {
                        d.set_position(d.position() + 1);
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => return malformed(format!("truncated CBOR array: {e}")),
                },
            }
            if items.len() >= max {
                return Decoded::whole(Encoding::Cbor, too_many(max));
            }
            let start = d.position();
            let item = decode_one_cbor(&mut d, bytes);
            if item.is_err() {
                // Skip the bad element so the rest of the array still counts.
                d.set_position(start);
                if let Err(e) = d.skip() {
                    return malformed(format!("cannot skip a bad array element: {e}"));
                }
            }
            items.push(item);
        }
    } else {
        items.push(decode_one_cbor(&mut d, bytes));
        if items[0].is_err() {
            return Decoded {
                encoding: Encoding::Cbor,
                many: false,
                items,
            };
        }
    }
    if d.position() != bytes.len() {
        return malformed("trailing bytes after the CBOR message".into());
    }
    if items.is_empty() {
        return malformed("the array of punches is empty".into());
    }
    Decoded {
        encoding: Encoding::Cbor,
        many,
        items,
    }
}

/// The answer for one punch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckItem {
    /// Stored durably under `gateway_seq`.
    Accepted {
        /// The device's seq.
        seq: u64,
        /// The journal position.
        gateway_seq: u64,
    },
    /// Already stored.
    Duplicate {
        /// The device's seq.
        seq: u64,
    },
    /// Not stored.
    Rejected(Rejection),
}

impl AckItem {
    /// `accepted`, `duplicate` or `rejected`.
    pub fn status(&self) -> AckStatus {
        match self {
            AckItem::Accepted { .. } => AckStatus::Accepted,
            AckItem::Duplicate { .. } => AckStatus::Duplicate,
            AckItem::Rejected(_) => AckStatus::Rejected,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            AckItem::Accepted { seq, gateway_seq } => {
                json!({"seq": seq, "status": "accepted", "gateway_seq": gateway_seq})
            }
            AckItem::Duplicate { seq } => json!({"seq": seq, "status": "duplicate"}),
            AckItem::Rejected(r) => {
                let mut v = json!({"seq": r.seq, "status": "rejected", "code": r.code.as_str(),
                                   "message": r.message});
                if !r.field.is_empty() {
                    v["field"] = r.field.into();
                }
                v
            }
        }
    }

    fn encode_cbor(&self, e: &mut minicbor::Encoder<&mut Vec<u8>>) {
        // Writing into a Vec cannot fail.
        let _ = match self {
            AckItem::Accepted { seq, gateway_seq } => e
                .encode(DeviceAck::accepted(*seq, *gateway_seq))
                .map(|_| ()),
            AckItem::Duplicate { seq } => e.encode(DeviceAck::duplicate(*seq)).map(|_| ()),
            AckItem::Rejected(r) => match r.seq {
                Some(seq) => e.encode(DeviceAck::rejected(seq, r.code)).map(|_| ()),
                None => e
                    .array(4)
                    .and_then(|e| e.null())
                    .and_then(|e| e.encode(AckStatus::Rejected))
                    .and_then(|e| e.null())
                    .and_then(|e| e.encode(r.code))
                    .map(|_| ()),
            },
        };
    }
}

/// Encodes the ack message for a punch message of this encoding and shape.
pub fn encode_acks(encoding: Encoding, many: bool, acks: &[AckItem]) -> Vec<u8> {
    match encoding {
        Encoding::Json => {
            let v = if many || acks.len() != 1 {
                Value::Array(acks.iter().map(AckItem::to_json).collect())
            } else {
                acks[0].to_json()
            };
            serde_json::to_vec(&v).unwrap_or_default()
        }
        Encoding::Cbor => {
            let mut buf = Vec::with_capacity(16 * acks.len() + 4);
            let mut e = minicbor::Encoder::new(&mut buf);
            if many || acks.len() != 1 {
                let _ = e.array(acks.len() as u64);
            }
            for a in acks {
                a.encode_cbor(&mut e);
            }
            buf
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn punch(device: &str, seq: u64) -> Punch {
        json::punch_from_json(&json!({"device_id": device, "seq": seq, "subject": "EMP-1",
            "kind": "in", "time": "2026-11-22T07:58:03+02:00"}))
        .unwrap()
    }

    #[test]
    fn json_single_array_and_errors() {
        let d = decode(
            br#" {"device_id":"d1","seq":42,"subject":"s","kind":"in","time":"2026-11-22T07:58:03+02:00"}"#,
            "d1",
            10,
        );
        assert_eq!((d.encoding, d.many), (Encoding::Json, false));
        assert_eq!(d.items[0].as_ref().unwrap().device_seq, 42);

        let d = decode(
            br#"[{"device_id":"d1","seq":1,"subject":"s","kind":"in","time":"2026-11-22T07:58:03+02:00"},
                 {"device_id":"d1","seq":2,"subject":"s","kind":"sideways","time":"2026-11-22T07:58:03+02:00"},
                 {"device_id":"d2","seq":3,"subject":"s","kind":"in","time":"2026-11-22T07:58:03+02:00"}]"#,
            "d1",
            10,
        );
        assert!(d.many);
        assert!(d.items[0].is_ok());
        let r = d.items[1].as_ref().unwrap_err();
        assert_eq!(
            (r.code, r.field, r.seq),
            (RejectCode::UnknownKind, "kind", Some(2))
        );
        let r = d.items[2].as_ref().unwrap_err();
        assert_eq!((r.code, r.seq), (RejectCode::DeviceMismatch, Some(3)));

        let d = decode(b"garbage", "d1", 10);
        assert_eq!(d.encoding, Encoding::Json);
        assert_eq!(d.items[0].as_ref().unwrap_err().code, RejectCode::Malformed);
        let d = decode(b"{not json", "d1", 10);
        assert_eq!(d.items.len(), 1);
        assert_eq!(d.items[0].as_ref().unwrap_err().code, RejectCode::Malformed);
        let d = decode(b"[]", "d1", 10);
        assert_eq!(d.items[0].as_ref().unwrap_err().code, RejectCode::Malformed);
        let d = decode(b"[{},{},{}]", "d1", 2);
        assert_eq!(d.items[0].as_ref().unwrap_err().code, RejectCode::TooLarge);
    }

    #[test]
    fn cbor_single_array_and_errors() {
        let one = outpost_protocol::cbor::to_vec(&punch("d1", 7));
        let d = decode(&one, "d1", 10);
        assert_eq!((d.encoding, d.many), (Encoding::Cbor, false));
        assert_eq!(d.items[0].as_ref().unwrap().device_seq, 7);

        let list = outpost_protocol::cbor::to_vec(&vec![punch("d1", 1), punch("d1", 2)]);
        let d = decode(&list, "d1", 10);
        assert!(d.many && d.items.len() == 2 && d.items.iter().all(Result::is_ok));
        assert_eq!(
            decode(&list, "d1", 1).items[0].as_ref().unwrap_err().code,
            RejectCode::TooLarge
        );

        // Wrong device on the topic.
        let d = decode(&one, "other", 10);
        let r = d.items[0].as_ref().unwrap_err();
        assert_eq!((r.code, r.seq), (RejectCode::DeviceMismatch, Some(7)));

        // [punch, 7, punch]: the middle element alone is rejected.
        let mut e = minicbor::Encoder::new(Vec::new());
        e.array(3)
            .unwrap()
            .encode(punch("d1", 1))
            .unwrap()
            .u8(7)
            .unwrap()
            .encode(punch("d1", 3))
            .unwrap();
        let d = decode(&e.into_writer(), "d1", 10);
        assert!(d.items[0].is_ok() && d.items[1].is_err() && d.items[2].is_ok());

        // Truncated: malformed, but the seq is still read for the ack.
        let d = decode(&one[..one.len() - 2], "d1", 10);
        let r = d.items[0].as_ref().unwrap_err();
        assert_eq!((r.code, r.seq), (RejectCode::Malformed, Some(7)));
        // Garbage and trailing bytes.
        assert!(decode(&[0xff, 0x00], "d1", 10).items[0].is_err());
        let mut t = one.clone();
        t.push(0);
        assert!(decode(&t, "d1", 10).items[0].is_err());
        assert!(decode(b"", "d1", 10).items[0].is_err());
    }

    #[test]
    fn acks_follow_the_shape() {
        let rej = Rejection::new(RejectCode::UnknownKind, "kind", "bad kind").with_seq(Some(9));
        let acks = [
            AckItem::Accepted {
                seq: 1,
                gateway_seq: 17,
            },
            AckItem::Duplicate { seq: 2 },
            AckItem::Rejected(rej),
        ];
        let v: Value = serde_json::from_slice(&encode_acks(Encoding::Json, true, &acks)).unwrap();
        assert_eq!(
            v[0],
            json!({"seq": 1, "status": "accepted", "gateway_seq": 17})
        );
        assert_eq!(v[1], json!({"seq": 2, "status": "duplicate"}));
        assert_eq!(v[2]["code"], "unknown_kind");
        assert_eq!(v[2]["field"], "kind");
        let v: Value =
            serde_json::from_slice(&encode_acks(Encoding::Json, false, &acks[1..2])).unwrap();
        assert_eq!(v, json!({"seq": 2, "status": "duplicate"}));

        let bytes = encode_acks(Encoding::Cbor, true, &acks);
        let back: Vec<DeviceAck> = minicbor::decode(&bytes).unwrap();
        assert_eq!(back[0], DeviceAck::accepted(1, 17));
        assert_eq!(back[1], DeviceAck::duplicate(2));
        assert_eq!(back[2], DeviceAck::rejected(9, RejectCode::UnknownKind));
        let one = encode_acks(Encoding::Cbor, false, &acks[..1]);
        assert_eq!(
            minicbor::decode::<DeviceAck>(&one).unwrap(),
            DeviceAck::accepted(1, 17)
        );

        // Unknown seq: JSON null, CBOR null first element (not a DeviceAck).
        let unknown = [AckItem::Rejected(Rejection::new(
            RejectCode::Malformed,
            "",
            "x",
        ))];
        let v: Value =
            serde_json::from_slice(&encode_acks(Encoding::Json, false, &unknown)).unwrap();
        assert_eq!(v["seq"], Value::Null);
        let bytes = encode_acks(Encoding::Cbor, false, &unknown);
        assert!(minicbor::decode::<DeviceAck>(&bytes).is_err());
        assert_eq!(bytes[0], 0x84);
    }
}
