//! The PostgreSQL schema: its migrations, and how a record maps to the columns of a row.
//!
//! ## Tables (migrations in [`MIGRATIONS`], version in `schema_version`)
//!
//! - `punches`: one row per punch key `(site_id, device_id, device_seq)` (unique), with the
//!   stream that delivered it first, the record's fields, `stored_at_ms` and
//!   `corrected_ms`. `id` (identity) is the row's identity; `pos` (migration 4, unique)
//!   is the query cursor: its position in commit order, from the sequence
//!   `punches_pos_seq`, taken only under the advisory lock [`POS_LOCK`] (see
//!   `commit`). Rows stored before migration 4 keep their `id` as `pos`. The site and
//!   subject indexes are on `(site_id, pos)` and `(subject_id, pos)`, the query API's
//!   filtered pages.
//! - `conflicts`: newcomers whose punch key matched different content, with `kept_id`
//!   (the kept punch's `id`; the query API joins it to that punch's `pos`).
//! - `rejected` (migration 2): records whose punch failed validation, with the `reason`.
//! - `streams`: per `(gateway_id, journal_epoch)`, the stored gateway_seq ranges, flat
//!   (`[lo0, hi0, lo1, hi1, …]`). This is the primary-key index: a record whose seq is in a
//!   range is a duplicate.
//! - `gateways`: per-gateway counters and last seen (`seq_reuse`: migration 3);
//!   `anchors`: best anchor per boot.
//! - migration 6, the event stream (store module docs, "One position space"): `pos` on
//!   `conflicts` and `rejected` (unique; from `punches_pos_seq` under [`POS_LOCK`], like a
//!   punch's; NULL for rows stored before it, which are therefore not in the stream), and
//!   `events`: relay notices, `pos` (primary key, same sequence), `key` (unique: appends
//!   are idempotent), `kind`, `output`, `fields` (JSON text), `at_ms`.
//! - `outputs` (the outputs migration): per output name, its durable state
//!   (`store::output_state`) and its lease (`holder`, `lease_expires` by the database
//!   clock); see `outputs.rs`.
//!
//! u64 values (epochs, sequence numbers) are stored as `bigint` with the same 64 bits
//! (`as i64`), so values at or above 2^63 (derived device_seq) are negative in SQL.
//!
//! `punches`, `conflicts` and `rejected` share the record columns ([`RECORD_COLS`]): one
//! reader ([`row_to_record`]) and one bulk writer ([`Columns`], [`bulk_insert_sql`]) serve
//! all three.

use deadpool_postgres::Pool;
use outpost_protocol::{BootId, Id, Punch, PunchKind, Received, Record, Source, VerifyMethod};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::error::{corrupt, pg_err, pool_err};
use crate::store::StoreError;

/// Schema migrations, applied in order; index + 1 is the version.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE punches (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    site_id        text     NOT NULL,
    device_id      text     NOT NULL,
    device_seq     bigint   NOT NULL,
    subject_id     text     NOT NULL,
    kind           smallint NOT NULL,
    verify         smallint NOT NULL,
    device_time_ms bigint   NOT NULL,
    utc_offset_min smallint,
    gateway_id     text     NOT NULL,
    journal_epoch  bigint   NOT NULL,
    gateway_seq    bigint   NOT NULL,
    boot_id        bytea    NOT NULL,
    mono_ms        bigint   NOT NULL,
    wall_ms        bigint   NOT NULL,
    clock_synced   boolean  NOT NULL,
    source         smallint NOT NULL,
    stored_at_ms   bigint   NOT NULL,
    corrected_ms   bigint,
    UNIQUE (site_id, device_id, device_seq)
);
CREATE INDEX punches_waiting ON punches (gateway_id, boot_id) WHERE corrected_ms IS NULL;
CREATE INDEX punches_site_id ON punches (site_id, id);
CREATE INDEX punches_subject_id ON punches (subject_id, id);
CREATE TABLE conflicts (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kept_id        bigint   NOT NULL,
    site_id        text     NOT NULL,
    device_id      text     NOT NULL,
    device_seq     bigint   NOT NULL,
    subject_id     text     NOT NULL,
    kind           smallint NOT NULL,
    verify         smallint NOT NULL,
    device_time_ms bigint   NOT NULL,
    utc_offset_min smallint,
    gateway_id     text     NOT NULL,
    journal_epoch  bigint   NOT NULL,
    gateway_seq    bigint   NOT NULL,
    boot_id        bytea    NOT NULL,
    mono_ms        bigint   NOT NULL,
    wall_ms        bigint   NOT NULL,
    clock_synced   boolean  NOT NULL,
    source         smallint NOT NULL,
    stored_at_ms   bigint   NOT NULL
);
CREATE TABLE streams (
    gateway_id    text     NOT NULL,
    journal_epoch bigint   NOT NULL,
    ranges        bigint[] NOT NULL,
    PRIMARY KEY (gateway_id, journal_epoch)
);
CREATE TABLE gateways (
    gateway_id    text   PRIMARY KEY,
    site_id       text   NOT NULL,
    last_seen_ms  bigint NOT NULL,
    journal_epoch bigint NOT NULL,
    records       bigint NOT NULL,
    duplicates    bigint NOT NULL,
    conflicts     bigint NOT NULL
);
CREATE TABLE anchors (
    gateway_id     text   NOT NULL,
    boot_id        bytea  NOT NULL,
    mono_ms        bigint NOT NULL,
    true_ms        bigint NOT NULL,
    uncertainty_ms bigint NOT NULL,
    PRIMARY KEY (gateway_id, boot_id)
);
"#,
    // 2: invalid records are kept instead of refusing their batch.
    r#"
CREATE TABLE rejected (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reason         text     NOT NULL,
    site_id        text     NOT NULL,
    device_id      text     NOT NULL,
    device_seq     bigint   NOT NULL,
    subject_id     text     NOT NULL,
    kind           smallint NOT NULL,
    verify         smallint NOT NULL,
    device_time_ms bigint   NOT NULL,
    utc_offset_min smallint,
    gateway_id     text     NOT NULL,
    journal_epoch  bigint   NOT NULL,
    gateway_seq    bigint   NOT NULL,
    boot_id        bytea    NOT NULL,
    mono_ms        bigint   NOT NULL,
    wall_ms        bigint   NOT NULL,
    clock_synced   boolean  NOT NULL,
    source         smallint NOT NULL,
    stored_at_ms   bigint   NOT NULL
);
ALTER TABLE gateways ADD COLUMN rejected bigint NOT NULL DEFAULT 0;
"#,
    // 3: new punches under reused gateway_seq values are stored and counted.
    r#"
ALTER TABLE gateways ADD COLUMN seq_reuse bigint NOT NULL DEFAULT 0;
"#,
    // 4: the cursor is a position in commit order (store module docs, "The cursor").
    r#"
ALTER TABLE punches ADD COLUMN pos bigint;
UPDATE punches SET pos = id;
ALTER TABLE punches ALTER COLUMN pos SET NOT NULL;
CREATE UNIQUE INDEX punches_pos ON punches (pos);
DROP INDEX punches_site_id;
DROP INDEX punches_subject_id;
CREATE INDEX punches_site_pos ON punches (site_id, pos);
CREATE INDEX punches_subject_pos ON punches (subject_id, pos);
CREATE SEQUENCE punches_pos_seq AS bigint;
SELECT setval('punches_pos_seq', (SELECT coalesce(max(pos), 0) + 1 FROM punches), false);
"#,
    // 5: outputs: one row per output name, its durable progress and its lease (outputs.rs).
    r#"
CREATE TABLE outputs (
    name                 text    PRIMARY KEY,
    version              bigint  NOT NULL DEFAULT 0,
    delivered_through    bigint,
    inflight_id          text,
    inflight_through     bigint,
    inflight_created_ms  bigint,
    inflight_items       integer,
    inflight_uncorrected bigint[],
    disabled_reason      text,
    disabled_ms          bigint,
    failures             integer NOT NULL DEFAULT 0,
    failing_since_ms     bigint,
    last_success_ms      bigint,
    last_error           text,
    next_attempt_ms      bigint,
    replays              bigint  NOT NULL DEFAULT 0,
    holder               text,
    lease_expires        timestamptz
);
"#,
    // 6: one position space for every kind an output delivers (module docs).
    r#"
ALTER TABLE conflicts ADD COLUMN pos bigint;
CREATE UNIQUE INDEX conflicts_pos ON conflicts (pos);
ALTER TABLE rejected ADD COLUMN pos bigint;
CREATE UNIQUE INDEX rejected_pos ON rejected (pos);
CREATE TABLE events (
    pos    bigint PRIMARY KEY,
    key    text   NOT NULL UNIQUE,
    kind   text   NOT NULL,
    output text,
    fields text   NOT NULL,
    at_ms  bigint NOT NULL
);
"#,
];

/// Advisory lock key under which commits take positions from `punches_pos_seq` and hold
/// them until their commit is visible (`commit` module docs, "Positions").
pub(super) const POS_LOCK: i64 = 0x6f75_7470_6f73_7432;

/// The channel commits `NOTIFY` with their highest new position (as decimal text), and
/// the store's listener `LISTEN`s on.
pub(super) const NOTIFY_CHANNEL: &str = "outpost_punches";

/// Advisory lock key that serialises migrations of relays starting together.
const MIGRATION_LOCK: i64 = 0x6f75_7470_6f73_7431;

/// Columns of a punch row, in the order [`row_to_record`] reads them (after `id`).
pub(super) const RECORD_COLS: &str = "site_id, device_id, device_seq, subject_id, kind, verify, \
    device_time_ms, utc_offset_min, gateway_id, journal_epoch, gateway_seq, boot_id, mono_ms, \
    wall_ms, clock_synced, source, stored_at_ms";

/// Applies pending migrations in one transaction, serialised across relays by an advisory
/// lock. A database newer than this relay is refused.
pub(super) async fn migrate(pool: &Pool) -> Result<(), StoreError> {
    let mut client = pool.get().await.map_err(pool_err)?;
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        .await
        .map_err(pg_err)?;
    let current: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await
        .map_err(pg_err)?
        .try_get(0)
        .map_err(pg_err)?;
    let known = MIGRATIONS.len() as i32;
    if current > known {
        return Err(StoreError::Corrupt(format!(
            "the database schema is version {current}, this relay knows up to {known}: upgrade the relay"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(sql).await.map_err(pg_err)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&(i as i32 + 1)],
        )
        .await
        .map_err(pg_err)?;
        tracing::info!(version = i + 1, "applied PostgreSQL schema migration");
    }
    tx.commit().await.map_err(pg_err)
}

fn source_code(s: Source) -> i16 {
    match s {
        Source::Http => 0,
        Source::Mqtt => 1,
        Source::Adms => 2,
    }
}

fn source_from(c: i16) -> Option<Source> {
    match c {
        0 => Some(Source::Http),
        1 => Some(Source::Mqtt),
        2 => Some(Source::Adms),
        _ => None,
    }
}

fn id(s: &str, what: &str) -> Result<Id, StoreError> {
    Id::new(s).map_err(|_| corrupt(what))
}

/// A record read back with its stream: (site, gateway, epoch, record, stored_at).
pub(super) type HeldRecord = (Id, Id, u64, Record, i64);

/// Reads [`RECORD_COLS`] starting at column `at`.
pub(super) fn row_to_record(r: &Row, at: usize) -> Result<HeldRecord, StoreError> {
    let g = |i: usize| at + i;
    let boot: Vec<u8> = r.try_get(g(11)).map_err(pg_err)?;
    let punch = Punch {
        device_id: id(r.try_get(g(1)).map_err(pg_err)?, "device_id")?,
        device_seq: r.try_get::<_, i64>(g(2)).map_err(pg_err)? as u64,
        subject_id: id(r.try_get(g(3)).map_err(pg_err)?, "subject_id")?,
        kind: u8::try_from(r.try_get::<_, i16>(g(4)).map_err(pg_err)?)
            .ok()
            .and_then(PunchKind::from_code)
            .ok_or_else(|| corrupt("kind"))?,
        verify: u8::try_from(r.try_get::<_, i16>(g(5)).map_err(pg_err)?)
            .ok()
            .and_then(VerifyMethod::from_code)
            .ok_or_else(|| corrupt("verify"))?,
        device_time_ms: r.try_get(g(6)).map_err(pg_err)?,
        utc_offset_min: r.try_get(g(7)).map_err(pg_err)?,
    };
    let record = Record {
        punch,
        gateway_seq: r.try_get::<_, i64>(g(10)).map_err(pg_err)? as u64,
        received: Received {
            boot_id: BootId(boot.try_into().map_err(|_| corrupt("boot_id"))?),
            mono_ms: r.try_get::<_, i64>(g(12)).map_err(pg_err)? as u64,
            wall_ms: r.try_get(g(13)).map_err(pg_err)?,
            clock_synced: r.try_get(g(14)).map_err(pg_err)?,
        },
        source: source_from(r.try_get(g(15)).map_err(pg_err)?).ok_or_else(|| corrupt("source"))?,
    };
    Ok((
        id(r.try_get(g(0)).map_err(pg_err)?, "site_id")?,
        id(r.try_get(g(8)).map_err(pg_err)?, "gateway_id")?,
        r.try_get::<_, i64>(g(9)).map_err(pg_err)? as u64,
        record,
        r.try_get(g(16)).map_err(pg_err)?,
    ))
}

/// Column arrays for a bulk insert of records via `UNNEST`.
#[derive(Default)]
pub(super) struct Columns<'a> {
    device_id: Vec<&'a str>,
    device_seq: Vec<i64>,
    subject_id: Vec<&'a str>,
    kind: Vec<i16>,
    verify: Vec<i16>,
    device_time_ms: Vec<i64>,
    utc_offset_min: Vec<Option<i16>>,
    gateway_seq: Vec<i64>,
    boot_id: Vec<&'a [u8]>,
    mono_ms: Vec<i64>,
    wall_ms: Vec<i64>,
    clock_synced: Vec<bool>,
    source: Vec<i16>,
    /// The table's own last column: `corrected_ms` or `kept_id` (`rejected` passes its
    /// reasons to [`Columns::params`] instead).
    pub(super) extra: Vec<Option<i64>>,
}

impl<'a> Columns<'a> {
    /// Adds `r` with `extra` as the last column.
    pub(super) fn push(&mut self, r: &'a Record, extra: Option<i64>) {
        let p = &r.punch;
        self.device_id.push(p.device_id.as_str());
        self.device_seq.push(p.device_seq as i64);
        self.subject_id.push(p.subject_id.as_str());
        self.kind.push(i16::from(p.kind.code()));
        self.verify.push(i16::from(p.verify.code()));
        self.device_time_ms.push(p.device_time_ms);
        self.utc_offset_min.push(p.utc_offset_min);
        self.gateway_seq.push(r.gateway_seq as i64);
        self.boot_id.push(&r.received.boot_id.0[..]);
        self.mono_ms.push(r.received.mono_ms as i64);
        self.wall_ms.push(r.received.wall_ms);
        self.clock_synced.push(r.received.clock_synced);
        self.source.push(source_code(r.source));
        self.extra.push(extra);
    }

    /// No rows.
    pub(super) fn is_empty(&self) -> bool {
        self.device_id.is_empty()
    }

    /// The parameters of [`bulk_insert_sql`]: the stream's four (`$1`–`$4`), the record
    /// columns (`$5`–`$17`), then `last` (`$18`, one value per record).
    pub(super) fn params<'p>(
        &'p self,
        stream: [&'p (dyn ToSql + Sync); 4],
        last: &'p (dyn ToSql + Sync),
    ) -> [&'p (dyn ToSql + Sync); 18] {
        let [site, gw, epoch, now] = stream;
        [
            site,
            gw,
            epoch,
            now,
            &self.device_id,
            &self.device_seq,
            &self.subject_id,
            &self.kind,
            &self.verify,
            &self.device_time_ms,
            &self.utc_offset_min,
            &self.gateway_seq,
            &self.boot_id,
            &self.mono_ms,
            &self.wall_ms,
            &self.clock_synced,
            &self.source,
            last,
        ]
    }
}

/// `INSERT INTO table` of a whole [`Columns`] in one statement (`UNNEST` of arrays): the
/// stream's site, gateway, epoch and `stored_at_ms`, the record columns, and `last_col`
/// (SQL type `last_type`); each row also gets the next `pos` from `punches_pos_seq`, in
/// array order (the caller holds [`POS_LOCK`]). Parameters from [`Columns::params`].
pub(super) fn bulk_insert_sql(table: &str, last_col: &str, last_type: &str) -> String {
    insert_sql(
        table,
        "pos, ",
        "nextval('punches_pos_seq'), ",
        last_col,
        last_type,
    )
}

/// [`bulk_insert_sql`] for `punches`: each row also gets the next `pos` from
/// `punches_pos_seq`, in array order (the caller holds [`POS_LOCK`]).
pub(super) fn punch_insert_sql() -> String {
    insert_sql(
        "punches",
        "pos, ",
        "nextval('punches_pos_seq'), ",
        "corrected_ms",
        "bigint",
    )
}

fn insert_sql(
    table: &str,
    lead_col: &str,
    lead_val: &str,
    last_col: &str,
    last_type: &str,
) -> String {
    format!(
        "INSERT INTO {table} ({lead_col}site_id, gateway_id, journal_epoch, stored_at_ms, \
         device_id, device_seq, subject_id, kind, verify, device_time_ms, utc_offset_min, \
         gateway_seq, boot_id, mono_ms, wall_ms, clock_synced, source, {last_col}) \
         SELECT {lead_val}$1, $2, $3, $4, * FROM UNNEST($5::text[], $6::bigint[], $7::text[], \
         $8::smallint[], $9::smallint[], $10::bigint[], $11::smallint[], $12::bigint[], \
         $13::bytea[], $14::bigint[], $15::bigint[], $16::boolean[], $17::smallint[], \
         $18::{last_type}[])"
    )
}
