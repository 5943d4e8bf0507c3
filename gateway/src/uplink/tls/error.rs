//! What can go wrong with the uplink's TLS: a setting that cannot be used (named by its
//! `[uplink]` key, for config errors and the status page), rustls refusing a
//! configuration, or a failed handshake. Every variant keeps its source.

use std::path::PathBuf;
use std::sync::Arc;

use outpost_ops::pem::PemError;

/// Why TLS to the relay cannot be set up or was refused. Cloneable (sources are shared),
/// because the uplink keeps its last error for the status page.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    /// An `[uplink]` setting is unusable; `key` is relative to `[uplink]`.
    #[error("uplink.{key}: {problem}")]
    Setting {
        /// `ca_file`, `pinned_cert_sha256`, `client_cert_file` or `client_key_file`.
        key: &'static str,
        /// What is wrong with it.
        #[source]
        problem: SettingError,
    },
    /// rustls refused to build a configuration.
    #[error("TLS setup failed: {0}")]
    Setup(#[source] rustls::Error),
    /// A TLS endpoint was reached without a TLS configuration (a bug, reported not panicked).
    #[error("no TLS configuration")]
    NotConfigured,
    /// The relay's host cannot be a TLS server name.
    #[error("{host:?} is not a valid server name: {source}")]
    ServerName {
        /// The host from the relay URL.
        host: String,
        /// rustls' error.
        source: Arc<rustls::pki_types::InvalidDnsNameError>,
    },
    /// The handshake failed (unknown CA, wrong pin, wrong name, client certificate refused).
    #[error("{0}")]
    Handshake(#[source] Arc<std::io::Error>),
}

impl TlsError {
    /// The `[uplink]` key at fault, for a setting error.
    pub fn key(&self) -> Option<&'static str> {
        match self {
            TlsError::Setting { key, .. } => Some(key),
            _ => None,
        }
    }

    /// The error without the `uplink.<key>: ` prefix (for config errors, which add it).
    pub fn problem(&self) -> String {
        match self {
            TlsError::Setting { problem, .. } => problem.to_string(),
            other => other.to_string(),
        }
    }

    pub(super) fn setting(key: &'static str, problem: SettingError) -> TlsError {
        TlsError::Setting { key, problem }
    }
}

/// What is wrong with one TLS setting.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SettingError {
    /// The pin is not hex.
    #[error("not hex: {0}")]
    PinNotHex(#[source] hex::FromHexError),
    /// The pin is not 32 bytes.
    #[error("must be the 64 hex digits of a SHA-256 fingerprint (openssl x509 -noout -fingerprint -sha256)")]
    PinLength,
    /// The file cannot be read or holds nothing usable.
    #[error("{0}")]
    Pem(#[source] Arc<PemError>),
    /// The key is not the certificate's.
    #[error("the key in {} does not match the certificate in {} (uplink.client_cert_file); the first certificate in that file must be the one issued for this key", key.display(), cert.display())]
    KeyMismatch {
        /// `uplink.client_cert_file`.
        cert: PathBuf,
        /// `uplink.client_key_file`.
        key: PathBuf,
    },
    /// rustls cannot use the client certificate.
    #[error("{}: unusable certificate: {source}", path.display())]
    UnusableCert {
        /// The file.
        path: PathBuf,
        /// rustls' error.
        source: rustls::Error,
    },
    /// rustls cannot use the private key.
    #[error("{}: unusable private key (RSA, ECDSA P-256/P-384 or Ed25519 are supported): {source}", path.display())]
    UnusableKey {
        /// The file.
        path: PathBuf,
        /// rustls' error.
        source: rustls::Error,
    },
    /// One of the client certificate and key is set without the other.
    #[error("must be set too when uplink.{set} is set ({what})")]
    Missing {
        /// The key that is set.
        set: &'static str,
        /// What the missing file must hold.
        what: &'static str,
    },
}
