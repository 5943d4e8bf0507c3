//! Uplink messages between a gateway and the relay: [`Batch`], [`Ack`] and [`TimeAnchor`].
//!
//! [`Ack`] and [`TimeAnchor`] use the crate's usual encoding (arrays indexed by field
//! number). A [`Batch`] carries up to [`MAX_BATCH_RECORDS`] records and is the bulk of the
//! uplink, so it has a hand-written **columnar** encoding that stores each field of the
//! records as one column of small deltas. It compresses to a few bytes per punch.
//!
//! # Batch wire layout (public contract)
//!
//! A batch is a CBOR **map with unsigned integer keys**. Keys appear in ascending order,
//! each at most once. A decoder skips keys it does not know, so new keys can be added.
//!
//! | key | name | CBOR | meaning |
//! |---|---|---|---|
//! | 0 | gateway_id | text | the sending gateway (required) |
//! | 1 | site_id | text | the facility (required) |
//! | 2 | journal_epoch | uint | the journal's epoch (required) |
//! | 3 | count | uint | number of records `n`, at most [`MAX_BATCH_RECORDS`] (required) |
//! | 4 | first_seq | uint | `gateway_seq` of the first record; record `i` has `first_seq + i` (required when `n > 0`) |
//! | 5 | anchors | array of anchors | absent = none; see below |
//! | 6 | devices | array of text | distinct `device_id`s, in order of first appearance |
//! | 7 | subjects | array of text | distinct `subject_id`s, in order of first appearance |
//! | 8 | boots | array of bytes(16) | distinct `boot_id`s, in order of first appearance |
//! | 9 | device_time_ref | uint | how column 16 is predicted: 0 (absent) or 1, see below |
//! | 10 | device_time_unit | uint ≥ 1 | column 16 is in multiples of this many ms; absent = 1 |
//! | 11 | device | column of uint | index into `devices` |
//! | 12 | device_seq | column of int | `device_seq` minus that of the previous record of the same device (0 for its first record) |
//! | 13 | subject | column of uint | index into `subjects` |
//! | 14 | kind | column of uint | [`crate::PunchKind`] code |
//! | 15 | verify | column of uint | [`crate::VerifyMethod`] code |
//! | 16 | device_time | column of int | `device_time_ms` minus its prediction, divided by `device_time_unit` |
//! | 17 | utc_offset | column of int or null | minutes; absent = every record has none |
//! | 18 | boot | column of uint | index into `boots` |
//! | 19 | mono | **array** of int | `mono_ms` minus the previous record's (0 before the first) |
//! | 20 | wall | column of int | `wall_ms − mono_ms` minus the previous record's (0 before the first) |
//! | 21 | clock_synced | column of bool | |
//! | 22 | source | column of uint | [`crate::Source`] code |
//!
//! When `n = 0` only keys 0–3 (and optionally 5) are needed; keys 4 and 6–22 are ignored
//! (tables, if present, must be empty). Tables have at most `n` entries and anchors at most
//! [`MAX_BATCH_ANCHORS`], so a decoder's memory is bounded by `n` ≤ [`MAX_BATCH_RECORDS`]
//! whatever the input claims.
//! When `n > 0` every key from 4 to 22 is required except 5, 9, 10 and 17.
//!
//! A **column** is either an array of exactly `n` elements (one per record, in
//! `gateway_seq` order) or a single element that applies to every record. Column 19 is
//! always an array, so a batch costs at least one byte per record and a decoder never
//! builds more records than the input has bytes. Arrays and maps have definite lengths.
//!
//! **Deltas.** Columns 12, 16, 19 and 20 hold differences. All delta arithmetic is modulo
//! 2^64 (two's complement, as C's `uint64_t` does), and a delta is sent as a signed 64-bit
//! integer, so every possible record has an encoding and decoding cannot overflow: the
//! decoder adds the delta to the prediction with wrapping arithmetic. Any other integer out
//! of range (a delta beyond 64 bits, `first_seq + n − 1` beyond `u64`, an offset beyond
//! `i16`, an unknown code, a table index past the end) is a decode error.
//!
//! **Anchors** (key 5) are [`TimeAnchor`]s in their usual array form `[boot_id, mono_ms,
//! true_ms, uncertainty_ms]`, except that `boot_id` may be a uint: an index into `boots`
//! (key 8), which saves 16 bytes when the anchor's boot is also a record's. Elements after
//! the fourth are ignored.
//!
//! **Device time prediction** (key 9): with 0, the prediction is the `device_time_ms` of the
//! previous record of the same device (0 for its first record), which suits devices that
//! stamp whole seconds; with 1, it is the record's own `wall_ms`, which suits devices with
//! millisecond clocks. The encoder tries both and keeps the smaller. `device_time_unit` is
//! the greatest common divisor of the differences (1000 for whole-second devices).
//!
//! Example: two punches from one device, 5 s apart, whose whole-second stamps are 412 and
//! 415 ms behind the gateway's wall clock, both synchronised, come out as
//! `{0: "gw-1", 1: "HC001", 2: epoch, 3: 2, 4: 17, 6: ["door-1"], 7: ["EMP-1", "EMP-2"],
//! 8: [h'…'], 9: 1, 11: 0, 12: [42, 1], 13: [0, 1], 14: 1, 15: 1, 16: [-412, -415],
//! 17: 120, 18: 0, 19: [m, 5003], 20: [w−m, 0], 21: true, 22: 1}`: device time is
//! predicted from the wall clock (key 9 = 1) because `[-412, -415]` is shorter than
//! `[t/1000, 5]` plus a unit of 1000. `tests/vectors/batch.hex` is a complete example.

use minicbor::{Decode, Encode};

use crate::id::Id;
use crate::record::BootId;
#[cfg(feature = "alloc")]
use crate::record::Record;

/// The most records one [`Batch`] may carry. Encoders refuse more and decoders reject a
/// batch that claims more, which bounds the memory a decoded batch can take (about 200
/// bytes per record).
pub const MAX_BATCH_RECORDS: u64 = 100_000;

/// The most time anchors one [`Batch`] may carry (a batch needs one per boot it spans).
pub const MAX_BATCH_ANCHORS: u64 = 1024;

/// A point where a gateway's monotonic clock was matched to true time (the relay's clock,
/// carried in an [`Ack`]). With an anchor for a boot, the relay can correct the receive time
/// of every record from that boot, even if the gateway's wall clock was wrong.
///
/// CBOR: `[boot_id, mono_ms, true_ms, uncertainty_ms]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
pub struct TimeAnchor {
    /// The boot the monotonic time belongs to.
    #[n(0)]
    pub boot_id: BootId,
    /// Gateway monotonic ms (since boot) at the middle of the round trip.
    #[n(1)]
    pub mono_ms: u64,
    /// True Unix ms at that moment (relay time).
    #[n(2)]
    pub true_ms: i64,
    /// Half the round-trip time: how far off `true_ms` may be.
    #[n(3)]
    pub uncertainty_ms: u32,
}

/// Records sent from a gateway to the relay in one uplink frame. `records` have
/// contiguous, increasing `gateway_seq` values.
///
/// CBOR: the columnar map described in the [module docs](self). Encoding fails for a
/// batch whose records are not contiguous, or with more than [`MAX_BATCH_RECORDS`] records
/// or [`MAX_BATCH_ANCHORS`] anchors.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The sending gateway.
    pub gateway_id: Id,
    /// The facility it serves.
    pub site_id: Id,
    /// The gateway journal's epoch (random, fixed for the life of a journal).
    pub journal_epoch: u64,
    /// The records, contiguous by `gateway_seq`.
    pub records: alloc::vec::Vec<Record>,
    /// Time anchors for the boots these records came from.
    pub anchors: alloc::vec::Vec<TimeAnchor>,
}

#[cfg(feature = "alloc")]
impl Batch {
    /// `true` when every record's `gateway_seq` is one more than the previous record's.
    pub fn is_contiguous(&self) -> bool {
        self.records
            .windows(2)
            .all(|w| w[0].gateway_seq.checked_add(1) == Some(w[1].gateway_seq))
    }
}

/// The relay's answer to a batch, sent only after its store has committed it.
///
/// CBOR: `[gateway_id, journal_epoch, acked_through, server_time_ms, duplicates, conflicts]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Ack {
    /// The gateway the ack is for.
    #[n(0)]
    pub gateway_id: Id,
    /// The journal epoch the watermark belongs to.
    #[n(1)]
    pub journal_epoch: u64,
    /// Every record up to and including this `gateway_seq` is durably stored.
    #[n(2)]
    pub acked_through: u64,
    /// The relay's clock, Unix ms, when it sent the ack.
    #[n(3)]
    pub server_time_ms: i64,
    /// Records in the batch that the relay already had.
    #[n(4)]
    pub duplicates: Option<u32>,
    /// Records in the batch whose punch key matched different content (kept for review).
    #[n(5)]
    pub conflicts: Option<u32>,
}

#[cfg(feature = "alloc")]
mod columnar {
    //! The hand-written columnar codec for [`Batch`]; the layout is in the module docs above.

    use alloc::collections::BTreeMap;
    use alloc::vec::Vec;

    use minicbor::data::Type;
    use minicbor::decode::{self, Decoder};
    use minicbor::encode::{self, Encoder, Write};
    use minicbor::{Decode, Encode};

    use super::{Batch, TimeAnchor, MAX_BATCH_ANCHORS, MAX_BATCH_RECORDS};
    use crate::id::Id;
    use crate::punch::{Punch, PunchKind, VerifyMethod};
    use crate::record::{BootId, Received, Record, Source};

    // Map keys (see the table in the module docs).
    const K_GATEWAY_ID: u64 = 0;
    const K_SITE_ID: u64 = 1;
    const K_EPOCH: u64 = 2;
    const K_COUNT: u64 = 3;
    const K_FIRST_SEQ: u64 = 4;
    const K_ANCHORS: u64 = 5;
    const K_DEVICES: u64 = 6;
    const K_SUBJECTS: u64 = 7;
    const K_BOOTS: u64 = 8;
    const K_DT_REF: u64 = 9;
    const K_DT_UNIT: u64 = 10;
    const K_DEVICE: u64 = 11;
    const K_DEVICE_SEQ: u64 = 12;
    const K_SUBJECT: u64 = 13;
    const K_KIND: u64 = 14;
    const K_VERIFY: u64 = 15;
    const K_DEVICE_TIME: u64 = 16;
    const K_UTC_OFFSET: u64 = 17;
    const K_BOOT: u64 = 18;
    const K_MONO: u64 = 19;
    const K_WALL: u64 = 20;
    const K_SYNCED: u64 = 21;
    const K_SOURCE: u64 = 22;

    /// Device time predicted from the previous record of the same device.
    const DT_REF_DEVICE: u8 = 0;
    /// Device time predicted from the record's own wall time.
    const DT_REF_WALL: u8 = 1;

    /// Distinct values in order of first appearance, and each record's index into them.
    struct Table<'a, K: Ord + ?Sized> {
        values: Vec<&'a K>,
        index: BTreeMap<&'a K, u64>,
        column: Vec<u64>,
    }

    impl<'a, K: Ord + ?Sized> Table<'a, K> {
        fn new(capacity: usize) -> Self {
            Table {
                values: Vec::new(),
                index: BTreeMap::new(),
                column: Vec::with_capacity(capacity),
            }
        }

        fn push(&mut self, v: &'a K) {
            let next = self.values.len() as u64;
            let i = *self.index.entry(v).or_insert(next);
            if i == next {
                self.values.push(v);
            }
            self.column.push(i);
        }
    }

    /// The number of bytes CBOR takes for the integer `v` (the encoder's size estimate).
    fn int_len(v: i64) -> usize {
        let m = if v < 0 { !(v as u64) } else { v as u64 };
        match m {
            0..=23 => 1,
            24..=0xff => 2,
            0x100..=0xffff => 3,
            0x1_0000..=0xffff_ffff => 5,
            _ => 9,
        }
    }

    fn gcd(mut a: u64, mut b: u64) -> u64 {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    }

    /// Device-time deltas for one prediction mode, divided by their common unit.
    struct DeviceTimes {
        reference: u8,
        unit: u64,
        scaled: Vec<i64>,
        cost: usize,
    }

    fn device_times(records: &[Record], devices: &[u64], reference: u8) -> DeviceTimes {
        let mut last: BTreeMap<u64, i64> = BTreeMap::new();
        let mut deltas = Vec::with_capacity(records.len());
        for (r, &dev) in records.iter().zip(devices) {
            let t = r.punch.device_time_ms;
            let prediction = if reference == DT_REF_WALL {
                r.received.wall_ms
            } else {
                last.insert(dev, t).unwrap_or(0)
            };
            deltas.push(t.wrapping_sub(prediction));
        }
        let unit = match deltas.iter().fold(0, |g, d| gcd(g, d.unsigned_abs())) {
            0 => 1,
            g => g,
        };
        // Exact division: unit divides every delta, and |d / unit| <= |d| fits an i64.
        let scaled: Vec<i64> = deltas
            .iter()
            .map(|&d| (i128::from(d) / i128::from(unit)) as i64)
            .collect();
        let mut cost = if is_constant(&scaled) {
            scaled.first().map_or(0, |&v| int_len(v))
        } else {
            scaled.iter().map(|&v| int_len(v)).sum()
        };
        cost += int_len(unit as i64);
        DeviceTimes {
            reference,
            unit,
            scaled,
            cost,
        }
    }

    fn is_constant<T: PartialEq>(v: &[T]) -> bool {
        v.windows(2).all(|w| w[0] == w[1])
    }

    /// Writes `key` and a column: a single element if every value is equal (and `allow_const`),
    /// otherwise an array of every value.
    fn column<W: Write, T: Copy + PartialEq>(
        e: &mut Encoder<W>,
        key: u64,
        values: &[T],
        allow_const: bool,
        mut put: impl FnMut(&mut Encoder<W>, T) -> Result<(), encode::Error<W::Error>>,
    ) -> Result<(), encode::Error<W::Error>> {
        e.u64(key)?;
        match values.first() {
            Some(&first) if allow_const && is_constant(values) => put(e, first),
            _ => {
                e.array(values.len() as u64)?;
                values.iter().try_for_each(|&v| put(e, v))
            }
        }
    }

    impl<C> Encode<C> for Batch {
        fn encode<W: Write>(
            &self,
            e: &mut Encoder<W>,
            ctx: &mut C,
        ) -> Result<(), encode::Error<W::Error>> {
            let recs = &self.records;
            let n = recs.len();
            if n as u64 > MAX_BATCH_RECORDS {
                return Err(encode::Error::message(
                    "batch has more than MAX_BATCH_RECORDS records; send smaller batches",
                ));
            }
            if self.anchors.len() as u64 > MAX_BATCH_ANCHORS {
                return Err(encode::Error::message(
                    "batch has more than MAX_BATCH_ANCHORS time anchors",
                ));
            }
            if !self.is_contiguous() {
                return Err(encode::Error::message(
                    "batch records are not contiguous by gateway_seq",
                ));
            }
            let has_anchors = !self.anchors.is_empty();
            if n == 0 {
                e.map(4 + u64::from(has_anchors))?;
                e.u64(K_GATEWAY_ID)?.encode_with(self.gateway_id, ctx)?;
                e.u64(K_SITE_ID)?.encode_with(self.site_id, ctx)?;
                e.u64(K_EPOCH)?.u64(self.journal_epoch)?;
                e.u64(K_COUNT)?.u64(0)?;
                if has_anchors {
                    e.u64(K_ANCHORS)?.encode_with(&self.anchors, ctx)?;
                }
                return Ok(());
            }

            let mut devices = Table::new(n);
            let mut subjects = Table::new(n);
            let mut boots = Table::new(n);
            for r in recs {
                devices.push(r.punch.device_id.as_str());
                subjects.push(r.punch.subject_id.as_str());
                boots.push(&r.received.boot_id);
            }

            let mut last_seq: BTreeMap<u64, u64> = BTreeMap::new();
            let mut seq_deltas = Vec::with_capacity(n);
            let (mut prev_mono, mut prev_off) = (0u64, 0u64);
            let mut mono = Vec::with_capacity(n);
            let mut wall = Vec::with_capacity(n);
            for (r, &dev) in recs.iter().zip(&devices.column) {
                let s = r.punch.device_seq;
                let prev = last_seq.insert(dev, s).unwrap_or(0);
                seq_deltas.push(s.wrapping_sub(prev) as i64);
                let m = r.received.mono_ms;
                let off = (r.received.wall_ms as u64).wrapping_sub(m);
                mono.push(m.wrapping_sub(prev_mono) as i64);
                wall.push(off.wrapping_sub(prev_off) as i64);
                (prev_mono, prev_off) = (m, off);
            }
            let by_device = device_times(recs, &devices.column, DT_REF_DEVICE);
            let by_wall = device_times(recs, &devices.column, DT_REF_WALL);
            let dt = if by_wall.cost < by_device.cost {
                by_wall
            } else {
                by_device
            };
            let offsets: Vec<Option<i16>> = recs.iter().map(|r| r.punch.utc_offset_min).collect();
            let has_offsets = offsets.iter().any(Option::is_some);

            let entries = 19
                + u64::from(has_anchors)
                + u64::from(dt.reference != DT_REF_DEVICE)
                + u64::from(dt.unit != 1)
                + u64::from(has_offsets);
            e.map(entries)?;
            e.u64(K_GATEWAY_ID)?.encode_with(self.gateway_id, ctx)?;
            e.u64(K_SITE_ID)?.encode_with(self.site_id, ctx)?;
            e.u64(K_EPOCH)?.u64(self.journal_epoch)?;
            e.u64(K_COUNT)?.u64(n as u64)?;
            e.u64(K_FIRST_SEQ)?.u64(recs[0].gateway_seq)?;
            if has_anchors {
                e.u64(K_ANCHORS)?.array(self.anchors.len() as u64)?;
                for a in &self.anchors {
                    e.array(4)?;
                    match boots.index.get(&a.boot_id) {
                        Some(&i) => e.u64(i)?,
                        None => e.bytes(&a.boot_id.0)?,
                    };
                    e.u64(a.mono_ms)?.i64(a.true_ms)?.u32(a.uncertainty_ms)?;
                }
            }
            e.u64(K_DEVICES)?.array(devices.values.len() as u64)?;
            for d in &devices.values {
                e.str(d)?;
            }
            e.u64(K_SUBJECTS)?.array(subjects.values.len() as u64)?;
            for s in &subjects.values {
                e.str(s)?;
            }
            e.u64(K_BOOTS)?.array(boots.values.len() as u64)?;
            for b in &boots.values {
                e.bytes(&b.0)?;
            }
            if dt.reference != DT_REF_DEVICE {
                e.u64(K_DT_REF)?.u8(dt.reference)?;
            }
            if dt.unit != 1 {
                e.u64(K_DT_UNIT)?.u64(dt.unit)?;
            }
            let int = |e: &mut Encoder<W>, v: i64| e.i64(v).map(drop);
            let uint = |e: &mut Encoder<W>, v: u64| e.u64(v).map(drop);
            let code = |e: &mut Encoder<W>, v: u8| e.u8(v).map(drop);
            column(e, K_DEVICE, &devices.column, true, uint)?;
            column(e, K_DEVICE_SEQ, &seq_deltas, true, int)?;
            column(e, K_SUBJECT, &subjects.column, true, uint)?;
            let kinds: Vec<u8> = recs.iter().map(|r| r.punch.kind.code()).collect();
            column(e, K_KIND, &kinds, true, code)?;
            let verify: Vec<u8> = recs.iter().map(|r| r.punch.verify.code()).collect();
            column(e, K_VERIFY, &verify, true, code)?;
            column(e, K_DEVICE_TIME, &dt.scaled, true, int)?;
            if has_offsets {
                column(e, K_UTC_OFFSET, &offsets, true, |e, v| match v {
                    Some(m) => e.i16(m).map(drop),
                    None => e.null().map(drop),
                })?;
            }
            column(e, K_BOOT, &boots.column, true, uint)?;
            column(e, K_MONO, &mono, false, int)?;
            column(e, K_WALL, &wall, true, int)?;
            let synced: Vec<bool> = recs.iter().map(|r| r.received.clock_synced).collect();
            column(e, K_SYNCED, &synced, true, |e, v| e.bool(v).map(drop))?;
            let sources: Vec<u8> = recs.iter().map(|r| r.source.code()).collect();
            column(e, K_SOURCE, &sources, true, code)?;
            Ok(())
        }
    }

    /// A decoded column: one value for every record, or one per record.
    enum Col<T> {
        Const(T),
        Each(Vec<T>),
    }

    impl<T: Copy> Col<T> {
        fn get(&self, i: usize) -> Option<T> {
            match self {
                Col::Const(v) => Some(*v),
                Col::Each(v) => v.get(i).copied(),
            }
        }
    }

    fn err(msg: &'static str) -> decode::Error {
        decode::Error::message(msg)
    }

    /// Bytes left in the input: no array element takes less than one, so no array claiming
    /// more elements than this can be real, and no allocation is made beyond it.
    fn remaining(d: &Decoder<'_>) -> usize {
        d.input().len().saturating_sub(d.position())
    }

    /// Reads a definite-length array of at most `max` elements, allocating only as much as
    /// the input could hold.
    fn array<'b, T>(
        d: &mut Decoder<'b>,
        max: u64,
        mut elem: impl FnMut(&mut Decoder<'b>) -> Result<T, decode::Error>,
    ) -> Result<Vec<T>, decode::Error> {
        let len = d
            .array()?
            .ok_or_else(|| err("batch arrays must have a definite length"))?;
        if len > max {
            return Err(err(
                "batch array longer than the record count or limit allows",
            ));
        }
        if len > remaining(d) as u64 {
            return Err(decode::Error::end_of_input());
        }
        let mut v = Vec::with_capacity(len as usize);
        for _ in 0..len {
            v.push(elem(d)?);
        }
        Ok(v)
    }

    fn col<'b, T>(
        d: &mut Decoder<'b>,
        n: Option<u64>,
        allow_const: bool,
        elem: impl FnMut(&mut Decoder<'b>) -> Result<T, decode::Error>,
    ) -> Result<Col<T>, decode::Error> {
        let n = n.ok_or_else(|| err("batch count (key 3) must come before the columns"))?;
        match d.datatype()? {
            Type::Array | Type::ArrayIndef => {
                let v = array(d, n, elem)?;
                if v.len() as u64 != n {
                    return Err(err("batch column length differs from the record count"));
                }
                Ok(Col::Each(v))
            }
            _ if allow_const => {
                let mut elem = elem;
                Ok(Col::Const(elem(d)?))
            }
            _ => Err(err("batch column 19 (mono) must be an array")),
        }
    }

    /// A table (devices, subjects, boots) holds distinct values of the records, so it is
    /// never longer than the record count, which must come first.
    fn table_max(count: Option<u64>) -> Result<u64, decode::Error> {
        count.ok_or_else(|| err("batch count (key 3) must come before the tables"))
    }

    fn int(d: &mut Decoder<'_>) -> Result<i64, decode::Error> {
        i64::try_from(i128::from(d.int()?)).map_err(|_| err("batch delta beyond 64 bits"))
    }

    fn offset(d: &mut Decoder<'_>) -> Result<Option<i16>, decode::Error> {
        if d.datatype()? == Type::Null {
            d.null()?;
            Ok(None)
        } else {
            Ok(Some(d.i16()?))
        }
    }

    /// An anchor's boot: inline, or an index into the batch's boot table.
    enum AnchorBoot {
        Id(BootId),
        Index(u64),
    }

    type RawAnchor = (AnchorBoot, u64, i64, u32);

    fn anchor(d: &mut Decoder<'_>) -> Result<RawAnchor, decode::Error> {
        let len = d
            .array()?
            .ok_or_else(|| err("batch anchors must have a definite length"))?;
        if len < 4 {
            return Err(err("batch anchor has fewer than 4 fields"));
        }
        let boot = match d.datatype()? {
            Type::Bytes => AnchorBoot::Id(BootId::decode(d, &mut ())?),
            _ => AnchorBoot::Index(d.u64()?),
        };
        let a = (boot, d.u64()?, d.i64()?, d.u32()?);
        for _ in 4..len {
            d.skip()?;
        }
        Ok(a)
    }

    fn required<T>(v: Option<T>, msg: &'static str) -> Result<T, decode::Error> {
        v.ok_or_else(|| err(msg))
    }

    fn pick<'t, T>(table: &'t [T], col: &Col<u64>, i: usize) -> Result<&'t T, decode::Error> {
        let at = required(col.get(i), "batch column too short")?;
        usize::try_from(at)
            .ok()
            .and_then(|at| table.get(at))
            .ok_or_else(|| err("batch table index out of range"))
    }

    /// Every column of a batch with `n > 0`, as read from the wire.
    struct Columns {
        device: Col<u64>,
        device_seq: Col<i64>,
        subject: Col<u64>,
        kind: Col<u8>,
        verify: Col<u8>,
        device_time: Col<i64>,
        utc_offset: Col<Option<i16>>,
        boot: Col<u64>,
        mono: Vec<i64>,
        wall: Col<i64>,
        synced: Col<bool>,
        source: Col<u8>,
    }

    impl<'b, C> Decode<'b, C> for Batch {
        fn decode(d: &mut Decoder<'b>, ctx: &mut C) -> Result<Self, decode::Error> {
            let entries = d
                .map()?
                .ok_or_else(|| err("a batch must be a definite-length map"))?;
            let mut last_key = None;
            let (mut gateway_id, mut site_id, mut epoch, mut count) = (None, None, None, None);
            let mut first_seq = None;
            let mut anchors = Vec::new();
            let (mut devices, mut subjects, mut boots) = (Vec::new(), Vec::new(), Vec::new());
            let (mut dt_ref, mut dt_unit) = (DT_REF_DEVICE, 1u64);
            let (mut device, mut device_seq, mut subject) = (None, None, None);
            let (mut kind, mut verify, mut device_time) = (None, None, None);
            let mut utc_offset = Col::Const(None);
            let (mut boot, mut mono, mut wall) = (None, None, None);
            let (mut synced, mut source) = (None, None);
            for _ in 0..entries {
                let key = d.u64()?;
                if last_key.is_some_and(|last| key <= last) {
                    return Err(err("batch keys must be ascending and unique"));
                }
                last_key = Some(key);
                match key {
                    K_GATEWAY_ID => gateway_id = Some(Id::decode(d, ctx)?),
                    K_SITE_ID => site_id = Some(Id::decode(d, ctx)?),
                    K_EPOCH => epoch = Some(d.u64()?),
                    K_COUNT => {
                        let n = d.u64()?;
                        if n > MAX_BATCH_RECORDS {
                            return Err(err("batch has more than MAX_BATCH_RECORDS records"));
                        }
                        count = Some(n);
                    }
                    K_FIRST_SEQ => first_seq = Some(d.u64()?),
                    K_ANCHORS => anchors = array(d, MAX_BATCH_ANCHORS, anchor)?,
                    K_DEVICES => devices = array(d, table_max(count)?, |d| Id::decode(d, ctx))?,
                    K_SUBJECTS => subjects = array(d, table_max(count)?, |d| Id::decode(d, ctx))?,
                    K_BOOTS => boots = array(d, table_max(count)?, |d| BootId::decode(d, ctx))?,
                    K_DT_REF => {
                        dt_ref = d.u8()?;
                        if dt_ref != DT_REF_DEVICE && dt_ref != DT_REF_WALL {
                            return Err(err("batch device_time_ref must be 0 or 1"));
                        }
                    }
                    K_DT_UNIT => {
                        dt_unit = d.u64()?;
                        if dt_unit == 0 {
                            return Err(err("batch device_time_unit must be at least 1"));
                        }
                    }
                    K_DEVICE => device = Some(col(d, count, true, |d| d.u64())?),
                    K_DEVICE_SEQ => device_seq = Some(col(d, count, true, int)?),
                    K_SUBJECT => subject = Some(col(d, count, true, |d| d.u64())?),
                    K_KIND => kind = Some(col(d, count, true, |d| d.u8())?),
                    K_VERIFY => verify = Some(col(d, count, true, |d| d.u8())?),
                    K_DEVICE_TIME => device_time = Some(col(d, count, true, int)?),
                    K_UTC_OFFSET => utc_offset = col(d, count, true, offset)?,
                    K_BOOT => boot = Some(col(d, count, true, |d| d.u64())?),
                    K_MONO => {
                        mono = match col(d, count, false, int)? {
                            Col::Each(v) => Some(v),
                            Col::Const(_) => None,
                        }
                    }
                    K_WALL => wall = Some(col(d, count, true, int)?),
                    K_SYNCED => synced = Some(col(d, count, true, |d| d.bool())?),
                    K_SOURCE => source = Some(col(d, count, true, |d| d.u8())?),
                    _ => d.skip()?,
                }
            }
            let gateway_id = required(gateway_id, "batch lacks gateway_id (key 0)")?;
            let site_id = required(site_id, "batch lacks site_id (key 1)")?;
            let journal_epoch = required(epoch, "batch lacks journal_epoch (key 2)")?;
            let n = required(count, "batch lacks count (key 3)")?;
            let anchors = anchors
                .into_iter()
                .map(|(boot, mono_ms, true_ms, uncertainty_ms)| {
                    let boot_id = match boot {
                        AnchorBoot::Id(b) => b,
                        AnchorBoot::Index(i) => *usize::try_from(i)
                            .ok()
                            .and_then(|i| boots.get(i))
                            .ok_or_else(|| err("batch anchor boot index out of range"))?,
                    };
                    Ok(TimeAnchor {
                        boot_id,
                        mono_ms,
                        true_ms,
                        uncertainty_ms,
                    })
                })
                .collect::<Result<Vec<_>, decode::Error>>()?;
            if n == 0 {
                return Ok(Batch {
                    gateway_id,
                    site_id,
                    journal_epoch,
                    records: Vec::new(),
                    anchors,
                });
            }
            let first_seq = required(first_seq, "batch lacks first_seq (key 4)")?;
            first_seq
                .checked_add(n - 1)
                .ok_or_else(|| err("batch gateway_seq overflows u64"))?;
            let cols = Columns {
                device: required(device, "batch lacks the device column (key 11)")?,
                device_seq: required(device_seq, "batch lacks the device_seq column (key 12)")?,
                subject: required(subject, "batch lacks the subject column (key 13)")?,
                kind: required(kind, "batch lacks the kind column (key 14)")?,
                verify: required(verify, "batch lacks the verify column (key 15)")?,
                device_time: required(device_time, "batch lacks the device_time column (key 16)")?,
                utc_offset,
                boot: required(boot, "batch lacks the boot column (key 18)")?,
                mono: required(mono, "batch lacks the mono array (key 19)")?,
                wall: required(wall, "batch lacks the wall column (key 20)")?,
                synced: required(synced, "batch lacks the clock_synced column (key 21)")?,
                source: required(source, "batch lacks the source column (key 22)")?,
            };
            let records = assemble(
                &cols, first_seq, &devices, &subjects, &boots, dt_ref, dt_unit,
            )?;
            Ok(Batch {
                gateway_id,
                site_id,
                journal_epoch,
                records,
                anchors,
            })
        }
    }

    /// Turns decoded columns back into records. `cols.mono` has exactly `n` elements (the
    /// column reader checked it against the count), so it bounds the loop and the allocation.
    fn assemble(
        cols: &Columns,
        first_seq: u64,
        devices: &[Id],
        subjects: &[Id],
        boots: &[BootId],
        dt_ref: u8,
        dt_unit: u64,
    ) -> Result<Vec<Record>, decode::Error> {
        let short = "batch column too short";
        let mut records = Vec::with_capacity(cols.mono.len());
        let mut last_seq: BTreeMap<u64, u64> = BTreeMap::new();
        let mut last_time: BTreeMap<u64, i64> = BTreeMap::new();
        let (mut mono, mut off) = (0u64, 0u64);
        let mut gateway_seq = first_seq;
        for (i, &mono_delta) in cols.mono.iter().enumerate() {
            let dev = required(cols.device.get(i), short)?;
            let device_id = *pick(devices, &cols.device, i)?;
            let subject_id = *pick(subjects, &cols.subject, i)?;
            let boot_id = *pick(boots, &cols.boot, i)?;
            let seq_delta = required(cols.device_seq.get(i), short)?;
            let prev = last_seq.get(&dev).copied().unwrap_or(0);
            let device_seq = prev.wrapping_add(seq_delta as u64);
            last_seq.insert(dev, device_seq);

            mono = mono.wrapping_add(mono_delta as u64);
            off = off.wrapping_add(required(cols.wall.get(i), short)? as u64);
            let wall_ms = mono.wrapping_add(off) as i64;

            let scaled = required(cols.device_time.get(i), short)?;
            let delta = (scaled as u64).wrapping_mul(dt_unit) as i64;
            let prediction = if dt_ref == DT_REF_WALL {
                wall_ms
            } else {
                last_time.get(&dev).copied().unwrap_or(0)
            };
            let device_time_ms = prediction.wrapping_add(delta);
            last_time.insert(dev, device_time_ms);

            let kind = PunchKind::from_code(required(cols.kind.get(i), short)?)
                .ok_or_else(|| err("batch has an unknown punch kind"))?;
            let verify = VerifyMethod::from_code(required(cols.verify.get(i), short)?)
                .ok_or_else(|| err("batch has an unknown verify method"))?;
            let source = Source::from_code(required(cols.source.get(i), short)?)
                .ok_or_else(|| err("batch has an unknown source"))?;
            records.push(Record {
                punch: Punch {
                    device_id,
                    device_seq,
                    subject_id,
                    kind,
                    verify,
                    device_time_ms,
                    utc_offset_min: required(cols.utc_offset.get(i), short)?,
                },
                gateway_seq,
                received: Received {
                    boot_id,
                    mono_ms: mono,
                    wall_ms,
                    clock_synced: required(cols.synced.get(i), short)?,
                },
                source,
            });
            // Cannot overflow: first_seq + n - 1 was checked; the last increment is unused.
            gateway_seq = gateway_seq.wrapping_add(1);
        }
        Ok(records)
    }
}
