//! Liveness while the journal is stuck recovering from a full disk.
//!
//! The real gateway keeps its data directory on a small tmpfs; a ballast file fills it, so
//! a journal write fails with ENOSPC, the journal marks itself broken, and every later
//! write first reopens sled under the writer's lock. On tmpfs sled's open fails within
//! milliseconds, but on a real box a reopen can take seconds: sled's background threads
//! keep its file lock for a while after the old handle is dropped (the reopen waits up to
//! 3 s for it), and the reopen fsyncs every file. The test reproduces that wait by holding
//! sled's file lock itself once the journal is broken, so each reopen waits the whole 3 s
//! under the writer's lock. Devices keep posting punches all the while. `/health/live` and
//! `/metrics` must still answer promptly: readers use the journal's published stats and
//! never wait for the writer. The bound (100 ms per request) is a liveness check,
//! generous for a debug build.
//!
//! Needs root (or CAP_SYS_ADMIN) to mount the tmpfs: without it the test FAILS.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_tests::gateway::Gateway;
use outpost_tests::proc::http;
use serde_json::json;

/// Upper bound for one `/health/live` or `/metrics` request while the journal recovers.
const LIVENESS_BOUND: Duration = Duration::from_millis(100);

/// How long the endpoints are measured while the journal is stuck.
const MEASURE_FOR: Duration = Duration::from_secs(8);

/// Threads posting punches during the test.
const POSTERS: usize = 3;

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temporary directory for the tmpfs");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "cannot mount a tmpfs ({}): run this test as root (or with CAP_SYS_ADMIN); it needs a real full disk",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a process that has not quite exited): detach it anyway.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Fills the filesystem with a ballast file until a write fails with ENOSPC.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path.join("ballast")).expect("create the ballast");
    let chunk = vec![0xAAu8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the tmpfs failed: {e}"),
        }
    }
    f.sync_all().expect("sync the ballast");
    written
}

/// Latencies of one endpoint.
#[derive(Default)]
struct Samples {
    ms: Vec<f64>,
}

impl Samples {
    fn add(&mut self, d: Duration) {
        self.ms.push(d.as_secs_f64() * 1000.0);
    }

    fn max(&self) -> f64 {
        self.ms.iter().copied().fold(0.0, f64::max)
    }

    fn median(&self) -> f64 {
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }

    fn over(&self, bound: Duration) -> usize {
        let b = bound.as_secs_f64() * 1000.0;
        self.ms.iter().filter(|&&m| m > b).count()
    }
}

/// How often each HTTP status answered the posters (0: no answer).
#[derive(Default)]
struct Answers {
    by_status: Mutex<BTreeMap<u16, u64>>,
}

impl Answers {
    fn add(&self, status: u16) {
        *self
            .by_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(status)
            .or_default() += 1;
    }

    fn count(&self, status: u16) -> u64 {
        let m = self.by_status.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&status).copied().unwrap_or(0)
    }

    fn summary(&self) -> String {
        format!(
            "{:?}",
            self.by_status.lock().unwrap_or_else(|p| p.into_inner())
        )
    }
}

fn punch(device: &str, seq: u64) -> serde_json::Value {
    json!({"device_id": device, "seq": seq, "subject": "EMP-0042", "kind": "in",
           "verify": "card", "time": "2026-11-22T07:58:03+02:00"})
}

/// Timed `GET path`; must answer 200. Returns the time taken and the body.
fn timed_get(addr: std::net::SocketAddr, path: &str) -> (Duration, String) {
    let t = Instant::now();
    let (code, body) =
        http(addr, "GET", path, &[], b"").unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let took = t.elapsed();
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 200, "GET {path}: {body}");
    (took, body)
}

/// Takes sled's exclusive file lock on the journal (`flock` on its `db` file, as sled
/// does) as soon as the gateway lets go of it, within `wait`.
fn hold_sled_lock(journal: &Path, wait: Duration) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(journal.join("db")).expect("open the journal's db file");
    let deadline = Instant::now() + wait;
    loop {
        // SAFETY: flock on a file descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return file;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never let go of the journal's file lock (no reopen after the I/O error?)"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn health_and_metrics_answer_while_the_journal_is_stuck_on_a_full_disk() {
    let fs = Tmpfs::mount("32m");
    let home = tempfile::tempdir().unwrap();
    let mut gw = Gateway::with_data_dir(home.path(), &fs.path().join("data"), &[]);
    let token = gw.add_device("door-1");
    gw.start();
    let addr = gw.addr;
    let auth = format!("Bearer {token}");

    let (code, v) = gw.post_punches(Some(&token), &punch("door-1", 1)).unwrap();
    assert_eq!(code, 201, "before the disk fills: {v}");

    let ballast = fill(fs.path());
    eprintln!("tmpfs filled: {ballast} bytes of ballast");

    // Devices keep posting: once the journal is broken, every write makes it reopen sled.
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Answers::default());
    let seq = Arc::new(AtomicU64::new(1));
    let posters: Vec<_> = (0..POSTERS)
        .map(|_| {
            let (stop, answers, seq, auth) =
                (stop.clone(), answers.clone(), seq.clone(), auth.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let body = json!([
                        punch("door-1", seq.fetch_add(1, Ordering::Relaxed) + 1),
                        punch("door-1", seq.fetch_add(1, Ordering::Relaxed) + 1),
                    ]);
                    let r = http(
                        addr,
                        "POST",
                        "/v1/punches",
                        &[
                            ("Authorization", &auth),
                            ("Content-Type", "application/json"),
                        ],
                        body.to_string().as_bytes(),
                    );
                    answers.add(r.map_or(0, |(code, _)| code));
                }
            })
        })
        .collect();

    // Wait until the disk refuses punches and the journal counts I/O errors.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, m) = http(addr, "GET", "/metrics", &[], b"").expect("GET /metrics");
        let m = String::from_utf8_lossy(&m);
        let io_errors = metric(&m, "outpost_gateway_journal_io_errors_total").unwrap_or(0.0);
        if answers.count(507) > 0 && io_errors > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the journal never hit ENOSPC (answers by status: {}; io errors {io_errors})",
            answers.summary(),
        );
    }
    // Now make every reopen wait for sled's file lock, as it does on a real box.
    let lock = hold_sled_lock(&fs.path().join("data/journal"), Duration::from_secs(30));
    let (code, _) = http(addr, "GET", "/health/ready", &[], b"").unwrap();
    assert_eq!(code, 503, "the journal is not writable, so not ready");
    eprintln!("journal stuck: disk full and its file lock taken");

    // Measure while the posters keep the journal recovering.
    let (_, m) = timed_get(addr, "/metrics");
    let io_before = metric(&m, "outpost_gateway_journal_io_errors_total").unwrap_or(0.0);
    let accepted_before = answers.count(201);
    let (mut live, mut metrics) = (Samples::default(), Samples::default());
    let mut last_metrics = String::new();
    let until = Instant::now() + MEASURE_FOR;
    while Instant::now() < until {
        live.add(timed_get(addr, "/health/live").0);
        let (took, body) = timed_get(addr, "/metrics");
        metrics.add(took);
        last_metrics = body;
    }
    let io_after = metric(&last_metrics, "outpost_gateway_journal_io_errors_total").unwrap_or(0.0);
    let accepted_during = answers.count(201) - accepted_before;
    stop.store(true, Ordering::Relaxed);
    drop(lock);
    for p in posters {
        p.join().expect("poster thread");
    }
    let report = format!(
        "/health/live: {} requests, median {:.1} ms, max {:.1} ms, {} over {:?}; \
         /metrics: {} requests, median {:.1} ms, max {:.1} ms, {} over {:?}; \
         journal write failures during the measurement: {}; \
         posts accepted during it: {accepted_during}; posts by status: {}",
        live.ms.len(),
        live.median(),
        live.max(),
        live.over(LIVENESS_BOUND),
        LIVENESS_BOUND,
        metrics.ms.len(),
        metrics.median(),
        metrics.max(),
        metrics.over(LIVENESS_BOUND),
        LIVENESS_BOUND,
        io_after - io_before,
        answers.summary(),
    );
    eprintln!("{report}");
    gw.kill9();

    assert!(
        io_after > io_before && accepted_during == 0,
        "the journal was not stuck recovering while measured: {report}"
    );
    assert!(
        live.max() <= LIVENESS_BOUND.as_secs_f64() * 1000.0
            && metrics.max() <= LIVENESS_BOUND.as_secs_f64() * 1000.0,
        "the gateway stalled while the journal recovered: {report}"
    );
    assert!(
        live.ms.len() >= 10 && metrics.ms.len() >= 10,
        "too few requests answered in {MEASURE_FOR:?}: {report}"
    );
}
