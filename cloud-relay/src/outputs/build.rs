//! From the `[outputs]` config to running sinks: one [`OutputSpec`] and one sink per
//! configured output, built before the relay serves so a bad secret file or URL stops
//! start-up with a message that names the output, instead of failing later in a worker.

use super::config::{EventKind, OutputsSection};
use super::nats::{NatsError, NatsSink};
use super::sink::Sink;
use super::supervisor::OutputSpec;
use super::webhook::{WebhookError, WebhookSink};

/// One output: what it is, and the sink that delivers it.
pub type Output = (OutputSpec, Box<dyn Sink>);

/// Why an output could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A webhook output's secret file or URL.
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    /// A NATS output's URL, subject or credentials.
    #[error(transparent)]
    Nats(#[from] NatsError),
}

/// Every configured output with its sink, webhooks first, in config order. An output
/// whose `events` is empty has nothing to deliver: it gets no worker (a warning says so).
pub fn sinks(cfg: &OutputsSection) -> Result<Vec<Output>, BuildError> {
    let mut out: Vec<Output> = Vec::new();
    for w in &cfg.webhook {
        let sink = WebhookSink::new(w)?;
        if wants_something(&w.name, &w.events) {
            out.push((OutputSpec::webhook(w), Box::new(sink)));
        }
    }
    for n in &cfg.nats {
        let sink = NatsSink::new(n)?;
        if wants_something(&n.name, &n.events) {
            out.push((OutputSpec::nats(n), Box::new(sink)));
        }
    }
    Ok(out)
}

/// Whether an output with `events` is sent anything; logs when not.
fn wants_something(name: &str, events: &[EventKind]) -> bool {
    if events.is_empty() {
        tracing::warn!(
            output = name,
            "output lists no events, so it has nothing to deliver and is not started"
        );
    }
    !events.is_empty()
}
