//! The durable state of one output (`crate::outputs`), kept in the store under the
//! output's name, and the lease that says which relay runs it.
//!
//! ## Versioned writes
//!
//! Every write of an output's state is a compare-and-set on [`OutputState::version`]
//! ([`OutputWrite::expect_version`]): it succeeds only if nobody wrote since the writer
//! read, and then bumps the version. A worker also names itself
//! ([`OutputWrite::holder`]): its write succeeds only while it holds the output's lease
//! (PostgreSQL checks the holder and the lease expiry in the same statement, by the
//! database clock). So an admin's replay or enable, written meanwhile, makes the worker's
//! next write fail instead of being overwritten, and a relay that lost its lease can move
//! the cursor neither back nor forward. A write returns only once it is durable (sled:
//! flushed and fsynced like a commit; PostgreSQL: committed).
//!
//! ## The in-flight delivery
//!
//! Before a worker first hands a delivery to its sink it records [`InFlight`]: the
//! delivery's id, the end of its cursor range, when it was created and how many items it
//! has. Until the receiver confirmed it, every attempt (after a retry, a crash, or on
//! another relay) rebuilds the same delivery from the punches in
//! `(cursor, through]`: same id, same `created_ms`, same items. A punch's only mutable
//! field is its corrected time (unknown until an anchor of its boot arrives), so the
//! cursors of items whose corrected time was unknown at the first attempt are kept in
//! [`InFlight::uncorrected`] and shown as unknown on every retry too.

use std::time::Duration;

/// One output's durable progress and health.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutputState {
    /// Bumped by every write; writes are compare-and-set on it (module docs).
    pub version: u64,
    /// The last delivered cursor: every punch at or before it was confirmed by the
    /// receiver (or filtered out by the output's sites). `None` = nothing yet (a store's
    /// first punch may have cursor 0).
    pub cursor: Option<u64>,
    /// The delivery being attempted, if any.
    pub in_flight: Option<InFlight>,
    /// Set while the output is disabled (410 Gone, or failing for too long).
    pub disabled: Option<Disabled>,
    /// Consecutive failed attempts (the retry schedule's position).
    pub failures: u32,
    /// When the current run of failures began (relay clock, Unix ms).
    pub failing_since_ms: Option<i64>,
    /// When the receiver last confirmed a delivery.
    pub last_success_ms: Option<i64>,
    /// Why the last attempt failed (cleared by a success).
    pub last_error: Option<String>,
    /// Not before this time is the next attempt made (Unix ms).
    pub next_attempt_ms: Option<i64>,
    /// Which relay holds (or last held) the output; read-only for writers.
    pub holder: Option<String>,
    /// How many replays were asked for: part of the delivery ids after a replay, so a
    /// replayed range is a new call for a receiver that drops repeated `webhook-id`s.
    pub replays: u64,
}

/// The delivery being attempted (module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// The delivery's id.
    pub id: String,
    /// The last cursor of its range `(cursor, through]`.
    pub through: u64,
    /// When it was created (relay clock, Unix ms).
    pub created_ms: i64,
    /// How many items it has (punches of the range that pass the sites filter).
    pub items: u32,
    /// Cursors of its items whose corrected time was unknown when it was created.
    pub uncorrected: Vec<u64>,
}

/// Why and since when an output is disabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disabled {
    /// What happened.
    pub reason: String,
    /// When (relay clock, Unix ms).
    pub at_ms: i64,
}

/// A compare-and-set write of an output's state.
#[derive(Debug, Clone)]
pub struct OutputWrite {
    /// A worker's holder id: the write succeeds only while it holds the lease. `None` for
    /// an admin's write (replay, enable), which only checks the version.
    pub holder: Option<String>,
    /// The version the writer read; the write fails if it changed.
    pub expect_version: u64,
    /// The new state (its `version` and `holder` are ignored).
    pub state: OutputState,
}

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseGrant {
    /// A single-process store: this relay always runs every output, no renewal needed.
    Always,
    /// Held for the requested time from the request; renew before it runs out.
    Held,
    /// Another relay holds it.
    Busy {
        /// Its holder id.
        holder: String,
    },
}

/// The punches an output has not delivered yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backlog {
    /// How many (exact).
    pub records: u64,
    /// The earliest `stored_at` among them (Unix ms); `None` when there are none.
    pub oldest_stored_ms: Option<i64>,
}

/// A lease time as whole milliseconds, for the stores.
pub fn lease_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}
