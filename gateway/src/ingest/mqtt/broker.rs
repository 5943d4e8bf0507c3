//! The embedded broker: rumqttd, in this process, for sites without a broker of their own.
//!
//! - It listens on `mqtt.listen` (MQTT 3.1.1, plain TCP). The port is checked by binding it
//!   first ([`check_port`]), so a port conflict is a clear start-up error naming `mqtt.listen`.
//! - **Authentication**: devices log in with their device id as the username and their
//!   device token (`outpost-gateway device add ID`, the same token as for HTTP) as the
//!   password. Tokens are checked against the hashes in `auth.devices_file`, reloaded live,
//!   so issuing or revoking a device needs no restart. The gateway's own client logs in
//!   with a random secret made at start. With `auth.required = false` (lab mode) anyone may
//!   connect, with any login or none at all (`mosquitto_pub -h … -t … -m …`): rumqttd
//!   refuses a CONNECT without a username whenever an auth handler is installed, so lab
//!   mode installs none. The gateway's username gives no rights of its own (rumqttd has no
//!   ACLs), so nothing is lost by not checking it there.
//! - rumqttd has no per-topic ACLs: an authenticated device could publish on another
//!   device's topic. The gateway still checks that each punch's `device_id` matches its
//!   topic; sites that need topic ACLs run mosquitto (`mqtt.mode = "external"`).
//! - A refused login is closed by rumqttd without a CONNACK; devices see the connection
//!   drop right after CONNECT.
//! - Memory is bounded: each topic filter keeps a small in-memory log (rumqttd's "segments"),
//!   larger for the punch filter so a burst can wait for the gateway's commits. Messages
//!   past the log are dropped by the broker, and the devices' outboxes resend them.
//! - rumqttd runs on its own threads and lives as long as the process; the gateway's
//!   shutdown disconnects its client and lets the process exit.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::{ConnectionSettings, RouterConfig, SegmentConfig, ServerSettings};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use super::config::{connect_addr, MqttConfig};
use super::MqttError;
use crate::auth::DeviceTable;

/// The username of the gateway's own client at the embedded broker.
pub const INTERNAL_USER: &str = "$outpost-gateway";

/// A running embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Where the gateway's client connects (loopback for a wildcard listener).
    pub connect: SocketAddr,
    /// The gateway client's password (random per process).
    pub(crate) internal_password: String,
}

/// Who may log in when `auth.required` is on (in lab mode there is no check at all).
#[derive(Clone)]
struct Authenticator {
    devices: watch::Receiver<Arc<DeviceTable>>,
    internal_password: Arc<String>,
}

impl Authenticator {
    fn check(&self, client_id: &str, username: &str, password: &str) -> bool {
        if username == INTERNAL_USER {
            return bool::from(self.internal_password.as_bytes().ct_eq(password.as_bytes()));
        }
        let table = self.devices.borrow().clone();
        let ok = table.device_for_token(password) == Some(username);
        if !ok {
            tracing::warn!(
                client_id,
                username,
                "MQTT login refused: the username must be a device id and the password its token from `outpost-gateway device add <device_id>`"
            );
        }
        ok
    }
}

/// Fails with [`MqttError::PortInUse`] if `addr` cannot be listened on. rumqttd only logs a
/// failed bind on its own thread, so the gateway checks first. (tokio sets `SO_REUSEADDR`,
/// as rumqttd does, so connections left in TIME_WAIT by a killed gateway do not count.)
pub async fn check_port(addr: SocketAddr) -> Result<(), MqttError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map(drop)
        .map_err(|source| MqttError::PortInUse { addr, source })
}

/// Starts rumqttd on `cfg.listen` for the punch filter `punch_filter` (call
/// [`check_port`] first). Blocks until it listens (at most 10 s).
pub fn start(
    cfg: &MqttConfig,
    punch_filter: &str,
    devices: watch::Receiver<Arc<DeviceTable>>,
    auth_required: bool,
) -> Result<EmbeddedBroker, MqttError> {
    let internal_password = crate::auth::new_token("opm_");
    let auth = auth_required.then(|| Authenticator {
        devices,
        internal_password: Arc::new(internal_password.clone()),
    });
    let connections = connection_settings(cfg, auth);
    let server = ServerSettings {
        name: "outpost-embedded".into(),
        listen: cfg.listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    // Ack topics: a small log each. The punch filter: room for a burst.
    let small = SegmentConfig {
        max_segment_size: cfg.max_packet_bytes.max(256 << 10),
        max_segment_count: 2,
    };
    let punches = SegmentConfig {
        max_segment_size: cfg.max_packet_bytes.max(4 << 20),
        max_segment_count: 4,
    };
    let router = RouterConfig {
        max_connections: cfg.max_connections + 1,
        max_outgoing_packet_count: 200,
        max_segment_size: small.max_segment_size,
        max_segment_count: small.max_segment_count,
        custom_segment: Some(HashMap::from([(punch_filter.to_string(), punches)])),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let config = rumqttd::Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded MQTT broker stopped");
            }
        })
        .map_err(|e| MqttError::Broker(format!("cannot start the broker thread: {e}")))?;

    let connect = connect_addr(cfg.listen);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&connect, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            return Err(MqttError::Broker(format!(
                "the embedded broker did not start listening on {} (mqtt.listen); see the log",
                cfg.listen
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(EmbeddedBroker {
        listen: cfg.listen,
        connect,
        internal_password,
    })
}

/// rumqttd's connection settings; `auth = None` (lab mode) lets every client in, with or
/// without a login.
fn connection_settings(cfg: &MqttConfig, auth: Option<Authenticator>) -> ConnectionSettings {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: cfg.max_packet_bytes,
        // Packets read from one connection in one go.
        max_inflight_count: usize::from(cfg.max_inflight).min(1000),
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    if let Some(auth) = auth {
        connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
            let ok = auth.check(&client_id, &user, &pass);
            async move { ok }
        });
    }
    connections
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authenticator_checks_device_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices");
        let token = crate::auth::add_device(&path, "door-1").unwrap();
        let table = DeviceTable::load(&path).unwrap();
        let (_tx, rx) = watch::channel(Arc::new(table));
        let a = Authenticator {
            devices: rx.clone(),
            internal_password: Arc::new("secret".into()),
        };
        assert!(a.check("c", "door-1", &token));
        assert!(!a.check("c", "door-2", &token));
        assert!(!a.check("c", "door-1", "opd_wrong"));
        assert!(a.check("c", INTERNAL_USER, "secret"));
        assert!(!a.check("c", INTERNAL_USER, "nope"));
        let cfg = MqttConfig::default();
        assert!(connection_settings(&cfg, Some(a)).external_auth.is_some());
        // Lab mode: no handler, so rumqttd lets in clients without any login too.
        let lab = connection_settings(&cfg, None);
        assert!(lab.external_auth.is_none() && lab.auth.is_none());
    }
}
