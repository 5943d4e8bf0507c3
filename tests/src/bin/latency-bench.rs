//! End-to-end latency benchmark: a device POSTs a punch to the gateway, and a webhook
//! receiver gets it from the relay.
//!
//! ```text
//! cargo run -p outpost-tests --profile bench-fast --bin latency-bench [-- --runs 3 --punches 500 --rate 20 --warmup 50 --burst 0 --tuned-age 0ms --only defaults,tuned]
//! ```
//!
//! Each run starts, on loopback, the real binaries (same build profile as this one, or
//! `OUTPOST_BIN_DIR`):
//!
//! - a relay with the embedded sled store and one webhook output (`allow_private = true`,
//!   `batch_max` left at its default of 100 unless `--batch-max` is given) pointing at
//! - the webhook receiver of [`outpost_tests::webhook`] (it verifies every signature, and
//!   records when each call arrived),
//! - a gateway enrolled to the relay (`outpost-relay gateway add`, uplink over `ws://`),
//!   with device authentication off and no rate limit, so a device is one plain POST.
//!
//! The device posts single punches to the gateway's `POST /v1/punches`, each in its own
//! task at its scheduled time (an open loop: a slow answer does not delay the next punch):
//! steadily at `--rate` punches/s, or with `--burst K`, K punches at once every K/rate
//! seconds (the same average rate). `--warmup` punches go first and are not counted (the
//! uplink connects, caches warm); then `--punches` are measured. A punch's latency is from
//! just before its POST to the arrival of the webhook call carrying its `id` (the punch key
//! `site/device/seq`), both on this process's monotonic clock.
//!
//! Two modes, each with fresh processes and data for every run:
//!
//! - `defaults`: the gateway's uplink defaults (`uplink.batch_max_age` 1 s,
//!   `batch_max_records` 5000, `window` 8) and the relay's;
//! - `tuned`: `uplink.batch_max_age = --tuned-age` (default `0ms`: a batch is cut as soon
//!   as the journal's durable watermark moves). The relay has no further latency knob: an
//!   output worker is woken by the store's commit notification (its 1 s fallback poll is a
//!   constant, `SupervisorSettings::new`, and only matters for a lost notification), and
//!   `batch_max` is a cap (a call carries whatever is stored, up to it), so it stays 100.
//!
//! Printed per run and mode: p50, p90, p99 and max in ms, and where the median punch's time
//! went: POST to its 201 (the gateway's group commit and fsync), POST to the item's
//! `stored_at` (the relay's commit, before its fsync; wall clock, ms resolution, same
//! machine), and `stored_at` to the call's arrival. The summary is the median over runs of each per-run figure.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outpost_tests::gateway::Gateway;
use outpost_tests::relay::{Relay, StoreKind};
use outpost_tests::webhook::{random_secret, WebhookReceiver};
use serde_json::{json, Value};

const GATEWAY: &str = "gw-lat";
const SITE: &str = "LAT01";
const DEVICE: &str = "dev-lat";
/// How long after the last POST every punch must have reached the receiver.
const DELIVERY_LIMIT: Duration = Duration::from_secs(60);

struct Args {
    runs: usize,
    punches: u64,
    warmup: u64,
    rate: f64,
    burst: u64,
    tuned_age: String,
    batch_max: Option<usize>,
    only: Option<Vec<String>>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        runs: 3,
        punches: 500,
        warmup: 50,
        rate: 20.0,
        burst: 0,
        tuned_age: "0ms".into(),
        batch_max: None,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--runs" => a.runs = v()?.parse()?,
            "--punches" => a.punches = v()?.parse()?,
            "--warmup" => a.warmup = v()?.parse()?,
            "--rate" => a.rate = v()?.parse()?,
            "--burst" => a.burst = v()?.parse()?,
            "--tuned-age" => a.tuned_age = v()?,
            "--batch-max" => a.batch_max = Some(v()?.parse()?),
            "--only" => a.only = Some(v()?.split(',').map(str::to_string).collect()),
            other => bail!("unknown argument {other}"),
        }
    }
    if a.runs == 0 || a.punches == 0 || a.rate.is_nan() || a.rate <= 0.0 {
        bail!("--runs, --punches and --rate must be more than 0");
    }
    Ok(a)
}

/// The `p` quantile (0..=1) of sorted `v`, nearest rank.
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    pct(&v, 0.5)
}

/// One mode: its name and the gateway settings on top of the bench's.
struct Mode {
    name: &'static str,
    gateway_env: Vec<(&'static str, String)>,
}

/// The figures of one run, ms.
#[derive(Debug, Clone, Copy)]
struct Figures {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    /// Medians of the segments: POST to its 201 (the gateway's commit and fsync); POST to
    /// the relay's `stored_at`; `stored_at` to the webhook call's arrival.
    http: f64,
    to_relay: f64,
    relay_to_hook: f64,
}

impl Figures {
    const NAMES: [&'static str; 7] = [
        "p50",
        "p90",
        "p99",
        "max",
        "POST->201",
        "POST->stored_at",
        "stored_at->hook",
    ];

    fn values(&self) -> [f64; 7] {
        [
            self.p50,
            self.p90,
            self.p99,
            self.max,
            self.http,
            self.to_relay,
            self.relay_to_hook,
        ]
    }

    fn line(&self) -> String {
        Self::NAMES
            .iter()
            .zip(self.values())
            .map(|(n, v)| format!("{n} {v:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// When each punch was sent and answered.
#[derive(Default)]
struct Sent {
    /// seq → (sent, answered 201).
    at: HashMap<u64, (Instant, Instant)>,
}

/// The JSON of punch `seq` from the bench's device.
fn punch(seq: u64) -> Value {
    json!({"device_id": DEVICE, "seq": seq, "subject": format!("EMP-{:04}", seq % 400),
           "kind": if seq % 2 == 0 { "in" } else { "out" }, "verify": "card",
           "time": "2026-11-22T07:58:03+02:00"})
}

/// The receiver's item id of punch `seq` (the relay's punch key; no escaping is needed
/// for these ids).
fn item_id(seq: u64) -> String {
    format!("{SITE}/{DEVICE}/{seq}")
}

/// Posts punches `seqs` on the schedule of the module docs; returns when every POST was
/// answered 201. Errors name the first punch that was not.
async fn post_schedule(
    url: &str,
    seqs: std::ops::RangeInclusive<u64>,
    rate: f64,
    burst: u64,
    sent: Arc<Mutex<Sent>>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let per_group = burst.max(1);
    let first = *seqs.start();
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for seq in seqs {
        let group = (seq - first) / per_group;
        let at = start + Duration::from_secs_f64((group * per_group) as f64 / rate);
        tokio::time::sleep_until(at).await;
        let (client, url, sent) = (client.clone(), url.to_string(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let resp = client.post(&url).json(&punch(seq)).send().await?;
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            let answered = Instant::now();
            if status != 201 {
                bail!("punch {seq}: the gateway answered {status}: {body}");
            }
            sent.lock()
                .unwrap_or_else(|p| p.into_inner())
                .at
                .insert(seq, (t, answered));
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Unix ms of an RFC 3339 stamp in an item.
fn stamp_ms(item: &Value, field: &str) -> anyhow::Result<i64> {
    let s = item[field]
        .as_str()
        .with_context(|| format!("item without {field}: {item}"))?;
    outpost_protocol::json::parse_time(s)
        .map(|(ms, _)| ms)
        .map_err(|e| anyhow::anyhow!("{field} {s:?}: {e:?}"))
}

/// One run of `mode`: fresh relay, receiver and gateway in `dir`; returns its figures.
fn run(a: &Args, mode: &Mode, dir: &Path) -> anyhow::Result<Figures> {
    let secret = random_secret();
    let receiver = WebhookReceiver::start(&secret)?;
    let secret_file = dir.join("hook.whsec");
    std::fs::write(&secret_file, format!("{secret}\n"))?;
    let batch_max = a
        .batch_max
        .map(|b| format!(", batch_max = {b}"))
        .unwrap_or_default();
    let outputs = format!(
        "[{{name = \"latency\", url = \"{}\", secret_file = \"{}\", allow_private = true{batch_max}}}]",
        receiver.url(),
        secret_file.display()
    );
    let mut relay = Relay::start(
        StoreKind::Sled,
        &[
            ("OUTPOST_LOG__LEVEL", "warn"),
            ("OUTPOST_OUTPUTS__WEBHOOK", &outputs),
        ],
    )?;
    let token = relay.add_gateway(GATEWAY, SITE)?;
    let token_file = dir.join("relay.token");
    std::fs::write(&token_file, &token)?;
    let relays = format!("[\"{}\"]", relay.ws_url());
    let token_file = token_file.display().to_string();
    let mut env: Vec<(&str, &str)> = vec![
        ("OUTPOST_GATEWAY__ID", GATEWAY),
        ("OUTPOST_GATEWAY__SITE", SITE),
        ("OUTPOST_AUTH__REQUIRED", "false"),
        ("OUTPOST_UPLINK__RELAYS", &relays),
        ("OUTPOST_UPLINK__TOKEN_FILE", &token_file),
        ("OUTPOST_UPLINK__BACKOFF_MIN", "100ms"),
        ("OUTPOST_UPLINK__BACKOFF_MAX", "1s"),
        ("RUST_LOG", "warn"),
    ];
    env.extend(mode.gateway_env.iter().map(|(k, v)| (*k, v.as_str())));
    let mut gw = Gateway::new(dir, &env);
    gw.try_start(Duration::from_secs(60))
        .map_err(|e| anyhow::anyhow!(e))?;

    let url = format!("http://{}/v1/punches", gw.addr);
    let sent = Arc::new(Mutex::new(Sent::default()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (warmup, n) = (a.warmup, a.punches);
    if warmup > 0 {
        rt.block_on(post_schedule(
            &url,
            1..=warmup,
            a.rate,
            a.burst,
            Arc::new(Mutex::new(Sent::default())),
        ))?;
        receiver
            .wait_for(warmup as usize, DELIVERY_LIMIT)
            .context("warm-up punches")?;
    }
    let measured = warmup + 1..=warmup + n;
    rt.block_on(post_schedule(
        &url,
        measured.clone(),
        a.rate,
        a.burst,
        sent.clone(),
    ))?;
    receiver
        .wait_for((warmup + n) as usize, DELIVERY_LIMIT)
        .with_context(|| format!("relay log:\n{}", relay.log()))?;

    // The arrival of each id: the first call answered 200 that carried it.
    let mut arrived: HashMap<String, Instant> = HashMap::new();
    for call in receiver.calls().into_iter().filter(|c| c.status == 200) {
        for id in call.item_ids {
            arrived.entry(id).or_insert(call.at);
        }
    }
    let items: HashMap<String, Value> = receiver
        .items()
        .into_iter()
        .filter_map(|i| Some((i["id"].as_str()?.to_string(), i)))
        .collect();
    // Instants to wall ms, to compare with the items' stamps.
    let (base_instant, base_ms) = (Instant::now(), outpost_ops::time::now_ms());
    let wall = |t: Instant| base_ms as f64 - (base_instant - t).as_secs_f64() * 1000.0;

    let sent = std::mem::take(&mut sent.lock().unwrap_or_else(|p| p.into_inner()).at);
    let (mut total, mut http, mut to_relay, mut relay_to_hook) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for seq in measured {
        let id = item_id(seq);
        let (&(t_sent, t_answered), Some(&t_hook), Some(item)) = (
            sent.get(&seq).context("unsent punch")?,
            arrived.get(&id),
            items.get(&id),
        ) else {
            bail!("punch {id} was not received");
        };
        let stored = stamp_ms(item, "stored_at")? as f64;
        total.push((t_hook - t_sent).as_secs_f64() * 1000.0);
        http.push((t_answered - t_sent).as_secs_f64() * 1000.0);
        to_relay.push(stored - wall(t_sent));
        relay_to_hook.push(wall(t_hook) - stored);
    }
    if receiver.bad_signatures() > 0 || !receiver.malformed().is_empty() {
        bail!(
            "the receiver refused calls: {} bad signatures, malformed: {:?}",
            receiver.bad_signatures(),
            receiver.malformed()
        );
    }
    total.sort_by(|a, b| a.total_cmp(b));
    let figures = Figures {
        p50: pct(&total, 0.5),
        p90: pct(&total, 0.9),
        p99: pct(&total, 0.99),
        max: total.last().copied().unwrap_or(f64::NAN),
        http: median(http),
        to_relay: median(to_relay),
        relay_to_hook: median(relay_to_hook),
    };
    let calls = receiver.calls().len();

    gw.terminate();
    if !relay.stop() {
        bail!("the relay did not stop cleanly; log:\n{}", relay.log());
    }
    drop(receiver);
    println!(
        "  {} webhook calls for {} punches",
        calls,
        warmup + a.punches
    );
    Ok(figures)
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let modes = [
        Mode {
            name: "defaults",
            gateway_env: Vec::new(),
        },
        Mode {
            name: "tuned",
            gateway_env: vec![("OUTPOST_UPLINK__BATCH_MAX_AGE", a.tuned_age.clone())],
        },
    ];
    let want = |k: &str| a.only.as_ref().is_none_or(|o| o.iter().any(|x| x == k));
    let schedule = if a.burst > 0 {
        format!(
            "bursts of {} every {:.2} s ({} punches/s on average)",
            a.burst,
            a.burst as f64 / a.rate,
            a.rate
        )
    } else {
        format!("steady {} punches/s", a.rate)
    };
    println!(
        "latency-bench: device POST to webhook arrival, loopback, sled relay; {} measured \
         punches after {} warm-up, {schedule}; {} runs per mode; webhook batch_max {}",
        a.punches,
        a.warmup,
        a.runs,
        a.batch_max
            .map_or("100 (default)".to_string(), |b| b.to_string())
    );
    let mut summary = Vec::new();
    for mode in modes.iter().filter(|m| want(m.name)) {
        let settings = if mode.gateway_env.is_empty() {
            "gateway and relay defaults".to_string()
        } else {
            mode.gateway_env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!("{}: {settings}", mode.name);
        let mut runs = Vec::new();
        for i in 0..a.runs {
            let dir = tempfile::Builder::new()
                .prefix("latency-bench-")
                .tempdir()?;
            let f = run(&a, mode, dir.path())?;
            println!("  run {}: {} (ms)", i + 1, f.line());
            runs.push(f);
        }
        let medians: Vec<String> = Figures::NAMES
            .iter()
            .enumerate()
            .map(|(k, n)| {
                format!(
                    "{n} {:.1}",
                    median(runs.iter().map(|f| f.values()[k]).collect())
                )
            })
            .collect();
        let line = format!("{}: {} ms", mode.name, medians.join(", "));
        println!("{line}");
        summary.push(line);
    }
    println!(
        "\nsummary (medians over {} runs of each run's figure):",
        a.runs
    );
    for l in summary {
        println!("  {l}");
    }
    Ok(())
}
