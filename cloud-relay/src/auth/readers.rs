//! Read tokens: named credentials for the query API, for the payroll and reporting
//! systems that pull punches, so none of them needs the admin token.
//!
//! ## Readers file
//!
//! `auth.readers_file` (default `<relay.data_dir>/readers`), plain text, one reader per line:
//! `<name> TAB <sha256(token) hex> TAB <added, Unix ms> [TAB <site> <site> ...]`; `#` starts
//! a comment. Managed by `outpost-relay reader add NAME [--site SITE]...` (prints an `opr_`
//! token once) and `reader revoke NAME`, written atomically and reloaded by the running
//! relay like the gateways file. A reader token may call the read API (`GET /v1/punches`,
//! `/v1/punches.csv`, `/v1/gateways`, `/v1/conflicts`, `/v1/rejected`) and nothing else: it
//! cannot send batches (only gateway credentials can).
//!
//! ## Site scope
//!
//! The optional fourth field lists the sites the token may read ([`Scope::Sites`]),
//! separated by spaces (site ids never contain whitespace: they are checked like the
//! gateways file's, `outpost_protocol::Id`, topic-safe, no whitespace). A line of three
//! fields, which is what every file written before scopes holds, is a reader of every site
//! ([`Scope::All`]); the CLI still writes such readers with three fields. A file with a
//! scoped reader is refused whole by a relay that predates scopes ("expected 3
//! tab-separated fields"; it keeps its previous set), so a downgrade never widens a
//! token's scope silently.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use outpost_ops::time::now_ms;
use subtle::ConstantTimeEq;

use super::scope::Scope;
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
    /// The sites it may read.
    pub scope: Scope,
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
        parse_lines(path, text, &[3, 4], |f| {
            let name = check_id("reader name", f[0]).map_err(|e| e.to_string())?;
            let token_hash = digest_field(f[1])?
                .ok_or_else(|| format!("the hash must be {DIGEST_HEX} hex digits"))?;
            let scope = match f.get(3) {
                None => Scope::All,
                Some(v) => {
                    let sites: Vec<&str> = v.split(' ').filter(|s| !s.is_empty()).collect();
                    if sites.is_empty() {
                        return Err("the sites field lists no site".to_string());
                    }
                    site_scope(&sites).map_err(|e| e.to_string())?
                }
            };
            r.insert(Reader {
                name: name.as_str().to_string(),
                token_hash,
                added_ms: parse_ms(f[2])?,
                scope,
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
            "# Outpost relay read tokens: name TAB sha256(token) TAB added_ms [TAB sites, space-separated]\n\
             # No sites field: the token reads every site.\n\
             # Managed by `outpost-relay reader add|revoke`; only hashes are stored.\n",
        );
        for r in &self.list {
            s.push_str(&format!(
                "{}\t{}\t{}",
                r.name,
                hex::encode(r.token_hash),
                r.added_ms
            ));
            if let Scope::Sites(sites) = &r.scope {
                s.push('\t');
                s.push_str(&sites.iter().cloned().collect::<Vec<_>>().join(" "));
            }
            s.push('\n');
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

/// The scope of a reader limited to `sites` (each checked like a gateway's site id);
/// duplicates collapse.
fn site_scope<S: AsRef<str>>(sites: &[S]) -> Result<Scope, AuthError> {
    let mut set = BTreeSet::new();
    for s in sites {
        set.insert(check_id("site id", s.as_ref())?.as_str().to_string());
    }
    Ok(Scope::Sites(set))
}

/// `reader add`: issues a read token and returns it. With no `sites` the token reads every
/// site; otherwise only those.
pub fn add_reader(path: &Path, name: &str, sites: &[String]) -> Result<String, AuthError> {
    let id = check_id("reader name", name)?;
    let scope = if sites.is_empty() {
        Scope::All
    } else {
        site_scope(sites)?
    };
    let mut r = Readers::load(path)?;
    if r.find(id.as_str()).is_some() {
        return Err(AuthError::ExistsReader(name.to_string()));
    }
    let token = new_token("opr_");
    r.insert(Reader {
        name: id.as_str().to_string(),
        token_hash: token_hash(&token),
        added_ms: now_ms(),
        scope,
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
        let a = add_reader(&path, "payroll", &[]).unwrap();
        let b = add_reader(&path, "bi", &[]).unwrap();
        assert!(a.starts_with("opr_") && a != b);
        assert!(matches!(
            add_reader(&path, "payroll", &[]),
            Err(AuthError::ExistsReader(_))
        ));
        assert!(matches!(
            add_reader(&path, "two words", &[]),
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
        assert!(e.to_string().contains("3 or 4 tab-separated"), "{e}");
    }

    #[test]
    fn scoped_readers_round_trip_and_old_files_mean_every_site() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("readers");
        // A file written before scopes: three fields, read as every site.
        let old = "opr_old-token-1234567890";
        std::fs::write(
            &path,
            format!("# old\nlegacy\t{}\t1\n", hex::encode(token_hash(old))),
        )
        .unwrap();
        let sites = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let hc = add_reader(&path, "hc", &sites(&["HC002", "HC001", "HC002"])).unwrap();
        let all = add_reader(&path, "all", &[]).unwrap();
        let r = Readers::load(&path).unwrap();
        assert_eq!(r.authenticate(old).unwrap().scope, Scope::All);
        assert_eq!(r.authenticate(&all).unwrap().scope, Scope::All);
        let scoped = &r.authenticate(&hc).unwrap().scope;
        assert_eq!(scoped.describe(), "HC001 HC002");
        assert!(scoped.allows("HC001") && !scoped.allows("HC003"));
        // Unscoped readers keep the old three-field line, so an older relay still reads
        // a file without scoped readers.
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].split('\t').count(), 3, "{}", lines[0]);
        assert!(lines[1].ends_with("\tHC001 HC002"), "{}", lines[1]);
        assert_eq!(lines[2].split('\t').count(), 3, "{}", lines[2]);
        // Site ids are checked like the gateways file's.
        for bad in ["a/b", "", "x+y"] {
            assert!(
                matches!(
                    add_reader(&path, "bad", &sites(&[bad])),
                    Err(AuthError::BadId {
                        what: "site id",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
        // Revoking one reader keeps the others' scopes.
        revoke_reader(&path, "legacy").unwrap();
        let r = Readers::load(&path).unwrap();
        assert_eq!(r.authenticate(&hc).unwrap().scope.describe(), "HC001 HC002");
        assert!(r.authenticate(old).is_none());
    }

    #[test]
    fn malformed_site_fields_are_named() {
        let p = Path::new("readers");
        let h = "ab".repeat(32);
        let e = Readers::parse(p, &format!("a\t{h}\t1\tHC001 a/b\n")).unwrap_err();
        assert!(
            e.to_string().contains("line 1") && e.to_string().contains("site id"),
            "{e}"
        );
        let e = Readers::parse(p, &format!("a\t{h}\t1\t \tHC001\n")).unwrap_err();
        assert!(e.to_string().contains("3 or 4 tab-separated"), "{e}");
        let h2 = "cd".repeat(32);
        let ctl = "x\u{7f}";
        let e = Readers::parse(
            p,
            &format!("a\t{h}\t1\tHC001\n# c\nb\t{h2}\t1\tHC001 {ctl}\n"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        // Spaces between sites are separators; extra ones are ignored.
        let r = Readers::parse(p, &format!("a\t{h}\t1\tHC001  HC002\n")).unwrap();
        assert_eq!(r.list()[0].scope.describe(), "HC001 HC002");
    }
}
