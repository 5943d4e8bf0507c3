//! Standard Webhooks signatures: the `whsec_` secret and the `v1` HMAC-SHA256 signature.
//!
//! The secret is written as `whsec_<base64>` (standard alphabet, with padding); the key is
//! the base64-decoded part, 24 to 64 bytes (the specification: "at least 24 bytes, 512
//! bits maximum"). A call is signed over `{webhook-id}.{webhook-timestamp}.{body}`, the
//! body exactly as sent, and the `webhook-signature` header carries
//! `v1,<base64 of the HMAC-SHA256>`. The id and timestamp are signed too, so a receiver
//! that checks the timestamp against its clock (the specification suggests 5 minutes)
//! refuses a replayed call, and one that remembers ids drops a resend.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// What a secret starts with.
pub const SECRET_PREFIX: &str = "whsec_";
/// The shortest key accepted, bytes.
pub const SECRET_MIN_BYTES: usize = 24;
/// The longest key accepted, bytes.
pub const SECRET_MAX_BYTES: usize = 64;
/// The size of a key the relay makes, bytes.
pub const SECRET_NEW_BYTES: usize = 32;

/// Why a text is not a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretFormatError {
    /// It does not start with `whsec_`.
    #[error("it does not start with \"whsec_\"")]
    Prefix,
    /// The part after `whsec_` is not base64.
    #[error("the part after \"whsec_\" is not standard base64 ({0})")]
    Base64(String),
    /// The key is too short or too long.
    #[error("the key is {0} bytes; it must be {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES}")]
    Length(usize),
}

/// A signing key: the decoded bytes of a `whsec_` secret. `Debug` does not show it.
#[derive(Clone)]
pub struct Secret {
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.key.len())
    }
}

impl Secret {
    /// Parses `whsec_<base64>` (surrounding whitespace, such as the file's newline, is
    /// ignored).
    pub fn parse(text: &str) -> Result<Secret, SecretFormatError> {
        let b64 = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretFormatError::Prefix)?;
        let key = BASE64
            .decode(b64)
            .map_err(|e| SecretFormatError::Base64(e.to_string()))?;
        if !(SECRET_MIN_BYTES..=SECRET_MAX_BYTES).contains(&key.len()) {
            return Err(SecretFormatError::Length(key.len()));
        }
        Ok(Secret { key })
    }

    /// A new random secret of [`SECRET_NEW_BYTES`] bytes, and its text `whsec_<base64>`.
    pub fn generate() -> (Secret, String) {
        let mut key = vec![0u8; SECRET_NEW_BYTES];
        rand::rng().fill_bytes(&mut key);
        let text = format!("{SECRET_PREFIX}{}", BASE64.encode(&key));
        (Secret { key }, text)
    }

    /// The `webhook-signature` value of a call: `v1,<base64 HMAC-SHA256 of
    /// "{msg_id}.{timestamp}.{body}">`.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        // Any key length is valid for HMAC; the error is unreachable, but not unwrapped.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            return String::from("v1,");
        };
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of the Standard Webhooks reference libraries
    /// (standard-webhooks/standard-webhooks, `libraries/javascript/src/webhook.test.ts`,
    /// test "sign function works").
    #[test]
    fn signs_the_published_test_vector() {
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            s.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        // The same repository's Rust library (`libraries/rust/src/lib.rs`, `test_sign`).
        let s = Secret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(
            s.sign(
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1649367553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    #[test]
    fn generated_secrets_parse_back() {
        let (s, text) = Secret::generate();
        assert!(text.starts_with("whsec_"), "{text}");
        let back = Secret::parse(&format!("{text}\n")).unwrap();
        assert_eq!(back.key, s.key);
        assert_eq!(back.key.len(), SECRET_NEW_BYTES);
        assert_ne!(Secret::generate().1, text);
        assert_eq!(format!("{s:?}"), "Secret(32 bytes)");
    }

    #[test]
    fn malformed_secrets_are_refused() {
        assert_eq!(
            Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            SecretFormatError::Prefix
        );
        assert!(matches!(
            Secret::parse("whsec_not base64!").unwrap_err(),
            SecretFormatError::Base64(_)
        ));
        assert_eq!(
            Secret::parse("whsec_c2hvcnQ=").unwrap_err(),
            SecretFormatError::Length(5)
        );
        let long = format!("whsec_{}", BASE64.encode([1u8; 65]));
        assert_eq!(
            Secret::parse(&long).unwrap_err(),
            SecretFormatError::Length(65)
        );
    }
}
