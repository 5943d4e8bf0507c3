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
//! | [`config`] | the `[outputs]` section: keys, defaults, validation |
//! | [`sink`] | what a receiver kind implements, and the items it is given |
//! | [`nats`] | the NATS JetStream kind: one message per punch, `Nats-Msg-Id` = its id |
//! | [`webhook`] | the webhook receiver kind: signed Standard Webhooks calls, SSRF guard |

pub mod config;
pub mod nats;
pub mod sink;
pub mod webhook;
