//! The committer: group commit in front of the journal.
//!
//! Ingest tasks send `(punches, reply)` requests over a bounded channel. The committer task
//! takes the first waiting request, then drains every other request already queued (up to
//! [`MAX_GROUP_PUNCHES`] punches), writes them all in one journal batch, and answers each
//! caller only after an fsync that started after that write has returned. No caller hears
//! "accepted" (or "duplicate") before its record is on disk: throughput comes from grouping
//! and from pipelining (the next groups are written while an fsync is in flight, and the
//! next fsync covers them all), never from skipping the fsync.
//!
//! - The journal's write (sled, synchronous, may also reopen after an I/O error) runs on
//!   tokio's blocking pool so it never stalls the async workers serving HTTP.
//! - If the append fails, or the fsync fails, **every** punch in the group is answered
//!   `Rejected` (`storage_full` for a full disk, else `internal`); none is `Accepted`.
//!   The journal reopens itself at the next write, so the committer keeps going.
//! - On shutdown the channel is closed (new submitters get `Rejected(Unavailable)`), the
//!   requests already queued are committed and answered, the journal is flushed once more,
//!   and the task returns.

use std::time::Instant;

use outpost_protocol::RejectCode;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use crate::journal::{Journal, Outcome, Pending};
use crate::metrics::Metrics;

/// Most punches written in one group commit (a single larger request is still one group).
pub const MAX_GROUP_PUNCHES: usize = 4096;

/// Requests that may wait in the committer's queue before submitters wait for room.
pub const QUEUE_DEPTH: usize = 1024;

/// One group-commit request.
pub(crate) struct Request {
    pub(crate) items: Vec<Pending>,
    pub(crate) reply: oneshot::Sender<Vec<Outcome>>,
}

/// A cloneable handle for submitting punches to the committer.
#[derive(Clone)]
pub struct CommitterHandle {
    pub(crate) tx: mpsc::Sender<Request>,
}

impl CommitterHandle {
    /// Submits punches and waits until each is durably stored or refused. The result has
    /// one outcome per item, in order. If the committer has stopped (shutdown), every item
    /// is `Rejected(Unavailable)`.
    pub async fn submit(&self, items: Vec<Pending>) -> Vec<Outcome> {
        let n = items.len();
        let unavailable = || vec![Outcome::Rejected(RejectCode::Unavailable); n];
        if n == 0 {
            return Vec::new();
        }
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Request { items, reply }).await.is_err() {
            return unavailable();
        }
        rx.await.unwrap_or_else(|_| unavailable())
    }
}

impl CommitterHandle {
    /// `true` once the committer has stopped taking requests (shutdown).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Starts the committer task. It runs until `shutdown` is cancelled (or every handle is
/// dropped), then commits what is queued, flushes and returns.
pub fn spawn(
    journal: Journal,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> (CommitterHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let task = tokio::spawn(run(journal, metrics, shutdown, rx));
    (CommitterHandle { tx }, task)
}

/// A group that has been written to the journal and waits for a flush to cover it.
struct Appended {
    group: Vec<Request>,
    /// Per-punch outcomes, valid only once a flush that started after the append succeeds.
    outcomes: Vec<Outcome>,
    started: Instant,
}

type FlushTask = JoinHandle<Result<(), crate::journal::JournalError>>;

/// The pipeline: while one fsync is in flight, the next groups are already appended, and
/// the next fsync covers all of them. A group is answered only after a flush that *started
/// after its append* has returned, so even a `Duplicate` (whose original may sit in the
/// flush still in flight) is never told before the original is on disk.
async fn run(
    journal: Journal,
    metrics: Metrics,
    shutdown: CancellationToken,
    mut rx: mpsc::Receiver<Request>,
) {
    let mut c = Committer {
        last_evicted: journal.stats().evicted,
        journal,
        metrics,
    };
    c.update_gauges();
    let mut waiting: Vec<Appended> = Vec::new();
    let mut in_flight: Option<(FlushTask, Vec<Appended>)> = None;
    let mut rx_done = false;
    let mut closing = false;
    let mut drained = 0usize;
    loop {
        if in_flight.is_none() && !waiting.is_empty() {
            // `flush()` fixes what it covers now, before any later append can run.
            let task = tokio::spawn(c.journal.flush());
            in_flight = Some((task, std::mem::take(&mut waiting)));
        }
        if rx_done && in_flight.is_none() && waiting.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            flushed = async {
                match in_flight.as_mut() {
                    Some((task, _)) => task.await,
                    None => std::future::pending().await,
                }
            } => {
                let groups = in_flight.take().map(|(_, g)| g).unwrap_or_default();
                let result = match flushed {
                    Ok(r) => r.map_err(|e| e.reject_code()),
                    Err(_) => Err(RejectCode::Internal),
                };
                for a in groups {
                    c.answer(a, result);
                }
                c.update_gauges();
            }
            _ = shutdown.cancelled(), if !closing => {
                // Stop taking new requests, but answer every one already queued.
                closing = true;
                rx.close();
            }
            r = rx.recv(), if !rx_done => match r {
                Some(first) => {
                    let group = gather(first, &mut rx);
                    if closing {
                        drained += group.len();
                    }
                    if let Some(a) = c.append(group).await {
                        waiting.push(a);
                    }
                }
                None => rx_done = true,
            },
        }
    }
    if let Err(e) = c.journal.flush().await {
        error!(error = %e, "final journal flush at shutdown failed");
    }
    info!(drained_requests = drained, "committer stopped");
}

/// Takes `first` plus whatever else is already queued, up to [`MAX_GROUP_PUNCHES`].
fn gather(first: Request, rx: &mut mpsc::Receiver<Request>) -> Vec<Request> {
    let mut punches = first.items.len();
    let mut group = vec![first];
    while punches < MAX_GROUP_PUNCHES {
        match rx.try_recv() {
            Ok(r) => {
                punches += r.items.len();
                group.push(r);
            }
            Err(_) => break,
        }
    }
    group
}

struct Committer {
    journal: Journal,
    metrics: Metrics,
    last_evicted: u64,
}

impl Committer {
    /// Writes the group (no fsync). A failed write is answered at once with the rejection;
    /// otherwise the group waits for the next flush.
    async fn append(&mut self, group: Vec<Request>) -> Option<Appended> {
        let started = Instant::now();
        let items: Vec<Pending> = group.iter().flat_map(|r| r.items.iter().copied()).collect();
        let n = items.len();
        let journal = self.journal.clone();
        let appended = tokio::task::spawn_blocking(move || journal.append(&items)).await;
        let code = match appended {
            Ok(Ok(outcomes)) => {
                return Some(Appended {
                    group,
                    outcomes,
                    started,
                })
            }
            Ok(Err(e)) => {
                error!(error = %e, punches = n, "journal write failed; refusing the whole group");
                self.metrics.journal_io_errors.inc();
                e.reject_code()
            }
            Err(e) => {
                error!(error = %e, punches = n, "journal write task failed; refusing the whole group");
                RejectCode::Internal
            }
        };
        self.answer(
            Appended {
                outcomes: vec![Outcome::Rejected(code); n],
                group,
                started,
            },
            Ok(()),
        );
        None
    }

    /// Replies to every request of a group once its covering flush has returned. If the
    /// flush failed, every punch of the group is rejected: none may be called stored.
    fn answer(&mut self, a: Appended, flushed: Result<(), RejectCode>) {
        let n = a.outcomes.len();
        let outcomes = match flushed {
            Ok(()) => a.outcomes,
            Err(code) => {
                error!(
                    punches = n,
                    reason = code.as_str(),
                    "journal fsync failed; refusing the whole group"
                );
                self.metrics.journal_io_errors.inc();
                vec![Outcome::Rejected(code); n]
            }
        };
        self.metrics
            .commit_seconds
            .observe(a.started.elapsed().as_secs_f64());
        self.metrics.commit_group_size.observe(n as f64);
        debug!(punches = n, requests = a.group.len(), "group committed");
        let mut rest = outcomes.into_iter();
        for req in a.group {
            let mine: Vec<Outcome> = rest.by_ref().take(req.items.len()).collect();
            // A caller that gave up (connection closed) just doesn't hear the answer.
            let _ = req.reply.send(mine);
        }
    }

    fn update_gauges(&mut self) {
        let s = self.journal.stats();
        self.metrics.journal_records.set(s.records as i64);
        self.metrics.journal_bytes.set(s.bytes as i64);
        self.metrics.journal_dedup_keys.set(s.dedup_keys as i64);
        if s.evicted > self.last_evicted {
            self.metrics
                .journal_evicted
                .inc_by(s.evicted - self.last_evicted);
        }
        self.last_evicted = s.evicted;
    }
}
