//! Certificate pinning (`uplink.pinned_cert_sha256`): the relay is accepted when its
//! certificate is exactly the pinned one, whatever signed it and whatever name it carries.
//! Signatures are still verified, so the peer must hold that certificate's key.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use super::error::{SettingError, TlsError};

/// Parses a pin: 64 hex digits (colons and spaces allowed, as `openssl x509 -fingerprint`
/// prints them).
pub fn parse_pin(s: &str) -> Result<[u8; 32], TlsError> {
    let bad = |p| TlsError::setting("pinned_cert_sha256", p);
    let hex: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    let bytes = hex::decode(&hex).map_err(|e| bad(SettingError::PinNotHex(e)))?;
    bytes.try_into().map_err(|_| bad(SettingError::PinLength))
}

/// Accepts exactly the certificate whose SHA-256 is `pin`; signatures are still checked,
/// so the peer must hold that certificate's key.
#[derive(Debug)]
pub(super) struct PinnedCert {
    pub(super) pin: [u8; 32],
    pub(super) provider: Arc<CryptoProvider>,
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
