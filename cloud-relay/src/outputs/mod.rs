//! Outputs: every stored punch handed on, in cursor order, to the systems that need it.
//!
//! An output is declared in the relay config (`[[outputs.webhook]]`, `[[outputs.nats]]`,
//! [`config`]). Each has a durable cursor in the store. Its worker reads the punches after
//! the cursor, hands them to its [`sink::Sink`] as one [`sink::Delivery`], and moves the
//! cursor past them only after the receiver confirmed (a 2xx for a webhook, a JetStream
//! PubAck for NATS). One delivery is in flight per output, so a receiver sees punches in
//! the order they were stored. Every item carries a stable id ([`sink::punch_id`]), the same
//! after a crash, on a replay and on another relay, so a receiver can drop the rare resend.
//!
//! | file | job |
//! |---|---|
//! | [`build`] | from the config to one sink per output |
//! | [`config`] | the `[outputs]` section: keys, defaults, validation |
//! | [`sink`] | what a receiver kind implements, and the items it is given |
//! | [`nats`] | the NATS JetStream kind: one message per punch, `Nats-Msg-Id` = its id |
//! | [`webhook`] | the webhook receiver kind: signed Standard Webhooks calls, SSRF guard |
//! | [`supervisor`] | which outputs run: a worker per output, handed its sink |
//! | [`worker`] | one output's loop, and what happens to each punch on every failure |
//! | [`delivery`] | a delivery built from stored punches, the same on every attempt |
//! | [`notices`] | the relay's own events (an output disabled, enabled) for the other outputs |
//! | [`lease`] | which relay runs an output (PostgreSQL), and when it must stop |
//! | [`wake`] | how an idle worker learns of new punches |
//! | [`control`] | status, replay and enable, for the admin API |
//! | [`api`] | `GET /v1/outputs`, `POST /v1/outputs/{name}/replay` and `/enable` |
//! | [`table`] | `outpost-relay outputs`: the same, as a table |
//!
//! The durable state itself (cursor, in-flight delivery, health, lease) lives in the
//! store: [`crate::store::output_state`].

pub mod api;
pub mod build;
pub mod config;
pub mod control;
pub mod delivery;
pub mod lease;
pub mod nats;
pub mod notices;
pub mod sink;
pub mod supervisor;
pub mod table;
pub mod wake;
pub mod webhook;
pub mod worker;

#[cfg(test)]
mod tests;
