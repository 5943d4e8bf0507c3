//! Building a [`Delivery`] from the event stream, the same on every attempt.
//!
//! A worker reads up to `batch_max` entries of the store's event stream after the
//! output's cursor (`store` module docs, "One position space": punches, conflicts,
//! rejected records and relay notices share one position counter). Entries the output
//! does not want (a kind not in its `events`, a site not in its `sites`, a notice about
//! the output itself) are skipped but covered by the range, so the cursor moves past
//! them. A delivery is a **run of one kind** ([`select`]): it stops before the first
//! wanted entry of another kind, so every webhook call has one `type`, and the next
//! delivery starts there. It covers the range `(cursor, through]`.
//!
//! Its id is derived from the output's name, the range and the number of replays
//! ([`delivery_id`]), and recorded with the range before the first attempt
//! (`store::output_state`). Rebuilding it reads the same range again: entries are never
//! removed, and the store never lets one appear inside a range that was already read, so
//! the items are the same; the corrected time of the punches whose corrected time was
//! unknown at the first attempt is shown as unknown again ([`InFlight::uncorrected`]),
//! so every attempt carries the same JSON.
//!
//! ## Item ids (stable: the same event always has the same id)
//!
//! | kind | id |
//! |---|---|
//! | punch | its punch key `site/device/device_seq` ([`punch_id`]) |
//! | conflict | `conflict/<site>/<device>/<device_seq>/<gateway>/<epoch>/<gateway_seq>`: the punch key and the newcomer's primary key (a primary key is held at most once) |
//! | rejected | `rejected/<gateway>/<epoch>/<gateway_seq>`: the record's primary key |
//! | notice | `relay/<notice key>`, e.g. `relay/output.disabled/payroll/1733400000000` |
//!
//! Site and gateway segments are percent-encoded (`%`, `/`) like in [`punch_id`].

use serde_json::Value;

use super::config::EventKind;
use super::sink::{punch_id, push_escaped, Delivery, Item};
use super::supervisor::OutputSpec;
use crate::store::{InFlight, Store, StoreError, StreamItem, StreamQuery, StreamRow};

/// The site of a relay notice's item (its NATS subject token).
pub const RELAY_SITE: &str = "_relay";

/// The id of the delivery whose read entries had cursors `first..=through`, for output
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

/// The `events` kind of a stream entry (a notice is a `gateway` event).
pub fn kind_of(row: &StreamRow) -> EventKind {
    match row.item {
        StreamItem::Punch(_) => EventKind::Punch,
        StreamItem::Conflict(_) => EventKind::Conflict,
        StreamItem::Rejected(_) => EventKind::Rejected,
        StreamItem::Notice(_) => EventKind::Gateway,
    }
}

/// Whether output `spec` is sent `row`: its kind is in `events`, its site passes `sites`
/// (empty = every site; a notice has no site), and a notice is not about `spec` itself.
pub fn wanted(spec: &OutputSpec, row: &StreamRow) -> bool {
    if !spec.events.contains(&kind_of(row)) {
        return false;
    }
    let site = match &row.item {
        StreamItem::Punch(p) => p.site_id.as_str(),
        StreamItem::Conflict(c) => c.site_id.as_str(),
        StreamItem::Rejected(r) => r.site_id.as_str(),
        StreamItem::Notice(n) => return n.output.as_deref() != Some(spec.name.as_str()),
    };
    spec.sites.is_empty() || spec.sites.iter().any(|s| s == site)
}

/// Of `rows` (read in cursor order after the output's cursor), the next delivery: the
/// range end and the wanted entries, a run of one kind (module docs). The range ends at
/// the last entry before the first wanted entry of another kind, or at the last row.
/// `None` when `rows` is empty.
pub fn select(spec: &OutputSpec, rows: Vec<StreamRow>) -> Option<(u64, Vec<StreamRow>)> {
    let mut through = None;
    let mut kind = None;
    let mut chosen = Vec::new();
    for r in rows {
        if wanted(spec, &r) {
            let k = kind_of(&r);
            if kind.is_some_and(|kind| kind != k) {
                break;
            }
            kind = Some(k);
            through = Some(r.cursor);
            chosen.push(r);
        } else {
            through = Some(r.cursor);
        }
    }
    through.map(|t| (t, chosen))
}

/// The item of `row`: its JSON (module docs of [`crate::store`]: the punch JSON of `GET
/// /v1/punches`, a conflict of `GET /v1/conflicts`, a rejected record of `GET
/// /v1/rejected`, a notice's `kind`, `output`, fields and `at`) plus `"id"` (its stable id,
/// module docs) and `"cursor"` (a string, like the query API's `next_cursor`).
pub fn item(row: &StreamRow) -> Item {
    let (id, site, device, mut json) = match &row.item {
        StreamItem::Punch(p) => {
            let pu = &p.record.punch;
            (
                punch_id(p.site_id.as_str(), pu.device_id.as_str(), pu.device_seq),
                p.site_id.as_str(),
                pu.device_id.as_str(),
                p.to_json(),
            )
        }
        StreamItem::Conflict(c) => {
            let pu = &c.record.punch;
            let mut id = String::from("conflict/");
            id.push_str(&punch_id(
                c.site_id.as_str(),
                pu.device_id.as_str(),
                pu.device_seq,
            ));
            id.push('/');
            push_escaped(&mut id, c.gateway_id.as_str());
            id.push_str(&format!("/{}/{}", c.journal_epoch, c.record.gateway_seq));
            let json = match c.to_json() {
                Value::Object(m) => m,
                _ => Default::default(),
            };
            (id, c.site_id.as_str(), pu.device_id.as_str(), json)
        }
        StreamItem::Rejected(r) => {
            let mut id = String::from("rejected/");
            push_escaped(&mut id, r.gateway_id.as_str());
            id.push_str(&format!("/{}/{}", r.journal_epoch, r.record.gateway_seq));
            let json = match r.to_json() {
                Value::Object(m) => m,
                _ => Default::default(),
            };
            (
                id,
                r.site_id.as_str(),
                r.record.punch.device_id.as_str(),
                json,
            )
        }
        StreamItem::Notice(n) => (format!("relay/{}", n.key), RELAY_SITE, "_", n.to_json()),
    };
    json.insert("id".into(), Value::String(id.clone()));
    json.insert("cursor".into(), Value::String(row.cursor.to_string()));
    Item {
        id,
        cursor: row.cursor,
        site: site.to_string(),
        device: device.to_string(),
        json,
    }
}

/// The stream entries with a cursor after `from` (`None`: from the first) up to
/// `through`, in cursor order, read in pages of `page`.
pub async fn read_range(
    store: &dyn Store,
    from: Option<u64>,
    through: u64,
    page: usize,
) -> Result<Vec<StreamRow>, StoreError> {
    let mut rows = Vec::new();
    let mut after = from;
    while after.is_none_or(|a| a < through) {
        let got = store
            .stream(StreamQuery {
                after,
                through: Some(through),
                limit: page.max(1),
            })
            .await?;
        let Some(last) = got.last().map(|r| r.cursor) else {
            break;
        };
        rows.extend(got);
        after = Some(last);
    }
    Ok(rows)
}

/// The delivery recorded as `f`, from the wanted rows of its range (never empty, one
/// kind: [`select`]).
pub fn rebuild(f: &InFlight, mut rows: Vec<StreamRow>) -> Delivery {
    for r in &mut rows {
        if let StreamItem::Punch(p) = &mut r.item {
            if f.uncorrected.contains(&r.cursor) {
                p.corrected_ms = None;
            }
        }
    }
    Delivery {
        id: f.id.clone(),
        created_ms: f.created_ms,
        kind: rows.first().map_or(EventKind::Punch, kind_of),
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
