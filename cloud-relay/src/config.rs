//! Relay configuration: a TOML file, environment overrides, and validation.
//!
//! Every key has a default except the TLS files: the relay serves HTTPS unless
//! `tls.disabled = true` (local development only). Any key can be overridden by an
//! environment variable `OUTPOST_<SECTION>__<KEY>` (upper case, two underscores between
//! levels), e.g. `OUTPOST_RELAY__LISTEN=127.0.0.1:9000`. The value is read as a TOML value
//! when it parses as one (`true`, `42`) and as a string otherwise (`outpost_ops::env`,
//! shared with the gateway). Unknown keys are errors, and every error names the key and the
//! reason. Secrets (the database URL with its password, TLS keys, the admin token) come from
//! files or the environment, never from the command line. `config/relay.toml` documents
//! every key.

use std::net::SocketAddr;
use std::path::PathBuf;

use outpost_ops::config::Validate;
use serde::Deserialize;

/// Why the configuration could not be loaded (shared with the gateway: the same file and
/// environment conventions give the same messages).
pub use outpost_ops::config::ConfigError;

/// The whole relay configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[relay]`: listening address, data directory, shutdown.
    pub relay: RelaySection,
    /// `[tls]`: certificates.
    pub tls: TlsSection,
    /// `[store]`: sled or PostgreSQL.
    pub store: StoreSection,
    /// `[auth]`: gateway credentials and the admin token.
    pub auth: AuthSection,
    /// `[limits]`: sizes, counts, timeouts.
    pub limits: LimitsSection,
    /// `[log]`: logging.
    pub log: LogSection,
    /// `[outputs]`: webhooks and NATS streams that receive every stored punch.
    pub outputs: crate::outputs::config::OutputsSection,
}

/// `[relay]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelaySection {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Where the sled store, the gateways file and the admin token live.
    pub data_dir: PathBuf,
    /// How long shutdown waits for in-flight commits and connections, seconds.
    pub shutdown_grace_secs: u64,
}

impl Default for RelaySection {
    fn default() -> Self {
        RelaySection {
            listen: SocketAddr::from(([0, 0, 0, 0], 7000)),
            data_dir: PathBuf::from("./outpost-relay-data"),
            shutdown_grace_secs: 15,
        }
    }
}

/// `[tls]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// Serve plain HTTP (local development only).
    pub disabled: bool,
    /// PEM certificate chain.
    pub cert_file: Option<PathBuf>,
    /// PEM private key.
    pub key_file: Option<PathBuf>,
    /// PEM CA certificate(s) for client certificates (mTLS). When set, gateways may
    /// authenticate with a certificate issued by this CA and registered with
    /// `outpost-relay gateway add ID --site SITE --cert FILE` instead of a token.
    pub client_ca_file: Option<PathBuf>,
}

/// Which store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Embedded sled in `relay.data_dir/store`.
    #[default]
    Sled,
    /// PostgreSQL at `store.url`.
    Postgres,
}

/// `store.tls`: how the relay protects its connections to PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PgTlsMode {
    /// Plain TCP: the password and every punch cross the network readable. Only for a
    /// database on the same host or on a network you trust.
    Disable,
    /// TLS without checking the server's certificate (libpq's `sslmode=require`): stops
    /// eavesdroppers, not an attacker who can redirect the connection.
    Require,
    /// TLS; the server's certificate must chain to `store.ca_file` (the public web roots
    /// when unset) and name the host of `store.url` (libpq's `sslmode=verify-full`).
    VerifyFull,
}

impl PgTlsMode {
    /// The config value (`"verify-full"`), for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            PgTlsMode::Disable => "disable",
            PgTlsMode::Require => "require",
            PgTlsMode::VerifyFull => "verify-full",
        }
    }
}

impl std::fmt::Display for PgTlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Takes libpq's `sslmode=verify-full` out of a PostgreSQL URL (tokio-postgres parses only
/// `disable`, `prefer` and `require`) and reports it, so a URL copied from a managed
/// database's console works. Both the URL form (`postgres://…?sslmode=verify-full`) and the
/// key-value form (`host=… sslmode=verify-full`) are understood. `sslmode=verify-ca` is
/// refused: the relay always checks the host name when it checks the certificate.
///
/// Returns the URL for tokio-postgres and `Some(VerifyFull)` when the URL asked for it; the
/// other `sslmode` values stay in the URL for tokio-postgres (see [`StoreSection::tls`]).
pub fn pg_url_sslmode(key: &str, url: &str) -> Result<(String, Option<PgTlsMode>), ConfigError> {
    const VERIFY_FULL: &str = "sslmode=verify-full";
    if url.contains("sslmode=verify-ca") {
        return Err(ConfigError::key(
            key,
            "sslmode=verify-ca is not supported: use sslmode=verify-full (which also checks the host name) or set store.tls",
        ));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), None));
        };
        let kept: Vec<&str> = query.split('&').filter(|p| *p != VERIFY_FULL).collect();
        if kept.len() == query.split('&').count() {
            return Ok((url.to_string(), None));
        }
        let url = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((url, Some(PgTlsMode::VerifyFull)));
    }
    // Key-value form: drop whitespace-separated `sslmode=verify-full` tokens only, so quoted
    // values elsewhere stay byte for byte.
    let mut out = String::with_capacity(url.len());
    let mut copied = 0;
    for (at, _) in url.match_indices(VERIFY_FULL) {
        let end = at + VERIFY_FULL.len();
        let starts = url[..at]
            .chars()
            .next_back()
            .is_none_or(char::is_whitespace);
        let ends = url[end..].chars().next().is_none_or(char::is_whitespace);
        if starts && ends {
            out.push_str(&url[copied..at]);
            copied = end;
        }
    }
    if copied == 0 {
        return Ok((url.to_string(), None));
    }
    out.push_str(&url[copied..]);
    Ok((out, Some(PgTlsMode::VerifyFull)))
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// `sled` or `postgres`.
    pub kind: StoreKind,
    /// PostgreSQL URL (`postgres://user:password@host:port/db`).
    pub url: Option<String>,
    /// A file holding the PostgreSQL URL (keeps the password out of the config file).
    pub url_file: Option<PathBuf>,
    /// PostgreSQL connection pool size.
    pub pool_size: usize,
    /// sled page cache, bytes.
    pub sled_cache_bytes: u64,
    /// TLS to PostgreSQL. Unset: the URL's `sslmode` decides (`require`, `verify-full`),
    /// and without one the connection is plain (as before this key existed). Set, it wins
    /// over the URL.
    pub tls: Option<PgTlsMode>,
    /// PEM CA certificate(s) that issued the PostgreSQL server's certificate, for
    /// `verify-full`; unset = the public web roots (managed databases with public CAs).
    pub ca_file: Option<PathBuf>,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            kind: StoreKind::Sled,
            url: None,
            url_file: None,
            pool_size: 16,
            sled_cache_bytes: 64 << 20,
            tls: None,
            ca_file: None,
        }
    }
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Gateway credentials (hashes); default `<relay.data_dir>/gateways`.
    pub gateways_file: Option<PathBuf>,
    /// The admin token for the query API; default `<relay.data_dir>/admin.token`,
    /// created at first start.
    pub admin_token_file: Option<PathBuf>,
    /// Named read tokens for the query API (hashes); default `<relay.data_dir>/readers`.
    pub readers_file: Option<PathBuf>,
    /// How often the running relay checks the gateways file for changes, ms.
    pub reload_interval_ms: u64,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            gateways_file: None,
            admin_token_file: None,
            readers_file: None,
            reload_interval_ms: 2000,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Largest frame (HTTP body or WebSocket message), bytes.
    pub max_frame_bytes: u32,
    /// Largest decompressed payload, bytes.
    pub max_raw_bytes: u32,
    /// Most records in one batch.
    pub max_records_per_batch: usize,
    /// Most open TCP connections; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Most batches being decoded or committed at once (bounds memory).
    pub max_concurrent_batches: usize,
    /// Batches one WebSocket may have in flight (read ahead of their acks).
    pub ws_pipeline: usize,
    /// WebSocket ping interval, seconds.
    pub ws_ping_interval_secs: u64,
    /// Close a WebSocket after this long without anything from the client, seconds.
    pub ws_idle_timeout_secs: u64,
    /// Time limit for one HTTP request, seconds.
    pub request_timeout_secs: u64,
    /// Time limit for a TLS handshake and request headers, seconds.
    pub handshake_timeout_secs: u64,
    /// Most items per page of the query API.
    pub max_query_limit: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_frame_bytes: 4 << 20,
            max_raw_bytes: 16 << 20,
            max_records_per_batch: 10_000,
            max_connections: 10_000,
            max_concurrent_batches: 64,
            ws_pipeline: 8,
            ws_ping_interval_secs: 30,
            ws_idle_timeout_secs: 90,
            request_timeout_secs: 60,
            handshake_timeout_secs: 10,
            max_query_limit: 1000,
        }
    }
}

pub use outpost_ops::logging::LogFormat;

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// A tracing filter (`info`, `outpost_relay=debug,info`); `RUST_LOG` wins when set.
    pub level: String,
    /// `pretty` or `json`.
    pub format: LogFormat,
}

/// The relay's default log filter (also used when `log.level` does not parse).
pub const DEFAULT_LOG_LEVEL: &str = "info";

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: DEFAULT_LOG_LEVEL.into(),
            format: LogFormat::Pretty,
        }
    }
}

impl Validate for Config {
    /// Checks values that types alone cannot.
    fn validate(&self) -> Result<(), ConfigError> {
        self.outputs.validate()?;
        if self.relay.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::key("relay.data_dir", "must not be empty"));
        }
        if !self.tls.disabled {
            if self.tls.cert_file.is_none() {
                return Err(ConfigError::key(
                    "tls.cert_file",
                    "is required (a PEM certificate chain); set tls.disabled = true only for local development",
                ));
            }
            if self.tls.key_file.is_none() {
                return Err(ConfigError::key(
                    "tls.key_file",
                    "is required (a PEM private key) when TLS is enabled",
                ));
            }
        }
        if self.tls.disabled && self.tls.client_ca_file.is_some() {
            return Err(ConfigError::key(
                "tls.client_ca_file",
                "needs TLS: client certificates cannot be used with tls.disabled = true",
            ));
        }
        if self.store.kind == StoreKind::Postgres {
            if self.store.url.is_some() && self.store.url_file.is_some() {
                return Err(ConfigError::key(
                    "store.url",
                    "set either store.url or store.url_file, not both",
                ));
            }
            if self.store.url.is_none() && self.store.url_file.is_none() {
                return Err(ConfigError::key(
                    "store.url",
                    "is required when store.kind = \"postgres\" (or set store.url_file)",
                ));
            }
            if let Some(url) = &self.store.url {
                check_pg_url("store.url", url)?;
            }
            if self.store.pool_size == 0 {
                return Err(ConfigError::key("store.pool_size", "must be at least 1"));
            }
            if let Some(ca) = &self.store.ca_file {
                if ca.as_os_str().is_empty() {
                    return Err(ConfigError::key("store.ca_file", "must not be empty"));
                }
                if let Some(mode @ (PgTlsMode::Disable | PgTlsMode::Require)) = self.store.tls {
                    return Err(ConfigError::key(
                        "store.ca_file",
                        format!(
                            "is only used with store.tls = \"verify-full\", but store.tls is \"{mode}\": set store.tls = \"verify-full\" to check the server's certificate, or remove store.ca_file"
                        ),
                    ));
                }
            }
        }
        let l = &self.limits;
        if l.max_frame_bytes < 1024 {
            return Err(ConfigError::key(
                "limits.max_frame_bytes",
                "must be at least 1024",
            ));
        }
        if l.max_raw_bytes < 1024 {
            return Err(ConfigError::key(
                "limits.max_raw_bytes",
                "must be at least 1024",
            ));
        }
        for (key, v) in [
            ("limits.max_records_per_batch", l.max_records_per_batch),
            ("limits.max_connections", l.max_connections),
            ("limits.max_concurrent_batches", l.max_concurrent_batches),
            ("limits.ws_pipeline", l.ws_pipeline),
            ("limits.max_query_limit", l.max_query_limit),
        ] {
            if v == 0 {
                return Err(ConfigError::key(key, "must be at least 1"));
            }
        }
        for (key, v) in [
            ("limits.ws_ping_interval_secs", l.ws_ping_interval_secs),
            ("limits.ws_idle_timeout_secs", l.ws_idle_timeout_secs),
            ("limits.request_timeout_secs", l.request_timeout_secs),
            ("limits.handshake_timeout_secs", l.handshake_timeout_secs),
            ("auth.reload_interval_ms", self.auth.reload_interval_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::key(key, "must be at least 1"));
            }
        }
        if l.ws_idle_timeout_secs <= l.ws_ping_interval_secs {
            return Err(ConfigError::key(
                "limits.ws_idle_timeout_secs",
                "must be longer than limits.ws_ping_interval_secs, or live clients are dropped between pings",
            ));
        }
        outpost_ops::logging::check_filter(&self.log.level)
            .map_err(|e| ConfigError::key("log.level", e.to_string()))?;
        Ok(())
    }
}

impl Config {
    /// The gateways credentials file.
    pub fn gateways_file(&self) -> PathBuf {
        self.auth
            .gateways_file
            .clone()
            .unwrap_or_else(|| self.relay.data_dir.join("gateways"))
    }

    /// The admin token file.
    pub fn admin_token_file(&self) -> PathBuf {
        self.auth
            .admin_token_file
            .clone()
            .unwrap_or_else(|| self.relay.data_dir.join("admin.token"))
    }

    /// The read tokens file.
    pub fn readers_file(&self) -> PathBuf {
        self.auth
            .readers_file
            .clone()
            .unwrap_or_else(|| self.relay.data_dir.join("readers"))
    }

    /// The sled store directory.
    pub fn sled_dir(&self) -> PathBuf {
        self.relay.data_dir.join("store")
    }

    /// The PostgreSQL URL, read from `store.url_file` when that is set.
    pub fn store_url(&self) -> Result<String, ConfigError> {
        if let Some(url) = &self.store.url {
            return Ok(url.clone());
        }
        let Some(file) = &self.store.url_file else {
            return Err(ConfigError::key("store.url", "is required for PostgreSQL"));
        };
        let url = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::key("store.url_file", format!("{}: {e}", file.display())))?
            .trim()
            .to_string();
        check_pg_url("store.url_file", &url)?;
        Ok(url)
    }
}

fn check_pg_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let (url, _) = pg_url_sslmode(key, url)?;
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| {
            ConfigError::key(
                key,
                format!(
                    "not a PostgreSQL URL ({e}); expected postgres://user:password@host:port/db"
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_ops::config::load_validated;
    use std::path::Path;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    const DEV: &[(&str, &str)] = &[("OUTPOST_TLS__DISABLED", "true")];

    #[test]
    fn defaults_need_tls_or_tls_disabled() {
        let e = load_validated::<Config>(None, env(&[])).unwrap_err();
        assert!(e.to_string().contains("tls.cert_file"), "{e}");
        let c = load_validated::<Config>(None, env(DEV)).unwrap();
        assert_eq!(c.relay.listen.to_string(), "0.0.0.0:7000");
        assert_eq!(c.store.kind, StoreKind::Sled);
        assert_eq!(c.admin_token_file(), c.relay.data_dir.join("admin.token"));
    }

    #[test]
    fn env_overrides_apply_and_are_typed() {
        let c = load_validated::<Config>(
            None,
            env(&[
                ("OUTPOST_TLS__DISABLED", "true"),
                ("OUTPOST_RELAY__LISTEN", "127.0.0.1:9000"),
                ("OUTPOST_LIMITS__MAX_FRAME_BYTES", "65536"),
                ("OUTPOST_STORE__KIND", "postgres"),
                (
                    "OUTPOST_STORE__URL",
                    "postgres://u:p@127.0.0.1:5433/outpost",
                ),
                ("OUTPOST_CONFIG", "/ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.relay.listen.port(), 9000);
        assert_eq!(c.limits.max_frame_bytes, 65536);
        assert_eq!(
            c.store_url().unwrap(),
            "postgres://u:p@127.0.0.1:5433/outpost"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let with = |extra: &[(&str, &str)]| {
            let mut all = DEV.to_vec();
            all.extend_from_slice(extra);
            load_validated::<Config>(None, env(&all))
                .unwrap_err()
                .to_string()
        };
        assert!(with(&[("OUTPOST_RELAY__LISTEN", "nowhere")]).contains("relay.listen"));
        assert!(with(&[("OUTPOST_RELAY__LISTN", "1")]).contains("listn"));
        assert!(with(&[("OUTPOST_STORE__KIND", "mongo")]).contains("store.kind"));
        assert!(with(&[("OUTPOST_STORE__KIND", "postgres")]).contains("store.url"));
        assert!(with(&[
            ("OUTPOST_STORE__KIND", "postgres"),
            ("OUTPOST_STORE__URL", "mysql://x")
        ])
        .contains("store.url"));
        assert!(with(&[("OUTPOST_LIMITS__MAX_RAW_BYTES", "10")]).contains("limits.max_raw_bytes"));
        assert!(with(&[("OUTPOST_LIMITS__WS_IDLE_TIMEOUT_SECS", "5")])
            .contains("limits.ws_idle_timeout_secs"));
        assert!(with(&[("OUTPOST_LOG__FORMAT", "xml")]).contains("log.format"));
    }

    fn postgres(extra: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut all = DEV.to_vec();
        all.extend_from_slice(&[
            ("OUTPOST_STORE__KIND", "postgres"),
            ("OUTPOST_STORE__URL", "postgres://u@db.example:5432/outpost"),
        ]);
        all.extend_from_slice(extra);
        load_validated::<Config>(None, env(&all))
    }

    #[test]
    fn store_tls_keys_parse() {
        let c = postgres(&[]).unwrap();
        assert_eq!(c.store.tls, None, "unset: the URL's sslmode decides");
        assert_eq!(c.store.ca_file, None);
        let c = postgres(&[
            ("OUTPOST_STORE__TLS", "verify-full"),
            ("OUTPOST_STORE__CA_FILE", "/etc/outpost/pg-ca.pem"),
        ])
        .unwrap();
        assert_eq!(c.store.tls, Some(PgTlsMode::VerifyFull));
        assert_eq!(
            c.store.ca_file.as_deref(),
            Some(Path::new("/etc/outpost/pg-ca.pem"))
        );
        for (value, mode) in [
            ("disable", PgTlsMode::Disable),
            ("require", PgTlsMode::Require),
        ] {
            let c = postgres(&[("OUTPOST_STORE__TLS", value)]).unwrap();
            assert_eq!(c.store.tls, Some(mode));
            assert_eq!(mode.to_string(), value);
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(
            &file,
            "[tls]\ndisabled = true\n[store]\nkind = \"postgres\"\nurl = \"postgres://u@db/x\"\ntls = \"verify-full\"\nca_file = \"/ca.pem\"\n",
        )
        .unwrap();
        let c = load_validated::<Config>(Some(&file), env(&[])).unwrap();
        assert_eq!(c.store.tls, Some(PgTlsMode::VerifyFull));
        assert_eq!(c.store.ca_file.as_deref(), Some(Path::new("/ca.pem")));
    }

    #[test]
    fn store_tls_errors_name_the_key() {
        let e = postgres(&[("OUTPOST_STORE__TLS", "verify_full")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.tls") && e.contains("verify-full"), "{e}");
        let e = postgres(&[("OUTPOST_STORE__TLS", "prefer")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.tls"), "{e}");
        for mode in ["disable", "require"] {
            let e = postgres(&[
                ("OUTPOST_STORE__TLS", mode),
                ("OUTPOST_STORE__CA_FILE", "/ca.pem"),
            ])
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("store.ca_file") && e.contains("verify-full"),
                "{e}"
            );
        }
        let e = postgres(&[("OUTPOST_STORE__CA_FILE", "")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.ca_file"), "{e}");
        let e = postgres(&[("OUTPOST_STORE__URL", "postgres://u@db/x?sslmode=verify-ca")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.url") && e.contains("verify-full"), "{e}");
        // Unset store.tls with a CA file is left to the URL (sslmode=verify-full); the
        // store refuses it at connect when the URL does not ask for verification.
        let c = postgres(&[
            (
                "OUTPOST_STORE__URL",
                "postgres://u@db/x?sslmode=verify-full",
            ),
            ("OUTPOST_STORE__CA_FILE", "/ca.pem"),
        ])
        .unwrap();
        assert_eq!(c.store.tls, None);
    }

    #[test]
    fn url_sslmode_verify_full_is_taken_out_for_tokio_postgres() {
        let split = |url: &str| pg_url_sslmode("store.url", url).unwrap();
        let vf = Some(PgTlsMode::VerifyFull);
        assert_eq!(
            split("postgres://u:p@db:5432/x?sslmode=verify-full"),
            ("postgres://u:p@db:5432/x".to_string(), vf)
        );
        assert_eq!(
            split("postgresql://u@db/x?application_name=r&sslmode=verify-full&connect_timeout=3"),
            (
                "postgresql://u@db/x?application_name=r&connect_timeout=3".to_string(),
                vf
            )
        );
        for same in [
            "postgres://u@db/x",
            "postgres://u@db/x?sslmode=require",
            "postgres://u@db/x?sslmode=disable&application_name=r",
            "host=db user=u sslmode=require",
            "host=db password='sslmode=verify-fullx' user=u",
        ] {
            assert_eq!(split(same), (same.to_string(), None), "{same}");
        }
        assert_eq!(
            split("host=db user=u sslmode=verify-full dbname=x"),
            ("host=db user=u  dbname=x".to_string(), vf)
        );
        assert_eq!(
            split("sslmode=verify-full host=db"),
            (" host=db".to_string(), vf)
        );
        let e = pg_url_sslmode("store.url_file", "host=db sslmode=verify-ca").unwrap_err();
        assert!(e.to_string().contains("store.url_file"), "{e}");
        // What is left parses.
        for url in [
            "postgres://u:p@db:5432/x?sslmode=verify-full",
            "host=db user=u sslmode=verify-full dbname=x",
        ] {
            check_pg_url("store.url", url).unwrap();
        }
    }

    #[test]
    fn example_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let dev = load_validated::<Config>(Some(&dir.join("relay.dev.toml")), env(&[])).unwrap();
        assert!(dev.tls.disabled);
        let prod = load_validated::<Config>(Some(&dir.join("relay.toml")), env(&[])).unwrap();
        assert!(!prod.tls.disabled);
    }
}
