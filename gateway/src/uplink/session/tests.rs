//! Edge cases of [`Session`], one rule at a time (the random walk is the model test,
//! `gateway/tests/uplink_session_model.rs`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_protocol::{Ack, Id};

use super::*;

const EPOCH: u64 = 7;

fn session(window: usize, first_unacked: u64, trimmed: u64) -> Session {
    let cfg = UplinkConfig {
        window,
        batch_max_records: 10,
        batch_max_age: Duration::from_secs(1),
        ..UplinkConfig::default()
    };
    let header = BatchHeader {
        gateway_id: Id::new("gw-1").unwrap(),
        site_id: Id::new("site-1").unwrap(),
        journal_epoch: EPOCH,
    };
    Session::new(&cfg, header, first_unacked, trimmed)
}

fn batch(first: u64, last: u64) -> Prepared {
    Prepared {
        first,
        last,
        records: (last + 1).saturating_sub(first),
        anchors: Vec::new(),
        frame: Bytes::from_static(b"0123456789"),
    }
}

fn ack(through: u64) -> Ack {
    Ack {
        gateway_id: Id::new("gw-1").unwrap(),
        journal_epoch: EPOCH,
        acked_through: through,
        server_time_ms: 1_800_000_000_000,
        duplicates: None,
        conflicts: None,
    }
}

/// Hands `p` to the session and sends it at `t`; returns the resent count.
fn send(s: &mut Session, p: Prepared, t: Instant) -> u64 {
    s.on_prepared(p);
    let p = s.take_sendable(t).expect("sendable");
    s.on_sent(p, t, 0, t)
}

/// Connects at `t` and sends the hello; returns the cursor.
fn connect(s: &mut Session, first_unacked: u64, t: Instant) -> u64 {
    let Prepare::Anchors { at } = s.on_connected(first_unacked, t) else {
        panic!("the hello comes first")
    };
    send(s, batch(at, at - 1), t);
    at
}

fn trim(s: &mut Session, through: u64) -> Option<u64> {
    match s.on_ack(&ack(through), 1000).unwrap().next {
        AckNext::Trim(t) => t,
        AckNext::NewEpoch => panic!("no new epoch expected"),
    }
}

#[test]
fn hello_first_then_batches_by_count_or_age() {
    let t0 = Instant::now();
    let mut s = session(8, 5, 4);
    assert_eq!(s.poll(t0, 9, true), None, "nothing before a link");
    assert_eq!(s.on_connected(5, t0), Prepare::Anchors { at: 5 });
    s.on_prepared(batch(5, 4));
    assert_eq!(s.poll(t0, 9, false), None, "the hello goes first");
    assert_eq!(s.wake_at(), Some(t0));
    let hello = s.take_sendable(t0).unwrap();
    assert_eq!(s.on_sent(hello, t0, 0, t0), 0);

    // Three records wait: not a full batch, so wait for their age.
    assert_eq!(s.poll(t0, 7, false), None);
    assert_eq!(s.wake_at(), Some(t0 + Duration::from_secs(1)));
    let t1 = t0 + Duration::from_secs(1);
    let want = Prepare::Records {
        from: 5,
        max_records: 10,
    };
    assert_eq!(s.poll(t1, 7, false), Some(want));
    assert_eq!(s.poll(t1, 7, false), None, "one read at a time");
    assert_eq!(s.wake_at(), None);
    s.on_prepared(batch(5, 7));
    assert_eq!((s.cursor(), s.unsent(7)), (Some(8), 0));
    send(&mut s, batch(5, 7), t1);

    // A full batch's worth goes at once.
    let want = Prepare::Records {
        from: 8,
        max_records: 10,
    };
    assert_eq!(s.poll(t1, 17, false), Some(want));
}

#[test]
fn window_and_pace_are_respected() {
    let t0 = Instant::now();
    let mut s = session(2, 1, 0);
    s.cfg.bandwidth_bytes_per_sec = 10; // 10 B/s, and every frame here is 10 bytes
    connect(&mut s, 1, t0);
    s.on_prepared(batch(1, 3));
    assert!(s.take_sendable(t0).is_none(), "the hello used this second");
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(s.wake_at(), Some(t1));
    let p = s.take_sendable(t1).unwrap();
    s.on_sent(p, t1, 0, t1);
    s.on_prepared(batch(4, 6));
    assert_eq!(s.inflight(), 2);
    assert_eq!(s.wake_at(), None, "window full: wait for an ack");
    assert!(s.take_sendable(t1 + Duration::from_secs(5)).is_none());
    trim(&mut s, 0);
    assert!(s.take_sendable(t1 + Duration::from_secs(5)).is_some());
}

#[test]
fn trims_by_batch_end_capped_and_never_back() {
    let t0 = Instant::now();
    let mut s = session(8, 5, 4);
    connect(&mut s, 5, t0);
    // The hello's ack names more than was sent here: capped at what this process sent.
    assert_eq!(trim(&mut s, 9), None);
    send(&mut s, batch(5, 7), t0);
    send(&mut s, batch(8, 8), t0);
    // The relay's watermark is held back by evicted records: trim by the batch end.
    assert_eq!(trim(&mut s, 2), Some(7));
    assert_eq!(trim(&mut s, 1), Some(8), "a stale watermark: the batch end");
    send(&mut s, batch(9, 8), t0);
    assert_eq!(trim(&mut s, 3), None, "stale ack of an anchor-only batch");
    assert_eq!(s.trimmed(), 8);
}

#[test]
fn bad_acks_end_the_connection() {
    let t0 = Instant::now();
    let mut s = session(8, 1, 0);
    assert!(matches!(s.on_ack(&ack(0), 10), Err(LinkError::Protocol(_))));
    connect(&mut s, 1, t0);
    assert!(matches!(
        s.on_ack(&ack(0), 10).map(|a| a.next),
        Ok(AckNext::Trim(None))
    ));
    assert!(matches!(s.on_ack(&ack(0), 10), Err(LinkError::Protocol(_))));

    send(&mut s, batch(1, 3), t0);
    let mut other = ack(3);
    other.journal_epoch = EPOCH + 1;
    assert!(matches!(s.on_ack(&other, 10), Err(LinkError::Protocol(_))));

    // The relay holds a seq this journal never assigned: new epoch, nothing trimmed.
    send(&mut s, batch(1, 3), t0);
    let acked = s.on_ack(&ack(11), 10).unwrap();
    assert_eq!((acked.next, s.trimmed()), (AckNext::NewEpoch, 0));
    s.on_new_epoch(EPOCH + 1);
    assert_eq!(s.header().journal_epoch, EPOCH + 1);
}

#[test]
fn link_loss_resends_what_is_not_acked() {
    let t0 = Instant::now();
    let mut s = session(8, 5, 4);
    connect(&mut s, 5, t0);
    send(&mut s, batch(5, 7), t0);
    send(&mut s, batch(8, 9), t0);
    trim(&mut s, 4);
    assert_eq!(trim(&mut s, 7), Some(7));
    s.on_link_lost();
    assert_eq!((s.cursor(), s.inflight()), (None, 0));

    // The trimmer has not caught up (the journal still starts at 5): start after 7.
    assert_eq!(connect(&mut s, 5, t0), 8);
    assert_eq!(send(&mut s, batch(8, 11), t0), 2, "8 and 9 are resent");
    s.on_link_lost();

    // A restart: a new session from what the journal persisted.
    let mut s = session(8, 8, 7);
    assert_eq!(connect(&mut s, 8, t0), 8);
    assert_eq!(
        send(&mut s, batch(8, 11), t0),
        0,
        "this process never sent them"
    );
}

#[test]
fn reads_skip_evicted_records_and_idle_sends_anchors() {
    let t0 = Instant::now();
    let mut s = session(8, 1, 0);
    connect(&mut s, 1, t0);
    assert_eq!(s.poll(t0, 0, true), None, "the hello is in flight");
    trim(&mut s, 0);
    assert_eq!(s.poll(t0, 0, false), None);
    assert_eq!(s.poll(t0, 0, true), Some(Prepare::Anchors { at: 1 }));

    let t1 = t0 + Duration::from_secs(2);
    assert!(s.poll(t0, 3, false).is_none());
    assert!(s.poll(t1, 3, false).is_some());
    // Everything from the cursor to the watermark was evicted meanwhile.
    s.on_prepared_empty(6);
    assert_eq!(s.cursor(), Some(6));
    assert_eq!(s.wake_at(), None);
}

#[test]
fn ticks_time_out_acks_and_ping() {
    let t0 = Instant::now();
    let sec = Duration::from_secs;
    let mut s = session(8, 1, 0);
    assert!(
        s.on_tick(t0, t0, true).is_none(),
        "no link, nothing to check"
    );
    connect(&mut s, 1, t0);
    assert!(s.on_tick(t0 + sec(14), t0, true).is_none());
    // Quiet for ping_interval (15 s): ping; a pong clears it; then quiet again.
    assert!(matches!(
        s.on_tick(t0 + sec(15), t0, true),
        Some(TickAction::Ping)
    ));
    assert!(s.on_tick(t0 + sec(16), t0 + sec(16), true).is_none());
    assert!(matches!(
        s.on_tick(t0 + sec(31), t0 + sec(16), true),
        Some(TickAction::Ping)
    ));
    // No answer within ping_timeout (10 s): dead.
    assert!(s.on_tick(t0 + sec(40), t0 + sec(16), true).is_none());
    assert!(matches!(
        s.on_tick(t0 + sec(41), t0 + sec(16), true),
        Some(TickAction::Close(LinkError::Timeout(_)))
    ));
    // HTTPS does not ping, but the hello's ack is overdue after ack_timeout (60 s).
    assert!(s.on_tick(t0 + sec(60), t0, false).is_none());
    assert!(matches!(
        s.on_tick(t0 + sec(61), t0, false),
        Some(TickAction::Close(LinkError::Timeout(_)))
    ));
}

#[test]
fn batch_limit_halves_down_to_one() {
    let mut s = session(8, 1, 0);
    let limits: Vec<_> = std::iter::from_fn(|| s.halve_batch_limit()).collect();
    assert_eq!(limits, vec![5, 2, 1]);
    assert_eq!(s.batch_limit(), 1);
}
