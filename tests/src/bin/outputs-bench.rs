//! Output benchmark: delivery throughput, in punches/s, from a backlog.
//!
//! ```text
//! cargo run -p outpost-tests --profile bench-fast --bin outputs-bench [-- --runs 3 --punches 200000 --intake 50000 --only webhook1,webhook100,nats,webhook100+intake,nats+intake]
//! ```
//!
//! One relay (the real binary, embedded sled store) is started with no output, and a backlog
//! of `punches` punches is loaded into it through `POST /v1/batches` (1000-record batches
//! from one gateway). It is then stopped. Each run restarts it on the same data dir with one
//! output under a name never used before, so the output's durable cursor starts before the
//! first punch and the whole backlog is undelivered. The clock starts when the relay process
//! is spawned and stops when the receiver holds every stored punch:
//!
//! - webhook: a receiver in this process that parses each call and counts distinct item
//!   `id`s (it does not check signatures: the figure is the relay's, not a receiver's);
//! - NATS: a private `nats-server -js` per run; done when the stream's message count
//!   (JetStream drops duplicates by `Nats-Msg-Id`) reaches the stored total.
//!
//! Cases: webhook with `batch_max` 1 and 100, NATS (its default `batch_max` 1000), and the
//! `+intake` variants, in which `intake` further punches (another gateway) are posted as fast
//! as the relay takes them while it delivers; the run ends when the receiver holds the
//! backlog and those. Those runs also print the intake rate seen meanwhile. Medians over
//! `runs` runs are printed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use outpost_tests::nats::NatsServer;
use outpost_tests::relay::{batch, frame, punches, records, Relay, StoreKind};

const BACKLOG_GW: &str = "gw-backlog";
const BACKLOG_SITE: &str = "BL001";
const PER_BATCH: u64 = 1000;

struct Args {
    runs: usize,
    punches: u64,
    intake: u64,
    only: Option<Vec<String>>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        runs: 3,
        punches: 200_000,
        intake: 50_000,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--runs" => a.runs = v()?.parse()?,
            "--punches" => a.punches = v()?.parse()?,
            "--intake" => a.intake = v()?.parse()?,
            "--only" => a.only = Some(v()?.split(',').map(str::to_string).collect()),
            other => bail!("unknown argument {other}"),
        }
    }
    if a.runs == 0 || a.punches == 0 {
        bail!("--runs and --punches must be at least 1");
    }
    Ok(a)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The webhook receiver: distinct item ids of every call, answered 200.
#[derive(Default)]
struct Counter {
    ids: Mutex<HashSet<String>>,
}

impl Counter {
    fn count(&self) -> usize {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

async fn hook(State(c): State<Arc<Counter>>, body: Bytes) -> StatusCode {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let Some(items) = v["data"]["items"].as_array() else {
        return StatusCode::BAD_REQUEST;
    };
    let mut ids = c.ids.lock().unwrap_or_else(|p| p.into_inner());
    for item in items {
        if let Some(id) = item["id"].as_str() {
            ids.insert(id.to_string());
        }
    }
    StatusCode::OK
}

/// A counting receiver on a random port; returns its URL and counter (stops with the task).
async fn start_receiver() -> anyhow::Result<(String, Arc<Counter>, tokio::task::JoinHandle<()>)> {
    let counter = Arc::new(Counter::default());
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(counter.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, counter, task))
}

/// Messages in the stream `OUTPOST` now; 0 while it does not exist yet.
async fn stream_messages(js: &async_nats::jetstream::Context) -> u64 {
    match js.get_stream("OUTPOST").await {
        Ok(mut st) => st.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Posts punches `seqs` of `gateway`/`site` in 1000-record batches, one after the other.
async fn post_punches(
    base: String,
    token: String,
    gateway: String,
    site: String,
    seqs: std::ops::RangeInclusive<u64>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let (mut first, last) = (*seqs.start(), *seqs.end());
    while first <= last {
        let end = (first + PER_BATCH - 1).min(last);
        let b = batch(&gateway, &site, 1, records(&punches(first..=end), first));
        let resp = client
            .post(format!("{base}/v1/batches"))
            .bearer_auth(&token)
            .body(frame(&b))
            .send()
            .await?;
        if resp.status() != 200 {
            bail!("POST /v1/batches: {}", resp.status());
        }
        first = end + 1;
    }
    Ok(())
}

/// The relay on `data`, with `env` on top of the bench's settings (not started).
fn relay_on(data: &std::path::Path, env: &[(&str, &str)]) -> Relay {
    let mut all = vec![("OUTPOST_LOG__LEVEL", "warn")];
    all.extend_from_slice(env);
    Relay::prepare(data, StoreKind::Sled, &all)
}

async fn restart(mut r: Relay) -> anyhow::Result<Relay> {
    tokio::task::spawn_blocking(move || r.restart().map(|()| r)).await?
}

async fn stop(mut r: Relay) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || {
        if !r.stop() {
            bail!("the relay did not stop cleanly; log:\n{}", r.log());
        }
        Ok(())
    })
    .await?
}

/// One case: how its output is declared and how delivered punches are counted.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Webhook { batch_max: usize },
    Nats,
}

struct Bench {
    dir: tempfile::TempDir,
    /// Punches stored in the relay so far (the backlog plus earlier intake runs).
    stored: u64,
    /// The next output name's number (each run's output is new, so starts from the first).
    next_output: usize,
    /// The next intake gateway's number (each intake run sends new punches).
    next_intake: usize,
}

impl Bench {
    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    async fn load(a: &Args) -> anyhow::Result<Bench> {
        let dir = tempfile::Builder::new()
            .prefix("outputs-bench-")
            .tempdir()?;
        let data = dir.path().join("data");
        let relay = restart(relay_on(&data, &[])).await?;
        let token = relay.add_gateway(BACKLOG_GW, BACKLOG_SITE)?;
        let started = Instant::now();
        post_punches(
            relay.http_url(),
            token,
            BACKLOG_GW.into(),
            BACKLOG_SITE.into(),
            1..=a.punches,
        )
        .await?;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "backlog: {} punches stored in {secs:.1} s ({:.0}/s, no output configured)",
            a.punches,
            a.punches as f64 / secs
        );
        stop(relay).await?;
        Ok(Bench {
            dir,
            stored: a.punches,
            next_output: 0,
            next_intake: 0,
        })
    }

    /// One run: returns (delivered punches, seconds, intake punches/s if any).
    async fn run(&mut self, kind: Kind, intake: u64) -> anyhow::Result<(u64, f64, Option<f64>)> {
        self.next_output += 1;
        let name = format!("bench{}", self.next_output);
        let mut nats = None;
        let mut receiver = None;
        let outputs = match kind {
            Kind::Webhook { batch_max } => {
                let (url, counter, task) = start_receiver().await?;
                receiver = Some((counter, task));
                let secret = self.dir.path().join(format!("{name}.whsec"));
                (
                    "OUTPOST_OUTPUTS__WEBHOOK",
                    format!(
                        "[{{name = \"{name}\", url = \"{url}\", secret_file = \"{}\", \
                         allow_private = true, batch_max = {batch_max}}}]",
                        secret.display()
                    ),
                )
            }
            Kind::Nats => {
                let server = tokio::task::spawn_blocking(NatsServer::start).await??;
                let out = (
                    "OUTPOST_OUTPUTS__NATS",
                    format!("[{{name = \"{name}\", url = \"{}\"}}]", server.url()),
                );
                nats = Some(server);
                out
            }
        };
        let js = match &nats {
            Some(s) => Some(async_nats::jetstream::new(
                async_nats::connect(s.url()).await?,
            )),
            None => None,
        };
        let relay = relay_on(&self.data(), &[(outputs.0, outputs.1.as_str())]);
        let target = self.stored + intake;

        let started = Instant::now();
        let relay = restart(relay).await?;
        let sender = if intake > 0 {
            self.next_intake += 1;
            let gw = format!("gw-intake-{}", self.next_intake);
            let site = format!("IN{:03}", self.next_intake);
            let token = relay.add_gateway(&gw, &site)?;
            let base = relay.http_url();
            Some(tokio::spawn(async move {
                let t = Instant::now();
                post_punches(base, token, gw, site, 1..=intake).await?;
                anyhow::Ok(t.elapsed().as_secs_f64())
            }))
        } else {
            None
        };
        let deadline = started + Duration::from_secs(1800);
        loop {
            let held = match (&receiver, &js) {
                (Some((c, _)), _) => c.count() as u64,
                (None, Some(js)) => stream_messages(js).await,
                (None, None) => bail!("no receiver"),
            };
            if held >= target {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the receiver holds {held} of {target} after 30 min; relay log:\n{}",
                    relay.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let intake_rate = match sender {
            Some(t) => Some(intake as f64 / t.await??),
            None => None,
        };
        self.stored += intake;
        stop(relay).await?;
        if let Some((_, task)) = receiver {
            task.abort();
        }
        if let Some(s) = nats {
            tokio::task::spawn_blocking(move || drop(s)).await?;
        }
        Ok((target, secs, intake_rate))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let cases: [(&str, Kind, bool); 5] = [
        ("webhook1", Kind::Webhook { batch_max: 1 }, false),
        ("webhook100", Kind::Webhook { batch_max: 100 }, false),
        ("nats", Kind::Nats, false),
        ("webhook100+intake", Kind::Webhook { batch_max: 100 }, true),
        ("nats+intake", Kind::Nats, true),
    ];
    let want = |k: &str| a.only.as_ref().is_none_or(|o| o.iter().any(|x| x == k));
    let mut bench = Bench::load(&a).await?;
    let mut summary = Vec::new();
    for (label, kind, with_intake) in cases {
        if !want(label) {
            continue;
        }
        let intake = if with_intake { a.intake } else { 0 };
        let mut rates = Vec::new();
        let mut intake_rates = Vec::new();
        for run in 0..a.runs {
            let (n, secs, ir) = bench.run(kind, intake).await?;
            let rate = n as f64 / secs;
            match ir {
                Some(ir) => {
                    println!(
                        "  {label} run {}: {n} punches delivered in {secs:.2} s = {rate:.0}/s \
                         (intake meanwhile {ir:.0}/s)",
                        run + 1
                    );
                    intake_rates.push(ir);
                }
                None => println!(
                    "  {label} run {}: {n} punches delivered in {secs:.2} s = {rate:.0}/s",
                    run + 1
                ),
            }
            rates.push(rate);
        }
        let line = if intake_rates.is_empty() {
            format!(
                "{label}: median {:.0} punches/s ({} runs)",
                median(&mut rates),
                a.runs
            )
        } else {
            format!(
                "{label}: median {:.0} punches/s delivered, intake {:.0} punches/s meanwhile \
                 ({} runs, {} punches sent during delivery)",
                median(&mut rates),
                median(&mut intake_rates),
                a.runs,
                a.intake
            )
        };
        println!("{line}");
        summary.push(line);
    }
    println!("\nsummary (backlog {} punches):", a.punches);
    for l in summary {
        println!("  {l}");
    }
    Ok(())
}
