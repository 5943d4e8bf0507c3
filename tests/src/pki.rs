//! A throwaway PKI for TLS tests, made at test time with rcgen: a CA, a server certificate
//! for `localhost`/`127.0.0.1`, and client certificates for mTLS; plus a blocking HTTPS
//! client (rustls with the ring provider) that may present one of those client certificates.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use crate::proc::http_on;

/// A client certificate and its key, as PEM files and as DER.
pub struct ClientCert {
    /// The certificate (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key_file: PathBuf,
    /// The certificate's DER bytes.
    pub der: Vec<u8>,
    key_der: Vec<u8>,
}

/// A CA with a server certificate, all written as PEM files into a directory.
pub struct Pki {
    /// The CA certificate (PEM): a relay's `tls.client_ca_file`, a gateway's `uplink.ca_file`.
    pub ca_file: PathBuf,
    /// The server certificate for `localhost` and `127.0.0.1` (PEM).
    pub cert_file: PathBuf,
    /// The server key (PEM).
    pub key_file: PathBuf,
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    /// Makes a new CA named `name` and a server certificate in `dir` (which must exist).
    pub fn new(dir: &Path, name: &str) -> Pki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, name);
        let ca = ca_params.self_signed(&ca_key).expect("self-sign CA");
        let key = KeyPair::generate().expect("server key");
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server params");
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .expect("sign server cert");
        let pki = Pki {
            ca_file: dir.join(format!("{name}-ca.pem")),
            cert_file: dir.join(format!("{name}-server.pem")),
            key_file: dir.join(format!("{name}-server.key")),
            dir: dir.to_path_buf(),
            ca,
            ca_key,
        };
        write(&pki.ca_file, &pki.ca.pem());
        write(&pki.cert_file, &cert.pem());
        write(&pki.key_file, &key.serialize_pem());
        pki
    }

    /// A client certificate (clientAuth) for `cn`, signed by this CA.
    pub fn client(&self, cn: &str) -> ClientCert {
        let key = KeyPair::generate().expect("client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign client cert");
        let c = ClientCert {
            cert_file: self.dir.join(format!("{cn}.pem")),
            key_file: self.dir.join(format!("{cn}.key")),
            der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        };
        write(&c.cert_file, &cert.pem());
        write(&c.key_file, &key.serialize_pem());
        c
    }

    /// A rustls client config trusting this CA, presenting `client` if given.
    pub fn client_config(&self, client: Option<&ClientCert>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca.der().to_vec()))
            .expect("add test CA");
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
        let cfg = match client {
            None => builder.with_no_client_auth(),
            Some(c) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from(c.der.clone())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_der.clone())),
                )
                .expect("client cert and key"),
        };
        Arc::new(cfg)
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A blocking HTTP/1.0 request over TLS to `addr` (server name `localhost`) with `cfg`.
/// Returns (status, body); a refused handshake is an error.
pub fn https(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
    let conn = rustls::ClientConnection::new(cfg, ServerName::try_from("localhost").expect("name"))
        .map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    http_on(&mut tls, "localhost", method, path, headers, body)
}
