//! The device-facing punch codec shared by HTTP (`POST /v1/punches`) and MQTT
//! (`outpost/v1/{site}/{device}/punch`): decoding a body of punches and rendering the
//! per-punch results.
//!
//! Both transports carry the same thing, so they decode and answer it the same way; only
//! the framing around the per-punch results differs (HTTP wraps them in `{"results": […]}`
//! and a status code, MQTT answers on the ack topic in the device's shape). One module
//! keeps the two from drifting apart again.
//!
//! ## Bodies
//!
//! - **JSON**: the protocol crate's JSON form ([`outpost_protocol::json`]), one object or an
//!   array of objects.
//! - **CBOR**: the protocol's [`Punch`] or an array of them. A single punch is an array
//!   whose first element is a text string; a list is an array of arrays.
//!
//! A bad element rejects only itself; the others in the same body still count. A body that
//! cannot be read at all (not JSON, not CBOR, empty, an empty array, trailing bytes, more
//! than the configured number of punches) is one whole-body [`Rejection`].
//!
//! ## Per-punch results
//!
//! One result per punch, in body order:
//!
//! - **JSON**: `{"seq": 42, "status": "accepted", "gateway_seq": 17}`,
//!   `{"seq": 42, "status": "duplicate"}`, or
//!   `{"seq": 42, "status": "rejected", "code": "unknown_kind", "message": "…", "field": "kind"}`.
//!   `seq` is always there, `null` when it could not be read. `field` is there only when
//!   one field is at fault (never `""`).
//! - **CBOR**: [`DeviceAck`] (`[device_seq, status, gateway_seq, code]`). When the seq
//!   could not be read, the first element is `null`, never a made-up number: `0` is a
//!   valid device counter, and answering it could settle a real punch in the device's
//!   outbox.
//!
//! The seq of a malformed element is recovered when it can be: from `"seq"` of a JSON
//! object, and from element 1 of a CBOR array shaped like a punch (so a device hears which
//! punch was refused even when the rest of it cannot be decoded).

use minicbor::data::Type;
use outpost_protocol::{json, AckStatus, DeviceAck, Punch, RejectCode};
use serde_json::{json, Value};

use crate::journal::Outcome;

/// How a body is encoded (and so how its results are encoded).
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

    /// Recognises the encoding of a body without a content type (MQTT): `{` or `[` as the
    /// first byte that is not JSON white space is JSON, anything else is CBOR. (No CBOR
    /// punch starts with those bytes: a punch is a CBOR array, major type 4.) Printable
    /// text that is not JSON counts as JSON too, so a person testing with
    /// `mosquitto_pub -m hello` gets a rejection they can read.
    pub fn sniff(body: &[u8]) -> Encoding {
        match body.iter().copied().find(|b| !is_json_space(*b)) {
            Some(b'{' | b'[') => Encoding::Json,
            Some(_) if is_text(body) => Encoding::Json,
            _ => Encoding::Cbor,
        }
    }
}

fn is_json_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// UTF-8 without control characters other than white space.
fn is_text(body: &[u8]) -> bool {
    std::str::from_utf8(body).is_ok_and(|t| {
        t.chars()
            .all(|c| !c.is_control() || matches!(c, ' ' | '\t' | '\r' | '\n'))
    })
}

/// Why one punch (or a whole body) was not accepted for commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The machine-readable reason.
    pub code: RejectCode,
    /// What is wrong, for people.
    pub message: String,
    /// The JSON field at fault, or empty when no single field is.
    pub field: &'static str,
    /// The punch's `device_seq`, if it could be read.
    pub seq: Option<u64>,
}

impl Rejection {
    /// A rejection without a known seq.
    pub fn new(code: RejectCode, field: &'static str, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
            field,
            seq: None,
        }
    }

    /// The same rejection, about the punch with this seq.
    pub fn with_seq(mut self, seq: Option<u64>) -> Self {
        self.seq = seq;
        self
    }
}

/// The limit on punches in one body, and the setting that raises it (named in the
/// rejection, so an operator knows what to change).
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    /// Most punches in one body.
    pub max_punches: usize,
    /// The config key, e.g. `http.max_punches_per_request`.
    pub setting: &'static str,
}

/// A decoded body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The body's encoding.
    pub encoding: Encoding,
    /// `true` when the body was an array (an MQTT ack is then an array too).
    pub many: bool,
    /// One entry per punch, in body order.
    pub items: Vec<Result<Punch, Rejection>>,
}

impl Decoded {
    /// A body that could not be read at all, answered as one rejected punch.
    pub fn whole(encoding: Encoding, rej: Rejection) -> Decoded {
        Decoded {
            encoding,
            many: false,
            items: vec![Err(rej)],
        }
    }

    /// Rejects (`device_mismatch`) every punch whose `device_id` is not `device`; `why`
    /// says, for people, where the device identity came from.
    pub fn reject_other_devices(&mut self, device: &str, why: impl Fn(&Punch) -> String) {
        for item in self.items.iter_mut() {
            if let Ok(p) = item {
                if p.device_id.as_str() != device {
                    *item = Err(
                        Rejection::new(RejectCode::DeviceMismatch, "device_id", why(p))
                            .with_seq(Some(p.device_seq)),
                    );
                }
            }
        }
    }

    /// The punches to commit, in body order.
    pub fn valid(&self) -> impl Iterator<Item = &Punch> {
        self.items.iter().filter_map(|i| i.as_ref().ok())
    }
}

/// Decodes a body. `Err` is a whole-body problem (`malformed`, or `too_large` when over
/// `limit`); element problems are `Err` items in [`Decoded::items`].
pub fn decode(body: &[u8], encoding: Encoding, limit: Limit) -> Result<Decoded, Rejection> {
    if body.iter().all(|b| is_json_space(*b)) {
        return Err(Rejection::new(
            RejectCode::Malformed,
            "",
            "the body is empty",
        ));
    }
    match encoding {
        Encoding::Json => decode_json(body, limit),
        Encoding::Cbor => decode_cbor(body, limit),
    }
}

fn too_many(limit: Limit) -> Rejection {
    Rejection::new(
        RejectCode::TooLarge,
        "",
        format!(
            "more than {} punches at once ({}); split them",
            limit.max_punches, limit.setting
        ),
    )
}

fn empty_array() -> Rejection {
    Rejection::new(RejectCode::Malformed, "", "the array of punches is empty")
}

fn decode_json(body: &[u8], limit: Limit) -> Result<Decoded, Rejection> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        Rejection::new(
            RejectCode::Malformed,
            "",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let (many, values) = match v {
        Value::Array(a) => (true, a),
        other => (false, vec![other]),
    };
    if values.len() > limit.max_punches {
        return Err(too_many(limit));
    }
    if values.is_empty() {
        return Err(empty_array());
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
    Ok(Decoded {
        encoding: Encoding::Json,
        many,
        items,
    })
}

/// Best effort: the `device_seq` (element 1) of something shaped like a CBOR punch.
fn cbor_seq(bytes: &[u8]) -> Option<u64> {
    let mut d = minicbor::Decoder::new(bytes);
    d.array().ok()?;
    d.skip().ok()?;
    d.u64().ok()
}

/// Decodes and validates one punch at the decoder's position. On error the position is
/// unspecified; the caller skips the element from where it started.
fn decode_one_cbor(d: &mut minicbor::Decoder<'_>, bytes: &[u8]) -> Result<Punch, Rejection> {
    let start = d.position();
    match d.decode::<Punch>() {
        Ok(p) => p.validate().map(|_| p).map_err(|e| {
            Rejection::new(e.reject_code(), e.field(), e.to_string()).with_seq(Some(p.device_seq))
        }),
        Err(e) => Err(
            Rejection::new(RejectCode::Malformed, "", format!("not a CBOR punch: {e}"))
                .with_seq(bytes.get(start..).and_then(cbor_seq)),
        ),
    }
}

fn decode_cbor(bytes: &[u8], limit: Limit) -> Result<Decoded, Rejection> {
    let malformed =
        |msg: String| Rejection::new(RejectCode::Malformed, "", msg).with_seq(cbor_seq(bytes));
    // Peek: is the first element of the outer array a string (one punch) or an array?
    let mut probe = minicbor::Decoder::new(bytes);
    let many = match probe.array() {
        Ok(_) => matches!(probe.datatype(), Ok(Type::Array | Type::ArrayIndef)),
        Err(e) => {
            return Err(malformed(format!(
                "not a CBOR punch or array of punches: {e}"
            )))
        }
    };
    let mut d = minicbor::Decoder::new(bytes);
    let mut items = Vec::new();
    if many {
        let len = d.array().map_err(|e| malformed(e.to_string()))?;
        if len.is_some_and(|n| n > limit.max_punches as u64) {
            return Err(too_many(limit));
        }
        loop {
            match len {
                Some(n) if items.len() as u64 == n => break,
                Some(_) => {}
                None => match d.datatype() {
                    Ok(Type::Break) => {
                        // Consume the 0xff that ends an indefinite-length array.
                        d.set_position(d.position() + 1);
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => return Err(malformed(format!("truncated CBOR array: {e}"))),
                },
            }
            if items.len() >= limit.max_punches {
                return Err(too_many(limit));
            }
            let start = d.position();
            let item = decode_one_cbor(&mut d, bytes);
            if item.is_err() {
                // Skip the bad element so the rest of the array still counts.
                d.set_position(start);
                d.skip()
                    .map_err(|e| malformed(format!("cannot skip a bad array element: {e}")))?;
            }
            items.push(item);
        }
    } else {
        let item = decode_one_cbor(&mut d, bytes);
        let bad = item.is_err();
        items.push(item);
        if bad {
            // A single punch that does not decode is answered as that punch (with its
            // seq when readable); what follows it does not matter.
            return Ok(Decoded {
                encoding: Encoding::Cbor,
                many: false,
                items,
            });
        }
    }
    if d.position() != bytes.len() {
        return Err(malformed("trailing bytes after the CBOR message".into()));
    }
    if items.is_empty() {
        return Err(empty_array());
    }
    Ok(Decoded {
        encoding: Encoding::Cbor,
        many,
        items,
    })
}

/// The answer for one punch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PunchResult {
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

impl PunchResult {
    /// The result for a punch the committer answered with `outcome`.
    pub fn from_outcome(punch: &Punch, outcome: Outcome) -> PunchResult {
        let seq = punch.device_seq;
        match outcome {
            Outcome::Accepted { gateway_seq } => PunchResult::Accepted { seq, gateway_seq },
            Outcome::Duplicate => PunchResult::Duplicate { seq },
            Outcome::Rejected(code) => PunchResult::Rejected(
                Rejection::new(code, "", storage_message(code)).with_seq(Some(seq)),
            ),
        }
    }

    /// `accepted`, `duplicate` or `rejected`.
    pub fn status(&self) -> AckStatus {
        match self {
            PunchResult::Accepted { .. } => AckStatus::Accepted,
            PunchResult::Duplicate { .. } => AckStatus::Duplicate,
            PunchResult::Rejected(_) => AckStatus::Rejected,
        }
    }

    /// The status as the metrics label spells it.
    pub fn label(&self) -> &'static str {
        match self {
            PunchResult::Accepted { .. } => "accepted",
            PunchResult::Duplicate { .. } => "duplicate",
            PunchResult::Rejected(_) => "rejected",
        }
    }

    /// The JSON form (see the module docs).
    pub fn to_json(&self) -> Value {
        match self {
            PunchResult::Accepted { seq, gateway_seq } => {
                json!({"seq": seq, "status": "accepted", "gateway_seq": gateway_seq})
            }
            PunchResult::Duplicate { seq } => json!({"seq": seq, "status": "duplicate"}),
            PunchResult::Rejected(r) => {
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
            PunchResult::Accepted { seq, gateway_seq } => e
                .encode(DeviceAck::accepted(*seq, *gateway_seq))
                .map(|_| ()),
            PunchResult::Duplicate { seq } => e.encode(DeviceAck::duplicate(*seq)).map(|_| ()),
            PunchResult::Rejected(r) => match r.seq {
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

/// What a device is told when the committer could not store its punch.
fn storage_message(code: RejectCode) -> &'static str {
    match code {
        RejectCode::StorageFull => "the gateway's journal is full; keep the punch and retry later",
        RejectCode::Unavailable => "the gateway is shutting down; retry shortly",
        _ => "the gateway could not store the punch; retry later",
    }
}

/// Pairs decoded items with the committer's outcomes for the valid ones (in the same
/// order as [`Decoded::valid`]). A missing outcome is answered `internal`.
pub fn results(
    items: Vec<Result<Punch, Rejection>>,
    outcomes: &mut impl Iterator<Item = Outcome>,
) -> Vec<PunchResult> {
    items
        .into_iter()
        .map(|item| match item {
            Ok(punch) => PunchResult::from_outcome(
                &punch,
                outcomes
                    .next()
                    .unwrap_or(Outcome::Rejected(RejectCode::Internal)),
            ),
            Err(rej) => PunchResult::Rejected(rej),
        })
        .collect()
}

/// Encodes results in `encoding`: one result alone when the body was a single punch
/// (`many = false`), else an array.
pub fn encode_results(encoding: Encoding, many: bool, results: &[PunchResult]) -> Vec<u8> {
    let as_array = many || results.len() != 1;
    match encoding {
        Encoding::Json => {
            let v = if as_array {
                Value::Array(results.iter().map(PunchResult::to_json).collect())
            } else {
                results[0].to_json()
            };
            serde_json::to_vec(&v).unwrap_or_default()
        }
        Encoding::Cbor => {
            let mut buf = Vec::with_capacity(16 * results.len() + 4);
            let mut e = minicbor::Encoder::new(&mut buf);
            if as_array {
                let _ = e.array(results.len() as u64);
            }
            for r in results {
                r.encode_cbor(&mut e);
            }
            buf
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        max_punches: 10,
        setting: "test.max",
    };

    fn limit(max_punches: usize) -> Limit {
        Limit {
            max_punches,
            setting: "test.max",
        }
    }

    fn punch(device: &str, seq: u64) -> Punch {
        json::punch_from_json(&json!({"device_id": device, "seq": seq, "subject": "EMP-1",
            "kind": "in", "time": "2026-11-22T07:58:03+02:00"}))
        .unwrap()
    }

    fn sniffed(body: &[u8], max: usize) -> Result<Decoded, Rejection> {
        decode(body, Encoding::sniff(body), limit(max))
    }

    #[test]
    fn sniffing() {
        assert_eq!(Encoding::sniff(b" {"), Encoding::Json);
        assert_eq!(Encoding::sniff(b"\n[1]"), Encoding::Json);
        assert_eq!(Encoding::sniff(b"hello"), Encoding::Json);
        assert_eq!(Encoding::sniff(&[0x82, 0x01]), Encoding::Cbor);
        assert_eq!(Encoding::sniff(b""), Encoding::Cbor);
    }

    #[test]
    fn json_single_array_and_errors() {
        let d = sniffed(
            br#" {"device_id":"d1","seq":42,"subject":"s","kind":"in","time":"2026-11-22T07:58:03+02:00"}"#,
            10,
        )
        .unwrap();
        assert_eq!((d.encoding, d.many), (Encoding::Json, false));
        assert_eq!(d.items[0].as_ref().unwrap().device_seq, 42);

        let mut d = sniffed(
            br#"[{"device_id":"d1","seq":1,"subject":"s","kind":"in","time":"2026-11-22T07:58:03+02:00"},
                 {"device_id":"d1","seq":2,"subject":"s","kind":"sideways","time":"2026-11-22T07:58:03+02:00"},
                 {"device_id":"d2","seq":3,"subject":"s","kind":"in","time":"2026-11-22T07:58:03+02:00"}]"#,
            10,
        )
        .unwrap();
        d.reject_other_devices("d1", |p| format!("not {}", p.device_id));
        assert!(d.many);
        assert!(d.items[0].is_ok());
        assert_eq!(d.valid().count(), 1);
        let r = d.items[1].as_ref().unwrap_err();
        assert_eq!(
            (r.code, r.field, r.seq),
            (RejectCode::UnknownKind, "kind", Some(2))
        );
        let r = d.items[2].as_ref().unwrap_err();
        assert_eq!(
            (r.code, r.field, r.seq),
            (RejectCode::DeviceMismatch, "device_id", Some(3))
        );

        for (body, code) in [
            (&b"garbage"[..], RejectCode::Malformed),
            (b"{not json", RejectCode::Malformed),
            (b"[]", RejectCode::Malformed),
            (b"  ", RejectCode::Malformed),
            (b"[{},{},{}]", RejectCode::TooLarge),
        ] {
            let r = sniffed(body, 2).unwrap_err();
            assert_eq!(r.code, code, "{}", String::from_utf8_lossy(body));
        }
        assert!(sniffed(b"[{},{},{}]", 2)
            .unwrap_err()
            .message
            .contains("test.max"));
        // A JSON body declared as JSON is JSON even when it does not look like it.
        assert!(decode(b"hello", Encoding::Json, LIMIT).is_err());
    }

    #[test]
    fn cbor_single_array_and_errors() {
        let one = outpost_protocol::cbor::to_vec(&punch("d1", 7));
        let d = sniffed(&one, 10).unwrap();
        assert_eq!((d.encoding, d.many), (Encoding::Cbor, false));
        assert_eq!(d.items[0].as_ref().unwrap().device_seq, 7);

        let list = outpost_protocol::cbor::to_vec(&vec![punch("d1", 1), punch("d1", 2)]);
        let d = sniffed(&list, 10).unwrap();
        assert!(d.many && d.items.len() == 2 && d.items.iter().all(Result::is_ok));
        assert_eq!(sniffed(&list, 1).unwrap_err().code, RejectCode::TooLarge);

        // Wrong device.
        let mut d = sniffed(&one, 10).unwrap();
        d.reject_other_devices("other", |_| "x".into());
        let r = d.items[0].as_ref().unwrap_err();
        assert_eq!((r.code, r.seq), (RejectCode::DeviceMismatch, Some(7)));

        // [punch, 7, truncated-looking punch, punch]: the bad elements alone are rejected,
        // with the seq when one can be read.
        let mut e = minicbor::Encoder::new(Vec::new());
        e.array(4)
            .unwrap()
            .encode(punch("d1", 1))
            .unwrap()
            .u8(7)
            .unwrap()
            .array(2)
            .unwrap()
            .str("d1")
            .unwrap()
            .u64(5)
            .unwrap()
            .encode(punch("d1", 3))
            .unwrap();
        let d = sniffed(&e.into_writer(), 10).unwrap();
        assert!(d.items[0].is_ok() && d.items[3].is_ok());
        assert_eq!(d.items[1].as_ref().unwrap_err().seq, None);
        let r = d.items[2].as_ref().unwrap_err();
        assert_eq!((r.code, r.seq), (RejectCode::Malformed, Some(5)));

        // Truncated single punch: malformed, but the seq is still read for the ack.
        let d = sniffed(&one[..one.len() - 2], 10).unwrap();
        let r = d.items[0].as_ref().unwrap_err();
        assert_eq!((r.code, r.seq), (RejectCode::Malformed, Some(7)));
        // Garbage, trailing bytes, nothing.
        assert!(sniffed(&[0xff, 0x00], 10).is_err());
        let mut t = one.clone();
        t.push(0);
        let r = sniffed(&t, 10).unwrap_err();
        assert_eq!((r.code, r.seq), (RejectCode::Malformed, Some(7)));
        assert!(sniffed(b"", 10).is_err());
        // An empty CBOR array reads as a punch with nothing in it.
        let d = decode(&[0x80], Encoding::Cbor, LIMIT).unwrap();
        assert_eq!(d.items[0].as_ref().unwrap_err().code, RejectCode::Malformed);
    }

    #[test]
    fn results_follow_outcomes_and_shape() {
        let items = vec![
            Ok(punch("d1", 1)),
            Err(Rejection::new(RejectCode::UnknownKind, "kind", "bad kind").with_seq(Some(9))),
            Ok(punch("d1", 2)),
            Ok(punch("d1", 3)),
        ];
        let mut outcomes =
            vec![Outcome::Accepted { gateway_seq: 17 }, Outcome::Duplicate].into_iter();
        let res = results(items, &mut outcomes);
        assert_eq!(
            res[3],
            PunchResult::Rejected(
                Rejection::new(
                    RejectCode::Internal,
                    "",
                    storage_message(RejectCode::Internal)
                )
                .with_seq(Some(3))
            ),
            "a missing outcome is internal"
        );
        let v: Value = serde_json::from_slice(&encode_results(Encoding::Json, true, &res)).unwrap();
        assert_eq!(
            v[0],
            json!({"seq": 1, "status": "accepted", "gateway_seq": 17})
        );
        assert_eq!(v[1]["code"], "unknown_kind");
        assert_eq!(v[1]["field"], "kind");
        assert_eq!(v[2], json!({"seq": 2, "status": "duplicate"}));
        assert!(
            v[3].get("field").is_none(),
            "no field when none is at fault: {v}"
        );
        let v: Value =
            serde_json::from_slice(&encode_results(Encoding::Json, false, &res[2..3])).unwrap();
        assert_eq!(v, json!({"seq": 2, "status": "duplicate"}));

        let bytes = encode_results(Encoding::Cbor, true, &res);
        let back: Vec<DeviceAck> = minicbor::decode(&bytes).unwrap();
        assert_eq!(back[0], DeviceAck::accepted(1, 17));
        assert_eq!(back[1], DeviceAck::rejected(9, RejectCode::UnknownKind));
        assert_eq!(back[2], DeviceAck::duplicate(2));
        let one = encode_results(Encoding::Cbor, false, &res[..1]);
        assert_eq!(
            minicbor::decode::<DeviceAck>(&one).unwrap(),
            DeviceAck::accepted(1, 17)
        );

        // Unknown seq: JSON null, CBOR null first element (not a DeviceAck).
        let unknown = [PunchResult::Rejected(Rejection::new(
            RejectCode::Malformed,
            "",
            "x",
        ))];
        let v: Value =
            serde_json::from_slice(&encode_results(Encoding::Json, false, &unknown)).unwrap();
        assert_eq!(v["seq"], Value::Null);
        assert!(v.as_object().unwrap().contains_key("seq"));
        assert!(v.get("field").is_none());
        let bytes = encode_results(Encoding::Cbor, false, &unknown);
        assert!(minicbor::decode::<DeviceAck>(&bytes).is_err());
        assert_eq!(bytes[0], 0x84);
    }
}
