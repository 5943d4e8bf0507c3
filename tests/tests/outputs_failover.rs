//! Output failover between real relays (issue 13): two `outpost-relay` processes on one
//! private PostgreSQL, both configured with the same webhook output. A writer posts
//! batches of random size to both relays the whole time (a batch that fails on one relay
//! is sent again to the other, as a gateway would). While the lease holder has a delivery
//! in flight (the receiver holds the call open), the test SIGKILLs it. The other relay
//! takes the lease over, sends the dead holder's delivery again (same `webhook-id`, same
//! items) and carries on. Then the killed relay is restarted: it finds the lease taken and
//! delivers nothing, while more punches arrive.
//!
//! Checked at the end of each phase: the receiver's ids, with resends dropped, are exactly
//! the punches stored (read back from `GET /v1/punches` on a live relay) and exactly the
//! punches sent; their first sightings follow the cursor; every call was signed right;
//! a `webhook-id` never changes its items. The takeover time (kill to the survivor's first
//! delivery) is printed; only a generous deadline is asserted, since it depends on how
//! loaded the machine is, not only on `lease_timeout_secs`.
//!
//! The batch sizes and pauses come from a seed that is printed
//! (`OUTPOST_TEST_SEED=<seed>` replays them).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use outpost_tests::postgres::PgServer;
use outpost_tests::proc::http;
use outpost_tests::relay::{batch, frame, punches, records, Relay, StoreKind};
use outpost_tests::seed::{rng, test_seed, TestRng};
use outpost_tests::webhook::{random_secret, Reply, WebhookReceiver};
use rand::Rng;

const SITE: &str = "FO01";
const GATEWAY: &str = "gw-failover";
/// `outputs.lease_timeout_secs`: the survivor must take over within this after the
/// holder's last renewal.
const LEASE_TIMEOUT_SECS: u64 = 2;
/// A generous bound on kill-to-first-delivery (the design says within the lease timeout;
/// a loaded machine adds scheduling delays on top, which this test must not flake on).
const TAKEOVER_DEADLINE: Duration = Duration::from_secs(15);
/// What the relay logs each time it finds another relay holding an output's lease.
const BUSY_LOG: &str = "another relay runs this output";

/// The id the relay gives punch `n` of [`punches`] (`outputs::sink::punch_id`).
fn punch_id(n: u64) -> String {
    format!("{SITE}/dev-{}/{n}", n % 4)
}

/// A writer thread: posts punches `first..` in batches of 1 to 25 (seeded), alternating
/// between `relays`, with pauses of 0 to 20 ms, until `stop` is set. A batch that fails
/// on one relay (connection refused or reset: it was killed) goes to the next one, so
/// every punch it returns was acknowledged with a 200 by some relay. Returns the last
/// punch number sent (`first - 1` when none).
fn writer(
    relays: Vec<SocketAddr>,
    token: String,
    first: u64,
    stop: Arc<AtomicBool>,
    mut rng: TestRng,
) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let auth = format!("Bearer {token}");
        let mut next = first;
        let mut turn = 0usize;
        while !stop.load(Ordering::SeqCst) {
            let end = next + rng.random_range(0..25u64);
            let body = frame(&batch(
                GATEWAY,
                SITE,
                1,
                records(&punches(next..=end), next),
            ));
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let addr = relays[turn % relays.len()];
                turn += 1;
                match http(
                    addr,
                    "POST",
                    "/v1/batches",
                    &[("Authorization", &auth)],
                    &body,
                ) {
                    Ok((200, _)) => break,
                    Ok((status, body)) => panic!(
                        "relay {addr} answered a batch {status}: {}",
                        String::from_utf8_lossy(&body)
                    ),
                    Err(e) => {
                        assert!(
                            Instant::now() < deadline,
                            "no relay took batch {next}..={end} in 30 s: {e}"
                        );
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            next = end + 1;
            std::thread::sleep(Duration::from_millis(rng.random_range(0..=20)));
        }
        next - 1
    })
}

/// The port in a holder id (`host:port/pid-random`, `outputs::supervisor::holder_id`).
fn holder_port(holder: &str) -> Option<u16> {
    holder.split('/').next()?.rsplit(':').next()?.parse().ok()
}

/// The webhook output as `relay` reports it in `GET /v1/outputs`.
fn output(relay: &Relay) -> serde_json::Value {
    let (status, body) = relay.admin_get("/v1/outputs").unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["outputs"][0].clone()
}

/// The port of the relay holding the output's lease, as `relay` reports it.
fn holder(relay: &Relay) -> Option<u16> {
    output(relay)["holder"].as_str().and_then(holder_port)
}

/// Every stored punch's cursor by id, page by page from `GET /v1/punches`.
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
            assert!(
                out.insert(id.clone(), cursor).is_none(),
                "{id} stored twice"
            );
        }
        match v["next_cursor"].as_str() {
            Some(c) => after = Some(c.to_string()),
            None => return out,
        }
    }
}

/// The receiver holds punches `1..=last`, each once by id, exactly the punches `relay`
/// stored, first seen in cursor order; every call was signed and formed right; no
/// `webhook-id` changed its items.
fn check_delivered(
    receiver: &WebhookReceiver,
    relay: &Relay,
    last: u64,
    logs: &dyn Fn() -> String,
) {
    let firsts = receiver
        .wait_for(last as usize, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}; logs:\n{}", logs()));
    assert_eq!(receiver.bad_signatures(), 0, "a call was not signed right");
    assert!(
        receiver.malformed().is_empty(),
        "{:?}",
        receiver.malformed()
    );
    let want: HashSet<String> = (1..=last).map(punch_id).collect();
    let got: HashSet<String> = firsts.iter().cloned().collect();
    assert_eq!(got, want, "the receiver's ids differ from the punches sent");
    let cursor = cursors(relay);
    let stored: HashSet<String> = cursor.keys().cloned().collect();
    assert_eq!(
        got, stored,
        "the receiver's ids differ from the punches stored"
    );
    let order: Vec<u64> = firsts.iter().map(|id| cursor[id]).collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "the receiver first saw punches out of cursor order"
    );
    let mut by_call: HashMap<String, Vec<String>> = HashMap::new();
    for call in receiver
        .calls()
        .into_iter()
        .filter(|c| !c.item_ids.is_empty())
    {
        if let Some(prev) = by_call.insert(call.webhook_id.clone(), call.item_ids.clone()) {
            assert_eq!(
                prev, call.item_ids,
                "webhook-id {} changed its items",
                call.webhook_id
            );
        }
    }
}

#[test]
fn the_other_relay_takes_over_a_killed_holders_webhook_and_nothing_is_lost_or_doubled() {
    let seed = test_seed("outputs_failover");
    let started = Instant::now();
    let pg =
        PgServer::start_with(false).expect("a private PostgreSQL (apt-get install postgresql)");
    let receiver = WebhookReceiver::start(&random_secret()).unwrap();
    let shared = tempfile::tempdir().unwrap();
    let secret_file = shared.path().join("payroll.whsec");
    std::fs::write(&secret_file, receiver.secret()).unwrap();
    let gateways = shared.path().join("gateways").display().to_string();
    // timeout_secs well above how long the test holds the call open before the kill, so
    // that the holder is still waiting for the answer when it dies.
    let outputs = format!(
        "[{{name = \"payroll\", url = \"{}\", secret_file = \"{}\", allow_private = true, \
         batch_max = 20, timeout_secs = 10, retry_schedule_secs = [0, 1]}}]",
        receiver.url(),
        secret_file.display()
    );
    let lease = LEASE_TIMEOUT_SECS.to_string();
    let env = [
        ("OUTPOST_AUTH__GATEWAYS_FILE", gateways.as_str()),
        ("OUTPOST_OUTPUTS__WEBHOOK", outputs.as_str()),
        ("OUTPOST_OUTPUTS__LEASE_TIMEOUT_SECS", lease.as_str()),
    ];
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Relay::start(StoreKind::Postgres(pg.url()), &env).unwrap());
        let b = s.spawn(|| Relay::start(StoreKind::Postgres(pg.url()), &env).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    let mut relays = [a, b];
    let token = relays[0].add_gateway(GATEWAY, SITE).unwrap();
    relays[1].wait_token(&token, true).unwrap();
    let addrs: Vec<SocketAddr> = relays.iter().map(|r| r.addr).collect();
    let logs = |relays: &[Relay]| -> String {
        relays
            .iter()
            .map(|r| format!("--- relay {}:\n{}", r.addr, r.log()))
            .collect()
    };

    // Phase 1: intake on both relays, delivery by whichever holds the lease.
    let stop = Arc::new(AtomicBool::new(false));
    let w1 = writer(addrs.clone(), token.clone(), 1, stop.clone(), rng(seed, 1));
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.unique_ids().len() < 100 {
        assert!(
            Instant::now() < deadline,
            "the webhook got {} punches in 20 s:\n{}",
            receiver.unique_ids().len(),
            logs(&relays)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Hold the holder's next call open: that delivery is in flight when it dies.
    receiver.script([Reply::Hang(Duration::from_secs(30))]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let hung = loop {
        if let Some(c) = receiver.calls().into_iter().find(|c| c.status == 0) {
            break c;
        }
        assert!(Instant::now() < deadline, "no call was held open in 10 s");
        std::thread::sleep(Duration::from_millis(5));
    };
    let holding = holder(&relays[0]).expect("a relay holds the output while it delivers");
    let (dead, alive) = match relays.iter().position(|r| r.addr.port() == holding) {
        Some(0) => (0, 1),
        Some(_) => (1, 0),
        None => panic!("the holder {holding} is neither relay"),
    };
    assert_eq!(
        holder(&relays[alive]),
        Some(holding),
        "the relays disagree on the holder"
    );
    let busy_before = relays[dead].log().matches(BUSY_LOG).count();
    relays[dead].kill9();
    let killed = Instant::now();
    println!(
        "killed relay {} (the holder) with call {} in flight, {} punches received",
        relays[dead].addr,
        hung.webhook_id,
        receiver.unique_ids().len()
    );

    // The survivor takes the lease over and delivers the dead holder's call again.
    let deadline = killed + TAKEOVER_DEADLINE;
    let first = loop {
        let after: Vec<_> = receiver
            .calls()
            .into_iter()
            .filter(|c| c.at > killed && c.status == 200)
            .collect();
        if let Some(c) = after.into_iter().next() {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "no delivery within {TAKEOVER_DEADLINE:?} of the kill:\n{}",
            logs(&relays)
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = first.at - killed;
    println!(
        "takeover: the survivor's first delivery came {took:?} after the kill \
         (lease_timeout_secs = {LEASE_TIMEOUT_SECS})"
    );
    assert_eq!(
        (first.webhook_id.as_str(), &first.item_ids),
        (hung.webhook_id.as_str(), &hung.item_ids),
        "the survivor's first call is not the dead holder's delivery"
    );
    assert_eq!(
        holder(&relays[alive]),
        Some(relays[alive].addr.port()),
        "the survivor delivers without holding the lease"
    );
    // Intake carries on through the takeover; then everything sent is delivered.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let last1 = w1.join().expect("writer");
    check_delivered(&receiver, &relays[alive], last1, &|| logs(&relays));
    let sent_twice = receiver.ids().len() - receiver.unique_ids().len();
    println!("phase 1: {last1} punches, {sent_twice} received twice (resends)");

    // Phase 2: the killed relay comes back. It finds the lease taken and delivers
    // nothing; the survivor keeps it and delivers the new punches once each.
    relays[dead].restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while relays[dead].log().matches(BUSY_LOG).count() <= busy_before {
        assert!(
            Instant::now() < deadline,
            "the restarted relay never asked for the lease:\n{}",
            relays[dead].log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let received_before = receiver.ids().len();
    let stop = Arc::new(AtomicBool::new(false));
    let w2 = writer(addrs, token, last1 + 1, stop.clone(), rng(seed, 2));
    // Longer than a few lease periods, so that renewals and the restarted relay's polls
    // interleave many times.
    let until = Instant::now() + Duration::from_secs(3 * LEASE_TIMEOUT_SECS);
    while Instant::now() < until {
        for r in &relays {
            assert_eq!(
                holder(r),
                Some(relays[alive].addr.port()),
                "the lease moved while its holder was alive:\n{}",
                logs(&relays)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    let last2 = w2.join().expect("writer");
    assert!(last2 > last1, "phase 2 sent nothing");
    check_delivered(&receiver, &relays[alive], last2, &|| logs(&relays));
    let ids = receiver.ids();
    let mut seen: HashSet<&String> = ids[..received_before].iter().collect();
    for id in &ids[received_before..] {
        assert!(seen.insert(id), "{id} delivered again after the restart");
    }
    for r in &relays {
        let o = output(r);
        assert_eq!(
            holder_port(o["holder"].as_str().unwrap_or_default()),
            Some(relays[alive].addr.port())
        );
    }
    println!(
        "phase 2: {} more punches, none twice; test took {:?}",
        last2 - last1,
        started.elapsed()
    );
}
