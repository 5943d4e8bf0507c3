//! Environment overrides: any config key can be set by a variable named
//! `OUTPOST_<SECTION>__<KEY>` (upper case, two underscores between levels), e.g.
//! `OUTPOST_HTTP__LISTEN=127.0.0.1:9000` sets `http.listen`. Containers and systemd units
//! can then change one key without editing the file.
//!
//! The value is read as a TOML value when it parses as one (`true`, `42`, `["a"]`) and as a
//! string otherwise, so `OUTPOST_GATEWAY__SITE=HC001` needs no quotes. Variables with the
//! prefix but no `__` (`OUTPOST_CONFIG`, `OUTPOST_UPLINK_TOKEN`, `OUTPOST_TEST_*`) are not
//! config keys and are left alone.
//!
//! This module knows nothing of the config loader (which converts [`EnvError`] into its
//! own error), so the two do not import each other.

/// A variable that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct EnvError {
    /// The dotted key it would set, or the variable's name when that cannot be worked out.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl EnvError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        EnvError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Applies `OUTPOST_A__B__C=value` variables among `env` to `table` as `a.b.c = value`.
/// Later variables win over earlier ones and over the file.
pub fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), EnvError> {
    for (name, value) in env {
        let Some(path) = name.strip_prefix("OUTPOST_") else {
            continue;
        };
        if !path.contains("__") {
            // Not a config key (e.g. OUTPOST_CONFIG, OUTPOST_TEST_*).
            continue;
        }
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.iter().any(String::is_empty) {
            return Err(EnvError::new(
                name.clone(),
                "empty key segment in environment variable name",
            ));
        }
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(value));
        let mut cur = &mut *table;
        for k in &keys[..keys.len() - 1] {
            let entry = cur
                .entry(k.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cur = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(EnvError::new(
                        keys.join("."),
                        format!("{name} sets a key below `{k}`, which is not a section"),
                    ))
                }
            };
        }
        cur.insert(keys[keys.len() - 1].clone(), parsed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(text: &str, pairs: &[(&str, &str)]) -> Result<toml::Table, EnvError> {
        let mut t: toml::Table = text.parse().unwrap();
        apply_env_overrides(
            &mut t,
            pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())),
        )?;
        Ok(t)
    }

    #[test]
    fn values_are_typed_when_they_parse_as_toml() {
        let t = apply(
            "",
            &[
                ("OUTPOST_HTTP__LISTEN", "127.0.0.1:9000"),
                ("OUTPOST_AUTH__REQUIRED", "false"),
                ("OUTPOST_LIMITS__MAX", "42"),
                ("OUTPOST_UPLINK__RELAYS", "[\"wss://a\", \"wss://b\"]"),
                ("OUTPOST_JOURNAL__DEDUP_WINDOW__MAX_AGE", "3d"),
            ],
        )
        .unwrap();
        assert_eq!(t["http"]["listen"].as_str(), Some("127.0.0.1:9000"));
        assert_eq!(t["auth"]["required"].as_bool(), Some(false));
        assert_eq!(t["limits"]["max"].as_integer(), Some(42));
        assert_eq!(t["uplink"]["relays"].as_array().map(Vec::len), Some(2));
        assert_eq!(t["journal"]["dedup_window"]["max_age"].as_str(), Some("3d"));
    }

    #[test]
    fn overrides_win_over_the_file_and_keep_its_other_keys() {
        let t = apply(
            "[http]\nlisten = \"0.0.0.0:1\"\nmax = 5\n",
            &[("OUTPOST_HTTP__LISTEN", "1.2.3.4:5")],
        )
        .unwrap();
        assert_eq!(t["http"]["listen"].as_str(), Some("1.2.3.4:5"));
        assert_eq!(t["http"]["max"].as_integer(), Some(5));
    }

    #[test]
    fn other_variables_are_ignored() {
        let t = apply(
            "",
            &[
                ("OUTPOST_CONFIG", "/etc/outpost/x.toml"),
                ("OUTPOST_UPLINK_TOKEN", "opg_x"),
                ("HOME", "/root"),
            ],
        )
        .unwrap();
        assert!(t.is_empty(), "{t:?}");
    }

    #[test]
    fn bad_names_are_errors_naming_the_variable() {
        let e = apply("", &[("OUTPOST_HTTP____LISTEN", "1")]).unwrap_err();
        assert!(e.to_string().contains("OUTPOST_HTTP____LISTEN"), "{e}");
        let e = apply("http = 1\n", &[("OUTPOST_HTTP__LISTEN", "1")]).unwrap_err();
        assert!(e.to_string().contains("http.listen"), "{e}");
        assert!(e.to_string().contains("not a section"), "{e}");
    }
}
