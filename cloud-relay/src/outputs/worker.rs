//! One output's worker: reads after the output's cursor, delivers, moves the cursor.
//!
//! ## What happens to each punch
//!
//! The worker holds the output's lease ([`super::lease`]) and loops:
//!
//! 1. It reads the output's state. Disabled: it waits until an admin enables it. A next
//!    attempt in the future (a retry): it waits until then. Both waits re-read the state
//!    every [`STATE_POLL`], so a replay or an enable takes effect at once.
//! 2. With a delivery in flight it rebuilds it from its range ([`super::delivery`]).
//!    Otherwise it reads up to `batch_max` punches after the cursor (none: it waits for
//!    new ones, [`super::wake`]). Punches of other sites than the output's are not
//!    delivered, but the range covers them, so the cursor moves past them; a read with no
//!    wanted punch at all moves the cursor in one write. A new delivery is recorded in
//!    the store (id, range, `created_ms`, item count) **before** its first attempt.
//! 3. It hands the delivery to the sink. Confirmed: the cursor moves to the range's end
//!    and the in-flight record is cleared, in one durable write. Retry: the failure is
//!    recorded (last error, next attempt, failing since) and the same delivery is tried
//!    after the receiver's `Retry-After`, or else after the sink's schedule with ±20 %
//!    jitter. A failure that has lasted `disable_after`, or a receiver that answered
//!    `Gone`, disables the output (an error log, `outpost_relay_output_disables_total`,
//!    and an `output.disabled` notice for the other outputs, appended by the worker that
//!    finds the output disabled: [`super::notices`]).
//!
//! So on every failure a punch is either already confirmed (behind the cursor) or inside
//! or after the in-flight range, and is sent again:
//! - the receiver fails, times out, or the connection breaks: the same delivery is sent
//!   again, until it is confirmed or the output is disabled (it then waits, with the same
//!   delivery in flight, for an enable);
//! - the relay crashes or stops during an attempt (shutdown abandons an attempt; the
//!   relay's CancellationToken): the next worker, on this relay after a restart or on
//!   another one, rebuilds the same delivery from the recorded range and sends it again;
//! - the relay crashes after the receiver confirmed but before the cursor write: the
//!   same delivery is sent again, and the receiver drops it by id;
//! - the store fails: nothing moves; the worker retries the read or write after a second;
//! - the lease is lost: the worker stops (abandoning an attempt) before another relay can
//!   take the lease, and its late writes fail (they check the lease);
//! - an admin replays: the cursor moves and the in-flight record is dropped; a
//!   confirmation that arrives for the old delivery does not move the cursor (the write
//!   checks the state's version).
//!
//! One delivery is in flight per output, so a receiver sees punches in cursor order.
//! Workers only read punches: outputs never slow intake.

use std::sync::Arc;
use std::time::Duration;

use outpost_ops::time::now_ms;
use tokio_util::sync::CancellationToken;

use super::delivery::{self, delivery_id, kind_of, select, wanted};
use super::lease::{self, Timing};
use super::notices;
use super::sink::{Delivery, Sink, SinkError};
use super::supervisor::OutputSpec;
use super::wake::NewPunches;
use crate::metrics::{Metrics, OutputKind, OutputLabel};
use crate::store::{
    Disabled, InFlight, OutputState, OutputWrite, Store, StoreError, StreamItem, StreamQuery,
    StreamRow,
};

/// While waiting (disabled, or before a retry) the state is read again this often, so an
/// enable or a replay takes effect without waiting for the end of a long retry.
pub const STATE_POLL: Duration = Duration::from_secs(1);

/// After a store error the worker tries again after this long.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// `active`, `retrying` or `disabled`: what `GET /v1/outputs` and the state metric show.
pub fn state_name(s: &OutputState) -> &'static str {
    if s.disabled.is_some() {
        "disabled"
    } else if s.failures > 0 {
        "retrying"
    } else {
        "active"
    }
}

/// `d` ± 20 %, never negative.
pub fn jitter(d: Duration) -> Duration {
    let f: f64 = 0.8 + 0.4 * rand::random::<f64>();
    Duration::from_secs_f64((d.as_secs_f64() * f).max(0.0))
}

/// One output's worker (module docs). Its async methods take `&mut self`: the sink is
/// `Send` but not `Sync`, so only a unique borrow may be held across an await.
pub struct Worker {
    spec: OutputSpec,
    sink: Box<dyn Sink>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    holder: String,
    timing: Timing,
    wake: NewPunches,
    /// The disabling (its `at_ms`) whose `output.disabled` notice this worker appended
    /// ([`super::notices`]).
    announced: Option<i64>,
}

/// What step 2 (module docs) produced.
enum Next {
    /// Deliver this (range end, and the state written with its in-flight record).
    Deliver(Box<(Delivery, u64, OutputState)>),
    /// No punch after the cursor: wait for new ones.
    Idle,
    /// The state changed (a write moved it, or failed): read it again.
    Again,
}

impl Worker {
    /// A worker for `spec` delivering through `sink`, as `holder` (this relay's id).
    pub fn new(
        spec: OutputSpec,
        sink: Box<dyn Sink>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        holder: String,
        timing: Timing,
        wake: NewPunches,
    ) -> Self {
        Worker {
            spec,
            sink,
            store,
            metrics,
            holder,
            timing,
            wake,
            announced: None,
        }
    }

    /// Runs until `cancel`: waits for the lease, delivers while it holds it, and waits
    /// again when it loses it. Gives the lease up at the end.
    pub async fn run(mut self, cancel: CancellationToken) {
        let name = self.spec.name.clone();
        loop {
            let Some(held) =
                lease::acquire(&self.store, &name, &self.holder, self.timing, &cancel).await
            else {
                break;
            };
            self.deliver_while(&held.token).await;
            held.stop().await;
            self.metrics.set_output_state(&name, None);
            if cancel.is_cancelled() {
                break;
            }
            tracing::warn!(output = %name, "lost the output's lease; waiting to take it again");
        }
        // Let another relay take over at once rather than after the lease runs out.
        let release = self.store.output_release(&name, &self.holder);
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), release).await {
            tracing::warn!(output = %name, error = %e.report(), "could not give up the output's lease");
        }
    }

    /// Sleeps `d`; false when `held` was cancelled first.
    async fn sleep(held: &CancellationToken, d: Duration) -> bool {
        tokio::select! {
            _ = held.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    fn store_failed(&self, what: &str, e: &StoreError) {
        tracing::warn!(output = %self.spec.name, error = %e.report(), "{what}; retrying");
    }

    /// Delivers until `held` is cancelled (module docs).
    async fn deliver_while(&mut self, held: &CancellationToken) {
        while !held.is_cancelled() {
            let state = match self.store.output_state(&self.spec.name).await {
                Ok(s) => s,
                Err(e) => {
                    self.store_failed("cannot read the output's state", &e);
                    Self::sleep(held, STORE_RETRY).await;
                    continue;
                }
            };
            self.metrics
                .set_output_state(&self.spec.name, Some(state_name(&state)));
            if let Some(d) = &state.disabled {
                // Once per disabling and run; the store keeps one per key (notices docs).
                if self.announced != Some(d.at_ms) {
                    let notice = notices::disabled(&self.spec.name, d, state.failing_since_ms);
                    match self.store.append_notice(notice).await {
                        Ok(_) => self.announced = Some(d.at_ms),
                        Err(e) => self.store_failed("cannot store the output.disabled notice", &e),
                    }
                }
                Self::sleep(held, STATE_POLL).await;
                continue;
            }
            if let Some(at) = state.next_attempt_ms {
                let wait = at.saturating_sub(now_ms());
                if wait > 0 {
                    let wait = Duration::from_millis(wait as u64).min(STATE_POLL);
                    Self::sleep(held, wait).await;
                    continue;
                }
            }
            match self.next(state).await {
                Ok(Next::Deliver(next)) => {
                    let (d, through, state) = *next;
                    self.attempt(held, d, through, state).await
                }
                Ok(Next::Idle) => {
                    tokio::select! {
                        _ = held.cancelled() => {}
                        _ = self.wake.wait() => {}
                    }
                }
                Ok(Next::Again) => {}
                Err(e) => {
                    self.store_failed("cannot prepare the next delivery", &e);
                    Self::sleep(held, STORE_RETRY).await;
                }
            }
        }
    }

    /// A compare-and-set write of `state` over version `expect`, as the lease holder.
    async fn write(
        &mut self,
        expect: u64,
        state: OutputState,
    ) -> Result<Option<OutputState>, StoreError> {
        self.store
            .output_write(
                &self.spec.name,
                OutputWrite {
                    holder: Some(self.holder.clone()),
                    expect_version: expect,
                    state,
                },
            )
            .await
    }

    /// Step 2 of the module docs.
    async fn next(&mut self, state: OutputState) -> Result<Next, StoreError> {
        let spec = &self.spec;
        if let Some(f) = state.in_flight.clone() {
            let rows =
                delivery::read_range(&*self.store, state.cursor, f.through, spec.batch_max).await?;
            let wanted_rows: Vec<_> = rows.iter().filter(|r| wanted(spec, r)).cloned().collect();
            let one_kind = wanted_rows
                .first()
                .is_some_and(|k| wanted_rows.iter().all(|r| kind_of(r) == kind_of(k)));
            if wanted_rows.len() == f.items as usize && one_kind {
                let d = delivery::rebuild(&f, wanted_rows);
                return Ok(Next::Deliver(Box::new((d, f.through, state))));
            }
            // Only a change of the output's sites or events between attempts gets here:
            // the range now holds other entries, so it is a new delivery, never the old id
            // with other items.
            tracing::warn!(
                output = %spec.name,
                delivery = %f.id,
                recorded = f.items,
                now = wanted_rows.len(),
                "the in-flight delivery's range holds another set of events now (were the output's sites or events changed?); sending it as a new delivery"
            );
            let Some((through, chosen)) = select(spec, rows) else {
                // The range is empty now: nothing to send, move past it.
                return self
                    .record(state, f.through, Vec::new(), f.id, now_ms())
                    .await;
            };
            let created_ms = now_ms();
            let id = format!("{}_c{created_ms}", f.id);
            return self.record(state, through, chosen, id, created_ms).await;
        }
        let rows = self
            .store
            .stream(StreamQuery {
                after: state.cursor,
                through: None,
                limit: spec.batch_max,
            })
            .await?;
        let Some(first) = rows.first().map(|r| r.cursor) else {
            return Ok(Next::Idle);
        };
        let Some((through, chosen)) = select(spec, rows) else {
            return Ok(Next::Idle);
        };
        let id = delivery_id(&spec.name, first, through, state.replays);
        self.record(state, through, chosen, id, now_ms()).await
    }

    /// Records the delivery of `rows` (range end `through`) as in flight, before its first
    /// attempt; with no rows, moves the cursor past the range instead.
    async fn record(
        &mut self,
        state: OutputState,
        through: u64,
        rows: Vec<StreamRow>,
        id: String,
        created_ms: i64,
    ) -> Result<Next, StoreError> {
        let expect = state.version;
        if rows.is_empty() {
            let skipped = OutputState {
                cursor: Some(through),
                in_flight: None,
                ..state
            };
            self.write(expect, skipped).await?;
            return Ok(Next::Again);
        }
        let f = InFlight {
            id,
            through,
            created_ms,
            items: rows.len() as u32,
            uncorrected: rows
                .iter()
                .filter(|r| matches!(&r.item, StreamItem::Punch(p) if p.corrected_ms.is_none()))
                .map(|r| r.cursor)
                .collect(),
        };
        let d = delivery::rebuild(&f, rows);
        let recorded = OutputState {
            in_flight: Some(f),
            ..state
        };
        Ok(match self.write(expect, recorded).await? {
            Some(state) => Next::Deliver(Box::new((d, through, state))),
            None => Next::Again,
        })
    }

    /// Step 3 of the module docs: one attempt and its outcome, written.
    async fn attempt(
        &mut self,
        held: &CancellationToken,
        d: Delivery,
        through: u64,
        state: OutputState,
    ) {
        let result = tokio::select! {
            // Abandoned: the in-flight record makes the next worker send it again.
            _ = held.cancelled() => return,
            r = self.sink.deliver(&d) => r,
        };
        let name = self.spec.name.clone();
        let label = OutputLabel {
            output: name.clone(),
        };
        let now = now_ms();
        let expect = state.version;
        let new = match result {
            Ok(()) => {
                self.metrics.output_deliveries.get_or_create(&label).inc();
                self.metrics
                    .output_punches
                    .get_or_create(&label)
                    .inc_by(d.items.len() as u64);
                tracing::debug!(output = %name, delivery = %d.id, items = d.items.len(), "delivered");
                OutputState {
                    cursor: Some(through),
                    in_flight: None,
                    failures: 0,
                    failing_since_ms: None,
                    last_success_ms: Some(now),
                    last_error: None,
                    next_attempt_ms: None,
                    ..state
                }
            }
            Err(e) => self.failed(&d, e, state, now),
        };
        loop {
            match self.write(expect, new.clone()).await {
                // Written, or the state moved meanwhile (a replay, an enable, the lease
                // lost): the loop reads it again either way.
                Ok(_) => return,
                Err(e) => {
                    self.store_failed("cannot record the delivery's outcome", &e);
                    if !Self::sleep(held, STORE_RETRY).await {
                        return;
                    }
                }
            }
        }
    }

    /// The state after a failed attempt.
    fn failed(&self, d: &Delivery, e: SinkError, state: OutputState, now: i64) -> OutputState {
        let name = &self.spec.name;
        let failures = state.failures.saturating_add(1);
        let since = state.failing_since_ms.unwrap_or(now);
        let (kind, reason, wait, gone) = match e {
            SinkError::Retry {
                reason,
                retry_after,
            } => {
                let wait = retry_after.unwrap_or_else(|| jitter(self.sink.retry_delay(failures)));
                ("retry", reason, wait, false)
            }
            SinkError::Gone { reason } => ("gone", reason, Duration::ZERO, true),
        };
        self.metrics
            .output_failures
            .get_or_create(&OutputKind {
                output: name.clone(),
                kind,
            })
            .inc();
        let failing_for = Duration::from_millis(now.saturating_sub(since).max(0) as u64);
        let disabled = if gone {
            Some(format!(
                "the receiver refused all further deliveries: {reason}"
            ))
        } else if failing_for >= self.spec.disable_after {
            Some(format!(
                "failing continuously for {} s (disable_after_secs = {}); last error: {reason}",
                failing_for.as_secs(),
                self.spec.disable_after.as_secs()
            ))
        } else {
            None
        };
        let disabled = disabled.map(|why| {
            tracing::error!(
                output = %name,
                delivery = %d.id,
                reason = %why,
                "output disabled; `POST /v1/outputs/{name}/enable` resumes it with the same delivery"
            );
            self.metrics
                .output_disables
                .get_or_create(&OutputLabel {
                    output: name.clone(),
                })
                .inc();
            Disabled {
                reason: why,
                at_ms: now,
            }
        });
        if disabled.is_none() {
            tracing::warn!(
                output = %name,
                delivery = %d.id,
                failures,
                retry_in_ms = wait.as_millis() as u64,
                error = %reason,
                "delivery failed; will retry"
            );
        }
        let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
        OutputState {
            disabled,
            failures,
            failing_since_ms: Some(since),
            last_error: Some(reason),
            next_attempt_ms: Some(now.saturating_add(wait_ms)),
            ..state
        }
    }
}
