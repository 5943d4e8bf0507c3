//! Device and admin credentials.
//!
//! ## Devices file
//!
//! Plain text, one device per line: `<device_id> <TAB> <sha256(token) hex> <TAB> <added>`.
//! Lines starting with `#` are comments. Only hashes are stored: a token is shown once, by
//! `outpost-gateway device add ID`, and never again. The CLI edits the file atomically
//! (write a temporary file, fsync, rename), and the running gateway notices the change
//! within a few seconds ([`watch_devices`]) — no restart needed.
//!
//! Tokens are 24 random bytes, hex encoded with an `opd_` prefix. Because tokens are long
//! random strings, looking one up by its SHA-256 reveals nothing useful through timing;
//! the admin token is compared in constant time.
//!
//! ## Admin token
//!
//! One token in a file (mode 0600), created at first start if missing. It guards
//! `/v1/status` and `/v1/export`, and the CLI reads the same file to call them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outpost_ops::time::now_ms;

use outpost_ops::file::{write_atomic, FileWatch};
use outpost_ops::token::token_hash_hex;
use outpost_protocol::Id;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A credentials file problem.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line of the devices file is not `id<TAB>hash<TAB>added`.
    #[error("{path} line {line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// `device add` for an id that already has a token.
    #[error("device {0} already has a token; revoke it first (outpost-gateway device revoke {0})")]
    Exists(String),
    /// `device revoke` for an unknown id.
    #[error("device {0} has no token")]
    Unknown(String),
    /// The device id is not valid.
    #[error("invalid device id {id:?}: {reason}")]
    InvalidId {
        /// The id given.
        id: String,
        /// Why.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuthError + '_ {
    move |source| AuthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Random bytes in a token the gateway issues (device, admin, internal MQTT password).
const TOKEN_BYTES: usize = 24;

/// A new random token: `prefix` and [`TOKEN_BYTES`] random bytes in hex.
pub fn new_token(prefix: &str) -> String {
    outpost_ops::token::new_token(prefix, TOKEN_BYTES)
}

/// The known devices: token hash → device id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeviceTable {
    by_hash: HashMap<String, String>,
    entries: Vec<DeviceEntry>,
}

/// One line of the devices file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    /// The device id.
    pub device_id: String,
    /// SHA-256 of its token, hex.
    pub token_sha256: String,
    /// When it was added (RFC 3339).
    pub added: String,
}

impl DeviceTable {
    /// Reads the devices file; a missing file is an empty table.
    pub fn load(path: &Path) -> Result<DeviceTable, AuthError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DeviceTable::default()),
            Err(e) => return Err(io_err(path)(e)),
        };
        let mut table = DeviceTable::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let parse = |message: &str| AuthError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                message: message.to_string(),
            };
            let mut parts = line.split('\t');
            let (Some(id), Some(hash)) = (parts.next(), parts.next()) else {
                return Err(parse("expected device_id<TAB>sha256<TAB>added"));
            };
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(parse("the token hash must be 64 hex digits"));
            }
            Id::new_topic_safe(id).map_err(|e| parse(&format!("device id {e}")))?;
            table.insert(DeviceEntry {
                device_id: id.to_string(),
                token_sha256: hash.to_ascii_lowercase(),
                added: parts.next().unwrap_or("").to_string(),
            });
        }
        Ok(table)
    }

    fn insert(&mut self, e: DeviceEntry) {
        self.by_hash
            .insert(e.token_sha256.clone(), e.device_id.clone());
        self.entries.retain(|x| x.device_id != e.device_id);
        self.entries.push(e);
    }

    /// The device a presented token belongs to.
    pub fn device_for_token(&self, token: &str) -> Option<&str> {
        self.by_hash.get(&token_hash_hex(token)).map(String::as_str)
    }

    /// Every device, in file order.
    pub fn entries(&self) -> &[DeviceEntry] {
        &self.entries
    }

    fn render(&self) -> String {
        let mut s = String::from(
            "# Outpost device credentials: device_id<TAB>sha256(token)<TAB>added.\n\
             # Managed by `outpost-gateway device add|revoke`; tokens themselves are not stored.\n",
        );
        for e in &self.entries {
            s.push_str(&format!(
                "{}\t{}\t{}\n",
                e.device_id, e.token_sha256, e.added
            ));
        }
        s
    }
}

/// Writes the devices file atomically (mode 0600, [`write_atomic`]) and, when the CLI runs
/// as root, gives it to the owner of its directory (the service user on a packaged box), so
/// the running gateway can still read it. Errors name `path`.
fn write_devices_file(path: &Path, table: &DeviceTable) -> Result<(), AuthError> {
    write_atomic(path, table.render().as_bytes(), 0o600).map_err(|e| io_err(path)(e.source))?;
    give_to_directory_owner(path).map_err(io_err(path))
}

/// The chown step of [`write_devices_file`]; nothing unless running as root.
fn give_to_directory_owner(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let m = std::fs::metadata(outpost_ops::file::parent_dir(path))?;
    std::os::unix::fs::chown(path, Some(m.uid()), Some(m.gid()))
}

/// Adds a device and returns its new token (shown once).
pub fn add_device(path: &Path, device_id: &str) -> Result<String, AuthError> {
    Id::new_topic_safe(device_id).map_err(|e| AuthError::InvalidId {
        id: device_id.into(),
        reason: e.to_string(),
    })?;
    let mut table = DeviceTable::load(path)?;
    if table.entries.iter().any(|e| e.device_id == device_id) {
        return Err(AuthError::Exists(device_id.into()));
    }
    let token = new_token("opd_");
    table.insert(DeviceEntry {
        device_id: device_id.into(),
        token_sha256: token_hash_hex(&token),
        added: outpost_protocol::json::format_time(now_ms(), None),
    });
    write_devices_file(path, &table)?;
    Ok(token)
}

/// Removes a device's token; its requests fail with 401 from then on.
pub fn revoke_device(path: &Path, device_id: &str) -> Result<(), AuthError> {
    let mut table = DeviceTable::load(path)?;
    let before = table.entries.len();
    table.entries.retain(|e| e.device_id != device_id);
    if table.entries.len() == before {
        return Err(AuthError::Unknown(device_id.into()));
    }
    table.by_hash.retain(|_, id| id != device_id);
    write_devices_file(path, &table)
}

/// Loads the devices file and spawns a task that reloads it when it changes
/// ([`outpost_ops::reload::watch_file`], polling every `every`). A file that fails to parse
/// keeps the previous table and logs an error, so a bad edit never locks every device out.
pub fn watch_devices(
    path: PathBuf,
    every: Duration,
    shutdown: CancellationToken,
) -> Result<watch::Receiver<Arc<DeviceTable>>, AuthError> {
    // Take the version before reading, so an edit that lands in between is reloaded.
    let seen = FileWatch::new(&path);
    let table = DeviceTable::load(&path)?;
    let (tx, rx) = watch::channel(Arc::new(table));
    tokio::spawn(outpost_ops::reload::watch_file(
        seen,
        DeviceTable::load,
        "auth.devices_file",
        every,
        shutdown,
        move |t| {
            // No receiver left means the gateway is stopping; nothing to do.
            let _ = tx.send(Arc::new(t));
        },
    ));
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_lookup_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("devices");
        let t1 = add_device(&p, "door-1").unwrap();
        let t2 = add_device(&p, "door-2").unwrap();
        assert!(matches!(
            add_device(&p, "door-1"),
            Err(AuthError::Exists(_))
        ));
        assert!(matches!(
            add_device(&p, "bad/id"),
            Err(AuthError::InvalidId { .. })
        ));
        let table = DeviceTable::load(&p).unwrap();
        assert_eq!(table.device_for_token(&t1), Some("door-1"));
        assert_eq!(table.device_for_token(&t2), Some("door-2"));
        assert_eq!(table.device_for_token("opd_wrong"), None);
        assert!(
            !std::fs::read_to_string(&p).unwrap().contains(&t1),
            "tokens are never stored"
        );
        revoke_device(&p, "door-1").unwrap();
        let table = DeviceTable::load(&p).unwrap();
        assert_eq!(table.device_for_token(&t1), None);
        assert_eq!(table.device_for_token(&t2), Some("door-2"));
        assert!(matches!(
            revoke_device(&p, "door-1"),
            Err(AuthError::Unknown(_))
        ));
    }

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("devices");
        std::fs::write(&p, "# c\ndoor-1\tnothex\n").unwrap();
        let e = DeviceTable::load(&p).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[tokio::test]
    async fn running_gateway_sees_new_devices() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("devices");
        let stop = CancellationToken::new();
        let mut rx = watch_devices(p.clone(), Duration::from_millis(20), stop.clone()).unwrap();
        let token = add_device(&p, "door-9").unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().device_for_token(&token), Some("door-9"));
        stop.cancel();
    }
}
