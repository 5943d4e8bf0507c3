//! A webhook output end to end, on the real relay binary (embedded store): a receiver
//! that fails (500), asks to wait (429 with Retry-After) and hangs past the timeout, and a
//! relay killed with SIGKILL while it delivers. Afterwards the receiver holds every punch,
//! by id exactly once among its first sightings, in the order the relay stored them, and
//! every call it got carried a valid Standard Webhooks signature.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use outpost_tests::relay::{batch, frame, post_frame, punches, records, Relay, StoreKind};
use outpost_tests::webhook::{random_secret, Reply, WebhookReceiver};

const SITE: &str = "HC001";
const TOTAL: u64 = 2000;
const PER_BATCH: u64 = 100;

fn expected_id(n: u64) -> String {
    format!("{SITE}/dev-{}/{n}", n % 4)
}

async fn send(relay: &Relay, token: &str, seqs: std::ops::RangeInclusive<u64>) {
    let mut first = *seqs.start();
    let last = *seqs.end();
    while first <= last {
        let end = (first + PER_BATCH - 1).min(last);
        let b = batch("gw-hook", SITE, 1, records(&punches(first..=end), first));
        let (status, body) = post_frame(&relay.http_url(), Some(token), frame(&b)).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        first = end + 1;
    }
}

/// Every stored punch's cursor by id, read page by page from the query API.
fn cursors(relay: &Relay) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(c) => format!("/v1/punches?limit=1000&cursor={c}"),
            None => "/v1/punches?limit=1000".to_string(),
        };
        let (status, body) = relay.admin_get(&path).unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        for item in v["items"].as_array().unwrap() {
            let id = format!(
                "{}/{}/{}",
                item["site"].as_str().unwrap(),
                item["device_id"].as_str().unwrap(),
                item["seq"].as_u64().unwrap()
            );
            let cursor: u64 = item["cursor"].as_str().unwrap().parse().unwrap();
            out.insert(id, cursor);
        }
        match v["next_cursor"].as_str() {
            Some(c) => after = Some(c.to_string()),
            None => return out,
        }
    }
}

#[test]
fn webhook_delivers_every_punch_once_in_order_through_failures_and_a_kill() {
    let receiver = WebhookReceiver::start(&random_secret()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("payroll.whsec");
    std::fs::write(&secret_file, receiver.secret()).unwrap();
    // Short schedule and timeout through config; the defaults stay the specification's.
    let outputs = format!(
        "[{{name = \"payroll\", url = \"{}\", secret_file = \"{}\", allow_private = true, \
         batch_max = 50, timeout_secs = 1, retry_schedule_secs = [0, 1]}}]",
        receiver.url(),
        secret_file.display()
    );
    let mut relay =
        Relay::start(StoreKind::Sled, &[("OUTPOST_OUTPUTS__WEBHOOK", &outputs)]).unwrap();
    let token = relay.add_gateway("gw-hook", SITE).unwrap();
    receiver.script([
        Reply::Status(500),
        Reply::RetryAfter {
            status: 429,
            value: "1".into(),
        },
        Reply::Hang(Duration::from_secs(3)),
        Reply::Status(503),
    ]);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(send(&relay, &token, 1..=TOTAL / 2));

    // Kill the relay while it is delivering: some punches received, not all.
    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.unique_ids().len() < 200 {
        assert!(
            Instant::now() < deadline,
            "the webhook got {} punches in 60 s; relay log:\n{}",
            receiver.unique_ids().len(),
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    relay.kill9();
    let before_kill = receiver.unique_ids().len();
    relay.restart().unwrap();
    rt.block_on(send(&relay, &token, TOTAL / 2 + 1..=TOTAL));

    let ids = receiver
        .wait_for(TOTAL as usize, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}; relay log:\n{}", relay.log()));
    assert!(
        before_kill < TOTAL as usize,
        "the kill came after everything was delivered ({before_kill})"
    );
    assert_eq!(receiver.bad_signatures(), 0, "a call was not signed right");
    assert!(
        receiver.malformed().is_empty(),
        "{:?}",
        receiver.malformed()
    );
    assert_eq!(
        receiver.script_left(),
        0,
        "the scripted failures were not all met"
    );

    // Every punch, by id, exactly once among first sightings, and nothing else.
    let firsts = receiver.unique_ids();
    let want: HashSet<String> = (1..=TOTAL).map(expected_id).collect();
    let got: HashSet<String> = firsts.iter().cloned().collect();
    assert_eq!(firsts.len(), got.len());
    assert_eq!(got, want, "the receiver's ids differ from the punches sent");
    assert!(ids.len() >= TOTAL as usize);

    // In the order the relay stored them: first sightings follow the cursor.
    let cursor = cursors(&relay);
    let order: Vec<u64> = firsts.iter().map(|id| cursor[id]).collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "the receiver saw punches out of cursor order"
    );

    // A resend (after the kill) is the same call: every call id maps to one set of items.
    let mut by_call: HashMap<String, Vec<String>> = HashMap::new();
    for call in receiver.calls().into_iter().filter(|c| c.status == 200) {
        if let Some(prev) = by_call.insert(call.webhook_id.clone(), call.item_ids.clone()) {
            assert_eq!(
                prev, call.item_ids,
                "webhook-id {} changed its items",
                call.webhook_id
            );
        }
    }

    // The output caught up: no lag, active.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = relay.admin_get("/v1/outputs").unwrap();
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let o = &v["outputs"][0];
        if o["lag"] == 0 && o["state"] == "active" {
            break;
        }
        assert!(Instant::now() < deadline, "the output did not settle: {o}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
