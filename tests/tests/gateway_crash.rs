//! Crash test: a real gateway under concurrent load is killed with SIGKILL at random
//! moments, again and again. After every restart, every punch that got a success response
//! (accepted or duplicate) is in the journal, and no (device_id, seq) is stored twice.
//!
//! Clients keep punches whose request failed (connection cut by the kill) and resend them
//! after the restart, as a real device outbox does; those may or may not have been written
//! before the kill, and either way must end up stored exactly once.
//!
//! The kill schedule and each client's load are seeded (printed; replay with
//! `OUTPOST_TEST_SEED`). Thread timing still varies between runs.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_tests::gateway::Gateway;
use outpost_tests::seed::{rng, test_seed, TestRng};
use rand::Rng;
use serde_json::{json, Value};

const CLIENTS: usize = 8;
const KILLS: usize = 22;

fn punch(device: &str, seq: u64) -> Value {
    json!({"device_id": device, "seq": seq, "subject": format!("EMP-{:04}", seq % 300),
           "kind": if seq % 2 == 0 { "in" } else { "out" }, "verify": "card",
           "time": "2026-11-22T07:58:03+02:00"})
}

/// One simulated device: sends single punches and small arrays, remembers what was acked.
fn client(
    gw_addr: std::net::SocketAddr,
    device: String,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<HashSet<(String, u64)>>>,
    next: Arc<Mutex<u64>>,
    unacked: Arc<Mutex<Vec<u64>>>,
    mut rng: TestRng,
) {
    while !stop.load(Ordering::Relaxed) {
        // Resend what failed before, then new punches.
        let mut seqs: Vec<u64> = std::mem::take(&mut *unacked.lock().unwrap());
        if seqs.is_empty() {
            let n = if rng.random_bool(0.3) {
                rng.random_range(2..20)
            } else {
                1
            };
            let mut nx = next.lock().unwrap();
            seqs = (*nx..*nx + n).collect();
            *nx += n;
        }
        let body = if seqs.len() == 1 {
            punch(&device, seqs[0])
        } else {
            Value::Array(seqs.iter().map(|s| punch(&device, *s)).collect())
        };
        let gw = outpost_tests::proc::http(
            gw_addr,
            "POST",
            "/v1/punches",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        match gw {
            Ok((code, bytes)) if code == 200 || code == 201 => {
                let v: Value = serde_json::from_slice(&bytes).expect("JSON response");
                let results = v["results"].as_array().expect("results");
                assert_eq!(results.len(), seqs.len());
                let mut a = acked.lock().unwrap();
                for (r, s) in results.iter().zip(&seqs) {
                    let st = r["status"].as_str().unwrap();
                    assert!(st == "accepted" || st == "duplicate", "unexpected {r}");
                    a.insert((device.clone(), *s));
                }
            }
            Ok((code, bytes)) => {
                // 503 while shutting down is possible only on SIGTERM; anything else is a bug.
                panic!(
                    "unexpected status {code}: {}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            Err(_) => {
                // Connection failed or was cut: keep the punches and resend later.
                unacked.lock().unwrap().extend(seqs);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn acknowledged_punches_survive_repeated_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(dir.path(), &[("OUTPOST_AUTH__REQUIRED", "false")]);
    gw.start();
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let seed = test_seed("acknowledged_punches_survive_repeated_sigkill");
    let mut schedule = rng(seed, 0);
    let nexts: Vec<Arc<Mutex<u64>>> = (0..CLIENTS).map(|_| Arc::new(Mutex::new(1))).collect();
    let unackeds: Vec<Arc<Mutex<Vec<u64>>>> = (0..CLIENTS)
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();

    for round in 0..KILLS {
        let stop = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let (stop, acked, next, unacked) = (
                    stop.clone(),
                    acked.clone(),
                    nexts[i].clone(),
                    unackeds[i].clone(),
                );
                let addr = gw.addr;
                let r = rng(seed, 1 + (round * CLIENTS + i) as u64);
                std::thread::spawn(move || {
                    client(addr, format!("door-{i}"), stop, acked, next, unacked, r)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(schedule.random_range(150..700)));
        gw.kill9();
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().expect("client thread");
        }
        gw.start();
        check(&gw, &acked.lock().unwrap(), round);
    }

    // Finally resend everything still unacknowledged, then check once more.
    for (i, unacked) in unackeds.iter().enumerate() {
        let pending: Vec<u64> = std::mem::take(&mut *unacked.lock().unwrap());
        for s in pending {
            let (code, _) = gw
                .post_punches(None, &punch(&format!("door-{i}"), s))
                .unwrap();
            assert!(code == 200 || code == 201);
            acked.lock().unwrap().insert((format!("door-{i}"), s));
        }
    }
    let n = check(&gw, &acked.lock().unwrap(), KILLS);
    assert!(n > 100, "the load generated only {n} acknowledged punches");
    assert_eq!(
        gw.terminate().map(|s| s.success()),
        Some(true),
        "clean exit on SIGTERM"
    );
}

/// Every acked punch is present; no key is stored twice; gateway_seq is dense. Returns the
/// number of acked punches.
fn check(gw: &Gateway, acked: &HashSet<(String, u64)>, round: usize) -> usize {
    let records = gw.export();
    let mut seen: BTreeMap<(String, u64), u64> = BTreeMap::new();
    let mut seqs = Vec::new();
    for r in &records {
        let key = (
            r["device_id"].as_str().unwrap().to_string(),
            r["seq"].as_u64().unwrap(),
        );
        let gs = r["gateway_seq"].as_u64().unwrap();
        if let Some(prev) = seen.insert(key.clone(), gs) {
            panic!("round {round}: {key:?} stored twice (gateway_seq {prev} and {gs})");
        }
        seqs.push(gs);
    }
    for k in acked {
        assert!(
            seen.contains_key(k),
            "round {round}: acknowledged punch {k:?} is missing after SIGKILL"
        );
    }
    seqs.sort_unstable();
    for w in seqs.windows(2) {
        assert_eq!(w[0] + 1, w[1], "round {round}: gateway_seq not dense");
    }
    acked.len()
}
