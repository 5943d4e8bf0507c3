//! The `/iclock/*` router driven in-process (`tower::ServiceExt::oneshot`) against the real
//! committer and journal: handshakes, ATTLOG quirks, resends, journal full, other tables,
//! the allowlist, body limits, stamps across a restart.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use outpost_gateway::clock::{Clock, RelayTime};
use outpost_gateway::committer;
use outpost_gateway::ingest::adms::{
    router, AdmsConfig, AdmsDevice, AdmsState, OtherTables, UnknownDevices, UtcOffset,
};
use outpost_gateway::journal::{Journal, JournalConfig, MIN_MAX_BYTES};
use outpost_gateway::metrics::Metrics;
use outpost_protocol::{PunchKind, Record, VerifyMethod};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

struct Harness {
    dir: tempfile::TempDir,
    journal: Journal,
    state: AdmsState,
    app: Router,
    metrics: Metrics,
    shutdown: CancellationToken,
    committer: JoinHandle<()>,
}

fn config(devices: &[(&str, &str)]) -> AdmsConfig {
    let mut c = AdmsConfig {
        default_utc_offset: UtcOffset::parse("+02:00").unwrap(),
        ..AdmsConfig::default()
    };
    for (sn, off) in devices {
        c.devices.insert(
            sn.to_string(),
            AdmsDevice {
                name: Some(format!("door {sn}")),
                utc_offset: UtcOffset::parse(off),
            },
        );
    }
    c
}

/// The relay's time as an uplink that was just acked holds it, so that responses carry our
/// `Date` whether or not this machine's clock is synchronised.
fn relay_time_now(clock: &Clock) -> RelayTime {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let t = RelayTime::default();
    t.set(Some(outpost_protocol::TimeAnchor {
        boot_id: clock.boot_id(),
        mono_ms: clock.mono_ms(),
        true_ms: now,
        uncertainty_ms: 0,
    }));
    t
}

fn harness_with(cfg: AdmsConfig, jcfg: JournalConfig, dir: tempfile::TempDir) -> Harness {
    let journal = Journal::open(dir.path().join("journal"), &jcfg).unwrap();
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let (handle, task) = committer::spawn(journal.clone(), metrics.clone(), shutdown.clone());
    let clock = Clock::new();
    let state = AdmsState::new(
        cfg,
        dir.path(),
        handle,
        clock.clone(),
        relay_time_now(&clock),
        metrics.clone(),
    )
    .unwrap();
    Harness {
        app: router(state.clone()),
        dir,
        journal,
        state,
        metrics,
        shutdown,
        committer: task,
    }
}

fn harness(cfg: AdmsConfig) -> Harness {
    harness_with(cfg, JournalConfig::default(), tempfile::tempdir().unwrap())
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    body: impl Into<Body>,
) -> (StatusCode, HeaderMap, String) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("User-Agent", "iClock Proxy/1.09")
        .header("Content-Type", "text/plain")
        .body(body.into())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn stored(j: &Journal) -> Vec<Record> {
    j.read_from(0, 100_000, usize::MAX).unwrap()
}

const SN: &str = "CQUJ230160001";

#[tokio::test]
async fn handshake_old_firmware() {
    let h = harness(config(&[(SN, "+03:00")]));
    let (st, headers, body) = call(
        &h.app,
        "GET",
        &format!("/iclock/cdata?SN={SN}&options=all&language=69"),
        "",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines[0], format!("GET OPTION FROM: {SN}"));
    assert!(lines.contains(&"Stamp=0"), "{body}");
    assert!(lines.contains(&"OpStamp=0"), "{body}");
    assert!(lines.contains(&"TimeZone=3"), "{body}");
    assert!(lines.contains(&"Realtime=1"));
    assert!(!body.contains("ATTLOGStamp"));
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    check_date(&headers);
}

#[tokio::test]
async fn handshake_push_firmware() {
    let h = harness(config(&[(SN, "+05:30")]));
    let uri = format!("/iclock/cdata?SN={SN}&options=all&pushver=2.4.1&language=69");
    let (st, headers, body) = call(&h.app, "GET", &uri, "").await;
    assert_eq!(st, StatusCode::OK);
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines[0], format!("GET OPTION FROM: {SN}"));
    assert!(lines.contains(&"ATTLOGStamp=0"), "{body}");
    assert!(lines.contains(&"OPERLOGStamp=0"), "{body}");
    assert!(lines.contains(&"TimeZone=330"), "{body}");
    assert!(lines.contains(&"TransFlag=TransData AttLog"), "{body}");
    for key in [
        "ErrorDelay=",
        "Delay=",
        "TransTimes=",
        "TransInterval=",
        "Encrypt=",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(key)),
            "{key} missing in {body}"
        );
    }
    check_date(&headers);
    let t = h.state.terminals();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].push_version.as_deref(), Some("2.4.1"));
    assert!(t[0].last_seen.is_some());
}

fn check_date(headers: &HeaderMap) {
    let d = headers["date"].to_str().unwrap();
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let t = time::PrimitiveDateTime::parse(d, &f).unwrap().assume_utc();
    let now = time::OffsetDateTime::now_utc();
    // A format check with a generous bound, not a timing assertion.
    assert!((now - t).whole_hours().abs() < 24, "Date {d} is not today");
}

fn attlog_uri(sn: &str, stamp: u64) -> String {
    format!("/iclock/cdata?SN={sn}&table=ATTLOG&Stamp={stamp}")
}

#[tokio::test]
async fn attlog_lf_and_crlf_bodies() {
    let h = harness(config(&[(SN, "+02:00")]));
    let lf = "1001\t2024-03-01 08:00:00\t0\t1\t0\n1002\t2024-03-01 08:01:00\t1\t15\t0\n";
    let (st, _, body) = call(&h.app, "POST", &attlog_uri(SN, 10), lf).await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "OK: 2"));
    let crlf = "1003\t2024-03-01 08:02:00\t2\t4\t0\r\n1004\t2024-03-01 08:03:00\t3\t25\t0\r\n";
    let (st, _, body) = call(&h.app, "POST", &attlog_uri(SN, 11), crlf).await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "OK: 2"));
    let recs = stored(&h.journal);
    assert_eq!(recs.len(), 4);
    let p = &recs[0].punch;
    assert_eq!(p.device_id.as_str(), format!("zk:{SN}"));
    assert_eq!(p.subject_id.as_str(), "1001");
    assert_eq!(
        (p.kind, p.verify),
        (PunchKind::In, VerifyMethod::Fingerprint)
    );
    // 08:00 at +02:00 = 06:00Z
    assert_eq!(p.device_time_ms, 1_709_272_800_000);
    assert_eq!(p.utc_offset_min, Some(120));
    assert_eq!(recs[0].source, outpost_protocol::Source::Adms);
    let kinds: Vec<_> = recs
        .iter()
        .map(|r| (r.punch.kind, r.punch.verify))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (PunchKind::In, VerifyMethod::Fingerprint),
            (PunchKind::Out, VerifyMethod::Face),
            (PunchKind::BreakOut, VerifyMethod::Card),
            (PunchKind::BreakIn, VerifyMethod::Palm),
        ]
    );
}

#[tokio::test]
async fn attlog_field_counts_trailing_tabs_status_255_and_unicode_pin() {
    let h = harness(config(&[(SN, "+00:00")]));
    let body = [
        "2001\t2024-03-01 08:00:00\t0\t1\t0",                // 5 fields
        "2002\t2024-03-01 08:00:01\t0\t1\t0\t0\t0",          // 7
        "2003\t2024-03-01 08:00:02\t0\t1\t0\t0\t0\t0\t0",    // 9
        "2004\t2024-03-01 08:00:03\t0\t1\t0\t0\t0\t0\t0\t0", // 10
        "2005\t2024-03-01 08:00:04\t0\t1\t0\t0\t0\t0\t0\t0\t0", // 11
        "2006\t2024-03-01 08:00:05\t1\t15\t0\t\t\t\t",       // trailing tabs
        "2007\t2024-03-01 08:00:06\t255\t1\t0\t0\t0",        // status 255
        "Zoë-Ø\t2024-03-01 08:00:07\t0\t4\t0\t0\t0",         // non-ASCII PIN
    ]
    .join("\r\n");
    let (st, _, reply) = call(&h.app, "POST", &attlog_uri(SN, 1), body).await;
    assert_eq!((st, reply.as_str()), (StatusCode::OK, "OK: 8"));
    let recs = stored(&h.journal);
    let subjects: Vec<&str> = recs.iter().map(|r| r.punch.subject_id.as_str()).collect();
    assert_eq!(
        subjects,
        ["2001", "2002", "2003", "2004", "2005", "2006", "2007", "Zoë-Ø"]
    );
    assert_eq!(recs[6].punch.kind, PunchKind::Unspecified);
    assert_eq!(recs[5].punch.kind, PunchKind::Out);
    assert_eq!(recs[7].punch.verify, VerifyMethod::Card);
}

#[tokio::test]
async fn resends_are_stored_once() {
    let h = harness(config(&[(SN, "+02:00")]));
    let body = "1\t2024-03-01 08:00:00\t0\t1\t0\n2\t2024-03-01 08:00:00\t0\t1\t0\n1\t2024-03-01 08:00:00\t0\t1\t0\n";
    let (st, _, reply) = call(&h.app, "POST", &attlog_uri(SN, 5), body).await;
    assert_eq!((st, reply.as_str()), (StatusCode::OK, "OK: 3"));
    // The terminal did not get the OK, or its stamps were reset: it sends everything again,
    // with LF this time and extra reserved fields.
    let again =
        "1\t2024-03-01 08:00:00\t0\t1\t0\t0\t0\r\n2\t2024-03-01 08:00:00\t0\t1\t0\t0\t0\r\n";
    let (st, _, reply) = call(&h.app, "POST", &attlog_uri(SN, 5), again).await;
    assert_eq!((st, reply.as_str()), (StatusCode::OK, "OK: 2"));
    assert_eq!(stored(&h.journal).len(), 2);
    let t = &h.state.terminals()[0];
    assert_eq!((t.punches, t.duplicates), (2, 3));
}

#[tokio::test]
async fn stamps_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let h = harness_with(config(&[(SN, "+02:00")]), JournalConfig::default(), dir);
    let (st, _, _) = call(
        &h.app,
        "POST",
        &attlog_uri(SN, 1_716_192_600),
        "1\t2024-03-01 08:00:00\t0\t1\t0\n",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = call(
        &h.app,
        "POST",
        &format!("/iclock/cdata?SN={SN}&table=OPERLOG&OpStamp=77"),
        "OPLOG 4\t0\t2024-03-01 08:00:00\t0\t0\t0\t0\n",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    // Stop the gateway: the committer flushes and lets go of the journal.
    let Harness {
        dir,
        journal,
        state,
        app,
        shutdown,
        committer,
        ..
    } = h;
    shutdown.cancel();
    committer.await.unwrap();
    drop((journal, state, app));
    let h = harness_with(config(&[(SN, "+02:00")]), JournalConfig::default(), dir);
    let (_, _, body) = call(
        &h.app,
        "GET",
        &format!("/iclock/cdata?SN={SN}&options=all&pushver=2.4.1"),
        "",
    )
    .await;
    assert!(
        body.lines().any(|l| l == "ATTLOGStamp=1716192600"),
        "{body}"
    );
    assert!(body.lines().any(|l| l == "OPERLOGStamp=77"), "{body}");
    let (_, _, body) = call(
        &h.app,
        "GET",
        &format!("/iclock/cdata?SN={SN}&options=all"),
        "",
    )
    .await;
    assert!(body.lines().any(|l| l == "Stamp=1716192600"), "{body}");
}

#[tokio::test]
async fn journal_full_gets_an_error_and_loses_nothing() {
    let jcfg = JournalConfig {
        max_bytes: MIN_MAX_BYTES,
        ..JournalConfig::default()
    };
    let h = harness_with(
        config(&[(SN, "+02:00"), ("FILLER1", "+02:00")]),
        jcfg,
        tempfile::tempdir().unwrap(),
    );
    let lines = |pin0: usize, n: usize| -> String {
        (0..n)
            .map(|i| {
                format!(
                    "{}\t2024-03-01 {:02}:{:02}:{:02}\t0\t1\t0\t0\t0\n",
                    pin0 + i,
                    8 + i / 3600,
                    (i / 60) % 60,
                    i % 60
                )
            })
            .collect()
    };
    // Another terminal fills the journal (the uplink is down).
    let (st, _, _) = call(
        &h.app,
        "POST",
        &attlog_uri("FILLER1", 1),
        lines(90_000, 3000),
    )
    .await;
    assert_eq!(st, StatusCode::INSUFFICIENT_STORAGE);
    let filled = h.journal.next_seq();

    let body = lines(5000, 40);
    let (st, headers, reply) = call(&h.app, "POST", &attlog_uri(SN, 999), body.clone()).await;
    assert_eq!(st, StatusCode::INSUFFICIENT_STORAGE, "{reply}");
    assert!(reply.starts_with("ERROR"), "{reply}");
    assert!(headers.contains_key("retry-after"));
    check_date(&headers);
    let mut seen: std::collections::BTreeSet<String> = h
        .journal
        .read_from(filled, 100_000, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| r.punch.subject_id.as_str().to_string())
        .collect();
    assert!(seen.len() < 40);
    // The stamp did not move: a handshake still asks for everything after stamp 0.
    let (_, _, hs) = call(
        &h.app,
        "GET",
        &format!("/iclock/cdata?SN={SN}&options=all"),
        "",
    )
    .await;
    assert!(hs.lines().any(|l| l == "Stamp=0"), "{hs}");

    // The uplink comes back and the journal is trimmed; the terminal retries the same upload.
    h.journal.trim_through(h.journal.durable_through()).unwrap();
    let before = h.journal.next_seq();
    let (st, _, reply) = call(&h.app, "POST", &attlog_uri(SN, 999), body.clone()).await;
    assert_eq!((st, reply.as_str()), (StatusCode::OK, "OK: 40"));
    for r in h.journal.read_from(before, 100_000, usize::MAX).unwrap() {
        seen.insert(r.punch.subject_id.as_str().to_string());
    }
    // Nothing lost: every line is in the journal (or was, before the trim).
    assert_eq!(seen.len(), 40);
    let (_, _, hs) = call(
        &h.app,
        "GET",
        &format!("/iclock/cdata?SN={SN}&options=all"),
        "",
    )
    .await;
    assert!(hs.lines().any(|l| l == "Stamp=999"), "{hs}");
}

#[tokio::test]
async fn operlog_and_other_tables_are_accepted_and_ignored() {
    for mode in [OtherTables::Ignore, OtherTables::Log] {
        let mut cfg = config(&[(SN, "+02:00")]);
        cfg.other_tables = mode;
        let h = harness(cfg);
        let operlog = "OPLOG 4\t0\t2024-03-01 08:00:00\t0\t0\t0\t0\nUSER PIN=1\tName=Zoë\tPasswd=1234\tCard=[00]\nFP PIN=1\tFID=6\tSize=1\tValid=1\tTMP=AAAA\n";
        let (st, _, reply) = call(
            &h.app,
            "POST",
            &format!("/iclock/cdata?SN={SN}&table=OPERLOG&Stamp=3"),
            operlog,
        )
        .await;
        assert_eq!((st, reply.as_str()), (StatusCode::OK, "OK"));
        let (st, _, _) = call(
            &h.app,
            "POST",
            &format!("/iclock/cdata?SN={SN}&table=ATTPHOTO&Stamp=3"),
            vec![0xffu8, 0xd8, 0, 1],
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        let (st, _, _) = call(
            &h.app,
            "POST",
            &format!("/iclock/cdata?SN={SN}&table=options"),
            "~DeviceName=K40\n",
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert!(stored(&h.journal).is_empty());
    }
}

#[tokio::test]
async fn polls_answer_ok() {
    let h = harness(config(&[(SN, "+02:00")]));
    for (m, path) in [
        ("GET", "/iclock/getrequest"),
        ("GET", "/iclock/getrequest.aspx"),
        ("POST", "/iclock/devicecmd"),
        ("GET", "/iclock/ping"),
    ] {
        let (st, headers, body) = call(
            &h.app,
            m,
            &format!("{path}?SN={SN}&INFO=Ver%206.60,2,3,4,192.168.1.201"),
            "ID=1&Return=0&CMD=INFO",
        )
        .await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "OK"), "{path}");
        check_date(&headers);
    }
    let (st, _, _) = call(&h.app, "GET", "/iclock/getrequest", "").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _, _) = call(&h.app, "GET", "/iclock/getrequest?SN=a/b", "").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    // Lower-case parameter name, lower-case serial: the same terminal.
    let (st, _, _) = call(
        &h.app,
        "GET",
        &format!("/iclock/getrequest?sn={}", SN.to_lowercase()),
        "",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h.state.terminals().len(), 1);
}

/// Collects log output for one test (the tokio test runtime is single-threaded, so a
/// thread-local subscriber sees the handlers' events).
#[derive(Clone, Default)]
struct LogSink(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogSink;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn unknown_serial_is_refused_and_logged_once() {
    let sink = LogSink::default();
    let sub = tracing_subscriber::fmt()
        .with_writer(sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(sub);
    let h = harness(config(&[(SN, "+02:00")]));
    for _ in 0..3 {
        let (st, _, _) = call(&h.app, "GET", "/iclock/cdata?SN=INTRUDER1&options=all", "").await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (st, _, _) = call(
            &h.app,
            "POST",
            &attlog_uri("INTRUDER1", 1),
            "1\t2024-03-01 08:00:00\t0\t1\t0\n",
        )
        .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (st, _, _) = call(&h.app, "GET", "/iclock/getrequest?SN=INTRUDER1", "").await;
        assert_eq!(st, StatusCode::FORBIDDEN);
    }
    let (st, _, _) = call(&h.app, "GET", "/iclock/getrequest?SN=INTRUDER2", "").await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(stored(&h.journal).is_empty());
    let logs = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    assert_eq!(
        logs.matches("refused ADMS terminal INTRUDER1").count(),
        1,
        "{logs}"
    );
    assert_eq!(
        logs.matches("refused ADMS terminal INTRUDER2").count(),
        1,
        "{logs}"
    );
    assert!(logs.contains("[adms.devices.INTRUDER1]"));
    // Refused serials get no per-terminal state.
    assert_eq!(h.state.terminals().len(), 1);
    assert!(h.metrics.render().contains("adms_unknown_device"));
}

#[tokio::test]
async fn unknown_serial_accepted_when_configured() {
    let mut cfg = config(&[]);
    cfg.unknown_devices = UnknownDevices::Accept;
    let h = harness(cfg);
    let (st, _, reply) = call(
        &h.app,
        "POST",
        &attlog_uri("NEWONE", 1),
        "1\t2024-03-01 08:00:00\t0\t1\t0\n",
    )
    .await;
    assert_eq!((st, reply.as_str()), (StatusCode::OK, "OK: 1"));
    let recs = stored(&h.journal);
    assert_eq!(recs[0].punch.device_id.as_str(), "zk:NEWONE");
    // The site default offset applies.
    assert_eq!(recs[0].punch.utc_offset_min, Some(120));
    let t = h.state.terminals();
    assert_eq!((t[0].serial.as_str(), t[0].configured), ("NEWONE", false));
}

#[tokio::test]
async fn garbage_lines_are_skipped_not_fatal() {
    let h = harness(config(&[(SN, "+02:00")]));
    let body = b"1\t2024-03-01 08:00:00\t0\t1\t0\nnonsense\n2\t2024-02-30 08:00:00\t0\t1\n\xff\xfe\n3\t2024-03-01 08:00:00\tX\n4\t2024-03-01 09:00:00\t1\t1\t0\n".to_vec();
    let (st, _, reply) = call(&h.app, "POST", &attlog_uri(SN, 2), body).await;
    assert_eq!((st, reply.as_str()), (StatusCode::OK, "OK: 6"));
    assert_eq!(stored(&h.journal).len(), 2);
    let t = &h.state.terminals()[0];
    assert_eq!((t.punches, t.skipped), (2, 4));
    let m = h.metrics.render();
    assert!(
        m.contains(&format!(
            "adms_skipped_lines_total{{serial=\"{SN}\",reason=\"bad_time\"}} 1"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "adms_skipped_lines_total{{serial=\"{SN}\",reason=\"too_few_fields\"}} 1"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!("adms_punches_total{{serial=\"{SN}\"}} 2")),
        "{m}"
    );
    assert!(
        m.contains(&format!("adms_last_seen_seconds{{serial=\"{SN}\"}}")),
        "{m}"
    );
    // An empty upload is fine too.
    let (st, _, reply) = call(&h.app, "POST", &attlog_uri(SN, 2), "").await;
    assert_eq!((st, reply.as_str()), (StatusCode::OK, "OK: 0"));
}

#[tokio::test]
async fn oversized_body_is_refused() {
    let mut cfg = config(&[(SN, "+02:00")]);
    cfg.max_body_bytes = 4096;
    let h = harness(cfg);
    let line = "1\t2024-03-01 08:00:00\t0\t1\t0\n";
    let (st, headers, _) = call(&h.app, "POST", &attlog_uri(SN, 1), line.repeat(400)).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    check_date(&headers);
    assert!(stored(&h.journal).is_empty());
    let (st, _, _) = call(&h.app, "POST", &attlog_uri(SN, 1), line.repeat(10)).await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn configured_terminals_listed_before_first_contact() {
    let h = harness(config(&[(SN, "+02:00"), ("OTHER1", "+01:00")]));
    let t = h.state.terminals();
    assert_eq!(t.len(), 2);
    assert!(t.iter().all(|t| t.last_seen.is_none() && t.configured));
    let json = serde_json::to_value(&t[0]).unwrap();
    for key in [
        "serial",
        "device_id",
        "name",
        "last_seen",
        "punches",
        "skipped",
    ] {
        assert!(json.get(key).is_some(), "{key}");
    }
    let _ = &h.dir;
}
