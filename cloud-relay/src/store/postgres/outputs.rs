//! Output state and leases in PostgreSQL (`store::output_state`): one `outputs` row per
//! output name.
//!
//! ## The lease: a row with an expiry, by the database clock
//!
//! `holder` and `lease_expires` say which relay runs the output. A relay takes the lease
//! when nobody holds it, when it already does (a renewal), or when the holder's expiry has
//! passed; all three in one `INSERT … ON CONFLICT DO UPDATE … WHERE`, which PostgreSQL
//! runs under the row's lock, so two relays can never both succeed. Expiry is computed and
//! compared with `clock_timestamp()` of the database, so the relays' clocks do not matter.
//!
//! Chosen over a session advisory lock on a dedicated connection because (a) the holder is
//! visible to every relay (`GET /v1/outputs` shows it) without `pg_locks` queries and
//! privileges, (b) losing it does not depend on TCP noticing a dead connection (a relay
//! frozen or partitioned keeps an advisory lock for as long as its connection lives,
//! which with default keepalives is hours), and (c) every state write can check it in
//! the same statement: `holder = $me AND lease_expires > clock_timestamp()`, so a relay
//! that lost the lease cannot move the cursor however late its write arrives.
//!
//! The worker (`outputs::lease`) renews at a third of the lease time and stops
//! delivering once two thirds have passed since its last successful renewal was sent,
//! before the lease can expire for another relay.

use deadpool_postgres::Pool;
use tokio_postgres::Row;

use super::error::{pg_err, pool_err};
use crate::store::output_state::lease_ms;
use crate::store::{Backlog, Disabled, InFlight, LeaseGrant, OutputState, OutputWrite, StoreError};

/// The state columns, in the order [`row_to_state`] reads them.
const STATE_COLS: &str = "version, delivered_through, inflight_id, inflight_through, \
    inflight_created_ms, inflight_items, inflight_uncorrected, disabled_reason, disabled_ms, \
    failures, failing_since_ms, last_success_ms, last_error, next_attempt_ms, replays, holder";

fn row_to_state(r: &Row) -> Result<OutputState, StoreError> {
    let inflight_id: Option<String> = r.try_get(2).map_err(pg_err)?;
    let in_flight = match inflight_id {
        Some(id) => Some(InFlight {
            id,
            through: r
                .try_get::<_, Option<i64>>(3)
                .map_err(pg_err)?
                .unwrap_or_default() as u64,
            created_ms: r
                .try_get::<_, Option<i64>>(4)
                .map_err(pg_err)?
                .unwrap_or_default(),
            items: r
                .try_get::<_, Option<i32>>(5)
                .map_err(pg_err)?
                .unwrap_or_default() as u32,
            uncorrected: r
                .try_get::<_, Option<Vec<i64>>>(6)
                .map_err(pg_err)?
                .unwrap_or_default()
                .into_iter()
                .map(|c| c as u64)
                .collect(),
        }),
        None => None,
    };
    let disabled = match r.try_get::<_, Option<String>>(7).map_err(pg_err)? {
        Some(reason) => Some(Disabled {
            reason,
            at_ms: r
                .try_get::<_, Option<i64>>(8)
                .map_err(pg_err)?
                .unwrap_or_default(),
        }),
        None => None,
    };
    Ok(OutputState {
        version: r.try_get::<_, i64>(0).map_err(pg_err)? as u64,
        cursor: r
            .try_get::<_, Option<i64>>(1)
            .map_err(pg_err)?
            .map(|c| c as u64),
        in_flight,
        disabled,
        failures: r.try_get::<_, i32>(9).map_err(pg_err)? as u32,
        failing_since_ms: r.try_get(10).map_err(pg_err)?,
        last_success_ms: r.try_get(11).map_err(pg_err)?,
        last_error: r.try_get(12).map_err(pg_err)?,
        next_attempt_ms: r.try_get(13).map_err(pg_err)?,
        replays: r.try_get::<_, i64>(14).map_err(pg_err)? as u64,
        holder: r.try_get(15).map_err(pg_err)?,
    })
}

/// Output `name`'s state; the default for one that never ran.
pub(super) async fn state(pool: &Pool, name: &str) -> Result<OutputState, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let row = client
        .query_opt(
            &format!("SELECT {STATE_COLS} FROM outputs WHERE name = $1"),
            &[&name],
        )
        .await
        .map_err(pg_err)?;
    row.as_ref()
        .map_or(Ok(OutputState::default()), row_to_state)
}

/// The compare-and-set write (`store::output_state`, "Versioned writes").
pub(super) async fn write(
    pool: &Pool,
    name: &str,
    w: &OutputWrite,
) -> Result<Option<OutputState>, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    if w.expect_version == 0 {
        // An output that never ran has no row yet (an admin's replay before its first
        // start); version 0 is what its default state says.
        client
            .execute(
                "INSERT INTO outputs (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
                &[&name],
            )
            .await
            .map_err(pg_err)?;
    }
    let s = &w.state;
    let f = s.in_flight.as_ref();
    let uncorrected: Option<Vec<i64>> =
        f.map(|f| f.uncorrected.iter().map(|&c| c as i64).collect());
    let row = client
        .query_opt(
            &format!(
                "UPDATE outputs SET version = version + 1, delivered_through = $3, \
                 inflight_id = $4, inflight_through = $5, inflight_created_ms = $6, \
                 inflight_items = $7, inflight_uncorrected = $8, disabled_reason = $9, \
                 disabled_ms = $10, failures = $11, failing_since_ms = $12, \
                 last_success_ms = $13, last_error = $14, next_attempt_ms = $15, replays = $16 \
                 WHERE name = $1 AND version = $2 AND ($17::text IS NULL OR \
                 (holder = $17 AND lease_expires > clock_timestamp())) \
                 RETURNING {STATE_COLS}"
            ),
            &[
                &name,
                &(w.expect_version as i64),
                &s.cursor.map(|c| c as i64),
                &f.map(|f| f.id.as_str()),
                &f.map(|f| f.through as i64),
                &f.map(|f| f.created_ms),
                &f.map(|f| f.items as i32),
                &uncorrected,
                &s.disabled.as_ref().map(|d| d.reason.as_str()),
                &s.disabled.as_ref().map(|d| d.at_ms),
                &(s.failures.min(i32::MAX as u32) as i32),
                &s.failing_since_ms,
                &s.last_success_ms,
                &s.last_error,
                &s.next_attempt_ms,
                &(s.replays as i64),
                &w.holder,
            ],
        )
        .await
        .map_err(pg_err)?;
    row.as_ref().map(row_to_state).transpose()
}

/// Takes or renews the lease (module docs).
pub(super) async fn lease(
    pool: &Pool,
    name: &str,
    holder: &str,
    ttl: std::time::Duration,
) -> Result<LeaseGrant, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let ms = lease_ms(ttl) as f64;
    let taken = client
        .query_opt(
            "INSERT INTO outputs (name, holder, lease_expires) \
             VALUES ($1, $2, clock_timestamp() + $3::float8 * interval '1 millisecond') \
             ON CONFLICT (name) DO UPDATE \
             SET holder = EXCLUDED.holder, lease_expires = EXCLUDED.lease_expires \
             WHERE outputs.holder IS NULL OR outputs.holder = EXCLUDED.holder \
             OR outputs.lease_expires IS NULL OR outputs.lease_expires <= clock_timestamp() \
             RETURNING name",
            &[&name, &holder, &ms],
        )
        .await
        .map_err(pg_err)?;
    if taken.is_some() {
        return Ok(LeaseGrant::Held);
    }
    let row = client
        .query_opt("SELECT holder FROM outputs WHERE name = $1", &[&name])
        .await
        .map_err(pg_err)?;
    let holder: Option<String> = match row {
        Some(r) => r.try_get(0).map_err(pg_err)?,
        None => None,
    };
    Ok(LeaseGrant::Busy {
        holder: holder.unwrap_or_default(),
    })
}

/// Gives the lease up, if `holder` has it.
pub(super) async fn release(pool: &Pool, name: &str, holder: &str) -> Result<(), StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    client
        .execute(
            "UPDATE outputs SET holder = NULL, lease_expires = NULL \
             WHERE name = $1 AND holder = $2",
            &[&name, &holder],
        )
        .await
        .map_err(pg_err)?;
    Ok(())
}

/// The punches after `after` of `sites` (empty = all): how many, and the oldest.
pub(super) async fn backlog(
    pool: &Pool,
    after: Option<u64>,
    sites: &[String],
) -> Result<Backlog, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    // Positions start at 1: "after nothing" is after 0.
    let after = after.map_or(0, |a| a.min(i64::MAX as u64) as i64);
    let row = client
        .query_one(
            "SELECT count(*), min(stored_at_ms) FROM punches WHERE pos > $1 \
             AND (cardinality($2::text[]) = 0 OR site_id = ANY($2::text[]))",
            &[&after, &sites],
        )
        .await
        .map_err(pg_err)?;
    Ok(Backlog {
        records: row.try_get::<_, i64>(0).map_err(pg_err)? as u64,
        oldest_stored_ms: row.try_get(1).map_err(pg_err)?,
    })
}

/// The highest cursor stored before `stored_before_ms`, `None` when none.
pub(super) async fn cursor_before(
    pool: &Pool,
    stored_before_ms: i64,
) -> Result<Option<u64>, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let row = client
        .query_one(
            "SELECT max(pos) FROM punches WHERE stored_at_ms < $1",
            &[&stored_before_ms],
        )
        .await
        .map_err(pg_err)?;
    Ok(row
        .try_get::<_, Option<i64>>(0)
        .map_err(pg_err)?
        .map(|c| c as u64))
}
