//! The relay's storage: one [`Store`] trait, two implementations ([`sled`] embedded,
//! [`postgres`] for production and for several relays sharing one database).
//!
//! ## Rules every store implements (docs/design.md, "Deduplication and conflicts")
//!
//! - **Primary key** `(gateway_id, journal_epoch, gateway_seq)`. A record whose primary key
//!   is already stored is a *duplicate* (counted, nothing written) when its punch key is
//!   stored too (whatever the stored content: a conflict's resend is not a second
//!   conflict) or when its punch is invalid (a rejected record's resend). The set of stored
//!   primary keys of one `(gateway_id, journal_epoch)` stream is kept as a short list of
//!   closed ranges ([`SeqRanges`]); batches are contiguous, so the list stays tiny (a gap
//!   only exists while an earlier batch is still on its way).
//! - **Sequence-number reuse.** A record whose primary key is already stored but whose
//!   valid punch's key is *not* stored is a new punch under a reused `gateway_seq` (a
//!   gateway whose journal went back in time: a lost tail, a restored backup). It is stored
//!   like a record with a new primary key (the punch-key rules below apply, also inside
//!   the batch), counted in `stored` and in `seq_reuse` (per gateway too), and logged as a
//!   warning. Only records whose primary key is stored pay for the punch-key lookup, so
//!   batches of new records cost what they did. The ack watermark is unchanged by it.
//! - **Punch key** `(site_id, device_id, device_seq)`. A record with a new primary key whose
//!   punch key is already stored (another gateway, a reinstalled box with a new epoch, a
//!   device that resent) is a *duplicate* if the punch has the same content, and a
//!   *conflict* otherwise: the first punch stays, the newcomer goes to the conflicts table.
//!   Either way its primary key is now "stored", so a resend is a duplicate.
//! - **Invalid records.** A record with a new primary key whose punch fails
//!   `Punch::validate` (a device id that is not topic-safe, a time or UTC offset out of
//!   range) is *rejected*: it is kept in the rejected table with the reason, never as a
//!   punch, and its primary key counts as stored. The gateway validated the punch when it
//!   took it, so this only happens when a relay is stricter than an old gateway (or a
//!   gateway is broken); refusing the whole batch instead would stall that gateway's
//!   stream for ever behind one record. The operator sees it in `/v1/rejected`, in the
//!   gateway's `rejected` counter and in the `rejected` records metric.
//! - **Atomicity.** A batch is committed whole or not at all. [`Store::commit`] returns only
//!   after the commit is durable, with the ack watermark `acked_through`: the highest
//!   `gateway_seq` such that every record from the start of the stream's first stored range
//!   up to it is stored. A batch that arrives before an earlier one (pipelining, two relays)
//!   is stored, but the watermark waits for the gap to fill; the gateway keeps resending
//!   what an ack does not name. When nothing is stored yet for the stream, `acked_through`
//!   is 0 (gateway sequence numbers start at 1).
//! - **Time.** Anchors are kept per `(gateway_id, boot_id)`, the one with the smallest
//!   uncertainty wins. A record's corrected receive time is its wall clock if the gateway's
//!   clock was synchronised, else `anchor.true_ms + (mono_ms - anchor.mono_ms)` with an
//!   anchor of the same boot, else unknown until such an anchor arrives, at which point
//!   every stored record of that boot still without a corrected time gets one
//!   ([`corrected_time`]).
//!
//! ## The cursor
//!
//! Every stored punch has a *cursor* ([`PunchRow::cursor`]), its position in commit order,
//! and readers page through punches by it ([`PunchQuery::after`]). The guarantee every
//! consumer (the query API, outputs, the feed) builds on: **a reader never sees a cursor
//! while a lower one can still appear.** So a consumer that resumes after the highest
//! cursor it has seen never misses a punch, however many commits run at once, on however
//! many relays. A row id taken when the row is written does not give this: two commits
//! that take ids 1–100 and 101–200 can become visible in the other order, and a reader
//! that saw 101–200 first skips 1–100 for good. Each store assigns cursors in an order
//! that visibility follows:
//! - PostgreSQL (`postgres::schema`, `postgres::commit`): a position from a sequence,
//!   taken under a transaction-scoped advisory lock that is released only after the
//!   commit is visible;
//! - sled (`sled`): row ids taken under the commit mutex, and readers stop at the highest
//!   row id whose commit is durable.
//!
//! Cursors increase but are not contiguous (a rolled-back commit, a conflict, leaves a
//! gap). [`Store::head`] is the highest visible cursor, and [`Store::subscribe`] wakes
//! readers when it may have moved.
//!
//! ## One position space: the event stream
//!
//! Conflicts, rejected records and relay notices ([`Notice`]: an output disabled or
//! enabled) take their position from the **same** counter as punches, in the same commit
//! and under the same rule (PostgreSQL: the same sequence under the same advisory lock, in
//! the same transaction; sled: the same row-id generator under the commit mutex, covered
//! by the durable head). So [`Store::stream`] reads one stream of every kind in position
//! order ([`StreamRow`]), and the guarantee above holds for all kinds at once: an output
//! keeps *one* cursor for everything it delivers, and a conflict is never overtaken by a
//! later punch nor the other way round. Punch cursors get gaps where other kinds sit
//! (already allowed: cursors are not contiguous). A notice is appended by
//! [`Store::append_notice`], idempotently by its [`Notice::key`], so a retried write never
//! stores it twice. Conflicts and rejected records stored by PostgreSQL before its
//! migration 6 have no position and are not in the stream (they stay in
//! `/v1/conflicts` and `/v1/rejected`); sled always took their ids from the punch counter,
//! so its old ones are in the stream at their place.

pub mod output_state;
pub mod postgres;
pub mod sled;

use std::future::Future;
use std::pin::Pin;

use outpost_protocol::json::{format_time, punch_to_json};
use outpost_protocol::{Batch, Id, Received, Record, TimeAnchor};
use serde_json::{Map, Value};

pub use output_state::{Backlog, Disabled, InFlight, LeaseGrant, OutputState, OutputWrite};

/// A boxed, sendable future: the trait's methods return these so it can be used as
/// `dyn Store`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A punch whose device time is further than this from its corrected receive time is
/// flagged `device_clock_suspect` in the query API (5 minutes).
pub const SUSPECT_SKEW_MS: u64 = 5 * 60 * 1000;

/// The most gaps one stream may have before its batches are refused. Gaps only exist
/// while batches are in flight out of order; thousands mean a broken or hostile sender.
pub const MAX_RANGES: usize = 1024;

/// The underlying error of [`StoreError::Unavailable`] and [`StoreError::Io`], as the
/// library returned it (`tokio_postgres::Error`, `deadpool_postgres::PoolError`,
/// `sled::Error`, `std::io::Error`, …): downcast it to inspect it.
pub type StoreSource = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a store operation failed.
///
/// The `Display` of [`StoreError::Unavailable`] and [`StoreError::Io`] says what failed
/// and what to check; the library's error is their `source()`, not repeated in the text.
/// [`StoreError::report`] gives both, for logs and error bodies.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the work; nothing was committed. Retry.
    #[error("store unavailable: {context}")]
    Unavailable {
        /// What failed, and what to check.
        context: String,
        /// The library's error; `None` when the store itself refused (a setting).
        #[source]
        source: Option<StoreSource>,
    },
    /// A local I/O error (disk full, permissions); nothing was committed.
    #[error("store I/O error: {context}")]
    Io {
        /// What failed, and what to check.
        context: String,
        /// The library's error; `None` when there is none to keep.
        #[source]
        source: Option<StoreSource>,
    },
    /// Stored data could not be decoded: the database was damaged or written by an
    /// incompatible version.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The stream `(gateway_id, journal_epoch)` has more than [`MAX_RANGES`] gaps.
    #[error("gateway {gateway_id} journal epoch {journal_epoch} has more than {MAX_RANGES} gaps in its gateway_seq; send batches in order")]
    TooManyGaps {
        /// The gateway.
        gateway_id: String,
        /// Its epoch.
        journal_epoch: u64,
    },
}

impl StoreError {
    /// [`StoreError::Unavailable`] caused by `source`.
    pub fn unavailable(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Unavailable {
            context: context.into(),
            source: Some(Box::new(source)),
        }
    }

    /// [`StoreError::Unavailable`] with no library error behind it (a setting refused).
    pub fn refused(context: impl Into<String>) -> Self {
        StoreError::Unavailable {
            context: context.into(),
            source: None,
        }
    }

    /// [`StoreError::Io`] caused by `source`.
    pub fn io(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Io {
            context: context.into(),
            source: Some(Box::new(source)),
        }
    }

    /// A short stable name for metrics and error bodies.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unavailable { .. } => "store_unavailable",
            StoreError::Io { .. } => "store_io",
            StoreError::Corrupt(_) => "store_corrupt",
            StoreError::TooManyGaps { .. } => "too_many_gaps",
        }
    }

    /// The message and every source below it, `: `-separated: what logs and error bodies
    /// show, so that the library's reason is not lost.
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            text.push_str(": ");
            text.push_str(&e.to_string());
            source = e.source();
        }
        text
    }
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitOutcome {
    /// The ack watermark for the batch's stream after this commit.
    pub acked_through: u64,
    /// Records stored as new punches (including `seq_reuse`).
    pub stored: u32,
    /// Records already stored (same primary key, or same punch with the same content).
    pub duplicates: u32,
    /// Records whose punch key matched a stored punch with different content.
    pub conflicts: u32,
    /// Records whose punch failed validation (kept in the rejected table).
    pub rejected: u32,
    /// Earlier records whose corrected time was filled in by this batch's anchors.
    pub corrected_later: u32,
    /// Of `stored`: new punches under an already stored primary key (module docs,
    /// "Sequence-number reuse").
    pub seq_reuse: u32,
}

/// Filters for [`Store::punches`]. Times filter the punch's device time (`time`):
/// `from_ms` inclusive, `to_ms` exclusive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PunchQuery {
    /// Only this site.
    pub site: Option<String>,
    /// Only these sites (a read token's scope, `auth::Scope::site_filter`); `None` for
    /// every site. Applied in the store's query, so a page is full whenever more matching
    /// rows follow.
    pub sites: Option<Vec<String>>,
    /// Only this device.
    pub device: Option<String>,
    /// Only this subject.
    pub subject: Option<String>,
    /// Device time at or after this Unix ms.
    pub from_ms: Option<i64>,
    /// Device time before this Unix ms.
    pub to_ms: Option<i64>,
    /// Continue after this cursor (from a previous page's `next_cursor`).
    pub after: Option<u64>,
    /// At most this many items (the caller bounds it).
    pub limit: usize,
}

/// Which rows of a table of held records ([`Store::conflicts`], [`Store::rejected`]) to
/// return.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldQuery {
    /// Continue after this row id (the last `id` of a previous page).
    pub after: Option<u64>,
    /// At most this many rows (the caller bounds it).
    pub limit: usize,
    /// Only rows of these sites (as in [`PunchQuery::sites`]); `None` for every site.
    pub sites: Option<Vec<String>>,
}

/// One stored punch with where and when it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PunchRow {
    /// Position in the store's commit order: the pagination cursor (module docs, "The
    /// cursor").
    pub cursor: u64,
    /// The site of the gateway that delivered it first.
    pub site_id: Id,
    /// That gateway.
    pub gateway_id: Id,
    /// Its journal epoch.
    pub journal_epoch: u64,
    /// The record as the gateway sent it (punch, gateway_seq, received stamp, source).
    pub record: Record,
    /// When the relay stored it (relay clock, Unix ms).
    pub stored_at_ms: i64,
    /// The corrected receive time (Unix ms), when known.
    pub corrected_ms: Option<i64>,
}

impl PunchRow {
    /// The JSON object of the query API: the punch fields of docs/design.md ("JSON form") plus `site`,
    /// `gateway_id`, `gateway_seq`, `received_at` (gateway wall clock), `corrected_time`
    /// (null until known), `clock_synced`, `device_skew_ms` (device time minus corrected
    /// time), `device_clock_suspect` (skew over [`SUSPECT_SKEW_MS`]), `source`,
    /// `journal_epoch`, `stored_at` and `cursor` (a decimal string, like `next_cursor`:
    /// a consumer that reached the last page resumes after its last item's).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = punch_to_json(&self.record.punch);
        m.insert("cursor".into(), self.cursor.to_string().into());
        m.insert("site".into(), self.site_id.as_str().into());
        m.insert("gateway_id".into(), self.gateway_id.as_str().into());
        m.insert("journal_epoch".into(), self.journal_epoch.into());
        m.insert("gateway_seq".into(), self.record.gateway_seq.into());
        m.insert(
            "received_at".into(),
            format_time(self.record.received.wall_ms, None).into(),
        );
        m.insert(
            "clock_synced".into(),
            self.record.received.clock_synced.into(),
        );
        m.insert(
            "corrected_time".into(),
            self.corrected_ms
                .map_or(Value::Null, |t| format_time(t, None).into()),
        );
        // docs/design.md ("Time without a real-time clock"): keep device_time as sent, flag punches far from the receive time.
        let skew = self
            .corrected_ms
            .map(|t| self.record.punch.device_time_ms.saturating_sub(t));
        m.insert(
            "device_skew_ms".into(),
            skew.map_or(Value::Null, Value::from),
        );
        m.insert(
            "device_clock_suspect".into(),
            skew.is_some_and(|s| s.unsigned_abs() > SUSPECT_SKEW_MS)
                .into(),
        );
        m.insert("source".into(), self.record.source.as_str().into());
        m.insert(
            "stored_at".into(),
            format_time(self.stored_at_ms, None).into(),
        );
        m
    }
}

/// One page of punches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PunchPage {
    /// The punches, in cursor order.
    pub items: Vec<PunchRow>,
    /// Pass as `after` to get the next page; `None` when this page is the last.
    pub next_cursor: Option<u64>,
}

/// What the relay knows about one gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayInfo {
    /// The gateway.
    pub gateway_id: String,
    /// The site its batches name.
    pub site_id: String,
    /// Relay time of its last committed batch, Unix ms.
    pub last_seen_ms: i64,
    /// The journal epoch of that batch.
    pub journal_epoch: u64,
    /// The ack watermark of that epoch.
    pub acked_through: u64,
    /// Records stored as new punches, all epochs.
    pub records: u64,
    /// Duplicates received, all epochs.
    pub duplicates: u64,
    /// Conflicts received, all epochs.
    pub conflicts: u64,
    /// Invalid records received (rejected table), all epochs.
    pub rejected: u64,
    /// New punches received under an already stored primary key, all epochs (included in
    /// `records`).
    pub seq_reuse: u64,
}

impl GatewayInfo {
    /// The JSON object of `GET /v1/gateways`.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "gateway_id": self.gateway_id,
            "site": self.site_id,
            "last_seen": format_time(self.last_seen_ms, None),
            "journal_epoch": self.journal_epoch,
            "acked_through": self.acked_through,
            "records": self.records,
            "duplicates": self.duplicates,
            "conflicts": self.conflicts,
            "rejected": self.rejected,
            "seq_reuse": self.seq_reuse,
        })
    }
}

/// A punch that arrived with the punch key of a stored punch but different content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictRow {
    /// Insertion order.
    pub id: u64,
    /// The newcomer's site.
    pub site_id: Id,
    /// The newcomer's gateway.
    pub gateway_id: Id,
    /// Its epoch.
    pub journal_epoch: u64,
    /// The newcomer as sent.
    pub record: Record,
    /// When the relay received it.
    pub stored_at_ms: i64,
    /// The cursor of the punch that was kept.
    pub kept_cursor: u64,
}

/// A record whose punch failed validation, kept for the operator instead of stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRow {
    /// Insertion order.
    pub id: u64,
    /// The batch's site.
    pub site_id: Id,
    /// The gateway that sent it.
    pub gateway_id: Id,
    /// Its epoch.
    pub journal_epoch: u64,
    /// The record as sent.
    pub record: Record,
    /// When the relay received it.
    pub stored_at_ms: i64,
    /// Why it is invalid (the validation error).
    pub reason: String,
}

/// A relay notice: something the relay itself reports to the outputs that want
/// `gateway` events (an output disabled or enabled now; gateway alerts later). Stored in
/// the event stream with a position like a punch (module docs, "One position space").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Identity for idempotent appends: appending a notice whose key is stored already
    /// stores nothing and returns the stored one's cursor (e.g.
    /// `output.disabled/<output>/<at_ms>`).
    pub key: String,
    /// What happened, e.g. `output.disabled`.
    pub kind: String,
    /// The output it is about, if any (that output itself is not sent the notice).
    pub output: Option<String>,
    /// The notice's fields besides `id`, `cursor`, `kind` and `at` (kept as JSON text).
    pub fields: Map<String, Value>,
    /// When it happened (relay clock, Unix ms).
    pub at_ms: i64,
}

impl Notice {
    /// The JSON of a notice item (without `id` and `cursor`): `kind`, `output` (when
    /// about one), `at` and its fields.
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("kind".into(), self.kind.as_str().into());
        if let Some(o) = &self.output {
            m.insert("output".into(), o.as_str().into());
        }
        for (k, v) in &self.fields {
            m.insert(k.clone(), v.clone());
        }
        m.insert("at".into(), format_time(self.at_ms, None).into());
        m
    }
}

/// One entry of the event stream ([`Store::stream`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamItem {
    /// A stored punch.
    Punch(PunchRow),
    /// A conflicting newcomer.
    Conflict(ConflictRow),
    /// A rejected record.
    Rejected(RejectedRow),
    /// A relay notice.
    Notice(Notice),
}

/// An entry of the event stream with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRow {
    /// Its position, from the punches' counter (module docs, "One position space").
    pub cursor: u64,
    /// What it is.
    pub item: StreamItem,
}

/// Which part of the event stream [`Store::stream`] reads: positions in
/// `(after, through]`, at most `limit` entries, every kind and site (the caller filters:
/// its range covers what it skips).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamQuery {
    /// After this position (`None`: from the first).
    pub after: Option<u64>,
    /// Up to and including this one (`None`: up to the head).
    pub through: Option<u64>,
    /// At most this many entries.
    pub limit: usize,
}

/// Logs a batch's new punches under reused sequence numbers (`seqs`, never empty).
pub fn warn_seq_reuse(gateway_id: &str, journal_epoch: u64, seqs: &SeqRanges) {
    let count: u64 = seqs.0.iter().map(|&(lo, hi)| hi - lo + 1).sum();
    let seqs: Vec<String> = seqs
        .0
        .iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect();
    tracing::warn!(
        gateway = gateway_id,
        journal_epoch,
        gateway_seq = %seqs.join(","),
        count,
        "gateway sent new punches under gateway_seq values it had already used (its journal \
         went back in time: lost tail or restored backup); stored them as new punches"
    );
}

/// The validation error of `r`'s punch, as stored in the rejected table; `None` if valid.
pub fn invalid_reason(r: &Record) -> Option<String> {
    r.punch.validate().err().map(|e| e.to_string())
}

/// The JSON of a record held aside (a conflict or a rejected record): the punch as sent
/// plus `site`, `gateway_id`, `journal_epoch`, `gateway_seq` and `stored_at`.
fn held_json(
    record: &Record,
    site: &Id,
    gateway: &Id,
    epoch: u64,
    stored_at_ms: i64,
) -> Map<String, Value> {
    let mut m = punch_to_json(&record.punch);
    m.insert("site".into(), site.as_str().into());
    m.insert("gateway_id".into(), gateway.as_str().into());
    m.insert("journal_epoch".into(), epoch.into());
    m.insert("gateway_seq".into(), record.gateway_seq.into());
    m.insert("stored_at".into(), format_time(stored_at_ms, None).into());
    m
}

impl ConflictRow {
    /// The JSON object of `GET /v1/conflicts`: the newcomer and `kept_cursor`.
    pub fn to_json(&self) -> Value {
        let mut m = held_json(
            &self.record,
            &self.site_id,
            &self.gateway_id,
            self.journal_epoch,
            self.stored_at_ms,
        );
        m.insert("kept_cursor".into(), self.kept_cursor.to_string().into());
        Value::Object(m)
    }
}

impl RejectedRow {
    /// The JSON object of `GET /v1/rejected`: the record as sent and its `reason`.
    pub fn to_json(&self) -> Value {
        let mut m = held_json(
            &self.record,
            &self.site_id,
            &self.gateway_id,
            self.journal_epoch,
            self.stored_at_ms,
        );
        m.insert("reason".into(), self.reason.as_str().into());
        Value::Object(m)
    }
}

/// The relay's storage. Every method is safe to call concurrently; `commit` for one stream
/// may run on several relay processes at once (PostgreSQL) and must stay exactly-once.
pub trait Store: Send + Sync + 'static {
    /// `"sled"` or `"postgres"`.
    fn kind(&self) -> &'static str;

    /// Stores a decoded batch atomically and durably; see the module docs for the rules.
    /// `now_ms` is the relay's clock, recorded as each new punch's `stored_at`.
    fn commit(&self, batch: Batch, now_ms: i64)
        -> BoxFuture<'_, Result<CommitOutcome, StoreError>>;

    /// One page of punches matching `query`, in cursor order.
    fn punches(&self, query: PunchQuery) -> BoxFuture<'_, Result<PunchPage, StoreError>>;

    /// Every gateway that has sent a batch, ordered by id.
    fn gateways(&self) -> BoxFuture<'_, Result<Vec<GatewayInfo>, StoreError>>;

    /// Conflicts of `q.sites` after `q.after` (their `id`), oldest first, at most
    /// `q.limit`.
    fn conflicts(&self, q: HeldQuery) -> BoxFuture<'_, Result<Vec<ConflictRow>, StoreError>>;

    /// Rejected (invalid) records of `q.sites` after `q.after` (their `id`), oldest first,
    /// at most `q.limit`.
    fn rejected(&self, q: HeldQuery) -> BoxFuture<'_, Result<Vec<RejectedRow>, StoreError>>;

    /// The event stream (module docs, "One position space"): punches, conflicts,
    /// rejected records and notices with positions in `(q.after, q.through]`, in position
    /// order, at most `q.limit`. The same guarantee as [`Store::punches`]: no entry ever
    /// appears below a position a reader has seen.
    fn stream(&self, q: StreamQuery) -> BoxFuture<'_, Result<Vec<StreamRow>, StoreError>>;

    /// Appends `notice` to the event stream, durably, with the next position; when a
    /// notice with the same key is stored already, stores nothing. Returns the notice's
    /// position either way.
    fn append_notice(&self, notice: Notice) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// The highest cursor that readers can see now (0 when no punch is stored). Every
    /// punch at or below it is visible: no commit can still add one there (module docs,
    /// "The cursor").
    fn head(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// A receiver that changes whenever new punches may have become visible, from any
    /// relay (PostgreSQL: `LISTEN`/`NOTIFY` on a dedicated connection that reconnects by
    /// itself, with a re-check of [`Store::head`] every second so that a missed
    /// notification only delays; sled: in-process, sent after each durable commit). The
    /// value is the highest cursor this process knows of; it is a wake-up hint, readers
    /// always re-query after it.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;

    /// The highest cursor of a punch stored before `stored_before_ms` (relay clock, Unix
    /// ms), `None` when none: where a replay "from a time" starts (`i64::MAX`: the head).
    fn cursor_before(
        &self,
        stored_before_ms: i64,
    ) -> BoxFuture<'_, Result<Option<u64>, StoreError>>;

    /// The punches after cursor `after` (`None`: all) whose site is in `sites` (empty =
    /// every site): how many (exact) and the oldest `stored_at`.
    fn backlog<'a>(
        &'a self,
        after: Option<u64>,
        sites: &'a [String],
    ) -> BoxFuture<'a, Result<Backlog, StoreError>>;

    /// The state of output `name` ([`output_state`]); the default (version 0, cursor 0)
    /// for an output that never ran.
    fn output_state<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<OutputState, StoreError>>;

    /// A compare-and-set write of output `name`'s state ([`output_state`], "Versioned
    /// writes"): `Some(new state)` once durable, `None` when the version moved or the
    /// writer no longer holds the lease (nothing written).
    fn output_write<'a>(
        &'a self,
        name: &'a str,
        write: OutputWrite,
    ) -> BoxFuture<'a, Result<Option<OutputState>, StoreError>>;

    /// Takes or renews the lease on output `name` for `holder`, for `ttl` from now.
    fn output_lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<LeaseGrant, StoreError>>;

    /// Gives up `holder`'s lease on `name` (shutdown), so another relay takes it at once.
    fn output_release<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Succeeds when the store can take commits now.
    fn ready(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Makes everything durable and releases resources (and stops the task behind
    /// [`Store::subscribe`]); called once at shutdown.
    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// Raises the value behind [`Store::subscribe`] to `cursor` when that is higher, waking the
/// receivers; a lower or equal value changes nothing (notifications can arrive out of
/// order, and the value never goes back).
pub(crate) fn raise_head(tx: &tokio::sync::watch::Sender<u64>, cursor: u64) {
    tx.send_if_modified(|v| {
        if cursor > *v {
            *v = cursor;
            true
        } else {
            false
        }
    });
}

/// The set of stored `gateway_seq` values of one stream, as sorted, disjoint, non-adjacent
/// closed ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SeqRanges(Vec<(u64, u64)>);

impl SeqRanges {
    /// Rebuilds from the flat form `[lo0, hi0, lo1, hi1, ...]`; `None` if malformed.
    pub fn from_flat(flat: &[u64]) -> Option<Self> {
        if flat.len() % 2 != 0 {
            return None;
        }
        let mut r = SeqRanges::default();
        for pair in flat.chunks_exact(2) {
            if pair[0] > pair[1] {
                return None;
            }
            r.insert(pair[0], pair[1]);
        }
        Some(r)
    }

    /// The flat form `[lo0, hi0, lo1, hi1, ...]`.
    pub fn to_flat(&self) -> Vec<u64> {
        self.0.iter().flat_map(|&(a, b)| [a, b]).collect()
    }

    /// Whether `seq` is stored.
    pub fn contains(&self, seq: u64) -> bool {
        let i = self.0.partition_point(|&(_, hi)| hi < seq);
        self.0.get(i).is_some_and(|&(lo, _)| lo <= seq)
    }

    /// Adds `lo..=hi`, merging with touching or overlapping ranges.
    pub fn insert(&mut self, lo: u64, hi: u64) {
        let (mut lo, mut hi) = (lo.min(hi), lo.max(hi));
        // Ranges that overlap or touch [lo, hi]: hi_i + 1 >= lo and lo_i <= hi + 1.
        let start = self.0.partition_point(|&(_, h)| h.saturating_add(1) < lo);
        let mut end = start;
        while end < self.0.len() && self.0[end].0 <= hi.saturating_add(1) {
            lo = lo.min(self.0[end].0);
            hi = hi.max(self.0[end].1);
            end += 1;
        }
        self.0.splice(start..end, [(lo, hi)]);
    }

    /// Number of ranges (gaps + 1).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The ack watermark: the end of the first range, 0 when empty.
    pub fn watermark(&self) -> u64 {
        self.0.first().map_or(0, |&(_, hi)| hi)
    }
}

/// The corrected receive time of a record (see the module docs), or `None` when the clock
/// was not synchronised and no anchor of the same boot is known.
pub fn corrected_time(received: &Received, anchor: Option<&TimeAnchor>) -> Option<i64> {
    if received.clock_synced {
        return Some(received.wall_ms);
    }
    let a = anchor.filter(|a| a.boot_id == received.boot_id)?;
    let t = i128::from(a.true_ms) + i128::from(received.mono_ms) - i128::from(a.mono_ms);
    i64::try_from(t).ok()
}

/// Whether `new` should replace the stored anchor `old` for the same boot.
pub fn anchor_is_better(old: &TimeAnchor, new: &TimeAnchor) -> bool {
    new.uncertainty_ms < old.uncertainty_ms
}

/// The best anchor per boot among `anchors` (a batch may carry several for one boot).
pub fn best_anchors(anchors: &[TimeAnchor]) -> Vec<TimeAnchor> {
    let mut best: Vec<TimeAnchor> = Vec::new();
    for a in anchors {
        match best.iter_mut().find(|b| b.boot_id == a.boot_id) {
            Some(b) if anchor_is_better(b, a) => *b = *a,
            Some(_) => {}
            None => best.push(*a),
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::BootId;

    #[test]
    fn unavailable_and_io_keep_their_typed_source() {
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full");
        let e = StoreError::io("cannot fsync the sled store in /d", io);
        assert_eq!(
            e.to_string(),
            "store I/O error: cannot fsync the sled store in /d"
        );
        let source = std::error::Error::source(&e).expect("a source");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("the io::Error");
        assert_eq!(io.kind(), std::io::ErrorKind::StorageFull);
        assert_eq!(
            e.report(),
            "store I/O error: cannot fsync the sled store in /d: disk full"
        );
        assert_eq!(e.kind(), "store_io");

        let e = StoreError::refused("store.ca_file is set");
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(e.report(), "store unavailable: store.ca_file is set");
        assert_eq!(e.kind(), "store_unavailable");
    }

    #[test]
    fn ranges_merge_and_watermark() {
        let mut r = SeqRanges::default();
        assert_eq!(r.watermark(), 0);
        r.insert(1, 100);
        assert_eq!(r.watermark(), 100);
        r.insert(201, 300);
        assert_eq!((r.len(), r.watermark()), (2, 100));
        assert!(r.contains(250) && !r.contains(150) && r.contains(1) && !r.contains(0));
        r.insert(101, 200);
        assert_eq!((r.len(), r.watermark()), (1, 300));
        r.insert(50, 60);
        assert_eq!(r.to_flat(), vec![1, 300]);
        r.insert(500, 600);
        r.insert(400, 450);
        r.insert(302, 399);
        assert_eq!(r.to_flat(), vec![1, 300, 302, 450, 500, 600]);
        r.insert(301, 499);
        assert_eq!(r.to_flat(), vec![1, 600]);
        assert_eq!(SeqRanges::from_flat(&r.to_flat()), Some(r));
        assert_eq!(SeqRanges::from_flat(&[3]), None);
        assert_eq!(SeqRanges::from_flat(&[3, 2]), None);
        let mut m = SeqRanges::default();
        m.insert(u64::MAX - 1, u64::MAX);
        m.insert(0, 0);
        assert_eq!(m.to_flat(), vec![0, 0, u64::MAX - 1, u64::MAX]);
    }

    #[test]
    fn correction() {
        let boot = BootId([1; 16]);
        let rec = |synced| Received {
            boot_id: boot,
            mono_ms: 10_000,
            wall_ms: 5,
            clock_synced: synced,
        };
        let a = TimeAnchor {
            boot_id: boot,
            mono_ms: 4_000,
            true_ms: 1_800_000_000_000,
            uncertainty_ms: 20,
        };
        assert_eq!(corrected_time(&rec(true), None), Some(5));
        assert_eq!(corrected_time(&rec(false), None), None);
        assert_eq!(
            corrected_time(&rec(false), Some(&a)),
            Some(1_800_000_006_000)
        );
        let other = TimeAnchor {
            boot_id: BootId([2; 16]),
            ..a
        };
        assert_eq!(corrected_time(&rec(false), Some(&other)), None);
        let worse = TimeAnchor {
            uncertainty_ms: 90,
            ..a
        };
        assert_eq!(best_anchors(&[worse, a, other]), vec![a, other]);
    }
}
