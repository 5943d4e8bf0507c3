//! Gateway credentials and the admin token.
//!
//! ## Gateways file
//!
//! Plain text, one gateway per line: `<gateway_id> TAB <site_id> TAB <sha256(token) hex>
//! TAB <added, Unix ms>`. Lines starting with `#` are comments. Only hashes are stored: a
//! token is printed once by `outpost-relay gateway add ID --site SITE` and never again.
//! The CLI edits the file atomically (write a temporary file, fsync, rename, fsync the
//! directory), so the running relay never reads half a file; the relay polls the file's
//! metadata every `auth.reload_interval_ms` and swaps in the new set ([`watch`]). Revoking
//! (`gateway revoke ID`) removes the line; the gateway's next request gets 401. The file
//! lives outside sled because sled allows one process per database.
//!
//! Tokens are `opg_` + 32 random bytes in hex. A presented token is hashed and looked up by
//! its digest, and the stored digest is compared in constant time. Looking up by a SHA-256
//! digest leaks nothing useful through timing: an attacker cannot steer the digest of a
//! guess towards a stored one.
//!
//! ## Admin token
//!
//! One token in a file (mode 0600), created at the first `run` if missing. It guards the
//! query API (`/v1/punches`, `/v1/gateways`, `/v1/conflicts`) and `/metrics` is open.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use outpost_protocol::Id;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
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
    /// A line of the file is malformed.
    #[error("{path} line {line}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// `gateway add` for an id that exists.
    #[error("gateway {0} already exists; run `outpost-relay gateway revoke {0}` first to issue a new token")]
    Exists(String),
    /// `gateway revoke` for an unknown id.
    #[error("no gateway {0} in the gateways file")]
    Unknown(String),
    /// An invalid gateway or site id.
    #[error(
        "invalid {what} {value:?}: {reason} (1-64 bytes, no spaces, / + # or control characters)"
    )]
    BadId {
        /// `gateway id` or `site id`.
        what: &'static str,
        /// The value.
        value: String,
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

/// One gateway's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayCred {
    /// Its id: batches must carry exactly this gateway_id.
    pub gateway_id: Id,
    /// Its site: batches must carry exactly this site_id.
    pub site_id: Id,
    /// SHA-256 of its token.
    pub token_hash: [u8; 32],
    /// When it was added, Unix ms.
    pub added_ms: i64,
}

/// The parsed gateways file.
#[derive(Debug, Clone, Default)]
pub struct Gateways {
    by_hash: HashMap<[u8; 32], GatewayCred>,
    order: Vec<[u8; 32]>,
}

/// SHA-256 of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn check_id(what: &'static str, value: &str) -> Result<Id, AuthError> {
    let bad = |reason: String| AuthError::BadId {
        what,
        value: value.to_string(),
        reason,
    };
    if value.contains(char::is_whitespace) {
        return Err(bad("contains whitespace".into()));
    }
    Id::new_topic_safe(value).map_err(|e| bad(e.to_string()))
}

impl Gateways {
    /// Parses the file's text.
    pub fn parse(path: &Path, text: &str) -> Result<Gateways, AuthError> {
        let mut g = Gateways::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |message: String| AuthError::Malformed {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() != 4 {
                return Err(bad("expected 4 tab-separated fields".into()));
            }
            let gateway_id = check_id("gateway id", f[0]).map_err(|e| bad(e.to_string()))?;
            let site_id = check_id("site id", f[1]).map_err(|e| bad(e.to_string()))?;
            let token_hash: [u8; 32] = hex::decode(f[2])
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| bad("the hash must be 64 hex digits".into()))?;
            let added_ms = f[3]
                .parse()
                .map_err(|_| bad("the time must be Unix ms".into()))?;
            if g.find_id(gateway_id.as_str()).is_some() {
                return Err(bad(format!("gateway {gateway_id} is listed twice")));
            }
            g.order.push(token_hash);
            g.by_hash.insert(
                token_hash,
                GatewayCred {
                    gateway_id,
                    site_id,
                    token_hash,
                    added_ms,
                },
            );
        }
        Ok(g)
    }

    /// Reads the file; a missing file is an empty set.
    pub fn load(path: &Path) -> Result<Gateways, AuthError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Gateways::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Gateways::default()),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    fn render(&self) -> String {
        let mut s = String::from(
            "# Outpost relay gateway credentials: gateway_id TAB site_id TAB sha256(token) TAB added_ms\n\
             # Managed by `outpost-relay gateway add|revoke`; only token hashes are stored.\n",
        );
        for h in &self.order {
            if let Some(c) = self.by_hash.get(h) {
                s.push_str(&format!(
                    "{}\t{}\t{}\t{}\n",
                    c.gateway_id,
                    c.site_id,
                    hex::encode(c.token_hash),
                    c.added_ms
                ));
            }
        }
        s
    }

    fn find_id(&self, gateway_id: &str) -> Option<&GatewayCred> {
        self.by_hash
            .values()
            .find(|c| c.gateway_id.as_str() == gateway_id)
    }

    /// The gateway whose token is `token`, if any.
    pub fn authenticate(&self, token: &str) -> Option<&GatewayCred> {
        let h = token_hash(token);
        let c = self.by_hash.get(&h)?;
        bool::from(c.token_hash.ct_eq(&h)).then_some(c)
    }

    /// Every gateway, in file order.
    pub fn list(&self) -> Vec<&GatewayCred> {
        self.order
            .iter()
            .filter_map(|h| self.by_hash.get(h))
            .collect()
    }

    /// Number of gateways.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// A new random token with the given prefix.
pub fn new_token(prefix: &str) -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    format!("{prefix}{}", hex::encode(b))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Writes `text` to `path` atomically: temp file in the same directory, fsync, rename,
/// fsync the directory. `mode` is applied to the new file.
pub fn write_atomic(path: &Path, text: &str, mode: u32) -> Result<(), AuthError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

/// `gateway add`: issues a token for a new gateway and returns it.
pub fn add_gateway(path: &Path, gateway_id: &str, site_id: &str) -> Result<String, AuthError> {
    let gateway = check_id("gateway id", gateway_id)?;
    let site = check_id("site id", site_id)?;
    let mut g = Gateways::load(path)?;
    if g.find_id(gateway.as_str()).is_some() {
        return Err(AuthError::Exists(gateway_id.to_string()));
    }
    let token = new_token("opg_");
    let h = token_hash(&token);
    g.order.push(h);
    g.by_hash.insert(
        h,
        GatewayCred {
            gateway_id: gateway,
            site_id: site,
            token_hash: h,
            added_ms: now_ms(),
        },
    );
    write_atomic(path, &g.render(), 0o600)?;
    Ok(token)
}

/// `gateway revoke`: removes a gateway's credentials.
pub fn revoke_gateway(path: &Path, gateway_id: &str) -> Result<(), AuthError> {
    let mut g = Gateways::load(path)?;
    let h = g
        .find_id(gateway_id)
        .map(|c| c.token_hash)
        .ok_or_else(|| AuthError::Unknown(gateway_id.to_string()))?;
    g.by_hash.remove(&h);
    g.order.retain(|x| *x != h);
    write_atomic(path, &g.render(), 0o600)
}

/// The live set of gateway credentials, shared by request handlers.
#[derive(Clone, Default)]
pub struct GatewayCreds(Arc<RwLock<Arc<Gateways>>>);

impl GatewayCreds {
    /// A set holding `g`.
    pub fn new(g: Gateways) -> Self {
        GatewayCreds(Arc::new(RwLock::new(Arc::new(g))))
    }

    /// The current set.
    pub fn current(&self) -> Arc<Gateways> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn replace(&self, g: Gateways) {
        let mut w = match self.0.write() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        };
        *w = Arc::new(g);
    }
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Re-reads the gateways file whenever its metadata changes, until `cancel`. A file that
/// fails to parse is logged and ignored (the previous set stays in force).
pub async fn watch(path: PathBuf, creds: GatewayCreds, every: Duration, cancel: CancellationToken) {
    let mut stamp = file_stamp(&path);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = file_stamp(&path);
        if now == stamp {
            continue;
        }
        stamp = now;
        let p = path.clone();
        match tokio::task::spawn_blocking(move || Gateways::load(&p)).await {
            Ok(Ok(g)) => {
                tracing::info!(gateways = g.len(), file = %path.display(), "gateway credentials reloaded");
                creds.replace(g);
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "gateway credentials file is invalid; keeping the previous set (fix the file or re-run `outpost-relay gateway add`)")
            }
            Err(e) => tracing::error!(error = %e, "reloading gateway credentials failed"),
        }
    }
}

/// The admin token: its hash, for constant-time comparison.
#[derive(Clone)]
pub struct AdminToken([u8; 32]);

impl AdminToken {
    /// Reads the token from `path`, creating the file with a new random token (mode 0600)
    /// if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<AdminToken, AuthError> {
        match std::fs::read_to_string(path) {
            Ok(t) => {
                let t = t.trim();
                if t.len() < 16 {
                    return Err(AuthError::Malformed {
                        path: path.to_path_buf(),
                        line: 1,
                        message: "the admin token must be at least 16 characters".into(),
                    });
                }
                Ok(AdminToken(token_hash(t)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let t = new_token("opa_");
                write_atomic(path, &format!("{t}\n"), 0o600)?;
                tracing::info!(file = %path.display(), "created a new admin token (auth.admin_token_file)");
                Ok(AdminToken(token_hash(&t)))
            }
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Whether `token` is the admin token (constant time).
    pub fn check(&self, token: &str) -> bool {
        self.0.ct_eq(&token_hash(token)).into()
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(value: Option<&axum::http::HeaderValue>) -> Option<&str> {
    let v = value?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_authenticate_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateways");
        let t1 = add_gateway(&path, "gw-1", "HC001").unwrap();
        let t2 = add_gateway(&path, "gw-2", "HC002").unwrap();
        assert!(t1.starts_with("opg_") && t1 != t2);
        assert!(matches!(
            add_gateway(&path, "gw-1", "HC001"),
            Err(AuthError::Exists(_))
        ));
        assert!(matches!(
            add_gateway(&path, "a b", "HC001"),
            Err(AuthError::BadId { .. })
        ));
        assert!(matches!(
            add_gateway(&path, "gw-3", "a/b"),
            Err(AuthError::BadId { .. })
        ));
        let g = Gateways::load(&path).unwrap();
        assert_eq!(g.authenticate(&t1).unwrap().gateway_id.as_str(), "gw-1");
        assert_eq!(g.authenticate(&t2).unwrap().site_id.as_str(), "HC002");
        assert!(g.authenticate("opg_nope").is_none());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&t1), "only hashes are stored");
        revoke_gateway(&path, "gw-1").unwrap();
        assert!(matches!(
            revoke_gateway(&path, "gw-1"),
            Err(AuthError::Unknown(_))
        ));
        let g = Gateways::load(&path).unwrap();
        assert!(g.authenticate(&t1).is_none());
        assert!(g.authenticate(&t2).is_some());
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn malformed_lines_are_named() {
        let p = Path::new("gw");
        let e = Gateways::parse(p, "# c\n\ngw\tHC\tzz\t1\n").unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        let h = "ab".repeat(32);
        let e = Gateways::parse(p, &format!("gw\tHC\t{h}\t1\ngw\tHC\t{h}\t1\n")).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn admin_token_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let a = AdminToken::load_or_create(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(a.check(text.trim()));
        assert!(!a.check("wrong"));
        let b = AdminToken::load_or_create(&path).unwrap();
        assert!(b.check(text.trim()));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn bearer_parsing() {
        let v = axum::http::HeaderValue::from_static("Bearer abc");
        assert_eq!(bearer(Some(&v)), Some("abc"));
        let v = axum::http::HeaderValue::from_static("Basic abc");
        assert_eq!(bearer(Some(&v)), None);
        assert_eq!(bearer(None), None);
    }
}
