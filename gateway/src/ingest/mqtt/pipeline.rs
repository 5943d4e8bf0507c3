//! From received messages to commits to acks.
//!
//! ```text
//! poller ─Incoming─► dispatcher ─(batch, commit future)─► acker ─► device ack (publish)
//!                        │ decode, stamp, submit                 └► broker ack (PUBACK)
//!                        └────────────► committer (group commit, fsync)
//! ```
//!
//! - The **dispatcher** takes the first waiting message plus everything else already queued
//!   (up to [`MAX_BATCH_MESSAGES`]), decodes them, submits all their valid punches to the
//!   committer as one request, and passes the batch with its pending commit to the acker.
//!   Up to [`MAX_BATCHES_IN_FLIGHT`] batches are committing at once, so the committer
//!   always has the next group queued while it fsyncs the current one.
//! - The **acker** takes batches in arrival order, waits for each commit, publishes one ack
//!   message per punch message to `outpost/v1/{site}/{device}/ack`, then acks the message to
//!   the broker. Order matters: MQTT requires PUBACKs in the order the PUBLISHes arrived,
//!   and rumqttd refuses acks out of order.
//! - A message is acked to the broker only once every punch in it has a definite outcome
//!   (stored, duplicate, or rejected). A punch refused with `unavailable` (the committer is
//!   shutting down) leaves its message un-acked, so the broker redelivers it to the next
//!   run; the device also hears `unavailable` and keeps the punch in its outbox.
//! - Malformed messages and punches for the wrong device get a `rejected` ack and are acked
//!   to the broker: they are never redelivered forever.
//! - Messages on a topic that is not `outpost/v1/{site}/{device}/punch` with a valid device
//!   segment cannot be answered; they are acked to the broker, logged and counted.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use outpost_protocol::topic::{self, Topic, TopicKind};
use outpost_protocol::{Punch, RejectCode, Source};
use rumqttc::{AsyncClient, Publish, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::client::{Incoming, Shared};
use super::status::MqttStatus;
use crate::clock::Clock;
use crate::committer::CommitterHandle;
use crate::ingest::punch_body::{self, Decoded, Encoding, Limit, PunchResult, Rejection};
use crate::journal::{Outcome, Pending};
use crate::metrics::{IngestLabels, Metrics};

/// Most messages decoded and submitted together.
pub const MAX_BATCH_MESSAGES: usize = 1024;
/// Batches committing at once.
pub const MAX_BATCHES_IN_FLIGHT: usize = 8;

/// What the pipeline needs.
#[derive(Clone)]
pub struct Pipeline {
    /// Where punches go.
    pub committer: CommitterHandle,
    /// Arrival stamps.
    pub clock: Clock,
    /// Prometheus counters (`ingest_punches{source="mqtt"}`, `rejections`).
    pub metrics: Metrics,
    /// Our status counters.
    pub status: MqttStatus,
    /// Publishes and acks.
    pub client: AsyncClient,
    /// Connection generation.
    pub shared: Arc<Shared>,
    /// `gateway.site`.
    pub site: String,
    /// `mqtt.max_punches_per_message`.
    pub max_punches: usize,
    /// `mqtt.max_packet_bytes` (acks must fit).
    pub max_packet_bytes: usize,
}

/// One received message, decoded.
struct Prepared {
    publish: Publish,
    generation: u64,
    /// The device (topic segment) to answer, if the topic is usable.
    device: Option<String>,
    decoded: Option<Decoded>,
}

type Batch = (Vec<Prepared>, JoinHandle<Vec<Outcome>>);

impl Pipeline {
    /// Runs dispatcher and acker until `shutdown`, then lets the acker finish the batches
    /// already committing. Returns when every started batch is answered.
    pub async fn run(self, mut rx: mpsc::Receiver<Incoming>, shutdown: CancellationToken) {
        let (batch_tx, batch_rx) = mpsc::channel::<Batch>(MAX_BATCHES_IN_FLIGHT);
        let acker = tokio::spawn(self.clone().acker(batch_rx));
        loop {
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_MESSAGES {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let prepared: Vec<Prepared> = batch.into_iter().map(|m| self.prepare(m)).collect();
            let received = self.clock.now();
            let pending: Vec<Pending> = prepared
                .iter()
                .filter_map(|p| p.decoded.as_ref())
                .flat_map(Decoded::valid)
                .map(|punch: &Punch| Pending {
                    punch: *punch,
                    received,
                    source: Source::Mqtt,
                })
                .collect();
            let committer = self.committer.clone();
            let commit = tokio::spawn(async move { committer.submit(pending).await });
            if batch_tx.send((prepared, commit)).await.is_err() {
                break;
            }
        }
        // Messages still queued were neither stored nor acked: the broker redelivers them
        // to our next session, and the devices resend them.
        drop(batch_tx);
        if let Err(e) = acker.await {
            tracing::error!(error = %e, "the MQTT acker task failed");
        }
    }

    fn prepare(&self, m: Incoming) -> Prepared {
        let bytes = m.publish.payload.len();
        self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        let device = match Topic::parse(&m.publish.topic) {
            Ok(t) if t.kind == TopicKind::Punch && t.site.as_str() == self.site => {
                Some(t.device.as_str().to_string())
            }
            Ok(_) | Err(_) => None,
        };
        let decoded = device
            .as_deref()
            .map(|d| decode(&m.publish.payload, d, self.max_punches));
        Prepared {
            publish: m.publish,
            generation: m.generation,
            device,
            decoded,
        }
    }

    async fn acker(self, mut rx: mpsc::Receiver<Batch>) {
        while let Some((prepared, commit)) = rx.recv().await {
            let outcomes = match commit.await {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(error = %e, "MQTT commit task failed");
                    Vec::new()
                }
            };
            let mut outcomes = outcomes.into_iter();
            for p in prepared {
                self.answer(p, &mut outcomes).await;
            }
        }
    }

    async fn answer(&self, p: Prepared, outcomes: &mut impl Iterator<Item = Outcome>) {
        let (Some(device), Some(decoded)) = (p.device, p.decoded) else {
            self.status.inc(|c| &c.malformed);
            self.metrics.reject("mqtt_bad_topic");
            tracing::warn!(
                topic = %p.publish.topic,
                "MQTT message on a topic that is not outpost/v1/{}/<device_id>/punch with a valid device id: dropped",
                self.site
            );
            self.broker_ack(&p.publish, p.generation).await;
            return;
        };
        let whole_message_bad =
            !decoded.many && decoded.items.len() == 1 && decoded.items[0].is_err();
        let acks = punch_body::results(decoded.items, outcomes);
        // `unavailable` only comes from the committer shutting down.
        let unavailable = acks
            .iter()
            .any(|a| matches!(a, PunchResult::Rejected(r) if r.code == RejectCode::Unavailable));
        for ack in &acks {
            self.count(ack);
        }
        if whole_message_bad {
            self.status.inc(|c| &c.malformed);
        }
        self.status.add(|c| &c.punches, acks.len() as u64);

        self.device_ack(&device, decoded.encoding, decoded.many, &acks)
            .await;
        if unavailable {
            // Not answered for good: leave it to the broker to redeliver.
            return;
        }
        self.broker_ack(&p.publish, p.generation).await;
    }

    fn count(&self, ack: &PunchResult) {
        match ack {
            PunchResult::Accepted { .. } => self.status.inc(|c| &c.accepted),
            PunchResult::Duplicate { .. } => self.status.inc(|c| &c.duplicates),
            PunchResult::Rejected(r) => {
                self.status.inc(|c| &c.rejected);
                self.metrics.reject(r.code.as_str());
            }
        }
        self.metrics
            .ingest
            .get_or_create(&IngestLabels {
                source: "mqtt",
                outcome: ack.label(),
            })
            .inc();
    }

    async fn device_ack(&self, device: &str, encoding: Encoding, many: bool, acks: &[PunchResult]) {
        let Ok(topic) = topic::ack_topic(&self.site, device) else {
            return;
        };
        // Leave room for the fixed header, topic and packet id.
        let room = self.max_packet_bytes.saturating_sub(topic.len() + 16);
        let mut body = punch_body::encode_results(encoding, many, acks);
        if body.len() > room {
            // Long rejection messages are the only thing that can make an ack larger than
            // the message it answers: drop them, keep codes.
            let short: Vec<PunchResult> = acks
                .iter()
                .map(|a| match a {
                    PunchResult::Rejected(r) => PunchResult::Rejected(Rejection {
                        message: String::new(),
                        ..r.clone()
                    }),
                    other => other.clone(),
                })
                .collect();
            body = punch_body::encode_results(encoding, many, &short);
        }
        if body.len() > room {
            tracing::warn!(
                device,
                bytes = body.len(),
                "MQTT ack larger than mqtt.max_packet_bytes; not sent (the device will resend and get duplicates)"
            );
            return;
        }
        match self
            .client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
        {
            Ok(()) => self.status.inc(|c| &c.device_acks),
            Err(e) => tracing::debug!(error = %e, "MQTT client closed; device ack not sent"),
        }
    }

    async fn broker_ack(&self, publish: &Publish, generation: u64) {
        if publish.qos == QoS::AtMostOnce {
            return;
        }
        if generation != self.shared.generation.load(Ordering::SeqCst) {
            // Arrived on an earlier connection: the broker redelivers it on this one.
            return;
        }
        match self.client.ack(publish).await {
            Ok(()) => self.status.inc(|c| &c.broker_acks),
            Err(e) => tracing::debug!(error = %e, "MQTT client closed; broker ack not sent"),
        }
    }
}

/// Decodes a punch message published on the topic of `topic_device`. Never fails: a
/// message that cannot be read at all is answered as one rejected punch.
fn decode(payload: &[u8], topic_device: &str, max_punches: usize) -> Decoded {
    let encoding = Encoding::sniff(payload);
    let limit = Limit {
        max_punches,
        setting: "mqtt.max_punches_per_message",
    };
    let mut d = punch_body::decode(payload, encoding, limit)
        .unwrap_or_else(|rej| Decoded::whole(encoding, rej));
    d.reject_other_devices(topic_device, |p| {
        format!(
            "punch for device {} published on the topic of device {topic_device}; publish on outpost/v1/<site>/{}/punch",
            p.device_id, p.device_id
        )
    });
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn decode_checks_the_topic_device_and_answers_whole_message_problems() {
        let d = decode(
            br#"{"device_id":"d2","seq":3,"subject":"s","kind":"in","time":"2026-11-22T07:58:03+02:00"}"#,
            "d1",
            10,
        );
        let r = d.items[0].as_ref().unwrap_err();
        assert_eq!((r.code, r.seq), (RejectCode::DeviceMismatch, Some(3)));
        assert!(
            r.message.contains("outpost/v1/<site>/d2/punch"),
            "{}",
            r.message
        );

        // Text that is not JSON is answered in JSON, as one rejected punch.
        let d = decode(b"this is not a punch", "d1", 10);
        assert_eq!((d.encoding, d.many), (Encoding::Json, false));
        assert_eq!(d.items[0].as_ref().unwrap_err().code, RejectCode::Malformed);
        let v: Value = serde_json::from_slice(&punch_body::encode_results(
            d.encoding,
            d.many,
            &punch_body::results(d.items, &mut std::iter::empty()),
        ))
        .unwrap();
        assert_eq!(v["status"], "rejected");
        assert_eq!(v["seq"], Value::Null);

        let d = decode(b"[{},{},{}]", "d1", 2);
        let r = d.items[0].as_ref().unwrap_err();
        assert_eq!(r.code, RejectCode::TooLarge);
        assert!(r.message.contains("mqtt.max_punches_per_message"));
        assert!(decode(b"", "d1", 10).items[0].is_err());
    }
}
