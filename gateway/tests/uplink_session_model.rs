//! Model test of the uplink [`Session`]: random appends, `drop_oldest` evictions, reads that
//! finish late, relay progress, acks (honest, stale, and spurious ones with nothing in
//! flight), lost links, ticks past the timeouts, a trimmer that runs behind, and restarts
//! (a new session from what the journal persisted), against a simple journal and relay.
//!
//! The driver plays the task that owns the link: after every operation it performs what
//! the session asks (read, send) until the session has nothing more to do *now*, exactly
//! as the real loop does before it sleeps. Checked after every step:
//!
//! - **Trim safety**: a trim point never passes a record the relay does not store.
//! - **Nothing skipped**: every record the journal still holds below the session's read
//!   position (and below the batch it sends) was sent on this connection, or is at or
//!   below the trim point and stored at the relay. So a new connection resends everything
//!   unacknowledged, and batches go out in order.
//! - **Window**: never more than `uplink.window` batches in flight, and the session's
//!   count matches what is really on the wire.
//! - **No lost wake-up**: after the driver settles, the session's wake time is in the
//!   future (or there is none), so the real loop neither spins nor sleeps through work.
//! - **Liveness**: at the end, with a healthy link, everything durable and not evicted
//!   reaches the relay and is trimmed from the journal.
//!
//! Acks arrive in send order, as every link guarantees. A duplicate ack while another
//! batch is in flight would break that contract (the session pairs acks by position), so
//! duplicates are only delivered with nothing in flight, where the session must refuse it.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_gateway::uplink::batcher::{BatchHeader, Prepared};
use outpost_gateway::uplink::session::{AckNext, Prepare, Session, TickAction};
use outpost_gateway::uplink::{LinkError, UplinkConfig};
use outpost_protocol::{Ack, Id};
use proptest::prelude::*;

const EPOCH: u64 = 42;
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
enum Op {
    /// New records; durable at once or only assigned (fsync pending).
    Append { n: u8, durable: bool },
    /// The fsync catches up.
    Flush,
    /// `drop_oldest` evicts the oldest `k` records still held.
    Evict(u8),
    /// The blocking read in progress finishes (against the journal as it is now).
    ReadDone,
    /// The relay stores the oldest batch on the wire and queues its ack.
    Relay,
    /// The oldest queued ack arrives, its watermark lowered by `stale` (still honest).
    Ack { stale: u8 },
    /// An ack arrives with nothing in flight (a duplicate).
    SpuriousAck,
    /// Time passes and the session's tick runs.
    Tick(u16),
    /// The relay answers the ping.
    Pong,
    /// A much better time anchor exists that the relay has not heard of.
    Untold,
    /// The connection breaks (batches and acks on the wire are lost).
    LinkLost,
    /// A new connection (when there is none).
    Connect,
    /// The background trimmer applies the latest trim point.
    Trimmer,
    /// The gateway restarts: a new session from the journal as persisted.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..12, any::<bool>()).prop_map(|(n, durable)| Op::Append { n, durable }),
        2 => Just(Op::Flush),
        2 => (1u8..6).prop_map(Op::Evict),
        5 => Just(Op::ReadDone),
        6 => Just(Op::Relay),
        6 => (0u8..4).prop_map(|s| Op::Ack { stale: s.saturating_sub(2) * 3 }),
        1 => Just(Op::SpuriousAck),
        4 => (1u16..3000).prop_map(Op::Tick),
        2 => Just(Op::Pong),
        1 => Just(Op::Untold),
        2 => Just(Op::LinkLost),
        3 => Just(Op::Connect),
        3 => Just(Op::Trimmer),
        1 => Just(Op::Restart),
    ]
}

/// A batch on the wire or answered: its range and when it went out.
#[derive(Debug, Clone, Copy)]
struct Sent {
    first: u64,
    last: u64,
    records: u64,
    at: Instant,
}

struct World {
    cfg: UplinkConfig,
    s: Session,
    now: Instant,
    // The journal: records `first..next` are held (dense), up to `durable` readable.
    first: u64,
    next: u64,
    durable: u64,
    journal_trimmed: u64,
    evicted: BTreeSet<u64>,
    // The task: a read in progress, the trim point not yet applied, the link's clock.
    reading: Option<(u64, usize)>,
    trim_target: u64,
    connected: bool,
    last_heard: Instant,
    untold: bool,
    // The link and the relay.
    wire: VecDeque<Sent>,
    acks: VecDeque<(Sent, u64)>,
    stored: BTreeSet<u64>,
    sent_this_conn: BTreeSet<u64>,
}

fn header() -> BatchHeader {
    BatchHeader {
        gateway_id: Id::new("gw-model").unwrap(),
        site_id: Id::new("site-model").unwrap(),
        journal_epoch: EPOCH,
    }
}

fn ack(through: u64) -> Ack {
    Ack {
        gateway_id: header().gateway_id,
        journal_epoch: EPOCH,
        acked_through: through,
        server_time_ms: 1_800_000_000_000,
        duplicates: None,
        conflicts: None,
    }
}

fn prepared(first: u64, last: u64) -> Prepared {
    let records = (last + 1).saturating_sub(first);
    Prepared {
        first,
        last,
        records,
        anchors: Vec::new(),
        frame: Bytes::from(vec![0u8; 8 + 4 * records as usize]),
    }
}

impl World {
    fn new(window: usize, batch: usize, bandwidth: u64) -> World {
        let cfg = UplinkConfig {
            window,
            batch_max_records: batch,
            batch_max_age: Duration::from_millis(100),
            ack_timeout: ACK_TIMEOUT,
            ping_interval: Duration::from_secs(2),
            ping_timeout: Duration::from_secs(1),
            bandwidth_bytes_per_sec: bandwidth,
            ..UplinkConfig::default()
        };
        let now = Instant::now();
        World {
            s: Session::new(&cfg, header(), 1, 0),
            cfg,
            now,
            first: 1,
            next: 1,
            durable: 0,
            journal_trimmed: 0,
            evicted: BTreeSet::new(),
            reading: None,
            trim_target: 0,
            connected: false,
            last_heard: now,
            untold: false,
            wire: VecDeque::new(),
            acks: VecDeque::new(),
            stored: BTreeSet::new(),
            sent_this_conn: BTreeSet::new(),
        }
    }

    /// The relay's contiguous watermark: everything up to it is stored.
    fn watermark(&self) -> u64 {
        let mut w = 0;
        while self.stored.contains(&(w + 1)) {
            w += 1;
        }
        w
    }

    /// Every record still held below `upto` was sent on this connection, or is known
    /// stored (at or below the trim point, and really at the relay).
    fn check_nothing_skipped(&self, upto: u64, what: &str) {
        for seq in self.first..upto.min(self.durable + 1) {
            let sent = self.sent_this_conn.contains(&seq);
            let acked = seq <= self.s.trimmed() && self.stored.contains(&seq);
            assert!(sent || acked, "{what} at {upto} skips unacked record {seq}");
        }
    }

    fn check_trim(&self, through: u64) {
        for seq in self.first..=through.min(self.next - 1) {
            assert!(
                self.stored.contains(&seq),
                "trim through {through} passes {seq}, which the relay does not store"
            );
        }
    }

    fn lose_link(&mut self) {
        self.s.on_link_lost();
        self.connected = false;
        self.reading = None;
        self.wire.clear();
        self.acks.clear();
        self.sent_this_conn.clear();
    }

    fn connect(&mut self) {
        let Prepare::Anchors { at } = self.s.on_connected(self.first, self.now) else {
            panic!("a connection starts with the hello");
        };
        self.connected = true;
        self.last_heard = self.now;
        self.check_nothing_skipped(at, "the hello");
        self.s.on_prepared(prepared(at, at - 1));
    }

    /// Performs what the session asks until it has nothing to do now (the real loop then
    /// sleeps until an event or `wake_at`).
    fn settle(&mut self) {
        while self.connected {
            let mut acted = false;
            if let Some(what) = self.s.poll(self.now, self.durable, self.untold) {
                acted = true;
                match what {
                    Prepare::Records { from, max_records } => {
                        assert!(self.reading.is_none(), "one read at a time");
                        assert_eq!(max_records, self.s.batch_limit());
                        self.check_nothing_skipped(from, "a read");
                        self.reading = Some((from, max_records));
                    }
                    Prepare::Anchors { at } => {
                        assert!(self.untold && self.s.inflight() == 0);
                        self.check_nothing_skipped(at, "an anchor-only batch");
                        self.s.on_prepared(prepared(at, at - 1));
                    }
                }
            }
            if let Some(p) = self.s.take_sendable(self.now) {
                acted = true;
                assert!(self.s.inflight() < self.cfg.window, "window overrun");
                if p.records > 0 {
                    self.check_nothing_skipped(p.first, "a batch");
                    self.sent_this_conn.extend(p.first..=p.last);
                }
                let sent = Sent {
                    first: p.first,
                    last: p.last,
                    records: p.records,
                    at: self.now,
                };
                self.s.on_sent(p, self.now, 0, self.now);
                self.wire.push_back(sent);
            }
            self.check_window();
            if !acted {
                break;
            }
        }
        if let Some(t) = self.s.wake_at() {
            assert!(
                t > self.now,
                "wake time {t:?} already passed: the loop would spin"
            );
        }
    }

    fn check_window(&self) {
        let on_wire = self.wire.len() + self.acks.len();
        assert!(self.s.inflight() <= self.cfg.window, "window overrun");
        assert_eq!(self.s.inflight(), on_wire, "in-flight count vs the wire");
    }

    fn read_done(&mut self) {
        let Some((from, max)) = self.reading.take() else {
            return;
        };
        let start = from.max(self.first);
        if start <= self.durable {
            let last = self.durable.min(start + max as u64 - 1);
            self.s.on_prepared(prepared(start, last));
        } else {
            self.s.on_prepared_empty(self.first);
        }
    }

    fn deliver_ack(&mut self, stale: u8) {
        let Some((sent, watermark)) = self.acks.pop_front() else {
            return;
        };
        let through = watermark.saturating_sub(u64::from(stale));
        let before = self.s.trimmed();
        let acked = self
            .s
            .on_ack(&ack(through), self.next - 1)
            .expect("an honest ack in order is taken");
        assert_eq!(
            (acked.batch.first, acked.batch.last, acked.batch.records),
            (sent.first, sent.last, sent.records),
            "the ack is paired with the oldest batch in flight"
        );
        self.last_heard = self.now;
        self.untold = false;
        match acked.next {
            AckNext::Trim(Some(t)) => {
                assert!(
                    t > before && t == self.s.trimmed(),
                    "trim points only advance"
                );
                self.check_trim(t);
                self.trim_target = self.trim_target.max(t);
            }
            AckNext::Trim(None) => {}
            AckNext::NewEpoch => panic!("an honest relay never names an unassigned seq"),
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Append { n, durable } => {
                self.next += u64::from(n);
                if durable {
                    self.durable = self.next - 1;
                }
            }
            Op::Flush => self.durable = self.next - 1,
            Op::Evict(k) => {
                let to = (self.first + u64::from(k)).min(self.durable + 1);
                self.evicted.extend(self.first..to);
                self.first = self.first.max(to);
            }
            Op::ReadDone => self.read_done(),
            Op::Relay => {
                if let Some(b) = self.wire.pop_front() {
                    if b.records > 0 {
                        self.stored.extend(b.first..=b.last);
                    }
                    let w = self.watermark();
                    self.acks.push_back((b, w));
                }
            }
            Op::Ack { stale } => self.deliver_ack(stale),
            Op::SpuriousAck => {
                if self.s.inflight() == 0 {
                    let r = self.s.on_ack(&ack(self.watermark()), self.next - 1);
                    assert!(matches!(r, Err(LinkError::Protocol(_))), "{r:?}");
                    if self.connected {
                        self.lose_link();
                    }
                }
            }
            Op::Tick(ms) => {
                self.now += Duration::from_millis(u64::from(ms));
                match self.s.on_tick(self.now, self.last_heard, true) {
                    None => {}
                    Some(TickAction::Ping) => {}
                    Some(TickAction::Close(e)) => {
                        assert!(matches!(e, LinkError::Timeout(_)), "{e:?}");
                        self.lose_link();
                    }
                }
                if let Some(oldest) = self.acks.front().map(|a| &a.0).or(self.wire.front()) {
                    assert!(
                        self.now.duration_since(oldest.at) <= ACK_TIMEOUT || !self.connected,
                        "an overdue batch did not end the connection"
                    );
                }
            }
            Op::Pong => self.last_heard = self.now,
            Op::Untold => self.untold = true,
            Op::LinkLost => self.lose_link(),
            Op::Connect => {
                if !self.connected {
                    self.connect();
                }
            }
            Op::Trimmer => self.run_trimmer(),
            Op::Restart => {
                // A crash: the trimmer's pending work and the connection are gone.
                self.lose_link();
                self.trim_target = self.journal_trimmed;
                self.s = Session::new(&self.cfg, header(), self.first, self.journal_trimmed);
            }
        }
        self.settle();
    }

    fn run_trimmer(&mut self) {
        let t = self.trim_target.min(self.durable);
        if t > self.journal_trimmed {
            self.check_trim(t);
            self.journal_trimmed = t;
            self.first = self.first.max(t + 1);
        }
    }

    /// A healthy link until nothing is left: everything durable reaches the relay.
    fn drain(&mut self) {
        self.apply(Op::Flush);
        for _ in 0..100_000 {
            if !self.connected {
                self.connect();
            } else if self.reading.is_some() {
                self.read_done();
            } else if !self.wire.is_empty() {
                self.apply_quietly(Op::Relay);
            } else if !self.acks.is_empty() {
                self.deliver_ack(0);
            } else if let Some(t) = self.s.wake_at() {
                self.now = t;
            } else {
                self.run_trimmer();
                self.check_done();
                return;
            }
            self.settle();
        }
        panic!("the session did not drain");
    }

    fn apply_quietly(&mut self, op: Op) {
        let connected = self.connected;
        self.apply(op);
        assert_eq!(self.connected, connected);
    }

    fn check_done(&self) {
        assert_eq!(self.s.unsent(self.durable), 0, "records left unsent");
        assert!(
            self.first > self.durable,
            "records {}..={} were never trimmed",
            self.first,
            self.durable
        );
        for seq in 1..=self.durable {
            assert!(
                self.stored.contains(&seq) || self.evicted.contains(&seq),
                "record {seq} was neither delivered nor evicted"
            );
        }
    }
}

fn run(window: usize, batch: usize, bandwidth: u64, ops: Vec<Op>) {
    let mut w = World::new(window, batch, bandwidth);
    w.apply(Op::Connect);
    for op in ops {
        w.apply(op);
    }
    w.drain();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn session_keeps_the_delivery_contract(
        window in 1usize..4,
        batch in 1usize..6,
        bandwidth in prop_oneof![Just(0u64), Just(400u64)],
        ops in prop::collection::vec(op(), 1..80),
    ) {
        run(window, batch, bandwidth, ops);
    }
}

/// The scenario the batch-end trim exists for: records evicted before they were sent hold
/// the relay's watermark back, yet the journal is still trimmed as batches are acked.
#[test]
fn evictions_do_not_hold_back_trimming() {
    let mut w = World::new(2, 3, 0);
    w.apply(Op::Connect);
    w.apply(Op::Append {
        n: 9,
        durable: true,
    });
    w.apply(Op::Evict(4));
    for _ in 0..10 {
        w.apply(Op::ReadDone);
        w.apply(Op::Relay);
        w.apply(Op::Ack { stale: 0 });
        w.apply(Op::Tick(200));
    }
    assert_eq!(w.watermark(), 0, "1..=4 never reached the relay");
    w.apply(Op::Trimmer);
    assert_eq!((w.first, w.journal_trimmed), (10, 9));
}
