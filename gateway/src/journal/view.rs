//! What readers see of the journal, published by the writer.
//!
//! The writer's mutex is held while sled applies a batch and, after an I/O error, while
//! sled is reopened: that waits for sled's file lock with `std::thread::sleep` retries and
//! fsyncs every file, which takes seconds on a full disk. Readers run on tokio's worker
//! threads (`/health/ready`, `/metrics`, `/v1/status`, the committer loop, the uplink), so
//! they must never wait for that lock. Instead the writer, at the end of every change
//! (append, flush, trim, reopen, new epoch) and while still holding its lock, publishes a
//! snapshot through `tokio::sync::watch` channels. A reader borrows the latest snapshot,
//! which only takes the channel's own lock for the time of a copy.
//!
//! Three channels: [`JournalStats`] and the durable watermark are public (tasks can await
//! a change), and the [`View`] adds what the journal's own readers need (the sled handle
//! and the error of a broken journal) in one consistent snapshot.

use serde::Serialize;
use tokio::sync::watch;

/// A point-in-time summary for the status page and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct JournalStats {
    /// Records held (not yet acknowledged by the relay, not evicted).
    pub records: u64,
    /// Logical bytes of the records held (with their dedup keys): what `journal.max_bytes`
    /// limits.
    pub bytes: u64,
    /// Logical bytes of the dedup window (keys of trimmed records), bounded by
    /// `dedup_window.max_keys` rather than by the quota.
    pub window_bytes: u64,
    /// Gateway wall-clock receive time of the oldest record held, Unix ms.
    pub oldest_received_wall_ms: Option<i64>,
    /// The seq the next record gets.
    pub next_seq: u64,
    /// Highest seq the relay acknowledged (0 = none yet).
    pub trimmed_through: u64,
    /// Lowest seq still held (= `next_seq` when empty).
    pub first_unacked: u64,
    /// Highest seq known to be on disk (readers see up to here).
    pub durable_through: u64,
    /// Dedup keys remembered (records held + trimmed within the window).
    pub dedup_keys: u64,
    /// Of those, keys of trimmed records (bounded by `dedup_window.max_keys`).
    pub dedup_window_keys: u64,
    /// Records evicted by `on_full = "drop_oldest"` over the journal's life.
    pub evicted: u64,
    /// `journal.max_bytes`.
    pub max_bytes: u64,
    /// `false` while the journal is recovering from an I/O error (not writable).
    pub writable: bool,
}

/// One consistent snapshot of the writer's state, for the journal's readers.
#[derive(Clone)]
pub(super) struct View {
    /// The sled handle to read from; `None` while a reopen is under way or has failed (a
    /// handle kept here would hold sled's file lock and make the reopen wait).
    pub(super) db: Option<sled::Db>,
    /// The writer's reopen generation when this was published.
    pub(super) generation: u64,
    /// The journal's epoch.
    pub(super) epoch: u64,
    /// Set while the journal is broken by an I/O error: the reason, and whether the disk
    /// is full.
    pub(super) broken: Option<(String, bool)>,
    /// The counters.
    pub(super) stats: JournalStats,
}

/// The sending side, owned by the journal; only the writer (holding its lock) publishes.
pub(super) struct Publisher {
    view: watch::Sender<View>,
    stats: watch::Sender<JournalStats>,
    durable: watch::Sender<u64>,
}

impl Publisher {
    /// Starts with the state found at open.
    pub(super) fn new(view: View) -> Publisher {
        Publisher {
            stats: watch::Sender::new(view.stats),
            durable: watch::Sender::new(view.stats.durable_through),
            view: watch::Sender::new(view),
        }
    }

    /// Makes `view` what readers see. Subscribers of the stats and the watermark are woken
    /// only when their value changed.
    pub(super) fn publish(&self, view: View) {
        let stats = view.stats;
        self.durable.send_if_modified(|d| {
            let changed = *d != stats.durable_through;
            *d = stats.durable_through;
            changed
        });
        self.stats.send_if_modified(|s| {
            let changed = *s != stats;
            *s = stats;
            changed
        });
        self.view.send_replace(view);
    }

    /// The latest snapshot (a borrow: copy what you need and let it go).
    pub(super) fn view(&self) -> watch::Ref<'_, View> {
        self.view.borrow()
    }

    /// The latest counters.
    pub(super) fn stats(&self) -> JournalStats {
        *self.stats.borrow()
    }

    /// The latest durable watermark.
    pub(super) fn durable_through(&self) -> u64 {
        *self.durable.borrow()
    }

    /// A receiver of the counters.
    pub(super) fn watch_stats(&self) -> watch::Receiver<JournalStats> {
        self.stats.subscribe()
    }

    /// A receiver of the durable watermark.
    pub(super) fn watch_durable(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(durable_through: u64, records: u64) -> View {
        View {
            db: None,
            generation: 0,
            epoch: 1,
            broken: None,
            stats: JournalStats {
                records,
                bytes: 0,
                window_bytes: 0,
                oldest_received_wall_ms: None,
                next_seq: durable_through + 1,
                trimmed_through: 0,
                first_unacked: 1,
                durable_through,
                dedup_keys: 0,
                dedup_window_keys: 0,
                evicted: 0,
                max_bytes: 1 << 20,
                writable: true,
            },
        }
    }

    #[test]
    fn subscribers_wake_only_on_a_change_of_their_value() {
        let p = Publisher::new(view(0, 0));
        let mut durable = p.watch_durable();
        let mut stats = p.watch_stats();
        p.publish(view(0, 0));
        assert!(!durable.has_changed().unwrap());
        assert!(!stats.has_changed().unwrap());
        let mut v = view(0, 0);
        v.stats.records = 3;
        p.publish(v);
        assert!(
            !durable.has_changed().unwrap(),
            "the watermark did not move"
        );
        assert!(stats.has_changed().unwrap());
        assert_eq!(stats.borrow_and_update().records, 3);
        p.publish(view(5, 3));
        assert!(durable.has_changed().unwrap());
        assert_eq!(*durable.borrow_and_update(), 5);
        assert_eq!(p.durable_through(), 5);
        assert_eq!(p.stats().durable_through, 5);
        assert_eq!(p.view().stats.next_seq, 6);
    }
}
