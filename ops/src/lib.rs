//! Operations code shared by the gateway (`outpost-gateway`) and the relay
//! (`outpost-relay`).
//!
//! Both daemons are run the same way, so the code that makes them so lives here once
//! instead of in two copies that drift apart:
//!
//! - [`addr`]: the address a daemon's CLI uses to reach it (wildcards become loopback).
//! - [`backoff`]: exponential backoff with jitter between connection attempts.
//! - [`bearer`](mod@bearer): the token of an `Authorization: Bearer` header.
//! - [`config`]: load a TOML file, apply `OUTPOST_<SECTION>__<KEY>` environment overrides
//!   ([`env`](mod@env)) and deserialise it into the daemon's typed config, with errors that
//!   name the key to change.
//! - [`file`](mod@file): write a credentials file atomically, and notice cheaply when the CLI
//!   (or a provisioning tool) has replaced it, so the running daemon reloads it without a
//!   restart.
//! - [`token`]: random bearer tokens, their SHA-256 (only hashes are stored), and the admin
//!   token ([`token::AdminToken`]) whose file is created at first start.
//! - [`reload`]: reloading a credentials file when it changes, keeping the previous
//!   contents when the new ones do not load.
//! - [`duration`]: durations in config files (`"250ms"`, `"45s"`, `"30m"`, `"12h"`, `"7d"`).
//! - [`logging`]: the `tracing` subscriber, plain text when stderr is not a terminal and
//!   without timestamps under journald.
//! - [`pem`]: certificate chains, private keys and CA files, with errors naming the file.
//! - [`pinned`]: a TLS verifier accepting exactly one certificate, by its SHA-256.
//! - [`signal`]: waiting for SIGTERM or SIGINT.
//! - [`sled`](mod@sled): opening sled while a just-closed handle still holds its lock.
//! - [`time`]: the wall clock as Unix milliseconds.
//!
//! Nothing protocol-related belongs here: the wire format is `outpost-protocol`, which
//! device firmware builds without `std`, and which does not depend on this crate.

pub mod addr;
pub mod backoff;
pub mod bearer;
pub mod config;
pub mod duration;
pub mod env;
pub mod file;
pub mod logging;
pub mod pem;
pub mod pinned;
pub mod reload;
pub mod signal;
pub mod sled;
pub mod time;
pub mod token;
