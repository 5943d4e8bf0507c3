//! Logging for both daemons: `tracing` to stderr, human-readable or JSON (`log.format`),
//! filtered by `RUST_LOG` or `log.level`.
//!
//! Where the lines go decides how they look ([`Style::decide`]):
//!
//! - Colour (ANSI escapes) only when stderr is a terminal. A pipe, a file or journald gets
//!   plain text, so `journalctl -u outpost-gateway` shows no `[2m…[0m`.
//! - Under systemd (`JOURNAL_STREAM` set, which systemd does when stderr is connected to
//!   the journal) the human-readable format leaves out the timestamp: journald stamps every
//!   line itself, and two timestamps per line only waste width. JSON lines keep theirs: a
//!   JSON record is shipped on as a whole, and its consumers expect the field.
//!
//! The filter is `RUST_LOG` when it is set and valid, else the configured `log.level`.
//! Both daemons refuse a `log.level` that does not parse when they validate their config
//! ([`check_filter`]), so the last resort, the binary's own default filter with a warning,
//! only guards a caller that skipped validation. The daemons' earlier copies differed on
//! that last resort (the gateway dropped the invalid directives silently, the relay fell
//! back to `info`); the binary's default keeps its noise settings (the gateway silences
//! its embedded MQTT broker).

use std::io::IsTerminal;

use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// Log output format (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// How log lines are decorated, decided from where they go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// Colour escapes in the output.
    pub ansi: bool,
    /// A timestamp at the start of each line.
    pub timestamp: bool,
}

impl Style {
    /// The style for `format` when stderr is a terminal (`stderr_is_tty`) or not, and with
    /// `JOURNAL_STREAM` set (`under_journald`) or not. A pure function, so it is tested
    /// without a terminal or systemd.
    pub fn decide(format: LogFormat, stderr_is_tty: bool, under_journald: bool) -> Style {
        match format {
            LogFormat::Pretty => Style {
                ansi: stderr_is_tty,
                timestamp: !under_journald,
            },
            // JSON never carries escapes, and its records stay complete.
            LogFormat::Json => Style {
                ansi: false,
                timestamp: true,
            },
        }
    }

    /// The style for this process: its stderr and its `JOURNAL_STREAM` variable.
    pub fn detect(format: LogFormat) -> Style {
        Style::decide(
            format,
            std::io::stderr().is_terminal(),
            std::env::var_os("JOURNAL_STREAM").is_some_and(|v| !v.is_empty()),
        )
    }
}

/// Checks that `level` is a valid tracing filter (for config validation of `log.level`).
pub fn check_filter(level: &str) -> Result<(), tracing_subscriber::filter::ParseError> {
    EnvFilter::try_new(level).map(|_| ())
}

/// Which filter applies: `RUST_LOG` (`rust_log`, when set and valid), else `level`, else
/// `default`. Returns the filter and, when `level` was not valid, the parse error to warn
/// about once logging is up.
pub fn choose_filter(
    rust_log: Option<&str>,
    level: &str,
    default: &str,
) -> (EnvFilter, Option<String>) {
    if let Some(f) = rust_log.and_then(|v| EnvFilter::try_new(v).ok()) {
        return (f, None);
    }
    match EnvFilter::try_new(level) {
        Ok(f) => (f, None),
        Err(e) => (
            EnvFilter::new(default),
            Some(format!(
                "log.level {level:?} is not a valid filter ({e}); using {default:?}"
            )),
        ),
    }
}

/// Installs the global subscriber: `format`, filter from `RUST_LOG`, `level` or `default`
/// ([`choose_filter`]), styled for where stderr goes ([`Style::detect`]). Call once, at the
/// start of the daemon (a second call panics in `tracing_subscriber`).
pub fn init(format: LogFormat, level: &str, default: &str) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, warning) = choose_filter(rust_log.as_deref(), level, default);
    let style = Style::detect(format);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(style.ansi);
    // Each branch has its own builder type, hence the repetition.
    match (format, style.timestamp) {
        (LogFormat::Json, true) => builder.json().init(),
        (LogFormat::Json, false) => builder.json().without_time().init(),
        (LogFormat::Pretty, true) => builder.init(),
        (LogFormat::Pretty, false) => builder.without_time().init(),
    }
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_and_no_timestamp_under_journald() {
        let d = |tty, journald| Style::decide(LogFormat::Pretty, tty, journald);
        assert_eq!(
            d(true, false),
            Style {
                ansi: true,
                timestamp: true
            }
        );
        assert_eq!(
            d(false, false),
            Style {
                ansi: false,
                timestamp: true
            }
        );
        assert_eq!(
            d(false, true),
            Style {
                ansi: false,
                timestamp: false
            }
        );
        assert_eq!(
            d(true, true),
            Style {
                ansi: true,
                timestamp: false
            }
        );
    }

    #[test]
    fn json_is_plain_and_keeps_its_timestamp() {
        for tty in [false, true] {
            for journald in [false, true] {
                assert_eq!(
                    Style::decide(LogFormat::Json, tty, journald),
                    Style {
                        ansi: false,
                        timestamp: true
                    }
                );
            }
        }
    }

    #[test]
    fn filter_prefers_rust_log_then_level_then_default() {
        let (f, w) = choose_filter(Some("debug"), "info", "warn");
        assert_eq!((f.to_string(), w), ("debug".to_string(), None));
        // An invalid RUST_LOG is ignored, like an unset one.
        let (f, w) = choose_filter(Some("=[bad"), "info", "warn");
        assert_eq!((f.to_string(), w), ("info".to_string(), None));
        let (f, w) = choose_filter(None, "info,rumqttd=off", "warn");
        assert_eq!(f.to_string(), "rumqttd=off,info");
        assert!(w.is_none());
        let (f, w) = choose_filter(None, "=[bad", "info,rumqttd=off");
        assert_eq!(f.to_string(), "rumqttd=off,info");
        let w = w.expect("a warning for the bad level");
        assert!(w.contains("log.level") && w.contains("=[bad"), "{w}");
        assert!(check_filter("info,rumqttd=off").is_ok());
        assert!(check_filter("=[bad").is_err());
    }

    #[test]
    fn format_parses_from_config() {
        #[derive(Deserialize)]
        struct L {
            format: LogFormat,
        }
        let l: L = toml::from_str("format = \"json\"").unwrap();
        assert_eq!(l.format, LogFormat::Json);
        let l: L = toml::from_str("format = \"pretty\"").unwrap();
        assert_eq!(l.format, LogFormat::Pretty);
        assert!(toml::from_str::<L>("format = \"xml\"").is_err());
        assert_eq!(LogFormat::default(), LogFormat::Pretty);
    }
}
