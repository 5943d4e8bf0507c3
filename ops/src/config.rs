//! Loading a daemon's configuration: the TOML file, then the `OUTPOST_*` environment
//! overrides ([`crate::env`]), then deserialisation into the daemon's typed config.
//!
//! Every error names the dotted key (`http.listen`, `limits.max_raw_bytes`) and the reason,
//! so an operator knows which line or variable to fix. Checks that types alone cannot
//! express (ranges, keys that need each other) are the daemon's: its config type implements
//! [`Validate`], reporting with [`ConfigError::key`], and [`load_validated`] (or
//! [`load_from_env`], for the process environment) runs both steps. Both daemons load
//! their config this one way.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A key has a wrong type or value, or is unknown.
    #[error("config key `{key}`: {message}")]
    Key {
        /// The dotted key (`http.listen`).
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

impl ConfigError {
    /// A key error.
    pub fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Key {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A daemon's config type: the checks that types alone cannot express.
pub trait Validate {
    /// Checks the values; the error names the key to change.
    fn validate(&self) -> Result<(), ConfigError>;
}

impl From<crate::env::EnvError> for ConfigError {
    fn from(e: crate::env::EnvError) -> Self {
        ConfigError::Key {
            key: e.key,
            message: e.message,
        }
    }
}

/// [`load`], then [`Validate::validate`]: the daemon's config, ready to use.
pub fn load_validated<T: DeserializeOwned + Validate>(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let cfg: T = load(path, env)?;
    cfg.validate()?;
    Ok(cfg)
}

/// [`load_validated`] with the process environment.
pub fn load_from_env<T: DeserializeOwned + Validate>(
    path: Option<&Path>,
) -> Result<T, ConfigError> {
    load_validated(path, std::env::vars())
}

/// Reads `path` (nothing when `None`, so only the config type's defaults apply), applies the
/// `OUTPOST_<SECTION>__<KEY>` variables among `env`, and deserialises the result into `T`.
/// A wrong type or an unknown key is reported with its full dotted path. `T` is not
/// validated beyond its type: that is the caller's next step.
pub fn load<T: DeserializeOwned>(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let (origin, text) = match path {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
        ),
        None => ("(embedded defaults)".to_string(), String::new()),
    };
    let mut table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: origin,
                message: e.to_string(),
            })?;
    crate::env::apply_env_overrides(&mut table, env)?;
    serde_path_to_error::deserialize(toml::Value::Table(table))
        .map_err(|e| ConfigError::key(e.path().to_string(), e.inner().message().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Cfg {
        http: Http,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Http {
        port: u16,
        open: bool,
    }

    impl Default for Http {
        fn default() -> Self {
            Http {
                port: 8080,
                open: true,
            }
        }
    }

    /// One `OUTPOST_*` variable, as `load` takes it.
    fn var(name: &str, value: &str) -> [(String, String); 1] {
        [(name.to_string(), value.to_string())]
    }

    #[test]
    fn no_file_is_the_defaults_and_env_wins_over_the_file() {
        let c: Cfg = load(None, []).unwrap();
        assert_eq!((c.http.port, c.http.open), (8080, true));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[http]\nport = 9000\nopen = true\n").unwrap();
        let c: Cfg = load(Some(&p), var("OUTPOST_HTTP__OPEN", "false")).unwrap();
        assert_eq!((c.http.port, c.http.open), (9000, false));
    }

    impl Validate for Cfg {
        fn validate(&self) -> Result<(), ConfigError> {
            if self.http.port == 0 {
                return Err(ConfigError::key("http.port", "must not be 0"));
            }
            Ok(())
        }
    }

    #[test]
    fn load_validated_checks_after_the_overrides() {
        let c: Cfg = load_validated(None, var("OUTPOST_HTTP__PORT", "81")).unwrap();
        assert_eq!(c.http.port, 81);
        let e = load_validated::<Cfg>(None, var("OUTPOST_HTTP__PORT", "0")).unwrap_err();
        assert!(e.to_string().contains("`http.port`: must not be 0"), "{e}");
        // An override error comes out as a key error too.
        let e = load_validated::<Cfg>(None, var("OUTPOST_HTTP____PORT", "1")).unwrap_err();
        assert!(matches!(e, ConfigError::Key { .. }), "{e}");
    }

    #[test]
    fn errors_name_the_file_or_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let e = load::<Cfg>(Some(&p), []).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        std::fs::write(&p, "[http\n").unwrap();
        let e = load::<Cfg>(Some(&p), []).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
        assert!(e.to_string().contains("c.toml"), "{e}");
        let e = load::<Cfg>(None, var("OUTPOST_HTTP__PORT", "high")).unwrap_err();
        assert!(e.to_string().contains("`http.port`"), "{e}");
        let e = load::<Cfg>(None, var("OUTPOST_HTTP__PORTT", "1")).unwrap_err();
        assert!(e.to_string().contains("portt"), "{e}");
    }
}
