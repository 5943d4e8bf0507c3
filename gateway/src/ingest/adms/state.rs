//! The shared state of the ADMS endpoints: configuration, the committer, the clock, the
//! stamp store, and the per-terminal registry behind `/v1/status` and the metrics.
//!
//! The registry is bounded: configured terminals plus at most [`MAX_UNLISTED`] unlisted
//! ones (with `unknown_devices = "accept"`); further unlisted serials are refused. The set
//! of refused serials remembered for "log once" is bounded by [`MAX_REFUSED_LOGGED`].
//! Nothing a terminal sends can grow memory without bound.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use super::config::{AdmsConfig, UnknownDevices};
use super::parse::SkipReason;
use super::stamps::{StampError, StampStore};
use crate::clock::{Clock, RelayTime};
use crate::committer::CommitterHandle;
use crate::metrics::{Metrics, TerminalLabels, TerminalSkipLabels};

/// Most unlisted terminals tracked (and accepted) at once.
pub const MAX_UNLISTED: usize = 256;
/// Most refused serial numbers remembered to log each only once.
pub const MAX_REFUSED_LOGGED: usize = 1024;

/// One terminal as `/v1/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TerminalStatus {
    /// Serial number (as the terminal last sent it).
    pub serial: String,
    /// The device id its punches carry (`zk:<serial>`).
    pub device_id: String,
    /// `name` from `[adms.devices.<SN>]`.
    pub name: Option<String>,
    /// Listed under `[adms.devices]` (false: accepted by `unknown_devices = "accept"`).
    pub configured: bool,
    /// Last request of any kind (RFC 3339, by the gateway's clock); `null` if never seen.
    pub last_seen: Option<String>,
    /// Punches received and stored (new ones) since the gateway started.
    pub punches: u64,
    /// Punches received that the journal already held (resends).
    pub duplicates: u64,
    /// ATTLOG lines skipped since the gateway started.
    pub skipped: u64,
    /// The `pushver` the terminal announced, if any.
    pub push_version: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct Terminal {
    serial: String,
    name: Option<String>,
    configured: bool,
    last_seen_ms: Option<i64>,
    punches: u64,
    duplicates: u64,
    skipped: u64,
    push_version: Option<String>,
}

#[derive(Debug, Default)]
struct Registry {
    /// By upper-cased serial.
    terminals: BTreeMap<String, Terminal>,
    unlisted: usize,
    refused_logged: HashSet<String>,
    refused_overflow_logged: bool,
    unlisted_overflow_logged: bool,
}

/// Whether a terminal may talk to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Listed under `[adms.devices]`, or accepted as unlisted.
    Allowed,
    /// Refused (unlisted with `unknown_devices = "refuse"`, or too many unlisted).
    Refused,
}

/// Everything the `/iclock/*` handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AdmsState {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) config: AdmsConfig,
    pub(super) committer: CommitterHandle,
    pub(super) clock: Clock,
    /// The relay's time, for the `Date` header when our own clock is not synchronised.
    pub(super) relay_time: RelayTime,
    /// Whether "no trustworthy time for the Date header" was logged already.
    pub(super) untrusted_date_logged: std::sync::atomic::AtomicBool,
    pub(super) metrics: Metrics,
    pub(super) stamps: StampStore,
    registry: Mutex<Registry>,
}

impl AdmsState {
    /// Builds the state. `data_dir` is `gateway.data_dir`: the stamp file lives there
    /// (see [`super::stamps`]). `relay_time` is the uplink's view of the true time (see
    /// the `Date` header in [`super::routes`]). Fails only if an existing stamp file cannot
    /// be read.
    pub fn new(
        config: AdmsConfig,
        data_dir: &Path,
        committer: CommitterHandle,
        clock: Clock,
        relay_time: RelayTime,
        metrics: Metrics,
    ) -> Result<Self, StampError> {
        let stamps = StampStore::open(data_dir)?;
        let mut registry = Registry::default();
        for (sn, dev) in &config.devices {
            registry.terminals.insert(
                sn.to_ascii_uppercase(),
                Terminal {
                    serial: sn.clone(),
                    name: dev.name.clone(),
                    configured: true,
                    ..Terminal::default()
                },
            );
        }
        Ok(AdmsState {
            inner: Arc::new(Inner {
                config,
                committer,
                clock,
                relay_time,
                untrusted_date_logged: std::sync::atomic::AtomicBool::new(false),
                metrics,
                stamps,
                registry: Mutex::new(registry),
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &AdmsConfig {
        &self.inner.config
    }

    /// Every known terminal (configured ones even if never seen), by serial.
    pub fn terminals(&self) -> Vec<TerminalStatus> {
        let reg = self.registry();
        reg.terminals
            .values()
            .map(|t| TerminalStatus {
                serial: t.serial.clone(),
                device_id: format!("zk:{}", t.serial),
                name: t.name.clone(),
                configured: t.configured,
                last_seen: t.last_seen_ms.and_then(rfc3339),
                punches: t.punches,
                duplicates: t.duplicates,
                skipped: t.skipped,
                push_version: t.push_version.clone(),
            })
            .collect()
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding this lock cannot leave the counters inconsistent in a way
        // that matters; keep serving.
        self.inner
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Decides whether terminal `sn` (already syntax-checked) may talk to us, registers it
    /// and marks it seen. Refusals and first contacts of unlisted terminals are logged once
    /// per serial number.
    pub(super) fn admit(&self, sn: &str, push_version: Option<&str>) -> Admission {
        let key = sn.to_ascii_uppercase();
        let now_ms = self.inner.clock.wall_ms();
        let mut reg = self.registry();
        if !reg.terminals.contains_key(&key) {
            if self.inner.config.unknown_devices == UnknownDevices::Refuse {
                drop(reg);
                self.refused(sn, "it is not listed under [adms.devices]");
                return Admission::Refused;
            }
            if reg.unlisted >= MAX_UNLISTED {
                let first = !reg.unlisted_overflow_logged;
                reg.unlisted_overflow_logged = true;
                drop(reg);
                if first {
                    tracing::warn!(
                        limit = MAX_UNLISTED,
                        "too many unlisted ADMS terminals; refusing further ones: list them under [adms.devices]"
                    );
                }
                self.refused(sn, "too many unlisted terminals");
                return Admission::Refused;
            }
            reg.unlisted += 1;
            tracing::warn!(
                serial = sn,
                "accepting unlisted ADMS terminal (adms.unknown_devices = \"accept\"); \
                 add [adms.devices.{sn}] with its utc_offset to the config to pin its time zone"
            );
            reg.terminals.insert(
                key.clone(),
                Terminal {
                    serial: sn.to_string(),
                    ..Terminal::default()
                },
            );
        }
        if let Some(t) = reg.terminals.get_mut(&key) {
            t.serial = sn.to_string();
            t.last_seen_ms = Some(now_ms);
            if let Some(v) = push_version {
                if t.push_version.as_deref() != Some(v) {
                    t.push_version = Some(v.chars().take(32).collect());
                }
            }
        }
        drop(reg);
        self.inner
            .metrics
            .adms_last_seen
            .get_or_create(&TerminalLabels { serial: key })
            .set(now_ms / 1000);
        Admission::Allowed
    }

    fn refused(&self, sn: &str, why: &str) {
        self.inner.metrics.reject("adms_unknown_device");
        let mut reg = self.registry();
        let key = sn.to_ascii_uppercase();
        if reg.refused_logged.contains(&key) {
            return;
        }
        if reg.refused_logged.len() >= MAX_REFUSED_LOGGED {
            if !reg.refused_overflow_logged {
                reg.refused_overflow_logged = true;
                tracing::warn!(
                    "many refused ADMS terminals; further serial numbers are not logged one by one"
                );
            }
            return;
        }
        reg.refused_logged.insert(key);
        drop(reg);
        tracing::warn!(
            serial = sn,
            "refused ADMS terminal {sn}: {why}; add [adms.devices.{sn}] to the gateway config \
             (or set adms.unknown_devices = \"accept\"). Logged once per serial number."
        );
    }

    /// Counts the outcome of one upload for terminal `sn`.
    pub(super) fn record(
        &self,
        sn: &str,
        accepted: u64,
        duplicates: u64,
        skipped: &HashMap<SkipReason, u64>,
    ) {
        let key = sn.to_ascii_uppercase();
        let total_skipped: u64 = skipped.values().sum();
        {
            let mut reg = self.registry();
            if let Some(t) = reg.terminals.get_mut(&key) {
                t.punches += accepted;
                t.duplicates += duplicates;
                t.skipped += total_skipped;
            }
        }
        let m = &self.inner.metrics;
        m.adms_punches
            .get_or_create(&TerminalLabels {
                serial: key.clone(),
            })
            .inc_by(accepted + duplicates);
        for (reason, n) in skipped {
            m.adms_skipped
                .get_or_create(&TerminalSkipLabels {
                    serial: key.clone(),
                    reason: reason.as_str(),
                })
                .inc_by(*n);
        }
    }
}

/// Unix ms → RFC 3339 (UTC), or `None` if out of range.
fn rfc3339(ms: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}
