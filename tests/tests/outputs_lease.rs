//! The output lease on a private PostgreSQL: two store objects (as two relays) ask for
//! one output's lease; only one holds it, a stale holder cannot write the output's state,
//! and when the holder stops renewing (dies) the other takes over once the lease has run
//! out. Then the same with two output workers and a fake sink: the holder is killed
//! during a delivery and the other relay delivers every punch.
//!
//! Timing, robust on a loaded machine and still able to fail:
//! - "not before the lease ran out" is checked against the lease itself: the database sets
//!   the expiry from its clock when it runs the holder's last renewal, so the takeover's
//!   answer cannot arrive before that renewal was *sent* plus the lease length (both
//!   clocks are this machine's; [`CLOCK_SLACK`] covers the realtime/monotonic difference);
//! - "the other relay waits" is checked after it has been told the lease is busy, twice
//!   ([`Watched`] records every lease answer), not after a sleep;
//! - "soon after it ran out" gets a generous bound ([`SCHEDULING_SLACK`]), and the measured
//!   figure is printed: the exact figure depends on how loaded the machine is.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_protocol::Batch;
use outpost_relay::metrics::Metrics;
use outpost_relay::outputs::lease::Timing;
use outpost_relay::outputs::sink::{Delivery, Sink, SinkError};
use outpost_relay::outputs::supervisor::OutputSpec;
use outpost_relay::outputs::wake::NewPunches;
use outpost_relay::outputs::worker::Worker;
use outpost_relay::store::postgres::PgStore;
use outpost_relay::store::{
    Backlog, BoxFuture, CommitOutcome, ConflictRow, GatewayInfo, HeldQuery, LeaseGrant, Notice,
    OutputState, OutputWrite, PunchPage, PunchQuery, RejectedRow, Store, StoreError, StreamQuery,
    StreamRow,
};
use outpost_tests::postgres::PgServer;
use outpost_tests::relay::{batch, punches, records};
use tokio_util::sync::CancellationToken;

/// How far the database's clock (realtime) and the test's (monotonic) may drift apart
/// over a few seconds.
const CLOCK_SLACK: Duration = Duration::from_millis(20);
/// On top of the design's bound, for a loaded machine (scheduling, PostgreSQL fsyncs).
const SCHEDULING_SLACK: Duration = Duration::from_secs(5);

/// One lease request, as [`Watched`] saw it.
#[derive(Debug, Clone)]
struct LeaseCall {
    holder: String,
    sent: Instant,
    answered: Instant,
    grant: LeaseGrant,
}

/// A store that passes everything through and records every answered lease request.
struct Watched {
    inner: Arc<dyn Store>,
    leases: Arc<Mutex<Vec<LeaseCall>>>,
}

/// `store`, watched; the second value is its lease log.
fn watched(store: Arc<dyn Store>) -> (Arc<dyn Store>, Arc<Mutex<Vec<LeaseCall>>>) {
    let leases = Arc::new(Mutex::new(Vec::new()));
    let w = Watched {
        inner: store,
        leases: leases.clone(),
    };
    (Arc::new(w), leases)
}

impl Store for Watched {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn commit(&self, b: Batch, now_ms: i64) -> BoxFuture<'_, Result<CommitOutcome, StoreError>> {
        self.inner.commit(b, now_ms)
    }
    fn punches(&self, q: PunchQuery) -> BoxFuture<'_, Result<PunchPage, StoreError>> {
        self.inner.punches(q)
    }
    fn gateways(&self) -> BoxFuture<'_, Result<Vec<GatewayInfo>, StoreError>> {
        self.inner.gateways()
    }
    fn conflicts(&self, q: HeldQuery) -> BoxFuture<'_, Result<Vec<ConflictRow>, StoreError>> {
        self.inner.conflicts(q)
    }
    fn rejected(&self, q: HeldQuery) -> BoxFuture<'_, Result<Vec<RejectedRow>, StoreError>> {
        self.inner.rejected(q)
    }
    fn stream(&self, q: StreamQuery) -> BoxFuture<'_, Result<Vec<StreamRow>, StoreError>> {
        self.inner.stream(q)
    }
    fn append_notice(&self, notice: Notice) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.inner.append_notice(notice)
    }
    fn head(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.inner.head()
    }
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.subscribe()
    }
    fn cursor_before(&self, before_ms: i64) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        self.inner.cursor_before(before_ms)
    }
    fn backlog<'a>(
        &'a self,
        after: Option<u64>,
        sites: &'a [String],
    ) -> BoxFuture<'a, Result<Backlog, StoreError>> {
        self.inner.backlog(after, sites)
    }
    fn output_state<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<OutputState, StoreError>> {
        self.inner.output_state(name)
    }
    fn output_write<'a>(
        &'a self,
        name: &'a str,
        write: OutputWrite,
    ) -> BoxFuture<'a, Result<Option<OutputState>, StoreError>> {
        self.inner.output_write(name, write)
    }
    fn output_lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<LeaseGrant, StoreError>> {
        Box::pin(async move {
            let sent = Instant::now();
            let answer = self.inner.output_lease(name, holder, ttl).await;
            if let Ok(grant) = &answer {
                self.leases.lock().unwrap().push(LeaseCall {
                    holder: holder.to_string(),
                    sent,
                    answered: Instant::now(),
                    grant: grant.clone(),
                });
            }
            answer
        })
    }
    fn output_release<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.output_release(name, holder)
    }
    fn ready(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.ready()
    }
    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.close()
    }
}

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
    // A renewal keeps it (the last one relay-a sends); the other still cannot take it.
    let renewed = Instant::now();
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
    loop {
        match b.output_lease("o", "relay-b", ttl).await.unwrap() {
            LeaseGrant::Held => break,
            LeaseGrant::Busy { holder } => assert_eq!(holder, "relay-a"),
            LeaseGrant::Always => panic!("PostgreSQL never grants Always"),
        }
        assert!(
            renewed.elapsed() < ttl + SCHEDULING_SLACK,
            "no takeover within {:?} of the last renewal",
            ttl + SCHEDULING_SLACK
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = renewed.elapsed();
    assert!(
        took + CLOCK_SLACK >= ttl,
        "took over {took:?} after the last renewal was sent, before its lease ({ttl:?}) ran out"
    );
    println!("took over {took:?} after the last renewal was sent (lease {ttl:?})");
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
    let (a, leases_a) = watched(a);
    let (b, leases_b) = watched(b);
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
    // relay-b waits: once it has been told twice that relay-a holds the lease, it has
    // delivered nothing (a worker that ignored the answer would have by its second ask).
    let busy = LeaseGrant::Busy {
        holder: "relay-a".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answers: Vec<LeaseGrant> = leases_b
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.grant.clone())
            .collect();
        assert!(
            answers.iter().all(|g| *g == busy),
            "relay-b was answered {answers:?} while relay-a was alive and renewing"
        );
        if answers.len() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay-b never asked for the lease"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        log_b.lock().unwrap().is_empty(),
        "relay-b delivered without the lease"
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
    // relay-b's lease came no earlier than relay-a's last renewal allowed.
    let length = Timing::new(lease_timeout).length;
    let last_renewal = leases_a
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.holder == "relay-a" && c.grant == LeaseGrant::Held)
        .map(|c| c.sent)
        .max()
        .expect("relay-a held the lease");
    let granted = leases_b
        .lock()
        .unwrap()
        .iter()
        .find(|c| c.grant == LeaseGrant::Held)
        .map(|c| c.answered)
        .expect("relay-b was granted the lease");
    println!(
        "relay-b took over {took_over:?} after relay-a died, its lease granted {:?} after \
         relay-a's last renewal was sent (lease_timeout {lease_timeout:?}, lease {length:?})",
        granted - last_renewal
    );
    assert!(
        granted + CLOCK_SLACK >= last_renewal + length,
        "relay-b got the lease {:?} after relay-a's last renewal, before it ran out",
        granted - last_renewal
    );
    assert!(
        took_over <= lease_timeout + SCHEDULING_SLACK,
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
