//! How an idle worker learns that new punches may have been stored.
//!
//! The store's [`crate::store::Store::subscribe`] watch changes when new punches may have
//! become visible (in-process after a sled commit; PostgreSQL `LISTEN/NOTIFY` from any
//! relay). [`NewPunches::wait`] returns on that change, or after a fallback interval so a
//! lost notification only delays a delivery; the worker then reads after its cursor again.

use std::time::Duration;

use tokio::sync::watch;

/// The idle wait of one worker.
#[derive(Debug, Clone)]
pub struct NewPunches {
    poll: Duration,
    head: Option<watch::Receiver<u64>>,
}

impl NewPunches {
    /// Polls every `poll`, with no notification (tests).
    pub fn new(poll: Duration) -> Self {
        NewPunches { poll, head: None }
    }

    /// Wakes on `head` (from `Store::subscribe`), and at the latest after `fallback`.
    pub fn subscribed(head: watch::Receiver<u64>, fallback: Duration) -> Self {
        NewPunches {
            poll: fallback,
            head: Some(head),
        }
    }

    /// Returns when new punches may have been stored.
    pub async fn wait(&mut self) {
        match &mut self.head {
            Some(rx) => {
                tokio::select! {
                    changed = rx.changed() => {
                        // A closed watch (store shut down) must not spin: fall back to polling.
                        if changed.is_err() {
                            self.head = None;
                            tokio::time::sleep(self.poll).await;
                        }
                    }
                    _ = tokio::time::sleep(self.poll) => {}
                }
            }
            None => tokio::time::sleep(self.poll).await,
        }
    }
}
