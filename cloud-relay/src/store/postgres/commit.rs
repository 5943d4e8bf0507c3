//! Committing a batch to PostgreSQL: one transaction, a fixed number of round trips.
//!
//! One transaction per batch (READ COMMITTED), a fixed number of round trips whatever the
//! batch size (arrays + `UNNEST`):
//! 1. upsert the stream row with `ON CONFLICT DO UPDATE ... RETURNING ranges`, which locks
//!    it: commits of one stream are serialised, across relay processes too
//!    ([`lock_stream`]);
//! 2. upsert the batch's anchors (better uncertainty wins) and fill the corrected time of
//!    waiting rows of those boots ([`save_anchors`]); read the anchors the batch's records
//!    need ([`anchors_for`]);
//! 3. records whose gateway_seq is in a stored range are resends, except those whose valid
//!    punch's key is not in `punches` (one lookup, only when the batch has such records):
//!    new punches under a reused gateway_seq, which join the new records (store module
//!    docs, "Sequence-number reuse"; [`reused_seqs`]). The lookup runs under the stream's
//!    lock, so a concurrent commit of the same stream cannot slip in between; a punch
//!    another stream inserts meanwhile is caught by the insert's `ON CONFLICT` like any
//!    other;
//! 4. take the position lock ("Positions" below) and insert the new punches, each with
//!    the next `pos`, with `ON CONFLICT (site_id, device_id, device_seq) DO NOTHING
//!    RETURNING`; the punches that were not inserted are read back and compared (duplicate
//!    or conflict) ([`sort_records`], [`insert_punches`], [`tally`]);
//! 5. insert conflicts and rejected records, each with the next `pos` too, under the same
//!    lock ([`insert_held`]; store module docs, "One position space"); write the new
//!    ranges; bump the gateway counters; notify ([`save_stream_and_counters`]); commit.
//!
//! ## Positions (the query cursor)
//!
//! A new punch's `pos` (store module docs, "The cursor") comes from `punches_pos_seq`,
//! in the punch insert of step 4, and only while the transaction holds the advisory lock
//! [`POS_LOCK`] (`pg_advisory_xact_lock`). PostgreSQL releases a transaction's locks only
//! after its commit is visible to new snapshots, so the next commit takes its positions
//! after this one's are visible: positions become visible in order, and a reader that has
//! seen `pos` P never later finds a new row below P. A rolled-back commit leaves a gap,
//! nothing else. Commits that store no new punch, conflict or rejected record (resends,
//! duplicates) skip the lock.
//!
//! The lock is taken as late as possible (it is held through COMMIT, so it bounds how
//! many commits can store new punches at once), but before the first statement that
//! could wait for another commit holding it: the punch insert, or, in a batch with
//! anchors, the corrected-time update of step 2, whose row locks a punch insert under
//! the lock could wait for (a unique-index check waits for a row being updated). Before
//! the lock a commit holds only its stream's row and its anchors, which no commit
//! holding the lock waits for (a commit of the same stream is still blocked in step 1),
//! so the lock adds no deadlock.
//!
//! The same transaction sends `NOTIFY outpost_punches` with its highest new `pos`
//! (`pg_notify`), delivered to the listeners of every relay only if it commits
//! (`listen`).
//!
//! A failure anywhere rolls the whole batch back: nothing is acked, the gateway resends.
//! Deadlocks and serialisation failures (two gateways inserting the same punches in
//! different orders at the same moment) are retried a few times ([`RETRIES`]).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use deadpool_postgres::{Pool, Transaction};
use outpost_protocol::{Batch, BootId, Punch, Record, TimeAnchor};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::error::{corrupt, pg_err, pool_err};
use super::schema::{
    bulk_insert_sql, punch_insert_sql, row_to_record, Columns, NOTIFY_CHANNEL, POS_LOCK,
    RECORD_COLS,
};
use crate::store::{
    best_anchors, corrected_time, invalid_reason, warn_seq_reuse, CommitOutcome, SeqRanges,
    StoreError, MAX_RANGES,
};

/// How often a commit is retried after a deadlock or serialisation failure.
const RETRIES: usize = 5;

/// Commits `batch` whole, retrying after deadlocks and serialisation failures. Returns the
/// outcome and the highest `pos` it stored (`None` when it stored no punch).
pub(super) async fn commit(
    pool: &Pool,
    batch: &Batch,
    now_ms: i64,
) -> Result<(CommitOutcome, Option<u64>), StoreError> {
    let mut last = None;
    for attempt in 0..RETRIES {
        match commit_once(pool, batch, now_ms).await {
            Ok(out) => return Ok(out),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(e)) => {
                tracing::debug!(attempt, error = %e, "commit retried after a deadlock");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
            }
        }
    }
    Err(last.map_or_else(
        || StoreError::Unavailable {
            context: "commit retries exhausted".into(),
            source: None,
        },
        pg_err,
    ))
}

/// Why one commit attempt failed: retry (deadlock) or give up.
enum Attempt {
    Retry(tokio_postgres::Error),
    Fatal(StoreError),
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

impl From<tokio_postgres::Error> for Attempt {
    fn from(e: tokio_postgres::Error) -> Self {
        if retryable(&e) {
            Attempt::Retry(e)
        } else {
            Attempt::Fatal(pg_err(e))
        }
    }
}

/// The batch's stream and commit time, the first four parameters of every bulk insert.
struct Stream<'a> {
    site: &'a str,
    gw: &'a str,
    epoch: i64,
    now_ms: i64,
}

impl Stream<'_> {
    /// `$1`–`$4` of [`bulk_insert_sql`].
    fn params(&self) -> [&(dyn ToSql + Sync); 4] {
        [&self.site, &self.gw, &self.epoch, &self.now_ms]
    }
}

/// Whether this transaction holds [`POS_LOCK`] (module docs, "Positions").
#[derive(Default)]
struct PosLock {
    held: bool,
}

impl PosLock {
    /// Takes the lock unless held; it is released when the transaction ends.
    async fn take(&mut self, tx: &Transaction<'_>) -> Result<(), Attempt> {
        if !self.held {
            let st = tx
                .prepare_cached("SELECT pg_advisory_xact_lock($1)")
                .await?;
            tx.execute(&st, &[&POS_LOCK]).await?;
            self.held = true;
        }
        Ok(())
    }
}

/// One attempt: the five steps of the module docs in one transaction.
async fn commit_once(
    pool: &Pool,
    batch: &Batch,
    now_ms: i64,
) -> Result<(CommitOutcome, Option<u64>), Attempt> {
    let mut client = pool.get().await.map_err(|e| Attempt::Fatal(pool_err(e)))?;
    let tx = client.transaction().await?;
    let stream = Stream {
        site: batch.site_id.as_str(),
        gw: batch.gateway_id.as_str(),
        epoch: batch.journal_epoch as i64,
        now_ms,
    };
    let mut out = CommitOutcome::default();
    let mut pos_lock = PosLock::default();

    // 1. Lock the stream.
    let mut ranges = lock_stream(&tx, &stream).await?;

    // 2. Anchors (after the position lock when they may update punches: module docs).
    if !batch.anchors.is_empty() {
        pos_lock.take(&tx).await?;
    }
    out.corrected_later = save_anchors(&tx, stream.gw, batch).await?;
    let anchors = anchors_for(&tx, stream.gw, batch).await?;

    // 3. Records under a stored primary key are resends unless their punch is new.
    let reused = reused_seqs(&tx, stream.site, &ranges, batch).await?;

    // 4. New punches.
    let sorted = sort_records(batch, &ranges, &reused);
    out.duplicates += sorted.resent;
    out.rejected = sorted.reasons.len() as u32;
    let unique = first_per_punch_key(&sorted.candidates);
    if !unique.is_empty() {
        pos_lock.take(&tx).await?;
    }
    let (kept, max_pos) = insert_punches(&tx, &stream, &unique, &anchors).await?;
    let tallied = tally(&sorted.candidates, &kept, &reused, &mut out)?;

    // 5. Conflicts, ranges, counters.
    if !tallied.conflicts.is_empty() || !sorted.reasons.is_empty() {
        pos_lock.take(&tx).await?;
    }
    let held_pos = insert_held(&tx, &stream, &tallied.conflicts, &sorted).await?;
    let max_pos = max_pos.max(held_pos);
    extend_ranges(&mut ranges, batch)?;
    out.acked_through = ranges.watermark();
    save_stream_and_counters(&tx, &stream, &ranges, &out, max_pos).await?;
    tx.commit().await?;
    if !tallied.reused_stored.is_empty() {
        warn_seq_reuse(stream.gw, batch.journal_epoch, &tallied.reused_stored);
    }
    Ok((out, max_pos.map(|p| p as u64)))
}

/// Step 1: creates the stream's row if needed and locks it until the transaction ends;
/// returns its stored ranges.
async fn lock_stream(tx: &Transaction<'_>, stream: &Stream<'_>) -> Result<SeqRanges, Attempt> {
    let st = tx
        .prepare_cached(
            "INSERT INTO streams (gateway_id, journal_epoch, ranges) VALUES ($1, $2, '{}') \
             ON CONFLICT (gateway_id, journal_epoch) DO UPDATE SET ranges = streams.ranges \
             RETURNING ranges",
        )
        .await?;
    let flat: Vec<i64> = tx
        .query_one(&st, &[&stream.gw, &stream.epoch])
        .await?
        .try_get(0)?;
    let flat: Vec<u64> = flat.into_iter().map(|v| v as u64).collect();
    SeqRanges::from_flat(&flat)
        .ok_or_else(|| Attempt::Fatal(StoreError::Corrupt("stream ranges".into())))
}

/// Step 2a: stores the batch's anchors where they beat the stored ones, and fills the
/// corrected time of this gateway's waiting punches of those boots. Returns how many
/// punches got one.
async fn save_anchors(tx: &Transaction<'_>, gw: &str, batch: &Batch) -> Result<u32, Attempt> {
    let new_anchors = best_anchors(&batch.anchors);
    if new_anchors.is_empty() {
        return Ok(0);
    }
    let boots: Vec<&[u8]> = new_anchors.iter().map(|a| &a.boot_id.0[..]).collect();
    let mono: Vec<i64> = new_anchors.iter().map(|a| a.mono_ms as i64).collect();
    let truth: Vec<i64> = new_anchors.iter().map(|a| a.true_ms).collect();
    let unc: Vec<i64> = new_anchors
        .iter()
        .map(|a| i64::from(a.uncertainty_ms))
        .collect();
    let st = tx
        .prepare_cached(
            "INSERT INTO anchors (gateway_id, boot_id, mono_ms, true_ms, uncertainty_ms) \
             SELECT $1, * FROM UNNEST($2::bytea[], $3::bigint[], $4::bigint[], $5::bigint[]) \
             ON CONFLICT (gateway_id, boot_id) DO UPDATE SET mono_ms = EXCLUDED.mono_ms, \
             true_ms = EXCLUDED.true_ms, uncertainty_ms = EXCLUDED.uncertainty_ms \
             WHERE EXCLUDED.uncertainty_ms < anchors.uncertainty_ms",
        )
        .await?;
    tx.execute(&st, &[&gw, &boots, &mono, &truth, &unc]).await?;
    let st = tx
        .prepare_cached(
            "UPDATE punches p SET corrected_ms = a.true_ms + (p.mono_ms - a.mono_ms) \
             FROM anchors a WHERE a.gateway_id = $1 AND a.boot_id = ANY($2) \
             AND p.gateway_id = a.gateway_id AND p.boot_id = a.boot_id \
             AND p.corrected_ms IS NULL",
        )
        .await?;
    Ok(tx.execute(&st, &[&gw, &boots]).await? as u32)
}

/// Step 2b: the stored anchors of the boots whose records need one (clock not
/// synchronised), by boot.
async fn anchors_for(
    tx: &Transaction<'_>,
    gw: &str,
    batch: &Batch,
) -> Result<HashMap<BootId, TimeAnchor>, Attempt> {
    let mut anchors: HashMap<BootId, TimeAnchor> = HashMap::new();
    let mut unsynced: Vec<&[u8]> = batch
        .records
        .iter()
        .filter(|r| !r.received.clock_synced)
        .map(|r| &r.received.boot_id.0[..])
        .collect();
    unsynced.sort_unstable();
    unsynced.dedup();
    if unsynced.is_empty() {
        return Ok(anchors);
    }
    let st = tx
        .prepare_cached(
            "SELECT boot_id, mono_ms, true_ms, uncertainty_ms FROM anchors \
             WHERE gateway_id = $1 AND boot_id = ANY($2)",
        )
        .await?;
    for row in tx.query(&st, &[&gw, &unsynced]).await? {
        let boot: Vec<u8> = row.try_get(0)?;
        let boot_id = BootId(
            boot.try_into()
                .map_err(|_| Attempt::Fatal(corrupt("anchor boot_id")))?,
        );
        anchors.insert(
            boot_id,
            TimeAnchor {
                boot_id,
                mono_ms: row.try_get::<_, i64>(1)? as u64,
                true_ms: row.try_get(2)?,
                uncertainty_ms: u32::try_from(row.try_get::<_, i64>(3)?).unwrap_or(u32::MAX),
            },
        );
    }
    Ok(anchors)
}

/// Step 3: the gateway_seqs under a stored primary key whose valid punch is not stored:
/// new punches under a reused seq (store module docs, "Sequence-number reuse"). Only
/// such records pay for this lookup.
async fn reused_seqs(
    tx: &Transaction<'_>,
    site: &str,
    ranges: &SeqRanges,
    batch: &Batch,
) -> Result<HashSet<u64>, Attempt> {
    let resent: Vec<&Record> = batch
        .records
        .iter()
        .filter(|r| ranges.contains(r.gateway_seq) && invalid_reason(r).is_none())
        .collect();
    let mut reused: HashSet<u64> = HashSet::new();
    if resent.is_empty() {
        return Ok(reused);
    }
    let devs: Vec<&str> = resent.iter().map(|r| r.punch.device_id.as_str()).collect();
    let seqs: Vec<i64> = resent.iter().map(|r| r.punch.device_seq as i64).collect();
    let st = tx
        .prepare_cached(
            "SELECT device_id, device_seq FROM punches WHERE site_id = $1 AND \
             (device_id, device_seq) IN (SELECT * FROM UNNEST($2::text[], $3::bigint[]))",
        )
        .await?;
    let mut stored: HashSet<(String, i64)> = HashSet::new();
    for row in tx.query(&st, &[&site, &devs, &seqs]).await? {
        stored.insert((row.try_get(0)?, row.try_get(1)?));
    }
    for r in &resent {
        let key = (
            r.punch.device_id.as_str().to_string(),
            r.punch.device_seq as i64,
        );
        if !stored.contains(&key) {
            reused.insert(r.gateway_seq);
        }
    }
    Ok(reused)
}

/// The batch's records sorted for step 4.
struct Sorted<'a> {
    /// Valid records with a new primary key or a reused seq, in batch order.
    candidates: Vec<&'a Record>,
    /// Records under a stored primary key that are not reused: duplicates.
    resent: u32,
    /// Invalid records with a new primary key, for the rejected table (store module
    /// docs), never for punches.
    rejected: Columns<'a>,
    /// Why each of `rejected` is invalid, in the same order.
    reasons: Vec<String>,
}

/// Step 4a: splits the batch into candidates, resends and invalid records.
fn sort_records<'a>(batch: &'a Batch, ranges: &SeqRanges, reused: &HashSet<u64>) -> Sorted<'a> {
    let candidates: Vec<&Record> = batch
        .records
        .iter()
        .filter(|r| !ranges.contains(r.gateway_seq) || reused.contains(&r.gateway_seq))
        .collect();
    let resent = (batch.records.len() - candidates.len()) as u32;
    let mut rejected = Columns::default();
    let mut reasons: Vec<String> = Vec::new();
    let candidates: Vec<&Record> = candidates
        .into_iter()
        .filter(|r| match invalid_reason(r) {
            Some(reason) => {
                rejected.push(r, None);
                reasons.push(reason);
                false
            }
            None => true,
        })
        .collect();
    Sorted {
        candidates,
        resent,
        rejected,
        reasons,
    }
}

/// Step 4b: the first record of each punch key, in gateway_seq order so that cursors
/// follow arrival order.
fn first_per_punch_key<'a>(candidates: &[&'a Record]) -> Vec<&'a Record> {
    let mut first: HashMap<(&str, u64), &Record> = HashMap::new();
    for r in candidates {
        first
            .entry((r.punch.device_id.as_str(), r.punch.device_seq))
            .or_insert(r);
    }
    let mut unique: Vec<&Record> = first.values().copied().collect();
    unique.sort_unstable_by_key(|r| r.gateway_seq);
    unique
}

/// The punch stored under a punch key after step 4c.
#[derive(Clone, Copy)]
struct Kept {
    /// Its row id.
    id: i64,
    /// Its content.
    punch: Punch,
    /// The gateway_seq of this batch's record that inserted it; `None` if it was stored
    /// before.
    inserted_by: Option<u64>,
}

/// A punch key, borrowing the device id from the batch.
type PunchKey<'a> = (&'a str, u64);

/// Step 4c: inserts `unique` where its punch key is new, each with the next position (the
/// caller holds [`POS_LOCK`]), and reads back the stored punch of every key that was not
/// inserted. Returns them and the highest position inserted.
async fn insert_punches<'a>(
    tx: &Transaction<'_>,
    stream: &Stream<'_>,
    unique: &[&'a Record],
    anchors: &HashMap<BootId, TimeAnchor>,
) -> Result<(HashMap<PunchKey<'a>, Kept>, Option<i64>), Attempt> {
    let mut kept: HashMap<PunchKey<'a>, Kept> = HashMap::new();
    let mut max_pos: Option<i64> = None;
    if unique.is_empty() {
        return Ok((kept, max_pos));
    }
    let mut cols = Columns::default();
    for r in unique {
        let corrected = corrected_time(&r.received, anchors.get(&r.received.boot_id));
        cols.push(r, corrected);
    }
    let sql = punch_insert_sql()
        + " ON CONFLICT (site_id, device_id, device_seq) DO NOTHING \
           RETURNING id, device_seq, gateway_seq, pos";
    let st = tx.prepare_cached(&sql).await?;
    let rows = tx
        .query(&st, &cols.params(stream.params(), &cols.extra))
        .await?;
    let by_seq: HashMap<u64, &Record> = unique.iter().map(|r| (r.gateway_seq, *r)).collect();
    for row in rows {
        let gseq = row.try_get::<_, i64>(2)? as u64;
        let pos: i64 = row.try_get(3)?;
        max_pos = Some(max_pos.map_or(pos, |m| m.max(pos)));
        if let Some(r) = by_seq.get(&gseq) {
            kept.insert(
                (r.punch.device_id.as_str(), r.punch.device_seq),
                Kept {
                    id: row.try_get(0)?,
                    punch: r.punch,
                    inserted_by: Some(gseq),
                },
            );
        }
    }
    let missing: Vec<&Record> = unique
        .iter()
        .filter(|r| !kept.contains_key(&(r.punch.device_id.as_str(), r.punch.device_seq)))
        .copied()
        .collect();
    if missing.is_empty() {
        return Ok((kept, max_pos));
    }
    let devs: Vec<&str> = missing.iter().map(|r| r.punch.device_id.as_str()).collect();
    let seqs: Vec<i64> = missing.iter().map(|r| r.punch.device_seq as i64).collect();
    let st = tx
        .prepare_cached(&format!(
            "SELECT id, {RECORD_COLS} FROM punches WHERE site_id = $1 AND \
             (device_id, device_seq) IN (SELECT * FROM UNNEST($2::text[], $3::bigint[]))"
        ))
        .await?;
    for row in tx.query(&st, &[&stream.site, &devs, &seqs]).await? {
        let (_, _, _, rec, _) = row_to_record(&row, 1).map_err(Attempt::Fatal)?;
        if let Some(r) = missing.iter().find(|r| {
            r.punch.device_id == rec.punch.device_id && r.punch.device_seq == rec.punch.device_seq
        }) {
            kept.insert(
                (r.punch.device_id.as_str(), r.punch.device_seq),
                Kept {
                    id: row.try_get(0)?,
                    punch: rec.punch,
                    inserted_by: None,
                },
            );
        }
    }
    Ok((kept, max_pos))
}

/// What step 4d found besides the counts.
struct Tallied<'a> {
    /// Candidates whose punch key holds different content, with the kept row's id.
    conflicts: Columns<'a>,
    /// The reused seqs whose punch this batch stored (for the warning).
    reused_stored: SeqRanges,
}

/// Step 4d: counts each candidate as stored (and seq reuse), duplicate or conflict.
fn tally<'a>(
    candidates: &[&'a Record],
    kept: &HashMap<PunchKey<'_>, Kept>,
    reused: &HashSet<u64>,
    out: &mut CommitOutcome,
) -> Result<Tallied<'a>, Attempt> {
    let mut conflicts = Columns::default();
    let mut reused_stored = SeqRanges::default();
    for r in candidates {
        let key = (r.punch.device_id.as_str(), r.punch.device_seq);
        let Some(k) = kept.get(&key) else {
            return Err(Attempt::Fatal(StoreError::Corrupt(format!(
                "punch {}/{} neither inserted nor found",
                key.0, key.1
            ))));
        };
        if k.inserted_by == Some(r.gateway_seq) {
            out.stored += 1;
            if reused.contains(&r.gateway_seq) {
                out.seq_reuse += 1;
                reused_stored.insert(r.gateway_seq, r.gateway_seq);
            }
        } else if k.punch == r.punch {
            out.duplicates += 1;
        } else {
            conflicts.push(r, Some(k.id));
            out.conflicts += 1;
        }
    }
    Ok(Tallied {
        conflicts,
        reused_stored,
    })
}

/// Step 5a: inserts the conflicts and the rejected records, each with the next position
/// (the caller holds [`POS_LOCK`]); returns the highest position taken.
async fn insert_held(
    tx: &Transaction<'_>,
    stream: &Stream<'_>,
    conflicts: &Columns<'_>,
    sorted: &Sorted<'_>,
) -> Result<Option<i64>, Attempt> {
    let mut max_pos: Option<i64> = None;
    if !conflicts.is_empty() {
        let sql = bulk_insert_sql("conflicts", "kept_id", "bigint") + " RETURNING pos";
        let st = tx.prepare_cached(&sql).await?;
        for row in tx
            .query(&st, &conflicts.params(stream.params(), &conflicts.extra))
            .await?
        {
            max_pos = max_pos.max(Some(row.try_get(0)?));
        }
    }
    if !sorted.reasons.is_empty() {
        let sql = bulk_insert_sql("rejected", "reason", "text") + " RETURNING pos";
        let st = tx.prepare_cached(&sql).await?;
        for row in tx
            .query(
                &st,
                &sorted.rejected.params(stream.params(), &sorted.reasons),
            )
            .await?
        {
            max_pos = max_pos.max(Some(row.try_get(0)?));
        }
    }
    Ok(max_pos)
}

/// Step 5b: adds the batch's seq range to the stream's; refuses a stream with more than
/// [`MAX_RANGES`] gaps.
fn extend_ranges(ranges: &mut SeqRanges, batch: &Batch) -> Result<(), Attempt> {
    if let (Some(f), Some(l)) = (batch.records.first(), batch.records.last()) {
        ranges.insert(f.gateway_seq, l.gateway_seq);
        if ranges.len() > MAX_RANGES {
            return Err(Attempt::Fatal(StoreError::TooManyGaps {
                gateway_id: batch.gateway_id.as_str().to_string(),
                journal_epoch: batch.journal_epoch,
            }));
        }
    }
    Ok(())
}

/// Step 5c: writes the stream's ranges, adds `out` to the gateway's counters and, when
/// the batch stored punches, notifies [`NOTIFY_CHANNEL`] with `max_pos` (delivered on
/// commit); the statements are pipelined on the one connection.
async fn save_stream_and_counters(
    tx: &Transaction<'_>,
    stream: &Stream<'_>,
    ranges: &SeqRanges,
    out: &CommitOutcome,
    max_pos: Option<i64>,
) -> Result<(), Attempt> {
    let flat: Vec<i64> = ranges.to_flat().into_iter().map(|v| v as i64).collect();
    let st_ranges = tx
        .prepare_cached(
            "UPDATE streams SET ranges = $3 WHERE gateway_id = $1 AND journal_epoch = $2",
        )
        .await?;
    let st_gw = tx
        .prepare_cached(
            "INSERT INTO gateways (gateway_id, site_id, last_seen_ms, journal_epoch, records, \
             duplicates, conflicts, rejected, seq_reuse) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (gateway_id) DO UPDATE SET site_id = EXCLUDED.site_id, \
             last_seen_ms = EXCLUDED.last_seen_ms, journal_epoch = EXCLUDED.journal_epoch, \
             records = gateways.records + EXCLUDED.records, \
             duplicates = gateways.duplicates + EXCLUDED.duplicates, \
             conflicts = gateways.conflicts + EXCLUDED.conflicts, \
             rejected = gateways.rejected + EXCLUDED.rejected, \
             seq_reuse = gateways.seq_reuse + EXCLUDED.seq_reuse",
        )
        .await?;
    let (stored, dups, confl, rej, reuse) = (
        i64::from(out.stored),
        i64::from(out.duplicates),
        i64::from(out.conflicts),
        i64::from(out.rejected),
        i64::from(out.seq_reuse),
    );
    let Stream {
        site,
        gw,
        epoch,
        now_ms,
    } = stream;
    let notify = async {
        match max_pos {
            Some(pos) => {
                let st = tx.prepare_cached("SELECT pg_notify($1, $2)").await?;
                tx.execute(&st, &[&NOTIFY_CHANNEL, &pos.to_string()])
                    .await?;
                Ok(())
            }
            None => Ok::<(), tokio_postgres::Error>(()),
        }
    };
    // The statements are pipelined on the one connection.
    futures_util::future::try_join3(
        tx.execute(&st_ranges, &[gw, epoch, &flat]),
        tx.execute(
            &st_gw,
            &[
                gw, site, now_ms, epoch, &stored, &dups, &confl, &rej, &reuse,
            ],
        ),
        notify,
    )
    .await?;
    Ok(())
}
