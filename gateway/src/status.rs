//! Operations endpoints: `/v1/status`, `/v1/export`, `/health/*` and `/metrics`.
//!
//! | route | auth | answer |
//! |---|---|---|
//! | `GET /health/live` | none | 200 while the process serves HTTP |
//! | `GET /health/ready` | none | 200 when the journal is open and writable, else 503 with the reason |
//! | `GET /metrics` | none | Prometheus text format |
//! | `GET /v1/status` | admin | JSON: journal depth, quota, dedup window, uplink, clock, version, uptime |
//! | `GET /v1/export?format=ndjson\|csv&since=…` | admin | the journal's records, streamed |
//!
//! "admin" means `Authorization: Bearer <admin token>` (the file `auth.admin_token_file`),
//! unless `auth.required = false`.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::clock::Clock;
use crate::committer::CommitterHandle;
use crate::export::{self, Format, Since};
use crate::journal::Journal;
use crate::metrics::Metrics;
use outpost_ops::bearer::bearer;
use outpost_ops::token::AdminToken;

/// What the operations endpoints read.
#[derive(Clone)]
pub struct OpsState {
    /// The journal (read-only use here).
    pub journal: Journal,
    /// To tell whether the committer still runs.
    pub committer: CommitterHandle,
    /// Clock state for `/v1/status`.
    pub clock: Clock,
    /// Rendered at `/metrics`.
    pub metrics: Metrics,
    /// Guards status and export.
    pub admin: AdminToken,
    /// `auth.required`.
    pub auth_required: bool,
    /// `gateway.id`.
    pub gateway_id: String,
    /// `gateway.site`.
    pub site: String,
    /// Process start, for uptime.
    pub started: Instant,
    /// The journal settings (quota, dedup window) for status.
    pub journal_cfg: crate::journal::JournalConfig,
    /// Where the journal lives, to check free disk space.
    pub data_dir: std::path::PathBuf,
    /// Per-terminal ADMS status, if ADMS is enabled.
    pub adms: Option<crate::ingest::adms::AdmsState>,
    /// MQTT ingest status (mode, broker, connection, counters).
    pub mqtt: crate::ingest::mqtt::MqttStatus,
    /// The uplink's health and counters.
    pub uplink: crate::uplink::UplinkHandle,
}

/// The routes served by this module.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/health/live", get(|| async { "ok\n" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/export", get(export))
        .with_state(state)
}

/// Quota headroom below which the journal counts as full for readiness.
const FULL_HEADROOM_BYTES: u64 = 1024;

/// Below this much free disk the gateway reports itself not ready.
const MIN_FREE_BYTES: u64 = 4 << 20;

/// Free bytes (for unprivileged users) on the filesystem holding `path`.
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the struct we own from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

fn require_admin(st: &OpsState, headers: &HeaderMap) -> Result<(), Response> {
    if !st.auth_required {
        return Ok(());
    }
    match bearer(headers.get(header::AUTHORIZATION)) {
        Some(t) if st.admin.matches(t) => Ok(()),
        _ => Err((
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": "unauthorized", "message":
                "send `Authorization: Bearer <admin token>`; the token is in the file auth.admin_token_file (default <data_dir>/admin.token)",
                "field": ""}})),
        )
            .into_response()),
    }
}

async fn ready(State(st): State<OpsState>) -> Response {
    let stats = st.journal.stats();
    let mut problems = Vec::new();
    if st.committer.is_closed() {
        problems.push("the committer has stopped (shutting down)".to_string());
    }
    let drops_oldest = st.journal_cfg.on_full == crate::journal::OnFull::DropOldest;
    // "Full" means no room left for even a few more punches (a record plus its dedup key
    // takes about 150 bytes of quota).
    if stats.bytes + FULL_HEADROOM_BYTES > stats.max_bytes && !drops_oldest {
        problems.push(format!(
            "the journal is full ({} of {} bytes, journal.max_bytes); waiting for the uplink to drain it",
            stats.bytes, stats.max_bytes
        ));
    }
    if !stats.writable {
        problems.push(
            "the journal is recovering from a write error (disk full or I/O error); see the log"
                .into(),
        );
    }
    match free_bytes(&st.data_dir) {
        Some(free) if free < MIN_FREE_BYTES => problems.push(format!(
            "only {free} bytes free on the disk holding {}; free space or move gateway.data_dir",
            st.data_dir.display()
        )),
        _ => {}
    }
    let set_aside = st.journal.set_aside();
    if problems.is_empty() && !set_aside.is_empty() {
        // Punches are being taken, so ready; but say it loudly.
        let warnings: Vec<String> = set_aside
            .iter()
            .map(|s| format!("a journal that could not be opened was set aside at {}; run `outpost-gateway salvage {}` with the gateway stopped", s.path.display(), s.path.display()))
            .collect();
        (
            StatusCode::OK,
            Json(json!({"ready": true, "warnings": warnings})),
        )
            .into_response()
    } else if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "problems": problems})),
        )
            .into_response()
    }
}

async fn metrics(State(st): State<OpsState>) -> Response {
    let s = st.journal.stats();
    st.metrics.journal_records.set(s.records as i64);
    st.metrics.journal_bytes.set(s.bytes as i64);
    st.metrics
        .journal_set_aside
        .set(st.journal.set_aside().len() as i64);
    // The MQTT counters live in the ingest task's status; splice them in before the
    // OpenMetrics end marker.
    let mut text = st.metrics.render();
    let eof = text.rfind("# EOF").unwrap_or(text.len());
    text.insert_str(eof, &st.mqtt.prometheus());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn status(State(st): State<OpsState>, headers: HeaderMap) -> Response {
    if let Err(r) = require_admin(&st, &headers) {
        return r;
    }
    let s = st.journal.stats();
    let now = st.clock.now();
    let oldest_age_s = s
        .oldest_received_wall_ms
        .map(|w| ((now.wall_ms - w).max(0) as f64 / 1000.0).round());
    let terminals = st.adms.as_ref().map(|a| a.terminals());
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": st.started.elapsed().as_secs(),
        "gateway": {"id": st.gateway_id, "site": st.site},
        "auth": {"required": st.auth_required},
        "journal": {
            "epoch": format!("{:016x}", st.journal.epoch()),
            "records": s.records,
            "bytes": s.bytes,
            "oldest_age_s": oldest_age_s,
            "next_seq": s.next_seq,
            "acked_through": s.trimmed_through,
            "max_bytes": s.max_bytes,
            "quota_used": if s.max_bytes > 0 { s.bytes as f64 / s.max_bytes as f64 } else { 0.0 },
            "on_full": st.journal_cfg.on_full.as_str(),
            "evicted": s.evicted,
            "set_aside": st.journal.set_aside(),
        },
        "dedup_window": {
            "keys": s.dedup_keys,
            "max_keys": st.journal_cfg.dedup_window.max_keys,
            "max_age_s": st.journal_cfg.dedup_window.max_age.as_secs(),
        },
        "uplink": st.uplink.status_json(&s, &now),
        "clock": {
            "synced": now.clock_synced,
            "wall": outpost_protocol::json::format_time(now.wall_ms, None),
            "boot_id": hex::encode(now.boot_id.0),
            "mono_ms": now.mono_ms,
        },
        "adms": {"terminals": terminals},
        "mqtt": st.mqtt.to_json(),
    }))
    .into_response()
}

/// Query string of `/v1/export`.
#[derive(Debug, Deserialize)]
pub struct ExportQuery {
    /// `ndjson` (default) or `csv`.
    pub format: Option<String>,
    /// A gateway_seq or an RFC 3339 time.
    pub since: Option<String>,
}

async fn export(
    State(st): State<OpsState>,
    headers: HeaderMap,
    Query(q): Query<ExportQuery>,
) -> Response {
    if let Err(r) = require_admin(&st, &headers) {
        return r;
    }
    let bad = |m: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"code": "malformed", "message": m, "field": ""}})),
        )
            .into_response()
    };
    let format: Format = match q.format.as_deref().unwrap_or("ndjson").parse() {
        Ok(f) => f,
        Err(m) => return bad(m),
    };
    let since: Since = match q.since.as_deref().map(str::parse).transpose() {
        Ok(s) => s.unwrap_or_default(),
        Err(m) => return bad(m),
    };
    // Stream page by page so a million-record journal never sits in memory at once.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
    let journal = st.journal.clone();
    let (site, gw) = (st.site.clone(), st.gateway_id.clone());
    tokio::task::spawn_blocking(move || {
        let mut next = since.first_seq();
        if tx.blocking_send(Ok(export::header(format))).is_err() {
            return;
        }
        loop {
            let page = match journal.read_from(next, 1000, 1 << 20) {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                    return;
                }
            };
            let Some(last) = page.last() else { return };
            next = last.gateway_seq + 1;
            let chunk: String = page
                .iter()
                .filter(|r| since.admits(r))
                .map(|r| export::line(format, &site, &gw, r))
                .collect();
            if tx.blocking_send(Ok(chunk)).is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let ct = match format {
        Format::Ndjson => "application/x-ndjson",
        Format::Csv => "text/csv; charset=utf-8",
    };
    ([(header::CONTENT_TYPE, ct)], Body::from_stream(stream)).into_response()
}
