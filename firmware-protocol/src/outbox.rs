//! The device outbox: the state machine firmware uses to deliver punches at least once.
//!
//! A fixed-capacity queue of unacknowledged punches, with no heap and no clock of its own:
//! the firmware passes the time (`now_ms`, any monotonic milliseconds) and a random number
//! for jitter into each call, so the outbox is deterministic and runs anywhere.
//!
//! # Rules
//!
//! - [`Outbox::push`] numbers the punch (`device_seq = next_seq`, then `next_seq + 1`) and
//!   keeps it. When the outbox is full it refuses the new punch; it never overwrites one.
//! - [`Outbox::next_due`] / [`Outbox::due`] give the punches to send now: new ones at once,
//!   unanswered ones again after an exponential backoff ([`Backoff::base_ms`] doubling up
//!   to [`Backoff::cap_ms`], each wait jittered down by up to half by the caller's random
//!   value). [`Outbox::mark_sent`] records a send and schedules the next try.
//! - [`Outbox::on_ack`] drops a punch only when the ack names its `device_seq` and
//!   [`DeviceAck::settles`]: accepted, duplicate (the gateway already has it), or rejected
//!   for a reason that can never pass (the firmware should log those). An ack for a
//!   `device_seq` the outbox does not hold changes nothing.
//! - A transient rejection (`storage_full`, `rate_limited`, `unavailable`, `internal`,
//!   `unauthorized`) means the gateway cannot take punches now: the whole outbox pauses for
//!   [`Backoff::busy_base_ms`], doubling with each consecutive transient rejection up to
//!   [`Backoff::busy_cap_ms`]. Any settling ack ends the streak.
//!
//! Sequence numbers stay below 2^63 (the top bit marks derived numbers, see [`crate::seq`]).

use core::fmt;

use crate::ack::{AckStatus, DeviceAck, RejectCode};
use crate::punch::Punch;
use crate::seq::DERIVED_BIT;

/// Retry timing for an [`Outbox`]. All values in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Wait after the first unanswered send; doubles with every further send.
    pub base_ms: u32,
    /// The longest wait between two sends of one punch.
    pub cap_ms: u32,
    /// Pause after a transient rejection; doubles with each consecutive one.
    pub busy_base_ms: u32,
    /// The longest pause after transient rejections.
    pub busy_cap_ms: u32,
}

impl Backoff {
    /// 2 s doubling to 5 min for unanswered sends; 30 s doubling to 30 min when the gateway
    /// is busy or full.
    pub const DEFAULT: Backoff = Backoff {
        base_ms: 2_000,
        cap_ms: 300_000,
        busy_base_ms: 30_000,
        busy_cap_ms: 1_800_000,
    };
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::DEFAULT
    }
}

/// `base · 2^exp`, at most `cap`, jittered down by up to half using `random`.
fn jittered(base: u32, cap: u32, exp: u32, random: u32) -> u64 {
    let d = u64::from(base)
        .checked_shl(exp.min(32))
        .unwrap_or(u64::MAX)
        .min(u64::from(cap));
    let half = d / 2;
    d - u64::from(random) % (half + 1)
}

/// Why [`Outbox::push`] or [`Outbox::restore`] refused a punch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    /// Every slot holds an unacknowledged punch. Keep the punch elsewhere (or refuse the
    /// badge) and retry after acks arrive.
    Full,
    /// `next_seq` reached 2^63: the counter cannot number more punches.
    SeqExhausted,
    /// [`Outbox::restore`] got a punch whose `device_seq` is already held, or is 2^63 or more.
    BadSeq,
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PushError::Full => "outbox full: wait for acks before taking more punches",
            PushError::SeqExhausted => "device_seq counter exhausted (2^63)",
            PushError::BadSeq => "device_seq already in the outbox or out of range",
        })
    }
}

#[cfg(feature = "std")]
impl std::error::Error for PushError {}

/// What [`Outbox::on_ack`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// No punch with that `device_seq` is held (already settled, or not ours): nothing changed.
    Unknown,
    /// The gateway has the punch (accepted or duplicate); it was dropped from the outbox.
    Delivered(AckStatus),
    /// The gateway refused the punch for good; it was dropped. Log it.
    Refused(RejectCode),
    /// The gateway refused for now; the punch is kept and the outbox pauses until `until_ms`.
    Deferred {
        /// When sending resumes.
        until_ms: u64,
    },
}

/// One held punch and its retry state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    punch: Punch,
    /// How many times it was sent.
    sends: u32,
    /// Not to be sent before this time.
    due_ms: u64,
}

/// A fixed-capacity outbox of up to `N` unacknowledged punches (no heap). See the
/// [module docs](self) for the rules and the crate docs for the firmware contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outbox<const N: usize> {
    /// `entries[..len]` are `Some`, in increasing `device_seq` order; the rest are `None`.
    entries: [Option<Entry>; N],
    len: usize,
    next_seq: u64,
    backoff: Backoff,
    busy_until_ms: u64,
    busy_streak: u32,
}

impl<const N: usize> Outbox<N> {
    /// An empty outbox whose next punch gets `device_seq = next_seq` (restored by the
    /// firmware from its own storage at boot).
    pub const fn new(next_seq: u64, backoff: Backoff) -> Self {
        Outbox {
            entries: [None; N],
            len: 0,
            next_seq,
            backoff,
            busy_until_ms: 0,
            busy_streak: 0,
        }
    }

    /// The `device_seq` the next pushed punch gets. Persist it before sending that punch.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// How many punches are held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when no punch is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `true` when [`Outbox::push`] would refuse.
    pub fn is_full(&self) -> bool {
        self.len == N
    }

    /// The capacity `N`.
    pub fn capacity(&self) -> usize {
        N
    }

    /// Every held punch, in `device_seq` order.
    pub fn iter(&self) -> impl Iterator<Item = &Punch> + '_ {
        self.entries[..self.len].iter().flatten().map(|e| &e.punch)
    }

    /// The held punch with this `device_seq`.
    pub fn get(&self, device_seq: u64) -> Option<&Punch> {
        self.iter().find(|p| p.device_seq == device_seq)
    }

    fn position(&self, device_seq: u64) -> Option<usize> {
        self.entries[..self.len]
            .iter()
            .position(|e| e.is_some_and(|e| e.punch.device_seq == device_seq))
    }

    fn insert(&mut self, entry: Entry) {
        // Keep `device_seq` order: shift later entries right by one.
        let seq = entry.punch.device_seq;
        let at = self.entries[..self.len]
            .iter()
            .position(|e| e.is_some_and(|e| e.punch.device_seq > seq))
            .unwrap_or(self.len);
        self.entries[at..=self.len].rotate_right(1);
        self.entries[at] = Some(entry);
        self.len += 1;
    }

    /// Numbers `punch` with the next `device_seq`, keeps it, and returns the number. The
    /// punch is due at once. Refuses when full; never drops a held punch.
    pub fn push(&mut self, mut punch: Punch, now_ms: u64) -> Result<u64, PushError> {
        if self.is_full() {
            return Err(PushError::Full);
        }
        let seq = self.next_seq;
        if seq >= DERIVED_BIT {
            return Err(PushError::SeqExhausted);
        }
        punch.device_seq = seq;
        self.next_seq = seq + 1;
        self.insert(Entry {
            punch,
            sends: 0,
            due_ms: now_ms,
        });
        Ok(seq)
    }

    /// Puts back a punch the firmware kept in its own storage across a reboot, with its
    /// existing `device_seq`. It is due at once, and `next_seq` moves past it if needed.
    pub fn restore(&mut self, punch: Punch, now_ms: u64) -> Result<(), PushError> {
        if self.is_full() {
            return Err(PushError::Full);
        }
        let seq = punch.device_seq;
        if seq >= DERIVED_BIT || self.position(seq).is_some() {
            return Err(PushError::BadSeq);
        }
        self.next_seq = self.next_seq.max(seq + 1);
        self.insert(Entry {
            punch,
            sends: 0,
            due_ms: now_ms,
        });
        Ok(())
    }

    fn sending_allowed(&self, now_ms: u64) -> bool {
        now_ms >= self.busy_until_ms
    }

    /// The punches to send now, in `device_seq` order: never sent, or unanswered for their
    /// backoff; nothing while the gateway said it is busy.
    pub fn due(&self, now_ms: u64) -> impl Iterator<Item = &Punch> + '_ {
        let allowed = self.sending_allowed(now_ms);
        self.entries[..self.len]
            .iter()
            .flatten()
            .filter(move |e| allowed && e.due_ms <= now_ms)
            .map(|e| &e.punch)
    }

    /// The first punch to send now (a copy), if any. Call [`Outbox::mark_sent`] after
    /// sending it, or it stays due.
    pub fn next_due(&self, now_ms: u64) -> Option<Punch> {
        self.due(now_ms).next().copied()
    }

    /// When the next punch becomes due (`None` when empty): how long the firmware may sleep.
    pub fn next_wake_ms(&self) -> Option<u64> {
        let earliest = self.entries[..self.len]
            .iter()
            .flatten()
            .map(|e| e.due_ms)
            .min()?;
        Some(earliest.max(self.busy_until_ms))
    }

    /// Records that the punch `device_seq` was sent at `now_ms` and schedules its next try
    /// (after `base_ms · 2^(sends−1)`, capped, jittered with `random`). Returns `false` if
    /// the outbox does not hold it.
    pub fn mark_sent(&mut self, device_seq: u64, now_ms: u64, random: u32) -> bool {
        let Some(i) = self.position(device_seq) else {
            return false;
        };
        let b = self.backoff;
        if let Some(e) = self.entries[i].as_mut() {
            let wait = jittered(b.base_ms, b.cap_ms, e.sends, random);
            e.sends = e.sends.saturating_add(1);
            e.due_ms = now_ms.saturating_add(wait);
        }
        true
    }

    /// Applies the gateway's answer for one punch. Only an ack naming a held `device_seq`
    /// changes anything; only a settling ack ([`DeviceAck::settles`]) drops the punch.
    pub fn on_ack(&mut self, ack: &DeviceAck, now_ms: u64, random: u32) -> AckOutcome {
        let Some(i) = self.position(ack.device_seq) else {
            return AckOutcome::Unknown;
        };
        if ack.settles() {
            self.entries[i..self.len].rotate_left(1);
            self.len -= 1;
            self.entries[self.len] = None;
            self.busy_streak = 0;
            return match (ack.status, ack.code) {
                (AckStatus::Rejected, Some(code)) => AckOutcome::Refused(code),
                (AckStatus::Rejected, None) => AckOutcome::Refused(RejectCode::Malformed),
                (status, _) => AckOutcome::Delivered(status),
            };
        }
        let b = self.backoff;
        let wait = jittered(b.busy_base_ms, b.busy_cap_ms, self.busy_streak, random);
        self.busy_streak = self.busy_streak.saturating_add(1);
        let until_ms = now_ms.saturating_add(wait);
        self.busy_until_ms = self.busy_until_ms.max(until_ms);
        if let Some(e) = self.entries[i].as_mut() {
            e.due_ms = e.due_ms.max(until_ms);
        }
        AckOutcome::Deferred {
            until_ms: self.busy_until_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Id;
    use crate::punch::{PunchKind, VerifyMethod};

    fn punch(subject: &str) -> Punch {
        Punch {
            device_id: Id::new("door-1").unwrap(),
            device_seq: 0,
            subject_id: Id::new(subject).unwrap(),
            kind: PunchKind::In,
            verify: VerifyMethod::Card,
            device_time_ms: 1_795_327_083_000,
            utc_offset_min: Some(120),
        }
    }

    const B: Backoff = Backoff {
        base_ms: 1_000,
        cap_ms: 8_000,
        busy_base_ms: 30_000,
        busy_cap_ms: 120_000,
    };

    #[test]
    fn push_numbers_and_refuses_when_full() {
        let mut o: Outbox<2> = Outbox::new(40, B);
        assert_eq!(o.push(punch("a"), 0), Ok(40));
        assert_eq!(o.push(punch("b"), 0), Ok(41));
        assert_eq!(o.push(punch("c"), 0), Err(PushError::Full));
        assert_eq!(o.next_seq(), 42);
        let seqs: Vec<u64> = o.iter().map(|p| p.device_seq).collect();
        assert_eq!(seqs, [40, 41]);
        assert_eq!(o.get(41).unwrap().subject_id.as_str(), "b");
    }

    #[test]
    fn counter_never_reaches_the_derived_bit() {
        let mut o: Outbox<2> = Outbox::new(DERIVED_BIT - 1, B);
        assert_eq!(o.push(punch("a"), 0), Ok(DERIVED_BIT - 1));
        assert_eq!(o.push(punch("b"), 0), Err(PushError::SeqExhausted));
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter() {
        let mut o: Outbox<1> = Outbox::new(1, B);
        o.push(punch("a"), 0).unwrap();
        assert_eq!(o.next_due(0).map(|p| p.device_seq), Some(1));
        let mut now = 0;
        for expected in [1_000, 2_000, 4_000, 8_000, 8_000] {
            assert!(o.mark_sent(1, now, 0));
            assert_eq!(o.next_wake_ms(), Some(now + expected), "no jitter with 0");
            assert_eq!(o.due(now + expected - 1).count(), 0);
            assert_eq!(o.due(now + expected).count(), 1);
            now += expected;
        }
        // Jitter takes off at most half.
        for r in [1, 77, 4_000, u32::MAX] {
            let mut o: Outbox<1> = Outbox::new(1, B);
            o.push(punch("a"), 0).unwrap();
            o.mark_sent(1, 0, r);
            let wake = o.next_wake_ms().unwrap();
            assert!((500..=1_000).contains(&wake), "{r}: {wake}");
        }
        assert!(!o.mark_sent(99, 0, 0));
    }

    #[test]
    fn only_a_settling_ack_naming_the_punch_drops_it() {
        let mut o: Outbox<4> = Outbox::new(1, B);
        for s in ["a", "b", "c", "d"] {
            o.push(punch(s), 0).unwrap();
        }
        let before = o.clone();
        assert_eq!(
            o.on_ack(&DeviceAck::accepted(9, 1), 0, 0),
            AckOutcome::Unknown
        );
        assert_eq!(o, before);
        assert_eq!(
            o.on_ack(&DeviceAck::accepted(2, 17), 0, 0),
            AckOutcome::Delivered(AckStatus::Accepted)
        );
        assert_eq!(
            o.on_ack(&DeviceAck::duplicate(3), 0, 0),
            AckOutcome::Delivered(AckStatus::Duplicate)
        );
        assert_eq!(
            o.on_ack(&DeviceAck::rejected(4, RejectCode::InvalidSubject), 0, 0),
            AckOutcome::Refused(RejectCode::InvalidSubject)
        );
        let seqs: Vec<u64> = o.iter().map(|p| p.device_seq).collect();
        assert_eq!(seqs, [1]);
        // A repeated ack for a settled punch is unknown now.
        assert_eq!(
            o.on_ack(&DeviceAck::accepted(2, 17), 0, 0),
            AckOutcome::Unknown
        );
    }

    #[test]
    fn transient_rejections_pause_the_outbox_longer_each_time() {
        let mut o: Outbox<4> = Outbox::new(1, B);
        o.push(punch("a"), 0).unwrap();
        o.push(punch("b"), 0).unwrap();
        let full = DeviceAck::rejected(1, RejectCode::StorageFull);
        assert_eq!(
            o.on_ack(&full, 100, 0),
            AckOutcome::Deferred { until_ms: 30_100 }
        );
        assert_eq!(o.len(), 2, "kept");
        assert_eq!(o.due(30_099).count(), 0, "paused, punch 2 included");
        assert_eq!(o.due(30_100).count(), 2);
        let limited = DeviceAck::rejected(2, RejectCode::RateLimited);
        assert_eq!(
            o.on_ack(&limited, 40_000, 0),
            AckOutcome::Deferred { until_ms: 100_000 }
        );
        // Capped.
        o.on_ack(&full, 100_000, 0);
        assert_eq!(
            o.on_ack(&full, 200_000, 0),
            AckOutcome::Deferred { until_ms: 320_000 }
        );
        // A delivery ends the streak.
        o.on_ack(&DeviceAck::accepted(2, 5), 320_000, 0);
        assert_eq!(
            o.on_ack(&full, 400_000, 0),
            AckOutcome::Deferred { until_ms: 430_000 }
        );
    }

    #[test]
    fn restore_keeps_numbers_and_moves_the_counter() {
        let mut o: Outbox<3> = Outbox::new(5, B);
        let mut p = punch("a");
        p.device_seq = 9;
        o.restore(p, 0).unwrap();
        p.device_seq = 7;
        o.restore(p, 0).unwrap();
        assert_eq!(o.restore(p, 0), Err(PushError::BadSeq));
        assert_eq!(o.next_seq(), 10);
        assert_eq!(o.push(punch("b"), 0), Ok(10));
        let seqs: Vec<u64> = o.iter().map(|p| p.device_seq).collect();
        assert_eq!(seqs, [7, 9, 10]);
        p.device_seq = DERIVED_BIT;
        assert_eq!(o.restore(p, 0), Err(PushError::Full));
    }

    mod model {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        const CAP: usize = 5;

        #[derive(Clone, Debug)]
        enum Op {
            Push,
            Send(usize, u32),
            Ack(usize, u8),
            AckUnknown(u64),
            Advance(u32),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => Just(Op::Push),
                3 => (any::<usize>(), any::<u32>()).prop_map(|(i, r)| Op::Send(i, r)),
                3 => (any::<usize>(), 0u8..6).prop_map(|(i, k)| Op::Ack(i, k)),
                1 => any::<u64>().prop_map(Op::AckUnknown),
                2 => (0u32..200_000).prop_map(Op::Advance),
            ]
        }

        proptest! {
            #[test]
            fn outbox_matches_a_simple_model(ops in proptest::collection::vec(op(), 1..80)) {
                let mut o: Outbox<CAP> = Outbox::new(100, B);
                // The model: every pushed punch that no settling ack has named, by seq.
                let mut held: BTreeMap<u64, Punch> = BTreeMap::new();
                let mut now = 0u64;
                for op in ops {
                    match op {
                        Op::Push => {
                            let r = o.push(punch("x"), now);
                            if held.len() == CAP {
                                prop_assert_eq!(r, Err(PushError::Full));
                            } else {
                                let seq = r.unwrap();
                                let mut p = punch("x");
                                p.device_seq = seq;
                                held.insert(seq, p);
                            }
                        }
                        Op::Send(i, r) => {
                            let seq = held.keys().copied().nth(i % (held.len() + 1));
                            let seq = seq.unwrap_or(u64::MAX);
                            prop_assert_eq!(o.mark_sent(seq, now, r), held.contains_key(&seq));
                        }
                        Op::Ack(i, k) => {
                            let Some(&seq) = held.keys().nth(i % held.len().max(1)) else {
                                continue;
                            };
                            let ack = match k {
                                0 => DeviceAck::accepted(seq, 1),
                                1 => DeviceAck::duplicate(seq),
                                2 => DeviceAck::rejected(seq, RejectCode::InvalidSubject),
                                3 => DeviceAck::rejected(seq, RejectCode::StorageFull),
                                4 => DeviceAck::rejected(seq, RejectCode::RateLimited),
                                _ => DeviceAck::rejected(seq, RejectCode::Unavailable),
                            };
                            let out = o.on_ack(&ack, now, 7);
                            if ack.settles() {
                                held.remove(&seq);
                                let settled = !matches!(out, AckOutcome::Deferred { .. } | AckOutcome::Unknown);
                                prop_assert!(settled, "{:?}", out);
                            } else {
                                let deferred = matches!(out, AckOutcome::Deferred { .. });
                                prop_assert!(deferred, "{:?}", out);
                            }
                        }
                        Op::AckUnknown(seq) => {
                            if held.contains_key(&seq) {
                                continue;
                            }
                            let before = o.clone();
                            prop_assert_eq!(o.on_ack(&DeviceAck::accepted(seq, 1), now, 3), AckOutcome::Unknown);
                            prop_assert_eq!(&o, &before);
                        }
                        Op::Advance(ms) => now += u64::from(ms),
                    }
                    prop_assert!(o.len() <= CAP);
                    let got: Vec<Punch> = o.iter().copied().collect();
                    let want: Vec<Punch> = held.values().copied().collect();
                    prop_assert_eq!(got, want);
                    for p in o.due(now) {
                        prop_assert!(held.contains_key(&p.device_seq));
                    }
                }
                // Nothing held is forgotten: far enough ahead, everything is due again.
                let later = now + u64::from(B.cap_ms.max(B.busy_cap_ms)) + 1;
                prop_assert_eq!(o.due(later).count(), held.len());
            }
        }
    }
}
