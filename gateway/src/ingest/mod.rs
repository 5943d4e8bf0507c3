//! Ingest: the ways punches reach the gateway.
//!
//! Each path parses and validates device input, stamps it with [`crate::clock`], submits it
//! to the [`crate::committer`] and answers the device only after the outcome is known
//! (accepted and fsynced, duplicate, or rejected with a code).
//!
//! - `http`: `POST /v1/punches`, JSON or CBOR, bearer-token devices.
//! - `adms`: ZKTeco terminals pushing over the "iclock" protocol.
//! - `mqtt`: devices publishing on `outpost/v1/{site}/{device}/punch`, embedded broker by default.
//! - `punch_body`: the punch codec HTTP and MQTT share (JSON or CBOR bodies, per-punch results).
pub mod adms;
pub mod http;
pub mod mqtt;
pub mod punch_body;
