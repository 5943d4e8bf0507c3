//! The exactly-once check of the uplink tests (`uplink_support::assert_exactly_once`) can
//! fail. The relay's punch key is unique, so a punch sent twice is never a second row; the
//! check must see it in the relay's accounting instead. Each case feeds a relay batches
//! straight from a test "gateway" and asks the check about the punches sent.

mod uplink_support;

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;

use outpost_protocol::Punch;
use outpost_tests::relay::{batch, frame, post_frame, punch, record, StoreKind};
use uplink_support::*;

/// The three punches every case sends.
fn abc() -> [Punch; 3] {
    [
        punch("door-1", 1, "EMP-0001", 1),
        punch("door-1", 2, "EMP-0002", 2),
        punch("door-1", 3, "EMP-0003", 3),
    ]
}

fn keys(ps: &[Punch]) -> BTreeSet<Key> {
    ps.iter()
        .map(|p| (p.device_id.as_str().to_string(), p.device_seq))
        .collect()
}

/// Sends `punches` as gateway `gw` (epoch 1), `punches[i]` at gateway_seq `first + i`.
async fn send(
    relay: &outpost_tests::relay::Relay,
    gw: &str,
    token: &str,
    first: u64,
    punches: &[Punch],
) {
    let records = punches
        .iter()
        .enumerate()
        .map(|(i, p)| record(*p, first + i as u64))
        .collect();
    let (code, body) = post_frame(
        &relay.http_url(),
        Some(token),
        frame(&batch(gw, "HC001", 1, records)),
    )
    .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
}

/// The panic message of `assert_exactly_once(relay, gw, expected)`, or `None` if it passed.
/// The expected panic is not printed (this binary has one test, so swapping the process's
/// panic hook affects nothing else).
fn check(
    relay: &outpost_tests::relay::Relay,
    gw: &str,
    expected: &BTreeSet<Key>,
) -> Option<String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        assert_exactly_once(relay, gw, expected)
    }));
    std::panic::set_hook(hook);
    result.err().map(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exactly_once_check_sees_what_the_punch_rows_hide() {
    let [a, b, c] = abc();
    let expected = keys(&[a, b, c]);

    // Each punch once, gateway_seq 1..=3: the check passes.
    let relay = relay(StoreKind::Sled);
    let token = relay.add_gateway("gw-test", "HC001").unwrap();
    send(&relay, "gw-test", &token, 1, &[a, b, c]).await;
    assert_eq!(check(&relay, "gw-test", &expected), None);

    // B journaled twice, in the middle (gateway_seq 1..=4 = A B B C): still three rows.
    let relay = uplink_support::relay(StoreKind::Sled);
    let token = relay.add_gateway("gw-test", "HC001").unwrap();
    send(&relay, "gw-test", &token, 1, &[a, b, b, c]).await;
    assert_eq!(relay_keys(&relay).len(), 3, "the rows alone look right");
    let e = check(&relay, "gw-test", &expected).expect("a doubled punch must fail the check");
    assert!(e.contains("gateway_seq"), "{e}");

    // B journaled twice, last (gateway_seq 4 = B again): the rows are 1..=3, dense.
    let relay = uplink_support::relay(StoreKind::Sled);
    let token = relay.add_gateway("gw-test", "HC001").unwrap();
    send(&relay, "gw-test", &token, 1, &[a, b, c]).await;
    send(&relay, "gw-test", &token, 4, &[b]).await;
    let e = check(&relay, "gw-test", &expected).expect("a doubled last punch must fail the check");
    assert!(e.contains("acked_through"), "{e}");

    // Another gateway sent A with other content: a conflict, held aside.
    let relay = uplink_support::relay(StoreKind::Sled);
    let token = relay.add_gateway("gw-test", "HC001").unwrap();
    let other = relay.add_gateway("gw-other", "HC001").unwrap();
    send(&relay, "gw-test", &token, 1, &[a, b, c]).await;
    let a2 = Punch {
        subject_id: punch("door-1", 1, "EMP-0099", 1).subject_id,
        ..a
    };
    send(&relay, "gw-other", &other, 1, &[a2]).await;
    let e = check(&relay, "gw-test", &expected).expect("a conflict must fail the check");
    assert!(e.contains("conflicts"), "{e}");

    // A punch sent but missing from what the test expected (the counter sees it too).
    let relay = uplink_support::relay(StoreKind::Sled);
    let token = relay.add_gateway("gw-test", "HC001").unwrap();
    send(&relay, "gw-test", &token, 1, &[a, b, c]).await;
    let e = check(&relay, "gw-test", &keys(&[a, b])).expect("an extra punch must fail the check");
    assert!(e.contains("never sent"), "{e}");
}
