//! Certificate pinning (`uplink.pinned_cert_sha256`): the relay is accepted when its
//! certificate is exactly the pinned one, whatever signed it and whatever name it carries.
//! Signatures are still verified, so the peer must hold that certificate's key
//! ([`outpost_ops::pinned::PinnedCert`]).

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

/// The refusal when the relay's certificate is not the pinned one.
pub(super) fn not_pinned(got_hex: &str) -> String {
    format!(
        "the relay's certificate (sha256 {got_hex}) is not the pinned one (uplink.pinned_cert_sha256)"
    )
}
