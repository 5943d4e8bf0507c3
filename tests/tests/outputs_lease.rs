//! The output lease on a private PostgreSQL: two store objects (as two relays) ask for
//! one output's lease; only one holds it, a stale holder cannot write the output's state,
//! and when the holder stops renewing (dies) the other takes over within the lease
//! timeout. Then the same with two output workers and a fake sink: the holder is killed
//! during a delivery and the other relay delivers every punch.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_relay::metrics::Metrics;
use outpost_relay::outputs::lease::Timing;
use outpost_relay::outputs::sink::{Delivery, Sink, SinkError};
use outpost_relay::outputs::supervisor::OutputSpec;
use outpost_relay::outputs::wake::NewPunches;
use outpost_relay::outputs::worker::Worker;
use outpost_relay::store::postgres::PgStore;
use outpost_relay::store::{BoxFuture, LeaseGrant, OutputState, OutputWrite, Store};
use outpost_tests::postgres::PgServer;
use outpost_tests::relay::{batch, punches, records};
use tokio_util::sync::CancellationToken;

async fn two_stores() -> (PgServer, Arc<dyn Store>, Arc<dyn Store>) {
    let pg = tokio::task::spawn_blocking(|| PgServer::start_with(false))
        .await
        .unwrap()
        .expect("a private PostgreSQL (apt-get install postgresql)");
    let a = PgStore::connect(&pg.url(), 4).await.unwrap();
    let b = PgStore::connect(&pg.url(), 4).await.unwrap();
    (pg, Arc::new(a), Arc::new(b))
}

fn write(holder: Option<&str>, expect_version: u64, cursor: u64) -> OutputWrite {
    OutputWrite {
        holder: holder.map(str::to_string),
        expect_version,
        state: OutputState {
            cursor: Some(cursor),
            ..OutputState::default()
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_at_a_time_and_expiry_hands_over() {
    let (_pg, a, b) = two_stores().await;
    let ttl = Duration::from_millis(1500);
    assert_eq!(
        a.output_lease("o", "relay-a", ttl).await.unwrap(),
        LeaseGrant::Held
    );
    assert_eq!(
        b.output_lease("o", "relay-b", ttl).await.unwrap(),
        LeaseGrant::Busy {
            holder: "relay-a".into()
        }
    );
    // A renewal keeps it; the other still cannot take it.
    assert_eq!(
        a.output_lease("o", "relay-a", ttl).await.unwrap(),
        LeaseGrant::Held
    );
    assert!(matches!(
        b.output_lease("o", "relay-b", ttl).await.unwrap(),
        LeaseGrant::Busy { .. }
    ));
    // Only the holder's writes land.
    let v = a.output_state("o").await.unwrap().version;
    assert!(b
        .output_write("o", write(Some("relay-b"), v, 5))
        .await
        .unwrap()
        .is_none());
    let s = a
        .output_write("o", write(Some("relay-a"), v, 5))
        .await
        .unwrap()
        .expect("the holder writes");
    assert_eq!((s.cursor, s.holder.as_deref()), (Some(5), Some("relay-a")));
    // A write over a stale version fails too.
    assert!(a
        .output_write("o", write(Some("relay-a"), v, 6))
        .await
        .unwrap()
        .is_none());

    // relay-a dies: no more renewals. relay-b asks every 50 ms.
    let died = Instant::now();
    loop {
        match b.output_lease("o", "relay-b", ttl).await.unwrap() {
            LeaseGrant::Held => break,
            LeaseGrant::Busy { holder } => assert_eq!(holder, "relay-a"),
            LeaseGrant::Always => panic!("PostgreSQL never grants Always"),
        }
        assert!(
            died.elapsed() < ttl + Duration::from_millis(500),
            "no takeover within the lease time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = died.elapsed();
    assert!(
        took >= Duration::from_millis(1000),
        "took over too early: {took:?}"
    );
    println!("took over {took:?} after the last renewal (lease {ttl:?})");
    // The stale holder can neither write nor take the lease back.
    let v = b.output_state("o").await.unwrap().version;
    assert!(a
        .output_write("o", write(Some("relay-a"), v, 1))
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        a.output_lease("o", "relay-a", ttl).await.unwrap(),
        LeaseGrant::Busy {
            holder: "relay-b".into()
        }
    );
    // A release hands over at once.
    b.output_release("o", "relay-b").await.unwrap();
    assert_eq!(
        a.output_lease("o", "relay-a", ttl).await.unwrap(),
        LeaseGrant::Held
    );
    // An admin write (no holder) needs only the version.
    let v = a.output_state("o").await.unwrap().version;
    assert!(b
        .output_write("o", write(None, v, 0))
        .await
        .unwrap()
        .is_some());
}

/// Records every attempt; the first `hang` attempts never answer.
struct FakeSink {
    log: Arc<Mutex<Vec<Delivery>>>,
    hang: usize,
}

impl Sink for FakeSink {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn deliver<'a>(&'a mut self, d: &'a Delivery) -> BoxFuture<'a, Result<(), SinkError>> {
        self.log.lock().unwrap().push(d.clone());
        let hang = self.hang > 0;
        self.hang = self.hang.saturating_sub(1);
        Box::pin(async move {
            if hang {
                std::future::pending::<()>().await;
            }
            Ok(())
        })
    }

    fn retry_delay(&self, _failures: u32) -> Duration {
        Duration::from_millis(50)
    }
}

fn worker(
    store: &Arc<dyn Store>,
    holder: &str,
    lease_timeout: Duration,
    hang: usize,
) -> (Worker, Arc<Mutex<Vec<Delivery>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let spec = OutputSpec {
        name: "payroll".into(),
        kind: "fake",
        events: vec![outpost_relay::outputs::config::EventKind::Punch],
        sites: vec![],
        batch_max: 25,
        disable_after: Duration::from_secs(3600),
    };
    let sink = FakeSink {
        log: log.clone(),
        hang,
    };
    let w = Worker::new(
        spec,
        Box::new(sink),
        store.clone(),
        Arc::new(Metrics::new()),
        holder.into(),
        Timing::new(lease_timeout),
        NewPunches::new(Duration::from_millis(20)),
    );
    (w, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_relay_takes_over_a_dead_holders_output_and_delivers_everything() {
    let (_pg, a, b) = two_stores().await;
    let all = punches(1..=100);
    a.commit(batch("gw-1", "HC001", 1, records(&all, 1)), 1000)
        .await
        .unwrap();
    let lease_timeout = Duration::from_secs(2);
    // relay-a gets the lease first and hangs in its first delivery.
    let (wa, log_a) = worker(&a, "relay-a", lease_timeout, 1);
    let task_a = tokio::spawn(wa.run(CancellationToken::new()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while log_a.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "relay-a never attempted a delivery"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (wb, log_b) = worker(&b, "relay-b", lease_timeout, 0);
    let cancel_b = CancellationToken::new();
    let task_b = tokio::spawn(wb.run(cancel_b.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        log_b.lock().unwrap().is_empty(),
        "relay-b must wait for the lease"
    );
    // relay-a is killed (no release, no more renewals).
    task_a.abort();
    let killed = Instant::now();
    let _ = task_a.await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut took_over = None;
    loop {
        let s = b.output_state("payroll").await.unwrap();
        if took_over.is_none() && !log_b.lock().unwrap().is_empty() {
            took_over = Some(killed.elapsed());
        }
        if s.cursor == Some(100) && s.in_flight.is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "not everything delivered: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took_over = took_over.expect("relay-b delivered");
    println!(
        "relay-b took over {took_over:?} after relay-a died (lease_timeout {lease_timeout:?})"
    );
    assert!(
        took_over <= lease_timeout + Duration::from_millis(300),
        "takeover took {took_over:?}"
    );
    let first_a = log_a.lock().unwrap()[0].clone();
    let log_b = log_b.lock().unwrap().clone();
    assert_eq!(log_b[0], first_a, "the dead holder's delivery, the same");
    let ids: Vec<String> = log_b
        .iter()
        .flat_map(|d| d.items.iter().map(|i| i.id.clone()))
        .collect();
    let want: Vec<String> = (1..=100u64)
        .map(|n| format!("HC001/dev-{}/{n}", n % 4))
        .collect();
    let mut got = ids.clone();
    got.sort_by_key(|id| id.rsplit('/').next().unwrap().parse::<u64>().unwrap());
    assert_eq!(ids, got, "in order");
    assert_eq!(ids, want, "every punch once");
    cancel_b.cancel();
    task_b.await.unwrap();
    // relay-b gave the lease up at shutdown: relay-a can take it at once.
    assert_eq!(
        a.output_lease("payroll", "relay-a", lease_timeout)
            .await
            .unwrap(),
        LeaseGrant::Held
    );
}
