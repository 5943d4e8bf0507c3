//! What goes into the journal and what comes back: a [`Pending`] punch and its [`Outcome`].
//!
//! These are the journal's own types (its [`super::Journal::append`] takes and returns
//! them); the committer and the ingest paths use them from here, so the journal depends on
//! nothing that sits in front of it.

use outpost_protocol::{Punch, Received, RejectCode, Source};

/// A punch on its way to the journal, stamped at arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// The validated punch.
    pub punch: Punch,
    /// When the gateway received it.
    pub received: Received,
    /// Which ingest path it came through.
    pub source: Source,
}

/// What happened to one pending punch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Durably stored under this `gateway_seq`.
    Accepted {
        /// The journal position.
        gateway_seq: u64,
    },
    /// The same (device_id, device_seq) is already in the journal or its dedup window.
    Duplicate,
    /// Not stored: `StorageFull`, `Internal` or `Unavailable`.
    Rejected(RejectCode),
}
