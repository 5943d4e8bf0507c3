//! Uplink benchmark: real `outpost-gateway` and `outpost-relay` processes (same build
//! profile as this binary) on loopback.
//!
//! 1. **Drain rate**: the journal is filled with a backlog (default 1,000,000 realistic
//!    punches from [`outpost_tests::workload`]) while the relay is down; then the relay
//!    starts and the time until the journal is empty gives records/s.
//! 2. **Bytes on the wire per punch**: the same drain through a counting TCP proxy, so the
//!    figure includes frame headers, WebSocket framing and masking, the upgrade and pings
//!    (full batches of `uplink.batch_max_records`).
//! 3. **High latency**: the drain of a smaller backlog through the proxy adding 600 ms each
//!    way, with the default window (8) and with window = 1.
//!
//! Each figure is the median of `--runs` runs (default 3).
//!
//! Usage: `cargo run -p outpost-tests --profile bench-fast --bin uplink-bench -- [--records 1000000] [--latency-records 100000] [--runs 3]`

use std::time::{Duration, Instant};

use outpost_protocol::json::punch_to_json;
use outpost_tests::gateway::Gateway;
use outpost_tests::proc::http;
use outpost_tests::proxy::Proxy;
use outpost_tests::relay::{Relay, StoreKind};
use outpost_tests::workload::Site;
use serde_json::Value;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// JSON request bodies of 1000 realistic punches each, `n` punches in all.
fn bodies(n: u64) -> Vec<String> {
    let mut site = Site::new(42, 500, 8);
    let mut out = Vec::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(1000) as usize;
        let arr: Vec<Value> = site
            .punches(k)
            .iter()
            .map(|p| Value::Object(punch_to_json(p)))
            .collect();
        out.push(Value::Array(arr).to_string());
        left -= k as u64;
    }
    out
}

fn status(gw: &Gateway) -> Value {
    let (_, body) = gw.admin_get("/v1/status").expect("status");
    serde_json::from_slice(&body).expect("status JSON")
}

/// Posts every body with 4 clients.
fn fill(gw: &Gateway, bodies: &[String]) {
    let addr = gw.addr;
    std::thread::scope(|s| {
        for part in bodies.chunks(bodies.len().div_ceil(4).max(1)) {
            s.spawn(move || {
                for b in part {
                    let (code, resp) = http(
                        addr,
                        "POST",
                        "/v1/punches",
                        &[("Content-Type", "application/json")],
                        b.as_bytes(),
                    )
                    .expect("post punches");
                    assert!(
                        (200..300).contains(&code),
                        "{code}: {}",
                        String::from_utf8_lossy(&resp)
                    );
                }
            });
        }
    });
}

struct Run {
    records: u64,
    seconds: f64,
    bytes_up: u64,
}

/// One drain: a fresh relay (stopped) and gateway, `bodies` queued, then the relay starts
/// and the clock runs until the journal is empty. Through a proxy adding `delay` each way
/// when `proxy` is set.
fn drain(bodies: &[String], records: u64, proxy: bool, delay: Duration, window: u64) -> Run {
    let mut relay = Relay::start(StoreKind::Sled, &[]).expect("relay");
    let token = relay.add_gateway("gw-bench", "HC001").expect("gateway add");
    assert!(relay.stop());
    let px = proxy.then(|| Proxy::start(relay.addr));
    if let Some(p) = &px {
        p.set_delay(delay);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("relay.token"), &token).expect("token file");
    let url = match &px {
        Some(p) => p.ws_url(),
        None => relay.ws_url(),
    };
    let relays = format!("[\"{url}\"]");
    let token_file = dir.path().join("relay.token").display().to_string();
    let window = window.to_string();
    let mut gw = Gateway::new(
        dir.path(),
        &[
            ("OUTPOST_GATEWAY__ID", "gw-bench"),
            ("OUTPOST_AUTH__REQUIRED", "false"),
            ("OUTPOST_HTTP__MAX_PUNCHES_PER_REQUEST", "1000"),
            ("OUTPOST_JOURNAL__MAX_BYTES", "4294967296"),
            ("OUTPOST_UPLINK__RELAYS", relays.as_str()),
            ("OUTPOST_UPLINK__TOKEN_FILE", token_file.as_str()),
            ("OUTPOST_UPLINK__BACKOFF_MIN", "100ms"),
            ("OUTPOST_UPLINK__BACKOFF_MAX", "100ms"),
            ("OUTPOST_UPLINK__WINDOW", window.as_str()),
            ("RUST_LOG", "warn"),
        ],
    );
    gw.start();
    fill(&gw, bodies);
    assert_eq!(status(&gw)["journal"]["records"], records);
    relay.restart().expect("relay restart");
    let t = Instant::now();
    loop {
        let st = status(&gw);
        if st["journal"]["records"] == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(900),
            "drain stuck: {}",
            st["uplink"]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let seconds = t.elapsed().as_secs_f64();
    let bytes_up = px.as_ref().map_or(0, |p| p.bytes_up());
    Run {
        records,
        seconds,
        bytes_up,
    }
}

fn main() {
    let records = arg("--records", 1_000_000);
    let latency_records = arg("--latency-records", 100_000);
    let runs = arg("--runs", 3).max(1);
    println!("uplink-bench: {records}-record backlog, {runs} runs per figure (medians)");

    let big = bodies(records);
    let mut rates = Vec::new();
    for i in 0..runs {
        let r = drain(&big, records, false, Duration::ZERO, 8);
        let rate = r.records as f64 / r.seconds;
        println!(
            "  run {}: loopback drain {:.2} s = {rate:.0} records/s",
            i + 1,
            r.seconds
        );
        rates.push(rate);
    }
    println!(
        "drain rate, {records} backlog, loopback, window 8: {:.0} records/s (median)",
        median(rates)
    );

    let mut per_punch = Vec::new();
    for i in 0..runs {
        let r = drain(&big, records, true, Duration::ZERO, 8);
        let b = r.bytes_up as f64 / r.records as f64;
        println!(
            "  run {}: {} bytes up for {} punches = {b:.2} bytes/punch",
            i + 1,
            r.bytes_up,
            r.records
        );
        per_punch.push(b);
    }
    println!(
        "bytes on the wire per punch (frames + WebSocket, gateway to relay, full batches): {:.2} (median)",
        median(per_punch)
    );

    let small = bodies(latency_records);
    for window in [8u64, 1] {
        let mut rates = Vec::new();
        for i in 0..runs {
            let r = drain(
                &small,
                latency_records,
                true,
                Duration::from_millis(600),
                window,
            );
            let rate = r.records as f64 / r.seconds;
            println!(
                "  run {}: 600 ms each way, window {window}: {:.2} s = {rate:.0} records/s",
                i + 1,
                r.seconds
            );
            rates.push(rate);
        }
        println!(
            "drain rate, {latency_records} backlog, +600 ms each way, window {window}: {:.0} records/s (median)",
            median(rates)
        );
    }
}
