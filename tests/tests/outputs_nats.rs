//! A NATS JetStream output end to end: the real relay binary (embedded store) delivers to
//! a private `nats-server -js`, which is stopped while punches keep arriving (intake must
//! not slow down or fail) and started again. The stream then holds every punch exactly
//! once, in the order the relay stored them, each with `Nats-Msg-Id` = its id.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull::OrderedConfig};
use futures_util::StreamExt;
use outpost_tests::nats::NatsServer;
use outpost_tests::relay::{batch, frame, post_frame, punches, records, Relay, StoreKind};

const SITE: &str = "HC001";
const TOTAL: u64 = 2000;
const STREAM: &str = "OUTPOST";

async fn send(relay: &Relay, token: &str, seqs: std::ops::RangeInclusive<u64>) {
    let (mut first, last) = (*seqs.start(), *seqs.end());
    while first <= last {
        let end = (first + 99).min(last);
        let b = batch("gw-nats", SITE, 1, records(&punches(first..=end), first));
        let (status, body) = post_frame(&relay.http_url(), Some(token), frame(&b)).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        first = end + 1;
    }
}

/// Messages in the stream now; 0 while the server or the stream is not there.
async fn held(url: &str) -> u64 {
    let Ok(client) = async_nats::connect(url).await else {
        return 0;
    };
    let js = jetstream::new(client);
    match js.get_stream(STREAM).await {
        Ok(mut st) => st.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

async fn wait_held(url: &str, n: u64, relay: &Relay) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let h = held(url).await;
        if h >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the stream holds {h} of {n} messages after 90 s; relay log:\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_output_delivers_every_punch_once_in_order_across_a_server_restart() {
    let mut server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let outputs = format!(
        "[{{name = \"bus\", url = \"{url}\", batch_max = 200, retry_initial_ms = 50, retry_max_ms = 500}}]"
    );
    let relay = Relay::start(StoreKind::Sled, &[("OUTPOST_OUTPUTS__NATS", &outputs)]).unwrap();
    let token = relay.add_gateway("gw-nats", SITE).unwrap();

    send(&relay, &token, 1..=TOTAL / 2).await;
    wait_held(&url, 200, &relay).await;
    server.stop();
    // Intake carries on while the output cannot deliver.
    send(&relay, &token, TOTAL / 2 + 1..=TOTAL).await;
    server.start_again().expect("nats-server restarts");
    wait_held(&url, TOTAL, &relay).await;

    // Exactly TOTAL messages, in stored order, each once with its id.
    let client = async_nats::connect(&url).await.unwrap();
    let js = jetstream::new(client);
    let mut st = js.get_stream(STREAM).await.unwrap();
    assert_eq!(st.info().await.unwrap().state.messages, TOTAL);
    let consumer = st.create_consumer(OrderedConfig::default()).await.unwrap();
    let mut msgs = consumer.messages().await.unwrap();
    let mut ids = Vec::new();
    let mut cursors = Vec::new();
    while ids.len() < TOTAL as usize {
        let m = tokio::time::timeout(Duration::from_secs(30), msgs.next())
            .await
            .expect("read the stream")
            .expect("stream open")
            .expect("message");
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(
            v["id"].as_str(),
            Some(id.as_str()),
            "payload id = Nats-Msg-Id"
        );
        let dev = v["device_id"].as_str().unwrap();
        assert_eq!(m.subject.as_str(), format!("outpost.punch.{SITE}.{dev}"));
        cursors.push(v["cursor"].as_str().unwrap().parse::<u64>().unwrap());
        ids.push(id);
    }
    let want: HashSet<String> = (1..=TOTAL)
        .map(|n| format!("{SITE}/dev-{}/{n}", n % 4))
        .collect();
    let got: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(got.len(), ids.len(), "a punch is in the stream twice");
    assert_eq!(got, want);
    assert!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "the stream holds punches out of stored order"
    );
}
