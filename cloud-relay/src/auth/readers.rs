//! Read tokens: named credentials for the query API, for the payroll and reporting
//! systems that pull punches, so none of them needs the admin token.
//!
//! ## Readers file
//!
//! `auth.readers_file` (default `<relay.data_dir>/readers`), plain text, one reader per line:
//! `<name> TAB <sha256(token) hex> TAB <added, Unix ms>`; `#` starts a comment. Managed by
//! `outpost-relay reader add NAME` (prints an `opr_` token once) and `reader revoke NAME`,
//! written atomically and reloaded by the running relay like the gateways file. A reader
//! token may call `GET /v1/punches`, `/v1/punches.csv`, `/v1/gateways` and `/v1/conflicts`
//! and nothing else: it cannot send batches (only gateway credentials can).

use std::collections::HashMap;
use std::path::Path;

use outpost_ops::time::now_ms;
use subtle::ConstantTimeEq;

use super::{
    check_id, digest_field, new_token, parse_lines, parse_ms, read_optional, token_hash,
    write_atomic, AuthError, Live, DIGEST_HEX,
};

/// One read token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reader {
    /// Who holds it (for the operator; 1-64 bytes, no spaces).
    pub name: String,
    /// SHA-256 of the token.
    pub token_hash: [u8; 32],
    /// When it was issued, Unix ms.
    pub added_ms: i64,
}

/// The parsed readers file.
#[derive(Debug, Clone, Default)]
pub struct Readers {
    /// In file order.
    list: Vec<Reader>,
    by_hash: HashMap<[u8; 32], usize>,
}

/// The live set of read tokens.
pub type ReaderCreds = Live<Readers>;

impl Readers {
    /// Parses the file's text.
    pub fn parse(path: &Path, text: &str) -> Result<Readers, AuthError> {
        let mut r = Readers::default();
        parse_lines(path, text, &[3], |f| {
            let name = check_id("reader name", f[0]).map_err(|e| e.to_string())?;
            let token_hash = digest_field(f[1])?
                .ok_or_else(|| format!("the hash must be {DIGEST_HEX} hex digits"))?;
            r.insert(Reader {
                name: name.as_str().to_string(),
                token_hash,
                added_ms: parse_ms(f[2])?,
            })
        })?;
        Ok(r)
    }

    fn insert(&mut self, reader: Reader) -> Result<(), String> {
        if self.find(&reader.name).is_some() {
            return Err(format!("reader {} is listed twice", reader.name));
        }
        if self.by_hash.contains_key(&reader.token_hash) {
            return Err(format!(
                "reader {} shares its token with another reader",
                reader.name
            ));
        }
        self.by_hash.insert(reader.token_hash, self.list.len());
        self.list.push(reader);
        Ok(())
    }

    fn find(&self, name: &str) -> Option<&Reader> {
        self.list.iter().find(|r| r.name == name)
    }

    /// Reads the file; a missing file is an empty set.
    pub fn load(path: &Path) -> Result<Readers, AuthError> {
        match read_optional(path)? {
            Some(text) => Readers::parse(path, &text),
            None => Ok(Readers::default()),
        }
    }

    fn render(&self) -> String {
        let mut s = String::from(
            "# Outpost relay read tokens: name TAB sha256(token) TAB added_ms\n\
             # Managed by `outpost-relay reader add|revoke`; only hashes are stored.\n",
        );
        for r in &self.list {
            s.push_str(&format!(
                "{}\t{}\t{}\n",
                r.name,
                hex::encode(r.token_hash),
                r.added_ms
            ));
        }
        s
    }

    /// The reader whose token is `token`, if any (digest compared in constant time).
    pub fn authenticate(&self, token: &str) -> Option<&Reader> {
        let h = token_hash(token);
        let r = &self.list[*self.by_hash.get(&h)?];
        bool::from(r.token_hash.ct_eq(&h)).then_some(r)
    }

    /// Every reader, in file order.
    pub fn list(&self) -> &[Reader] {
        &self.list
    }
}

/// `reader add`: issues a read token and returns it.
pub fn add_reader(path: &Path, name: &str) -> Result<String, AuthError> {
    let id = check_id("reader name", name)?;
    let mut r = Readers::load(path)?;
    if r.find(id.as_str()).is_some() {
        return Err(AuthError::ExistsReader(name.to_string()));
    }
    let token = new_token("opr_");
    r.insert(Reader {
        name: id.as_str().to_string(),
        token_hash: token_hash(&token),
        added_ms: now_ms(),
    })
    .map_err(AuthError::Duplicate)?;
    write_atomic(path, &r.render(), 0o600)?;
    Ok(token)
}

/// `reader revoke`: removes a read token.
pub fn revoke_reader(path: &Path, name: &str) -> Result<(), AuthError> {
    let r = Readers::load(path)?;
    if r.find(name).is_none() {
        return Err(AuthError::UnknownReader(name.to_string()));
    }
    let mut kept = Readers::default();
    for x in r.list.into_iter().filter(|x| x.name != name) {
        // Cannot fail: the entries were unique in `r`.
        let _ = kept.insert(x);
    }
    write_atomic(path, &kept.render(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_authenticate_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("readers");
        let a = add_reader(&path, "payroll").unwrap();
        let b = add_reader(&path, "bi").unwrap();
        assert!(a.starts_with("opr_") && a != b);
        assert!(matches!(
            add_reader(&path, "payroll"),
            Err(AuthError::ExistsReader(_))
        ));
        assert!(matches!(
            add_reader(&path, "two words"),
            Err(AuthError::BadId { .. })
        ));
        let r = Readers::load(&path).unwrap();
        assert_eq!(r.authenticate(&a).unwrap().name, "payroll");
        assert_eq!(r.authenticate(&b).unwrap().name, "bi");
        assert!(r.authenticate("opr_nope").is_none());
        assert!(!std::fs::read_to_string(&path).unwrap().contains(&a));
        revoke_reader(&path, "payroll").unwrap();
        assert!(matches!(
            revoke_reader(&path, "payroll"),
            Err(AuthError::UnknownReader(_))
        ));
        let r = Readers::load(&path).unwrap();
        assert!(r.authenticate(&a).is_none());
        assert!(r.authenticate(&b).is_some());
        assert_eq!(r.list().len(), 1);
    }

    #[test]
    fn malformed_lines_are_named() {
        let p = Path::new("readers");
        let e = Readers::parse(p, "# c\npayroll\tzz\t1\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let h = "ab".repeat(32);
        let e = Readers::parse(p, &format!("a\t{h}\t1\nb\t{h}\t1\n")).unwrap_err();
        assert!(e.to_string().contains("shares its token"), "{e}");
        let e = Readers::parse(p, &format!("a\t{h}\n")).unwrap_err();
        assert!(e.to_string().contains("3 tab-separated"), "{e}");
    }
}
