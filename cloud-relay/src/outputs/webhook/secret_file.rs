//! The `secret_file` of a webhook output: read at start, or made when it is missing.
//!
//! The file holds one line, `whsec_<base64 of the key>`. When it does not exist the relay
//! makes a new random secret and writes it atomically with mode 0600 (creating the
//! directory if needed), so the operator only has to hand the file to the receiver. A file
//! that exists but does not hold a valid secret is an error, never replaced: the receiver
//! may already have it. With several relays on one PostgreSQL, every relay needs the same
//! file (copy it before starting the second), or the receiver sees two secrets.

use std::path::{Path, PathBuf};

use outpost_ops::file::{write_atomic, FileError};

use super::signature::{Secret, SecretFormatError, SECRET_MAX_BYTES, SECRET_MIN_BYTES};

/// Why the secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// It cannot be read, or cannot be created.
    #[error(transparent)]
    File(#[from] FileError),
    /// It does not hold a secret.
    #[error(
        "{}: not a webhook secret: {source}; the file must hold one line \
         \"whsec_<base64 of {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} random bytes>\" \
         (delete it to have a new one made at the next start, then give it to the receiver)",
        path.display()
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: SecretFormatError,
    },
}

/// Reads the secret in `path`, or creates the file (atomically, mode 0600) with a new one
/// when it does not exist. Returns the secret and whether it was just created.
pub fn load_or_create(path: &Path) -> Result<(Secret, bool), SecretFileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            Secret::parse(&text)
                .map(|s| (s, false))
                .map_err(|source| SecretFileError::Malformed {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (secret, text) = Secret::generate();
            write_atomic(path, format!("{text}\n").as_bytes(), 0o600)?;
            Ok((secret, true))
        }
        Err(source) => Err(FileError {
            path: path.to_path_buf(),
            source,
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_missing_file_is_created_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc").join("payroll.whsec");
        let (first, created) = load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("whsec_") && text.ends_with('\n'),
            "{text:?}"
        );
        let (again, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again.sign("a", 1, b"b"), first.sign("a", 1, b"b"));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            text,
            "not rewritten"
        );
    }

    #[test]
    fn a_malformed_file_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.whsec");
        std::fs::write(&path, "hunter2\n").unwrap();
        let e = load_or_create(&path).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, SecretFileError::Malformed { .. })
                && msg.contains("bad.whsec")
                && msg.contains("whsec_<base64"),
            "{msg}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hunter2\n");
    }

    #[test]
    fn an_unreadable_path_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading it fails with something other
        // than "not found", which must not be papered over by making a new secret.
        let e = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(e, SecretFileError::File(_)), "{e}");
        assert!(
            e.to_string().contains(&*dir.path().to_string_lossy()),
            "{e}"
        );
    }
}
