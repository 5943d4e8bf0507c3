//! Prometheus metrics for the gateway, rendered at `GET /metrics`.
//!
//! One [`Metrics`] value is created at start and cloned into every task; each field is a
//! cheap handle (an `Arc` inside), so there is no global registry.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels for ingest outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IngestLabels {
    /// `http`, `mqtt` or `adms`.
    pub source: &'static str,
    /// `accepted`, `duplicate` or `rejected`.
    pub outcome: &'static str,
}

/// Labels for rejections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A [`outpost_protocol::RejectCode`] name, or a transport-level reason.
    pub reason: &'static str,
}

/// Labels for per-terminal ADMS metrics (serial number, upper-cased).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TerminalLabels {
    /// The terminal's serial number.
    pub serial: String,
}

/// Labels for skipped ADMS lines.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TerminalSkipLabels {
    /// The terminal's serial number.
    pub serial: String,
    /// Why the line was skipped (`bad_time`, `too_few_fields`, …).
    pub reason: &'static str,
}

/// Labels for the uplink health state gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UplinkStateLabels {
    /// `offline`, `connecting`, `online`, `draining` or `backing_off`.
    pub state: &'static str,
}

/// Labels for uplink failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UplinkErrorLabels {
    /// A [`crate::uplink::LinkError`] kind (`connect`, `tls`, `timeout`, …).
    pub kind: &'static str,
}

/// Every gateway metric.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Punches by source and outcome.
    pub ingest: Family<IngestLabels, Counter>,
    /// Rejections by reason.
    pub rejections: Family<ReasonLabels, Counter>,
    /// Seconds from a commit group's start to its fsync returning.
    pub commit_seconds: Histogram,
    /// Punches per commit group.
    pub commit_group_size: Histogram,
    /// Records held in the journal (not yet trimmed).
    pub journal_records: Gauge,
    /// Approximate bytes held in the journal.
    pub journal_bytes: Gauge,
    /// Records evicted by `on_full = "drop_oldest"`.
    pub journal_evicted: Counter,
    /// Dedup keys the journal remembers (records held + trimmed within the window).
    pub journal_dedup_keys: Gauge,
    /// Group commits refused because the journal's write or fsync failed (I/O error, disk full).
    pub journal_io_errors: Counter,
    /// Journals that could not be opened and were set aside, not yet salvaged (alert on > 0).
    pub journal_set_aside: Gauge,
    /// ADMS punches received per terminal (new and resent).
    pub adms_punches: Family<TerminalLabels, Counter>,
    /// ADMS ATTLOG lines skipped, per terminal and reason.
    pub adms_skipped: Family<TerminalSkipLabels, Counter>,
    /// Unix seconds of each ADMS terminal's last request.
    pub adms_last_seen: Family<TerminalLabels, Gauge>,
    /// 1 for the uplink's current health state, 0 for the others.
    pub uplink_state: Family<UplinkStateLabels, Gauge>,
    /// Records in the journal not yet acknowledged by the relay.
    pub uplink_backlog_records: Gauge,
    /// Age of the oldest record not yet acknowledged, seconds (0 when none).
    pub uplink_oldest_unsent_seconds: Gauge,
    /// Relay time of the last acknowledged batch, Unix seconds (0 = never).
    pub uplink_last_success_timestamp_seconds: Gauge,
    /// Frame bytes handed to the transport.
    pub uplink_bytes_sent: Counter,
    /// Batches sent (resends included).
    pub uplink_batches_sent: Counter,
    /// Records acknowledged by the relay.
    pub uplink_records_acked: Counter,
    /// Records sent again after a failure or restart.
    pub uplink_records_resent: Counter,
    /// Link failures by kind.
    pub uplink_errors: Family<UplinkErrorLabels, Counter>,
    /// Successful connections to a relay.
    pub uplink_connects: Counter,
    /// Batches sent and not yet acknowledged.
    pub uplink_inflight_batches: Gauge,
    /// Wall clock error (true − wall) from the latest time anchor, ms.
    pub uplink_clock_offset_ms: Gauge,
    /// Seconds from sending a batch to its ack.
    pub uplink_ack_seconds: Histogram,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("outpost_gateway");
        let ingest = Family::<IngestLabels, Counter>::default();
        r.register(
            "ingest_punches",
            "Punches received, by source and outcome",
            ingest.clone(),
        );
        let rejections = Family::<ReasonLabels, Counter>::default();
        r.register(
            "rejections",
            "Punches or requests rejected, by reason",
            rejections.clone(),
        );
        let commit_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        r.register(
            "commit_seconds",
            "Time from the start of a group commit to its fsync returning",
            commit_seconds.clone(),
        );
        let commit_group_size = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        r.register(
            "commit_group_size",
            "Punches written per group commit",
            commit_group_size.clone(),
        );
        let journal_records = Gauge::default();
        r.register(
            "journal_records",
            "Records in the journal not yet acknowledged by the relay",
            journal_records.clone(),
        );
        let journal_bytes = Gauge::default();
        r.register(
            "journal_bytes",
            "Approximate bytes of records held in the journal",
            journal_bytes.clone(),
        );
        let journal_evicted = Counter::default();
        r.register(
            "journal_evicted",
            "Records evicted because the journal was full (on_full = drop_oldest)",
            journal_evicted.clone(),
        );
        let journal_dedup_keys = Gauge::default();
        r.register(
            "journal_dedup_keys",
            "Dedup keys remembered by the journal (held and recently trimmed records)",
            journal_dedup_keys.clone(),
        );
        let journal_io_errors = Counter::default();
        r.register(
            "journal_io_errors",
            "Group commits refused because a journal write or fsync failed",
            journal_io_errors.clone(),
        );
        let journal_set_aside = Gauge::default();
        r.register(
            "journal_set_aside",
            "Journals that could not be opened and were moved aside; run `outpost-gateway salvage PATH`",
            journal_set_aside.clone(),
        );
        let adms_punches = Family::<TerminalLabels, Counter>::default();
        r.register(
            "adms_punches",
            "Punches received from each ZKTeco terminal (new and resent)",
            adms_punches.clone(),
        );
        let adms_skipped = Family::<TerminalSkipLabels, Counter>::default();
        r.register(
            "adms_skipped_lines",
            "ATTLOG lines skipped, by terminal and reason",
            adms_skipped.clone(),
        );
        let adms_last_seen = Family::<TerminalLabels, Gauge>::default();
        r.register(
            "adms_last_seen_seconds",
            "Unix time of each ZKTeco terminal's last request",
            adms_last_seen.clone(),
        );
        let uplink_state = Family::<UplinkStateLabels, Gauge>::default();
        r.register(
            "uplink_state",
            "1 for the uplink's current health state (offline, connecting, online, draining, backing_off)",
            uplink_state.clone(),
        );
        let uplink_backlog_records = Gauge::default();
        r.register(
            "uplink_backlog_records",
            "Records in the journal not yet acknowledged by the relay",
            uplink_backlog_records.clone(),
        );
        let uplink_oldest_unsent_seconds = Gauge::default();
        r.register(
            "uplink_oldest_unsent_seconds",
            "Age of the oldest record not yet acknowledged by the relay",
            uplink_oldest_unsent_seconds.clone(),
        );
        let uplink_last_success_timestamp_seconds = Gauge::default();
        r.register(
            "uplink_last_success_timestamp_seconds",
            "Relay time of the last acknowledged batch (Unix seconds, 0 = never)",
            uplink_last_success_timestamp_seconds.clone(),
        );
        let uplink_bytes_sent = Counter::default();
        r.register(
            "uplink_bytes_sent",
            "Frame bytes sent to the relay",
            uplink_bytes_sent.clone(),
        );
        let uplink_batches_sent = Counter::default();
        r.register(
            "uplink_batches_sent",
            "Batches sent to the relay, resends included",
            uplink_batches_sent.clone(),
        );
        let uplink_records_acked = Counter::default();
        r.register(
            "uplink_records_acked",
            "Records acknowledged by the relay",
            uplink_records_acked.clone(),
        );
        let uplink_records_resent = Counter::default();
        r.register(
            "uplink_records_resent",
            "Records sent again after a link failure or restart",
            uplink_records_resent.clone(),
        );
        let uplink_errors = Family::<UplinkErrorLabels, Counter>::default();
        r.register(
            "uplink_errors",
            "Uplink failures, by kind",
            uplink_errors.clone(),
        );
        let uplink_connects = Counter::default();
        r.register(
            "uplink_connects",
            "Successful connections to a relay",
            uplink_connects.clone(),
        );
        let uplink_inflight_batches = Gauge::default();
        r.register(
            "uplink_inflight_batches",
            "Batches sent and not yet acknowledged",
            uplink_inflight_batches.clone(),
        );
        let uplink_clock_offset_ms = Gauge::default();
        r.register(
            "uplink_clock_offset_ms",
            "Wall clock error (true minus wall) from the latest time anchor, in ms",
            uplink_clock_offset_ms.clone(),
        );
        let uplink_ack_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        r.register(
            "uplink_ack_seconds",
            "Time from sending a batch to receiving its ack",
            uplink_ack_seconds.clone(),
        );
        Metrics {
            registry: Arc::new(r),
            ingest,
            rejections,
            commit_seconds,
            commit_group_size,
            journal_records,
            journal_bytes,
            journal_evicted,
            journal_dedup_keys,
            journal_io_errors,
            journal_set_aside,
            adms_punches,
            adms_skipped,
            adms_last_seen,
            uplink_state,
            uplink_backlog_records,
            uplink_oldest_unsent_seconds,
            uplink_last_success_timestamp_seconds,
            uplink_bytes_sent,
            uplink_batches_sent,
            uplink_records_acked,
            uplink_records_resent,
            uplink_errors,
            uplink_connects,
            uplink_inflight_batches,
            uplink_clock_offset_ms,
            uplink_ack_seconds,
        }
    }

    /// Counts one rejection.
    pub fn reject(&self, reason: &'static str) {
        self.rejections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
