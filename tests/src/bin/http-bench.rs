//! Durable HTTP ingest benchmark for the gateway.
//!
//! Starts a real `outpost-gateway` (same build profile as this binary; run it with
//! `--release`) in a temporary directory, in lab mode with no rate limit, then:
//!
//! 1. idle RSS;
//! 2. for 1, 16 and 64 concurrent clients posting single punches, and 16 clients posting
//!    100-punch arrays: punches/s and request latency p50/p99 (each request is answered
//!    only after the gateway's fsync), peak RSS, and bytes written to disk per punch
//!    (`/proc/<pid>/io` write_bytes);
//! 3. with `--backlog N`: fills the journal to N records, restarts the gateway, and reports
//!    the start-up time (process start to `/health/ready`) and RSS with that backlog.
//!
//! Usage: `cargo run -p outpost-tests --release --bin http-bench -- [--seconds 5] [--backlog 1000000]`

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_tests::gateway::Gateway;
use serde_json::{json, Value};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn proc_field(pid: i32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn punch(device: &str, seq: u64) -> Value {
    json!({"device_id": device, "seq": seq, "subject": format!("EMP-{:04}", seq % 400),
           "kind": if seq % 2 == 0 { "in" } else { "out" }, "verify": "fingerprint",
           "time": "2026-11-22T07:58:03+02:00"})
}

struct Run {
    punches: u64,
    elapsed: Duration,
    latencies_us: Vec<u64>,
}

async fn load(url: String, clients: usize, per_request: u64, secs: u64, tag: &str) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (url, stop, tag) = (url.clone(), stop.clone(), tag.to_string());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let device = format!("{tag}-{c}");
            let mut seq = 0u64;
            let mut lat = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = if per_request == 1 {
                    seq += 1;
                    punch(&device, seq)
                } else {
                    Value::Array(
                        (0..per_request)
                            .map(|_| {
                                seq += 1;
                                punch(&device, seq)
                            })
                            .collect(),
                    )
                };
                let t = Instant::now();
                let resp = client.post(&url).json(&body).send().await.expect("request");
                let code = resp.status().as_u16();
                let _ = resp.bytes().await;
                assert!(code == 201, "status {code}");
                lat.push(t.elapsed().as_micros() as u64);
                n += per_request;
            }
            (n, lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut run = Run {
        punches: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
    };
    for t in tasks {
        let (n, lat) = t.await.expect("client task");
        run.punches += n;
        run.latencies_us.extend(lat);
    }
    run.elapsed = start.elapsed();
    run.latencies_us.sort_unstable();
    run
}

fn pct(v: &[u64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let secs = arg("--seconds", 5);
    let backlog = arg("--backlog", 0);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut gw = Gateway::new(
        dir.path(),
        &[("OUTPOST_AUTH__REQUIRED", "false"), ("RUST_LOG", "warn")],
    );
    gw.start();
    let pid = gw.proc.as_ref().map(|p| p.pid()).unwrap_or(0);
    let url = format!("http://{}/v1/punches", gw.addr);
    println!(
        "outpost-gateway HTTP ingest, ack after fsync; {secs} s per scenario; gateway pid {pid}"
    );
    println!(
        "idle RSS: {:.1} MiB",
        proc_field(pid, "status", "VmRSS:") as f64 / 1024.0
    );
    println!();
    println!(
        "| clients | punches/request | punches/s | p50 ms | p99 ms | disk bytes written/punch |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for (i, (clients, per)) in [(1usize, 1u64), (16, 1), (64, 1), (16, 100)]
        .into_iter()
        .enumerate()
    {
        let w0 = proc_field(pid, "io", "write_bytes:");
        let r = load(url.clone(), clients, per, secs, &format!("s{i}")).await;
        let w1 = proc_field(pid, "io", "write_bytes:");
        println!(
            "| {clients} | {per} | {:.0} | {:.2} | {:.2} | {:.0} |",
            r.punches as f64 / r.elapsed.as_secs_f64(),
            pct(&r.latencies_us, 0.5),
            pct(&r.latencies_us, 0.99),
            (w1 - w0) as f64 / r.punches.max(1) as f64
        );
    }
    println!();
    println!(
        "peak RSS under load (VmHWM): {:.1} MiB",
        proc_field(pid, "status", "VmHWM:") as f64 / 1024.0
    );

    if backlog > 0 {
        let have = {
            let (_, b) = gw.admin_get("/v1/status").expect("status");
            let v: Value = serde_json::from_slice(&b).expect("status JSON");
            v["journal"]["records"].as_u64().unwrap_or(0)
        };
        if have < backlog {
            let need = backlog - have;
            let per_client = need.div_ceil(16 * 100);
            let t = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..16u64 {
                let url = url.clone();
                tasks.push(tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    for r in 0..per_client {
                        let body = Value::Array(
                            (0..100)
                                .map(|k| punch(&format!("fill-{c}"), r * 100 + k + 1))
                                .collect(),
                        );
                        let resp = client
                            .post(&url)
                            .json(&body)
                            .send()
                            .await
                            .expect("fill request");
                        assert!(resp.status().is_success());
                    }
                }));
            }
            for t in tasks {
                t.await.expect("fill task");
            }
            println!(
                "filled the journal with {} more records in {:.1} s",
                per_client * 1600,
                t.elapsed().as_secs_f64()
            );
        }
        gw.terminate();
        let mut starts = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            gw.start();
            starts.push(t.elapsed().as_millis() as u64);
            let pid = gw.proc.as_ref().map(|p| p.pid()).unwrap_or(0);
            std::thread::sleep(Duration::from_millis(300));
            let rss = proc_field(pid, "status", "VmRSS:");
            let (_, b) = gw.admin_get("/v1/status").expect("status");
            let v: Value = serde_json::from_slice(&b).expect("status JSON");
            println!(
                "backlog {} records: start to ready {} ms, RSS {:.1} MiB",
                v["journal"]["records"],
                starts.last().unwrap_or(&0),
                rss as f64 / 1024.0
            );
            gw.terminate();
        }
        starts.sort_unstable();
        println!("start-up with backlog, median of 5: {} ms", starts[2]);
    }
}
