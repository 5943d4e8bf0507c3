//! What a webhook call's answer means for the output (Standard Webhooks, "Delivery success
//! and failure").
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx | delivered |
//! | 3xx | retry: redirects are not followed (the URL should be updated instead) |
//! | 410 Gone | [`SinkError::Gone`]: the worker disables the output |
//! | 429, 503 | retry, after `Retry-After` when given (seconds or HTTP-date, at most [`MAX_RETRY_AFTER`]) |
//! | anything else | retry |
//!
//! A failure's reason names the status and carries the start of the response body (at
//! most [`BODY_IN_REASON`] bytes), so `GET /v1/outputs` shows what the receiver said.

use std::time::{Duration, SystemTime};

use reqwest::StatusCode;

use crate::outputs::sink::SinkError;

/// The longest `Retry-After` honoured; a longer one waits this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The most response-body bytes read into a failure's reason.
pub const BODY_IN_REASON: usize = 2048;

/// The parts of an answer that decide the outcome.
#[derive(Debug, Clone, Default)]
pub struct Answer<'a> {
    /// Its `Retry-After` header.
    pub retry_after: Option<&'a str>,
    /// Its `Location` header.
    pub location: Option<&'a str>,
    /// The start of its body.
    pub body: &'a str,
}

/// The outcome of an answer with `status`, at `now` (for an HTTP-date `Retry-After`).
pub fn classify(status: StatusCode, answer: &Answer<'_>, now: SystemTime) -> Result<(), SinkError> {
    if status.is_success() {
        return Ok(());
    }
    let mut reason = format!("HTTP {status}");
    if status.is_redirection() {
        reason.push_str(" (redirects are not followed; set url to the final address");
        if let Some(to) = answer.location {
            reason.push_str(", here ");
            reason.push_str(&printable(to, 512));
        }
        reason.push(')');
    }
    let body = printable(answer.body, BODY_IN_REASON);
    if !body.is_empty() {
        reason.push_str(": ");
        reason.push_str(&body);
    }
    if status == StatusCode::GONE {
        return Err(SinkError::Gone { reason });
    }
    let retry_after = match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            answer.retry_after.and_then(|v| parse_retry_after(v, now))
        }
        _ => None,
    };
    Err(SinkError::Retry {
        reason,
        retry_after,
    })
}

/// A `Retry-After` value: delay seconds or an HTTP-date, capped at [`MAX_RETRY_AFTER`]; a
/// date in the past is zero. `None` when it is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still "a long time".
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// `text` cut to at most `max` bytes (at a character boundary), control characters as
/// spaces, trimmed: safe for a log line and the API.
pub fn printable(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut: String = text[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let trimmed = cut.trim();
    if end < text.len() {
        format!("{trimmed}...")
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = at(1_700_000_000);
        let p = |v| parse_retry_after(v, now);
        assert_eq!(p("7"), Some(Duration::from_secs(7)));
        assert_eq!(p(" 0 "), Some(Duration::ZERO));
        assert_eq!(p("999999999999999999999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(p("90000"), Some(MAX_RETRY_AFTER));
        let date = httpdate::fmt_http_date(at(1_700_000_030));
        assert_eq!(p(&date), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(at(1_600_000_000));
        assert_eq!(p(&past), Some(Duration::ZERO));
        assert_eq!(p("-5"), None);
        assert_eq!(p("soon"), None);
        assert_eq!(p(""), None);
    }

    #[test]
    fn statuses_map_to_outcomes() {
        let now = at(1_700_000_000);
        let c = |s: u16, a: Answer<'_>| classify(StatusCode::from_u16(s).unwrap(), &a, now);
        assert_eq!(c(200, Answer::default()), Ok(()));
        assert_eq!(c(204, Answer::default()), Ok(()));
        let with_ra = Answer {
            retry_after: Some("12"),
            ..Answer::default()
        };
        for s in [429, 503] {
            match c(s, with_ra.clone()) {
                Err(SinkError::Retry {
                    retry_after: Some(d),
                    reason,
                }) => {
                    assert_eq!(d, Duration::from_secs(12));
                    assert!(reason.contains(&s.to_string()), "{reason}");
                }
                other => panic!("{s}: {other:?}"),
            }
        }
        // Retry-After is only the receiver's wish on 429 and 503.
        assert!(matches!(
            c(500, with_ra),
            Err(SinkError::Retry {
                retry_after: None,
                ..
            })
        ));
        match c(
            302,
            Answer {
                location: Some("https://elsewhere.example/x"),
                ..Answer::default()
            },
        ) {
            Err(SinkError::Retry { reason, .. }) => assert!(
                reason.contains("302")
                    && reason.contains("redirects are not followed")
                    && reason.contains("https://elsewhere.example/x"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        match c(
            410,
            Answer {
                body: "endpoint deleted\n",
                ..Answer::default()
            },
        ) {
            Err(SinkError::Gone { reason }) => {
                assert_eq!(reason, "HTTP 410 Gone: endpoint deleted")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reasons_are_cut_and_printable() {
        assert_eq!(printable("a\r\nb\u{0}", 100), "a  b");
        assert_eq!(printable("ééé", 3), "é...");
        assert_eq!(printable(&"x".repeat(5000), BODY_IN_REASON).len(), 2051);
    }
}
