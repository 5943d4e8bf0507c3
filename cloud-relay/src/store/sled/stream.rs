//! The event stream of the sled store (store module docs, "One position space").
//!
//! | key | value |
//! |---|---|
//! | `e` notice_id | [`StoredNotice`] |
//! | `n` notice key | notice_id (big-endian), so an append with a stored key stores nothing |
//!
//! Punch rows (`p`), conflicts (`c`), rejected records (`r`) and notices (`e`) take their
//! ids from sled's one generator under the commit mutex, so their ids are positions in one
//! commit order. A read scans each table from `after + 1` up to the lower of `through`
//! and the durable head (`visible`, sled module docs, "The cursor"), and merges by id:
//! a reader never sees a position while a lower one of any table can still appear.

use std::sync::atomic::Ordering;

use minicbor::{Decode, Encode};
use serde_json::{Map, Value};

use super::{
    be_u64, dec, enc, io, key_u64, Inner, StoredConflict, StoredRejected, StoredRow, T_CONFLICT,
    T_REJECTED, T_ROW,
};
use crate::store::{
    ConflictRow, Notice, PunchRow, RejectedRow, StoreError, StreamItem, StreamQuery, StreamRow,
};

/// Table tag of notices.
const T_NOTICE: u8 = b'e';
/// Table tag of notice keys.
const T_NOTICE_KEY: u8 = b'n';

/// The tables whose ids are stream positions.
pub(super) const TAGS: [u8; 4] = [T_ROW, T_CONFLICT, T_REJECTED, T_NOTICE];

/// A [`Notice`] as stored (value of an `e` key); `fields` is JSON text.
#[derive(Debug, Clone, Encode, Decode)]
struct StoredNotice {
    #[n(0)]
    key: String,
    #[n(1)]
    kind: String,
    #[n(2)]
    output: Option<String>,
    #[n(3)]
    fields: String,
    #[n(4)]
    at_ms: i64,
}

fn notice_key(key: &str) -> Vec<u8> {
    let mut k = vec![T_NOTICE_KEY];
    k.extend_from_slice(key.as_bytes());
    k
}

impl Inner {
    /// [`crate::store::Store::stream`].
    pub(super) fn event_stream(&self, q: StreamQuery) -> Result<Vec<StreamRow>, StoreError> {
        let mut top = self.visible.load(Ordering::SeqCst);
        if let Some(t) = q.through {
            top = top.min(t);
        }
        let from = q.after.map_or(0, |a| a.saturating_add(1));
        let mut out: Vec<StreamRow> = Vec::new();
        if from > top || q.limit == 0 {
            return Ok(out);
        }
        for tag in TAGS {
            let range = self.tree.range(key_u64(tag, from)..=key_u64(tag, top));
            for entry in range.take(q.limit) {
                let (k, v) = entry.map_err(io)?;
                let cursor = be_u64("stream key", &k[1..])?;
                out.push(StreamRow {
                    cursor,
                    item: decode(tag, cursor, &v)?,
                });
            }
        }
        out.sort_unstable_by_key(|r| r.cursor);
        out.truncate(q.limit);
        Ok(out)
    }

    /// [`crate::store::Store::append_notice`]: the notice's id and the write's generation.
    pub(super) fn append_notice(&self, n: &Notice) -> Result<(u64, u64), StoreError> {
        let _guard = self.commit_lock.lock().map_err(|_| StoreError::Io {
            context: "a previous commit panicked".into(),
            source: None,
        })?;
        if let Some(v) = self.tree.get(notice_key(&n.key)).map_err(io)? {
            // Stored already (a retried append); the caller still waits for durability.
            return Ok((
                be_u64("notice key", &v)?,
                self.applied.load(Ordering::SeqCst),
            ));
        }
        let fields = serde_json::to_string(&n.fields)
            .map_err(|e| StoreError::Corrupt(format!("notice fields: {e}")))?;
        let id = self.db.generate_id().map_err(io)?;
        let stored = StoredNotice {
            key: n.key.clone(),
            kind: n.kind.clone(),
            output: n.output.clone(),
            fields,
            at_ms: n.at_ms,
        };
        let mut w = sled::Batch::default();
        w.insert(key_u64(T_NOTICE, id), enc(&stored));
        w.insert(notice_key(&n.key), &id.to_be_bytes()[..]);
        self.tree.apply_batch(w).map_err(io)?;
        // Before `applied`, as in a commit (sled module docs, "The cursor").
        self.applied_head.fetch_max(id, Ordering::SeqCst);
        let generation = self.applied.fetch_add(1, Ordering::SeqCst) + 1;
        Ok((id, generation))
    }
}

/// The stream entry of table `tag`'s value `v`.
fn decode(tag: u8, cursor: u64, v: &[u8]) -> Result<StreamItem, StoreError> {
    Ok(match tag {
        T_ROW => {
            let row: StoredRow = dec("punch row", v)?;
            StreamItem::Punch(PunchRow {
                cursor,
                site_id: row.site_id,
                gateway_id: row.gateway_id,
                journal_epoch: row.journal_epoch,
                record: row.record,
                stored_at_ms: row.stored_at_ms,
                corrected_ms: row.corrected_ms,
            })
        }
        T_CONFLICT => {
            let c: StoredConflict = dec("conflict", v)?;
            StreamItem::Conflict(ConflictRow {
                id: cursor,
                site_id: c.site_id,
                gateway_id: c.gateway_id,
                journal_epoch: c.journal_epoch,
                record: c.record,
                stored_at_ms: c.stored_at_ms,
                kept_cursor: c.extra,
            })
        }
        T_REJECTED => {
            let x: StoredRejected = dec("rejected record", v)?;
            StreamItem::Rejected(RejectedRow {
                id: cursor,
                site_id: x.site_id,
                gateway_id: x.gateway_id,
                journal_epoch: x.journal_epoch,
                record: x.record,
                stored_at_ms: x.stored_at_ms,
                reason: x.extra,
            })
        }
        _ => {
            let n: StoredNotice = dec("notice", v)?;
            let fields: Map<String, Value> = serde_json::from_str(&n.fields)
                .map_err(|e| StoreError::Corrupt(format!("notice fields: {e}")))?;
            StreamItem::Notice(Notice {
                key: n.key,
                kind: n.kind,
                output: n.output,
                fields,
                at_ms: n.at_ms,
            })
        }
    })
}
