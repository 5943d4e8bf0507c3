//! Credentials files that the CLI edits while the daemon runs: written atomically
//! ([`write_atomic`]), and noticed by polling their metadata ([`FileWatch`]) so the running
//! daemon reloads them without a restart.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// An I/O error on a named file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FileError {
    /// The file (or directory) the operation failed on.
    pub path: PathBuf,
    /// The I/O error.
    pub source: std::io::Error,
}

fn on(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to `path` atomically ([`replace_atomic`]), creating the directory
/// first if it is missing (credentials files the CLI may write before the daemon ever ran).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = parent_dir(path);
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(on(dir))?;
        // The new directory's name must survive a power cut too.
        sync_dir(parent_dir(dir))?;
    }
    replace_atomic(path, contents, mode)
}

/// Writes `contents` to `path` atomically: a temporary file `.<name>.tmp<pid>` in the same
/// directory (created with `mode`), fsync, rename over `path`, fsync the directory. Readers
/// see the old file or the new one, never half of one, and after a power cut the new one is
/// there or the old one is. The directory must exist: state files inside a daemon's data
/// directory fail rather than recreate a directory that vanished. The error names the file
/// that failed (the directory, the temporary file or `path`).
pub fn replace_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = parent_dir(path);
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(on(&tmp))?;
    f.write_all(contents).map_err(on(&tmp))?;
    f.sync_all().map_err(on(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(on(path))?;
    sync_dir(dir)
}

/// fsyncs the directory `dir` itself, so the creates, renames and unlinks done in it are
/// durable (a file's own fsync does not cover its name).
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(on(dir))
}

/// fsyncs every regular file under `dir` (recursively), then every directory from the
/// deepest up to `dir` itself. A storage library whose own "flush" is not a real fsync
/// (sled 0.34 ends in `sync_file_range`, which survives a crash of the process but not a
/// power cut) is made durable this way: the data of each file and the names that lead to
/// it. Symbolic links are not followed.
pub fn sync_tree(dir: &Path) -> Result<(), FileError> {
    for entry in std::fs::read_dir(dir).map_err(on(dir))? {
        let entry = entry.map_err(on(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(on(&path))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(on(&path))?;
        }
    }
    sync_dir(dir)
}

/// The directory `path` is in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// What identifies one version of a file: modification time, length and inode. A rename
/// (as [`write_atomic`] does) gives a new inode even when the modification time has coarse
/// granularity and the length is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

impl FileStamp {
    /// The stamp of `path`; `None` when it does not exist or cannot be examined.
    pub fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            modified: m.modified().ok()?,
            len: m.len(),
            inode: m.ino(),
        })
    }
}

/// Tells a polling loop whether a file changed since it last looked: cheaper than reading
/// and parsing it every time, and it does not depend on inotify.
#[derive(Debug, Clone)]
pub struct FileWatch {
    path: PathBuf,
    seen: Option<FileStamp>,
}

impl FileWatch {
    /// Starts watching `path` from its current version. Make it *before* reading the file
    /// the first time, so an edit that lands in between counts as a change.
    pub fn new(path: impl Into<PathBuf>) -> FileWatch {
        let path = path.into();
        let seen = FileStamp::of(&path);
        FileWatch { path, seen }
    }

    /// Whether the file is another version than last time (appearing and disappearing
    /// count); remembers the version it saw.
    pub fn changed(&mut self) -> bool {
        let now = FileStamp::of(&self.path);
        if now == self.seen {
            return false;
        }
        self.seen = now;
        true
    }

    /// The watched file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_atomic_replaces_the_file_with_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("creds");
        write_atomic(&p, b"one\n", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "one\n");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        write_atomic(&p, b"two\n", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two\n");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["creds"], "no temporary file is left behind");
    }

    #[test]
    fn write_atomic_names_the_file_that_failed() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, "").unwrap();
        let e = write_atomic(&blocker.join("creds"), b"x", 0o600).unwrap_err();
        assert_eq!(e.path, blocker);
        assert!(e.to_string().contains("not-a-dir"), "{e}");
    }

    #[test]
    fn sync_tree_walks_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), b"x").unwrap();
        std::fs::write(dir.path().join("g"), b"y").unwrap();
        sync_tree(dir.path()).unwrap();
        let err = sync_tree(&dir.path().join("missing")).unwrap_err();
        assert!(err.path.ends_with("missing"));
    }

    #[test]
    fn parent_dir_of_a_bare_name_is_dot() {
        assert_eq!(parent_dir(Path::new("creds")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/creds")), Path::new("/a"));
    }

    #[test]
    fn watch_sees_creation_replacement_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("creds");
        let mut w = FileWatch::new(&p);
        assert_eq!(w.path(), p);
        assert!(!w.changed(), "still missing");
        write_atomic(&p, b"a", 0o600).unwrap();
        assert!(w.changed(), "created");
        assert!(!w.changed(), "asked again, same version");
        // Same length, and possibly the same modification time: the new inode tells.
        write_atomic(&p, b"b", 0o600).unwrap();
        assert!(w.changed(), "replaced");
        std::fs::remove_file(&p).unwrap();
        assert!(w.changed(), "removed");
        assert!(!w.changed());
    }
}
