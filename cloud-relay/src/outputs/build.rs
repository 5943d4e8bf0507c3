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

/// Every configured output with its sink, webhooks first, in config order.
///
/// Only stored punches are delivered by this version: an output whose `events` lacks
/// `"punch"` gets no worker, and the other kinds are logged once as not yet sent.
pub fn sinks(cfg: &OutputsSection) -> Result<Vec<Output>, BuildError> {
    let mut out: Vec<Output> = Vec::new();
    for w in &cfg.webhook {
        let sink = WebhookSink::new(w)?;
        if wants_punches(&w.name, &w.events) {
            out.push((OutputSpec::webhook(w), Box::new(sink)));
        }
    }
    for n in &cfg.nats {
        let sink = NatsSink::new(n)?;
        if wants_punches(&n.name, &n.events) {
            out.push((OutputSpec::nats(n), Box::new(sink)));
        }
    }
    Ok(out)
}

/// Whether an output with `events` gets punches; logs the kinds this version does not send.
fn wants_punches(name: &str, events: &[EventKind]) -> bool {
    let other: Vec<String> = events
        .iter()
        .filter(|e| **e != EventKind::Punch)
        .map(|e| format!("{e:?}").to_lowercase())
        .collect();
    if !other.is_empty() {
        tracing::warn!(
            output = name,
            events = %other.join(","),
            "this relay version delivers only \"punch\" events; the other kinds listed are not sent yet"
        );
    }
    let punches = events.contains(&EventKind::Punch);
    if !punches {
        tracing::warn!(
            output = name,
            "output lists no \"punch\" event, so it has nothing to deliver and is not started"
        );
    }
    punches
}
