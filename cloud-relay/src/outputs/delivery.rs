//! Building a [`Delivery`] from stored punches, the same on every attempt.
//!
//! A delivery covers the cursor range `(cursor, through]`: the punches a worker read
//! after the output's cursor (at most `batch_max`), of which those that pass the output's
//! sites filter become items. Its id is derived from the output's name, the range and the
//! number of replays ([`delivery_id`]), and recorded with the range before the first
//! attempt (`store::output_state`). Rebuilding it reads the same range again: punches
//! are never removed, and the store's cursor never lets a punch appear inside a range
//! that was already read, so the items are the same; the corrected time of the items
//! whose corrected time was unknown at the first attempt is shown as unknown again
//! ([`InFlight::uncorrected`]), so every attempt carries the same JSON.

use serde_json::Value;

use super::sink::{punch_id, Delivery, Item};
use crate::store::{InFlight, PunchQuery, PunchRow, Store, StoreError};

/// The id of the delivery whose read punches had cursors `first..=through`, for output
/// `name` after `replays` replays: `msg_<name>_<first>_<through>`, with `_r<replays>`
/// appended once the output was replayed (a replayed range is a new call, not a retry of
/// the old one).
pub fn delivery_id(name: &str, first: u64, through: u64, replays: u64) -> String {
    if replays == 0 {
        format!("msg_{name}_{first}_{through}")
    } else {
        format!("msg_{name}_{first}_{through}_r{replays}")
    }
}

/// Whether `row` passes the sites filter (empty = every site).
pub fn wanted(sites: &[String], row: &PunchRow) -> bool {
    sites.is_empty() || sites.iter().any(|s| s == row.site_id.as_str())
}

/// The item of `row`: its punch JSON (as in `GET /v1/punches`) plus `"id"` (the punch's
/// stable id) and `"cursor"` (a string, like the query API's `next_cursor`).
pub fn item(row: &PunchRow) -> Item {
    let p = &row.record.punch;
    let id = punch_id(row.site_id.as_str(), p.device_id.as_str(), p.device_seq);
    let mut json = row.to_json();
    json.insert("id".into(), Value::String(id.clone()));
    json.insert("cursor".into(), Value::String(row.cursor.to_string()));
    Item {
        id,
        cursor: row.cursor,
        site: row.site_id.as_str().to_string(),
        device: p.device_id.as_str().to_string(),
        json,
    }
}

/// The punches with a cursor after `from` (`None`: from the first) up to `through`, in
/// cursor order, read in pages of `page`.
pub async fn read_range(
    store: &dyn Store,
    from: Option<u64>,
    through: u64,
    page: usize,
) -> Result<Vec<PunchRow>, StoreError> {
    let mut rows = Vec::new();
    let mut after = from;
    while after.is_none_or(|a| a < through) {
        let got = store
            .punches(PunchQuery {
                after,
                limit: page.max(1),
                ..PunchQuery::default()
            })
            .await?;
        let Some(last) = got.items.last().map(|r| r.cursor) else {
            break;
        };
        rows.extend(got.items.into_iter().filter(|r| r.cursor <= through));
        after = Some(last);
    }
    Ok(rows)
}

/// The delivery recorded as `f`, from the wanted rows of its range.
pub fn rebuild(f: &InFlight, mut rows: Vec<PunchRow>) -> Delivery {
    for r in &mut rows {
        if f.uncorrected.contains(&r.cursor) {
            r.corrected_ms = None;
        }
    }
    Delivery {
        id: f.id.clone(),
        created_ms: f.created_ms,
        items: rows.iter().map(item).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_the_output_and_the_range() {
        assert_eq!(delivery_id("payroll", 0, 100, 0), "msg_payroll_0_100");
        assert_eq!(
            delivery_id("payroll", 101, 150, 2),
            "msg_payroll_101_150_r2"
        );
    }
}
