//! NATS subjects of a NATS output: the configured template, the subject of each punch, and
//! the stream's wildcard subject.
//!
//! A subject is a list of tokens separated by `.`. A token is never empty and never
//! contains whitespace or control characters; `*` (one token) and `>` (the rest) are
//! wildcards, so they may not appear in a published subject. The template
//! (`outpost.punch.{site}.{device}`) uses `{site}` and `{device}` as whole tokens only:
//! that way its wildcard form (`outpost.punch.*.*`), which the stream captures, matches
//! exactly the subjects it renders.
//!
//! Site and device ids may contain characters that are illegal in a token. Each of `.`,
//! `*`, `>`, whitespace and control characters becomes `_`, and an empty id becomes `_`,
//! so every punch has a valid subject. Two ids that differ only in those characters share a
//! subject; the message payload carries the real ones.

use std::borrow::Cow;

/// One token of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    Site,
    Device,
    Kind,
}

/// A parsed subject template, e.g. `outpost.punch.{site}.{device}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    tokens: Vec<Token>,
}

impl SubjectTemplate {
    /// Parses and checks `template`. The error says what is wrong, for a config message.
    pub fn parse(template: &str) -> Result<SubjectTemplate, String> {
        if template.is_empty() {
            return Err("is empty".into());
        }
        let mut tokens = Vec::new();
        for (i, tok) in template.split('.').enumerate() {
            let token = match tok {
                "{site}" => Token::Site,
                "{device}" => Token::Device,
                "{kind}" => Token::Kind,
                "" => {
                    return Err(format!(
                        "\"{template}\": token {} is empty (two dots in a row, or a dot at \
                         either end)",
                        i + 1
                    ))
                }
                lit => {
                    if lit.contains(['{', '}']) {
                        return Err(format!(
                            "\"{template}\": \"{lit}\" must be exactly {{site}}, {{device}} or {{kind}}; \
                             placeholders are whole tokens between dots"
                        ));
                    }
                    if lit.contains(['*', '>']) {
                        return Err(format!(
                            "\"{template}\": \"{lit}\" is a wildcard; a published subject has \
                             none"
                        ));
                    }
                    if lit.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err(format!(
                            "\"{template}\": \"{lit}\" contains whitespace or a control character"
                        ));
                    }
                    Token::Literal(lit.to_string())
                }
            };
            tokens.push(token);
        }
        Ok(SubjectTemplate { tokens })
    }

    /// The subject of a punch from `site` and `device`, with both made token-safe.
    pub fn render(&self, site: &str, device: &str) -> String {
        self.render_kind("punch", site, device)
    }

    /// The subject of an event of `kind` (an `events` name) from `site` and `device`.
    pub fn render_kind(&self, kind: &str, site: &str, device: &str) -> String {
        let mut out = String::with_capacity(64);
        for (i, t) in self.tokens.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            match t {
                Token::Literal(l) => out.push_str(l),
                Token::Site => out.push_str(&sanitize_token(site)),
                Token::Device => out.push_str(&sanitize_token(device)),
                Token::Kind => out.push_str(&sanitize_token(kind)),
            }
        }
        out
    }

    /// The template with each placeholder replaced by `*`: every subject [`Self::render`]
    /// gives matches it, and nothing else does.
    pub fn wildcard(&self) -> String {
        self.tokens
            .iter()
            .map(|t| match t {
                Token::Literal(l) => l.as_str(),
                Token::Site | Token::Device | Token::Kind => "*",
            })
            .collect::<Vec<_>>()
            .join(".")
    }
}

/// `value` as one subject token: `.`, `*`, `>`, whitespace and control characters become
/// `_`; an empty value becomes `_`.
pub fn sanitize_token(value: &str) -> Cow<'_, str> {
    let bad = |c: char| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control();
    if value.is_empty() {
        Cow::Borrowed("_")
    } else if value.contains(bad) {
        Cow::Owned(
            value
                .chars()
                .map(|c| if bad(c) { '_' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(value)
    }
}

/// Whether the stream subject `filter` captures every subject that `subject` (which may
/// itself contain wildcards) matches.
pub fn covers(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(st)) if st != ">" => {}
            (Some(ft), Some(st)) if ft == st && st != "*" && st != ">" => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_default_template() {
        let t = SubjectTemplate::parse("outpost.punch.{site}.{device}").unwrap();
        assert_eq!(t.render("HC001", "door-1"), "outpost.punch.HC001.door-1");
        assert_eq!(t.wildcard(), "outpost.punch.*.*");
        let t = SubjectTemplate::parse("p.{device}.x.{site}").unwrap();
        assert_eq!(t.render("s", "d"), "p.d.x.s");
        assert_eq!(t.wildcard(), "p.*.x.*");
        let t = SubjectTemplate::parse("all.punches").unwrap();
        assert_eq!(t.render("s", "d"), "all.punches");
    }

    #[test]
    fn sanitises_characters_illegal_in_a_token() {
        let t = SubjectTemplate::parse("o.{site}.{device}").unwrap();
        assert_eq!(t.render("a.b", "c d"), "o.a_b.c_d");
        assert_eq!(t.render("*", ">"), "o._._");
        assert_eq!(t.render("x\ty\u{7f}", "\u{1}\n"), "o.x_y_.__");
        assert_eq!(t.render("", "d"), "o._.d");
        assert_eq!(t.render("Zürich", "tür"), "o.Zürich.tür");
        assert_eq!(
            t.render("a\u{a0}b", "d"),
            "o.a_b.d",
            "non-ASCII whitespace too"
        );
        assert!(matches!(sanitize_token("clean"), Cow::Borrowed("clean")));
        for (site, device) in [("a.b", "c"), ("*", ">"), ("", " "), ("x\ry", "z")] {
            let s = t.render(site, device);
            assert!(covers(&t.wildcard(), &s), "{s}");
            assert_eq!(s.split('.').count(), 3, "{s}");
        }
    }

    #[test]
    fn refuses_bad_templates() {
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "a.*.{site}",
            "a.>",
            "a.x{site}",
            "a.{site}-{device}",
            "a.{host}",
            "a b.{site}",
        ] {
            assert!(SubjectTemplate::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn coverage_follows_nats_wildcards() {
        assert!(covers("outpost.punch.*.*", "outpost.punch.*.*"));
        assert!(covers("outpost.>", "outpost.punch.*.*"));
        assert!(covers(">", "a.b"));
        assert!(covers("a.*.c", "a.b.c"));
        assert!(!covers("outpost.punch.HC001.*", "outpost.punch.*.*"));
        assert!(!covers("outpost.punch.*", "outpost.punch.*.*"));
        assert!(!covers("outpost.punch.*.*.*", "outpost.punch.*.*"));
        assert!(!covers("a.*", "a.>"));
        assert!(!covers("other.>", "outpost.punch.*.*"));
    }
}
