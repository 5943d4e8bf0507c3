//! A restored backup must never make the gateway reuse sequence numbers the relay holds.
//!
//! The gateway is backed up (stopped, data directory copied), keeps working and forwards
//! more punches, then the old backup is restored. Its journal now assigns gateway_seq values
//! that the relay already stores under the same epoch. Every punch taken after the restore
//! must still reach the relay exactly once: the gateway learns the relay's watermark from
//! its hello batch and moves to a new epoch, and the relay never drops a different punch
//! as a resend of a stored sequence number.

mod uplink_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_tests::relay::StoreKind;
use uplink_support::*;

fn copy_dir(from: &Path, to: &Path) {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp")
        .success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

fn epoch(gw: &outpost_tests::gateway::Gateway) -> String {
    status(gw)["journal"]["epoch"]
        .as_str()
        .expect("journal.epoch")
        .to_string()
}

#[test]
fn a_restored_backup_never_reuses_sequence_numbers() {
    let relay = relay(StoreKind::Sled);
    let token = relay.add_gateway("gw-test", "HC001").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), &relay.ws_url(), &token, &[]);
    gw.start();

    let mut expected = post(&gw, "door-1", 1..201);
    assert!(wait_drained(&gw, Duration::from_secs(30)), "first drain");
    assert_eq!(gw.terminate().map(|s| s.success()), Some(true));
    let backup = dir.path().join("backup");
    copy_dir(&gw.data_dir, &backup);
    gw.start();
    let old_epoch = epoch(&gw);

    // After the backup: 300 more punches reach the relay (gateway_seq 201..=500).
    expected.extend(post(&gw, "door-1", 201..501));
    assert!(wait_drained(&gw, Duration::from_secs(30)), "second drain");
    assert_eq!(gw.terminate().map(|s| s.success()), Some(true));

    // Restore the backup: the journal's next gateway_seq is 201 again, same epoch.
    std::fs::remove_dir_all(&gw.data_dir).unwrap();
    copy_dir(&backup, &gw.data_dir);
    gw.start();
    // Punches posted at once race with the uplink's hello; the relay must not drop them.
    expected.extend(post(&gw, "door-2", 1..51));
    assert!(
        wait_until(Duration::from_secs(30), || epoch(&gw) != old_epoch),
        "the gateway did not move to a new epoch after the restore (still {old_epoch})"
    );
    expected.extend(post(&gw, "door-2", 51..301));
    assert!(wait_drained(&gw, Duration::from_secs(60)), "final drain");
    // The exception to the sequence check: after the restore the gateway may send new
    // punches under gateway_seq values the relay already holds (that is the point here).
    assert_delivered(
        &relay,
        &Delivery {
            gateway_id: "gw-test",
            acked: &expected,
            unconfirmed: &BTreeSet::new(),
            seq_reuse: true,
        },
    );
    assert_eq!(
        relay_count(&relay, "gw-test"),
        expected.len() as u64,
        "the relay's record count is the number of distinct punches"
    );
    assert_eq!(gw.terminate().map(|s| s.success()), Some(true));
}
