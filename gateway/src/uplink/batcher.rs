//! Building batches from the journal.
//!
//! A batch is the journal's durable records from the session's cursor on, up to
//! `uplink.batch_max_records` records and `uplink.batch_max_bytes` journal bytes, plus the
//! time anchors of the boots those records were stamped in. It is encoded with
//! [`frame::encode_batch_auto`] (zstd, with the protocol's dictionary for small batches).
//!
//! Only durable records are ever read ([`Journal::read_from`] stops at the fsync
//! watermark), so a batch never carries a record that a crash could take back and whose
//! `gateway_seq` would then be reused. Records evicted since the cursor (`drop_oldest`) are
//! skipped: a batch starts at the first record still held, and is always contiguous.
//!
//! When to cut a batch is the session's call ([`ready`]): a full batch's worth is waiting,
//! or the oldest waiting record has waited `uplink.batch_max_age`.

use std::time::Duration;

use bytes::Bytes;
use outpost_protocol::frame;
use outpost_protocol::{Batch, BootId, Id, TimeAnchor};

use crate::journal::Journal;

/// What a batch is made of besides the records.
#[derive(Debug, Clone)]
pub struct BatchHeader {
    /// `gateway.id`.
    pub gateway_id: Id,
    /// `gateway.site`.
    pub site_id: Id,
    /// The journal's epoch.
    pub journal_epoch: u64,
}

/// An encoded batch, ready to send.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `gateway_seq` of the first record (the cursor, for an anchor-only batch).
    pub first: u64,
    /// `gateway_seq` of the last record (`first - 1` when there are none).
    pub last: u64,
    /// Number of records.
    pub records: u64,
    /// The anchors it carries.
    pub anchors: Vec<TimeAnchor>,
    /// The frame.
    pub frame: Bytes,
}

/// Why no batch could be built.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The journal could not be read.
    #[error("cannot read the journal: {0}")]
    Journal(#[from] crate::journal::JournalError),
    /// The frame could not be encoded.
    #[error("cannot encode a batch: {0}")]
    Frame(#[from] frame::FrameError),
}

/// Whether to cut a batch now: `available` durable records wait, the oldest since
/// `waited`.
pub fn ready(available: u64, waited: Duration, max_records: usize, max_age: Duration) -> bool {
    available > 0 && (available >= max_records as u64 || waited >= max_age)
}

/// Reads and encodes the next batch from `from`. `anchors_for` picks the anchors for the
/// boots present. `None` when no durable record is at or after `from`. Blocking (sled
/// reads and zstd): run it on the blocking pool.
pub fn prepare(
    journal: &Journal,
    header: &BatchHeader,
    from: u64,
    max_records: usize,
    max_bytes: usize,
    anchors_for: impl FnOnce(&[BootId]) -> Vec<TimeAnchor>,
) -> Result<Option<Prepared>, BatchError> {
    let records = journal.read_from(from, max_records, max_bytes)?;
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Ok(None);
    };
    let (first, last) = (first.gateway_seq, last.gateway_seq);
    let mut boots: Vec<BootId> = Vec::new();
    for r in &records {
        if !boots.contains(&r.received.boot_id) {
            boots.push(r.received.boot_id);
        }
    }
    let anchors = anchors_for(&boots);
    let n = records.len() as u64;
    let batch = Batch {
        gateway_id: header.gateway_id,
        site_id: header.site_id,
        journal_epoch: header.journal_epoch,
        records,
        anchors: anchors.clone(),
    };
    let frame = frame::encode_batch_auto(&batch)?;
    Ok(Some(Prepared {
        first,
        last,
        records: n,
        anchors,
        frame: Bytes::from(frame),
    }))
}

/// A batch with no records that carries `anchors` (sent when idle, so the relay can
/// correct records it already holds).
pub fn anchors_only(
    header: &BatchHeader,
    cursor: u64,
    anchors: Vec<TimeAnchor>,
) -> Result<Prepared, BatchError> {
    let batch = Batch {
        gateway_id: header.gateway_id,
        site_id: header.site_id,
        journal_epoch: header.journal_epoch,
        records: Vec::new(),
        anchors: anchors.clone(),
    };
    let frame = frame::encode_batch_auto(&batch)?;
    Ok(Prepared {
        first: cursor,
        last: cursor.saturating_sub(1),
        records: 0,
        anchors,
        frame: Bytes::from(frame),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_rules() {
        let age = Duration::from_secs(1);
        assert!(!ready(0, Duration::from_secs(9), 100, age));
        assert!(!ready(5, Duration::from_millis(10), 100, age));
        assert!(ready(5, age, 100, age));
        assert!(ready(100, Duration::ZERO, 100, age));
    }
}
