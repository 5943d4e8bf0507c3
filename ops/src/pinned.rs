//! A TLS client verifier that accepts exactly one certificate, named by its SHA-256,
//! whatever signed it and whatever name it carries. Handshake signatures are still
//! verified, so the peer must hold that certificate's key. The gateway pins the relay
//! (`uplink.pinned_cert_sha256`); the relay's CLI pins the relay's own `tls.cert_file`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Accepts exactly the certificate whose SHA-256 is `pin` (module docs).
#[derive(Debug)]
pub struct PinnedCert {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    mismatch: fn(got_hex: &str) -> String,
}

impl PinnedCert {
    /// Pins `pin`; `mismatch` words the refusal from the presented certificate's SHA-256
    /// (hex), saying which setting the pin came from.
    pub fn new(
        pin: [u8; 32],
        provider: Arc<CryptoProvider>,
        mismatch: fn(got_hex: &str) -> String,
    ) -> Self {
        PinnedCert {
            pin,
            provider,
            mismatch,
        }
    }

    /// Pins the certificate `der` itself.
    pub fn of(
        der: &[u8],
        provider: Arc<CryptoProvider>,
        mismatch: fn(got_hex: &str) -> String,
    ) -> Self {
        Self::new(Sha256::digest(der).into(), provider, mismatch)
    }
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
            Err(rustls::Error::General((self.mismatch)(&hex::encode(got))))
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
