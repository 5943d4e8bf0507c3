//! The `[outputs]` section: where stored punches go (docs in `config/relay.toml`).
//!
//! ```toml
//! [outputs]
//! lease_timeout_secs = 15
//!
//! [[outputs.webhook]]
//! name = "payroll"
//! url = "https://hr.example.org/outpost"
//! secret_file = "/etc/outpost/payroll.whsec"
//!
//! [[outputs.nats]]
//! name = "bus"
//! url = "nats://127.0.0.1:4222"
//! ```
//!
//! Output names are unique across both kinds: an output's progress is stored under its
//! name, so renaming an output starts it again from the beginning.

use std::path::PathBuf;

use outpost_ops::config::ConfigError;
use serde::Deserialize;

/// `[outputs]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputsSection {
    /// With several relays on one PostgreSQL, how long after the relay running an output
    /// dies another one takes it over, seconds.
    pub lease_timeout_secs: u64,
    /// `[[outputs.webhook]]`.
    pub webhook: Vec<WebhookOutput>,
    /// `[[outputs.nats]]`.
    pub nats: Vec<NatsOutput>,
}

impl Default for OutputsSection {
    fn default() -> Self {
        OutputsSection {
            lease_timeout_secs: 15,
            webhook: Vec::new(),
            nats: Vec::new(),
        }
    }
}

/// What an output is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// Stored punches.
    Punch,
    /// Punches that arrived with a stored punch key but different content.
    Conflict,
    /// Records whose punch failed validation.
    Rejected,
    /// Relay and gateway health notices: an output disabled or enabled (gateway alerts
    /// are the next kind of notice). The issue's kind list is the contract, so relay
    /// notices travel under `gateway` rather than a new kind.
    Gateway,
}

impl EventKind {
    /// The kind's config name, also the webhook body's `type` prefix (`punch.batch`).
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Punch => "punch",
            EventKind::Conflict => "conflict",
            EventKind::Rejected => "rejected",
            EventKind::Gateway => "gateway",
        }
    }
}

/// The Standard Webhooks retry schedule: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h,
/// 14 h, 20 h, 24 h; after that the last step repeats (daily).
pub const WEBHOOK_RETRY_SCHEDULE_SECS: [u64; 10] =
    [0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400];

/// Five days: an output failing continuously for this long is disabled.
pub const DEFAULT_DISABLE_AFTER_SECS: u64 = 5 * 24 * 3600;

/// `[[outputs.webhook]]`: an HTTPS endpoint that receives signed JSON batches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookOutput {
    /// Unique; the output's progress is stored under this name.
    pub name: String,
    /// Where batches are POSTed.
    pub url: String,
    /// The signing secret, `whsec_<base64>`; created (mode 0600) at first start if missing.
    pub secret_file: PathBuf,
    /// What is sent.
    #[serde(default = "default_events")]
    pub events: Vec<EventKind>,
    /// Only these sites; empty = every site.
    #[serde(default)]
    pub sites: Vec<String>,
    /// Punches per call; 1 = one event per call.
    #[serde(default = "default_webhook_batch_max")]
    pub batch_max: usize,
    /// Loopback, private and link-local targets are refused unless this is true (SSRF).
    #[serde(default)]
    pub allow_private: bool,
    /// Time limit for one call, seconds.
    #[serde(default = "default_webhook_timeout_secs")]
    pub timeout_secs: u64,
    /// The retry schedule, seconds: step 0 is the first attempt (0 = immediately), step `n`
    /// the wait after the `n`-th failure in a row; the last step repeats.
    #[serde(default = "default_webhook_retry_schedule")]
    pub retry_schedule_secs: Vec<u64>,
    /// Disable the output after failing continuously for this long, seconds.
    #[serde(default = "default_disable_after_secs")]
    pub disable_after_secs: u64,
}

/// `[[outputs.nats]]`: a NATS JetStream stream that receives one message per punch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsOutput {
    /// Unique; the output's progress is stored under this name.
    pub name: String,
    /// The NATS server, `nats://host:port` (or `tls://`).
    pub url: String,
    /// The subject of each message; `{site}` and `{device}` are replaced by the punch's.
    #[serde(default = "default_nats_subject")]
    pub subject: String,
    /// The subject of every other event (conflict, rejected, relay notice); `{kind}` is
    /// its `events` name, `{site}` its site (`_relay` for a relay notice), `{device}` its
    /// device (`_` for a notice).
    #[serde(default = "default_nats_event_subject")]
    pub event_subject: String,
    /// The JetStream stream; created (capturing `subject`'s wildcard form) if missing.
    #[serde(default = "default_nats_stream")]
    pub stream: String,
    /// The stream's duplicate window (messages with a `Nats-Msg-Id` seen within it are
    /// dropped by the server), seconds; used when the relay creates the stream.
    #[serde(default = "default_nats_duplicate_window_secs")]
    pub duplicate_window_secs: u64,
    /// Optional NATS credentials file; empty = none.
    #[serde(default)]
    pub creds_file: String,
    /// What is sent.
    #[serde(default = "default_events")]
    pub events: Vec<EventKind>,
    /// Only these sites; empty = every site.
    #[serde(default)]
    pub sites: Vec<String>,
    /// Punches per delivery.
    #[serde(default = "default_nats_batch_max")]
    pub batch_max: usize,
    /// Most publishes waiting for their PubAck at once.
    #[serde(default = "default_nats_max_ack_pending")]
    pub max_ack_pending: usize,
    /// First retry wait after a failure, ms (doubling, with jitter).
    #[serde(default = "default_nats_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest retry wait, ms.
    #[serde(default = "default_nats_retry_max_ms")]
    pub retry_max_ms: u64,
    /// Disable the output after failing continuously for this long, seconds.
    #[serde(default = "default_disable_after_secs")]
    pub disable_after_secs: u64,
}

fn default_events() -> Vec<EventKind> {
    vec![EventKind::Punch]
}
fn default_webhook_batch_max() -> usize {
    100
}
fn default_webhook_timeout_secs() -> u64 {
    15
}
fn default_webhook_retry_schedule() -> Vec<u64> {
    WEBHOOK_RETRY_SCHEDULE_SECS.to_vec()
}
fn default_disable_after_secs() -> u64 {
    DEFAULT_DISABLE_AFTER_SECS
}
fn default_nats_subject() -> String {
    "outpost.punch.{site}.{device}".into()
}
fn default_nats_event_subject() -> String {
    "outpost.{kind}.{site}".into()
}
fn default_nats_stream() -> String {
    "OUTPOST".into()
}
fn default_nats_duplicate_window_secs() -> u64 {
    120
}
fn default_nats_batch_max() -> usize {
    1000
}
fn default_nats_max_ack_pending() -> usize {
    256
}
fn default_nats_retry_initial_ms() -> u64 {
    500
}
fn default_nats_retry_max_ms() -> u64 {
    30_000
}

/// The most punches one delivery may carry.
pub const MAX_BATCH: usize = 10_000;

impl OutputsSection {
    /// Checks values that types alone cannot; errors name the key (`outputs.webhook[0].url`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.lease_timeout_secs == 0 {
            return Err(ConfigError::key(
                "outputs.lease_timeout_secs",
                "must be at least 1",
            ));
        }
        let mut names: Vec<&str> = Vec::new();
        let all = self
            .webhook
            .iter()
            .enumerate()
            .map(|(i, w)| {
                (
                    format!("outputs.webhook[{i}]"),
                    w.name.as_str(),
                    w.batch_max,
                )
            })
            .chain(
                self.nats
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (format!("outputs.nats[{i}]"), n.name.as_str(), n.batch_max)),
            );
        for (key, name, batch_max) in all {
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(ConfigError::key(
                    format!("{key}.name"),
                    "must be 1-64 characters of letters, digits, '-' and '_'",
                ));
            }
            if names.contains(&name) {
                return Err(ConfigError::key(
                    format!("{key}.name"),
                    format!("\"{name}\" is used by another output; names are unique"),
                ));
            }
            names.push(name);
            if batch_max == 0 || batch_max > MAX_BATCH {
                return Err(ConfigError::key(
                    format!("{key}.batch_max"),
                    format!("must be between 1 and {MAX_BATCH}"),
                ));
            }
        }
        for (i, w) in self.webhook.iter().enumerate() {
            let key = format!("outputs.webhook[{i}]");
            if !(w.url.starts_with("https://") || w.url.starts_with("http://")) {
                return Err(ConfigError::key(
                    format!("{key}.url"),
                    "must be an http:// or https:// URL",
                ));
            }
            if w.retry_schedule_secs.is_empty() {
                return Err(ConfigError::key(
                    format!("{key}.retry_schedule_secs"),
                    "must have at least one step",
                ));
            }
            if w.timeout_secs == 0 {
                return Err(ConfigError::key(
                    format!("{key}.timeout_secs"),
                    "must be at least 1",
                ));
            }
        }
        for (i, n) in self.nats.iter().enumerate() {
            let key = format!("outputs.nats[{i}]");
            if n.max_ack_pending == 0 {
                return Err(ConfigError::key(
                    format!("{key}.max_ack_pending"),
                    "must be at least 1",
                ));
            }
            if n.stream.is_empty() || n.subject.is_empty() {
                return Err(ConfigError::key(
                    format!("{key}.stream"),
                    "stream and subject must not be empty",
                ));
            }
            if n.retry_initial_ms == 0 || n.retry_max_ms < n.retry_initial_ms {
                return Err(ConfigError::key(
                    format!("{key}.retry_max_ms"),
                    "retry_initial_ms must be at least 1 and retry_max_ms at least retry_initial_ms",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<OutputsSection, String> {
        let s: OutputsSection = toml::from_str(text).map_err(|e| e.to_string())?;
        s.validate().map_err(|e| e.to_string())?;
        Ok(s)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = parse(
            "[[webhook]]\nname = \"payroll\"\nurl = \"https://hr.example.org/outpost\"\n\
             secret_file = \"/etc/outpost/payroll.whsec\"\n\
             [[nats]]\nname = \"bus\"\nurl = \"nats://127.0.0.1:4222\"\n",
        )
        .unwrap();
        assert_eq!(s.lease_timeout_secs, 15);
        let w = &s.webhook[0];
        assert_eq!(w.events, vec![EventKind::Punch]);
        assert!(w.sites.is_empty() && !w.allow_private);
        assert_eq!((w.batch_max, w.timeout_secs), (100, 15));
        assert_eq!(w.retry_schedule_secs, WEBHOOK_RETRY_SCHEDULE_SECS.to_vec());
        assert_eq!(w.disable_after_secs, 5 * 24 * 3600);
        let n = &s.nats[0];
        assert_eq!(n.subject, "outpost.punch.{site}.{device}");
        assert_eq!((n.stream.as_str(), n.creds_file.as_str()), ("OUTPOST", ""));
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(
            "[[webhook]]\nname = \"x\"\nurl = \"https://a\"\nsecret_file = \"/s\"\n\
             [[nats]]\nname = \"x\"\nurl = \"nats://a\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("outputs.nats[0].name") && e.contains("unique"),
            "{e}"
        );
        let e = parse("[[webhook]]\nname = \"a b\"\nurl = \"https://a\"\nsecret_file = \"/s\"\n")
            .unwrap_err();
        assert!(e.contains("outputs.webhook[0].name"), "{e}");
        let e = parse(
            "[[webhook]]\nname = \"a\"\nurl = \"ftp://a\"\nsecret_file = \"/s\"\nbatch_max = 5\n",
        )
        .unwrap_err();
        assert!(e.contains("outputs.webhook[0].url"), "{e}");
        let e = parse(
            "[[webhook]]\nname = \"a\"\nurl = \"https://a\"\nsecret_file = \"/s\"\nbatch_max = 0\n",
        )
        .unwrap_err();
        assert!(e.contains("batch_max"), "{e}");
        let e = parse("[[webhook]]\nname = \"a\"\nurl = \"https://a\"\nsecret_file = \"/s\"\nevents = [\"everything\"]\n")
            .unwrap_err();
        assert!(e.contains("everything"), "{e}");
        assert!(
            parse("[[webhook]]\nname = \"a\"\n").is_err(),
            "url and secret_file are required"
        );
    }
}
