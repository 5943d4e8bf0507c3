//! The uplink's health and what it shows: the state machine's name for status and metrics
//! ([`Health`]), the figures the task publishes, and the cheap handle that `/v1/status` and
//! `/metrics` read them through ([`UplinkHandle`]).
//!
//! The task writes under a short mutex and readers copy out; nothing here waits on the
//! link or the journal's writer.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use outpost_protocol::json::format_time;
use outpost_protocol::{Received, TimeAnchor};
use serde_json::{json, Value};

use super::config::{Transport, UplinkConfig};
use crate::clock::{wall_error_ms, Clock};
use crate::journal::{Journal, JournalStats};
use crate::metrics::{Metrics, UplinkStateLabels};

/// The uplink's health state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not forwarding: no relay configured, or the task stopped.
    Offline,
    /// Opening a connection to a relay.
    Connecting,
    /// Connected and caught up.
    Online,
    /// Connected, with more than one batch's worth waiting.
    Draining,
    /// Waiting before the next attempt after a failure.
    BackingOff,
}

impl Health {
    /// Every state.
    pub const ALL: [Health; 5] = [
        Health::Offline,
        Health::Connecting,
        Health::Online,
        Health::Draining,
        Health::BackingOff,
    ];

    /// The name in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Offline => "offline",
            Health::Connecting => "connecting",
            Health::Online => "online",
            Health::Draining => "draining",
            Health::BackingOff => "backing_off",
        }
    }
}

/// What the task publishes for status and metrics.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) health: Health,
    pub(super) detail: String,
    pub(super) relay: Option<String>,
    pub(super) inflight: usize,
    pub(super) unsent: u64,
    pub(super) batch_limit: usize,
    pub(super) bytes_sent: u64,
    pub(super) batches_sent: u64,
    pub(super) records_acked: u64,
    pub(super) records_resent: u64,
    pub(super) relay_duplicates: u64,
    pub(super) connects: u64,
    /// When (here) and the relay's clock at the last ack.
    pub(super) last_success: Option<(Instant, i64)>,
    pub(super) last_error: Option<(Instant, String)>,
    pub(super) next_attempt: Option<Instant>,
    pub(super) anchor: Option<TimeAnchor>,
}

/// A cheap, cloneable view of the uplink for `/v1/status` and `/metrics`.
#[derive(Clone)]
pub struct UplinkHandle {
    shared: Arc<Mutex<Shared>>,
    enabled: bool,
    relays: Vec<String>,
    transport: Transport,
    window: usize,
}

impl UplinkHandle {
    pub(super) fn new(cfg: &UplinkConfig) -> UplinkHandle {
        let enabled = cfg.enabled();
        UplinkHandle {
            shared: Arc::new(Mutex::new(Shared {
                health: Health::Offline,
                detail: if enabled {
                    "starting".into()
                } else {
                    "no relay configured (uplink.relays is empty): punches stay in the journal"
                        .into()
                },
                relay: None,
                inflight: 0,
                unsent: 0,
                batch_limit: cfg.batch_max_records,
                bytes_sent: 0,
                batches_sent: 0,
                records_acked: 0,
                records_resent: 0,
                relay_duplicates: 0,
                connects: 0,
                last_success: None,
                last_error: None,
                next_attempt: None,
                anchor: None,
            })),
            enabled,
            relays: cfg.relays.clone(),
            transport: cfg.transport(),
            window: cfg.window,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a relay is configured.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The current health state.
    pub fn health(&self) -> Health {
        self.lock().health
    }

    /// The `"uplink"` object of `/v1/status`. `journal` and `now` come from the caller so
    /// the figures agree with the rest of the page.
    pub fn status_json(&self, journal: &JournalStats, now: &Received) -> Value {
        let s = self.lock();
        let age = |t: Instant| (t.elapsed().as_secs_f64() * 10.0).round() / 10.0;
        let oldest_unsent_age_s = journal
            .oldest_received_wall_ms
            .map(|w| ((now.wall_ms - w).max(0) as f64 / 1000.0).round());
        let offset = s.anchor.and_then(|a| {
            wall_error_ms(&a, now.mono_ms, now.wall_ms).map(|off| (off, a.uncertainty_ms))
        });
        json!({
            "enabled": self.enabled,
            "state": s.health.as_str(),
            "detail": s.detail,
            "transport": self.transport.as_str(),
            "relays": self.relays,
            "relay": s.relay,
            "window": self.window,
            "inflight_batches": s.inflight,
            "batch_max_records": s.batch_limit,
            "backlog_records": journal.records,
            "unsent_records": s.unsent,
            "oldest_unsent_age_s": oldest_unsent_age_s,
            "acked_through": journal.trimmed_through,
            "last_success": s.last_success.map(|(_, t)| format_time(t, None)),
            "last_success_age_s": s.last_success.map(|(i, _)| age(i)),
            "last_error": s.last_error.as_ref().map(|(_, e)| e.clone()),
            "last_error_age_s": s.last_error.as_ref().map(|(i, _)| age(*i)),
            "next_attempt_in_s": s.next_attempt.map(|t| (t.saturating_duration_since(Instant::now()).as_secs_f64() * 10.0).round() / 10.0),
            "bytes_sent": s.bytes_sent,
            "batches_sent": s.batches_sent,
            "records_acked": s.records_acked,
            "records_resent": s.records_resent,
            "relay_duplicates": s.relay_duplicates,
            "connects": s.connects,
            "time": {
                "clock_synced": now.clock_synced,
                "anchored": offset.is_some(),
                "offset_ms": offset.map(|o| o.0),
                "uncertainty_ms": offset.map(|o| o.1),
                "corrected_now": offset.map(|o| format_time(now.wall_ms.saturating_add(o.0), None)),
            },
        })
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut Shared)) {
        f(&mut self.lock())
    }

    /// Refreshes the uplink gauges in `metrics`.
    pub(super) fn refresh_metrics(&self, metrics: &Metrics, journal: &Journal, clock: &Clock) {
        let stats = journal.stats();
        let now = clock.now();
        let s = self.lock();
        for h in Health::ALL {
            metrics
                .uplink_state
                .get_or_create(&UplinkStateLabels { state: h.as_str() })
                .set(i64::from(h == s.health));
        }
        metrics.uplink_backlog_records.set(stats.records as i64);
        metrics.uplink_oldest_unsent_seconds.set(
            stats
                .oldest_received_wall_ms
                .map_or(0, |w| (now.wall_ms - w).max(0) / 1000),
        );
        metrics.uplink_inflight_batches.set(s.inflight as i64);
        if let Some((_, t)) = s.last_success {
            metrics.uplink_last_success_timestamp_seconds.set(t / 1000);
        }
        if let Some(off) = s
            .anchor
            .and_then(|a| wall_error_ms(&a, now.mono_ms, now.wall_ms))
        {
            metrics.uplink_clock_offset_ms.set(off);
        }
    }
}
