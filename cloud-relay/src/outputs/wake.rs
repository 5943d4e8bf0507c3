//! How an idle worker learns that new punches may have been stored.
//!
//! For now by polling: [`NewPunches::wait`] returns after a short interval
//! (`SupervisorSettings::poll`), and the worker reads after its cursor again. This is the
//! one place to swap for a store notification (a `watch` of the newest cursor, PostgreSQL
//! `LISTEN/NOTIFY`) without touching the worker: `wait` must return when punches may have
//! arrived, and may return early.

use std::time::Duration;

/// The idle wait of one worker.
#[derive(Debug, Clone)]
pub struct NewPunches {
    poll: Duration,
}

impl NewPunches {
    /// Polls every `poll`.
    pub fn new(poll: Duration) -> Self {
        NewPunches { poll }
    }

    /// Returns when new punches may have been stored.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.poll).await;
    }
}
