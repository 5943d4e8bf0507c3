//! Bearer tokens: long random strings with a prefix that says what they are for (`opd_`
//! device, `opg_` gateway, `opr_` reader, `opa_` admin), stored only as their SHA-256.
//!
//! Because a token is random and long, looking one up by its digest reveals nothing useful
//! through timing: an attacker cannot steer the digest of a guess towards a stored one.

use std::path::Path;

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::file::{write_atomic, FileError};

/// A new token: `prefix` followed by `random_bytes` random bytes in hex.
pub fn new_token(prefix: &str, random_bytes: usize) -> String {
    let mut b = vec![0u8; random_bytes];
    rand::rng().fill_bytes(&mut b);
    format!("{prefix}{}", hex::encode(b))
}

/// The SHA-256 of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The SHA-256 of a token, hex encoded (as credentials files store it).
pub fn token_hash_hex(token: &str) -> String {
    hex::encode(token_hash(token))
}

/// Reads the token kept in `path` (trimmed), or, when the file does not exist, creates it
/// (atomically, mode 0600) with a new token of `prefix` and `random_bytes` random bytes.
/// Returns the token and whether it was just created. Whether an existing token is
/// acceptable (empty, too short) is the caller's rule.
pub fn load_or_create(
    path: &Path,
    prefix: &str,
    random_bytes: usize,
) -> Result<(String, bool), FileError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok((t.trim().to_string(), false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = new_token(prefix, random_bytes);
            write_atomic(path, format!("{token}\n").as_bytes(), 0o600)?;
            Ok((token, true))
        }
        Err(source) => Err(FileError {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_random_hex() {
        let a = new_token("opx_", 24);
        let b = new_token("opx_", 24);
        assert!(a.starts_with("opx_"), "{a}");
        assert_eq!(a.len(), 4 + 48);
        assert!(a[4..].bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
        assert_eq!(new_token("opg_", 32).len(), 4 + 64);
    }

    #[test]
    fn hash_is_sha256() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(token_hash_hex("abc"), abc);
        assert_eq!(hex::encode(token_hash("abc")), abc);
    }

    #[test]
    fn load_or_create_creates_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin.token");
        let (a, created) = load_or_create(&p, "opa_", 24).unwrap();
        assert!(created && a.starts_with("opa_"));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("{a}\n"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (b, created) = load_or_create(&p, "opa_", 24).unwrap();
        assert!(!created);
        assert_eq!(a, b);
        std::fs::write(&p, "  \n").unwrap();
        assert_eq!(
            load_or_create(&p, "opa_", 24).unwrap(),
            (String::new(), false)
        );
    }

    #[test]
    fn load_or_create_reports_other_errors_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading fails, and not with NotFound.
        let e = load_or_create(dir.path(), "opa_", 24).unwrap_err();
        assert_eq!(e.path, dir.path());
    }
}
