//! Who may talk to the relay: gateways (by token or by client certificate), the admin
//! token, and named read tokens for the query API ([`readers`]).
//!
//! ## Gateways file
//!
//! Plain text, one gateway per line: `<gateway_id> TAB <site_id> TAB <sha256(token) hex, or
//! -> TAB <added, Unix ms> TAB <sha256(client certificate DER) hex, or ->`. Lines starting
//! with `#` are comments; a line with only the first four fields (the format before mTLS) is
//! a token-only gateway. Only hashes are stored: a token is printed once by
//! `outpost-relay gateway add ID --site SITE` and never again; `gateway add ID --site SITE
//! --cert gw.pem` registers a certificate instead (mTLS, see below) and issues no token.
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
//! ## Client certificates (mTLS)
//!
//! With `tls.client_ca_file` set, the TLS listener asks every client for a certificate and
//! accepts one only if it chains to that CA (clients without one still connect, and use a
//! token). A request without a Bearer token is then authenticated by the SHA-256 of the
//! client's end-entity certificate, which must be registered for exactly one gateway. Both
//! checks are needed: the CA proves the certificate was issued by the operator, the
//! registration says which gateway and site it speaks for, and revoking the gateway
//! revokes the certificate without a CRL. A request that carries a token is judged by the
//! token alone.
//!
//! ## Admin token
//!
//! One token in a file (mode 0600), created at the first `run` if missing. It guards the
//! query API (`/v1/punches`, `/v1/gateways`, `/v1/conflicts`, `/v1/rejected`), as do the
//! read tokens of [`readers`]; `/metrics` is open. The admin token reads every site; a read
//! token reads every site or the sites it was issued for ([`scope`]).

mod client_cert;
pub mod readers;
pub mod scope;

pub use client_cert::ClientCert;
pub use scope::Scope;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use outpost_ops::time::now_ms;

use outpost_ops::file::{FileError, FileWatch};
/// SHA-256 of a token.
pub use outpost_ops::token::token_hash;
use outpost_protocol::Id;
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
    /// `add` would make two entries share a token or a certificate.
    #[error("{0}; revoke the other entry first, or issue a new certificate")]
    Duplicate(String),
    /// `gateway revoke` for an unknown id.
    #[error("no gateway {0} in the gateways file")]
    Unknown(String),
    /// `reader add` for a name that exists.
    #[error("reader {0} already exists; run `outpost-relay reader revoke {0}` first to issue a new token")]
    ExistsReader(String),
    /// `reader revoke` for an unknown name.
    #[error("no reader {0} in the readers file")]
    UnknownReader(String),
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

impl From<FileError> for AuthError {
    fn from(e: FileError) -> Self {
        AuthError::Io {
            path: e.path,
            source: e.source,
        }
    }
}

/// One gateway's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayCred {
    /// Its id: batches must carry exactly this gateway_id.
    pub gateway_id: Id,
    /// Its site: batches must carry exactly this site_id.
    pub site_id: Id,
    /// SHA-256 of its token; `None` for a certificate-only gateway.
    pub token_hash: Option<[u8; 32]>,
    /// SHA-256 of its client certificate (DER); `None` for a token-only gateway.
    pub cert_sha256: Option<[u8; 32]>,
    /// When it was added, Unix ms.
    pub added_ms: i64,
}

/// The parsed gateways file.
#[derive(Debug, Clone, Default)]
pub struct Gateways {
    /// In file order.
    creds: Vec<GatewayCred>,
    by_token: HashMap<[u8; 32], usize>,
    by_cert: HashMap<[u8; 32], usize>,
}

/// Hex digits in a stored SHA-256 digest.
const DIGEST_HEX: usize = 64;

/// SHA-256 of a certificate's DER bytes: how a client certificate is named.
pub fn cert_fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// The fingerprint of the first certificate in a PEM file (for `gateway add --cert`).
pub fn cert_file_fingerprint(path: &Path) -> Result<[u8; 32], AuthError> {
    use outpost_ops::pem::{load_first_cert, PemError};
    match load_first_cert(path) {
        Ok(der) => Ok(cert_fingerprint(der.as_ref())),
        Err(PemError::Read { source, .. }) => Err(io_err(path)(source)),
        Err(e) => Err(AuthError::Malformed {
            path: path.to_path_buf(),
            line: 1,
            message: match e {
                PemError::Syntax { source, .. } => format!("not a PEM certificate: {source}"),
                _ => "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
            },
        }),
    }
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

/// Calls `line` with the tab-separated fields of every line of a credentials file that is
/// not blank or a `#` comment, after checking that it has one of the `counts` of fields.
/// An error from `line` is reported with the file and the line number.
fn parse_lines(
    path: &Path,
    text: &str,
    counts: &[usize],
    mut line: impl FnMut(&[&str]) -> Result<(), String>,
) -> Result<(), AuthError> {
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = l.split('\t').collect();
        let checked = if counts.contains(&f.len()) {
            line(&f)
        } else {
            let n: Vec<String> = counts.iter().map(|c| c.to_string()).collect();
            Err(format!("expected {} tab-separated fields", n.join(" or ")))
        };
        checked.map_err(|message| AuthError::Malformed {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        })?;
    }
    Ok(())
}

/// The text of a credentials file; `None` when it does not exist (yet).
fn read_optional(path: &Path) -> Result<Option<String>, AuthError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Parses the "added" field: Unix ms.
fn parse_ms(v: &str) -> Result<i64, String> {
    v.parse()
        .map_err(|_| "the time must be Unix ms".to_string())
}

/// Parses an optional digest field: 64 hex digits, or `-` for none.
fn digest_field(v: &str) -> Result<Option<[u8; 32]>, String> {
    if v == "-" {
        return Ok(None);
    }
    hex::decode(v)
        .ok()
        .and_then(|v| v.try_into().ok())
        .map(Some)
        .ok_or_else(|| format!("a hash must be {DIGEST_HEX} hex digits (or - for none)"))
}

fn digest_text(d: &Option<[u8; 32]>) -> String {
    d.map_or_else(|| "-".to_string(), hex::encode)
}

impl Gateways {
    /// Parses the file's text.
    pub fn parse(path: &Path, text: &str) -> Result<Gateways, AuthError> {
        let mut g = Gateways::default();
        parse_lines(path, text, &[4, 5], |f| {
            let cred = GatewayCred {
                gateway_id: check_id("gateway id", f[0]).map_err(|e| e.to_string())?,
                site_id: check_id("site id", f[1]).map_err(|e| e.to_string())?,
                token_hash: digest_field(f[2])?,
                added_ms: parse_ms(f[3])?,
                cert_sha256: f.get(4).map(|v| digest_field(v)).transpose()?.flatten(),
            };
            g.insert(cred)
        })?;
        Ok(g)
    }

    /// Adds a gateway, keeping ids, tokens and certificates unique.
    fn insert(&mut self, c: GatewayCred) -> Result<(), String> {
        if self.find_id(c.gateway_id.as_str()).is_some() {
            return Err(format!("gateway {} is listed twice", c.gateway_id));
        }
        if c.token_hash.is_none() && c.cert_sha256.is_none() {
            return Err(format!(
                "gateway {} has neither a token hash nor a certificate",
                c.gateway_id
            ));
        }
        if c.token_hash.is_some_and(|h| self.by_token.contains_key(&h)) {
            return Err(format!(
                "gateway {} shares its token with another gateway",
                c.gateway_id
            ));
        }
        if c.cert_sha256.is_some_and(|h| self.by_cert.contains_key(&h)) {
            return Err(format!(
                "gateway {} shares its certificate with another gateway",
                c.gateway_id
            ));
        }
        let i = self.creds.len();
        if let Some(h) = c.token_hash {
            self.by_token.insert(h, i);
        }
        if let Some(h) = c.cert_sha256 {
            self.by_cert.insert(h, i);
        }
        self.creds.push(c);
        Ok(())
    }

    /// Reads the file; a missing file is an empty set.
    pub fn load(path: &Path) -> Result<Gateways, AuthError> {
        match read_optional(path)? {
            Some(text) => Gateways::parse(path, &text),
            None => Ok(Gateways::default()),
        }
    }

    fn render(&self) -> String {
        let mut s = String::from(
            "# Outpost relay gateway credentials:\n\
             # gateway_id TAB site_id TAB sha256(token) or - TAB added_ms TAB sha256(client cert DER) or -\n\
             # Managed by `outpost-relay gateway add|revoke`; only hashes are stored.\n",
        );
        for c in &self.creds {
            s.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\n",
                c.gateway_id,
                c.site_id,
                digest_text(&c.token_hash),
                c.added_ms,
                digest_text(&c.cert_sha256),
            ));
        }
        s
    }

    fn find_id(&self, gateway_id: &str) -> Option<&GatewayCred> {
        self.creds
            .iter()
            .find(|c| c.gateway_id.as_str() == gateway_id)
    }

    /// The gateway whose token is `token`, if any.
    pub fn authenticate(&self, token: &str) -> Option<&GatewayCred> {
        let h = token_hash(token);
        let c = &self.creds[*self.by_token.get(&h)?];
        let stored = c.token_hash?;
        bool::from(stored.ct_eq(&h)).then_some(c)
    }

    /// The gateway registered for the client certificate whose fingerprint is `cert_sha256`.
    /// The TLS layer has already checked that the certificate chains to
    /// `tls.client_ca_file` and that the client holds its key.
    pub fn authenticate_cert(&self, cert_sha256: &[u8; 32]) -> Option<&GatewayCred> {
        let c = &self.creds[*self.by_cert.get(cert_sha256)?];
        let stored = c.cert_sha256?;
        bool::from(stored.ct_eq(cert_sha256)).then_some(c)
    }

    /// Every gateway, in file order.
    pub fn list(&self) -> Vec<&GatewayCred> {
        self.creds.iter().collect()
    }

    /// Number of gateways.
    pub fn len(&self) -> usize {
        self.creds.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.creds.is_empty()
    }
}

/// Random bytes in a token the relay issues (gateway, reader, admin).
const TOKEN_BYTES: usize = 32;

/// A new random token: `prefix` and [`TOKEN_BYTES`] random bytes in hex.
pub fn new_token(prefix: &str) -> String {
    outpost_ops::token::new_token(prefix, TOKEN_BYTES)
}

/// Writes `text` to `path` atomically ([`outpost_ops::file::write_atomic`]: temp file in
/// the same directory, fsync, rename, fsync the directory). `mode` is applied to the new
/// file.
pub fn write_atomic(path: &Path, text: &str, mode: u32) -> Result<(), AuthError> {
    outpost_ops::file::write_atomic(path, text.as_bytes(), mode).map_err(AuthError::from)
}

/// `gateway add`: issues a token for a new gateway and returns it.
pub fn add_gateway(path: &Path, gateway_id: &str, site_id: &str) -> Result<String, AuthError> {
    let token = new_token("opg_");
    add(path, gateway_id, site_id, Some(token_hash(&token)), None)?;
    Ok(token)
}

/// `gateway add --cert`: registers a gateway that authenticates with the client certificate
/// whose fingerprint is `cert_sha256` (no token is issued).
pub fn add_gateway_cert(
    path: &Path,
    gateway_id: &str,
    site_id: &str,
    cert_sha256: [u8; 32],
) -> Result<(), AuthError> {
    add(path, gateway_id, site_id, None, Some(cert_sha256))
}

fn add(
    path: &Path,
    gateway_id: &str,
    site_id: &str,
    token_hash: Option<[u8; 32]>,
    cert_sha256: Option<[u8; 32]>,
) -> Result<(), AuthError> {
    let gateway = check_id("gateway id", gateway_id)?;
    let site = check_id("site id", site_id)?;
    let mut g = Gateways::load(path)?;
    if g.find_id(gateway.as_str()).is_some() {
        return Err(AuthError::Exists(gateway_id.to_string()));
    }
    g.insert(GatewayCred {
        gateway_id: gateway,
        site_id: site,
        token_hash,
        cert_sha256,
        added_ms: now_ms(),
    })
    .map_err(AuthError::Duplicate)?;
    write_atomic(path, &g.render(), 0o600)
}

/// `gateway revoke`: removes a gateway's credentials.
pub fn revoke_gateway(path: &Path, gateway_id: &str) -> Result<(), AuthError> {
    let g = Gateways::load(path)?;
    if g.find_id(gateway_id).is_none() {
        return Err(AuthError::Unknown(gateway_id.to_string()));
    }
    let mut kept = Gateways::default();
    for c in g.creds.into_iter() {
        if c.gateway_id.as_str() != gateway_id {
            // Cannot fail: the entries were unique in `g`.
            let _ = kept.insert(c);
        }
    }
    write_atomic(path, &kept.render(), 0o600)
}

/// A credentials set that the running relay swaps when its file changes ([`watch`]);
/// request handlers take a cheap snapshot with [`Live::current`].
#[derive(Default)]
pub struct Live<T>(Arc<RwLock<Arc<T>>>);

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Live(self.0.clone())
    }
}

impl<T> Live<T> {
    /// A set holding `v`.
    pub fn new(v: T) -> Self {
        Live(Arc::new(RwLock::new(Arc::new(v))))
    }

    /// The current set.
    pub fn current(&self) -> Arc<T> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn replace(&self, v: T) {
        let mut w = match self.0.write() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        };
        *w = Arc::new(v);
    }
}

/// The live set of gateway credentials, shared by request handlers.
pub type GatewayCreds = Live<Gateways>;

/// Re-reads a credentials file with `load` whenever it changes, until `cancel`, and puts
/// the new set in `live` ([`outpost_ops::reload::watch_file`]: a file that fails to parse
/// is logged and the previous set stays in force). `what` names the file's config key in
/// the log.
pub async fn watch<T: Send + Sync + 'static>(
    path: PathBuf,
    live: Live<T>,
    load: fn(&Path) -> Result<T, AuthError>,
    what: &'static str,
    every: Duration,
    cancel: CancellationToken,
) {
    let seen = FileWatch::new(&path);
    outpost_ops::reload::watch_file(seen, load, what, every, cancel, |v| live.replace(v)).await
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
    fn certificate_gateways_and_the_old_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateways");
        // A file written before mTLS existed: four fields per line.
        let old_token = "opg_old-token-1234567890";
        std::fs::write(
            &path,
            format!("gw-old\tHC001\t{}\t1\n", hex::encode(token_hash(old_token))),
        )
        .unwrap();
        let fp = cert_fingerprint(b"not really DER, but any bytes hash");
        add_gateway_cert(&path, "gw-cert", "HC002", fp).unwrap();
        assert!(matches!(
            add_gateway_cert(&path, "gw-cert2", "HC002", fp),
            Err(AuthError::Duplicate(_))
        ));
        let t = add_gateway(&path, "gw-tok", "HC003").unwrap();
        let g = Gateways::load(&path).unwrap();
        assert_eq!(g.len(), 3);
        assert_eq!(
            g.authenticate(old_token).unwrap().gateway_id.as_str(),
            "gw-old"
        );
        assert_eq!(g.authenticate(&t).unwrap().gateway_id.as_str(), "gw-tok");
        let c = g.authenticate_cert(&fp).unwrap();
        assert_eq!(
            (c.gateway_id.as_str(), c.site_id.as_str()),
            ("gw-cert", "HC002")
        );
        assert!(c.token_hash.is_none());
        assert!(g.authenticate_cert(&[7; 32]).is_none());
        // A certificate-only gateway has no token that could match "-" or anything else.
        assert!(g.authenticate("-").is_none());
        revoke_gateway(&path, "gw-cert").unwrap();
        let g = Gateways::load(&path).unwrap();
        assert!(g.authenticate_cert(&fp).is_none());
        assert!(g.authenticate(old_token).is_some());
    }

    #[test]
    fn cert_file_fingerprint_is_the_der_hash() {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["gw-1".into()]).unwrap();
        let pem = dir.path().join("gw.pem");
        std::fs::write(&pem, ck.cert.pem()).unwrap();
        assert_eq!(
            cert_file_fingerprint(&pem).unwrap(),
            cert_fingerprint(ck.cert.der().as_ref())
        );
        std::fs::write(&pem, "hello").unwrap();
        let e = cert_file_fingerprint(&pem).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn malformed_lines_are_named() {
        let p = Path::new("gw");
        let e = Gateways::parse(p, "# c\n\ngw\tHC\tzz\t1\n").unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        let h = "ab".repeat(32);
        let e = Gateways::parse(p, &format!("gw\tHC\t{h}\t1\ngw\tHC\t{h}\t1\n")).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = Gateways::parse(p, "gw\tHC\t-\t1\t-\n").unwrap_err();
        assert!(e.to_string().contains("neither"), "{e}");
        let e = Gateways::parse(p, &format!("a\tHC\t-\t1\t{h}\nb\tHC\t-\t1\t{h}\n")).unwrap_err();
        assert!(e.to_string().contains("shares its certificate"), "{e}");
    }
}
