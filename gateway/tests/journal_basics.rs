//! Journal behaviour one case at a time: quota (reject, drop_oldest), trim idempotence,
//! the durable watermark, restarts after partial work, the "in use" error, config errors.

mod journal_support;

use journal_support::{cfg, pending, quota};
use outpost_gateway::journal::{
    Journal, JournalConfig, JournalError, OnFull, Outcome, MIN_MAX_BYTES,
};
use outpost_protocol::RejectCode;

fn block_flush(j: &Journal) {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(j.flush())
        .unwrap();
}

fn accepted(out: &[Outcome]) -> Vec<u64> {
    out.iter()
        .filter_map(|o| match o {
            Outcome::Accepted { gateway_seq } => Some(*gateway_seq),
            _ => None,
        })
        .collect()
}

#[test]
fn quota_reject_refuses_new_punches_and_resumes_after_trim() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path(), &quota(MIN_MAX_BYTES, OnFull::Reject)).unwrap();
    let items: Vec<_> = (0..2000).map(|s| pending("door-1", s)).collect();
    let out = j.append(&items).unwrap();
    let ok = accepted(&out);
    assert!(!ok.is_empty() && ok.len() < items.len(), "{}", ok.len());
    // The ones that fit are a prefix with dense seqs; the rest are storage_full.
    assert_eq!(ok, (1..=ok.len() as u64).collect::<Vec<_>>());
    assert!(out[ok.len()..]
        .iter()
        .all(|o| *o == Outcome::Rejected(RejectCode::StorageFull)));
    block_flush(&j);
    let s = j.stats();
    assert!(s.bytes <= s.max_bytes);
    assert_eq!(s.evicted, 0);
    // Still full: the next new punch is refused, a resend of a stored one is a duplicate.
    let again = j
        .append(&[pending("door-1", 1999), pending("door-1", 0)])
        .unwrap();
    assert_eq!(
        again,
        vec![
            Outcome::Rejected(RejectCode::StorageFull),
            Outcome::Duplicate
        ]
    );
    // The relay acknowledges half; room comes back.
    let half = ok.len() as u64 / 2;
    j.trim_through(half).unwrap();
    let more = j.append(&items[ok.len()..]).unwrap();
    let ok2 = accepted(&more);
    assert_eq!(ok2.first(), Some(&(ok.len() as u64 + 1)));
    block_flush(&j);
    // Nothing acknowledged was lost.
    let all: Vec<_> = j.records(0).unwrap().map(Result::unwrap).collect();
    assert_eq!(all.first().unwrap().gateway_seq, half + 1);
    assert_eq!(all.last().unwrap().gateway_seq, *ok2.last().unwrap());
}

#[test]
fn quota_drop_oldest_evicts_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let c = quota(MIN_MAX_BYTES, OnFull::DropOldest);
    let j = Journal::open(dir.path(), &c).unwrap();
    let mut next = 1u64;
    for round in 0..10u64 {
        let items: Vec<_> = (0..200)
            .map(|i| pending("door-2", round * 200 + i))
            .collect();
        let out = j.append(&items).unwrap();
        // drop_oldest never refuses a punch that fits in an empty journal.
        assert_eq!(accepted(&out), (next..next + 200).collect::<Vec<_>>());
        next += 200;
        block_flush(&j);
    }
    let s = j.stats();
    assert!(s.evicted > 0);
    assert!(s.bytes <= s.max_bytes);
    assert_eq!(s.first_unacked, 1 + s.evicted);
    assert_eq!(s.records, 2000 - s.evicted);
    assert_eq!(s.trimmed_through, 0, "eviction is not an acknowledgement");
    // Reading from the old cursor skips the evicted gap.
    let r = j.read_from(1, 5, usize::MAX).unwrap();
    assert_eq!(r[0].gateway_seq, s.first_unacked);
    // An evicted punch, sent again, is stored again (its copy is gone).
    let out = j
        .append(&[pending("door-2", 0), pending("door-2", 1999)])
        .unwrap();
    assert_eq!(
        out,
        vec![Outcome::Accepted { gateway_seq: 2001 }, Outcome::Duplicate]
    );
    block_flush(&j);
    let before = j.stats();
    drop(j);
    let j = Journal::open(dir.path(), &c).unwrap();
    let after = j.stats();
    assert_eq!(
        after.evicted, before.evicted,
        "the eviction count survives restarts"
    );
    assert_eq!(after.first_unacked, before.first_unacked);
    assert_eq!(after.next_seq, 2002);
}

#[test]
fn trim_is_idempotent_and_capped() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path(), &cfg()).unwrap();
    let items: Vec<_> = (0..10).map(|s| pending("door-3", s)).collect();
    j.append(&items).unwrap();
    // Nothing is durable yet: a trim cannot name unsent records.
    assert_eq!(j.trim_through(5).unwrap(), 0);
    block_flush(&j);
    assert_eq!(j.trim_through(5).unwrap(), 5);
    assert_eq!(j.trim_through(5).unwrap(), 5);
    assert_eq!(j.trim_through(3).unwrap(), 5, "trim never goes backwards");
    assert_eq!(
        j.trim_through(1_000).unwrap(),
        10,
        "capped at the last record"
    );
    assert_eq!(j.stats().records, 0);
    assert_eq!(j.next_seq(), 11);
    assert_eq!(j.first_unacked(), 11);
    // Trimmed keys stay duplicates.
    assert_eq!(j.append(&items[..1]).unwrap(), vec![Outcome::Duplicate]);
}

#[test]
fn unflushed_records_are_invisible_to_readers() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path(), &cfg()).unwrap();
    j.append(&[pending("a", 1), pending("a", 2)]).unwrap();
    assert!(j.read_from(0, 10, usize::MAX).unwrap().is_empty());
    assert_eq!(j.records(0).unwrap().count(), 0);
    block_flush(&j);
    assert_eq!(j.read_from(0, 10, usize::MAX).unwrap().len(), 2);
    assert_eq!(j.durable_through(), 2);
}

#[test]
fn dedup_within_a_group_and_across_devices() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path(), &cfg()).unwrap();
    let out = j
        .append(&[
            pending("a", 1),
            pending("a", 1),
            pending("b", 1),
            pending("ab", 1),
        ])
        .unwrap();
    assert_eq!(
        out,
        vec![
            Outcome::Accepted { gateway_seq: 1 },
            Outcome::Duplicate,
            Outcome::Accepted { gateway_seq: 2 },
            Outcome::Accepted { gateway_seq: 3 },
        ]
    );
}

#[test]
fn reopen_after_partial_work_restores_cursor_and_seq() {
    let dir = tempfile::tempdir().unwrap();
    let epoch;
    {
        let j = Journal::open(dir.path(), &cfg()).unwrap();
        epoch = j.epoch();
        let items: Vec<_> = (0..100).map(|s| pending("door-4", s)).collect();
        j.append(&items).unwrap();
        block_flush(&j);
        j.trim_through(40).unwrap();
        j.append(&[pending("door-4", 500)]).unwrap();
        block_flush(&j);
    }
    let j = Journal::open(dir.path(), &cfg()).unwrap();
    assert_eq!(j.epoch(), epoch);
    let s = j.stats();
    assert_eq!(
        (s.next_seq, s.trimmed_through, s.first_unacked, s.records),
        (102, 40, 41, 61)
    );
    assert_eq!(
        s.durable_through, 101,
        "everything found at open is durable"
    );
    let r = j.read_from(0, 1000, usize::MAX).unwrap();
    assert_eq!(r.first().unwrap().gateway_seq, 41);
    assert_eq!(r.last().unwrap().punch.device_seq, 500);
    // Trim everything, restart: next_seq continues after the trimmed records.
    j.trim_through(101).unwrap();
    block_flush(&j);
    drop(j);
    let j = Journal::open(dir.path(), &cfg()).unwrap();
    assert_eq!(j.next_seq(), 102);
    assert_eq!(j.stats().trimmed_through, 101);
    assert_eq!(
        j.append(&[pending("door-4", 7)]).unwrap(),
        vec![Outcome::Duplicate]
    );
    assert_eq!(
        j.append(&[pending("door-4", 7000)]).unwrap(),
        vec![Outcome::Accepted { gateway_seq: 102 }]
    );
}

#[test]
fn second_open_says_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _j = Journal::open(dir.path(), &cfg()).unwrap();
    let e = Journal::open(dir.path(), &cfg())
        .err()
        .expect("second open must fail");
    assert!(matches!(e, JournalError::InUse { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("in use by a running gateway; stop it or use the admin API"),
        "{msg}"
    );
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
}

#[test]
fn bad_config_is_refused_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let c = JournalConfig {
        max_bytes: 1,
        ..cfg()
    };
    let e = Journal::open(dir.path(), &c).err().unwrap();
    assert!(e.to_string().contains("journal.max_bytes"), "{e}");
}
