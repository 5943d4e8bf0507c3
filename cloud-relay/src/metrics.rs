//! Prometheus metrics, served at `/metrics` in the OpenMetrics text format.
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `outpost_relay_batches_total` | `outcome` = committed, rejected, failed | batches received |
//! | `outpost_relay_records_total` | `outcome` = stored, seq_reuse (a new punch under a gateway_seq already used, stored too), duplicate, conflict, rejected (invalid, kept in `/v1/rejected`) | records in committed batches |
//! | `outpost_relay_bytes_in_total` | | frame bytes received |
//! | `outpost_relay_decode_errors_total` | `kind` (frame error kinds, too_many_records, invalid_record) | rejected frames |
//! | `outpost_relay_auth_failures_total` | `reason` = missing, invalid, mismatch, query, scope (a read token naming a site outside its scope) | refused credentials |
//! | `outpost_relay_commit_seconds` | | store commit latency histogram |
//! | `outpost_relay_open_connections` | | open TCP connections |
//! | `outpost_relay_open_websockets` | | open uplink WebSockets |
//! | `outpost_relay_output_lag_records` | `output` | punches stored after the output's cursor (of its sites), refreshed every few seconds |
//! | `outpost_relay_output_deliveries_total` | `output` | deliveries the receiver confirmed |
//! | `outpost_relay_output_punches_total` | `output` | punches in confirmed deliveries |
//! | `outpost_relay_output_failures_total` | `output`, `kind` = retry, gone | failed attempts |
//! | `outpost_relay_output_disables_total` | `output` | times the output was disabled (410 Gone, or failing for `disable_after_secs`) |
//! | `outpost_relay_output_state` | `output`, `state` = active, retrying, disabled | 1 for the output's current state on this relay (all 0 while another relay holds it) |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A single `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// The outcome.
    pub outcome: &'static str,
}

/// A single `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// The kind.
    pub kind: &'static str,
}

/// A single `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// The reason.
    pub reason: &'static str,
}

/// A single `output` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutputLabel {
    /// The output's name.
    pub output: String,
}

/// `output` and `kind` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutputKind {
    /// The output's name.
    pub output: String,
    /// What happened.
    pub kind: &'static str,
}

/// `output` and `state` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutputStateLabel {
    /// The output's name.
    pub output: String,
    /// `active`, `retrying` or `disabled`.
    pub state: &'static str,
}

/// The values of the `state` label of `outpost_relay_output_state`.
pub const OUTPUT_STATES: [&str; 3] = ["active", "retrying", "disabled"];

/// Every relay metric, and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    /// Batches by outcome.
    pub batches: Family<Outcome, Counter>,
    /// Records by outcome.
    pub records: Family<Outcome, Counter>,
    /// Frame bytes received.
    pub bytes_in: Counter,
    /// Rejected frames by kind.
    pub decode_errors: Family<Kind, Counter>,
    /// Refused credentials by reason.
    pub auth_failures: Family<Reason, Counter>,
    /// Store commit latency, seconds.
    pub commit_seconds: Histogram,
    /// Open TCP connections.
    pub open_connections: Gauge,
    /// Open uplink WebSockets.
    pub open_websockets: Gauge,
    /// Per output: punches after its cursor.
    pub output_lag: Family<OutputLabel, Gauge>,
    /// Per output: confirmed deliveries.
    pub output_deliveries: Family<OutputLabel, Counter>,
    /// Per output: punches in confirmed deliveries.
    pub output_punches: Family<OutputLabel, Counter>,
    /// Per output and kind: failed attempts.
    pub output_failures: Family<OutputKind, Counter>,
    /// Per output: times it was disabled.
    pub output_disables: Family<OutputLabel, Counter>,
    /// Per output and state: 1 for the current state.
    pub output_state: Family<OutputStateLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outpost_relay");
        let m = Metrics {
            registry: Registry::default(),
            batches: Family::default(),
            records: Family::default(),
            bytes_in: Counter::default(),
            decode_errors: Family::default(),
            auth_failures: Family::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            open_connections: Gauge::default(),
            open_websockets: Gauge::default(),
            output_lag: Family::default(),
            output_deliveries: Family::default(),
            output_punches: Family::default(),
            output_failures: Family::default(),
            output_disables: Family::default(),
            output_state: Family::default(),
        };
        registry.register("batches", "Batches received, by outcome", m.batches.clone());
        registry.register(
            "records",
            "Records in committed batches, by outcome",
            m.records.clone(),
        );
        registry.register("bytes_in", "Frame bytes received", m.bytes_in.clone());
        registry.register(
            "decode_errors",
            "Rejected frames, by kind",
            m.decode_errors.clone(),
        );
        registry.register(
            "auth_failures",
            "Refused gateway or admin credentials, by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "commit_seconds",
            "Store commit latency",
            m.commit_seconds.clone(),
        );
        registry.register(
            "open_connections",
            "Open TCP connections",
            m.open_connections.clone(),
        );
        registry.register(
            "open_websockets",
            "Open uplink WebSockets",
            m.open_websockets.clone(),
        );
        registry.register(
            "output_lag_records",
            "Punches stored after the output's cursor (of its sites)",
            m.output_lag.clone(),
        );
        registry.register(
            "output_deliveries",
            "Deliveries the receiver confirmed, by output",
            m.output_deliveries.clone(),
        );
        registry.register(
            "output_punches",
            "Punches in confirmed deliveries, by output",
            m.output_punches.clone(),
        );
        registry.register(
            "output_failures",
            "Failed delivery attempts, by output and kind (retry, gone)",
            m.output_failures.clone(),
        );
        registry.register(
            "output_disables",
            "Times an output was disabled, by output",
            m.output_disables.clone(),
        );
        registry.register(
            "output_state",
            "1 for the output's current state on this relay (active, retrying, disabled)",
            m.output_state.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Sets output `name`'s state gauge to `state` (one of [`OUTPUT_STATES`]), or all
    /// three to 0 with `None` (another relay runs it, or the relay is stopping).
    pub fn set_output_state(&self, name: &str, state: Option<&'static str>) {
        for s in OUTPUT_STATES {
            self.output_state
                .get_or_create(&OutputStateLabel {
                    output: name.to_string(),
                    state: s,
                })
                .set(i64::from(Some(s) == state));
        }
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }

    /// Counts one batch outcome.
    pub fn batch(&self, outcome: &'static str) {
        self.batches.get_or_create(&Outcome { outcome }).inc();
    }

    /// Counts records of one outcome.
    pub fn records(&self, outcome: &'static str, n: u32) {
        if n > 0 {
            self.records
                .get_or_create(&Outcome { outcome })
                .inc_by(u64::from(n));
        }
    }

    /// Counts one rejected frame.
    pub fn decode_error(&self, kind: &'static str) {
        self.decode_errors.get_or_create(&Kind { kind }).inc();
    }

    /// Counts one refused credential.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures.get_or_create(&Reason { reason }).inc();
    }
}
