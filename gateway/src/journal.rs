//! The journal: the gateway's durable store of punches, on sled 0.34.
//!
//! # What it guarantees
//!
//! - **Dense sequence.** Each stored record gets a `gateway_seq`, assigned in order without
//!   gaps: 1, 2, 3, … for the life of the journal. A seq is never reused, also not after a
//!   restart: `next_seq` is kept in the meta value, which is written in the same atomic
//!   batch as the records, so after a restart it is the last record's seq + 1 (or the last
//!   trimmed or evicted seq + 1 when the journal is empty).
//! - **Records leave only two ways.** [`Journal::trim_through`] deletes what the relay
//!   acknowledged, and `on_full = "drop_oldest"` evicts the oldest records when the quota is
//!   reached. Both remove a prefix, so the records present are always the contiguous range
//!   `first_unacked()..next_seq()`. Nothing is ever popped before it was sent.
//! - **Nothing unflushed is visible.** [`Journal::append`] only writes (sled keeps it in
//!   memory); [`Journal::flush`] awaits sled's `flush_async` and then a real `fsync` of
//!   sled's log file (and of every file and directory when sled changed its set of files;
//!   see [`durable`]): sled 0.34's flush alone ends in `sync_file_range`, which does not
//!   survive a power cut. The committer answers no device before that returns. Readers ([`Journal::read_from`],
//!   [`Journal::records`]) see only records up to the last successful flush (the
//!   *durable watermark*), so the uplink can never send a record that a crash could still
//!   take back and whose seq would then be reused.
//! - **Dedup at the edge.** A punch whose (device_id, device_seq) is in the journal, earlier
//!   in the same group, or trimmed within the dedup window is answered
//!   [`Outcome::Duplicate`] and not stored again. Keys of evicted records are forgotten
//!   with them (the punch is gone, so a resend is welcome).
//! - **Quota.** `journal.max_bytes` limits the logical size of the records held (their
//!   CBOR, key and dedup key): the unsent backlog. When a new punch does not fit, `reject`
//!   answers `Rejected(StorageFull)` and `drop_oldest` evicts the oldest untrimmed records.
//!   The dedup window (keys of trimmed records, about 40 bytes plus twice the device id
//!   each) is bounded separately by `dedup_window.max_keys`, so it can never make the
//!   journal refuse punches; [`JournalStats::window_bytes`] reports it.
//!
//! # On-disk layout
//!
//! One sled tree with prefixed keys (see [`layout`]): `r`+seq → CBOR record,
//! `d`+device_id+0x00+device_seq → seq, `t`+seq → (trimmed_at, dedup key) and `mstate` →
//! the [`layout::Meta`] counters. Every change is one `apply_batch` that also rewrites the
//! meta, so the counters always match the entries and `open` needs no scan: it reads the
//! meta and checks it against the first and last record keys (two O(log n) lookups). If
//! they disagree (which would be a sled bug) it rebuilds the counters with one scan and
//! logs a warning.
//!
//! The dedup window is a queue of tombstones in trim order. Each append or trim expires at
//! most a few hundred of the oldest (by age, `dedup_window.max_age`, measured from the
//! trim; or by count, `dedup_window.max_keys`), so expiry is incremental. Ages use the wall
//! clock: a clock jump forward forgets early, a jump back keeps keys until the count limit.
//!
//! sled's files are larger than the logical size: it keeps a log of updates and
//! compacts it in the background, so expect up to a few times `max_bytes` on disk in the
//! worst case (the journal bench prints the measured ratio).
//!
//! # What happens on each failure
//!
//! - **Cannot be opened** (sled panics on a damaged log, corrupt or foreign data, an
//!   unknown format): the directory is moved aside, a fresh journal in a new epoch is
//!   opened, and the gateway keeps taking punches; see [`recovery`] and
//!   `outpost-gateway salvage`.
//! - **The relay holds seqs this journal never assigned** (a restored backup): the uplink
//!   calls [`Journal::begin_new_epoch`], so no `(epoch, gateway_seq)` is sent twice with
//!   different records.
//! - **kill -9 / power cut** between `append` and the end of `flush`: the group was not
//!   acknowledged; after restart its records are either all there (then a resend is a
//!   `duplicate`) or all absent (sled batches are atomic). `open` fsyncs sled's files
//!   before anything is read, so records that survived in the page cache of a killed
//!   process are on disk before they can be reported as duplicates or sent.
//! - **After the flush returned**: the records survive; next_seq and trimmed_through come
//!   back from the meta written in the same batches.
//! - **A trim that was not yet flushed** is lost by a crash; the records come back and are
//!   resent, and the relay recognises them (delivery is at-least-once).
//! - **I/O error, ENOSPC included.** sled 0.34 stores the first I/O error in a global slot
//!   (`Config::set_global_error`) and returns it from every later write and flush; only a
//!   restart of its page cache (`PageCache::start`, i.e. reopening) clears it. So the
//!   journal marks itself *broken*, the group in flight is rejected (`StorageFull` for
//!   ENOSPC/EDQUOT, `Internal` otherwise), and the next write drops the sled handle and
//!   reopens it from disk (retried on every later write until it works). Reopening
//!   recovers exactly what reached the disk, fsyncs it, and resets the durable watermark,
//!   seq counters and dedup state from there. Acknowledged records were fsynced before
//!   their ack, so none are lost. A refused group may turn out to be on disk after the
//!   reopen; its resend is then answered `duplicate` (never stored twice). Tested on a
//!   real full tmpfs (`tests/journal_enospc.rs`). sled's `Mode` setting is not used: in
//!   0.34 it changes nothing measurable.
//! - **Another process holds the journal**: [`JournalError::InUse`] (sled's file lock).
//!
//! # Threads
//!
//! Every public method can be called from any thread. One mutex serialises the writers
//! (`append`, `trim_through`, `begin_new_epoch`, the end of `flush`, and the reopen after
//! an I/O error, which runs inside the write that finds the journal broken). Readers do
//! not take it: after every change the writer publishes the counters and the durable
//! watermark through `tokio::sync::watch` (see [`view`]), so [`Journal::stats`],
//! [`Journal::durable_through`] and the other cheap getters never wait for sled, and a task
//! can await a change with [`Journal::watch_durable`] or [`Journal::watch_stats`]. (Only
//! `read_from` and `records`, already blocking, wait for a reopen that is under way.)
//! `open`, `append`, `trim_through`, `begin_new_epoch`, `read_from` and `records` do
//! blocking sled work: on the async runtime, call them in `spawn_blocking`. `flush` is
//! async and does its blocking part (the fsync, taking the writer's lock) there itself.

mod config;
mod durable;
mod error;
mod layout;
mod pending;
mod recovery;
mod view;
mod writer;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use outpost_protocol::{cbor, Record, RejectCode};
use tokio::sync::watch;
use tracing::{error, info, warn};

pub use config::{
    parse_duration, DedupWindow, JournalConfig, OnFull, MIN_CACHE_BYTES, MIN_MAX_BYTES,
};
pub use error::JournalError;
pub use pending::{Outcome, Pending};
pub use recovery::{salvage, SalvageReport, SetAside};
pub use view::JournalStats;

use durable::Durability;
use layout::Meta;
use view::{Publisher, View};
use writer::{Writer, EXPIRE_BUDGET};

/// Records trimmed per atomic batch (a large trim is several batches; each leaves the
/// meta consistent).
const TRIM_CHUNK: u64 = 4096;

/// How long a reopen waits for the old sled instance to let go of its file lock.
const REOPEN_LOCK_WAIT: Duration = Duration::from_secs(3);

/// How long `open` waits for a lock held by this process's previous handle (see
/// [`open_store_waiting`]) before it reports the journal in use. Generous, because on a
/// loaded machine sled's background writers can keep the lock for a while after the last
/// handle is dropped; only a journal that really is in use pays the whole wait.
const OPEN_LOCK_WAIT: Duration = Duration::from_secs(5);

/// The durable journal. Cheap to clone; all clones share one sled database.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    cfg: JournalConfig,
    /// The fsyncs sled leaves out ([`durable`]).
    durability: Durability,
    /// Journals that could not be opened and were moved aside (this start or earlier),
    /// until `outpost-gateway salvage` has taken their records back.
    set_aside: Vec<SetAside>,
    /// The writer's state. Only writers lock it; readers use `published`.
    inner: Mutex<Inner>,
    /// What readers see, republished by the writer after every change.
    published: Publisher,
}

struct Inner {
    /// `None` only while a reopen after an I/O error has failed.
    db: Option<sled::Db>,
    /// Bumped at every reopen, so a flush that started before it does not move the new
    /// watermark.
    generation: u64,
    meta: Meta,
    /// Highest seq on disk.
    durable_through: u64,
    /// Set after an I/O error: the reason, and whether the disk is full.
    broken: Option<(String, bool)>,
}

/// What a fresh open found.
type Opened = (sled::Db, Meta);

impl Journal {
    /// Opens (or creates) the journal in `dir`. Fails with [`JournalError::InUse`] if
    /// another process has it open (after waiting up to 5 seconds, `OPEN_LOCK_WAIT`, in
    /// case it is this process's own previous handle closing), [`JournalError::Config`] for
    /// unusable settings. No scan: a million-record journal opens in well under a second.
    /// Blocking (sled's open and an fsync of every file): on the async runtime, call it in
    /// `spawn_blocking`.
    pub fn open(dir: impl AsRef<Path>, cfg: &JournalConfig) -> Result<Journal, JournalError> {
        cfg.validate()
            .map_err(|(key, msg)| JournalError::Config(format!("journal.{key}: {msg}")))?;
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(|e| JournalError::from_io(dir.clone(), e))?;
            // The new directory's name must survive a power cut too.
            outpost_ops::file::sync_dir(outpost_ops::file::parent_dir(&dir))
                .map_err(|e| JournalError::from_io(e.path, e.source))?;
        }
        let started = Instant::now();
        let (db, meta) = match recovery::open_guarded(&dir, cfg, OPEN_LOCK_WAIT) {
            Ok(opened) => opened,
            Err(failure) if failure.is_unopenable() => {
                // Never brick the box: keep the damaged journal for salvage, start a fresh
                // one (a new epoch, so nothing is taken for a resend), keep taking punches.
                let aside = recovery::move_aside(&dir, &failure.to_string())?;
                error!(
                    path = %dir.display(),
                    moved_to = %aside.display(),
                    reason = %failure,
                    "JOURNAL COULD NOT BE OPENED: it was moved aside and a new journal started; punches are being taken again. Recover its records with `outpost-gateway salvage {}` (gateway stopped)",
                    aside.display()
                );
                recovery::open_guarded(&dir, cfg, OPEN_LOCK_WAIT).map_err(|f| f.into_error(&dir))?
            }
            Err(failure) => return Err(failure.into_error(&dir)),
        };
        let set_aside = recovery::find_set_aside(&dir);
        for s in &set_aside {
            error!(
                path = %s.path.display(),
                "a journal that could not be opened is set aside and still holds punches: run `outpost-gateway salvage {}` with the gateway stopped",
                s.path.display()
            );
        }
        info!(
            path = %dir.display(),
            records = meta.records(),
            next_seq = meta.next_seq,
            trimmed_through = meta.trimmed_through,
            epoch = format_args!("{:016x}", meta.epoch),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "journal opened"
        );
        let inner = Inner {
            db: Some(db),
            generation: 0,
            durable_through: meta.next_seq - 1,
            meta,
            broken: None,
        };
        Ok(Journal {
            shared: Arc::new(Shared {
                durability: Durability::new(&dir),
                published: Publisher::new(view_of(&inner, cfg.max_bytes)),
                dir,
                cfg: cfg.clone(),
                set_aside,
                inner: Mutex::new(inner),
            }),
        })
    }

    /// Journals that could not be opened and were moved aside, still waiting for
    /// `outpost-gateway salvage`. Status, metrics and `/health/ready` report them.
    pub fn set_aside(&self) -> &[SetAside] {
        &self.shared.set_aside
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The settings it was opened with.
    pub fn config(&self) -> &JournalConfig {
        &self.shared.cfg
    }

    /// The random id of this journal, made when it was created; batches carry it so the
    /// relay never confuses seqs of a reinstalled box with older ones.
    pub fn epoch(&self) -> u64 {
        self.shared.published.view().epoch
    }

    /// Moves the journal to a fresh random epoch, durably, and returns it. The records
    /// held and every new one are then sent under the new epoch. Used when the relay shows
    /// it already holds sequence numbers this journal has not assigned yet (a journal that
    /// went back in time: a restored backup), so that no `(epoch, gateway_seq)` is ever
    /// sent with two different records. Blocking.
    pub fn begin_new_epoch(&self) -> Result<u64, JournalError> {
        let mut inner = self.lock();
        let db = self.writable(&mut inner)?;
        let mut meta = inner.meta;
        meta.epoch = layout::new_epoch(meta.epoch);
        let err = |e| JournalError::from_sled(self.shared.dir.clone(), e);
        db.insert(layout::META_KEY, cbor::to_vec(&meta))
            .map_err(err)?;
        db.flush().map_err(err)?;
        self.shared
            .durability
            .sync()
            .map_err(|e| JournalError::from_io(e.path, e.source))?;
        warn!(
            old = format_args!("{:016x}", inner.meta.epoch),
            new = format_args!("{:016x}", meta.epoch),
            next_seq = meta.next_seq,
            "journal moved to a new epoch"
        );
        inner.meta = meta;
        self.publish(&inner);
        Ok(meta.epoch)
    }

    /// The writer's lock. Never taken by readers, nor on a tokio worker thread: a writer
    /// may hold it for seconds while it reopens sled after an I/O error.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave sled half-written (batches are
        // atomic), and the meta is only replaced after a successful apply.
        self.shared.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the writer's current state what readers see. Called with the lock held, at
    /// the end of every change.
    fn publish(&self, inner: &Inner) {
        self.shared
            .published
            .publish(view_of(inner, self.shared.cfg.max_bytes));
    }

    /// Writes `items` in one atomic batch and returns one outcome per item, in order:
    /// `Accepted` with its seq, `Duplicate`, or `Rejected(StorageFull)` when the quota
    /// refuses it. **Not durable** until [`Journal::flush`] returns: callers must not
    /// acknowledge anything before that. An `Err` means nothing of the group was written.
    /// Blocking: on the async runtime, call it in `spawn_blocking`.
    pub fn append(&self, items: &[Pending]) -> Result<Vec<Outcome>, JournalError> {
        self.append_at(items, outpost_ops::time::now_ms())
    }

    pub(crate) fn append_at(
        &self,
        items: &[Pending],
        now: i64,
    ) -> Result<Vec<Outcome>, JournalError> {
        let mut inner = self.lock();
        let db = self.writable(&mut inner)?;
        let cfg = &self.shared.cfg;
        let mut w = Writer::new(&db, cfg, &self.shared.dir, inner.meta, now);
        w.expire_window(EXPIRE_BUDGET)?;
        let mut outcomes = Vec::with_capacity(items.len());
        let mut rejected_full = 0usize;
        for p in items {
            let dk = layout::dedup_key(&p.punch);
            if w.is_duplicate(&dk)? {
                outcomes.push(Outcome::Duplicate);
                continue;
            }
            let rec = Record {
                punch: p.punch,
                gateway_seq: w.meta.next_seq,
                received: p.received,
                source: p.source,
            };
            let value = cbor::to_vec(&rec);
            let need = layout::record_size(value.len()) + layout::dedup_size(dk.len());
            if !w.make_room(need)? {
                outcomes.push(Outcome::Rejected(RejectCode::StorageFull));
                rejected_full += 1;
                continue;
            }
            outcomes.push(Outcome::Accepted {
                gateway_seq: rec.gateway_seq,
            });
            w.insert_record(value, dk);
        }
        let evicted = w.evicted;
        let meta = self.commit(&mut inner, w)?;
        if evicted > 0 {
            warn!(
                evicted,
                first_unacked = meta.first_seq,
                "journal full: evicted the oldest unsent records (journal.on_full = \"drop_oldest\"); raise journal.max_bytes or restore the uplink"
            );
        }
        if rejected_full > 0 {
            warn!(
                rejected = rejected_full,
                bytes = meta.record_bytes,
                max_bytes = cfg.max_bytes,
                "journal full: refusing new punches (journal.on_full = \"reject\"); devices keep them and retry. Raise journal.max_bytes or restore the uplink"
            );
        }
        Ok(outcomes)
    }

    fn commit(&self, inner: &mut Inner, w: Writer<'_>) -> Result<Meta, JournalError> {
        let committed = match w.commit() {
            Ok(meta) => {
                inner.meta = meta;
                Ok(meta)
            }
            Err((_, e)) => {
                mark_broken(inner, &e);
                Err(e)
            }
        };
        self.publish(inner);
        committed
    }

    /// Makes everything appended so far durable (sled `flush_async`, then an fsync; see
    /// [`durable`]). On error the journal reopens itself at the next write; the caller must
    /// treat the records appended since the last successful flush as not stored. Never
    /// blocks the async runtime: the fsync and the update of the watermark (which takes
    /// the writer's lock) run in `spawn_blocking`.
    ///
    /// What the flush covers is fixed when this is *called*, not when the future first
    /// runs: a caller that spawns the future and then appends more can never have an
    /// append that breaks and reopens the journal slip in between. If the journal reopens
    /// before the flush ends, the flush fails, because the reopen may have dropped the
    /// records it was meant to cover.
    pub fn flush(
        &self,
    ) -> impl std::future::Future<Output = Result<(), JournalError>> + Send + 'static {
        // Appends publish before they return, so this covers every append that returned
        // before this call.
        let start = {
            let view = self.shared.published.view();
            if let Some((reason, full)) = &view.broken {
                Err(self.recovering(reason, *full))
            } else if let Some(db) = view.db.clone() {
                Ok((db, view.stats.next_seq - 1, view.generation))
            } else {
                Err(self.recovering("the journal is closed", false))
            }
        };
        let j = self.clone();
        async move {
            let (db, target, generation) = start?;
            let flushed = db.flush_async().await.map(|_| ());
            drop(db);
            let dir = j.shared.dir.clone();
            match tokio::task::spawn_blocking(move || j.finish_flush(flushed, target, generation))
                .await
            {
                Ok(r) => r,
                Err(e) => Err(JournalError::from_sled(
                    dir,
                    sled::Error::Io(std::io::Error::other(format!("flush task failed: {e}"))),
                )),
            }
        }
    }

    /// The blocking end of [`Journal::flush`]: the fsync sled leaves out, then the
    /// watermark moves to `target` (or the journal is marked broken).
    fn finish_flush(
        &self,
        flushed: sled::Result<()>,
        target: u64,
        generation: u64,
    ) -> Result<(), JournalError> {
        let result = flushed.and_then(|()| {
            // sled's flush is not an fsync (see `durable`): this is what makes the group
            // survive a power cut. A panic in it must still mark the journal broken.
            let synced =
                std::panic::catch_unwind(AssertUnwindSafe(|| self.shared.durability.sync()));
            match synced {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(sled::Error::Io(e.source)),
                Err(_) => Err(sled::Error::Io(std::io::Error::other("the fsync panicked"))),
            }
        });
        let mut inner = self.lock();
        let done = match result {
            Ok(()) if inner.generation != generation => {
                // A reopen since the flush started reset the watermark from the disk and
                // may have dropped the records this flush was to cover: they are not
                // acknowledged (the devices resend; duplicates are recognised).
                Err(self.recovering("the journal reopened during the flush", false))
            }
            Ok(()) => {
                if target > inner.durable_through {
                    inner.durable_through = target;
                }
                Ok(())
            }
            Err(e) => {
                let e = JournalError::from_sled(self.shared.dir.clone(), e);
                if inner.generation == generation {
                    mark_broken(&mut inner, &e);
                }
                Err(e)
            }
        };
        self.publish(&inner);
        done
    }

    /// Up to `max_records` durable records with `gateway_seq >= from`, in seq order, and
    /// at most `max_bytes` of CBOR (but always at least one record if there is one).
    /// Evicted or trimmed seqs are skipped, so the first record may be above `from`.
    pub fn read_from(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, JournalError> {
        let (db, lo, hi) = self.read_bounds(from)?;
        let mut out = Vec::new();
        if lo > hi || max_records == 0 {
            return Ok(out);
        }
        let mut bytes = 0usize;
        for kv in db.range(layout::record_key(lo)..=layout::record_key(hi)) {
            let (_, v) = kv.map_err(|e| JournalError::from_sled(self.shared.dir.clone(), e))?;
            if !out.is_empty() && bytes + v.len() > max_bytes {
                break;
            }
            bytes += v.len();
            out.push(self.decode(&v)?);
            if out.len() >= max_records {
                break;
            }
        }
        Ok(out)
    }

    /// Every durable record from `from` on, in seq order, for export. Works on a snapshot
    /// of the bounds; records trimmed while iterating are skipped.
    pub fn records(&self, from: u64) -> Result<Records, JournalError> {
        let (db, lo, hi) = self.read_bounds(from)?;
        let iter = (lo <= hi).then(|| db.range(layout::record_key(lo)..=layout::record_key(hi)));
        Ok(Records {
            iter,
            dir: self.shared.dir.clone(),
        })
    }

    /// The sled handle and the seq range readers may see: from the published view, so a
    /// read never waits for a writer's batch. Only while a reopen after an I/O error has
    /// no handle to offer does it wait for the writer (as a write would) and read from what
    /// the reopen left; `read_from` and `records` are blocking calls anyway.
    fn read_bounds(&self, from: u64) -> Result<(sled::Db, u64, u64), JournalError> {
        {
            // The borrow must end before the writer's lock is taken: the writer publishes
            // while holding that lock.
            let view = self.shared.published.view();
            if let Some(db) = view.db.clone() {
                return Ok((
                    db,
                    from.max(view.stats.first_unacked),
                    view.stats.durable_through,
                ));
            }
        }
        let inner = self.lock();
        match (&inner.db, &inner.broken) {
            (Some(db), _) => Ok((
                db.clone(),
                from.max(inner.meta.first_seq),
                inner.durable_through,
            )),
            (None, Some((reason, full))) => Err(self.recovering(reason, *full)),
            (None, None) => Err(self.recovering("the journal is closed", false)),
        }
    }

    fn decode(&self, v: &[u8]) -> Result<Record, JournalError> {
        cbor::decode_exact::<Record>(v).map_err(|e| JournalError::Corrupt {
            path: self.shared.dir.clone(),
            what: format!("a record does not decode: {e}"),
        })
    }

    /// Deletes every record up to and including `seq` (the relay acknowledged them),
    /// keeping their dedup keys for the window. Idempotent; `seq` is capped at the durable
    /// watermark (an ack can only name what was sent). Returns the new `trimmed_through`.
    /// Not flushed by itself: a crash may undo it, and then the records are resent.
    /// Blocking: on the async runtime, call it in `spawn_blocking`.
    pub fn trim_through(&self, seq: u64) -> Result<u64, JournalError> {
        self.trim_through_at(seq, outpost_ops::time::now_ms())
    }

    pub(crate) fn trim_through_at(&self, seq: u64, now: i64) -> Result<u64, JournalError> {
        let mut inner = self.lock();
        let db = self.writable(&mut inner)?;
        let target = seq.min(inner.durable_through);
        if seq > target {
            warn!(
                requested = seq,
                durable_through = target,
                "trim beyond the last stored record ignored"
            );
        }
        loop {
            let mut w = Writer::new(&db, &self.shared.cfg, &self.shared.dir, inner.meta, now);
            let n = w.trim(target, TRIM_CHUNK)?;
            let meta = self.commit(&mut inner, w)?;
            // A separate batch, so the tombstones just written are visible to expiry and the
            // window is back within `max_keys` when this returns.
            // Budget proportional to the records trimmed keeps expiry amortised O(1).
            let mut w = Writer::new(&db, &self.shared.cfg, &self.shared.dir, meta, now);
            w.expire_window(EXPIRE_BUDGET + n as usize)?;
            let meta = self.commit(&mut inner, w)?;
            if n < TRIM_CHUNK || meta.first_seq > target {
                return Ok(meta.trimmed_through);
            }
        }
    }

    /// Lowest seq still held (= [`Journal::next_seq`] when empty): where the uplink
    /// starts after a restart. Cheap, never waits for the writer.
    pub fn first_unacked(&self) -> u64 {
        self.shared.published.stats().first_unacked
    }

    /// The seq the next record will get. Cheap, never waits for the writer.
    pub fn next_seq(&self) -> u64 {
        self.shared.published.stats().next_seq
    }

    /// Highest seq on disk; readers see records up to here. Cheap, never waits for the
    /// writer.
    pub fn durable_through(&self) -> u64 {
        self.shared.published.durable_through()
    }

    /// Counters for the status page and metrics, as of the last change. Cheap, never
    /// waits for the writer.
    pub fn stats(&self) -> JournalStats {
        self.shared.published.stats()
    }

    /// The durable watermark ([`Journal::durable_through`]), to await its next change
    /// instead of polling. Every flush, reopen and new epoch publishes it; it moves back
    /// only when a reopen after an I/O error finds less on disk than was flushed before.
    pub fn watch_durable(&self) -> watch::Receiver<u64> {
        self.shared.published.watch_durable()
    }

    /// The counters ([`Journal::stats`]), republished after every append, flush, trim,
    /// reopen and epoch change; a receiver is woken only when a value changed.
    pub fn watch_stats(&self) -> watch::Receiver<JournalStats> {
        self.shared.published.watch_stats()
    }

    /// Size of sled's files on disk (for comparing with the logical `bytes`).
    pub fn size_on_disk(&self) -> Result<u64, JournalError> {
        let db = self.shared.published.view().db.clone();
        match db {
            Some(db) => db
                .size_on_disk()
                .map_err(|e| JournalError::from_sled(self.shared.dir.clone(), e)),
            None => Err(self.recovering("the journal is closed", false)),
        }
    }

    fn recovering(&self, reason: &str, disk_full: bool) -> JournalError {
        JournalError::Recovering {
            path: self.shared.dir.clone(),
            reason: reason.to_string(),
            disk_full,
        }
    }

    /// The sled handle for a write; reopens first if an I/O error broke the journal.
    fn writable(&self, inner: &mut Inner) -> Result<sled::Db, JournalError> {
        if inner.broken.is_none() {
            if let Some(db) = &inner.db {
                return Ok(db.clone());
            }
        }
        self.reopen(inner)
    }

    /// Drops the sled instance and opens it again from disk: the only way to clear sled
    /// 0.34's sticky I/O error. State (counters, watermark) is reloaded from what is on disk.
    fn reopen(&self, inner: &mut Inner) -> Result<sled::Db, JournalError> {
        let dir = &self.shared.dir;
        inner.db = None;
        // Drops the published handle too: sled lets go of its file lock only when the last
        // handle is gone. Readers get `Recovering` until the reopen is done.
        self.publish(inner);
        let opened = open_store_waiting(dir, &self.shared.cfg, REOPEN_LOCK_WAIT);
        let reopened = match opened {
            Ok((db, meta)) if meta.epoch == inner.meta.epoch => {
                inner.generation += 1;
                inner.durable_through = meta.next_seq - 1;
                inner.meta = meta;
                inner.broken = None;
                inner.db = Some(db.clone());
                info!(path = %dir.display(), next_seq = meta.next_seq, "journal reopened after an I/O error; writing resumes");
                Ok(db)
            }
            Ok((_, meta)) => {
                let what = format!(
                    "its epoch changed from {:016x} to {:016x} while the gateway was running",
                    inner.meta.epoch, meta.epoch
                );
                inner.broken = Some((what.clone(), false));
                Err(JournalError::Corrupt {
                    path: dir.clone(),
                    what,
                })
            }
            Err(e) => {
                let full = e.is_disk_full();
                inner.broken = Some((e.to_string(), full));
                Err(self.recovering(&e.to_string(), full))
            }
        };
        self.publish(inner);
        reopened
    }
}

/// The snapshot readers see of the writer's state (see [`view`]): one lookup for the
/// oldest record's receive time.
fn view_of(inner: &Inner, max_bytes: u64) -> View {
    let m = inner.meta;
    let oldest = if m.records() > 0 {
        inner
            .db
            .as_ref()
            .and_then(|db| db.get(layout::record_key(m.first_seq)).ok().flatten())
            .and_then(|v| cbor::decode_exact::<Record>(&v).ok())
            .map(|r| r.received.wall_ms)
    } else {
        None
    };
    View {
        db: inner.db.clone(),
        generation: inner.generation,
        epoch: m.epoch,
        broken: inner.broken.clone(),
        stats: JournalStats {
            records: m.records(),
            bytes: m.record_bytes,
            window_bytes: m.window_bytes,
            oldest_received_wall_ms: oldest,
            next_seq: m.next_seq,
            trimmed_through: m.trimmed_through,
            first_unacked: m.first_seq,
            durable_through: inner.durable_through,
            dedup_keys: m.dedup_keys,
            dedup_window_keys: m.tombstones,
            evicted: m.evicted,
            max_bytes,
            writable: inner.broken.is_none() && inner.db.is_some(),
        },
    }
}

fn mark_broken(inner: &mut Inner, e: &JournalError) {
    error!(error = %e, "journal write failed; the group is refused and the journal will reopen at the next write");
    inner.broken = Some((e.to_string(), e.is_disk_full()));
}

/// Iterator over durable records, see [`Journal::records`].
pub struct Records {
    iter: Option<sled::Iter>,
    dir: PathBuf,
}

impl Iterator for Records {
    type Item = Result<Record, JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        let kv = self.iter.as_mut()?.next()?;
        Some(match kv {
            Ok((_, v)) => cbor::decode_exact::<Record>(&v).map_err(|e| JournalError::Corrupt {
                path: self.dir.clone(),
                what: format!("a record does not decode: {e}"),
            }),
            Err(e) => Err(JournalError::from_sled(self.dir.clone(), e)),
        })
    }
}

/// Opens sled, waiting up to `lock_wait` for its file lock (our own previous handle may
/// still hold it for a moment, see [`outpost_ops::sled`]), makes whatever it recovered
/// durable, and loads (or creates) the meta. A lock still held at the deadline is
/// [`JournalError::InUse`].
pub(crate) fn open_store_waiting(
    dir: &Path,
    cfg: &JournalConfig,
    lock_wait: Duration,
) -> Result<(sled::Db, Meta), JournalError> {
    let err = |e| JournalError::from_sled(dir.to_path_buf(), e);
    let db = outpost_ops::sled::open_retrying(lock_wait, || {
        sled::Config::new()
            .path(dir)
            .cache_capacity(cfg.cache_capacity_bytes)
            .flush_every_ms(Some(1000))
            .open()
    })
    .map_err(err)?;
    sync_files(dir)?;
    let meta = match db.get(layout::META_KEY).map_err(err)? {
        Some(v) => {
            let meta: Meta = minicbor::decode(&v).map_err(|e| JournalError::Corrupt {
                path: dir.to_path_buf(),
                what: format!("its meta value does not decode: {e}"),
            })?;
            if meta.format != layout::FORMAT_VERSION {
                return Err(JournalError::Format {
                    path: dir.to_path_buf(),
                    found: meta.format,
                    expected: layout::FORMAT_VERSION,
                });
            }
            check_meta(&db, dir, meta)?
        }
        None => {
            if db.first().map_err(err)?.is_some() {
                return Err(JournalError::Corrupt {
                    path: dir.to_path_buf(),
                    what: "it holds data but no journal meta (not an Outpost journal?)".into(),
                });
            }
            let meta = Meta::new(layout::new_epoch(0));
            db.insert(layout::META_KEY, cbor::to_vec(&meta))
                .map_err(err)?;
            db.flush().map_err(err)?;
            sync_files(dir)?;
            meta
        }
    };
    Ok((db, meta))
}

/// fsyncs every file and directory sled keeps in `dir`. After a kill -9, writes of the
/// dead process may sit in the page cache only; they must be on disk before the gateway
/// reports them as stored (a duplicate) or sends them.
fn sync_files(dir: &Path) -> Result<(), JournalError> {
    outpost_ops::file::sync_tree(dir).map_err(|e| JournalError::from_io(e.path, e.source))
}

/// Checks the meta against the first and last record keys; rebuilds it with one scan if
/// they disagree.
fn check_meta(db: &sled::Db, dir: &Path, meta: Meta) -> Result<Meta, JournalError> {
    let err = |e| JournalError::from_sled(dir.to_path_buf(), e);
    let lo = layout::record_key(0);
    let hi = layout::record_key(u64::MAX);
    let first = db.range(lo..=hi).next().transpose().map_err(err)?;
    let last = db.range(lo..=hi).next_back().transpose().map_err(err)?;
    let first = first.and_then(|(k, _)| layout::seq_of_key(&k));
    let last = last.and_then(|(k, _)| layout::seq_of_key(&k));
    let consistent = match (first, last) {
        (Some(f), Some(l)) => f == meta.first_seq && l + 1 == meta.next_seq,
        (None, None) => meta.first_seq == meta.next_seq,
        _ => false,
    };
    if consistent && meta.trimmed_through < meta.next_seq {
        return Ok(meta);
    }
    warn!(path = %dir.display(), "journal meta disagrees with its records; rebuilding the counters with a full scan");
    let rebuilt = rebuild_meta(db, dir, meta)?;
    db.insert(layout::META_KEY, cbor::to_vec(&rebuilt))
        .map_err(err)?;
    db.flush().map_err(err)?;
    sync_files(dir)?;
    Ok(rebuilt)
}

fn rebuild_meta(db: &sled::Db, dir: &Path, old: Meta) -> Result<Meta, JournalError> {
    let err = |e| JournalError::from_sled(dir.to_path_buf(), e);
    let mut m = Meta {
        record_bytes: 0,
        dedup_keys: 0,
        tombstones: 0,
        window_bytes: 0,
        ..old
    };
    let (mut first, mut last, mut count) = (None, None, 0u64);
    for kv in db.scan_prefix([layout::RECORD]) {
        let (k, v) = kv.map_err(err)?;
        let Some(seq) = layout::seq_of_key(&k) else {
            continue;
        };
        first.get_or_insert(seq);
        last = Some(seq);
        count += 1;
        m.record_bytes += layout::record_size(v.len());
    }
    let mut max_tomb = 0u64;
    for kv in db.scan_prefix([layout::TOMB]) {
        let (k, v) = kv.map_err(err)?;
        m.tombstones += 1;
        m.window_bytes += (k.len() + v.len()) as u64;
        max_tomb = max_tomb.max(layout::seq_of_key(&k).unwrap_or(0));
    }
    // A dedup key belongs to a held record if it points at one, else to the window.
    let held_from = first.unwrap_or(u64::MAX);
    for kv in db.scan_prefix([layout::DEDUP]) {
        let (k, v) = kv.map_err(err)?;
        m.dedup_keys += 1;
        let size = layout::dedup_size(k.len());
        match layout::parse_seq_value(&v) {
            Some(seq) if seq >= held_from => m.record_bytes += size,
            _ => m.window_bytes += size,
        }
    }
    match (first, last) {
        (Some(f), Some(l)) => {
            if l - f + 1 != count {
                return Err(JournalError::Corrupt {
                    path: dir.to_path_buf(),
                    what: format!("records {f}..={l} have gaps ({count} present)"),
                });
            }
            m.first_seq = f;
            m.next_seq = l + 1;
            m.trimmed_through = m.trimmed_through.min(f - 1);
        }
        _ => {
            m.next_seq = old.next_seq.max(old.trimmed_through + 1).max(max_tomb + 1);
            m.first_seq = m.next_seq;
            m.trimmed_through = m.trimmed_through.min(m.next_seq - 1);
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests;
