//! Shared helpers for the uplink end-to-end tests: a relay, a gateway pointed at it, punches
//! posted in lab mode, and exactly-once checks against the relay's query API.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use outpost_tests::gateway::Gateway;
use outpost_tests::relay::{Relay, StoreKind};
use serde_json::{json, Value};

/// A relay (sled or PostgreSQL) that answers big query pages.
pub fn relay(store: StoreKind) -> Relay {
    Relay::start(store, &[("OUTPOST_LIMITS__MAX_QUERY_LIMIT", "10000")]).expect("start relay")
}

/// Uplink settings that make tests quick: short batch age, short backoff, fast pings.
pub const FAST: &[(&str, &str)] = &[
    ("OUTPOST_UPLINK__BATCH_MAX_AGE", "50ms"),
    ("OUTPOST_UPLINK__BACKOFF_MIN", "100ms"),
    ("OUTPOST_UPLINK__BACKOFF_MAX", "1s"),
    ("OUTPOST_UPLINK__PING_INTERVAL", "1s"),
    ("OUTPOST_UPLINK__PING_TIMEOUT", "2s"),
    ("OUTPOST_UPLINK__ACK_TIMEOUT", "10s"),
    ("OUTPOST_UPLINK__CONNECT_TIMEOUT", "5s"),
];

/// A gateway (lab mode, not started) in `dir` forwarding to `url` with `token`. `extra`
/// adds or replaces settings.
pub fn gateway(dir: &Path, url: &str, token: &str, extra: &[(&str, &str)]) -> Gateway {
    std::fs::create_dir_all(dir).unwrap();
    let token_file = dir.join("relay.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let relays = format!("[\"{url}\"]");
    let token_path = token_file.display().to_string();
    let mut env: Vec<(&str, &str)> = vec![
        ("OUTPOST_AUTH__REQUIRED", "false"),
        ("OUTPOST_UPLINK__RELAYS", relays.as_str()),
        ("OUTPOST_UPLINK__TOKEN_FILE", token_path.as_str()),
    ];
    env.extend_from_slice(FAST);
    env.extend_from_slice(extra);
    Gateway::new(dir, &env)
}

/// The JSON of punch `seq` of `device`.
pub fn punch_json(device: &str, seq: u64) -> Value {
    // 2026-11-22T06:00:00Z + seq seconds.
    let ms = (1_795_327_200 + seq as i64) * 1000;
    json!({
        "device_id": device,
        "seq": seq,
        "subject": format!("EMP-{:04}", seq % 500),
        "kind": if seq % 2 == 0 { "in" } else { "out" },
        "verify": "card",
        "time": outpost_protocol::json::format_time(ms, Some(120)),
    })
}

/// Posts punches `seqs` of `device` in arrays of 100. Returns the (device, seq) keys the
/// gateway acknowledged (accepted or duplicate). Requests that fail (the gateway was
/// killed) are skipped: their punches were never acknowledged.
pub fn post(gw: &Gateway, device: &str, seqs: std::ops::Range<u64>) -> BTreeSet<(String, u64)> {
    let mut acked = BTreeSet::new();
    let all: Vec<u64> = seqs.collect();
    for chunk in all.chunks(100) {
        let body = Value::Array(chunk.iter().map(|s| punch_json(device, *s)).collect());
        let v = match gw.post_punches(None, &body) {
            Ok((200..=299, v)) => v,
            Ok((code, v)) => {
                let text = v.to_string();
                eprintln!(
                    "POST /v1/punches answered {code}: {}",
                    &text[..text.len().min(300)]
                );
                continue;
            }
            Err(_) => continue,
        };
        for (s, r) in chunk
            .iter()
            .zip(v["results"].as_array().cloned().unwrap_or_default())
        {
            match r["status"].as_str() {
                Some("accepted") | Some("duplicate") => {
                    acked.insert((device.to_string(), *s));
                }
                _ => {}
            }
        }
    }
    acked
}

/// Every punch at the relay: (device, seq) → how many rows.
pub fn relay_keys(relay: &Relay) -> BTreeMap<(String, u64), usize> {
    let mut out = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/punches?limit=10000&cursor={c}"),
            None => "/v1/punches?limit=10000".to_string(),
        };
        let (code, body) = relay.admin_get(&path).expect("query the relay");
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        for item in v["items"].as_array().unwrap() {
            let key = (
                item["device_id"].as_str().unwrap().to_string(),
                item["seq"].as_u64().unwrap(),
            );
            *out.entry(key).or_insert(0) += 1;
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

/// Every punch row at the relay, as JSON.
pub fn relay_rows(relay: &Relay) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/punches?limit=10000&cursor={c}"),
            None => "/v1/punches?limit=10000".to_string(),
        };
        let (_, body) = relay.admin_get(&path).expect("query the relay");
        let v: Value = serde_json::from_slice(&body).unwrap();
        out.extend(v["items"].as_array().unwrap().iter().cloned());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

/// The relay's `/v1/gateways` entry for `gateway_id`.
pub fn relay_gateway(relay: &Relay, gateway_id: &str) -> Option<Value> {
    let (_, body) = relay.admin_get("/v1/gateways").ok()?;
    let v: Value = serde_json::from_slice(&body).ok()?;
    v["gateways"]
        .as_array()?
        .iter()
        .find(|g| g["gateway_id"] == gateway_id)
        .cloned()
}

/// Records the relay stored for `gateway_id` (0 when unknown or unreachable).
pub fn relay_count(relay: &Relay, gateway_id: &str) -> u64 {
    relay_gateway(relay, gateway_id).map_or(0, |g| g["records"].as_u64().unwrap_or(0))
}

/// The gateway's `/v1/status`.
pub fn status(gw: &Gateway) -> Value {
    let (code, body) = gw.admin_get("/v1/status").expect("gateway status");
    assert_eq!(code, 200);
    serde_json::from_slice(&body).unwrap()
}

/// Polls `f` every 100 ms until it is true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the gateway's journal is empty (everything acked and trimmed).
pub fn wait_drained(gw: &Gateway, limit: Duration) -> bool {
    wait_until(limit, || {
        gw.admin_get("/v1/status")
            .ok()
            .and_then(|(c, b)| (c == 200).then_some(b))
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v["journal"]["records"] == 0 && v["uplink"]["unsent_records"] == 0)
    })
}

/// Asserts that the relay holds exactly `expected`, each once.
pub fn assert_exactly_once(relay: &Relay, expected: &BTreeSet<(String, u64)>) {
    let got = relay_keys(relay);
    let doubled: Vec<_> = got.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(doubled.is_empty(), "stored more than once: {doubled:?}");
    let missing: Vec<_> = expected
        .iter()
        .filter(|k| !got.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged punches missing at the relay, e.g. {missing:?}",
        expected.iter().filter(|k| !got.contains_key(*k)).count(),
        expected.len()
    );
}

/// Like [`post`], to a gateway address (usable from a thread while the test kills and
/// restarts the gateway).
pub fn post_to(
    addr: std::net::SocketAddr,
    device: &str,
    seqs: std::ops::Range<u64>,
) -> BTreeSet<(String, u64)> {
    let mut acked = BTreeSet::new();
    let all: Vec<u64> = seqs.collect();
    for chunk in all.chunks(100) {
        let body = Value::Array(chunk.iter().map(|s| punch_json(device, *s)).collect());
        let Ok((200..=299, bytes)) = outpost_tests::proc::http(
            addr,
            "POST",
            "/v1/punches",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        ) else {
            continue;
        };
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        for (s, r) in chunk
            .iter()
            .zip(v["results"].as_array().cloned().unwrap_or_default())
        {
            if matches!(r["status"].as_str(), Some("accepted") | Some("duplicate")) {
                acked.insert((device.to_string(), *s));
            }
        }
    }
    acked
}

/// A PostgreSQL server and a relay store on it, or `None` (with a note) when PostgreSQL is
/// not installed here. `tests/run` installs it, so CI always runs these.
pub fn postgres() -> Option<(outpost_tests::postgres::PgServer, StoreKind)> {
    match outpost_tests::postgres::PgServer::start_with(false) {
        Ok(pg) => {
            let url = pg.url();
            Some((pg, StoreKind::Postgres(url)))
        }
        Err(e) => {
            eprintln!("SKIPPED (PostgreSQL unavailable: {e:#})");
            None
        }
    }
}
