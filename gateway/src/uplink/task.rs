//! The uplink task: [`spawn`] checks the configuration and starts it; the task connects to
//! one relay after another, backs off after failures ([`backoff`](super::backoff)), and runs
//! one connection at a time ([`super::connection`]). Beside it run the refresher (uplink
//! gauges in `/metrics`, every second) and the trimmer (deletes acknowledged records on the
//! blocking pool, so sending never waits for sled).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use outpost_protocol::Id;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::anchors::Anchors;
use super::batcher::BatchHeader;
use super::config::UplinkConfig;
use super::link::{Endpoint, LinkError};
use super::session::Session;
use super::status::{Health, UplinkHandle};
use crate::clock::{Clock, RelayTime};
use crate::journal::Journal;
use crate::metrics::{Metrics, UplinkErrorLabels};
use outpost_ops::backoff::Backoff;

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
        session: Session::new(&cfg, header, stats.first_unacked, stats.trimmed_through),
        cfg,
        endpoints,
        anchors,
        handle: handle.clone(),
        trim_tx,
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

/// Returns once the journal's durable watermark is no longer `seen` (new records were
/// fsynced), so an idle connection wakes for new records and otherwise sleeps.
///
/// Awaits the journal's published watermark ([`Journal::watch_durable`]); it never
/// polls and never takes the journal writer's lock.
pub(super) async fn durable_advanced(journal: &Journal, seen: u64) {
    let mut durable = journal.watch_durable();
    if durable.wait_for(|d| *d != seen).await.is_err() {
        // The journal (and its sender) is gone: nothing will ever become durable, and
        // returning would make the caller's loop spin.
        std::future::pending::<()>().await;
    }
}

/// The uplink task's state (one per gateway).
pub(super) struct Uplink {
    pub(super) cfg: UplinkConfig,
    pub(super) ctx: UplinkContext,
    pub(super) endpoints: Vec<Endpoint>,
    /// What to send, trim and when (no I/O); this task performs it.
    pub(super) session: Session,
    pub(super) anchors: Anchors,
    pub(super) handle: UplinkHandle,
    /// Tells the trimmer how far to trim.
    pub(super) trim_tx: watch::Sender<u64>,
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
        if let Some(limit) = matches!(e, LinkError::TooLarge(_))
            .then(|| self.session.halve_batch_limit())
            .flatten()
        {
            warn!(
                batch_max_records = limit,
                "the relay refused a batch as too large; sending smaller batches (lower uplink.batch_max_records or raise the relay's limits)"
            );
        }
        let (msg, limit) = (format!("{}: {e}", ep.url), self.session.batch_limit());
        self.handle.update(|s| {
            s.last_error = Some((Instant::now(), msg));
            s.batch_limit = limit;
        });
    }
}
