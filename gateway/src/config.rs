//! Gateway configuration: a TOML file, environment overrides, and validation.
//!
//! Every key has a default, so `outpost-gateway` runs with no file at all. Any key can be
//! overridden by an environment variable named `OUTPOST_<SECTION>__<KEY>` (upper case, two
//! underscores between levels), e.g. `OUTPOST_HTTP__LISTEN=127.0.0.1:9000`. The value is
//! read as a TOML value when it parses as one (`true`, `42`, `["a"]`) and as a string
//! otherwise (`outpost_ops::env`, shared with the relay). Unknown keys are errors, and
//! every error names the key and the reason.
//!
//! `config/gateway.toml` documents every key.

use std::net::SocketAddr;
use std::path::PathBuf;

use outpost_ops::config::Validate;
use serde::Deserialize;

use crate::ingest::adms::AdmsConfig;
use crate::ingest::mqtt::MqttConfig;
use crate::journal::JournalConfig;
use crate::uplink::UplinkConfig;

/// Why the configuration could not be loaded (shared with the relay: the same file and
/// environment conventions give the same messages).
pub use outpost_ops::config::ConfigError;

/// The whole gateway configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[gateway]`: identity and data directory.
    pub gateway: GatewaySection,
    /// `[http]`: the local HTTP API.
    pub http: HttpSection,
    /// `[auth]`: device and admin credentials.
    pub auth: AuthSection,
    /// `[journal]`: the durable store.
    pub journal: JournalConfig,
    /// `[adms]`: ZKTeco terminals.
    pub adms: AdmsConfig,
    /// `[mqtt]`: MQTT ingest and the embedded broker.
    pub mqtt: MqttConfig,
    /// `[uplink]`: forwarding to the relay.
    pub uplink: UplinkConfig,
    /// `[log]`: logging.
    pub log: LogSection,
}

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySection {
    /// Unique id of this box (default: the host name).
    pub id: String,
    /// The facility code, e.g. `HC001` (default `default`).
    pub site: String,
    /// Where the journal and credentials live (default `./outpost-data`).
    pub data_dir: PathBuf,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            id: default_gateway_id(),
            site: "default".into(),
            data_dir: PathBuf::from("./outpost-data"),
        }
    }
}

fn default_gateway_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| outpost_protocol::Id::new_topic_safe(s).is_ok())
        .unwrap_or_else(|| "gateway".into())
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Listen address of the local API (default `0.0.0.0:8080`).
    pub listen: SocketAddr,
    /// Largest accepted request body in bytes (default 1 MiB); larger gets 413.
    pub max_body_bytes: usize,
    /// Most punches in one `POST /v1/punches` array (default 1000); more gets 413.
    pub max_punches_per_request: usize,
    /// Sustained requests per second allowed per device (default 20); 0 disables the limit.
    pub rate_limit_per_second: u32,
    /// Requests a device may burst above the sustained rate (default 100).
    pub rate_limit_burst: u32,
    /// Most concurrent connections (default 512); more wait in the accept queue.
    pub max_connections: usize,
    /// Seconds a request may take before it is cut off with 408 (default 30).
    pub request_timeout_secs: u64,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            max_body_bytes: 1 << 20,
            max_punches_per_request: 1000,
            rate_limit_per_second: 20,
            rate_limit_burst: 100,
            max_connections: 512,
            request_timeout_secs: 30,
        }
    }
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Devices must present a bearer token (default true). `false` is lab mode: anyone on
    /// the network may post punches for any device, and the gateway logs a loud warning.
    pub required: bool,
    /// Device credentials (hashes only). Default `<data_dir>/devices`.
    pub devices_file: Option<PathBuf>,
    /// The admin token for `/v1/status`, exports and the CLI. Default
    /// `<data_dir>/admin.token`, created (mode 0600) at first start if missing.
    pub admin_token_file: Option<PathBuf>,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            required: true,
            devices_file: None,
            admin_token_file: None,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// `pretty` (default) or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `outpost_gateway=debug` (default
    /// `info,rumqttd=off`).
    /// `RUST_LOG`, when set, wins.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Pretty,
            level: DEFAULT_LOG_LEVEL.into(),
        }
    }
}

/// The default log filter. The embedded MQTT broker (rumqttd) logs every connection, and
/// ERROR lines on ordinary disconnects, so it is silenced unless asked for.
pub const DEFAULT_LOG_LEVEL: &str = "info,rumqttd=off";

pub use outpost_ops::logging::LogFormat;

impl Validate for Config {
    /// Checks values that types alone cannot.
    fn validate(&self) -> Result<(), ConfigError> {
        outpost_protocol::Id::new_topic_safe(&self.gateway.id)
            .map_err(|e| ConfigError::key("gateway.id", format!("{e} (1-64 bytes, no / + #)")))?;
        outpost_protocol::Id::new_topic_safe(&self.gateway.site)
            .map_err(|e| ConfigError::key("gateway.site", format!("{e} (1-64 bytes, no / + #)")))?;
        if self.gateway.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::key("gateway.data_dir", "must not be empty"));
        }
        if self.http.max_body_bytes < 1024 {
            return Err(ConfigError::key(
                "http.max_body_bytes",
                "must be at least 1024",
            ));
        }
        if self.http.max_punches_per_request == 0 {
            return Err(ConfigError::key(
                "http.max_punches_per_request",
                "must be at least 1",
            ));
        }
        if self.http.max_connections == 0 {
            return Err(ConfigError::key(
                "http.max_connections",
                "must be at least 1",
            ));
        }
        if self.http.request_timeout_secs == 0 {
            return Err(ConfigError::key(
                "http.request_timeout_secs",
                "must be at least 1",
            ));
        }
        outpost_ops::logging::check_filter(&self.log.level)
            .map_err(|e| ConfigError::key("log.level", e.to_string()))?;
        self.journal
            .validate()
            .map_err(|(key, msg)| ConfigError::key(format!("journal.{key}"), msg))?;
        self.adms
            .validate()
            .map_err(|(key, msg)| ConfigError::key(format!("adms.{key}"), msg))?;
        self.mqtt
            .validate()
            .map_err(|(key, msg)| ConfigError::key(format!("mqtt.{key}"), msg))?;
        self.uplink
            .validate()
            .map_err(|(key, msg)| ConfigError::key(format!("uplink.{key}"), msg))?;
        Ok(())
    }
}

impl Config {
    /// The device credentials file.
    pub fn devices_file(&self) -> PathBuf {
        self.auth
            .devices_file
            .clone()
            .unwrap_or_else(|| self.gateway.data_dir.join("devices"))
    }

    /// The admin token file.
    pub fn admin_token_file(&self) -> PathBuf {
        self.auth
            .admin_token_file
            .clone()
            .unwrap_or_else(|| self.gateway.data_dir.join("admin.token"))
    }

    /// The journal directory.
    pub fn journal_dir(&self) -> PathBuf {
        self.gateway.data_dir.join("journal")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_ops::config::load_validated;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let c = load_validated::<Config>(None, env(&[])).unwrap();
        assert_eq!(c.http.listen.port(), 8080);
        assert!(c.auth.required);
        assert_eq!(c.gateway.data_dir, PathBuf::from("./outpost-data"));
    }

    #[test]
    fn env_overrides_apply_and_are_typed() {
        let c = load_validated::<Config>(
            None,
            env(&[
                ("OUTPOST_HTTP__LISTEN", "127.0.0.1:9000"),
                ("OUTPOST_AUTH__REQUIRED", "false"),
                ("OUTPOST_GATEWAY__SITE", "HC001"),
                ("OUTPOST_CONFIG", "/ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:9000".parse().unwrap());
        assert!(!c.auth.required);
        assert_eq!(c.gateway.site, "HC001");
    }

    #[test]
    fn errors_name_the_key() {
        let e = load_validated::<Config>(None, env(&[("OUTPOST_HTTP__LISTEN", "not-an-address")]))
            .unwrap_err();
        assert!(e.to_string().contains("http.listen"), "{e}");
        let e = load_validated::<Config>(None, env(&[("OUTPOST_HTTP__LISTN", "1")])).unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
        let e =
            load_validated::<Config>(None, env(&[("OUTPOST_GATEWAY__SITE", "a/b")])).unwrap_err();
        assert!(e.to_string().contains("gateway.site"), "{e}");
    }

    #[test]
    fn file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.toml");
        std::fs::write(
            &p,
            "[gateway]\nid = \"gw-1\"\nsite = \"HC001\"\n[http]\nmax_body_bytes = 4096\n",
        )
        .unwrap();
        let c = load_validated::<Config>(Some(&p), env(&[])).unwrap();
        assert_eq!(c.gateway.id, "gw-1");
        assert_eq!(c.http.max_body_bytes, 4096);
        std::fs::write(&p, "[gateway\n").unwrap();
        assert!(matches!(
            load_validated::<Config>(Some(&p), env(&[])),
            Err(ConfigError::Syntax { .. })
        ));
    }
}
