//! What a caller of the read API may see: every site, or a fixed set of sites (a read
//! token issued with `outpost-relay reader add NAME --site HC001 --site HC002`).
//!
//! ## Rules
//!
//! - A row belongs to the site it was stored under (`site_id` of the batch that delivered
//!   it: punches, conflicts, rejected records; a gateway's site for `/v1/gateways`). A
//!   caller sees a row only if [`Scope::allows`] its site.
//! - The filter is pushed into the store query ([`Scope::site_filter`] →
//!   `PunchQuery::sites`, `HeldQuery::sites`), never applied to a page afterwards: a page
//!   filtered after the fact could come back short or empty while more rows follow, and a
//!   client would stop paging.
//! - Naming a site outside the scope (`?site=HC009`) is refused (403), not answered with an
//!   empty page, so that a misconfigured consumer is told why it sees nothing.
//! - Something that spans sites (an output with `sites = []`, which delivers every site) is
//!   shown to a scoped caller only if [`Scope::covers`] all of it: its lag, errors and
//!   cursor describe the other sites' punches too.

use std::collections::BTreeSet;

/// The sites a caller may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every site (the admin token, and read tokens issued without `--site`).
    All,
    /// Only these sites (never empty for a token the CLI issued).
    Sites(BTreeSet<String>),
}

impl Scope {
    /// Whether rows of `site` are visible.
    pub fn allows(&self, site: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Sites(s) => s.contains(site),
        }
    }

    /// Whether something that carries the rows of `sites` is entirely visible; an empty
    /// `sites` means every site (the outputs' convention), which only [`Scope::All`]
    /// covers.
    pub fn covers(&self, sites: &[String]) -> bool {
        match self {
            Scope::All => true,
            Scope::Sites(_) => !sites.is_empty() && sites.iter().all(|s| self.allows(s)),
        }
    }

    /// The filter for a store query: `None` for every site, else the allowed sites (in
    /// order).
    pub fn site_filter(&self) -> Option<Vec<String>> {
        match self {
            Scope::All => None,
            Scope::Sites(s) => Some(s.iter().cloned().collect()),
        }
    }

    /// Checks a site the caller named explicitly (`?site=`); `Err` carries the sites it
    /// may read, for the refusal's message.
    pub fn check_site(&self, site: Option<&str>) -> Result<(), String> {
        match (self, site) {
            (Scope::Sites(s), Some(site)) if !s.contains(site) => {
                Err(s.iter().cloned().collect::<Vec<_>>().join(", "))
            }
            _ => Ok(()),
        }
    }

    /// How `reader list` and logs show it: `*` for every site, else the sites separated
    /// by spaces.
    pub fn describe(&self) -> String {
        match self {
            Scope::All => "*".to_string(),
            Scope::Sites(s) => s.iter().cloned().collect::<Vec<_>>().join(" "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sites(s: &[&str]) -> Scope {
        Scope::Sites(s.iter().map(|x| x.to_string()).collect())
    }

    #[test]
    fn all_sees_everything() {
        let a = Scope::All;
        assert!(a.allows("HC001") && a.allows("anything"));
        assert!(a.covers(&[]) && a.covers(&["HC001".into()]));
        assert_eq!(a.site_filter(), None);
        assert_eq!(a.check_site(Some("HC009")), Ok(()));
        assert_eq!(a.check_site(None), Ok(()));
        assert_eq!(a.describe(), "*");
    }

    #[test]
    fn sites_see_only_their_sites() {
        let s = sites(&["HC002", "HC001"]);
        assert!(s.allows("HC001") && s.allows("HC002"));
        assert!(!s.allows("HC003") && !s.allows("hc001") && !s.allows(""));
        assert_eq!(
            s.site_filter(),
            Some(vec!["HC001".to_string(), "HC002".to_string()])
        );
        assert_eq!(s.check_site(None), Ok(()));
        assert_eq!(s.check_site(Some("HC002")), Ok(()));
        assert_eq!(s.check_site(Some("HC003")), Err("HC001, HC002".to_string()));
        assert_eq!(s.describe(), "HC001 HC002");
    }

    #[test]
    fn covers_needs_every_site_and_never_all() {
        let s = sites(&["HC001", "HC002"]);
        assert!(s.covers(&["HC001".into()]));
        assert!(s.covers(&["HC002".into(), "HC001".into()]));
        assert!(!s.covers(&["HC001".into(), "HC003".into()]));
        assert!(!s.covers(&[]), "an output of every site spans other sites");
        let none = Scope::Sites(BTreeSet::new());
        assert!(!none.allows("HC001"));
        assert_eq!(none.site_filter(), Some(vec![]));
    }
}
