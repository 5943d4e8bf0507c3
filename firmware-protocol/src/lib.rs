//! # outpost-protocol
//!
//! The wire types and codecs shared by clock-in devices, the Outpost gateway and the cloud
//! relay. The core is `#![no_std]` and allocation-free so that microcontroller firmware can
//! use it; the `alloc` feature adds heap-backed types ([`Batch`]) and the `std` feature
//! (on by default) adds the JSON form of a punch and the uplink frame codec.
//!
//! ## Messages
//!
//! | type | who sends it | to whom |
//! |---|---|---|
//! | [`Punch`] | device | gateway (MQTT, HTTP) |
//! | [`DeviceAck`] | gateway | device, one per punch |
//! | [`Record`] | — | the gateway journal: a punch plus the gateway's stamp |
//! | [`Batch`] (alloc) | gateway | relay, inside an uplink frame |
//! | [`Ack`] | relay | gateway |
//! | [`TimeAnchor`] | gateway | relay, inside a batch |
//!
//! ## Encoding contract
//!
//! Everything is CBOR (RFC 8949) encoded as **arrays indexed by explicit field numbers**
//! (`#[n(k)]` below). A decoder ignores fields it does not know, and optional fields may be
//! absent (`null` or missing at the end), so fields can be added without breaking old peers.
//! The field numbers are a public contract: the golden vectors in `tests/vectors/` pin them
//! byte for byte, so firmware written in C can check its own encoder.
//!
//! The exception is [`Batch`], the bulk of the uplink: it has a columnar layout of small
//! deltas, documented in [`batch`], which with zstd takes about 8 bytes per punch.
//!
//! Encoding into a caller's buffer works without `alloc`: see [`cbor::encode_to_slice`].
//!
//! ## Limits
//!
//! Identifiers are 1 to [`MAX_ID_LEN`] bytes of UTF-8 with no control characters. Device and
//! site identifiers are also MQTT topic segments, so they may not contain `/`, `+` or `#`.
//! Times are Unix milliseconds between [`MIN_TIME_MS`] (2000-01-01) and [`MAX_TIME_MS`]
//! (2100-01-01); UTC offsets are within ±18 hours. Decoding never panics on any input; use
//! [`Punch::validate`] to apply the semantic limits after decoding.
//!
//! ## For firmware authors
//!
//! A device talks to the gateway over MQTT: it publishes each punch as CBOR to
//! `outpost/v1/{site}/{device}/punch` ([`topic`]) and receives one [`DeviceAck`] per punch on
//! `outpost/v1/{site}/{device}/ack`. Delivery is at least once: the device keeps every punch
//! until an ack settles it, and resends otherwise; the gateway recognises a resend by
//! `(device_id, device_seq)` and answers `duplicate`. [`outbox::Outbox`] is that state
//! machine, with no heap and no clock of its own. The contract:
//!
//! 1. **`device_seq` never goes backwards**, not even across a reboot or a firmware update:
//!    a reused number makes the gateway answer `duplicate` for a *new* punch, which is then
//!    lost. Persist [`outbox::Outbox::next_seq`] to flash before the punch that used the
//!    previous value is sent (or reserve blocks: store `next_seq + 100` once every 100
//!    punches, and start from the stored value after a reboot, skipping the gap). Numbers
//!    stay below 2^63.
//! 2. **Keep unacknowledged punches** across power loss if the device has storage: save
//!    each pushed punch and put it back with [`outbox::Outbox::restore`] at boot.
//! 3. **Drop a punch only when an ack names its `device_seq` and [`DeviceAck::settles`]**:
//!    accepted, duplicate, or a permanent rejection (log those: the punch was invalid). For
//!    `storage_full`, `rate_limited`, `unavailable`, `internal` or `unauthorized`, keep it
//!    and wait: the outbox pauses and retries later, with a longer backoff.
//! 4. **When the outbox is full, refuse new badges** (beep, show an error) rather than
//!    overwrite old punches; [`outbox::Outbox::push`] never overwrites.
//! 5. Pass a monotonic millisecond clock as `now_ms` and a fresh random `u32` for jitter, so
//!    a hundred devices that lost the gateway together do not all retry in the same second.
//!
//! ```
//! use outpost_protocol::outbox::{AckOutcome, Backoff, Outbox};
//! use outpost_protocol::{cbor, DeviceAck, Id, Punch, PunchKind, VerifyMethod};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // At boot: the counter saved in flash (and any unacked punches, via `restore`).
//! let saved_next_seq = 1_000;
//! let mut outbox: Outbox<32> = Outbox::new(saved_next_seq, Backoff::DEFAULT);
//! let mut now_ms = 0; // a monotonic clock
//!
//! // A badge is read: queue the punch; the outbox numbers it.
//! let punch = Punch {
//!     device_id: Id::new("door-1")?,
//!     device_seq: 0, // assigned by push
//!     subject_id: Id::new("EMP-0042")?,
//!     kind: PunchKind::In,
//!     verify: VerifyMethod::Card,
//!     device_time_ms: 1_795_327_083_000,
//!     utc_offset_min: Some(120),
//! };
//! let seq = outbox.push(punch, now_ms)?;
//! assert_eq!(seq, 1_000);
//! // ... persist outbox.next_seq() (1001) to flash here ...
//!
//! // The send loop: publish whatever is due, then record the attempt.
//! let mut buf = [0u8; 256];
//! while let Some(p) = outbox.next_due(now_ms) {
//!     let len = cbor::encode_to_slice(&p, &mut buf)?;
//!     // mqtt.publish("outpost/v1/HC001/door-1/punch", &buf[..len]);
//!     # let _ = len;
//!     outbox.mark_sent(p.device_seq, now_ms, 0x5eed /* a random u32 */);
//! }
//!
//! // An ack arrives on outpost/v1/HC001/door-1/ack.
//! now_ms += 40;
//! let payload = cbor::to_vec(&DeviceAck::accepted(1_000, 17)); // what the gateway sent
//! let ack: DeviceAck = cbor::decode_exact(&payload)?;
//! match outbox.on_ack(&ack, now_ms, 0x1234) {
//!     AckOutcome::Delivered(_) => {} // gone from the outbox; delete it from flash too
//!     AckOutcome::Refused(code) => println!("punch {} refused: {code}", ack.device_seq),
//!     AckOutcome::Deferred { until_ms } => println!("gateway busy until {until_ms}"),
//!     AckOutcome::Unknown => {} // a late ack for a punch already settled
//! }
//! assert!(outbox.is_empty());
//! // Sleep until outbox.next_wake_ms() or the next badge, whichever comes first.
//! # Ok(())
//! # }
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod ack;
pub mod batch;
pub mod cbor;
pub mod id;
pub mod outbox;
pub mod punch;
pub mod record;
pub mod seq;
pub mod topic;

#[cfg(feature = "std")]
pub mod frame;
#[cfg(feature = "std")]
pub mod json;

pub use ack::{AckStatus, DeviceAck, RejectCode};
#[cfg(feature = "alloc")]
pub use batch::Batch;
pub use batch::{Ack, TimeAnchor};
pub use id::{Id, IdError, MAX_ID_LEN};
pub use punch::{Punch, PunchError, PunchKind, VerifyMethod, MAX_TIME_MS, MIN_TIME_MS};
pub use record::{BootId, Received, Record, Source};
