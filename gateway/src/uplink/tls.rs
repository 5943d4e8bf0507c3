//! TLS for the uplink: rustls with the ring provider, trusting either the built-in web
//! roots, a private CA file (`uplink.ca_file`), or exactly one pinned certificate
//! (`uplink.pinned_cert_sha256`). Plain `ws://`/`http://` URLs skip TLS entirely.
//!
//! With `uplink.client_cert_file` and `uplink.client_key_file` set, the gateway also
//! presents that certificate when the relay asks for one (mutual TLS). The relay verifies it
//! against its `tls.client_ca_file` and, when a request carries no Bearer token, knows the
//! gateway by the certificate's SHA-256 fingerprint. The files are read for every
//! connection, so a renewed certificate is used from the next reconnect on, without a
//! restart.
//!
//! A relay whose certificate does not verify is never sent a byte of punch data: the
//! handshake fails, the uplink records the error and backs off.
//!
//! This module reads its settings through [`TlsSettings`] and knows nothing of the config
//! or the link types: `config` and `link` use it, it uses neither. PEM files are read by
//! [`outpost_ops::pem`].

use std::path::Path;
use std::sync::Arc;

use outpost_ops::pem::{self, PemError};
use outpost_ops::pinned::PinnedCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};

mod error;
mod pin;

pub use error::{SettingError, TlsError};
pub use pin::parse_pin;

/// The TLS settings of `[uplink]` (see `UplinkConfig` for each key).
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsSettings<'a> {
    /// `uplink.ca_file`.
    pub ca_file: Option<&'a Path>,
    /// `uplink.pinned_cert_sha256`.
    pub pinned_cert_sha256: Option<&'a str>,
    /// `uplink.client_cert_file`.
    pub client_cert_file: Option<&'a Path>,
    /// `uplink.client_key_file`.
    pub client_key_file: Option<&'a Path>,
}

fn pem_error(key: &'static str) -> impl FnOnce(PemError) -> TlsError {
    move |e| TlsError::setting(key, SettingError::Pem(Arc::new(e)))
}

/// The trust roots of `uplink.ca_file`: every certificate in it.
pub fn load_ca_file(path: &Path) -> Result<RootCertStore, TlsError> {
    pem::load_roots(path).map_err(pem_error("ca_file"))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The gateway's own certificate chain (leaf first) and private key, for mutual TLS.
pub struct ClientIdentity {
    /// The certificate chain as read from `uplink.client_cert_file`.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key from `uplink.client_key_file`.
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ClientIdentity {
    // Never print key material, not even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Reads the client certificate chain and key and checks that they belong together. The
/// error's [`TlsError::key`] is `client_cert_file` or `client_key_file`.
pub fn load_client_identity(cert_file: &Path, key_file: &Path) -> Result<ClientIdentity, TlsError> {
    let chain = pem::load_certs(cert_file).map_err(pem_error("client_cert_file"))?;
    let key = pem::load_private_key(key_file).map_err(pem_error("client_key_file"))?;
    // The same checks rustls makes when the config is built, done here so that
    // check-config and the start catch a wrong pair, not the first connection.
    CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
        .map_err(|e| identity_error(e, cert_file, key_file))?;
    Ok(ClientIdentity { chain, key })
}

/// Turns a rustls error about a certificate/key pair into the setting at fault.
fn identity_error(e: rustls::Error, cert_file: &Path, key_file: &Path) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(_) => TlsError::setting(
            "client_key_file",
            SettingError::KeyMismatch {
                cert: cert_file.to_path_buf(),
                key: key_file.to_path_buf(),
            },
        ),
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            TlsError::setting(
                "client_cert_file",
                SettingError::UnusableCert {
                    path: cert_file.to_path_buf(),
                    source: e,
                },
            )
        }
        other => TlsError::setting(
            "client_key_file",
            SettingError::UnusableKey {
                path: key_file.to_path_buf(),
                source: other,
            },
        ),
    }
}

/// The client identity `settings` ask for: `None` when neither file is set. Only one of the
/// two set is an error naming the missing key.
pub fn client_identity(settings: &TlsSettings<'_>) -> Result<Option<ClientIdentity>, TlsError> {
    match (settings.client_cert_file, settings.client_key_file) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => load_client_identity(cert, key).map(Some),
        (Some(_), None) => Err(TlsError::setting(
            "client_key_file",
            SettingError::Missing {
                set: "client_cert_file",
                what: "the certificate's private key, PEM",
            },
        )),
        (None, Some(_)) => Err(TlsError::setting(
            "client_cert_file",
            SettingError::Missing {
                set: "client_key_file",
                what: "the gateway's certificate, PEM",
            },
        )),
    }
}

/// The rustls client config for `settings`: pinned certificate, private CA, or web roots;
/// with the client certificate when one is configured.
pub fn client_config<'a>(
    settings: impl Into<TlsSettings<'a>>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let settings = settings.into();
    let identity = client_identity(&settings)?;
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?;
    let builder = if let Some(pin) = settings.pinned_cert_sha256 {
        let pin = parse_pin(pin)?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert::new(
                pin,
                provider,
                pin::not_pinned,
            )))
    } else {
        let roots = match settings.ca_file {
            Some(path) => load_ca_file(path)?,
            None => RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        builder.with_root_certificates(roots)
    };
    let config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(|e| {
                // Both paths are set, or client_identity would have returned None.
                let cert = settings.client_cert_file.unwrap_or(Path::new(""));
                let key = settings.client_key_file.unwrap_or(Path::new(""));
                identity_error(e, cert, key)
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::{client_pki, make_ca, make_leaf, presented};
    use sha2::{Digest, Sha256};

    #[test]
    fn pins_parse() {
        let hex = "AB:".repeat(31) + "AB";
        assert_eq!(parse_pin(&hex).unwrap(), [0xab; 32]);
        assert!(matches!(
            parse_pin("abcd"),
            Err(TlsError::Setting {
                problem: SettingError::PinLength,
                ..
            })
        ));
        let e = parse_pin("zz").unwrap_err();
        assert_eq!(e.key(), Some("pinned_cert_sha256"));
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn configs_build() {
        assert!(client_config(TlsSettings::default()).is_ok());
        let pin = "00".repeat(32);
        let c = TlsSettings {
            pinned_cert_sha256: Some(&pin),
            ..TlsSettings::default()
        };
        assert!(client_config(c).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not pem").unwrap();
        let c = TlsSettings {
            ca_file: Some(&p),
            ..TlsSettings::default()
        };
        assert_eq!(client_config(c).unwrap_err().key(), Some("ca_file"));
    }

    #[tokio::test]
    async fn client_certificate_is_presented_with_a_ca_and_with_a_pin() {
        let dir = tempfile::tempdir().unwrap();
        let pki = client_pki(dir.path());
        let server_ca = make_ca("Relay CA");
        let (server_cert, server_key) = make_leaf("localhost", false, &server_ca);
        let ca_file = dir.path().join("relay-ca.pem");
        std::fs::write(&ca_file, server_ca.0.pem()).unwrap();
        let want: [u8; 32] = Sha256::digest(pki.leaf.der().as_ref()).into();
        let present = |c: TlsSettings<'_>| {
            presented(
                client_config(c).unwrap(),
                &server_cert,
                &server_key,
                &pki.ca,
            )
        };

        // Private CA branch, without and with the client certificate.
        let mut c = TlsSettings {
            ca_file: Some(&ca_file),
            ..TlsSettings::default()
        };
        let got = present(c).await;
        assert_eq!(got, None, "no client certificate configured, none sent");
        c.client_cert_file = Some(&pki.cert_file);
        c.client_key_file = Some(&pki.key_file);
        assert_eq!(present(c).await, Some(want));

        // Pinned branch.
        let pin = hex::encode(Sha256::digest(server_cert.der().as_ref()));
        c.ca_file = None;
        c.pinned_cert_sha256 = Some(&pin);
        assert_eq!(present(c).await, Some(want));
    }

    #[test]
    fn client_identity_loads_a_chain() {
        let dir = tempfile::tempdir().unwrap();
        let pki = client_pki(dir.path());
        let id = load_client_identity(&pki.cert_file, &pki.key_file).unwrap();
        assert_eq!(id.chain.len(), 2);
        assert_eq!(&id.chain[0], pki.leaf.der());
        // The web-roots branch builds too.
        let c = TlsSettings {
            client_cert_file: Some(&pki.cert_file),
            client_key_file: Some(&pki.key_file),
            ..TlsSettings::default()
        };
        assert!(client_config(c).is_ok());
    }

    #[test]
    fn client_identity_errors_name_the_key_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let pki = client_pki(dir.path());
        let missing = dir.path().join("missing.pem");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "this is not PEM\n").unwrap();
        let other_key = dir.path().join("other-key.pem");
        std::fs::write(
            &other_key,
            rcgen::KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();

        let err = |cert: &Path, key: &Path| {
            let e = load_client_identity(cert, key).unwrap_err();
            (e.key().unwrap(), e.problem())
        };

        let (k, m) = err(&missing, &pki.key_file);
        assert_eq!(k, "client_cert_file");
        assert!(
            m.contains("cannot read") && m.contains("missing.pem"),
            "{m}"
        );
        let (k, m) = err(&junk, &pki.key_file);
        assert_eq!(k, "client_cert_file");
        assert!(m.contains("no PEM certificate"), "{m}");
        // Cert and key swapped: the "certificate" file has none.
        let (k, _) = err(&pki.key_file, &pki.cert_file);
        assert_eq!(k, "client_cert_file");

        let (k, m) = err(&pki.cert_file, &missing);
        assert_eq!(k, "client_key_file");
        assert!(
            m.contains("cannot read") && m.contains("missing.pem"),
            "{m}"
        );
        let (k, m) = err(&pki.cert_file, &junk);
        assert_eq!(k, "client_key_file");
        assert!(m.contains("no PEM private key"), "{m}");
        let (k, m) = err(&pki.cert_file, &other_key);
        assert_eq!(k, "client_key_file");
        assert!(m.contains("does not match"), "{m}");

        // client_config reports the full key name.
        let c = TlsSettings {
            client_cert_file: Some(&pki.cert_file),
            client_key_file: Some(&other_key),
            ..TlsSettings::default()
        };
        let m = client_config(c).unwrap_err().to_string();
        assert!(m.starts_with("uplink.client_key_file: "), "{m}");
        assert!(m.contains("does not match"), "{m}");
        let c = TlsSettings {
            client_cert_file: Some(&pki.cert_file),
            ..TlsSettings::default()
        };
        let m = client_config(c).unwrap_err().to_string();
        assert!(m.starts_with("uplink.client_key_file: must be set"), "{m}");
    }
}
