//! End-to-end tests of MQTT ingest: the real gateway binary, its embedded broker or a
//! private mosquitto, the `outpost-devsim` device simulator (protocol outbox, resend until
//! acked) and the real `mosquitto_pub` / `mosquitto_sub` clients.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_tests::gateway::Gateway;
use outpost_tests::mosquitto::Mosquitto;
use outpost_tests::proc::{binary, free_port, ChildProc};
use serde_json::Value;

const SITE: &str = "HC001";

fn devsim() -> Command {
    Command::new(binary("outpost-tests", "outpost-devsim"))
}

/// A gateway with its embedded broker on a free port.
fn embedded_gateway(dir: &Path, extra: &[(&str, &str)]) -> (Gateway, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut env: Vec<(&str, &str)> = vec![
        ("OUTPOST_MQTT__MODE", "embedded"),
        ("OUTPOST_MQTT__LISTEN", &listen),
        ("OUTPOST_MQTT__RECONNECT_MIN_MS", "50"),
        ("OUTPOST_MQTT__RECONNECT_MAX_MS", "1000"),
        ("RUST_LOG", "info,rumqttd=off"),
    ];
    env.extend_from_slice(extra);
    (Gateway::new(dir, &env), port)
}

/// A gateway using `broker` as its external broker with the given login.
fn external_gateway(
    dir: &Path,
    broker: &Mosquitto,
    mode: &str,
    user: &str,
    password: &str,
) -> Gateway {
    let pw_file = dir.join("mqtt.password");
    std::fs::write(&pw_file, format!("{password}\n")).unwrap();
    let url = broker.url();
    let pw = pw_file.display().to_string();
    Gateway::new(
        dir,
        &[
            ("OUTPOST_MQTT__MODE", mode),
            ("OUTPOST_MQTT__URL", &url),
            ("OUTPOST_MQTT__USERNAME", user),
            ("OUTPOST_MQTT__PASSWORD_FILE", &pw),
            ("OUTPOST_MQTT__RECONNECT_MIN_MS", "50"),
            ("OUTPOST_MQTT__RECONNECT_MAX_MS", "1000"),
        ],
    )
}

/// Issues tokens for `ids` and writes a devsim tokens file.
fn tokens(gw: &Gateway, dir: &Path, ids: &[String]) -> std::path::PathBuf {
    let path = dir.join("tokens");
    let lines: Vec<String> = ids
        .iter()
        .map(|id| format!("{id} {}", gw.add_device(id)))
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn device_ids(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}-{i:03}")).collect()
}

/// A devsim run in the background, collecting its NDJSON events.
struct Sim {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Sim {
    fn spawn(args: &[&str]) -> Sim {
        let mut child = devsim()
            .args(args)
            .arg("--events")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start outpost-devsim");
        let out = child.stdout.take().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    ev.lock().unwrap().push(v);
                }
            }
        });
        Sim {
            child,
            events,
            reader: Some(reader),
        }
    }

    /// (device, seq) of every punch acked so far.
    fn acked(&self) -> HashSet<(String, u64)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == "ack")
            .map(|e| {
                (
                    e["device"].as_str().unwrap().to_string(),
                    e["seq"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// Waits for the exit; returns (success, summary).
    fn finish(mut self, timeout: Duration) -> (bool, Value) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let summary = self
            .events
            .lock()
            .unwrap()
            .iter()
            .find(|e| e["event"] == "summary")
            .cloned()
            .unwrap_or(Value::Null);
        (status.success(), summary)
    }
}

/// How often each (device_id, seq) is in the journal.
fn journal_counts(gw: &Gateway) -> HashMap<(String, u64), usize> {
    let mut m = HashMap::new();
    for r in gw.export() {
        let key = (
            r["device_id"].as_str().unwrap().to_string(),
            r["seq"].as_u64().unwrap(),
        );
        *m.entry(key).or_insert(0) += 1;
    }
    m
}

fn mqtt_status(gw: &Gateway) -> Value {
    let (code, body) = gw.admin_get("/v1/status").unwrap();
    assert_eq!(code, 200);
    serde_json::from_slice::<Value>(&body).unwrap()["mqtt"].clone()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks exactly-once: every punch the devices made is in the journal once.
fn assert_exactly_once(gw: &Gateway, ids: &[String], per_device: u64, first_seq: u64) {
    let counts = journal_counts(gw);
    for id in ids {
        for seq in first_seq..first_seq + per_device {
            let n = counts.get(&(id.clone(), seq)).copied().unwrap_or(0);
            assert_eq!(n, 1, "{id} seq {seq} is in the journal {n} times");
        }
    }
    assert_eq!(counts.len(), ids.len() * per_device as usize);
}

/// What `mosquitto_sub` publishes to prove its subscription is in place (never JSON, so
/// never taken for an ack).
const PROBE: &str = "outpost-test-probe";

/// A `mosquitto_sub` whose subscription the broker has registered, and its output lines.
struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
}

/// `mosquitto_sub` on `topic`, returned once its subscription is in place.
///
/// A QoS 1 message published before the broker has registered the subscription is not
/// delivered to it, so a fixed wait would make the test flaky. Instead the probe message is
/// published on `topic` until the subscriber prints it (10 s at most): from then on, every
/// message on `topic` reaches it.
fn subscribe(port: u16, topic: &str, login: Option<(&str, &str)>) -> Sub {
    let mut cmd = Command::new("mosquitto_sub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
    ])
    // A bound on its life if the test dies before killing it.
    .args(["-W", "120"]);
    if let Some((u, p)) = login {
        cmd.args(["-u", u, "-P", p]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (package mosquitto-clients)");
    let out = child.stdout.take().expect("mosquitto_sub stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut probes = 0;
    loop {
        assert!(
            publish(port, topic, PROBE, login),
            "mosquitto_pub of the probe on {topic} failed"
        );
        probes += 1;
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line == PROBE => {
                eprintln!("mosquitto_sub on {topic}: subscribed ({probes} probes sent)");
                break;
            }
            Ok(line) => panic!("{topic}: message before the test published anything: {line}"),
            Err(mpsc::RecvTimeoutError::Timeout) => assert!(
                Instant::now() < deadline,
                "mosquitto_sub did not receive the probe on {topic} within 10 s"
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("mosquitto_sub on {topic} exited before subscribing")
            }
        }
    }
    Sub { child, lines }
}

fn publish(port: u16, topic: &str, payload: &str, login: Option<(&str, &str)>) -> bool {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
        "-m",
        payload,
    ]);
    if let Some((u, p)) = login {
        cmd.args(["-u", u, "-P", p]);
    }
    cmd.stderr(Stdio::null())
        .status()
        .expect("mosquitto_pub (package mosquitto-clients)")
        .success()
}

/// The next `count` messages `sub` receives (probes left out), as JSON (a message that
/// is not JSON is kept as a string, so a count check shows it); waits 20 s at most.
fn received(mut sub: Sub, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match sub.lines.recv_timeout(left) {
            Ok(line) if line == PROBE => {}
            Ok(line) => out.push(serde_json::from_str(&line).unwrap_or(Value::String(line))),
            Err(_) => break,
        }
    }
    let _ = sub.child.kill();
    let _ = sub.child.wait();
    out
}

#[test]
fn embedded_broker_commits_acks_rejects_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let (mut gw, port) = embedded_gateway(dir.path(), &[]);
    let ids = device_ids("door", 2);
    let tokens = tokens(&gw, dir.path(), &ids);
    gw.start();

    // Two devices, CBOR, one punch per message: every punch committed and acked.
    let out = devsim()
        .args([
            "--mqtt",
            &format!("mqtt://127.0.0.1:{port}"),
            "--site",
            SITE,
        ])
        .args([
            "--devices",
            "2",
            "--prefix",
            "door",
            "--punches",
            "30",
            "--first-seq",
            "1",
        ])
        .args(["--tokens", tokens.to_str().unwrap(), "--timeout", "60"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "devsim: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // JSON arrays from the same devices, later seqs.
    let out = devsim()
        .args([
            "--mqtt",
            &format!("mqtt://127.0.0.1:{port}"),
            "--site",
            SITE,
        ])
        .args([
            "--devices",
            "2",
            "--prefix",
            "door",
            "--punches",
            "20",
            "--first-seq",
            "31",
        ])
        .args(["--encoding", "json", "--batch", "7"])
        .args(["--tokens", tokens.to_str().unwrap(), "--timeout", "60"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "devsim json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_exactly_once(&gw, &ids, 50, 1);
    let s = mqtt_status(&gw);
    assert_eq!(s["broker_kind"], "embedded", "{s}");
    assert_eq!(s["state"], "connected", "{s}");
    assert_eq!(s["accepted"], 100, "{s}");

    // Malformed payloads, a device mismatch and a bad field each get a rejected ack on the
    // topic's ack topic, and nothing is stored.
    let tok: HashMap<String, String> = std::fs::read_to_string(&tokens)
        .unwrap()
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect();
    let login = Some(("door-001", tok["door-001"].as_str()));
    let ack_topic = format!("outpost/v1/{SITE}/door-001/ack");
    let punch_topic = format!("outpost/v1/{SITE}/door-001/punch");
    let sub = subscribe(port, &ack_topic, login);
    assert!(publish(port, &punch_topic, "this is not a punch", login));
    assert!(publish(
        port,
        &punch_topic,
        r#"{"device_id":"door-002","seq":900,"subject":"EMP-1","kind":"in","time":"2026-11-22T07:58:03+02:00"}"#,
        login
    ));
    assert!(publish(
        port,
        &punch_topic,
        r#"{"device_id":"door-001","seq":901,"subject":"EMP-1","kind":"sideways","time":"2026-11-22T07:58:03+02:00"}"#,
        login
    ));
    let acks = received(sub, 3);
    assert_eq!(acks.len(), 3, "{acks:?}");
    let codes: Vec<&str> = acks
        .iter()
        .map(|a| a["code"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        codes,
        ["malformed", "device_mismatch", "unknown_kind"],
        "{acks:?}"
    );
    assert!(acks.iter().all(|a| a["status"] == "rejected"));
    assert_eq!(acks[1]["seq"], 900);
    assert_eq!(journal_counts(&gw).len(), 100);
    let s = mqtt_status(&gw);
    assert_eq!(s["rejected"], 3, "{s}");
    assert!(s["malformed"].as_u64().unwrap() >= 1, "{s}");
    // Rejected messages were acked to the broker: no redelivery loop.
    assert_eq!(s["redeliveries"], 0, "{s}");

    // Wrong credentials: the broker refuses the login; the simulator gets nothing acked.
    assert!(!publish(
        port,
        &punch_topic,
        "{}",
        Some(("door-001", "opd_wrong"))
    ));
    let out = devsim()
        .args([
            "--mqtt",
            &format!("mqtt://127.0.0.1:{port}"),
            "--site",
            SITE,
        ])
        .args([
            "--devices",
            "1",
            "--prefix",
            "door",
            "--punches",
            "3",
            "--first-seq",
            "500",
        ])
        .args(["--password", "opd_wrong", "--timeout", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(journal_counts(&gw).len(), 100);

    // The embedded broker's port is taken: start-up fails naming mqtt.listen.
    let mut other = Gateway::new(
        &dir.path().join("second"),
        &[
            ("OUTPOST_MQTT__MODE", "embedded"),
            ("OUTPOST_MQTT__LISTEN", &format!("127.0.0.1:{port}")),
        ],
    );
    let (ok, _out, err) = other.cli(&["run"]);
    assert!(!ok);
    assert!(err.contains("mqtt.listen"), "{err}");
    other.kill9();

    assert_eq!(gw.terminate().map(|s| s.success()), Some(true));
}

#[test]
fn mosquitto_pub_json_through_a_private_mosquitto_in_auto_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(
        &dir.path().join("mosquitto"),
        &[("gateway", "gw-secret"), ("door-1", "door-secret")],
    );
    let mut gw = external_gateway(dir.path(), &broker, "auto", "gateway", "gw-secret");
    gw.start();
    let s = mqtt_status(&gw);
    assert_eq!(s["broker_kind"], "external", "{s}");
    assert!(s["reason"].as_str().unwrap().contains("answers"), "{s}");

    let login = Some(("door-1", "door-secret"));
    let sub = subscribe(broker.port, &format!("outpost/v1/{SITE}/door-1/ack"), login);
    let punch = r#"{"device_id": "door-1", "seq": 42, "subject": "EMP-0042", "kind": "in", "verify": "card", "time": "2026-11-22T07:58:03+02:00"}"#;
    let topic = format!("outpost/v1/{SITE}/door-1/punch");
    assert!(publish(broker.port, &topic, punch, login));
    assert!(publish(broker.port, &topic, punch, login));
    let acks = received(sub, 2);
    assert_eq!(acks.len(), 2, "{acks:?}");
    assert_eq!(acks[0]["seq"], 42);
    assert_eq!(acks[0]["status"], "accepted");
    assert!(acks[0]["gateway_seq"].as_u64().is_some());
    assert_eq!(acks[1]["status"], "duplicate");
    let records = gw.export();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["source"], "mqtt");
    assert_eq!(records[0]["subject"], "EMP-0042");
    assert_eq!(gw.terminate().map(|s| s.success()), Some(true));
    broker.stop();
}

/// Lab mode (`auth.required = false`): the embedded broker lets in a client with no
/// username at all, as `mosquitto_pub -h … -t … -m …` connects, and the LAB MODE warning
/// is logged once.
#[test]
fn lab_mode_embedded_broker_takes_anonymous_clients_and_warns_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut gw, port) = embedded_gateway(dir.path(), &[("OUTPOST_AUTH__REQUIRED", "false")]);
    gw.start();
    let sub = subscribe(port, &format!("outpost/v1/{SITE}/door-1/ack"), None);
    let punch = r#"{"device_id": "door-1", "seq": 7, "subject": "EMP-0042", "kind": "in", "time": "2026-11-22T07:58:03+02:00"}"#;
    assert!(
        publish(
            port,
            &format!("outpost/v1/{SITE}/door-1/punch"),
            punch,
            None
        ),
        "the embedded broker refused a client without a username in lab mode"
    );
    let acks = received(sub, 1);
    assert_eq!(acks.len(), 1, "{acks:?}");
    assert_eq!(acks[0]["status"], "accepted", "{acks:?}");
    assert_eq!(acks[0]["seq"], 7);
    assert_eq!(journal_counts(&gw).len(), 1);
    let log = std::fs::read_to_string(gw.log_path()).unwrap();
    assert_eq!(log.matches("LAB MODE").count(), 1, "{log}");
    assert_eq!(gw.terminate().map(|s| s.success()), Some(true));
}

#[test]
fn refused_gateway_login_fails_start_naming_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&dir.path().join("mosquitto"), &[("gateway", "right")]);
    let gw = external_gateway(dir.path(), &broker, "external", "gateway", "wrong");
    let mut p = ChildProc::spawn(
        "gateway",
        {
            let mut c = gw.command();
            c.arg("run");
            c
        },
        &dir.path().join("gw.log"),
    );
    wait_for("the gateway to exit", Duration::from_secs(30), || {
        p.exited()
    });
    let status = p.child.wait().unwrap();
    assert!(!status.success());
    let log = p.log_text();
    assert!(
        log.contains("mqtt.username") && log.contains("mqtt.password_file"),
        "{log}"
    );
}

/// Devices publish while the gateway is SIGKILLed and restarted. Every punch a device saw
/// acked before the kill is in the journal after it; at the end every punch was resent
/// until acked and is stored exactly once.
fn crash_while_publishing(gw: &mut Gateway, url: &str, tokens: Option<&Path>, ids: &[String]) {
    gw.start();
    let per_device = 400u64;
    let mut args = vec![
        "--mqtt".to_string(),
        url.to_string(),
        "--site".into(),
        SITE.into(),
        "--devices".into(),
        ids.len().to_string(),
        "--prefix".into(),
        "dev".into(),
        "--punches".into(),
        per_device.to_string(),
        "--rate".into(),
        "300".into(),
        "--window".into(),
        "64".into(),
        "--first-seq".into(),
        "1".into(),
        "--retry-ms".into(),
        "500".into(),
        "--timeout".into(),
        "120".into(),
    ];
    if let Some(t) = tokens {
        args.push("--tokens".into());
        args.push(t.display().to_string());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let sim = Sim::spawn(&argv);
    wait_for("some acks", Duration::from_secs(60), || {
        sim.acked().len() >= 150
    });
    gw.kill9();
    let acked_before = sim.acked();
    // The outage (part of the scenario, not a wait): devices' publishes fail meanwhile.
    std::thread::sleep(Duration::from_millis(500));
    gw.start();
    let counts = journal_counts(gw);
    for k in &acked_before {
        assert_eq!(
            counts.get(k),
            Some(&1),
            "acked punch {k:?} lost or doubled by the crash"
        );
    }
    let (ok, summary) = sim.finish(Duration::from_secs(150));
    assert!(ok, "devsim did not settle everything: {summary}");
    assert_eq!(summary["pending"], 0, "{summary}");
    assert_exactly_once(gw, ids, per_device, 1);
    assert!(gw.terminate().is_some_and(|s| s.success()));
}

#[test]
fn sigkill_while_devices_publish_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let (mut gw, port) = embedded_gateway(dir.path(), &[]);
    let ids = device_ids("dev", 3);
    let tokens = tokens(&gw, dir.path(), &ids);
    crash_while_publishing(
        &mut gw,
        &format!("mqtt://127.0.0.1:{port}"),
        Some(&tokens),
        &ids,
    );
}

#[test]
fn sigkill_while_devices_publish_through_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&dir.path().join("mosquitto"), &[]);
    let mut gw = external_gateway(dir.path(), &broker, "external", "gateway", "unused");
    let ids = device_ids("dev", 3);
    crash_while_publishing(&mut gw, &broker.url(), None, &ids);
}

#[test]
fn mosquitto_restart_while_devices_publish() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(&dir.path().join("mosquitto"), &[]);
    let mut gw = external_gateway(dir.path(), &broker, "external", "gateway", "unused");
    gw.start();
    let ids = device_ids("dev", 2);
    let url = broker.url();
    let sim = Sim::spawn(&[
        "--mqtt",
        &url,
        "--site",
        SITE,
        "--devices",
        "2",
        "--prefix",
        "dev",
        "--punches",
        "300",
        "--rate",
        "200",
        "--window",
        "64",
        "--first-seq",
        "1",
        "--retry-ms",
        "500",
        "--timeout",
        "120",
    ]);
    wait_for("some acks", Duration::from_secs(60), || {
        sim.acked().len() >= 100
    });
    broker.stop();
    // The outage (part of the scenario, not a wait): devices and gateway retry meanwhile.
    std::thread::sleep(Duration::from_millis(1500));
    wait_for("the gateway to notice", Duration::from_secs(10), || {
        mqtt_status(&gw)["state"] == "connecting"
    });
    broker.restart();
    wait_for("the gateway to reconnect", Duration::from_secs(30), || {
        let s = mqtt_status(&gw);
        s["state"] == "connected" && s["connects"].as_u64().unwrap_or(0) >= 2
    });
    let (ok, summary) = sim.finish(Duration::from_secs(150));
    assert!(ok, "devsim did not settle everything: {summary}");
    assert_exactly_once(&gw, &ids, 300, 1);
    assert!(gw.terminate().is_some_and(|s| s.success()));
}
