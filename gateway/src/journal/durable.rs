//! Real durability on top of sled 0.34.
//!
//! sled 0.34's `flush`/`flush_async` end in `sync_file_range(2)` (`pagecache/iobuf.rs`),
//! which pushes the data to the disk queue but commits neither the file's metadata nor the
//! drive's write cache: it survives a kill -9 (the page cache outlives the process) but not
//! a power cut. Only sled's background flusher calls `fsync`, once per `flush_every_ms`.
//! Acknowledged punches were lost that way, about a second's worth per cut.
//!
//! So after every sled flush that precedes an acknowledgement, [`Durability::sync`] does
//! what sled does not:
//!
//! - **one `fsync` of the log file `db`** (data and the metadata it needs, such as its size):
//!   one per commit group, so group commit keeps its throughput;
//! - **and, only when the set of names under the journal directory changed** since the last
//!   sync (sled created a snapshot, renamed it into place, removed an old one, or wrote a
//!   blob), an fsync of every file and then of every directory
//!   ([`outpost_ops::file::sync_tree`]), so the new names survive too. sled fsyncs a
//!   snapshot before renaming it, so making the rename durable never exposes a torn file.
//!
//! Checking the names costs one `readdir` per group (a handful of entries).

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use outpost_ops::file::{sync_tree, FileError};

/// The fsyncs sled 0.34 leaves out, for one sled directory.
pub(crate) struct Durability {
    dir: PathBuf,
    /// Names (relative paths) under `dir` at the last full sync.
    synced_names: Mutex<BTreeSet<PathBuf>>,
}

impl Durability {
    /// For the sled database in `dir`. The first [`Durability::sync`] syncs everything.
    pub(crate) fn new(dir: &Path) -> Durability {
        Durability {
            dir: dir.to_path_buf(),
            synced_names: Mutex::new(BTreeSet::new()),
        }
    }

    /// Makes everything sled has written so far durable: fsync of `db`, plus files and
    /// directories when names changed. Blocking: call it off the async runtime.
    pub(crate) fn sync(&self) -> Result<(), FileError> {
        let names = names_under(&self.dir).map_err(|source| FileError {
            path: self.dir.clone(),
            source,
        })?;
        let mut synced = self.synced_names.lock().unwrap_or_else(|p| p.into_inner());
        if *synced == names {
            let db = self.dir.join("db");
            return std::fs::File::open(&db)
                .and_then(|f| f.sync_all())
                .map_err(|source| FileError { path: db, source });
        }
        sync_tree(&self.dir)?;
        *synced = names;
        Ok(())
    }
}

/// Every name under `dir`, recursively, relative to it.
fn names_under(dir: &Path) -> io::Result<BTreeSet<PathBuf>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) -> io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            if let Ok(rel) = path.strip_prefix(root) {
                out.insert(rel.to_path_buf());
            }
            if entry.file_type()?.is_dir() {
                walk(root, &path, out)?;
            }
        }
        Ok(())
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_name_triggers_a_full_sync_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        let d = Durability::new(dir.path());
        d.sync().unwrap();
        assert_eq!(d.synced_names.lock().unwrap().len(), 1);
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        std::fs::write(dir.path().join("blobs/1"), b"blob").unwrap();
        d.sync().unwrap();
        assert_eq!(d.synced_names.lock().unwrap().len(), 3);
        d.sync().unwrap();
        std::fs::remove_file(dir.path().join("db")).unwrap();
        d.sync().unwrap(); // a changed set of names: a full sync, which has no `db` to open
        assert!(d.sync().is_err(), "a missing log file is an error");
    }
}
