//! Power-cut test of the relay's embedded (sled) store: the relay keeps its data dir on a
//! FUSE filesystem that can simulate a power cut ([`PowerCutFs`]); a gateway (on the normal
//! disk) drains a backlog into it over the uplink. Again and again the relay is killed
//! (SIGKILL), the power is cut (every [`CutMode`] in turn) and the relay restarted.
//!
//! After every restart: the relay came up on its own, and it still holds every record the
//! gateway had trimmed as acknowledged before the kill (the gateway will never send those
//! again). At the end the gateway drains completely, and every punch the gateway accepted
//! is at the relay exactly once, with no conflicts and no rejected records.
//!
//! The run is seeded (printed; replay with `OUTPOST_TEST_SEED`).

mod uplink_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_tests::powercut::{
    kill_for_cut, mode_schedule, reap_after_cut, report_line, rng, stats_line, test_seed, Bench,
    CutMode,
};
use outpost_tests::relay::{Relay, StoreKind};
use rand::Rng;
use serde_json::Value;
use uplink_support::*;

const CYCLES_PER_MODE: usize = 5;
const DEVICES: u64 = 4;
const PER_DEVICE: u64 = 5_000;
/// At most this many more punches are posted while the cuts go on.
const LIVE: u64 = 5_000;
/// How long the relay's store may take to reach an fsync once the trap is armed.
const TRAP: Duration = Duration::from_secs(3);

#[derive(Default)]
struct ModeStats {
    cycles: usize,
    lost: usize,
    trap_missed: usize,
    reports: Vec<String>,
    max_restart: Duration,
}

/// The relay's rows of `gw-test`: gateway_seq → how many rows.
fn relay_seqs(relay: &Relay) -> BTreeMap<u64, usize> {
    let mut out = BTreeMap::new();
    for row in relay_rows(relay) {
        if row["gateway_id"] == "gw-test" {
            if let Some(gs) = row["gateway_seq"].as_u64() {
                *out.entry(gs).or_insert(0) += 1;
            }
        }
    }
    out
}

/// The items of the first page of an admin list endpoint.
fn items(relay: &Relay, path: &str) -> Vec<Value> {
    let (code, body) = relay.admin_get(path).expect("query the relay");
    assert_eq!(code, 200, "{path}: {}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).expect("JSON");
    v["items"].as_array().cloned().unwrap_or_default()
}

fn summary(seed: u64, stats: &BTreeMap<&'static str, ModeStats>, bench: &Bench) -> String {
    let mut s = format!("seed {seed}; per mode:\n");
    for (name, m) in stats {
        s.push_str(&format!(
            "  {name:<18} cycles={:<3} lost_acked_records={:<6} trap_not_hit={} max_restart={:.2}s\n",
            m.cycles,
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
fn relay_sled_store_keeps_acknowledged_batches_across_power_cuts() {
    let seed = test_seed("relay_sled_store_keeps_acknowledged_batches_across_power_cuts");
    let started = Instant::now();
    let mut master = rng(seed, 0);
    let bench = Bench::mount(seed);
    let data = bench.durable_dir("relay");
    let mut relay = Relay::prepare(
        &data,
        StoreKind::Sled,
        &[("OUTPOST_LIMITS__MAX_QUERY_LIMIT", "10000")],
    );
    relay.log_dir = bench.home.path().to_path_buf();
    // Issued with the CLI while the relay is down (the gateways file is written atomically).
    let token = relay.add_gateway("gw-test", "HC001").expect("gateway add");

    // The gateway (normal disk) takes the whole backlog before the relay is up.
    let gw_dir = bench.off_mount("gateway");
    let mut gw = gateway(
        &gw_dir,
        &relay.ws_url(),
        &token,
        &[("OUTPOST_UPLINK__BATCH_MAX_RECORDS", "25")],
    );
    gw.start();
    let mut expected: BTreeSet<(String, u64)> = BTreeSet::new();
    for d in 0..DEVICES {
        expected.extend(post(&gw, &format!("door-{d}"), 1..PER_DEVICE + 1));
    }
    assert_eq!(
        expected.len() as u64,
        DEVICES * PER_DEVICE,
        "seed {seed}: the gateway did not accept the whole backlog"
    );
    eprintln!(
        "backlog of {} punches journaled in {:.1}s",
        expected.len(),
        started.elapsed().as_secs_f64()
    );
    relay
        .restart()
        .unwrap_or_else(|e| panic!("seed {seed}: the relay did not start: {e:#}"));

    // More punches keep arriving during the cuts, so the uplink is busy at every kill.
    let stop = Arc::new(AtomicBool::new(false));
    let live = {
        let (stop, addr) = (stop.clone(), gw.addr);
        std::thread::spawn(move || {
            let mut acked = BTreeSet::new();
            let mut next = 1u64;
            while !stop.load(Ordering::SeqCst) && next <= LIVE {
                acked.extend(post_to(addr, "door-live", next..next + 25));
                next += 25;
                std::thread::sleep(Duration::from_millis(100));
            }
            acked
        })
    };
    let mut violations: Vec<String> = Vec::new();
    let mut stats: BTreeMap<&'static str, ModeStats> = BTreeMap::new();
    let mut lost_seqs: BTreeSet<u64> = BTreeSet::new();
    for (cycle, mode) in mode_schedule(CYCLES_PER_MODE, &mut master)
        .into_iter()
        .enumerate()
    {
        let label = format!("seed {seed} cycle {cycle} ({})", mode.name());
        let drain_ms = master.random_range(150..=900u64);
        // The uplink drains for a random time (the schedule, not a synchronisation).
        std::thread::sleep(Duration::from_millis(drain_ms));
        let mut trap_note = String::new();
        if mode.name() == CutMode::CrashAtNextFsync.name() {
            bench.fs.arm_crash_at_next_fsync();
            if !bench.fs.wait_trap_hit(TRAP) {
                trap_note = format!(" (trap not hit within {TRAP:?})");
                stats.entry(mode.name()).or_default().trap_missed += 1;
            }
        }
        let stuck = kill_for_cut(relay.proc.take());
        // What the gateway trimmed was acknowledged by the relay: it is never sent again.
        let acked_through = status(&gw)["journal"]["acked_through"]
            .as_u64()
            .unwrap_or(0);
        let report = bench.fs.cut(mode);
        if let Some(p) = stuck {
            reap_after_cut(p, Duration::from_secs(20), &label);
        }
        let t = Instant::now();
        if let Err(e) = relay.restart() {
            let e = format!("{e:#}");
            panic!(
                "{label}: the relay did not restart after the cut ({}):\n{}\n{}",
                report_line(&report),
                outpost_tests::powercut::tail_str(&e, 6000),
                summary(seed, &stats, &bench)
            );
        }
        let restart = t.elapsed();
        let held = relay_seqs(&relay);
        let lost: Vec<u64> = (1..=acked_through)
            .filter(|s| !held.contains_key(s) && !lost_seqs.contains(s))
            .collect();
        let doubled: Vec<u64> = held
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(s, _)| *s)
            .collect();
        if !lost.is_empty() {
            violations.push(format!(
                "{label}: {} records the relay had acknowledged (gateway_seq ≤ {acked_through}, trimmed at the gateway) are gone, e.g. gateway_seq {:?}",
                lost.len(),
                &lost[..lost.len().min(10)]
            ));
        }
        if !doubled.is_empty() {
            violations.push(format!(
                "{label}: {} gateway_seqs stored more than once, e.g. {:?}",
                doubled.len(),
                &doubled[..doubled.len().min(10)]
            ));
        }
        lost_seqs.extend(lost.iter().copied());
        let m = stats.entry(mode.name()).or_default();
        m.cycles += 1;
        m.lost += lost.len();
        m.max_restart = m.max_restart.max(restart);
        m.reports
            .push(format!("cycle {cycle}: {}", report_line(&report)));
        eprintln!(
            "cycle {cycle:>2} {:<18} drain {drain_ms:>4} ms{trap_note}, acked_through {acked_through}, relay holds {} records, lost {}, restart {:.2}s; cut {}",
            mode.name(),
            held.len(),
            lost.len(),
            restart.as_secs_f64(),
            report_line(&report)
        );
    }

    stop.store(true, Ordering::SeqCst);
    let live = live.join().expect("poster thread");
    eprintln!("{} more punches accepted during the cuts", live.len());
    expected.extend(live);
    // Let the gateway finish; then every accepted punch must be at the relay exactly once.
    if !wait_drained(&gw, Duration::from_secs(120)) {
        violations.push(format!(
            "seed {seed}: the gateway did not drain within 120 s after the last cut; uplink: {}; journal: {}",
            status(&gw)["uplink"],
            status(&gw)["journal"]
        ));
    }
    let got = relay_keys(&relay);
    let doubled: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    let missing: Vec<_> = expected.iter().filter(|k| !got.contains_key(*k)).collect();
    if !doubled.is_empty() {
        violations.push(format!(
            "seed {seed} final: {} punches stored more than once, e.g. {:?}",
            doubled.len(),
            &doubled[..doubled.len().min(5)]
        ));
    }
    if !missing.is_empty() {
        violations.push(format!(
            "seed {seed} final: {} of {} accepted punches missing at the relay, e.g. {:?}",
            missing.len(),
            expected.len(),
            &missing[..missing.len().min(8)]
        ));
    }
    let conflicts = items(&relay, "/v1/conflicts");
    if !conflicts.is_empty() {
        violations.push(format!(
            "seed {seed} final: {} conflicts at the relay (first page), e.g. {}",
            conflicts.len(),
            conflicts[0]
        ));
    }
    let rejected = items(&relay, "/v1/rejected");
    if !rejected.is_empty() {
        violations.push(format!(
            "seed {seed} final: {} rejected records at the relay (first page), e.g. {}",
            rejected.len(),
            rejected[0]
        ));
    }
    let text = summary(seed, &stats, &bench);
    eprintln!(
        "{text}  relay holds {} distinct punches of {} accepted; took {:.1}s",
        got.len(),
        expected.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violations after power cuts of the relay; replay with OUTPOST_TEST_SEED={seed}:\n{}\n{text}",
        violations.len(),
        violations.join("\n")
    );
}
