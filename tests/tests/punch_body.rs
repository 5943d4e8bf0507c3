//! One table of punch bodies (JSON and CBOR; good, duplicate and malformed), sent to the
//! real gateway over HTTP and over MQTT through a private mosquitto. Both transports share
//! one codec (`gateway/src/ingest/punch_body.rs`), so every row must give the same
//! per-punch results over both, and the results the table expects.
//!
//! Each transport gets a fresh gateway and the rows run in the same order, so even the
//! `gateway_seq` of accepted punches must match. Only the framing differs and is undone
//! before comparing: HTTP wraps results in `{"results": […]}` (or answers a body it cannot
//! read with `{"error": …}` alone) and always sends an array; MQTT answers on the ack topic
//! in the shape of the message.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use outpost_protocol::{json::punch_from_json, AckStatus, Punch, RejectCode};
use outpost_tests::gateway::Gateway;
use outpost_tests::mosquitto::Mosquitto;
use outpost_tests::proc::http;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

const SITE: &str = "HC001";
const DEVICE: &str = "door-1";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Enc {
    Json,
    Cbor,
}

/// What one punch's result must say: status, seq (`None` = unknown), code, and (JSON
/// only) the field at fault.
type Expect = (
    &'static str,
    Option<u64>,
    Option<&'static str>,
    Option<&'static str>,
);

struct Case {
    name: &'static str,
    enc: Enc,
    body: Vec<u8>,
    http_status: u16,
    expect: Vec<Expect>,
}

fn punch_json(seq: u64) -> Value {
    json!({"device_id": DEVICE, "seq": seq, "subject": "EMP-0042", "kind": "in",
           "verify": "card", "time": "2026-11-22T07:58:03+02:00"})
}

fn punch(seq: u64) -> Punch {
    punch_from_json(&punch_json(seq)).unwrap()
}

fn cbor(f: impl FnOnce(&mut minicbor::Encoder<&mut Vec<u8>>)) -> Vec<u8> {
    let mut buf = Vec::new();
    f(&mut minicbor::Encoder::new(&mut buf));
    buf
}

fn table() -> Vec<Case> {
    let bad_kind = {
        let mut p = punch_json(3);
        p["kind"] = json!("sideways");
        p
    };
    // No seq and no subject: rejected, and the seq cannot be known.
    let no_subject =
        json!({"device_id": DEVICE, "kind": "in", "time": "2026-11-22T07:58:03+02:00"});
    let out_of_range = Punch {
        device_time_ms: 0,
        ..punch(13)
    };
    vec![
        Case {
            name: "json single, good",
            enc: Enc::Json,
            body: punch_json(1).to_string().into_bytes(),
            http_status: 201,
            expect: vec![("accepted", Some(1), None, None)],
        },
        Case {
            name: "json single, duplicate",
            enc: Enc::Json,
            body: punch_json(1).to_string().into_bytes(),
            http_status: 200,
            expect: vec![("duplicate", Some(1), None, None)],
        },
        Case {
            name: "json array: good, bad field, malformed without seq, duplicate",
            enc: Enc::Json,
            body: json!([punch_json(2), bad_kind, no_subject, punch_json(1)])
                .to_string()
                .into_bytes(),
            http_status: 400,
            expect: vec![
                ("accepted", Some(2), None, None),
                ("rejected", Some(3), Some("unknown_kind"), Some("kind")),
                ("rejected", None, Some("malformed"), Some("subject")),
                ("duplicate", Some(1), None, None),
            ],
        },
        Case {
            name: "json body that is not JSON",
            enc: Enc::Json,
            body: br#"{"device_id": "door-1", "seq": 9"#.to_vec(),
            http_status: 400,
            expect: vec![("rejected", None, Some("malformed"), None)],
        },
        Case {
            name: "cbor single, good",
            enc: Enc::Cbor,
            body: outpost_protocol::cbor::to_vec(&punch(10)),
            http_status: 201,
            expect: vec![("accepted", Some(10), None, None)],
        },
        Case {
            name: "cbor single, duplicate",
            enc: Enc::Cbor,
            body: outpost_protocol::cbor::to_vec(&punch(10)),
            http_status: 200,
            expect: vec![("duplicate", Some(10), None, None)],
        },
        Case {
            name: "cbor array: good, not a punch, malformed with seq, invalid, duplicate",
            enc: Enc::Cbor,
            body: cbor(|e| {
                e.array(5).unwrap();
                e.encode(punch(11)).unwrap();
                e.u8(7).unwrap();
                e.array(2).unwrap().str(DEVICE).unwrap().u64(12).unwrap();
                e.encode(out_of_range).unwrap();
                e.encode(punch(10)).unwrap();
            }),
            http_status: 400,
            expect: vec![
                ("accepted", Some(11), None, None),
                ("rejected", None, Some("malformed"), None),
                ("rejected", Some(12), Some("malformed"), None),
                ("rejected", Some(13), Some("time_out_of_range"), None),
                ("duplicate", Some(10), None, None),
            ],
        },
        Case {
            name: "cbor single, malformed: its seq is still recovered",
            enc: Enc::Cbor,
            body: cbor(|e| {
                e.array(2).unwrap().str(DEVICE).unwrap().u64(14).unwrap();
            }),
            http_status: 400,
            expect: vec![("rejected", Some(14), Some("malformed"), None)],
        },
        Case {
            name: "cbor body that is not CBOR",
            enc: Enc::Cbor,
            body: vec![0xff, 0x00],
            http_status: 400,
            expect: vec![("rejected", None, Some("malformed"), None)],
        },
    ]
}

/// Per-punch results as JSON values: JSON results as sent; CBOR `DeviceAck`s as
/// `{"seq", "status", "gateway_seq"?, "code"?}` (a null seq allowed).
fn view(enc: Enc, body: &[u8]) -> Vec<Value> {
    match enc {
        Enc::Json => match serde_json::from_slice::<Value>(body).expect("JSON results") {
            Value::Array(a) => a,
            one => vec![one],
        },
        Enc::Cbor => {
            let mut d = minicbor::Decoder::new(body);
            // An ack is an array of 4 whose first element is a number or null; a list of
            // acks is an array of arrays.
            let mut probe = d.clone();
            let list = probe.array().is_ok()
                && matches!(probe.datatype(), Ok(minicbor::data::Type::Array));
            let n = if list { d.array().unwrap().unwrap() } else { 1 };
            let out = (0..n).map(|_| cbor_ack(&mut d)).collect();
            assert_eq!(d.position(), body.len(), "trailing bytes in CBOR acks");
            out
        }
    }
}

/// One `[device_seq, status, gateway_seq, code]`; trailing absent fields may be left out
/// (as minicbor encodes `DeviceAck`), and `device_seq` may be null.
fn cbor_ack(d: &mut minicbor::Decoder<'_>) -> Value {
    use minicbor::data::Type;
    let n = d.array().unwrap().expect("definite-length ack");
    assert!((2..=4).contains(&n), "an ack has 2 to 4 elements, not {n}");
    let null = |d: &mut minicbor::Decoder<'_>| {
        let is = d.datatype().unwrap() == Type::Null;
        if is {
            d.null().unwrap();
        }
        is
    };
    let seq = (!null(d)).then(|| d.u64().unwrap());
    let status: AckStatus = d.decode().unwrap();
    let gateway_seq = (n > 2 && !null(d)).then(|| d.u64().unwrap());
    let code = (n > 3 && !null(d)).then(|| d.decode::<RejectCode>().unwrap().as_str());
    let mut v = json!({"seq": seq, "status": status.as_str()});
    if let Some(g) = gateway_seq {
        v["gateway_seq"] = g.into();
    }
    if let Some(c) = code {
        v["code"] = c.into();
    }
    v
}

/// The HTTP answer as per-punch results. A body the gateway could not read at all is
/// answered with `{"error": …}` alone (JSON even for a CBOR request); it stands for one
/// rejected punch of unknown seq, as MQTT answers it.
fn http_view(enc: Enc, status: u16, body: &[u8]) -> Vec<Value> {
    if body.first() == Some(&b'{') {
        let v: Value = serde_json::from_slice(body).unwrap();
        if let Some(Value::Array(results)) = v.get("results") {
            assert_eq!(enc, Enc::Json, "CBOR requests get CBOR results: {v}");
            assert!(
                (status < 400) == v.get("error").is_none(),
                "`error` with 4xx only: {v}"
            );
            return results.clone();
        }
        let e = &v["error"];
        let mut one = json!({"seq": null, "status": "rejected", "code": e["code"]});
        if enc == Enc::Json {
            one["message"] = e["message"].clone();
            if e["field"] != "" {
                one["field"] = e["field"].clone();
            }
        }
        return vec![one];
    }
    view(enc, body)
}

fn check_expected(case: &Case, transport: &str, results: &[Value]) {
    let ctx = format!("{transport}, {}: {results:?}", case.name);
    assert_eq!(results.len(), case.expect.len(), "{ctx}");
    for (r, (status, seq, code, field)) in results.iter().zip(&case.expect) {
        assert_eq!(r["status"], *status, "{ctx}");
        assert_eq!(r["seq"].as_u64(), *seq, "{ctx}");
        assert!(r.get("seq").is_some(), "seq is always there: {ctx}");
        assert_eq!(r["code"].as_str(), *code, "{ctx}");
        if case.enc == Enc::Json {
            // `field` only when one field is at fault, never "".
            assert_eq!(r.get("field").and_then(Value::as_str), *field, "{ctx}");
            if *status == "rejected" {
                assert!(
                    r["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "{ctx}"
                );
            }
        }
        assert_eq!(
            r["gateway_seq"].as_u64().is_some(),
            *status == "accepted",
            "{ctx}"
        );
    }
}

fn over_http(cases: &[Case]) -> Vec<Vec<Value>> {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(dir.path(), &[]);
    let token = gw.add_device(DEVICE);
    gw.start();
    let auth = format!("Bearer {token}");
    let out = cases
        .iter()
        .map(|c| {
            let ct = match c.enc {
                Enc::Json => "application/json",
                Enc::Cbor => "application/cbor",
            };
            let (status, body) = http(
                gw.addr,
                "POST",
                "/v1/punches",
                &[("Authorization", &auth), ("Content-Type", ct)],
                &c.body,
            )
            .unwrap();
            assert_eq!(
                status,
                c.http_status,
                "HTTP, {}: {}",
                c.name,
                String::from_utf8_lossy(&body)
            );
            http_view(c.enc, status, &body)
        })
        .collect();
    assert!(gw.terminate().is_some_and(|s| s.success()));
    out
}

/// A device on MQTT: an ack subscription and a channel of (topic, payload) received.
struct Device {
    client: Client,
    acks: mpsc::Receiver<(String, Vec<u8>)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Device {
    fn connect(port: u16) -> Device {
        let mut o = MqttOptions::new(
            format!("punch-body-test-{}", std::process::id()),
            "127.0.0.1",
            port,
        );
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut connection) = Client::new(o, 64);
        let (tx, acks) = mpsc::channel();
        let (sub_tx, sub_rx) = mpsc::channel();
        client
            .subscribe(format!("outpost/v1/{SITE}/+/ack"), QoS::AtLeastOnce)
            .unwrap();
        let thread = std::thread::spawn(move || {
            for ev in connection.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic, p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => panic!("test MQTT client: {e}"),
                }
            }
        });
        sub_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("SUBACK from mosquitto");
        Device {
            client,
            acks,
            thread: Some(thread),
        }
    }

    /// Publishes `body` on `device`'s punch topic (QoS 1).
    fn publish(&self, device: &str, body: &[u8]) {
        self.client
            .publish(
                format!("outpost/v1/{SITE}/{device}/punch"),
                QoS::AtLeastOnce,
                false,
                body.to_vec(),
            )
            .unwrap();
    }

    /// The next message on `device`'s ack topic.
    fn next_ack(&self, device: &str, deadline: Instant) -> Option<Vec<u8>> {
        let topic = format!("outpost/v1/{SITE}/{device}/ack");
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.acks.recv_timeout(left) {
                Ok((t, body)) if t == topic => return Some(body),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn over_mqtt(cases: &[Case]) -> Vec<Vec<Value>> {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(&dir.path().join("mosquitto"), &[]);
    let url = broker.url();
    let mut gw = Gateway::new(
        dir.path(),
        &[
            ("OUTPOST_MQTT__MODE", "external"),
            ("OUTPOST_MQTT__URL", &url),
        ],
    );
    gw.start();
    let dev = Device::connect(broker.port);

    // The gateway subscribes after it connects: until it has, a publish reaches no one.
    // Probe on another device's topic (a rejected text message, nothing stored) until the
    // gateway answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        dev.publish("probe", b"probe");
        if dev
            .next_ack("probe", Instant::now() + Duration::from_millis(500))
            .is_some()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never answered on MQTT"
        );
    }

    let out = cases
        .iter()
        .map(|c| {
            dev.publish(DEVICE, &c.body);
            let ack = dev
                .next_ack(DEVICE, Instant::now() + Duration::from_secs(20))
                .unwrap_or_else(|| panic!("MQTT, {}: no ack", c.name));
            view(c.enc, &ack)
        })
        .collect();
    drop(dev);
    assert!(gw.terminate().is_some_and(|s| s.success()));
    broker.stop();
    out
}

#[test]
fn http_and_mqtt_give_the_same_per_punch_results() {
    let cases = table();
    let http = over_http(&cases);
    let mqtt = over_mqtt(&cases);
    for ((case, h), m) in cases.iter().zip(&http).zip(&mqtt) {
        check_expected(case, "HTTP", h);
        check_expected(case, "MQTT", m);
        assert_eq!(h, m, "{}: HTTP and MQTT differ", case.name);
    }
}
