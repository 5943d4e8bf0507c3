//! The listener: TCP accept loop, TLS (rustls with the ring provider), HTTP/1.1 with
//! upgrades (WebSockets), connection limits, and graceful shutdown.
//!
//! Shutdown (SIGTERM or SIGINT, via the `CancellationToken`): stop accepting; ask every
//! HTTP connection to finish its current request and close; WebSockets stop reading, wait
//! for their in-flight commits, send their acks and close with 1001; then wait up to
//! `relay.shutdown_grace_secs` for all of it, and close the store. Output workers
//! (`crate::outputs`) stop at the same token (an attempt in progress is abandoned: its
//! in-flight record makes the next start send it again) and give up their leases before
//! the store closes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::app;
use crate::auth::readers::{ReaderCreds, Readers};
use outpost_ops::token::AdminToken;

use crate::auth::{self, ClientCert, GatewayCreds, Gateways};
use crate::config::{Config, StoreKind};
use crate::outputs::sink::Sink;
use crate::outputs::supervisor::{holder_id, OutputSpec, Supervisor, SupervisorSettings};
use crate::state::AppState;
use crate::store::postgres::PgStore;
use crate::store::sled::SledStore;
use crate::store::Store;

/// Installs ring as the process-wide rustls provider (idempotent).
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds the TLS acceptor from PEM files. With `client_ca`, clients are asked for a
/// certificate and one is accepted only if it chains to a CA in that file; clients that
/// send none still connect (they authenticate with a token).
pub fn tls_acceptor(
    cert_file: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<TlsAcceptor> {
    let certs = outpost_ops::pem::load_certs(cert_file).context("tls.cert_file")?;
    let key = outpost_ops::pem::load_private_key(key_file).context("tls.key_file")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("rustls protocol versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, provider)?),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .context("tls.cert_file and tls.key_file do not form a usable certificate")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// The client certificate verifier for `tls.client_ca_file`.
fn client_verifier(
    path: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> anyhow::Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    let roots = outpost_ops::pem::load_roots(path)
        .context("tls.client_ca_file (the CA that issues gateway certificates, PEM)")?;
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .allow_unauthenticated()
        .build()
        .with_context(|| format!("tls.client_ca_file {}", path.display()))
}

/// Opens the configured store (applying PostgreSQL migrations).
pub async fn open_store(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match cfg.store.kind {
        StoreKind::Sled => {
            let dir = cfg.sled_dir();
            let cache = cfg.store.sled_cache_bytes;
            let s = tokio::task::spawn_blocking(move || SledStore::open(&dir, cache))
                .await
                .context("open sled")??;
            Arc::new(s)
        }
        StoreKind::Postgres => {
            let url = cfg.store_url()?;
            let tls = crate::store::postgres::PgTls {
                mode: cfg.store.tls,
                ca_file: cfg.store.ca_file.clone(),
            };
            Arc::new(
                PgStore::connect_with_tls(&url, cfg.store.pool_size, &tls)
                    .await
                    .context("connect to PostgreSQL (store.url, store.tls)")?,
            )
        }
    })
}

/// Serves `router` on `listener` until `cancel`, then drains connections.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    state: Arc<AppState>,
) {
    let cancel = state.cancel.clone();
    let conns = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(state.limits.max_connections));
    let handshake = Duration::from_secs(state.limits.handshake_timeout_secs);
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let tls = tls.clone();
        let state = state.clone();
        conns.spawn(async move {
            let _permit = permit;
            state.metrics.open_connections.inc();
            match tls {
                Some(acc) => match tokio::time::timeout(handshake, acc.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let cert = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| ClientCert(auth::cert_fingerprint(c.as_ref())));
                        serve_conn(stream, router, &state, peer, cert, handshake).await
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
                None => serve_conn(tcp, router, &state, peer, None, handshake).await,
            }
            state.metrics.open_connections.dec();
        });
    }
    drop(listener);
    conns.close();
    conns.wait().await;
}

async fn serve_conn<S>(
    io: S,
    router: Router,
    state: &AppState,
    peer: SocketAddr,
    cert: Option<ClientCert>,
    header_timeout: Duration,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        if let Some(c) = cert {
            req.extensions_mut().insert(c);
        }
        router.clone().oneshot(req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        _ = state.cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// `outpost-relay run`: everything, until SIGTERM/SIGINT, with the configured outputs.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    // The sinks' HTTP and NATS clients use rustls; the provider must be set first.
    install_crypto_provider();
    let outputs = crate::outputs::build::sinks(&cfg.outputs)
        .context("cannot set up an output from [outputs]; fix it in the relay config")?;
    run_with_outputs(cfg, outputs).await
}

/// `outpost-relay run` with `outputs`: each output's spec and the sink that delivers it
/// (empty: no output runs, and nothing changes for the relay). Everything runs until
/// SIGTERM/SIGINT.
pub async fn run_with_outputs(
    cfg: Config,
    outputs: Vec<(OutputSpec, Box<dyn Sink>)>,
) -> anyhow::Result<()> {
    install_crypto_provider();
    let tls = if cfg.tls.disabled {
        tracing::warn!("tls.disabled = true: serving plain HTTP; gateway tokens travel in clear text. Use this only for local development");
        None
    } else {
        let (Some(cert), Some(key)) = (&cfg.tls.cert_file, &cfg.tls.key_file) else {
            anyhow::bail!("tls.cert_file and tls.key_file are required unless tls.disabled = true");
        };
        if cfg.tls.client_ca_file.is_some() {
            tracing::info!(
                "tls.client_ca_file set: gateways may authenticate with client certificates"
            );
        }
        Some(tls_acceptor(cert, key, cfg.tls.client_ca_file.as_deref())?)
    };
    std::fs::create_dir_all(&cfg.relay.data_dir).with_context(|| {
        format!(
            "cannot create relay.data_dir {}",
            cfg.relay.data_dir.display()
        )
    })?;
    let (admin, created) =
        AdminToken::load_or_create(&cfg.admin_token_file()).context("auth.admin_token_file")?;
    if created {
        tracing::info!(file = %cfg.admin_token_file().display(), "created a new admin token (auth.admin_token_file)");
    }
    let gw_file = cfg.gateways_file();
    let gateways = Gateways::load(&gw_file).context("auth.gateways_file")?;
    if gateways.is_empty() {
        tracing::warn!(file = %gw_file.display(), "no gateways registered yet; add one with `outpost-relay gateway add ID --site SITE`");
    }
    let creds = GatewayCreds::new(gateways);
    let readers_file = cfg.readers_file();
    let readers = ReaderCreds::new(Readers::load(&readers_file).context("auth.readers_file")?);
    let store = open_store(&cfg).await?;
    let cancel = CancellationToken::new();
    let state = AppState::new(
        store.clone(),
        creds.clone(),
        readers.clone(),
        admin,
        cfg.limits.clone(),
        cancel.clone(),
        outputs.iter().map(|(spec, _)| spec.clone()).collect(),
    );
    let supervisor = Supervisor::start(
        store.clone(),
        outputs,
        SupervisorSettings::new(
            holder_id(cfg.relay.listen),
            Duration::from_secs(cfg.outputs.lease_timeout_secs),
        ),
        state.metrics.clone(),
        cancel.clone(),
    );
    let every = Duration::from_millis(cfg.auth.reload_interval_ms);
    let watcher = tokio::spawn(auth::watch(
        gw_file,
        creds,
        Gateways::load,
        "auth.gateways_file",
        every,
        cancel.clone(),
    ));
    let reader_watcher = tokio::spawn(auth::watch(
        readers_file,
        readers,
        Readers::load,
        "auth.readers_file",
        every,
        cancel.clone(),
    ));
    let listener = TcpListener::bind(cfg.relay.listen)
        .await
        .with_context(|| format!("cannot listen on relay.listen = {}", cfg.relay.listen))?;
    tracing::info!(
        listen = %cfg.relay.listen,
        tls = tls.is_some(),
        store = store.kind(),
        "outpost-relay ready"
    );
    let signals = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            outpost_ops::signal::wait_for_signal().await;
            tracing::info!("shutting down: no new connections, finishing in-flight batches");
            cancel.cancel();
        }
    });
    let router = app::router(state.clone());
    let grace = Duration::from_secs(cfg.relay.shutdown_grace_secs);
    let server = serve(listener, tls, router, state.clone());
    tokio::pin!(server);
    tokio::select! {
        _ = &mut server => {}
        _ = async { cancel.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("connections still open after relay.shutdown_grace_secs; closing them");
        }
    }
    state.tracker.close();
    if tokio::time::timeout(grace, state.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some commits did not finish within relay.shutdown_grace_secs; their batches were not acked and will be resent");
    }
    if tokio::time::timeout(grace, supervisor.stopped())
        .await
        .is_err()
    {
        tracing::warn!("some outputs did not stop within relay.shutdown_grace_secs; their in-flight deliveries are sent again at the next start");
    }
    signals.abort();
    let _ = watcher.await;
    let _ = reader_watcher.await;
    store.close().await.context("close the store")?;
    tracing::info!("stopped");
    Ok(())
}
