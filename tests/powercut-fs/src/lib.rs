//! Power-cut test filesystem: an in-memory FUSE filesystem that models a disk with a
//! volatile write cache, so crash tests can prove that what was acknowledged after fsync
//! survives a power cut, and that nothing else is relied on.
//!
//! # Invariants
//! - Every inode has *durable* content and *volatile* content; every directory has durable
//!   entries and volatile entries. Requests are answered from the volatile state.
//! - Every change is appended to one global, ordered log of *unsynced operations*; the
//!   volatile state is the durable state with that log replayed in order.
//! - File data (write, truncate, fallocate, chmod/utimes) becomes durable only by `fsync`
//!   or `fdatasync` of that file. Namespace changes (create, mknod, mkdir, symlink, unlink,
//!   rmdir, rename) become durable only by an fsync of the parent directory (`fsyncdir`,
//!   or `fsync` of a directory). A rename across directories has one change per directory.
//! - `sync_file_range(2)`, `close`, `flush` and the page cache make nothing durable (files
//!   are opened with `FOPEN_DIRECT_IO`, entry and attribute TTLs are 0).
//!
//! # Operations
//! - *write*: the volatile content changes; the op is logged.
//! - *fsync(file)*: that file's logged data ops move, in order, into its durable content.
//!   A file fsynced before its name is dir-synced is durable but nameless (an orphan).
//! - *fsync(dir)*: that directory's logged entry changes move into its durable entries; an
//!   inode that gets a durable name this way without being fsynced itself is empty.
//! - [`PowerCutFs::cut`]: power loss and reboot. The new state is the durable state plus
//!   the ops the [`CutMode`] keeps, replayed in order; inodes unreachable from the root are
//!   gone; the log is empty; open handles answer `EIO`.
//!   - `DropUnsynced`: no op survives.
//!   - `CrashAtNextFsync`: as `DropUnsynced`, and the fsyncs withheld by the armed trap
//!     are answered with `EIO`; the trap is disarmed.
//!   - `TearLastWrite`: every op survives except the last write, of which a random strict
//!     *prefix* (0..len bytes) survives; the file grows only as far as that prefix.
//!   - `KeepRandomSubset`: each op survives independently with probability 1/2. A write to
//!     an inode whose create did not survive is lost; a rename that did not survive leaves
//!     the old name.
//! - Crash trap ([`PowerCutFs::arm_crash_at_next_fsync`]): every fsync/fsyncdir from then
//!   on is neither performed nor answered until the next cut.
//!
//! A process blocked in a withheld fsync does not die on SIGKILL until the request is
//! answered (the kernel waits for requests already read by the server): kill it, call
//! `cut`, and only then reap it.
//!
//! Not supported: shared writable `mmap` (direct I/O), hard links, xattrs, device nodes,
//! POSIX locks (the kernel emulates `flock` and `fcntl` locks locally).

mod fuse;
pub mod model;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

/// What a power cut keeps of the unsynced operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CutMode {
    /// No unsynced operation survives.
    DropUnsynced,
    /// Like `DropUnsynced`, after the armed trap withheld an fsync.
    CrashAtNextFsync,
    /// All survive except the last write, of which a random strict prefix survives.
    TearLastWrite,
    /// Each survives independently with probability 1/2.
    KeepRandomSubset,
}

impl CutMode {
    /// Every mode.
    pub const ALL: [CutMode; 4] = [
        CutMode::DropUnsynced,
        CutMode::CrashAtNextFsync,
        CutMode::TearLastWrite,
        CutMode::KeepRandomSubset,
    ];

    /// Short name for logs and test names.
    pub fn name(&self) -> &'static str {
        match self {
            CutMode::DropUnsynced => "drop-unsynced",
            CutMode::CrashAtNextFsync => "crash-at-next-fsync",
            CutMode::TearLastWrite => "tear-last-write",
            CutMode::KeepRandomSubset => "keep-random-subset",
        }
    }
}

/// What a cut did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutReport {
    /// The mode used.
    pub mode: CutMode,
    /// Unsynced operations at the cut.
    pub unsynced_ops: usize,
    /// Operations replayed in full (the torn write is not counted).
    pub kept_ops: usize,
    /// `TearLastWrite`: (bytes kept, bytes written) of the torn write.
    pub torn_bytes_kept: Option<(usize, usize)>,
}

/// Cumulative request counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsStats {
    /// Write requests.
    pub writes: u64,
    /// fsync/fdatasync requests on files (withheld ones included).
    pub fsyncs: u64,
    /// fsyncdir requests, and fsync of a directory (withheld ones included).
    pub fsyncdirs: u64,
    /// Bytes written.
    pub bytes_written: u64,
}

/// A mounted power-cut filesystem; dropping it unmounts.
pub struct PowerCutFs {
    mountpoint: PathBuf,
    shared: Arc<fuse::Shared>,
    session: Option<BackgroundSession>,
}

impl std::fmt::Debug for PowerCutFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerCutFs")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

impl PowerCutFs {
    /// Mounts an empty filesystem at `mountpoint` (an existing empty directory). `seed`
    /// drives every random choice.
    pub fn mount(mountpoint: &Path, seed: u64) -> std::io::Result<PowerCutFs> {
        let mountpoint = mountpoint.canonicalize()?;
        let shared = Arc::new(fuse::Shared::new(seed));
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("outpost-powercut".into())];
        config.acl = SessionACL::All;
        let fs = fuse::PowerCutFuse {
            shared: shared.clone(),
        };
        let session = fuser::spawn_mount(fs, &mountpoint, &config)?;
        Ok(PowerCutFs {
            mountpoint,
            shared,
            session: Some(session),
        })
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Power cut and reboot (call it once the processes using the mount are killed).
    pub fn cut(&self, mode: CutMode) -> CutReport {
        let (report, withheld) = {
            let mut st = self.shared.lock();
            let report = st.disk.cut(mode);
            st.handles.clear();
            st.dir_snapshots.clear();
            st.trap_armed = false;
            st.trap_hit = false;
            (report, std::mem::take(&mut st.withheld))
        };
        for reply in withheld {
            reply.error(fuser::Errno::EIO);
        }
        report
    }

    /// Arms the trap: the next fsync/fsyncdir, and every later one until the next cut, is
    /// neither performed nor answered.
    pub fn arm_crash_at_next_fsync(&self) {
        let mut st = self.shared.lock();
        st.trap_armed = true;
        st.trap_hit = false;
    }

    /// Waits up to `timeout` for the armed trap to withhold an fsync.
    pub fn wait_trap_hit(&self, timeout: Duration) -> bool {
        let st = self.shared.lock();
        let (st, _) = self
            .shared
            .trap_cv
            .wait_timeout_while(st, timeout, |st| !st.trap_hit)
            .unwrap_or_else(|e| e.into_inner());
        st.trap_hit
    }

    /// Cumulative counters.
    pub fn stats(&self) -> FsStats {
        self.shared.lock().stats
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        let withheld = std::mem::take(&mut self.shared.lock().withheld);
        for reply in withheld {
            reply.error(fuser::Errno::EIO);
        }
        if let Some(session) = self.session.take() {
            if session.umount_and_join().is_err() {
                // Busy (a process still has files open): detach lazily rather than hang.
                if let Ok(path) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(
                    self.mountpoint.as_os_str(),
                )) {
                    // SAFETY: `path` is a valid NUL-terminated string.
                    unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
                }
            }
        }
    }
}
