//! ATTLOG bodies → punches: tolerant of what real terminals send, strict about garbage.
//!
//! A `POST /iclock/cdata?table=ATTLOG` body holds one punch per line:
//!
//! ```text
//! PIN \t YYYY-MM-DD HH:MM:SS \t status \t verify \t workcode \t reserved … \r?\n
//! ```
//!
//! Quirks seen in the field, all accepted:
//! - 5 to 11+ fields (PUSH 2.x adds reserved fields, newer firmware a mask flag,
//!   temperature, …); only the first four carry meaning for us, the rest are ignored;
//! - trailing tabs, CRLF or LF line endings, a UTF-8 byte order mark, blank lines;
//! - fields separated by runs of spaces instead of tabs on some rebadged firmware;
//! - a leading `ATTLOG` tag on some firmware's lines;
//! - `T` instead of a space between date and time;
//! - status and verify codes outside the documented tables (255 is common): they map to
//!   `unspecified` / `unknown` and the punch is kept;
//! - non-ASCII PINs (UTF-8);
//! - an explicit UTC offset (`+02:00`, `-0530`) in a field after the fifth: it wins over
//!   the configured offset, because it describes the very time on the line.
//!
//! A line that cannot be a punch (not UTF-8, no PIN, no valid time, a status or verify
//! that is not a number, a time outside 2000–2100) is skipped with a [`SkipReason`]. It
//! never fails the rest of the body.
//!
//! ## Mapping
//!
//! Status → [`PunchKind`]: 0 in, 1 out, 2 break-out, 3 break-in, 4 overtime-in,
//! 5 overtime-out; anything else (255, 8, …) or absent → unspecified.
//!
//! Verify → [`VerifyMethod`] (ZKTeco's verify-mode table; legacy black-and-white firmware
//! writes 0 = password and 2 = card):
//!
//! | code | terminal's meaning | verify |
//! |---|---|---|
//! | 0 | password (legacy) | `pin` |
//! | 1 | fingerprint | `fingerprint` |
//! | 2 | card (legacy) | `card` |
//! | 3 | password | `pin` |
//! | 4 | card | `card` |
//! | 5, 6, 8, 9, 10, 12, 13, 14 | combinations with fingerprint | `fingerprint` |
//! | 7, 11 | password + card | `card` |
//! | 15–20 | face, alone or combined | `face` |
//! | 21–24 | finger vein | `unknown` (no such method in the protocol) |
//! | 25–29 | palm, alone or combined | `palm` |
//! | anything else (200 "other", 255, absent) | | `unknown` |
//!
//! ## Derived sequence number
//!
//! `device_seq = outpost_protocol::seq::derive_seq([device_id, PIN, time, status])` where
//! `device_id` is `zk:<SN>`, `time` is the line's local time normalised to
//! `YYYY-MM-DD HH:MM:SS` and `status` is the status code in decimal (empty when absent).
//! The UTC offset is not hashed, so changing a terminal's configured offset later does not
//! turn resends into new punches.

use outpost_protocol::seq::derive_seq;
use outpost_protocol::{Id, Punch, PunchError, PunchKind, VerifyMethod};

use super::config::UtcOffset;

/// Why a line was skipped. The names are metric labels and log fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The line is not valid UTF-8.
    NotUtf8,
    /// Fewer than two fields (PIN and time).
    TooFewFields,
    /// The PIN is empty, longer than 64 bytes or has control characters.
    BadPin,
    /// The time is not a valid `YYYY-MM-DD HH:MM:SS`.
    BadTime,
    /// The time is before 2000 or after 2100 (a terminal with a flat clock battery).
    TimeOutOfRange,
    /// The status field is not an integer.
    BadStatus,
    /// The verify field is not an integer.
    BadVerify,
    /// The journal refused the punch permanently (the committer's code is logged).
    Rejected,
}

impl SkipReason {
    /// The metric label / log name.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotUtf8 => "not_utf8",
            SkipReason::TooFewFields => "too_few_fields",
            SkipReason::BadPin => "bad_pin",
            SkipReason::BadTime => "bad_time",
            SkipReason::TimeOutOfRange => "time_out_of_range",
            SkipReason::BadStatus => "bad_status",
            SkipReason::BadVerify => "bad_verify",
            SkipReason::Rejected => "rejected",
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One skipped line, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// 1-based line number in the body.
    pub line: usize,
    /// Why.
    pub reason: SkipReason,
    /// The line, escaped and cut to [`EXCERPT_LEN`] characters, safe to log.
    pub excerpt: String,
}

/// Longest excerpt of a skipped line kept for the log.
pub const EXCERPT_LEN: usize = 120;

/// The result of parsing one ATTLOG body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attlog {
    /// Non-blank lines seen.
    pub lines: usize,
    /// The punches, in body order.
    pub punches: Vec<Punch>,
    /// The lines that could not be punches.
    pub skipped: Vec<Skipped>,
}

/// Status code → kind (see the module docs).
pub fn map_status(code: i64) -> PunchKind {
    match code {
        0 => PunchKind::In,
        1 => PunchKind::Out,
        2 => PunchKind::BreakOut,
        3 => PunchKind::BreakIn,
        4 => PunchKind::OvertimeIn,
        5 => PunchKind::OvertimeOut,
        _ => PunchKind::Unspecified,
    }
}

/// Verify code → method (see the module docs).
pub fn map_verify(code: i64) -> VerifyMethod {
    match code {
        0 | 3 => VerifyMethod::Pin,
        1 | 5 | 6 | 8 | 9 | 10 | 12 | 13 | 14 => VerifyMethod::Fingerprint,
        2 | 4 | 7 | 11 => VerifyMethod::Card,
        15..=20 => VerifyMethod::Face,
        25..=29 => VerifyMethod::Palm,
        _ => VerifyMethod::Unknown,
    }
}

/// Parses a whole ATTLOG body for the terminal whose device id is `device_id`
/// (`zk:<SN>`), reading local times with `offset` unless a line carries its own.
pub fn parse_attlog(body: &[u8], device_id: &Id, offset: UtcOffset) -> Attlog {
    let body = body.strip_prefix("\u{feff}".as_bytes()).unwrap_or(body);
    let mut out = Attlog::default();
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        out.lines += 1;
        let result = match std::str::from_utf8(raw) {
            Ok(line) => parse_line(line, device_id, offset),
            Err(_) => Err(SkipReason::NotUtf8),
        };
        match result {
            Ok(p) => out.punches.push(p),
            Err(reason) => out.skipped.push(Skipped {
                line: i + 1,
                reason,
                excerpt: excerpt(raw),
            }),
        }
    }
    out
}

/// An escaped, shortened copy of a raw line for logs.
pub fn excerpt(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    let mut out: String = s
        .chars()
        .take(EXCERPT_LEN)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().nth(EXCERPT_LEN).is_some() {
        out.push('…');
    }
    out
}

/// Parses one line (without its line ending).
pub fn parse_line(line: &str, device_id: &Id, offset: UtcOffset) -> Result<Punch, SkipReason> {
    let fields = split_fields(line);
    if fields.len() < 2 {
        return Err(SkipReason::TooFewFields);
    }
    let pin = fields[0];
    let subject_id = Id::new(pin).map_err(|_| SkipReason::BadPin)?;
    let (local, time_norm) = parse_local_time(fields[1]).ok_or(SkipReason::BadTime)?;
    let status = code_field(fields.get(2)).map_err(|()| SkipReason::BadStatus)?;
    let verify = code_field(fields.get(3)).map_err(|()| SkipReason::BadVerify)?;
    // An explicit offset on the line (newer firmware) describes this very time.
    let offset = fields
        .iter()
        .skip(5)
        .filter(|f| f.starts_with(['+', '-']))
        .find_map(|f| UtcOffset::parse(f))
        .unwrap_or(offset);
    let zoned = time::UtcOffset::from_whole_seconds(i32::from(offset.minutes()) * 60)
        .map_err(|_| SkipReason::TimeOutOfRange)?;
    let device_time_ms = local.assume_offset(zoned).unix_timestamp() * 1000;
    let status_text = status.map(|s| s.to_string()).unwrap_or_default();
    let device_seq = derive_seq(&[
        device_id.as_str().as_bytes(),
        pin.as_bytes(),
        time_norm.as_bytes(),
        status_text.as_bytes(),
    ]);
    let punch = Punch {
        device_id: *device_id,
        device_seq,
        subject_id,
        kind: status.map_or(PunchKind::Unspecified, map_status),
        verify: verify.map_or(VerifyMethod::Unknown, map_verify),
        device_time_ms,
        utc_offset_min: Some(offset.minutes()),
    };
    punch.validate().map_err(|e| match e {
        PunchError::TimeOutOfRange | PunchError::UtcOffsetOutOfRange => SkipReason::TimeOutOfRange,
        // The device id was checked before parsing; a subject error cannot come from
        // validate, but stay total.
        PunchError::DeviceId(_) | PunchError::SubjectId(_) => SkipReason::BadPin,
    })?;
    Ok(punch)
}

/// Splits a line into trimmed fields: by tabs, or by runs of spaces when the line has no
/// tab (then the date and time tokens are joined back). A leading `ATTLOG` tag is dropped.
fn split_fields(line: &str) -> Vec<&str> {
    let mut fields: Vec<&str> = if line.contains('\t') {
        line.split('\t').map(str::trim).collect()
    } else {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        join_date_time(line, tokens)
    };
    if fields.len() > 2 && fields[0] == "ATTLOG" {
        fields.remove(0);
    }
    while fields.last().is_some_and(|f| f.is_empty()) {
        fields.pop();
    }
    fields
}

/// For space-separated lines: turns `[pin, date, time, …]` into `[pin, "date time", …]`,
/// borrowing the joined slice from `line` itself.
fn join_date_time<'a>(line: &'a str, mut tokens: Vec<&'a str>) -> Vec<&'a str> {
    let mut start = 1;
    if tokens.first() == Some(&"ATTLOG") {
        start = 2;
    }
    if tokens.len() > start + 1 && tokens[start].len() == 10 && tokens[start + 1].contains(':') {
        let from = tokens[start].as_ptr() as usize - line.as_ptr() as usize;
        let t = tokens[start + 1];
        let to = t.as_ptr() as usize - line.as_ptr() as usize + t.len();
        tokens.splice(start..start + 2, [&line[from..to]]);
    }
    tokens
}

/// Parses `YYYY-MM-DD HH:MM:SS` (or with `T`, or with any run of spaces) strictly: real
/// calendar dates only. Returns the time and its normalised text.
fn parse_local_time(s: &str) -> Option<(time::PrimitiveDateTime, String)> {
    let s = s.trim();
    let (date, clock) = s
        .split_once('T')
        .or_else(|| s.split_once(' '))
        .map(|(d, c)| (d, c.trim_start()))?;
    let num = |t: &str, len: usize| -> Option<u32> {
        (t.len() == len && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    let mut d = date.split('-');
    let (y, mo, da) = (num(d.next()?, 4)?, num(d.next()?, 2)?, num(d.next()?, 2)?);
    let mut c = clock.split(':');
    let (h, mi, se) = (num(c.next()?, 2)?, num(c.next()?, 2)?, num(c.next()?, 2)?);
    if d.next().is_some() || c.next().is_some() {
        return None;
    }
    let month = time::Month::try_from(u8::try_from(mo).ok()?).ok()?;
    let date =
        time::Date::from_calendar_date(i32::try_from(y).ok()?, month, u8::try_from(da).ok()?)
            .ok()?;
    let clock = time::Time::from_hms(
        u8::try_from(h).ok()?,
        u8::try_from(mi).ok()?,
        u8::try_from(se).ok()?,
    )
    .ok()?;
    let norm = format!("{y:04}-{mo:02}-{da:02} {h:02}:{mi:02}:{se:02}");
    Some((time::PrimitiveDateTime::new(date, clock), norm))
}

/// A status or verify field: absent or empty → `None`; an integer → `Some`; else `Err`.
fn code_field(f: Option<&&str>) -> Result<Option<i64>, ()> {
    match f {
        None => Ok(None),
        Some(&"") => Ok(None),
        Some(s) => s.parse::<i64>().map(Some).map_err(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> Id {
        Id::new("zk:CQUJ230160001").unwrap()
    }
    const PLUS2: UtcOffset = match UtcOffset::from_minutes(120) {
        Some(o) => o,
        None => UtcOffset::UTC,
    };
    // 2024-03-01 08:00:00 at +02:00 = 06:00:00Z
    const T0: i64 = 1_709_272_800_000;

    fn one(line: &str) -> Result<Punch, SkipReason> {
        parse_line(line, &dev(), PLUS2)
    }

    #[test]
    fn field_counts_5_to_11() {
        let base = ["1001", "2024-03-01 08:00:00", "1", "15", "0"];
        for n in 5..=12 {
            let mut f: Vec<&str> = base.to_vec();
            while f.len() < n {
                f.push("0");
            }
            let p = one(&f.join("\t")).unwrap_or_else(|e| panic!("{n} fields: {e}"));
            assert_eq!(p.subject_id.as_str(), "1001");
            assert_eq!(p.kind, PunchKind::Out);
            assert_eq!(p.verify, VerifyMethod::Face);
            assert_eq!(p.device_time_ms, T0);
            assert_eq!(p.utc_offset_min, Some(120));
            assert_eq!(p.device_id, dev());
        }
    }

    #[test]
    fn fewer_fields_still_punch() {
        let p = one("1001\t2024-03-01 08:00:00").unwrap();
        assert_eq!(p.kind, PunchKind::Unspecified);
        assert_eq!(p.verify, VerifyMethod::Unknown);
        let p = one("1001\t2024-03-01 08:00:00\t0").unwrap();
        assert_eq!(p.kind, PunchKind::In);
        assert_eq!(one("1001"), Err(SkipReason::TooFewFields));
    }

    #[test]
    fn trailing_tabs_and_spaces() {
        let a = one("1001\t2024-03-01 08:00:00\t0\t1\t0\t\t\t").unwrap();
        let b = one("1001\t2024-03-01 08:00:00\t0\t1\t0").unwrap();
        assert_eq!(a, b);
        let c = one(" 1001 \t 2024-03-01 08:00:00 \t0\t1").unwrap();
        assert_eq!(c.device_seq, b.device_seq);
    }

    #[test]
    fn status_255_and_unknown_codes_are_kept() {
        let p = one("7\t2024-03-01 08:00:00\t255\t200\t0").unwrap();
        assert_eq!(p.kind, PunchKind::Unspecified);
        assert_eq!(p.verify, VerifyMethod::Unknown);
        let p = one("7\t2024-03-01 08:00:00\t-1\t99999").unwrap();
        assert_eq!(p.kind, PunchKind::Unspecified);
        assert_eq!(p.verify, VerifyMethod::Unknown);
    }

    #[test]
    fn mapping_tables() {
        let kinds = [
            (0, PunchKind::In),
            (1, PunchKind::Out),
            (2, PunchKind::BreakOut),
            (3, PunchKind::BreakIn),
            (4, PunchKind::OvertimeIn),
            (5, PunchKind::OvertimeOut),
            (6, PunchKind::Unspecified),
            (255, PunchKind::Unspecified),
        ];
        for (c, k) in kinds {
            assert_eq!(map_status(c), k, "status {c}");
        }
        let verifies = [
            (0, VerifyMethod::Pin),
            (1, VerifyMethod::Fingerprint),
            (2, VerifyMethod::Card),
            (3, VerifyMethod::Pin),
            (4, VerifyMethod::Card),
            (6, VerifyMethod::Fingerprint),
            (11, VerifyMethod::Card),
            (15, VerifyMethod::Face),
            (20, VerifyMethod::Face),
            (21, VerifyMethod::Unknown),
            (25, VerifyMethod::Palm),
            (29, VerifyMethod::Palm),
            (30, VerifyMethod::Unknown),
            (200, VerifyMethod::Unknown),
            (-3, VerifyMethod::Unknown),
        ];
        for (c, v) in verifies {
            assert_eq!(map_verify(c), v, "verify {c}");
        }
    }

    #[test]
    fn non_ascii_pin() {
        let p = one("Zoë-Ø\t2024-03-01 08:00:00\t0\t1").unwrap();
        assert_eq!(p.subject_id.as_str(), "Zoë-Ø");
        assert_eq!(one("\t2024-03-01 08:00:00\t0\t1"), Err(SkipReason::BadPin));
        assert_eq!(
            one(&format!("{}\t2024-03-01 08:00:00", "9".repeat(65))),
            Err(SkipReason::BadPin)
        );
    }

    #[test]
    fn times() {
        assert_eq!(one("1\t2024-03-01T08:00:00\t0").unwrap().device_time_ms, T0);
        for bad in [
            "1\t2024-02-30 08:00:00",
            "1\t2024-03-01 24:00:00",
            "1\t2024-03-01",
            "1\t24-03-01 08:00:00",
            "1\t2024-03-01 08:00",
            "1\t2024-03-01 08:00:00:00",
            "1\tyesterday\t0",
            "1\t+2024-03-01 08:00:00",
        ] {
            assert_eq!(one(bad), Err(SkipReason::BadTime), "{bad}");
        }
        // Flat clock battery: 2000-01-01 local at +02:00 is still 1999 in UTC.
        assert_eq!(
            one("1\t2000-01-01 00:00:00\t0"),
            Err(SkipReason::TimeOutOfRange)
        );
        assert_eq!(
            one("1\t2100-06-01 00:00:00\t0"),
            Err(SkipReason::TimeOutOfRange)
        );
        // Leap day is real.
        assert!(one("1\t2024-02-29 12:00:00").is_ok());
    }

    #[test]
    fn bad_codes_are_skipped() {
        assert_eq!(
            one("1\t2024-03-01 08:00:00\tin\t1"),
            Err(SkipReason::BadStatus)
        );
        assert_eq!(
            one("1\t2024-03-01 08:00:00\t0\tface"),
            Err(SkipReason::BadVerify)
        );
    }

    #[test]
    fn explicit_offset_field_wins() {
        let p = one("1\t2024-03-01 08:00:00\t0\t1\t0\t0\t+00:00").unwrap();
        assert_eq!(p.device_time_ms, T0 + 2 * 3_600_000);
        assert_eq!(p.utc_offset_min, Some(0));
        let p = one("1\t2024-03-01 08:00:00\t0\t1\t0\t0\t0\t-0530").unwrap();
        assert_eq!(p.utc_offset_min, Some(-330));
        // Bare numbers in reserved fields are never offsets; the offset is not hashed.
        let q = one("1\t2024-03-01 08:00:00\t0\t1\t0\t0\t0\t200").unwrap();
        assert_eq!(q.utc_offset_min, Some(120));
        assert_eq!(p.device_seq, q.device_seq);
    }

    #[test]
    fn space_separated_and_tagged_lines() {
        let tab = one("1001\t2024-03-01 08:00:00\t0\t1\t0").unwrap();
        assert_eq!(one("1001 2024-03-01 08:00:00 0 1 0").unwrap(), tab);
        assert_eq!(one("1001   2024-03-01   08:00:00  0  1").unwrap(), tab);
        assert_eq!(
            one("ATTLOG\t1001\t2024-03-01 08:00:00\t0\t1\t0").unwrap(),
            tab
        );
        assert_eq!(one("ATTLOG 1001 2024-03-01 08:00:00 0 1").unwrap(), tab);
    }

    #[test]
    fn seq_is_stable_and_content_sensitive() {
        let a = one("1001\t2024-03-01 08:00:00\t0\t1\t0").unwrap();
        // The verify and workcode are not part of the identity; the status is.
        assert_eq!(
            a.device_seq,
            one("1001\t2024-03-01 08:00:00\t0\t4\t7")
                .unwrap()
                .device_seq
        );
        assert_ne!(
            a.device_seq,
            one("1001\t2024-03-01 08:00:00\t1\t1\t0")
                .unwrap()
                .device_seq
        );
        assert_ne!(
            a.device_seq,
            one("1001\t2024-03-01 08:00:01\t0\t1\t0")
                .unwrap()
                .device_seq
        );
        assert_ne!(
            a.device_seq,
            one("1002\t2024-03-01 08:00:00\t0\t1\t0")
                .unwrap()
                .device_seq
        );
        let other = parse_line(
            "1001\t2024-03-01 08:00:00\t0\t1\t0",
            &Id::new("zk:X").unwrap(),
            PLUS2,
        )
        .unwrap();
        assert_ne!(a.device_seq, other.device_seq);
        // Pinned: the formula is part of the dedup contract.
        assert_eq!(
            a.device_seq,
            derive_seq(&[b"zk:CQUJ230160001", b"1001", b"2024-03-01 08:00:00", b"0"])
        );
        assert!(outpost_protocol::seq::is_derived(a.device_seq));
    }

    #[test]
    fn bodies_crlf_lf_bom_blank_and_garbage() {
        let lf = "1\t2024-03-01 08:00:00\t0\t1\t0\n2\t2024-03-01 08:01:00\t1\t15\t0\n";
        let crlf = lf.replace('\n', "\r\n");
        let a = parse_attlog(lf.as_bytes(), &dev(), PLUS2);
        let b = parse_attlog(crlf.as_bytes(), &dev(), PLUS2);
        assert_eq!(a.punches.len(), 2);
        assert_eq!(a, b);
        let no_final_newline = lf.trim_end();
        assert_eq!(parse_attlog(no_final_newline.as_bytes(), &dev(), PLUS2), a);
        let bom = format!("\u{feff}{lf}");
        assert_eq!(parse_attlog(bom.as_bytes(), &dev(), PLUS2), a);

        let mut body = b"\r\n1\t2024-03-01 08:00:00\t0\n   \ngarbage\n".to_vec();
        body.extend_from_slice(b"\xff\xfe\t2024-03-01 08:00:00\n3\t2024-13-01 08:00:00\t0\n");
        let r = parse_attlog(&body, &dev(), PLUS2);
        assert_eq!(r.lines, 4);
        assert_eq!(r.punches.len(), 1);
        let reasons: Vec<_> = r.skipped.iter().map(|s| (s.line, s.reason)).collect();
        assert_eq!(
            reasons,
            vec![
                (4, SkipReason::TooFewFields),
                (5, SkipReason::NotUtf8),
                (6, SkipReason::BadTime)
            ]
        );
        assert_eq!(r.skipped[0].excerpt, "garbage");
        // Words are not a time.
        assert_eq!(one("this is not a punch"), Err(SkipReason::BadTime));
        assert_eq!(parse_attlog(b"", &dev(), PLUS2), Attlog::default());
    }

    #[test]
    fn excerpts_are_escaped_and_short() {
        assert_eq!(excerpt(b"a\tb\x1b"), "a\\tb\\u{1b}");
        let long = excerpt(&[b'x'; 500]);
        assert_eq!(long.chars().count(), EXCERPT_LEN + 1);
    }

    #[test]
    fn never_panics_on_arbitrary_lines() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..200))| {
            let _ = parse_attlog(&bytes, &dev(), PLUS2);
        });
        proptest!(|(s in "[0-9A-Za-z\t :+-]{0,80}")| {
            let _ = parse_attlog(s.as_bytes(), &dev(), PLUS2);
        });
    }
}
