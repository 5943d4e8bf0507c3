//! Per-terminal upload stamps, persisted so a restarted gateway hands back the right
//! `Stamp` in the handshake.
//!
//! A terminal numbers its uploads with stamps and, after a handshake, pushes only the
//! records newer than the stamp the server returned. The gateway stores the stamp of each
//! table (`ATTLOG`, `OPERLOG`, `ATTPHOTO`) per serial number.
//!
//! ## On disk
//!
//! One small JSON file, `<data_dir>/adms-stamps.json` (not in the journal's sled database,
//! which allows one process and is not needed for this):
//!
//! ```json
//! {"version": 1, "terminals": {"CQUJ230160001": {"attlog": 1716192600, "operlog": 0, "attphoto": 0}}}
//! ```
//!
//! Serial numbers are stored upper-cased.
//!
//! ## Invariants and failures
//!
//! - An ATTLOG stamp is written only **after** the punches of that upload were committed
//!   (fsync returned). So a stored stamp never names records the journal does not hold.
//! - Every write goes to a temporary file (`outpost_ops::file::replace_atomic`), is fsynced,
//!   renamed over the file, and the directory is fsynced: after a crash the file is the old
//!   or the new version.
//! - Writing the file failing (disk full, read-only) loses nothing: the upload was already
//!   committed and answered; the terminal will later resend records the gateway holds,
//!   which are recognised as duplicates. The error is logged.
//! - A missing file means "no stamps yet" (stamp 0: the terminal sends everything it has,
//!   duplicates are dropped). A corrupt file is logged, kept aside as
//!   `adms-stamps.json.corrupt`, and treated as missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use outpost_ops::file::replace_atomic;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::handshake::HandshakeStamps;

/// The file name under the data directory.
pub const FILE_NAME: &str = "adms-stamps.json";

/// Which table a stamp belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StampTable {
    /// Attendance log.
    Attlog,
    /// Operation log (and user, fingerprint records).
    Operlog,
    /// Attendance photos.
    Attphoto,
}

/// Why the stamp file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StampError {
    /// An I/O error on the file or its directory.
    #[error("ADMS stamp file {path}: {source}; check that gateway.data_dir is writable")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    #[serde(default)]
    attlog: u64,
    #[serde(default)]
    operlog: u64,
    #[serde(default)]
    attphoto: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    terminals: BTreeMap<String, Entry>,
}

/// The persisted stamps of every terminal.
#[derive(Debug)]
pub struct StampStore {
    path: PathBuf,
    // Held across the file write, so writes never interleave and the file always holds
    // the latest map.
    map: Mutex<BTreeMap<String, Entry>>,
}

impl StampStore {
    /// Loads `<data_dir>/adms-stamps.json`, creating `data_dir` if needed. A missing file
    /// is an empty store; a corrupt one is set aside and logged.
    pub fn open(data_dir: &Path) -> Result<Self, StampError> {
        let path = data_dir.join(FILE_NAME);
        let io = |source| StampError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let map = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<FileFormat>(&bytes) {
                Ok(f) => f.terminals,
                Err(e) => {
                    let aside = path.with_extension("json.corrupt");
                    tracing::warn!(
                        path = %path.display(), error = %e, kept_as = %aside.display(),
                        "ADMS stamp file is corrupt; terminals will resend what they hold (duplicates are dropped)"
                    );
                    std::fs::rename(&path, &aside).map_err(io)?;
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(e)),
        };
        Ok(StampStore {
            path,
            map: Mutex::new(map),
        })
    }

    /// The file this store writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stamps to hand terminal `sn` (zeros if it never uploaded).
    pub async fn get(&self, sn: &str) -> HandshakeStamps {
        let map = self.map.lock().await;
        let e = map
            .get(&sn.to_ascii_uppercase())
            .copied()
            .unwrap_or_default();
        HandshakeStamps {
            attlog: e.attlog,
            operlog: e.operlog,
            attphoto: e.attphoto,
        }
    }

    /// Records `value` as terminal `sn`'s latest stamp for `table` and writes the file
    /// durably. No write happens when the value is unchanged. A terminal whose stamps
    /// were reset sends smaller values: the latest one is stored, whatever its size.
    pub async fn set(&self, sn: &str, table: StampTable, value: u64) -> Result<(), StampError> {
        let mut map = self.map.lock().await;
        let key = sn.to_ascii_uppercase();
        let mut entry = map.get(&key).copied().unwrap_or_default();
        let slot = match table {
            StampTable::Attlog => &mut entry.attlog,
            StampTable::Operlog => &mut entry.operlog,
            StampTable::Attphoto => &mut entry.attphoto,
        };
        if *slot == value && map.contains_key(&key) {
            return Ok(());
        }
        *slot = value;
        let mut next = map.clone();
        next.insert(key, entry);
        let bytes = serde_json::to_vec(&FileFormat {
            version: 1,
            terminals: next.clone(),
        })
        .unwrap_or_default();
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            replace_atomic(&path, &bytes, 0o644).map_err(|e| e.source)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match written {
            Ok(()) => {
                // Only a durable value becomes the one handed out.
                *map = next;
                Ok(())
            }
            Err(source) => Err(StampError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = StampStore::open(dir.path()).unwrap();
        assert_eq!(s.get("abc").await, HandshakeStamps::default());
        s.set("abc", StampTable::Attlog, 1_716_192_600)
            .await
            .unwrap();
        s.set("ABC", StampTable::Operlog, 9).await.unwrap();
        drop(s);
        let s = StampStore::open(dir.path()).unwrap();
        let got = s.get("Abc").await;
        assert_eq!(got.attlog, 1_716_192_600);
        assert_eq!(got.operlog, 9);
        // Reset terminals send smaller stamps: the latest wins.
        s.set("abc", StampTable::Attlog, 5).await.unwrap();
        assert_eq!(
            StampStore::open(dir.path())
                .unwrap()
                .get("ABC")
                .await
                .attlog,
            5
        );
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE_NAME)]);
    }

    #[tokio::test]
    async fn corrupt_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        let s = StampStore::open(dir.path()).unwrap();
        assert_eq!(s.get("X").await, HandshakeStamps::default());
        assert!(dir.path().join("adms-stamps.json.corrupt").exists());
        s.set("X", StampTable::Attlog, 3).await.unwrap();
        assert_eq!(
            StampStore::open(dir.path()).unwrap().get("X").await.attlog,
            3
        );
    }

    #[tokio::test]
    async fn failed_write_keeps_old_value() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let s = StampStore::open(&data).unwrap();
        s.set("X", StampTable::Attlog, 3).await.unwrap();
        // Make the directory disappear under the store: the write must fail cleanly.
        std::fs::remove_dir_all(&data).unwrap();
        assert!(s.set("X", StampTable::Attlog, 4).await.is_err());
        assert_eq!(s.get("X").await.attlog, 3);
    }
}
