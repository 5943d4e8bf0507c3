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

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use super::config::UplinkConfig;

/// Parses a pin: 64 hex digits (colons and spaces allowed, as `openssl x509 -fingerprint`
/// prints them).
pub fn parse_pin(s: &str) -> Result<[u8; 32], String> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    let bytes = hex::decode(&hex).map_err(|e| format!("not hex: {e}"))?;
    bytes.try_into().map_err(|_| {
        "must be the 64 hex digits of a SHA-256 fingerprint (openssl x509 -noout -fingerprint -sha256)"
            .to_string()
    })
}

/// Reads every certificate in a PEM file; fails if there is none.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
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
/// error is `(key, message)` with the key relative to `[uplink]` (`client_cert_file` or
/// `client_key_file`), like [`UplinkConfig::validate`].
pub fn load_client_identity(
    cert_file: &Path,
    key_file: &Path,
) -> Result<ClientIdentity, (&'static str, String)> {
    const CERT: &str = "client_cert_file";
    const KEY: &str = "client_key_file";
    let pem = std::fs::read(cert_file)
        .map_err(|e| (CERT, format!("cannot read {}: {e}", cert_file.display())))?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| {
            (
                CERT,
                format!("{} is not valid PEM: {e}", cert_file.display()),
            )
        })?;
    if chain.is_empty() {
        return Err((
            CERT,
            format!(
                "{} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\"); it must be the gateway's certificate, optionally followed by its intermediate CAs",
                cert_file.display()
            ),
        ));
    }
    let pem = std::fs::read(key_file)
        .map_err(|e| (KEY, format!("cannot read {}: {e}", key_file.display())))?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| (KEY, format!("{} is not valid PEM: {e}", key_file.display())))?
        .ok_or_else(|| {
            (
                KEY,
                format!(
                    "{} holds no PEM private key (PKCS#8 \"PRIVATE KEY\", PKCS#1 \"RSA PRIVATE KEY\" or SEC1 \"EC PRIVATE KEY\")",
                    key_file.display()
                ),
            )
        })?;
    // The same checks rustls makes when the config is built, done here so that
    // check-config and the start catch a wrong pair, not the first connection.
    CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
        .map_err(|e| identity_error(e, cert_file, key_file))?;
    Ok(ClientIdentity { chain, key })
}

/// Turns a rustls error about a certificate/key pair into `(key, message)`.
fn identity_error(e: rustls::Error, cert_file: &Path, key_file: &Path) -> (&'static str, String) {
    match e {
        rustls::Error::InconsistentKeys(_) => (
            "client_key_file",
            format!(
                "the key in {} does not match the certificate in {} (uplink.client_cert_file); the first certificate in that file must be the one issued for this key",
                key_file.display(),
                cert_file.display()
            ),
        ),
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => (
            "client_cert_file",
            format!("{}: unusable certificate: {e}", cert_file.display()),
        ),
        other => (
            "client_key_file",
            format!(
                "{}: unusable private key (RSA, ECDSA P-256/P-384 or Ed25519 are supported): {other}",
                key_file.display()
            ),
        ),
    }
}

/// The client identity `cfg` asks for: `None` when neither file is set. Only one of the
/// two set is an error naming the missing key.
pub fn client_identity(
    cfg: &UplinkConfig,
) -> Result<Option<ClientIdentity>, (&'static str, String)> {
    match (&cfg.client_cert_file, &cfg.client_key_file) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => load_client_identity(cert, key).map(Some),
        (Some(_), None) => Err((
            "client_key_file",
            "must be set too when uplink.client_cert_file is set (the certificate's private key, PEM)"
                .into(),
        )),
        (None, Some(_)) => Err((
            "client_cert_file",
            "must be set too when uplink.client_key_file is set (the gateway's certificate, PEM)"
                .into(),
        )),
    }
}

/// The rustls client config for `cfg`: pinned certificate, private CA, or web roots; with
/// the client certificate when one is configured.
pub fn client_config(cfg: &UplinkConfig) -> Result<Arc<ClientConfig>, String> {
    let identity = client_identity(cfg).map_err(|(key, msg)| format!("uplink.{key}: {msg}"))?;
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let builder = if let Some(pin) = &cfg.pinned_cert_sha256 {
        let pin = parse_pin(pin)?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert { pin, provider }))
    } else {
        let mut roots = RootCertStore::empty();
        match &cfg.ca_file {
            Some(path) => {
                for cert in load_ca_file(path)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots)
    };
    let config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(|e| {
                // Both paths are set, or client_identity would have returned None.
                let cert = cfg.client_cert_file.as_deref().unwrap_or(Path::new(""));
                let key = cfg.client_key_file.as_deref().unwrap_or(Path::new(""));
                let (k, msg) = identity_error(e, cert, key);
                format!("uplink.{k}: {msg}")
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Accepts exactly the certificate whose SHA-256 is `pin`; signatures are still checked,
/// so the peer must hold that certificate's key.
#[derive(Debug)]
struct PinnedCert {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the relay's certificate (sha256 {}) is not the pinned one (uplink.pinned_cert_sha256)",
                hex::encode(got)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse() {
        let hex = "AB:".repeat(31) + "AB";
        assert_eq!(parse_pin(&hex).unwrap(), [0xab; 32]);
        assert!(parse_pin("abcd").is_err());
        assert!(parse_pin("zz").is_err());
    }

    #[test]
    fn configs_build() {
        let mut c = UplinkConfig::default();
        assert!(client_config(&c).is_ok());
        c.pinned_cert_sha256 = Some("00".repeat(32));
        assert!(client_config(&c).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not pem").unwrap();
        c.pinned_cert_sha256 = None;
        c.ca_file = Some(p);
        assert!(client_config(&c).is_err());
    }

    use rcgen::{
        BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use rustls::server::WebPkiClientVerifier;
    use rustls::ServerConfig;
    use std::path::PathBuf;

    fn make_ca(name: &str) -> (Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        (params.self_signed(&key).unwrap(), key)
    }

    fn make_leaf(name: &str, client: bool, ca: &(Certificate, KeyPair)) -> (Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        (params.signed_by(&key, &ca.0, &ca.1).unwrap(), key)
    }

    /// A gateway certificate (signed by a client CA) written as `cert.pem` (leaf + CA, a
    /// chain) and `key.pem` (PKCS#8) in `dir`.
    struct ClientPki {
        ca: Certificate,
        leaf: Certificate,
        cert_file: PathBuf,
        key_file: PathBuf,
    }

    fn client_pki(dir: &Path) -> ClientPki {
        let ca = make_ca("Outpost gateways CA");
        let (leaf, key) = make_leaf("gw-1", true, &ca);
        let cert_file = dir.join("cert.pem");
        let key_file = dir.join("key.pem");
        std::fs::write(&cert_file, leaf.pem() + &ca.0.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        ClientPki {
            ca: ca.0,
            leaf,
            cert_file,
            key_file,
        }
    }

    /// Runs a handshake between `client` and a server for `localhost` that asks for an
    /// optional client certificate signed by `client_ca`; returns the SHA-256 of the
    /// certificate the server saw, if any.
    async fn presented(
        client: Arc<ClientConfig>,
        server_cert: &Certificate,
        server_key: &KeyPair,
        client_ca: &Certificate,
    ) -> Option<[u8; 32]> {
        let mut roots = RootCertStore::empty();
        roots.add(client_ca.der().clone()).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .unwrap();
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![server_cert.der().clone()],
                PrivatePkcs8KeyDer::from(server_key.serialize_der()).into(),
            )
            .unwrap();
        let (c_io, s_io) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from("localhost").unwrap();
        let (c, s) = tokio::join!(
            tokio_rustls::TlsConnector::from(client).connect(name, c_io),
            tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(s_io)
        );
        c.unwrap();
        let s = s.unwrap();
        s.get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(|leaf| Sha256::digest(leaf.as_ref()).into())
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

        // Private CA branch, without and with the client certificate.
        let mut c = UplinkConfig {
            ca_file: Some(ca_file),
            ..UplinkConfig::default()
        };
        let got = presented(
            client_config(&c).unwrap(),
            &server_cert,
            &server_key,
            &pki.ca,
        )
        .await;
        assert_eq!(got, None, "no client certificate configured, none sent");
        c.client_cert_file = Some(pki.cert_file.clone());
        c.client_key_file = Some(pki.key_file.clone());
        let got = presented(
            client_config(&c).unwrap(),
            &server_cert,
            &server_key,
            &pki.ca,
        )
        .await;
        assert_eq!(got, Some(want));

        // Pinned branch.
        c.ca_file = None;
        c.pinned_cert_sha256 = Some(hex::encode(Sha256::digest(server_cert.der().as_ref())));
        let got = presented(
            client_config(&c).unwrap(),
            &server_cert,
            &server_key,
            &pki.ca,
        )
        .await;
        assert_eq!(got, Some(want));
    }

    #[test]
    fn client_identity_loads_a_chain() {
        let dir = tempfile::tempdir().unwrap();
        let pki = client_pki(dir.path());
        let id = load_client_identity(&pki.cert_file, &pki.key_file).unwrap();
        assert_eq!(id.chain.len(), 2);
        assert_eq!(&id.chain[0], pki.leaf.der());
        // The web-roots branch builds too.
        let c = UplinkConfig {
            client_cert_file: Some(pki.cert_file),
            client_key_file: Some(pki.key_file),
            ..UplinkConfig::default()
        };
        assert!(client_config(&c).is_ok());
    }

    #[test]
    fn client_identity_errors_name_the_key_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let pki = client_pki(dir.path());
        let missing = dir.path().join("missing.pem");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "this is not PEM\n").unwrap();
        let other_key = dir.path().join("other-key.pem");
        std::fs::write(&other_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();

        let err = |cert: &Path, key: &Path| load_client_identity(cert, key).unwrap_err();

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
        let c = UplinkConfig {
            client_cert_file: Some(pki.cert_file.clone()),
            client_key_file: Some(other_key),
            ..UplinkConfig::default()
        };
        let m = client_config(&c).unwrap_err();
        assert!(m.starts_with("uplink.client_key_file: "), "{m}");
        assert!(m.contains("does not match"), "{m}");
        let c = UplinkConfig {
            client_cert_file: Some(pki.cert_file),
            ..UplinkConfig::default()
        };
        let m = client_config(&c).unwrap_err();
        assert!(m.starts_with("uplink.client_key_file: must be set"), "{m}");
    }
}
