//! Uplink end-to-end: the happy path over ws://, https (POST) and wss:// with a test CA
//! (and a gateway with the wrong CA that must refuse to send), the status of a gateway with
//! no relay, and time correction for a gateway whose wall clock is years wrong.

mod uplink_support;

use std::collections::BTreeSet;
use std::time::Duration;

use outpost_ops::time::now_ms;
use outpost_tests::pki::Pki;
use outpost_tests::relay::{Relay, StoreKind};
use uplink_support::*;

#[test]
fn ws_happy_path_everything_once_and_trimmed() {
    let relay = relay(StoreKind::Sled);
    let token = relay.add_gateway("gw-test", "HC001").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &relay.ws_url(), &token, &[]);
    gw.start();
    let mut expected = post(&gw, "door-1", 1..1001);
    expected.extend(post(&gw, "door-2", 1..1001));
    assert_eq!(expected.len(), 2000);
    assert!(
        wait_drained(&gw, Duration::from_secs(60)),
        "not drained: {}",
        status(&gw)["uplink"]
    );
    assert_exactly_once(&relay, "gw-test", &expected);
    let st = status(&gw);
    let up = &st["uplink"];
    assert_eq!(up["enabled"], true);
    assert_eq!(up["state"], "online", "{up}");
    assert_eq!(up["transport"], "websocket");
    assert!(up["bytes_sent"].as_u64().unwrap() > 0);
    assert_eq!(up["records_acked"], 2000);
    assert!(up["last_success"].is_string());
    assert_eq!(up["backlog_records"], 0);
    assert_eq!(up["time"]["anchored"], true, "{up}");
    assert!(
        up["time"]["offset_ms"].as_i64().unwrap().abs() < 2_000,
        "{up}"
    );
    assert_eq!(st["journal"]["acked_through"], 2000);
    let (_, metrics) = gw.admin_get("/metrics").unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let (_, m) = gw.admin_get("/metrics").unwrap();
            String::from_utf8_lossy(&m).contains("outpost_gateway_uplink_state{state=\"online\"} 1")
        }),
        "{metrics}"
    );
    assert!(
        metrics.contains("outpost_gateway_uplink_records_acked_total 2000"),
        "{metrics}"
    );

    // A restart resumes where it stopped: new punches go, nothing old is resent twice.
    assert!(gw.terminate().is_some_and(|s| s.success()));
    gw.start();
    expected.extend(post(&gw, "door-1", 1001..1101));
    assert!(wait_drained(&gw, Duration::from_secs(60)));
    assert_exactly_once(&relay, "gw-test", &expected);
    assert_eq!(relay_count(&relay, "gw-test"), 2100);
}

#[test]
fn https_transport_delivers_everything_once() {
    let relay = relay(StoreKind::Sled);
    let token = relay.add_gateway("gw-test", "HC001").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(
        dir.path(),
        &relay.http_url(),
        &token,
        &[
            ("OUTPOST_UPLINK__BATCH_MAX_RECORDS", "100"),
            ("OUTPOST_UPLINK__WINDOW", "4"),
        ],
    );
    gw.start();
    let expected = post(&gw, "door-1", 1..1501);
    assert!(
        wait_drained(&gw, Duration::from_secs(60)),
        "{}",
        status(&gw)["uplink"]
    );
    assert_exactly_once(&relay, "gw-test", &expected);
    let up = &status(&gw)["uplink"];
    assert_eq!(up["transport"], "https");
    assert_eq!(up["records_acked"], 1500);
}

#[test]
fn wrong_token_backs_off_and_keeps_everything() {
    let relay = relay(StoreKind::Sled);
    relay.add_gateway("gw-test", "HC001").unwrap();
    relay.revoke_gateway("gw-test").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &relay.ws_url(), "not-the-token", &[]);
    gw.start();
    let expected = post(&gw, "door-1", 1..201);
    assert!(wait_until(Duration::from_secs(20), || {
        let up = &status(&gw)["uplink"];
        up["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("uplink.token_file"))
    }));
    let st = status(&gw);
    assert_eq!(
        st["journal"]["records"], 200,
        "nothing trimmed without an ack"
    );
    assert_eq!(relay_count(&relay, "gw-test"), 0);
    // The operator fixes the token file: the uplink picks it up at the next attempt.
    let token = relay.add_gateway("gw-test", "HC001").unwrap();
    std::fs::write(dir.path().join("relay.token"), token).unwrap();
    assert!(
        wait_drained(&gw, Duration::from_secs(60)),
        "{}",
        status(&gw)["uplink"]
    );
    assert_exactly_once(&relay, "gw-test", &expected);
}

#[test]
fn no_relay_configured_status_says_offline() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw =
        outpost_tests::gateway::Gateway::new(dir.path(), &[("OUTPOST_AUTH__REQUIRED", "false")]);
    gw.start();
    post(&gw, "door-1", 1..11);
    let up = &status(&gw)["uplink"];
    assert_eq!(up["enabled"], false);
    assert_eq!(up["state"], "offline");
    assert!(up["detail"].as_str().unwrap().contains("uplink.relays"));
    assert_eq!(up["backlog_records"], 10);
}

/// A gateway that booted without network time: its wall clock is five years behind. Its
/// records reach the relay with that wrong `received_at`, and the relay's corrected time is
/// right once the first ack has anchored the gateway's monotonic clock. ZKTeco terminals,
/// which set their clocks from the gateway's `Date` header, get the relay's time then, not
/// the wrong clock.
#[test]
fn wall_clock_years_wrong_is_corrected_at_the_relay() {
    const FIVE_YEARS_MS: i64 = 5 * 365 * 86_400_000;
    let relay = relay(StoreKind::Sled);
    let token = relay.add_gateway("gw-test", "HC001").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let offset = format!("-{FIVE_YEARS_MS}");
    let mut gw = gateway(
        dir.path(),
        &relay.ws_url(),
        &token,
        &[
            ("OUTPOST_ADMS__ENABLED", "true"),
            ("OUTPOST_ADMS__UNKNOWN_DEVICES", "accept"),
        ],
    );
    gw.env.push(("OUTPOST_TEST_WALL_OFFSET_MS".into(), offset));
    gw.start();
    let before = now_ms();
    let expected = post(&gw, "door-1", 1..301);
    let after = now_ms();
    assert!(wait_drained(&gw, Duration::from_secs(60)));
    assert_exactly_once(&relay, "gw-test", &expected);
    // Records sent before the first ack get their correction from an anchor-only batch.
    assert!(
        wait_until(Duration::from_secs(20), || relay_rows(&relay)
            .iter()
            .all(|r| r["corrected_time"].is_string())),
        "some records never got a corrected time"
    );
    for r in relay_rows(&relay) {
        assert_eq!(r["clock_synced"], false);
        let received = parse_ms(r["received_at"].as_str().unwrap());
        assert!(
            received < before - FIVE_YEARS_MS + 60_000,
            "received_at is the wrong clock"
        );
        let corrected = parse_ms(r["corrected_time"].as_str().unwrap());
        assert!(
            corrected >= before - 2_000 && corrected <= after + 2_000,
            "corrected {corrected} not within [{before}, {after}] ± 2 s"
        );
    }
    let time = &status(&gw)["uplink"]["time"];
    assert_eq!(time["anchored"], true);
    let off = time["offset_ms"].as_i64().unwrap();
    assert!((off - FIVE_YEARS_MS).abs() < 2_000, "offset {off}");
    // The anchor is kept for this boot's records after a restart.
    assert!(dir.path().join("data/uplink-anchors.json").exists());
    // What a terminal polling now is told the time is: this year, not five years ago.
    let date = adms_date(gw.addr);
    let year = outpost_protocol::json::format_time(now_ms(), None)[..4].to_string();
    assert!(
        date.contains(&format!(" {year} ")),
        "the Date header {date:?} is not the relay's time (year {year})"
    );
}

/// The `Date` header of an ADMS ping, as sent.
fn adms_date(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /iclock/ping?SN=TESTSN01 HTTP/1.0\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    text.lines()
        .find(|l| l.to_ascii_lowercase().starts_with("date:"))
        .unwrap_or_else(|| panic!("no Date header: {text}"))[5..]
        .trim()
        .to_string()
}

fn parse_ms(s: &str) -> i64 {
    outpost_protocol::json::parse_time(s).unwrap().0
}

#[test]
fn wss_with_a_test_ca_delivers_and_a_wrong_ca_refuses_to_send() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "test");
    let wrong = Pki::new(dir.path(), "other");
    let (ca, wrong_ca) = (&pki.ca_file, &wrong.ca_file);
    let relay = Relay::start_tls(StoreKind::Sled, &pki, false, &[]).unwrap();
    let token_a = relay.add_gateway("gw-a", "HC001").unwrap();
    let token_b = relay.add_gateway("gw-b", "HC001").unwrap();
    let port = relay.addr.port();

    let url = format!("wss://localhost:{port}");
    let ca_s = ca.display().to_string();
    let wrong_s = wrong_ca.display().to_string();
    let mut a = gateway(
        &dir.path().join("a"),
        &url,
        &token_a,
        &[
            ("OUTPOST_GATEWAY__ID", "gw-a"),
            ("OUTPOST_UPLINK__CA_FILE", ca_s.as_str()),
        ],
    );
    let mut b = gateway(
        &dir.path().join("b"),
        &url,
        &token_b,
        &[
            ("OUTPOST_GATEWAY__ID", "gw-b"),
            ("OUTPOST_UPLINK__CA_FILE", wrong_s.as_str()),
        ],
    );
    a.start();
    b.start();
    let sent_a: BTreeSet<_> = post(&a, "door-a", 1..501);
    post(&b, "door-b", 1..101);
    assert!(
        wait_drained(&a, Duration::from_secs(60)),
        "{}",
        status(&a)["uplink"]
    );
    let up_a = &status(&a)["uplink"];
    assert_eq!(up_a["records_acked"], sent_a.len());
    assert!(wait_until(Duration::from_secs(20), || {
        status(&b)["uplink"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("TLS"))
    }));
    let st_b = status(&b);
    assert_eq!(st_b["uplink"]["bytes_sent"], 0, "{}", st_b["uplink"]);
    assert_eq!(st_b["uplink"]["records_acked"], 0);
    assert_eq!(st_b["journal"]["records"], 100);
}
