//! Events other than punches through webhook outputs, end to end on the real relay binary
//! (embedded store): one output answers `410 Gone` and is disabled; another, which wants
//! punches, conflicts and `gateway` events, gets the `output.disabled` notice exactly once
//! (also after a relay restart, whose worker finds the output disabled again), and a
//! conflict (same punch key, other content, from another gateway) as a
//! `conflict.batch` item.

use std::time::{Duration, Instant};

use outpost_tests::relay::{batch, frame, post_frame, punch, punches, records, Relay, StoreKind};
use outpost_tests::webhook::{random_secret, Reply, WebhookReceiver};

const SITE: &str = "HC001";

async fn send(relay: &Relay, token: &str, b: outpost_protocol::Batch) {
    let (status, body) = post_frame(&relay.http_url(), Some(token), frame(&b)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

/// `items` without the ones whose id was seen before.
fn first_sightings(items: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    let mut seen = std::collections::HashSet::new();
    items
        .into_iter()
        .filter(|i| seen.insert(i["id"].as_str().unwrap_or_default().to_string()))
        .collect()
}

/// Waits until `f` holds, for at most 60 s.
fn wait(what: &str, relay: &Relay, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; relay log:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_gone_output_is_announced_once_and_conflicts_reach_the_receiver() {
    let gone = WebhookReceiver::start(&random_secret()).unwrap();
    let ops = WebhookReceiver::start(&random_secret()).unwrap();
    gone.script([Reply::Status(410)]);
    let dir = tempfile::tempdir().unwrap();
    let (gone_secret, ops_secret) = (dir.path().join("gone.whsec"), dir.path().join("ops.whsec"));
    std::fs::write(&gone_secret, gone.secret()).unwrap();
    std::fs::write(&ops_secret, ops.secret()).unwrap();
    let outputs = format!(
        "[{{name = \"gone\", url = \"{}\", secret_file = \"{}\", allow_private = true, \
         events = [\"punch\", \"gateway\"]}}, \
         {{name = \"ops\", url = \"{}\", secret_file = \"{}\", allow_private = true, \
         events = [\"punch\", \"conflict\", \"rejected\", \"gateway\"]}}]",
        gone.url(),
        gone_secret.display(),
        ops.url(),
        ops_secret.display()
    );
    let mut relay =
        Relay::start(StoreKind::Sled, &[("OUTPOST_OUTPUTS__WEBHOOK", &outputs)]).unwrap();
    let token_a = relay.add_gateway("gw-a", SITE).unwrap();
    let token_b = relay.add_gateway("gw-b", SITE).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(send(
        &relay,
        &token_a,
        batch("gw-a", SITE, 1, records(&punches(1..=10), 1)),
    ));
    // gw-b sends punch key HC001/dev-1/1 with another subject: a conflict.
    rt.block_on(send(
        &relay,
        &token_b,
        batch(
            "gw-b",
            SITE,
            1,
            records(&[punch("dev-1", 1, "EMP-OTHER", 1)], 1),
        ),
    ));

    wait(
        "the disabled notice and the conflict at ops",
        &relay,
        || !ops.items_of("gateway.batch").is_empty() && !ops.items_of("conflict.batch").is_empty(),
    );
    let conflicts = ops.items_of("conflict.batch");
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0]["id"], "conflict/HC001/dev-1/1/gw-b/1/1");
    assert_eq!(conflicts[0]["subject"], "EMP-OTHER");
    assert_eq!(conflicts[0]["gateway_id"], "gw-b");
    assert!(conflicts[0]["kept_cursor"].is_string());

    // A restart: the new worker of "gone" finds it disabled and appends the same notice,
    // which the store keeps once. A later punch shows that ops ran past that point.
    relay.kill9();
    relay.restart().unwrap();
    rt.block_on(send(
        &relay,
        &token_a,
        batch("gw-a", SITE, 1, records(&punches(11..=11), 11)),
    ));
    wait("punch 11 at ops", &relay, || {
        ops.unique_ids().iter().any(|i| i == "HC001/dev-3/11")
    });
    // A kill right after a confirmed call may resend it (same ids, dropped by id): the
    // receiver's view is its first sightings.
    let notices = first_sightings(ops.items_of("gateway.batch"));
    assert_eq!(notices.len(), 1, "exactly one notice: {notices:?}");
    let n = &notices[0];
    assert_eq!(n["kind"], "output.disabled");
    assert_eq!(n["output"], "gone");
    assert!(n["reason"].as_str().unwrap().contains("410"), "{n}");
    assert!(n["id"]
        .as_str()
        .unwrap()
        .starts_with("relay/output.disabled/gone/"));
    // Every punch reached ops, once each, in order, besides the other kinds.
    let punch_ids: Vec<String> = first_sightings(ops.items_of("punch.batch"))
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(punch_ids.len(), 11, "{punch_ids:?}");
    // Cursors across every kind increase at ops.
    let cursors: Vec<u64> = first_sightings(ops.items())
        .iter()
        .map(|i| i["cursor"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "{cursors:?}");
    // The gone output got its one call and nothing since.
    assert_eq!(gone.calls().len(), 1, "{:?}", gone.calls());
    assert_eq!(ops.bad_signatures() + gone.bad_signatures(), 0);
    assert!(ops.malformed().is_empty(), "{:?}", ops.malformed());
    assert!(relay.stop(), "the relay stops cleanly");
}
