//! The webhook receiver kind: signed JSON batches POSTed to an HTTPS endpoint, following
//! the Standard Webhooks specification.
//!
//! One [`Delivery`] is one call:
//!
//! ```text
//! POST <url>
//! content-type: application/json
//! webhook-id: <delivery.id>                 the same on every retry of this delivery
//! webhook-timestamp: <Unix seconds now>     new on every attempt
//! webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">
//!
//! {"type":"punch.batch","timestamp":"<RFC 3339 of delivery.created_ms>","data":{"items":[...]}}
//! ```
//!
//! A delivery holds one kind of event (`outputs::delivery`), and `type` is `<kind>.batch`
//! ([`event_type`]): `punch.batch` (items: the punch JSON of `GET /v1/punches`),
//! `conflict.batch` (of `GET /v1/conflicts`), `rejected.batch` (of `GET /v1/rejected`),
//! `gateway.batch` (relay notices, `outputs::notices`); every item has `"id"` and
//! `"cursor"`.
//!
//! The body depends only on the delivery (its creation time and items), so every retry
//! sends the same bytes; only the
//! timestamp header and the signature change. The key is the secret file's
//! ([`secret_file`]); the signature is [`signature::Secret::sign`].
//!
//! What an answer means is [`outcome`]: 2xx delivered, 410 disables the output, 429 and 503
//! honour `Retry-After`, anything else (3xx included: redirects are not followed), a
//! timeout (`timeout_secs`, the whole call) or a connection or TLS error is retried. Unless
//! the output has `allow_private = true`, the client connects only to public addresses,
//! checked after DNS resolution ([`target`]). No proxy from the environment is used: the
//! check is on the address the relay itself connects to.
//!
//! Retries follow `retry_schedule_secs` (see [`WebhookSink::retry_delay`]); the output
//! worker adds jitter, keeps the failure count and disables the output.

pub mod outcome;
pub mod secret_file;
pub mod signature;
pub mod target;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outpost_protocol::json::format_time;
use reqwest::header::{CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::Url;
use serde::Serialize;
use serde_json::{Map, Value};

use super::config::{EventKind, WebhookOutput};
use super::sink::{Delivery, Sink, SinkError};
use crate::store::BoxFuture;
use outcome::{classify, Answer, BODY_IN_REASON};
use secret_file::{load_or_create, SecretFileError};
use signature::Secret;
use target::{GuardedResolver, Refused};

/// The `type` of a call carrying punches.
pub const EVENT_TYPE: &str = "punch.batch";

/// The `type` of a call carrying items of `kind`: `<kind>.batch`.
pub fn event_type(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Punch => EVENT_TYPE,
        EventKind::Conflict => "conflict.batch",
        EventKind::Rejected => "rejected.batch",
        EventKind::Gateway => "gateway.batch",
    }
}

/// Why a webhook output cannot be set up. Each names the output and what to change.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The secret file cannot be read or created, or does not hold a secret.
    #[error("outputs.webhook \"{name}\".secret_file: {source}")]
    Secret {
        /// The output.
        name: String,
        /// What is wrong with the file.
        source: SecretFileError,
    },
    /// The URL is not an absolute http(s) URL with a host.
    #[error(
        "outputs.webhook \"{name}\".url {url:?}: {reason}; \
         expected an absolute URL such as https://hr.example.org/outpost"
    )]
    Url {
        /// The output.
        name: String,
        /// The configured URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client cannot be built (its TLS setup failed).
    #[error("outputs.webhook \"{name}\": cannot set up the HTTP client: {source}")]
    Client {
        /// The output.
        name: String,
        /// The client's error.
        source: reqwest::Error,
    },
}

/// Delivers batches to one `[[outputs.webhook]]`.
#[derive(Debug)]
pub struct WebhookSink {
    name: String,
    url: Url,
    secret: Secret,
    client: reqwest::Client,
    /// Why the URL's IP-literal host is refused (SSRF), checked once: such a host is never
    /// resolved, so the resolver cannot check it.
    literal_refusal: Option<String>,
    timeout_secs: u64,
    schedule: Vec<u64>,
}

impl WebhookSink {
    /// Sets up the output: validates the URL, reads the secret file (creating it, mode
    /// 0600, when it is missing) and builds the HTTP client (no redirects, no proxy,
    /// `timeout_secs` for the whole call, connections only to public addresses unless
    /// `allow_private`).
    pub fn new(cfg: &WebhookOutput) -> Result<WebhookSink, WebhookError> {
        let url_error = |reason: String| WebhookError::Url {
            name: cfg.name.clone(),
            url: cfg.url.clone(),
            reason,
        };
        let url = Url::parse(&cfg.url).map_err(|e| url_error(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(url_error(format!(
                "the scheme is \"{}\"; it must be https (or http)",
                url.scheme()
            )));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| url_error("it has no host".into()))?;
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        let literal_refusal = match literal {
            Some(ip) if !cfg.allow_private => target::refusal(ip),
            _ => None,
        };
        let (secret, created) =
            load_or_create(&cfg.secret_file).map_err(|source| WebhookError::Secret {
                name: cfg.name.clone(),
                source,
            })?;
        if created {
            tracing::info!(
                output = %cfg.name,
                file = %cfg.secret_file.display(),
                "created a new webhook signing secret; give this file to the receiver"
            );
        }
        let timeout = Duration::from_secs(cfg.timeout_secs.max(1));
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("outpost-relay/", env!("CARGO_PKG_VERSION")));
        if !cfg.allow_private {
            builder = builder.dns_resolver(Arc::new(GuardedResolver {
                output: cfg.name.clone(),
            }));
        }
        let client = builder.build().map_err(|source| WebhookError::Client {
            name: cfg.name.clone(),
            source,
        })?;
        Ok(WebhookSink {
            name: cfg.name.clone(),
            url,
            secret,
            client,
            literal_refusal,
            timeout_secs: timeout.as_secs(),
            schedule: cfg.retry_schedule_secs.clone(),
        })
    }

    /// One attempt at `delivery`, signed with the Unix time `timestamp`.
    async fn attempt(&self, delivery: &Delivery, timestamp: i64) -> Result<(), SinkError> {
        if let Some(reason) = &self.literal_refusal {
            tracing::warn!(output = %self.name, "webhook target {reason}");
            return Err(retry(reason.clone()));
        }
        let body = body(delivery).map_err(|e| retry(format!("cannot encode the body: {e}")))?;
        let signature = self.secret.sign(&delivery.id, timestamp, &body);
        let sent = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", &delivery.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => return Err(retry(self.error_reason(e))),
        };
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        let (retry_after, location) = (header(RETRY_AFTER), header(LOCATION));
        // The start of the body, for the reason; a body that stalls or breaks only ends
        // the reading (the call's timeout still bounds it).
        let mut start = Vec::new();
        while start.len() < BODY_IN_REASON {
            match response.chunk().await {
                Ok(Some(chunk)) => start.extend_from_slice(&chunk),
                _ => break,
            }
        }
        let answer = Answer {
            retry_after: retry_after.as_deref(),
            location: location.as_deref(),
            body: &String::from_utf8_lossy(&start),
        };
        classify(status, &answer, SystemTime::now())
    }

    /// A failed call's reason: the innermost useful cause, without the URL (it may carry
    /// credentials).
    fn error_reason(&self, e: reqwest::Error) -> String {
        if e.is_timeout() {
            return format!(
                "no answer within {} s (timeout_secs), or the answer was not finished in time",
                self.timeout_secs
            );
        }
        let e = e.without_url();
        let mut parts = vec![e.to_string()];
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            if let Some(refused) = s.downcast_ref::<Refused>() {
                return refused.to_string();
            }
            let text = s.to_string();
            if !parts.iter().any(|p| p.contains(&text)) {
                parts.push(text);
            }
            source = s.source();
        }
        parts.join(": ")
    }
}

fn retry(reason: String) -> SinkError {
    SinkError::Retry {
        reason,
        retry_after: None,
    }
}

/// The JSON body of `delivery`'s call. It depends only on the delivery, so it is the same
/// bytes on every attempt.
pub fn body(delivery: &Delivery) -> Result<Vec<u8>, serde_json::Error> {
    #[derive(Serialize)]
    struct Body<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        timestamp: String,
        data: Data<'a>,
    }
    #[derive(Serialize)]
    struct Data<'a> {
        items: Vec<&'a Map<String, Value>>,
    }
    serde_json::to_vec(&Body {
        kind: event_type(delivery.kind),
        timestamp: format_time(delivery.created_ms, None),
        data: Data {
            items: delivery.items.iter().map(|i| &i.json).collect(),
        },
    })
}

impl Sink for WebhookSink {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn deliver<'a>(&'a mut self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let timestamp = outpost_ops::time::now_ms().div_euclid(1000);
            self.attempt(delivery, timestamp).await
        })
    }

    /// The wait after the `failures`-th failure in a row: `retry_schedule_secs[failures]`,
    /// the last step repeating. Step 0 is the first attempt itself, which the worker makes
    /// as soon as there is something to send ("immediately" in the specification), so the
    /// default schedule gives 5 s after the first failure, 5 min after the second, then
    /// 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h, and daily after that. A one-step schedule
    /// `[n]` waits `n` after every failure.
    fn retry_delay(&self, failures: u32) -> Duration {
        let last = self.schedule.len().saturating_sub(1);
        let step = usize::try_from(failures).map_or(last, |f| f.min(last));
        Duration::from_secs(self.schedule.get(step).copied().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests;
