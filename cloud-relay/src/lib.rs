//! The Outpost cloud relay: receives batches from gateways, stores every punch exactly
//! once, and serves them to the systems that need them.
//!
//! - [`config`]: the TOML configuration with `OUTPOST_*` overrides.
//! - [`auth`]: gateway tokens (hashes in a file, reloaded live), read tokens and their site
//!   scopes, and the admin token; [`access`]: the read API's gate (who calls, which sites).
//! - [`store`]: the storage trait and its sled and PostgreSQL implementations.
//! - [`intake`]: `POST /v1/batches` and the `/v1/uplink` WebSocket.
//! - [`app`]: routes, query API, health, metrics; [`metrics`]: the Prometheus metrics.
//! - [`state`]: what the handlers share; [`error`]: the JSON error body.
//! - [`server`]: TLS, connections, graceful shutdown, `run`.
//! - [`outputs`]: every stored punch handed on to webhooks and NATS, in cursor order.
//! - [`admin_client`]: the CLI's client for the running relay's API.
//!
//! No module imports one that imports it back: `state`, `error`, `access` and
//! `auth::ClientCert` are the shared pieces that `app`, `intake` and `server` all use (the wall clock is
//! `outpost_ops::time::now_ms`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod admin_client;
pub mod app;
pub mod auth;
pub mod config;
pub mod error;
pub mod intake;
pub mod metrics;
pub mod outputs;
pub mod server;
pub mod state;
pub mod store;
