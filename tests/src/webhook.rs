//! A webhook receiver for end-to-end tests: the other end of a relay's `[[outputs.webhook]]`.
//!
//! [`WebhookReceiver::start`] serves `POST /hook` on a random port of 127.0.0.1 (on its own
//! tokio runtime thread, so synchronous tests can use it; dropping it stops it). Every call
//! is checked the way a careful Standard Webhooks receiver would, with its own HMAC code
//! (not the relay's signer, so a signing bug cannot hide itself):
//!
//! - `webhook-signature` must hold a `v1,<base64>` that is the HMAC-SHA256 of
//!   `{webhook-id}.{webhook-timestamp}.{body}` with the secret; otherwise the call is
//!   counted in [`WebhookReceiver::bad_signatures`] and answered 401;
//! - `webhook-timestamp` must be Unix seconds within 5 minutes of now, the content type
//!   `application/json`, and the body `{"type": "punch.batch", "timestamp": ..., "data":
//!   {"items": [...]}}` with a string `"id"` in every item; otherwise the call is listed in
//!   [`WebhookReceiver::malformed`] and answered 400.
//!
//! A call that passes is answered by the script ([`WebhookReceiver::script`]): the next
//! scripted [`Reply`], or 200 when the script is empty. Only calls answered 200 count as
//! received: their items are appended, in arrival order, to [`WebhookReceiver::items`],
//! duplicates included (a resend after a crash shows up twice; [`WebhookReceiver::unique_ids`]
//! drops them as a receiver would, by id). Rejected and failed calls do not consume the
//! script. Every call is in [`WebhookReceiver::calls`].

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde_json::Value;
use sha2::Sha256;

/// How far `webhook-timestamp` may be from the receiver's clock (the specification's
/// suggestion), seconds.
pub const TOLERANCE_SECS: i64 = 300;

/// A scripted answer to one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// 200: the call's items are received.
    Ok,
    /// This status (500, 410, ...) with a short body; nothing is received.
    Status(u16),
    /// This status (429, 503) with `Retry-After: value`; nothing is received.
    RetryAfter {
        /// The status.
        status: u16,
        /// The header's value: seconds or an HTTP-date.
        value: String,
    },
    /// Answer nothing for this long (past the relay's `timeout_secs`), then 503; nothing
    /// is received. The call is in [`WebhookReceiver::calls`] with status 0.
    Hang(Duration),
}

/// One call the receiver got.
#[derive(Debug, Clone)]
pub struct Call {
    /// Its `webhook-id` ("" when missing).
    pub webhook_id: String,
    /// Its `webhook-timestamp` (0 when missing or not a number).
    pub timestamp: i64,
    /// The ids of its items (empty when the body was not readable).
    pub item_ids: Vec<String>,
    /// The status it was answered with; 0 for a [`Reply::Hang`] (recorded as it starts).
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
}

#[derive(Default)]
struct Log {
    script: VecDeque<Reply>,
    calls: Vec<Call>,
    items: Vec<Value>,
    /// The body `type` of each of `items`.
    types: Vec<String>,
    bad_signatures: usize,
    malformed: Vec<String>,
}

struct Shared {
    key: Vec<u8>,
    state: Mutex<Log>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Log> {
        // A panic in a handler must not hide what was recorded.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running receiver (stopped on drop).
pub struct WebhookReceiver {
    addr: SocketAddr,
    secret: String,
    shared: Arc<Shared>,
    stop_tx: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A new random secret, `whsec_<base64 of 32 bytes>`, for a test to write into the
/// relay's `secret_file` and give to [`WebhookReceiver::start`].
pub fn random_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!("whsec_{}", BASE64.encode(key))
}

impl WebhookReceiver {
    /// Starts a receiver that verifies calls with `secret` (`whsec_<base64>`).
    pub fn start(secret: &str) -> anyhow::Result<WebhookReceiver> {
        let key = BASE64
            .decode(
                secret
                    .trim()
                    .strip_prefix("whsec_")
                    .context("no whsec_ prefix")?,
            )
            .context("the secret is not base64")?;
        let shared = Arc::new(Shared {
            key,
            state: Mutex::default(),
            changed: Condvar::new(),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(shared.clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("receiver runtime")?;
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let stop = async {
                    let _ = stop_rx.await;
                };
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await;
            });
            // Hanging handlers are dropped with the runtime, not waited for.
            rt.shutdown_background();
        });
        Ok(WebhookReceiver {
            addr,
            secret: secret.trim().to_string(),
            shared,
            stop_tx: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The URL to configure: `http://127.0.0.1:<port>/hook` (needs `allow_private = true`).
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The secret it verifies with.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Appends answers for the next calls that pass verification, in order. Once the
    /// script is used up, calls are answered 200.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.lock().script.extend(replies);
    }

    /// The scripted answers not used yet.
    pub fn script_left(&self) -> usize {
        self.shared.lock().script.len()
    }

    /// The items of every call answered 200, in arrival order, duplicates included.
    pub fn items(&self) -> Vec<Value> {
        self.shared.lock().items.clone()
    }

    /// The items of every call answered 200 whose body `type` was `kind` (e.g.
    /// `conflict.batch`), in arrival order, duplicates included.
    pub fn items_of(&self, kind: &str) -> Vec<Value> {
        let state = self.shared.lock();
        state
            .items
            .iter()
            .zip(&state.types)
            .filter(|(_, t)| *t == kind)
            .map(|(i, _)| i.clone())
            .collect()
    }

    /// The `id` of each of [`WebhookReceiver::items`], duplicates included.
    pub fn ids(&self) -> Vec<String> {
        self.shared.lock().items.iter().map(item_id).collect()
    }

    /// The ids received, each once, in the order first received.
    pub fn unique_ids(&self) -> Vec<String> {
        unique(&self.ids())
    }

    /// Every call, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().calls.clone()
    }

    /// How many calls had no valid signature.
    pub fn bad_signatures(&self) -> usize {
        self.shared.lock().bad_signatures
    }

    /// Why each malformed call (bad timestamp, content type or body) was refused.
    pub fn malformed(&self) -> Vec<String> {
        self.shared.lock().malformed.clone()
    }

    /// Waits until at least `n` distinct ids have been received, for at most `timeout`;
    /// returns [`WebhookReceiver::unique_ids`]. The error says how many arrived and what
    /// the last calls were answered.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            let ids: Vec<String> = state.items.iter().map(item_id).collect();
            let ids = unique(&ids);
            if ids.len() >= n {
                return Ok(ids);
            }
            let now = Instant::now();
            if now >= deadline {
                let last: Vec<u16> = state.calls.iter().rev().take(5).map(|c| c.status).collect();
                bail!(
                    "webhook receiver: {} of {n} distinct ids after {timeout:?} ({} calls, last \
                     answered {last:?} newest first, {} bad signatures, {} malformed)",
                    ids.len(),
                    state.calls.len(),
                    state.bad_signatures,
                    state.malformed.len()
                );
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn item_id(item: &Value) -> String {
    item["id"].as_str().unwrap_or_default().to_string()
}

fn unique(ids: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    ids.iter().filter(|i| seen.insert(*i)).cloned().collect()
}

/// Whether `header` holds a `v1` signature of `signed` with `key`.
fn signature_ok(key: &[u8], signed: &[u8], header: &str) -> bool {
    header
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b64| BASE64.decode(b64).ok())
        .any(|sig| {
            Hmac::<Sha256>::new_from_slice(key)
                .map(|mut mac| {
                    mac.update(signed);
                    mac.verify_slice(&sig).is_ok()
                })
                .unwrap_or(false)
        })
}

/// The body types the relay sends (`outpost_relay::outputs::webhook::event_type`).
pub const BATCH_TYPES: [&str; 4] = [
    "punch.batch",
    "conflict.batch",
    "rejected.batch",
    "gateway.batch",
];

/// The type and items of a body, or why it is not one of [`BATCH_TYPES`].
fn parse_body(body: &[u8]) -> Result<(String, Vec<Value>), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let kind = v["type"].as_str().unwrap_or_default().to_string();
    if !BATCH_TYPES.contains(&kind.as_str()) || !v["timestamp"].is_string() {
        return Err(format!("not a known batch type with a timestamp: {v}"));
    }
    let items = v["data"]["items"]
        .as_array()
        .ok_or("no data.items array")?
        .clone();
    if items.is_empty() || items.iter().any(|i| !i["id"].is_string()) {
        return Err("data.items is empty or has an item without a string id".into());
    }
    Ok((kind, items))
}

async fn hook(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (id, ts_text) = (h("webhook-id"), h("webhook-timestamp"));
    let timestamp: i64 = ts_text.parse().unwrap_or(0);
    let mut call = Call {
        webhook_id: id.clone(),
        timestamp,
        item_ids: Vec::new(),
        status: 0,
        at: Instant::now(),
    };
    let record = |call: Call, state: &mut Log| {
        state.calls.push(call);
        shared.changed.notify_all();
    };

    let mut signed = format!("{id}.{ts_text}.").into_bytes();
    signed.extend_from_slice(&body);
    if !signature_ok(&shared.key, &signed, &h("webhook-signature")) {
        let mut state = shared.lock();
        state.bad_signatures += 1;
        call.status = 401;
        record(call, &mut state);
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    let now = outpost_ops::time::now_ms() / 1000;
    let items = if (timestamp - now).abs() > TOLERANCE_SECS {
        Err(format!(
            "webhook-timestamp {ts_text:?} is not within {TOLERANCE_SECS} s of {now}"
        ))
    } else if h("content-type") != "application/json" {
        Err(format!("content-type {:?}", h("content-type")))
    } else {
        parse_body(&body)
    };
    let (kind, items) = match items {
        Ok(got) => got,
        Err(why) => {
            let mut state = shared.lock();
            state.malformed.push(format!("call {id:?}: {why}"));
            call.status = 400;
            record(call, &mut state);
            return (StatusCode::BAD_REQUEST, why).into_response();
        }
    };
    call.item_ids = items.iter().map(item_id).collect();

    let reply = shared.lock().script.pop_front().unwrap_or(Reply::Ok);
    let response = match &reply {
        Reply::Ok => StatusCode::OK.into_response(),
        Reply::Status(s) => (
            StatusCode::from_u16(*s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "scripted failure",
        )
            .into_response(),
        Reply::RetryAfter { status, value } => {
            let mut r = StatusCode::from_u16(*status)
                .unwrap_or(StatusCode::TOO_MANY_REQUESTS)
                .into_response();
            if let Ok(v) = HeaderValue::from_str(value) {
                r.headers_mut().insert("retry-after", v);
            }
            r
        }
        Reply::Hang(d) => {
            // Recorded before the hang: the server drops this handler when the relay
            // gives up and closes the connection.
            call.status = 0;
            record(call, &mut shared.lock());
            tokio::time::sleep(*d).await;
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    };
    let mut state = shared.lock();
    call.status = response.status().as_u16();
    if reply == Reply::Ok {
        state.types.extend(items.iter().map(|_| kind.clone()));
        state.items.extend(items);
    }
    record(call, &mut state);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_relay::outputs::config::{EventKind, WebhookOutput};
    use outpost_relay::outputs::sink::{punch_id, Delivery, Item, Sink, SinkError};
    use outpost_relay::outputs::webhook::WebhookSink;

    fn delivery(id: &str, seqs: &[u64]) -> Delivery {
        let items = seqs
            .iter()
            .map(|&seq| {
                let id = punch_id("HC001", "door-1", seq);
                let mut json = serde_json::Map::new();
                json.insert("id".into(), id.clone().into());
                json.insert("device_seq".into(), seq.into());
                Item {
                    id,
                    cursor: seq,
                    site: "HC001".into(),
                    device: "door-1".into(),
                    json,
                }
            })
            .collect();
        Delivery {
            id: id.into(),
            created_ms: outpost_ops::time::now_ms(),
            kind: EventKind::Punch,
            items,
        }
    }

    #[test]
    fn the_relays_calls_verify_and_the_script_is_followed() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let secret = random_secret();
        std::fs::write(dir.path().join("hook.whsec"), format!("{secret}\n")).unwrap();
        let rx = WebhookReceiver::start(&secret).unwrap();
        rx.script([
            Reply::Status(500),
            Reply::RetryAfter {
                status: 429,
                value: "3".into(),
            },
            Reply::Hang(Duration::from_secs(3)),
            Reply::Status(410),
        ]);
        let mut sink = WebhookSink::new(&WebhookOutput {
            name: "hook".into(),
            url: rx.url(),
            secret_file: dir.path().join("hook.whsec"),
            events: vec![EventKind::Punch],
            sites: vec![],
            batch_max: 100,
            allow_private: true,
            timeout_secs: 1,
            retry_schedule_secs: vec![0, 1],
            disable_after_secs: 60,
        })
        .unwrap();
        let d = delivery("hook-1", &[1, 2]);
        let mut outcomes = Vec::new();
        for _ in 0..5 {
            outcomes.push(rt.block_on(sink.deliver(&d)));
        }
        assert!(
            matches!(&outcomes[0], Err(SinkError::Retry { reason, .. }) if reason.contains("500"))
        );
        assert!(matches!(
            &outcomes[1],
            Err(SinkError::Retry { retry_after: Some(d), .. }) if *d == Duration::from_secs(3)
        ));
        assert!(
            matches!(&outcomes[2], Err(SinkError::Retry { reason, .. }) if reason.contains("within 1 s"))
        );
        assert!(matches!(&outcomes[3], Err(SinkError::Gone { .. })));
        assert_eq!(outcomes[4], Ok(()));
        assert_eq!(rt.block_on(sink.deliver(&delivery("hook-3", &[3]))), Ok(()));

        let ids = rx.wait_for(3, Duration::from_secs(10)).unwrap();
        assert_eq!(ids, ["HC001/door-1/1", "HC001/door-1/2", "HC001/door-1/3"]);
        assert_eq!((rx.bad_signatures(), rx.malformed().len()), (0, 0));
        assert_eq!(rx.script_left(), 0);
        let statuses: Vec<u16> = rx.calls().iter().map(|c| c.status).collect();
        assert_eq!(statuses, [500, 429, 0, 410, 200, 200]);
        assert!(rx.calls().iter().all(|c| !c.webhook_id.is_empty()));
    }

    #[test]
    fn a_signature_it_did_not_produce_is_rejected() {
        let rx = WebhookReceiver::start(&random_secret()).unwrap();
        let body = br#"{"type":"punch.batch","timestamp":"2026-11-22T06:00:00Z","data":{"items":[{"id":"a/b/1"}]}}"#;
        let ts = outpost_ops::time::now_ms() / 1000;
        let mut signed = format!("msg_1.{ts}.").into_bytes();
        signed.extend_from_slice(body);
        let other = random_secret();
        let key = BASE64
            .decode(other.strip_prefix("whsec_").unwrap())
            .unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(&signed);
        let forged = format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()));

        let post = |sig: &str| {
            let request = reqwest::Client::new()
                .post(rx.url())
                .header("content-type", "application/json")
                .header("webhook-id", "msg_1")
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", sig)
                .body(body.to_vec());
            async move { request.send().await.unwrap().status().as_u16() }
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let status = rt.block_on(post(&forged));
        assert_eq!(status, 401);
        assert_eq!(rx.bad_signatures(), 1);
        assert!(rx.items().is_empty());
        assert!(rx.wait_for(1, Duration::from_millis(200)).is_err());

        // The same call signed with the receiver's secret is accepted.
        let key = BASE64
            .decode(rx.secret().strip_prefix("whsec_").unwrap())
            .unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(&signed);
        let good = format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()));
        assert_eq!(rt.block_on(post(&format!("v1,AAAA {good}"))), 200);
        assert_eq!(rx.ids(), ["a/b/1"]);
    }
}
