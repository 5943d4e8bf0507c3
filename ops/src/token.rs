//! Bearer tokens: long random strings with a prefix that says what they are for (`opd_`
//! device, `opg_` gateway, `opr_` reader, `opa_` admin), stored only as their SHA-256.
//!
//! Because a token is random and long, looking one up by its digest reveals nothing useful
//! through timing: an attacker cannot steer the digest of a guess towards a stored one.
//!
//! The admin token ([`AdminToken`]) is kept in a file created at first start. The daemons'
//! copies differed on a short token: the gateway accepted any non-empty one, the relay
//! refused fewer than [`ADMIN_TOKEN_MIN_LEN`] characters. Both refuse a short one now (an
//! empty file included): a token that short can be guessed, and deleting the file gets a
//! new, long one at the next start.

use std::path::Path;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

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

/// Prefix of admin tokens.
pub const ADMIN_TOKEN_PREFIX: &str = "opa_";
/// Random bytes in a new admin token.
pub const ADMIN_TOKEN_BYTES: usize = 32;
/// The shortest admin token accepted from the file.
pub const ADMIN_TOKEN_MIN_LEN: usize = 16;

/// Why the admin token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    /// The file cannot be read or created.
    #[error(transparent)]
    File(#[from] FileError),
    /// The file holds a token that is too short (or none).
    #[error("{}: the admin token must be at least {ADMIN_TOKEN_MIN_LEN} characters; delete the file to have a new token made at the next start", path.display())]
    TooShort {
        /// The file.
        path: std::path::PathBuf,
    },
}

/// The admin token: only its SHA-256 is kept, and a presented token is compared with it
/// in constant time.
#[derive(Clone)]
pub struct AdminToken([u8; 32]);

impl std::fmt::Debug for AdminToken {
    // Not even the digest goes to a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// Reads the token in `path`, creating the file (mode 0600) with a new `opa_` token if
    /// it does not exist. Returns the token and whether the file was just created.
    pub fn load_or_create(path: &Path) -> Result<(AdminToken, bool), AdminTokenError> {
        let (t, created) = load_or_create(path, ADMIN_TOKEN_PREFIX, ADMIN_TOKEN_BYTES)?;
        Ok((AdminToken::from_token(path, &t)?, created))
    }

    /// Reads an existing token file, for a CLI command that calls the daemon's admin API.
    pub fn read(path: &Path) -> Result<String, AdminTokenError> {
        let t = std::fs::read_to_string(path)
            .map_err(|source| FileError {
                path: path.to_path_buf(),
                source,
            })?
            .trim()
            .to_string();
        AdminToken::from_token(path, &t)?;
        Ok(t)
    }

    fn from_token(path: &Path, token: &str) -> Result<AdminToken, AdminTokenError> {
        if token.len() < ADMIN_TOKEN_MIN_LEN {
            return Err(AdminTokenError::TooShort {
                path: path.to_path_buf(),
            });
        }
        Ok(AdminToken(token_hash(token)))
    }

    /// Whether `presented` is the admin token (constant time).
    pub fn matches(&self, presented: &str) -> bool {
        self.0.ct_eq(&token_hash(presented)).into()
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
    fn admin_token_is_created_once_and_short_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin.token");
        let (a, created) = AdminToken::load_or_create(&p).unwrap();
        assert!(created);
        let (b, created) = AdminToken::load_or_create(&p).unwrap();
        assert!(!created);
        let t = AdminToken::read(&p).unwrap();
        assert!(t.starts_with("opa_") && a.matches(&t) && b.matches(&t));
        assert!(!a.matches("opa_nope") && !a.matches(""));
        assert_eq!(format!("{a:?}"), "AdminToken(..)");
        for short in ["", "  \n", "opa_123"] {
            std::fs::write(&p, short).unwrap();
            let e = AdminToken::load_or_create(&p).unwrap_err();
            assert!(
                matches!(e, AdminTokenError::TooShort { .. }),
                "{short:?}: {e}"
            );
            assert!(e.to_string().contains("delete the file"), "{e}");
            assert!(AdminToken::read(&p).is_err());
        }
        let e = AdminToken::read(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, AdminTokenError::File(_)), "{e}");
    }

    #[test]
    fn load_or_create_reports_other_errors_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading fails, and not with NotFound.
        let e = load_or_create(dir.path(), "opa_", 24).unwrap_err();
        assert_eq!(e.path, dir.path());
    }
}
