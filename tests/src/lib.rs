//! Shared helpers for Outpost's end-to-end tests and benchmarks.
pub mod gateway;
pub mod mosquitto;
pub mod nats;
pub mod pki;
pub mod postgres;
pub mod powercut;
pub mod proc;
pub mod proxy;
pub mod relay;
pub mod seed;
pub mod webhook;
pub mod workload;
