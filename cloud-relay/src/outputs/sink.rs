//! What one kind of receiver (webhook, NATS JetStream) implements, and what it is given.
//!
//! The output worker owns the cursor, the in-flight range, retries and disabling; a
//! [`Sink`] only delivers one [`Delivery`] and says how that went. A delivery is fixed once
//! it has been attempted: every retry, also after a crash or on another relay, hands the
//! sink the same items in the same order with the same [`Delivery::id`] and
//! [`Delivery::created_ms`], so a webhook body is byte-for-byte the same on every retry.

use std::time::Duration;

use serde_json::{Map, Value};

use super::config::EventKind;
use crate::store::BoxFuture;

/// One event to deliver: a punch, a conflict, a rejected record or a relay notice.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Its stable identity (`outputs::delivery::item`): the same event always has the
    /// same id.
    pub id: String,
    /// Its position in the store's commit order.
    pub cursor: u64,
    /// Its site (`_relay` for a relay notice).
    pub site: String,
    /// Its device (`_` for a relay notice).
    pub device: String,
    /// Its JSON (e.g. the punch JSON of `GET /v1/punches`) plus `"id"` and `"cursor"`.
    pub json: Map<String, Value>,
}

/// One call's worth of punches, the same on every attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The stable id of this delivery (a webhook's `webhook-id`): derived from the output
    /// name and the cursor range, so a retry, a restart or another relay uses the same one.
    pub id: String,
    /// When the delivery was first attempted (relay clock, Unix ms): the body's timestamp.
    pub created_ms: i64,
    /// The one kind of all its items (a delivery is a run of one kind).
    pub kind: EventKind,
    /// The items, in cursor order; never empty.
    pub items: Vec<Item>,
}

/// Why a delivery did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Try again later. `retry_after` is the receiver's own wish (a 429 or 503 with
    /// `Retry-After`); when set the worker waits that long instead of its schedule.
    #[error("delivery failed, will retry: {reason}")]
    Retry {
        /// What went wrong (status, timeout, connection error), for logs and the API.
        reason: String,
        /// How long the receiver asked us to wait.
        retry_after: Option<Duration>,
    },
    /// The receiver said never again (a webhook's `410 Gone`): the worker disables the
    /// output until an admin enables it.
    #[error("receiver refused all further deliveries: {reason}")]
    Gone {
        /// What the receiver said.
        reason: String,
    },
}

/// A kind of receiver. The worker calls [`Sink::deliver`] with one delivery at a time.
pub trait Sink: Send + 'static {
    /// `"webhook"` or `"nats"`.
    fn kind(&self) -> &'static str;

    /// Delivers every item of `delivery`. `Ok` only when the receiver confirmed all of them
    /// (a partial success is a [`SinkError::Retry`]: the whole delivery is sent again, and
    /// the receiver drops what it has by id).
    fn deliver<'a>(&'a mut self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), SinkError>>;

    /// How long to wait before retry number `failures` (1 after the first failure), before
    /// jitter. Not called when the receiver gave a `retry_after`.
    fn retry_delay(&self, failures: u32) -> Duration;
}

/// The stable id of a punch: its punch key `site/device/device_seq`. Device ids cannot
/// contain `/`; a `/` or `%` in the site is percent-encoded so the id stays unambiguous.
pub fn punch_id(site: &str, device: &str, device_seq: u64) -> String {
    let mut id = String::with_capacity(site.len() + device.len() + 22);
    push_escaped(&mut id, site);
    id.push('/');
    id.push_str(device);
    id.push('/');
    id.push_str(&device_seq.to_string());
    id
}

/// Appends `s` with `%` and `/` percent-encoded, so it is one unambiguous id segment.
pub fn push_escaped(id: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '%' => id.push_str("%25"),
            '/' => id.push_str("%2F"),
            c => id.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punch_ids_are_unambiguous() {
        assert_eq!(punch_id("HC001", "door-1", 42), "HC001/door-1/42");
        assert_eq!(punch_id("a/b", "c", 1), "a%2Fb/c/1");
        assert_eq!(punch_id("a%2Fb", "c", 1), "a%252Fb/c/1");
        assert_ne!(punch_id("a/b", "c", 1), punch_id("a", "b/c", 1));
    }
}
