//! The "24-hour outage", compressed in time: a whole day of punches of a 500-person site
//! (from the realistic workload generator) arrives while the relay is down; then the link
//! returns and the backlog drains. Prints the drain time (never asserted: timings belong
//! in benchmarks).

mod uplink_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use outpost_protocol::json::punch_to_json;
use outpost_tests::relay::StoreKind;
use outpost_tests::workload::Site;
use serde_json::Value;
use uplink_support::*;

#[test]
fn day_long_outage_of_a_500_person_site_drains_exactly_once() {
    let mut relay = relay(StoreKind::Sled);
    let token = relay.add_gateway("gw-test", "HC001").unwrap();
    assert!(relay.stop());
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &relay.ws_url(), &token, &[]);
    gw.start();

    // One day of punches, in arrival order.
    let mut site = Site::new(2026, 500, 8);
    let mut day = Vec::new();
    let first = site.punches(1)[0];
    day.push(first);
    loop {
        let p = site.punches(1)[0];
        if p.device_time_ms - first.device_time_ms > 86_400_000 {
            break;
        }
        day.push(p);
    }
    let mut expected = BTreeSet::new();
    for chunk in day.chunks(100) {
        let body = Value::Array(
            chunk
                .iter()
                .map(|p| Value::Object(punch_to_json(p)))
                .collect(),
        );
        let (code, v) = gw.post_punches(None, &body).unwrap();
        assert!((200..300).contains(&code), "{code} {v}");
        for (p, r) in chunk.iter().zip(v["results"].as_array().unwrap()) {
            assert_eq!(r["status"], "accepted", "{r}");
            expected.insert((p.device_id.as_str().to_string(), p.device_seq));
        }
    }
    assert_eq!(status(&gw)["journal"]["records"], day.len());

    relay.restart().unwrap();
    let t = Instant::now();
    assert!(
        wait_drained(&gw, Duration::from_secs(120)),
        "{}",
        status(&gw)["uplink"]
    );
    let drain = t.elapsed();
    println!(
        "24-hour outage, 500 staff: {} punches drained in {:.2} s after the relay returned (debug build, includes reconnect backoff)",
        day.len(),
        drain.as_secs_f64()
    );
    assert_exactly_once(&relay, "gw-test", &expected);
}
