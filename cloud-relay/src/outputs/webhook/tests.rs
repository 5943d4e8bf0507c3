//! The webhook sink against a real HTTP server on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::json;

use super::*;
use crate::outputs::config::{EventKind, WEBHOOK_RETRY_SCHEDULE_SECS};
use crate::outputs::sink::Item;

/// One call the server saw.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// Answers by path: `/ok`, `/429s` (Retry-After: 7), `/429d` (Retry-After: a date 120 s
/// ahead), `/503`, `/410`, `/500`, `/302` (to `/ok`), `/slow` (answers after 10 s).
async fn answer(
    State(log): State<Log>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    log.lock().unwrap().push(Seen {
        path: kind.clone(),
        headers,
        body,
    });
    let with = |status: StatusCode, name: &'static str, value: String| {
        let mut r = status.into_response();
        r.headers_mut()
            .insert(name, HeaderValue::from_str(&value).unwrap());
        r
    };
    match kind.as_str() {
        "ok" => StatusCode::OK.into_response(),
        "429s" => with(StatusCode::TOO_MANY_REQUESTS, "retry-after", "7".into()),
        "429d" => with(
            StatusCode::TOO_MANY_REQUESTS,
            "retry-after",
            httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120)),
        ),
        "503" => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        "410" => (StatusCode::GONE, "gone for good").into_response(),
        "500" => (StatusCode::INTERNAL_SERVER_ERROR, "boom\n").into_response(),
        "302" => with(StatusCode::FOUND, "location", "/ok".into()),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            StatusCode::OK.into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn server() -> (SocketAddr, Log) {
    let log: Log = Arc::default();
    let app = Router::new()
        .route("/{kind}", post(answer))
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, log)
}

fn config(dir: &std::path::Path, url: String, allow_private: bool) -> WebhookOutput {
    WebhookOutput {
        name: "payroll".into(),
        url,
        secret_file: dir.join("payroll.whsec"),
        events: vec![EventKind::Punch],
        sites: vec![],
        batch_max: 100,
        allow_private,
        timeout_secs: 1,
        retry_schedule_secs: WEBHOOK_RETRY_SCHEDULE_SECS.to_vec(),
        disable_after_secs: 3600,
    }
}

fn delivery() -> Delivery {
    let item = |seq: u64| {
        let id = crate::outputs::sink::punch_id("HC001", "door-1", seq);
        let Value::Object(json) = json!({
            "id": id, "site": "HC001", "device_id": "door-1", "device_seq": seq,
            "subject_id": "emp-7", "kind": "in",
        }) else {
            unreachable!()
        };
        Item {
            id,
            cursor: seq,
            site: "HC001".into(),
            device: "door-1".into(),
            json,
        }
    };
    Delivery {
        id: "payroll-1-2".into(),
        created_ms: 1_795_327_200_123,
        kind: crate::outputs::config::EventKind::Punch,
        items: vec![item(1), item(2)],
    }
}

fn retry_reason(r: Result<(), SinkError>) -> (String, Option<Duration>) {
    match r {
        Err(SinkError::Retry {
            reason,
            retry_after,
        }) => (reason, retry_after),
        other => panic!("expected a retry, got {other:?}"),
    }
}

#[tokio::test]
async fn each_answer_has_its_outcome() {
    let (addr, log) = server().await;
    let dir = tempfile::tempdir().unwrap();
    let d = delivery();
    let sink_for = |path: &str| {
        WebhookSink::new(&config(dir.path(), format!("http://{addr}/{path}"), true)).unwrap()
    };

    assert_eq!(sink_for("ok").deliver(&d).await, Ok(()));

    let (reason, after) = retry_reason(sink_for("429s").deliver(&d).await);
    assert_eq!(after, Some(Duration::from_secs(7)));
    assert!(reason.contains("429"), "{reason}");

    let (_, after) = retry_reason(sink_for("429d").deliver(&d).await);
    let after = after.expect("an HTTP-date Retry-After is honoured");
    assert!(
        after > Duration::from_secs(110) && after <= Duration::from_secs(120),
        "{after:?}"
    );

    let (reason, after) = retry_reason(sink_for("503").deliver(&d).await);
    assert_eq!(after, None);
    assert!(reason.contains("503"), "{reason}");

    match sink_for("410").deliver(&d).await {
        Err(SinkError::Gone { reason }) => {
            assert_eq!(reason, "HTTP 410 Gone: gone for good")
        }
        other => panic!("{other:?}"),
    }

    let (reason, after) = retry_reason(sink_for("500").deliver(&d).await);
    assert_eq!(
        (reason.as_str(), after),
        ("HTTP 500 Internal Server Error: boom", None)
    );

    let (reason, _) = retry_reason(sink_for("302").deliver(&d).await);
    assert!(
        reason.contains("302") && reason.contains("redirects are not followed"),
        "{reason}"
    );

    let started = Instant::now();
    let (reason, _) = retry_reason(sink_for("slow").deliver(&d).await);
    assert!(reason.contains("within 1 s"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // The redirect was not followed: the server saw each path once, and never /ok twice.
    let paths: Vec<String> = log.lock().unwrap().iter().map(|s| s.path.clone()).collect();
    assert_eq!(
        paths,
        ["ok", "429s", "429d", "503", "410", "500", "302", "slow"]
    );
}

#[tokio::test]
async fn calls_are_signed_and_retries_send_the_same_body() {
    let (addr, log) = server().await;
    let dir = tempfile::tempdir().unwrap();
    let failing = config(dir.path(), format!("http://{addr}/500"), true);
    let mut sink = WebhookSink::new(&failing).unwrap();
    let d = delivery();
    for _ in 0..2 {
        retry_reason(sink.deliver(&d).await);
    }
    // A restart (a new sink, the same secret file) sends the same delivery the same way.
    let mut sink =
        WebhookSink::new(&config(dir.path(), format!("http://{addr}/ok"), true)).unwrap();
    assert_eq!(sink.deliver(&d).await, Ok(()));

    let secret =
        Secret::parse(&std::fs::read_to_string(dir.path().join("payroll.whsec")).unwrap()).unwrap();
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        let h = |n: &str| s.headers.get(n).unwrap().to_str().unwrap().to_owned();
        assert_eq!(h("content-type"), "application/json");
        assert_eq!(h("webhook-id"), "payroll-1-2");
        let ts: i64 = h("webhook-timestamp").parse().unwrap();
        let now = outpost_ops::time::now_ms() / 1000;
        assert!((now - 5..=now).contains(&ts), "{ts} vs {now}");
        assert_eq!(
            h("webhook-signature"),
            secret.sign("payroll-1-2", ts, &s.body)
        );
        assert_eq!(s.body, seen[0].body, "byte-identical on every attempt");
    }
    let v: Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(v["type"], "punch.batch");
    assert_eq!(v["timestamp"], "2026-11-22T06:00:00.123Z");
    let ids: Vec<&str> = v["data"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["HC001/door-1/1", "HC001/door-1/2"]);
    assert_eq!(
        seen[0].body,
        Bytes::from(body(&d).unwrap()),
        "the body is body(delivery)"
    );
}

#[tokio::test]
async fn private_targets_are_refused_unless_allowed() {
    let (addr, log) = server().await;
    let dir = tempfile::tempdir().unwrap();
    let port = addr.port();
    for url in [
        format!("http://localhost:{port}/ok"),
        format!("http://127.0.0.1:{port}/ok"),
        format!("http://[::1]:{port}/ok"),
        format!("http://[::ffff:127.0.0.1]:{port}/ok"),
    ] {
        let mut sink = WebhookSink::new(&config(dir.path(), url.clone(), false)).unwrap();
        let (reason, after) = retry_reason(sink.deliver(&delivery()).await);
        assert!(
            reason.contains("refused to connect")
                && reason.contains("loopback")
                && reason.contains("allow_private"),
            "{url}: {reason}"
        );
        assert_eq!(after, None);
    }
    assert!(log.lock().unwrap().is_empty(), "nothing reached the server");
    let mut allowed = WebhookSink::new(&config(
        dir.path(),
        format!("http://localhost:{port}/ok"),
        true,
    ))
    .unwrap();
    assert_eq!(allowed.deliver(&delivery()).await, Ok(()));
}

#[tokio::test]
async fn a_connection_failure_is_a_retry_that_says_so() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    let mut sink =
        WebhookSink::new(&config(dir.path(), format!("http://{addr}/ok"), true)).unwrap();
    let (reason, _) = retry_reason(sink.deliver(&delivery()).await);
    assert!(reason.to_lowercase().contains("refused"), "{reason}");
    assert!(!reason.contains("/ok"), "the URL is left out: {reason}");
}

#[test]
fn retry_delays_follow_the_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let sink = WebhookSink::new(&config(
        dir.path(),
        "https://hr.example.org/x".into(),
        false,
    ))
    .unwrap();
    let secs = |f| sink.retry_delay(f).as_secs();
    assert_eq!(
        (1..=11).map(secs).collect::<Vec<_>>(),
        [5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400, 86400, 86400]
    );
    assert_eq!(secs(u32::MAX), 86400);
    let mut cfg = config(dir.path(), "https://hr.example.org/x".into(), false);
    cfg.retry_schedule_secs = vec![2];
    let sink = WebhookSink::new(&cfg).unwrap();
    assert_eq!(sink.retry_delay(1), Duration::from_secs(2));
    assert_eq!(sink.retry_delay(9), Duration::from_secs(2));
}

#[test]
fn setup_errors_name_the_output_and_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let err = |url: &str| {
        WebhookSink::new(&config(dir.path(), url.into(), false))
            .unwrap_err()
            .to_string()
    };
    let e = err("not a url");
    assert!(e.contains("outputs.webhook \"payroll\".url"), "{e}");
    let e = err("ftp://hr.example.org/x");
    assert!(e.contains("scheme") && e.contains("ftp"), "{e}");

    std::fs::write(dir.path().join("payroll.whsec"), "secret\n").unwrap();
    let e = err("https://hr.example.org/x");
    assert!(
        e.contains("outputs.webhook \"payroll\".secret_file") && e.contains("whsec_<base64"),
        "{e}"
    );
}
