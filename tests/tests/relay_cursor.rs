//! The query cursor never skips (issue 13, part 0): two real relays on one private
//! PostgreSQL take concurrent batches from several gateways, several batches in flight
//! each, for 20 s, while a consumer pages `GET /v1/punches?cursor=` (alternating relays)
//! as fast as it can. At the end the consumer has seen every stored punch exactly once,
//! with strictly increasing cursors, and the set equals what the gateways sent.
//!
//! With the old cursor (the `punches.id` identity) this fails within seconds: two commits
//! take ids 1–50 and 51–100, the second becomes visible first, the consumer reads 51–100
//! and never goes back for 1–50.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_tests::postgres::PgServer;
use outpost_tests::relay::{
    batch, frame as zframe, post_frame, punches, records, Relay, StoreKind,
};

/// How long the gateways write.
const WRITE_FOR: Duration = Duration::from_secs(20);
/// Gateways, each its own site (so every punch key is unique).
const GATEWAYS: u64 = 6;
/// Batches each gateway has in flight at once (on both relays).
const IN_FLIGHT: u64 = 3;
/// Records per batch: small, so that there are many commits (each a chance to become
/// visible out of order) but few enough punches for the consumer to keep up with.
const N: u64 = 4;
/// The consumer's page size: the relay's maximum, so that it keeps up with the writers
/// and most of its reads are at the head, where commits land (a consumer that lags reads
/// only settled rows and cannot miss anything).
const PAGE: usize = 1000;

/// A punch as the consumer identifies it: (site, device, device_seq).
type Key = (String, String, u64);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_paging_during_concurrent_commits_on_two_relays_sees_every_punch_once() {
    let pg = tokio::task::spawn_blocking(|| PgServer::start_with(false))
        .await
        .unwrap()
        .expect("start a private PostgreSQL");
    let shared = tempfile::tempdir().unwrap();
    let gw_file = shared.path().join("gateways").display().to_string();
    let url = pg.url();
    let (a, b) = tokio::task::spawn_blocking(move || {
        let env = [("OUTPOST_AUTH__GATEWAYS_FILE", gw_file.as_str())];
        std::thread::scope(|s| {
            let a = s.spawn(|| Relay::start(StoreKind::Postgres(url.clone()), &env).unwrap());
            let b = s.spawn(|| Relay::start(StoreKind::Postgres(url.clone()), &env).unwrap());
            (a.join().unwrap(), b.join().unwrap())
        })
    })
    .await
    .unwrap();
    let mut tokens = Vec::new();
    for g in 0..GATEWAYS {
        let t = a
            .add_gateway(&format!("gw-{g}"), &format!("CUR{g}"))
            .unwrap();
        b.wait_token(&t, true).unwrap();
        tokens.push(t);
    }
    let relays = [a.http_url(), b.http_url()];

    // The writers: each gateway sends rounds of IN_FLIGHT batches at once, alternating
    // relays, until WRITE_FOR has passed. Returns what it sent.
    let deadline = Instant::now() + WRITE_FOR;
    let commits = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for (g, token) in tokens.iter().enumerate() {
        let (relays, token, commits) = (relays.clone(), token.clone(), commits.clone());
        writers.push(tokio::spawn(async move {
            let (gw, site) = (format!("gw-{g}"), format!("CUR{g}"));
            let mut sent: Vec<Key> = Vec::new();
            let mut next = 0u64;
            while Instant::now() < deadline {
                let mut round = Vec::new();
                for _ in 0..IN_FLIGHT {
                    let first = 1 + next * N;
                    let ps = punches(first..=first + N - 1);
                    sent.extend(
                        ps.iter()
                            .map(|p| (site.clone(), p.device_id.to_string(), p.device_seq)),
                    );
                    let f = zframe(&batch(&gw, &site, 1, records(&ps, first)));
                    round.push(post_frame(
                        &relays[((next + g as u64) % 2) as usize],
                        Some(&token),
                        f,
                    ));
                    next += 1;
                }
                for (status, body) in futures_util::future::join_all(round).await {
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                    commits.fetch_add(1, Ordering::Relaxed);
                }
            }
            sent
        }));
    }

    // The consumer: pages from the cursor it reached, alternating relays, until a page
    // read after every writer finished comes back empty.
    let writers_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let consumer = {
        // Each relay has its own admin token.
        let tokens = [a.admin_token.clone(), b.admin_token.clone()];
        let (relays, done) = (relays.clone(), writers_done.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut seen: Vec<Key> = Vec::new();
            let mut cursor = 0u64;
            let mut pages = 0u64;
            let mut at_head = 0u64;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let r = (pages % 2) as usize;
                let url = format!("{}/v1/punches?cursor={cursor}&limit={PAGE}", relays[r]);
                pages += 1;
                let resp = client
                    .get(&url)
                    .bearer_auth(&tokens[r])
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status().as_u16(), 200, "GET {url}");
                let page: serde_json::Value =
                    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
                let items = page["items"].as_array().unwrap();
                if items.len() < PAGE {
                    at_head += 1;
                }
                for item in items {
                    let c: u64 = item["cursor"].as_str().unwrap().parse().unwrap();
                    assert!(c > cursor, "cursor {c} after {cursor}: not increasing");
                    cursor = c;
                    seen.push((
                        item["site"].as_str().unwrap().to_string(),
                        item["device_id"].as_str().unwrap().to_string(),
                        item["seq"].as_u64().unwrap(),
                    ));
                }
                if let Some(next) = page["next_cursor"].as_str() {
                    assert_eq!(next.parse::<u64>().unwrap(), cursor);
                }
                if items.is_empty() && finished {
                    return (seen, pages, at_head);
                }
            }
        })
    };

    let mut sent: Vec<Key> = Vec::new();
    for w in writers {
        sent.extend(w.await.unwrap());
    }
    writers_done.store(true, Ordering::SeqCst);
    let (seen, pages, at_head) = tokio::time::timeout(Duration::from_secs(60), consumer)
        .await
        .expect("the consumer catches up")
        .unwrap();
    eprintln!(
        "{} batches committed, {} punches sent, {} seen in {pages} pages ({at_head} at the head)",
        commits.load(Ordering::Relaxed),
        sent.len(),
        seen.len()
    );

    let sent_set: BTreeSet<Key> = sent.iter().cloned().collect();
    assert_eq!(sent_set.len(), sent.len(), "the test sends each punch once");
    let seen_set: BTreeSet<Key> = seen.iter().cloned().collect();
    assert_eq!(seen_set.len(), seen.len(), "no punch seen twice");
    let missed: Vec<&Key> = sent_set.difference(&seen_set).collect();
    assert!(
        missed.is_empty(),
        "the consumer missed {} of {} punches for good, e.g. {:?}",
        missed.len(),
        sent.len(),
        &missed[..missed.len().min(5)]
    );
    assert_eq!(seen_set, sent_set, "seen exactly what was sent");
    assert!(
        at_head > 200,
        "the consumer read at the head during the writes ({at_head} of {pages} pages)"
    );
    drop((a, b));
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}
