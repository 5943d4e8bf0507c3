//! TLS to PostgreSQL: which mode is in force (`store.tls`, else the URL's `sslmode`), the
//! rustls client for it, and connection errors that name the setting to change.
//!
//! - `disable`: plain TCP (a warning when the host is not local).
//! - `require` (libpq's `sslmode=require`): encrypted, any server certificate accepted.
//! - `verify-full`: the certificate must chain to `store.ca_file` (or, without one, the
//!   public web roots) and name the host.
//!
//! With TLS the connection never falls back to plain TCP. The CA file is read by one
//! function, [`load_ca_file`].

use std::path::{Path, PathBuf};

use super::error::pool_err;
use crate::config::PgTlsMode;
use crate::store::StoreError;

/// TLS settings for [`super::PgStore::connect_with_tls`]: `store.tls` and `store.ca_file`.
#[derive(Debug, Clone, Default)]
pub struct PgTls {
    /// `store.tls`; `None` lets the URL's `sslmode` decide (no TLS without one).
    pub mode: Option<PgTlsMode>,
    /// `store.ca_file`: PEM CA certificate(s) for `verify-full`; `None` trusts the public
    /// web roots (webpki-roots), which managed databases with public certificates need.
    pub ca_file: Option<PathBuf>,
}

/// The URL for tokio-postgres and the TLS mode in force: `tls.mode`, else the URL's
/// `sslmode` (`verify-full`, `require`), else `disable`.
pub(super) fn resolve_tls(url: &str, tls: &PgTls) -> Result<(String, PgTlsMode), StoreError> {
    const BAD_URL: &str = "store.url is not usable";
    let (url, verify_full) = crate::config::pg_url_sslmode("store.url", url)
        .map_err(|e| StoreError::unavailable(BAD_URL, e))?;
    let parsed: tokio_postgres::Config = url
        .parse()
        .map_err(|e| StoreError::unavailable(BAD_URL, e))?;
    let from_url = match (verify_full, parsed.get_ssl_mode()) {
        (Some(m), _) => Some(m),
        (None, tokio_postgres::config::SslMode::Require) => Some(PgTlsMode::Require),
        // `prefer` is tokio-postgres's default, so it cannot tell "prefer" from "not
        // given"; both stay plain, as before `store.tls` existed.
        (None, _) => None,
    };
    let mode = tls.mode.or(from_url).unwrap_or(PgTlsMode::Disable);
    if let (Some(set), Some(asked)) = (tls.mode, from_url) {
        if set != asked {
            tracing::warn!("store.tls = \"{set}\" overrides sslmode={asked} in store.url");
        }
    }
    if tls.ca_file.is_some() && mode != PgTlsMode::VerifyFull {
        return Err(StoreError::refused(format!(
            "store.ca_file is set, but the server's certificate is not checked (TLS mode \
             \"{mode}\"): set store.tls = \"verify-full\", or remove store.ca_file"
        )));
    }
    let hosts = parsed.get_hosts();
    let tcp = hosts
        .iter()
        .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(_)));
    if mode != PgTlsMode::Disable && !tcp {
        return Err(StoreError::refused(format!(
            "TLS mode \"{mode}\" (store.tls, or sslmode in store.url) needs a TCP host in \
             store.url, and it names a Unix socket, where PostgreSQL does not offer TLS: \
             set store.tls = \"disable\" for a local socket"
        )));
    }
    if mode == PgTlsMode::Disable {
        let remote = hosts.iter().any(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => {
                name != "localhost"
                    && !name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            tokio_postgres::config::Host::Unix(_) => false,
        });
        if remote {
            tracing::warn!(
                "PostgreSQL connections are not encrypted: the password and the punches \
                 cross the network readable; set store.tls = \"verify-full\" (or \"require\")"
            );
        }
    }
    Ok((url, mode))
}

/// The rustls connector for `mode`, or `None` for plain TCP.
pub(super) fn tls_connector(
    mode: PgTlsMode,
    ca_file: Option<&Path>,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, StoreError> {
    Ok(tls_client_config(mode, ca_file)?.map(tokio_postgres_rustls::MakeRustlsConnect::new))
}

/// The rustls client config for `mode` (ring provider only), or `None` for plain TCP.
fn tls_client_config(
    mode: PgTlsMode,
    ca_file: Option<&Path>,
) -> Result<Option<rustls::ClientConfig>, StoreError> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::unavailable("TLS for PostgreSQL", e))?;
    let mut config = match mode {
        PgTlsMode::Disable => return Ok(None),
        PgTlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AnyServerCert(provider)))
            .with_no_client_auth(),
        PgTlsMode::VerifyFull => builder
            .with_root_certificates(pg_roots(ca_file)?)
            .with_no_client_auth(),
    };
    // PostgreSQL 17 requires this ALPN name when it is offered one; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(config))
}

/// The trust anchors for `verify-full`: `store.ca_file`, or the public web roots.
fn pg_roots(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, StoreError> {
    match ca_file {
        None => Ok(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }),
        Some(path) => load_ca_file(path),
    }
}

/// The CA certificate(s) in `store.ca_file` as trust roots ([`outpost_ops::pem`]); the
/// error names the key and the file.
fn load_ca_file(path: &Path) -> Result<rustls::RootCertStore, StoreError> {
    outpost_ops::pem::load_roots(path)
        .map_err(|e| StoreError::unavailable(format!("store.ca_file {}", path.display()), e))
}

/// `store.tls = "require"` (libpq's `sslmode=require`): any server certificate is
/// accepted, as libpq does, but the handshake signatures are still verified, so the
/// session is encrypted to whoever holds the presented certificate's key.
#[derive(Debug)]
struct AnyServerCert(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The first connection's error, with the key to change for TLS failures. The
/// tokio-postgres error is the source.
pub(super) fn connect_err(e: deadpool_postgres::PoolError, mode: PgTlsMode) -> StoreError {
    let deadpool_postgres::PoolError::Backend(pg) = e else {
        return pool_err(e);
    };
    // tokio-postgres's Display omits the cause ("error performing TLS handshake"), so the
    // texts searched below are the whole chain's.
    let mut text = pg.to_string();
    let mut cert_rejected = false;
    let mut source = std::error::Error::source(&pg);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        let rustls_err = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .or_else(|| s.downcast_ref::<rustls::Error>());
        if let Some(rustls::Error::InvalidCertificate(_)) = rustls_err {
            cert_rejected = true;
        }
        source = s.source();
    }
    // Substrings only where there is nothing typed to match: tokio-postgres reports a
    // server that declines TLS as a plain string error, and PostgreSQL says "no
    // encryption" only in the message of a pg_hba.conf refusal (SQLSTATE 28000 covers
    // every pg_hba.conf refusal).
    let context = if text.contains("server does not support TLS") {
        format!(
            "the PostgreSQL server does not accept TLS, but store.tls (or sslmode in \
             store.url) is \"{mode}\": turn ssl on in the server's postgresql.conf, or set \
             store.tls = \"disable\" only if the database is on this host or a trusted \
             network"
        )
    } else if cert_rejected {
        format!(
            "the PostgreSQL server's certificate was rejected (TLS mode \"{mode}\" from \
             store.tls or sslmode in store.url): set store.ca_file to the CA certificate \
             that issued it, and check that it names the host in store.url"
        )
    } else if mode == PgTlsMode::Disable && text.contains("no encryption") {
        "the PostgreSQL server requires TLS (pg_hba.conf hostssl): set store.tls = \
         \"verify-full\" (or \"require\")"
            .to_string()
    } else {
        "cannot connect to PostgreSQL (check store.url, store.tls and that the server is up)"
            .to_string()
    };
    StoreError::unavailable(context, pg)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

    use super::{resolve_tls, tls_client_config, PgTls, PgTlsMode};

    /// A CA (written as PEM to `dir/<name>.pem`) and a server config whose certificate,
    /// issued by that CA, names `db.test` and 127.0.0.1.
    fn ca_and_server(dir: &Path, name: &str) -> (PathBuf, Arc<rustls::ServerConfig>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, name);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["db.test".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let ca_file = dir.join(format!("{name}.pem"));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
        server.alpn_protocols = vec![b"postgresql".to_vec()];
        (ca_file, Arc::new(server))
    }

    /// An in-memory handshake; the client's error when it refuses the server.
    fn handshake(
        client: rustls::ClientConfig,
        server: Arc<rustls::ServerConfig>,
        name: &str,
    ) -> Result<Option<Vec<u8>>, rustls::Error> {
        let name = ServerName::try_from(name.to_string()).unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets().unwrap();
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(c.alpn_protocol().map(<[u8]>::to_vec));
            }
        }
        panic!("the handshake did not finish");
    }

    fn client(mode: PgTlsMode, ca_file: Option<&Path>) -> rustls::ClientConfig {
        tls_client_config(mode, ca_file).unwrap().unwrap()
    }

    fn cert_error(r: Result<Option<Vec<u8>>, rustls::Error>) -> rustls::CertificateError {
        match r {
            Err(rustls::Error::InvalidCertificate(e)) => e,
            other => panic!("expected a certificate error, got {other:?}"),
        }
    }

    #[test]
    fn verify_full_checks_the_issuer_and_the_host_name() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, server) = ca_and_server(dir.path(), "ca");
        let (other_ca, _) = ca_and_server(dir.path(), "other");
        let alpn = handshake(
            client(PgTlsMode::VerifyFull, Some(&ca)),
            server.clone(),
            "db.test",
        );
        assert_eq!(alpn.unwrap().as_deref(), Some(&b"postgresql"[..]));
        handshake(
            client(PgTlsMode::VerifyFull, Some(&ca)),
            server.clone(),
            "127.0.0.1",
        )
        .unwrap();
        let e = cert_error(handshake(
            client(PgTlsMode::VerifyFull, Some(&ca)),
            server.clone(),
            "other.test",
        ));
        assert!(
            matches!(
                e,
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            ),
            "{e:?}"
        );
        let e = cert_error(handshake(
            client(PgTlsMode::VerifyFull, Some(&other_ca)),
            server.clone(),
            "db.test",
        ));
        assert_eq!(e, rustls::CertificateError::UnknownIssuer);
        // Without store.ca_file: the public web roots, which did not issue a test CA.
        let e = cert_error(handshake(
            client(PgTlsMode::VerifyFull, None),
            server,
            "db.test",
        ));
        assert_eq!(e, rustls::CertificateError::UnknownIssuer);
    }

    #[test]
    fn require_encrypts_without_checking_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (_, server) = ca_and_server(dir.path(), "ca");
        handshake(client(PgTlsMode::Require, None), server.clone(), "db.test").unwrap();
        handshake(client(PgTlsMode::Require, None), server, "other.test").unwrap();
        assert!(tls_client_config(PgTlsMode::Disable, None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn ca_file_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = tls_client_config(PgTlsMode::VerifyFull, Some(&missing)).unwrap_err();
        assert!(e.to_string().contains("store.ca_file"), "{e}");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = tls_client_config(PgTlsMode::VerifyFull, Some(&junk)).unwrap_err();
        assert!(e.to_string().contains("store.ca_file"), "{e}");
        // The reason comes from `outpost_ops::pem`, as the error's source; logs and the
        // 503 bodies show it through `report()`.
        assert!(e.report().contains("no PEM certificate"), "{}", e.report());
    }

    #[test]
    fn store_tls_wins_over_the_url_sslmode() {
        let resolve = |url: &str, mode: Option<PgTlsMode>, ca: Option<&str>| {
            let tls = PgTls {
                mode,
                ca_file: ca.map(PathBuf::from),
            };
            resolve_tls(url, &tls)
        };
        let base = "postgres://u@127.0.0.1:5432/x";
        let mode = |url: &str, set: Option<PgTlsMode>| resolve(url, set, None).unwrap().1;
        assert_eq!(mode(base, None), PgTlsMode::Disable);
        assert_eq!(
            mode(&format!("{base}?sslmode=prefer"), None),
            PgTlsMode::Disable
        );
        assert_eq!(
            mode(&format!("{base}?sslmode=require"), None),
            PgTlsMode::Require
        );
        let (url, m) = resolve(&format!("{base}?sslmode=verify-full"), None, None).unwrap();
        assert_eq!((url.as_str(), m), (base, PgTlsMode::VerifyFull));
        let require = format!("{base}?sslmode=require");
        assert_eq!(mode(&require, Some(PgTlsMode::Disable)), PgTlsMode::Disable);
        assert_eq!(
            mode(&require, Some(PgTlsMode::VerifyFull)),
            PgTlsMode::VerifyFull
        );
        let verify = format!("{base}?sslmode=verify-full");
        assert_eq!(mode(&verify, Some(PgTlsMode::Require)), PgTlsMode::Require);
        assert_eq!(mode(base, Some(PgTlsMode::Require)), PgTlsMode::Require);
        // A CA file needs verification in force, from either place.
        resolve(&verify, None, Some("/ca.pem")).unwrap();
        resolve(base, Some(PgTlsMode::VerifyFull), Some("/ca.pem")).unwrap();
        let e = resolve(&require, None, Some("/ca.pem")).unwrap_err();
        assert!(e.to_string().contains("store.ca_file"), "{e}");
        // PostgreSQL offers no TLS on a Unix socket.
        let e = resolve(
            "host=/run/postgresql dbname=x",
            Some(PgTlsMode::Require),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("store.tls"), "{e}");
        assert_eq!(
            resolve("host=/run/postgresql dbname=x", None, None)
                .unwrap()
                .1,
            PgTlsMode::Disable
        );
    }
}
