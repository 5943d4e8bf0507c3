//! Time anchors: where this gateway's monotonic clock met true time.
//!
//! Every ack carries the relay's clock (`server_time_ms`). The batch it answers was sent at
//! monotonic `t0` and the ack arrived at `t1`, so the relay's reading was taken somewhere in
//! between: the anchor is `(boot_id, mono = (t0 + t1) / 2, true = server_time_ms,
//! uncertainty = (t1 − t0) / 2)`. Per boot the anchor with the smallest uncertainty is
//! kept (as the relay does). Batches carry the anchors of the boots their records come
//! from, plus this boot's, and the relay corrects the receive time of records stamped while
//! the wall clock was not trusted.
//!
//! # Persistence
//!
//! The latest [`MAX_BOOTS`] boots' anchors live in `<data_dir>/uplink-anchors.json`
//! (written to a temp file, fsynced, renamed), so records journaled in an earlier boot can
//! still be corrected after a reboot. The file is rewritten only when a boot gets its first
//! anchor or one at least twice as precise, so an SD card sees a handful of writes per boot.
//! A missing or unreadable file only means those old boots have no anchor (logged).

use std::path::{Path, PathBuf};

use outpost_protocol::{BootId, TimeAnchor};
use serde::{Deserialize, Serialize};

/// Boots whose anchors are kept.
pub const MAX_BOOTS: usize = 8;

/// The file name in the data dir.
pub const FILE_NAME: &str = "uplink-anchors.json";

#[derive(Debug, Clone, Copy)]
struct Entry {
    best: TimeAnchor,
    /// Uncertainty of the best anchor of this boot the relay has acknowledged receiving.
    told: Option<u32>,
    /// Uncertainty of the anchor last written to the file.
    saved: Option<u32>,
}

/// The anchors of the latest boots, this one included.
#[derive(Debug)]
pub struct Anchors {
    path: PathBuf,
    current: BootId,
    /// Oldest first; at most [`MAX_BOOTS`].
    entries: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
struct FileAnchor {
    boot_id: String,
    mono_ms: u64,
    true_ms: i64,
    uncertainty_ms: u32,
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    anchors: Vec<FileAnchor>,
}

/// `true` when `new` is worth telling or saving over `old`: the first, or twice as precise.
fn much_better(old: Option<u32>, new: u32) -> bool {
    match old {
        None => true,
        Some(o) => new < o / 2,
    }
}

impl Anchors {
    /// Loads the file in `data_dir` (a missing or damaged file gives no old anchors).
    pub fn load(data_dir: &Path, current: BootId) -> Anchors {
        let path = data_dir.join(FILE_NAME);
        let mut a = Anchors {
            path,
            current,
            entries: Vec::new(),
        };
        match std::fs::read(&a.path) {
            Ok(bytes) => match serde_json::from_slice::<FileFormat>(&bytes) {
                Ok(f) => {
                    for fa in f.anchors {
                        let Some(boot_id) = hex::decode(&fa.boot_id)
                            .ok()
                            .and_then(|b| <[u8; 16]>::try_from(b).ok())
                        else {
                            continue;
                        };
                        let best = TimeAnchor {
                            boot_id: BootId(boot_id),
                            mono_ms: fa.mono_ms,
                            true_ms: fa.true_ms,
                            uncertainty_ms: fa.uncertainty_ms,
                        };
                        a.entries.retain(|e| e.best.boot_id != best.boot_id);
                        a.entries.push(Entry {
                            best,
                            told: None,
                            saved: Some(best.uncertainty_ms),
                        });
                    }
                    let excess = a.entries.len().saturating_sub(MAX_BOOTS);
                    a.entries.drain(..excess);
                }
                Err(e) => tracing::warn!(path = %a.path.display(), error = %e,
                    "the time anchors file is damaged; records of earlier boots may stay uncorrected"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %a.path.display(), error = %e, "cannot read the time anchors file")
            }
        }
        a
    }

    fn entry(&self, boot: &BootId) -> Option<&Entry> {
        self.entries.iter().find(|e| e.best.boot_id == *boot)
    }

    /// The best anchor of this boot.
    pub fn current(&self) -> Option<TimeAnchor> {
        self.entry(&self.current).map(|e| e.best)
    }

    /// Takes a new observation; returns `true` when the file should be rewritten.
    pub fn observe(&mut self, a: TimeAnchor) -> bool {
        match self
            .entries
            .iter_mut()
            .find(|e| e.best.boot_id == a.boot_id)
        {
            Some(e) => {
                if a.uncertainty_ms < e.best.uncertainty_ms {
                    e.best = a;
                }
                much_better(e.saved, e.best.uncertainty_ms)
            }
            None => {
                self.entries.push(Entry {
                    best: a,
                    told: None,
                    saved: None,
                });
                if self.entries.len() > MAX_BOOTS {
                    // Drop the oldest boot that is not this one.
                    if let Some(i) = self
                        .entries
                        .iter()
                        .position(|e| e.best.boot_id != self.current)
                    {
                        self.entries.remove(i);
                    }
                }
                true
            }
        }
    }

    /// The anchors a batch with records of `boots` should carry: each of those boots' best,
    /// and this boot's.
    pub fn for_batch(&self, boots: &[BootId]) -> Vec<TimeAnchor> {
        select(&self.all(), self.current, boots)
    }

    /// The best anchor of every boot known.
    pub fn all(&self) -> Vec<TimeAnchor> {
        self.entries.iter().map(|e| e.best).collect()
    }

    /// Anchors the relay has not heard of yet, or has only a much worse one of: worth an
    /// anchor-only batch when there is nothing else to send. Empty when all is told.
    pub fn untold(&self) -> Vec<TimeAnchor> {
        self.entries
            .iter()
            .filter(|e| much_better(e.told, e.best.uncertainty_ms))
            .map(|e| e.best)
            .collect()
    }

    /// Records that the relay acknowledged a batch carrying `sent`.
    pub fn mark_told(&mut self, sent: &[TimeAnchor]) {
        for a in sent {
            if let Some(e) = self
                .entries
                .iter_mut()
                .find(|e| e.best.boot_id == a.boot_id)
            {
                e.told = Some(e.told.map_or(a.uncertainty_ms, |t| t.min(a.uncertainty_ms)));
            }
        }
    }

    /// What to write to the file (call [`Anchors::saved`] after a successful write).
    pub fn snapshot(&self) -> (PathBuf, Vec<u8>) {
        let f = FileFormat {
            version: 1,
            anchors: self
                .entries
                .iter()
                .map(|e| FileAnchor {
                    boot_id: hex::encode(e.best.boot_id.0),
                    mono_ms: e.best.mono_ms,
                    true_ms: e.best.true_ms,
                    uncertainty_ms: e.best.uncertainty_ms,
                })
                .collect(),
        };
        // Serialising plain structs to JSON cannot fail.
        let bytes = serde_json::to_vec_pretty(&f).unwrap_or_default();
        (self.path.clone(), bytes)
    }

    /// Marks the current anchors as written.
    pub fn saved(&mut self) {
        for e in &mut self.entries {
            e.saved = Some(e.best.uncertainty_ms);
        }
    }
}

/// Of `all`, the anchors of `current` and of `boots`.
pub fn select(all: &[TimeAnchor], current: BootId, boots: &[BootId]) -> Vec<TimeAnchor> {
    all.iter()
        .filter(|a| a.boot_id == current || boots.contains(&a.boot_id))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anchor(boot: u8, unc: u32) -> TimeAnchor {
        TimeAnchor {
            boot_id: BootId([boot; 16]),
            mono_ms: 1000,
            true_ms: 1_800_000_000_000,
            uncertainty_ms: unc,
        }
    }

    #[test]
    fn keeps_best_tells_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Anchors::load(dir.path(), BootId([1; 16]));
        assert!(a.current().is_none() && a.untold().is_empty());
        assert!(a.observe(anchor(1, 100)));
        a.saved();
        assert!(
            !a.observe(anchor(1, 80)),
            "not twice as precise since the save"
        );
        assert_eq!(a.current().unwrap().uncertainty_ms, 80);
        assert_eq!(a.untold().len(), 1);
        a.mark_told(&[anchor(1, 80)]);
        assert!(a.untold().is_empty());
        assert!(!a.observe(anchor(1, 60)));
        assert!(a.untold().is_empty());
        assert!(a.observe(anchor(1, 10)));
        assert_eq!(a.untold().len(), 1);
        let (path, bytes) = a.snapshot();
        outpost_ops::file::replace_atomic(&path, &bytes, 0o644).unwrap();
        a.saved();

        // Next boot: the old boot's anchor is there, and goes with that boot's records.
        let b = Anchors::load(dir.path(), BootId([2; 16]));
        assert!(b.current().is_none());
        assert_eq!(b.for_batch(&[BootId([1; 16])]), vec![anchor(1, 10)]);
        assert!(b.for_batch(&[BootId([3; 16])]).is_empty());
        assert_eq!(b.untold().len(), 1, "loaded anchors are announced once");
    }

    #[test]
    fn bounded_and_tolerant() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "{broken").unwrap();
        let mut a = Anchors::load(dir.path(), BootId([0; 16]));
        a.observe(anchor(0, 5));
        for boot in 1..20 {
            a.observe(anchor(boot, 5));
        }
        assert_eq!(a.entries.len(), MAX_BOOTS);
        assert!(a.current().is_some(), "this boot is never dropped");
        let cur = a.current().unwrap();
        let off = crate::clock::wall_error_ms(&cur, 2000, 1_800_000_000_000).unwrap();
        assert_eq!((off, cur.uncertainty_ms), (1000, 5));
    }
}
