//! The PostgreSQL store: for production, and for several relays sharing one database.
//!
//! - `schema`: the tables, their migrations, and how records map to rows.
//! - `tls`: the TLS mode in force and the rustls client for it.
//! - `commit`: one batch, one transaction, a fixed number of round trips.
//! - `query`: the query API's reads.
//! - `stream`: the event stream every output reads, and relay notices.
//! - `listen`: the `LISTEN` task behind [`Store::subscribe`], on its own connection.
//! - `outputs`: output state and the lease that says which relay runs an output.
//! - `error`: how PostgreSQL failures become [`StoreError`]s.
//!
//! This file holds the store type: connecting (pool, TLS, migrations) and the [`Store`]
//! methods, each a call into one of the files above. Those files take the pool, not the
//! store, so none of them imports this one.
//!
//! A failure anywhere in a commit rolls the whole batch back: nothing is acked, the gateway
//! resends. A lost connection (database restart) returns [`StoreError::Unavailable`]; the
//! pool reconnects on the next commit.
//!
//! Besides the pool, the store holds one connection of its own, the listener's (`listen`):
//! a relay uses up to `store.max_connections` + 1 connections.

mod commit;
mod error;
mod listen;
mod outputs;
mod query;
mod schema;
mod stream;
mod tls;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime, Timeouts};
use outpost_protocol::Batch;
use tokio::sync::watch;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

pub use listen::APPLICATION_NAME as LISTENER_APPLICATION_NAME;
pub use schema::MIGRATIONS;
pub use tls::PgTls;

use super::{
    Backlog, BoxFuture, CommitOutcome, ConflictRow, GatewayInfo, HeldQuery, LeaseGrant, Notice,
    OutputState, OutputWrite, PunchPage, PunchQuery, RejectedRow, Store, StoreError, StreamQuery,
    StreamRow,
};
use crate::config::PgTlsMode;
use tls::{connect_err, resolve_tls, tls_connector};

/// The PostgreSQL store. Cheap to clone (clones share the pool and the listener).
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// The value behind [`Store::subscribe`]: raised by the listener and by this process's
    /// own commits.
    head: Arc<watch::Sender<u64>>,
    /// Stops the listener ([`Store::close`]).
    cancel: CancellationToken,
    /// The listener task, awaited by [`Store::close`].
    listener: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl PgStore {
    /// Connects to `url` with a pool of `max_connections`, and applies pending migrations
    /// in one transaction (serialised across relays by an advisory lock). TLS follows the
    /// URL's `sslmode` (see [`PgStore::connect_with_tls`] with no `store.tls`).
    pub async fn connect(url: &str, max_connections: usize) -> Result<Self, StoreError> {
        PgStore::connect_with_tls(url, max_connections, &PgTls::default()).await
    }

    /// Like [`PgStore::connect`], with TLS settings from `store.tls` and `store.ca_file`.
    ///
    /// The mode in force is `tls.mode` when set, else the URL's `sslmode` (`require` or
    /// `verify-full`), else no TLS. With TLS the connection never falls back to plain
    /// TCP: a server without TLS is an error, not a downgrade.
    pub async fn connect_with_tls(
        url: &str,
        max_connections: usize,
        tls: &PgTls,
    ) -> Result<Self, StoreError> {
        let (url, mode) = resolve_tls(url, tls)?;
        let connector = tls_connector(mode, tls.ca_file.as_deref())?;
        let mut cfg = deadpool_postgres::Config::new();
        cfg.url = Some(url);
        // Overrides the URL's sslmode: tokio-postgres's default (`prefer`) would silently
        // fall back to plain TCP when the server (or an attacker) declines TLS.
        cfg.ssl_mode = Some(match mode {
            PgTlsMode::Disable => deadpool_postgres::SslMode::Disable,
            PgTlsMode::Require | PgTlsMode::VerifyFull => deadpool_postgres::SslMode::Require,
        });
        cfg.connect_timeout = Some(Duration::from_secs(5));
        cfg.manager = Some(ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        });
        let mut pc = PoolConfig::new(max_connections.max(1));
        pc.timeouts = Timeouts {
            wait: Some(Duration::from_secs(10)),
            create: Some(Duration::from_secs(5)),
            recycle: Some(Duration::from_secs(5)),
        };
        cfg.pool = Some(pc);
        let mut listen_config = cfg
            .get_pg_config()
            .map_err(|e| StoreError::unavailable("store.url is not usable", e))?;
        // So that operators (and tests) can tell it in pg_stat_activity.
        listen_config.application_name(listen::APPLICATION_NAME);
        // The connector types differ, the pool type does not.
        let pool = match connector.clone() {
            None => cfg.create_pool(Some(Runtime::Tokio1), NoTls),
            Some(rustls) => cfg.create_pool(Some(Runtime::Tokio1), rustls),
        }
        .map_err(|e| StoreError::unavailable("store.url is not usable", e))?;
        // The first connection is made here, so that a TLS failure is reported with the
        // key to change rather than as a generic pool error from the migration.
        drop(pool.get().await.map_err(|e| connect_err(e, mode))?);
        tracing::info!(tls = %mode, "connected to PostgreSQL");
        schema::migrate(&pool).await?;
        let head = Arc::new(watch::Sender::new(query::head(&pool).await?));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(listen::run(
            listen::Connect {
                config: listen_config,
                tls: connector,
            },
            (*head).clone(),
            cancel.clone(),
        ));
        Ok(PgStore {
            pool,
            head,
            cancel,
            listener: Arc::new(Mutex::new(Some(task))),
        })
    }

    /// Checks `store.tls` and `store.ca_file` for `url` without connecting (for
    /// `check-config`): the CA file must hold PEM certificates. Returns the mode in force.
    pub fn check_tls(url: &str, tls: &PgTls) -> Result<PgTlsMode, StoreError> {
        let (_, mode) = resolve_tls(url, tls)?;
        tls_connector(mode, tls.ca_file.as_deref())?;
        Ok(mode)
    }
}

impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn commit(
        &self,
        batch: Batch,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<CommitOutcome, StoreError>> {
        Box::pin(async move {
            let (out, max_pos) = commit::commit(&self.pool, &batch, now_ms).await?;
            if let Some(pos) = max_pos {
                // This process's readers need not wait for the notification's round trip.
                super::raise_head(&self.head, pos);
            }
            Ok(out)
        })
    }

    fn punches(&self, query: PunchQuery) -> BoxFuture<'_, Result<PunchPage, StoreError>> {
        Box::pin(async move { query::punches(&self.pool, &query).await })
    }

    fn gateways(&self) -> BoxFuture<'_, Result<Vec<GatewayInfo>, StoreError>> {
        Box::pin(query::gateways(&self.pool))
    }

    fn conflicts(&self, q: HeldQuery) -> BoxFuture<'_, Result<Vec<ConflictRow>, StoreError>> {
        Box::pin(async move { query::conflicts(&self.pool, &q).await })
    }

    fn rejected(&self, q: HeldQuery) -> BoxFuture<'_, Result<Vec<RejectedRow>, StoreError>> {
        Box::pin(async move { query::rejected(&self.pool, &q).await })
    }

    fn stream(&self, q: StreamQuery) -> BoxFuture<'_, Result<Vec<StreamRow>, StoreError>> {
        Box::pin(stream::stream(&self.pool, q))
    }

    fn append_notice(&self, notice: Notice) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let pos = stream::append_notice(&self.pool, &notice).await?;
            super::raise_head(&self.head, pos);
            Ok(pos)
        })
    }

    fn head(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(query::head(&self.pool))
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    fn cursor_before(
        &self,
        stored_before_ms: i64,
    ) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        Box::pin(outputs::cursor_before(&self.pool, stored_before_ms))
    }

    fn backlog<'a>(
        &'a self,
        after: Option<u64>,
        sites: &'a [String],
    ) -> BoxFuture<'a, Result<Backlog, StoreError>> {
        Box::pin(outputs::backlog(&self.pool, after, sites))
    }

    fn output_state<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<OutputState, StoreError>> {
        Box::pin(outputs::state(&self.pool, name))
    }

    fn output_write<'a>(
        &'a self,
        name: &'a str,
        write: OutputWrite,
    ) -> BoxFuture<'a, Result<Option<OutputState>, StoreError>> {
        Box::pin(async move { outputs::write(&self.pool, name, &write).await })
    }

    fn output_lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<LeaseGrant, StoreError>> {
        Box::pin(outputs::lease(&self.pool, name, holder, ttl))
    }

    fn output_release<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(outputs::release(&self.pool, name, holder))
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(query::ready(&self.pool))
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.cancel.cancel();
            let task = self
                .listener
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(task) = task {
                // It returns at its next await point; a panic in it is no reason to fail
                // the shutdown.
                if let Err(e) = task.await {
                    tracing::warn!(error = %e, "PostgreSQL notification listener ended badly");
                }
            }
            self.pool.close();
            Ok(())
        })
    }
}
