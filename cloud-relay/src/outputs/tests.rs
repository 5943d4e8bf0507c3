//! The output worker against a fake sink and a sled store in a temp dir: delivery order,
//! identical retries, a crash during an attempt, replay, disabling, and the sites filter.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_protocol::{
    Batch, BootId, Id, Punch, PunchKind, Received, Record, Source, TimeAnchor, VerifyMethod,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::config::EventKind;
use super::control::{self, ReplayFrom};
use super::lease::Timing;
use super::sink::{Delivery, Sink, SinkError};
use super::supervisor::OutputSpec;
use super::wake::NewPunches;
use super::worker::Worker;
use crate::metrics::{Metrics, OutputLabel};
use crate::store::sled::SledStore;
use crate::store::{BoxFuture, OutputState, Store};

/// What the fake sink answers to one attempt.
#[derive(Debug, Clone)]
enum Step {
    Ok,
    Retry(Option<Duration>),
    Gone,
    /// Never answers (the relay dies during the attempt).
    Hang,
}

/// Records every attempt; answers from its script, then `then`.
struct FakeSink {
    log: Arc<Mutex<Vec<Delivery>>>,
    script: VecDeque<Step>,
    then: Step,
}

impl Sink for FakeSink {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn deliver<'a>(&'a mut self, d: &'a Delivery) -> BoxFuture<'a, Result<(), SinkError>> {
        self.log.lock().unwrap().push(d.clone());
        let step = self.script.pop_front().unwrap_or_else(|| self.then.clone());
        Box::pin(async move {
            match step {
                Step::Ok => Ok(()),
                Step::Retry(retry_after) => Err(SinkError::Retry {
                    reason: "503 from the fake".into(),
                    retry_after,
                }),
                Step::Gone => Err(SinkError::Gone {
                    reason: "410 from the fake".into(),
                }),
                Step::Hang => std::future::pending().await,
            }
        })
    }

    fn retry_delay(&self, _failures: u32) -> Duration {
        Duration::from_millis(20)
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
}

fn spec(sites: &[&str], batch_max: usize) -> OutputSpec {
    OutputSpec {
        name: "out".into(),
        kind: "fake",
        events: vec![EventKind::Punch],
        sites: sites.iter().map(|s| s.to_string()).collect(),
        batch_max,
        disable_after: Duration::from_secs(3600),
    }
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("store"), 1 << 20).unwrap();
        Harness {
            _dir: dir,
            store: Arc::new(store),
            metrics: Arc::new(Metrics::new()),
            cancel: CancellationToken::new(),
        }
    }

    /// Starts a worker for `spec` with a fake sink; returns its task and attempt log.
    fn start(
        &self,
        spec: OutputSpec,
        script: Vec<Step>,
        then: Step,
    ) -> (JoinHandle<()>, Arc<Mutex<Vec<Delivery>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = FakeSink {
            log: log.clone(),
            script: script.into(),
            then,
        };
        let worker = Worker::new(
            spec,
            Box::new(sink),
            self.store.clone(),
            self.metrics.clone(),
            "test-relay".into(),
            Timing::new(Duration::from_secs(15)),
            NewPunches::new(Duration::from_millis(10)),
        );
        (tokio::spawn(worker.run(self.cancel.clone())), log)
    }

    /// Commits records `seqs` of gateway `gw` at `site` (device `dev-<gw>`), stored at
    /// `now_ms`; `synced` = false leaves the corrected time unknown (boot [9; 16]).
    async fn commit(
        &self,
        gw: &str,
        site: &str,
        seqs: std::ops::RangeInclusive<u64>,
        now_ms: i64,
        synced: bool,
        anchors: Vec<TimeAnchor>,
    ) {
        let records = seqs
            .map(|n| Record {
                punch: Punch {
                    device_id: Id::new(&format!("dev-{gw}")).unwrap(),
                    device_seq: n,
                    subject_id: Id::new("EMP-1").unwrap(),
                    kind: PunchKind::In,
                    verify: VerifyMethod::Card,
                    device_time_ms: 1_795_327_200_000 + n as i64 * 60_000,
                    utc_offset_min: Some(60),
                },
                gateway_seq: n,
                received: Received {
                    boot_id: BootId([9; 16]),
                    mono_ms: 1000 + n,
                    wall_ms: 1_795_327_200_000 + n as i64 * 60_000,
                    clock_synced: synced,
                },
                source: Source::Mqtt,
            })
            .collect();
        let b = Batch {
            gateway_id: Id::new(gw).unwrap(),
            site_id: Id::new(site).unwrap(),
            journal_epoch: 1,
            records,
            anchors,
        };
        self.store.commit(b, now_ms).await.unwrap();
    }

    async fn state(&self) -> OutputState {
        self.store.output_state("out").await.unwrap()
    }

    /// Waits (at most 10 s) until the output's state satisfies `f`.
    async fn wait_state(&self, what: &str, f: impl Fn(&OutputState) -> bool) -> OutputState {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.state().await;
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn counter(
        &self,
        family: &prometheus_client::metrics::family::Family<
            OutputLabel,
            prometheus_client::metrics::counter::Counter,
        >,
    ) -> u64 {
        family
            .get_or_create(&OutputLabel {
                output: "out".into(),
            })
            .get()
    }
}

/// Item ids of every attempt, in order.
fn item_ids(log: &[Delivery]) -> Vec<String> {
    log.iter()
        .flat_map(|d| d.items.iter().map(|i| i.id.clone()))
        .collect()
}

async fn wait_log(log: &Arc<Mutex<Vec<Delivery>>>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while log.lock().unwrap().len() < n {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} attempts"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_punch_is_delivered_once_in_cursor_order() {
    let h = Harness::new();
    h.commit("gw-a", "HC001", 1..=10, 1000, true, vec![]).await;
    h.commit("gw-b", "HC001", 1..=10, 1000, true, vec![]).await;
    let (task, log) = h.start(spec(&[], 7), vec![], Step::Ok);
    h.wait_state("20 delivered", |s| s.cursor == Some(19)).await;
    // Punches stored while the worker runs are delivered too.
    h.commit("gw-a", "HC001", 11..=15, 1000, true, vec![]).await;
    let s = h.wait_state("25 delivered", |s| s.cursor == Some(24)).await;
    assert!(s.in_flight.is_none() && s.failures == 0 && s.last_success_ms.is_some());
    let log = log.lock().unwrap().clone();
    let cursors: Vec<u64> = log
        .iter()
        .flat_map(|d| d.items.iter().map(|i| i.cursor))
        .collect();
    assert_eq!(cursors, (0..25).collect::<Vec<_>>(), "each once, in order");
    assert!(log
        .iter()
        .all(|d| !d.items.is_empty() && d.items.len() <= 7));
    assert_eq!(log[0].id, "msg_out_0_6");
    let ids: std::collections::BTreeSet<_> = item_ids(&log).into_iter().collect();
    assert_eq!(ids.len(), 25);
    let first = &log[0].items[0];
    assert_eq!(first.id, "HC001/dev-gw-a/1");
    assert_eq!(first.json["id"], "HC001/dev-gw-a/1");
    assert_eq!(first.json["cursor"], "0");
    assert_eq!(first.json["site"], "HC001");
    assert_eq!(h.counter(&h.metrics.output_punches), 25);
    assert_eq!(h.counter(&h.metrics.output_deliveries), log.len() as u64);
    h.cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_sends_the_identical_delivery() {
    let h = Harness::new();
    h.commit("gw-a", "HC001", 1..=5, 1000, true, vec![]).await;
    let script = vec![
        Step::Retry(Some(Duration::from_millis(30))),
        Step::Retry(None),
    ];
    let (task, log) = h.start(spec(&[], 100), script, Step::Ok);
    let s = h.wait_state("delivered", |s| s.cursor == Some(4)).await;
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 3, "two failures, then the success");
    assert_eq!(log[0], log[1], "same id, created_ms and items");
    assert_eq!(log[1], log[2]);
    assert_eq!(
        (s.failures, s.last_error, s.failing_since_ms),
        (0, None, None)
    );
    assert_eq!(
        h.metrics
            .output_failures
            .get_or_create(&crate::metrics::OutputKind {
                output: "out".into(),
                kind: "retry"
            })
            .get(),
        2
    );
    h.cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_an_attempt_resends_the_same_delivery_and_loses_nothing() {
    let h = Harness::new();
    // Received without a synchronised clock: corrected time unknown until an anchor.
    h.commit("gw-a", "HC001", 1..=4, 1000, false, vec![]).await;
    let (task, log) = h.start(spec(&[], 100), vec![Step::Hang], Step::Ok);
    wait_log(&log, 1).await;
    let s = h.state().await;
    let f = s
        .in_flight
        .clone()
        .expect("recorded before the first attempt");
    assert_eq!((f.through, f.items, f.uncorrected.len()), (3, 4, 4));
    // The relay dies during the attempt.
    task.abort();
    let _ = task.await;
    // Meanwhile an anchor of that boot arrives: the stored punches get a corrected time,
    // and two more punches are stored.
    let anchor = TimeAnchor {
        boot_id: BootId([9; 16]),
        mono_ms: 1000,
        true_ms: 1_795_327_000_000,
        uncertainty_ms: 10,
    };
    h.commit("gw-a", "HC001", 5..=6, 2000, true, vec![anchor])
        .await;
    let rows = h
        .store
        .punches(crate::store::PunchQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        rows.items[0].corrected_ms.is_some(),
        "the anchor corrected it"
    );
    let first = log.lock().unwrap()[0].clone();
    let (task, log2) = h.start(spec(&[], 100), vec![], Step::Ok);
    h.wait_state("everything delivered", |s| s.cursor == Some(5))
        .await;
    let log2 = log2.lock().unwrap().clone();
    assert_eq!(
        log2[0], first,
        "the same delivery, byte for byte the same JSON"
    );
    assert_eq!(
        first.items[0].json["corrected_time"],
        serde_json::Value::Null
    );
    assert_eq!(
        item_ids(&log2),
        (1..=6)
            .map(|n| format!("HC001/dev-gw-a/{n}"))
            .collect::<Vec<_>>()
    );
    h.cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_delivers_again_from_a_cursor_or_a_time() {
    let h = Harness::new();
    h.commit("gw-a", "HC001", 1..=5, 1_000, true, vec![]).await;
    h.commit("gw-a", "HC001", 6..=8, 5_000, true, vec![]).await;
    let (task, log) = h.start(spec(&[], 100), vec![], Step::Ok);
    h.wait_state("delivered", |s| s.cursor == Some(7)).await;
    control::replay(&*h.store, "out", ReplayFrom::Cursor(0))
        .await
        .unwrap();
    h.wait_state("replayed", |s| s.cursor == Some(7) && s.replays == 1)
        .await;
    wait_log(&log, 2).await;
    control::replay(&*h.store, "out", ReplayFrom::Time(3_000))
        .await
        .unwrap();
    h.wait_state("replayed by time", |s| {
        s.cursor == Some(7) && s.replays == 2
    })
    .await;
    wait_log(&log, 3).await;
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 3);
    assert_eq!(log[0].items, log[1].items, "the same punches, the same ids");
    assert_ne!(log[0].id, log[1].id, "a replay is a new delivery");
    assert_eq!(log[1].id, "msg_out_0_7_r1");
    assert_eq!(log[2].id, "msg_out_5_7_r2");
    assert_eq!(
        log[2].items.len(),
        3,
        "only punches stored at or after the time"
    );
    let e = control::replay(&*h.store, "out", ReplayFrom::Cursor(9))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("after the newest"), "{e}");
    h.cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_at_once_and_enable_resends_the_same_delivery() {
    let h = Harness::new();
    h.commit("gw-a", "HC001", 1..=3, 1000, true, vec![]).await;
    let (task, log) = h.start(spec(&[], 100), vec![Step::Gone], Step::Ok);
    let s = h.wait_state("disabled", |s| s.disabled.is_some()).await;
    assert!(s.disabled.unwrap().reason.contains("410 from the fake"));
    assert_eq!(h.counter(&h.metrics.output_disables), 1);
    assert_eq!(s.cursor, None);
    // Disabled: no further attempt.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(log.lock().unwrap().len(), 1);
    control::enable(&*h.store, "out").await.unwrap();
    // The output's own disabled/enabled notices follow its punches: skipped, not sent.
    h.wait_state("delivered after enable", |s| s.cursor >= Some(2))
        .await;
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0], log[1]);
    h.cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_for_disable_after_disables() {
    let h = Harness::new();
    h.commit("gw-a", "HC001", 1..=3, 1000, true, vec![]).await;
    let mut sp = spec(&[], 100);
    sp.disable_after = Duration::from_millis(300);
    let (task, log) = h.start(sp, vec![], Step::Retry(None));
    let s = h.wait_state("disabled", |s| s.disabled.is_some()).await;
    let reason = s.disabled.unwrap().reason;
    assert!(reason.contains("failing continuously"), "{reason}");
    assert!(log.lock().unwrap().len() > 2, "retried before giving up");
    assert!(s.failing_since_ms.is_some() && s.last_error.is_some());
    assert_eq!(h.counter(&h.metrics.output_disables), 1);
    h.cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn punches_of_other_sites_advance_the_cursor() {
    let h = Harness::new();
    h.commit("gw-a", "HC001", 1..=5, 1000, true, vec![]).await;
    h.commit("gw-b", "HC002", 1..=5, 1000, true, vec![]).await;
    h.commit("gw-a", "HC001", 6..=10, 1000, true, vec![]).await;
    let sp = spec(&["HC002"], 5);
    let (task, log) = h.start(sp.clone(), vec![], Step::Ok);
    h.wait_state("past every site", |s| s.cursor == Some(14))
        .await;
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "reads without an HC002 punch deliver nothing");
    assert!(log[0].items.iter().all(|i| i.site == "HC002"));
    assert_eq!(log[0].items.len(), 5);
    let st = control::status(&*h.store, &sp).await.unwrap();
    assert_eq!(st.backlog.records, 0);
    h.cancel.cancel();
    task.await.unwrap();
    // The lag counts only the output's sites.
    h.commit("gw-a", "HC001", 11..=12, 1000, true, vec![]).await;
    h.commit("gw-b", "HC002", 6..=6, 7000, true, vec![]).await;
    let st = control::status(&*h.store, &sp).await.unwrap();
    assert_eq!(
        (st.backlog.records, st.backlog.oldest_stored_ms),
        (1, Some(7000))
    );
    assert_eq!(st.to_json(8000)["lag"], 1);
    assert_eq!(st.to_json(8000)["state"], "active");
}

impl Harness {
    /// Commits `records` as one batch of gateway `gw` at `site`.
    async fn commit_records(&self, gw: &str, site: &str, records: Vec<Record>) {
        let b = Batch {
            gateway_id: Id::new(gw).unwrap(),
            site_id: Id::new(site).unwrap(),
            journal_epoch: 1,
            records,
            anchors: vec![],
        };
        self.store.commit(b, 1000).await.unwrap();
    }
}

/// A record of `device`/`device_seq` for `subject` under `gateway_seq`.
fn rec(device: &str, device_seq: u64, subject: &str, gateway_seq: u64) -> Record {
    Record {
        punch: Punch {
            device_id: Id::new(device).unwrap(),
            device_seq,
            subject_id: Id::new(subject).unwrap(),
            kind: PunchKind::In,
            verify: VerifyMethod::Card,
            device_time_ms: 1_795_327_200_000 + device_seq as i64 * 60_000,
            utc_offset_min: Some(60),
        },
        gateway_seq,
        received: Received {
            boot_id: BootId([9; 16]),
            mono_ms: 1000 + gateway_seq,
            wall_ms: 1_795_327_200_000,
            clock_synced: true,
        },
        source: Source::Mqtt,
    }
}

/// Punches 0–2, then (one batch) conflicts 3–4 and a rejected record 5, then punches 6–7.
async fn mixed(h: &Harness) {
    h.commit("gw-a", "HC001", 1..=3, 1000, true, vec![]).await;
    let mut bad = rec("dev-x", 9, "EMP-1", 3);
    bad.punch.utc_offset_min = Some(i16::MAX);
    h.commit_records(
        "gw-b",
        "HC001",
        vec![
            rec("dev-gw-a", 1, "EMP-OTHER", 1),
            rec("dev-gw-a", 2, "EMP-OTHER", 2),
            bad,
        ],
    )
    .await;
    h.commit("gw-a", "HC001", 4..=5, 1000, true, vec![]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_is_delivered_in_runs_of_one_kind_in_cursor_order() {
    let h = Harness::new();
    mixed(&h).await;
    let mut sp = spec(&[], 100);
    sp.events = vec![EventKind::Punch, EventKind::Conflict, EventKind::Rejected];
    let (task, log) = h.start(sp, vec![], Step::Ok);
    h.wait_state("all delivered", |s| s.cursor == Some(7)).await;
    let log = log.lock().unwrap().clone();
    let runs: Vec<(EventKind, Vec<u64>)> = log
        .iter()
        .map(|d| (d.kind, d.items.iter().map(|i| i.cursor).collect()))
        .collect();
    assert_eq!(
        runs,
        vec![
            (EventKind::Punch, vec![0, 1, 2]),
            (EventKind::Conflict, vec![3, 4]),
            (EventKind::Rejected, vec![5]),
            (EventKind::Punch, vec![6, 7]),
        ]
    );
    assert_eq!(
        item_ids(&log)[3..6],
        [
            "conflict/HC001/dev-gw-a/1/gw-b/1/1",
            "conflict/HC001/dev-gw-a/2/gw-b/1/2",
            "rejected/gw-b/1/3",
        ]
    );
    let c = &log[1].items[0].json;
    assert_eq!(c["subject"], "EMP-OTHER");
    assert_eq!(c["kept_cursor"], "0");
    assert_eq!(c["cursor"], "3");
    assert!(log[2].items[0].json["reason"].as_str().is_some());
    assert_eq!(log[1].id, "msg_out_3_4");
    h.cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_of_punches_skips_the_other_kinds() {
    let h = Harness::new();
    mixed(&h).await;
    let (task, log) = h.start(spec(&[], 100), vec![], Step::Ok);
    h.wait_state("all read", |s| s.cursor == Some(7)).await;
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "the skipped kinds do not split the run");
    assert_eq!(log[0].kind, EventKind::Punch);
    let cursors: Vec<u64> = log[0].items.iter().map(|i| i.cursor).collect();
    assert_eq!(cursors, [0, 1, 2, 6, 7]);
    h.cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_output_is_announced_once_to_the_others() {
    let h = Harness::new();
    h.commit("gw-a", "HC001", 1..=2, 1000, true, vec![]).await;
    // "out" is gone at its first attempt.
    let (task, _) = h.start(spec(&[], 100), vec![Step::Gone], Step::Ok);
    let s = h.wait_state("disabled", |s| s.disabled.is_some()).await;
    let at = s.disabled.as_ref().map(|d| d.at_ms).unwrap();
    // A second worker of "out" (a restart) finds it disabled too: no second notice.
    let again = CancellationToken::new();
    let restarted = tokio::spawn(
        Worker::new(
            spec(&[], 100),
            Box::new(FakeSink {
                log: Arc::new(Mutex::new(Vec::new())),
                script: VecDeque::new(),
                then: Step::Ok,
            }),
            h.store.clone(),
            h.metrics.clone(),
            "test-relay".into(),
            Timing::new(Duration::from_secs(15)),
            NewPunches::new(Duration::from_millis(10)),
        )
        .run(again.clone()),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    again.cancel();
    restarted.await.unwrap();
    // "ops" wants gateway events only.
    let mut ops = spec(&[], 100);
    ops.name = "ops".into();
    ops.events = vec![EventKind::Gateway];
    let (ops_task, ops_log) = h.start(ops, vec![], Step::Ok);
    wait_log(&ops_log, 1).await;
    control::enable(&*h.store, "out").await.unwrap();
    wait_log(&ops_log, 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = ops_log.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(log
        .iter()
        .all(|d| d.kind == EventKind::Gateway && d.items.len() == 1));
    let (d, e) = (&log[0].items[0], &log[1].items[0]);
    assert_eq!(d.id, format!("relay/output.disabled/out/{at}"));
    assert_eq!(d.json["kind"], "output.disabled");
    assert_eq!(d.json["output"], "out");
    assert!(d.json["reason"]
        .as_str()
        .unwrap()
        .contains("410 from the fake"));
    assert_eq!(e.json["kind"], "output.enabled");
    assert_eq!(d.site, "_relay");
    // "out" itself is not sent its own notices: it delivers its punches and moves on.
    h.wait_state("out past its notices", |s| s.cursor == Some(e.cursor))
        .await;
    h.cancel.cancel();
    task.await.unwrap();
    ops_task.await.unwrap();
}
