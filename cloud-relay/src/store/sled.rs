//! The embedded store: sled, one process, no database server.
//!
//! ## On-disk layout
//!
//! One sled tree, `relay`, in `<relay.data_dir>/store`. Keys start with a one-byte table
//! tag; identifiers inside keys are length-prefixed (one byte, then UTF-8), numbers are
//! big-endian so that key order is numeric order. Values are CBOR.
//!
//! | key | value |
//! |---|---|
//! | `p` row_id | [`StoredRow`]: the punch, its stream and times (row_id = query cursor) |
//! | `k` site device device_seq | row_id of the punch with that punch key |
//! | `s` gateway epoch | [`StreamState`]: the stored gateway_seq ranges |
//! | `g` gateway | [`GatewayStats`] |
//! | `a` gateway boot_id | the best [`TimeAnchor`] of that boot |
//! | `w` gateway boot_id row_id | empty: the row still waits for a corrected time |
//! | `c` conflict_id | [`StoredConflict`] |
//! | `r` rejected_id | [`StoredRejected`]: an invalid record (module docs of `store`) |
//! | `o` name | an output's state (`outputs`, a private file of this module) |
//! | `e` notice_id | a relay notice (`stream`, a private file of this module) |
//! | `n` notice key | notice_id of the notice with that key (idempotent appends) |
//!
//! Conflict, rejected and notice ids come from the same generator as punch row ids,
//! under the commit mutex: they are positions in the one event stream (store module docs,
//! "One position space"), covered by the durable head like punch rows.
//!
//! ## Commit and failures
//!
//! Commits are serialised by a mutex: the commit reads what it needs, builds one
//! `sled::Batch` (applied atomically: all keys or none), takes the next *write generation*
//! and releases the mutex. It then makes the write durable before returning, and the ack is
//! sent only after that:
//! 1. `flush_async` writes sled's buffers into its files. It ends in `sync_file_range`,
//!    which is not an fsync: the data survives a crash of the process (it is in the page
//!    cache) but not a power cut.
//! 2. [`outpost_ops::file::sync_tree`] of the store directory, on the blocking pool: fsync
//!    of every file sled keeps there (`db`, `conf`, `snap.*`, `blobs/…`) and of every
//!    directory, so the data and the names that lead to it survive a power cut.
//!
//! Flush and sync are grouped: one round runs at a time, under an async mutex that holds
//! the highest generation known durable. A flush started after a write covers it, so a
//! commit that gets the mutex and finds its generation covered (a round that began after
//! its write finished meanwhile) returns without a round of its own; otherwise it runs one
//! round for every write applied so far. Commits that wait while a round runs share the
//! next one: a commit waits for at most two rounds, however many commits arrive.
//!
//! So, after a power cut or a kill:
//! - every acked batch is on disk (flushed and fsynced before its ack);
//! - a batch applied but not yet synced may be lost or kept, whole either way (a batch is
//!   one atomic sled write); it was not acked, so the gateway resends it, and the resend is
//!   stored or recognised as a duplicate;
//! - a failed flush or sync returns an error (no ack). The resend is then a duplicate, but
//!   its commit still writes (the gateway counters), so it gets a newer generation and is
//!   acked only after a later flush and sync succeed, which cover the earlier write too.
//!
//! At open, before sled reads anything, the directory is synced too: a previous process
//! killed with `-9` may have left writes only in the page cache, and this relay must not
//! treat them as stored (and ack their resends as duplicates) while a power cut could
//! still take them away.
//!
//! sled 0.34 can panic while recovering a damaged log (a tail torn by a power cut, a
//! damaged disk). Opening catches the panic and returns [`StoreError::Corrupt`] naming
//! the directory and what to do ([`SledStore::open`]).
//!
//! ## The cursor: row ids in commit order, read up to the durable head
//!
//! A punch's cursor is its row id (store module docs, "The cursor"). Two things could let
//! a reader see a row id while a lower one can still appear, and both are closed here:
//! - *Ids taken apart from the write.* Row ids come from `generate_id` inside the commit
//!   mutex, and the batch is applied before the mutex is released, so commits apply in id
//!   order (a second commit in this process waits for the first).
//! - *A batch seen half applied.* sled 0.34 applies a `sled::Batch` atomically for crash
//!   recovery, but not for concurrent readers: an iterator takes sled's read lock for
//!   each step and may read a leaf from before the batch and the next leaf from after it,
//!   so a scan can see a batch's row 16 without its row 15.
//!
//! So readers do not read up to whatever is applied: they stop at `visible`, the highest
//! row id of the writes known durable. A flush + sync round reads the highest applied row
//! id before it starts (every row up to it is applied, so the round covers it) and raises
//! `visible` to it when it succeeds; the [`Store::subscribe`] channel is raised with it.
//! At open, `visible` is the last row on disk (the directory was synced before reading).
//! A reader therefore sees whole batches, in id order, and only what a power cut cannot
//! take back: a cursor a consumer has seen is never reused or retracted.
//!
//! Queries scan rows in row_id order and filter: fine for the embedded store's scale
//! (use PostgreSQL for big fleets).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use minicbor::{Decode, Encode};
use outpost_protocol::{Batch, BootId, Id, Punch, Record, TimeAnchor};

use super::{
    best_anchors, corrected_time, invalid_reason, Backlog, BoxFuture, CommitOutcome, ConflictRow,
    GatewayInfo, HeldQuery, LeaseGrant, Notice, OutputState, OutputWrite, PunchPage, PunchQuery,
    PunchRow, RejectedRow, SeqRanges, Store, StoreError, StreamQuery, StreamRow, MAX_RANGES,
};

mod outputs;
mod stream;

/// A stored punch (value of a `p` key).
#[derive(Debug, Clone, Encode, Decode)]
struct StoredRow {
    #[n(0)]
    site_id: Id,
    #[n(1)]
    gateway_id: Id,
    #[n(2)]
    journal_epoch: u64,
    #[n(3)]
    record: Record,
    #[n(4)]
    stored_at_ms: i64,
    #[n(5)]
    corrected_ms: Option<i64>,
}

/// The stored gateway_seq ranges of one stream, flat (value of an `s` key).
#[derive(Debug, Clone, Default, Encode, Decode)]
struct StreamState {
    #[n(0)]
    ranges: Vec<u64>,
}

/// Per-gateway counters (value of a `g` key).
#[derive(Debug, Clone, Default, Encode, Decode)]
struct GatewayStats {
    #[n(0)]
    site_id: String,
    #[n(1)]
    last_seen_ms: i64,
    #[n(2)]
    journal_epoch: u64,
    #[n(3)]
    records: u64,
    #[n(4)]
    duplicates: u64,
    #[n(5)]
    conflicts: u64,
    /// Absent in stores written before invalid records were kept (read as 0).
    #[n(6)]
    rejected: Option<u64>,
    /// New punches under reused sequence numbers; absent in stores written before they
    /// were counted (read as 0).
    #[n(7)]
    seq_reuse: Option<u64>,
}

/// A record held aside: a conflicting newcomer (value of a `c` key, `extra` = the cursor of
/// the punch that was kept) or an invalid record (value of an `r` key, `extra` = the reason).
#[derive(Debug, Clone, Encode, Decode)]
struct Held<E> {
    #[n(0)]
    site_id: Id,
    #[n(1)]
    gateway_id: Id,
    #[n(2)]
    journal_epoch: u64,
    #[n(3)]
    record: Record,
    #[n(4)]
    stored_at_ms: i64,
    #[n(5)]
    extra: E,
}

/// A conflicting newcomer: `extra` is the kept punch's cursor.
type StoredConflict = Held<u64>;
/// An invalid record: `extra` is why.
type StoredRejected = Held<String>;

const T_ROW: u8 = b'p';
const T_PUNCH_KEY: u8 = b'k';
const T_STREAM: u8 = b's';
const T_GATEWAY: u8 = b'g';
const T_ANCHOR: u8 = b'a';
const T_WAITING: u8 = b'w';
const T_CONFLICT: u8 = b'c';
const T_REJECTED: u8 = b'r';

fn push_id(k: &mut Vec<u8>, id: &str) {
    // Ids are at most 64 bytes (outpost_protocol::MAX_ID_LEN), so the length fits a byte.
    k.push(id.len().min(255) as u8);
    k.extend_from_slice(id.as_bytes());
}

fn key_u64(tag: u8, n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(tag);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn punch_key(site: &Id, p: &Punch) -> Vec<u8> {
    let mut k = vec![T_PUNCH_KEY];
    push_id(&mut k, site.as_str());
    push_id(&mut k, p.device_id.as_str());
    k.extend_from_slice(&p.device_seq.to_be_bytes());
    k
}

fn stream_key(gw: &str, epoch: u64) -> Vec<u8> {
    let mut k = vec![T_STREAM];
    push_id(&mut k, gw);
    k.extend_from_slice(&epoch.to_be_bytes());
    k
}

fn gateway_key(gw: &str) -> Vec<u8> {
    let mut k = vec![T_GATEWAY];
    push_id(&mut k, gw);
    k
}

fn boot_key(tag: u8, gw: &str, boot: &BootId) -> Vec<u8> {
    let mut k = vec![tag];
    push_id(&mut k, gw);
    k.extend_from_slice(&boot.0);
    k
}

fn enc<T: Encode<()>>(v: &T) -> Vec<u8> {
    // Encoding into a Vec cannot fail for these types.
    minicbor::to_vec(v).unwrap_or_default()
}

fn dec<'b, T: Decode<'b, ()>>(what: &str, bytes: &'b [u8]) -> Result<T, StoreError> {
    minicbor::decode(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn be_u64(what: &str, b: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(b)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt(format!("{what}: expected 8 bytes")))
}

fn io(e: sled::Error) -> StoreError {
    StoreError::io("sled", e)
}

/// The sled store. Cheap to clone.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

/// How long [`SledStore::open`] waits for another handle to release the database lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

struct Inner {
    db: sled::Db,
    tree: sled::Tree,
    /// The store directory, synced by [`sync_store_dir`] after each flush.
    dir: PathBuf,
    /// Serialises commits (see the module docs).
    commit_lock: Mutex<()>,
    /// Serialises output state writes (compare-and-set; `outputs`).
    outputs_lock: Mutex<()>,
    /// The generation of the last applied write, taken right after the write was applied
    /// (under `commit_lock` or `outputs_lock`): a flush that starts after reading it
    /// covers every write up to it.
    applied: AtomicU64,
    /// The highest generation known durable (flushed and fsynced). Held for the whole
    /// flush + sync, so that one round runs at a time and waiting commits share the next.
    durable: tokio::sync::Mutex<u64>,
    /// Flush + sync rounds done (tests check the grouping).
    syncs: AtomicU64,
    /// The highest row id applied (raised under `commit_lock`, before `applied`).
    applied_head: AtomicU64,
    /// The highest row id readers may see: every row up to it is durable (module docs,
    /// "The cursor").
    visible: AtomicU64,
    /// Wakes [`Store::subscribe`] receivers with `visible`.
    head_tx: tokio::sync::watch::Sender<u64>,
}

/// How often [`sync_store_dir`] walks the directory when a file vanished under it (sled
/// renames and deletes its snapshot files while it runs).
const SYNC_ATTEMPTS: usize = 5;

/// [`outpost_ops::file::sync_tree`] of the store directory, walked again when a file it
/// listed was renamed or removed before it could be opened (a vanished file needs no
/// fsync, but its replacement and the directory's new entries do).
fn sync_store_dir(dir: &Path) -> Result<(), StoreError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match outpost_ops::file::sync_tree(dir) {
            Ok(()) => return Ok(()),
            Err(e)
                if attempt < SYNC_ATTEMPTS
                    && e.source.kind() == std::io::ErrorKind::NotFound
                    && dir.is_dir() => {}
            Err(e) => {
                return Err(StoreError::io(
                    format!("cannot fsync the sled store in {}", dir.display()),
                    e,
                ))
            }
        }
    }
}

/// The text of a caught panic.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}

/// Runs `f` (sled's open and first reads), turning a panic into [`StoreError::Corrupt`]:
/// sled 0.34 panics on some damaged logs instead of returning an error, and the relay must
/// report that, not crash.
fn no_panic<T>(dir: &Path, f: impl FnOnce() -> T) -> Result<T, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        StoreError::Corrupt(format!(
            "the sled store in {dir} cannot be opened: sled panicked while recovering it \
             ({msg}), its files are damaged: move {dir} aside (keep it: punches this relay \
             already acknowledged are only there, the gateways have trimmed them) and \
             restart: the relay starts with an empty store, and each gateway resends only \
             what the relay had not acknowledged",
            dir = dir.display(),
            msg = panic_text(payload.as_ref()),
        ))
    })
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. `cache_bytes` bounds sled's page cache.
    ///
    /// sled holds a file lock; a store closed a moment ago in this process may still hold
    /// it (its flusher thread lets go on its next tick), so a lock conflict is retried for
    /// [`LOCK_WAIT`] before it is reported.
    ///
    /// An existing directory is fsynced ([`outpost_ops::file::sync_tree`]) before sled
    /// reads it. A panic of sled's recovery or of the first reads (a damaged log) is
    /// returned as [`StoreError::Corrupt`] naming the directory and what to do; it never
    /// unwinds into the caller.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let existed = dir.is_dir();
        if existed {
            // Before sled reads anything (module docs, "Commit and failures").
            sync_store_dir(dir)?;
        }
        let opened = no_panic(dir, || {
            outpost_ops::sled::open_retrying(LOCK_WAIT, || {
                sled::Config::new()
                    .path(dir)
                    .cache_capacity(cache_bytes)
                    .open()
            })
        })?;
        let db = opened.map_err(|e| {
            StoreError::io(
                format!(
                    "cannot open sled store in {} (is another relay using this relay.data_dir?)",
                    dir.display()
                ),
                e,
            )
        })?;
        // The first reads walk to both ends of the recovered tree: sled may panic there too.
        let tree = no_panic(dir, || -> Result<sled::Tree, sled::Error> {
            let tree = db.open_tree("relay")?;
            tree.first()?;
            tree.last()?;
            Ok(tree)
        })?
        .map_err(|e| {
            StoreError::io(
                format!("cannot read the sled store in {}", dir.display()),
                e,
            )
        })?;
        // Everything on disk was synced above (or is new): visible from the start. The
        // head is the last id of every table of the event stream.
        let mut head = 0;
        for tag in stream::TAGS {
            let last = no_panic(dir, || {
                tree.range(key_u64(tag, 0)..vec![tag + 1])
                    .next_back()
                    .transpose()
            })?
            .map_err(|e| {
                StoreError::io(
                    format!("cannot read the sled store in {}", dir.display()),
                    e,
                )
            })?;
            if let Some((k, _)) = last {
                head = head.max(be_u64("row key", &k[1..])?);
            }
        }
        if !existed {
            // A new store: its files, and its own name in the parent directory.
            db.flush().map_err(io)?;
            sync_store_dir(dir)?;
            outpost_ops::file::sync_dir(outpost_ops::file::parent_dir(dir))
                .map_err(|e| StoreError::io("cannot fsync the sled store's parent", e))?;
        }
        Ok(SledStore {
            inner: Arc::new(Inner {
                db,
                tree,
                dir: dir.to_path_buf(),
                commit_lock: Mutex::new(()),
                outputs_lock: Mutex::new(()),
                applied: AtomicU64::new(0),
                durable: tokio::sync::Mutex::new(0),
                syncs: AtomicU64::new(0),
                applied_head: AtomicU64::new(head),
                visible: AtomicU64::new(head),
                head_tx: tokio::sync::watch::Sender::new(head),
            }),
        })
    }

    /// Makes every write up to `generation` durable (module docs, "Commit and failures"):
    /// returns at once when a round that started after that write has completed, else
    /// flushes and syncs once for every write applied so far. `force` runs a round
    /// whatever (shutdown).
    async fn make_durable(&self, generation: u64, force: bool) -> Result<(), StoreError> {
        let mut durable = self.inner.durable.lock().await;
        if !force && *durable >= generation {
            return Ok(());
        }
        // Every write up to `target` was applied before this flush starts, so it covers them;
        // `head` is read after `target` and each commit raises it before `applied`, so
        // it covers at least the rows of those writes (module docs, "The cursor").
        let target = self.inner.applied.load(Ordering::SeqCst);
        let head = self.inner.applied_head.load(Ordering::SeqCst);
        self.inner.db.flush_async().await.map_err(io)?;
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || sync_store_dir(&dir))
            .await
            .map_err(|e| StoreError::io("store sync task failed", e))??;
        self.inner.syncs.fetch_add(1, Ordering::Relaxed);
        *durable = (*durable).max(target);
        self.inner.visible.fetch_max(head, Ordering::SeqCst);
        super::raise_head(&self.inner.head_tx, head);
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::io("store task failed", e))?
    }
}

impl Inner {
    fn row(&self, id: u64) -> Result<Option<StoredRow>, StoreError> {
        match self.tree.get(key_u64(T_ROW, id)).map_err(io)? {
            Some(v) => Ok(Some(dec("punch row", &v)?)),
            None => Ok(None),
        }
    }

    fn anchor(&self, gw: &str, boot: &BootId) -> Result<Option<TimeAnchor>, StoreError> {
        match self.tree.get(boot_key(T_ANCHOR, gw, boot)).map_err(io)? {
            Some(v) => Ok(Some(dec("anchor", &v)?)),
            None => Ok(None),
        }
    }

    fn stream(&self, gw: &str, epoch: u64) -> Result<SeqRanges, StoreError> {
        match self.tree.get(stream_key(gw, epoch)).map_err(io)? {
            Some(v) => {
                let s: StreamState = dec("stream", &v)?;
                SeqRanges::from_flat(&s.ranges)
                    .ok_or_else(|| StoreError::Corrupt("stream ranges".into()))
            }
            None => Ok(SeqRanges::default()),
        }
    }

    /// Builds and applies the batch's writes; returns the outcome and the write's
    /// generation, which the caller makes durable.
    fn apply(&self, batch: &Batch, now_ms: i64) -> Result<(CommitOutcome, u64), StoreError> {
        let _guard = self
            .commit_lock
            .lock()
            // A PoisonError borrows the lock's guard, so it cannot be kept as a source.
            .map_err(|_| StoreError::Io {
                context: "a previous commit panicked".into(),
                source: None,
            })?;
        let gw = batch.gateway_id.as_str();
        let mut out = CommitOutcome::default();
        let mut w = sled::Batch::default();
        let mut ranges = self.stream(gw, batch.journal_epoch)?;

        // Anchors: keep the best per boot; a boot that had none may have rows waiting.
        let mut anchors: HashMap<BootId, Option<TimeAnchor>> = HashMap::new();
        for a in best_anchors(&batch.anchors) {
            let old = self.anchor(gw, &a.boot_id)?;
            let keep = match old {
                Some(o) if !super::anchor_is_better(&o, &a) => o,
                _ => {
                    w.insert(boot_key(T_ANCHOR, gw, &a.boot_id), enc(&a));
                    a
                }
            };
            if old.is_none() {
                for item in self.tree.scan_prefix(boot_key(T_WAITING, gw, &a.boot_id)) {
                    let (k, _) = item.map_err(io)?;
                    let id = be_u64("waiting key", &k[k.len().saturating_sub(8)..])?;
                    if let Some(mut row) = self.row(id)? {
                        row.corrected_ms = corrected_time(&row.record.received, Some(&keep));
                        w.insert(key_u64(T_ROW, id), enc(&row));
                        out.corrected_later += 1;
                    }
                    w.remove(k);
                }
            }
            anchors.insert(a.boot_id, Some(keep));
        }

        // Punch keys first seen in this batch: key -> (row id, punch).
        let mut fresh: HashMap<Vec<u8>, (u64, Punch)> = HashMap::new();
        // gateway_seq values of new punches under a stored primary key.
        let mut reused = SeqRanges::default();
        // The highest id this batch took (punch, conflict or rejected): its stream head.
        let mut max_id = 0u64;
        for r in &batch.records {
            let reuse = ranges.contains(r.gateway_seq);
            // A stored primary key is a resend unless its punch is new (store module docs,
            // "Sequence-number reuse"); only these records pay for the punch-key lookup.
            if reuse
                && (invalid_reason(r).is_some()
                    || (!fresh.contains_key(&punch_key(&batch.site_id, &r.punch))
                        && self
                            .tree
                            .contains_key(punch_key(&batch.site_id, &r.punch))
                            .map_err(io)?))
            {
                out.duplicates += 1;
                continue;
            }
            if let Some(reason) = invalid_reason(r) {
                let x = StoredRejected {
                    site_id: batch.site_id,
                    gateway_id: batch.gateway_id,
                    journal_epoch: batch.journal_epoch,
                    record: *r,
                    stored_at_ms: now_ms,
                    extra: reason,
                };
                let rid = self.db.generate_id().map_err(io)?;
                max_id = max_id.max(rid);
                w.insert(key_u64(T_REJECTED, rid), enc(&x));
                out.rejected += 1;
                continue;
            }
            let pk = punch_key(&batch.site_id, &r.punch);
            let existing = match fresh.get(&pk) {
                Some(&(id, p)) => Some((id, p)),
                None => match self.tree.get(&pk).map_err(io)? {
                    Some(v) => {
                        let id = be_u64("punch key", &v)?;
                        let row = self
                            .row(id)?
                            .ok_or_else(|| StoreError::Corrupt(format!("row {id} missing")))?;
                        Some((id, row.record.punch))
                    }
                    None => None,
                },
            };
            match existing {
                Some((_, p)) if p == r.punch => out.duplicates += 1,
                Some((kept, _)) => {
                    let c = StoredConflict {
                        site_id: batch.site_id,
                        gateway_id: batch.gateway_id,
                        journal_epoch: batch.journal_epoch,
                        record: *r,
                        stored_at_ms: now_ms,
                        extra: kept,
                    };
                    let cid = self.db.generate_id().map_err(io)?;
                    max_id = max_id.max(cid);
                    w.insert(key_u64(T_CONFLICT, cid), enc(&c));
                    out.conflicts += 1;
                }
                None => {
                    let boot = r.received.boot_id;
                    let anchor = match anchors.get(&boot) {
                        Some(a) => *a,
                        None => {
                            let a = if r.received.clock_synced {
                                None
                            } else {
                                self.anchor(gw, &boot)?
                            };
                            if !r.received.clock_synced {
                                anchors.insert(boot, a);
                            }
                            a
                        }
                    };
                    let id = self.db.generate_id().map_err(io)?;
                    max_id = max_id.max(id);
                    let row = StoredRow {
                        site_id: batch.site_id,
                        gateway_id: batch.gateway_id,
                        journal_epoch: batch.journal_epoch,
                        record: *r,
                        stored_at_ms: now_ms,
                        corrected_ms: corrected_time(&r.received, anchor.as_ref()),
                    };
                    if row.corrected_ms.is_none() {
                        let mut k = boot_key(T_WAITING, gw, &boot);
                        k.extend_from_slice(&id.to_be_bytes());
                        w.insert(k, &[][..]);
                    }
                    w.insert(key_u64(T_ROW, id), enc(&row));
                    w.insert(pk.clone(), &id.to_be_bytes()[..]);
                    fresh.insert(pk, (id, r.punch));
                    out.stored += 1;
                    if reuse {
                        out.seq_reuse += 1;
                        reused.insert(r.gateway_seq, r.gateway_seq);
                    }
                }
            }
        }
        if let (Some(first), Some(last)) = (batch.records.first(), batch.records.last()) {
            ranges.insert(first.gateway_seq, last.gateway_seq);
            if ranges.len() > MAX_RANGES {
                return Err(StoreError::TooManyGaps {
                    gateway_id: gw.to_string(),
                    journal_epoch: batch.journal_epoch,
                });
            }
            w.insert(
                stream_key(gw, batch.journal_epoch),
                enc(&StreamState {
                    ranges: ranges.to_flat(),
                }),
            );
        }
        out.acked_through = ranges.watermark();

        let gkey = gateway_key(gw);
        let mut stats: GatewayStats = match self.tree.get(&gkey).map_err(io)? {
            Some(v) => dec("gateway stats", &v)?,
            None => GatewayStats::default(),
        };
        stats.site_id = batch.site_id.as_str().to_string();
        stats.last_seen_ms = now_ms;
        stats.journal_epoch = batch.journal_epoch;
        stats.records += u64::from(out.stored);
        stats.duplicates += u64::from(out.duplicates);
        stats.conflicts += u64::from(out.conflicts);
        stats.rejected = Some(stats.rejected.unwrap_or(0) + u64::from(out.rejected));
        stats.seq_reuse = Some(stats.seq_reuse.unwrap_or(0) + u64::from(out.seq_reuse));
        w.insert(gkey, enc(&stats));

        self.tree.apply_batch(w).map_err(io)?;
        if !reused.is_empty() {
            super::warn_seq_reuse(gw, batch.journal_epoch, &reused);
        }
        // Before `applied`: a round that sees this generation sees these rows (module docs).
        self.applied_head.fetch_max(max_id, Ordering::SeqCst);
        let generation = self.applied.fetch_add(1, Ordering::SeqCst) + 1;
        Ok((out, generation))
    }

    fn punches(&self, q: &PunchQuery) -> Result<PunchPage, StoreError> {
        let start = key_u64(T_ROW, q.after.map_or(0, |a| a.saturating_add(1)));
        // Never past the durable head (module docs, "The cursor").
        let end = key_u64(T_ROW, self.visible.load(Ordering::SeqCst));
        let mut page = PunchPage::default();
        if start > end {
            return Ok(page);
        }
        for item in self.tree.range(start..=end) {
            let (k, v) = item.map_err(io)?;
            let id = be_u64("row key", &k[1..])?;
            let row: StoredRow = dec("punch row", &v)?;
            let p = &row.record.punch;
            let keep = q.site.as_deref().is_none_or(|s| s == row.site_id.as_str())
                && in_sites(&q.sites, &row.site_id)
                && q.device
                    .as_deref()
                    .is_none_or(|d| d == p.device_id.as_str())
                && q.subject
                    .as_deref()
                    .is_none_or(|s| s == p.subject_id.as_str())
                && q.from_ms.is_none_or(|f| p.device_time_ms >= f)
                && q.to_ms.is_none_or(|t| p.device_time_ms < t);
            if !keep {
                continue;
            }
            if page.items.len() == q.limit {
                page.next_cursor = page.items.last().map(|r| r.cursor);
                break;
            }
            page.items.push(PunchRow {
                cursor: id,
                site_id: row.site_id,
                gateway_id: row.gateway_id,
                journal_epoch: row.journal_epoch,
                record: row.record,
                stored_at_ms: row.stored_at_ms,
                corrected_ms: row.corrected_ms,
            });
        }
        Ok(page)
    }

    fn gateways(&self) -> Result<Vec<GatewayInfo>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([T_GATEWAY]) {
            let (k, v) = item.map_err(io)?;
            let s: GatewayStats = dec("gateway stats", &v)?;
            let gw = String::from_utf8_lossy(k.get(2..).unwrap_or_default()).into_owned();
            let acked_through = self.stream(&gw, s.journal_epoch)?.watermark();
            out.push(GatewayInfo {
                gateway_id: gw,
                site_id: s.site_id,
                last_seen_ms: s.last_seen_ms,
                journal_epoch: s.journal_epoch,
                acked_through,
                records: s.records,
                duplicates: s.duplicates,
                conflicts: s.conflicts,
                rejected: s.rejected.unwrap_or(0),
                seq_reuse: s.seq_reuse.unwrap_or(0),
            });
        }
        out.sort_by(|a, b| a.gateway_id.cmp(&b.gateway_id));
        Ok(out)
    }

    /// The values of table `tag` (keys `tag` + u64 id) after `q.after` that `keep`, at most
    /// `q.limit`: rows `keep` refuses do not count towards the limit.
    fn scan_ids<T: for<'b> Decode<'b, ()>>(
        &self,
        tag: u8,
        what: &str,
        q: &HeldQuery,
        keep: impl Fn(&T) -> bool,
    ) -> Result<Vec<(u64, T)>, StoreError> {
        let start = key_u64(tag, q.after.map_or(0, |a| a.saturating_add(1)));
        let mut out = Vec::new();
        for item in self.tree.range(start..vec![tag + 1]) {
            if out.len() == q.limit {
                break;
            }
            let (k, v) = item.map_err(io)?;
            let row: T = dec(what, &v)?;
            if keep(&row) {
                out.push((be_u64(what, &k[1..])?, row));
            }
        }
        Ok(out)
    }

    fn conflicts(&self, q: &HeldQuery) -> Result<Vec<ConflictRow>, StoreError> {
        let rows = self.scan_ids::<StoredConflict>(T_CONFLICT, "conflict", q, |c| {
            in_sites(&q.sites, &c.site_id)
        })?;
        Ok(rows
            .into_iter()
            .map(|(id, c)| ConflictRow {
                id,
                site_id: c.site_id,
                gateway_id: c.gateway_id,
                journal_epoch: c.journal_epoch,
                record: c.record,
                stored_at_ms: c.stored_at_ms,
                kept_cursor: c.extra,
            })
            .collect())
    }

    fn rejected(&self, q: &HeldQuery) -> Result<Vec<RejectedRow>, StoreError> {
        let rows = self.scan_ids::<StoredRejected>(T_REJECTED, "rejected record", q, |x| {
            in_sites(&q.sites, &x.site_id)
        })?;
        Ok(rows
            .into_iter()
            .map(|(id, x)| RejectedRow {
                id,
                site_id: x.site_id,
                gateway_id: x.gateway_id,
                journal_epoch: x.journal_epoch,
                record: x.record,
                stored_at_ms: x.stored_at_ms,
                reason: x.extra,
            })
            .collect())
    }
}

/// Whether a row of `site` passes a query's `sites` filter (`None`: every site).
fn in_sites(sites: &Option<Vec<String>>, site: &Id) -> bool {
    sites
        .as_ref()
        .is_none_or(|s| s.iter().any(|x| x == site.as_str()))
}

impl Store for SledStore {
    fn kind(&self) -> &'static str {
        "sled"
    }

    fn commit(
        &self,
        batch: Batch,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<CommitOutcome, StoreError>> {
        Box::pin(async move {
            let (out, generation) = self.blocking(move |i| i.apply(&batch, now_ms)).await?;
            self.make_durable(generation, false).await?;
            Ok(out)
        })
    }

    fn punches(&self, query: PunchQuery) -> BoxFuture<'_, Result<PunchPage, StoreError>> {
        Box::pin(self.blocking(move |i| i.punches(&query)))
    }

    fn gateways(&self) -> BoxFuture<'_, Result<Vec<GatewayInfo>, StoreError>> {
        Box::pin(self.blocking(|i| i.gateways()))
    }

    fn conflicts(&self, q: HeldQuery) -> BoxFuture<'_, Result<Vec<ConflictRow>, StoreError>> {
        Box::pin(self.blocking(move |i| i.conflicts(&q)))
    }

    fn rejected(&self, q: HeldQuery) -> BoxFuture<'_, Result<Vec<RejectedRow>, StoreError>> {
        Box::pin(self.blocking(move |i| i.rejected(&q)))
    }

    fn stream(&self, q: StreamQuery) -> BoxFuture<'_, Result<Vec<StreamRow>, StoreError>> {
        Box::pin(self.blocking(move |i| i.event_stream(q)))
    }

    fn append_notice(&self, notice: Notice) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let (pos, generation) = self.blocking(move |i| i.append_notice(&notice)).await?;
            self.make_durable(generation, false).await?;
            Ok(pos)
        })
    }

    fn head(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        let head = self.inner.visible.load(Ordering::SeqCst);
        Box::pin(async move { Ok(head) })
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.head_tx.subscribe()
    }

    fn cursor_before(
        &self,
        stored_before_ms: i64,
    ) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        Box::pin(self.cursor_before_of(stored_before_ms))
    }

    fn backlog<'a>(
        &'a self,
        after: Option<u64>,
        sites: &'a [String],
    ) -> BoxFuture<'a, Result<Backlog, StoreError>> {
        Box::pin(self.backlog_of(after, sites))
    }

    fn output_state<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<OutputState, StoreError>> {
        Box::pin(self.output_state_of(name))
    }

    fn output_write<'a>(
        &'a self,
        name: &'a str,
        write: OutputWrite,
    ) -> BoxFuture<'a, Result<Option<OutputState>, StoreError>> {
        Box::pin(self.output_write_of(name, write))
    }

    fn output_lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        _ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<LeaseGrant, StoreError>> {
        Box::pin(self.output_lease_of(name, holder))
    }

    fn output_release<'a>(
        &'a self,
        _name: &'a str,
        _holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        // Nothing to hand over: no other process can open this store meanwhile.
        Box::pin(async { Ok(()) })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            // An embedded store is ready once open; check that it still answers reads.
            self.blocking(|i| i.tree.first().map(|_| ()).map_err(io))
                .await
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let applied = self.inner.applied.load(Ordering::SeqCst);
            self.make_durable(applied, true).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::{PunchKind, Received, Source, VerifyMethod};

    /// A batch of gateway `gw`, epoch 1, with records `seqs` (device `dev-<gw>`,
    /// device_seq = gateway_seq).
    fn test_batch(gw: &str, seqs: std::ops::RangeInclusive<u64>) -> Batch {
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
                    boot_id: BootId([7; 16]),
                    mono_ms: n,
                    wall_ms: 1_795_327_200_000 + n as i64 * 60_000,
                    clock_synced: true,
                },
                source: Source::Mqtt,
            })
            .collect();
        Batch {
            gateway_id: Id::new(gw).unwrap(),
            site_id: Id::new("HC001").unwrap(),
            journal_epoch: 1,
            records,
            anchors: Vec::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_commits_share_one_flush_and_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("store"), 1 << 20).unwrap();
        let one = store.commit(test_batch("gw-0", 1..=3), 0).await.unwrap();
        assert_eq!(one.stored, 3);
        assert_eq!(store.inner.syncs.load(Ordering::SeqCst), 1);
        // Hold the sync mutex as if a round were running; five commits apply meanwhile.
        let held = store.inner.durable.lock().await;
        let mut tasks = Vec::new();
        for g in 1..=5 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.commit(test_batch(&format!("gw-{g}"), 1..=10), 0).await
            }));
        }
        while store.inner.applied.load(Ordering::SeqCst) < 6 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(
            tasks.iter().all(|t| !t.is_finished()),
            "no ack before the sync"
        );
        drop(held);
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().stored, 10);
        }
        // The first waiter's round covered all five writes; the others found them durable.
        assert_eq!(store.inner.syncs.load(Ordering::SeqCst), 2);
        assert_eq!(*store.inner.durable.lock().await, 6);
        store.close().await.unwrap();
        assert_eq!(store.inner.syncs.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_panic_while_opening_is_a_corrupt_error() {
        let dir = Path::new("/var/lib/outpost-relay/store");
        let e = no_panic(dir, || -> u32 {
            panic!("tried to serialize Uninitialized")
        })
        .unwrap_err();
        assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("/var/lib/outpost-relay/store"), "{text}");
        assert!(text.contains("tried to serialize Uninitialized"), "{text}");
        assert!(
            text.contains("move /var/lib/outpost-relay/store aside"),
            "{text}"
        );
        assert_eq!(no_panic(dir, || 7).unwrap(), 7);
    }

    /// `GatewayStats` as written before the `rejected` counter existed.
    #[derive(Encode)]
    struct GatewayStatsV1 {
        #[n(0)]
        site_id: String,
        #[n(1)]
        last_seen_ms: i64,
        #[n(2)]
        journal_epoch: u64,
        #[n(3)]
        records: u64,
        #[n(4)]
        duplicates: u64,
        #[n(5)]
        conflicts: u64,
    }

    #[test]
    fn gateway_stats_written_before_rejected_existed_still_decode() {
        let old = enc(&GatewayStatsV1 {
            site_id: "HC001".into(),
            last_seen_ms: 7,
            journal_epoch: 3,
            records: 10,
            duplicates: 2,
            conflicts: 1,
        });
        let s: GatewayStats = dec("gateway stats", &old).unwrap();
        assert_eq!(
            (s.records, s.conflicts, s.rejected, s.seq_reuse),
            (10, 1, None, None)
        );
    }

    /// A store whose `db` log was cut short or overwritten (as a power cut tears a log
    /// written without real fsyncs): opening returns an error, it never panics. sled 0.34
    /// panics ("tried to serialize Uninitialized") on some of these cuts, and recovers an
    /// empty or shorter tree from others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_torn_log_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = SledStore::open(&path, 1 << 20).unwrap();
        for i in 0..50u64 {
            let b = test_batch("gw", i * 100 + 1..=i * 100 + 100);
            store.commit(b, 0).await.unwrap();
        }
        store.close().await.unwrap();
        drop(store);
        let db = std::fs::read(path.join("db")).unwrap();
        let mut errors = Vec::new();
        for (n, cut) in [2, 3, 4, 5].into_iter().enumerate() {
            let at = db.len() / cut;
            let mut torn = db.clone();
            if n % 2 == 0 {
                torn.truncate(at);
            } else {
                torn[at..].fill(0x5A);
            }
            let copy = dir.path().join(format!("copy-{cut}"));
            std::fs::create_dir(&copy).unwrap();
            std::fs::copy(path.join("conf"), copy.join("conf")).unwrap();
            std::fs::write(copy.join("db"), &torn).unwrap();
            // A panic that escaped would fail this test.
            match SledStore::open(&copy, 1 << 20) {
                Ok(s) => drop(s),
                Err(e) => errors.push((copy, e)),
            }
        }
        assert!(!errors.is_empty(), "some cut must be detected");
        for (copy, e) in errors {
            assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}");
            let text = e.to_string();
            assert!(
                text.contains(&format!("move {} aside", copy.display())),
                "{text}"
            );
        }
    }
}
