//! Journal benchmark: prints figures, asserts nothing.
//!
//! ```text
//! cargo run -p outpost-gateway --release --example journal-bench [-- --records N --dir D]
//! ```
//!
//! (a) append + fsync throughput at group sizes 1/16/64/256 (one `flush` per group), and
//!     the committer with 64 concurrent single-punch submitters;
//! (b) a journal of `--records` (default 1,000,000) records: `Journal::open` time (median
//!     of 5, each in a fresh child process) and the child's peak RSS (VmHWM) after open and
//!     after reading one uplink page;
//! (c) bytes written to disk per punch (`/proc/self/io` write_bytes) while ingesting in
//!     groups of 64, and sled's on-disk size against the logical size.
//!
//! `--backlog-dir D` keeps the (b) journal in `D` for later runs; `--backlog-only` runs (b)
//! alone; `--committer-only` runs only the committer part of (a).
//!
//! The journal lives under `--dir` (default: a temp dir in `target/`), which must be on a
//! real disk for fsync and write_bytes to mean anything (not tmpfs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outpost_gateway::committer;
use outpost_gateway::journal::{Journal, JournalConfig, Pending};
use outpost_gateway::metrics::Metrics;
use outpost_protocol::{BootId, Id, Punch, PunchKind, Received, Source, VerifyMethod};
use tokio_util::sync::CancellationToken;

fn pending(device: u32, seq: u64) -> Pending {
    let dev = format!("door-{device}");
    Pending {
        punch: Punch {
            device_id: Id::new(&dev).expect("valid id"),
            device_seq: seq,
            subject_id: Id::new(&format!("EMP-{:05}", seq % 50_000)).expect("valid id"),
            kind: if seq % 2 == 0 {
                PunchKind::In
            } else {
                PunchKind::Out
            },
            verify: VerifyMethod::Card,
            device_time_ms: 1_795_500_000_000 + seq as i64 * 1000,
            utc_offset_min: Some(120),
        },
        received: Received {
            boot_id: BootId([0x5a; 16]),
            mono_ms: 10_000 + seq,
            wall_ms: 1_795_500_000_000 + seq as i64 * 1000,
            clock_synced: true,
        },
        source: Source::Http,
    }
}

fn cfg() -> JournalConfig {
    JournalConfig {
        max_bytes: 8 << 30,
        ..JournalConfig::default()
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn proc_field(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn write_bytes() -> u64 {
    proc_field("/proc/self/io", "write_bytes:")
}

fn vm_hwm_kib() -> u64 {
    proc_field("/proc/self/status", "VmHWM:")
}

fn vm_rss_kib() -> u64 {
    proc_field("/proc/self/status", "VmRSS:")
}

/// (a) append + flush at a fixed group size for about `secs`.
async fn group_throughput(base: &Path, group: usize, secs: f64) {
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let j = Journal::open(dir.path(), &cfg()).expect("open");
    let mut seq = 0u64;
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let items: Vec<_> = (0..group)
            .map(|_| {
                seq += 1;
                pending((seq % 50) as u32, seq)
            })
            .collect();
        let t = Instant::now();
        j.append(&items).expect("append");
        j.flush().await.expect("flush");
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let el = start.elapsed().as_secs_f64();
    println!(
        "  group {group:>4}: {:>9.0} punches/s  {:>6.0} fsyncs/s  commit p50 {:>6.2} ms  p99 {:>6.2} ms",
        seq as f64 / el,
        lat.len() as f64 / el,
        median(&mut lat),
        pct(&mut lat, 0.99)
    );
}

/// (a') the committer with `clients` concurrent single-punch submitters.
async fn committer_throughput(base: &Path, clients: u32, secs: f64) {
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let j = Journal::open(dir.path(), &cfg()).expect("open");
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let (h, task) = committer::spawn(j.clone(), metrics.clone(), stop.clone());
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut s = 0u64;
            while Instant::now() < deadline {
                s += 1;
                let t = Instant::now();
                h.submit(vec![pending(c, s)]).await;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("client"));
    }
    let el = start.elapsed().as_secs_f64();
    stop.cancel();
    task.await.expect("committer");
    let text = metrics.render();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let groups = get("outpost_gateway_commit_group_size_count ");
    let punches = get("outpost_gateway_commit_group_size_sum ");
    println!(
        "  committer, {clients} clients x 1 punch: {:>8.0} punches/s  mean group {:>5.1}  latency p50 {:.2} ms  p99 {:.2} ms",
        lat.len() as f64 / el,
        punches / groups.max(1.0),
        median(&mut lat),
        pct(&mut lat, 0.99)
    );
}

/// (b) child mode: open, report, read one page, report.
fn child_open(dir: &Path) {
    let t = Instant::now();
    let j = Journal::open(dir, &cfg()).expect("open");
    let open_ms = t.elapsed().as_secs_f64() * 1000.0;
    let s = j.stats();
    let hwm_open = vm_hwm_kib();
    let page = j.read_from(s.first_unacked, 1000, 1 << 20).expect("read");
    let st = j.stats();
    println!(
        "{open_ms:.1} {hwm_open} {} {} {} {}",
        vm_hwm_kib(),
        vm_rss_kib(),
        page.len(),
        st.records
    );
}

async fn fill(dir: &Path, n: u64) -> Duration {
    let j = Journal::open(dir, &cfg()).expect("open");
    let t = Instant::now();
    let mut seq = j.next_seq() - 1;
    while seq < n {
        let k = (n - seq).min(4096);
        let items: Vec<_> = (0..k)
            .map(|_| {
                seq += 1;
                pending((seq % 200) as u32, seq)
            })
            .collect();
        j.append(&items).expect("append");
        j.flush().await.expect("flush");
    }
    t.elapsed()
}

fn open_in_children(dir: &Path) {
    let exe = std::env::current_exe().expect("current exe");
    let mut times = Vec::new();
    let mut last = String::new();
    for _ in 0..5 {
        let out = std::process::Command::new(&exe)
            .arg("--child-open")
            .arg(dir)
            .output()
            .expect("run child");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() {
            eprintln!("child failed: {}", String::from_utf8_lossy(&out.stderr));
            return;
        }
        times.push(
            text.split(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN),
        );
        last = text;
    }
    let f: Vec<&str> = last.split(' ').collect();
    println!(
        "  Journal::open: median of 5 = {:.1} ms  (all: {times:.1?})",
        median(&mut times.clone())
    );
    if f.len() == 6 {
        println!(
            "  child RSS: VmHWM after open {} KiB, VmHWM after reading a 1000-record page {} KiB (VmRSS {} KiB); {} records",
            f[1], f[2], f[3], f[5]
        );
    }
}

async fn write_amplification(base: &Path, n: u64, group: u64) {
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let j = Journal::open(dir.path(), &cfg()).expect("open");
    let before = write_bytes();
    let mut seq = 0u64;
    while seq < n {
        let items: Vec<_> = (0..group)
            .map(|_| {
                seq += 1;
                pending((seq % 50) as u32, seq)
            })
            .collect();
        j.append(&items).expect("append");
        j.flush().await.expect("flush");
    }
    let written = write_bytes() - before;
    let s = j.stats();
    let disk = j.size_on_disk().unwrap_or(0);
    let rec = pending(1, 1);
    let cbor = outpost_protocol::cbor::to_vec(&outpost_protocol::Record {
        punch: rec.punch,
        gateway_seq: 1,
        received: rec.received,
        source: rec.source,
    })
    .len();
    println!(
        "  {n} punches in groups of {group}: {:.0} bytes written per punch (write_bytes); record CBOR {cbor} B, logical {:.0} B/punch; sled size_on_disk {:.0} B/punch ({:.1}x logical)",
        written as f64 / n as f64,
        s.bytes as f64 / n as f64,
        disk as f64 / n as f64,
        disk as f64 / s.bytes.max(1) as f64
    );
    // The uplink trims as the relay acks: bytes written per punch including the trim.
    let before = write_bytes();
    let mut t = 0;
    while t < n {
        t = (t + 500).min(n);
        j.trim_through(t).expect("trim");
        j.flush().await.expect("flush");
    }
    println!(
        "  trimming them (500 per ack, flushed): {:.0} bytes written per punch",
        (write_bytes() - before) as f64 / n as f64
    );
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(dir) = arg(&args, "--child-open") {
        child_open(Path::new(&dir));
        return;
    }
    let records: u64 = arg(&args, "--records")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let base: PathBuf = arg(&args, "--dir").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/journal-bench")
    });
    std::fs::create_dir_all(&base).expect("bench dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!(
            "journal bench in {} ({} CPUs)",
            base.display(),
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        );
        if args.iter().any(|a| a == "--backlog-only") {
            let dir = arg(&args, "--backlog-dir")
                .map(PathBuf::from)
                .expect("--backlog-only needs --backlog-dir");
            fill(&dir, records).await;
            open_in_children(&dir);
            return;
        }
        if args.iter().any(|a| a == "--writes-only") {
            write_amplification(&base, 5_000, 1).await;
            write_amplification(&base, 100_000, 64).await;
            return;
        }
        if args.iter().any(|a| a == "--committer-only") {
            for c in [1u32, 16, 64] {
                committer_throughput(&base, c, 3.0).await;
            }
            return;
        }
        println!("(a) append + fsync per group:");
        for g in [1usize, 16, 64, 256] {
            group_throughput(&base, g, 3.0).await;
        }
        for c in [1u32, 16, 64] {
            committer_throughput(&base, c, 3.0).await;
        }
        println!("(c) disk writes:");
        write_amplification(&base, 5_000, 1).await;
        write_amplification(&base, 100_000, 64).await;
        println!("(b) {records} records:");
        // `--backlog-dir D` keeps the filled journal for later runs.
        let tmp = tempfile::tempdir_in(&base).expect("temp dir");
        let dir = arg(&args, "--backlog-dir")
            .map(PathBuf::from)
            .unwrap_or_else(|| tmp.path().to_path_buf());
        let took = fill(&dir, records).await;
        println!(
            "  filled in {:.1} s ({:.0} punches/s in groups of 4096)",
            took.as_secs_f64(),
            records as f64 / took.as_secs_f64()
        );
        open_in_children(&dir);
    });
}
