//! The uplink: forwards the journal to the relay, exactly once at the store.
//!
//! ```text
//! journal ──read durable records──► batcher ──frame──► link (WebSocket | HTTPS POST) ──► relay
//!    ▲                                                     │
//!    └──────────── trim_through(ack) ◄──── ack (in order) ─┘
//! ```
//!
//! # Delivery contract
//!
//! - A session starts at the journal's oldest unacknowledged record
//!   ([`Journal::first_unacked`](crate::journal::Journal::first_unacked)) and walks forward
//!   with a cursor, cutting batches by count, bytes and age ([`batcher`]). Up to
//!   `uplink.window` batches are in flight at once, so a link with a round trip of seconds
//!   stays busy.
//! - Acks come back in send order ([`link`]), so the n-th ack answers the n-th batch. The
//!   relay acks only after its store committed the whole batch, so an ack proves its batch
//!   is stored, and every earlier batch of the session was acked before it. The journal is
//!   trimmed through `max(ack.acked_through, last seq of the batch)` (capped at the highest
//!   seq ever sent). The batch end matters when the relay's contiguous watermark is held
//!   back by records that no longer exist here (evicted with `on_full = "drop_oldest"`).
//! - Anything else (a refused frame, a lost connection, a ping or ack timeout, a restart of
//!   either side) ends the session. Nothing is trimmed without an ack, so the next session
//!   resends every unacknowledged record, and the relay recognises what it already had:
//!   at-least-once on the wire, exactly-once in the store.
//! - Ingest never waits for the uplink: this task only reads the journal and trims it, on
//!   the blocking pool, and a dead relay just lets the backlog grow (bounded by
//!   `journal.max_bytes`).
//!
//! # Health
//!
//! [`Health`]: `offline` (no relay configured, or stopped), `connecting`, `online` (caught
//! up), `draining` (connected with more than one batch waiting) and `backing_off` (waiting
//! after a failure: exponential with jitter, [`outpost_ops::backoff`]). The state, backlog, oldest
//! unsent age, last success, last error and bytes sent are in `/v1/status` and `/metrics`.
//! With several relays, a failed attempt moves to the next one; a relay that worked is
//! retried first.
//!
//! # Time
//!
//! Each ack yields a time anchor ([`anchors`]); batches carry the anchors of their records'
//! boots, and when the relay has not yet heard of a (much better) anchor and there is
//! nothing else to send, an anchor-only batch goes out, so records sent before the first
//! ack get corrected too.
//!
//! # Files
//!
//! - [`session`]: the delivery rules as a state machine with no I/O (what to read, send,
//!   trim, and when), so tests drive it step by step.
//! - `task`: [`spawn`], the reconnect loop with backoff, the refresher and the trimmer.
//! - `connection`: one connection; opens the link and performs what the session decides.
//! - [`status`]: [`Health`] and the handle behind `/v1/status` and `/metrics`.
//! - `token`: the relay token. [`batcher`], [`anchors`], [`link`] and its transports
//!   ([`ws`], [`https`], [`tls`]) and [`config`] as named.

pub mod anchors;
pub mod batcher;
pub mod config;
mod connection;
pub mod https;
pub mod link;
pub mod session;
pub mod status;
mod task;
pub mod tls;
mod token;
pub mod ws;

pub use config::{Transport, UplinkConfig};
pub use link::{Endpoint, Link, LinkError};
pub use status::{Health, UplinkHandle};
pub use task::{spawn, StartError, UplinkContext};
pub use token::TOKEN_ENV;
