//! End-to-end tests of the gateway's HTTP API, CLI and operations, against the real binary.

use std::time::{Duration, Instant};

use outpost_tests::gateway::Gateway;
use outpost_tests::proc::http;
use serde_json::{json, Value};

fn punch(device: &str, seq: u64) -> Value {
    json!({"device_id": device, "seq": seq, "subject": "EMP-0042", "kind": "in",
           "verify": "card", "time": "2026-11-22T07:58:03+02:00"})
}

#[test]
fn ingest_auth_validation_status_export_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(
        dir.path(),
        &[("OUTPOST_HTTP__MAX_PUNCHES_PER_REQUEST", "5")],
    );
    let token = gw.add_device("door-1");
    assert!(
        token.starts_with("opd_"),
        "token printed as the last line: {token}"
    );
    gw.start();

    // Accepted, then a resend is a duplicate.
    let (code, v) = gw.post_punches(Some(&token), &punch("door-1", 1)).unwrap();
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["results"][0]["status"], "accepted");
    let first_seq = v["results"][0]["gateway_seq"].as_u64().unwrap();
    let (code, v) = gw.post_punches(Some(&token), &punch("door-1", 1)).unwrap();
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["results"][0]["status"], "duplicate");

    // Arrays: accepted + duplicate → 200.
    let (code, v) = gw
        .post_punches(
            Some(&token),
            &json!([punch("door-1", 2), punch("door-1", 1)]),
        )
        .unwrap();
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["results"][0]["gateway_seq"].as_u64(), Some(first_seq + 1));

    // Auth.
    assert_eq!(gw.post_punches(None, &punch("door-1", 3)).unwrap().0, 401);
    let (code, v) = gw
        .post_punches(Some("opd_wrong"), &punch("door-1", 3))
        .unwrap();
    assert_eq!(code, 401);
    assert_eq!(v["error"]["code"], "unauthorized");
    let (code, v) = gw.post_punches(Some(&token), &punch("door-2", 3)).unwrap();
    assert_eq!(code, 403, "{v}");
    assert_eq!(v["results"][0]["code"], "device_mismatch");

    // Validation: the bad punch is named, the good one in the same request is stored.
    let mut bad = punch("door-1", 4);
    bad["kind"] = json!("sideways");
    let (code, v) = gw
        .post_punches(Some(&token), &json!([bad, punch("door-1", 5)]))
        .unwrap();
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["results"][0]["status"], "rejected");
    assert_eq!(v["results"][0]["field"], "kind");
    assert_eq!(v["error"]["code"], "unknown_kind");
    assert_eq!(v["results"][1]["status"], "accepted");

    // Not JSON, too many punches, unsupported content type.
    let auth = format!("Bearer {token}");
    let (code, _) = http(
        gw.addr,
        "POST",
        "/v1/punches",
        &[("Authorization", &auth)],
        b"{not json",
    )
    .unwrap();
    assert_eq!(code, 400);
    let many = Value::Array((10..16).map(|s| punch("door-1", s)).collect());
    assert_eq!(gw.post_punches(Some(&token), &many).unwrap().0, 413);
    let (code, _) = http(
        gw.addr,
        "POST",
        "/v1/punches",
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        b"x",
    )
    .unwrap();
    assert_eq!(code, 415);

    // CBOR in, CBOR DeviceAcks out.
    let p = outpost_protocol::json::punch_from_json(&punch("door-1", 7)).unwrap();
    let (code, body) = http(
        gw.addr,
        "POST",
        "/v1/punches",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/cbor"),
        ],
        &outpost_protocol::cbor::to_vec(&p),
    )
    .unwrap();
    assert_eq!(code, 201);
    let acks: Vec<outpost_protocol::DeviceAck> = minicbor_decode(&body);
    assert_eq!(acks[0].device_seq, 7);
    assert_eq!(acks[0].status, outpost_protocol::AckStatus::Accepted);

    // Status needs the admin token.
    assert_eq!(http(gw.addr, "GET", "/v1/status", &[], b"").unwrap().0, 401);
    let (code, body) = gw.admin_get("/v1/status").unwrap();
    assert_eq!(code, 200);
    let st: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(st["journal"]["records"], 4, "{st}");
    assert_eq!(st["gateway"]["site"], "HC001");
    let (ok, out, err) = gw.cli(&["status"]);
    assert!(ok, "{err}");
    assert!(out.contains("journal: 4 records"), "{out}");

    // Health and metrics.
    assert_eq!(
        http(gw.addr, "GET", "/health/live", &[], b"").unwrap().0,
        200
    );
    assert_eq!(
        http(gw.addr, "GET", "/health/ready", &[], b"").unwrap().0,
        200
    );
    let (_, m) = http(gw.addr, "GET", "/metrics", &[], b"").unwrap();
    let m = String::from_utf8(m).unwrap();
    assert!(
        m.contains("outpost_gateway_ingest_punches_total{source=\"http\",outcome=\"accepted\"} 4"),
        "{m}"
    );
    assert!(m.contains("outpost_gateway_commit_seconds_bucket"), "{m}");
    assert!(
        m.contains("outpost_gateway_mqtt_state{state=\"off\"} 1"),
        "{m}"
    );
    assert!(
        m.trim_end().ends_with("# EOF"),
        "OpenMetrics end marker stays last"
    );

    // Export through the running daemon, then SIGTERM, then export from the stopped journal.
    let (ok, _, err) = gw.cli(&["export", "--format", "csv"]);
    assert!(ok && err.contains("admin API"), "{err}");
    let live = gw.export();
    assert_eq!(live.len(), 4);
    assert_eq!(live[0]["site"], "HC001");
    assert_eq!(live[0]["subject"], "EMP-0042");
    let status = gw.terminate().expect("exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
    let (ok, _, err) = gw.cli(&["export"]);
    assert!(ok && err.contains("not running"), "{err}");
    assert_eq!(gw.export(), live, "same records from the stopped journal");

    // Revocation reaches a running gateway without a restart.
    gw.start();
    let (ok, _, err) = gw.cli(&["device", "revoke", "door-1"]);
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = gw.post_punches(Some(&token), &punch("door-1", 99)).unwrap();
        if code == 401 {
            break;
        }
        assert!(Instant::now() < deadline, "revoked token still accepted");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn minicbor_decode(bytes: &[u8]) -> Vec<outpost_protocol::DeviceAck> {
    outpost_protocol::cbor::decode_exact(bytes).expect("CBOR acks")
}

#[test]
fn rate_limit_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(
        dir.path(),
        &[
            ("OUTPOST_HTTP__RATE_LIMIT_PER_SECOND", "1"),
            ("OUTPOST_HTTP__RATE_LIMIT_BURST", "2"),
        ],
    );
    let token = gw.add_device("door-1");
    gw.start();
    let codes: Vec<u16> = (1..=4)
        .map(|s| {
            gw.post_punches(Some(&token), &punch("door-1", s))
                .unwrap()
                .0
        })
        .collect();
    assert_eq!(&codes[..2], &[201, 201]);
    assert!(codes[2..].contains(&429), "{codes:?}");
}

/// Lab mode has no tokens: the limit is per punch `device_id`, so devices behind one
/// address (or one test client) are not throttled together.
#[test]
fn lab_mode_rate_limit_is_per_device_not_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(
        dir.path(),
        &[
            ("OUTPOST_AUTH__REQUIRED", "false"),
            ("OUTPOST_HTTP__RATE_LIMIT_PER_SECOND", "1"),
            ("OUTPOST_HTTP__RATE_LIMIT_BURST", "2"),
        ],
    );
    gw.start();
    // One device past its burst is limited...
    let codes: Vec<u16> = (1..=4)
        .map(|s| gw.post_punches(None, &punch("door-1", s)).unwrap().0)
        .collect();
    assert_eq!(&codes[..2], &[201, 201]);
    assert!(codes[2..].contains(&429), "{codes:?}");
    // ... and four more devices from the same address still get their own burst.
    for d in 2..=5 {
        let device = format!("door-{d}");
        for s in 1..=2 {
            let (code, v) = gw.post_punches(None, &punch(&device, s)).unwrap();
            assert_eq!(code, 201, "{device} seq {s}: {v}");
        }
    }
    // A body without a valid punch is limited by the client's address.
    let codes: Vec<u16> = (0..4)
        .map(|_| {
            http(gw.addr, "POST", "/v1/punches", &[], b"{not json")
                .unwrap()
                .0
        })
        .collect();
    assert_eq!(&codes[..2], &[400, 400]);
    assert!(codes[2..].contains(&429), "{codes:?}");
}

#[test]
fn body_limit_is_413() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(
        dir.path(),
        &[
            ("OUTPOST_AUTH__REQUIRED", "false"),
            ("OUTPOST_HTTP__MAX_BODY_BYTES", "2048"),
        ],
    );
    gw.start();
    let big = Value::Array((0..40).map(|s| punch("door-1", s)).collect());
    let (code, v) = gw.post_punches(None, &big).unwrap();
    assert_eq!(code, 413, "{v}");
    assert_eq!(v["error"]["code"], "too_large");
}

#[test]
fn full_journal_rejects_with_507_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("OUTPOST_AUTH__REQUIRED", "false"),
        ("OUTPOST_JOURNAL__MAX_BYTES", "65536"),
    ];
    let mut gw = Gateway::new(dir.path(), &env);
    gw.start();
    let mut accepted = Vec::new();
    let mut full_at = None;
    for s in 1..5000u64 {
        let (code, v) = gw.post_punches(None, &punch("door-1", s)).unwrap();
        match code {
            201 => accepted.push(s),
            507 => {
                assert_eq!(v["results"][0]["code"], "storage_full", "{v}");
                full_at = Some(s);
                break;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    let full_at = full_at.expect("the journal never filled up");
    assert_eq!(
        http(gw.addr, "GET", "/health/ready", &[], b"").unwrap().0,
        503
    );
    // A restart with a bigger quota: writing resumes, and nothing accepted was lost.
    gw.terminate();
    gw.env.retain(|(k, _)| k != "OUTPOST_JOURNAL__MAX_BYTES");
    gw.start();
    let (code, _) = gw.post_punches(None, &punch("door-1", full_at)).unwrap();
    assert_eq!(code, 201);
    let seqs: Vec<u64> = gw
        .export()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    for s in &accepted {
        assert!(seqs.contains(s), "accepted punch {s} lost");
    }
    assert_eq!(seqs.len(), accepted.len() + 1);
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::new(dir.path(), &[("OUTPOST_HTTP__LISTEN", "nowhere")]);
    let (ok, _, err) = gw.cli(&["check-config"]);
    assert!(!ok);
    assert!(err.contains("http.listen"), "{err}");
    let cfg = dir.path().join("g.toml");
    std::fs::write(&cfg, "[journal]\non_full = \"sometimes\"\n").unwrap();
    let gw = Gateway::new(dir.path(), &[]);
    let (ok, _, err) = gw.cli(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("journal.on_full"), "{err}");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/gateway.toml");
    let (ok, out, err) = gw.cli(&["check-config", "--config", example]);
    assert!(ok, "config/gateway.toml must stay valid: {err}");
    assert!(out.contains("configuration OK"));
}
