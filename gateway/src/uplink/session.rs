//! The uplink session as a state machine with no I/O: what to read, send, trim and when.
//!
//! The delivery rules (module docs of [`super`]) live here, apart from sockets, tokio, the
//! journal and the clock, so tests can drive them step by step (`gateway/tests/
//! uplink_session_model.rs`). The task that owns the link (`connection.rs`) reads the
//! journal and the clock, calls a method here, and performs what it returns:
//!
//! - [`Session::on_connected`] starts at the oldest unacknowledged record with the hello.
//! - [`Session::poll`] says what to build next ([`Prepare`]), which comes back through
//!   [`Session::on_prepared`] (or [`Session::on_prepared_empty`]).
//! - [`Session::wake_at`] is when to look again if nothing happens (send pace, batch age);
//!   [`Session::take_sendable`] hands out a batch, [`Session::on_sent`] puts it in flight.
//! - [`Session::on_ack`] pairs an ack with the oldest batch in flight and says how far to
//!   trim ([`AckNext`]); [`Session::on_tick`] says when to ping or give up ([`TickAction`]).
//! - [`Session::on_link_lost`] forgets the connection. What was not acknowledged is not
//!   trimmed, so the next [`Session::on_connected`] starts before it and resends it.
//!
//! Every error ends the connection: the caller closes the link, backs off and reconnects.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use outpost_protocol::{Ack, TimeAnchor};
use tracing::warn;

use super::batcher::{self, BatchHeader, Prepared};
use super::config::UplinkConfig;
use super::link::LinkError;

/// What to build next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepare {
    /// Read and encode durable records from `from` on (blocking: on the blocking pool).
    Records {
        /// The first seq wanted (records evicted since are skipped by the reader).
        from: u64,
        /// The current records-per-batch limit.
        max_records: usize,
    },
    /// Encode a batch with no records at cursor `at`, carrying the anchors the relay has not
    /// heard of (the hello, or when idle).
    Anchors {
        /// The cursor, which the batch names as its first seq.
        at: u64,
    },
}

/// What a tick asks for.
#[derive(Debug)]
pub enum TickAction {
    /// Send a keep-alive ping (the link was quiet for `uplink.ping_interval`).
    Ping,
    /// The link is dead or stuck: close it.
    Close(LinkError),
}

/// A batch sent and not yet acknowledged.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// Seq of its first record (the cursor for an anchor-only batch).
    pub first: u64,
    /// Seq of its last record (`first - 1` when it has none).
    pub last: u64,
    /// Number of records.
    pub records: u64,
    /// The anchors it carried.
    pub anchors: Vec<TimeAnchor>,
    /// When it was handed to the link.
    pub sent_at: Instant,
    /// The monotonic clock (ms) then, for the time anchor the ack yields.
    pub sent_mono: u64,
}

/// What an ack leads to, besides its time anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckNext {
    /// Trim the journal through this seq (`None`: nothing new is known stored).
    Trim(Option<u64>),
    /// The relay holds seqs this journal never assigned (a restored backup): move the
    /// journal to a new epoch ([`Session::on_new_epoch`]) and close.
    NewEpoch,
}

/// An ack paired with its batch.
#[derive(Debug)]
pub struct Acked {
    /// The batch it answers.
    pub batch: InFlight,
    /// What to do about it.
    pub next: AckNext,
}

/// State of one connection (gone when the link is lost).
#[derive(Debug)]
struct Conn {
    /// Next seq to read.
    cursor: u64,
    inflight: VecDeque<InFlight>,
    /// Built and waiting for the window or the send pace.
    prepared: Option<Prepared>,
    /// A [`Prepare::Records`] was handed out and has not come back.
    preparing: bool,
    /// Since when durable records have waited for a batch.
    waiting_since: Option<Instant>,
    /// When a ping went out that nothing has answered yet.
    ping_sent: Option<Instant>,
    /// Earliest time the next batch may go (`uplink.bandwidth_bytes_per_sec`).
    allowed_at: Instant,
}

/// The uplink's delivery state: across connections (what was sent and trimmed, the batch
/// limit, the journal epoch) and within one ([`Session::on_connected`] to
/// [`Session::on_link_lost`]).
#[derive(Debug)]
pub struct Session {
    /// `[uplink]`: window, batch age, ack and ping timeouts, bandwidth.
    cfg: UplinkConfig,
    header: BatchHeader,
    /// Records-per-batch limit (halved when the relay says too large).
    batch_limit: usize,
    /// Highest seq sent by this process (counts resends, caps trims).
    max_sent: u64,
    /// Highest seq known stored at the relay (the trimmer catches up to it).
    trimmed: u64,
    warned_gap: bool,
    conn: Option<Conn>,
}

impl Session {
    /// A session for a journal whose oldest held record is `first_unacked` and which was
    /// trimmed through `trimmed_through` (at start, or after a restart).
    pub fn new(
        cfg: &UplinkConfig,
        header: BatchHeader,
        first_unacked: u64,
        trimmed_through: u64,
    ) -> Session {
        Session {
            cfg: cfg.clone(),
            header,
            batch_limit: cfg.batch_max_records,
            max_sent: first_unacked.saturating_sub(1),
            trimmed: trimmed_through,
            warned_gap: false,
            conn: None,
        }
    }

    /// Who the batches say they are from (the epoch changes with [`Session::on_new_epoch`]).
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The current records-per-batch limit.
    pub fn batch_limit(&self) -> usize {
        self.batch_limit
    }

    /// Highest seq known stored at the relay.
    pub fn trimmed(&self) -> u64 {
        self.trimmed
    }

    /// Next seq to read, while connected.
    pub fn cursor(&self) -> Option<u64> {
        self.conn.as_ref().map(|c| c.cursor)
    }

    /// Batches sent and not yet acknowledged.
    pub fn inflight(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.inflight.len())
    }

    /// Durable records not yet read into a batch, given the watermark `durable`.
    pub fn unsent(&self, durable: u64) -> u64 {
        self.cursor().map_or(0, |c| (durable + 1).saturating_sub(c))
    }

    /// Halves the batch limit (the relay refused a batch as too large); the new limit, or
    /// `None` when it is already 1.
    pub fn halve_batch_limit(&mut self) -> Option<usize> {
        if self.batch_limit <= 1 {
            return None;
        }
        self.batch_limit = (self.batch_limit / 2).max(1);
        Some(self.batch_limit)
    }

    /// A link is up. Starts at the journal's oldest record, or after what the relay acked
    /// and the trimmer has not deleted yet, with the hello (its ack tells the watermark).
    pub fn on_connected(&mut self, first_unacked: u64, now: Instant) -> Prepare {
        let cursor = first_unacked.max(self.trimmed + 1);
        self.conn = Some(Conn {
            cursor,
            inflight: VecDeque::new(),
            prepared: None,
            preparing: false,
            waiting_since: None,
            ping_sent: None,
            allowed_at: now,
        });
        Prepare::Anchors { at: cursor }
    }

    /// The link is gone (error, timeout, shutdown): everything in flight stays unacked.
    pub fn on_link_lost(&mut self) {
        self.conn = None;
    }

    /// What to build now, given the journal's durable watermark and whether the relay has
    /// not heard of an anchor worth an anchor-only batch.
    pub fn poll(&mut self, now: Instant, durable: u64, untold_anchors: bool) -> Option<Prepare> {
        let c = self.conn.as_mut()?;
        if c.prepared.is_some() || c.preparing {
            return None;
        }
        if durable >= c.cursor {
            let since = *c.waiting_since.get_or_insert(now);
            let (waited, age) = (now.saturating_duration_since(since), self.cfg.batch_max_age);
            if batcher::ready(durable - c.cursor + 1, waited, self.batch_limit, age) {
                c.waiting_since = None;
                c.preparing = true;
                return Some(Prepare::Records {
                    from: c.cursor,
                    max_records: self.batch_limit,
                });
            }
        } else if c.inflight.is_empty() && untold_anchors {
            return Some(Prepare::Anchors { at: c.cursor });
        }
        None
    }

    /// A batch was built; the cursor moves past its records.
    pub fn on_prepared(&mut self, p: Prepared) {
        let Some(c) = self.conn.as_mut() else { return };
        c.preparing = false;
        if p.records > 0 {
            c.cursor = p.last + 1;
        }
        c.prepared = Some(p);
    }

    /// [`Prepare::Records`] found nothing at or after the cursor (evicted or trimmed
    /// meanwhile): skip to the journal's oldest record, `first_unacked`.
    pub fn on_prepared_empty(&mut self, first_unacked: u64) {
        let Some(c) = self.conn.as_mut() else { return };
        c.preparing = false;
        c.cursor = c.cursor.max(first_unacked);
    }

    /// When to look again if nothing else happens: the prepared batch's send time (if the
    /// window has room), or the age limit of the records waiting for a batch.
    pub fn wake_at(&self) -> Option<Instant> {
        let c = self.conn.as_ref()?;
        if c.prepared.is_some() {
            return (c.inflight.len() < self.cfg.window).then_some(c.allowed_at);
        }
        if c.preparing {
            return None;
        }
        c.waiting_since
            .and_then(|t| t.checked_add(self.cfg.batch_max_age))
    }

    /// The batch to send now, if one is prepared, the window has room and the pace allows.
    pub fn take_sendable(&mut self, now: Instant) -> Option<Prepared> {
        let c = self.conn.as_mut()?;
        if c.inflight.len() >= self.cfg.window || now < c.allowed_at {
            return None;
        }
        c.prepared.take()
    }

    /// `p` went out at `sent_at` (monotonic `sent_mono` ms); `now` is after the send.
    /// Returns how many of its records were sent before (resent).
    pub fn on_sent(&mut self, p: Prepared, sent_at: Instant, sent_mono: u64, now: Instant) -> u64 {
        let Some(c) = self.conn.as_mut() else {
            return 0;
        };
        let bandwidth = self.cfg.bandwidth_bytes_per_sec;
        if bandwidth > 0 {
            let cost = Duration::from_secs_f64(p.frame.len() as f64 / bandwidth as f64);
            c.allowed_at = c.allowed_at.max(now) + cost;
        }
        let resent = if p.records > 0 && p.first <= self.max_sent {
            p.last.min(self.max_sent) - p.first + 1
        } else {
            0
        };
        if p.records > 0 {
            self.max_sent = self.max_sent.max(p.last);
        }
        c.inflight.push_back(InFlight {
            first: p.first,
            last: p.last,
            records: p.records,
            anchors: p.anchors,
            sent_at,
            sent_mono,
        });
        resent
    }

    /// An ack arrived (`last_assigned`: the journal's highest seq ever). It answers the
    /// oldest batch in flight; trim through `max(acked_through, batch end)`, capped at the
    /// highest seq sent (the delivery contract in [`super`] says why).
    pub fn on_ack(&mut self, ack: &Ack, last_assigned: u64) -> Result<Acked, LinkError> {
        let Some(b) = self.conn.as_mut().and_then(|c| c.inflight.pop_front()) else {
            return Err(LinkError::Protocol(
                "the relay sent an ack with no batch in flight".into(),
            ));
        };
        let h = &self.header;
        if ack.gateway_id != h.gateway_id || ack.journal_epoch != h.journal_epoch {
            return Err(LinkError::Protocol(format!(
                "the ack names gateway {} journal epoch {:016x}, but this is gateway {} epoch {:016x}",
                ack.gateway_id, ack.journal_epoch, h.gateway_id, h.journal_epoch
            )));
        }
        if ack.acked_through > last_assigned {
            return Ok(Acked {
                batch: b,
                next: AckNext::NewEpoch,
            });
        }
        let mut through = ack.acked_through;
        if b.records > 0 {
            if ack.acked_through.saturating_add(1) < b.first && !self.warned_gap {
                self.warned_gap = true;
                warn!(
                    acked_through = ack.acked_through,
                    batch_first = b.first,
                    "the relay's watermark is behind this batch (records before it were evicted here, journal.on_full = \"drop_oldest\"); trimming by batch"
                );
            }
            through = through.max(b.last);
        }
        through = through.min(self.max_sent);
        let trim = (through > self.trimmed).then(|| {
            self.trimmed = through;
            through
        });
        Ok(Acked {
            batch: b,
            next: AckNext::Trim(trim),
        })
    }

    /// The journal moved to `epoch`; the next connection sends under it.
    pub fn on_new_epoch(&mut self, epoch: u64) {
        self.header.journal_epoch = epoch;
    }

    /// The periodic check: the oldest batch in flight must be acked within
    /// `uplink.ack_timeout`; on a link that `pings`, a ping goes out after
    /// `uplink.ping_interval` of silence and must be answered (anything heard after it,
    /// `last_heard`) within `uplink.ping_timeout`.
    pub fn on_tick(
        &mut self,
        now: Instant,
        last_heard: Instant,
        pings: bool,
    ) -> Option<TickAction> {
        let c = self.conn.as_mut()?;
        if let Some(f) = c.inflight.front() {
            if now.saturating_duration_since(f.sent_at) > self.cfg.ack_timeout {
                return Some(TickAction::Close(LinkError::Timeout(format!(
                    "no ack for a batch within uplink.ack_timeout ({:?})",
                    self.cfg.ack_timeout
                ))));
            }
        }
        if !pings {
            return None;
        }
        if let Some(t) = c.ping_sent {
            if last_heard >= t {
                c.ping_sent = None;
            } else if now.saturating_duration_since(t) >= self.cfg.ping_timeout {
                return Some(TickAction::Close(LinkError::Timeout(format!(
                    "no answer to a ping within uplink.ping_timeout ({:?}): the link is dead",
                    self.cfg.ping_timeout
                ))));
            }
        }
        if c.ping_sent.is_none()
            && now.saturating_duration_since(last_heard) >= self.cfg.ping_interval
        {
            c.ping_sent = Some(now);
            return Some(TickAction::Ping);
        }
        None
    }
}

#[cfg(test)]
mod tests;
