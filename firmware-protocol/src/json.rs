//! The JSON form of a punch, for HTTP clients, MQTT devices that prefer JSON, exports and
//! the relay's query API.
//!
//! ```json
//! {"device_id": "door-1", "seq": 42, "subject": "EMP-0042", "kind": "in",
//!  "verify": "card", "time": "2026-11-22T07:58:03+02:00"}
//! ```
//!
//! | field | required | meaning |
//! |---|---|---|
//! | `device_id` | yes | the device, 1–64 bytes, no `/ + #` or control characters |
//! | `seq` | no | the device's own counter (below 2^63); derived from the content when absent ([`crate::seq`]) |
//! | `subject` | yes | badge or employee code, 1–64 bytes |
//! | `kind` | yes | `in`, `out`, `break_out`, `break_in`, `overtime_in`, `overtime_out`, `unspecified` |
//! | `verify` | no | `card`, `fingerprint`, `face`, `pin`, `palm`, `manual`, `unknown` (default) |
//! | `time` | yes | RFC 3339 with an offset (`Z` or `±hh:mm`), between 2000 and 2100 |
//!
//! Unknown fields are ignored, so newer clients can talk to older gateways.

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::ack::RejectCode;
use crate::id::Id;
use crate::punch::{Punch, PunchKind, VerifyMethod};
use crate::seq::{derive_seq, DERIVED_BIT};

/// A specific problem with one JSON punch: a code, a message for people, and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Machine-readable reason.
    pub code: RejectCode,
    /// What is wrong and what to send instead.
    pub message: String,
    /// The JSON field at fault (empty when the whole value is wrong).
    pub field: &'static str,
}

impl FieldError {
    fn new(code: RejectCode, field: &'static str, message: impl Into<String>) -> Self {
        FieldError {
            code,
            message: message.into(),
            field,
        }
    }
}

fn str_field<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(FieldError::new(
            RejectCode::Malformed,
            field,
            "must be a string",
        )),
    }
}

fn required<'a>(obj: &'a Map<String, Value>, field: &'static str) -> Result<&'a str, FieldError> {
    str_field(obj, field)?
        .ok_or_else(|| FieldError::new(RejectCode::Malformed, field, "is required"))
}

/// Parses an RFC 3339 time with offset into (Unix ms, offset minutes).
pub fn parse_time(s: &str) -> Result<(i64, i16), FieldError> {
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| {
        FieldError::new(
            RejectCode::InvalidTime,
            "time",
            "must be RFC 3339 with an offset, such as 2026-11-22T07:58:03+02:00",
        )
    })?;
    let ms = i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| FieldError::new(RejectCode::TimeOutOfRange, "time", "is out of range"))?;
    Ok((ms, t.offset().whole_minutes()))
}

/// Formats Unix ms as RFC 3339, in the given offset (UTC when `None`), with milliseconds
/// only when they are not zero.
pub fn format_time(ms: i64, offset_min: Option<i16>) -> String {
    let offset = offset_min
        .and_then(|m| UtcOffset::from_whole_seconds(i32::from(m) * 60).ok())
        .unwrap_or(UtcOffset::UTC);
    let Ok(t) = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) else {
        return ms.to_string();
    };
    let rfc3339 = |t: OffsetDateTime| t.replace_nanosecond(0).unwrap_or(t).format(&Rfc3339).ok();
    // An offset RFC 3339 cannot express (24 h or more), or one that pushes the local time
    // past the representable range, is shown in UTC instead; a year RFC 3339 cannot hold
    // (before 0 or after 9999) as plain Unix ms. (Only invalid punches have these.)
    let formatted = t
        .checked_to_offset(offset)
        .and_then(rfc3339)
        .or_else(|| rfc3339(t));
    let Some(mut s) = formatted else {
        return ms.to_string();
    };
    if ms.rem_euclid(1000) != 0 {
        // Insert ".mmm" before the offset.
        let frac = format!(".{:03}", ms.rem_euclid(1000));
        let at = s.rfind(['Z', '+', '-']).unwrap_or(s.len());
        s.insert_str(at, &frac);
    }
    s
}

/// Parses and validates one JSON punch. Every failure names its field.
pub fn punch_from_json(v: &Value) -> Result<Punch, FieldError> {
    let obj = v.as_object().ok_or_else(|| {
        FieldError::new(RejectCode::Malformed, "", "a punch must be a JSON object")
    })?;
    let device = required(obj, "device_id")?;
    let device_id = Id::new_topic_safe(device)
        .map_err(|e| FieldError::new(RejectCode::InvalidDeviceId, "device_id", e.to_string()))?;
    let subject = required(obj, "subject")?;
    let subject_id = Id::new(subject)
        .map_err(|e| FieldError::new(RejectCode::InvalidSubject, "subject", e.to_string()))?;
    let kind_s = required(obj, "kind")?;
    let kind = PunchKind::from_name(kind_s).ok_or_else(|| {
        FieldError::new(
            RejectCode::UnknownKind,
            "kind",
            "must be one of in, out, break_out, break_in, overtime_in, overtime_out, unspecified",
        )
    })?;
    let verify = match str_field(obj, "verify")? {
        None => VerifyMethod::Unknown,
        Some(s) => VerifyMethod::from_name(s).ok_or_else(|| {
            FieldError::new(
                RejectCode::UnknownVerify,
                "verify",
                "must be one of card, fingerprint, face, pin, palm, manual, unknown",
            )
        })?,
    };
    let time_s = required(obj, "time")?;
    let (device_time_ms, offset) = parse_time(time_s)?;
    let device_seq = match obj.get("seq") {
        None | Some(Value::Null) => derive_seq(&[
            device.as_bytes(),
            subject.as_bytes(),
            kind.as_str().as_bytes(),
            device_time_ms.to_string().as_bytes(),
        ]),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(s) if s < DERIVED_BIT => s,
            _ => {
                return Err(FieldError::new(
                    RejectCode::Malformed,
                    "seq",
                    "must be a whole number from 0 to 2^63-1",
                ))
            }
        },
        Some(_) => {
            return Err(FieldError::new(
                RejectCode::Malformed,
                "seq",
                "must be a number",
            ))
        }
    };
    let punch = Punch {
        device_id,
        device_seq,
        subject_id,
        kind,
        verify,
        device_time_ms,
        utc_offset_min: Some(offset),
    };
    punch
        .validate()
        .map_err(|e| FieldError::new(e.reject_code(), e.field(), e.to_string()))?;
    Ok(punch)
}

/// The JSON object for a punch (the fields of the table above; `seq` always present).
pub fn punch_to_json(p: &Punch) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("device_id".into(), p.device_id.as_str().into());
    m.insert("seq".into(), p.device_seq.into());
    m.insert("subject".into(), p.subject_id.as_str().into());
    m.insert("kind".into(), p.kind.as_str().into());
    m.insert("verify".into(), p.verify.as_str().into());
    m.insert(
        "time".into(),
        format_time(p.device_time_ms, p.utc_offset_min).into(),
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn design_example_parses_and_round_trips() {
        let v = json!({"device_id": "door-1", "seq": 42, "subject": "EMP-0042", "kind": "in",
                       "verify": "card", "time": "2026-11-22T07:58:03+02:00"});
        let p = punch_from_json(&v).unwrap();
        assert_eq!(p.device_seq, 42);
        assert_eq!(p.utc_offset_min, Some(120));
        assert_eq!(p.device_time_ms, 1_795_327_083_000);
        assert_eq!(Value::Object(punch_to_json(&p)), v);
    }

    #[test]
    fn missing_seq_is_derived_and_stable() {
        let v = json!({"device_id": "d", "subject": "s", "kind": "out", "time": "2026-01-01T00:00:00Z"});
        let a = punch_from_json(&v).unwrap();
        let b = punch_from_json(&v).unwrap();
        assert_eq!(a.device_seq, b.device_seq);
        assert!(crate::seq::is_derived(a.device_seq));
        assert_eq!(a.verify, VerifyMethod::Unknown);
    }

    #[test]
    fn errors_name_fields() {
        let base =
            json!({"device_id": "d", "subject": "s", "kind": "in", "time": "2026-01-01T00:00:00Z"});
        let cases = [
            ("kind", json!("sideways"), RejectCode::UnknownKind),
            ("verify", json!("retina"), RejectCode::UnknownVerify),
            (
                "time",
                json!("2026-01-01 00:00:00"),
                RejectCode::InvalidTime,
            ),
            (
                "time",
                json!("1970-01-01T00:00:00Z"),
                RejectCode::TimeOutOfRange,
            ),
            ("device_id", json!("a/b"), RejectCode::InvalidDeviceId),
            ("device_id", json!(""), RejectCode::InvalidDeviceId),
            ("subject", json!("x".repeat(65)), RejectCode::InvalidSubject),
            ("seq", json!(-1), RejectCode::Malformed),
            ("seq", json!(u64::MAX), RejectCode::Malformed),
            ("subject", json!(7), RejectCode::Malformed),
        ];
        for (field, value, code) in cases {
            let mut v = base.clone();
            v[field] = value;
            let e = punch_from_json(&v).unwrap_err();
            assert_eq!((e.field, e.code), (field, code), "{v}");
        }
        let e = punch_from_json(&json!([1])).unwrap_err();
        assert_eq!(e.code, RejectCode::Malformed);
    }

    #[test]
    fn time_formatting() {
        assert_eq!(
            format_time(1_795_327_083_000, Some(120)),
            "2026-11-22T07:58:03+02:00"
        );
        assert_eq!(
            format_time(1_795_327_083_250, None),
            "2026-11-22T05:58:03.250Z"
        );
        assert_eq!(
            format_time(1_795_327_083_000, Some(-90)),
            "2026-11-22T04:28:03-01:30"
        );
        // Any i64 and offset: never a panic (the relay shows invalid records with this).
        for ms in [i64::MIN, -1, 0, 253_402_300_799_000, i64::MAX] {
            for off in [
                None,
                Some(i16::MIN),
                Some(-1559),
                Some(1559),
                Some(i16::MAX),
            ] {
                assert!(!format_time(ms, off).is_empty());
            }
        }
        assert_eq!(
            format_time(253_402_300_799_000, Some(1080)),
            "9999-12-31T23:59:59Z",
            "a local time past year 9999 is shown in UTC"
        );
    }
}
