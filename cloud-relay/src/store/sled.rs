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
//!
//! ## Commit and failures
//!
//! Commits are serialised by a mutex: the commit reads what it needs, builds one
//! `sled::Batch` (applied atomically: all keys or none), releases the mutex, then waits for
//! `flush_async` before returning. The ack is sent only after that returns, so:
//! - a crash before `apply_batch` leaves nothing of the batch;
//! - a crash after it but before the flush may lose the batch, which was not acked, and the
//!   gateway resends it;
//! - a failed flush returns an error (no ack); a resend is then recognised as a duplicate
//!   and acked only after a later flush succeeds, which covers the earlier writes too.
//!
//! Queries scan rows in row_id order and filter: fine for the embedded store's scale
//! (use PostgreSQL for big fleets).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use minicbor::{Decode, Encode};
use outpost_protocol::{Batch, BootId, Id, Punch, Record, TimeAnchor};

use super::{
    best_anchors, corrected_time, invalid_reason, BoxFuture, CommitOutcome, ConflictRow,
    GatewayInfo, PunchPage, PunchQuery, PunchRow, RejectedRow, SeqRanges, Store, StoreError,
    MAX_RANGES,
};

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
    StoreError::Io(e.to_string())
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
    /// Serialises commits (see the module docs).
    commit_lock: Mutex<()>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. `cache_bytes` bounds sled's page cache.
    ///
    /// sled holds a file lock; a store closed a moment ago in this process may still hold
    /// it (its flusher thread lets go on its next tick), so a lock conflict is retried for
    /// [`LOCK_WAIT`] before it is reported.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match sled::Config::new()
                .path(dir)
                .cache_capacity(cache_bytes)
                .open()
            {
                Ok(db) => break db,
                Err(e)
                    if std::time::Instant::now() < deadline
                        && e.to_string().contains("acquire lock") =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(StoreError::Io(format!(
                        "cannot open sled store in {}: {e} (is another relay using this relay.data_dir?)",
                        dir.display()
                    )))
                }
            }
        };
        let tree = db.open_tree("relay").map_err(io)?;
        Ok(SledStore {
            inner: Arc::new(Inner {
                db,
                tree,
                commit_lock: Mutex::new(()),
            }),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Io(format!("store task failed: {e}")))?
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

    /// Builds and applies the batch's writes; the caller flushes.
    fn apply(&self, batch: &Batch, now_ms: i64) -> Result<CommitOutcome, StoreError> {
        let _guard = self
            .commit_lock
            .lock()
            .map_err(|_| StoreError::Io("a previous commit panicked".into()))?;
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
        for r in &batch.records {
            if ranges.contains(r.gateway_seq) {
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
        w.insert(gkey, enc(&stats));

        self.tree.apply_batch(w).map_err(io)?;
        Ok(out)
    }

    fn punches(&self, q: &PunchQuery) -> Result<PunchPage, StoreError> {
        let start = key_u64(T_ROW, q.after.map_or(0, |a| a.saturating_add(1)));
        let end = [T_ROW + 1];
        let mut page = PunchPage::default();
        for item in self.tree.range(start..end[..].to_vec()) {
            let (k, v) = item.map_err(io)?;
            let id = be_u64("row key", &k[1..])?;
            let row: StoredRow = dec("punch row", &v)?;
            let p = &row.record.punch;
            let keep = q.site.as_deref().is_none_or(|s| s == row.site_id.as_str())
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
            });
        }
        out.sort_by(|a, b| a.gateway_id.cmp(&b.gateway_id));
        Ok(out)
    }

    /// The values of table `tag` (keys `tag` + u64 id) after `after`, at most `limit`.
    fn scan_ids<T: for<'b> Decode<'b, ()>>(
        &self,
        tag: u8,
        what: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, T)>, StoreError> {
        let start = key_u64(tag, after.map_or(0, |a| a.saturating_add(1)));
        let mut out = Vec::new();
        for item in self.tree.range(start..vec![tag + 1]).take(limit) {
            let (k, v) = item.map_err(io)?;
            out.push((be_u64(what, &k[1..])?, dec(what, &v)?));
        }
        Ok(out)
    }

    fn conflicts(&self, after: Option<u64>, limit: usize) -> Result<Vec<ConflictRow>, StoreError> {
        let rows = self.scan_ids::<StoredConflict>(T_CONFLICT, "conflict", after, limit)?;
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

    fn rejected(&self, after: Option<u64>, limit: usize) -> Result<Vec<RejectedRow>, StoreError> {
        let rows = self.scan_ids::<StoredRejected>(T_REJECTED, "rejected record", after, limit)?;
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
            let out = self.blocking(move |i| i.apply(&batch, now_ms)).await?;
            self.inner.db.flush_async().await.map_err(io)?;
            Ok(out)
        })
    }

    fn punches(&self, query: PunchQuery) -> BoxFuture<'_, Result<PunchPage, StoreError>> {
        Box::pin(self.blocking(move |i| i.punches(&query)))
    }

    fn gateways(&self) -> BoxFuture<'_, Result<Vec<GatewayInfo>, StoreError>> {
        Box::pin(self.blocking(|i| i.gateways()))
    }

    fn conflicts(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<ConflictRow>, StoreError>> {
        Box::pin(self.blocking(move |i| i.conflicts(after, limit)))
    }

    fn rejected(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<RejectedRow>, StoreError>> {
        Box::pin(self.blocking(move |i| i.rejected(after, limit)))
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
            self.inner.db.flush_async().await.map_err(io)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!((s.records, s.conflicts, s.rejected), (10, 1, None));
    }
}
