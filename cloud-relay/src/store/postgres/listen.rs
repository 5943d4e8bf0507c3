//! The wake-up behind [`Store::subscribe`](crate::store::Store::subscribe) for PostgreSQL:
//! one task per store that `LISTEN`s for the commits of every relay on the database.
//!
//! ## Protocol
//!
//! Each commit that stores punches sends `NOTIFY outpost_punches, '<highest pos>'` in its
//! transaction (`commit` module docs), so PostgreSQL delivers it to every listening
//! session only once the commit is visible. This task keeps one dedicated connection (not
//! from the pool: a pooled connection goes back to the pool and would stop listening) and:
//! 1. connects and runs `LISTEN outpost_punches`;
//! 2. raises the channel's value to each notification's position;
//! 3. every [`RECHECK`] (and first right after `LISTEN`, which covers commits made while it
//!    was disconnected) reads the head (`max(pos)`) on that connection and raises the
//!    value to it, so a missed notification only delays a reader by up to [`RECHECK`];
//! 4. when the connection fails or closes (database restart, network), logs it and
//!    reconnects after a backoff ([`outpost_ops::backoff::Backoff`]).
//!
//! It never panics on a dropped connection, and commits never wait for it: they send
//! their notification whether anyone listens or not. It stops when the store's
//! cancellation token is cancelled ([`Store::close`](crate::store::Store::close)).
//!
//! The value only rises (`raise_head`); it is a hint, readers always re-query the store.

use std::time::Duration;

use futures_util::StreamExt;
use outpost_ops::backoff::Backoff;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Socket};
use tokio_util::sync::CancellationToken;

use super::query::HEAD_SQL;
use super::schema::NOTIFY_CHANNEL;
use crate::store::raise_head;

/// The listener connection's `application_name` (as `pg_stat_activity` shows it).
pub const APPLICATION_NAME: &str = "outpost-relay listener";

/// How often the listener reads the head even without a notification.
pub(super) const RECHECK: Duration = Duration::from_secs(1);

/// How the listener's connection is made: the pool's settings and TLS.
#[derive(Clone)]
pub(super) struct Connect {
    /// The pool's connection settings (URL, TLS mode, connect timeout).
    pub(super) config: Config,
    /// The TLS connector, `None` without TLS.
    pub(super) tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// Runs the listener until `cancel` is cancelled, raising `head` (module docs).
pub(super) async fn run(connect: Connect, head: watch::Sender<u64>, cancel: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let ended = tokio::select! {
            _ = cancel.cancelled() => return,
            ended = session(&connect, &head, &mut backoff) => match ended {
                Err(ended) => ended,
                Ok(never) => match never {},
            },
        };
        let delay = backoff.next_delay();
        tracing::warn!(
            error = %ended,
            retry_in_ms = delay.as_millis() as u64,
            "PostgreSQL notification listener lost its connection; readers are woken by \
             polling until it reconnects"
        );
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Why a listening session ended.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("the connection closed")]
    Closed,
    #[error("the head query returned a negative position")]
    BadHead,
    #[error("the head query got no answer in {RECHECK_TIMEOUT:?}")]
    Timeout,
}

/// One connection: listens and re-checks until the connection fails.
async fn session(
    connect: &Connect,
    head: &watch::Sender<u64>,
    backoff: &mut Backoff,
) -> Result<std::convert::Infallible, Ended> {
    let (client, conn) = match &connect.tls {
        None => open(&connect.config, NoTls, head.clone()).await,
        Some(tls) => open(&connect.config, tls.clone(), head.clone()).await,
    }?;
    let mut conn = AbortOnDrop(conn);
    client
        .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
        .await?;
    backoff.reset();
    let mut tick = tokio::time::interval(RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => raise_head(head, read_head(&client).await?),
            ended = &mut conn.0 => {
                return Err(match ended {
                    Ok(Some(e)) => e.into(),
                    _ => Ended::Closed,
                });
            }
        }
    }
}

/// How long a head query may take before the connection is deemed dead (a silent network
/// failure leaves no error to wait for).
const RECHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads `max(pos)` on the listener's connection.
async fn read_head(client: &Client) -> Result<u64, Ended> {
    let row = tokio::time::timeout(RECHECK_TIMEOUT, client.query_one(HEAD_SQL, &[]))
        .await
        .map_err(|_| Ended::Timeout)??;
    let h: i64 = row.try_get(0)?;
    u64::try_from(h).map_err(|_| Ended::BadHead)
}

/// Connects and spawns the task that drives the connection and raises `head` to each
/// notification; the task ends with the connection (returning its error, if any).
async fn open<T>(
    config: &Config,
    tls: T,
    head: watch::Sender<u64>,
) -> Result<(Client, JoinHandle<Option<tokio_postgres::Error>>), Ended>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let (client, mut conn) = config.connect(tls).await?;
    let task = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => match n.payload().parse::<u64>() {
                    Ok(pos) => raise_head(&head, pos),
                    Err(_) => tracing::debug!(
                        payload = n.payload(),
                        "ignored a notification that is not a position"
                    ),
                },
                Ok(_) => {}
                Err(e) => return Some(e),
            }
        }
        None
    });
    Ok((client, task))
}

/// Aborts the connection task when the session ends (cancelled or failed).
struct AbortOnDrop(JoinHandle<Option<tokio_postgres::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
