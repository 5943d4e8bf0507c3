//! The `/iclock/*` HTTP handlers.
//!
//! Every response is plain text and carries a `Date` header with the true time as far as
//! the gateway knows it (terminals set their clocks from it; see `add_date`). Every endpoint first checks the serial number
//! (`SN`, any case of the parameter name) against the allowlist: a missing or malformed
//! SN gets 400, a refused terminal 403.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use outpost_protocol::{Id, RejectCode, Source};

use super::config::{valid_serial, OtherTables};
use super::handshake::options_text;
use super::parse::{parse_attlog, SkipReason};
use super::stamps::StampTable;
use super::state::{Admission, AdmsState};
use crate::journal::{Outcome, Pending};
use crate::metrics::IngestLabels;

/// Skipped lines logged one by one per upload; the rest are summarised.
const SKIPPED_LOGGED_PER_UPLOAD: usize = 10;

type Params = Query<Vec<(String, String)>>;

/// The `/iclock/*` routes, with their body limit and `Date` header, ready to be merged
/// into the main HTTP router or served on `adms.listen`. Older firmware appends `.aspx`
/// to the paths; both forms are served.
pub fn router(state: AdmsState) -> Router {
    let limit = state.inner.config.max_body_bytes;
    Router::new()
        .route("/iclock/cdata", get(handshake).post(upload))
        .route("/iclock/cdata.aspx", get(handshake).post(upload))
        .route("/iclock/getrequest", get(poll))
        .route("/iclock/getrequest.aspx", get(poll))
        .route("/iclock/devicecmd", post(poll))
        .route("/iclock/devicecmd.aspx", post(poll))
        .route("/iclock/ping", get(poll))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            add_date,
        ))
        .with_state(state)
}

/// The value of query parameter `name`, matched without regard to case.
fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut r = (status, body.into()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Why a request was turned away before doing anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turned {
    MissingSn,
    MalformedSn,
    Refused,
}

impl IntoResponse for Turned {
    fn into_response(self) -> Response {
        match self {
            Turned::MissingSn => text(StatusCode::BAD_REQUEST, "ERROR: missing SN parameter"),
            Turned::MalformedSn => text(StatusCode::BAD_REQUEST, "ERROR: malformed SN parameter"),
            Turned::Refused => text(
                StatusCode::FORBIDDEN,
                "ERROR: terminal not registered with this gateway",
            ),
        }
    }
}

/// Checks the SN parameter and the allowlist; returns the serial number.
fn admit(state: &AdmsState, q: &[(String, String)]) -> Result<String, Turned> {
    let sn = param(q, "SN").map(str::trim).ok_or(Turned::MissingSn)?;
    if !valid_serial(sn) {
        return Err(Turned::MalformedSn);
    }
    match state.admit(sn, param(q, "pushver")) {
        Admission::Allowed => Ok(sn.to_string()),
        Admission::Refused => Err(Turned::Refused),
    }
}

/// `GET /iclock/cdata?SN=…&options=all[&pushver=…]`: the option text.
async fn handshake(State(state): State<AdmsState>, Query(q): Params) -> Response {
    let sn = match admit(&state, &q) {
        Ok(sn) => sn,
        Err(t) => return t.into_response(),
    };
    let push = param(&q, "pushver").is_some();
    let stamps = state.inner.stamps.get(&sn).await;
    let cfg = &state.inner.config;
    tracing::debug!(serial = %sn, push, "ADMS handshake");
    text(
        StatusCode::OK,
        options_text(&sn, push, stamps, cfg.offset_for(&sn), cfg.other_tables),
    )
}

/// `getrequest`, `devicecmd` and `ping`: no commands to hand out, just "OK".
async fn poll(State(state): State<AdmsState>, Query(q): Params) -> Response {
    match admit(&state, &q) {
        Ok(_) => text(StatusCode::OK, "OK"),
        Err(t) => t.into_response(),
    }
}

/// `POST /iclock/cdata?SN=…&table=…&Stamp=…`.
async fn upload(State(state): State<AdmsState>, Query(q): Params, body: Bytes) -> Response {
    let sn = match admit(&state, &q) {
        Ok(sn) => sn,
        Err(t) => return t.into_response(),
    };
    let table = param(&q, "table").unwrap_or("").to_ascii_uppercase();
    if table == "ATTLOG" {
        return attlog(&state, &sn, &q, &body).await;
    }
    let (stamp_table, stamp) = match table.as_str() {
        "OPERLOG" => (
            Some(StampTable::Operlog),
            param(&q, "OpStamp").or_else(|| param(&q, "Stamp")),
        ),
        "ATTPHOTO" => (
            Some(StampTable::Attphoto),
            param(&q, "PhotoStamp").or_else(|| param(&q, "Stamp")),
        ),
        _ => (None, None),
    };
    if state.inner.config.other_tables == OtherTables::Log {
        log_other_table(&sn, &table, &body);
    }
    if let (Some(t), Some(v)) = (
        stamp_table,
        stamp.and_then(|s| s.trim().parse::<u64>().ok()),
    ) {
        if let Err(e) = state.inner.stamps.set(&sn, t, v).await {
            tracing::warn!(serial = %sn, error = %e, "could not save the ADMS stamp");
        }
    }
    text(StatusCode::OK, "OK")
}

/// Logs a non-ATTLOG upload without its content (USER lines carry passwords and cards).
fn log_other_table(sn: &str, table: &str, body: &[u8]) {
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let mut lines = 0usize;
    for line in body.split(|&b| b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        lines += 1;
        let head = line
            .split(|&b| b == b' ' || b == b'\t')
            .next()
            .and_then(|h| std::str::from_utf8(h).ok())
            .filter(|h| (1..=16).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_uppercase()))
            .unwrap_or("other");
        *kinds.entry(head).or_default() += 1;
    }
    let table: String = table
        .chars()
        .take(32)
        .flat_map(char::escape_debug)
        .collect();
    tracing::info!(serial = sn, table = %table, bytes = body.len(), lines, kinds = ?kinds, "ADMS upload (not stored)");
}

/// An ATTLOG upload: parse, commit, and only then answer `OK: <n>` and save the stamp.
async fn attlog(state: &AdmsState, sn: &str, q: &[(String, String)], body: &[u8]) -> Response {
    let cfg = &state.inner.config;
    let Ok(device_id) = Id::new_topic_safe(&format!("zk:{sn}")) else {
        // valid_serial() guarantees this; stay total.
        return Turned::MalformedSn.into_response();
    };
    let parsed = parse_attlog(body, &device_id, cfg.offset_for(sn));
    let mut skipped: HashMap<SkipReason, u64> = HashMap::new();
    for (i, s) in parsed.skipped.iter().enumerate() {
        *skipped.entry(s.reason).or_default() += 1;
        if i < SKIPPED_LOGGED_PER_UPLOAD {
            tracing::warn!(serial = sn, line = s.line, reason = %s.reason, text = %s.excerpt, "skipped ATTLOG line");
        }
    }
    if parsed.skipped.len() > SKIPPED_LOGGED_PER_UPLOAD {
        tracing::warn!(
            serial = sn,
            more = parsed.skipped.len() - SKIPPED_LOGGED_PER_UPLOAD,
            "further ATTLOG lines skipped in this upload"
        );
    }

    // The same line twice in one body is one punch.
    let received = state.inner.clock.now();
    let mut seen = HashSet::new();
    let mut in_body_dups = 0u64;
    let mut items = Vec::with_capacity(parsed.punches.len());
    for punch in parsed.punches {
        if seen.insert(punch.device_seq) {
            items.push(Pending {
                punch,
                received,
                source: Source::Adms,
            });
        } else {
            in_body_dups += 1;
        }
    }

    let submitted = items.len();
    let outcomes = state.inner.committer.submit(items).await;
    let (mut accepted, mut duplicates) = (0u64, in_body_dups);
    let mut retry: Option<RejectCode> = None;
    let mut rejected = 0u64;
    if outcomes.len() != submitted {
        retry = Some(RejectCode::Internal);
    }
    for o in &outcomes {
        match o {
            Outcome::Accepted { .. } => accepted += 1,
            Outcome::Duplicate => duplicates += 1,
            Outcome::Rejected(code) if code.is_permanent() => {
                rejected += 1;
                // Resending cannot help: count it like a skipped line.
                *skipped.entry(SkipReason::Rejected).or_default() += 1;
                tracing::warn!(serial = sn, code = %code, "journal refused an ATTLOG punch permanently");
            }
            Outcome::Rejected(code) => {
                rejected += 1;
                retry.get_or_insert(*code);
            }
        }
    }
    let ingest = &state.inner.metrics.ingest;
    let count = |outcome, n: u64| {
        if n > 0 {
            ingest
                .get_or_create(&IngestLabels {
                    source: Source::Adms.as_str(),
                    outcome,
                })
                .inc_by(n);
        }
    };
    count("accepted", accepted);
    count("duplicate", duplicates);
    count("rejected", rejected);
    state.record(sn, accepted, duplicates, &skipped);

    if let Some(code) = retry {
        let status = match code {
            RejectCode::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
            RejectCode::Unavailable | RejectCode::RateLimited => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        tracing::warn!(
            serial = sn, code = %code, rejected,
            "ATTLOG upload not fully stored; the terminal keeps its records and retries"
        );
        let mut r = text(status, format!("ERROR: {code}, retry later"));
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(super::handshake::ERROR_DELAY_SECS),
        );
        return r;
    }

    // Everything is durable: now the stamp may move forward.
    if let Some(v) = param(q, "Stamp").and_then(|s| s.trim().parse::<u64>().ok()) {
        if let Err(e) = state.inner.stamps.set(sn, StampTable::Attlog, v).await {
            tracing::warn!(serial = sn, error = %e, "could not save the ADMS stamp; the terminal may resend (duplicates are dropped)");
        }
    }
    tracing::debug!(
        serial = sn,
        accepted,
        duplicates,
        lines = parsed.lines,
        "ATTLOG upload stored"
    );
    text(StatusCode::OK, format!("OK: {}", parsed.lines))
}

/// Sets `Date` to the true time as far as the gateway knows it: its wall clock when that is
/// synchronised, else the relay's time learned by the uplink. Terminals set their clocks
/// from this header, so a gateway that booted without network (no RTC on a Pi) must not
/// push its wrong clock into every terminal. With neither, hyper's own `Date` (the system
/// clock) goes out, as from any web server, and this is logged once.
async fn add_date(State(state): State<AdmsState>, mut res: Response) -> Response {
    let inner = &state.inner;
    match inner.clock.trusted_now_ms(&inner.relay_time) {
        Some(t) => {
            if let Some(h) = http_date(t).and_then(|v| HeaderValue::from_str(&v).ok()) {
                res.headers_mut().insert(header::DATE, h);
            }
        }
        None => {
            if !inner
                .untrusted_date_logged
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!("the gateway's clock is not synchronised and no relay has told the time yet: ADMS terminals get the system clock in the Date header and may set their clocks from it; fix NTP or the uplink");
            }
        }
    }
    res
}

/// Unix ms → IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn http_date(ms: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).ok()?;
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.format(&f).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(
            http_date(784_111_777_000).as_deref(),
            Some("Sun, 06 Nov 1994 08:49:37 GMT")
        );
        assert_eq!(
            http_date(1_709_272_800_999).as_deref(),
            Some("Fri, 01 Mar 2024 06:00:00 GMT")
        );
    }

    #[test]
    fn params_ignore_case() {
        let q = vec![
            ("sn".to_string(), "A".to_string()),
            ("Table".to_string(), "ATTLOG".to_string()),
        ];
        assert_eq!(param(&q, "SN"), Some("A"));
        assert_eq!(param(&q, "table"), Some("ATTLOG"));
        assert_eq!(param(&q, "Stamp"), None);
    }
}
