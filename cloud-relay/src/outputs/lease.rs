//! Which relay runs an output: waiting for the lease, and keeping it.
//!
//! With PostgreSQL the lease is a row with an expiry by the database clock (the store's
//! `postgres/outputs.rs` says why). From `outputs.lease_timeout_secs` = T:
//!
//! - the lease is taken for ¾ T ([`Timing::length`]);
//! - the holder renews it every ¼ T ([`Timing::renew_every`]);
//! - the holder stops delivering (cancels [`Held::token`], which abandons an attempt in
//!   progress) once ½ T has passed since it *sent* its last successful renewal
//!   ([`Timing::stop_after`]); the database set that renewal's expiry to at least ¾ T
//!   after the send, so the holder has stopped ¼ T before anyone else can take over;
//! - a relay that waits for the lease asks every ⅛ T ([`Timing::poll`]).
//!
//! So when the holder dies, another relay takes over at most ¾ T + ⅛ T after its last
//! renewal: within T. Even if a holder were late to stop (a paused process), every state
//! write checks the lease in the same statement, so it cannot move the cursor once the
//! lease is gone; a delivery it still had on the wire is the same delivery (same id,
//! same items) the new holder sends, which the receiver drops by id.
//!
//! The embedded store grants [`LeaseGrant::Always`]: nothing to renew.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::store::{LeaseGrant, Store};

/// The lease's times, from `outputs.lease_timeout_secs` (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease is taken for.
    pub length: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
    /// How long after the send of its last successful renewal the holder stops.
    pub stop_after: Duration,
    /// How often a relay without the lease asks for it.
    pub poll: Duration,
}

impl Timing {
    /// The times for a takeover within `lease_timeout`.
    pub fn new(lease_timeout: Duration) -> Self {
        Timing {
            length: lease_timeout * 3 / 4,
            renew_every: lease_timeout / 4,
            stop_after: lease_timeout / 2,
            poll: lease_timeout / 8,
        }
    }
}

/// A held lease: `token` is cancelled when it is lost (or at shutdown). Dropping it
/// (the worker's task ended or was aborted) stops the renewals too, so a dead worker
/// never keeps its output's lease alive.
pub struct Held {
    /// Cancelled when the lease is lost or the relay stops; deliveries stop with it.
    pub token: CancellationToken,
    _stop_renewing: DropGuard,
    renewer: Option<JoinHandle<()>>,
}

impl Held {
    fn new(token: CancellationToken, renewer: Option<JoinHandle<()>>) -> Held {
        Held {
            _stop_renewing: token.clone().drop_guard(),
            token,
            renewer,
        }
    }
}

impl Held {
    /// Stops renewing (and delivering under this lease).
    pub async fn stop(self) {
        self.token.cancel();
        if let Some(r) = self.renewer {
            let _ = r.await;
        }
    }
}

/// Waits until this relay (`holder`) holds output `name`'s lease; `None` when `cancel`
/// fired first.
pub async fn acquire(
    store: &Arc<dyn Store>,
    name: &str,
    holder: &str,
    timing: Timing,
    cancel: &CancellationToken,
) -> Option<Held> {
    let mut reported: Option<String> = None;
    loop {
        if cancel.is_cancelled() {
            return None;
        }
        let sent = Instant::now();
        match store.output_lease(name, holder, timing.length).await {
            Ok(LeaseGrant::Always) => return Some(Held::new(cancel.child_token(), None)),
            Ok(LeaseGrant::Held) => {
                tracing::info!(output = name, holder, "took the output's lease");
                let token = cancel.child_token();
                let renewer = tokio::spawn(renew(
                    store.clone(),
                    name.to_string(),
                    holder.to_string(),
                    timing,
                    sent,
                    token.clone(),
                ));
                return Some(Held::new(token, Some(renewer)));
            }
            Ok(LeaseGrant::Busy { holder: other }) => {
                if reported.as_deref() != Some(other.as_str()) {
                    tracing::info!(
                        output = name,
                        holder = %other,
                        "another relay runs this output; taking over if its lease runs out"
                    );
                    reported = Some(other);
                }
            }
            Err(e) => {
                tracing::warn!(output = name, error = %e.report(), "cannot ask for the output's lease");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(timing.poll) => {}
        }
    }
}

/// Renews the lease until `token` is cancelled; cancels it when the lease is lost or
/// could not be renewed in time (module docs).
async fn renew(
    store: Arc<dyn Store>,
    name: String,
    holder: String,
    timing: Timing,
    mut last_ok: Instant,
    token: CancellationToken,
) {
    let mut next = last_ok + timing.renew_every;
    loop {
        let stop_at = last_ok + timing.stop_after;
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep_until(next.min(stop_at)) => {}
        }
        if Instant::now() >= stop_at {
            tracing::error!(
                output = %name,
                "could not renew the output's lease in time; stopping its deliveries"
            );
            token.cancel();
            return;
        }
        let sent = Instant::now();
        let answer = tokio::select! {
            _ = token.cancelled() => return,
            a = tokio::time::timeout_at(stop_at, store.output_lease(&name, &holder, timing.length)) => a,
        };
        match answer {
            Ok(Ok(LeaseGrant::Held | LeaseGrant::Always)) => {
                last_ok = sent;
                next = sent + timing.renew_every;
            }
            Ok(Ok(LeaseGrant::Busy { holder: other })) => {
                tracing::error!(output = %name, holder = %other, "lost the output's lease to another relay; stopping its deliveries");
                token.cancel();
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(output = %name, error = %e.report(), "cannot renew the output's lease; retrying");
                next = Instant::now() + timing.poll;
            }
            // Timed out at stop_at: the top of the loop stops.
            Err(_) => next = stop_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_stops_before_anyone_can_take_over() {
        let t = Timing::new(Duration::from_secs(15));
        assert!(t.stop_after < t.length);
        assert!(t.renew_every < t.stop_after);
        assert!(t.length + t.poll <= Duration::from_secs(15));
    }
}
