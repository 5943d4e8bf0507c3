//! `POST /v1/punches`: punches from devices over HTTP.
//!
//! ## Request
//!
//! - `Authorization: Bearer <device token>` (unless `auth.required = false`). A device may
//!   only post punches whose `device_id` is its own.
//! - Body: one punch or an array of punches, as JSON (DESIGN.md's JSON form; the default) or
//!   as CBOR (`Content-Type: application/cbor`, the protocol crate's `Punch` or an array).
//!
//! ## Response
//!
//! One result per punch, in order. JSON: `{"results": [{"status": "accepted", "seq": 42,
//! "gateway_seq": 17}, {"status": "duplicate", "seq": 43}, {"status": "rejected", "code":
//! "unknown_kind", "message": "…", "field": "kind"}]}`, plus `"error"` (the first rejection)
//! when the status is 4xx/5xx. CBOR requests get a CBOR array of `DeviceAck`.
//!
//! | status | when |
//! |---|---|
//! | 201 | every punch accepted |
//! | 200 | accepted and duplicates only |
//! | 400 | a punch or the body is invalid (the valid ones in the same request are still stored) |
//! | 401 / 403 | no or unknown token / punches for another device |
//! | 413 | body over `http.max_body_bytes` or more than `http.max_punches_per_request` punches |
//! | 415 | a content type other than JSON or CBOR |
//! | 429 | over the device's rate limit; `Retry-After` says when to retry |
//! | 503 | the gateway is shutting down or failed to write; retry |
//! | 507 | the journal is full (`journal.max_bytes`) or the disk is; keep the punches and retry |
//!
//! Nothing is acknowledged before the committer's fsync has returned.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use outpost_protocol::{json, DeviceAck, Punch, RejectCode, Source};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::auth::{bearer, DeviceTable};
use crate::clock::Clock;
use crate::committer::CommitterHandle;
use crate::journal::{Outcome, Pending};
use crate::metrics::{IngestLabels, Metrics};
use crate::ratelimit::RateLimiter;

/// What the HTTP ingest handler needs.
#[derive(Clone)]
pub struct HttpIngest {
    /// Where punches go.
    pub committer: CommitterHandle,
    /// Arrival stamps.
    pub clock: Clock,
    /// Counters.
    pub metrics: Metrics,
    /// Current device credentials (reloaded on change).
    pub devices: watch::Receiver<Arc<DeviceTable>>,
    /// `auth.required`.
    pub auth_required: bool,
    /// Per-device limiter.
    pub limiter: Arc<RateLimiter>,
    /// `http.max_body_bytes`.
    pub max_body_bytes: usize,
    /// `http.max_punches_per_request`.
    pub max_punches: usize,
}

/// The routes served by this module.
pub fn router(state: HttpIngest) -> Router {
    Router::new()
        .route("/v1/punches", post(post_punches))
        .with_state(state)
}

/// One parsed element of the request: a valid punch, or why not.
type Parsed = Result<Punch, Rejection>;

#[derive(Debug, Clone)]
struct Rejection {
    code: RejectCode,
    message: String,
    field: &'static str,
    seq: Option<u64>,
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
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Json,
    Cbor,
}

fn error_response(status: StatusCode, code: RejectCode, message: &str, field: &str) -> Response {
    let body = json!({"error": {"code": code.as_str(), "message": message, "field": field}});
    (status, axum::Json(body)).into_response()
}

async fn post_punches(
    State(st): State<HttpIngest>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // 1. Who is this?
    let device = if st.auth_required {
        let table = st.devices.borrow().clone();
        match bearer(headers.get(header::AUTHORIZATION)).and_then(|t| table.device_for_token(t)) {
            Some(d) => Some(d.to_string()),
            None => {
                st.metrics.reject("unauthorized");
                return error_response(
                    StatusCode::UNAUTHORIZED,
                    RejectCode::Unauthorized,
                    "missing or unknown device token: send `Authorization: Bearer <token>` with a token from `outpost-gateway device add <device_id>`",
                    "",
                );
            }
        }
    } else {
        None
    };

    // 2. Rate limit by device (or by address in lab mode).
    let key = device.clone().unwrap_or_else(|| peer.ip().to_string());
    if let Err(wait) = st.limiter.check(&key) {
        st.metrics.reject("rate_limited");
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut r = error_response(
            StatusCode::TOO_MANY_REQUESTS,
            RejectCode::RateLimited,
            &format!("too many requests from {key}; retry after {secs} s"),
            "",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return r;
    }

    // 3. Body, bounded.
    let encoding = match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        None => Encoding::Json,
        Some(ct) => {
            let mime = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            match mime.as_str() {
                "application/json" | "text/json" | "" => Encoding::Json,
                "application/cbor" => Encoding::Cbor,
                _ => {
                    st.metrics.reject("unsupported_media_type");
                    return error_response(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        RejectCode::Malformed,
                        "send application/json or application/cbor",
                        "",
                    );
                }
            }
        }
    };
    let bytes = match axum::body::to_bytes(body, st.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            st.metrics.reject("too_large");
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                RejectCode::TooLarge,
                &format!(
                    "body larger than {} bytes (http.max_body_bytes)",
                    st.max_body_bytes
                ),
                "",
            );
        }
    };

    // 4. Parse every element; a bad element rejects only itself.
    let parsed = match encoding {
        Encoding::Json => parse_json(&bytes, st.max_punches),
        Encoding::Cbor => parse_cbor(&bytes, st.max_punches),
    };
    let mut parsed = match parsed {
        Ok(p) => p,
        Err((status, rej)) => {
            st.metrics.reject(rej.code.as_str());
            return error_response(status, rej.code, &rej.message, rej.field);
        }
    };

    // 5. A device may only speak for itself.
    if let Some(dev) = &device {
        for p in parsed.iter_mut() {
            if let Ok(punch) = p {
                if punch.device_id.as_str() != dev {
                    *p = Err(Rejection {
                        seq: Some(punch.device_seq),
                        ..Rejection::new(
                            RejectCode::DeviceMismatch,
                            "device_id",
                            format!(
                                "this token belongs to device {dev}, not {}",
                                punch.device_id
                            ),
                        )
                    });
                }
            }
        }
    }

    // 6. Commit the valid ones; wait for the fsync.
    let received = st.clock.now();
    let pending: Vec<Pending> = parsed
        .iter()
        .filter_map(|p| p.as_ref().ok())
        .map(|punch| Pending {
            punch: *punch,
            received,
            source: Source::Http,
        })
        .collect();
    let mut outcomes = st.committer.submit(pending).await.into_iter();

    // 7. Stitch outcomes back in request order.
    let results: Vec<(Option<u64>, Result<Outcome, Rejection>)> = parsed
        .into_iter()
        .map(|p| match p {
            Ok(punch) => {
                let o = outcomes
                    .next()
                    .unwrap_or(Outcome::Rejected(RejectCode::Internal));
                (Some(punch.device_seq), Ok(o))
            }
            Err(r) => (r.seq, Err(r)),
        })
        .collect();
    respond(&st.metrics, encoding, results)
}

fn respond(
    metrics: &Metrics,
    encoding: Encoding,
    results: Vec<(Option<u64>, Result<Outcome, Rejection>)>,
) -> Response {
    let mut status = StatusCode::CREATED;
    let mut first_error: Option<Value> = None;
    let mut retry_after = false;
    let mut acks = Vec::with_capacity(results.len());
    let mut items = Vec::with_capacity(results.len());
    for (seq, r) in results {
        let (ack, item, outcome) = match r {
            Ok(Outcome::Accepted { gateway_seq }) => (
                DeviceAck::accepted(seq.unwrap_or(0), gateway_seq),
                json!({"status": "accepted", "seq": seq, "gateway_seq": gateway_seq}),
                "accepted",
            ),
            Ok(Outcome::Duplicate) => {
                if status == StatusCode::CREATED {
                    status = StatusCode::OK;
                }
                (
                    DeviceAck::duplicate(seq.unwrap_or(0)),
                    json!({"status": "duplicate", "seq": seq}),
                    "duplicate",
                )
            }
            Ok(Outcome::Rejected(code)) => {
                let message = match code {
                    RejectCode::StorageFull => {
                        "the gateway's journal is full; keep the punch and retry later"
                    }
                    RejectCode::Unavailable => "the gateway is shutting down; retry shortly",
                    _ => "the gateway could not store the punch; retry later",
                };
                let rej = Rejection {
                    seq,
                    ..Rejection::new(code, "", message)
                };
                rejected(
                    &mut status,
                    &mut first_error,
                    &mut retry_after,
                    metrics,
                    rej,
                    seq,
                )
            }
            Err(rej) => rejected(
                &mut status,
                &mut first_error,
                &mut retry_after,
                metrics,
                rej,
                seq,
            ),
        };
        metrics
            .ingest
            .get_or_create(&IngestLabels {
                source: "http",
                outcome,
            })
            .inc();
        acks.push(ack);
        items.push(item);
    }
    let mut resp = match encoding {
        Encoding::Json => {
            let mut body = json!({"results": items});
            if let Some(e) = first_error {
                body["error"] = e;
            }
            (status, axum::Json(body)).into_response()
        }
        Encoding::Cbor => (
            status,
            [(header::CONTENT_TYPE, "application/cbor")],
            Bytes::from(outpost_protocol::cbor::to_vec(&acks)),
        )
            .into_response(),
    };
    if retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(5u32));
    }
    resp
}

/// Records a rejection and raises the response status by severity:
/// 507 (storage full) > 503 (unavailable) > 400 (invalid) > 403 (mismatch) > 2xx.
fn rejected(
    status: &mut StatusCode,
    first_error: &mut Option<Value>,
    retry_after: &mut bool,
    metrics: &Metrics,
    rej: Rejection,
    seq: Option<u64>,
) -> (DeviceAck, Value, &'static str) {
    metrics.reject(rej.code.as_str());
    let this = match rej.code {
        RejectCode::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
        RejectCode::Unavailable | RejectCode::Internal => StatusCode::SERVICE_UNAVAILABLE,
        RejectCode::DeviceMismatch => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_REQUEST,
    };
    let rank = |s: StatusCode| match s.as_u16() {
        507 => 4,
        503 => 3,
        400 => 2,
        403 => 1,
        _ => 0,
    };
    if rank(this) > rank(*status) {
        *status = this;
    }
    if matches!(this.as_u16(), 503 | 507) {
        *retry_after = true;
    }
    let err = json!({"code": rej.code.as_str(), "message": rej.message, "field": rej.field});
    if first_error.is_none() {
        *first_error = Some(err.clone());
    }
    let mut item = json!({"status": "rejected", "code": rej.code.as_str(), "message": rej.message, "field": rej.field});
    if let Some(s) = seq {
        item["seq"] = s.into();
    }
    (
        DeviceAck::rejected(seq.unwrap_or(0), rej.code),
        item,
        "rejected",
    )
}

type ParseError = (StatusCode, Rejection);

fn too_many(max: usize) -> ParseError {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        Rejection::new(
            RejectCode::TooLarge,
            "",
            format!(
                "more than {max} punches in one request (http.max_punches_per_request); split it"
            ),
        ),
    )
}

fn parse_json(bytes: &[u8], max: usize) -> Result<Vec<Parsed>, ParseError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            Rejection::new(
                RejectCode::Malformed,
                "",
                format!("body is not valid JSON: {e}"),
            ),
        )
    })?;
    let values = match v {
        Value::Array(a) => a,
        other => vec![other],
    };
    if values.len() > max {
        return Err(too_many(max));
    }
    if values.is_empty() {
        return Err((
            StatusCode::BAD_REQUEST,
            Rejection::new(RejectCode::Malformed, "", "the array of punches is empty"),
        ));
    }
    Ok(values
        .iter()
        .map(|v| {
            json::punch_from_json(v).map_err(|e| Rejection {
                code: e.code,
                message: e.message,
                field: e.field,
                seq: v.get("seq").and_then(Value::as_u64),
            })
        })
        .collect())
}

/// CBOR body: a `Punch` (an array whose first element is a text string) or an array of them.
fn parse_cbor(bytes: &[u8], max: usize) -> Result<Vec<Parsed>, ParseError> {
    use minicbor::data::Type;
    let malformed = |msg: String| {
        (
            StatusCode::BAD_REQUEST,
            Rejection::new(RejectCode::Malformed, "", msg),
        )
    };
    let mut d = minicbor::Decoder::new(bytes);
    // Peek: is the first element of the outer array a string (one punch) or an array?
    let mut probe = d.clone();
    let is_list = match probe.array() {
        Ok(_) => matches!(probe.datatype(), Ok(Type::Array | Type::ArrayIndef)),
        Err(e) => {
            return Err(malformed(format!(
                "body is not a CBOR punch or array of punches: {e}"
            )))
        }
    };
    let mut out = Vec::new();
    if is_list {
        let len = d.array().map_err(|e| malformed(e.to_string()))?;
        if len.is_some_and(|n| n > max as u64) {
            return Err(too_many(max));
        }
        loop {
            match len {
                Some(n) if out.len() as u64 == n => break,
                Some(_) => {}
                None => {
                    let t = d
                        .datatype()
                        .map_err(|e| malformed(format!("truncated CBOR array: {e}")))?;
                    if t == Type::Break {
                        // Consume the 0xff that ends an indefinite-length array.
                        d.set_position(d.position() + 1);
                        break;
                    }
                }
            }
            if out.len() >= max {
                return Err(too_many(max));
            }
            let start = d.position();
            let item = match d.decode::<Punch>() {
                Ok(p) => p.validate().map(|_| p).map_err(|e| Rejection {
                    seq: Some(p.device_seq),
                    ..Rejection::new(e.reject_code(), e.field(), e.to_string())
                }),
                Err(e) => {
                    // Skip the bad element so the rest of the array still counts.
                    d.set_position(start);
                    d.skip()
                        .map_err(|e2| malformed(format!("cannot skip bad element: {e2}")))?;
                    Err(Rejection::new(
                        RejectCode::Malformed,
                        "",
                        format!("not a punch: {e}"),
                    ))
                }
            };
            out.push(item);
        }
    } else {
        let p: Punch = d
            .decode()
            .map_err(|e| malformed(format!("not a punch: {e}")))?;
        out.push(
            p.validate()
                .map(|_| p)
                .map_err(|e| Rejection::new(e.reject_code(), e.field(), e.to_string())),
        );
    }
    if d.position() != bytes.len() {
        return Err(malformed("trailing bytes after the CBOR message".into()));
    }
    if out.is_empty() {
        return Err(malformed("the array of punches is empty".into()));
    }
    Ok(out)
}

/// How long a rate-limited client is told to wait at least.
pub const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_single_and_array() {
        let one =
            br#"{"device_id":"d","subject":"s","kind":"in","time":"2026-11-22T07:58:03+02:00"}"#;
        assert_eq!(parse_json(one, 10).unwrap().len(), 1);
        let arr = br#"[{"device_id":"d","subject":"s","kind":"in","time":"2026-11-22T07:58:03+02:00"},{"kind":"x"}]"#;
        let p = parse_json(arr, 10).unwrap();
        assert!(p[0].is_ok());
        assert!(p[1].is_err());
        assert_eq!(
            parse_json(arr, 1).unwrap_err().0,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(parse_json(b"{", 10).unwrap_err().0, StatusCode::BAD_REQUEST);
        assert_eq!(
            parse_json(b"[]", 10).unwrap_err().0,
            StatusCode::BAD_REQUEST
        );
    }

    fn punch(seq: u64) -> Punch {
        json::punch_from_json(
            &json!({"device_id": "d", "seq": seq, "subject": "s", "kind": "in",
            "time": "2026-11-22T07:58:03+02:00"}),
        )
        .unwrap()
    }

    #[test]
    fn cbor_single_array_and_bad_element() {
        let one = outpost_protocol::cbor::to_vec(&punch(1));
        let p = parse_cbor(&one, 10).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].as_ref().unwrap().device_seq, 1);

        let list = outpost_protocol::cbor::to_vec(&vec![punch(1), punch(2)]);
        let p = parse_cbor(&list, 10).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            parse_cbor(&list, 1).unwrap_err().0,
            StatusCode::PAYLOAD_TOO_LARGE
        );

        // [punch, 7, punch]: the middle element is rejected, the others stand.
        let mut e = minicbor::Encoder::new(Vec::new());
        e.array(3)
            .unwrap()
            .encode(punch(1))
            .unwrap()
            .u8(7)
            .unwrap()
            .encode(punch(3))
            .unwrap();
        let bytes = e.into_writer();
        let p = parse_cbor(&bytes, 10).unwrap();
        assert!(p[0].is_ok() && p[1].is_err() && p[2].is_ok());

        assert!(parse_cbor(&[0xff, 0x00], 10).is_err());
        assert!(parse_cbor(&one[..one.len() - 1], 10).is_err());
    }
}
