//! `POST /v1/punches`: punches from devices over HTTP.
//!
//! ## Request
//!
//! - `Authorization: Bearer <device token>` (unless `auth.required = false`). A device may
//!   only post punches whose `device_id` is its own.
//! - Rate limit: per device, the token's; in lab mode each punch's `device_id` (a request
//!   with no valid punch counts against the client's address).
//! - Body: one punch or an array of punches, as JSON (the protocol crate's JSON form; the
//!   default) or as CBOR (`Content-Type: application/cbor`, the protocol crate's `Punch` or
//!   an array), decoded by [`punch_body`], the codec MQTT uses too.
//!
//! ## Response
//!
//! One result per punch, in order, rendered by [`punch_body`]. JSON: `{"results": [{"status":
//! "accepted", "seq": 42, "gateway_seq": 17}, {"status": "duplicate", "seq": 43}, {"status":
//! "rejected", "seq": 44, "code": "unknown_kind", "message": "…", "field": "kind"}]}`, plus
//! `"error"` (the first rejection, `{"code", "message", "field"}`) when the status is
//! 4xx/5xx. In a result, `seq` is `null` when it could not be read and `field` is left out
//! when no single field is at fault. CBOR requests get a CBOR array of `DeviceAck`. A body
//! that cannot be read at all gets only `{"error": …}`.
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
use outpost_ops::bearer::bearer;
use outpost_protocol::{RejectCode, Source};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::auth::DeviceTable;
use crate::clock::Clock;
use crate::committer::CommitterHandle;
use crate::ingest::punch_body::{self, Encoding, Limit, PunchResult, Rejection};
use crate::journal::Pending;
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

/// How long a rate-limited client is told to wait at least (`Retry-After` has whole
/// seconds, and 0 would invite an immediate retry).
pub const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The error object every gateway endpoint answers with: `{"code", "message", "field"}`,
/// `field` being `""` when no single field is at fault. (Per-punch results leave an empty
/// `field` out instead; see [`punch_body`].)
fn error_body(code: RejectCode, message: &str, field: &str) -> Value {
    json!({"code": code.as_str(), "message": message, "field": field})
}

fn error_response(status: StatusCode, code: RejectCode, message: &str, field: &str) -> Response {
    let body = json!({"error": error_body(code, message, field)});
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

    // 2. Rate limit by the token's device, before reading the body. (Lab mode has no
    // token: it limits after parsing, by the punches' devices; see step 4.)
    if let Some(dev) = &device {
        if let Some(r) = throttled(&st, std::slice::from_ref(dev)) {
            return r;
        }
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
    let limit = Limit {
        max_punches: st.max_punches,
        setting: "http.max_punches_per_request",
    };
    let decoded = punch_body::decode(&bytes, encoding, limit);

    // Lab mode: every device its own bucket, as with tokens, so devices (or a test client)
    // behind one address are not throttled together. A body with no valid punch is
    // limited by the client's address.
    if device.is_none() {
        let mut keys: Vec<String> = match &decoded {
            Ok(d) => d
                .valid()
                .map(|p| p.device_id.as_str().to_string())
                .collect(),
            Err(_) => Vec::new(),
        };
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            keys.push(peer.ip().to_string());
        }
        if let Some(r) = throttled(&st, &keys) {
            return r;
        }
    }

    let mut decoded = match decoded {
        Ok(d) => d,
        Err(rej) => {
            st.metrics.reject(rej.code.as_str());
            let status = match rej.code {
                RejectCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            return error_response(status, rej.code, &rej.message, rej.field);
        }
    };

    // 5. A device may only speak for itself.
    if let Some(dev) = &device {
        decoded.reject_other_devices(dev, |p| {
            format!("this token belongs to device {dev}, not {}", p.device_id)
        });
    }

    // 6. Commit the valid ones; wait for the fsync.
    let received = st.clock.now();
    let pending: Vec<Pending> = decoded
        .valid()
        .map(|punch| Pending {
            punch: *punch,
            received,
            source: Source::Http,
        })
        .collect();
    let mut outcomes = st.committer.submit(pending).await.into_iter();

    // 7. Answer in request order.
    let results = punch_body::results(decoded.items, &mut outcomes);
    respond(&st.metrics, encoding, &results)
}

/// Takes a token from each key's bucket; the 429 answer for the first one that is empty.
/// (Keys before it keep their spent token: a request for several devices is rare, and
/// the bucket refills.)
fn throttled(st: &HttpIngest, keys: &[String]) -> Option<Response> {
    for key in keys {
        if let Err(wait) = st.limiter.check(key) {
            st.metrics.reject("rate_limited");
            let secs = wait.max(MIN_RETRY_AFTER).as_secs_f64().ceil() as u64;
            let mut r = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                RejectCode::RateLimited,
                &format!("too many requests from {key}; retry after {secs} s"),
                "",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return Some(r);
        }
    }
    None
}

fn respond(metrics: &Metrics, encoding: Encoding, results: &[PunchResult]) -> Response {
    let mut status = StatusCode::CREATED;
    let mut first_error: Option<&Rejection> = None;
    for r in results {
        metrics
            .ingest
            .get_or_create(&IngestLabels {
                source: "http",
                outcome: r.label(),
            })
            .inc();
        let this = match r {
            PunchResult::Accepted { .. } => StatusCode::CREATED,
            PunchResult::Duplicate { .. } => StatusCode::OK,
            PunchResult::Rejected(rej) => {
                metrics.reject(rej.code.as_str());
                first_error.get_or_insert(rej);
                rejection_status(rej.code)
            }
        };
        if rank(this) > rank(status) {
            status = this;
        }
    }
    let mut resp = match encoding {
        Encoding::Json => {
            let items: Vec<Value> = results.iter().map(PunchResult::to_json).collect();
            let mut body = json!({"results": items});
            if let Some(e) = first_error {
                body["error"] = error_body(e.code, &e.message, e.field);
            }
            (status, axum::Json(body)).into_response()
        }
        Encoding::Cbor => (
            status,
            [(header::CONTENT_TYPE, "application/cbor")],
            Bytes::from(punch_body::encode_results(Encoding::Cbor, true, results)),
        )
            .into_response(),
    };
    if matches!(status.as_u16(), 503 | 507) {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(5u32));
    }
    resp
}

/// The status a rejected punch asks for.
fn rejection_status(code: RejectCode) -> StatusCode {
    match code {
        RejectCode::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
        RejectCode::Unavailable | RejectCode::Internal => StatusCode::SERVICE_UNAVAILABLE,
        RejectCode::DeviceMismatch => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// The response status is the most severe of the punches':
/// 507 (storage full) > 503 (unavailable) > 400 (invalid) > 403 (mismatch) > 200 > 201.
fn rank(s: StatusCode) -> u8 {
    match s.as_u16() {
        507 => 5,
        503 => 4,
        400 => 3,
        403 => 2,
        200 => 1,
        _ => 0,
    }
}
