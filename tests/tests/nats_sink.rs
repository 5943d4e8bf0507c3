//! The NATS JetStream output sink against a real `nats-server -js` (private, random port;
//! see `tests/src/nats.rs`). Each test reads the stream back with its own async-nats
//! consumer and checks every item: present exactly once, in delivery order, on its
//! subject, with its `Nats-Msg-Id` and its JSON.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull::OrderedConfig, stream};
use futures_util::StreamExt;
use outpost_relay::outputs::config::NatsOutput;
use outpost_relay::outputs::nats::{NatsSink, ACK_TIMEOUT};
use outpost_relay::outputs::sink::{punch_id, Delivery, Item, Sink, SinkError};
use outpost_tests::nats::NatsServer;
use serde_json::json;

/// Sites and devices with characters that are illegal in a subject token.
const SITES: [&str; 3] = ["HC001", "HC.002", "site 3"];
const DEVICES: [&str; 2] = ["door-1", "door*2>"];

fn items(cursors: std::ops::Range<u64>) -> Vec<Item> {
    cursors
        .map(|c| {
            let site = SITES[(c % 3) as usize];
            let device = DEVICES[(c % 2) as usize];
            let id = punch_id(site, device, c);
            let j = json!({
                "id": id, "cursor": c, "site": site, "device": device,
                "device_seq": c, "employee": format!("E{c}"), "kind": "in",
            });
            let serde_json::Value::Object(json) = j else {
                unreachable!("json! of an object")
            };
            Item {
                id,
                cursor: c,
                site: site.into(),
                device: device.into(),
                json,
            }
        })
        .collect()
}

fn delivery(items: Vec<Item>) -> Delivery {
    let (a, b) = (items[0].cursor, items[items.len() - 1].cursor);
    Delivery {
        id: format!("bus-{a}-{b}"),
        created_ms: 1_700_000_000_000,
        kind: outpost_relay::outputs::config::EventKind::Punch,
        items,
    }
}

fn config(url: &str, stream: &str, extra: &str) -> NatsOutput {
    toml::from_str(&format!(
        "name = \"bus\"\nurl = \"{url}\"\nstream = \"{stream}\"\n{extra}"
    ))
    .expect("NATS output config")
}

/// One message as the stream holds it.
struct Stored {
    seq: u64,
    subject: String,
    msg_id: String,
    json: serde_json::Value,
}

async fn js(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url)
        .await
        .expect("test client connects");
    jetstream::new(client)
}

/// Every message of `stream`, in stream order; the stream must hold exactly `expect`.
async fn read_stream(url: &str, name: &str, expect: usize) -> Vec<Stored> {
    let js = js(url).await;
    let mut st = js.get_stream(name).await.expect("stream exists");
    let held = st.info().await.expect("stream info").state.messages;
    assert_eq!(held, expect as u64, "messages in stream {name}");
    let consumer = st
        .create_consumer(OrderedConfig::default())
        .await
        .expect("ordered consumer");
    let mut msgs = consumer.messages().await.expect("consume");
    let mut out = Vec::with_capacity(expect);
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < expect {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, msgs.next())
            .await
            .unwrap_or_else(|_| panic!("read {} of {expect} messages in 60 s", out.len()))
            .expect("consumer stream ended")
            .expect("message");
        let seq = m.info().expect("JetStream message info").stream_sequence;
        let msg_id = m
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        out.push(Stored {
            seq,
            subject: m.subject.to_string(),
            msg_id,
            json: serde_json::from_slice(&m.payload).expect("payload is JSON"),
        });
    }
    out
}

/// `stored` is exactly `want`, in order, each on its subject with its id and JSON.
fn check(stored: &[Stored], want: &[Item], sink: &NatsSink) {
    assert_eq!(stored.len(), want.len());
    let mut last_seq = 0;
    for (s, item) in stored.iter().zip(want) {
        assert_eq!(s.msg_id, item.id, "Nats-Msg-Id at stream seq {}", s.seq);
        assert_eq!(
            s.json,
            serde_json::Value::Object(item.json.clone()),
            "payload of {}",
            item.id
        );
        assert_eq!(s.subject, sink.subject_of(item), "subject of {}", item.id);
        assert!(s.seq > last_seq, "stream order");
        last_seq = s.seq;
    }
}

async fn deliver_ok(sink: &mut NatsSink, d: &Delivery) {
    if let Err(e) = sink.deliver(d).await {
        panic!("delivery {} failed: {e}", d.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_item_arrives_once_in_order_with_its_msg_id() {
    let t0 = Instant::now();
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let mut sink = NatsSink::new(&config(
        &url,
        "OUTPOST",
        "duplicate_window_secs = 300\nmax_ack_pending = 16",
    ))
    .expect("sink");
    let stats = sink.stats();
    let all = items(0..1501);
    for chunk in [&all[0..1], &all[1..251], &all[251..1501]] {
        deliver_ok(&mut sink, &delivery(chunk.to_vec())).await;
    }
    assert_eq!((stats.acked(), stats.duplicates()), (1501, 0));

    // The sink created the stream: our wildcard subject, the configured duplicate window.
    let mut st = js(&url).await.get_stream("OUTPOST").await.expect("stream");
    let cfg = &st.info().await.expect("info").config;
    assert_eq!(cfg.subjects, vec!["outpost.punch.*.*".to_string()]);
    assert_eq!(cfg.duplicate_window, Duration::from_secs(300));

    let stored = read_stream(&url, "OUTPOST", all.len()).await;
    check(&stored, &all, &sink);
    assert!(stored
        .iter()
        .any(|s| s.subject == "outpost.punch.HC_002.door_2_"));
    assert!(stored
        .iter()
        .any(|s| s.subject == "outpost.punch.site_3.door-1"));
    println!("every_item_arrives_once: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_resend_is_reported_as_duplicates() {
    let t0 = Instant::now();
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let mut sink = NatsSink::new(&config(&url, "RESEND", "max_ack_pending = 32")).expect("sink");
    let stats = sink.stats();
    let first = delivery(items(0..400));
    deliver_ok(&mut sink, &first).await;
    assert_eq!(stats.duplicates(), 0);

    // The same delivery again, as the worker sends it after a crash or a lost ack.
    deliver_ok(&mut sink, &first).await;
    assert_eq!(sink.duplicates(), 400, "every resent item is a duplicate");
    assert_eq!(stats.acked(), 800);

    // Half resent, half new: only the old half is reported.
    let overlap = delivery(items(200..600));
    deliver_ok(&mut sink, &overlap).await;
    assert_eq!(stats.duplicates(), 600);

    let stored = read_stream(&url, "RESEND", 600).await;
    check(&stored, &items(0..600), &sink);
    println!("a_forced_resend: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_during_delivery_loses_nothing() {
    let t0 = Instant::now();
    let mut server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let mut sink = NatsSink::new(&config(
        &url,
        "RESTART",
        "max_ack_pending = 8\nretry_initial_ms = 50\nretry_max_ms = 400",
    ))
    .expect("sink");
    let stats = sink.stats();
    let a = delivery(items(0..500));
    deliver_ok(&mut sink, &a).await;

    // A big delivery; stop the server once part of it is acknowledged.
    let b = delivery(items(500..30_500));
    let b2 = b.clone();
    let running = tokio::spawn(async move {
        let out = sink.deliver(&b2).await;
        (sink, out)
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats.acked() < 1_500 {
        assert!(
            Instant::now() < deadline,
            "no progress: {} acks",
            stats.acked()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::task::block_in_place(|| server.stop());
    let acked_at_stop = stats.acked();
    let (mut sink, out) = running.await.expect("delivery task");
    match out {
        Err(SinkError::Retry { reason, .. }) => println!("mid-delivery stop: {reason}"),
        other => panic!(
            "the delivery must fail when the server stops under it (acked {acked_at_stop} of \
             30500 at the stop): {other:?}"
        ),
    }
    assert!(stats.acked() < 30_500, "not every item was acknowledged");

    // With the server down a delivery fails at once, saying why.
    let started = Instant::now();
    match sink.deliver(&b).await {
        Err(SinkError::Retry { reason, .. }) => {
            assert!(reason.contains("cannot connect"), "{reason}");
            assert!(
                started.elapsed() < ACK_TIMEOUT,
                "failed fast: {:?}",
                started.elapsed()
            );
        }
        other => panic!("NATS is down: {other:?}"),
    }

    // Same port, same store: the worker's retries (same delivery) get through.
    tokio::task::block_in_place(|| server.start_again()).expect("restart nats-server");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failures = 0;
    loop {
        match sink.deliver(&b).await {
            Ok(()) => break,
            Err(e) => {
                failures += 1;
                assert!(
                    Instant::now() < deadline,
                    "still failing after the restart: {e}"
                );
                tokio::time::sleep(sink.retry_delay(failures)).await;
            }
        }
    }
    let dups = stats.duplicates();
    assert!(
        dups > 0,
        "the resend repeated items the server already held"
    );
    println!(
        "restart: {acked_at_stop} acked at the stop, {failures} failed retries after the \
         restart, {dups} duplicates dropped by the server"
    );

    let stored = read_stream(&url, "RESTART", 30_500).await;
    let mut want = a.items.clone();
    want.extend(b.items.iter().cloned());
    check(&stored, &want, &sink);
    println!("a_nats_restart: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_stream_is_left_as_it_is() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    js(&url)
        .await
        .create_stream(stream::Config {
            name: "WIDE".into(),
            subjects: vec!["outpost.>".into()],
            duplicate_window: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .expect("create stream");
    let mut sink =
        NatsSink::new(&config(&url, "WIDE", "duplicate_window_secs = 999")).expect("sink");
    let d = delivery(items(0..50));
    deliver_ok(&mut sink, &d).await;
    let mut st = js(&url).await.get_stream("WIDE").await.expect("stream");
    let cfg = &st.info().await.expect("info").config;
    assert_eq!(cfg.subjects, vec!["outpost.>".to_string()]);
    assert_eq!(cfg.duplicate_window, Duration::from_secs(60));
    check(&read_stream(&url, "WIDE", 50).await, &d.items, &sink);
}
