//! The read side of the PostgreSQL store: the query API's pages, the gateway list, and
//! readiness.
//!
//! Reads take a pooled connection each and no lock: they see committed batches only, so a
//! page never shows half a batch. Pages of punches go by `pos`, which commits make
//! visible in order (`commit` module docs, "Positions"): one statement's snapshot holds
//! every punch up to the highest `pos` it sees, so paging after it never skips one.

use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::error::{corrupt, pg_err, pool_err};
use super::schema::{row_to_record, RECORD_COLS};
use crate::store::{
    ConflictRow, GatewayInfo, HeldQuery, PunchPage, PunchQuery, PunchRow, RejectedRow, SeqRanges,
    StoreError,
};

/// One page of punches matching `q`, by cursor (`pos`).
pub(super) async fn punches(pool: &Pool, q: &PunchQuery) -> Result<PunchPage, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    type Param = Box<dyn ToSql + Sync + Send>;
    let mut sql = format!("SELECT pos, {RECORD_COLS}, corrected_ms FROM punches WHERE pos > $1");
    let after = q.after.map_or(0, |a| a.min(i64::MAX as u64) as i64);
    let mut params: Vec<Param> = vec![Box::new(after)];
    let mut cond = |sql: &mut String, c: &str, v: Param| {
        params.push(v);
        sql.push_str(&format!(" AND {c} ${}", params.len()));
    };
    if let Some(v) = &q.site {
        cond(&mut sql, "site_id =", Box::new(v.clone()));
    }
    if let Some(v) = &q.sites {
        // `= ANY($n)` with the array as one parameter; no rows for an empty array.
        cond(&mut sql, "site_id = ANY(", Box::new(v.clone()));
        sql.push(')');
    }
    if let Some(v) = &q.device {
        cond(&mut sql, "device_id =", Box::new(v.clone()));
    }
    if let Some(v) = &q.subject {
        cond(&mut sql, "subject_id =", Box::new(v.clone()));
    }
    if let Some(v) = q.from_ms {
        cond(&mut sql, "device_time_ms >=", Box::new(v));
    }
    if let Some(v) = q.to_ms {
        cond(&mut sql, "device_time_ms <", Box::new(v));
    }
    params.push(Box::new((q.limit as i64).saturating_add(1)));
    sql.push_str(&format!(" ORDER BY pos LIMIT ${}", params.len()));
    let params: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let rows = client.query(&sql, &params).await.map_err(pg_err)?;
    let mut page = PunchPage::default();
    for row in rows {
        if page.items.len() == q.limit {
            page.next_cursor = page.items.last().map(|r| r.cursor);
            break;
        }
        page.items.push(punch_row(&row)?);
    }
    Ok(page)
}

/// The highest visible `pos` of the event stream (every table that takes positions), 0
/// when none is stored (each unique index's last entry).
pub(super) const HEAD_SQL: &str = "SELECT greatest(\
    (SELECT coalesce(max(pos), 0) FROM punches), \
    (SELECT coalesce(max(pos), 0) FROM conflicts), \
    (SELECT coalesce(max(pos), 0) FROM rejected), \
    (SELECT coalesce(max(pos), 0) FROM events))";

/// The highest visible cursor.
pub(super) async fn head(pool: &Pool) -> Result<u64, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let row = client.query_one(HEAD_SQL, &[]).await.map_err(pg_err)?;
    Ok(row.try_get::<_, i64>(0).map_err(pg_err)? as u64)
}

/// Every gateway with its counters and the watermark of its current stream.
pub(super) async fn gateways(pool: &Pool) -> Result<Vec<GatewayInfo>, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let rows = client
        .query(
            "SELECT g.gateway_id, g.site_id, g.last_seen_ms, g.journal_epoch, g.records, \
             g.duplicates, g.conflicts, s.ranges, g.rejected, g.seq_reuse FROM gateways g LEFT JOIN streams s \
             ON s.gateway_id = g.gateway_id AND s.journal_epoch = g.journal_epoch \
             ORDER BY g.gateway_id",
            &[],
        )
        .await
        .map_err(pg_err)?;
    rows.iter()
        .map(|r| {
            let flat: Option<Vec<i64>> = r.try_get(7).map_err(pg_err)?;
            let flat: Vec<u64> = flat
                .unwrap_or_default()
                .into_iter()
                .map(|v| v as u64)
                .collect();
            let ranges = SeqRanges::from_flat(&flat).ok_or_else(|| corrupt("ranges"))?;
            Ok(GatewayInfo {
                gateway_id: r.try_get(0).map_err(pg_err)?,
                site_id: r.try_get(1).map_err(pg_err)?,
                last_seen_ms: r.try_get(2).map_err(pg_err)?,
                journal_epoch: r.try_get::<_, i64>(3).map_err(pg_err)? as u64,
                acked_through: ranges.watermark(),
                records: r.try_get::<_, i64>(4).map_err(pg_err)? as u64,
                duplicates: r.try_get::<_, i64>(5).map_err(pg_err)? as u64,
                conflicts: r.try_get::<_, i64>(6).map_err(pg_err)? as u64,
                rejected: r.try_get::<_, i64>(8).map_err(pg_err)? as u64,
                seq_reuse: r.try_get::<_, i64>(9).map_err(pg_err)? as u64,
            })
        })
        .collect()
}

/// Rows of a table of held records (`conflicts`, `rejected`) after `q.after` of
/// `q.sites`, oldest first: `(id, site, gateway, epoch, record, stored_at, the row)`, the
/// row for the table's own column `extra_col` (column 18, an expression over the table's
/// columns, which may name other tables through `join`).
async fn held(
    pool: &Pool,
    table: &str,
    extra_col: &str,
    join: &str,
    q: &HeldQuery,
) -> Result<Vec<Row>, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let after = q.after.map_or(0, |a| a.min(i64::MAX as u64) as i64);
    let cols = record_cols_of("h");
    // A NULL array is "every site"; the filter is in the query so LIMIT counts only
    // matching rows.
    let rows = client
        .query(
            &format!(
                "SELECT h.id, {cols}, {extra_col} FROM {table} h {join} WHERE h.id > $1 \
                 AND ($3::text[] IS NULL OR h.site_id = ANY($3)) ORDER BY h.id LIMIT $2"
            ),
            &[&after, &(q.limit as i64), &q.sites],
        )
        .await
        .map_err(pg_err)?;
    Ok(rows)
}

/// Conflicts matching `q`, oldest first.
pub(super) async fn conflicts(pool: &Pool, q: &HeldQuery) -> Result<Vec<ConflictRow>, StoreError> {
    // The kept punch's cursor is its `pos` (the table keeps its `id`).
    let rows = held(
        pool,
        "conflicts",
        "p.pos",
        "JOIN punches p ON p.id = h.kept_id",
        q,
    )
    .await?;
    rows.iter()
        .map(|row| conflict_row(row.try_get::<_, i64>(0).map_err(pg_err)? as u64, row))
        .collect()
}

/// Rejected records matching `q`, oldest first.
pub(super) async fn rejected(pool: &Pool, q: &HeldQuery) -> Result<Vec<RejectedRow>, StoreError> {
    let rows = held(pool, "rejected", "h.reason", "", q).await?;
    rows.iter()
        .map(|row| rejected_row(row.try_get::<_, i64>(0).map_err(pg_err)? as u64, row))
        .collect()
}

/// Whether the database answers a trivial query.
pub(super) async fn ready(pool: &Pool) -> Result<(), StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    client.simple_query("SELECT 1").await.map_err(pg_err)?;
    Ok(())
}

/// [`RECORD_COLS`] with each column prefixed by the table alias `alias`.
pub(super) fn record_cols_of(alias: &str) -> String {
    RECORD_COLS
        .split(", ")
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A punch from a row laid out `pos, RECORD_COLS, corrected_ms`.
pub(super) fn punch_row(row: &Row) -> Result<PunchRow, StoreError> {
    let (site_id, gateway_id, journal_epoch, record, stored_at_ms) = row_to_record(row, 1)?;
    Ok(PunchRow {
        cursor: row.try_get::<_, i64>(0).map_err(pg_err)? as u64,
        site_id,
        gateway_id,
        journal_epoch,
        record,
        stored_at_ms,
        corrected_ms: row.try_get(18).map_err(pg_err)?,
    })
}

/// Conflict `id` from a row laid out `<any>, RECORD_COLS, <kept punch's pos>, ...`.
pub(super) fn conflict_row(id: u64, row: &Row) -> Result<ConflictRow, StoreError> {
    let (site_id, gateway_id, journal_epoch, record, stored_at_ms) = row_to_record(row, 1)?;
    Ok(ConflictRow {
        id,
        site_id,
        gateway_id,
        journal_epoch,
        record,
        stored_at_ms,
        kept_cursor: row.try_get::<_, i64>(18).map_err(pg_err)? as u64,
    })
}

/// Rejected record `id` from a row laid out `<any>, RECORD_COLS, reason, ...`.
pub(super) fn rejected_row(id: u64, row: &Row) -> Result<RejectedRow, StoreError> {
    let (site_id, gateway_id, journal_epoch, record, stored_at_ms) = row_to_record(row, 1)?;
    Ok(RejectedRow {
        id,
        site_id,
        gateway_id,
        journal_epoch,
        record,
        stored_at_ms,
        reason: row.try_get(18).map_err(pg_err)?,
    })
}
