//! ZKTeco terminals pushing over the ADMS / "iclock" protocol (PUSH SDK).
//!
//! Most biometric and RFID attendance terminals in clinics and schools are ZKTeco units or
//! rebadged copies (eSSL and others). Pointed at the gateway ("Cloud Server Setting"), they
//! push their punches over plain HTTP:
//!
//! ```text
//! terminal                                   gateway
//! GET  /iclock/cdata?SN=X&options=all&pushver=2.4.1 ─► option text: stamps, delays, TimeZone
//! POST /iclock/cdata?SN=X&table=ATTLOG&Stamp=N      ─► parse ─► committer (fsync) ─► "OK: n"
//!      body: PIN\tYYYY-MM-DD HH:MM:SS\tstatus\tverify\tworkcode\t…  (one punch per line)
//! POST /iclock/cdata?SN=X&table=OPERLOG&…           ─► "OK" (ignored or logged)
//! GET  /iclock/getrequest?SN=X   (every Delay s)    ─► "OK" (no commands)
//! POST /iclock/devicecmd?SN=X                       ─► "OK"
//! GET  /iclock/ping?SN=X                            ─► "OK"
//! ```
//!
//! Invariants:
//! - `OK: <n>` is sent only after every punch of the upload is durably in the journal (or
//!   was already there). If the journal refuses (full, shutting down), the reply is an
//!   error status (507, 503 or 500): the terminal keeps its records and retries after
//!   `ErrorDelay`. Punches stored before the refusal come back as duplicates.
//! - Terminals resend after a missing OK and after a stamp reset; a resent line has the
//!   same derived `device_seq` ([`parse`]) and is a duplicate, never a second punch.
//! - A line that cannot be a punch is skipped, logged and counted, and never fails the
//!   upload. Bodies larger than `adms.max_body_bytes` get 413.
//! - The stamp of an upload is saved only after its commit ([`stamps`]), so a restarted
//!   gateway hands back the right `Stamp` in the handshake.
//! - Unknown serial numbers are refused with 403 (or accepted, `adms.unknown_devices`),
//!   logged once per serial number.
//! - Every response has a `Date` header with the true time as far as the gateway knows it
//!   (its clock when synchronised, else the relay's time from the uplink): terminals set
//!   their clocks from it, combined with the `TimeZone` of the handshake.

pub mod config;
pub mod handshake;
pub mod parse;
mod routes;
pub mod stamps;
mod state;

pub use config::{AdmsConfig, AdmsDevice, OtherTables, UnknownDevices, UtcOffset};
pub use routes::{http_date, router};
pub use state::{AdmsState, TerminalStatus, MAX_UNLISTED};
