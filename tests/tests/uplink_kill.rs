//! Uplink end-to-end with SIGKILLs during traffic: first of the gateway, then of the relay
//! (sled and PostgreSQL stores). Every punch a device saw acknowledged must reach the relay
//! exactly once.

mod uplink_support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outpost_tests::relay::StoreKind;
use rand::Rng;
use uplink_support::*;

/// Posts rounds of 200 punches until `stop`; returns what the gateway acknowledged.
fn poster(
    addr: std::net::SocketAddr,
    device: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<BTreeSet<(String, u64)>> {
    std::thread::spawn(move || {
        let mut acked = BTreeSet::new();
        let mut next = 1u64;
        while !stop.load(Ordering::SeqCst) {
            acked.extend(post_to(addr, device, next..next + 200));
            next += 200;
            std::thread::sleep(Duration::from_millis(50));
        }
        acked
    })
}

fn kills(store: StoreKind, rounds: usize) {
    let mut relay = relay(store);
    let token = relay.add_gateway("gw-test", "HC001").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(
        dir.path(),
        &relay.ws_url(),
        &token,
        &[("OUTPOST_UPLINK__BATCH_MAX_RECORDS", "300")],
    );
    gw.start();
    let mut rng = rand::rng();

    // Phase 1: the gateway is killed while devices post and the uplink sends.
    let stop = Arc::new(AtomicBool::new(false));
    let p = poster(gw.addr, "door-1", stop.clone());
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
        gw.kill9();
        std::thread::sleep(Duration::from_millis(rng.random_range(50..500)));
        gw.start();
    }
    stop.store(true, Ordering::SeqCst);
    let mut expected = p.join().unwrap();

    // Phase 2: the relay is killed while devices post and the uplink sends.
    let stop = Arc::new(AtomicBool::new(false));
    let p = poster(gw.addr, "door-2", stop.clone());
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
        if let Some(mut proc) = relay.proc.take() {
            proc.kill9();
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(50..500)));
        relay.restart().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    expected.extend(p.join().unwrap());
    assert!(
        expected.len() > 1000,
        "too little traffic: {}",
        expected.len()
    );

    assert!(
        wait_drained(&gw, Duration::from_secs(120)),
        "{}",
        status(&gw)["uplink"]
    );
    assert_exactly_once(&relay, &expected);
    let st = status(&gw);
    assert_eq!(st["journal"]["records"], 0);
}

#[test]
fn sigkill_gateway_then_relay_every_acked_punch_once_sled() {
    kills(StoreKind::Sled, 4);
}

#[test]
fn sigkill_gateway_then_relay_every_acked_punch_once_postgres() {
    let Some((_pg, store)) = postgres() else {
        return;
    };
    kills(store, 3);
}
