//! Journal exports: NDJSON and CSV rows for records.
//!
//! Each row has the JSON punch fields of docs/design.md ("JSON form") (`device_id`, `seq`, `subject`, `kind`,
//! `verify`, `time`) plus `site`, `gateway_id`, `gateway_seq`, `received_at` (the gateway's
//! wall clock, RFC 3339 UTC), `clock_synced` and `source`. The same rows are produced by
//! `GET /v1/export` on a running gateway and by `outpost-gateway export` reading a stopped
//! gateway's journal directly.

use std::str::FromStr;

use outpost_protocol::json::{format_time, parse_time, punch_to_json};
use outpost_protocol::Record;
use serde_json::Value;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Ndjson,
    /// Comma-separated values with a header row.
    Csv,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ndjson" | "json" => Ok(Format::Ndjson),
            "csv" => Ok(Format::Csv),
            _ => Err(format!("unknown export format {s:?}: use ndjson or csv")),
        }
    }
}

/// Which records to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Since {
    /// Everything still in the journal.
    #[default]
    All,
    /// Records with `gateway_seq >= n`.
    Seq(u64),
    /// Records received (gateway wall clock) at or after this Unix ms.
    Time(i64),
}

impl FromStr for Since {
    type Err = String;
    /// A number is a gateway_seq; anything else must be RFC 3339.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(n) = s.parse::<u64>() {
            return Ok(Since::Seq(n));
        }
        parse_time(s)
            .map(|(ms, _)| Since::Time(ms))
            .map_err(|_| format!("--since {s:?}: give a gateway_seq number or an RFC 3339 time"))
    }
}

impl Since {
    /// The first sequence number worth reading.
    pub fn first_seq(self) -> u64 {
        match self {
            Since::Seq(n) => n,
            _ => 0,
        }
    }

    /// Whether a record passes the filter.
    pub fn admits(self, r: &Record) -> bool {
        match self {
            Since::All => true,
            Since::Seq(n) => r.gateway_seq >= n,
            Since::Time(ms) => r.received.wall_ms >= ms,
        }
    }
}

/// Column order for CSV (and key order for NDJSON).
pub const COLUMNS: [&str; 13] = [
    "site",
    "gateway_id",
    "gateway_seq",
    "device_id",
    "seq",
    "subject",
    "kind",
    "verify",
    "time",
    "received_at",
    "clock_synced",
    "source",
    "boot_id",
];

/// The JSON object for one record.
pub fn record_json(site: &str, gateway_id: &str, r: &Record) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("site".into(), site.into());
    m.insert("gateway_id".into(), gateway_id.into());
    m.insert("gateway_seq".into(), r.gateway_seq.into());
    m.extend(punch_to_json(&r.punch));
    m.insert(
        "received_at".into(),
        format_time(r.received.wall_ms, None).into(),
    );
    m.insert("clock_synced".into(), r.received.clock_synced.into());
    m.insert("source".into(), r.source.as_str().into());
    m.insert("boot_id".into(), hex::encode(r.received.boot_id.0).into());
    m
}

/// The header line for a format (empty for NDJSON).
pub fn header(format: Format) -> String {
    match format {
        Format::Ndjson => String::new(),
        Format::Csv => format!("{}\n", COLUMNS.join(",")),
    }
}

/// One output line, newline included.
pub fn line(format: Format, site: &str, gateway_id: &str, r: &Record) -> String {
    let m = record_json(site, gateway_id, r);
    match format {
        Format::Ndjson => format!("{}\n", Value::Object(m)),
        Format::Csv => {
            let cells: Vec<String> = COLUMNS
                .iter()
                .map(|c| match m.get(*c) {
                    Some(Value::String(s)) => csv_cell(s),
                    Some(v) => v.to_string(),
                    None => String::new(),
                })
                .collect();
            format!("{}\n", cells.join(","))
        }
    }
}

/// Quotes a CSV cell when needed (RFC 4180), and defuses spreadsheet formulas: a subject
/// typed on a keypad must not run as a formula when the payroll clerk opens the file.
fn csv_cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_parses() {
        assert_eq!("42".parse::<Since>().unwrap(), Since::Seq(42));
        assert!(matches!(
            "2026-11-22T00:00:00Z".parse::<Since>().unwrap(),
            Since::Time(_)
        ));
        assert!("yesterday".parse::<Since>().is_err());
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("=SUM(A1)"), "'=SUM(A1)");
    }
}
