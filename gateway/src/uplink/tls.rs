//! TLS for the uplink: rustls with the ring provider, trusting either the built-in web
//! roots, a private CA file (`uplink.ca_file`), or exactly one pinned certificate
//! (`uplink.pinned_cert_sha256`). Plain `ws://`/`http://` URLs skip TLS entirely.
//!
//! A relay whose certificate does not verify is never sent a byte of punch data: the
//! handshake fails, the uplink records the error and backs off.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
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

/// The rustls client config for `cfg`: pinned certificate, private CA, or web roots.
pub fn client_config(cfg: &UplinkConfig) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let config = if let Some(pin) = &cfg.pinned_cert_sha256 {
        let pin = parse_pin(pin)?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert { pin, provider }))
            .with_no_client_auth()
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
        builder.with_root_certificates(roots).with_no_client_auth()
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
}
