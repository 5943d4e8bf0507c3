//! What an operator sees and does: an output's status, replay, enable.
//!
//! These run on whichever relay answers the admin API, not necessarily the one holding
//! the output's lease. They are compare-and-set writes of the output's state without a
//! holder (`store::output_state`): the holder's next write then fails on the version,
//! and its worker reads the new state, so a replay or an enable is never overwritten by a
//! delivery that was in progress.

use outpost_protocol::json::format_time;
use serde_json::{json, Value};

use super::supervisor::OutputSpec;
use super::worker::state_name;
use crate::store::{Backlog, Disabled, OutputState, OutputWrite, Store, StoreError};

/// How often a replay or an enable retries its write when a worker wrote in between.
const CONFLICT_RETRIES: usize = 50;

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// The cursor of the first punch to deliver again (0 = every punch).
    Cursor(u64),
    /// A time (Unix ms): the cursor becomes the last one stored before it, so every punch
    /// stored from then on is delivered again.
    Time(i64),
}

/// Why a replay or an enable failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The cursor is past the newest stored punch (it would skip punches not stored yet).
    #[error("cursor {from} is after the newest stored punch ({head})")]
    BeyondHead {
        /// The asked cursor.
        from: u64,
        /// The newest cursor ("none" when nothing is stored).
        head: String,
    },
    /// Workers kept writing in between.
    #[error("the output's state kept changing; try again")]
    Busy,
}

/// An output's status: its spec, its state and its backlog.
#[derive(Debug, Clone)]
pub struct OutputStatus {
    /// The output.
    pub spec: OutputSpec,
    /// Its durable state.
    pub state: OutputState,
    /// What it has not delivered yet.
    pub backlog: Backlog,
}

/// Reads `spec`'s status.
pub async fn status(store: &dyn Store, spec: &OutputSpec) -> Result<OutputStatus, StoreError> {
    let state = store.output_state(&spec.name).await?;
    let backlog = store.backlog(state.cursor, &spec.sites).await?;
    Ok(OutputStatus {
        spec: spec.clone(),
        state,
        backlog,
    })
}

fn time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |t| format_time(t, None).into())
}

impl OutputStatus {
    /// The JSON object of `GET /v1/outputs`; `now_ms` gives the backlog's age.
    pub fn to_json(&self, now_ms: i64) -> Value {
        let s = &self.state;
        json!({
            "name": self.spec.name,
            "kind": self.spec.kind,
            "sites": self.spec.sites,
            "state": state_name(s),
            "cursor": s.cursor.map(|c| c.to_string()),
            "lag": self.backlog.records,
            "oldest_undelivered": time(self.backlog.oldest_stored_ms),
            "oldest_undelivered_age_s": self.backlog.oldest_stored_ms
                .map(|t| (now_ms.saturating_sub(t)).max(0) as f64 / 1000.0),
            "in_flight": s.in_flight.as_ref().map(|f| json!({
                "id": f.id,
                "through": f.through.to_string(),
                "items": f.items,
                "created": format_time(f.created_ms, None),
            })),
            "failures": s.failures,
            "failing_since": time(s.failing_since_ms),
            "last_success": time(s.last_success_ms),
            "last_error": s.last_error,
            "next_attempt": time(s.next_attempt_ms),
            "disabled": s.disabled.as_ref().map(|d| json!({
                "reason": d.reason,
                "at": format_time(d.at_ms, None),
            })),
            "holder": s.holder,
        })
    }
}

/// Applies `change` to output `name`'s state as an admin write, retrying when a worker
/// wrote in between.
async fn admin_write(
    store: &dyn Store,
    name: &str,
    change: impl Fn(OutputState) -> OutputState,
) -> Result<OutputState, ControlError> {
    for _ in 0..CONFLICT_RETRIES {
        let cur = store.output_state(name).await?;
        let expect = cur.version;
        let write = OutputWrite {
            holder: None,
            expect_version: expect,
            state: change(cur),
        };
        if let Some(s) = store.output_write(name, write).await? {
            return Ok(s);
        }
    }
    Err(ControlError::Busy)
}

/// Moves output `name`'s cursor (and drops its in-flight delivery): the punches from
/// `from` on are delivered again, under new delivery ids. A disabled output stays
/// disabled.
pub async fn replay(
    store: &dyn Store,
    name: &str,
    from: ReplayFrom,
) -> Result<OutputState, ControlError> {
    let head = store.cursor_before(i64::MAX).await?;
    let cursor = match from {
        // Right after the head is allowed: only punches not stored yet are delivered.
        ReplayFrom::Cursor(c) if c > head.map_or(0, |h| h.saturating_add(1)) => {
            return Err(ControlError::BeyondHead {
                from: c,
                head: head.map_or("none".into(), |h| h.to_string()),
            })
        }
        ReplayFrom::Cursor(c) => c.checked_sub(1),
        ReplayFrom::Time(t) => store.cursor_before(t).await?,
    };
    let s = admin_write(store, name, |cur| OutputState {
        cursor,
        in_flight: None,
        failures: 0,
        failing_since_ms: None,
        last_error: None,
        next_attempt_ms: None,
        replays: cur.replays + 1,
        ..cur
    })
    .await?;
    tracing::warn!(output = name, cursor = ?cursor, "output replayed by the admin API");
    Ok(s)
}

/// Enables output `name` again; its in-flight delivery, if any, is the next one sent.
///
/// When it was disabled, an `output.enabled` notice goes to the other outputs that want
/// `gateway` events (`outputs::notices`), after the write. Its key names the disabling
/// it ends, so an enable retried after a failed append stores it once; an append that
/// fails is returned as the error (the output is enabled already, and the notice is not
/// sent: the one case where a notice can be missing).
pub async fn enable(store: &dyn Store, name: &str) -> Result<OutputState, ControlError> {
    let ended: std::sync::Mutex<Option<Disabled>> = std::sync::Mutex::new(None);
    let s = admin_write(store, name, |cur| {
        if let Ok(mut e) = ended.lock() {
            e.clone_from(&cur.disabled);
        }
        OutputState {
            disabled: None,
            failures: 0,
            failing_since_ms: None,
            next_attempt_ms: None,
            ..cur
        }
    })
    .await?;
    tracing::info!(output = name, "output enabled by the admin API");
    let ended = ended.lock().ok().and_then(|mut e| e.take());
    if let Some(d) = ended {
        store
            .append_notice(super::notices::enabled(
                name,
                &d,
                outpost_ops::time::now_ms(),
            ))
            .await?;
    }
    Ok(s)
}
