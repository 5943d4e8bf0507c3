//! MQTT ingest: punches from devices that speak MQTT, with an embedded broker by default.
//!
//! ## Topics and delivery
//!
//! | direction | topic | QoS |
//! |---|---|---|
//! | device → gateway | `outpost/v1/{site}/{device_id}/punch` | 1 |
//! | gateway → device | `outpost/v1/{site}/{device_id}/ack` | 1 |
//!
//! The gateway subscribes to `outpost/v1/{site}/+/punch` with QoS 1 on a **persistent
//! session** (clean session off, a stable client id, `outpost-gw-<gateway.id>` by default),
//! so an external broker queues punches while the gateway restarts. Acks to the broker are
//! **manual**: a message is acknowledged (PUBACK) only after every punch in it has been
//! durably committed (the committer's fsync returned), found to be a duplicate, or
//! definitively rejected. After the commit the gateway publishes the device-level ack
//! (accepted / duplicate / rejected + code, by `device_seq`) to the device's ack topic, in
//! the device's own encoding ([`crate::ingest::punch_body`]). A device keeps each punch in its outbox
//! (`outpost_protocol::outbox`) and resends it until it sees that ack. Together: no punch a
//! device saw acknowledged can be lost, whatever the broker does with its own queues, and a
//! resent punch is stored once (the journal deduplicates by `(device_id, device_seq)`).
//!
//! ## Broker modes (`mqtt.mode`)
//!
//! - `embedded`: rumqttd in this process on `mqtt.listen` ([`broker`]); devices log in with
//!   their device id and device token.
//! - `external`: connect to `mqtt.url` (e.g. a site's mosquitto), optionally over TLS
//!   (rustls with ring, `mqtt.ca_file`) with `mqtt.username` and a password from
//!   `mqtt.password_file` or `OUTPOST_MQTT__PASSWORD`.
//! - `auto` (default): probe `mqtt.url` (or `mqtt.listen` on loopback when no URL is set).
//!   If an MQTT broker answers, use it as `external`; if nothing listens, start the
//!   embedded broker. The choice and the reason are logged and shown in `/v1/status`.
//! - `off`.
//!
//! Start-up fails, naming the key to change, when the embedded broker's port is taken
//! (`mqtt.listen`), when a broker refuses our login (`mqtt.username`,
//! `mqtt.password_file`), or when files cannot be read (`mqtt.password_file`,
//! `mqtt.ca_file`). A broker that is merely unreachable is retried in the background with
//! backoff ([`client`]); HTTP ingest runs meanwhile.
//!
//! ## Tasks
//!
//! The poller ([`client::Poller`]) polls rumqttc's event loop and nothing else; the
//! pipeline ([`pipeline`]) batches messages into committer requests and sends the acks;
//! a small subscriber task re-subscribes after every reconnect. [`MqttService::stop`] ends
//! them in order: no new messages, finish the commits in flight and their acks, DISCONNECT.
//! The daemon calls it before it stops the committer.

pub mod broker;
pub mod client;
pub mod config;
pub mod pipeline;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use outpost_ops::backoff::Backoff;
use rumqttc::{AsyncClient, ConnectReturnCode};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{BrokerUrl, MqttConfig, MqttMode, Secret};
pub use status::{ConnState, MqttStatus};

use crate::auth::DeviceTable;
use crate::clock::Clock;
use crate::committer::CommitterHandle;
use crate::metrics::Metrics;
use client::{FirstOutcome, Poller, Probe, Shared, Target};

/// Why MQTT ingest could not start. Each message names the config key to change.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The embedded broker's port is taken.
    #[error("cannot start the embedded MQTT broker on {addr} (mqtt.listen): {source}. Another program (a system mosquitto?) uses the port: set mqtt.listen to a free port, or use that broker with mqtt.mode = \"external\" and mqtt.url")]
    PortInUse {
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The broker refused our login.
    #[error("the MQTT broker at {broker} refused our login ({code:?}): fix mqtt.username and mqtt.password_file (or OUTPOST_MQTT__PASSWORD), or mqtt.client_id")]
    Refused {
        /// The broker URL.
        broker: String,
        /// Its CONNACK code.
        code: ConnectReturnCode,
    },
    /// Something that is not an MQTT broker listens where `auto` looked.
    #[error("something listens on {broker} but does not answer as an MQTT broker ({detail}): set mqtt.listen to a free port, or mqtt.mode = \"external\" with mqtt.url, mqtt.username and mqtt.password_file if it is a broker that needs a login")]
    NotMqtt {
        /// The probed URL.
        broker: String,
        /// What happened.
        detail: String,
    },
    /// The password file cannot be used.
    #[error("cannot read the MQTT password from {path} (mqtt.password_file): {message}")]
    Secret {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The CA file cannot be used (the error names the file).
    #[error("cannot use the MQTT broker's CA (mqtt.ca_file): {0}")]
    CaFile(#[source] outpost_ops::pem::PemError),
    /// The TLS configuration could not be built.
    #[error("MQTT TLS setup failed: {0}")]
    Tls(String),
    /// The embedded broker failed.
    #[error("{0}")]
    Broker(String),
    /// The site cannot be used in a topic (config validation prevents this).
    #[error("gateway.site cannot be used in MQTT topics: {0}")]
    Topic(String),
}

/// What MQTT ingest needs from the daemon.
pub struct MqttParams {
    /// `[mqtt]`.
    pub config: MqttConfig,
    /// `gateway.id` (for the default client id).
    pub gateway_id: String,
    /// `gateway.site` (the topic's site segment).
    pub site: String,
    /// `auth.required` (embedded broker: lab mode lets anyone in).
    pub auth_required: bool,
    /// Device credentials (embedded broker logins).
    pub devices: watch::Receiver<Arc<DeviceTable>>,
    /// Where punches go.
    pub committer: CommitterHandle,
    /// Arrival stamps.
    pub clock: Clock,
    /// Prometheus counters.
    pub metrics: Metrics,
}

struct Tasks {
    client: AsyncClient,
    pipeline: JoinHandle<()>,
    poller: JoinHandle<()>,
    subscriber: JoinHandle<()>,
    poll_stop: CancellationToken,
}

/// The running MQTT ingest.
pub struct MqttService {
    status: MqttStatus,
    embedded: Option<broker::EmbeddedBroker>,
    tasks: Option<Tasks>,
}

/// How long start-up waits for the first connection before going on in the background.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(15);

impl MqttService {
    /// The status shown in `/v1/status`.
    pub fn status(&self) -> MqttStatus {
        self.status.clone()
    }

    /// The embedded broker's listen address, if this gateway runs one.
    pub fn embedded_listen(&self) -> Option<SocketAddr> {
        self.embedded.as_ref().map(|b| b.listen)
    }

    /// Stops in order, once `shutdown` (given to [`start`]) is cancelled: the pipeline takes
    /// no new messages and answers the ones committing; then DISCONNECT is sent and the
    /// poller ends. Each step is bounded by `grace`. Call before stopping the committer.
    pub async fn stop(mut self, grace: Duration) {
        let Some(t) = self.tasks.take() else {
            return;
        };
        let mut pipeline = t.pipeline;
        if tokio::time::timeout(grace, &mut pipeline).await.is_err() {
            tracing::warn!(
                "MQTT acks still pending after {grace:?}; the broker will redeliver those messages"
            );
            pipeline.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), t.client.disconnect()).await;
        let mut poller = t.poller;
        if tokio::time::timeout(Duration::from_secs(3), &mut poller)
            .await
            .is_err()
        {
            t.poll_stop.cancel();
            let _ = poller.await;
        }
        t.poll_stop.cancel();
        let _ = t.subscriber.await;
        self.status.stopped();
        tracing::info!("MQTT ingest stopped");
    }
}

/// Chooses the broker (starting the embedded one if needed), connects, subscribes and runs
/// the ingest tasks until `shutdown`. See the module docs for the modes and errors.
pub async fn start(p: MqttParams, shutdown: CancellationToken) -> Result<MqttService, MqttError> {
    let cfg = p.config.clone();
    let status = MqttStatus::new(cfg.mode);
    if cfg.mode == MqttMode::Off {
        tracing::info!("MQTT ingest is off (mqtt.mode = \"off\")");
        return Ok(MqttService {
            status,
            embedded: None,
            tasks: None,
        });
    }
    let filter = outpost_protocol::topic::punch_filter(&p.site)
        .map_err(|e| MqttError::Topic(e.to_string()))?;

    let mut embedded = None;
    let (target, kind, reason) = match cfg.mode {
        MqttMode::External => {
            let url = cfg.broker_url().ok_or_else(|| {
                MqttError::Broker("mqtt.mode = \"external\" needs mqtt.url".into())
            })?;
            let t = client::external_target(&cfg, url)?;
            (t, "external", "mqtt.mode = \"external\"".to_string())
        }
        MqttMode::Embedded => {
            let b = start_embedded(&cfg, &filter, &p).await?;
            let t = internal_target(&b);
            embedded = Some(b);
            (t, "embedded", "mqtt.mode = \"embedded\"".to_string())
        }
        MqttMode::Auto | MqttMode::Off => {
            let probe_url = cfg.probe_url();
            let probe_target = client::external_target(&cfg, probe_url.clone())?;
            match client::probe(&probe_target, &cfg).await {
                Probe::Broker(code) => {
                    let why = match code {
                        None => format!("mqtt.mode = \"auto\": an MQTT broker answers at {probe_url}"),
                        Some(c) => format!(
                            "mqtt.mode = \"auto\": an MQTT broker answers at {probe_url} (it refused our probe login: {c:?})"
                        ),
                    };
                    (probe_target, "external", why)
                }
                Probe::Nothing(detail) => {
                    let b = start_embedded(&cfg, &filter, &p).await?;
                    let t = internal_target(&b);
                    embedded = Some(b);
                    (
                        t,
                        "embedded",
                        format!(
                            "mqtt.mode = \"auto\": no broker answers at {probe_url} ({detail}); started the embedded broker on {}",
                            cfg.listen
                        ),
                    )
                }
                Probe::Other(detail) if cfg.url.is_none() => {
                    return Err(MqttError::NotMqtt {
                        broker: probe_url.to_string(),
                        detail,
                    })
                }
                Probe::Other(detail) => {
                    let b = start_embedded(&cfg, &filter, &p).await?;
                    let t = internal_target(&b);
                    embedded = Some(b);
                    (
                        t,
                        "embedded",
                        format!(
                            "mqtt.mode = \"auto\": the broker at {probe_url} did not answer ({detail}); started the embedded broker on {}",
                            cfg.listen
                        ),
                    )
                }
            }
        }
    };
    let broker_name = match &embedded {
        Some(b) => format!("embedded broker on {}", b.listen),
        None => target.url.to_string(),
    };
    status.chose(kind, target.url.to_string(), reason.clone());
    // In lab mode the daemon's one LAB MODE warning already says the embedded broker lets
    // anyone in; this line only records it.
    let logins = match (&embedded, p.auth_required) {
        (Some(_), false) => "anyone, with or without a login (auth.required = false)",
        (Some(_), true) => "device id and device token",
        (None, _) => "the external broker's",
    };
    tracing::info!(broker = %broker_name, why = %reason, logins, "MQTT ingest: using the {kind} broker");

    let client_id = cfg.client_id_for(&p.gateway_id);
    let (client, eventloop) = client::new_client(
        client::options(&target, &client_id, &cfg, false),
        client::REQUEST_CHANNEL,
    );
    let shared = Arc::new(Shared::default());
    let (tx, rx) = mpsc::channel(client::QUEUE_MESSAGES);
    let (connack_tx, connack_rx) = watch::channel(0u64);
    let (first_tx, first_rx) = oneshot::channel();
    let poll_stop = CancellationToken::new();

    let poller = Poller {
        eventloop,
        tx,
        shared: shared.clone(),
        status: status.clone(),
        connacks: connack_tx,
        first: Some(first_tx),
        backoff: Backoff::new(
            Duration::from_millis(cfg.reconnect_min_ms),
            Duration::from_millis(cfg.reconnect_max_ms),
        ),
        stop: poll_stop.clone(),
        broker: broker_name.clone(),
        clock: p.clock.clone(),
    };
    let poller = tokio::spawn(poller.run());
    let subscriber = tokio::spawn(client::subscriber(
        client.clone(),
        filter.clone(),
        connack_rx,
        poll_stop.clone(),
    ));
    let pipeline = pipeline::Pipeline {
        committer: p.committer,
        clock: p.clock,
        metrics: p.metrics,
        status: status.clone(),
        client: client.clone(),
        shared,
        site: p.site,
        max_punches: cfg.max_punches_per_message,
        max_packet_bytes: cfg.max_packet_bytes,
    };
    let pipeline = tokio::spawn(pipeline.run(rx, shutdown));
    let service = MqttService {
        status,
        embedded,
        tasks: Some(Tasks {
            client,
            pipeline,
            poller,
            subscriber,
            poll_stop,
        }),
    };

    match tokio::time::timeout(FIRST_CONNECT_WAIT, first_rx).await {
        Ok(Ok(FirstOutcome::Connected)) => {
            tracing::info!(client_id, filter, "MQTT ingest subscribed");
        }
        Ok(Ok(FirstOutcome::Refused(code))) if client::is_auth_refusal(code) => {
            abort(service);
            return Err(MqttError::Refused {
                broker: broker_name,
                code,
            });
        }
        Ok(Ok(FirstOutcome::Refused(code))) => tracing::warn!(
            broker = %broker_name,
            "the MQTT broker refused the connection ({code:?}); retrying in the background"
        ),
        Ok(Ok(FirstOutcome::Failed(why))) => tracing::warn!(
            broker = %broker_name,
            "MQTT broker not reachable yet ({why}); retrying in the background, HTTP ingest runs meanwhile"
        ),
        Ok(Err(_)) | Err(_) => tracing::warn!(
            broker = %broker_name,
            "no answer from the MQTT broker within {FIRST_CONNECT_WAIT:?}; retrying in the background"
        ),
    }
    Ok(service)
}

/// Starts the embedded broker off the async workers (it waits for its listener).
async fn start_embedded(
    cfg: &MqttConfig,
    filter: &str,
    p: &MqttParams,
) -> Result<broker::EmbeddedBroker, MqttError> {
    broker::check_port(cfg.listen).await?;
    let (cfg, filter, devices, auth) = (
        cfg.clone(),
        filter.to_string(),
        p.devices.clone(),
        p.auth_required,
    );
    tokio::task::spawn_blocking(move || broker::start(&cfg, &filter, devices, auth))
        .await
        .map_err(|e| MqttError::Broker(format!("the broker start-up task failed: {e}")))?
}

fn internal_target(b: &broker::EmbeddedBroker) -> Target {
    Target {
        url: BrokerUrl {
            host: b.connect.ip().to_string(),
            port: b.connect.port(),
            tls: false,
        },
        tls: None,
        credentials: Some((
            broker::INTERNAL_USER.to_string(),
            b.internal_password.clone(),
        )),
    }
}

fn abort(mut s: MqttService) {
    if let Some(t) = s.tasks.take() {
        t.poll_stop.cancel();
        t.pipeline.abort();
        t.poller.abort();
        t.subscriber.abort();
    }
    s.status.stopped();
}
