//! One connection of a NATS output, used until it breaks and never reopened.
//!
//! Why never reopened: async-nats queues publishes in its client while the connection is
//! down and sends them once it has reconnected. Publishes written to the broken socket
//! are lost, the queued ones behind them are not, so after a reconnect the stream would
//! store later punches before the earlier ones that the worker resends, and a punch queued
//! for longer than the stream's duplicate window would be stored twice. So each client
//! connects exactly once: its auth callback refuses every later attempt, and with
//! `max_reconnects = 1` the client gives up at once, dropping what it had queued. The
//! sink opens a new client on its next delivery.
//!
//! The auth callback also signs the server's nonce when the output has a credentials
//! file (a user JWT and an nkey seed), since a callback replaces async-nats's own
//! credentials handling.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, context::GetStreamErrorKind, stream};
use async_nats::{Auth, AuthError, ConnectOptions, Event, ServerAddr};
use tokio::sync::watch;

use super::subject::covers;

/// How long one attempt to open the TCP (and TLS) connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the client pings the server.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);

/// A NATS credentials file: the user JWT, and the key that signs the server's nonce.
#[derive(Clone)]
pub struct Creds {
    jwt: String,
    key: Arc<nkeys::KeyPair>,
}

impl std::fmt::Debug for Creds {
    // By hand: the seed stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Creds")
            .field("user", &self.key.public_key())
            .finish_non_exhaustive()
    }
}

impl Creds {
    /// Parses the text of a `.creds` file (`nsc generate creds`): the first block between
    /// `-----BEGIN ...-----` and `------END ...------` lines is the JWT, the second the seed.
    pub fn parse(text: &str) -> Result<Creds, String> {
        let mut blocks = Vec::new();
        let mut lines = text.lines().map(str::trim);
        while let Some(line) = lines.next() {
            if line.starts_with("---") && line.contains("BEGIN") {
                match lines.next() {
                    Some(body) if !body.is_empty() && !body.starts_with("---") => {
                        blocks.push(body.to_string())
                    }
                    _ => return Err(format!("an empty block after \"{line}\"")),
                }
            }
        }
        let [jwt, seed] = <[String; 2]>::try_from(blocks).map_err(|b| {
            format!(
                "{} BEGIN blocks where a user JWT and an nkey seed (two) are expected",
                b.len()
            )
        })?;
        let key = nkeys::KeyPair::from_seed(&seed)
            .map_err(|e| format!("the second block is not an nkey seed: {e}"))?;
        Ok(Creds {
            jwt,
            key: Arc::new(key),
        })
    }
}

/// An open connection and what it knows.
pub struct Conn {
    /// The client (one connection).
    pub client: async_nats::Client,
    /// JetStream on it; replaced after a failed delivery (see `NatsSink::deliver`).
    pub js: jetstream::Context,
    /// Bumped by the client's event callback when the connection breaks.
    pub lost: watch::Receiver<u64>,
    /// The stream was found or created on this connection.
    pub stream_ready: bool,
}

impl Conn {
    /// Connects once (see the module docs). `Err` is a reason for a retry.
    pub async fn open(
        output: &str,
        server: &ServerAddr,
        creds: Option<&Creds>,
        context: impl FnOnce(async_nats::Client) -> jetstream::Context,
    ) -> Result<Conn, String> {
        let used = Arc::new(AtomicBool::new(false));
        let creds = creds.cloned();
        let opts = ConnectOptions::with_auth_callback(move |nonce: Vec<u8>| {
            let first = !used.swap(true, Ordering::SeqCst);
            let creds = creds.clone();
            async move {
                if !first {
                    return Err(AuthError::new(
                        "not reconnecting this client: the output opens a new one, so \
                         nothing queued on the old one is sent late",
                    ));
                }
                let mut auth = Auth::new();
                if let Some(c) = creds {
                    auth.jwt = Some(c.jwt.clone());
                    auth.signature = Some(c.key.sign(&nonce).map_err(AuthError::new)?);
                }
                Ok(auth)
            }
        });
        let (lost_tx, lost) = watch::channel(0u64);
        let lost_tx = Arc::new(lost_tx);
        let name = output.to_string();
        let client = opts
            .name(format!("outpost-relay output {output}"))
            .connection_timeout(CONNECT_TIMEOUT)
            // A silently dead peer is noticed after two unanswered pings (~20-30 s), not
            // the default two minutes.
            .ping_interval(PING_INTERVAL)
            .max_reconnects(Some(1))
            .reconnect_delay_callback(|_| Duration::ZERO)
            .event_callback(move |event| {
                let (lost_tx, name) = (lost_tx.clone(), name.clone());
                async move { on_event(&name, &lost_tx, event) }
            })
            .connect(server.clone())
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let js = context(client.clone());
        Ok(Conn {
            client,
            js,
            lost,
            stream_ready: false,
        })
    }

    /// Whether the connection still works (a broken one is never reopened).
    pub fn usable(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Creates `name` (capturing `subjects`, dropping resends within `duplicate_window`) if
    /// it is missing; leaves an existing stream as it is and logs when its subjects do not
    /// capture all of `subjects`.
    pub async fn ensure_stream(
        &self,
        output: &str,
        name: &str,
        subjects: &[String],
        duplicate_window: Duration,
    ) -> Result<(), String> {
        let subject = subjects.join(", ");
        match self.js.get_stream(name).await {
            Ok(existing) => {
                let theirs = &existing.cached_info().config.subjects;
                if !subjects.iter().all(|s| theirs.iter().any(|f| covers(f, s))) {
                    tracing::warn!(
                        output = %output,
                        stream = %name,
                        stream_subjects = ?theirs,
                        subject = %subject,
                        "the JetStream stream exists but its subjects do not capture this \
                         output's; publishes fail unless another stream captures them (add \
                         the subject to the stream, or set another outputs.nats.stream)"
                    );
                }
                Ok(())
            }
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(ref je)
                    if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                let config = stream::Config {
                    name: name.to_string(),
                    subjects: subjects.to_vec(),
                    duplicate_window,
                    ..Default::default()
                };
                self.js
                    .create_stream(config)
                    .await
                    .map_err(|e| format!("cannot create stream {name} for {subject}: {e}"))?;
                tracing::info!(
                    output = %output,
                    stream = %name,
                    subject = %subject,
                    duplicate_window_secs = duplicate_window.as_secs(),
                    "created the JetStream stream"
                );
                Ok(())
            }
            Err(e) => Err(format!("cannot look up stream {name}: {e}")),
        }
    }
}

/// The client's connection events: logs them and wakes a delivery when the connection
/// breaks.
fn on_event(output: &str, lost: &watch::Sender<u64>, event: Event) {
    match event {
        Event::Disconnected => {
            lost.send_modify(|n| *n += 1);
            tracing::warn!(output = %output, "lost the NATS connection; the next delivery opens a new one");
        }
        Event::Connected => tracing::info!(output = %output, "connected to NATS"),
        Event::ServerError(e) => tracing::warn!(output = %output, error = %e, "NATS server"),
        // The refused reconnect attempts (module docs) land here; they are expected.
        other => tracing::debug!(output = %output, event = %other, "NATS client"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_creds_file() {
        let user = nkeys::KeyPair::new_user();
        let seed = user.seed().unwrap();
        let text = format!(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.sig\n\
             ------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        );
        let c = Creds::parse(&text).unwrap();
        assert_eq!(
            c.jwt,
            "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.sig"
        );
        let sig = c.key.sign(b"nonce").unwrap();
        assert!(user.verify(b"nonce", &sig).is_ok());

        assert!(Creds::parse("").is_err());
        assert!(Creds::parse("-----BEGIN NATS USER JWT-----\nabc\n------END------\n").is_err());
        let bad_seed = text.replace(&seed, "SUNOTASEED");
        assert!(Creds::parse(&bad_seed).unwrap_err().contains("seed"));
    }
}
