//! The Outpost site gateway.
//!
//! ```text
//! devices ─HTTP/MQTT/ADMS─► ingest ─► committer ─► journal (sled) ─► uplink ─► relay
//!                             ▲  ack after fsync  │
//!                             └───────────────────┘
//! ```
//!
//! Each box runs a few long-lived tasks that own their state and talk over bounded
//! channels, with one [`tokio_util::sync::CancellationToken`] for shutdown:
//!
//! - `ingest::*` parse and validate device input, stamp it ([`clock`]), hand it to the
//!   committer and wait for the outcome before answering the device.
//! - [`committer`] groups every waiting request into one journal write and one fsync.
//! - [`journal`] is the durable store: dense `gateway_seq`, dedup, quota, trim on relay ack.
pub mod admin_client;
pub mod auth;
pub mod clock;
pub mod committer;
pub mod config;
pub mod daemon;
pub mod export;
pub mod ingest;
pub mod journal;
pub mod metrics;
pub mod ratelimit;
pub mod status;
pub mod uplink;

#[cfg(test)]
mod test_pki;
