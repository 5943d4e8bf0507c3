//! A real full disk: the journal lives on a small tmpfs, a ballast file eats the rest of
//! it, and the committer keeps submitting until the disk refuses. Every punch must then be
//! `Rejected(StorageFull)`, never a panic or `Accepted`; once the ballast is deleted,
//! writing resumes (the journal reopens sled, whose I/O errors are sticky), and every
//! punch that was accepted is still there, also after a restart.
//!
//! Needs root (or CAP_SYS_ADMIN) to mount the tmpfs. Without it the test FAILS with an
//! explanation, unless `OUTPOST_SKIP_ENOSPC_TEST=1` is set, in which case it prints a loud
//! warning and returns.

mod journal_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use journal_support::{cfg, pending};
use outpost_gateway::committer;
use outpost_gateway::journal::{Journal, Outcome, Pending};
use outpost_gateway::metrics::Metrics;
use outpost_protocol::RejectCode;
use tokio_util::sync::CancellationToken;

struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fills the filesystem with a ballast file until a write fails with ENOSPC, then gives
/// back `leave` bytes.
fn fill(path: &Path, leave: u64) -> PathBuf {
    use std::io::Write;
    let ballast = path.join("ballast");
    let mut f = std::fs::File::create(&ballast).unwrap();
    let chunk = vec![0xAAu8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the tmpfs failed: {e}"),
        }
    }
    f.set_len(written.saturating_sub(leave)).unwrap();
    f.sync_all().unwrap();
    ballast
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_rejects_then_recovers_without_losing_anything() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let fs = match Tmpfs::mount("24m") {
        Ok(fs) => fs,
        Err(why) => {
            let msg = format!(
                "\n\n!!!!! ENOSPC TEST NOT RUN: cannot mount a tmpfs ({why}).\n\
                 !!!!! Run the tests as root (or with CAP_SYS_ADMIN) to test a real full disk,\n\
                 !!!!! or set OUTPOST_SKIP_ENOSPC_TEST=1 to skip it knowingly.\n"
            );
            if std::env::var_os("OUTPOST_SKIP_ENOSPC_TEST").is_some() {
                eprintln!("{msg}");
                return;
            }
            panic!("{msg}");
        }
    };
    let jdir = fs.path().join("journal");
    let journal = Journal::open(&jdir, &cfg()).unwrap();
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let (handle, task) = committer::spawn(journal.clone(), metrics.clone(), stop.clone());

    // Some records before the disk fills.
    let mut acked: BTreeMap<u64, Pending> = BTreeMap::new();
    let mut seq = 0u64;
    let mut submit = |n: usize| {
        let items: Vec<Pending> = (0..n)
            .map(|_| {
                seq += 1;
                pending("disk", seq)
            })
            .collect();
        let h = handle.clone();
        async move { (items.clone(), h.submit(items).await) }
    };
    let (items, out) = submit(64).await;
    for (p, o) in items.iter().zip(&out) {
        let Outcome::Accepted { gateway_seq } = o else {
            panic!("{o:?}")
        };
        acked.insert(*gateway_seq, *p);
    }

    let ballast = fill(fs.path(), 256 * 1024);
    let mut full = 0;
    let mut rounds = 0;
    while full < 5 {
        rounds += 1;
        assert!(rounds < 20_000, "the disk never filled up");
        let (items, out) = submit(64).await;
        for (p, o) in items.iter().zip(&out) {
            match o {
                Outcome::Accepted { gateway_seq } => {
                    acked.insert(*gateway_seq, *p);
                }
                Outcome::Rejected(RejectCode::StorageFull) => {}
                other => panic!("a full disk must give storage_full, got {other:?}"),
            }
        }
        if out
            .iter()
            .all(|o| *o == Outcome::Rejected(RejectCode::StorageFull))
        {
            full += 1;
        } else {
            assert!(
                out.iter().all(|o| matches!(o, Outcome::Accepted { .. })),
                "a group is all accepted or all refused: {out:?}"
            );
        }
    }
    assert!(!journal.stats().writable, "the journal knows it is broken");
    let text = metrics.render();
    assert!(
        !text.contains("outpost_gateway_journal_io_errors_total 0"),
        "{text}"
    );

    // Space comes back: writing resumes.
    std::fs::remove_file(&ballast).unwrap();
    let (items, out) = submit(64).await;
    for (p, o) in items.iter().zip(&out) {
        let Outcome::Accepted { gateway_seq } = o else {
            panic!("after freeing space: {o:?}")
        };
        acked.insert(*gateway_seq, *p);
    }
    assert!(journal.stats().writable);

    // Every acknowledged punch is there, with its content, now and after a restart.
    let check = |j: &Journal| {
        let all: BTreeMap<u64, _> = j
            .records(0)
            .unwrap()
            .map(|r| r.unwrap())
            .map(|r| (r.gateway_seq, r))
            .collect();
        for (s, p) in &acked {
            let r = all
                .get(s)
                .unwrap_or_else(|| panic!("acknowledged seq {s} lost"));
            assert_eq!(r.punch, p.punch, "seq {s}");
        }
        // Dense, and nothing stored twice.
        let seqs: Vec<u64> = all.keys().copied().collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        let mut keys: Vec<u64> = all.values().map(|r| r.punch.device_seq).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), seqs.len(), "a punch stored twice");
    };
    check(&journal);
    stop.cancel();
    task.await.unwrap();
    drop(handle);
    drop(journal);
    let j = Journal::open(&jdir, &cfg()).unwrap();
    check(&j);
    assert!(j.next_seq() > *acked.keys().last().unwrap());
}
