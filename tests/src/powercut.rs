//! Shared helpers for the power-cut tests (`tests/tests/powercut_*.rs`): the run's seed
//! (re-exported from [`crate::seed`]), a [`PowerCutFs`] mounted in a temp dir, data
//! directories that exist durably on it, and short summaries of cut reports and logs.
//!
//! The processes under test keep their data on the mount and their logs off it (a cut
//! would rewind the log too). A cut is taken only after every process using the mount was
//! killed with SIGKILL; the test then restarts them and checks what survived.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use outpost_powercut::{CutMode, CutReport, PowerCutFs};
use rand::seq::SliceRandom;

pub use crate::seed::{rng, test_seed, TestRng};

/// `per_mode` cycles of every [`CutMode`], in an order shuffled by `rng`.
pub fn mode_schedule(per_mode: usize, rng: &mut TestRng) -> Vec<CutMode> {
    let mut modes: Vec<CutMode> = (0..per_mode).flat_map(|_| CutMode::ALL).collect();
    modes.shuffle(rng);
    modes
}

/// A power-cut filesystem mounted at `<home>/mnt`, with `home` (a temp dir) for logs and
/// everything else that must survive a cut. Unmounted before the temp dir is removed.
pub struct Bench {
    /// The filesystem (field order: dropped, so unmounted, first).
    pub fs: PowerCutFs,
    /// A temp dir off the mount.
    pub home: tempfile::TempDir,
}

impl Bench {
    /// Mounts a new power-cut filesystem seeded with `seed`.
    pub fn mount(seed: u64) -> Bench {
        let home = tempfile::Builder::new()
            .prefix("outpost-powercut-")
            .tempdir()
            .expect("temp dir");
        let mnt = home.path().join("mnt");
        std::fs::create_dir_all(&mnt).expect("mountpoint");
        let fs = PowerCutFs::mount(&mnt, seed).unwrap_or_else(|e| {
            panic!(
                "cannot mount the power-cut filesystem at {} (is /dev/fuse usable?): {e}",
                mnt.display()
            )
        });
        Bench { fs, home }
    }

    /// The mountpoint.
    pub fn mnt(&self) -> &Path {
        self.fs.mountpoint()
    }

    /// A directory `name` on the mount that exists durably (created, then it and the
    /// mount's root fsynced), as a data directory an installer made long before any cut.
    pub fn durable_dir(&self, name: &str) -> PathBuf {
        let dir = self.mnt().join(name);
        std::fs::create_dir_all(&dir).expect("create a directory on the mount");
        sync_dir(&dir);
        sync_dir(self.mnt());
        dir
    }

    /// A path in the home dir (off the mount).
    pub fn off_mount(&self, name: &str) -> PathBuf {
        self.home.path().join(name)
    }
}

/// fsyncs a directory (panics on failure: the test's own setup).
pub fn sync_dir(dir: &Path) {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync {}: {e}", dir.display()));
}

/// One line about a cut.
pub fn report_line(r: &CutReport) -> String {
    format!(
        "{}: unsynced_ops={} kept_ops={} torn_bytes_kept={:?}",
        r.mode.name(),
        r.unsynced_ops,
        r.kept_ops,
        r.torn_bytes_kept
    )
}

/// One line about the filesystem's counters.
pub fn stats_line(fs: &PowerCutFs) -> String {
    let s = fs.stats();
    format!(
        "writes={} bytes_written={} fsyncs={} fsyncdirs={}",
        s.writes, s.bytes_written, s.fsyncs, s.fsyncdirs
    )
}

/// The last `max` bytes of a (log) file, for failure messages.
pub fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

/// The last `max` bytes of `text`.
pub fn tail_str(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Waits for a child process to exit, up to `timeout`; `true` when it did.
pub fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGKILLs `child` and waits up to `timeout` for it to be reaped; `true` when it was.
///
/// A process whose thread is inside an fsync that the power-cut filesystem withholds
/// ([`PowerCutFs::arm_crash_at_next_fsync`]) cannot finish dying until the filesystem
/// answers that request: the kernel waits for a FUSE request the daemon already took. Then
/// this returns `false`: nothing of the process runs any more, so the caller cuts the power
/// and reaps it afterwards with [`reap_after_cut`].
pub fn sigkill(child: &mut std::process::Child, timeout: Duration) -> bool {
    let _ = child.kill();
    wait_exit(child, timeout).is_some()
}

/// Reaps a process [`sigkill`] could not reap before the cut; panics (without blocking on
/// it) when it is still not gone after `timeout`.
pub fn reap_after_cut(mut proc: crate::proc::ChildProc, timeout: Duration, label: &str) {
    if wait_exit(&mut proc.child, timeout).is_none() {
        let pid = proc.pid();
        // Dropping it would block in wait(2) forever.
        std::mem::forget(proc);
        panic!("{label}: process {pid} was killed but is still not gone {timeout:?} after the cut (stuck in a filesystem request?)");
    }
}

/// SIGKILLs a harness process before a cut: returns it when it could not be reaped yet
/// (see [`sigkill`]), for [`reap_after_cut`].
pub fn kill_for_cut(proc: Option<crate::proc::ChildProc>) -> Option<crate::proc::ChildProc> {
    let mut p = proc?;
    if sigkill(&mut p.child, Duration::from_secs(2)) {
        None
    } else {
        Some(p)
    }
}
