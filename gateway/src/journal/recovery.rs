//! When a journal cannot be opened: set it aside, start a fresh one, salvage it later.
//!
//! Nobody at a site can repair a box, so a journal that does not open must never stop the
//! gateway from taking punches. [`open_guarded`] runs sled's open (and our checks of what it
//! recovered) under `catch_unwind`, because sled 0.34's recovery can panic on a damaged log
//! ("tried to serialize Uninitialized", an assertion in `segment.rs`). If the journal is
//! unopenable (a panic, corruption, a format this version cannot read), `Journal::open`:
//!
//! 1. renames the directory to `<journal>.set-aside-<unix seconds>` next to it (never
//!    deletes it) and fsyncs the parent directory;
//! 2. opens a fresh journal in its place: a **new epoch**, so the relay never takes its
//!    sequence numbers for resends of the old ones;
//! 3. reports it loudly, at every start until it is salvaged: an error in the log, the
//!    `journal.set_aside` list in `/v1/status`, the `outpost_gateway_journal_set_aside`
//!    gauge in `/metrics` and a warning in `/health/ready` (which stays 200: the box is
//!    taking punches).
//!
//! [`salvage`] (`outpost-gateway salvage PATH`, with the gateway stopped) copies a set-aside
//! journal, opens the copy (the original is never modified), reads every record that
//! decodes, and appends them to the live journal as new records. Punches the live journal
//! already holds come back as duplicates and are stored once; the relay recognises punches
//! it already has by their punch key. When every readable record is back, the directory is
//! renamed to `<journal>.salvaged-<unix seconds>` and the alert clears.
//!
//! Transient problems (the journal in use by another process, a full disk, an I/O error,
//! a bad setting) are not "unopenable": they are reported as errors, and nothing is moved.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use outpost_protocol::{cbor, Record};
use serde::Serialize;
use tracing::{info, warn};

use super::{layout, open_store_waiting, JournalConfig, JournalError, Opened};
use super::{Journal, Outcome, Pending};

/// A journal directory that was moved aside because it could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SetAside {
    /// Where it is now.
    pub path: PathBuf,
}

/// Why an open failed: sled panicked, or returned an error.
#[derive(Debug)]
pub(crate) enum OpenFailure {
    Panicked(String),
    Failed(JournalError),
}

impl std::fmt::Display for OpenFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenFailure::Panicked(m) => write!(f, "sled panicked while opening it: {m}"),
            OpenFailure::Failed(e) => write!(f, "{e}"),
        }
    }
}

impl OpenFailure {
    /// Whether retrying cannot help: the data on disk is what is wrong.
    pub(crate) fn is_unopenable(&self) -> bool {
        match self {
            OpenFailure::Panicked(_) => true,
            OpenFailure::Failed(e) => matches!(
                e,
                JournalError::Corrupt { .. }
                    | JournalError::Storage { .. }
                    | JournalError::Format { .. }
            ),
        }
    }

    /// The error to report for `dir`.
    pub(crate) fn into_error(self, dir: &Path) -> JournalError {
        match self {
            OpenFailure::Panicked(m) => JournalError::Corrupt {
                path: dir.to_path_buf(),
                what: format!("sled panicked while opening it: {m}"),
            },
            OpenFailure::Failed(e) => e,
        }
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Opens the sled journal in `dir`, turning a panic inside sled into an [`OpenFailure`].
pub(crate) fn open_guarded(
    dir: &Path,
    cfg: &JournalConfig,
    wait: std::time::Duration,
) -> Result<Opened, OpenFailure> {
    std::panic::catch_unwind(AssertUnwindSafe(|| open_store_waiting(dir, cfg, wait)))
        .map_err(|p| OpenFailure::Panicked(panic_message(p)))?
        .map_err(OpenFailure::Failed)
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn io_err(e: outpost_ops::file::FileError) -> JournalError {
    JournalError::from_io(e.path, e.source)
}

/// Renames `dir` to a free `<name>.<tag>-<unix seconds>[-n]` next to it and makes the
/// rename durable. Returns the new path.
fn rename_tagged(dir: &Path, from_tag: Option<&str>, tag: &str) -> Result<PathBuf, JournalError> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("journal");
    let base = match from_tag {
        Some(t) => name.split(&format!(".{t}-")).next().unwrap_or(name),
        None => name,
    };
    let stem = format!("{base}.{tag}-{}", unix_secs());
    let mut target = dir.with_file_name(&stem);
    let mut n = 1;
    while target.exists() {
        target = dir.with_file_name(format!("{stem}-{n}"));
        n += 1;
    }
    std::fs::rename(dir, &target).map_err(|e| JournalError::from_io(dir.to_path_buf(), e))?;
    outpost_ops::file::sync_dir(outpost_ops::file::parent_dir(dir)).map_err(io_err)?;
    Ok(target)
}

/// Moves an unopenable journal aside (see the module docs) and leaves a note with the
/// reason inside it.
pub(crate) fn move_aside(dir: &Path, reason: &str) -> Result<PathBuf, JournalError> {
    let target = rename_tagged(dir, None, "set-aside")?;
    let note = format!(
        "This journal could not be opened and was set aside; the gateway started a new one.\nReason: {reason}\nRecover its records with: outpost-gateway salvage {}\n",
        target.display()
    );
    if let Err(e) =
        outpost_ops::file::write_atomic(&target.join("SET-ASIDE.txt"), note.as_bytes(), 0o644)
    {
        warn!(error = %e, "cannot write the note in the set-aside journal");
    }
    Ok(target)
}

/// Set-aside journals of the journal at `dir` that were not salvaged yet, oldest first.
pub(crate) fn find_set_aside(dir: &Path) -> Vec<SetAside> {
    let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let prefix = format!("{name}.set-aside-");
    let parent = outpost_ops::file::parent_dir(dir);
    let mut found: Vec<SetAside> = std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .filter(|e| e.path().is_dir())
        .map(|e| SetAside { path: e.path() })
        .collect();
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// What [`salvage`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SalvageReport {
    /// Records read from the set-aside journal.
    pub read: u64,
    /// Entries that did not decode (skipped).
    pub unreadable: u64,
    /// Stored in the live journal as new records.
    pub accepted: u64,
    /// Already in the live journal (or its dedup window).
    pub duplicates: u64,
    /// Refused by the live journal (full); run salvage again when there is room.
    pub rejected: u64,
    /// Where the set-aside journal went once everything readable was back.
    pub renamed_to: Option<PathBuf>,
}

/// Copies every readable record of the journal directory `from` into `into` (see the
/// module docs). `from` itself is never modified, only renamed at the end. Blocking I/O
/// inside: meant for the CLI, not for a task of the daemon.
pub async fn salvage(from: &Path, into: &Journal) -> Result<SalvageReport, JournalError> {
    if !from.is_dir() {
        return Err(JournalError::Config(format!(
            "{} is not a directory: give the path of a set-aside journal (see `outpost-gateway status`)",
            from.display()
        )));
    }
    let copy = from.with_file_name(format!(
        "{}.salvage-copy",
        from.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("journal")
    ));
    let _ = std::fs::remove_dir_all(&copy);
    copy_dir(from, &copy).map_err(|e| JournalError::from_io(copy.clone(), e))?;
    let result = salvage_copy(&copy, into).await;
    let _ = std::fs::remove_dir_all(&copy);
    let mut report = result?;
    if report.rejected == 0 {
        report.renamed_to = Some(rename_tagged(from, Some("set-aside"), "salvaged")?);
    }
    Ok(report)
}

async fn salvage_copy(copy: &Path, into: &Journal) -> Result<SalvageReport, JournalError> {
    let opened = std::panic::catch_unwind(AssertUnwindSafe(|| {
        sled::Config::new()
            .path(copy)
            .cache_capacity(into.config().cache_capacity_bytes)
            .open()
    }));
    let db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return Err(JournalError::from_sled(copy.to_path_buf(), e)),
        Err(p) => {
            return Err(JournalError::Corrupt {
                path: copy.to_path_buf(),
                what: format!(
                    "sled cannot read it at all ({}); keep the directory for support",
                    panic_message(p)
                ),
            })
        }
    };
    let mut report = SalvageReport::default();
    let mut chunk: Vec<Pending> = Vec::new();
    let mut iter = db.scan_prefix([layout::RECORD]);
    loop {
        let next = std::panic::catch_unwind(AssertUnwindSafe(|| iter.next()));
        match next {
            Ok(Some(Ok((_, v)))) => match cbor::decode_exact::<Record>(&v) {
                Ok(r) => {
                    report.read += 1;
                    chunk.push(Pending {
                        punch: r.punch,
                        received: r.received,
                        source: r.source,
                    });
                }
                Err(_) => report.unreadable += 1,
            },
            Ok(Some(Err(e))) => {
                warn!(error = %e, "salvage: the rest of the set-aside journal cannot be read");
                report.unreadable += 1;
                break;
            }
            Ok(None) => break,
            Err(p) => {
                warn!(panic = %panic_message(p), "salvage: sled panicked reading the set-aside journal; stopping there");
                report.unreadable += 1;
                break;
            }
        }
        if chunk.len() >= 1024 {
            put(into, &mut chunk, &mut report).await?;
        }
    }
    put(into, &mut chunk, &mut report).await?;
    drop(iter);
    drop(db);
    info!(?report, "salvage finished");
    Ok(report)
}

async fn put(
    into: &Journal,
    chunk: &mut Vec<Pending>,
    report: &mut SalvageReport,
) -> Result<(), JournalError> {
    if chunk.is_empty() {
        return Ok(());
    }
    let outcomes = into.append(chunk)?;
    into.flush().await?;
    for o in outcomes {
        match o {
            Outcome::Accepted { .. } => report.accepted += 1,
            Outcome::Duplicate => report.duplicates += 1,
            Outcome::Rejected(_) => report.rejected += 1,
        }
    }
    chunk.clear();
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
