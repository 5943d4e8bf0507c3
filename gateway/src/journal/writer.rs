//! Building one atomic sled batch: new records, trims, evictions and dedup-window expiry.
//!
//! A [`Writer`] starts from the current [`Meta`], reads the tree as it was before the
//! batch, queues every change in one `sled::Batch` together with the updated meta, and
//! [`Writer::commit`]s it with a single `apply_batch`. Either all of it is applied or none.
//! The caller holds the journal's mutex for the whole time, so no other writer interleaves.

use std::collections::HashSet;

use outpost_protocol::{cbor, Record};
use tracing::warn;

use super::layout::{self, Meta};
use super::{JournalConfig, JournalError};

/// Upper bound on window expirations done as a side effect of one append or trim, so
/// expiry stays incremental (no full scans on the hot path).
pub(crate) const EXPIRE_BUDGET: usize = 256;

/// One pending batch.
pub(crate) struct Writer<'a> {
    tree: &'a sled::Tree,
    cfg: &'a JournalConfig,
    path: &'a std::path::Path,
    now_ms: i64,
    batch: sled::Batch,
    /// The meta after the queued changes.
    pub(crate) meta: Meta,
    /// `next_seq` when the batch started: records below it exist in the tree.
    start_next_seq: u64,
    /// Tombstones below this seq have been expired in this batch.
    tomb_cursor: u64,
    /// Dedup keys deleted in this batch (no longer duplicates).
    removed_dedup: HashSet<Vec<u8>>,
    /// Dedup keys added in this batch.
    added_dedup: HashSet<Vec<u8>>,
    /// Records evicted in this batch.
    pub(crate) evicted: u64,
    dirty: bool,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(
        tree: &'a sled::Tree,
        cfg: &'a JournalConfig,
        path: &'a std::path::Path,
        meta: Meta,
        now_ms: i64,
    ) -> Self {
        Writer {
            tree,
            cfg,
            path,
            now_ms,
            batch: sled::Batch::default(),
            meta,
            start_next_seq: meta.next_seq,
            tomb_cursor: 0,
            removed_dedup: HashSet::new(),
            added_dedup: HashSet::new(),
            evicted: 0,
            dirty: false,
        }
    }

    fn sled_err(&self, e: sled::Error) -> JournalError {
        JournalError::from_sled(self.path.to_path_buf(), e)
    }

    /// Whether a punch with this dedup key is already known (in the tree or this batch).
    pub(crate) fn is_duplicate(&self, dedup_key: &[u8]) -> Result<bool, JournalError> {
        if self.added_dedup.contains(dedup_key) {
            return Ok(true);
        }
        if self.removed_dedup.contains(dedup_key) {
            return Ok(false);
        }
        self.tree
            .contains_key(dedup_key)
            .map_err(|e| self.sled_err(e))
    }

    /// Queues a new record under `meta.next_seq`; the caller checked dedup and quota.
    pub(crate) fn insert_record(&mut self, record_value: Vec<u8>, dedup_key: Vec<u8>) {
        let seq = self.meta.next_seq;
        // A record's dedup key counts with the record until the record is trimmed.
        self.meta.record_bytes +=
            layout::record_size(record_value.len()) + layout::dedup_size(dedup_key.len());
        self.meta.dedup_keys += 1;
        self.meta.next_seq += 1;
        self.batch.insert(&layout::record_key(seq), record_value);
        self.batch.insert(dedup_key.as_slice(), &seq.to_be_bytes());
        self.removed_dedup.remove(&dedup_key);
        self.added_dedup.insert(dedup_key);
        self.dirty = true;
    }

    /// Checks that `need` more bytes fit under `journal.max_bytes`; with `drop_oldest`,
    /// evicts the oldest records that existed before this batch until they do. `false`
    /// if they do not fit.
    pub(crate) fn make_room(&mut self, need: u64) -> Result<bool, JournalError> {
        while self.meta.record_bytes + need > self.cfg.max_bytes {
            if self.cfg.on_full == super::OnFull::DropOldest && self.evict_oldest()? {
                continue;
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// Forgets trimmed keys that are past the window's age or count, up to `budget`.
    pub(crate) fn expire_window(&mut self, budget: usize) -> Result<usize, JournalError> {
        let max_age_ms =
            i64::try_from(self.cfg.dedup_window.max_age.as_millis()).unwrap_or(i64::MAX);
        let mut done = 0;
        while done < budget {
            let Some((seq, at, _)) = self.peek_tomb()? else {
                break;
            };
            let over_count = self.meta.tombstones > self.cfg.dedup_window.max_keys;
            let too_old = at.saturating_add(max_age_ms) < self.now_ms;
            if !(over_count || too_old) {
                break;
            }
            self.expire_tomb(seq)?;
            done += 1;
        }
        Ok(done)
    }

    fn peek_tomb(&self) -> Result<Option<(u64, i64, Vec<u8>)>, JournalError> {
        let lo = layout::tomb_key(self.tomb_cursor);
        let hi = layout::tomb_key(u64::MAX);
        let Some(kv) = self.tree.range(lo..=hi).next() else {
            return Ok(None);
        };
        let (k, v) = kv.map_err(|e| self.sled_err(e))?;
        let seq = layout::seq_of_key(&k)
            .ok_or_else(|| self.corrupt("a tombstone key has the wrong length"))?;
        let (at, dk) = layout::parse_tomb_value(&v)
            .ok_or_else(|| self.corrupt("a tombstone value is too short"))?;
        Ok(Some((seq, at, dk.to_vec())))
    }

    /// Deletes tombstone `seq` and, if it still points there, its dedup key.
    fn expire_tomb(&mut self, seq: u64) -> Result<(), JournalError> {
        let tk = layout::tomb_key(seq);
        let v = self.tree.get(tk).map_err(|e| self.sled_err(e))?;
        let Some(v) = v else { return Ok(()) };
        let (_, dk) = layout::parse_tomb_value(&v)
            .ok_or_else(|| self.corrupt("a tombstone value is too short"))?;
        self.batch.remove(&tk);
        self.meta.tombstones = self.meta.tombstones.saturating_sub(1);
        let size = layout::tomb_size(dk.len()) + layout::dedup_size(dk.len());
        self.meta.window_bytes = self.meta.window_bytes.saturating_sub(size);
        self.remove_dedup_if(dk, seq)?;
        self.tomb_cursor = seq + 1;
        self.dirty = true;
        Ok(())
    }

    fn remove_dedup_if(&mut self, dk: &[u8], seq: u64) -> Result<(), JournalError> {
        if self.added_dedup.contains(dk) || self.removed_dedup.contains(dk) {
            return Ok(());
        }
        let cur = self.tree.get(dk).map_err(|e| self.sled_err(e))?;
        if cur.as_deref().and_then(layout::parse_seq_value) == Some(seq) {
            self.batch.remove(dk);
            self.meta.dedup_keys = self.meta.dedup_keys.saturating_sub(1);
            self.removed_dedup.insert(dk.to_vec());
        }
        Ok(())
    }

    /// Evicts the oldest record that existed before this batch; `false` if there is none.
    fn evict_oldest(&mut self) -> Result<bool, JournalError> {
        let seq = self.meta.first_seq;
        if seq >= self.start_next_seq {
            return Ok(false);
        }
        let rk = layout::record_key(seq);
        if let Some(v) = self.tree.get(rk).map_err(|e| self.sled_err(e))? {
            self.meta.record_bytes = self
                .meta
                .record_bytes
                .saturating_sub(layout::record_size(v.len()));
            match cbor::decode_exact::<Record>(&v) {
                Ok(rec) => {
                    let dk = layout::dedup_key(&rec.punch);
                    self.meta.record_bytes = self
                        .meta
                        .record_bytes
                        .saturating_sub(layout::dedup_size(dk.len()));
                    self.remove_dedup_if(&dk, seq)?;
                }
                Err(e) => {
                    warn!(gateway_seq = seq, error = %e, "evicting an undecodable journal record")
                }
            }
            self.batch.remove(&rk);
        }
        self.meta.first_seq = seq + 1;
        self.meta.evicted += 1;
        self.evicted += 1;
        self.dirty = true;
        Ok(true)
    }

    /// Deletes records `first_seq..=through`, leaving a tombstone with each dedup key.
    /// Processes at most `max` records; returns how many it removed.
    pub(crate) fn trim(&mut self, through: u64, max: u64) -> Result<u64, JournalError> {
        let mut n = 0;
        while self.meta.first_seq <= through && self.meta.first_seq < self.start_next_seq && n < max
        {
            let seq = self.meta.first_seq;
            let rk = layout::record_key(seq);
            if let Some(v) = self.tree.get(rk).map_err(|e| self.sled_err(e))? {
                self.meta.record_bytes = self
                    .meta
                    .record_bytes
                    .saturating_sub(layout::record_size(v.len()));
                match cbor::decode_exact::<Record>(&v) {
                    Ok(rec) => {
                        let dk = layout::dedup_key(&rec.punch);
                        self.batch
                            .insert(&layout::tomb_key(seq), layout::tomb_value(self.now_ms, &dk));
                        self.meta.tombstones += 1;
                        // The dedup key moves from the record's account to the window's.
                        let dsize = layout::dedup_size(dk.len());
                        self.meta.record_bytes = self.meta.record_bytes.saturating_sub(dsize);
                        self.meta.window_bytes += layout::tomb_size(dk.len()) + dsize;
                    }
                    // Without the punch there is no dedup key to remember; the record still
                    // goes (the relay has it).
                    Err(e) => {
                        warn!(gateway_seq = seq, error = %e, "trimming an undecodable journal record")
                    }
                }
                self.batch.remove(&rk);
            }
            self.meta.first_seq = seq + 1;
            n += 1;
            self.dirty = true;
        }
        // Records below first_seq are gone (trimmed now, earlier, or evicted).
        let acked = through.min(self.meta.first_seq - 1);
        if acked > self.meta.trimmed_through {
            self.meta.trimmed_through = acked;
            self.dirty = true;
        }
        Ok(n)
    }

    fn corrupt(&self, what: &str) -> JournalError {
        JournalError::Corrupt {
            path: self.path.to_path_buf(),
            what: what.to_string(),
        }
    }

    /// Applies everything queued, with the new meta, in one atomic batch. A no-op when
    /// nothing changed.
    pub(crate) fn commit(mut self) -> Result<Meta, (Meta, JournalError)> {
        if !self.dirty {
            return Ok(self.meta);
        }
        self.batch
            .insert(layout::META_KEY, cbor::to_vec(&self.meta));
        match self.tree.apply_batch(self.batch) {
            Ok(()) => Ok(self.meta),
            Err(e) => Err((
                self.meta,
                JournalError::from_sled(self.path.to_path_buf(), e),
            )),
        }
    }
}
