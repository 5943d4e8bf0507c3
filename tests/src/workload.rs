//! A realistic, deterministic punch workload: one site, its staff, its devices and its days.
//!
//! [`Site::new`] builds a facility from a seed: `staff` people split over three shifts
//! (early 06–14, late 14–22, night 22–06), each with a home device they usually punch at,
//! and `devices` terminals of mixed kinds (card, fingerprint, face). Each day every person
//! who works clocks in a few minutes before their shift, most take a break (break-out,
//! break-in about half an hour later), a few work overtime, and everyone clocks out a few
//! minutes after the shift ends. So punches cluster around 06:00, 14:00 and 22:00 and are
//! sparse in between, as at a real clinic or factory gate.
//!
//! What the devices and the gateway add on top of the true time:
//! - each device has its own clock skew (a few seconds, fixed per device) and stamps whole
//!   seconds, as most terminals do; it numbers its punches with its own counter;
//! - some devices report a UTC offset, others do not;
//! - the network delays each punch by a few tens of milliseconds (rarely over a second), and
//!   the gateway stamps it on arrival: one boot, a synchronised wall clock, a monotonic clock
//!   since boot, and a dense `gateway_seq` in arrival order.
//!
//! Everything comes from one seeded generator, so the same seed and parameters give the
//! same punches on every run (with the `rand` version in `Cargo.lock`). A [`Site`] is a
//! stream: each call continues where the previous one stopped, with device counters and
//! `gateway_seq` carrying on.
//!
//! ```
//! use outpost_tests::workload::Site;
//! let mut site = Site::new(7, 300, 5);
//! let batch = site.batch(1000);
//! assert_eq!(batch.records.len(), 1000);
//! assert!(batch.is_contiguous());
//! ```

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use outpost_protocol::{
    Batch, BootId, Id, Punch, PunchKind, Received, Record, Source, TimeAnchor, VerifyMethod,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The default number of staff at a site.
pub const DEFAULT_STAFF: usize = 300;
/// The default number of devices at a site.
pub const DEFAULT_DEVICES: usize = 5;

/// The first simulated day starts at this instant: 2026-03-02T00:00:00 local time, in Unix ms
/// (the site is at UTC+02:00, so local midnight is 22:00 UTC the day before).
pub const EPOCH_LOCAL_MIDNIGHT_MS: i64 = 1_772_402_400_000;
/// The site's UTC offset in minutes.
pub const SITE_UTC_OFFSET_MIN: i16 = 120;

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// How badge / employee codes look at a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectStyle {
    /// `EMP-0042`: a prefix and a zero-padded staff number (the default).
    EmployeeCode,
    /// `0004219731`: ten-digit card numbers, effectively random.
    CardNumber,
    /// `N12345`: a letter for the cadre and a five-digit personnel number.
    Personnel,
}

/// What kind of terminal a device is; it decides the usual verify method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// RFID card reader.
    Card,
    /// Fingerprint terminal (falls back to PIN now and then).
    Fingerprint,
    /// Face-recognition terminal (falls back to card now and then).
    Face,
}

/// One simulated terminal.
#[derive(Debug, Clone)]
pub struct Device {
    /// Its `device_id`.
    pub id: Id,
    /// Its kind.
    pub kind: DeviceKind,
    /// How it reaches the gateway.
    pub source: Source,
    /// How far its clock is ahead of true time, in ms.
    pub skew_ms: i64,
    /// Whether it reports a UTC offset.
    pub reports_offset: bool,
    /// The `device_seq` its next punch gets.
    pub next_seq: u64,
}

/// One member of staff.
#[derive(Debug, Clone)]
pub struct Staff {
    /// Their badge / employee code.
    pub subject: Id,
    /// 0 = early (06–14), 1 = late (14–22), 2 = night (22–06).
    pub shift: u8,
    /// Index of the device they usually use.
    pub home_device: usize,
}

/// A punch at its true time, before a device stamps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Event {
    true_ms: i64,
    staff: usize,
    kind: u8,
}

/// A simulated site: staff, devices, the gateway's boot and clocks. See the module docs.
#[derive(Debug)]
pub struct Site {
    rng: StdRng,
    staff: Vec<Staff>,
    devices: Vec<Device>,
    gateway_id: Id,
    site_id: Id,
    journal_epoch: u64,
    boot_id: BootId,
    /// True Unix ms at which the gateway booted (its monotonic clock's zero).
    boot_true_ms: i64,
    /// The next day (0-based) whose events are not generated yet.
    next_day: i64,
    /// Generated punches not yet emitted, by true time.
    events: BinaryHeap<Reverse<Event>>,
    /// Stamped punches not yet emitted: (arrival true ms, tie-breaker) in a heap, the
    /// punches themselves by tie-breaker.
    arrivals: BinaryHeap<Reverse<(i64, u64)>>,
    in_flight: BTreeMap<u64, (Punch, Source)>,
    arrival_counter: u64,
    /// How far the gateway's (synchronised) wall clock is from true time, in ms.
    gateway_clock_offset_ms: i64,
    next_gateway_seq: u64,
}

fn id(s: &str) -> Id {
    // Every id built here is short ASCII without control characters.
    Id::new(s).unwrap_or_else(|e| panic!("workload built an invalid id {s:?}: {e}"))
}

/// A normally distributed value (Box–Muller), in the units of `mean` and `sd`.
fn normal(rng: &mut StdRng, mean: f64, sd: f64) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    mean + sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

const DEVICE_NAMES: [&str; 8] = [
    "main-gate",
    "staff-door",
    "ward-a",
    "ward-b",
    "pharmacy",
    "lab",
    "kitchen",
    "store",
];

impl Site {
    /// A site with `staff` people and `devices` terminals, badge codes in the
    /// [`SubjectStyle::EmployeeCode`] style. Same seed, same site, same punches.
    pub fn new(seed: u64, staff: usize, devices: usize) -> Site {
        Site::with_style(seed, staff, devices, SubjectStyle::EmployeeCode)
    }

    /// Like [`Site::new`], with the given badge code style.
    pub fn with_style(seed: u64, staff: usize, devices: usize, style: SubjectStyle) -> Site {
        let mut rng = StdRng::seed_from_u64(seed);
        let devices = devices.max(1);
        let devs: Vec<Device> = (0..devices)
            .map(|i| {
                let name = match DEVICE_NAMES.get(i) {
                    Some(n) => n.to_string(),
                    None => format!("term-{}", i + 1),
                };
                let kind = [DeviceKind::Card, DeviceKind::Fingerprint, DeviceKind::Face][i % 3];
                Device {
                    id: id(&name),
                    kind,
                    // Card readers post JSON over HTTP; biometric terminals speak MQTT.
                    source: if kind == DeviceKind::Card {
                        Source::Http
                    } else {
                        Source::Mqtt
                    },
                    skew_ms: rng.random_range(-4_000..=4_000),
                    // JSON times always carry an offset; face terminals send UTC only.
                    reports_offset: kind != DeviceKind::Face,
                    next_seq: rng.random_range(1..50_000),
                }
            })
            .collect();
        let mut used = std::collections::HashSet::new();
        let people: Vec<Staff> = (0..staff)
            .map(|i| {
                let subject = loop {
                    let s = match style {
                        SubjectStyle::EmployeeCode => format!("EMP-{:04}", i + 1),
                        SubjectStyle::CardNumber => {
                            format!("{:010}", rng.random_range(1_000_000u64..4_294_967_295))
                        }
                        SubjectStyle::Personnel => format!(
                            "{}{:05}",
                            ['N', 'C', 'A', 'M'][rng.random_range(0..4)],
                            rng.random_range(10_000..100_000)
                        ),
                    };
                    if used.insert(s.clone()) {
                        break s;
                    }
                };
                let shift = match rng.random_range(0..100) {
                    0..45 => 0,
                    45..80 => 1,
                    _ => 2,
                };
                // Half the staff use the main gate; the others a device near their work.
                let home_device = if rng.random_bool(0.5) {
                    0
                } else {
                    rng.random_range(0..devices)
                };
                Staff {
                    subject: id(&subject),
                    shift,
                    home_device,
                }
            })
            .collect();
        let mut boot = [0u8; 16];
        rng.fill(&mut boot);
        let boot_true_ms = EPOCH_LOCAL_MIDNIGHT_MS - rng.random_range(HOUR..30 * DAY);
        Site {
            journal_epoch: rng.random(),
            gateway_clock_offset_ms: rng.random_range(-15..=15),
            next_gateway_seq: rng.random_range(1..1_000_000),
            rng,
            staff: people,
            devices: devs,
            gateway_id: id("gw-hc001-01"),
            site_id: id("HC001"),
            boot_id: BootId(boot),
            boot_true_ms,
            next_day: 0,
            events: BinaryHeap::new(),
            arrivals: BinaryHeap::new(),
            in_flight: BTreeMap::new(),
            arrival_counter: 0,
        }
    }

    /// The site's devices (their `next_seq` advances as punches are made).
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// The site's staff.
    pub fn staff(&self) -> &[Staff] {
        &self.staff
    }

    /// The gateway id used in batches (`gw-hc001-01`).
    pub fn gateway_id(&self) -> Id {
        self.gateway_id
    }

    /// The site id used in batches (`HC001`).
    pub fn site_id(&self) -> Id {
        self.site_id
    }

    /// The gateway's boot id (one boot for the whole run).
    pub fn boot_id(&self) -> BootId {
        self.boot_id
    }

    /// The journal epoch used in batches.
    pub fn journal_epoch(&self) -> u64 {
        self.journal_epoch
    }

    /// The `gateway_seq` the next record gets.
    pub fn next_gateway_seq(&self) -> u64 {
        self.next_gateway_seq
    }

    /// Generates one day's events (shift starting that day; night shifts end the next day).
    fn generate_day(&mut self) {
        let day_start = EPOCH_LOCAL_MIDNIGHT_MS + self.next_day * DAY;
        self.next_day += 1;
        let rng = &mut self.rng;
        for (who, s) in self.staff.iter().enumerate() {
            if rng.random_bool(0.12) {
                continue; // day off
            }
            let start = day_start + (6 + 8 * i64::from(s.shift)) * HOUR;
            let end = start + 8 * HOUR;
            let mut push = |t: f64, kind: PunchKind| {
                self.events.push(Reverse(Event {
                    true_ms: t as i64,
                    staff: who,
                    kind: kind.code(),
                }));
            };
            let minute = MINUTE as f64;
            let clock_in = start as f64 + normal(rng, -9.0, 5.0).min(10.0) * minute;
            push(clock_in, PunchKind::In);
            if rng.random_bool(0.01) {
                // Tapped twice: the same punch again a few seconds later.
                push(clock_in + rng.random_range(2_000.0..8_000.0), PunchKind::In);
            }
            if rng.random_bool(0.75) {
                let out = start as f64 + (4.0 * 60.0 + normal(rng, 0.0, 35.0)) * minute;
                push(out, PunchKind::BreakOut);
                let back = out + normal(rng, 32.0, 6.0).max(10.0) * minute;
                push(back, PunchKind::BreakIn);
            }
            let clock_out = end as f64 + normal(rng, 6.0, 5.0).max(-10.0) * minute;
            if !rng.random_bool(0.01) {
                push(clock_out, PunchKind::Out); // 1% forget to clock out
            }
            if rng.random_bool(0.06) {
                let ot = clock_out + rng.random_range(1.0..4.0) * minute;
                push(ot, PunchKind::OvertimeIn);
                push(
                    ot + rng.random_range(60.0..180.0) * minute,
                    PunchKind::OvertimeOut,
                );
            }
        }
    }

    /// The next event by true time, generating days as needed.
    fn next_event(&mut self) -> Event {
        loop {
            // Every event of a day not generated yet is at or after that day's midnight.
            let horizon = EPOCH_LOCAL_MIDNIGHT_MS + self.next_day * DAY;
            match self.events.peek() {
                Some(Reverse(e)) if e.true_ms < horizon => {
                    if let Some(Reverse(e)) = self.events.pop() {
                        return e;
                    }
                }
                _ => self.generate_day(),
            }
        }
    }

    /// Turns a true-time event into a device punch and its arrival time at the gateway.
    fn stamp(&mut self, e: Event) -> (i64, Punch, Source) {
        let rng = &mut self.rng;
        let person = &self.staff[e.staff];
        let dev_idx = if rng.random_bool(0.85) {
            person.home_device
        } else {
            rng.random_range(0..self.devices.len())
        };
        let dev = &mut self.devices[dev_idx];
        let verify = match dev.kind {
            DeviceKind::Card => VerifyMethod::Card,
            DeviceKind::Fingerprint if rng.random_bool(0.04) => VerifyMethod::Pin,
            DeviceKind::Fingerprint => VerifyMethod::Fingerprint,
            DeviceKind::Face if rng.random_bool(0.03) => VerifyMethod::Card,
            DeviceKind::Face => VerifyMethod::Face,
        };
        // Terminals stamp whole seconds by their own (skewed) clock.
        let device_time_ms = (e.true_ms + dev.skew_ms).div_euclid(1000) * 1000;
        let seq = dev.next_seq;
        dev.next_seq += 1;
        let punch = Punch {
            device_id: dev.id,
            device_seq: seq,
            subject_id: person.subject,
            kind: PunchKind::from_code(e.kind).unwrap_or(PunchKind::Unspecified),
            verify,
            device_time_ms,
            utc_offset_min: dev.reports_offset.then_some(SITE_UTC_OFFSET_MIN),
        };
        let latency = if rng.random_bool(0.02) {
            rng.random_range(300..3_000) // a Wi-Fi retry or a broker hiccup
        } else {
            rng.random_range(8..90)
        };
        (e.true_ms + latency, punch, dev.source)
    }

    /// The next punch to reach the gateway, with its arrival time (true Unix ms).
    fn next_arrival(&mut self) -> (i64, Punch, Source) {
        loop {
            // Arrival = event time + latency, so once the next event is later than the
            // earliest pending arrival, nothing can overtake that arrival.
            if let Some(&Reverse((at, key))) = self.arrivals.peek() {
                if self.peek_event_ms() > at {
                    self.arrivals.pop();
                    if let Some((p, src)) = self.in_flight.remove(&key) {
                        return (at, p, src);
                    }
                }
            }
            let e = self.next_event();
            let (at, p, src) = self.stamp(e);
            self.arrival_counter += 1;
            self.arrivals.push(Reverse((at, self.arrival_counter)));
            self.in_flight.insert(self.arrival_counter, (p, src));
        }
    }

    fn peek_event_ms(&mut self) -> i64 {
        loop {
            let horizon = EPOCH_LOCAL_MIDNIGHT_MS + self.next_day * DAY;
            match self.events.peek() {
                Some(Reverse(e)) if e.true_ms < horizon => return e.true_ms,
                _ => self.generate_day(),
            }
        }
    }

    /// The next `n` punches as devices send them, in arrival order.
    pub fn punches(&mut self, n: usize) -> Vec<Punch> {
        (0..n).map(|_| self.next_arrival().1).collect()
    }

    /// The next `n` punches as the gateway journals them: stamped on arrival, with dense
    /// `gateway_seq` from `first_seq`. (Does not move [`Site::next_gateway_seq`].)
    pub fn records(&mut self, n: usize, first_seq: u64) -> Vec<Record> {
        (0..n as u64)
            .map(|i| {
                let (arrival_ms, punch, source) = self.next_arrival();
                // The gateway's wall clock is NTP-synchronised: a few ms off, slewed by a
                // millisecond now and then.
                let slew = (arrival_ms / (2 * HOUR)).rem_euclid(3) - 1;
                let wall_ms = arrival_ms + self.gateway_clock_offset_ms + slew;
                Record {
                    punch,
                    gateway_seq: first_seq + i,
                    received: Received {
                        boot_id: self.boot_id,
                        mono_ms: (arrival_ms - self.boot_true_ms) as u64,
                        wall_ms,
                        clock_synced: true,
                    },
                    source,
                }
            })
            .collect()
    }

    /// A batch of the next `n` records, continuing this site's `gateway_seq`, with one time
    /// anchor taken just after the last record.
    pub fn batch(&mut self, n: usize) -> Batch {
        let first = self.next_gateway_seq;
        let records = self.records(n, first);
        self.next_gateway_seq += n as u64;
        let mono_ms = records.last().map_or(HOUR as u64, |r| r.received.mono_ms) + 1_500;
        Batch {
            gateway_id: self.gateway_id,
            site_id: self.site_id,
            journal_epoch: self.journal_epoch,
            records,
            anchors: vec![TimeAnchor {
                boot_id: self.boot_id,
                mono_ms,
                true_ms: self.boot_true_ms + mono_ms as i64,
                uncertainty_ms: self.rng.random_range(20..120),
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_from_seed() {
        let a = Site::new(1, 50, 3).batch(200);
        let b = Site::new(1, 50, 3).batch(200);
        assert_eq!(a, b);
        assert_ne!(a, Site::new(2, 50, 3).batch(200));
    }

    #[test]
    fn realistic_shape() {
        let mut site = Site::new(3, DEFAULT_STAFF, DEFAULT_DEVICES);
        let first = site.next_gateway_seq();
        let b1 = site.batch(1500);
        let b2 = site.batch(10);
        assert!(b1.is_contiguous() && b2.is_contiguous());
        assert_eq!(b2.records[0].gateway_seq, first + 1500);
        let recs = &b1.records;
        // Arrival order: monotonic and wall clocks never go backwards.
        assert!(recs
            .windows(2)
            .all(|w| w[0].received.mono_ms <= w[1].received.mono_ms));
        // Per-device counters are dense in device-stamp order.
        for d in site.devices() {
            let mut seqs: Vec<u64> = recs
                .iter()
                .filter(|r| r.punch.device_id == d.id)
                .map(|r| r.punch.device_seq)
                .collect();
            seqs.sort_unstable();
            assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{}", d.id);
        }
        // Clustered around shift changes: clock-ins and clock-outs within 45 min of 06, 14
        // or 22 h (breaks fall mid-shift).
        let in_out: Vec<_> = recs
            .iter()
            .filter(|r| matches!(r.punch.kind, PunchKind::In | PunchKind::Out))
            .collect();
        let near = in_out
            .iter()
            .filter(|r| {
                let local = (r.punch.device_time_ms - EPOCH_LOCAL_MIDNIGHT_MS).rem_euclid(DAY);
                [6, 14, 22, 30]
                    .iter()
                    .any(|h| (local - h * HOUR).abs() <= 45 * MINUTE)
            })
            .count();
        assert!(
            in_out.len() * 2 > recs.len(),
            "{} of {}",
            in_out.len(),
            recs.len()
        );
        assert!(near * 10 > in_out.len() * 9, "{near} of {}", in_out.len());
        // Devices stamp whole seconds, close to the arrival time.
        for r in recs {
            assert_eq!(r.punch.device_time_ms % 1000, 0);
            assert!((r.punch.device_time_ms - r.received.wall_ms).abs() < 8_000);
            assert_eq!(r.punch.validate(), Ok(()));
        }
    }

    #[test]
    fn subject_styles() {
        for style in [
            SubjectStyle::EmployeeCode,
            SubjectStyle::CardNumber,
            SubjectStyle::Personnel,
        ] {
            let site = Site::with_style(5, 300, 5, style);
            let mut ids: Vec<_> = site.staff().iter().map(|s| s.subject).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), 300);
        }
    }
}
