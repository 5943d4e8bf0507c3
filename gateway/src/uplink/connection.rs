//! One connection to a relay: open it (token, TLS, transport), then run the session loop
//! that sends batches within the window, takes acks in order, and trims.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use outpost_ops::file::replace_atomic;
use outpost_protocol::{Ack, TimeAnchor};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::batcher::{self, BatchError, Prepared};
use super::config::Transport;
use super::link::{Endpoint, Link, LinkError};
use super::status::Health;
use super::task::{Uplink, POLL};
use super::token::{read_token, TOKEN_ENV};
use super::{anchors, https, tls, ws};

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
async fn join_opt<T>(h: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

impl Uplink {
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
    pub(super) async fn connect_and_run(
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
