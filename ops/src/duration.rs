//! Durations in config files: an integer number of seconds, or a string with a unit:
//! `"250ms"`, `"45s"`, `"30m"`, `"12h"`, `"7d"`. Use it on a field with
//! `#[serde(deserialize_with = "outpost_ops::duration::deserialize_duration")]`.
//!
//! Whether zero or a very short value makes sense is the field's business: each config
//! section checks its own minimums when it validates.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};

/// Parses `"250ms"`, `"45s"`, `"30m"`, `"12h"`, `"7d"` or a bare number of seconds
/// (surrounding spaces allowed). `None` for anything else, or a value too large.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.trim().parse().ok().map(Duration::from_millis);
    }
    let (num, mult) = match s.char_indices().last()? {
        (i, 'd') => (&s[..i], 86_400),
        (i, 'h') => (&s[..i], 3_600),
        (i, 'm') => (&s[..i], 60),
        (i, 's') => (&s[..i], 1),
        _ => (s, 1),
    };
    let n: u64 = num.trim().parse().ok()?;
    Some(Duration::from_secs(n.checked_mul(mult)?))
}

/// Deserialises a duration from an integer (seconds) or a string ([`parse_duration`]).
/// A negative integer or an unknown unit is an error that says what is expected.
pub fn deserialize_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(
                "seconds as an integer, or a string like \"250ms\", \"45s\", \"30m\", \"12h\", \"7d\"",
            )
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom("a duration cannot be negative"))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
        }
    }
    d.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("500 ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("45s"), Some(Duration::from_secs(45)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("12h"), Some(Duration::from_secs(12 * 3600)));
        assert_eq!(
            parse_duration(" 7d "),
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("0ms"), Some(Duration::ZERO));
        for bad in [
            "x",
            "",
            "ms",
            "s",
            "7w",
            "-1s",
            "1.5s",
            "1 h 2",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        assert_eq!(parse_duration(&format!("{}d", u64::MAX / 86_400 + 1)), None);
    }

    #[derive(Debug, serde::Deserialize)]
    struct T {
        #[serde(deserialize_with = "deserialize_duration")]
        d: Duration,
    }

    #[test]
    fn deserialises_integers_and_strings() {
        let t: T = toml::from_str("d = 60").unwrap();
        assert_eq!(t.d, Duration::from_secs(60));
        let t: T = toml::from_str("d = \"500ms\"").unwrap();
        assert_eq!(t.d, Duration::from_millis(500));
        let e = toml::from_str::<T>("d = -1").unwrap_err().to_string();
        assert!(e.contains("cannot be negative"), "{e}");
        let e = toml::from_str::<T>("d = \"7w\"").unwrap_err().to_string();
        assert!(e.contains("\"250ms\"") && e.contains("\"7d\""), "{e}");
    }
}
