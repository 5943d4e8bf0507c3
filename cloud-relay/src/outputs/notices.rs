//! The relay's own events for the outputs: an output disabled, an output enabled.
//!
//! They are [`Notice`]s in the store's event stream (store module docs, "One position
//! space"), delivered like punches to every output whose `events` lists `gateway` (the
//! kind for relay and gateway health; gateway alerts will join them), except the output
//! they are about. Item JSON (`outputs::delivery::item`), in a webhook body of type
//! `gateway.batch`:
//!
//! ```json
//! {"id": "relay/output.disabled/payroll/1733400000000", "cursor": "812",
//!  "kind": "output.disabled", "output": "payroll",
//!  "reason": "the receiver refused all further deliveries: 410 Gone",
//!  "since": "2026-12-05T17:00:00.000Z", "at": "2026-12-05T17:20:00.000Z"}
//! ```
//!
//! **Exactly one notice per disabling.** The key is `output.disabled/<output>/<at_ms>`,
//! with the disabling's time from the output's durable state, and the store appends a key
//! once. The worker appends it whenever it finds its output disabled and has not appended
//! that disabling's notice yet in this run (`outputs::worker`): after the disabling
//! write, and again after a crash or on the relay that takes the lease over, so a crash
//! between the state write and the append loses nothing, and the repeats store nothing.
//! `output.enabled/<output>/<at_ms of the disabling it ends>` is appended by the enable
//! (`outputs::control::enable`).

use outpost_protocol::json::format_time;
use serde_json::{Map, Value};

use crate::store::{Disabled, Notice};

/// `output.disabled` of output `name`, disabled as `d`, failing since `since_ms`.
pub fn disabled(name: &str, d: &Disabled, since_ms: Option<i64>) -> Notice {
    let mut fields = Map::new();
    fields.insert("reason".into(), d.reason.as_str().into());
    fields.insert(
        "since".into(),
        since_ms.map_or(Value::Null, |t| format_time(t, None).into()),
    );
    Notice {
        key: format!("output.disabled/{name}/{}", d.at_ms),
        kind: "output.disabled".into(),
        output: Some(name.to_string()),
        fields,
        at_ms: d.at_ms,
    }
}

/// `output.enabled` of output `name`, ending the disabling `d`, at `now_ms`.
pub fn enabled(name: &str, d: &Disabled, now_ms: i64) -> Notice {
    let mut fields = Map::new();
    fields.insert("disabled_at".into(), format_time(d.at_ms, None).into());
    fields.insert("reason".into(), d.reason.as_str().into());
    Notice {
        key: format!("output.enabled/{name}/{}", d.at_ms),
        kind: "output.enabled".into(),
        output: Some(name.to_string()),
        fields,
        at_ms: now_ms,
    }
}
