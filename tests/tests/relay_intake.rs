//! The real `outpost-relay` binary (sled store): intake over HTTP and WebSocket, acks,
//! dedup, queries, authentication, bounded decoding, shutdown.

use std::time::{Duration, Instant};

use outpost_protocol::frame::{self, Codec, HEADER_LEN, MAGIC, VERSION};
use outpost_tests::relay::{
    batch, error_code, frame as zframe, post_frame, punches, records, ws_connect, ws_reply,
    ws_send, Relay, Reply, StoreKind,
};
use rand::{Rng, SeedableRng};

fn start(env: &[(&str, &str)]) -> Relay {
    Relay::start(StoreKind::Sled, env).expect("start relay")
}

fn raw_frame(codec: u8, raw_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAGIC);
    f.push(VERSION);
    f.push(codec);
    f.extend_from_slice(&0u32.to_be_bytes());
    f.extend_from_slice(&raw_len.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_batches_are_acked_deduplicated_and_queryable() {
    let relay = start(&[]);
    let token = relay.add_gateway("gw-1", "HC001").unwrap();
    let base = relay.http_url();
    let f = zframe(&batch("gw-1", "HC001", 77, records(&punches(1..=100), 1)));
    let (status, body) = post_frame(&base, Some(&token), f.clone()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let ack = frame::decode_ack(&body).unwrap();
    assert_eq!(
        (ack.acked_through, ack.journal_epoch, ack.duplicates),
        (100, 77, Some(0))
    );
    assert_eq!(ack.gateway_id.as_str(), "gw-1");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        (ack.server_time_ms - now).abs() < 60_000,
        "ack carries the relay's clock"
    );
    // The resend (lost ack) is recognised.
    let (status, body) = post_frame(&base, Some(&token), f).await;
    assert_eq!(status, 200);
    assert_eq!(frame::decode_ack(&body).unwrap().duplicates, Some(100));
    // Uncompressed frames are accepted too.
    let plain = frame::encode_batch(
        &batch("gw-1", "HC001", 77, records(&punches(101..=110), 101)),
        Codec::None,
    )
    .unwrap();
    let (status, body) = post_frame(&base, Some(&token), plain).await;
    assert_eq!(status, 200);
    assert_eq!(frame::decode_ack(&body).unwrap().acked_through, 110);

    // Query API.
    let (status, _) =
        outpost_tests::proc::http(relay.addr, "GET", "/v1/punches", &[], b"").unwrap();
    assert_eq!(status, 401, "the query API needs the admin token");
    let (status, body) = relay.admin_get("/v1/punches?site=HC001&limit=40").unwrap();
    assert_eq!(status, 200);
    let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 40);
    assert_eq!(page["items"][0]["gateway_id"], "gw-1");
    assert_eq!(page["items"][0]["site"], "HC001");
    assert_eq!(page["items"][0]["gateway_seq"], 1);
    assert!(page["items"][0]["corrected_time"].is_string());
    let mut seen = 40;
    let mut cursor = page["next_cursor"].as_str().unwrap().to_string();
    loop {
        let (_, body) = relay
            .admin_get(&format!("/v1/punches?site=HC001&limit=40&cursor={cursor}"))
            .unwrap();
        let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
        seen += page["items"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, 110);
    let (_, body) = relay
        .admin_get("/v1/punches?device=dev-1&from=2026-11-22T06:10:00Z&to=2026-11-22T06:30:00Z")
        .unwrap();
    let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let seqs: Vec<u64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![13, 17, 21, 25, 29]);
    let (status, body) = relay.admin_get("/v1/punches?from=yesterday").unwrap();
    assert_eq!(
        (status, error_code(&body).as_str()),
        (400, "invalid_parameter")
    );
    let (status, body) = relay.admin_get("/v1/punches.csv?site=HC001").unwrap();
    assert_eq!(status, 200);
    let csv = String::from_utf8(body).unwrap();
    assert!(csv.starts_with("site,gateway_id,"));
    assert_eq!(csv.lines().count(), 111);
    let (status, body) = relay.admin_get("/v1/gateways").unwrap();
    assert_eq!(status, 200);
    let g: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(g["gateways"][0]["gateway_id"], "gw-1");
    assert_eq!(g["gateways"][0]["acked_through"], 110);
    assert_eq!(g["gateways"][0]["records"], 110);
    assert_eq!(g["gateways"][0]["duplicates"], 100);
    let (status, body) =
        outpost_tests::proc::http(relay.addr, "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(status, 200);
    let m = String::from_utf8(body).unwrap();
    assert!(
        m.contains("outpost_relay_records_total{outcome=\"stored\"} 110"),
        "{m}"
    );
    assert!(m.contains("outpost_relay_commit_seconds"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_pipelines_batches_and_acks_in_order() {
    let relay = start(&[]);
    let token = relay.add_gateway("gw-ws", "HC001").unwrap();
    let mut ws = ws_connect(&relay.ws_url(), Some(&token)).await.unwrap();
    for i in 0..6u64 {
        let first = 1 + i * 50;
        let f = zframe(&batch(
            "gw-ws",
            "HC001",
            1,
            records(&punches(first..=first + 49), first),
        ));
        ws_send(&mut ws, f).await;
    }
    for i in 0..6u64 {
        match ws_reply(&mut ws).await {
            Reply::Ack(a) => assert_eq!(a.acked_through, 50 + i * 50),
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    // Resending everything on a new connection: all duplicates, same watermark.
    let mut ws2 = ws_connect(&relay.ws_url(), Some(&token)).await.unwrap();
    ws_send(
        &mut ws2,
        zframe(&batch("gw-ws", "HC001", 1, records(&punches(1..=300), 1))),
    )
    .await;
    match ws_reply(&mut ws2).await {
        Reply::Ack(a) => assert_eq!((a.acked_through, a.duplicates), (300, Some(300))),
        other => panic!("expected an ack, got {other:?}"),
    }
}

/// Polls the relay's `outpost_relay_open_websockets` gauge until it is `n` (20 s at most).
async fn wait_open_websockets(relay: &Relay, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = None;
    loop {
        let addr = relay.addr;
        let text = tokio::task::spawn_blocking(move || {
            outpost_tests::proc::http(addr, "GET", "/metrics", &[], b"")
        })
        .await
        .expect("metrics request task");
        last = text
            .ok()
            .and_then(|(_, body)| {
                String::from_utf8_lossy(&body)
                    .lines()
                    .find_map(|l| l.strip_prefix("outpost_relay_open_websockets "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .or(last);
        if last == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "outpost_relay_open_websockets is {last:?}, not {n}, after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_idle_connections_are_pinged_and_closed() {
    let relay = start(&[
        ("OUTPOST_LIMITS__WS_PING_INTERVAL_SECS", "1"),
        ("OUTPOST_LIMITS__WS_IDLE_TIMEOUT_SECS", "2"),
    ]);
    let token = relay.add_gateway("gw-idle", "HC001").unwrap();
    let mut ws = ws_connect(&relay.ws_url(), Some(&token)).await.unwrap();
    // A client that does not poll its socket never answers pings: the relay closes it as
    // idle. (Reading would answer the pings automatically, so the test watches the relay's
    // open-WebSockets gauge instead: up when the relay took the socket, down once it sent
    // the close frame and let the socket go.)
    wait_open_websockets(&relay, 1).await;
    wait_open_websockets(&relay, 0).await;
    let r = ws_reply(&mut ws).await;
    assert_eq!(r, Reply::Close(1000, "idle_timeout".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_failures() {
    let relay = start(&[]);
    let t1 = relay.add_gateway("gw-1", "HC001").unwrap();
    let t2 = relay.add_gateway("gw-2", "HC002").unwrap();
    let base = relay.http_url();
    let good = zframe(&batch("gw-1", "HC001", 1, records(&punches(1..=5), 1)));

    let (s, b) = post_frame(&base, None, good.clone()).await;
    assert_eq!((s, error_code(&b).as_str()), (401, "unauthorized"));
    let (s, _) = post_frame(&base, Some("opg_0000"), good.clone()).await;
    assert_eq!(s, 401);
    // gw-2's token with gw-1's batch; gw-1's token with another site.
    let (s, b) = post_frame(&base, Some(&t2), good.clone()).await;
    assert_eq!((s, error_code(&b).as_str()), (403, "gateway_mismatch"));
    let other_site = zframe(&batch("gw-1", "HC002", 1, records(&punches(1..=5), 1)));
    let (s, b) = post_frame(&base, Some(&t1), other_site.clone()).await;
    assert_eq!((s, error_code(&b).as_str()), (403, "site_mismatch"));
    // Over WebSocket: refused upgrade without a token, close 1008 on a mismatch.
    let e = ws_connect(&relay.ws_url(), None).await.unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");
    let mut ws = ws_connect(&relay.ws_url(), Some(&t1)).await.unwrap();
    ws_send(&mut ws, other_site).await;
    assert_eq!(
        ws_reply(&mut ws).await,
        Reply::Close(1008, "site_mismatch".into())
    );
    // Nothing of the refused batches was stored; the right one is.
    let (s, _) = post_frame(&base, Some(&t1), good.clone()).await;
    assert_eq!(s, 200);
    // Revocation reaches the running relay without a restart.
    relay.revoke_gateway("gw-1").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, _) = post_frame(&base, Some(&t1), good.clone()).await;
        if s == 401 {
            break;
        }
        assert!(Instant::now() < deadline, "revoked token still accepted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = ws_connect(&relay.ws_url(), Some(&t1)).await.unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");
    // A gateway added while running is accepted.
    let t3 = relay.add_gateway("gw-3", "HC001").unwrap();
    let f3 = zframe(&batch("gw-3", "HC001", 1, records(&punches(1..=5), 1)));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, b) = post_frame(&base, Some(&t3), f3.clone()).await;
        if s == 200 {
            assert_eq!(frame::decode_ack(&b).unwrap().duplicates, Some(5));
            break;
        }
        assert!(Instant::now() < deadline, "new gateway not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, body) = outpost_tests::proc::http(relay.addr, "GET", "/metrics", &[], b"").unwrap();
    let m = String::from_utf8(body).unwrap();
    assert!(
        m.contains("outpost_relay_auth_failures_total{reason=\"mismatch\"}"),
        "{m}"
    );
    // The CLI refuses a duplicate id, says so, and prints no token.
    let out = relay
        .cli(&["gateway", "add", "gw-2", "--site", "HC002"])
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}

/// The bad frames of the bounded-decoding tests: (name, frame, HTTP status, code).
fn bad_frames() -> Vec<(&'static str, Vec<u8>, u16, &'static str)> {
    let good = zframe(&batch("gw-1", "HC001", 1, records(&punches(1..=20), 1)));
    // A zstd bomb: 64 MiB of zeros compress to a few KiB; it claims 1 MiB.
    let zeros = vec![0u8; 64 << 20];
    let bomb = zstd::bulk::compress(&zeros, 3).unwrap();
    drop(zeros);
    vec![
        ("bomb", raw_frame(1, 1 << 20, &bomb), 413, "overflow"),
        (
            "claims too much",
            raw_frame(1, u32::MAX, &bomb),
            413,
            "too_large",
        ),
        ("truncated header", good[..9].to_vec(), 400, "truncated"),
        (
            "truncated payload",
            good[..good.len() - 7].to_vec(),
            400,
            "inflate",
        ),
        (
            "garbage",
            b"GET / HTTP/1.1 hello there, relay".to_vec(),
            400,
            "bad_magic",
        ),
        (
            "bad version",
            {
                let mut f = good.clone();
                f[4] = 9;
                f
            },
            400,
            "unsupported_version",
        ),
        (
            "bad codec",
            {
                let mut f = good.clone();
                f[5] = 7;
                f
            },
            400,
            "unknown_codec",
        ),
        (
            "not cbor",
            raw_frame(0, 5, b"\xff\xff\xff\xff\xff"),
            400,
            "cbor",
        ),
        (
            "too many records",
            zframe(&batch("gw-1", "HC001", 1, records(&punches(1..=101), 1))),
            413,
            "too_many_records",
        ),
        (
            "frame too large",
            vec![0u8; 300_000],
            413,
            "frame_too_large",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_punches_are_acked_and_held_not_stored() {
    let relay = start(&[]);
    let token = relay.add_gateway("gw-1", "HC001").unwrap();
    let base = relay.http_url();
    let mut r = records(&punches(1..=3), 1);
    r[1].punch.device_time_ms = 5;
    let (status, body) =
        post_frame(&base, Some(&token), zframe(&batch("gw-1", "HC001", 1, r))).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let ack = frame::decode_ack(&body).unwrap();
    assert_eq!(
        ack.acked_through, 3,
        "the stream moves past the invalid record"
    );
    let (_, body) = relay.admin_get("/v1/punches").unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let seqs: Vec<u64> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["gateway_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 3]);
    let (status, body) = relay.admin_get("/v1/rejected").unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{v}");
    assert_eq!(items[0]["gateway_seq"], 2);
    assert_eq!(items[0]["gateway_id"], "gw-1");
    assert!(items[0]["reason"].as_str().unwrap().contains("time"), "{v}");
    let (_, body) = relay.admin_get("/v1/gateways").unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["gateways"][0]["rejected"], 1, "{v}");
    let (_, body) = relay.admin_get("/metrics").unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.lines()
            .any(|l| l.starts_with("outpost_relay_records_total{outcome=\"rejected\"} 1")),
        "{text}"
    );
}

const LIMITS: &[(&str, &str)] = &[
    ("OUTPOST_LIMITS__MAX_FRAME_BYTES", "262144"),
    ("OUTPOST_LIMITS__MAX_RAW_BYTES", "2097152"),
    ("OUTPOST_LIMITS__MAX_RECORDS_PER_BATCH", "100"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_decoding_over_http() {
    let relay = start(LIMITS);
    let token = relay.add_gateway("gw-1", "HC001").unwrap();
    let base = relay.http_url();
    for (name, f, status, code) in bad_frames() {
        let (s, b) = post_frame(&base, Some(&token), f).await;
        assert_eq!((s, error_code(&b).as_str()), (status, code), "{name}");
    }
    // The relay is fine and stored nothing from the bad frames.
    let good = zframe(&batch("gw-1", "HC001", 1, records(&punches(1..=20), 1)));
    let (s, b) = post_frame(&base, Some(&token), good).await;
    assert_eq!(s, 200);
    assert_eq!(frame::decode_ack(&b).unwrap().duplicates, Some(0));
    let (_, body) = outpost_tests::proc::http(relay.addr, "GET", "/metrics", &[], b"").unwrap();
    let m = String::from_utf8(body).unwrap();
    for kind in [
        "inflate",
        "too_large",
        "truncated",
        "bad_magic",
        "too_many_records",
        "frame_too_large",
    ] {
        assert!(
            m.contains(&format!(
                "outpost_relay_decode_errors_total{{kind=\"{kind}\"}}"
            )),
            "{kind}: {m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_decoding_over_websocket_closes_only_the_bad_client() {
    let relay = start(LIMITS);
    let token = relay.add_gateway("gw-1", "HC001").unwrap();
    // A well-behaved client stays connected throughout.
    let mut good_ws = ws_connect(&relay.ws_url(), Some(&token)).await.unwrap();
    let mut seq = 1u64;
    for (name, f, status, code) in bad_frames() {
        let mut ws = ws_connect(&relay.ws_url(), Some(&token)).await.unwrap();
        ws_send(&mut ws, f).await;
        let expect_close = match status {
            413 => 1009,
            _ => 1007,
        };
        match ws_reply(&mut ws).await {
            Reply::Close(c, reason) => {
                assert_eq!((c, reason.as_str()), (expect_close, code), "{name}")
            }
            other => panic!("{name}: expected a close, got {other:?}"),
        }
        let f = zframe(&batch(
            "gw-1",
            "HC001",
            1,
            records(&punches(seq..=seq + 9), seq),
        ));
        ws_send(&mut good_ws, f).await;
        match ws_reply(&mut good_ws).await {
            Reply::Ack(a) => assert_eq!(a.acked_through, seq + 9, "{name}"),
            other => panic!("{name}: good client got {other:?}"),
        }
        seq += 10;
    }
    // A text message is refused with 1003.
    let mut ws = ws_connect(&relay.ws_url(), Some(&token)).await.unwrap();
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        "hello".into(),
    ))
    .await
    .unwrap();
    assert_eq!(
        ws_reply(&mut ws).await,
        Reply::Close(1003, "binary_frames_only".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_frames_get_answers_and_never_hurt_the_relay() {
    let relay = start(LIMITS);
    let token = relay.add_gateway("gw-1", "HC001").unwrap();
    let base = relay.http_url();
    let seeds = [
        zframe(&batch("gw-1", "HC001", 1, records(&punches(1..=30), 1))),
        frame::encode_batch(
            &batch("gw-1", "HC001", 1, records(&punches(1..=30), 1)),
            Codec::None,
        )
        .unwrap(),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..300 {
        let mut f = seeds[i % 2].clone();
        match rng.random_range(0..4) {
            0 => {
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..f.len());
                    f[at] = rng.random();
                }
            }
            1 => f.truncate(rng.random_range(0..f.len())),
            2 => {
                let at = rng.random_range(HEADER_LEN..f.len());
                f.insert(at, rng.random());
            }
            _ => {
                let n = rng.random_range(0..200);
                f = (0..n).map(|_| rng.random()).collect();
            }
        }
        let (s, _) = post_frame(&base, Some(&token), f).await;
        assert!([200, 400, 403, 413].contains(&s), "unexpected status {s}");
        *statuses.entry(s).or_insert(0) += 1;
    }
    assert!(
        statuses.get(&400).copied().unwrap_or(0) > 100,
        "{statuses:?}"
    );
    let (s, _) = outpost_tests::proc::http(relay.addr, "GET", "/health/ready", &[], b"").unwrap();
    assert_eq!(s, 200);
}

#[test]
fn sigterm_exits_cleanly_and_data_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::prepare(&dir.path().join("data"), StoreKind::Sled, &[]);
    relay.restart().unwrap();
    let token = relay.add_gateway("gw-1", "HC001").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let f = zframe(&batch("gw-1", "HC001", 1, records(&punches(1..=50), 1)));
    let (s, _) = rt.block_on(post_frame(&relay.http_url(), Some(&token), f.clone()));
    assert_eq!(s, 200);
    // An open WebSocket does not hold shutdown up: it is closed with 1001.
    let mut ws = rt
        .block_on(ws_connect(&relay.ws_url(), Some(&token)))
        .unwrap();
    assert!(relay.stop(), "exit status 0 on SIGTERM");
    assert_eq!(
        rt.block_on(ws_reply(&mut ws)),
        Reply::Close(1001, "shutting_down".into())
    );
    relay.restart().unwrap();
    let (s, b) = rt.block_on(post_frame(&relay.http_url(), Some(&token), f));
    assert_eq!(s, 200);
    let ack = frame::decode_ack(&b).unwrap();
    assert_eq!((ack.acked_through, ack.duplicates), (50, Some(50)));
}

#[test]
fn invalid_configuration_fails_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::prepare(
        &dir.path().join("data"),
        StoreKind::Sled,
        &[("OUTPOST_LIMITS__MAX_FRAME_BYTES", "lots")],
    );
    let out = relay.cli(&["run"]).unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.max_frame_bytes"), "{err}");
    let out = relay.cli(&["check-config"]).unwrap();
    assert!(!out.status.success());
    let ok = Relay::prepare(&dir.path().join("data"), StoreKind::Sled, &[]);
    let out = ok.cli(&["check-config"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without tls.disabled, TLS files are required.
    let tls = Relay::prepare(
        &dir.path().join("data"),
        StoreKind::Sled,
        &[("OUTPOST_TLS__DISABLED", "false")],
    );
    let out = tls.cli(&["check-config"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls.cert_file"));
}
