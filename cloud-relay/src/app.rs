//! The HTTP application: routes, the query API, health and metrics. The state the
//! handlers share is [`crate::state::AppState`].
//!
//! | route | auth | what |
//! |---|---|---|
//! | `POST /v1/batches` | gateway token or client certificate | a frame in, an Ack frame out ([`crate::intake`]) |
//! | `GET /v1/uplink` | gateway token or client certificate | the uplink WebSocket ([`crate::intake`]) |
//! | `GET /v1/punches` | admin or read token | `{"items": [...], "next_cursor": ...}` (each item with its `cursor`: store module docs, "The cursor"), filters `site`, `device`, `subject`, `from`, `to` (RFC 3339 or Unix ms, on the punch time), `cursor`, `limit` |
//! | `GET /v1/punches.csv` | admin or read token | the same filters, every matching punch as CSV (streamed page by page) |
//! | `GET /v1/gateways` | admin or read token | `{"gateways": [...]}` (a scoped reader: its sites' gateways) |
//! | `GET /v1/conflicts` | admin or read token | `{"items": [...], "next_cursor": ...}` |
//! | `GET /v1/rejected` | admin or read token | invalid records kept instead of stored, with `reason`: `{"items": [...], "next_cursor": ...}` |
//! | `GET /v1/outputs` | admin or read token | each output's state, cursor, lag, last success and error, holder ([`crate::outputs::api`]) |
//! | `POST /v1/outputs/{name}/replay` | admin token | `{"from": <cursor or RFC 3339 time>}`: deliver again from there |
//! | `POST /v1/outputs/{name}/enable` | admin token | resume a disabled output |
//! | `GET /health/live` | none | 200 while the process runs |
//! | `GET /health/ready` | none | 200 when the store answers and the relay is not shutting down |
//! | `GET /metrics` | none | Prometheus text ([`crate::metrics`]) |
//!
//! A read token issued with `--site` sees only its sites through every read route: the
//! filter is part of the store query, and a `site=` outside its scope is 403
//! (`site_not_allowed`); see [`crate::access`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outpost_protocol::json::{format_time, parse_time};
use serde_json::{json, Value};

use crate::access::{read_scope, require_admin};
use crate::auth::Scope;
use crate::error::error_response;
use crate::intake;
use crate::state::AppState;
use crate::store::{HeldQuery, PunchPage, PunchQuery, PunchRow};

/// The router with every route.
pub fn router(state: Arc<AppState>) -> Router {
    let timeout = Duration::from_secs(state.limits.request_timeout_secs);
    Router::new()
        .route("/v1/batches", post(intake::post_batch))
        .route("/v1/uplink", get(intake::uplink))
        .route("/v1/punches", get(punches))
        .route("/v1/punches.csv", get(punches_csv))
        .route("/v1/gateways", get(gateways))
        .route("/v1/conflicts", get(conflicts))
        .route("/v1/rejected", get(rejected))
        .route("/v1/outputs", get(outputs_list))
        .route(
            "/v1/outputs/{name}/replay",
            post(outputs_replay).layer(axum::extract::DefaultBodyLimit::max(4096)),
        )
        .route("/v1/outputs/{name}/enable", post(outputs_enable))
        .route("/health/live", get(|| async { "ok\n" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "not_found", "no such route") })
        // The body limit is enforced by /v1/batches itself (with a specific error code);
        // axum's default 2 MiB cap would otherwise answer first.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(state)
}

async fn outputs_list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let scope = match read_scope(&state, &headers, None) {
        Ok(s) => s,
        Err(r) => return r,
    };
    crate::outputs::api::list(&state, &scope).await
}

async fn outputs_replay(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = require_admin(&state, &headers) {
        return r;
    }
    crate::outputs::api::replay(&state, &name, &body).await
}

async fn outputs_enable(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if let Err(r) = require_admin(&state, &headers) {
        return r;
    }
    crate::outputs::api::enable(&state, &name).await
}

fn bad_param(field: &str, message: &str) -> Response {
    let body = json!({"error": {"code": "invalid_parameter", "message": message, "field": field}});
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

fn time_param(p: &HashMap<String, String>, field: &str) -> Result<Option<i64>, Response> {
    let Some(v) = p.get(field) else {
        return Ok(None);
    };
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(Some(ms));
    }
    parse_time(v).map(|(ms, _)| Some(ms)).map_err(|_| {
        bad_param(
            field,
            "must be RFC 3339 with an offset or Unix milliseconds",
        )
    })
}

fn cursor_param(p: &HashMap<String, String>) -> Result<Option<u64>, Response> {
    p.get("cursor")
        .filter(|c| !c.is_empty())
        .map(|c| c.parse::<u64>())
        .transpose()
        .map_err(|_| bad_param("cursor", "must be a next_cursor value from a previous page"))
}

/// The query of `/v1/punches` and `.csv` from the request's parameters, limited to the
/// caller's `scope`.
fn punch_query(
    state: &AppState,
    scope: &Scope,
    p: &HashMap<String, String>,
) -> Result<PunchQuery, Response> {
    let max = state.limits.max_query_limit;
    let limit = match p.get("limit") {
        None => 100.min(max),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n >= 1 => n.min(max),
            _ => {
                return Err(bad_param(
                    "limit",
                    &format!("must be a number from 1 to {max}"),
                ))
            }
        },
    };
    Ok(PunchQuery {
        site: p.get("site").cloned(),
        sites: scope.site_filter(),
        device: p.get("device").cloned(),
        subject: p.get("subject").cloned(),
        from_ms: time_param(p, "from")?,
        to_ms: time_param(p, "to")?,
        after: cursor_param(p)?,
        limit,
    })
}

fn store_error(e: crate::store::StoreError) -> Response {
    let text = e.report();
    tracing::error!(error = %text, "query failed");
    error_response(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", &text)
}

async fn punches(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let scope = match read_scope(&state, &headers, p.get("site").map(String::as_str)) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let q = match punch_query(&state, &scope, &p) {
        Ok(q) => q,
        Err(r) => return r,
    };
    match state.store.punches(q).await {
        Ok(page) => Json(json!({
            "items": page.items.iter().map(|r| Value::Object(r.to_json())).collect::<Vec<_>>(),
            "next_cursor": page.next_cursor.map(|c| c.to_string()),
        }))
        .into_response(),
        Err(e) => store_error(e),
    }
}

/// The CSV header of `/v1/punches.csv`.
pub const CSV_HEADER: &str = "site,gateway_id,journal_epoch,gateway_seq,device_id,seq,subject,kind,verify,time,received_at,clock_synced,corrected_time,source,stored_at\n";

fn csv_field(out: &mut String, v: &str) {
    if v.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&v.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(v);
    }
}

/// One CSV line for a row (fields as in [`CSV_HEADER`]).
pub fn csv_line(r: &PunchRow) -> String {
    let p = &r.record.punch;
    let mut s = String::with_capacity(200);
    let fields = [
        r.site_id.as_str().to_string(),
        r.gateway_id.as_str().to_string(),
        r.journal_epoch.to_string(),
        r.record.gateway_seq.to_string(),
        p.device_id.as_str().to_string(),
        p.device_seq.to_string(),
        p.subject_id.as_str().to_string(),
        p.kind.as_str().to_string(),
        p.verify.as_str().to_string(),
        format_time(p.device_time_ms, p.utc_offset_min),
        format_time(r.record.received.wall_ms, None),
        r.record.received.clock_synced.to_string(),
        r.corrected_ms
            .map(|t| format_time(t, None))
            .unwrap_or_default(),
        r.record.source.as_str().to_string(),
        format_time(r.stored_at_ms, None),
    ];
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        csv_field(&mut s, f);
    }
    s.push('\n');
    s
}

async fn punches_csv(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let scope = match read_scope(&state, &headers, p.get("site").map(String::as_str)) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut q = match punch_query(&state, &scope, &p) {
        Ok(q) => q,
        Err(r) => return r,
    };
    q.limit = state.limits.max_query_limit;
    // Fail before the 200 if the store is down; later pages end the stream with an error.
    let first = match state.store.punches(q.clone()).await {
        Ok(page) => page,
        Err(e) => return store_error(e),
    };
    enum Csv {
        Header(PunchPage),
        Fetch(u64),
        Done,
    }
    fn page_text(p: &PunchPage) -> (String, Csv) {
        let text = p.items.iter().map(csv_line).collect();
        (text, p.next_cursor.map_or(Csv::Done, Csv::Fetch))
    }
    let store = state.store.clone();
    let stream = futures_util::stream::unfold(
        (Csv::Header(first), q, store),
        |(step, mut q, store)| async move {
            match step {
                Csv::Header(page) => {
                    let (text, next) = page_text(&page);
                    Some((Ok(format!("{CSV_HEADER}{text}")), (next, q, store)))
                }
                Csv::Fetch(after) => {
                    q.after = Some(after);
                    match store.punches(q.clone()).await {
                        Ok(page) => {
                            let (text, next) = page_text(&page);
                            Some((Ok(text), (next, q, store)))
                        }
                        Err(e) => Some((Err(std::io::Error::other(e)), (Csv::Done, q, store))),
                    }
                }
                Csv::Done => None,
            }
        },
    );
    (
        [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn gateways(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let scope = match read_scope(&state, &headers, None) {
        Ok(s) => s,
        Err(r) => return r,
    };
    // One row per gateway, not paged: filtering the list here is exact.
    match state.store.gateways().await {
        Ok(g) => Json(json!({"gateways": g
            .iter()
            .filter(|g| scope.allows(&g.site_id))
            .map(|g| g.to_json())
            .collect::<Vec<_>>()}))
        .into_response(),
        Err(e) => store_error(e),
    }
}

/// `GET /v1/conflicts` and `GET /v1/rejected`: read auth, `cursor`, then one page from
/// `fetch` (with the caller's sites) as `{"items": [...], "next_cursor": ...}`; `item`
/// gives each row's id and JSON.
async fn held_page<T, F, Fut>(
    state: &AppState,
    headers: &HeaderMap,
    p: &HashMap<String, String>,
    fetch: F,
    item: impl Fn(&T) -> (u64, Value),
) -> Response
where
    F: FnOnce(HeldQuery) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>, crate::store::StoreError>>,
{
    let scope = match read_scope(state, headers, None) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let after = match cursor_param(p) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let limit = state.limits.max_query_limit.min(100);
    let q = HeldQuery {
        after,
        limit,
        sites: scope.site_filter(),
    };
    match fetch(q).await {
        Ok(rows) => {
            let items: Vec<(u64, Value)> = rows.iter().map(item).collect();
            let next = (items.len() == limit)
                .then(|| items.last().map(|(id, _)| id.to_string()))
                .flatten();
            let items: Vec<Value> = items.into_iter().map(|(_, v)| v).collect();
            Json(json!({"items": items, "next_cursor": next})).into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn conflicts(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let store = state.store.clone();
    held_page(
        &state,
        &headers,
        &p,
        |q| async move { store.conflicts(q).await },
        |c: &crate::store::ConflictRow| (c.id, c.to_json()),
    )
    .await
}

async fn rejected(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let store = state.store.clone();
    held_page(
        &state,
        &headers,
        &p,
        |q| async move { store.rejected(q).await },
        |x: &crate::store::RejectedRow| (x.id, x.to_json()),
    )
    .await
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.cancel.is_cancelled() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the relay is shutting down",
        );
    }
    match tokio::time::timeout(Duration::from_secs(5), state.store.ready()).await {
        Ok(Ok(())) => "ready\n".into_response(),
        Ok(Err(e)) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            &e.report(),
        ),
        Err(_) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the store did not answer within 5 s",
        ),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
