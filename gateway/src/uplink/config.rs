//! The `[uplink]` section of the gateway config: where the relay is, how to reach it, how
//! to batch, and how to behave when the link fails. `config/gateway.toml` documents every
//! key; DESIGN.md fixes the names `uplink.relays`, `uplink.token_file` and
//! `uplink.transport`.
//!
//! This module uses `link` (relay URLs) and `tls` (checking the TLS files); neither uses
//! it back: `tls` takes its settings as [`TlsSettings`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_ops::duration::deserialize_duration;
use serde::Deserialize;

use super::link::Endpoint;
pub use super::link::Transport;
use super::tls::{self, TlsSettings};

/// `[uplink]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UplinkConfig {
    /// `uplink.relays`: relay URLs, tried in order with failover. Empty = uplink off.
    pub relays: Vec<String>,
    /// `uplink.transport`: `"websocket"` or `"https"`. Unset: taken from the first relay
    /// URL's scheme (`ws`/`wss` → websocket, `http`/`https` → https).
    pub transport: Option<Transport>,
    /// `uplink.token_file`: the gateway's relay token (`outpost-relay gateway add`).
    /// Default `<data_dir>/relay.token`. The variable `OUTPOST_UPLINK_TOKEN` wins when set.
    pub token_file: Option<PathBuf>,
    /// `uplink.ca_file`: PEM file of the CA(s) to trust for `wss://`/`https://` instead of
    /// the built-in web roots (private relays).
    pub ca_file: Option<PathBuf>,
    /// `uplink.pinned_cert_sha256`: hex SHA-256 of the relay's certificate (DER). When set,
    /// only that exact certificate is accepted (no CA check, no name check).
    pub pinned_cert_sha256: Option<String>,
    /// `uplink.client_cert_file`: PEM file of the gateway's TLS client certificate (leaf
    /// first, optionally followed by intermediates), presented to the relay over
    /// `wss://`/`https://` (mutual TLS). Set together with `client_key_file`. With it, the
    /// relay token becomes optional: the relay knows the gateway by the certificate.
    pub client_cert_file: Option<PathBuf>,
    /// `uplink.client_key_file`: PEM file of the private key of `client_cert_file`
    /// (PKCS#8, PKCS#1 or SEC1).
    pub client_key_file: Option<PathBuf>,
    /// `uplink.batch_max_records`: records per batch at most (default 5000).
    pub batch_max_records: usize,
    /// `uplink.batch_max_bytes`: journal bytes (CBOR) per batch at most (default 1 MiB).
    pub batch_max_bytes: usize,
    /// `uplink.batch_max_age`: how long a record may wait for a fuller batch (default 1s).
    #[serde(deserialize_with = "deserialize_duration")]
    pub batch_max_age: Duration,
    /// `uplink.window`: batches in flight without an ack (default 8).
    pub window: usize,
    /// `uplink.backoff_min`: first wait after a failure (default 1s).
    #[serde(deserialize_with = "deserialize_duration")]
    pub backoff_min: Duration,
    /// `uplink.backoff_max`: longest wait between attempts (default 5m).
    #[serde(deserialize_with = "deserialize_duration")]
    pub backoff_max: Duration,
    /// `uplink.ping_interval`: WebSocket ping period (default 15s).
    #[serde(deserialize_with = "deserialize_duration")]
    pub ping_interval: Duration,
    /// `uplink.ping_timeout`: a link silent this long after a ping is dead (default 10s).
    #[serde(deserialize_with = "deserialize_duration")]
    pub ping_timeout: Duration,
    /// `uplink.connect_timeout`: TCP + TLS + upgrade must finish within this (default 15s).
    #[serde(deserialize_with = "deserialize_duration")]
    pub connect_timeout: Duration,
    /// `uplink.ack_timeout`: the oldest batch in flight must be acknowledged within this,
    /// or the link is restarted and the batch resent (default 60s).
    #[serde(deserialize_with = "deserialize_duration")]
    pub ack_timeout: Duration,
    /// `uplink.bandwidth_bytes_per_sec`: average upload cap in bytes/s; 0 = no cap.
    pub bandwidth_bytes_per_sec: u64,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            relays: Vec::new(),
            transport: None,
            token_file: None,
            ca_file: None,
            pinned_cert_sha256: None,
            client_cert_file: None,
            client_key_file: None,
            batch_max_records: 5000,
            batch_max_bytes: 1 << 20,
            batch_max_age: Duration::from_secs(1),
            window: 8,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            ping_interval: Duration::from_secs(15),
            ping_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(15),
            ack_timeout: Duration::from_secs(60),
            bandwidth_bytes_per_sec: 0,
        }
    }
}

/// Most batches in flight (the relay reads at most `limits.ws_pipeline` ahead anyway).
pub const MAX_WINDOW: usize = 256;

impl UplinkConfig {
    /// `true` when at least one relay is configured.
    pub fn enabled(&self) -> bool {
        !self.relays.is_empty()
    }

    /// The transport in use: the explicit setting, else the first URL's scheme.
    pub fn transport(&self) -> Transport {
        self.transport.unwrap_or_else(|| {
            match self
                .relays
                .first()
                .map(|u| u.split("://").next().unwrap_or(""))
            {
                Some("http") | Some("https") => Transport::Https,
                _ => Transport::Websocket,
            }
        })
    }

    /// `true` when a client certificate is configured (`uplink.client_cert_file` and
    /// `uplink.client_key_file`). It is only presented over TLS (`wss://`/`https://`).
    pub fn has_client_cert(&self) -> bool {
        self.client_cert_file.is_some() && self.client_key_file.is_some()
    }

    /// The token file.
    pub fn token_file(&self, data_dir: &Path) -> PathBuf {
        self.token_file
            .clone()
            .unwrap_or_else(|| data_dir.join("relay.token"))
    }

    /// Checks the values. The error is `(key, message)` with the key relative to
    /// `[uplink]`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for url in &self.relays {
            Endpoint::parse(url, self.transport())
                .map_err(|e| ("relays", format!("{url:?}: {e}")))?;
        }
        if self.batch_max_records == 0
            || self.batch_max_records as u64 > outpost_protocol::batch::MAX_BATCH_RECORDS
        {
            return Err((
                "batch_max_records",
                format!(
                    "must be between 1 and {}",
                    outpost_protocol::batch::MAX_BATCH_RECORDS
                ),
            ));
        }
        if self.batch_max_bytes < 1024 {
            return Err(("batch_max_bytes", "must be at least 1024".into()));
        }
        if self.window == 0 || self.window > MAX_WINDOW {
            return Err(("window", format!("must be between 1 and {MAX_WINDOW}")));
        }
        if self.backoff_min.is_zero() {
            return Err((
                "backoff_min",
                "must be more than 0 (for example \"1s\")".into(),
            ));
        }
        if self.backoff_max < self.backoff_min {
            return Err((
                "backoff_max",
                "must not be shorter than uplink.backoff_min".into(),
            ));
        }
        for (key, d) in [
            ("ping_interval", self.ping_interval),
            ("ping_timeout", self.ping_timeout),
            ("connect_timeout", self.connect_timeout),
            ("ack_timeout", self.ack_timeout),
        ] {
            if d.is_zero() {
                return Err((key, "must be more than 0 (for example \"10s\")".into()));
            }
        }
        let settings = TlsSettings::from(self);
        let tls_error = |e: tls::TlsError| (e.key().unwrap_or("ca_file"), e.problem());
        if let Some(pin) = settings.pinned_cert_sha256 {
            tls::parse_pin(pin).map_err(tls_error)?;
        }
        if let Some(ca) = settings.ca_file {
            tls::load_ca_file(ca).map_err(tls_error)?;
        }
        // Both or neither, and the pair must load and match: a wrong file is a
        // configuration error at start (and in check-config), not a retry loop later.
        tls::client_identity(&settings).map_err(tls_error)?;
        Ok(())
    }
}

impl<'a> From<&'a UplinkConfig> for TlsSettings<'a> {
    fn from(c: &'a UplinkConfig) -> Self {
        TlsSettings {
            ca_file: c.ca_file.as_deref(),
            pinned_cert_sha256: c.pinned_cert_sha256.as_deref(),
            client_cert_file: c.client_cert_file.as_deref(),
            client_key_file: c.client_key_file.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_off() {
        let c: UplinkConfig = toml::from_str("").unwrap();
        assert_eq!(c, UplinkConfig::default());
        assert!(!c.enabled());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn parses_and_infers_transport() {
        let c: UplinkConfig = toml::from_str(
            "relays = [\"https://relay.example.org\"]\nbatch_max_age = \"250ms\"\nwindow = 4",
        )
        .unwrap();
        assert_eq!(c.transport(), Transport::Https);
        assert_eq!(c.batch_max_age, Duration::from_millis(250));
        assert!(c.validate().is_ok());
        let c: UplinkConfig =
            toml::from_str("relays = [\"wss://r.example.org\"]\ntransport = \"https\"").unwrap();
        assert_eq!(c.transport(), Transport::Https);
        let c: UplinkConfig = toml::from_str("relays = [\"ws://127.0.0.1:7000\"]").unwrap();
        assert_eq!(c.transport(), Transport::Websocket);
    }

    #[test]
    fn bad_values_name_the_key() {
        let bad = |s: &str| {
            toml::from_str::<UplinkConfig>(s)
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|(k, m)| format!("{k}: {m}")))
                .unwrap_err()
        };
        assert!(bad("relays = [\"ftp://x\"]").starts_with("relays"));
        assert!(bad("relays = [\"not a url\"]").starts_with("relays"));
        assert!(bad("window = 0").starts_with("window"));
        assert!(bad("batch_max_records = 0").starts_with("batch_max_records"));
        assert!(bad("backoff_min = \"10s\"\nbackoff_max = \"1s\"").starts_with("backoff_max"));
        assert!(bad("pinned_cert_sha256 = \"abc\"").starts_with("pinned_cert_sha256"));
        assert!(bad("ca_file = \"/nonexistent/ca.pem\"").starts_with("ca_file"));
        assert!(toml::from_str::<UplinkConfig>("relay = []").is_err());
    }

    #[test]
    fn client_cert_and_key_go_together() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["gw-1".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_file, key_file) = (dir.path().join("gw.pem"), dir.path().join("gw.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not PEM").unwrap();
        let load = |pairs: &[(&str, &Path)]| {
            outpost_ops::config::load_validated::<crate::config::Config>(
                None,
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.display().to_string())),
            )
        };
        const CERT: &str = "OUTPOST_UPLINK__CLIENT_CERT_FILE";
        const KEY: &str = "OUTPOST_UPLINK__CLIENT_KEY_FILE";

        // Both, through the environment overrides.
        let c = load(&[(CERT, &cert_file), (KEY, &key_file)]).unwrap();
        assert_eq!(
            c.uplink.client_cert_file.as_deref(),
            Some(cert_file.as_path())
        );
        assert_eq!(
            c.uplink.client_key_file.as_deref(),
            Some(key_file.as_path())
        );
        assert!(c.uplink.has_client_cert());
        assert!(!UplinkConfig::default().has_client_cert());

        // Only one: the error names the other key.
        let e = load(&[(CERT, &cert_file)]).unwrap_err().to_string();
        assert!(
            e.contains("uplink.client_key_file") && e.contains("must be set"),
            "{e}"
        );
        let e = load(&[(KEY, &key_file)]).unwrap_err().to_string();
        assert!(
            e.contains("uplink.client_cert_file") && e.contains("must be set"),
            "{e}"
        );

        // Unreadable or not PEM: named too.
        let missing = dir.path().join("missing.pem");
        let e = load(&[(CERT, &missing), (KEY, &key_file)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("uplink.client_cert_file") && e.contains("cannot read"),
            "{e}"
        );
        let e = load(&[(CERT, &cert_file), (KEY, &junk)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("uplink.client_key_file") && e.contains("no PEM private key"),
            "{e}"
        );

        // A key that is not the certificate's.
        let other = dir.path().join("other.key");
        std::fs::write(&other, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let e = load(&[(CERT, &cert_file), (KEY, &other)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("uplink.client_key_file") && e.contains("does not match"),
            "{e}"
        );
    }
}
