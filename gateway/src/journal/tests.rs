//! Unit tests that need the journal's internals: a controlled clock for the dedup window's
//! age limit, and a tampered meta value for the rebuild path.

use super::*;
use outpost_protocol::{BootId, Id, Punch, PunchKind, Received, Source, VerifyMethod};

fn p(device: &str, seq: u64) -> Pending {
    Pending {
        punch: Punch {
            device_id: Id::new(device).unwrap(),
            device_seq: seq,
            subject_id: Id::new("EMP-1").unwrap(),
            kind: PunchKind::Out,
            verify: VerifyMethod::Face,
            device_time_ms: 1_795_500_000_000,
            utc_offset_min: None,
        },
        received: Received {
            boot_id: BootId([1; 16]),
            mono_ms: seq,
            wall_ms: 1_795_500_000_000,
            clock_synced: false,
        },
        source: Source::Mqtt,
    }
}

fn cfg(max_keys: u64, max_age_s: u64) -> JournalConfig {
    JournalConfig {
        cache_capacity_bytes: 1 << 20,
        dedup_window: DedupWindow {
            max_age: Duration::from_secs(max_age_s),
            max_keys,
        },
        ..JournalConfig::default()
    }
}

fn flush(j: &Journal) {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(j.flush())
        .unwrap();
}

/// Opens the raw sled database behind a journal that was just dropped. sled's flusher
/// thread holds the database (and its file lock) for a moment after the last handle goes,
/// so a plain `sled::open` right after a drop fails with "could not acquire lock".
fn raw_open(dir: &std::path::Path) -> sled::Db {
    outpost_ops::sled::open_retrying(Duration::from_secs(10), || sled::open(dir))
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", dir.display()))
}

const T0: i64 = 1_800_000_000_000;

#[test]
fn dedup_window_expires_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path(), &cfg(1000, 3600)).unwrap();
    let out = j.append_at(&[p("a", 1), p("a", 2)], T0).unwrap();
    assert!(matches!(out[0], Outcome::Accepted { gateway_seq: 1 }));
    flush(&j);
    assert_eq!(j.trim_through_at(1, T0).unwrap(), 1);
    // Within the window: still a duplicate (trimmed) and a duplicate (present).
    let out = j
        .append_at(&[p("a", 1), p("a", 2)], T0 + 3_599_000)
        .unwrap();
    assert_eq!(out, vec![Outcome::Duplicate, Outcome::Duplicate]);
    // Past the age limit the trimmed key is forgotten; the present one never is.
    let out = j
        .append_at(&[p("a", 1), p("a", 2)], T0 + 3_601_000)
        .unwrap();
    assert_eq!(
        out,
        vec![Outcome::Accepted { gateway_seq: 3 }, Outcome::Duplicate]
    );
    let s = j.stats();
    assert_eq!(s.dedup_window_keys, 0);
    assert_eq!(s.dedup_keys, 2);
    assert_eq!(s.records, 2);
}

#[test]
fn dedup_window_expires_by_count_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(3, 86_400);
    let j = Journal::open(dir.path(), &c).unwrap();
    let items: Vec<_> = (1..=5).map(|s| p("b", s)).collect();
    j.append_at(&items, T0).unwrap();
    flush(&j);
    j.trim_through_at(5, T0).unwrap();
    assert_eq!(j.stats().dedup_window_keys, 3, "oldest two forgotten");
    drop(j);
    let j = Journal::open(dir.path(), &c).unwrap();
    let out = j.append_at(&items, T0).unwrap();
    assert_eq!(
        out,
        vec![
            Outcome::Accepted { gateway_seq: 6 },
            Outcome::Accepted { gateway_seq: 7 },
            Outcome::Duplicate,
            Outcome::Duplicate,
            Outcome::Duplicate,
        ]
    );
}

#[test]
fn expiry_is_incremental() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path(), &cfg(1_000_000, 60)).unwrap();
    let n = writer::EXPIRE_BUDGET as u64 * 3;
    let items: Vec<_> = (1..=n).map(|s| p("c", s)).collect();
    j.append_at(&items, T0).unwrap();
    flush(&j);
    j.trim_through_at(n, T0).unwrap();
    assert_eq!(j.stats().dedup_window_keys, n);
    // Each write forgets at most EXPIRE_BUDGET aged keys.
    let later = T0 + 120_000;
    j.append_at(&[p("d", 1)], later).unwrap();
    assert_eq!(
        j.stats().dedup_window_keys,
        n - writer::EXPIRE_BUDGET as u64
    );
    j.append_at(&[p("d", 2)], later).unwrap();
    j.append_at(&[p("d", 3)], later).unwrap();
    assert_eq!(j.stats().dedup_window_keys, 0);
    assert_eq!(j.stats().dedup_keys, 3);
}

#[test]
fn tampered_meta_is_rebuilt_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(1000, 86_400);
    {
        let j = Journal::open(dir.path(), &c).unwrap();
        let items: Vec<_> = (1..=10).map(|s| p("e", s)).collect();
        j.append_at(&items, T0).unwrap();
        flush(&j);
        j.trim_through_at(4, T0).unwrap();
        flush(&j);
    }
    let good = {
        let db = raw_open(dir.path());
        let good: Meta = minicbor::decode(&db.get(layout::META_KEY).unwrap().unwrap()).unwrap();
        let mut bad = good;
        bad.next_seq = 5;
        bad.record_bytes = 1;
        bad.dedup_keys = 0;
        db.insert(layout::META_KEY, cbor::to_vec(&bad)).unwrap();
        db.flush().unwrap();
        good
    };
    let j = Journal::open(dir.path(), &c).unwrap();
    let inner = j.lock();
    assert_eq!(inner.meta, good);
}

#[test]
fn foreign_database_is_set_aside_not_used() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("journal");
    {
        let db = raw_open(&dir);
        db.insert(b"hello", b"world").unwrap();
        db.flush().unwrap();
    }
    let j = Journal::open(&dir, &cfg(10, 10)).unwrap();
    assert_eq!(j.stats().records, 0);
    let aside = j.set_aside();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let db = raw_open(&aside[0].path);
    assert_eq!(db.get(b"hello").unwrap().as_deref(), Some(&b"world"[..]));
}

#[test]
fn readers_never_wait_for_the_writer_lock() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path(), &cfg(1000, 3600)).unwrap();
    let mut durable = j.watch_durable();
    let mut stats = j.watch_stats();
    j.append_at(&[p("a", 1), p("a", 2)], T0).unwrap();
    assert!(
        stats.has_changed().unwrap(),
        "an append publishes the counters"
    );
    assert_eq!(stats.borrow_and_update().records, 2);
    assert!(
        !durable.has_changed().unwrap(),
        "not durable before the flush"
    );
    flush(&j);
    assert!(durable.has_changed().unwrap());
    assert_eq!(*durable.borrow_and_update(), 2);

    // Held as a reopen after an I/O error holds it, for seconds: readers still answer.
    let epoch = j.epoch();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let guard = j.lock();
        s.spawn(|| {
            let st = j.stats();
            let got = (
                st.records,
                j.durable_through(),
                j.first_unacked(),
                j.next_seq(),
                j.epoch() == epoch,
                j.read_from(0, 10, 1 << 20).map(|r| r.len()).ok(),
            );
            tx.send(got).unwrap();
        });
        let got = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a reader waited for the writer's lock");
        assert_eq!(got, (2, 2, 1, 3, true, Some(2)));
        drop(guard);
    });
}

#[test]
fn a_reopen_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path(), &cfg(1000, 3600)).unwrap();
    j.append_at(&[p("a", 1)], T0).unwrap();
    flush(&j);
    // Appended but never flushed, then the journal breaks (as after ENOSPC).
    j.append_at(&[p("a", 2)], T0).unwrap();
    {
        let mut inner = j.lock();
        let e = j.recovering("test: disk full", true);
        mark_broken(&mut inner, &e);
        j.publish(&inner);
    }
    let st = j.stats();
    assert!(!st.writable);
    assert_eq!((st.next_seq, st.durable_through), (3, 1));
    let mut stats = j.watch_stats();
    let mut durable = j.watch_durable();
    // The next write reopens sled; what it finds on disk is published.
    let out = j.append_at(&[p("a", 3)], T0).unwrap();
    assert!(matches!(out[0], Outcome::Accepted { .. }), "{out:?}");
    assert!(stats.has_changed().unwrap());
    let st = *stats.borrow_and_update();
    assert!(st.writable);
    assert_eq!(st.durable_through, *durable.borrow_and_update());
    assert_eq!(j.durable_through(), st.durable_through);
    assert!(st.durable_through >= 1 && st.next_seq == st.durable_through + 2);
    flush(&j);
    assert_eq!(j.durable_through(), j.next_seq() - 1);
}

/// A flush covers what was appended when it was *called*. If the journal breaks and
/// reopens before that flush ends (a later append hit an I/O error), the reopen may have
/// dropped the records the flush was to cover, so the flush must fail rather than let the
/// committer acknowledge them.
#[test]
fn a_flush_that_spans_a_reopen_fails() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path(), &cfg(1000, 3600)).unwrap();
    j.append_at(&[p("a", 1)], T0).unwrap();
    flush(&j);
    j.append_at(&[p("a", 2)], T0).unwrap();
    // The committer creates the flush and then goes on appending.
    let pending_flush = j.flush();
    {
        let mut inner = j.lock();
        let e = j.recovering("test: disk full", true);
        mark_broken(&mut inner, &e);
        j.publish(&inner);
    }
    let writer = {
        let j = j.clone();
        std::thread::spawn(move || j.append_at(&[p("a", 3)], T0))
    };
    // Wait until the next append is reopening (it has let go of its handle and now waits
    // for sled's file lock, which the flush's handle still holds).
    let deadline = Instant::now() + Duration::from_secs(10);
    while j.shared.published.view().db.is_some() {
        assert!(
            Instant::now() < deadline,
            "the append never started reopening"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let flushed = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(pending_flush);
    assert!(
        matches!(flushed, Err(JournalError::Recovering { .. })),
        "{flushed:?}"
    );
    let reopened = writer.join().unwrap();
    assert!(reopened.is_ok(), "{reopened:?}");
}
