//! `[mqtt]`: configuration of the MQTT ingest and of the embedded broker.
//!
//! ```toml
//! [mqtt]
//! mode = "auto"                  # auto (default) | embedded | external | off
//! listen = "0.0.0.0:1883"        # the embedded broker's listener (default 0.0.0.0:1883)
//! # url = "mqtt://127.0.0.1:1883" # an external broker (mqtt:// or mqtts://)
//! # username = "outpost-gateway"  # credentials at the external broker
//! # password_file = "/etc/outpost/mqtt.password"   # or OUTPOST_MQTT__PASSWORD
//! # ca_file = "/etc/outpost/mqtt-ca.pem"           # CA for mqtts:// (default: public roots)
//! # client_id = "outpost-gw-<gateway.id>"          # our persistent session's id
//! keep_alive_secs = 30
//! max_packet_bytes = 262144      # largest MQTT packet in either direction
//! max_punches_per_message = 1000 # most punches in one message (a CBOR or JSON array)
//! max_inflight = 1000            # unacked messages in flight each way
//! max_connections = 512          # embedded broker: most device connections
//! reconnect_min_ms = 250         # first reconnect delay; doubles up to reconnect_max_ms
//! reconnect_max_ms = 30000
//! ```
//!
//! `auto` probes the external address (`url`, or `listen` reached on loopback when `url` is
//! unset): if an MQTT broker answers there, the gateway uses it; otherwise it starts the
//! embedded broker on `listen`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

/// Where the broker comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttMode {
    /// Use a broker already answering at the configured address, else start the embedded one.
    Auto,
    /// Always start the in-process broker on `mqtt.listen`.
    Embedded,
    /// Always connect to `mqtt.url`.
    External,
    /// No MQTT ingest.
    Off,
}

impl MqttMode {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MqttMode::Auto => "auto",
            MqttMode::Embedded => "embedded",
            MqttMode::External => "external",
            MqttMode::Off => "off",
        }
    }
}

/// A secret read from the config file or the environment; never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "SecretValue")]
pub struct Secret(pub String);

/// Environment overrides arrive as TOML values when they parse as one, so a numeric
/// password (`OUTPOST_MQTT__PASSWORD=1234`) must be accepted too.
#[derive(Deserialize)]
#[serde(untagged)]
enum SecretValue {
    Text(String),
    Int(i64),
}

impl From<SecretValue> for Secret {
    fn from(v: SecretValue) -> Self {
        match v {
            SecretValue::Text(s) => Secret(s),
            SecretValue::Int(i) => Secret(i.to_string()),
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// `[mqtt]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// `auto` (default), `embedded`, `external` or `off`.
    pub mode: MqttMode,
    /// The embedded broker's listener (default `0.0.0.0:1883`).
    pub listen: SocketAddr,
    /// The external broker: `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: Option<String>,
    /// The client id of the gateway's persistent session (default `outpost-gw-<gateway.id>`).
    pub client_id: Option<String>,
    /// Username at the external broker.
    pub username: Option<String>,
    /// Password at the external broker (prefer `OUTPOST_MQTT__PASSWORD` or `password_file`).
    pub password: Option<Secret>,
    /// A file holding the external broker's password (one line).
    pub password_file: Option<PathBuf>,
    /// PEM file with the CA certificates for `mqtts://` (default: the public web roots).
    pub ca_file: Option<PathBuf>,
    /// MQTT keep-alive in seconds (default 30).
    pub keep_alive_secs: u64,
    /// Largest MQTT packet accepted or sent, in bytes (default 256 KiB).
    pub max_packet_bytes: usize,
    /// Most punches in one message (default 1000); more is rejected as `too_large`.
    pub max_punches_per_message: usize,
    /// Unacknowledged QoS 1 messages in flight in each direction (default 1000).
    pub max_inflight: u16,
    /// Embedded broker: most simultaneous connections (default 512).
    pub max_connections: usize,
    /// First reconnect delay in ms (default 250); doubles, with jitter, per failure.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay in ms (default 30000).
    pub reconnect_max_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            mode: MqttMode::Auto,
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            url: None,
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            keep_alive_secs: 30,
            max_packet_bytes: 256 << 10,
            max_punches_per_message: 1000,
            max_inflight: 1000,
            max_connections: 512,
            reconnect_min_ms: 250,
            reconnect_max_ms: 30_000,
        }
    }
}

/// A parsed broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `mqtts://`.
    pub tls: bool,
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Why a broker URL cannot be used. Each message quotes the URL and says what to write.
#[derive(Debug, thiserror::Error)]
pub enum BrokerUrlError {
    /// Not `mqtt://`, `mqtts://`, `tcp://` or `ssl://`.
    #[error("`{url}` is not a broker URL: write mqtt://host:1883 or mqtts://host:8883")]
    Scheme {
        /// The URL as given.
        url: String,
    },
    /// A path, credentials, query or fragment.
    #[error("`{url}`: only scheme, host and port are allowed (credentials go in mqtt.username and mqtt.password_file)")]
    NotJustHostAndPort {
        /// The URL as given.
        url: String,
    },
    /// `[` without `]`.
    #[error("`{url}`: unclosed [ in the host")]
    UnclosedBracket {
        /// The URL as given.
        url: String,
    },
    /// Something after `]` that is not `:port`.
    #[error("`{url}`: unexpected `{rest}` after the host")]
    AfterHost {
        /// The URL as given.
        url: String,
        /// What follows the host.
        rest: String,
    },
    /// The port is not a number from 0 to 65535.
    #[error("`{url}`: bad port `{port}`")]
    BadPort {
        /// The URL as given.
        url: String,
        /// The port text.
        port: String,
        /// Why it does not parse.
        source: std::num::ParseIntError,
    },
    /// Port 0.
    #[error("`{url}`: port 0 is not a broker port")]
    PortZero {
        /// The URL as given.
        url: String,
    },
    /// No host.
    #[error("`{url}`: the host is missing")]
    NoHost {
        /// The URL as given.
        url: String,
    },
}

impl BrokerUrl {
    /// Parses `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (8883).
    /// `tcp://` and `ssl://` are accepted as synonyms. IPv6 hosts go in brackets.
    pub fn parse(s: &str) -> Result<BrokerUrl, BrokerUrlError> {
        let url = || s.to_string();
        let port = |p: &str| {
            p.parse::<u16>().map_err(|source| BrokerUrlError::BadPort {
                url: url(),
                port: p.to_string(),
                source,
            })
        };
        let (tls, rest) = if let Some(r) = s.strip_prefix("mqtt://").or(s.strip_prefix("tcp://")) {
            (false, r)
        } else if let Some(r) = s.strip_prefix("mqtts://").or(s.strip_prefix("ssl://")) {
            (true, r)
        } else {
            return Err(BrokerUrlError::Scheme { url: url() });
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '@', '?', '#']) {
            return Err(BrokerUrlError::NotJustHostAndPort { url: url() });
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| BrokerUrlError::UnclosedBracket { url: url() })?;
            let port = match after.strip_prefix(':') {
                Some(p) => port(p)?,
                None if after.is_empty() => default_port,
                None => {
                    return Err(BrokerUrlError::AfterHost {
                        url: url(),
                        rest: after.to_string(),
                    })
                }
            };
            (h.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), port(p)?),
                None => (rest.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(BrokerUrlError::NoHost { url: url() });
        }
        if port == 0 {
            return Err(BrokerUrlError::PortZero { url: url() });
        }
        Ok(BrokerUrl { host, port, tls })
    }
}

impl MqttConfig {
    /// Checks what types alone cannot. On error returns the key below `mqtt.` and what to
    /// change.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((k.to_string(), m));
        if let Some(url) = &self.url {
            let u = BrokerUrl::parse(url).map_err(|e| ("url".to_string(), e.to_string()))?;
            if self.ca_file.is_some() && !u.tls {
                return err("ca_file", "is only used with an mqtts:// url".into());
            }
        } else if self.mode == MqttMode::External {
            return err(
                "url",
                "is required when mqtt.mode = \"external\" (e.g. mqtt://127.0.0.1:1883)".into(),
            );
        }
        if self.password.is_some() && self.password_file.is_some() {
            return err(
                "password_file",
                "set either mqtt.password or mqtt.password_file, not both".into(),
            );
        }
        if (self.password.is_some() || self.password_file.is_some()) && self.username.is_none() {
            return err(
                "username",
                "is required when a password is configured".into(),
            );
        }
        if let Some(id) = &self.client_id {
            if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
                return err(
                    "client_id",
                    "must be 1 to 128 bytes without control characters".into(),
                );
            }
        }
        if !(5..=3600).contains(&self.keep_alive_secs) {
            return err("keep_alive_secs", "must be between 5 and 3600".into());
        }
        if !(1024..=(16 << 20)).contains(&self.max_packet_bytes) {
            return err(
                "max_packet_bytes",
                "must be between 1024 and 16777216".into(),
            );
        }
        if self.max_punches_per_message == 0 {
            return err("max_punches_per_message", "must be at least 1".into());
        }
        if self.max_inflight == 0 {
            return err("max_inflight", "must be between 1 and 65535".into());
        }
        if self.max_connections == 0 {
            return err("max_connections", "must be at least 1".into());
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            return err(
                "reconnect_min_ms",
                "must be at least 1 and at most mqtt.reconnect_max_ms".into(),
            );
        }
        if self.reconnect_max_ms > 600_000 {
            return err(
                "reconnect_max_ms",
                "must be at most 600000 (10 minutes)".into(),
            );
        }
        Ok(())
    }

    /// The client id of the gateway's session.
    pub fn client_id_for(&self, gateway_id: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("outpost-gw-{gateway_id}"))
    }

    /// The external broker, if `url` is set (validated by [`MqttConfig::validate`]).
    pub fn broker_url(&self) -> Option<BrokerUrl> {
        self.url.as_deref().and_then(|u| BrokerUrl::parse(u).ok())
    }

    /// The address `auto` probes: `url` if set, else `listen` on loopback when it is a
    /// wildcard address.
    pub fn probe_url(&self) -> BrokerUrl {
        self.broker_url().unwrap_or_else(|| BrokerUrl {
            host: connect_addr(self.listen).ip().to_string(),
            port: self.listen.port(),
            tls: false,
        })
    }
}

/// The address to connect to for a listener bound to `listen` (wildcards → loopback).
pub fn connect_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c: MqttConfig = toml::from_str("").unwrap();
        assert_eq!(c, MqttConfig::default());
        c.validate().unwrap();
        assert_eq!(c.mode, MqttMode::Auto);
        assert_eq!(c.listen.port(), 1883);
        assert_eq!(c.client_id_for("gw1"), "outpost-gw-gw1");
        assert_eq!(c.probe_url().to_string(), "mqtt://127.0.0.1:1883");
    }

    #[test]
    fn urls_parse() {
        let u = BrokerUrl::parse("mqtt://broker.local").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.tls),
            ("broker.local", 1883, false)
        );
        let u = BrokerUrl::parse("mqtts://10.0.0.2:8884/").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("10.0.0.2", 8884, true));
        let u = BrokerUrl::parse("mqtt://[::1]:1999").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 1999));
        assert_eq!(u.to_string(), "mqtt://[::1]:1999");
        assert_eq!(BrokerUrl::parse("ssl://h").unwrap().port, 8883);
        for bad in [
            "http://h",
            "h:1883",
            "mqtt://",
            "mqtt://h:x",
            "mqtt://u:p@h",
            "mqtt://h/topic",
            "mqtt://h:0",
            "mqtt://[::1",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
        // The port's parse error is kept as the source.
        let e = BrokerUrl::parse("mqtt://h:x").unwrap_err();
        assert!(matches!(e, BrokerUrlError::BadPort { .. }), "{e:?}");
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(e.to_string(), "`mqtt://h:x`: bad port `x`");
    }

    #[test]
    fn validation_names_the_key() {
        let bad = |toml_text: &str| {
            let c: MqttConfig = toml::from_str(toml_text).unwrap();
            c.validate().unwrap_err().0
        };
        assert_eq!(bad("mode = \"external\""), "url");
        assert_eq!(bad("url = \"http://x\""), "url");
        assert_eq!(bad("url = \"mqtt://x\"\nca_file = \"/ca.pem\""), "ca_file");
        assert_eq!(bad("password = \"p\""), "username");
        assert_eq!(
            bad("username = \"u\"\npassword = \"p\"\npassword_file = \"/f\""),
            "password_file"
        );
        assert_eq!(bad("keep_alive_secs = 1"), "keep_alive_secs");
        assert_eq!(bad("max_packet_bytes = 10"), "max_packet_bytes");
        assert_eq!(bad("max_inflight = 0"), "max_inflight");
        assert_eq!(
            bad("max_punches_per_message = 0"),
            "max_punches_per_message"
        );
        assert_eq!(bad("reconnect_min_ms = 50000"), "reconnect_min_ms");
        assert_eq!(bad("client_id = \"\""), "client_id");
        assert!(toml::from_str::<MqttConfig>("mode = \"sometimes\"").is_err());
        assert!(toml::from_str::<MqttConfig>("bogus = 1").is_err());
    }

    #[test]
    fn secrets_are_not_printed_and_numbers_are_accepted() {
        let c: MqttConfig = toml::from_str("username = \"u\"\npassword = 1234").unwrap();
        assert_eq!(c.password.as_ref().unwrap().0, "1234");
        assert!(!format!("{c:?}").contains("1234"));
    }

    #[test]
    fn probe_url_follows_url_or_listen() {
        let c: MqttConfig = toml::from_str("listen = \"192.168.1.5:1884\"").unwrap();
        assert_eq!(c.probe_url().to_string(), "mqtt://192.168.1.5:1884");
        let c: MqttConfig = toml::from_str("url = \"mqtt://b:1999\"").unwrap();
        assert_eq!(c.probe_url().to_string(), "mqtt://b:1999");
    }
}
