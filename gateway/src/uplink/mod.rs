//! The uplink: forwards the journal to the relay, exactly once at the store.
//!
//! ```text
//! journal ──read durable records──► batcher ──frame──► link (WebSocket | HTTPS POST) ──► relay
//!    ▲                                                     │
//!    └──────────── trim_through(ack) ◄──── ack (in order) ─┘
//! ```
//!
//! # Delivery contract
//!
//! - A session starts at the journal's oldest unacknowledged record
//!   ([`Journal::first_unacked`]) and walks forward with a cursor, cutting batches by count,
//!   bytes and age ([`batcher`]). Up to `uplink.window` batches are in flight at once, so a
//!   link with a round trip of seconds stays busy.
//! - Acks come back in send order ([`link`]), so the n-th ack answers the n-th batch. The
//!   relay acks only after its store committed the whole batch, so an ack proves its batch
//!   is stored, and every earlier batch of the session was acked before it. The journal is
//!   trimmed through `max(ack.acked_through, last seq of the batch)` (capped at the highest
//!   seq ever sent). The batch end matters when the relay's contiguous watermark is held
//!   back by records that no longer exist here (evicted with `on_full = "drop_oldest"`).
//! - Anything else (a refused frame, a lost connection, a ping or ack timeout, a restart of
//!   either side) ends the session. Nothing is trimmed without an ack, so the next session
//!   resends every unacknowledged record, and the relay recognises what it already had:
//!   at-least-once on the wire, exactly-once in the store.
//! - Ingest never waits for the uplink: this task only reads the journal and trims it, on
//!   the blocking pool, and a dead relay just lets the backlog grow (bounded by
//!   `journal.max_bytes`).
//!
//! # Health
//!
//! [`Health`]: `offline` (no relay configured, or stopped), `connecting`, `online` (caught
//! up), `draining` (connected with more than one batch waiting) and `backing_off` (waiting
//! after a failure: exponential with jitter, [`backoff`]). The state, backlog, oldest
//! unsent age, last success, last error and bytes sent are in `/v1/status` and `/metrics`.
//! With several relays, a failed attempt moves to the next one; a relay that worked is
//! retried first.
//!
//! # Time
//!
//! Each ack yields a time anchor ([`anchors`]); batches carry the anchors of their records'
//! boots, and when the relay has not yet heard of a (much better) anchor and there is
//! nothing else to send, an anchor-only batch goes out, so records sent before the first
//! ack get corrected too.

pub mod anchors;
pub mod batcher;
pub mod config;
pub mod https;
pub mod link;
pub mod tls;
pub mod ws;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use outpost_ops::file::replace_atomic;
use outpost_protocol::json::format_time;
use outpost_protocol::{Ack, Id, Received, TimeAnchor};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{Transport, UplinkConfig};
pub use link::{Endpoint, Link, LinkError};

use crate::clock::{wall_error_ms, Clock, RelayTime};
use crate::journal::{Journal, JournalStats};
use crate::metrics::{Metrics, UplinkErrorLabels, UplinkStateLabels};
use anchors::Anchors;
use batcher::{BatchError, BatchHeader, Prepared};
use outpost_ops::backoff::Backoff;

/// How often an idle session looks for newly durable records.
pub const POLL: Duration = Duration::from_millis(20);

/// The environment variable that, when set, holds the relay token (wins over the file).
pub const TOKEN_ENV: &str = "OUTPOST_UPLINK_TOKEN";

/// The uplink's health state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not forwarding: no relay configured, or the task stopped.
    Offline,
    /// Opening a connection to a relay.
    Connecting,
    /// Connected and caught up.
    Online,
    /// Connected, with more than one batch's worth waiting.
    Draining,
    /// Waiting before the next attempt after a failure.
    BackingOff,
}

impl Health {
    /// Every state.
    pub const ALL: [Health; 5] = [
        Health::Offline,
        Health::Connecting,
        Health::Online,
        Health::Draining,
        Health::BackingOff,
    ];

    /// The name in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Offline => "offline",
            Health::Connecting => "connecting",
            Health::Online => "online",
            Health::Draining => "draining",
            Health::BackingOff => "backing_off",
        }
    }
}

/// What the task publishes for status and metrics.
#[derive(Debug)]
struct Shared {
    health: Health,
    detail: String,
    relay: Option<String>,
    inflight: usize,
    unsent: u64,
    batch_limit: usize,
    bytes_sent: u64,
    batches_sent: u64,
    records_acked: u64,
    records_resent: u64,
    relay_duplicates: u64,
    connects: u64,
    /// When (here) and the relay's clock at the last ack.
    last_success: Option<(Instant, i64)>,
    last_error: Option<(Instant, String)>,
    next_attempt: Option<Instant>,
    anchor: Option<TimeAnchor>,
}

/// A cheap, cloneable view of the uplink for `/v1/status` and `/metrics`.
#[derive(Clone)]
pub struct UplinkHandle {
    shared: Arc<Mutex<Shared>>,
    enabled: bool,
    relays: Vec<String>,
    transport: Transport,
    window: usize,
}

impl UplinkHandle {
    fn new(cfg: &UplinkConfig) -> UplinkHandle {
        let enabled = cfg.enabled();
        UplinkHandle {
            shared: Arc::new(Mutex::new(Shared {
                health: Health::Offline,
                detail: if enabled {
                    "starting".into()
                } else {
                    "no relay configured (uplink.relays is empty): punches stay in the journal"
                        .into()
                },
                relay: None,
                inflight: 0,
                unsent: 0,
                batch_limit: cfg.batch_max_records,
                bytes_sent: 0,
                batches_sent: 0,
                records_acked: 0,
                records_resent: 0,
                relay_duplicates: 0,
                connects: 0,
                last_success: None,
                last_error: None,
                next_attempt: None,
                anchor: None,
            })),
            enabled,
            relays: cfg.relays.clone(),
            transport: cfg.transport(),
            window: cfg.window,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a relay is configured.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The current health state.
    pub fn health(&self) -> Health {
        self.lock().health
    }

    /// The `"uplink"` object of `/v1/status`. `journal` and `now` come from the caller so
    /// the figures agree with the rest of the page.
    pub fn status_json(&self, journal: &JournalStats, now: &Received) -> Value {
        let s = self.lock();
        let age = |t: Instant| (t.elapsed().as_secs_f64() * 10.0).round() / 10.0;
        let oldest_unsent_age_s = journal
            .oldest_received_wall_ms
            .map(|w| ((now.wall_ms - w).max(0) as f64 / 1000.0).round());
        let offset = s.anchor.and_then(|a| {
            wall_error_ms(&a, now.mono_ms, now.wall_ms).map(|off| (off, a.uncertainty_ms))
        });
        json!({
            "enabled": self.enabled,
            "state": s.health.as_str(),
            "detail": s.detail,
            "transport": self.transport.as_str(),
            "relays": self.relays,
            "relay": s.relay,
            "window": self.window,
            "inflight_batches": s.inflight,
            "batch_max_records": s.batch_limit,
            "backlog_records": journal.records,
            "unsent_records": s.unsent,
            "oldest_unsent_age_s": oldest_unsent_age_s,
            "acked_through": journal.trimmed_through,
            "last_success": s.last_success.map(|(_, t)| format_time(t, None)),
            "last_success_age_s": s.last_success.map(|(i, _)| age(i)),
            "last_error": s.last_error.as_ref().map(|(_, e)| e.clone()),
            "last_error_age_s": s.last_error.as_ref().map(|(i, _)| age(*i)),
            "next_attempt_in_s": s.next_attempt.map(|t| (t.saturating_duration_since(Instant::now()).as_secs_f64() * 10.0).round() / 10.0),
            "bytes_sent": s.bytes_sent,
            "batches_sent": s.batches_sent,
            "records_acked": s.records_acked,
            "records_resent": s.records_resent,
            "relay_duplicates": s.relay_duplicates,
            "connects": s.connects,
            "time": {
                "clock_synced": now.clock_synced,
                "anchored": offset.is_some(),
                "offset_ms": offset.map(|o| o.0),
                "uncertainty_ms": offset.map(|o| o.1),
                "corrected_now": offset.map(|o| format_time(now.wall_ms.saturating_add(o.0), None)),
            },
        })
    }

    fn update(&self, f: impl FnOnce(&mut Shared)) {
        f(&mut self.lock())
    }

    /// Refreshes the uplink gauges in `metrics`.
    fn refresh_metrics(&self, metrics: &Metrics, journal: &Journal, clock: &Clock) {
        let stats = journal.stats();
        let now = clock.now();
        let s = self.lock();
        for h in Health::ALL {
            metrics
                .uplink_state
                .get_or_create(&UplinkStateLabels { state: h.as_str() })
                .set(i64::from(h == s.health));
        }
        metrics.uplink_backlog_records.set(stats.records as i64);
        metrics.uplink_oldest_unsent_seconds.set(
            stats
                .oldest_received_wall_ms
                .map_or(0, |w| (now.wall_ms - w).max(0) / 1000),
        );
        metrics.uplink_inflight_batches.set(s.inflight as i64);
        if let Some((_, t)) = s.last_success {
            metrics.uplink_last_success_timestamp_seconds.set(t / 1000);
        }
        if let Some(off) = s
            .anchor
            .and_then(|a| wall_error_ms(&a, now.mono_ms, now.wall_ms))
        {
            metrics.uplink_clock_offset_ms.set(off);
        }
    }
}

/// What the uplink needs from the rest of the gateway.
#[derive(Clone)]
pub struct UplinkContext {
    /// The journal to forward and trim.
    pub journal: Journal,
    /// For time anchors.
    pub clock: Clock,
    /// Where the uplink publishes the relay's time (this boot's anchor) for others.
    pub relay_time: RelayTime,
    /// Where the uplink counts.
    pub metrics: Metrics,
    /// `gateway.id`.
    pub gateway_id: String,
    /// `gateway.site`.
    pub site: String,
    /// `gateway.data_dir` (token file default, anchors file).
    pub data_dir: PathBuf,
}

/// Why the uplink could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The gateway or site id is not a valid id.
    #[error("gateway.id / gateway.site: {0}")]
    Id(String),
    /// A relay URL does not parse.
    #[error("uplink.relays: {0}")]
    Relay(String),
}

/// Starts the uplink. With no relay configured there is no task, and the handle says
/// `offline`. The task ends when `shutdown` is cancelled.
pub fn spawn(
    cfg: UplinkConfig,
    ctx: UplinkContext,
    shutdown: CancellationToken,
) -> Result<(UplinkHandle, Option<JoinHandle<()>>), StartError> {
    let handle = UplinkHandle::new(&cfg);
    if !cfg.enabled() {
        info!("uplink off: no relay configured (uplink.relays); punches stay in the journal");
        return Ok((handle, None));
    }
    let header = BatchHeader {
        gateway_id: Id::new(&ctx.gateway_id).map_err(|e| StartError::Id(e.to_string()))?,
        site_id: Id::new(&ctx.site).map_err(|e| StartError::Id(e.to_string()))?,
        journal_epoch: ctx.journal.epoch(),
    };
    let endpoints = cfg
        .relays
        .iter()
        .map(|u| {
            Endpoint::parse(u, cfg.transport()).map_err(|e| StartError::Relay(format!("{u}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let plain: Vec<&str> = endpoints
        .iter()
        .filter(|e| !e.tls)
        .map(|e| e.url.as_str())
        .collect();
    if cfg.has_client_cert() && !plain.is_empty() {
        // Not an error: a token still works there, and the TLS relays get the certificate.
        warn!(
            relays = ?plain,
            "uplink.client_cert_file is set, but these relay URLs do not use TLS (ws:// or http://): the client certificate cannot be presented to them, only the relay token; use wss:// or https://"
        );
    }
    let anchors = Anchors::load(&ctx.data_dir, ctx.clock.boot_id());
    // An anchor of this boot saved before a restart still tells the time.
    ctx.relay_time.set(anchors.current());
    let stats = ctx.journal.stats();
    let (trim_tx, trim_rx) = watch::channel(stats.trimmed_through);
    let uplink = Uplink {
        batch_limit: cfg.batch_max_records,
        cfg,
        endpoints,
        header,
        anchors,
        handle: handle.clone(),
        max_sent: stats.first_unacked.saturating_sub(1),
        trimmed: stats.trimmed_through,
        trim_tx,
        warned_gap: false,
        ctx,
    };
    let refresher = {
        let (h, ctx, stop) = (handle.clone(), uplink.ctx.clone(), shutdown.clone());
        async move {
            loop {
                h.refresh_metrics(&ctx.metrics, &ctx.journal, &ctx.clock);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let trimmer = trimmer(uplink.ctx.clone(), trim_rx);
    let task = tokio::spawn(async move {
        let refresher = tokio::spawn(refresher);
        let trimmer = tokio::spawn(trimmer);
        // `run` owns the trim sender: when it returns, the trimmer does its last trim and ends.
        uplink.run(shutdown).await;
        let _ = trimmer.await;
        let _ = refresher.await;
    });
    Ok((handle, Some(task)))
}

/// Trims the journal through the latest watermark it is given, coalescing acks that come
/// faster than sled deletes. Ends (after a last trim) when the sender is dropped.
async fn trimmer(ctx: UplinkContext, mut rx: watch::Receiver<u64>) {
    let mut done = *rx.borrow_and_update();
    loop {
        let closed = rx.changed().await.is_err();
        let target = *rx.borrow_and_update();
        if target > done {
            let j = ctx.journal.clone();
            match tokio::task::spawn_blocking(move || j.trim_through(target)).await {
                Ok(Ok(t)) => done = t,
                Ok(Err(e)) => {
                    warn!(error = %e, "trimming the journal failed; the records will be resent and recognised by the relay");
                    ctx.metrics
                        .uplink_errors
                        .get_or_create(&UplinkErrorLabels { kind: "trim" })
                        .inc();
                }
                Err(e) => warn!(error = %e, "trim task failed"),
            }
        }
        if closed {
            return;
        }
    }
}

/// The relay token: `env` (the value of `OUTPOST_UPLINK_TOKEN`) when set and not blank,
/// else the contents of `path`. With `client_cert` (a client certificate is configured), a
/// missing or empty token file is `Ok(None)`: the relay then knows the gateway by its
/// certificate. Any other read error stays an error, since a token was meant to be there.
/// The error is why there is no token.
fn read_token(
    env: Option<String>,
    path: &Path,
    client_cert: bool,
) -> Result<Option<String>, String> {
    if let Some(t) = env {
        if !t.trim().is_empty() {
            return Ok(Some(t.trim().to_string()));
        }
    }
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && client_cert => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    match text.trim() {
        "" if client_cert => Ok(None),
        "" => Err("the file is empty".into()),
        t => Ok(Some(t.to_string())),
    }
}

/// A batch sent and not yet acknowledged.
#[derive(Debug)]
struct InFlight {
    first: u64,
    last: u64,
    records: u64,
    anchors: Vec<TimeAnchor>,
    sent_at: Instant,
    sent_mono: u64,
}

/// How a session ended: whether any ack arrived, and the error (none = shutdown).
type SessionEnd = (bool, Option<LinkError>);

enum Event {
    Shutdown,
    Ack(Result<Ack, LinkError>),
    Prepared(Result<Result<Option<Prepared>, BatchError>, tokio::task::JoinError>),
    Send,
    Tick,
    Poll,
}

/// The uplink task's state (one per gateway).
struct Uplink {
    cfg: UplinkConfig,
    ctx: UplinkContext,
    endpoints: Vec<Endpoint>,
    header: BatchHeader,
    anchors: Anchors,
    handle: UplinkHandle,
    /// Highest seq ever sent (to count resends and cap trims).
    max_sent: u64,
    /// Highest seq known stored at the relay (the trimmer catches up to it).
    trimmed: u64,
    /// Tells the trimmer how far to trim.
    trim_tx: watch::Sender<u64>,
    /// Current records-per-batch limit (halved when the relay says too large).
    batch_limit: usize,
    warned_gap: bool,
}

async fn join_opt<T>(h: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

impl Uplink {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max);
        let mut idx = 0usize;
        info!(
            relays = ?self.cfg.relays,
            transport = self.cfg.transport().as_str(),
            window = self.cfg.window,
            "uplink starting"
        );
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let ep = self.endpoints[idx % self.endpoints.len()].clone();
            self.handle.update(|s| {
                s.health = Health::Connecting;
                s.relay = Some(ep.url.clone());
                s.next_attempt = None;
                s.detail = format!("connecting to {}", ep.full_url());
            });
            let end = match self.connect_and_run(&ep, &shutdown).await {
                Some(end) => end,
                None => break,
            };
            if shutdown.is_cancelled() {
                break;
            }
            let (progressed, err) = end;
            if let Some(e) = &err {
                self.record_error(&ep, e);
            }
            if progressed {
                backoff.reset();
            } else {
                idx = (idx + 1) % self.endpoints.len();
            }
            let delay = backoff.next_delay();
            self.handle.update(|s| {
                s.health = Health::BackingOff;
                s.inflight = 0;
                s.next_attempt = Some(Instant::now() + delay);
                s.detail = format!(
                    "waiting {:.1} s before the next attempt",
                    delay.as_secs_f64()
                );
            });
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.handle.update(|s| {
            s.health = Health::Offline;
            s.inflight = 0;
            s.next_attempt = None;
            s.detail = "stopped (shutting down)".into();
        });
        info!("uplink stopped");
    }

    fn record_error(&mut self, ep: &Endpoint, e: &LinkError) {
        warn!(relay = %ep.url, kind = e.kind(), error = %e, "uplink failed; backing off and resending what is not acknowledged");
        self.ctx
            .metrics
            .uplink_errors
            .get_or_create(&UplinkErrorLabels { kind: e.kind() })
            .inc();
        if matches!(e, LinkError::TooLarge(_)) && self.batch_limit > 1 {
            self.batch_limit = (self.batch_limit / 2).max(1);
            warn!(
                batch_max_records = self.batch_limit,
                "the relay refused a batch as too large; sending smaller batches (lower uplink.batch_max_records or raise the relay's limits)"
            );
        }
        let (msg, limit) = (format!("{}: {e}", ep.url), self.batch_limit);
        self.handle.update(|s| {
            s.last_error = Some((Instant::now(), msg));
            s.batch_limit = limit;
        });
    }

    /// The relay token (see [`read_token`]), or an error saying how to provide one.
    fn token(&self) -> Result<Option<String>, LinkError> {
        let path = self.cfg.token_file(&self.ctx.data_dir);
        read_token(
            std::env::var(TOKEN_ENV).ok(),
            &path,
            self.cfg.has_client_cert(),
        )
        .map_err(|why| {
            LinkError::Local(format!(
                "no relay token ({why}): put the token printed by `outpost-relay gateway add {} --site {}` in {} (uplink.token_file), or set {TOKEN_ENV}, or authenticate with a TLS client certificate instead (uplink.client_cert_file and uplink.client_key_file)",
                self.header.gateway_id, self.header.site_id, path.display()
            ))
        })
    }

    /// Connects to `ep` and runs a session. `None` when shutdown came first.
    async fn connect_and_run(
        &mut self,
        ep: &Endpoint,
        shutdown: &CancellationToken,
    ) -> Option<SessionEnd> {
        let token = match self.token() {
            Ok(t) => t,
            Err(e) => return Some((false, Some(e))),
        };
        if token.is_none() && !ep.tls {
            // Without TLS the certificate cannot be presented: the relay would only answer
            // 401, so say why here.
            return Some((
                false,
                Some(LinkError::Local(format!(
                    "no relay token, and the client certificate (uplink.client_cert_file) cannot be presented to {}, which does not use TLS: use a wss:// or https:// relay URL, or provide a token (uplink.token_file or {TOKEN_ENV})",
                    ep.url
                ))),
            ));
        }
        let tls = if ep.tls {
            match tls::client_config(&self.cfg) {
                Ok(c) => Some(c),
                Err(e) => return Some((false, Some(LinkError::Tls(e)))),
            }
        } else {
            None
        };
        let limit = self.cfg.connect_timeout;
        let timed_out = || {
            LinkError::Timeout(format!(
                "connecting took longer than uplink.connect_timeout ({limit:?})"
            ))
        };
        match ep.transport {
            Transport::Websocket => {
                let connect =
                    tokio::time::timeout(limit, ws::WsLink::connect(ep, tls, token.as_deref()));
                let r = tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    r = connect => r.unwrap_or_else(|_| Err(timed_out())),
                };
                Some(self.drive(r, ep, shutdown).await)
            }
            Transport::Https => {
                let connect = tokio::time::timeout(
                    limit,
                    https::HttpsLink::connect(ep, tls, token.as_deref(), self.cfg.ack_timeout),
                );
                let r = tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    r = connect => r.unwrap_or_else(|_| Err(timed_out())),
                };
                Some(self.drive(r, ep, shutdown).await)
            }
        }
    }

    async fn drive<L: Link>(
        &mut self,
        link: Result<L, LinkError>,
        ep: &Endpoint,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let mut link = match link {
            Ok(l) => l,
            Err(e) => return (false, Some(e)),
        };
        info!(relay = %ep.full_url(), "uplink connected");
        self.ctx.metrics.uplink_connects.inc();
        self.handle.update(|s| {
            s.connects += 1;
            s.health = Health::Online;
            s.detail = format!("connected to {}", ep.full_url());
        });
        let end = self.session(&mut link, shutdown).await;
        link.close().await;
        end
    }

    fn publish(&self, cursor: u64, durable: u64, inflight: usize) {
        let unsent = (durable + 1).saturating_sub(cursor);
        let behind = unsent + inflight as u64 * self.batch_limit as u64;
        self.handle.update(|s| {
            s.unsent = unsent;
            s.inflight = inflight;
            let h = if unsent > self.batch_limit as u64
                || (inflight > 1 && behind > self.batch_limit as u64)
            {
                Health::Draining
            } else {
                Health::Online
            };
            s.health = h;
        });
    }

    /// One connection's life: send batches with a window, take acks, trim.
    async fn session<L: Link>(&mut self, link: &mut L, shutdown: &CancellationToken) -> SessionEnd {
        let journal = self.ctx.journal.clone();
        let mut progressed = false;
        let cursor = journal.first_unacked();
        // Records acked but not yet trimmed (the trimmer runs behind) are not resent.
        let mut cursor = cursor.max(self.trimmed + 1);
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
        // Hello: a batch with no records (anchors only) goes first, so the relay's ack
        // tells this epoch's watermark before any record is sent. If the relay already
        // holds numbers this journal has not assigned (a restored backup), `on_ack` moves
        // the journal to a new epoch before new punches can be sent under reused numbers.
        let mut prepared: Option<Prepared> =
            match batcher::anchors_only(&self.header, cursor, self.anchors.untold()) {
                Ok(p) => Some(p),
                Err(e) => {
                    warn!(error = %e, "cannot encode the hello batch");
                    None
                }
            };
        let mut preparing: Option<JoinHandle<Result<Option<Prepared>, BatchError>>> = None;
        let mut waiting_since: Option<Instant> = None;
        let mut allowed_at = tokio::time::Instant::now();
        let mut ping_sent: Option<Instant> = None;
        let tick = (self.cfg.ping_interval.min(self.cfg.ping_timeout) / 4)
            .clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let durable = journal.durable_through();
            if prepared.is_none() && preparing.is_none() {
                if durable >= cursor {
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    if batcher::ready(
                        durable - cursor + 1,
                        since.elapsed(),
                        self.batch_limit,
                        self.cfg.batch_max_age,
                    ) {
                        waiting_since = None;
                        let (j, header, from) = (journal.clone(), self.header.clone(), cursor);
                        let (max_r, max_b) = (self.batch_limit, self.cfg.batch_max_bytes);
                        let (all, current) = (self.anchors.all(), self.ctx.clock.boot_id());
                        preparing = Some(tokio::task::spawn_blocking(move || {
                            batcher::prepare(&j, &header, from, max_r, max_b, |boots| {
                                anchors::select(&all, current, boots)
                            })
                        }));
                    }
                } else if inflight.is_empty() {
                    let untold = self.anchors.untold();
                    if !untold.is_empty() {
                        match batcher::anchors_only(&self.header, cursor, untold) {
                            Ok(p) => prepared = Some(p),
                            Err(e) => warn!(error = %e, "cannot encode an anchor-only batch"),
                        }
                    }
                }
            }
            self.publish(cursor, durable, inflight.len());

            let can_send = prepared.is_some() && inflight.len() < self.cfg.window;
            let ev = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Event::Shutdown,
                r = link.recv() => Event::Ack(r),
                r = join_opt(&mut preparing) => Event::Prepared(r),
                _ = ticker.tick() => Event::Tick,
                _ = tokio::time::sleep_until(allowed_at), if can_send => Event::Send,
                _ = tokio::time::sleep(POLL) => Event::Poll,
            };
            match ev {
                Event::Shutdown => return (progressed, None),
                Event::Ack(Err(e)) => return (progressed, Some(e)),
                Event::Ack(Ok(ack)) => match self.on_ack(ack, &mut inflight).await {
                    Ok(()) => progressed = true,
                    Err(e) => return (progressed, Some(e)),
                },
                Event::Prepared(r) => {
                    preparing = None;
                    match r {
                        Ok(Ok(Some(p))) => {
                            cursor = p.last + 1;
                            prepared = Some(p);
                        }
                        Ok(Ok(None)) => cursor = cursor.max(journal.first_unacked()),
                        Ok(Err(e)) => return (progressed, Some(LinkError::Local(e.to_string()))),
                        Err(e) => {
                            return (
                                progressed,
                                Some(LinkError::Local(format!("batch task failed: {e}"))),
                            )
                        }
                    }
                }
                Event::Send => {
                    let Some(p) = prepared.take() else { continue };
                    let n = p.frame.len();
                    let sent_at = Instant::now();
                    let sent_mono = self.ctx.clock.mono_ms();
                    match tokio::time::timeout(self.cfg.ack_timeout, link.send(p.frame.clone()))
                        .await
                    {
                        Err(_) => {
                            return (
                                progressed,
                                Some(LinkError::Timeout(format!(
                                    "sending a batch took longer than uplink.ack_timeout ({:?})",
                                    self.cfg.ack_timeout
                                ))),
                            )
                        }
                        Ok(Err(e)) => return (progressed, Some(e)),
                        Ok(Ok(())) => {}
                    }
                    if self.cfg.bandwidth_bytes_per_sec > 0 {
                        let cost = Duration::from_secs_f64(
                            n as f64 / self.cfg.bandwidth_bytes_per_sec as f64,
                        );
                        allowed_at = allowed_at.max(tokio::time::Instant::now()) + cost;
                    }
                    let resent = if p.records > 0 && p.first <= self.max_sent {
                        p.last.min(self.max_sent) - p.first + 1
                    } else {
                        0
                    };
                    if p.records > 0 {
                        self.max_sent = self.max_sent.max(p.last);
                    }
                    let m = &self.ctx.metrics;
                    m.uplink_bytes_sent.inc_by(n as u64);
                    m.uplink_batches_sent.inc();
                    m.uplink_records_resent.inc_by(resent);
                    self.handle.update(|s| {
                        s.bytes_sent += n as u64;
                        s.batches_sent += 1;
                        s.records_resent += resent;
                    });
                    inflight.push_back(InFlight {
                        first: p.first,
                        last: p.last,
                        records: p.records,
                        anchors: p.anchors,
                        sent_at,
                        sent_mono,
                    });
                }
                Event::Tick => {
                    if let Some(f) = inflight.front() {
                        if f.sent_at.elapsed() > self.cfg.ack_timeout {
                            return (
                                progressed,
                                Some(LinkError::Timeout(format!(
                                    "no ack for a batch within uplink.ack_timeout ({:?})",
                                    self.cfg.ack_timeout
                                ))),
                            );
                        }
                    }
                    if link.pings() {
                        if let Some(t) = ping_sent {
                            if link.last_heard() >= t {
                                ping_sent = None;
                            } else if t.elapsed() >= self.cfg.ping_timeout {
                                return (
                                    progressed,
                                    Some(LinkError::Timeout(format!(
                                        "no answer to a ping within uplink.ping_timeout ({:?}): the link is dead",
                                        self.cfg.ping_timeout
                                    ))),
                                );
                            }
                        }
                        if ping_sent.is_none()
                            && link.last_heard().elapsed() >= self.cfg.ping_interval
                        {
                            let t = Instant::now();
                            if let Err(e) = link.ping().await {
                                return (progressed, Some(e));
                            }
                            ping_sent = Some(t);
                        }
                    }
                }
                Event::Poll => {}
            }
        }
    }

    async fn on_ack(
        &mut self,
        ack: Ack,
        inflight: &mut VecDeque<InFlight>,
    ) -> Result<(), LinkError> {
        let Some(b) = inflight.pop_front() else {
            return Err(LinkError::Protocol(
                "the relay sent an ack with no batch in flight".into(),
            ));
        };
        if ack.gateway_id != self.header.gateway_id
            || ack.journal_epoch != self.header.journal_epoch
        {
            return Err(LinkError::Protocol(format!(
                "the ack names gateway {} journal epoch {:016x}, but this is gateway {} epoch {:016x}",
                ack.gateway_id, ack.journal_epoch, self.header.gateway_id, self.header.journal_epoch
            )));
        }
        let rtt = b.sent_at.elapsed();
        self.ctx
            .metrics
            .uplink_ack_seconds
            .observe(rtt.as_secs_f64());

        // Time: the relay read its clock somewhere between send and ack.
        let now_mono = self.ctx.clock.mono_ms().max(b.sent_mono);
        let span = now_mono - b.sent_mono;
        let anchor = TimeAnchor {
            boot_id: self.ctx.clock.boot_id(),
            mono_ms: b.sent_mono + span / 2,
            true_ms: ack.server_time_ms,
            uncertainty_ms: u32::try_from(span.div_ceil(2) + 1).unwrap_or(u32::MAX),
        };
        if self.anchors.observe(anchor) {
            let (path, bytes) = self.anchors.snapshot();
            let written =
                tokio::task::spawn_blocking(move || replace_atomic(&path, &bytes, 0o644)).await;
            match written {
                Ok(Ok(())) => self.anchors.saved(),
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot save the time anchors file (gateway.data_dir)")
                }
                Err(e) => warn!(error = %e, "anchor save task failed"),
            }
        }
        self.anchors.mark_told(&b.anchors);

        // The relay holds sequence numbers of this epoch that this journal never assigned:
        // the journal went back in time (a restored backup). Sending on would put new
        // records under numbers the relay already has, so move to a fresh epoch first; the
        // next session resends everything held under it, and the relay's punch-key dedup
        // recognises what it already stores.
        let last_assigned = self.ctx.journal.next_seq().saturating_sub(1);
        if ack.acked_through > last_assigned {
            let j = self.ctx.journal.clone();
            let moved = tokio::task::spawn_blocking(move || j.begin_new_epoch()).await;
            let epoch = match moved {
                Ok(Ok(e)) => e,
                Ok(Err(e)) => {
                    return Err(LinkError::Local(format!(
                        "cannot move the journal to a new epoch: {e}"
                    )))
                }
                Err(e) => return Err(LinkError::Local(format!("epoch task failed: {e}"))),
            };
            warn!(
                relay_acked_through = ack.acked_through,
                journal_last_seq = last_assigned,
                old_epoch = format_args!("{:016x}", self.header.journal_epoch),
                new_epoch = format_args!("{:016x}", epoch),
                "the relay already holds records this journal has not written yet (a restored backup or a lost journal tail): moved the journal to a new epoch and resending what it holds"
            );
            self.header.journal_epoch = epoch;
            return Err(LinkError::Local(
                "the journal moved to a new epoch; reconnecting to resend under it".into(),
            ));
        }

        // Trim: the ack proves this batch (and, in order, every earlier one) is stored.
        let mut through = ack.acked_through;
        if b.records > 0 {
            if ack.acked_through.saturating_add(1) < b.first && !self.warned_gap {
                self.warned_gap = true;
                warn!(
                    acked_through = ack.acked_through,
                    batch_first = b.first,
                    "the relay's watermark is behind this batch (records before it were evicted here, journal.on_full = \"drop_oldest\"); trimming by batch"
                );
            }
            through = through.max(b.last);
        }
        through = through.min(self.max_sent);
        if through > self.trimmed {
            // The trimmer deletes in the background, so sending never waits for sled.
            self.trimmed = through;
            let _ = self.trim_tx.send(through);
        }
        self.ctx.metrics.uplink_records_acked.inc_by(b.records);
        let current = self.anchors.current();
        let dups = u64::from(ack.duplicates.unwrap_or(0));
        self.handle.update(|s| {
            s.records_acked += b.records;
            s.relay_duplicates += dups;
            s.last_success = Some((Instant::now(), ack.server_time_ms));
            s.anchor = current;
            s.inflight = inflight.len();
        });
        self.ctx.relay_time.set(current);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_optional_only_with_a_client_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.token");
        let env = |v: &str| Some(v.to_string());

        // No token anywhere: an error without a certificate, no header with one.
        assert!(read_token(None, &path, false).is_err());
        assert_eq!(read_token(None, &path, true), Ok(None));
        assert_eq!(read_token(env("  "), &path, true), Ok(None));

        // An empty file counts as no token.
        std::fs::write(&path, "\n").unwrap();
        assert_eq!(
            read_token(None, &path, false),
            Err("the file is empty".into())
        );
        assert_eq!(read_token(None, &path, true), Ok(None));

        // A token, when there is one, is always sent; the variable wins over the file.
        std::fs::write(&path, "ogw_file\n").unwrap();
        assert_eq!(read_token(None, &path, true), Ok(Some("ogw_file".into())));
        assert_eq!(read_token(None, &path, false), Ok(Some("ogw_file".into())));
        assert_eq!(
            read_token(env(" ogw_env "), &path, true),
            Ok(Some("ogw_env".into()))
        );

        // A token file that exists but cannot be read is an error even with a certificate.
        let not_a_file = dir.path().to_path_buf();
        assert!(read_token(None, &not_a_file, true).is_err());
    }
}
