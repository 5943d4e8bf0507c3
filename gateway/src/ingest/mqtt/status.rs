//! What the MQTT ingest reports: which broker, the connection state, and counters.
//!
//! Shared between the MQTT tasks (writers) and `/v1/status` (reader). Counters are atomics;
//! the few strings (broker, reason, last error) sit behind a mutex that is never held
//! across an await.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};

use super::config::MqttMode;

/// The gateway's connection to its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// MQTT ingest is off.
    Off,
    /// Connecting, or waiting to reconnect after a failure.
    Connecting,
    /// Connected and subscribed (or subscribing).
    Connected,
    /// Shut down.
    Stopped,
}

impl ConnState {
    /// The status spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Off => "off",
            ConnState::Connecting => "connecting",
            ConnState::Connected => "connected",
            ConnState::Stopped => "stopped",
        }
    }
}

#[derive(Debug)]
struct Text {
    mode: MqttMode,
    /// `embedded` or `external` once chosen.
    broker_kind: Option<&'static str>,
    /// The broker address (URL).
    broker: Option<String>,
    /// Why this broker (for `auto`).
    reason: Option<String>,
    state: ConnState,
    last_error: Option<String>,
    connected_since_ms: Option<i64>,
}

/// Counters of the MQTT ingest (monotonic since start).
#[derive(Debug, Default)]
pub struct Counters {
    /// Punch messages received from the broker (including redeliveries).
    pub messages: AtomicU64,
    /// Received messages the broker flagged as redeliveries (DUP).
    pub redeliveries: AtomicU64,
    /// Punches in those messages (array elements count one each).
    pub punches: AtomicU64,
    /// Punches stored.
    pub accepted: AtomicU64,
    /// Punches the journal already had.
    pub duplicates: AtomicU64,
    /// Punches rejected (invalid, device mismatch, journal full, …).
    pub rejected: AtomicU64,
    /// Messages that could not be read at all, or came on an unusable topic.
    pub malformed: AtomicU64,
    /// Messages acknowledged to the broker (PUBACK) after their outcome was known.
    pub broker_acks: AtomicU64,
    /// Ack messages published to devices.
    pub device_acks: AtomicU64,
    /// Messages dropped unanswered because the ingest queue was full (the device resends).
    pub overload_dropped: AtomicU64,
    /// Successful connections to the broker.
    pub connects: AtomicU64,
}

/// The MQTT ingest's status. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MqttStatus {
    text: Arc<Mutex<Text>>,
    counters: Arc<Counters>,
}

impl MqttStatus {
    /// A status for `mode`, not yet connected (or `off`).
    pub fn new(mode: MqttMode) -> Self {
        MqttStatus {
            text: Arc::new(Mutex::new(Text {
                mode,
                broker_kind: None,
                broker: None,
                reason: None,
                state: if mode == MqttMode::Off {
                    ConnState::Off
                } else {
                    ConnState::Connecting
                },
                last_error: None,
                connected_since_ms: None,
            })),
            counters: Arc::new(Counters::default()),
        }
    }

    fn text(&self) -> MutexGuard<'_, Text> {
        // Plain data: a panic elsewhere cannot leave it inconsistent in a way that matters.
        self.text.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Adds one to a counter.
    pub(crate) fn inc(&self, f: impl FnOnce(&Counters) -> &AtomicU64) {
        f(&self.counters).fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub(crate) fn add(&self, f: impl FnOnce(&Counters) -> &AtomicU64, n: u64) {
        f(&self.counters).fetch_add(n, Ordering::Relaxed);
    }

    /// Records which broker is used and why.
    pub(crate) fn chose(&self, kind: &'static str, broker: String, reason: String) {
        let mut t = self.text();
        t.broker_kind = Some(kind);
        t.broker = Some(broker);
        t.reason = Some(reason);
    }

    /// The connection came up at `now_ms`.
    pub(crate) fn connected(&self, now_ms: i64) {
        self.inc(|c| &c.connects);
        let mut t = self.text();
        t.state = ConnState::Connected;
        t.connected_since_ms = Some(now_ms);
    }

    /// The connection failed or dropped.
    pub(crate) fn disconnected(&self, error: String) {
        let mut t = self.text();
        if t.state != ConnState::Stopped {
            t.state = ConnState::Connecting;
        }
        t.connected_since_ms = None;
        t.last_error = Some(error);
    }

    /// Shut down.
    pub(crate) fn stopped(&self) {
        let mut t = self.text();
        t.state = ConnState::Stopped;
        t.connected_since_ms = None;
    }

    /// The connection state.
    pub fn state(&self) -> ConnState {
        self.text().state
    }

    /// Prometheus text lines for the MQTT ingest: connection state, and message counters
    /// (received, redeliveries, broker and device acks, rejected, malformed, dropped while
    /// overloaded).
    pub fn prometheus(&self) -> String {
        use std::fmt::Write;
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let state = self.state();
        let mut out = String::new();
        out.push_str(
            "# HELP outpost_gateway_mqtt_state 1 for the MQTT ingest's current connection state.\n",
        );
        out.push_str("# TYPE outpost_gateway_mqtt_state gauge\n");
        for s in [
            ConnState::Off,
            ConnState::Connecting,
            ConnState::Connected,
            ConnState::Stopped,
        ] {
            let v = u8::from(s == state);
            let _ = writeln!(
                out,
                "outpost_gateway_mqtt_state{{state=\"{}\"}} {v}",
                s.as_str()
            );
        }
        out.push_str(
            "# HELP outpost_gateway_mqtt_messages MQTT punch messages by what happened to them.\n",
        );
        out.push_str("# TYPE outpost_gateway_mqtt_messages counter\n");
        for (kind, v) in [
            ("received", n(&c.messages)),
            ("redelivered", n(&c.redeliveries)),
            ("broker_acked", n(&c.broker_acks)),
            ("device_acked", n(&c.device_acks)),
            ("rejected", n(&c.rejected)),
            ("malformed", n(&c.malformed)),
            ("dropped_overload", n(&c.overload_dropped)),
        ] {
            let _ = writeln!(
                out,
                "outpost_gateway_mqtt_messages_total{{kind=\"{kind}\"}} {v}"
            );
        }
        out
    }

    /// The `"mqtt"` block of `/v1/status`.
    pub fn to_json(&self) -> Value {
        let t = self.text();
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "mode": t.mode.as_str(),
            "broker_kind": t.broker_kind,
            "broker": t.broker,
            "reason": t.reason,
            "state": t.state.as_str(),
            "connected_since": t.connected_since_ms
                .map(|ms| outpost_protocol::json::format_time(ms, None)),
            "last_error": t.last_error,
            "connects": n(&c.connects),
            "messages": n(&c.messages),
            "redeliveries": n(&c.redeliveries),
            "punches": n(&c.punches),
            "accepted": n(&c.accepted),
            "duplicates": n(&c.duplicates),
            "rejected": n(&c.rejected),
            "malformed": n(&c.malformed),
            "broker_acks": n(&c.broker_acks),
            "device_acks": n(&c.device_acks),
            "overload_dropped": n(&c.overload_dropped),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_tracks_state() {
        let s = MqttStatus::new(MqttMode::Auto);
        assert_eq!(s.to_json()["state"], "connecting");
        s.chose(
            "embedded",
            "mqtt://127.0.0.1:1883".into(),
            "nothing answered".into(),
        );
        s.connected(1_795_327_083_000);
        s.inc(|c| &c.messages);
        s.add(|c| &c.punches, 3);
        let v = s.to_json();
        assert_eq!(v["state"], "connected");
        assert_eq!(v["broker_kind"], "embedded");
        assert_eq!(v["messages"], 1);
        assert_eq!(v["punches"], 3);
        assert_eq!(v["connects"], 1);
        s.disconnected("I/O: reset".into());
        assert_eq!(s.to_json()["last_error"], "I/O: reset");
        assert_eq!(s.state(), ConnState::Connecting);
        s.stopped();
        s.disconnected("late".into());
        assert_eq!(s.state(), ConnState::Stopped);
        assert_eq!(MqttStatus::new(MqttMode::Off).to_json()["state"], "off");
    }
}
