//! Batch intake: `POST /v1/batches` and the `GET /v1/uplink` WebSocket.
//!
//! Both carry the same frames (docs/design.md, "Uplink frames") and go through
//! [`process_frame`]: authenticate (Bearer token → gateway, or without a token the verified
//! client certificate → gateway, see `auth`; before any body is read), take a
//! slot of `limits.max_concurrent_batches` (so memory is bounded by slots × (frame + raw)
//! whatever the number of clients), decode with `limits.max_raw_bytes` as the ceiling,
//! check `limits.max_records_per_batch`, check that the batch's gateway_id and site_id are
//! the credentials', validate every punch, commit, ack.
//!
//! | problem | HTTP | WebSocket close | `code` |
//! |---|---|---|---|
//! | no/unknown/revoked token or certificate | 401 | (refused before upgrade) | `unauthorized` |
//! | gateway or site not the credentials' | 403 | 1008 | `gateway_mismatch`, `site_mismatch` |
//! | frame over `limits.max_frame_bytes` | 413 | 1009 | `frame_too_large` |
//! | raw size claimed over `limits.max_raw_bytes` | 413 | 1009 | `too_large` |
//! | payload inflating past its claimed size (zstd bomb) | 413 | 1009 | `overflow` |
//! | more than `limits.max_records_per_batch` | 413 | 1009 | `too_many_records` |
//! | truncated, garbage, corrupt, bad CBOR | 400 | 1007 | the frame error kind (`truncated`, `bad_magic`, `inflate`, `cbor`, …) |
//! | a punch that fails validation | 200: acked, kept in the rejected table (`store`) | — | — |
//! | store down | 503 + Retry-After | 1013 | `store_unavailable` |
//!
//! The commit runs in its own tracked task: a client that disconnects mid-request does not
//! cancel it, and shutdown waits for it. On a WebSocket the relay reads up to
//! `limits.ws_pipeline` frames ahead, processes them strictly one after the other (so an
//! ack's watermark always covers its own batch) and sends acks in frame order; it pings every
//! `limits.ws_ping_interval_secs` and closes the socket when nothing has been heard for
//! `limits.ws_idle_timeout_secs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use outpost_protocol::frame::{self, FrameError};
use outpost_protocol::Ack;

use outpost_ops::bearer::bearer;
use outpost_ops::time::now_ms;

use crate::auth::{ClientCert, GatewayCred};
use crate::error::error_response;
use crate::state::AppState;
use crate::store::StoreError;

/// A refused request or frame: status, stable code, message for people.
#[derive(Debug, Clone)]
pub struct IntakeError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

impl IntakeError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        IntakeError {
            status,
            code,
            message: message.into(),
        }
    }

    /// The WebSocket close code for this error.
    pub fn ws_close_code(&self) -> u16 {
        match self.status {
            StatusCode::PAYLOAD_TOO_LARGE => 1009,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => 1008,
            StatusCode::SERVICE_UNAVAILABLE => 1013,
            StatusCode::INTERNAL_SERVER_ERROR => 1011,
            _ => 1007,
        }
    }
}

impl IntoResponse for IntakeError {
    fn into_response(self) -> Response {
        error_response(self.status, self.code, &self.message)
    }
}

/// The gateway whose Bearer token is in `headers`, or, when there is no token, the gateway
/// registered for the connection's verified client certificate.
pub fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    cert: Option<ClientCert>,
) -> Result<GatewayCred, IntakeError> {
    let refused = |reason: &'static str, message: &str| {
        state.metrics.auth_failure(reason);
        IntakeError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    };
    let creds = state.creds.current();
    match (bearer(headers.get(header::AUTHORIZATION)), cert) {
        (Some(token), _) => creds
            .authenticate(token)
            .cloned()
            .ok_or_else(|| refused("invalid", "unknown or revoked gateway token")),
        (None, Some(ClientCert(fp))) => creds.authenticate_cert(&fp).cloned().ok_or_else(|| {
            refused(
                "invalid",
                &format!(
                    "client certificate sha256 {} is not registered to any gateway; register it with `outpost-relay gateway add ID --site SITE --cert FILE`",
                    hex::encode(fp)
                ),
            )
        }),
        (None, None) => Err(refused(
            "missing",
            "missing `Authorization: Bearer <token>` (or a client certificate); issue a token with `outpost-relay gateway add ID --site SITE`",
        )),
    }
}

fn frame_error(e: &FrameError) -> IntakeError {
    // A header claiming too much and a payload inflating past its claim (a bomb) are size
    // problems; everything else is a malformed frame.
    let status = match e {
        FrameError::TooLarge { .. } | FrameError::Overflow { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    let hint = match e {
        FrameError::TooLarge { .. } => " (limits.max_raw_bytes; send smaller batches)",
        _ => "",
    };
    IntakeError::new(status, e.kind(), format!("{e}{hint}"))
}

/// Decodes, checks and commits one frame from `cred`'s gateway; returns the ack.
pub async fn process_frame(
    state: &Arc<AppState>,
    cred: &GatewayCred,
    bytes: Bytes,
) -> Result<Ack, IntakeError> {
    let result = process_inner(state, cred, bytes).await;
    match &result {
        Ok(_) => state.metrics.batch("committed"),
        Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => state.metrics.batch("failed"),
        Err(e) => {
            state.metrics.batch("rejected");
            tracing::warn!(gateway = %cred.gateway_id, code = e.code, error = %e.message, "batch refused");
        }
    }
    result
}

async fn process_inner(
    state: &Arc<AppState>,
    cred: &GatewayCred,
    bytes: Bytes,
) -> Result<Ack, IntakeError> {
    state.metrics.bytes_in.inc_by(bytes.len() as u64);
    let _slot = state
        .batch_slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| {
            IntakeError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the relay is shutting down",
            )
        })?;
    let max_raw = state.limits.max_raw_bytes;
    let decoded = tokio::task::spawn_blocking(move || frame::decode_batch(&bytes, max_raw))
        .await
        .map_err(|e| {
            IntakeError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("decoder task failed: {e}"),
            )
        })?;
    let batch = decoded.map_err(|e| {
        state.metrics.decode_error(e.kind());
        frame_error(&e)
    })?;
    if batch.records.len() > state.limits.max_records_per_batch {
        state.metrics.decode_error("too_many_records");
        return Err(IntakeError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_records",
            format!(
                "batch has {} records, the limit is {} (limits.max_records_per_batch)",
                batch.records.len(),
                state.limits.max_records_per_batch
            ),
        ));
    }
    if batch.gateway_id != cred.gateway_id {
        state.metrics.auth_failure("mismatch");
        return Err(IntakeError::new(
            StatusCode::FORBIDDEN,
            "gateway_mismatch",
            format!(
                "batch says gateway {} but the token belongs to {}",
                batch.gateway_id, cred.gateway_id
            ),
        ));
    }
    if batch.site_id != cred.site_id {
        state.metrics.auth_failure("mismatch");
        return Err(IntakeError::new(
            StatusCode::FORBIDDEN,
            "site_mismatch",
            format!(
                "batch says site {} but gateway {} is registered for site {}",
                batch.site_id, cred.gateway_id, cred.site_id
            ),
        ));
    }
    // Punches that fail validation are not refused here: the store keeps them in its
    // rejected table and acks them, so one bad record cannot stall the gateway's stream.
    let gateway_id = batch.gateway_id;
    let journal_epoch = batch.journal_epoch;
    let store = state.store.clone();
    let started = Instant::now();
    // Tracked and detached: finishes even if the client goes away, and shutdown waits.
    let commit = state
        .tracker
        .spawn(async move { store.commit(batch, now_ms()).await });
    let outcome = commit.await.map_err(|e| {
        IntakeError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("commit task failed: {e}"),
        )
    })?;
    state
        .metrics
        .commit_seconds
        .observe(started.elapsed().as_secs_f64());
    let out = outcome.map_err(|e| match e {
        StoreError::TooManyGaps { .. } => {
            IntakeError::new(StatusCode::BAD_REQUEST, e.kind(), e.to_string())
        }
        e => {
            tracing::error!(error = %e.report(), "store commit failed; the gateway will resend");
            IntakeError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the relay cannot store batches right now; retry later",
            )
        }
    })?;
    // Outcomes partition the records: `stored` counts new punches under new sequence
    // numbers, `seq_reuse` those under reused ones (store module docs).
    state
        .metrics
        .records("stored", out.stored.saturating_sub(out.seq_reuse));
    state.metrics.records("seq_reuse", out.seq_reuse);
    state.metrics.records("duplicate", out.duplicates);
    state.metrics.records("conflict", out.conflicts);
    state.metrics.records("rejected", out.rejected);
    if out.rejected > 0 {
        tracing::warn!(
            gateway = %gateway_id,
            rejected = out.rejected,
            "batch held invalid punches; kept in the rejected table (GET /v1/rejected), not stored as punches"
        );
    }
    Ok(Ack {
        gateway_id,
        journal_epoch,
        acked_through: out.acked_through,
        server_time_ms: now_ms(),
        duplicates: Some(out.duplicates),
        conflicts: Some(out.conflicts),
    })
}

fn ack_response(ack: &Ack) -> Response {
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        frame::encode_ack(ack),
    )
        .into_response()
}

/// `POST /v1/batches`: body = frame, response = Ack frame.
pub async fn post_batch(
    State(state): State<Arc<AppState>>,
    cert: Option<Extension<ClientCert>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let cred = match authenticate(&state, &headers, cert.map(|c| c.0)) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let max = state.limits.max_frame_bytes as usize;
    let too_large = || {
        state.metrics.decode_error("frame_too_large");
        IntakeError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "frame_too_large",
            format!("the frame is over {max} bytes (limits.max_frame_bytes); send smaller batches"),
        )
        .into_response()
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return too_large();
    }
    let bytes = match http_body_util::Limited::new(body, max).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Err(e) => {
            return IntakeError::new(
                StatusCode::BAD_REQUEST,
                "body_read",
                format!("could not read the request body: {e}"),
            )
            .into_response()
        }
    };
    match process_frame(&state, &cred, bytes).await {
        Ok(ack) => ack_response(&ack),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/uplink`: authenticates, then upgrades to the uplink WebSocket.
pub async fn uplink(
    State(state): State<Arc<AppState>>,
    cert: Option<Extension<ClientCert>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let cred = match authenticate(&state, &headers, cert.map(|c| c.0)) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if state.cancel.is_cancelled() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the relay is shutting down",
        );
    }
    let max = state.limits.max_frame_bytes as usize;
    let token = state.tracker.token();
    // tungstenite's default 128 KiB read buffer per socket would dominate the memory of
    // thousands of idle gateways; frames still grow the buffer as needed, up to `max`.
    ws.read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(max)
        .max_frame_size(max)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "WebSocket upgrade failed"))
        .on_upgrade(move |socket| async move {
            let _tracked = token;
            run_socket(state, cred, socket).await;
        })
}

/// Whether a WebSocket read failed because a message or frame was over
/// `limits.max_frame_bytes`: tungstenite's `Capacity` error (`MessageTooLong`; its other
/// variant, `TooManyHeaders`, belongs to the handshake), which axum wraps.
fn is_capacity_error(e: &axum::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|inner| inner.downcast_ref::<tungstenite::Error>())
        .is_some_and(|t| matches!(t, tungstenite::Error::Capacity(_)))
}

/// Initial read buffer of an uplink WebSocket, bytes.
const WS_READ_BUFFER: usize = 4096;

struct OpenSocket(Arc<AppState>);

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.metrics.open_websockets.dec();
    }
}

async fn run_socket(state: Arc<AppState>, cred: GatewayCred, socket: WebSocket) {
    state.metrics.open_websockets.inc();
    let _open = OpenSocket(state.clone());
    tracing::debug!(gateway = %cred.gateway_id, "uplink WebSocket open");
    let (mut tx, mut rx) = socket.split();
    let pipeline = state.limits.ws_pipeline;
    let every = Duration::from_secs(state.limits.ws_ping_interval_secs);
    let idle = Duration::from_secs(state.limits.ws_idle_timeout_secs);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    let mut reading = true;
    let mut inflight: FuturesOrdered<crate::store::BoxFuture<'static, Result<Ack, IntakeError>>> =
        FuturesOrdered::new();
    let (turn_tx, turn_rx) = tokio::sync::watch::channel(0u64);
    let turn_tx = Arc::new(turn_tx);
    let mut tickets = 0u64;
    let close: Option<(u16, String)> = loop {
        if !reading && inflight.is_empty() {
            break Some((1001, "shutting_down".into()));
        }
        tokio::select! {
            Some(res) = inflight.next(), if !inflight.is_empty() => match res {
                Ok(ack) => {
                    if tx.send(Message::Binary(frame::encode_ack(&ack).into())).await.is_err() {
                        break None;
                    }
                }
                Err(e) => {
                    break Some((e.ws_close_code(), e.code.to_string()));
                }
            },
            _ = state.cancel.cancelled(), if reading => reading = false,
            msg = rx.next(), if reading && inflight.len() < pipeline => match msg {
                Some(Ok(Message::Binary(b))) => {
                    heard = Instant::now();
                    let (st, c) = (state.clone(), cred.clone());
                    let ticket = tickets;
                    tickets += 1;
                    let mut turn = turn_rx.clone();
                    let done = turn_tx.clone();
                    inflight.push_back(Box::pin(async move {
                        // Frames of one socket are processed strictly in order, so each
                        // ack's watermark covers its own batch and every earlier one.
                        let _ = turn.wait_for(|t| *t == ticket).await;
                        let r = process_frame(&st, &c, b).await;
                        done.send_replace(ticket + 1);
                        r
                    }));
                }
                Some(Ok(Message::Text(_))) => {
                    state.metrics.decode_error("text_message");
                    break Some((1003, "binary_frames_only".into()));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => heard = Instant::now(),
                Some(Ok(Message::Close(_))) | None => break None,
                Some(Err(e)) => {
                    if is_capacity_error(&e) {
                        state.metrics.decode_error("frame_too_large");
                        break Some((1009, "frame_too_large".into()));
                    }
                    tracing::debug!(error = %e, "WebSocket read failed");
                    break Some((1002, "protocol_error".into()));
                }
            },
            _ = ping.tick() => {
                if heard.elapsed() >= idle && inflight.is_empty() {
                    break Some((1000, "idle_timeout".into()));
                }
                if tx.send(Message::Ping(Bytes::new())).await.is_err() {
                    break None;
                }
            }
        }
    };
    if let Some((code, reason)) = close {
        tracing::debug!(gateway = %cred.gateway_id, code, reason = %reason, "closing uplink WebSocket");
        let _ = tx
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_errors_are_told_apart_by_type() {
        let too_long =
            tungstenite::Error::Capacity(tungstenite::error::CapacityError::MessageTooLong {
                size: 2,
                max_size: 1,
            });
        assert!(is_capacity_error(&axum::Error::new(too_long)));
        assert!(!is_capacity_error(&axum::Error::new(
            tungstenite::Error::ConnectionClosed
        )));
        // Text alone is not enough: an error that only says "too long" is not tungstenite's.
        assert!(!is_capacity_error(&axum::Error::new(
            std::io::Error::other("Message too long")
        )));
    }
}
