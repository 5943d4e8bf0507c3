//! One connection to a relay: open it (token, TLS, transport), then perform what the
//! [`Session`](super::session::Session) decides: read batches from the journal on the
//! blocking pool, send them, take acks, save time anchors, trim, ping. Every decision is
//! the session's; this file only does the I/O and the bookkeeping for status and metrics.

use std::time::{Duration, Instant};

use outpost_ops::file::replace_atomic;
use outpost_protocol::{Ack, TimeAnchor};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::batcher::{self, BatchError, Prepared};
use super::link::Transport;
use super::link::{Endpoint, Link, LinkError};
use super::session::{AckNext, Acked, Prepare, TickAction};
use super::status::Health;
use super::task::{durable_advanced, Uplink};
use super::token::{relay_token, TOKEN_ENV};
use super::{anchors, https, tls, ws};

/// How a session ended: whether any ack arrived, and the error (none = shutdown).
pub(super) type SessionEnd = (bool, Option<LinkError>);

/// A batch being read and encoded on the blocking pool.
type Preparing = JoinHandle<Result<Option<Prepared>, BatchError>>;

enum Event {
    Shutdown,
    Ack(Result<Ack, LinkError>),
    Prepared(Result<Result<Option<Prepared>, BatchError>, tokio::task::JoinError>),
    /// The session's wake time: a batch may go, or waiting records reached their age.
    Wake,
    Tick,
    /// New durable records.
    Durable,
}

async fn join_opt<T>(h: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

impl Uplink {
    /// Connects to `ep` and runs a session. `None` when shutdown came first.
    pub(super) async fn connect_and_run(
        &mut self,
        ep: &Endpoint,
        shutdown: &CancellationToken,
    ) -> Option<SessionEnd> {
        let token = match relay_token(&self.cfg, &self.ctx.data_dir, self.session.header()) {
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
        let end = self.run_session(&mut link, shutdown).await;
        self.session.on_link_lost();
        link.close().await;
        end
    }

    /// Publishes the backlog and `online` / `draining` for status.
    fn publish(&self, durable: u64) {
        let unsent = self.session.unsent(durable);
        let inflight = self.session.inflight();
        let limit = self.session.batch_limit() as u64;
        let behind = unsent + inflight as u64 * limit;
        self.handle.update(|s| {
            s.unsent = unsent;
            s.inflight = inflight;
            s.health = if unsent > limit || (inflight > 1 && behind > limit) {
                Health::Draining
            } else {
                Health::Online
            };
        });
    }

    /// Performs [`Prepare`]: records on the blocking pool (the returned handle), anchors
    /// here and now. `hello` only changes the warning.
    fn start(&mut self, what: Prepare, hello: bool) -> Option<Preparing> {
        match what {
            Prepare::Anchors { at } => {
                let untold = self.anchors.untold();
                match batcher::anchors_only(self.session.header(), at, untold) {
                    Ok(p) => self.session.on_prepared(p),
                    Err(e) if hello => warn!(error = %e, "cannot encode the hello batch"),
                    Err(e) => warn!(error = %e, "cannot encode an anchor-only batch"),
                }
                None
            }
            Prepare::Records { from, max_records } => {
                let (j, header) = (self.ctx.journal.clone(), self.session.header().clone());
                let max_bytes = self.cfg.batch_max_bytes;
                let (all, current) = (self.anchors.all(), self.ctx.clock.boot_id());
                Some(tokio::task::spawn_blocking(move || {
                    batcher::prepare(&j, &header, from, max_records, max_bytes, |boots| {
                        anchors::select(&all, current, boots)
                    })
                }))
            }
        }
    }

    /// One connection's life: send batches with a window, take acks, trim.
    async fn run_session<L: Link>(
        &mut self,
        link: &mut L,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let journal = self.ctx.journal.clone();
        let mut progressed = false;
        // Hello: a batch with no records (anchors only) goes first, so the relay's ack
        // tells this epoch's watermark before any record is sent. If the relay already
        // holds numbers this journal has not assigned (a restored backup), `on_ack` moves
        // the journal to a new epoch before new punches can be sent under reused numbers.
        let hello = self
            .session
            .on_connected(journal.first_unacked(), Instant::now());
        let mut preparing = self.start(hello, true);
        let tick = (self.cfg.ping_interval.min(self.cfg.ping_timeout) / 4)
            .clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let durable = journal.durable_through();
            let untold = !self.anchors.untold().is_empty();
            if let Some(what) = self.session.poll(Instant::now(), durable, untold) {
                if let Some(h) = self.start(what, false) {
                    preparing = Some(h);
                }
            }
            self.publish(durable);

            let wake = self.session.wake_at();
            let ev = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Event::Shutdown,
                r = link.recv() => Event::Ack(r),
                r = join_opt(&mut preparing) => Event::Prepared(r),
                _ = ticker.tick() => Event::Tick,
                _ = sleep_until_opt(wake) => Event::Wake,
                _ = durable_advanced(&journal, durable) => Event::Durable,
            };
            match ev {
                Event::Shutdown => return (progressed, None),
                Event::Ack(Err(e)) => return (progressed, Some(e)),
                Event::Ack(Ok(ack)) => match self.on_ack(ack).await {
                    Ok(()) => progressed = true,
                    Err(e) => return (progressed, Some(e)),
                },
                Event::Prepared(r) => {
                    preparing = None;
                    match r {
                        Ok(Ok(Some(p))) => self.session.on_prepared(p),
                        Ok(Ok(None)) => self.session.on_prepared_empty(journal.first_unacked()),
                        Ok(Err(e)) => return (progressed, Some(LinkError::Local(e.to_string()))),
                        Err(e) => {
                            return (
                                progressed,
                                Some(LinkError::Local(format!("batch task failed: {e}"))),
                            )
                        }
                    }
                }
                Event::Wake => {
                    if let Err(e) = self.send(link).await {
                        return (progressed, Some(e));
                    }
                }
                Event::Tick => {
                    match self
                        .session
                        .on_tick(Instant::now(), link.last_heard(), link.pings())
                    {
                        None => {}
                        Some(TickAction::Close(e)) => return (progressed, Some(e)),
                        Some(TickAction::Ping) => {
                            if let Err(e) = link.ping().await {
                                return (progressed, Some(e));
                            }
                        }
                    }
                }
                Event::Durable => {}
            }
        }
    }

    /// Sends the batch the session hands out, if any, and counts it.
    async fn send<L: Link>(&mut self, link: &mut L) -> Result<(), LinkError> {
        let Some(p) = self.session.take_sendable(Instant::now()) else {
            return Ok(());
        };
        let n = p.frame.len();
        let sent_at = Instant::now();
        let sent_mono = self.ctx.clock.mono_ms();
        match tokio::time::timeout(self.cfg.ack_timeout, link.send(p.frame.clone())).await {
            Err(_) => {
                return Err(LinkError::Timeout(format!(
                    "sending a batch took longer than uplink.ack_timeout ({:?})",
                    self.cfg.ack_timeout
                )))
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(())) => {}
        }
        let resent = self.session.on_sent(p, sent_at, sent_mono, Instant::now());
        let m = &self.ctx.metrics;
        m.uplink_bytes_sent.inc_by(n as u64);
        m.uplink_batches_sent.inc();
        m.uplink_records_resent.inc_by(resent);
        self.handle.update(|s| {
            s.bytes_sent += n as u64;
            s.batches_sent += 1;
            s.records_resent += resent;
        });
        Ok(())
    }

    /// Performs an ack: the session pairs it with its batch and says what follows; here
    /// the time anchor it yields is kept (and saved), then the journal is trimmed or moved
    /// to a new epoch.
    async fn on_ack(&mut self, ack: Ack) -> Result<(), LinkError> {
        let last_assigned = self.ctx.journal.next_seq().saturating_sub(1);
        let old_epoch = self.session.header().journal_epoch;
        let Acked { batch: b, next } = self.session.on_ack(&ack, last_assigned)?;
        let rtt = b.sent_at.elapsed();
        self.ctx
            .metrics
            .uplink_ack_seconds
            .observe(rtt.as_secs_f64());
        self.observe_anchor(b.sent_mono, ack.server_time_ms).await;
        self.anchors.mark_told(&b.anchors);

        match next {
            // The relay holds sequence numbers of this epoch that this journal never
            // assigned: the journal went back in time (a restored backup). Sending on would
            // put new records under numbers the relay already has, so move to a fresh epoch
            // first; the next session resends everything held under it, and the relay's
            // punch-key dedup recognises what it already stores.
            AckNext::NewEpoch => {
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
                    old_epoch = format_args!("{:016x}", old_epoch),
                    new_epoch = format_args!("{:016x}", epoch),
                    "the relay already holds records this journal has not written yet (a restored backup or a lost journal tail): moved the journal to a new epoch and resending what it holds"
                );
                self.session.on_new_epoch(epoch);
                return Err(LinkError::Local(
                    "the journal moved to a new epoch; reconnecting to resend under it".into(),
                ));
            }
            // The trimmer deletes in the background, so sending never waits for sled.
            AckNext::Trim(Some(through)) => {
                let _ = self.trim_tx.send(through);
            }
            AckNext::Trim(None) => {}
        }
        self.ctx.metrics.uplink_records_acked.inc_by(b.records);
        let current = self.anchors.current();
        let dups = u64::from(ack.duplicates.unwrap_or(0));
        let inflight = self.session.inflight();
        self.handle.update(|s| {
            s.records_acked += b.records;
            s.relay_duplicates += dups;
            s.last_success = Some((Instant::now(), ack.server_time_ms));
            s.anchor = current;
            s.inflight = inflight;
        });
        self.ctx.relay_time.set(current);
        Ok(())
    }

    /// Time: the relay read its clock (`server_time_ms`) somewhere between the send (at
    /// monotonic `sent_mono`) and now. Keeps the anchor, and saves the anchors file when it
    /// is much better than the saved one.
    async fn observe_anchor(&mut self, sent_mono: u64, server_time_ms: i64) {
        let now_mono = self.ctx.clock.mono_ms().max(sent_mono);
        let span = now_mono - sent_mono;
        let anchor = TimeAnchor {
            boot_id: self.ctx.clock.boot_id(),
            mono_ms: sent_mono + span / 2,
            true_ms: server_time_ms,
            uncertainty_ms: u32::try_from(span.div_ceil(2) + 1).unwrap_or(u32::MAX),
        };
        if !self.anchors.observe(anchor) {
            return;
        }
        let (path, bytes) = self.anchors.snapshot();
        let written =
            tokio::task::spawn_blocking(move || replace_atomic(&path, &bytes, 0o644)).await;
        match written {
            Ok(Ok(())) => self.anchors.saved(),
            Ok(Err(e)) => warn!(error = %e, "cannot save the time anchors file (gateway.data_dir)"),
            Err(e) => warn!(error = %e, "anchor save task failed"),
        }
    }
}
