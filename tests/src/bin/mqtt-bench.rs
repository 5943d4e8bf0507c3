//! MQTT ingest throughput with ack-after-commit, in punches per second.
//!
//! Starts a real `outpost-gateway` (same build profile as this binary: run it with
//! `--release`) in a temporary directory, in lab mode, once with a private mosquitto
//! (`mqtt.mode = "external"`) and once with its embedded broker. For each, runs
//! `outpost-devsim` with 1 and with 50 simulated devices, each publishing one punch per
//! QoS 1 message (CBOR) and holding every punch in its outbox until the gateway's ack
//! arrives — which the gateway publishes only after the punch's group commit has been
//! fsynced. The figure is punches settled per second, from the first publish to the last
//! ack; each configuration runs `--runs` times (default 3) and the median is printed.
//!
//! Usage: `cargo run -p outpost-tests --release --bin mqtt-bench -- [--punches 40000] [--runs 3]`

use std::process::Command;

use outpost_tests::gateway::Gateway;
use outpost_tests::mosquitto::Mosquitto;
use outpost_tests::proc::{binary, free_port};
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
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One devsim run; returns settled punches per second.
fn run(url: &str, devices: u64, total: u64, first_seq: u64) -> f64 {
    let per_device = total / devices;
    let window = (4000 / devices).clamp(50, 1000);
    let out = Command::new(binary("outpost-tests", "outpost-devsim"))
        .args(["--mqtt", url, "--site", "HC001", "--prefix", "bench"])
        .args(["--devices", &devices.to_string()])
        .args(["--punches", &per_device.to_string()])
        .args(["--window", &window.to_string()])
        .args(["--first-seq", &first_seq.to_string()])
        .args(["--retry-ms", "10000", "--timeout", "300", "--events"])
        .output()
        .expect("run outpost-devsim");
    let summary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .unwrap_or(Value::Null);
    if !out.status.success() || summary["all_settled"] != true {
        eprintln!(
            "run did not settle every punch: {summary}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if summary["resends"].as_u64().unwrap_or(0) > 0 {
        eprintln!("  (note: {} resends)", summary["resends"]);
    }
    summary["settled_per_s"].as_f64().unwrap_or(0.0)
}

fn bench(label: &str, gw: &mut Gateway, url: &str, total: u64, runs: u64) {
    gw.start();
    let mut first_seq = 1u64;
    for devices in [1u64, 50] {
        let mut rates = Vec::new();
        for _ in 0..runs {
            rates.push(run(url, devices, total, first_seq));
            first_seq += total;
        }
        let shown: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "{label:<18} {devices:>3} device(s): median {:>8.0} punches/s   (runs: {})",
            median(rates),
            shown.join(", ")
        );
    }
    let _ = gw.terminate();
}

fn main() {
    let total = arg("--punches", 40_000);
    let runs = arg("--runs", 3).max(1);
    let lab = [
        ("OUTPOST_AUTH__REQUIRED", "false"),
        ("OUTPOST_HTTP__RATE_LIMIT_PER_SECOND", "0"),
        ("RUST_LOG", "warn"),
    ];
    println!(
        "MQTT ingest, ack after commit: {total} punches per run, one punch per QoS 1 message, {runs} runs each"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Mosquitto::start(&dir.path().join("mosquitto"), &[]);
    let url = broker.url();
    let mut env: Vec<(&str, &str)> = lab.to_vec();
    env.push(("OUTPOST_MQTT__MODE", "external"));
    env.push(("OUTPOST_MQTT__URL", &url));
    let mut gw = Gateway::new(&dir.path().join("gw-mosquitto"), &env);
    bench("mosquitto", &mut gw, &url, total, runs);
    drop(broker);

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut env: Vec<(&str, &str)> = lab.to_vec();
    env.push(("OUTPOST_MQTT__MODE", "embedded"));
    env.push(("OUTPOST_MQTT__LISTEN", &listen));
    let mut gw = Gateway::new(&dir.path().join("gw-embedded"), &env);
    bench(
        "embedded (rumqttd)",
        &mut gw,
        &format!("mqtt://{listen}"),
        total,
        runs,
    );
}
