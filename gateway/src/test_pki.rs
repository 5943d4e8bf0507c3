//! Test PKI shared by the TLS tests of the gateway: CAs, leaf certificates, a gateway
//! client certificate written as PEM files, and an in-memory handshake against a server
//! that asks for a client certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::pki_types::{PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed CA named `name`.
pub fn make_ca(name: &str) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    (params.self_signed(&key).unwrap(), key)
}

/// A certificate for `name` (client or server use) signed by `ca`.
pub fn make_leaf(name: &str, client: bool, ca: &(Certificate, KeyPair)) -> (Certificate, KeyPair) {
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
pub struct ClientPki {
    /// The CA that signed the gateway certificate.
    pub ca: Certificate,
    /// The gateway certificate.
    pub leaf: Certificate,
    /// `cert.pem`: leaf, then CA.
    pub cert_file: PathBuf,
    /// `key.pem`: the leaf's key.
    pub key_file: PathBuf,
}

/// Makes a [`ClientPki`] in `dir`.
pub fn client_pki(dir: &Path) -> ClientPki {
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
pub async fn presented(
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
