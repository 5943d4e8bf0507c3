//! Power-cut tests of the small files written "atomically" (temp file, fsync, rename, fsync
//! of the directory; `outpost_ops::file`): after any cut each is the old version or the new
//! one, never empty, torn or gone once it was durable.
//!
//! - The gateway's devices file, edited by `outpost-gateway device add`.
//! - The relay's gateways file, edited by `outpost-relay gateway add`.
//! - The gateway's uplink anchors file and ADMS stamps file, written by the running gateway.
//!
//! The CLI runs as a child process that is killed at a random moment, or once it is stuck
//! in an fsync that the filesystem withholds ([`CutMode::CrashAtNextFsync`]), or left to
//! finish; then the power is cut. A CLI that reported success must have its change after
//! any cut. Seeded (printed; replay with `OUTPOST_TEST_SEED`).

mod uplink_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_tests::gateway::Gateway;
use outpost_tests::powercut::{
    kill_for_cut, mode_schedule, reap_after_cut, report_line, rng, sigkill, stats_line, test_seed,
    wait_exit, Bench, CutMode, TestRng,
};
use outpost_tests::relay::{Relay, StoreKind};
use rand::Rng;
use serde_json::Value;

/// How long a CLI run may take to reach its first fsync once the trap is armed.
const TRAP: Duration = Duration::from_secs(10);

/// A credentials file and the CLI that edits it.
struct CredFile<'a> {
    what: &'static str,
    file: PathBuf,
    /// Tab-separated fields a line has (at least).
    min_fields: usize,
    /// The command that adds `id`.
    add: &'a dyn Fn(&str) -> Command,
    /// The command that lists the file (fails on a file it cannot parse).
    list: &'a dyn Fn() -> Command,
}

/// The ids in a credentials file (`None` when it does not exist), or why it is damaged.
fn read_ids(path: &Path, min_fields: usize) -> Result<Option<BTreeSet<String>>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    let text = String::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    if text.is_empty() {
        return Err("empty".into());
    }
    if !text.ends_with('\n') {
        return Err(format!("no final newline (torn?): {:?}", tail(&text)));
    }
    let mut ids = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() < min_fields || fields.iter().any(|f| f.is_empty()) {
            return Err(format!("line {}: {line:?}", n + 1));
        }
        ids.insert(fields[0].to_string());
    }
    Ok(Some(ids))
}

fn tail(s: &str) -> &str {
    outpost_tests::powercut::tail_str(s, 120)
}

/// How a CLI run ended.
enum Ran {
    /// It exited on its own (success or not, with stderr).
    Exited(bool, String),
    /// The test killed it (the process, when it could not be reaped before the cut).
    Killed(&'static str, Option<std::process::Child>),
}

/// Runs `cmd` and kills it: once it is stuck in a withheld fsync (`trap`), at a random
/// moment, or never (it finishes).
fn run_cli(mut cmd: Command, bench: &Bench, trap: bool, rng: &mut TestRng) -> Ran {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if trap {
        bench.fs.arm_crash_at_next_fsync();
    }
    let mut child = cmd.spawn().expect("spawn the CLI");
    let kill = if trap {
        if bench.fs.wait_trap_hit(TRAP) {
            Some("in the withheld fsync")
        } else {
            None
        }
    } else if rng.random_bool(0.6) {
        let at = Duration::from_micros(rng.random_range(0..=15_000));
        match wait_exit(&mut child, at) {
            Some(_) => None,
            None => Some("at a random moment"),
        }
    } else {
        None
    };
    if let Some(how) = kill {
        let stuck = (!sigkill(&mut child, Duration::from_secs(2))).then_some(child);
        return Ran::Killed(how, stuck);
    }
    let out = child.wait_with_output().expect("CLI output");
    Ran::Exited(
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `iterations` edits of a credentials file, each followed by a cut; returns the
/// violations.
fn cred_cycles(
    seed: u64,
    salt: u64,
    bench: &Bench,
    case: &CredFile,
    per_mode: usize,
) -> Vec<String> {
    let mut rng = rng(seed, salt);
    let mut violations = Vec::new();
    let (mut succeeded, mut killed) = (0, 0);
    for (i, mode) in mode_schedule(per_mode, &mut rng).into_iter().enumerate() {
        let label = format!("seed {seed} {} iteration {i} ({})", case.what, mode.name());
        let id = format!("unit-{i}");
        let before = match read_ids(&case.file, case.min_fields) {
            Ok(b) => b,
            Err(e) => panic!("{label}: the file was damaged before this iteration: {e}"),
        };
        let trap = mode.name() == CutMode::CrashAtNextFsync.name();
        let mut ran = run_cli((case.add)(&id), bench, trap, &mut rng);
        let report = bench.fs.cut(mode);
        if let Ran::Killed(_, stuck) = &mut ran {
            if let Some(mut child) = stuck.take() {
                if wait_exit(&mut child, Duration::from_secs(20)).is_none() {
                    std::mem::forget(child);
                    panic!("{label}: the killed CLI is still not gone 20 s after the cut");
                }
            }
        }
        let after = read_ids(&case.file, case.min_fields);
        let old = before.clone().unwrap_or_default();
        let mut new = old.clone();
        new.insert(id.clone());
        let how = match &ran {
            Ran::Exited(true, _) => "returned success".to_string(),
            Ran::Exited(false, err) => format!("failed: {}", tail(err.trim())),
            Ran::Killed(how, _) => format!("killed {how}"),
        };
        match &ran {
            Ran::Exited(true, _) => succeeded += 1,
            Ran::Killed(..) => killed += 1,
            Ran::Exited(false, _) => {}
        }
        let verdict = match &after {
            Err(e) => Some(format!("the file is damaged: {e}")),
            Ok(None) if before.is_some() => Some("the file vanished".to_string()),
            Ok(None) if matches!(ran, Ran::Exited(true, _)) => {
                Some(format!("the file is missing although the CLI {how}"))
            }
            Ok(None) => None,
            Ok(Some(ids)) if matches!(ran, Ran::Exited(true, _)) && *ids != new => Some(format!(
                "the CLI {how}, but the file holds {ids:?}, not the new set {new:?}"
            )),
            Ok(Some(ids)) if *ids != old && *ids != new => Some(format!(
                "the file holds {ids:?}: neither the old set nor the new one"
            )),
            Ok(Some(_)) => None,
        };
        let listed = (case.list)().output().expect("run the list CLI");
        let list_problem = (!listed.status.success()).then(|| {
            format!(
                "the list CLI fails on the file: {}",
                String::from_utf8_lossy(&listed.stderr).trim()
            )
        });
        let state = match &after {
            Ok(Some(ids)) if ids.contains(&id) => "new",
            Ok(Some(_)) => "old",
            Ok(None) => "absent",
            Err(_) => "DAMAGED",
        };
        eprintln!(
            "{} {i:>2} {:<18} CLI {how}; after the cut: {state}; cut {}",
            case.what,
            mode.name(),
            report_line(&report)
        );
        for v in verdict.into_iter().chain(list_problem) {
            eprintln!("  VIOLATION {label}: {v}");
            violations.push(format!("{label}: CLI {how}; {v}"));
        }
    }
    let leftovers = std::fs::read_dir(case.file.parent().unwrap())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
                .count()
        })
        .unwrap_or(0);
    eprintln!(
        "{}: {succeeded} CLI runs succeeded, {killed} killed; {leftovers} temporary files left behind; fs {}",
        case.what,
        stats_line(&bench.fs)
    );
    violations
}

#[test]
fn devices_file_is_old_or_new_after_power_cuts() {
    let seed = test_seed("devices_file_is_old_or_new_after_power_cuts");
    let bench = Bench::mount(seed);
    let data = bench.durable_dir("gateway");
    let gw = Gateway::with_data_dir(bench.home.path(), &data, &[]);
    let add = |id: &str| {
        let mut c = gw.command();
        c.args(["device", "add", id]);
        c
    };
    let list = || {
        let mut c = gw.command();
        c.args(["device", "list"]);
        c
    };
    let case = CredFile {
        what: "devices file",
        file: data.join("devices"),
        min_fields: 3,
        add: &add,
        list: &list,
    };
    let v = cred_cycles(seed, 1, &bench, &case, 6);
    assert!(
        v.is_empty(),
        "seed {seed}: {} violations; replay with OUTPOST_TEST_SEED={seed}:\n{}",
        v.len(),
        v.join("\n")
    );
}

#[test]
fn relay_gateways_file_is_old_or_new_after_power_cuts() {
    let seed = test_seed("relay_gateways_file_is_old_or_new_after_power_cuts");
    let bench = Bench::mount(seed);
    let data = bench.durable_dir("relay");
    let mut relay = Relay::prepare(&data, StoreKind::Sled, &[]);
    relay.log_dir = bench.home.path().to_path_buf();
    let add = |id: &str| {
        let mut c = relay.cli_command();
        c.args(["gateway", "add", id, "--site", "HC001"]);
        c
    };
    let list = || {
        let mut c = relay.cli_command();
        c.args(["gateway", "list"]);
        c
    };
    let case = CredFile {
        what: "gateways file",
        file: data.join("gateways"),
        min_fields: 4,
        add: &add,
        list: &list,
    };
    let v = cred_cycles(seed, 2, &bench, &case, 6);
    assert!(
        v.is_empty(),
        "seed {seed}: {} violations; replay with OUTPOST_TEST_SEED={seed}:\n{}",
        v.len(),
        v.join("\n")
    );
}

const SN: &str = "CQUJ230160001";

/// What a state file must look like: `None` when it is fine, else the problem.
fn json_problem(path: &Path, keys: &[&str]) -> Option<Option<String>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Some(format!("cannot read: {e}"))),
    };
    Some(match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) => keys
            .iter()
            .find(|k| v.get(**k).is_none())
            .map(|k| format!("no {k:?} in {v}")),
        Err(e) => Some(format!(
            "not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )),
    })
}

/// Posts punches (the uplink forwards them; the relay's acks give time anchors) and ADMS
/// uploads with rising stamps (each saves the stamps file) until `stop`.
fn activity(gw: std::net::SocketAddr, stop: Arc<AtomicBool>, stamp: Arc<AtomicU64>) {
    let http = |method: &str, path: &str, body: &[u8]| {
        outpost_tests::proc::http(
            gw,
            method,
            path,
            &[
                ("Content-Type", "text/plain"),
                ("User-Agent", "iClock Proxy/1.09"),
            ],
            body,
        )
    };
    let _ = http(
        "GET",
        &format!("/iclock/cdata?SN={SN}&options=all&pushver=2.4.1&language=69"),
        b"",
    );
    let mut seq = stamp.load(Ordering::SeqCst) * 10;
    while !stop.load(Ordering::Relaxed) {
        let s = stamp.fetch_add(1, Ordering::SeqCst);
        let secs = s % 86_400;
        let line = format!(
            "{}\t2026-11-{:02} {:02}:{:02}:{:02}\t0\t1\t0\t0\t0\r\n",
            1000 + s % 50,
            1 + (s / 86_400) % 28,
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        );
        let _ = http(
            "POST",
            &format!("/iclock/cdata?SN={SN}&table=ATTLOG&Stamp={s}"),
            line.as_bytes(),
        );
        let body = Value::Array(
            (seq..seq + 5)
                .map(|n| uplink_support::punch_json("door-1", n))
                .collect(),
        );
        seq += 5;
        let _ = outpost_tests::proc::http(
            gw,
            "POST",
            "/v1/punches",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
    }
}

#[test]
fn anchors_and_adms_stamps_files_parse_after_power_cuts() {
    let seed = test_seed("anchors_and_adms_stamps_files_parse_after_power_cuts");
    let mut rng = rng(seed, 3);
    let relay = Relay::start(StoreKind::Sled, &[]).expect("start the relay");
    let token = relay.add_gateway("gw-test", "HC001").expect("gateway add");
    let bench = Bench::mount(seed);
    let data = bench.durable_dir("gateway");
    let data_s = data.display().to_string();
    let sn_key = format!("OUTPOST_ADMS__DEVICES__{SN}__NAME");
    let mut gw = uplink_support::gateway(
        &bench.off_mount("gw"),
        &relay.ws_url(),
        &token,
        &[
            ("OUTPOST_GATEWAY__DATA_DIR", &data_s),
            ("OUTPOST_ADMS__ENABLED", "true"),
            ("OUTPOST_ADMS__DEFAULT_UTC_OFFSET", "+02:00"),
            (&sn_key, "Main gate"),
        ],
    );
    let anchors = data.join("uplink-anchors.json");
    let stamps = data.join("adms-stamps.json");
    let files: [(&str, &PathBuf, &[&str]); 2] = [
        ("anchors", &anchors, &["version", "anchors"]),
        ("stamps", &stamps, &["version", "terminals"]),
    ];
    let mut durable = [false, false];
    let mut violations = Vec::new();
    let stamp = Arc::new(AtomicU64::new(1));
    let check = |label: &str, durable: &mut [bool; 2], violations: &mut Vec<String>| {
        let mut states = Vec::new();
        for (n, (name, path, keys)) in files.iter().enumerate() {
            match json_problem(path, keys) {
                None if durable[n] => {
                    violations.push(format!(
                        "{label}: the {name} file vanished after it was durable"
                    ));
                    states.push(format!("{name}: VANISHED"));
                }
                None => states.push(format!("{name}: absent")),
                Some(None) => {
                    durable[n] = true;
                    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                    states.push(format!("{name}: ok ({len} bytes)"));
                }
                Some(Some(p)) => {
                    violations.push(format!("{label}: the {name} file is damaged: {p}"));
                    states.push(format!("{name}: DAMAGED"));
                }
            }
        }
        states.join(", ")
    };

    for (cycle, mode) in mode_schedule(3, &mut rng).into_iter().enumerate() {
        let label = format!("seed {seed} cycle {cycle} ({})", mode.name());
        if let Err(e) = gw.try_start(Duration::from_secs(30)) {
            panic!(
                "{label}: the gateway did not restart: {}",
                outpost_tests::powercut::tail_str(&e, 6000)
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let h = {
            let (stop, stamp, addr) = (stop.clone(), stamp.clone(), gw.addr);
            std::thread::spawn(move || activity(addr, stop, stamp))
        };
        let run_ms = rng.random_range(100..=900u64);
        // The schedule: the files are rewritten while this runs.
        std::thread::sleep(Duration::from_millis(run_ms));
        let mut note = String::new();
        if mode.name() == CutMode::CrashAtNextFsync.name() {
            bench.fs.arm_crash_at_next_fsync();
            if !bench.fs.wait_trap_hit(TRAP) {
                note = " (trap not hit)".into();
            }
        }
        let stuck = kill_for_cut(gw.proc.take());
        stop.store(true, Ordering::Relaxed);
        // Cut before joining: a gateway stuck in a withheld fsync keeps its sockets open
        // until the cut answers the fsync and it can finish dying.
        let report = bench.fs.cut(mode);
        if let Some(p) = stuck {
            reap_after_cut(p, Duration::from_secs(20), &label);
        }
        h.join().expect("activity thread");
        let states = check(&label, &mut durable, &mut violations);
        eprintln!(
            "cycle {cycle:>2} {:<18} ran {run_ms} ms{note}; {states}; cut {}",
            mode.name(),
            report_line(&report)
        );
    }

    // Finally: both files written while running, the gateway stopped cleanly (so every
    // write returned), then the unsynced rest dropped: both files are there and parse.
    let label = format!("seed {seed} final");
    if let Err(e) = gw.try_start(Duration::from_secs(30)) {
        panic!(
            "{label}: the gateway did not restart: {}",
            outpost_tests::powercut::tail_str(&e, 6000)
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let h = {
        let (stop, stamp, addr) = (stop.clone(), stamp.clone(), gw.addr);
        std::thread::spawn(move || activity(addr, stop, stamp))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(anchors.exists() && stamps.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    h.join().expect("activity thread");
    let exit = gw.terminate();
    assert!(
        exit.is_some_and(|s| s.success()),
        "{label}: the gateway did not stop cleanly: {exit:?}"
    );
    assert!(
        anchors.exists() && stamps.exists(),
        "{label}: the gateway wrote no anchors file or no stamps file within 30 s (anchors: {}, stamps: {})",
        anchors.exists(),
        stamps.exists()
    );
    durable = [true, true];
    let report = bench.fs.cut(CutMode::DropUnsynced);
    let states = check(&label, &mut durable, &mut violations);
    eprintln!(
        "final: clean stop, then cut {}; {states}; fs {}",
        report_line(&report),
        stats_line(&bench.fs)
    );
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violations; replay with OUTPOST_TEST_SEED={seed}:\n{}",
        violations.len(),
        violations.join("\n")
    );
}
