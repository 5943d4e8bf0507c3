//! A journal that cannot be opened never bricks the gateway: it is set aside, a fresh
//! journal in a new epoch takes punches, and `salvage` brings the old records back.
//! Also: moving to a new epoch is durable and keeps the sequence.

mod journal_support;

use journal_support::{cfg, pending};
use outpost_gateway::journal::{salvage, Journal, Outcome};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A journal with `n` flushed records for door-1, dropped (closed) again. Returns its epoch.
fn filled(dir: &std::path::Path, n: u64) -> u64 {
    let j = Journal::open(dir, &cfg()).unwrap();
    let items: Vec<_> = (1..=n).map(|s| pending("door-1", s)).collect();
    j.append(&items).unwrap();
    rt().block_on(j.flush()).unwrap();
    j.epoch()
}

/// Opens raw sled on `dir`, waiting for the journal's previous handle to let go.
fn raw_sled(dir: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("raw open: {e}"),
        }
    }
}

#[test]
fn an_unreadable_journal_is_set_aside_and_salvaged() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("journal");
    let old_epoch = filled(&dir, 500);
    {
        // Damage the meta value: the journal no longer opens.
        let db = raw_sled(&dir);
        db.insert(b"mstate", &b"\xff\xff not cbor"[..]).unwrap();
        db.flush().unwrap();
    }
    let j = Journal::open(&dir, &cfg()).expect("a damaged journal must not stop the gateway");
    assert_ne!(j.epoch(), old_epoch, "the fresh journal has a new epoch");
    assert_eq!(j.stats().records, 0);
    let aside = j.set_aside().to_vec();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(aside[0].path.join("SET-ASIDE.txt").exists());

    // Punches are taken again at once; one of the old ones comes back as new.
    let out = j
        .append(&[pending("door-1", 7), pending("door-2", 1)])
        .unwrap();
    assert_eq!(out.len(), 2);
    rt().block_on(j.flush()).unwrap();

    let report = rt().block_on(salvage(&aside[0].path, &j)).unwrap();
    assert_eq!((report.read, report.unreadable), (500, 0));
    assert_eq!(report.accepted, 499, "{report:?}");
    assert_eq!(report.duplicates, 1, "door-1/7 was already taken again");
    let renamed = report.renamed_to.expect("renamed once salvaged");
    assert!(
        renamed.to_string_lossy().contains(".salvaged-"),
        "{renamed:?}"
    );
    assert!(!aside[0].path.exists());
    assert_eq!(j.stats().records, 501);
    drop(j);

    // After salvage the alert is gone at the next start, and the records are there.
    let j = Journal::open(&dir, &cfg()).unwrap();
    assert!(j.set_aside().is_empty());
    assert_eq!(j.stats().records, 501);
}

#[test]
fn a_journal_with_a_garbage_log_opens_without_panicking() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("journal");
    filled(&dir, 2000);
    // Overwrite the middle and the tail of sled's log with garbage.
    let db = dir.join("db");
    let len = std::fs::metadata(&db).unwrap().len();
    let mut bytes = std::fs::read(&db).unwrap();
    for (i, b) in bytes.iter_mut().enumerate().skip(len as usize / 3) {
        *b = (i as u8).wrapping_mul(31) ^ 0xa5;
    }
    std::fs::write(&db, &bytes).unwrap();
    let j = Journal::open(&dir, &cfg()).expect("open must not fail or panic on a damaged log");
    let out = j.append(&[pending("door-9", 1)]).unwrap();
    assert!(matches!(out[0], Outcome::Accepted { .. }), "{out:?}");
    rt().block_on(j.flush()).unwrap();
}

#[test]
fn a_new_epoch_is_durable_and_keeps_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let old = filled(dir.path(), 10);
    let j = Journal::open(dir.path(), &cfg()).unwrap();
    let new = j.begin_new_epoch().unwrap();
    assert_ne!(new, old);
    assert_eq!(j.epoch(), new);
    let out = j.append(&[pending("door-1", 11)]).unwrap();
    assert_eq!(out, vec![Outcome::Accepted { gateway_seq: 11 }]);
    rt().block_on(j.flush()).unwrap();
    drop(j);
    let j = Journal::open(dir.path(), &cfg()).unwrap();
    assert_eq!(j.epoch(), new);
    assert_eq!(j.stats().next_seq, 12);
    assert_eq!(j.stats().records, 11);
}
