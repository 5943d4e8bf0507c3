//! Journal errors, and how each maps to a device-facing [`RejectCode`].

use std::io;
use std::path::PathBuf;

use outpost_protocol::RejectCode;

/// Why a journal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Another process (normally the running gateway) holds the journal's lock.
    #[error("the journal at {path} is in use by a running gateway; stop it or use the admin API")]
    InUse {
        /// The journal directory.
        path: PathBuf,
    },
    /// The disk (or its quota) is full: ENOSPC or EDQUOT. Writing resumes by itself once
    /// space is freed.
    #[error("the disk holding the journal at {path} is full ({source}); free space on that filesystem, or lower journal.max_bytes so the quota is reached first")]
    DiskFull {
        /// The journal directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Any other I/O error from sled or the filesystem.
    #[error("I/O error in the journal at {path}: {source}; check the disk and the gateway.data_dir permissions")]
    Io {
        /// The journal directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// sled reported a problem that is not plain I/O.
    #[error("storage error in the journal at {path}: {message}")]
    Storage {
        /// The journal directory.
        path: PathBuf,
        /// sled's description.
        message: String,
    },
    /// The data on disk is not what this version wrote.
    #[error("the journal at {path} is corrupt or foreign: {what}; move it aside (export it first with `outpost-gateway export`) and restart")]
    Corrupt {
        /// The journal directory.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The journal was written by a newer or unknown format.
    #[error("the journal at {path} has format version {found}, this gateway reads version {expected}; run a gateway version that matches, or export and move the journal aside")]
    Format {
        /// The journal directory.
        path: PathBuf,
        /// Version found on disk.
        found: u32,
        /// Version this code reads.
        expected: u32,
    },
    /// The configuration is not usable.
    #[error("{0}")]
    Config(String),
    /// An earlier I/O error closed the journal and reopening it has not succeeded yet.
    #[error("the journal at {path} is recovering from an earlier I/O error: {reason}")]
    Recovering {
        /// The journal directory.
        path: PathBuf,
        /// Why the last reopen failed.
        reason: String,
        /// Whether the cause is a full disk.
        disk_full: bool,
    },
}

impl JournalError {
    /// The rejection a device gets when its punch could not be stored because of this.
    pub fn reject_code(&self) -> RejectCode {
        match self {
            JournalError::DiskFull { .. }
            | JournalError::Recovering {
                disk_full: true, ..
            } => RejectCode::StorageFull,
            _ => RejectCode::Internal,
        }
    }

    /// `true` for errors that mean the disk is full.
    pub fn is_disk_full(&self) -> bool {
        self.reject_code() == RejectCode::StorageFull
    }

    /// Converts a sled error, recognising the lock conflict and ENOSPC.
    pub(crate) fn from_sled(path: PathBuf, e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) => Self::from_io(path, io),
            sled::Error::Corruption { at, .. } => JournalError::Corrupt {
                path,
                what: format!("sled found corruption at {at:?}"),
            },
            sled::Error::Unsupported(m) | sled::Error::ReportableBug(m) => {
                JournalError::Storage { path, message: m }
            }
            other => JournalError::Storage {
                path,
                message: other.to_string(),
            },
        }
    }

    /// Converts an I/O error. sled 0.34 re-creates stored errors from their kind and Debug
    /// text (losing the raw errno), so both are checked.
    pub(crate) fn from_io(path: PathBuf, io: io::Error) -> Self {
        if outpost_ops::sled::is_lock_error_io(&io) {
            return JournalError::InUse { path };
        }
        let text = format!("{io:?}");
        let full = io.kind() == io::ErrorKind::StorageFull
            || matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
            || text.contains("code: 28,")
            || text.contains("code: 122,");
        if full {
            JournalError::DiskFull { path, source: io }
        } else {
            JournalError::Io { path, source: io }
        }
    }
}
