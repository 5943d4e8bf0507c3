//! Relay benchmarks: intake records/s over WebSocket on loopback (sled and PostgreSQL),
//! and memory per idle WebSocket connection.
//!
//! ```text
//! cargo run -p outpost-tests --release --bin relay-bench [-- --runs 5 --batches 100 --conns 4 --window 8 --idle 1000 --only sled|postgres|idle]
//! ```
//!
//! Intake: `conns` gateways (one WebSocket each), each sending `batches` realistic
//! 1000-record batches (`workload::Site`, zstd with the protocol dictionary, encoded before
//! the clock starts) with up to `window` batches awaiting their acks. A run ends when every
//! batch is acked; records/s = records / elapsed. Each run uses fresh sites, so every
//! record is a new insert (no dedup shortcut). PostgreSQL is a private server with
//! `fsync = on`. Medians over `runs` runs are printed.
//!
//! Idle memory: RSS of the relay process (VmRSS) before and after opening `idle`
//! authenticated WebSockets that then stay idle for 3 s; (after − before) / idle.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use outpost_protocol::frame;
use outpost_tests::postgres::PgServer;
use outpost_tests::relay::{id, ws_connect, Relay, StoreKind};
use outpost_tests::workload::Site;
use tokio_tungstenite::tungstenite::Message;

struct Args {
    runs: usize,
    batches: usize,
    conns: usize,
    window: usize,
    idle: usize,
    only: Option<String>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        runs: 5,
        batches: 100,
        conns: 4,
        window: 8,
        idle: 1000,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--runs" => a.runs = v()?.parse()?,
            "--batches" => a.batches = v()?.parse()?,
            "--conns" => a.conns = v()?.parse()?,
            "--window" => a.window = v()?.parse()?,
            "--idle" => a.idle = v()?.parse()?,
            "--only" => a.only = Some(v()?),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid, owned struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// One gateway's pre-encoded frames and its token.
struct Load {
    token: String,
    frames: Vec<Vec<u8>>,
}

fn prepare(relay: &Relay, run: usize, a: &Args) -> anyhow::Result<(Vec<Load>, u64)> {
    let mut loads = Vec::new();
    let mut records = 0u64;
    for c in 0..a.conns {
        let gw = format!("bench-{run}-{c}");
        let site = format!("B{run}-{c}");
        let token = relay.add_gateway(&gw, &site)?;
        let mut s = Site::new((run * 100 + c) as u64 + 1, 300, 5);
        let mut frames = Vec::with_capacity(a.batches);
        for _ in 0..a.batches {
            let mut b = s.batch(1000);
            b.gateway_id = id(&gw);
            b.site_id = id(&site);
            records += b.records.len() as u64;
            frames.push(frame::encode_batch_auto(&b)?);
        }
        loads.push(Load { token, frames });
    }
    Ok((loads, records))
}

async fn drive(url: String, load: Load, window: usize) -> anyhow::Result<()> {
    let ws = ws_connect(&url, Some(&load.token)).await?;
    let (mut tx, mut rx) = ws.split();
    let total = load.frames.len();
    let mut pending: VecDeque<Vec<u8>> = load.frames.into();
    let mut acked = 0;
    let mut inflight = 0;
    while acked < total {
        while inflight < window {
            let Some(f) = pending.pop_front() else { break };
            tx.send(Message::Binary(f.into())).await?;
            inflight += 1;
        }
        match rx.next().await {
            Some(Ok(Message::Binary(b))) => {
                frame::decode_ack(&b)?;
                acked += 1;
                inflight -= 1;
            }
            Some(Ok(Message::Close(c))) => anyhow::bail!("relay closed the socket: {c:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("socket ended"),
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    Ok(())
}

async fn intake(label: &str, store: StoreKind, a: &Args) -> anyhow::Result<()> {
    let relay = Relay::start(store, &[("OUTPOST_LOG__LEVEL", "warn")])?;
    let mut rates = Vec::new();
    for run in 0..a.runs {
        let (loads, records) = prepare(&relay, run, a)?;
        let url = relay.ws_url();
        let started = Instant::now();
        let tasks: Vec<_> = loads
            .into_iter()
            .map(|l| tokio::spawn(drive(url.clone(), l, a.window)))
            .collect();
        for t in tasks {
            t.await??;
        }
        let secs = started.elapsed().as_secs_f64();
        let rate = records as f64 / secs;
        println!(
            "  {label} run {}: {records} records in {secs:.2} s = {rate:.0} records/s",
            run + 1
        );
        rates.push(rate);
    }
    println!(
        "{label}: median {:.0} records/s ({} runs, {} conns x {} batches x 1000 records, window {})",
        median(&mut rates),
        a.runs,
        a.conns,
        a.batches,
        a.window
    );
    Ok(())
}

fn rss_kib(pid: i32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS not found")
}

async fn idle_memory(a: &Args) -> anyhow::Result<()> {
    let relay = Relay::start(StoreKind::Sled, &[("OUTPOST_LOG__LEVEL", "warn")])?;
    let token = relay.add_gateway("idle-gw", "IDLE")?;
    let pid = relay.pid().context("relay pid")?;
    // Warm up: one connection, so lazily initialised state is not counted.
    drop(ws_connect(&relay.ws_url(), Some(&token)).await?);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid)?;
    let mut socks = Vec::with_capacity(a.idle);
    for _ in 0..a.idle {
        socks.push(ws_connect(&relay.ws_url(), Some(&token)).await?);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid)?;
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / a.idle as f64;
    println!(
        "idle WebSockets: {} connections, relay RSS {before} KiB -> {after} KiB, {:.1} KiB per connection",
        a.idle,
        per / 1024.0
    );
    drop(socks);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    raise_fd_limit();
    let want = |k: &str| a.only.as_deref().is_none_or(|o| o == k);
    if want("sled") {
        intake("sled", StoreKind::Sled, &a).await?;
    }
    if want("postgres") {
        let pg = tokio::task::spawn_blocking(|| PgServer::start_with(true)).await??;
        intake("postgres", StoreKind::Postgres(pg.url()), &a).await?;
        tokio::task::spawn_blocking(move || drop(pg)).await?;
    }
    if want("idle") {
        idle_memory(&a).await?;
    }
    Ok(())
}
