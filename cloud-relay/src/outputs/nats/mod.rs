//! The NATS JetStream output kind: one JetStream message per event.
//!
//! Protocol, per [`Delivery`]:
//! - each punch is published to the configured `subject` with `{site}`/`{device}` replaced
//!   by the punch's (made token-safe, [`subject`]); each other event (conflict, rejected,
//!   relay notice: `outputs::delivery`) to `event_subject` (default
//!   `outpost.{kind}.{site}`), with `{kind}` its `events` name (`conflict`, `rejected`,
//!   `gateway`) and `{site}` its site (`_relay` for a relay notice); payload = the item's
//!   JSON, header `Nats-Msg-Id` = the item's stable id;
//! - publishes are pipelined: at most `max_ack_pending` wait for their PubAck at once, and
//!   acks are collected in publish order. One connection keeps the order, so the stream
//!   holds the items in cursor order;
//! - the delivery is `Ok` only when every item has its PubAck. Anything else (no server, a
//!   lost connection, no ack within [`ACK_TIMEOUT`], an error ack) is a
//!   [`SinkError::Retry`], and the worker sends the whole delivery again. The server drops
//!   every message whose `Nats-Msg-Id` it stored within the stream's duplicate window and
//!   says so in the PubAck (`duplicate: true`); [`NatsStats::duplicates`] counts those.
//!
//! Order: a stopped server or a broken connection stores a prefix of the delivery, and the
//! retry adds the rest in order ([`conn`] keeps a reconnect from sending queued publishes
//! late). A server that refuses one message but stores the ones after it (say, a clustered
//! stream electing a leader) gets the refused one on the retry, after them: still exactly
//! once, by `Nats-Msg-Id`, but out of order.
//!
//! Connection: made on the first delivery, not at start, so a relay starts while NATS is
//! down. A connection is used until it breaks and never reopened ([`conn`] says why); the
//! next delivery opens a new one, and until that works every delivery fails at once (the
//! worker waits [`Sink::retry_delay`] in between: doubling from `retry_initial_ms` to
//! `retry_max_ms`). After connecting, the stream is made sure of: created if missing
//! (subjects = the templates' wildcard forms, `event_subject`'s only when the output's
//! `events` has more than `punch` and it is not captured by `subject`'s; `duplicate_window`
//! from config), left as it
//! is if it exists (a warning is logged when its subjects do not capture ours). A PubAck
//! saying no stream captures the subject makes the next delivery check again.
//!
//! | file | job |
//! |---|---|
//! | [`subject`] | the subject template, token-safe ids, the stream's wildcard subject |
//! | [`conn`] | one connection: connect once, credentials, make sure of the stream |

pub mod conn;
pub mod subject;

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::ServerAddr;
use bytes::Bytes;
use outpost_ops::backoff::Backoff;
use tokio::sync::watch;

use super::config::{EventKind, NatsOutput};
use super::sink::{Delivery, Item, Sink, SinkError};
use crate::store::BoxFuture;
use conn::{Conn, Creds};
use subject::SubjectTemplate;

/// How long a PubAck, or a JetStream API answer, may take.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// A `[[outputs.nats]]` entry that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// `url` is not a NATS server address.
    #[error("{key}: \"{url}\" is not a NATS server address ({reason}); write nats://host:port, or tls://host:port for TLS")]
    Url {
        /// The config key.
        key: String,
        /// The value.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// `subject` is not a usable subject template.
    #[error("{key}: {reason}; write dot-separated tokens where {{site}} and {{device}} are whole tokens, e.g. outpost.punch.{{site}}.{{device}}")]
    Subject {
        /// The config key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// `stream` is not a valid JetStream stream name.
    #[error("{key}: \"{stream}\" is not a JetStream stream name; use letters, digits, '-' and '_' (no '.', '*', '>', '/', '\\' or whitespace)")]
    Stream {
        /// The config key.
        key: String,
        /// The value.
        stream: String,
    },
    /// `creds_file` cannot be read.
    #[error("{key}: cannot read the NATS credentials file {path}: {source}; fix the path or its permissions, or set creds_file = \"\" for none")]
    CredsRead {
        /// The config key.
        key: String,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `creds_file` is not a NATS credentials file.
    #[error("{key}: {path} is not a NATS credentials file (a user JWT and an nkey seed, as `nsc generate creds` writes): {reason}")]
    CredsParse {
        /// The config key.
        key: String,
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// What a NATS output's server confirmed, shared with whoever watches the output (metrics,
/// tests). Clones count together.
#[derive(Debug, Clone, Default)]
pub struct NatsStats {
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    acked: AtomicU64,
    duplicates: AtomicU64,
}

impl NatsStats {
    /// Messages the server acknowledged, duplicates included.
    pub fn acked(&self) -> u64 {
        self.counters.acked.load(Ordering::Relaxed)
    }

    /// Acknowledged messages the server dropped as resends (`duplicate: true`: their
    /// `Nats-Msg-Id` was already in the stream's duplicate window).
    pub fn duplicates(&self) -> u64 {
        self.counters.duplicates.load(Ordering::Relaxed)
    }
}

/// Delivers to a NATS JetStream stream ([module docs](self)).
pub struct NatsSink {
    name: String,
    url: String,
    server: ServerAddr,
    /// The credentials file (read once, at start).
    creds: Option<Creds>,
    subject: SubjectTemplate,
    /// The subject of events other than punches.
    event_subject: SubjectTemplate,
    /// Whether the output is sent events other than punches (their subject is then one
    /// of the stream's).
    other_events: bool,
    stream: String,
    duplicate_window: Duration,
    max_ack_pending: usize,
    retry_initial: Duration,
    retry_max: Duration,
    conn: Option<Conn>,
    stats: NatsStats,
}

impl std::fmt::Debug for NatsSink {
    // By hand: the credentials stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("stream", &self.stream)
            .field("subject", &self.subject.wildcard())
            .field("creds", &self.creds.is_some())
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl NatsSink {
    /// Checks `cfg` and reads its credentials file. Does not connect: that happens on the
    /// first delivery.
    pub fn new(cfg: &NatsOutput) -> Result<NatsSink, NatsError> {
        let key = |k: &str| format!("outputs.nats[name = \"{}\"].{k}", cfg.name);
        let server = ServerAddr::from_str(&cfg.url).map_err(|e| NatsError::Url {
            key: key("url"),
            url: cfg.url.clone(),
            reason: e.to_string(),
        })?;
        if !(cfg.url.starts_with("nats://") || cfg.url.starts_with("tls://")) {
            return Err(NatsError::Url {
                key: key("url"),
                url: cfg.url.clone(),
                reason: "the scheme must be nats:// or tls://".into(),
            });
        }
        let subject =
            SubjectTemplate::parse(&cfg.subject).map_err(|reason| NatsError::Subject {
                key: key("subject"),
                reason,
            })?;
        let event_subject =
            SubjectTemplate::parse(&cfg.event_subject).map_err(|reason| NatsError::Subject {
                key: key("event_subject"),
                reason,
            })?;
        let stream_ok = !cfg.stream.is_empty()
            && !cfg.stream.chars().any(|c| {
                matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace() || c.is_control()
            });
        if !stream_ok {
            return Err(NatsError::Stream {
                key: key("stream"),
                stream: cfg.stream.clone(),
            });
        }
        let creds = if cfg.creds_file.is_empty() {
            None
        } else {
            let text = std::fs::read_to_string(&cfg.creds_file).map_err(|source| {
                NatsError::CredsRead {
                    key: key("creds_file"),
                    path: cfg.creds_file.clone(),
                    source,
                }
            })?;
            Some(Creds::parse(&text).map_err(|reason| NatsError::CredsParse {
                key: key("creds_file"),
                path: cfg.creds_file.clone(),
                reason,
            })?)
        };
        Ok(NatsSink {
            name: cfg.name.clone(),
            url: cfg.url.clone(),
            server,
            creds,
            subject,
            event_subject,
            other_events: cfg.events.iter().any(|e| *e != EventKind::Punch),
            stream: cfg.stream.clone(),
            duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
            max_ack_pending: cfg.max_ack_pending.max(1),
            retry_initial: Duration::from_millis(cfg.retry_initial_ms),
            retry_max: Duration::from_millis(cfg.retry_max_ms),
            conn: None,
            stats: NatsStats::default(),
        })
    }

    /// A handle on this output's counters; it keeps counting after the sink moves into its
    /// worker.
    pub fn stats(&self) -> NatsStats {
        self.stats.clone()
    }

    /// Acknowledged messages the server reported as duplicates, so far.
    pub fn duplicates(&self) -> u64 {
        self.stats.duplicates()
    }

    /// The subject of `item`, a punch.
    pub fn subject_of(&self, item: &Item) -> String {
        self.subject_of_kind(EventKind::Punch, item)
    }

    /// The subject of `item`, an event of `kind` (module docs).
    pub fn subject_of_kind(&self, kind: EventKind, item: &Item) -> String {
        match kind {
            EventKind::Punch => self.subject.render(&item.site, &item.device),
            k => self
                .event_subject
                .render_kind(k.name(), &item.site, &item.device),
        }
    }

    /// The stream's punch subject: the template with `*` for `{site}` and `{device}`.
    pub fn stream_subject(&self) -> String {
        self.subject.wildcard()
    }

    /// Every subject the stream is created with (module docs): the punch subject's
    /// wildcard, and `event_subject`'s when the output is sent other events and the
    /// first does not capture it (a stream refuses overlapping subjects).
    pub fn stream_subjects(&self) -> Vec<String> {
        let punch = self.subject.wildcard();
        let mut subjects = vec![punch.clone()];
        let events = self.event_subject.wildcard();
        if self.other_events && !subject::covers(&punch, &events) {
            if subject::covers(&events, &punch) {
                subjects = vec![events];
            } else {
                subjects.push(events);
            }
        }
        subjects
    }

    fn retry(&self, reason: impl Into<String>) -> SinkError {
        SinkError::Retry {
            reason: format!("NATS {}: {}", self.url, reason.into()),
            retry_after: None,
        }
    }

    /// Connects (first use, or after the connection broke) and makes sure of the stream.
    async fn ready(&mut self) -> Result<(), SinkError> {
        if self.conn.as_ref().is_some_and(|c| !c.usable()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let (ack_limit, name) = (self.max_ack_pending, self.name.clone());
            let conn = Conn::open(&name, &self.server, self.creds.as_ref(), |client| {
                context(client, ack_limit)
            })
            .await
            .map_err(|reason| self.retry(reason))?;
            self.conn = Some(conn);
        }
        let Some(conn) = self.conn.as_ref() else {
            return Err(self.retry("not connected"));
        };
        if !conn.stream_ready {
            conn.ensure_stream(
                &self.name,
                &self.stream,
                &self.stream_subjects(),
                self.duplicate_window,
            )
            .await
            .map_err(|reason| self.retry(reason))?;
            if let Some(c) = self.conn.as_mut() {
                c.stream_ready = true;
            }
        }
        Ok(())
    }

    /// Publishes every item, at most `max_ack_pending` unacknowledged at once.
    async fn publish_all(&mut self, delivery: &Delivery) -> Result<(), SinkError> {
        self.ready().await?;
        let Some(conn) = self.conn.as_ref() else {
            return Err(self.retry("not connected"));
        };
        let js = conn.js.clone();
        let mut lost = conn.lost.clone();
        lost.mark_unchanged();
        let mut pending: VecDeque<(usize, PublishAckFuture)> =
            VecDeque::with_capacity(self.max_ack_pending);
        for (i, item) in delivery.items.iter().enumerate() {
            if pending.len() >= self.max_ack_pending {
                if let Some((j, fut)) = pending.pop_front() {
                    self.await_ack(&delivery.items[j], fut, &mut lost).await?;
                }
            }
            let payload = serde_json::to_vec(&item.json)
                .map_err(|e| self.retry(format!("item {}: cannot encode: {e}", item.id)))?;
            let msg = PublishMessage::build()
                .payload(Bytes::from(payload))
                .message_id(&item.id);
            let subject = self.subject_of_kind(delivery.kind, item);
            let sent = while_connected(&mut lost, js.send_publish(subject, msg))
                .await
                .ok_or_else(|| self.retry("connection lost during the delivery"))?;
            let fut =
                sent.map_err(|e| self.retry(format!("cannot publish item {}: {e}", item.id)))?;
            pending.push_back((i, fut));
        }
        while let Some((j, fut)) = pending.pop_front() {
            self.await_ack(&delivery.items[j], fut, &mut lost).await?;
        }
        Ok(())
    }

    async fn await_ack(
        &mut self,
        item: &Item,
        fut: PublishAckFuture,
        lost: &mut watch::Receiver<u64>,
    ) -> Result<(), SinkError> {
        let answer = while_connected(lost, fut.into_future())
            .await
            .ok_or_else(|| self.retry("connection lost while waiting for PubAcks"))?;
        match answer {
            Ok(ack) => {
                self.stats.counters.acked.fetch_add(1, Ordering::Relaxed);
                if ack.duplicate {
                    self.stats
                        .counters
                        .duplicates
                        .fetch_add(1, Ordering::Relaxed);
                }
                if ack.stream != self.stream {
                    tracing::debug!(
                        output = %self.name,
                        stream = %ack.stream,
                        "stored by another stream than the configured one"
                    );
                }
                Ok(())
            }
            Err(e) => {
                let reason = match e.kind() {
                    PublishErrorKind::StreamNotFound => {
                        // Check (and create) the stream again on the next attempt.
                        if let Some(c) = self.conn.as_mut() {
                            c.stream_ready = false;
                        }
                        format!(
                            "no JetStream stream answered for {} (item {}): none captures \
                             the subject, or the server's JetStream is shutting down",
                            self.subject_of(item),
                            item.id
                        )
                    }
                    PublishErrorKind::TimedOut => format!(
                        "no PubAck within {} s for item {}",
                        ACK_TIMEOUT.as_secs(),
                        item.id
                    ),
                    _ => format!("item {} refused: {e}", item.id),
                };
                Err(self.retry(reason))
            }
        }
    }
}

/// A JetStream context whose in-flight limit is the output's.
fn context(client: async_nats::Client, max_ack_pending: usize) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(ACK_TIMEOUT)
        .ack_timeout(ACK_TIMEOUT)
        .max_ack_inflight(max_ack_pending)
        .build(client)
}

/// Runs `fut` unless the connection is lost first (`None`).
async fn while_connected<T>(
    lost: &mut watch::Receiver<u64>,
    fut: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        out = fut => Some(out),
        // A closed channel means the client is gone: lost as well.
        _ = lost.changed() => None,
    }
}

impl Sink for NatsSink {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn deliver<'a>(&'a mut self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let out = self.publish_all(delivery).await;
            if out.is_err() {
                // Unanswered publishes of this attempt hold permits of the context's
                // in-flight limit until they time out; the retry gets a fresh limit. (On a
                // connection that still works they stay ahead of the retry, in order.)
                let max = self.max_ack_pending;
                if let Some(c) = self.conn.as_mut() {
                    c.js = context(c.client.clone(), max);
                }
            }
            out
        })
    }

    fn retry_delay(&self, failures: u32) -> Duration {
        Backoff::ceiling_after(
            self.retry_initial,
            self.retry_max,
            failures.saturating_sub(1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> NatsOutput {
        toml::from_str(&format!(
            "name = \"bus\"\nurl = \"nats://127.0.0.1:4222\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn checks_the_config_and_names_the_key() {
        let s = NatsSink::new(&cfg("")).unwrap();
        assert_eq!(s.kind(), "nats");
        assert_eq!(s.stream_subject(), "outpost.punch.*.*");
        let mut c = cfg("");
        c.url = "http://x".into();
        let e = NatsSink::new(&c).unwrap_err();
        let url_err = e.to_string();
        assert!(matches!(e, NatsError::Url { .. }), "{e}");
        assert!(
            url_err.contains("outputs.nats[name = \"bus\"].url"),
            "{url_err}"
        );
        c.url = "not a url at all://".into();
        assert!(matches!(NatsSink::new(&c), Err(NatsError::Url { .. })));
        let e = NatsSink::new(&cfg("subject = \"a.{site}x\"")).unwrap_err();
        assert!(matches!(e, NatsError::Subject { .. }), "{e}");
        assert!(e.to_string().contains(".subject"), "{e}");
        let e = NatsSink::new(&cfg("stream = \"A.B\"")).unwrap_err();
        assert!(matches!(e, NatsError::Stream { .. }), "{e}");
        let e = NatsSink::new(&cfg("creds_file = \"/nonexistent/x.creds\"")).unwrap_err();
        assert!(matches!(e, NatsError::CredsRead { .. }), "{e}");
        assert!(e.to_string().contains("creds_file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.creds");
        std::fs::write(&bad, "not a creds file").unwrap();
        let e = NatsSink::new(&cfg(&format!("creds_file = \"{}\"", bad.display()))).unwrap_err();
        assert!(matches!(e, NatsError::CredsParse { .. }), "{e}");
    }

    #[test]
    fn subjects_of_items_are_token_safe() {
        let s = NatsSink::new(&cfg("")).unwrap();
        let item = Item {
            id: "a.b/d 1/7".into(),
            cursor: 1,
            site: "a.b".into(),
            device: "d 1".into(),
            json: serde_json::Map::new(),
        };
        assert_eq!(s.subject_of(&item), "outpost.punch.a_b.d_1");
    }

    #[test]
    fn other_kinds_go_to_the_event_subject() {
        let item = Item {
            id: "x".into(),
            cursor: 1,
            site: "HC001".into(),
            device: "door-1".into(),
            json: serde_json::Map::new(),
        };
        let s = NatsSink::new(&cfg("events = [\"punch\", \"conflict\"]")).unwrap();
        assert_eq!(
            s.subject_of_kind(EventKind::Conflict, &item),
            "outpost.conflict.HC001"
        );
        assert_eq!(s.subject_of(&item), "outpost.punch.HC001.door-1");
        assert_eq!(s.stream_subjects(), ["outpost.punch.*.*", "outpost.*.*"]);
        // Punches only: the stream captures the punch subject alone.
        assert_eq!(
            NatsSink::new(&cfg("")).unwrap().stream_subjects(),
            ["outpost.punch.*.*"]
        );
        // A covering event subject replaces the punch one (no overlapping subjects).
        let s = NatsSink::new(&cfg(
            "events = [\"punch\", \"gateway\"]\nevent_subject = \"outpost.{kind}.{site}.{device}\"",
        ))
        .unwrap();
        assert_eq!(s.stream_subjects(), ["outpost.*.*.*"]);
        let e = NatsSink::new(&cfg("event_subject = \"a.{kindx}\"")).unwrap_err();
        assert!(e.to_string().contains("event_subject"), "{e}");
    }

    #[test]
    fn retry_delay_doubles_from_initial_to_max() {
        let s = NatsSink::new(&cfg("retry_initial_ms = 100\nretry_max_ms = 1000")).unwrap();
        let got: Vec<u128> = (1..=6).map(|n| s.retry_delay(n).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(s.retry_delay(0).as_millis(), 100);
    }
}
