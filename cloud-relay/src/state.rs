//! The state every HTTP handler shares.
//!
//! It lives in its own module, not in `app` (the routes) or `intake` (the batch handlers),
//! so that both can use it without importing each other, and `server` can build it without
//! reaching into either.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::readers::ReaderCreds;
use outpost_ops::token::AdminToken;

use crate::auth::GatewayCreds;
use crate::config::LimitsSection;
use crate::metrics::Metrics;
use crate::outputs::supervisor::OutputSpec;
use crate::store::Store;

/// Everything the handlers share.
pub struct AppState {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Live gateway credentials.
    pub creds: GatewayCreds,
    /// Live read tokens (query API only).
    pub readers: ReaderCreds,
    /// The admin token.
    pub admin: AdminToken,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// `[limits]`.
    pub limits: LimitsSection,
    /// Slots for batches being decoded or committed.
    pub batch_slots: Arc<Semaphore>,
    /// Cancelled at shutdown.
    pub cancel: CancellationToken,
    /// Commits and WebSockets that shutdown waits for.
    pub tracker: TaskTracker,
    /// The outputs this relay runs (`GET /v1/outputs`).
    pub outputs: Vec<OutputSpec>,
}

impl AppState {
    /// State for `store` with the given credentials, token, limits and outputs.
    pub fn new(
        store: Arc<dyn Store>,
        creds: GatewayCreds,
        readers: ReaderCreds,
        admin: AdminToken,
        limits: LimitsSection,
        cancel: CancellationToken,
        outputs: Vec<OutputSpec>,
    ) -> Arc<AppState> {
        Arc::new(AppState {
            store,
            creds,
            readers,
            admin,
            metrics: Arc::new(Metrics::new()),
            batch_slots: Arc::new(Semaphore::new(limits.max_concurrent_batches)),
            limits,
            cancel,
            tracker: TaskTracker::new(),
            outputs,
        })
    }
}
