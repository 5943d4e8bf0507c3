//! The relay's JSON error body, shared by every route.
//!
//! Kept apart from the handlers (`app`, `intake`) so that each can answer errors the same
//! way without importing the other.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The JSON error body of the relay's API: `{"error": {"code", "message", "field"}}`.
/// A 401 carries `WWW-Authenticate: Bearer`; a 503 carries `Retry-After: 5`.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message, "field": ""}});
    let mut r = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    r
}
