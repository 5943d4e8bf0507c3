//! Uplink end-to-end with SIGKILLs during traffic: first of the gateway, then of the relay
//! (sled and PostgreSQL stores). Every punch a device saw acknowledged must reach the relay
//! exactly once. The kill schedule is seeded (printed; replay with `OUTPOST_TEST_SEED`).

mod uplink_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outpost_tests::relay::StoreKind;
use outpost_tests::seed::seeded;
use rand::Rng;
use uplink_support::*;

/// Posts rounds of 200 punches until `stop`; returns what the gateway acknowledged and
/// what got no answer (the gateway was killed during the request).
fn poster(
    addr: std::net::SocketAddr,
    device: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Posted> {
    std::thread::spawn(move || {
        let mut posted = Posted::default();
        let mut next = 1u64;
        while !stop.load(Ordering::SeqCst) {
            posted.extend(post_to_tracked(addr, device, next..next + 200));
            next += 200;
            std::thread::sleep(Duration::from_millis(50));
        }
        posted
    })
}

/// `rounds` SIGKILLs of the gateway, then of the relay, at seeded random moments (the seed
/// is printed under `test`; replay with `OUTPOST_TEST_SEED`).
fn kills(test: &str, store: StoreKind, rounds: usize) {
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
    let (_seed, mut rng) = seeded(test);

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
        expected.acked.len() > 1000,
        "too little traffic: {}",
        expected.acked.len()
    );

    assert!(
        wait_drained(&gw, Duration::from_secs(120)),
        "{}",
        status(&gw)["uplink"]
    );
    // Punches whose request the kill cut may or may not have been taken: at most once.
    eprintln!(
        "{} punches acknowledged, {} unconfirmed (request cut by a kill)",
        expected.acked.len(),
        expected.unconfirmed.len()
    );
    assert_delivered(
        &relay,
        &Delivery {
            gateway_id: "gw-test",
            acked: &expected.acked,
            unconfirmed: &expected.unconfirmed,
            seq_reuse: false,
        },
    );
    let st = status(&gw);
    assert_eq!(st["journal"]["records"], 0);
}

#[test]
fn sigkill_gateway_then_relay_every_acked_punch_once_sled() {
    kills(
        "sigkill_gateway_then_relay_every_acked_punch_once_sled",
        StoreKind::Sled,
        4,
    );
}

#[test]
fn sigkill_gateway_then_relay_every_acked_punch_once_postgres() {
    let (_pg, store) = postgres();
    kills(
        "sigkill_gateway_then_relay_every_acked_punch_once_postgres",
        store,
        3,
    );
}
