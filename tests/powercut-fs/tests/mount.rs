//! Through a real FUSE mount: what survives each kind of power cut.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use outpost_powercut::{CutMode, PowerCutFs};

fn mount(seed: u64) -> (tempfile::TempDir, PowerCutFs) {
    let dir = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(dir.path(), seed).expect("mount (needs root and /dev/fuse)");
    (dir, fs)
}

fn sync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

fn write_synced(fs: &PowerCutFs, name: &str, data: &[u8]) {
    let p = fs.mountpoint().join(name);
    let mut f = File::create(&p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    sync_dir(fs.mountpoint());
}

#[test]
fn unsynced_write_is_gone_after_drop() {
    let (_d, fs) = mount(1);
    let p = fs.mountpoint().join("a");
    fs::write(&p, b"hello").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"hello");
    let r = fs.cut(CutMode::DropUnsynced);
    assert!(r.unsynced_ops >= 2, "{r:?}");
    assert!(!p.exists());
    // A synced file whose later write is not synced keeps the synced content.
    write_synced(&fs, "b", b"old");
    let pb = fs.mountpoint().join("b");
    fs::write(&pb, b"newer").unwrap();
    fs.cut(CutMode::DropUnsynced);
    assert_eq!(fs::read(&pb).unwrap(), b"old");
}

#[test]
fn file_and_dir_fsync_survive_every_mode() {
    let (_d, fs) = mount(2);
    for mode in CutMode::ALL {
        write_synced(&fs, mode.name(), b"durable");
        fs.cut(mode);
        for m in CutMode::ALL.iter().take_while(|m| **m != mode) {
            assert_eq!(
                fs::read(fs.mountpoint().join(m.name())).unwrap(),
                b"durable"
            );
        }
        assert_eq!(
            fs::read(fs.mountpoint().join(mode.name())).unwrap(),
            b"durable"
        );
    }
    let s = fs.stats();
    assert!(s.fsyncs >= 4 && s.fsyncdirs >= 4 && s.writes >= 4, "{s:?}");
}

#[test]
fn new_file_without_dir_fsync_loses_its_name() {
    let (_d, fs) = mount(3);
    let p = fs.mountpoint().join("a");
    let mut f = File::create(&p).unwrap();
    f.write_all(b"x").unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs.cut(CutMode::DropUnsynced);
    assert!(!p.exists());
}

#[test]
fn sync_file_range_is_not_durable() {
    let (_d, fs) = mount(4);
    write_synced(&fs, "a", b"");
    let p = fs.mountpoint().join("a");
    let mut f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all(b"punches").unwrap();
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a valid open descriptor.
    let rc = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, flags) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    drop(f);
    fs.cut(CutMode::DropUnsynced);
    assert_eq!(fs::read(&p).unwrap(), b"");
}

fn replace(fs: &PowerCutFs, data: &[u8], dir_sync: bool) {
    let tmp = fs.mountpoint().join("target.tmp");
    let mut f = File::create(&tmp).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::rename(&tmp, fs.mountpoint().join("target")).unwrap();
    if dir_sync {
        sync_dir(fs.mountpoint());
    }
}

#[test]
fn atomic_replace_is_old_or_new() {
    for seed in 0..4 {
        let (_d, fs) = mount(seed);
        let target = fs.mountpoint().join("target");
        for mode in CutMode::ALL {
            for dir_sync in [false, true] {
                write_synced(&fs, "target", b"old content");
                replace(&fs, b"new content!", dir_sync);
                fs.cut(mode);
                let got = fs::read(&target).unwrap();
                assert!(
                    got == b"old content" || got == b"new content!",
                    "{mode:?} dir_sync={dir_sync}: {got:?}"
                );
                if dir_sync {
                    assert_eq!(got, b"new content!");
                } else if matches!(mode, CutMode::DropUnsynced) {
                    assert_eq!(got, b"old content");
                }
            }
        }
    }
}

#[test]
fn tear_keeps_earlier_writes_and_part_of_the_last() {
    let run = |seed| {
        let (_d, fs) = mount(seed);
        write_synced(&fs, "a", b"");
        let p = fs.mountpoint().join("a");
        let mut f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all(b"first;").unwrap();
        f.write_all(&[7u8; 1000]).unwrap();
        drop(f);
        let r = fs.cut(CutMode::TearLastWrite);
        (r, fs::read(&p).unwrap())
    };
    let (r, got) = run(11);
    let (kept, len) = r.torn_bytes_kept.unwrap();
    assert_eq!(len, 1000);
    assert!(kept < len);
    assert_eq!(&got[..6], b"first;");
    assert_eq!(got.len(), 6 + kept);
    assert_eq!(run(11).1, got, "same seed, same tear");
}

#[test]
fn random_subset_keeps_some_but_not_all() {
    let (_d, fs) = mount(12);
    write_synced(&fs, "a", b"");
    let p = fs.mountpoint().join("a");
    let mut f = OpenOptions::new().write(true).open(&p).unwrap();
    for _ in 0..64 {
        f.write_all(b"z").unwrap();
    }
    drop(f);
    let r = fs.cut(CutMode::KeepRandomSubset);
    assert_eq!(r.unsynced_ops, 64);
    assert!(r.kept_ops > 0 && r.kept_ops < 64, "{r:?}");
    let got = fs::read(&p).unwrap();
    assert!(got.contains(&b'z'));
}

#[test]
fn crash_at_next_fsync_withholds_it() {
    let (_d, fs) = mount(13);
    write_synced(&fs, "a", b"old");
    let p = fs.mountpoint().join("a");
    fs.arm_crash_at_next_fsync();
    let writer = {
        let p = p.clone();
        std::thread::spawn(move || {
            let mut f = OpenOptions::new().write(true).open(&p).unwrap();
            f.write_all(b"new").unwrap();
            f.sync_all()
        })
    };
    assert!(fs.wait_trap_hit(Duration::from_secs(10)));
    assert!(!writer.is_finished());
    let r = fs.cut(CutMode::CrashAtNextFsync);
    assert_eq!(r.kept_ops, 0);
    let res = writer.join().unwrap();
    assert!(res.is_err(), "the withheld fsync must not succeed");
    assert_eq!(fs::read(&p).unwrap(), b"old");
    // The trap is disarmed: fsync works again.
    write_synced(&fs, "a", b"after");
    fs.cut(CutMode::DropUnsynced);
    assert_eq!(fs::read(&p).unwrap(), b"after");
}

#[test]
fn unsynced_unlink_and_rename_are_undone() {
    let (_d, fs) = mount(14);
    let m = fs.mountpoint().to_path_buf();
    fs::create_dir_all(m.join("d/e")).unwrap();
    sync_dir(&m);
    sync_dir(&m.join("d"));
    write_synced(&fs, "a", b"A");
    write_synced(&fs, "b", b"B");
    fs::remove_file(m.join("a")).unwrap();
    fs::rename(m.join("b"), m.join("d/c")).unwrap();
    let names: Vec<_> = fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["d"]);
    fs.cut(CutMode::DropUnsynced);
    assert_eq!(fs::read(m.join("a")).unwrap(), b"A");
    assert_eq!(fs::read(m.join("b")).unwrap(), b"B");
    assert!(!m.join("d/c").exists());
    assert!(m.join("d/e").is_dir());
}

#[test]
fn crash_trap_with_a_killed_child_process() {
    use std::os::unix::process::ExitStatusExt;
    let (_d, fs) = mount(15);
    write_synced(&fs, "a", b"old");
    let p = fs.mountpoint().join("a");
    fs.arm_crash_at_next_fsync();
    let mut child = std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", p.display()))
        .args(["bs=16", "count=1", "conv=fsync,notrunc", "status=none"])
        .spawn()
        .unwrap();
    assert!(fs.wait_trap_hit(Duration::from_secs(10)));
    child.kill().unwrap();
    // Kill, then cut (which answers the withheld fsync), then reap.
    fs.cut(CutMode::CrashAtNextFsync);
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert_eq!(fs::read(&p).unwrap(), b"old");
}
