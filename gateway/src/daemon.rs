//! `outpost-gateway run`: assembles the tasks and runs them until SIGTERM or SIGINT.
//!
//! Start-up order: config → logging → data dir → journal (recovery happens in
//! `Journal::open`) → credentials → committer → MQTT ingest (broker choice, first connect) →
//! HTTP listeners.
//!
//! Shutdown is explicit and ordered so that no acknowledged punch is lost and no in-flight
//! request is dropped:
//! 1. a signal cancels `shutdown`; the HTTP servers stop accepting and finish the requests
//!    they have (bounded by [`GRACE`]);
//! 2. MQTT ingest takes no new messages, answers those whose commits are in flight (device
//!    ack, then broker ack) and disconnects (bounded by [`GRACE`]);
//! 3. then `committer_stop` is cancelled: the committer answers what is queued, flushes, ends;
//! 4. the journal is flushed once more and the process exits 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::limit::ConcurrencyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use outpost_ops::token::AdminToken;

use crate::auth::watch_devices;
use crate::clock::Clock;
use crate::config::Config;
use crate::ingest::adms::AdmsState;
use crate::ingest::http::HttpIngest;
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::status::OpsState;
use crate::{committer, ingest, status};

/// How long in-flight requests get to finish after a shutdown signal.
pub const GRACE: Duration = Duration::from_secs(10);

/// Runs the gateway until `shutdown` is cancelled (main wires it to SIGTERM/SIGINT).
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.gateway.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {} (gateway.data_dir)",
            cfg.gateway.data_dir.display()
        )
    })?;
    let metrics = Metrics::new();
    let clock = Clock::new();

    let t0 = Instant::now();
    // sled's open (and its fsync of every file) is blocking: keep it off the async workers.
    let (dir, jcfg) = (cfg.journal_dir(), cfg.journal.clone());
    let journal = tokio::task::spawn_blocking(move || Journal::open(dir, &jcfg))
        .await
        .context("the journal open task failed")?
        .with_context(|| format!("cannot open the journal in {}", cfg.journal_dir().display()))?;
    let stats = journal.stats();
    tracing::info!(
        records = stats.records,
        bytes = stats.bytes,
        next_seq = stats.next_seq,
        acked_through = stats.trimmed_through,
        open_ms = t0.elapsed().as_millis() as u64,
        "journal open"
    );

    let (admin, created) = AdminToken::load_or_create(&cfg.admin_token_file())
        .context("cannot read or create the admin token (auth.admin_token_file)")?;
    if created {
        tracing::info!(path = %cfg.admin_token_file().display(), "created a new admin token");
    }
    let devices = watch_devices(cfg.devices_file(), Duration::from_secs(2), shutdown.clone())
        .context("cannot read the device credentials (auth.devices_file)")?;
    if !cfg.auth.required {
        // Once: a warning repeated at every start line is a warning people learn to skip.
        tracing::warn!(
            "LAB MODE: auth.required = false — anyone on this network can post punches for any device (HTTP without a token; the embedded MQTT broker, when used, without a login). Never run a site like this."
        );
    } else if devices.borrow().entries().is_empty() {
        tracing::warn!(
            "no device credentials yet: every punch will be refused with 401 until you run `outpost-gateway device add <device_id>`"
        );
    }

    let committer_stop = CancellationToken::new();
    let (committer, committer_task) =
        committer::spawn(journal.clone(), metrics.clone(), committer_stop.clone());

    // The uplink only reads and trims the journal: a slow or dead relay never slows ingest.
    // It publishes the relay's time for ADMS terminals (their clocks follow our Date).
    let relay_time = crate::clock::RelayTime::default();
    let (uplink, uplink_task) = crate::uplink::spawn(
        cfg.uplink.clone(),
        crate::uplink::UplinkContext {
            journal: journal.clone(),
            clock: clock.clone(),
            relay_time: relay_time.clone(),
            metrics: metrics.clone(),
            gateway_id: cfg.gateway.id.clone(),
            site: cfg.gateway.site.clone(),
            data_dir: cfg.gateway.data_dir.clone(),
        },
        shutdown.clone(),
    )
    .context("cannot start the uplink ([uplink])")?;

    let adms = cfg.adms.enabled.then(|| {
        AdmsState::new(
            cfg.adms.clone(),
            &cfg.gateway.data_dir,
            committer.clone(),
            clock.clone(),
            relay_time.clone(),
            metrics.clone(),
        )
    });
    let adms = match adms {
        Some(r) => Some(r.context("cannot start ADMS ingest ([adms])")?),
        None => None,
    };

    // MQTT ingest (embedded broker or external); stopped before the committer.
    let mqtt = ingest::mqtt::start(
        ingest::mqtt::MqttParams {
            config: cfg.mqtt.clone(),
            gateway_id: cfg.gateway.id.clone(),
            site: cfg.gateway.site.clone(),
            auth_required: cfg.auth.required,
            devices: devices.clone(),
            committer: committer.clone(),
            clock: clock.clone(),
            metrics: metrics.clone(),
        },
        shutdown.clone(),
    )
    .await
    .context("cannot start MQTT ingest ([mqtt])")?;

    let ingest = HttpIngest {
        committer: committer.clone(),
        clock: clock.clone(),
        metrics: metrics.clone(),
        devices,
        auth_required: cfg.auth.required,
        limiter: Arc::new(RateLimiter::new(
            cfg.http.rate_limit_per_second,
            cfg.http.rate_limit_burst,
        )),
        max_body_bytes: cfg.http.max_body_bytes,
        max_punches: cfg.http.max_punches_per_request,
    };
    let ops = OpsState {
        journal: journal.clone(),
        committer: committer.clone(),
        clock: clock.clone(),
        metrics: metrics.clone(),
        admin,
        auth_required: cfg.auth.required,
        gateway_id: cfg.gateway.id.clone(),
        site: cfg.gateway.site.clone(),
        started,
        journal_cfg: cfg.journal.clone(),
        data_dir: cfg.gateway.data_dir.clone(),
        adms: adms.clone(),
        uplink,
        mqtt: mqtt.status(),
    };

    let mut app = ingest::http::router(ingest).merge(status::router(ops));
    let mut servers = Vec::new();
    if let Some(adms) = &adms {
        let adms_router = ingest::adms::router(adms.clone());
        match cfg.adms.listen {
            None => app = app.merge(adms_router),
            Some(addr) => {
                servers.push(serve(addr, "adms.listen", adms_router, &cfg, shutdown.clone()).await?)
            }
        }
    }
    servers.insert(
        0,
        serve(cfg.http.listen, "http.listen", app, &cfg, shutdown.clone()).await?,
    );
    tracing::info!(
        gateway = %cfg.gateway.id,
        site = %cfg.gateway.site,
        listen = %cfg.http.listen,
        version = env!("CARGO_PKG_VERSION"),
        "outpost-gateway running"
    );

    shutdown.cancelled().await;
    tracing::info!("shutdown requested: no new requests; finishing the ones in flight");
    for s in servers {
        match tokio::time::timeout(GRACE, s).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "HTTP server ended with an error"),
            Ok(Err(e)) => tracing::error!(error = %e, "HTTP server task failed"),
            Err(_) => {
                tracing::warn!("in-flight requests did not finish within {GRACE:?}; closing them")
            }
        }
    }
    if let Some(task) = uplink_task {
        // Cancelled with `shutdown`; in-flight batches are simply resent after the restart.
        if tokio::time::timeout(GRACE, task).await.is_err() {
            tracing::error!("the uplink did not stop within {GRACE:?}");
        }
    }
    // MQTT: finish the commits in flight, send their acks, disconnect — then the committer.
    mqtt.stop(GRACE).await;
    committer_stop.cancel();
    if tokio::time::timeout(GRACE, committer_task).await.is_err() {
        tracing::error!("the committer did not finish within {GRACE:?}");
    }
    journal
        .flush()
        .await
        .context("final journal flush failed")?;
    tracing::info!("journal flushed; outpost-gateway stopped");
    Ok(())
}

type ServerTask = tokio::task::JoinHandle<std::io::Result<()>>;

/// Binds `addr` and serves `app` on it until `shutdown`.
async fn serve(
    addr: SocketAddr,
    key: &str,
    app: Router,
    cfg: &Config,
    shutdown: CancellationToken,
) -> anyhow::Result<ServerTask> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} ({key}): is another program using the port? choose another with the `{key}` setting")
    })?;
    let app = app
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(cfg.http.request_timeout_secs),
        ))
        .layer(ConcurrencyLimitLayer::new(cfg.http.max_connections));
    Ok(tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    }))
}
