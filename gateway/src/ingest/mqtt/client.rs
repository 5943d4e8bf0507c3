//! The gateway's MQTT client: connection options, the broker probe, and the task that
//! polls rumqttc's event loop.
//!
//! ## The polling task
//!
//! rumqttc does all network I/O inside `EventLoop::poll`, so the loop is polled
//! continuously by one task that does nothing else: it never publishes, subscribes or acks
//! (those go through an `AsyncClient` from other tasks; a blocking send from the polling
//! task could deadlock with the request channel it alone drains). Incoming punch messages
//! are handed to the pipeline with `try_send` on a bounded queue, so the poller never waits
//! on the pipeline either. A message that finds the queue full (only possible when a broker
//! ignores its in-flight window, or with QoS 0 floods) is dropped unanswered and counted:
//! the device's outbox resends it.
//!
//! ## Reconnects
//!
//! rumqttc reconnects on the next poll after an error, immediately. The task sleeps between
//! failures: `reconnect_min_ms`, doubling per consecutive failure up to `reconnect_max_ms`,
//! each delay drawn uniformly from its upper half (jitter, [`outpost_ops::backoff`]), so a
//! fleet of gateways does not reconnect in lock step after a broker restart. A successful
//! CONNACK resets the delay.
//!
//! Every CONNACK starts a new *generation*. Punch messages carry the generation they arrived
//! in; an ack for a message of an older generation is not sent to the broker (its packet id
//! may belong to a different message on the new connection) — the broker redelivers the
//! message on the persistent session and it is answered as a duplicate.
//!
//! ## TCP_NODELAY
//!
//! Every packet the gateway sends is small (a PUBACK is 4 bytes, a device ack a few dozen)
//! and the next one often waits for an answer to it. With Nagle's algorithm on, a small
//! write waits for the previous one's TCP ACK, which a delayed-ACK peer holds up to 40 ms.
//! Through mosquitto, one device sending 1,000 punches one ack at a time took 44–47 s
//! without the broker's `set_tcp_nodelay true` and 1.5–4 s with it; without `TCP_NODELAY`
//! on the gateway's socket, 1.7 s instead of 1.5 s (the broker's side matters most).
//! [`new_client`] turns Nagle off on the client's socket (rumqttc leaves it on); the
//! broker's side is the operator's (README).
//! rumqttd, the embedded broker, offers no way to set it on the sockets it accepts.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, Publish, QoS, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::config::{BrokerUrl, MqttConfig};
use super::status::MqttStatus;
use super::MqttError;

/// Capacity of rumqttc's request channel (publishes and acks from the pipeline).
pub const REQUEST_CHANNEL: usize = 4096;
/// Most punch messages waiting between the poller and the pipeline.
pub const QUEUE_MESSAGES: usize = 8192;
/// Most payload bytes waiting between the poller and the pipeline.
pub const QUEUE_BYTES: usize = 64 << 20;

/// How to reach a broker.
#[derive(Clone)]
pub struct Target {
    /// Host, port, TLS or not.
    pub url: BrokerUrl,
    /// The TLS configuration for `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Username and password.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .field("username", &self.credentials.as_ref().map(|c| &c.0))
            .finish()
    }
}

/// The target for an external broker: reads the password and the CA file.
pub fn external_target(cfg: &MqttConfig, url: BrokerUrl) -> Result<Target, MqttError> {
    let password = match (&cfg.password, &cfg.password_file) {
        (Some(p), _) => Some(p.0.clone()),
        (None, Some(path)) => Some(read_password(path)?),
        (None, None) => None,
    };
    let credentials = cfg
        .username
        .clone()
        .map(|u| (u, password.unwrap_or_default()));
    let tls = if url.tls {
        Some(tls_config(cfg.ca_file.as_deref())?)
    } else {
        None
    };
    Ok(Target {
        url,
        tls,
        credentials,
    })
}

fn read_password(path: &Path) -> Result<String, MqttError> {
    let text = std::fs::read_to_string(path).map_err(|e| MqttError::Secret {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let pw = text.lines().next().unwrap_or("").to_string();
    if pw.is_empty() {
        return Err(MqttError::Secret {
            path: path.to_path_buf(),
            message: "the file is empty; its first line must be the password".into(),
        });
    }
    Ok(pw)
}

/// A rustls client configuration with the ring provider, trusting `ca_file` (PEM, every
/// certificate in it: [`outpost_ops::pem::load_roots`]) or, when unset, the public web
/// roots.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, MqttError> {
    let roots = match ca_file {
        Some(path) => outpost_ops::pem::load_roots(path).map_err(MqttError::CaFile)?,
        None => rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// rumqttc options for `target`: persistent session (`clean = false`) unless probing,
/// manual acks, explicit packet size and in-flight limits.
pub fn options(target: &Target, client_id: &str, cfg: &MqttConfig, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, target.url.host.clone(), target.url.port);
    o.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs));
    o.set_clean_session(clean);
    o.set_manual_acks(true);
    o.set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes);
    o.set_inflight(cfg.max_inflight);
    o.set_request_channel_capacity(REQUEST_CHANNEL);
    if let Some((u, p)) = &target.credentials {
        o.set_credentials(u.clone(), p.clone());
    }
    if let Some(tls) = &target.tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    o
}

/// What a probe found at an address.
#[derive(Debug)]
pub enum Probe {
    /// An MQTT broker answered with a CONNACK (perhaps refusing our credentials).
    Broker(Option<ConnectReturnCode>),
    /// Nothing listens there (connection refused).
    Nothing(String),
    /// Something listens but did not answer as an MQTT broker (closed, timed out, TLS error).
    Other(String),
}

/// A rumqttc client and event loop for `options`, with `TCP_NODELAY` on its socket (see
/// the module docs).
pub fn new_client(options: MqttOptions, capacity: usize) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// Connects once with a throwaway clean session to see whether a broker answers.
pub async fn probe(target: &Target, cfg: &MqttConfig) -> Probe {
    let id = format!("outpost-probe-{:08x}", rand::random::<u32>());
    let (_client, mut ev) = new_client(options(target, &id, cfg, true), 4);
    match tokio::time::timeout(Duration::from_secs(5), ev.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => Probe::Broker(None),
        Ok(Ok(other)) => Probe::Other(format!("unexpected first event {other:?}")),
        Ok(Err(ConnectionError::ConnectionRefused(code))) => Probe::Broker(Some(code)),
        Ok(Err(ConnectionError::Io(e))) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Probe::Nothing(e.to_string())
        }
        Ok(Err(e)) => Probe::Other(e.to_string()),
        Err(_) => Probe::Other("no answer within 5 s".into()),
    }
}

/// `true` for a CONNACK that refuses our identity (a configuration problem).
pub fn is_auth_refusal(code: ConnectReturnCode) -> bool {
    matches!(
        code,
        ConnectReturnCode::BadUserNamePassword
            | ConnectReturnCode::NotAuthorized
            | ConnectReturnCode::BadClientId
    )
}

/// One punch message handed from the poller to the pipeline.
#[derive(Debug)]
pub struct Incoming {
    /// The message as received.
    pub publish: Publish,
    /// The connection generation it arrived on.
    pub generation: u64,
}

/// State shared by the poller and the pipeline.
#[derive(Debug, Default)]
pub struct Shared {
    /// Current connection generation (increments at each CONNACK).
    pub generation: AtomicU64,
    /// Payload bytes queued between poller and pipeline.
    pub queued_bytes: AtomicUsize,
}

/// How the first connection attempt went (for start-up).
#[derive(Debug)]
pub enum FirstOutcome {
    /// Connected.
    Connected,
    /// The broker refused us (credentials, client id).
    Refused(ConnectReturnCode),
    /// Another failure (network); the poller keeps retrying.
    Failed(String),
}

/// Everything the polling task needs.
pub struct Poller {
    /// The event loop to poll.
    pub eventloop: EventLoop,
    /// To the pipeline.
    pub tx: mpsc::Sender<Incoming>,
    /// Shared counters.
    pub shared: Arc<Shared>,
    /// Status to update.
    pub status: MqttStatus,
    /// Told the generation after each CONNACK (the subscriber task subscribes).
    pub connacks: watch::Sender<u64>,
    /// The first attempt's outcome.
    pub first: Option<oneshot::Sender<FirstOutcome>>,
    /// Reconnect delays.
    pub backoff: outpost_ops::backoff::Backoff,
    /// Stops the poller (after the pipeline has flushed its acks and disconnected).
    pub stop: CancellationToken,
    /// What to name in errors.
    pub broker: String,
    /// Wall clock for status.
    pub clock: crate::clock::Clock,
}

impl Poller {
    /// Polls until `stop`, or until the client's DISCONNECT has been sent.
    pub async fn run(mut self) {
        let mut refusals_logged = 0u32;
        loop {
            let event = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                e = self.eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    let generation = self.shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
                    self.backoff.reset();
                    refusals_logged = 0;
                    self.status.connected(self.clock.wall_ms());
                    tracing::info!(
                        broker = %self.broker,
                        session_present = ack.session_present,
                        "MQTT connected"
                    );
                    let _ = self.connacks.send(generation);
                    if let Some(first) = self.first.take() {
                        let _ = first.send(FirstOutcome::Connected);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => self.hand_over(p),
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    if s.return_codes.contains(&SubscribeReasonCode::Failure) {
                        let msg = "the broker refused our subscription to the punch topics: allow mqtt.username to subscribe to outpost/v1/<site>/+/punch and publish to outpost/v1/<site>/+/ack in the broker's ACL".to_string();
                        tracing::error!(broker = %self.broker, "{msg}");
                        self.status.disconnected(msg);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    tracing::debug!("MQTT disconnect sent");
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    let text = describe(&e, &self.broker);
                    self.status.disconnected(text.clone());
                    match (&e, self.first.take()) {
                        (ConnectionError::ConnectionRefused(code), Some(first)) => {
                            let _ = first.send(FirstOutcome::Refused(*code));
                        }
                        (_, Some(first)) => {
                            let _ = first.send(FirstOutcome::Failed(text.clone()));
                        }
                        _ => {}
                    }
                    if matches!(e, ConnectionError::ConnectionRefused(_)) {
                        // Logged loudly, but not at every retry.
                        if refusals_logged < 3 || refusals_logged.is_power_of_two() {
                            tracing::error!("{text}");
                        }
                        refusals_logged += 1;
                    } else {
                        tracing::warn!("{text}");
                    }
                    let delay = self.backoff.next_delay();
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.status.stopped();
    }

    fn hand_over(&mut self, publish: Publish) {
        self.status.inc(|c| &c.messages);
        if publish.dup {
            self.status.inc(|c| &c.redeliveries);
        }
        let bytes = publish.payload.len();
        if self.shared.queued_bytes.load(Ordering::Relaxed) + bytes > QUEUE_BYTES {
            self.dropped(&publish);
            return;
        }
        let msg = Incoming {
            publish,
            generation: self.shared.generation.load(Ordering::SeqCst),
        };
        self.shared.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Err(e) = self.tx.try_send(msg) {
            self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            let p = match e {
                mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
            };
            self.dropped(&p.publish);
        }
    }

    fn dropped(&self, p: &Publish) {
        let n = self
            .status
            .counters()
            .overload_dropped
            .fetch_add(1, Ordering::Relaxed);
        if n.is_power_of_two() {
            tracing::warn!(
                topic = %p.topic,
                dropped_so_far = n + 1,
                "MQTT ingest queue full: message dropped unanswered (the device will resend); lower the broker's in-flight window for this client (mosquitto: max_inflight_messages)"
            );
        }
    }
}

/// An operator-facing description of a connection error, naming the keys to change.
pub fn describe(e: &ConnectionError, broker: &str) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) if is_auth_refusal(*code) => format!(
            "the MQTT broker at {broker} refused our login ({code:?}): fix mqtt.username and mqtt.password_file (or OUTPOST_MQTT__PASSWORD), or mqtt.client_id"
        ),
        ConnectionError::ConnectionRefused(code) => {
            format!("the MQTT broker at {broker} refused the connection ({code:?}); retrying")
        }
        ConnectionError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => format!(
            "no MQTT broker answers at {broker} (connection refused); retrying — check mqtt.url and that the broker runs"
        ),
        ConnectionError::Tls(t) => format!(
            "TLS with the MQTT broker at {broker} failed: {t}; check mqtt.url and mqtt.ca_file"
        ),
        other => format!("MQTT connection to {broker} lost: {other}; reconnecting"),
    }
}

/// Subscribes to `filter` after every CONNACK (from its own task, never the poller's).
pub async fn subscriber(
    client: AsyncClient,
    filter: String,
    mut connacks: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = connacks.changed() => if r.is_err() { return },
        }
        if let Err(e) = client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
            tracing::warn!(error = %e, "cannot queue the MQTT subscription; the client is closing");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_keys() {
        let e = ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized);
        let t = describe(&e, "mqtt://b:1883");
        assert!(
            t.contains("mqtt.username") && t.contains("mqtt.password_file"),
            "{t}"
        );
        assert!(is_auth_refusal(ConnectReturnCode::BadUserNamePassword));
        assert!(!is_auth_refusal(ConnectReturnCode::ServiceUnavailable));
    }

    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a certificate\n").unwrap();
        let e = tls_config(Some(&p)).unwrap_err();
        assert!(e.to_string().contains("mqtt.ca_file"), "{e}");
        assert!(tls_config(Some(&dir.path().join("missing.pem"))).is_err());
        assert!(tls_config(None).is_ok());
    }

    #[test]
    fn password_file_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        assert_eq!(read_password(&p).unwrap(), "s3cret");
        std::fs::write(&p, "").unwrap();
        let e = read_password(&p).unwrap_err();
        assert!(e.to_string().contains("mqtt.password_file"), "{e}");
    }
}
