//! Model test: random appends (new and duplicate keys), reads from cursors, trims,
//! quota evictions and restarts (drop + reopen) against a simple in-memory model.
//!
//! Two regimes:
//! - **roomy** (1 GiB quota): the model predicts every outcome exactly, including the
//!   dedup window's count limit (`max_keys`, small here so it is exercised).
//! - **tight** (64 KiB quota, `reject` or `drop_oldest`): the exact byte accounting is the
//!   journal's business, so for the quota the model checks relations: a rejection only
//!   happens under `reject`, eviction only under `drop_oldest` and only of the oldest
//!   records that existed before the group, and the logical size stays within the quota.
//!   Dedup, density, contents and counters are still exact.

mod journal_support;

use std::collections::{BTreeMap, HashMap, VecDeque};

use journal_support::{cfg, pending};
use outpost_gateway::journal::{DedupWindow, Journal, JournalConfig, OnFull, Outcome, Pending};
use outpost_protocol::RejectCode;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Append a group (device index, device_seq), then flush (as the committer does).
    Append(Vec<(u8, u8)>),
    /// `read_from(first_unacked + skip, max)`.
    Read { skip: u8, max: u8 },
    /// `trim_through(trimmed_through + k)`; may exceed the last seq (must be capped).
    Trim(u8),
    /// Drop every handle and reopen.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => prop::collection::vec((0u8..3, 0u8..40), 1..30).prop_map(Op::Append),
        2 => (0u8..10, 1u8..20).prop_map(|(skip, max)| Op::Read { skip, max }),
        2 => (0u8..25).prop_map(Op::Trim),
        1 => Just(Op::Restart),
    ]
}

const DEVICES: [&str; 3] = ["door-1", "door-2", "zk:ABC123"];

fn item(d: u8, s: u8) -> Pending {
    pending(DEVICES[d as usize], s as u64 * 1_000_003)
}

type Key = (u8, u8);

#[derive(Default)]
struct Model {
    /// Records present, by seq.
    records: BTreeMap<u64, (Key, Pending)>,
    /// Keys of records present.
    present: HashMap<Key, u64>,
    /// Trimmed keys remembered, oldest first.
    window: VecDeque<Key>,
    next_seq: u64,
    trimmed_through: u64,
    evicted: u64,
}

impl Model {
    fn first(&self) -> u64 {
        self.records.keys().next().copied().unwrap_or(self.next_seq)
    }
}

struct Regime {
    tight: bool,
    cfg: JournalConfig,
}

fn check_state(j: &Journal, m: &Model, r: &Regime) {
    let s = j.stats();
    assert_eq!(s.next_seq, m.next_seq, "next_seq");
    assert_eq!(s.trimmed_through, m.trimmed_through, "trimmed_through");
    assert_eq!(s.first_unacked, m.first(), "first_unacked");
    assert_eq!(s.records, m.records.len() as u64, "records");
    assert_eq!(
        s.durable_through,
        m.next_seq - 1,
        "everything appended was flushed"
    );
    assert_eq!(s.evicted, m.evicted, "evicted");
    assert!(
        s.bytes <= r.cfg.max_bytes,
        "quota exceeded: {} > {}",
        s.bytes,
        r.cfg.max_bytes
    );
    let present = m.present.len() as u64;
    assert_eq!(s.dedup_keys, present + m.window.len() as u64, "dedup_keys");
    assert_eq!(s.dedup_window_keys, m.window.len() as u64, "window keys");
    // Full contents, through the export iterator.
    let all: Vec<_> = j.records(0).unwrap().map(Result::unwrap).collect();
    assert_eq!(all.len(), m.records.len());
    for (rec, (seq, (_, p))) in all.iter().zip(m.records.iter()) {
        assert_eq!(rec.gateway_seq, *seq);
        assert_eq!(rec.punch, p.punch);
        assert_eq!(rec.received, p.received);
        assert_eq!(rec.source, p.source);
    }
    // Dense.
    for w in all.windows(2) {
        assert_eq!(w[0].gateway_seq + 1, w[1].gateway_seq);
    }
}

fn run(ops: Vec<Op>, r: Regime) {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path(), &r.cfg).unwrap();
    let epoch = j.epoch();
    let mut m = Model {
        next_seq: 1,
        ..Model::default()
    };
    for op in ops {
        match op {
            Op::Append(keys) => {
                let items: Vec<Pending> = keys.iter().map(|&(d, s)| item(d, s)).collect();
                let first_before = m.first();
                let batch_start = m.next_seq;
                let out = j.append(&items).unwrap();
                assert_eq!(out.len(), items.len());
                // Evictions happened (if any) to records that existed before the batch.
                let first_after = j.first_unacked();
                // Keys evicted by this group: a copy earlier in the group may have been
                // answered `duplicate` before its original was evicted (drop_oldest loses
                // the oldest punches by design).
                let mut evicted_now = Vec::new();
                if first_after > first_before && first_before < batch_start {
                    assert!(
                        r.tight && r.cfg.on_full == OnFull::DropOldest,
                        "eviction without drop_oldest"
                    );
                    let upto = first_after.min(batch_start);
                    let gone: Vec<u64> = m.records.range(..upto).map(|(s, _)| *s).collect();
                    for s in gone {
                        let (k, _) = m.records.remove(&s).unwrap();
                        m.present.remove(&k);
                        m.evicted += 1;
                        evicted_now.push(k);
                    }
                }
                let mut in_group: HashMap<Key, ()> = HashMap::new();
                for (&k, o) in keys.iter().zip(&out) {
                    let known = m.present.contains_key(&k)
                        || m.window.contains(&k)
                        || in_group.contains_key(&k);
                    match *o {
                        Outcome::Accepted { gateway_seq } => {
                            assert_eq!(gateway_seq, m.next_seq, "dense seq");
                            assert!(!known, "stored twice: {k:?}");
                            m.records.insert(gateway_seq, (k, item(k.0, k.1)));
                            m.present.insert(k, gateway_seq);
                            in_group.insert(k, ());
                            m.next_seq += 1;
                        }
                        Outcome::Duplicate => assert!(
                            known || evicted_now.contains(&k),
                            "duplicate for unknown key {k:?}"
                        ),
                        Outcome::Rejected(RejectCode::StorageFull) if known => {
                            panic!("a known key {k:?} must be a duplicate")
                        }
                        Outcome::Rejected(RejectCode::StorageFull) => {
                            assert!(
                                r.tight && r.cfg.on_full == OnFull::Reject,
                                "storage_full without a tight reject quota"
                            )
                        }
                        other => panic!("unexpected outcome {other:?}"),
                    }
                }
                futures_flush(&j);
            }
            Op::Read { skip, max } => {
                let from = m.first() + skip as u64;
                let got = j.read_from(from, max as usize, usize::MAX).unwrap();
                let want: Vec<u64> = m
                    .records
                    .range(from..)
                    .take(max as usize)
                    .map(|(s, _)| *s)
                    .collect();
                assert_eq!(got.iter().map(|r| r.gateway_seq).collect::<Vec<_>>(), want);
                // A byte limit still returns at least one record.
                let one = j.read_from(from, 10, 1).unwrap();
                assert_eq!(one.len(), want.len().min(1));
            }
            Op::Trim(k) => {
                let seq = m.trimmed_through + k as u64;
                let capped = seq.min(m.next_seq - 1);
                let got = j.trim_through(seq).unwrap();
                let trimmed: Vec<u64> = m.records.range(..=capped).map(|(s, _)| *s).collect();
                for s in trimmed {
                    let (key, _) = m.records.remove(&s).unwrap();
                    m.present.remove(&key);
                    m.window.push_back(key);
                }
                while m.window.len() as u64 > r.cfg.dedup_window.max_keys {
                    m.window.pop_front();
                }
                m.trimmed_through = m.trimmed_through.max(capped);
                assert_eq!(got, m.trimmed_through);
                // Idempotent.
                assert_eq!(j.trim_through(seq).unwrap(), m.trimmed_through);
            }
            Op::Restart => {
                drop(j);
                j = Journal::open(dir.path(), &r.cfg).unwrap();
                assert_eq!(j.epoch(), epoch, "epoch survives restarts");
            }
        }
        check_state(&j, &m, &r);
    }
}

fn futures_flush(j: &Journal) {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(j.flush())
        .unwrap();
}

fn roomy() -> Regime {
    Regime {
        tight: false,
        cfg: JournalConfig {
            dedup_window: DedupWindow {
                max_keys: 12,
                ..DedupWindow::default()
            },
            ..cfg()
        },
    }
}

fn tight(on_full: OnFull) -> Regime {
    Regime {
        tight: true,
        cfg: JournalConfig {
            max_bytes: 64 * 1024,
            on_full,
            ..cfg()
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn journal_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        run(ops, roomy());
    }

    #[test]
    fn journal_matches_model_under_quota(
        ops in prop::collection::vec(
            prop_oneof![
                // Large groups of fresh keys fill 64 KiB quickly.
                4 => (0u8..3, 0u8..200, 20usize..60).prop_map(|(d, s, n)| Op::Append(
                    (0..n).map(|i| (d, s.wrapping_add(i as u8))).collect())),
                3 => op(),
            ],
            1..40),
        drop_oldest in any::<bool>(),
    ) {
        run(ops, tight(if drop_oldest { OnFull::DropOldest } else { OnFull::Reject }));
    }
}
