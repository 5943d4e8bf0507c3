//! Power-cut test of the gateway journal: a real gateway keeps its data dir on a FUSE
//! filesystem that can simulate a power cut ([`PowerCutFs`]), under concurrent HTTP load.
//! Again and again the gateway is killed (SIGKILL), the power is cut (every [`CutMode`] in
//! turn: unsynced writes dropped, a crash while an fsync is pending, the last unsynced
//! write torn, a random subset of unsynced writes kept), and the gateway restarted.
//!
//! After every restart: the restart succeeded on its own; every punch that got a success
//! response (accepted or duplicate) is in the journal; no (device_id, seq) is stored twice;
//! gateway_seq is dense, and a gateway_seq never comes back with other content nor vanishes
//! once an export showed it. Devices keep punches whose request failed and resend them, as
//! a real device outbox does.
//!
//! The run is seeded (printed; replay with `OUTPOST_TEST_SEED`). Violations are collected
//! over all cycles and reported at the end with seed, cycle and mode; a gateway that does
//! not restart ends the test at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_tests::gateway::Gateway;
use outpost_tests::powercut::{
    kill_for_cut, mode_schedule, reap_after_cut, report_line, rng, stats_line, tail, test_seed,
    Bench, CutMode,
};
use rand::Rng;
use serde_json::{json, Value};

const CLIENTS: usize = 8;
const CYCLES_PER_MODE: usize = 10;
/// How long a restarted gateway may take to answer `/health/ready`.
const READY: Duration = Duration::from_secs(30);
/// How long the load may take to reach an fsync once the trap is armed.
const TRAP: Duration = Duration::from_secs(5);

type Key = (String, u64);

fn punch(device: &str, seq: u64) -> Value {
    json!({"device_id": device, "seq": seq, "subject": format!("EMP-{:04}", seq % 300),
           "kind": if seq % 2 == 0 { "in" } else { "out" }, "verify": "card",
           "time": "2026-11-22T07:58:03+02:00"})
}

/// A device: its next seq and its outbox (punches sent but never acknowledged).
struct Device {
    name: String,
    next: u64,
    outbox: Vec<u64>,
}

/// What the clients share: every acknowledged punch (with the cycle it was acknowledged
/// in) and the unexpected answers.
#[derive(Default)]
struct Shared {
    acked: BTreeMap<Key, usize>,
    odd_answers: BTreeMap<String, usize>,
}

/// One simulated device: sends single punches and small arrays until `stop`.
fn client(
    addr: SocketAddr,
    dev: Arc<Mutex<Device>>,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    cycle: usize,
    mut rng: outpost_tests::powercut::TestRng,
) {
    while !stop.load(Ordering::Relaxed) {
        let (name, seqs) = {
            let mut d = dev.lock().unwrap();
            let mut seqs: Vec<u64> = std::mem::take(&mut d.outbox);
            if seqs.is_empty() {
                let n = if rng.random_bool(0.3) {
                    rng.random_range(2..20)
                } else {
                    1
                };
                seqs = (d.next..d.next + n).collect();
                d.next += n;
            }
            (d.name.clone(), seqs)
        };
        let body = if seqs.len() == 1 && rng.random_bool(0.7) {
            punch(&name, seqs[0])
        } else {
            Value::Array(seqs.iter().map(|s| punch(&name, *s)).collect())
        };
        let answer = outpost_tests::proc::http(
            addr,
            "POST",
            "/v1/punches",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        let mut unacked = Vec::new();
        match answer {
            Ok((200 | 201, bytes)) => {
                let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let results = v["results"].as_array().cloned().unwrap_or_default();
                let mut sh = shared.lock().unwrap();
                if results.len() != seqs.len() {
                    *sh.odd_answers
                        .entry(format!(
                            "{} results for {} punches",
                            results.len(),
                            seqs.len()
                        ))
                        .or_default() += 1;
                }
                for (i, s) in seqs.iter().enumerate() {
                    match results.get(i).and_then(|r| r["status"].as_str()) {
                        Some("accepted") | Some("duplicate") => {
                            sh.acked.entry((name.clone(), *s)).or_insert(cycle);
                        }
                        other => {
                            *sh.odd_answers
                                .entry(format!("result status {other:?}"))
                                .or_default() += 1;
                            unacked.push(*s);
                        }
                    }
                }
            }
            Ok((code, _)) => {
                *shared
                    .lock()
                    .unwrap()
                    .odd_answers
                    .entry(format!("HTTP {code}"))
                    .or_default() += 1;
                unacked = seqs;
            }
            // Connection refused or cut by the kill: resend later.
            Err(_) => unacked = seqs,
        }
        if !unacked.is_empty() {
            dev.lock().unwrap().outbox.extend(unacked);
            // Do not spin against a dead gateway.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Per-mode tallies for the summary.
#[derive(Default)]
struct ModeStats {
    cycles: usize,
    acked: usize,
    lost: usize,
    trap_missed: usize,
    reports: Vec<String>,
    max_restart: Duration,
}

/// What the exports showed so far.
#[derive(Default)]
struct Ledger {
    /// gateway_seq → the punch an export showed under it.
    by_gs: BTreeMap<u64, Key>,
    /// Acknowledged punches already reported lost.
    lost: BTreeSet<Key>,
}

fn export(gw: &Gateway) -> Result<Vec<Value>, String> {
    let (ok, out, err) = gw.cli(&["export", "--format", "ndjson"]);
    if !ok {
        return Err(format!("export failed: {err}"));
    }
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("export line {l:?}: {e}")))
        .collect()
}

/// Checks the journal against what was acknowledged and what earlier exports showed.
/// Returns the violations (each naming `label`) and the acknowledged punches newly missing.
fn check(
    records: &[Value],
    acked: &BTreeMap<Key, usize>,
    ledger: &mut Ledger,
    label: &str,
) -> (Vec<String>, Vec<Key>) {
    let mut v = Vec::new();
    let mut seen: BTreeMap<Key, u64> = BTreeMap::new();
    let mut now_gs: BTreeMap<u64, Key> = BTreeMap::new();
    let mut twice = Vec::new();
    for r in records {
        let key = (
            r["device_id"].as_str().unwrap_or("?").to_string(),
            r["seq"].as_u64().unwrap_or(u64::MAX),
        );
        let Some(gs) = r["gateway_seq"].as_u64() else {
            v.push(format!("{label}: a record without gateway_seq: {r}"));
            continue;
        };
        if let Some(prev) = seen.insert(key.clone(), gs) {
            twice.push(format!("{key:?} at gateway_seq {prev} and {gs}"));
        }
        if let Some(other) = now_gs.insert(gs, key.clone()) {
            v.push(format!(
                "{label}: gateway_seq {gs} holds two punches: {other:?} and {key:?}"
            ));
        }
    }
    if !twice.is_empty() {
        v.push(format!(
            "{label}: {} punches stored twice, e.g. {:?}",
            twice.len(),
            &twice[..twice.len().min(5)]
        ));
    }
    // gateway_seq: no reuse with other content, nothing that an export showed vanishes.
    let mut reused = Vec::new();
    let mut vanished = Vec::new();
    for (gs, key) in &ledger.by_gs {
        match now_gs.get(gs) {
            Some(k) if k != key => reused.push(format!("{gs}: was {key:?}, now {k:?}")),
            Some(_) => {}
            None => vanished.push(format!("{gs}: {key:?}")),
        }
    }
    if !reused.is_empty() {
        v.push(format!(
            "{label}: {} gateway_seqs came back with other content, e.g. {:?}",
            reused.len(),
            &reused[..reused.len().min(5)]
        ));
    }
    if !vanished.is_empty() {
        v.push(format!(
            "{label}: {} records that an earlier export showed have vanished, e.g. {:?}",
            vanished.len(),
            &vanished[..vanished.len().min(5)]
        ));
    }
    ledger.by_gs = now_gs.clone();
    // Dense.
    let gss: Vec<u64> = now_gs.keys().copied().collect();
    if let Some(&first) = gss.first() {
        if first != 1 {
            v.push(format!("{label}: gateway_seq starts at {first}, not 1"));
        }
    }
    let gaps: Vec<String> = gss
        .windows(2)
        .filter(|w| w[0] + 1 != w[1])
        .map(|w| format!("{}..{}", w[0], w[1]))
        .collect();
    if !gaps.is_empty() {
        v.push(format!(
            "{label}: gateway_seq not dense: {} gaps, e.g. {:?}",
            gaps.len(),
            &gaps[..gaps.len().min(5)]
        ));
    }
    // Every acknowledged punch is there.
    let missing: Vec<Key> = acked
        .keys()
        .filter(|k| !seen.contains_key(*k) && !ledger.lost.contains(*k))
        .cloned()
        .collect();
    if !missing.is_empty() {
        let by_cycle: BTreeMap<usize, usize> = missing.iter().fold(BTreeMap::new(), |mut m, k| {
            *m.entry(acked[k]).or_default() += 1;
            m
        });
        v.push(format!(
            "{label}: {} acknowledged punches lost (acknowledged in cycle → count: {by_cycle:?}), e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(8)]
        ));
        ledger.lost.extend(missing.iter().cloned());
    }
    (v, missing)
}

fn summary(seed: u64, stats: &BTreeMap<&'static str, ModeStats>, bench: &Bench) -> String {
    let mut s = format!("seed {seed}; per mode:\n");
    for (name, m) in stats {
        s.push_str(&format!(
            "  {name:<18} cycles={:<3} acked={:<6} lost={:<6} trap_not_hit={} max_restart={:.2}s\n",
            m.cycles,
            m.acked,
            m.lost,
            m.trap_missed,
            m.max_restart.as_secs_f64()
        ));
        for r in &m.reports {
            s.push_str(&format!("      {r}\n"));
        }
    }
    s.push_str(&format!("  fs: {}\n", stats_line(&bench.fs)));
    s
}

#[test]
fn acknowledged_punches_survive_power_cuts() {
    let seed = test_seed("acknowledged_punches_survive_power_cuts");
    let started = Instant::now();
    let mut master = rng(seed, 0);
    let bench = Bench::mount(seed);
    let data = bench.durable_dir("gateway");
    let mut gw = Gateway::with_data_dir(
        bench.home.path(),
        &data,
        &[("OUTPOST_AUTH__REQUIRED", "false")],
    );
    if let Err(e) = gw.try_start(READY) {
        panic!("seed {seed}: the gateway did not start on the power-cut fs: {e}");
    }

    let devices: Vec<Arc<Mutex<Device>>> = (0..CLIENTS)
        .map(|i| {
            Arc::new(Mutex::new(Device {
                name: format!("door-{i}"),
                next: 1,
                outbox: Vec::new(),
            }))
        })
        .collect();
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut ledger = Ledger::default();
    let mut violations: Vec<String> = Vec::new();
    let mut stats: BTreeMap<&'static str, ModeStats> = BTreeMap::new();
    let schedule = mode_schedule(CYCLES_PER_MODE, &mut master);

    for (cycle, mode) in schedule.iter().copied().enumerate() {
        let label = format!("seed {seed} cycle {cycle} ({})", mode.name());
        let load_ms = master.random_range(150..=600u64);
        let acked_before = shared.lock().unwrap().acked.len();
        let stop = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (d, sh, st) = (d.clone(), shared.clone(), stop.clone());
                let addr = gw.addr;
                let r = rng(seed, 1_000 + (cycle * CLIENTS + i) as u64);
                std::thread::spawn(move || client(addr, d, sh, st, cycle, r))
            })
            .collect();
        // The load runs for a random time (this is the schedule, not a synchronisation).
        std::thread::sleep(Duration::from_millis(load_ms));
        let mut trap_note = String::new();
        if mode.name() == CutMode::CrashAtNextFsync.name() {
            bench.fs.arm_crash_at_next_fsync();
            if !bench.fs.wait_trap_hit(TRAP) {
                trap_note = format!(" (trap not hit within {TRAP:?})");
                stats.entry(mode.name()).or_default().trap_missed += 1;
            }
        }
        let stuck = kill_for_cut(gw.proc.take());
        stop.store(true, Ordering::Relaxed);
        // Cut before joining the clients: a gateway stuck in a withheld fsync keeps its
        // sockets open until the cut answers the fsync and it can finish dying.
        let report = bench.fs.cut(mode);
        if let Some(p) = stuck {
            reap_after_cut(p, Duration::from_secs(20), &label);
        }
        for h in handles {
            h.join().expect("client thread");
        }
        let t = Instant::now();
        if let Err(e) = gw.try_start(READY) {
            let e = outpost_tests::powercut::tail_str(&e, 6000);
            panic!(
                "{label}: the gateway did not restart after the cut ({}):\n{e}\n{}",
                report_line(&report),
                summary(seed, &stats, &bench)
            );
        }
        let restart = t.elapsed();
        let records = match export(&gw) {
            Ok(r) => r,
            Err(e) => panic!(
                "{label}: {e}\nlog tail:\n{}\n{}",
                tail(&gw.log_path(), 4000),
                summary(seed, &stats, &bench)
            ),
        };
        let acked = shared.lock().unwrap().acked.clone();
        let (found, lost) = check(&records, &acked, &mut ledger, &label);
        let m = stats.entry(mode.name()).or_default();
        m.cycles += 1;
        m.acked += acked.len() - acked_before;
        m.lost += lost.len();
        m.max_restart = m.max_restart.max(restart);
        m.reports
            .push(format!("cycle {cycle}: {}", report_line(&report)));
        eprintln!(
            "cycle {cycle:>2} {:<18} load {load_ms:>3} ms{trap_note}, acked +{} (total {}), journal {} records, lost {}, restart {:.2}s; cut {}",
            mode.name(),
            acked.len() - acked_before,
            acked.len(),
            records.len(),
            lost.len(),
            restart.as_secs_f64(),
            report_line(&report),
        );
        for f in &found {
            eprintln!("  VIOLATION {f}");
        }
        violations.extend(found);
    }

    // Finally every device resends its outbox; then check once more.
    let deadline = Instant::now() + Duration::from_secs(60);
    for d in &devices {
        let (name, pending) = {
            let mut d = d.lock().unwrap();
            (d.name.clone(), std::mem::take(&mut d.outbox))
        };
        for chunk in pending.chunks(50) {
            let body = Value::Array(chunk.iter().map(|s| punch(&name, *s)).collect());
            loop {
                match gw.post_punches(None, &body) {
                    Ok((200 | 201, v)) => {
                        let results = v["results"].as_array().cloned().unwrap_or_default();
                        let mut sh = shared.lock().unwrap();
                        for (s, r) in chunk.iter().zip(&results) {
                            let st = r["status"].as_str().unwrap_or("?");
                            if st == "accepted" || st == "duplicate" {
                                sh.acked.entry((name.clone(), *s)).or_insert(usize::MAX);
                            } else {
                                violations.push(format!(
                                    "seed {seed} outbox resend: {name}/{s} answered {r}"
                                ));
                            }
                        }
                        break;
                    }
                    other => {
                        assert!(
                            Instant::now() < deadline,
                            "seed {seed}: resending the outbox failed: {other:?}"
                        );
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
    }
    let records = export(&gw).unwrap_or_else(|e| panic!("seed {seed}: final {e}"));
    let sh = shared.lock().unwrap();
    let (found, lost) = check(
        &records,
        &sh.acked,
        &mut ledger,
        &format!("seed {seed} final"),
    );
    for f in &found {
        eprintln!("  VIOLATION {f}");
    }
    violations.extend(found);
    let total_lost = ledger.lost.len();
    let text = summary(seed, &stats, &bench);
    eprintln!(
        "{text}  acknowledged punches: {}, journal: {} records, lost in total: {total_lost} (at the final check: {}), unexpected answers: {:?}, took {:.1}s",
        sh.acked.len(),
        records.len(),
        lost.len(),
        sh.odd_answers,
        started.elapsed().as_secs_f64()
    );
    assert!(
        sh.acked.len() > 1000,
        "seed {seed}: the load generated only {} acknowledged punches",
        sh.acked.len()
    );
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violations after power cuts ({total_lost} acknowledged punches lost in total); replay with OUTPOST_TEST_SEED={seed}:\n{}\n{text}",
        violations.len(),
        violations.join("\n")
    );
}
