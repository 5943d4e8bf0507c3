//! Output state in the sled store (`store::output_state`): one `o` key per output.
//!
//! | key | value |
//! |---|---|
//! | `o` name | [`StoredOutput`]: the output's cursor, in-flight delivery and health |
//!
//! A write is a compare-and-set on the version under `outputs_lock`, then made durable
//! exactly like a commit (flush, then fsync of the store directory, shared rounds; module
//! docs of `store::sled`, "Commit and failures") before it returns. sled is
//! single-process, so the lease is always this relay's ([`LeaseGrant::Always`]); the
//! holder id is recorded for `GET /v1/outputs`.

use std::sync::atomic::Ordering;

use minicbor::{Decode, Encode};

use super::{dec, enc, io, push_id, SledStore, StoredRow, T_ROW};
use crate::store::{Backlog, Disabled, InFlight, LeaseGrant, OutputState, OutputWrite, StoreError};

/// Table tag of output states.
const T_OUTPUT: u8 = b'o';

fn output_key(name: &str) -> Vec<u8> {
    let mut k = vec![T_OUTPUT];
    push_id(&mut k, name);
    k
}

/// [`OutputState`] as stored.
#[derive(Debug, Clone, Default, Encode, Decode)]
struct StoredOutput {
    #[n(0)]
    version: u64,
    #[n(1)]
    cursor: Option<u64>,
    #[n(2)]
    in_flight: Option<StoredInFlight>,
    #[n(3)]
    disabled: Option<StoredDisabled>,
    #[n(4)]
    failures: u32,
    #[n(5)]
    failing_since_ms: Option<i64>,
    #[n(6)]
    last_success_ms: Option<i64>,
    #[n(7)]
    last_error: Option<String>,
    #[n(8)]
    next_attempt_ms: Option<i64>,
    #[n(9)]
    holder: Option<String>,
    #[n(10)]
    replays: u64,
}

#[derive(Debug, Clone, Encode, Decode)]
struct StoredInFlight {
    #[n(0)]
    id: String,
    #[n(1)]
    through: u64,
    #[n(2)]
    created_ms: i64,
    #[n(3)]
    items: u32,
    #[n(4)]
    uncorrected: Vec<u64>,
}

#[derive(Debug, Clone, Encode, Decode)]
struct StoredDisabled {
    #[n(0)]
    reason: String,
    #[n(1)]
    at_ms: i64,
}

impl From<StoredOutput> for OutputState {
    fn from(s: StoredOutput) -> Self {
        OutputState {
            version: s.version,
            cursor: s.cursor,
            in_flight: s.in_flight.map(|f| InFlight {
                id: f.id,
                through: f.through,
                created_ms: f.created_ms,
                items: f.items,
                uncorrected: f.uncorrected,
            }),
            disabled: s.disabled.map(|d| Disabled {
                reason: d.reason,
                at_ms: d.at_ms,
            }),
            failures: s.failures,
            failing_since_ms: s.failing_since_ms,
            last_success_ms: s.last_success_ms,
            last_error: s.last_error,
            next_attempt_ms: s.next_attempt_ms,
            holder: s.holder,
            replays: s.replays,
        }
    }
}

impl From<OutputState> for StoredOutput {
    fn from(s: OutputState) -> Self {
        StoredOutput {
            version: s.version,
            cursor: s.cursor,
            in_flight: s.in_flight.map(|f| StoredInFlight {
                id: f.id,
                through: f.through,
                created_ms: f.created_ms,
                items: f.items,
                uncorrected: f.uncorrected,
            }),
            disabled: s.disabled.map(|d| StoredDisabled {
                reason: d.reason,
                at_ms: d.at_ms,
            }),
            failures: s.failures,
            failing_since_ms: s.failing_since_ms,
            last_success_ms: s.last_success_ms,
            last_error: s.last_error,
            next_attempt_ms: s.next_attempt_ms,
            holder: s.holder,
            replays: s.replays,
        }
    }
}

impl SledStore {
    /// Runs `f` on the blocking pool with a handle to this store.
    async fn blocking_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SledStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::io("store task failed", e))?
    }

    fn read_output(&self, name: &str) -> Result<OutputState, StoreError> {
        match self.inner.tree.get(output_key(name)).map_err(io)? {
            Some(v) => Ok(dec::<StoredOutput>("output state", &v)?.into()),
            None => Ok(OutputState::default()),
        }
    }

    /// Applies `change` to `name`'s state under the outputs lock when `check` accepts the
    /// current one; returns the new state and the write's generation.
    fn change_output(
        &self,
        name: &str,
        check: impl FnOnce(&OutputState) -> bool,
        change: impl FnOnce(&OutputState) -> OutputState,
    ) -> Result<Option<(OutputState, u64)>, StoreError> {
        // A poisoned lock only means another writer panicked; the tree is still consistent.
        let _guard = self
            .inner
            .outputs_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let current = self.read_output(name)?;
        if !check(&current) {
            return Ok(None);
        }
        let new = change(&current);
        self.inner
            .tree
            .insert(output_key(name), enc(&StoredOutput::from(new.clone())))
            .map_err(io)?;
        let generation = self.inner.applied.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Some((new, generation)))
    }

    pub(super) async fn output_state_of(&self, name: &str) -> Result<OutputState, StoreError> {
        let name = name.to_string();
        self.blocking_store(move |s| s.read_output(&name)).await
    }

    pub(super) async fn output_write_of(
        &self,
        name: &str,
        write: OutputWrite,
    ) -> Result<Option<OutputState>, StoreError> {
        let name = name.to_string();
        let done = self
            .blocking_store(move |s| {
                s.change_output(
                    &name,
                    |cur| cur.version == write.expect_version,
                    |cur| OutputState {
                        version: cur.version + 1,
                        holder: cur.holder.clone(),
                        ..write.state
                    },
                )
            })
            .await?;
        match done {
            Some((state, generation)) => {
                self.make_durable(generation, false).await?;
                Ok(Some(state))
            }
            None => Ok(None),
        }
    }

    pub(super) async fn output_lease_of(
        &self,
        name: &str,
        holder: &str,
    ) -> Result<LeaseGrant, StoreError> {
        let (name, holder) = (name.to_string(), holder.to_string());
        let done = self
            .blocking_store(move |s| {
                s.change_output(
                    &name,
                    |cur| cur.holder.as_deref() != Some(holder.as_str()),
                    |cur| OutputState {
                        version: cur.version + 1,
                        holder: Some(holder.clone()),
                        ..cur.clone()
                    },
                )
            })
            .await?;
        if let Some((_, generation)) = done {
            self.make_durable(generation, false).await?;
        }
        Ok(LeaseGrant::Always)
    }

    pub(super) async fn backlog_of(
        &self,
        after: Option<u64>,
        sites: &[String],
    ) -> Result<Backlog, StoreError> {
        let sites = sites.to_vec();
        self.blocking_store(move |s| {
            let start = super::key_u64(T_ROW, after.map_or(0, |a| a.saturating_add(1)));
            let mut out = Backlog::default();
            for item in s.inner.tree.range(start..vec![T_ROW + 1]) {
                let (_, v) = item.map_err(io)?;
                let row: StoredRow = dec("punch row", &v)?;
                if sites.is_empty() || sites.iter().any(|x| x == row.site_id.as_str()) {
                    out.records += 1;
                    out.oldest_stored_ms = Some(
                        out.oldest_stored_ms
                            .map_or(row.stored_at_ms, |o| o.min(row.stored_at_ms)),
                    );
                }
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn cursor_before_of(
        &self,
        stored_before_ms: i64,
    ) -> Result<Option<u64>, StoreError> {
        self.blocking_store(move |s| {
            // From the newest row back: the first one stored before the time is the
            // highest such cursor.
            for item in s.inner.tree.range(vec![T_ROW]..vec![T_ROW + 1]).rev() {
                let (k, v) = item.map_err(io)?;
                let row: StoredRow = dec("punch row", &v)?;
                if row.stored_at_ms < stored_before_ms {
                    return super::be_u64("row key", &k[1..]).map(Some);
                }
            }
            Ok(None)
        })
        .await
    }
}
