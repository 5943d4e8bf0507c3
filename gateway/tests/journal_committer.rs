//! The committer in front of a real journal: many concurrent submitters, group commit,
//! shutdown, and every `Accepted` seq readable after a reopen.

mod journal_support;

use std::collections::HashMap;

use journal_support::{cfg, pending};
use outpost_gateway::committer;
use outpost_gateway::journal::{Journal, Outcome};
use outpost_gateway::metrics::Metrics;
use outpost_protocol::RejectCode;
use tokio_util::sync::CancellationToken;

/// `<name>_sum` and `<name>_count` from the Prometheus text.
fn hist(text: &str, name: &str) -> (f64, f64) {
    let get = |suffix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_{suffix} ")))
            .map(|v| v.trim().parse::<f64>().unwrap())
            .unwrap_or(0.0)
    };
    (get("sum"), get("count"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submitters_are_group_committed_and_durable() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), &cfg()).unwrap();
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let (handle, task) = committer::spawn(journal.clone(), metrics.clone(), stop.clone());

    const CLIENTS: u64 = 48;
    const EACH: u64 = 60;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let h = handle.clone();
        tasks.push(tokio::spawn(async move {
            let dev = format!("dev-{c}");
            let mut got = Vec::new();
            for s in 0..EACH {
                // Every third request is two punches, one of them a resend.
                let items = if s % 3 == 0 && s > 0 {
                    vec![pending(&dev, s), pending(&dev, s - 1)]
                } else {
                    vec![pending(&dev, s)]
                };
                let out = h.submit(items.clone()).await;
                assert_eq!(out.len(), items.len());
                got.push((items[0], out[0]));
                if items.len() == 2 {
                    assert_eq!(out[1], Outcome::Duplicate);
                }
            }
            got
        }));
    }
    let mut accepted = HashMap::new();
    for t in tasks {
        for (p, o) in t.await.unwrap() {
            match o {
                Outcome::Accepted { gateway_seq } => {
                    assert!(
                        accepted.insert(gateway_seq, p).is_none(),
                        "seq {gateway_seq} given twice"
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(accepted.len() as u64, CLIENTS * EACH);
    let text = metrics.render();
    let (sum, count) = hist(&text, "outpost_gateway_commit_group_size");
    assert_eq!(sum as u64, CLIENTS * EACH + CLIENTS * ((EACH - 1) / 3));
    assert!(
        count < sum,
        "no group held more than one punch ({count} groups)"
    );
    assert!(text.contains("outpost_gateway_journal_records "), "{text}");

    // Shutdown: the committer finishes, later submitters are told to come back.
    stop.cancel();
    task.await.unwrap();
    let late = handle.submit(vec![pending("late", 1)]).await;
    assert_eq!(late, vec![Outcome::Rejected(RejectCode::Unavailable)]);
    assert!(handle.is_closed());
    drop(journal);

    let j = Journal::open(dir.path(), &cfg()).unwrap();
    assert_eq!(
        j.next_seq(),
        CLIENTS * EACH + 1,
        "dense seqs, nothing else stored"
    );
    let all: Vec<_> = j.records(0).unwrap().map(Result::unwrap).collect();
    assert_eq!(all.len(), accepted.len());
    for r in all {
        let p = accepted.get(&r.gateway_seq).expect("unexpected record");
        assert_eq!(r.punch, p.punch);
        assert_eq!(r.received, p.received);
    }
}

#[tokio::test]
async fn queued_requests_are_answered_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), &cfg()).unwrap();
    let stop = CancellationToken::new();
    let (handle, task) = committer::spawn(journal.clone(), Metrics::new(), stop.clone());
    // On a current-thread runtime the committer cannot run until we yield, so these
    // requests are queued when the token is cancelled.
    let subs: Vec<_> = (0..20)
        .map(|i| {
            let h = handle.clone();
            tokio::spawn(async move { h.submit(vec![pending("q", i)]).await })
        })
        .collect();
    tokio::task::yield_now().await;
    stop.cancel();
    let mut n_accepted = 0;
    for s in subs {
        match s.await.unwrap()[0] {
            Outcome::Accepted { .. } => n_accepted += 1,
            Outcome::Rejected(RejectCode::Unavailable) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    task.await.unwrap();
    assert_eq!(
        journal.durable_through(),
        n_accepted,
        "every accepted punch is flushed"
    );
    assert_eq!(journal.next_seq(), n_accepted + 1);
}
