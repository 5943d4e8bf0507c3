//! `[adms]`: configuration of the ZKTeco terminal ingest.
//!
//! ```toml
//! [adms]
//! enabled = true                 # serve /iclock/* (default true)
//! # listen = "0.0.0.0:8081"      # own listener; unset = served on http.listen
//! unknown_devices = "refuse"     # "refuse" (default) or "accept"
//! default_utc_offset = "+02:00"  # terminals' local time zone (default "+00:00")
//! other_tables = "ignore"        # OPERLOG, USER, photos…: "ignore" (default) or "log"
//! max_body_bytes = 1048576       # largest POST body (default 1 MiB); larger gets 413
//!
//! [adms.devices.CQUJ230160001]   # one section per allowed terminal, by serial number
//! name = "Main entrance"
//! utc_offset = "+02:00"          # default: adms.default_utc_offset
//! ```
//!
//! Serial numbers are matched without regard to case, because environment overrides
//! (`OUTPOST_ADMS__DEVICES__<SN>__UTC_OFFSET`) arrive lower-cased.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Deserialize;

/// Most bytes a serial number may have: `zk:` + serial must fit a 64-byte device id.
pub const MAX_SERIAL_LEN: usize = outpost_protocol::MAX_ID_LEN - 3;

/// Smallest accepted `adms.max_body_bytes`.
pub const MIN_BODY_BYTES: usize = 1024;
/// Largest accepted `adms.max_body_bytes` (64 MiB): more than any terminal sends at once.
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// What to do with a terminal whose serial number is not under `[adms.devices]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownDevices {
    /// Answer 403 and store nothing (default). Logged once per serial number.
    Refuse,
    /// Accept its punches with the site's default UTC offset. Logged once per serial.
    Accept,
}

/// What to do with tables other than `ATTLOG` (OPERLOG with OPLOG/USER/FP lines, photos).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtherTables {
    /// Answer `OK` and drop the body (default).
    Ignore,
    /// Answer `OK` and log the table, size and line kinds (never the content: USER lines
    /// carry passwords and card numbers).
    Log,
}

/// A fixed UTC offset in minutes, written `+02:00`, `-05:30`, `+0530`, `+02` or `Z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct UtcOffset(i16);

impl UtcOffset {
    /// UTC.
    pub const UTC: UtcOffset = UtcOffset(0);

    /// The offset for a number of minutes east of UTC; `None` beyond ±18:00.
    pub const fn from_minutes(min: i16) -> Option<Self> {
        if min.unsigned_abs() <= outpost_protocol::punch::MAX_UTC_OFFSET_MIN as u16 {
            Some(UtcOffset(min))
        } else {
            None
        }
    }

    /// Minutes east of UTC.
    pub const fn minutes(self) -> i16 {
        self.0
    }

    /// Parses `±HH:MM`, `±HHMM`, `±HH` or `Z`. The sign is required (except for `Z`), so
    /// a bare number is never mistaken for an offset.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if s == "Z" || s == "z" {
            return Some(UtcOffset::UTC);
        }
        let (sign, rest) = match s.as_bytes().first()? {
            b'+' => (1i16, &s[1..]),
            b'-' => (-1i16, &s[1..]),
            _ => return None,
        };
        let digits = |t: &str| -> Option<i16> {
            (t.len() == 2 && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse().ok())
                .flatten()
        };
        let (h, m) = match rest.len() {
            2 => (digits(rest)?, 0),
            4 => (digits(&rest[..2])?, digits(&rest[2..])?),
            5 if rest.as_bytes()[2] == b':' => (digits(&rest[..2])?, digits(&rest[3..])?),
            _ => return None,
        };
        if m >= 60 {
            return None;
        }
        UtcOffset::from_minutes(sign * (h * 60 + m))
    }
}

impl TryFrom<String> for UtcOffset {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        UtcOffset::parse(&s).ok_or_else(|| {
            format!(
                "`{s}` is not a UTC offset: write it like \"+02:00\" or \"-05:30\" (within ±18:00)"
            )
        })
    }
}

impl std::fmt::Display for UtcOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.0 < 0 { '-' } else { '+' };
        let a = self.0.unsigned_abs();
        write!(f, "{sign}{:02}:{:02}", a / 60, a % 60)
    }
}

/// `[adms.devices.<SN>]`: one allowed terminal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmsDevice {
    /// A label for status pages and logs (at most 64 bytes).
    pub name: Option<String>,
    /// The terminal's local UTC offset; default `adms.default_utc_offset`.
    pub utc_offset: Option<UtcOffset>,
}

/// `[adms]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmsConfig {
    /// Serve the `/iclock/*` endpoints (default true).
    pub enabled: bool,
    /// Own listener (many terminals can only reach port 80 or 8081); unset = served on
    /// `http.listen`.
    pub listen: Option<SocketAddr>,
    /// Terminals not under `[adms.devices]`: `refuse` (default) or `accept`.
    pub unknown_devices: UnknownDevices,
    /// The UTC offset of terminals without their own `utc_offset` (default `+00:00`).
    pub default_utc_offset: UtcOffset,
    /// The allowed terminals, by serial number.
    pub devices: BTreeMap<String, AdmsDevice>,
    /// Tables other than ATTLOG: `ignore` (default) or `log`.
    pub other_tables: OtherTables,
    /// Largest accepted POST body in bytes (default 1 MiB); larger gets 413.
    pub max_body_bytes: usize,
}

impl Default for AdmsConfig {
    fn default() -> Self {
        AdmsConfig {
            enabled: true,
            listen: None,
            unknown_devices: UnknownDevices::Refuse,
            default_utc_offset: UtcOffset::UTC,
            devices: BTreeMap::new(),
            other_tables: OtherTables::Ignore,
            max_body_bytes: 1 << 20,
        }
    }
}

/// `true` if `sn` can be a terminal serial number: 1 to 61 bytes of ASCII letters, digits,
/// `.`, `_` or `-` (real serials are letters and digits, e.g. `CQUJ230160001`).
pub fn valid_serial(sn: &str) -> bool {
    !sn.is_empty()
        && sn.len() <= MAX_SERIAL_LEN
        && sn
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl AdmsConfig {
    /// Checks what types alone cannot. On error returns the key below `adms.` and what to
    /// change, e.g. `("devices.AB/1", "…")`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(MIN_BODY_BYTES..=MAX_BODY_BYTES).contains(&self.max_body_bytes) {
            return Err((
                "max_body_bytes".into(),
                format!("must be between {MIN_BODY_BYTES} and {MAX_BODY_BYTES}"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (sn, dev) in &self.devices {
            if !valid_serial(sn) {
                return Err((
                    format!("devices.{sn}"),
                    format!(
                        "is not a terminal serial number: use 1 to {MAX_SERIAL_LEN} letters, digits, '.', '_' or '-' \
                         as shown in the terminal's System Info menu"
                    ),
                ));
            }
            if !seen.insert(sn.to_ascii_uppercase()) {
                return Err((
                    format!("devices.{sn}"),
                    "is listed twice (serial numbers are compared without regard to case)".into(),
                ));
            }
            if let Some(name) = &dev.name {
                if let Err(e) = outpost_protocol::Id::new(name) {
                    return Err((format!("devices.{sn}.name"), format!("{e}")));
                }
            }
        }
        Ok(())
    }

    /// The configuration of terminal `sn` (case-insensitive), if it is listed.
    pub fn device(&self, sn: &str) -> Option<&AdmsDevice> {
        self.devices
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(sn))
            .map(|(_, d)| d)
    }

    /// The UTC offset to read terminal `sn`'s local times with.
    pub fn offset_for(&self, sn: &str) -> UtcOffset {
        self.device(sn)
            .and_then(|d| d.utc_offset)
            .unwrap_or(self.default_utc_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse() {
        assert_eq!(
            UtcOffset::parse("+02:00").map(UtcOffset::minutes),
            Some(120)
        );
        assert_eq!(
            UtcOffset::parse("-05:30").map(UtcOffset::minutes),
            Some(-330)
        );
        assert_eq!(UtcOffset::parse("+0545").map(UtcOffset::minutes), Some(345));
        assert_eq!(UtcOffset::parse("+03").map(UtcOffset::minutes), Some(180));
        assert_eq!(UtcOffset::parse("Z").map(UtcOffset::minutes), Some(0));
        assert_eq!(
            UtcOffset::parse("+18:00").map(UtcOffset::minutes),
            Some(1080)
        );
        for bad in [
            "",
            "2",
            "0200",
            "+2:00",
            "+02:60",
            "+19:00",
            "+02:00:00",
            "UTC",
            "+ab:cd",
        ] {
            assert_eq!(UtcOffset::parse(bad), None, "{bad}");
        }
        assert_eq!(UtcOffset::parse("-05:30").unwrap().to_string(), "-05:30");
        assert_eq!(UtcOffset::UTC.to_string(), "+00:00");
    }

    #[test]
    fn defaults_and_toml() {
        let c: AdmsConfig = toml::from_str("").unwrap();
        assert_eq!(c, AdmsConfig::default());
        assert!(c.enabled);
        assert_eq!(c.max_body_bytes, 1 << 20);
        assert_eq!(c.unknown_devices, UnknownDevices::Refuse);
        let c: AdmsConfig = toml::from_str(
            r#"
            unknown_devices = "accept"
            default_utc_offset = "+02:00"
            other_tables = "log"
            listen = "127.0.0.1:8081"
            [devices.CQUJ230160001]
            name = "Main entrance"
            utc_offset = "+05:30"
            [devices.ABC]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.offset_for("cquj230160001").minutes(), 330);
        assert_eq!(c.offset_for("ABC").minutes(), 120);
        assert_eq!(c.offset_for("OTHER").minutes(), 120);
        assert_eq!(
            c.device("cquj230160001").unwrap().name.as_deref(),
            Some("Main entrance")
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = toml::from_str::<AdmsConfig>("default_utc_offset = \"2\"").unwrap_err();
        assert!(e.to_string().contains("+02:00"), "{e}");
        assert!(toml::from_str::<AdmsConfig>("bogus = 1").is_err());
        assert!(toml::from_str::<AdmsConfig>("unknown_devices = \"maybe\"").is_err());
        assert!(toml::from_str::<AdmsConfig>("[devices.A]\nzone = 1").is_err());

        let mut c = AdmsConfig::default();
        c.devices.insert("AB/1".into(), AdmsDevice::default());
        assert_eq!(c.validate().unwrap_err().0, "devices.AB/1");
        let mut c = AdmsConfig::default();
        c.devices.insert("abc".into(), AdmsDevice::default());
        c.devices.insert("ABC".into(), AdmsDevice::default());
        assert!(c.validate().unwrap_err().1.contains("twice"));
        let mut c = AdmsConfig::default();
        c.devices.insert(
            "A1".into(),
            AdmsDevice {
                name: Some("bad\nname".into()),
                utc_offset: None,
            },
        );
        assert_eq!(c.validate().unwrap_err().0, "devices.A1.name");
        let c = AdmsConfig {
            max_body_bytes: 10,
            ..AdmsConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "max_body_bytes");
    }

    #[test]
    fn serials() {
        assert!(valid_serial("CQUJ230160001"));
        assert!(valid_serial("A-1_b.2"));
        assert!(!valid_serial(""));
        assert!(!valid_serial("a/b"));
        assert!(!valid_serial("a b"));
        assert!(!valid_serial("é"));
        assert!(!valid_serial(&"x".repeat(62)));
        assert!(valid_serial(&"x".repeat(61)));
    }
}
