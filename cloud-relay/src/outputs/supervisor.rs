//! Which outputs run: one [`Worker`] task per output, and the lag metric.
//!
//! The supervisor is handed the outputs with their sinks already built
//! (`Vec<(OutputSpec, Box<dyn Sink>)>`): building a webhook or NATS sink from the config
//! is the sink's own business, and the server passes an empty list when no output is
//! configured, so a relay without outputs runs no task at all. Every worker stops at the
//! relay's `CancellationToken`; [`Supervisor::stopped`] waits for them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::{EventKind, NatsOutput, WebhookOutput};
use super::lease::Timing;
use super::sink::Sink;
use super::wake::NewPunches;
use super::worker::Worker;
use crate::metrics::{Metrics, OutputLabel};
use crate::store::Store;

/// What the worker needs to know about an output, whatever its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    /// The output's unique name (its state is stored under it).
    pub name: String,
    /// `"webhook"` or `"nats"` (the sink's [`Sink::kind`]).
    pub kind: &'static str,
    /// The kinds it is sent (`events`).
    pub events: Vec<EventKind>,
    /// Only punches, conflicts and rejected records of these sites are delivered; empty =
    /// every site.
    pub sites: Vec<String>,
    /// Punches read per delivery.
    pub batch_max: usize,
    /// Disabled after failing continuously for this long.
    pub disable_after: Duration,
}

impl OutputSpec {
    /// The spec of a `[[outputs.webhook]]`.
    pub fn webhook(w: &WebhookOutput) -> Self {
        OutputSpec {
            name: w.name.clone(),
            kind: "webhook",
            events: w.events.clone(),
            sites: w.sites.clone(),
            batch_max: w.batch_max,
            disable_after: Duration::from_secs(w.disable_after_secs),
        }
    }

    /// The spec of a `[[outputs.nats]]`.
    pub fn nats(n: &NatsOutput) -> Self {
        OutputSpec {
            name: n.name.clone(),
            kind: "nats",
            events: n.events.clone(),
            sites: n.sites.clone(),
            batch_max: n.batch_max,
            disable_after: Duration::from_secs(n.disable_after_secs),
        }
    }
}

/// How the workers run.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    /// This relay's id in the leases ([`holder_id`]).
    pub holder: String,
    /// `outputs.lease_timeout_secs`.
    pub lease_timeout: Duration,
    /// The longest an idle worker waits for the store's new-punch notification before it
    /// looks anyway ([`NewPunches`]).
    pub poll: Duration,
    /// How often the lag metric is refreshed.
    pub lag_every: Duration,
}

impl SupervisorSettings {
    /// The relay's settings: `holder`, the lease timeout, a 1 s fallback poll and the lag
    /// refreshed every 5 s.
    pub fn new(holder: String, lease_timeout: Duration) -> Self {
        SupervisorSettings {
            holder,
            lease_timeout,
            poll: Duration::from_secs(1),
            lag_every: Duration::from_secs(5),
        }
    }
}

/// This relay's id in the output leases: `host:port/pid-random`, unique across restarts.
pub fn holder_id(listen: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".to_string());
    format!(
        "{host}:{}/{}-{:04x}",
        listen.port(),
        std::process::id(),
        rand::random::<u16>()
    )
}

/// The running workers.
pub struct Supervisor {
    tasks: TaskTracker,
}

impl Supervisor {
    /// Starts one worker per output, and the lag refresher; all stop at `cancel`.
    pub fn start(
        store: Arc<dyn Store>,
        outputs: Vec<(OutputSpec, Box<dyn Sink>)>,
        settings: SupervisorSettings,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Supervisor {
        let tasks = TaskTracker::new();
        let timing = Timing::new(settings.lease_timeout);
        let specs: Vec<OutputSpec> = outputs.iter().map(|(s, _)| s.clone()).collect();
        for (spec, sink) in outputs {
            tracing::info!(output = %spec.name, kind = spec.kind, "starting output");
            let worker = Worker::new(
                spec,
                sink,
                store.clone(),
                metrics.clone(),
                settings.holder.clone(),
                timing,
                NewPunches::subscribed(store.subscribe(), settings.poll),
            );
            tasks.spawn(worker.run(cancel.clone()));
        }
        if !specs.is_empty() {
            tasks.spawn(refresh_lag(
                store,
                specs,
                metrics,
                settings.lag_every,
                cancel,
            ));
        }
        tasks.close();
        Supervisor { tasks }
    }

    /// Waits until every worker has stopped (after the cancel).
    pub async fn stopped(self) {
        self.tasks.wait().await;
    }
}

/// Sets `outpost_relay_output_lag_records` of every output every `every`.
async fn refresh_lag(
    store: Arc<dyn Store>,
    specs: Vec<OutputSpec>,
    metrics: Arc<Metrics>,
    every: Duration,
    cancel: CancellationToken,
) {
    loop {
        for spec in &specs {
            let lag = async {
                let state = store.output_state(&spec.name).await?;
                store.backlog(state.cursor, &spec.sites).await
            };
            match lag.await {
                Ok(b) => {
                    metrics
                        .output_lag
                        .get_or_create(&OutputLabel {
                            output: spec.name.clone(),
                        })
                        .set(i64::try_from(b.records).unwrap_or(i64::MAX));
                }
                Err(e) => {
                    tracing::debug!(output = %spec.name, error = %e.report(), "cannot compute the output's lag")
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
