//! Journals written by earlier releases must open in this one.
//!
//! An upgrade (`apt install ./outpost-gateway_<new>.deb`) keeps `/var/lib/outpost-gateway`
//! and starts the new binary on the old journal. If a change to the on-disk layout (sled
//! keys, the CBOR of records or of the meta value, sled itself) made that journal unreadable
//! or misread, the box would lose every punch it still holds. Building "the previous
//! version" from the same commit cannot catch that, so each release that may change the
//! layout commits a journal written by its real binary under `tests/fixtures/journal-v*/`
//! (made by `packaging/make-journal-fixture`), and this test opens every one of them:
//!
//! - the journal opens, with the epoch, `next_seq`, `trimmed_through` and record count in
//!   its `MANIFEST`;
//! - the records held read back with the same fields as `expected.ndjson` (the export of the
//!   version that wrote them: device, seq, subject, kind, verify, time, gateway_seq,
//!   received time);
//! - the dedup state survived: a resend of a held punch and of an acknowledged (trimmed)
//!   one are both duplicates;
//! - writing continues: the next punch gets `next_seq`, and survives a reopen.
//!
//! The fixture is copied to a temporary directory first (sled writes on open).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_gateway::export::{self, Format};
use outpost_gateway::journal::{Journal, JournalConfig, Outcome, Pending};
use outpost_protocol::{BootId, Id, Punch, PunchKind, Received, Record, Source, VerifyMethod};
use serde_json::Value;

/// The fields compared between the fixture's export and this version's reading.
const FIELDS: &[&str] = &[
    "device_id",
    "seq",
    "subject",
    "kind",
    "verify",
    "time",
    "gateway_seq",
    "received_at",
];

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("journal-v"))
        })
        .collect();
    found.sort();
    assert!(
        !found.is_empty(),
        "no journal fixtures in {}",
        dir.display()
    );
    found
}

fn manifest(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(dir.join("MANIFEST"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Defaults, except that acknowledged keys never age out: the fixture was trimmed at a
/// fixed date, and the test must not change its answer as the calendar moves on.
fn config() -> JournalConfig {
    let mut cfg = JournalConfig::default();
    cfg.dedup_window.max_age = Duration::from_secs(100 * 365 * 86_400);
    cfg
}

fn flush(j: &Journal) {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(j.flush())
        .unwrap();
}

fn all_records(j: &Journal) -> Vec<Record> {
    j.records(0).unwrap().map(|r| r.unwrap()).collect()
}

fn pending(device: &str, seq: u64) -> Pending {
    Pending {
        punch: Punch {
            device_id: Id::new(device).unwrap(),
            device_seq: seq,
            subject_id: Id::new("EMP-UPGRADE").unwrap(),
            kind: PunchKind::In,
            verify: VerifyMethod::Card,
            device_time_ms: 1_795_500_000_000,
            utc_offset_min: Some(120),
        },
        received: Received {
            boot_id: BootId([9; 16]),
            mono_ms: 5_000,
            wall_ms: 1_795_500_000_000,
            clock_synced: true,
        },
        source: Source::Http,
    }
}

fn subset(line: &str) -> BTreeMap<&'static str, Value> {
    let v: Value = serde_json::from_str(line).unwrap();
    FIELDS
        .iter()
        .map(|f| (*f, v.get(*f).cloned().unwrap_or(Value::Null)))
        .collect()
}

#[test]
fn journals_written_by_earlier_releases_open_and_continue() {
    for fixture in fixtures() {
        let name = fixture.file_name().unwrap().to_string_lossy().into_owned();
        let m = manifest(&fixture);
        let num = |k: &str| -> u64 { m[k].parse().unwrap() };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("journal");
        copy_dir(&fixture.join("journal"), &dir);

        let j = Journal::open(&dir, &config())
            .unwrap_or_else(|e| panic!("{name}: the journal no longer opens: {e}"));
        assert_eq!(format!("{:016x}", j.epoch()), m["epoch"], "{name}: epoch");
        let s = j.stats();
        assert_eq!(s.next_seq, num("next_seq"), "{name}: next_seq");
        assert_eq!(
            s.trimmed_through,
            num("trimmed_through"),
            "{name}: trimmed_through"
        );
        assert_eq!(s.records, num("records"), "{name}: records");

        // Every held record reads back as the writing version exported it.
        let expected: Vec<_> = std::fs::read_to_string(fixture.join("expected.ndjson"))
            .unwrap()
            .lines()
            .map(subset)
            .collect();
        let got: Vec<_> = all_records(&j)
            .iter()
            .map(|r| subset(&export::line(Format::Ndjson, "FIXTURE", "gw-fixture", r)))
            .collect();
        assert_eq!(got, expected, "{name}: records differ from expected.ndjson");

        // Dedup state: a held punch and an acknowledged (trimmed) one are both known.
        let held_seq = expected[0]["seq"].as_u64().unwrap();
        let out = j
            .append(&[pending("door-1", held_seq), pending("door-1", 5)])
            .unwrap();
        assert_eq!(
            out,
            vec![Outcome::Duplicate, Outcome::Duplicate],
            "{name}: dedup state"
        );

        // Writing continues at next_seq, durably.
        let next = num("next_seq");
        let out = j.append(&[pending("door-1", 1_000_000)]).unwrap();
        assert_eq!(
            out,
            vec![Outcome::Accepted { gateway_seq: next }],
            "{name}: next punch"
        );
        flush(&j);
        drop(j);
        let j = Journal::open(&dir, &config()).unwrap();
        assert_eq!(j.next_seq(), next + 1, "{name}: after reopen");
        let last = all_records(&j).pop().unwrap();
        assert_eq!(
            (last.gateway_seq, last.punch.device_seq),
            (next, 1_000_000),
            "{name}: the new record after reopen"
        );
    }
}
