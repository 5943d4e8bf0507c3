//! Shared helpers for the uplink end-to-end tests: a relay, a gateway pointed at it, punches
//! posted in lab mode, and exactly-once checks against the relay's query API and counters.
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

/// A punch's key: (device_id, seq).
pub type Key = (String, u64);

/// What the relay must hold for one gateway, checked by [`assert_delivered`].
pub struct Delivery<'a> {
    /// The gateway whose punches these are.
    pub gateway_id: &'a str,
    /// Punches the gateway acknowledged to a device: each must be stored exactly once.
    pub acked: &'a BTreeSet<Key>,
    /// Punches whose request got no answer (cut by a kill): the gateway may or may not
    /// have taken each, so each is stored at most once. Empty when every request was
    /// answered; then the relay holds exactly `acked`.
    pub unconfirmed: &'a BTreeSet<Key>,
    /// The gateway legitimately sent new punches under `gateway_seq` values it had used
    /// before (a restored backup): the relay's `seq_reuse` may be non-zero and one epoch
    /// may hold a `gateway_seq` twice, so the per-epoch sequence check is left out.
    pub seq_reuse: bool,
}

/// Asserts that the relay holds exactly `expected` for `gateway_id`, each once, where
/// `expected` is every distinct punch the gateway was sent (all requests answered).
/// See [`assert_delivered`] for what is checked.
pub fn assert_exactly_once(relay: &Relay, gateway_id: &str, expected: &BTreeSet<Key>) {
    assert_delivered(
        relay,
        &Delivery {
            gateway_id,
            acked: expected,
            unconfirmed: &BTreeSet::new(),
            seq_reuse: false,
        },
    );
}

/// Asserts exactly-once delivery as `d` describes it.
///
/// The relay's punch key is unique, so its punch rows alone can never show a punch
/// stored twice: a second copy under another `gateway_seq` would be counted as a
/// duplicate (same content) or held as a conflict (different content). So besides "every
/// acked punch is stored, nothing else is", this checks the relay's own accounting:
/// - the conflicts and rejected tables are empty (nothing held aside);
/// - the gateway's `records` counter (`GET /v1/gateways`) equals the number of distinct
///   punches stored for it (with no unconfirmed punches: the number sent), and its
///   `conflicts` and `rejected` counters are 0;
/// - unless `d.seq_reuse`: its `seq_reuse` counter is 0, in each journal epoch the stored
///   `gateway_seq` values are exactly 1..=n, each once, and the last epoch's `acked_through`
///   is its n. The gateway numbers its journal densely from 1 and sends all of it, so a
///   hole, or a watermark past n, means some `gateway_seq` did not carry a new punch: the
///   gateway journaled a punch twice and the relay counted the second copy as a duplicate.
///
/// `tests/tests/exactly_once_check.rs` shows each of these failing.
pub fn assert_delivered(relay: &Relay, d: &Delivery) {
    let gw = d.gateway_id;
    let rows: Vec<Value> = relay_rows(relay)
        .into_iter()
        .filter(|r| r["gateway_id"] == gw)
        .collect();
    let mut got: BTreeMap<Key, usize> = BTreeMap::new();
    let mut seqs: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for r in &rows {
        let key = (
            r["device_id"].as_str().expect("device_id").to_string(),
            r["seq"].as_u64().expect("seq"),
        );
        *got.entry(key).or_insert(0) += 1;
        seqs.entry(r["journal_epoch"].as_u64().expect("journal_epoch"))
            .or_default()
            .push(r["gateway_seq"].as_u64().expect("gateway_seq"));
    }
    let doubled: Vec<_> = got.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(doubled.is_empty(), "stored more than once: {doubled:?}");
    let missing: Vec<_> = d.acked.iter().filter(|k| !got.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged punches missing at the relay, e.g. {:?}",
        missing.len(),
        d.acked.len(),
        &missing[..missing.len().min(5)]
    );
    let unknown: Vec<_> = got
        .keys()
        .filter(|k| !d.acked.contains(*k) && !d.unconfirmed.contains(*k))
        .collect();
    assert!(
        unknown.is_empty(),
        "{} punches at the relay that were never sent or were refused, e.g. {:?}",
        unknown.len(),
        &unknown[..unknown.len().min(5)]
    );

    for table in ["conflicts", "rejected"] {
        let (code, body) = relay
            .admin_get(&format!("/v1/{table}"))
            .unwrap_or_else(|e| panic!("GET /v1/{table}: {e:#}"));
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).expect("JSON");
        let items = v["items"].as_array().expect("items");
        assert!(
            items.is_empty(),
            "the relay's {table} table is not empty: {}",
            Value::Array(items.iter().take(3).cloned().collect())
        );
    }

    let info = relay_gateway(relay, gw).unwrap_or_else(|| panic!("{gw} not in /v1/gateways"));
    assert_eq!(
        info["records"].as_u64(),
        Some(got.len() as u64),
        "the relay's records counter is not the number of distinct punches stored: {info}"
    );
    if d.unconfirmed.is_empty() {
        assert_eq!(got.len(), d.acked.len(), "distinct punches sent vs stored");
    }
    assert_eq!(info["conflicts"], 0, "{info}");
    assert_eq!(info["rejected"], 0, "{info}");
    if !d.seq_reuse {
        assert_eq!(info["seq_reuse"], 0, "{info}");
        let last_epoch = info["journal_epoch"].as_u64();
        for (epoch, mut s) in seqs {
            s.sort_unstable();
            let n = s.len() as u64;
            // The watermark covers every gateway_seq sent; past n, one carried no new punch.
            if Some(epoch) == last_epoch {
                assert_eq!(
                    info["acked_through"].as_u64(),
                    Some(n),
                    "epoch {epoch}: acked_through is not the {n} punches stored \
                     (a gateway_seq that carried no new punch: a punch journaled twice?): {info}"
                );
            }
            assert!(
                s.iter().copied().eq(1..=n),
                "epoch {epoch}: the stored gateway_seq values are not 1..={n} each once \
                 (a gateway_seq that carried no new punch: a punch journaled twice?): \
                 first {:?}, last {:?}",
                &s[..s.len().min(5)],
                &s[s.len().saturating_sub(5)..]
            );
        }
    }
    eprintln!(
        "exactly once at the relay for {gw}: {} punches ({} acked, {} unconfirmed sent), \
         records counter {}, no conflicts, no rejected, sequence check {}",
        got.len(),
        d.acked.len(),
        d.unconfirmed.len(),
        info["records"],
        if d.seq_reuse {
            "skipped (seq reuse expected)"
        } else {
            "passed"
        }
    );
}

/// What a device learned about the punches it posted.
#[derive(Debug, Default)]
pub struct Posted {
    /// Punches the gateway acknowledged (accepted or duplicate).
    pub acked: BTreeSet<Key>,
    /// Punches whose request got no answer (connection refused or cut): the gateway may
    /// or may not have taken them.
    pub unconfirmed: BTreeSet<Key>,
}

impl Posted {
    /// Adds `other`'s punches.
    pub fn extend(&mut self, other: Posted) {
        self.acked.extend(other.acked);
        self.unconfirmed.extend(other.unconfirmed);
    }
}

/// Like [`post`], to a gateway address (usable from a thread while the test kills and
/// restarts the gateway). Returns the acknowledged punches.
pub fn post_to(
    addr: std::net::SocketAddr,
    device: &str,
    seqs: std::ops::Range<u64>,
) -> BTreeSet<Key> {
    post_to_tracked(addr, device, seqs).acked
}

/// Like [`post_to`], also returning the punches whose request got no answer.
pub fn post_to_tracked(
    addr: std::net::SocketAddr,
    device: &str,
    seqs: std::ops::Range<u64>,
) -> Posted {
    let mut out = Posted::default();
    let all: Vec<u64> = seqs.collect();
    for chunk in all.chunks(100) {
        let body = Value::Array(chunk.iter().map(|s| punch_json(device, *s)).collect());
        let answer = outpost_tests::proc::http(
            addr,
            "POST",
            "/v1/punches",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        let bytes = match answer {
            Ok((200..=299, bytes)) => bytes,
            // An answer that refuses the request: nothing of it was taken.
            Ok(_) => continue,
            Err(_) => {
                out.unconfirmed
                    .extend(chunk.iter().map(|s| (device.to_string(), *s)));
                continue;
            }
        };
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        for (s, r) in chunk
            .iter()
            .zip(v["results"].as_array().cloned().unwrap_or_default())
        {
            if matches!(r["status"].as_str(), Some("accepted") | Some("duplicate")) {
                out.acked.insert((device.to_string(), *s));
            }
        }
    }
    out
}

/// A PostgreSQL server and a relay store on it. Panics, naming the package to install,
/// when PostgreSQL cannot start: a missing prerequisite fails the test rather than passing
/// it with no PostgreSQL coverage (`tests/run` installs it).
pub fn postgres() -> (outpost_tests::postgres::PgServer, StoreKind) {
    match outpost_tests::postgres::PgServer::start_with(false) {
        Ok(pg) => {
            let url = pg.url();
            (pg, StoreKind::Postgres(url))
        }
        Err(e) => panic!(
            "PostgreSQL is required for this test and could not start \
             (install it: apt-get install postgresql, or run tests/run): {e:#}"
        ),
    }
}
