//! `outpost-devsim`: simulated clock-in devices for demos, end-to-end tests and benchmarks.
//!
//! Each simulated device makes realistic punches (staff badges, shifts, breaks, fingerprint
//! and card terminals: [`outpost_tests::workload`]), keeps them in the protocol's device
//! outbox ([`outpost_protocol::outbox::Outbox`]), sends them to a gateway over **MQTT** or
//! **HTTP**, and resends each one until an ack settles it — exactly what real firmware does.
//! At the end it prints what was sent and what was acknowledged.
//!
//! ```text
//! outpost-devsim --mqtt mqtt://127.0.0.1:1883 --site HC001 --devices 5 --punches 100
//! outpost-devsim --http http://127.0.0.1:8080 --site HC001 --devices 5 --punches 100
//! ```
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `--mqtt URL` / `--http URL` | `--mqtt mqtt://127.0.0.1:1883` | where the gateway (or its broker) is |
//! | `--site ID` | `HC001` | the site segment of the topics (`gateway.site`) |
//! | `--devices N` | 1 | simulated devices, named `<prefix>-001` … |
//! | `--prefix P` | `sim` | device id prefix |
//! | `--punches N` | 10 | punches per device |
//! | `--rate R` | 0 | punches per second per device; 0 = as fast as acks allow |
//! | `--window W` | 256 | most unacknowledged punches per device (the outbox size, ≤ 1024) |
//! | `--batch B` | 1 | most punches per message (an array when > 1) |
//! | `--encoding cbor\|json` | `cbor` | payload encoding (acks come back the same way) |
//! | `--tokens FILE` | | device credentials: lines `device_id token` (from `outpost-gateway device add`) |
//! | `--username U` / `--password P` | device id / none | one login for every device (e.g. a mosquitto user) |
//! | `--first-seq N` | wall-clock ms | the first `device_seq` (a fresh run never collides with an old one) |
//! | `--retry-ms MS` | 2000 | the outbox's first resend delay (doubles to 60 s) |
//! | `--seed S` | 1 | workload seed (same seed, same punches) |
//! | `--timeout S` | 120 | give up after S seconds (exit 1) |
//! | `--events` | off | print NDJSON on stdout: one `{"event":"ack",…}` per settled punch, then `{"event":"summary",…}` |
//!
//! Over MQTT each device publishes QoS 1 on `outpost/v1/{site}/{device}/punch` and reads
//! `outpost/v1/{site}/{device}/ack`; it logs in with its device id and token (the embedded
//! broker's scheme) or with `--username`/`--password`. Over HTTP it posts to `/v1/punches`
//! with `Authorization: Bearer <token>`.
//!
//! Exit status: 0 when every punch was settled (accepted, duplicate, or permanently
//! rejected), 1 on timeout, 2 on bad arguments.
//!
//! Example (embedded broker, lab mode):
//!
//! ```text
//! OUTPOST_AUTH__REQUIRED=false outpost-gateway &
//! cargo run -p outpost-tests --bin outpost-devsim -- --devices 3 --punches 20
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_protocol::outbox::{AckOutcome, Backoff, Outbox};
use outpost_protocol::{json, topic, AckStatus, DeviceAck, Id, Punch, RejectCode};
use outpost_tests::workload::Site;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

/// The outbox capacity (the largest `--window`).
const CAP: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Cbor,
    Json,
}

#[derive(Debug, Clone)]
enum Target {
    Mqtt { host: String, port: u16 },
    Http { base: String },
}

#[derive(Debug, Clone)]
struct Args {
    target: Target,
    site: String,
    devices: usize,
    prefix: String,
    punches: u64,
    rate: f64,
    window: usize,
    batch: usize,
    encoding: Encoding,
    tokens: HashMap<String, String>,
    username: Option<String>,
    password: Option<String>,
    first_seq: u64,
    retry_ms: u32,
    seed: u64,
    timeout: Duration,
    events: bool,
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "outpost-devsim: {msg}\nsee the module docs (src/bin/outpost-devsim.rs) for the options"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut a = Args {
        target: Target::Mqtt {
            host: "127.0.0.1".into(),
            port: 1883,
        },
        site: "HC001".into(),
        devices: 1,
        prefix: "sim".into(),
        punches: 10,
        rate: 0.0,
        window: 256,
        batch: 1,
        encoding: Encoding::Cbor,
        tokens: HashMap::new(),
        username: None,
        password: None,
        first_seq: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64 * 1000)
            .unwrap_or(1),
        retry_ms: 2000,
        seed: 1,
        timeout: Duration::from_secs(120),
        events: false,
    };
    let mut i = 0;
    let val = |i: &mut usize| -> String {
        *i += 1;
        argv.get(*i)
            .cloned()
            .unwrap_or_else(|| usage(&format!("{} needs a value", argv[*i - 1])))
    };
    fn num<T: std::str::FromStr>(s: String, name: &str) -> T {
        s.parse()
            .unwrap_or_else(|_| usage(&format!("{name}: `{s}` is not a number")))
    }
    while i < argv.len() {
        match argv[i].as_str() {
            "--mqtt" => {
                let u = val(&mut i);
                let rest = u
                    .strip_prefix("mqtt://")
                    .unwrap_or_else(|| usage("--mqtt takes mqtt://host:port"));
                let (host, port) = rest
                    .trim_end_matches('/')
                    .rsplit_once(':')
                    .unwrap_or((rest, "1883"));
                a.target = Target::Mqtt {
                    host: host.trim_matches(['[', ']']).to_string(),
                    port: num(port.to_string(), "--mqtt port"),
                };
            }
            "--http" => {
                a.target = Target::Http {
                    base: val(&mut i).trim_end_matches('/').to_string(),
                }
            }
            "--site" => a.site = val(&mut i),
            "--devices" => a.devices = num(val(&mut i), "--devices"),
            "--prefix" => a.prefix = val(&mut i),
            "--punches" => a.punches = num(val(&mut i), "--punches"),
            "--rate" => a.rate = num(val(&mut i), "--rate"),
            "--window" => a.window = num(val(&mut i), "--window"),
            "--batch" => a.batch = num(val(&mut i), "--batch"),
            "--encoding" => {
                a.encoding = match val(&mut i).as_str() {
                    "cbor" => Encoding::Cbor,
                    "json" => Encoding::Json,
                    other => usage(&format!("--encoding {other}: use cbor or json")),
                }
            }
            "--tokens" => {
                let path = val(&mut i);
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| usage(&format!("--tokens {path}: {e}")));
                for line in text
                    .lines()
                    .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                {
                    let mut parts = line.split_whitespace();
                    if let (Some(d), Some(t)) = (parts.next(), parts.next()) {
                        a.tokens.insert(d.to_string(), t.to_string());
                    }
                }
            }
            "--username" => a.username = Some(val(&mut i)),
            "--password" => a.password = Some(val(&mut i)),
            "--first-seq" => a.first_seq = num(val(&mut i), "--first-seq"),
            "--retry-ms" => a.retry_ms = num(val(&mut i), "--retry-ms"),
            "--seed" => a.seed = num(val(&mut i), "--seed"),
            "--timeout" => a.timeout = Duration::from_secs(num(val(&mut i), "--timeout")),
            "--events" => a.events = true,
            "-h" | "--help" => usage("usage"),
            other => usage(&format!("unknown option {other}")),
        }
        i += 1;
    }
    if a.devices == 0 || a.window == 0 || a.window > CAP || a.batch == 0 {
        usage("--devices, --window (1..=1024) and --batch must be at least 1");
    }
    a
}

/// What one device did.
#[derive(Debug, Default, Clone)]
struct Report {
    generated: u64,
    messages: u64,
    sends: u64,
    resends: u64,
    accepted: u64,
    duplicate: u64,
    rejected: u64,
    deferred: u64,
    late_acks: u64,
    reconnects: u64,
    pending: u64,
    /// Seconds from start until the last punch settled (or the timeout).
    finished_s: f64,
}

impl Report {
    fn add(&mut self, o: &Report) {
        self.generated += o.generated;
        self.messages += o.messages;
        self.sends += o.sends;
        self.resends += o.resends;
        self.accepted += o.accepted;
        self.duplicate += o.duplicate;
        self.rejected += o.rejected;
        self.deferred += o.deferred;
        self.late_acks += o.late_acks;
        self.reconnects += o.reconnects;
        self.pending += o.pending;
        self.finished_s = self.finished_s.max(o.finished_s);
    }
}

/// One simulated device: its outbox and punch source.
struct Device {
    id: String,
    outbox: Box<Outbox<CAP>>,
    site: Site,
    buffer: Vec<Punch>,
    sent_once: std::collections::HashSet<u64>,
    report: Report,
    start: Instant,
    events: Option<mpsc::UnboundedSender<String>>,
}

impl Device {
    fn new(args: &Args, index: usize, events: Option<mpsc::UnboundedSender<String>>) -> Device {
        let backoff = Backoff {
            base_ms: args.retry_ms,
            cap_ms: 60_000,
            busy_base_ms: args.retry_ms,
            busy_cap_ms: 60_000,
        };
        Device {
            id: format!("{}-{:03}", args.prefix, index + 1),
            outbox: Box::new(Outbox::new(args.first_seq, backoff)),
            site: Site::new(args.seed.wrapping_add(index as u64 * 7919), 60, 1),
            buffer: Vec::new(),
            sent_once: Default::default(),
            report: Report::default(),
            start: Instant::now(),
            events,
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Takes new punches into the outbox as the rate and window allow.
    fn generate(&mut self, args: &Args) {
        let now = self.now_ms();
        while self.report.generated < args.punches && self.outbox.len() < args.window {
            if args.rate > 0.0 {
                let due_ms = (self.report.generated as f64 * 1000.0 / args.rate) as u64;
                if due_ms > now {
                    break;
                }
            }
            if self.buffer.is_empty() {
                self.buffer = self.site.punches(256);
                self.buffer.reverse();
            }
            let Some(mut p) = self.buffer.pop() else {
                break;
            };
            p.device_id = Id::new(&self.id).unwrap_or(p.device_id);
            if self.outbox.push(p, now).is_err() {
                break;
            }
            self.report.generated += 1;
        }
    }

    /// When the next punch should be generated (rate mode), in ms since start.
    fn next_generation_ms(&self, args: &Args) -> Option<u64> {
        if self.report.generated >= args.punches || self.outbox.len() >= args.window {
            return None;
        }
        if args.rate > 0.0 {
            Some((self.report.generated as f64 * 1000.0 / args.rate) as u64)
        } else {
            Some(0)
        }
    }

    /// The punches due now, at most `max`, marked as sent.
    fn take_due(&mut self, max: usize) -> Vec<Punch> {
        let now = self.now_ms();
        let due: Vec<Punch> = self.outbox.due(now).take(max).copied().collect();
        for p in &due {
            self.outbox.mark_sent(p.device_seq, now, rand::random());
            self.report.sends += 1;
            if !self.sent_once.insert(p.device_seq) {
                self.report.resends += 1;
            }
        }
        due
    }

    fn on_ack(&mut self, ack: &DeviceAck) {
        let now = self.now_ms();
        let outcome = self.outbox.on_ack(ack, now, rand::random());
        let status = match outcome {
            AckOutcome::Unknown => {
                self.report.late_acks += 1;
                return;
            }
            AckOutcome::Delivered(AckStatus::Duplicate) => {
                self.report.duplicate += 1;
                "duplicate"
            }
            AckOutcome::Delivered(_) => {
                self.report.accepted += 1;
                "accepted"
            }
            AckOutcome::Refused(code) => {
                self.report.rejected += 1;
                eprintln!(
                    "{}: punch {} refused for good: {code}",
                    self.id, ack.device_seq
                );
                "rejected"
            }
            AckOutcome::Deferred { .. } => {
                self.report.deferred += 1;
                return;
            }
        };
        self.sent_once.remove(&ack.device_seq);
        if let Some(ev) = &self.events {
            let _ = ev.send(
                json!({"event": "ack", "device": self.id, "seq": ack.device_seq, "status": status,
                       "code": ack.code.map(RejectCode::as_str), "gateway_seq": ack.gateway_seq})
                .to_string(),
            );
        }
    }

    fn done(&self, args: &Args) -> bool {
        self.report.generated >= args.punches && self.outbox.is_empty()
    }

    fn sleep_for(&self, args: &Args) -> Duration {
        let now = self.now_ms();
        let wake = [self.outbox.next_wake_ms(), self.next_generation_ms(args)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + 200);
        Duration::from_millis(wake.saturating_sub(now).clamp(1, 200))
    }

    /// The report; `pending` counts held punches and those never made (timeout).
    fn finish(mut self, args: &Args) -> Report {
        self.report.pending =
            self.outbox.len() as u64 + args.punches.saturating_sub(self.report.generated);
        self.report
    }
}

fn encode(encoding: Encoding, punches: &[Punch], as_array: bool) -> Vec<u8> {
    match encoding {
        Encoding::Cbor if as_array => outpost_protocol::cbor::to_vec(&punches.to_vec()),
        Encoding::Cbor => outpost_protocol::cbor::to_vec(&punches[0]),
        Encoding::Json => {
            let items: Vec<Value> = punches
                .iter()
                .map(|p| Value::Object(json::punch_to_json(p)))
                .collect();
            let v = if as_array {
                Value::Array(items)
            } else {
                items.into_iter().next().unwrap_or(Value::Null)
            };
            v.to_string().into_bytes()
        }
    }
}

/// Acks from an MQTT ack message or an HTTP response body (CBOR or JSON, one or many).
fn decode_acks(bytes: &[u8]) -> Vec<DeviceAck> {
    let first = bytes.iter().copied().find(|b| !b.is_ascii_whitespace());
    if matches!(first, Some(b'{' | b'[')) {
        let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
            return Vec::new();
        };
        let items = match v {
            Value::Array(a) => a,
            Value::Object(mut o) => match o.remove("results") {
                Some(Value::Array(a)) => a,
                _ => vec![Value::Object(o)],
            },
            _ => Vec::new(),
        };
        return items.iter().filter_map(json_ack).collect();
    }
    if let Ok(a) = outpost_protocol::cbor::decode_exact::<DeviceAck>(bytes) {
        return vec![a];
    }
    outpost_protocol::cbor::decode_exact::<Vec<DeviceAck>>(bytes).unwrap_or_default()
}

fn json_ack(v: &Value) -> Option<DeviceAck> {
    let seq = v.get("seq")?.as_u64()?;
    Some(match v.get("status")?.as_str()? {
        "accepted" => DeviceAck::accepted(seq, v.get("gateway_seq")?.as_u64()?),
        "duplicate" => DeviceAck::duplicate(seq),
        "rejected" => DeviceAck::rejected(
            seq,
            RejectCode::from_name(v.get("code")?.as_str()?).unwrap_or(RejectCode::Internal),
        ),
        _ => return None,
    })
}

async fn run_mqtt_device(args: Arc<Args>, mut dev: Device, host: String, port: u16) -> Report {
    let mut o = MqttOptions::new(
        format!("devsim-{}-{}", dev.id, std::process::id()),
        host,
        port,
    );
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(256 << 10, 256 << 10);
    o.set_inflight(100);
    let password = args
        .password
        .clone()
        .or_else(|| args.tokens.get(&dev.id).cloned());
    let username = args.username.clone().unwrap_or_else(|| dev.id.clone());
    o.set_credentials(username, password.unwrap_or_default());
    let (client, mut ev) = AsyncClient::new(o, 1024);
    // Like a good device: no Nagle delay on its small PUBLISHes and PUBACKs (a device that
    // waits for each ack before the next punch would otherwise wait ~40 ms per punch for
    // the broker's delayed TCP ACK).
    let mut net = ev.network_options();
    net.set_tcp_nodelay(true);
    ev.set_network_options(net);
    let ack_topic = topic::ack_topic(&args.site, &dev.id).unwrap_or_default();
    let punch_topic = topic::punch_topic(&args.site, &dev.id).unwrap_or_default();
    let (ack_tx, mut ack_rx) = mpsc::channel::<Vec<DeviceAck>>(4096);
    let (ready_tx, mut ready_rx) = watch::channel(false);
    let reconnects = Arc::new(AtomicU64::new(0));

    // The event loop runs in its own task and never publishes.
    let sub_client = client.clone();
    let (connack_tx, mut connack_rx) = watch::channel(0u64);
    let r = reconnects.clone();
    let id = dev.id.clone();
    let mut poller = tokio::spawn(async move {
        let mut generation = 0u64;
        let mut delay = 100u64;
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    generation += 1;
                    delay = 100;
                    let _ = connack_tx.send(generation);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(true);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = ack_tx.try_send(decode_acks(&p.payload));
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(rumqttc::ConnectionError::RequestsDone) => return,
                Err(e) => {
                    let _ = ready_tx.send(false);
                    if r.fetch_add(1, Ordering::Relaxed) % 20 == 0 {
                        eprintln!("{id}: MQTT connection: {e}; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    delay = (delay * 2).min(2000);
                }
            }
        }
    });
    let subscriber = tokio::spawn(async move {
        while connack_rx.changed().await.is_ok() {
            if sub_client
                .subscribe(ack_topic.clone(), QoS::AtLeastOnce)
                .await
                .is_err()
            {
                return;
            }
        }
    });

    let deadline = Instant::now() + args.timeout;
    while !dev.done(&args) && Instant::now() < deadline {
        dev.generate(&args);
        if *ready_rx.borrow() {
            loop {
                let due = dev.take_due(args.batch);
                if due.is_empty() {
                    break;
                }
                let body = encode(args.encoding, &due, args.batch > 1);
                dev.report.messages += 1;
                if client
                    .publish(punch_topic.clone(), QoS::AtLeastOnce, false, body)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        let sleep = dev.sleep_for(&args);
        tokio::select! {
            acks = ack_rx.recv() => {
                if let Some(acks) = acks {
                    for a in &acks { dev.on_ack(a); }
                }
                while let Ok(acks) = ack_rx.try_recv() {
                    for a in &acks { dev.on_ack(a); }
                }
            }
            _ = ready_rx.changed() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
    dev.report.finished_s = dev.start.elapsed().as_secs_f64();
    let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
    if tokio::time::timeout(Duration::from_secs(2), &mut poller)
        .await
        .is_err()
    {
        poller.abort();
    }
    subscriber.abort();
    dev.report.reconnects = reconnects.load(Ordering::Relaxed);
    dev.finish(&args)
}

async fn run_http_device(args: Arc<Args>, mut dev: Device, base: String) -> Report {
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/punches");
    let token = args
        .password
        .clone()
        .or_else(|| args.tokens.get(&dev.id).cloned());
    let deadline = Instant::now() + args.timeout;
    while !dev.done(&args) && Instant::now() < deadline {
        dev.generate(&args);
        let due = dev.take_due(args.batch);
        if !due.is_empty() {
            let body = encode(args.encoding, &due, args.batch > 1);
            dev.report.messages += 1;
            let ct = match args.encoding {
                Encoding::Cbor => "application/cbor",
                Encoding::Json => "application/json",
            };
            let mut req = http.post(&url).header("Content-Type", ct).body(body);
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            }
            match req.send().await {
                Ok(resp) => {
                    if let Ok(bytes) = resp.bytes().await {
                        for a in decode_acks(&bytes) {
                            dev.on_ack(&a);
                        }
                    }
                }
                Err(e) => {
                    dev.report.reconnects += 1;
                    if dev.report.reconnects % 20 == 1 {
                        eprintln!("{}: HTTP: {e}; retrying", dev.id);
                    }
                }
            }
            continue;
        }
        tokio::time::sleep(dev.sleep_for(&args)).await;
    }
    dev.report.finished_s = dev.start.elapsed().as_secs_f64();
    dev.finish(&args)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Arc::new(parse_args());
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<String>();
    let printer = tokio::spawn(async move {
        use std::io::Write;
        while let Some(line) = ev_rx.recv().await {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
    let mut tasks = Vec::new();
    for i in 0..args.devices {
        let dev = Device::new(&args, i, args.events.then(|| ev_tx.clone()));
        let a = args.clone();
        tasks.push(match &args.target {
            Target::Mqtt { host, port } => {
                tokio::spawn(run_mqtt_device(a, dev, host.clone(), *port))
            }
            Target::Http { base } => tokio::spawn(run_http_device(a, dev, base.clone())),
        });
    }
    let mut total = Report::default();
    for t in tasks {
        match t.await {
            Ok(r) => total.add(&r),
            Err(e) => eprintln!("outpost-devsim: a device task failed: {e}"),
        }
    }
    // Until the last punch settled, not counting the disconnects after it.
    let elapsed = total.finished_s;
    let settled = total.accepted + total.duplicate + total.rejected;
    let ok = total.pending == 0 && total.generated == args.punches * args.devices as u64;
    let transport = match &args.target {
        Target::Mqtt { .. } => "mqtt",
        Target::Http { .. } => "http",
    };
    let summary = json!({
        "event": "summary", "transport": transport, "devices": args.devices,
        "generated": total.generated, "messages": total.messages, "sends": total.sends,
        "resends": total.resends, "accepted": total.accepted, "duplicate": total.duplicate,
        "rejected": total.rejected, "deferred": total.deferred, "late_acks": total.late_acks,
        "reconnects": total.reconnects, "pending": total.pending, "elapsed_s": elapsed,
        "settled_per_s": if elapsed > 0.0 { settled as f64 / elapsed } else { 0.0 },
        "all_settled": ok,
    });
    if args.events {
        let _ = ev_tx.send(summary.to_string());
    } else {
        println!(
            "{} devices over {transport}: {} punches made, {} messages ({} resends); acked: {} accepted, {} duplicate, {} rejected; {} still pending; {:.2} s, {:.0} punches/s",
            args.devices, total.generated, total.messages, total.resends, total.accepted,
            total.duplicate, total.rejected, total.pending, elapsed,
            if elapsed > 0.0 { settled as f64 / elapsed } else { 0.0 }
        );
    }
    drop(ev_tx);
    let _ = printer.await;
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "outpost-devsim: not every punch was acknowledged within {:?}",
            args.timeout
        );
        ExitCode::from(1)
    }
}
