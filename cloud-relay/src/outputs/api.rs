//! The outputs' admin API, behind the gates of `app` (which checks the token first):
//!
//! | route | auth | what |
//! |---|---|---|
//! | `GET /v1/outputs` | admin or read token | `{"outputs": [...]}`, each [`super::control::OutputStatus::to_json`] |
//! | `POST /v1/outputs/{name}/replay` | admin | body `{"from": <cursor or RFC 3339 time>}`: the punches from that cursor on (0 = all), or stored from that time on, are delivered again; answers the output's status |
//! | `POST /v1/outputs/{name}/enable` | admin | answers the output's status |
//!
//! An unknown name is a 404 naming the configured outputs.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use outpost_protocol::json::parse_time;
use serde_json::{json, Value};

use super::control::{self, ControlError, ReplayFrom};
use super::supervisor::OutputSpec;
use crate::auth::Scope;
use crate::error::error_response;
use crate::state::AppState;

fn store_error(e: crate::store::StoreError) -> Response {
    let text = e.report();
    tracing::error!(error = %text, "outputs API: store failed");
    error_response(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", &text)
}

fn find<'a>(state: &'a AppState, name: &str) -> Result<&'a OutputSpec, Response> {
    state
        .outputs
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            let known: Vec<&str> = state.outputs.iter().map(|s| s.name.as_str()).collect();
            let known = if known.is_empty() {
                "none are configured".to_string()
            } else {
                format!("configured: {}", known.join(", "))
            };
            error_response(
                StatusCode::NOT_FOUND,
                "unknown_output",
                &format!("no output is named \"{name}\" ({known})"),
            )
        })
}

/// `GET /v1/outputs`.
pub async fn list(state: &AppState, scope: &Scope) -> Response {
    let now = outpost_ops::time::now_ms();
    let mut out = Vec::with_capacity(state.outputs.len());
    // A scoped reader sees only outputs confined to its sites (`sites = []` spans all).
    for spec in state.outputs.iter().filter(|s| scope.covers(&s.sites)) {
        match control::status(&*state.store, spec).await {
            Ok(s) => out.push(s.to_json(now)),
            Err(e) => return store_error(e),
        }
    }
    Json(json!({ "outputs": out })).into_response()
}

/// The status of `spec` as a response.
async fn one(state: &AppState, spec: &OutputSpec) -> Response {
    match control::status(&*state.store, spec).await {
        Ok(s) => Json(s.to_json(outpost_ops::time::now_ms())).into_response(),
        Err(e) => store_error(e),
    }
}

fn control_error(e: ControlError) -> Response {
    match e {
        ControlError::Store(e) => store_error(e),
        e @ ControlError::BeyondHead { .. } => {
            error_response(StatusCode::BAD_REQUEST, "invalid_parameter", &e.to_string())
        }
        e @ ControlError::Busy => error_response(StatusCode::CONFLICT, "busy", &e.to_string()),
    }
}

/// Reads `{"from": …}`: a cursor (number, or string of digits) or an RFC 3339 time.
pub fn replay_from(body: &[u8]) -> Result<ReplayFrom, String> {
    const HOW: &str = "the body must be {\"from\": <cursor>} (the first punch to deliver again, 0 = every punch) or {\"from\": \"<RFC 3339 time>\"}";
    let v: Value = serde_json::from_slice(body).map_err(|_| HOW.to_string())?;
    match v.get("from") {
        Some(Value::Number(n)) => n.as_u64().map(ReplayFrom::Cursor).ok_or(HOW.to_string()),
        Some(Value::String(s)) => {
            if let Ok(c) = s.parse::<u64>() {
                return Ok(ReplayFrom::Cursor(c));
            }
            parse_time(s)
                .map(|(ms, _)| ReplayFrom::Time(ms))
                .map_err(|_| {
                    format!(
                        "\"from\": {s:?} is neither a cursor nor an RFC 3339 time with an offset"
                    )
                })
        }
        _ => Err(HOW.to_string()),
    }
}

/// `POST /v1/outputs/{name}/replay`.
pub async fn replay(state: &AppState, name: &str, body: &[u8]) -> Response {
    let spec = match find(state, name) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let from = match replay_from(body) {
        Ok(f) => f,
        Err(m) => return error_response(StatusCode::BAD_REQUEST, "invalid_parameter", &m),
    };
    match control::replay(&*state.store, name, from).await {
        Ok(_) => one(state, spec).await,
        Err(e) => control_error(e),
    }
}

/// `POST /v1/outputs/{name}/enable`.
pub async fn enable(state: &AppState, name: &str) -> Response {
    let spec = match find(state, name) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match control::enable(&*state.store, name).await {
        Ok(_) => one(state, spec).await,
        Err(e) => control_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_from_takes_cursors_and_times() {
        assert_eq!(replay_from(br#"{"from": 0}"#), Ok(ReplayFrom::Cursor(0)));
        assert_eq!(
            replay_from(br#"{"from": "42"}"#),
            Ok(ReplayFrom::Cursor(42))
        );
        assert_eq!(
            replay_from(br#"{"from": "1970-01-01T00:00:01Z"}"#),
            Ok(ReplayFrom::Time(1000))
        );
        assert!(replay_from(br#"{"from": "yesterday"}"#).is_err());
        assert!(replay_from(br#"{"from": -1}"#).is_err());
        assert!(replay_from(b"{}").is_err());
    }
}
