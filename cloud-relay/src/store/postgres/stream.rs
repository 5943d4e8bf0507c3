//! The event stream of the PostgreSQL store (store module docs, "One position space").
//!
//! `punches`, `conflicts`, `rejected` and `events` take `pos` from `punches_pos_seq` under
//! [`POS_LOCK`] (`commit` module docs, "Positions"), so positions of every table become
//! visible in order. A read queries the four tables in **one** read-only REPEATABLE READ
//! transaction: one snapshot, so it cannot see a position of one table while a lower one
//! of another, committed between two statements, is missing. Each query returns at most
//! `limit` rows in `pos` order; the merge keeps the lowest `limit`.
//!
//! A notice is appended in its own transaction under the same lock, with the next
//! position, and `NOTIFY` like a commit. The key lookup runs under the lock too, so two
//! relays appending the same notice store it once.

use deadpool_postgres::Pool;
use serde_json::{Map, Value};

use super::error::{pg_err, pool_err};
use super::query::{conflict_row, punch_row, record_cols_of, rejected_row};
use super::schema::{NOTIFY_CHANNEL, POS_LOCK, RECORD_COLS};
use crate::store::{Notice, StoreError, StreamItem, StreamQuery, StreamRow};

fn corrupt_fields(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(format!("notice fields: {e}"))
}

/// [`crate::store::Store::stream`].
pub(super) async fn stream(pool: &Pool, q: StreamQuery) -> Result<Vec<StreamRow>, StoreError> {
    let mut out: Vec<StreamRow> = Vec::new();
    if q.limit == 0 {
        return Ok(out);
    }
    let after = q.after.map_or(0, |a| a.min(i64::MAX as u64) as i64);
    let through = q
        .through
        .map_or(i64::MAX, |t| t.min(i64::MAX as u64) as i64);
    let limit = q.limit as i64;
    let h = record_cols_of("h");
    let mut client = pool.get().await.map_err(pool_err)?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg_err)?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&after, &through, &limit];
    let range = "pos > $1 AND pos <= $2 ORDER BY pos LIMIT $3";
    for row in tx
        .query(
            &format!("SELECT pos, {RECORD_COLS}, corrected_ms FROM punches WHERE {range}"),
            &params,
        )
        .await
        .map_err(pg_err)?
    {
        let punch = punch_row(&row)?;
        out.push(StreamRow {
            cursor: punch.cursor,
            item: StreamItem::Punch(punch),
        });
    }
    let held = |table: &str, extra: &str, join: &str| {
        format!(
            "SELECT h.pos, {h}, {extra}, h.id FROM {table} h {join} \
             WHERE h.pos > $1 AND h.pos <= $2 ORDER BY h.pos LIMIT $3"
        )
    };
    for row in tx
        .query(
            &held("conflicts", "p.pos", "JOIN punches p ON p.id = h.kept_id"),
            &params,
        )
        .await
        .map_err(pg_err)?
    {
        let id = row.try_get::<_, i64>(19).map_err(pg_err)? as u64;
        out.push(StreamRow {
            cursor: row.try_get::<_, i64>(0).map_err(pg_err)? as u64,
            item: StreamItem::Conflict(conflict_row(id, &row)?),
        });
    }
    for row in tx
        .query(&held("rejected", "h.reason", ""), &params)
        .await
        .map_err(pg_err)?
    {
        let id = row.try_get::<_, i64>(19).map_err(pg_err)? as u64;
        out.push(StreamRow {
            cursor: row.try_get::<_, i64>(0).map_err(pg_err)? as u64,
            item: StreamItem::Rejected(rejected_row(id, &row)?),
        });
    }
    for row in tx
        .query(
            &format!("SELECT pos, key, kind, output, fields, at_ms FROM events WHERE {range}"),
            &params,
        )
        .await
        .map_err(pg_err)?
    {
        let fields: String = row.try_get(4).map_err(pg_err)?;
        let fields: Map<String, Value> = serde_json::from_str(&fields).map_err(corrupt_fields)?;
        out.push(StreamRow {
            cursor: row.try_get::<_, i64>(0).map_err(pg_err)? as u64,
            item: StreamItem::Notice(Notice {
                key: row.try_get(1).map_err(pg_err)?,
                kind: row.try_get(2).map_err(pg_err)?,
                output: row.try_get(3).map_err(pg_err)?,
                fields,
                at_ms: row.try_get(5).map_err(pg_err)?,
            }),
        });
    }
    tx.commit().await.map_err(pg_err)?;
    out.sort_unstable_by_key(|r| r.cursor);
    out.truncate(q.limit);
    Ok(out)
}

/// [`crate::store::Store::append_notice`].
pub(super) async fn append_notice(pool: &Pool, n: &Notice) -> Result<u64, StoreError> {
    let fields = serde_json::to_string(&n.fields).map_err(corrupt_fields)?;
    let mut client = pool.get().await.map_err(pool_err)?;
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&POS_LOCK])
        .await
        .map_err(pg_err)?;
    if let Some(row) = tx
        .query_opt("SELECT pos FROM events WHERE key = $1", &[&n.key])
        .await
        .map_err(pg_err)?
    {
        return Ok(row.try_get::<_, i64>(0).map_err(pg_err)? as u64);
    }
    let pos: i64 = tx
        .query_one(
            "INSERT INTO events (pos, key, kind, output, fields, at_ms) \
             VALUES (nextval('punches_pos_seq'), $1, $2, $3, $4, $5) RETURNING pos",
            &[&n.key, &n.kind, &n.output, &fields, &n.at_ms],
        )
        .await
        .map_err(pg_err)?
        .try_get(0)
        .map_err(pg_err)?;
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&NOTIFY_CHANNEL, &pos.to_string()],
    )
    .await
    .map_err(pg_err)?;
    tx.commit().await.map_err(pg_err)?;
    Ok(pos as u64)
}
