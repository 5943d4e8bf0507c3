//! The PostgreSQL store: for production, and for several relays sharing one database.
//!
//! ## Schema (migrations in [`MIGRATIONS`], version in `schema_version`)
//!
//! - `punches`: one row per punch key `(site_id, device_id, device_seq)` (unique), with the
//!   stream that delivered it first, the record's fields, `stored_at_ms` and
//!   `corrected_ms`. `id` (identity) is the query cursor.
//! - `conflicts`: newcomers whose punch key matched different content, with `kept_id`.
//! - `rejected` (migration 2): records whose punch failed validation, with the `reason`.
//! - `streams`: per `(gateway_id, journal_epoch)`, the stored gateway_seq ranges, flat
//!   (`[lo0, hi0, lo1, hi1, …]`). This is the primary-key index: a record whose seq is in a
//!   range is a duplicate.
//! - `gateways`: per-gateway counters and last seen (`seq_reuse`: migration 3);
//!   `anchors`: best anchor per boot.
//!
//! u64 values (epochs, sequence numbers) are stored as `bigint` with the same 64 bits
//! (`as i64`), so values at or above 2^63 (derived device_seq) are negative in SQL.
//!
//! ## Commit
//!
//! One transaction per batch (READ COMMITTED), a fixed number of round trips whatever the
//! batch size (arrays + `UNNEST`):
//! 1. upsert the stream row with `ON CONFLICT DO UPDATE ... RETURNING ranges`, which locks
//!    it: commits of one stream are serialised, across relay processes too;
//! 2. upsert the batch's anchors (better uncertainty wins) and fill the corrected time of
//!    waiting rows of those boots;
//! 3. records whose gateway_seq is in a stored range are resends, except those whose valid
//!    punch's key is not in `punches` (one lookup, only when the batch has such records):
//!    new punches under a reused gateway_seq, which join the new records (store module
//!    docs, "Sequence-number reuse"). The lookup runs under the stream's lock, so a
//!    concurrent commit of the same stream cannot slip in between; a punch another stream
//!    inserts meanwhile is caught by the insert's `ON CONFLICT` like any other;
//! 4. insert the new punches with `ON CONFLICT (site_id, device_id, device_seq) DO NOTHING
//!    RETURNING`; the punches that were not inserted are read back and compared (duplicate
//!    or conflict);
//! 5. insert conflicts and rejected records; write the new ranges; bump the gateway
//!    counters; commit.
//!
//! A failure anywhere rolls the whole batch back: nothing is acked, the gateway resends.
//! Deadlocks and serialisation failures (two gateways inserting the same punches in
//! different orders at the same moment) are retried a few times. A lost connection (database restart) returns
//! [`StoreError::Unavailable`]; the pool reconnects on the next commit.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime, Timeouts};
use outpost_protocol::{
    Batch, BootId, Id, Punch, PunchKind, Received, Record, Source, TimeAnchor, VerifyMethod,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::{
    best_anchors, corrected_time, invalid_reason, BoxFuture, CommitOutcome, ConflictRow,
    GatewayInfo, PunchPage, PunchQuery, PunchRow, RejectedRow, SeqRanges, Store, StoreError,
    MAX_RANGES,
};
use crate::config::PgTlsMode;

/// Schema migrations, applied in order; index + 1 is the version.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE punches (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    site_id        text     NOT NULL,
    device_id      text     NOT NULL,
    device_seq     bigint   NOT NULL,
    subject_id     text     NOT NULL,
    kind           smallint NOT NULL,
    verify         smallint NOT NULL,
    device_time_ms bigint   NOT NULL,
    utc_offset_min smallint,
    gateway_id     text     NOT NULL,
    journal_epoch  bigint   NOT NULL,
    gateway_seq    bigint   NOT NULL,
    boot_id        bytea    NOT NULL,
    mono_ms        bigint   NOT NULL,
    wall_ms        bigint   NOT NULL,
    clock_synced   boolean  NOT NULL,
    source         smallint NOT NULL,
    stored_at_ms   bigint   NOT NULL,
    corrected_ms   bigint,
    UNIQUE (site_id, device_id, device_seq)
);
CREATE INDEX punches_waiting ON punches (gateway_id, boot_id) WHERE corrected_ms IS NULL;
CREATE INDEX punches_site_id ON punches (site_id, id);
CREATE INDEX punches_subject_id ON punches (subject_id, id);
CREATE TABLE conflicts (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kept_id        bigint   NOT NULL,
    site_id        text     NOT NULL,
    device_id      text     NOT NULL,
    device_seq     bigint   NOT NULL,
    subject_id     text     NOT NULL,
    kind           smallint NOT NULL,
    verify         smallint NOT NULL,
    device_time_ms bigint   NOT NULL,
    utc_offset_min smallint,
    gateway_id     text     NOT NULL,
    journal_epoch  bigint   NOT NULL,
    gateway_seq    bigint   NOT NULL,
    boot_id        bytea    NOT NULL,
    mono_ms        bigint   NOT NULL,
    wall_ms        bigint   NOT NULL,
    clock_synced   boolean  NOT NULL,
    source         smallint NOT NULL,
    stored_at_ms   bigint   NOT NULL
);
CREATE TABLE streams (
    gateway_id    text     NOT NULL,
    journal_epoch bigint   NOT NULL,
    ranges        bigint[] NOT NULL,
    PRIMARY KEY (gateway_id, journal_epoch)
);
CREATE TABLE gateways (
    gateway_id    text   PRIMARY KEY,
    site_id       text   NOT NULL,
    last_seen_ms  bigint NOT NULL,
    journal_epoch bigint NOT NULL,
    records       bigint NOT NULL,
    duplicates    bigint NOT NULL,
    conflicts     bigint NOT NULL
);
CREATE TABLE anchors (
    gateway_id     text   NOT NULL,
    boot_id        bytea  NOT NULL,
    mono_ms        bigint NOT NULL,
    true_ms        bigint NOT NULL,
    uncertainty_ms bigint NOT NULL,
    PRIMARY KEY (gateway_id, boot_id)
);
"#,
    // 2: invalid records are kept instead of refusing their batch.
    r#"
CREATE TABLE rejected (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reason         text     NOT NULL,
    site_id        text     NOT NULL,
    device_id      text     NOT NULL,
    device_seq     bigint   NOT NULL,
    subject_id     text     NOT NULL,
    kind           smallint NOT NULL,
    verify         smallint NOT NULL,
    device_time_ms bigint   NOT NULL,
    utc_offset_min smallint,
    gateway_id     text     NOT NULL,
    journal_epoch  bigint   NOT NULL,
    gateway_seq    bigint   NOT NULL,
    boot_id        bytea    NOT NULL,
    mono_ms        bigint   NOT NULL,
    wall_ms        bigint   NOT NULL,
    clock_synced   boolean  NOT NULL,
    source         smallint NOT NULL,
    stored_at_ms   bigint   NOT NULL
);
ALTER TABLE gateways ADD COLUMN rejected bigint NOT NULL DEFAULT 0;
"#,
    // 3: new punches under reused gateway_seq values are stored and counted.
    r#"
ALTER TABLE gateways ADD COLUMN seq_reuse bigint NOT NULL DEFAULT 0;
"#,
];

/// Advisory lock key that serialises migrations of relays starting together.
const MIGRATION_LOCK: i64 = 0x6f75_7470_6f73_7431;

/// Columns of a punch row, in the order [`row_to_record`] reads them (after `id`).
const RECORD_COLS: &str = "site_id, device_id, device_seq, subject_id, kind, verify, \
    device_time_ms, utc_offset_min, gateway_id, journal_epoch, gateway_seq, boot_id, mono_ms, \
    wall_ms, clock_synced, source, stored_at_ms";

/// How often a commit is retried after a deadlock or serialisation failure.
const RETRIES: usize = 5;

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Unavailable(format!(
            "PostgreSQL error {}: {}",
            db.code().code(),
            db.message()
        )),
        None => StoreError::Unavailable(format!("PostgreSQL connection: {e}")),
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(format!(
        "cannot get a PostgreSQL connection (check store.url and that the server is up): {e}"
    ))
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("PostgreSQL row has an invalid {what}"))
}

fn source_code(s: Source) -> i16 {
    match s {
        Source::Http => 0,
        Source::Mqtt => 1,
        Source::Adms => 2,
    }
}

fn source_from(c: i16) -> Option<Source> {
    match c {
        0 => Some(Source::Http),
        1 => Some(Source::Mqtt),
        2 => Some(Source::Adms),
        _ => None,
    }
}

fn id(s: &str, what: &str) -> Result<Id, StoreError> {
    Id::new(s).map_err(|_| corrupt(what))
}

/// A record read back with its stream: (site, gateway, epoch, record, stored_at).
type HeldRecord = (Id, Id, u64, Record, i64);

/// Reads [`RECORD_COLS`] starting at column `at`.
fn row_to_record(r: &Row, at: usize) -> Result<HeldRecord, StoreError> {
    let g = |i: usize| at + i;
    let boot: Vec<u8> = r.try_get(g(11)).map_err(pg_err)?;
    let punch = Punch {
        device_id: id(r.try_get(g(1)).map_err(pg_err)?, "device_id")?,
        device_seq: r.try_get::<_, i64>(g(2)).map_err(pg_err)? as u64,
        subject_id: id(r.try_get(g(3)).map_err(pg_err)?, "subject_id")?,
        kind: u8::try_from(r.try_get::<_, i16>(g(4)).map_err(pg_err)?)
            .ok()
            .and_then(PunchKind::from_code)
            .ok_or_else(|| corrupt("kind"))?,
        verify: u8::try_from(r.try_get::<_, i16>(g(5)).map_err(pg_err)?)
            .ok()
            .and_then(VerifyMethod::from_code)
            .ok_or_else(|| corrupt("verify"))?,
        device_time_ms: r.try_get(g(6)).map_err(pg_err)?,
        utc_offset_min: r.try_get(g(7)).map_err(pg_err)?,
    };
    let record = Record {
        punch,
        gateway_seq: r.try_get::<_, i64>(g(10)).map_err(pg_err)? as u64,
        received: Received {
            boot_id: BootId(boot.try_into().map_err(|_| corrupt("boot_id"))?),
            mono_ms: r.try_get::<_, i64>(g(12)).map_err(pg_err)? as u64,
            wall_ms: r.try_get(g(13)).map_err(pg_err)?,
            clock_synced: r.try_get(g(14)).map_err(pg_err)?,
        },
        source: source_from(r.try_get(g(15)).map_err(pg_err)?).ok_or_else(|| corrupt("source"))?,
    };
    Ok((
        id(r.try_get(g(0)).map_err(pg_err)?, "site_id")?,
        id(r.try_get(g(8)).map_err(pg_err)?, "gateway_id")?,
        r.try_get::<_, i64>(g(9)).map_err(pg_err)? as u64,
        record,
        r.try_get(g(16)).map_err(pg_err)?,
    ))
}

/// Column arrays for a bulk insert of records via `UNNEST`.
#[derive(Default)]
struct Columns<'a> {
    device_id: Vec<&'a str>,
    device_seq: Vec<i64>,
    subject_id: Vec<&'a str>,
    kind: Vec<i16>,
    verify: Vec<i16>,
    device_time_ms: Vec<i64>,
    utc_offset_min: Vec<Option<i16>>,
    gateway_seq: Vec<i64>,
    boot_id: Vec<&'a [u8]>,
    mono_ms: Vec<i64>,
    wall_ms: Vec<i64>,
    clock_synced: Vec<bool>,
    source: Vec<i16>,
    extra: Vec<Option<i64>>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, r: &'a Record, extra: Option<i64>) {
        let p = &r.punch;
        self.device_id.push(p.device_id.as_str());
        self.device_seq.push(p.device_seq as i64);
        self.subject_id.push(p.subject_id.as_str());
        self.kind.push(i16::from(p.kind.code()));
        self.verify.push(i16::from(p.verify.code()));
        self.device_time_ms.push(p.device_time_ms);
        self.utc_offset_min.push(p.utc_offset_min);
        self.gateway_seq.push(r.gateway_seq as i64);
        self.boot_id.push(&r.received.boot_id.0[..]);
        self.mono_ms.push(r.received.mono_ms as i64);
        self.wall_ms.push(r.received.wall_ms);
        self.clock_synced.push(r.received.clock_synced);
        self.source.push(source_code(r.source));
        self.extra.push(extra);
    }

    /// The parameters of [`bulk_insert_sql`]: the stream's four (`$1`–`$4`), the record
    /// columns (`$5`–`$17`), then `last` (`$18`, one value per record).
    fn params<'p>(
        &'p self,
        stream: [&'p (dyn ToSql + Sync); 4],
        last: &'p (dyn ToSql + Sync),
    ) -> [&'p (dyn ToSql + Sync); 18] {
        let [site, gw, epoch, now] = stream;
        [
            site,
            gw,
            epoch,
            now,
            &self.device_id,
            &self.device_seq,
            &self.subject_id,
            &self.kind,
            &self.verify,
            &self.device_time_ms,
            &self.utc_offset_min,
            &self.gateway_seq,
            &self.boot_id,
            &self.mono_ms,
            &self.wall_ms,
            &self.clock_synced,
            &self.source,
            last,
        ]
    }
}

/// `INSERT INTO table` of a whole [`Columns`] in one statement (`UNNEST` of arrays): the
/// stream's site, gateway, epoch and `stored_at_ms`, the record columns, and `last_col`
/// (SQL type `last_type`). Parameters from [`Columns::params`].
fn bulk_insert_sql(table: &str, last_col: &str, last_type: &str) -> String {
    format!(
        "INSERT INTO {table} (site_id, gateway_id, journal_epoch, stored_at_ms, \
         device_id, device_seq, subject_id, kind, verify, device_time_ms, utc_offset_min, \
         gateway_seq, boot_id, mono_ms, wall_ms, clock_synced, source, {last_col}) \
         SELECT $1, $2, $3, $4, * FROM UNNEST($5::text[], $6::bigint[], $7::text[], \
         $8::smallint[], $9::smallint[], $10::bigint[], $11::smallint[], $12::bigint[], \
         $13::bytea[], $14::bigint[], $15::bigint[], $16::boolean[], $17::smallint[], \
         $18::{last_type}[])"
    )
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

/// TLS settings for [`PgStore::connect_with_tls`]: `store.tls` and `store.ca_file`.
#[derive(Debug, Clone, Default)]
pub struct PgTls {
    /// `store.tls`; `None` lets the URL's `sslmode` decide (no TLS without one).
    pub mode: Option<PgTlsMode>,
    /// `store.ca_file`: PEM CA certificate(s) for `verify-full`; `None` trusts the public
    /// web roots (webpki-roots), which managed databases with public certificates need.
    pub ca_file: Option<std::path::PathBuf>,
}

/// The URL for tokio-postgres and the TLS mode in force: `tls.mode`, else the URL's
/// `sslmode` (`verify-full`, `require`), else `disable`.
fn resolve_tls(url: &str, tls: &PgTls) -> Result<(String, PgTlsMode), StoreError> {
    let bad_url = |e: String| StoreError::Unavailable(format!("store.url is not usable: {e}"));
    let (url, verify_full) =
        crate::config::pg_url_sslmode("store.url", url).map_err(|e| bad_url(e.to_string()))?;
    let parsed: tokio_postgres::Config = url.parse().map_err(|e| bad_url(format!("{e}")))?;
    let from_url = match (verify_full, parsed.get_ssl_mode()) {
        (Some(m), _) => Some(m),
        (None, tokio_postgres::config::SslMode::Require) => Some(PgTlsMode::Require),
        // `prefer` is tokio-postgres's default, so it cannot tell "prefer" from "not
        // given"; both stay plain, as before `store.tls` existed.
        (None, _) => None,
    };
    let mode = tls.mode.or(from_url).unwrap_or(PgTlsMode::Disable);
    if let (Some(set), Some(asked)) = (tls.mode, from_url) {
        if set != asked {
            tracing::warn!("store.tls = \"{set}\" overrides sslmode={asked} in store.url");
        }
    }
    if tls.ca_file.is_some() && mode != PgTlsMode::VerifyFull {
        return Err(StoreError::Unavailable(format!(
            "store.ca_file is set, but the server's certificate is not checked (TLS mode \
             \"{mode}\"): set store.tls = \"verify-full\", or remove store.ca_file"
        )));
    }
    let hosts = parsed.get_hosts();
    let tcp = hosts
        .iter()
        .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(_)));
    if mode != PgTlsMode::Disable && !tcp {
        return Err(StoreError::Unavailable(format!(
            "TLS mode \"{mode}\" (store.tls, or sslmode in store.url) needs a TCP host in \
             store.url, and it names a Unix socket, where PostgreSQL does not offer TLS: \
             set store.tls = \"disable\" for a local socket"
        )));
    }
    if mode == PgTlsMode::Disable {
        let remote = hosts.iter().any(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => {
                name != "localhost"
                    && !name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            tokio_postgres::config::Host::Unix(_) => false,
        });
        if remote {
            tracing::warn!(
                "PostgreSQL connections are not encrypted: the password and the punches \
                 cross the network readable; set store.tls = \"verify-full\" (or \"require\")"
            );
        }
    }
    Ok((url, mode))
}

/// The rustls connector for `mode`, or `None` for plain TCP.
fn tls_connector(
    mode: PgTlsMode,
    ca_file: Option<&std::path::Path>,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, StoreError> {
    Ok(tls_client_config(mode, ca_file)?.map(tokio_postgres_rustls::MakeRustlsConnect::new))
}

/// The rustls client config for `mode` (ring provider only), or `None` for plain TCP.
fn tls_client_config(
    mode: PgTlsMode,
    ca_file: Option<&std::path::Path>,
) -> Result<Option<rustls::ClientConfig>, StoreError> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Unavailable(format!("TLS for PostgreSQL: {e}")))?;
    let mut config = match mode {
        PgTlsMode::Disable => return Ok(None),
        PgTlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AnyServerCert(provider)))
            .with_no_client_auth(),
        PgTlsMode::VerifyFull => builder
            .with_root_certificates(pg_roots(ca_file)?)
            .with_no_client_auth(),
    };
    // PostgreSQL 17 requires this ALPN name when it is offered one; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(config))
}

/// The trust anchors for `verify-full`: `store.ca_file`, or the public web roots.
fn pg_roots(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, StoreError> {
    let Some(path) = ca_file else {
        return Ok(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        });
    };
    let bad =
        |what: &str| StoreError::Unavailable(format!("store.ca_file {}: {what}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| bad(&e.to_string()))?;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&format!("is not PEM ({e})")))?;
    if certs.is_empty() {
        return Err(bad(
            "holds no PEM certificate; put the CA certificate(s) that issued the PostgreSQL \
             server's certificate there",
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| bad(&format!("holds an unusable CA certificate ({e})")))?;
    }
    Ok(roots)
}

/// `store.tls = "require"` (libpq's `sslmode=require`): any server certificate is
/// accepted, as libpq does, but the handshake signatures are still verified, so the
/// session is encrypted to whoever holds the presented certificate's key.
#[derive(Debug)]
struct AnyServerCert(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The first connection's error, with the key to change for TLS failures.
fn connect_err(e: deadpool_postgres::PoolError, mode: PgTlsMode) -> StoreError {
    let deadpool_postgres::PoolError::Backend(pg) = &e else {
        return pool_err(e);
    };
    // tokio-postgres's Display omits the cause ("error performing TLS handshake").
    let mut text = pg.to_string();
    let mut cert_rejected = false;
    let mut source = std::error::Error::source(pg);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        let rustls_err = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .or_else(|| s.downcast_ref::<rustls::Error>());
        if let Some(rustls::Error::InvalidCertificate(_)) = rustls_err {
            cert_rejected = true;
        }
        source = s.source();
    }
    StoreError::Unavailable(if text.contains("server does not support TLS") {
        format!(
            "the PostgreSQL server does not accept TLS, but store.tls (or sslmode in \
             store.url) is \"{mode}\": turn ssl on in the server's postgresql.conf, or set \
             store.tls = \"disable\" only if the database is on this host or a trusted \
             network ({text})"
        )
    } else if cert_rejected {
        format!(
            "the PostgreSQL server's certificate was rejected (TLS mode \"{mode}\" from \
             store.tls or sslmode in store.url): {text}; set store.ca_file to the CA \
             certificate that issued it, and check that it names the host in store.url"
        )
    } else if mode == PgTlsMode::Disable && text.contains("no encryption") {
        format!(
            "the PostgreSQL server requires TLS (pg_hba.conf hostssl): set store.tls = \
             \"verify-full\" (or \"require\") ({text})"
        )
    } else {
        format!(
            "cannot connect to PostgreSQL (check store.url, store.tls and that the server \
             is up): {text}"
        )
    })
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
        // The connector types differ, the pool type does not.
        let pool = match connector {
            None => cfg.create_pool(Some(Runtime::Tokio1), NoTls),
            Some(rustls) => cfg.create_pool(Some(Runtime::Tokio1), rustls),
        }
        .map_err(|e| StoreError::Unavailable(format!("store.url is not usable: {e}")))?;
        // The first connection is made here, so that a TLS failure is reported with the
        // key to change rather than as a generic pool error from the migration.
        drop(pool.get().await.map_err(|e| connect_err(e, mode))?);
        tracing::info!(tls = %mode, "connected to PostgreSQL");
        let store = PgStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// Checks `store.tls` and `store.ca_file` for `url` without connecting (for
    /// `check-config`): the CA file must hold PEM certificates. Returns the mode in force.
    pub fn check_tls(url: &str, tls: &PgTls) -> Result<PgTlsMode, StoreError> {
        let (_, mode) = resolve_tls(url, tls)?;
        tls_connector(mode, tls.ca_file.as_deref())?;
        Ok(mode)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(pg_err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg_err)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            .await
            .map_err(pg_err)?;
        let current: i32 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
            .await
            .map_err(pg_err)?
            .try_get(0)
            .map_err(pg_err)?;
        let known = MIGRATIONS.len() as i32;
        if current > known {
            return Err(StoreError::Corrupt(format!(
                "the database schema is version {current}, this relay knows up to {known}: upgrade the relay"
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.batch_execute(sql).await.map_err(pg_err)?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[&(i as i32 + 1)],
            )
            .await
            .map_err(pg_err)?;
            tracing::info!(version = i + 1, "applied PostgreSQL schema migration");
        }
        tx.commit().await.map_err(pg_err)
    }

    async fn commit_once(&self, batch: &Batch, now_ms: i64) -> Result<CommitOutcome, Attempt> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| Attempt::Fatal(pool_err(e)))?;
        let tx = client.transaction().await?;
        let gw = batch.gateway_id.as_str();
        let site = batch.site_id.as_str();
        let epoch = batch.journal_epoch as i64;
        let mut out = CommitOutcome::default();

        // 1. Lock the stream.
        let st = tx
            .prepare_cached(
                "INSERT INTO streams (gateway_id, journal_epoch, ranges) VALUES ($1, $2, '{}') \
                 ON CONFLICT (gateway_id, journal_epoch) DO UPDATE SET ranges = streams.ranges \
                 RETURNING ranges",
            )
            .await?;
        let flat: Vec<i64> = tx.query_one(&st, &[&gw, &epoch]).await?.try_get(0)?;
        let flat: Vec<u64> = flat.into_iter().map(|v| v as u64).collect();
        let mut ranges = SeqRanges::from_flat(&flat)
            .ok_or_else(|| Attempt::Fatal(StoreError::Corrupt("stream ranges".into())))?;

        // 2. Anchors.
        let mut anchors: HashMap<BootId, TimeAnchor> = HashMap::new();
        let new_anchors = best_anchors(&batch.anchors);
        if !new_anchors.is_empty() {
            let boots: Vec<&[u8]> = new_anchors.iter().map(|a| &a.boot_id.0[..]).collect();
            let mono: Vec<i64> = new_anchors.iter().map(|a| a.mono_ms as i64).collect();
            let truth: Vec<i64> = new_anchors.iter().map(|a| a.true_ms).collect();
            let unc: Vec<i64> = new_anchors
                .iter()
                .map(|a| i64::from(a.uncertainty_ms))
                .collect();
            let st = tx
                .prepare_cached(
                    "INSERT INTO anchors (gateway_id, boot_id, mono_ms, true_ms, uncertainty_ms) \
                     SELECT $1, * FROM UNNEST($2::bytea[], $3::bigint[], $4::bigint[], $5::bigint[]) \
                     ON CONFLICT (gateway_id, boot_id) DO UPDATE SET mono_ms = EXCLUDED.mono_ms, \
                     true_ms = EXCLUDED.true_ms, uncertainty_ms = EXCLUDED.uncertainty_ms \
                     WHERE EXCLUDED.uncertainty_ms < anchors.uncertainty_ms",
                )
                .await?;
            tx.execute(&st, &[&gw, &boots, &mono, &truth, &unc]).await?;
            let st = tx
                .prepare_cached(
                    "UPDATE punches p SET corrected_ms = a.true_ms + (p.mono_ms - a.mono_ms) \
                     FROM anchors a WHERE a.gateway_id = $1 AND a.boot_id = ANY($2) \
                     AND p.gateway_id = a.gateway_id AND p.boot_id = a.boot_id \
                     AND p.corrected_ms IS NULL",
                )
                .await?;
            out.corrected_later = tx.execute(&st, &[&gw, &boots]).await? as u32;
        }
        let mut unsynced: Vec<&[u8]> = batch
            .records
            .iter()
            .filter(|r| !r.received.clock_synced)
            .map(|r| &r.received.boot_id.0[..])
            .collect();
        unsynced.sort_unstable();
        unsynced.dedup();
        if !unsynced.is_empty() {
            let st = tx
                .prepare_cached(
                    "SELECT boot_id, mono_ms, true_ms, uncertainty_ms FROM anchors \
                     WHERE gateway_id = $1 AND boot_id = ANY($2)",
                )
                .await?;
            for row in tx.query(&st, &[&gw, &unsynced]).await? {
                let boot: Vec<u8> = row.try_get(0)?;
                let boot_id = BootId(
                    boot.try_into()
                        .map_err(|_| Attempt::Fatal(corrupt("anchor boot_id")))?,
                );
                anchors.insert(
                    boot_id,
                    TimeAnchor {
                        boot_id,
                        mono_ms: row.try_get::<_, i64>(1)? as u64,
                        true_ms: row.try_get(2)?,
                        uncertainty_ms: u32::try_from(row.try_get::<_, i64>(3)?)
                            .unwrap_or(u32::MAX),
                    },
                );
            }
        }

        // 3. Records under a stored primary key are resends unless their punch is new (store
        // module docs, "Sequence-number reuse"); only they pay for this lookup.
        let resent: Vec<&Record> = batch
            .records
            .iter()
            .filter(|r| ranges.contains(r.gateway_seq) && invalid_reason(r).is_none())
            .collect();
        let mut reused: HashSet<u64> = HashSet::new();
        if !resent.is_empty() {
            let devs: Vec<&str> = resent.iter().map(|r| r.punch.device_id.as_str()).collect();
            let seqs: Vec<i64> = resent.iter().map(|r| r.punch.device_seq as i64).collect();
            let st = tx
                .prepare_cached(
                    "SELECT device_id, device_seq FROM punches WHERE site_id = $1 AND \
                     (device_id, device_seq) IN (SELECT * FROM UNNEST($2::text[], $3::bigint[]))",
                )
                .await?;
            let mut stored: HashSet<(String, i64)> = HashSet::new();
            for row in tx.query(&st, &[&site, &devs, &seqs]).await? {
                stored.insert((row.try_get(0)?, row.try_get(1)?));
            }
            for r in &resent {
                let key = (
                    r.punch.device_id.as_str().to_string(),
                    r.punch.device_seq as i64,
                );
                if !stored.contains(&key) {
                    reused.insert(r.gateway_seq);
                }
            }
        }

        // 4. New punches: the first record of each punch key not yet in the stream (or new
        // under a reused seq), in gateway_seq order so that cursors follow arrival order.
        let candidates: Vec<&Record> = batch
            .records
            .iter()
            .filter(|r| !ranges.contains(r.gateway_seq) || reused.contains(&r.gateway_seq))
            .collect();
        out.duplicates += (batch.records.len() - candidates.len()) as u32;
        // Invalid records go to the rejected table (store module docs), never to punches.
        let mut rejected = Columns::default();
        let mut reasons: Vec<String> = Vec::new();
        let candidates: Vec<&Record> = candidates
            .into_iter()
            .filter(|r| match invalid_reason(r) {
                Some(reason) => {
                    rejected.push(r, None);
                    reasons.push(reason);
                    false
                }
                None => true,
            })
            .collect();
        out.rejected = reasons.len() as u32;
        let mut first: HashMap<(&str, u64), &Record> = HashMap::new();
        for r in &candidates {
            first
                .entry((r.punch.device_id.as_str(), r.punch.device_seq))
                .or_insert(r);
        }
        let mut unique: Vec<&Record> = first.values().copied().collect();
        unique.sort_unstable_by_key(|r| r.gateway_seq);
        let mut cols = Columns::default();
        for r in &unique {
            let corrected = corrected_time(&r.received, anchors.get(&r.received.boot_id));
            cols.push(r, corrected);
        }
        // key -> (id, kept punch, inserted by this batch's record with this gateway_seq)
        let mut kept: HashMap<(&str, u64), (i64, Punch, Option<u64>)> = HashMap::new();
        if !unique.is_empty() {
            let sql = bulk_insert_sql("punches", "corrected_ms", "bigint")
                + " ON CONFLICT (site_id, device_id, device_seq) DO NOTHING \
                   RETURNING id, device_seq, gateway_seq";
            let st = tx.prepare_cached(&sql).await?;
            let stream: [&(dyn ToSql + Sync); 4] = [&site, &gw, &epoch, &now_ms];
            let rows = tx.query(&st, &cols.params(stream, &cols.extra)).await?;
            let by_seq: HashMap<u64, &Record> =
                unique.iter().map(|r| (r.gateway_seq, *r)).collect();
            for row in rows {
                let gseq = row.try_get::<_, i64>(2)? as u64;
                if let Some(r) = by_seq.get(&gseq) {
                    kept.insert(
                        (r.punch.device_id.as_str(), r.punch.device_seq),
                        (row.try_get(0)?, r.punch, Some(gseq)),
                    );
                }
            }
            let missing: Vec<&Record> = unique
                .iter()
                .filter(|r| !kept.contains_key(&(r.punch.device_id.as_str(), r.punch.device_seq)))
                .copied()
                .collect();
            if !missing.is_empty() {
                let devs: Vec<&str> = missing.iter().map(|r| r.punch.device_id.as_str()).collect();
                let seqs: Vec<i64> = missing.iter().map(|r| r.punch.device_seq as i64).collect();
                let st = tx
                    .prepare_cached(&format!(
                        "SELECT id, {RECORD_COLS} FROM punches WHERE site_id = $1 AND \
                         (device_id, device_seq) IN (SELECT * FROM UNNEST($2::text[], $3::bigint[]))"
                    ))
                    .await?;
                for row in tx.query(&st, &[&site, &devs, &seqs]).await? {
                    let (_, _, _, rec, _) = row_to_record(&row, 1).map_err(Attempt::Fatal)?;
                    if let Some(r) = missing.iter().find(|r| {
                        r.punch.device_id == rec.punch.device_id
                            && r.punch.device_seq == rec.punch.device_seq
                    }) {
                        kept.insert(
                            (r.punch.device_id.as_str(), r.punch.device_seq),
                            (row.try_get(0)?, rec.punch, None),
                        );
                    }
                }
            }
        }
        let mut conflicts = Columns::default();
        let mut reused_stored = SeqRanges::default();
        for r in &candidates {
            let key = (r.punch.device_id.as_str(), r.punch.device_seq);
            let Some(&(kid, kp, inserted_by)) = kept.get(&key) else {
                return Err(Attempt::Fatal(StoreError::Corrupt(format!(
                    "punch {}/{} neither inserted nor found",
                    key.0, key.1
                ))));
            };
            if inserted_by == Some(r.gateway_seq) {
                out.stored += 1;
                if reused.contains(&r.gateway_seq) {
                    out.seq_reuse += 1;
                    reused_stored.insert(r.gateway_seq, r.gateway_seq);
                }
            } else if kp == r.punch {
                out.duplicates += 1;
            } else {
                conflicts.push(r, Some(kid));
                out.conflicts += 1;
            }
        }

        // 5. Conflicts, ranges, counters.
        let stream: [&(dyn ToSql + Sync); 4] = [&site, &gw, &epoch, &now_ms];
        if !conflicts.device_id.is_empty() {
            let st = tx
                .prepare_cached(&bulk_insert_sql("conflicts", "kept_id", "bigint"))
                .await?;
            tx.execute(&st, &conflicts.params(stream, &conflicts.extra))
                .await?;
        }
        if !reasons.is_empty() {
            let st = tx
                .prepare_cached(&bulk_insert_sql("rejected", "reason", "text"))
                .await?;
            tx.execute(&st, &rejected.params(stream, &reasons)).await?;
        }
        if let (Some(f), Some(l)) = (batch.records.first(), batch.records.last()) {
            ranges.insert(f.gateway_seq, l.gateway_seq);
            if ranges.len() > MAX_RANGES {
                return Err(Attempt::Fatal(StoreError::TooManyGaps {
                    gateway_id: gw.to_string(),
                    journal_epoch: batch.journal_epoch,
                }));
            }
        }
        out.acked_through = ranges.watermark();
        let flat: Vec<i64> = ranges.to_flat().into_iter().map(|v| v as i64).collect();
        let st_ranges = tx
            .prepare_cached(
                "UPDATE streams SET ranges = $3 WHERE gateway_id = $1 AND journal_epoch = $2",
            )
            .await?;
        let st_gw = tx
            .prepare_cached(
                "INSERT INTO gateways (gateway_id, site_id, last_seen_ms, journal_epoch, records, \
                 duplicates, conflicts, rejected, seq_reuse) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (gateway_id) DO UPDATE SET site_id = EXCLUDED.site_id, \
                 last_seen_ms = EXCLUDED.last_seen_ms, journal_epoch = EXCLUDED.journal_epoch, \
                 records = gateways.records + EXCLUDED.records, \
                 duplicates = gateways.duplicates + EXCLUDED.duplicates, \
                 conflicts = gateways.conflicts + EXCLUDED.conflicts, \
                 rejected = gateways.rejected + EXCLUDED.rejected, \
                 seq_reuse = gateways.seq_reuse + EXCLUDED.seq_reuse",
            )
            .await?;
        let (stored, dups, confl, rej, reuse) = (
            i64::from(out.stored),
            i64::from(out.duplicates),
            i64::from(out.conflicts),
            i64::from(out.rejected),
            i64::from(out.seq_reuse),
        );
        // Both statements are pipelined on the one connection.
        futures_util::future::try_join(
            tx.execute(&st_ranges, &[&gw, &epoch, &flat]),
            tx.execute(
                &st_gw,
                &[
                    &gw, &site, &now_ms, &epoch, &stored, &dups, &confl, &rej, &reuse,
                ],
            ),
        )
        .await?;
        tx.commit().await?;
        if !reused_stored.is_empty() {
            super::warn_seq_reuse(gw, batch.journal_epoch, &reused_stored);
        }
        Ok(out)
    }

    async fn query_punches(&self, q: &PunchQuery) -> Result<PunchPage, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        type Param = Box<dyn ToSql + Sync + Send>;
        let mut sql = format!("SELECT id, {RECORD_COLS}, corrected_ms FROM punches WHERE id > $1");
        let after = q.after.map_or(0, |a| a.min(i64::MAX as u64) as i64);
        let mut params: Vec<Param> = vec![Box::new(after)];
        let mut cond = |sql: &mut String, c: &str, v: Param| {
            params.push(v);
            sql.push_str(&format!(" AND {c} ${}", params.len()));
        };
        if let Some(v) = &q.site {
            cond(&mut sql, "site_id =", Box::new(v.clone()));
        }
        if let Some(v) = &q.device {
            cond(&mut sql, "device_id =", Box::new(v.clone()));
        }
        if let Some(v) = &q.subject {
            cond(&mut sql, "subject_id =", Box::new(v.clone()));
        }
        if let Some(v) = q.from_ms {
            cond(&mut sql, "device_time_ms >=", Box::new(v));
        }
        if let Some(v) = q.to_ms {
            cond(&mut sql, "device_time_ms <", Box::new(v));
        }
        params.push(Box::new((q.limit as i64).saturating_add(1)));
        sql.push_str(&format!(" ORDER BY id LIMIT ${}", params.len()));
        let params: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = client.query(&sql, &params).await.map_err(pg_err)?;
        let mut page = PunchPage::default();
        for row in rows {
            if page.items.len() == q.limit {
                page.next_cursor = page.items.last().map(|r| r.cursor);
                break;
            }
            let (site_id, gateway_id, journal_epoch, record, stored_at_ms) =
                row_to_record(&row, 1)?;
            page.items.push(PunchRow {
                cursor: row.try_get::<_, i64>(0).map_err(pg_err)? as u64,
                site_id,
                gateway_id,
                journal_epoch,
                record,
                stored_at_ms,
                corrected_ms: row.try_get(18).map_err(pg_err)?,
            });
        }
        Ok(page)
    }

    async fn query_gateways(&self) -> Result<Vec<GatewayInfo>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let rows = client
            .query(
                "SELECT g.gateway_id, g.site_id, g.last_seen_ms, g.journal_epoch, g.records, \
                 g.duplicates, g.conflicts, s.ranges, g.rejected, g.seq_reuse FROM gateways g LEFT JOIN streams s \
                 ON s.gateway_id = g.gateway_id AND s.journal_epoch = g.journal_epoch \
                 ORDER BY g.gateway_id",
                &[],
            )
            .await
            .map_err(pg_err)?;
        rows.iter()
            .map(|r| {
                let flat: Option<Vec<i64>> = r.try_get(7).map_err(pg_err)?;
                let flat: Vec<u64> = flat
                    .unwrap_or_default()
                    .into_iter()
                    .map(|v| v as u64)
                    .collect();
                let ranges = SeqRanges::from_flat(&flat).ok_or_else(|| corrupt("ranges"))?;
                Ok(GatewayInfo {
                    gateway_id: r.try_get(0).map_err(pg_err)?,
                    site_id: r.try_get(1).map_err(pg_err)?,
                    last_seen_ms: r.try_get(2).map_err(pg_err)?,
                    journal_epoch: r.try_get::<_, i64>(3).map_err(pg_err)? as u64,
                    acked_through: ranges.watermark(),
                    records: r.try_get::<_, i64>(4).map_err(pg_err)? as u64,
                    duplicates: r.try_get::<_, i64>(5).map_err(pg_err)? as u64,
                    conflicts: r.try_get::<_, i64>(6).map_err(pg_err)? as u64,
                    rejected: r.try_get::<_, i64>(8).map_err(pg_err)? as u64,
                    seq_reuse: r.try_get::<_, i64>(9).map_err(pg_err)? as u64,
                })
            })
            .collect()
    }

    /// Rows of a table of held records (`conflicts`, `rejected`) after `after`, oldest
    /// first: `(id, site, gateway, epoch, record, stored_at, the row)`, the row for the
    /// table's own column `extra_col` (column 18).
    async fn query_held(
        &self,
        table: &str,
        extra_col: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, HeldRecord, Row)>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let after = after.map_or(0, |a| a.min(i64::MAX as u64) as i64);
        let rows = client
            .query(
                &format!(
                    "SELECT id, {RECORD_COLS}, {extra_col} FROM {table} WHERE id > $1 ORDER BY id LIMIT $2"
                ),
                &[&after, &(limit as i64)],
            )
            .await
            .map_err(pg_err)?;
        rows.into_iter()
            .map(|row| {
                let id = row.try_get::<_, i64>(0).map_err(pg_err)? as u64;
                Ok((id, row_to_record(&row, 1)?, row))
            })
            .collect()
    }
}

/// Why one commit attempt failed: retry (deadlock) or give up.
enum Attempt {
    Retry(tokio_postgres::Error),
    Fatal(StoreError),
}

impl From<tokio_postgres::Error> for Attempt {
    fn from(e: tokio_postgres::Error) -> Self {
        if retryable(&e) {
            Attempt::Retry(e)
        } else {
            Attempt::Fatal(pg_err(e))
        }
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
            let mut last = None;
            for attempt in 0..RETRIES {
                match self.commit_once(&batch, now_ms).await {
                    Ok(out) => return Ok(out),
                    Err(Attempt::Fatal(e)) => return Err(e),
                    Err(Attempt::Retry(e)) => {
                        tracing::debug!(attempt, error = %e, "commit retried after a deadlock");
                        last = Some(e);
                        tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
                    }
                }
            }
            Err(last.map_or_else(
                || StoreError::Unavailable("commit retries exhausted".into()),
                pg_err,
            ))
        })
    }

    fn punches(&self, query: PunchQuery) -> BoxFuture<'_, Result<PunchPage, StoreError>> {
        Box::pin(async move { self.query_punches(&query).await })
    }

    fn gateways(&self) -> BoxFuture<'_, Result<Vec<GatewayInfo>, StoreError>> {
        Box::pin(self.query_gateways())
    }

    fn conflicts(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<ConflictRow>, StoreError>> {
        Box::pin(async move {
            let rows = self
                .query_held("conflicts", "kept_id", after, limit)
                .await?;
            rows.into_iter()
                .map(
                    |(id, (site_id, gateway_id, journal_epoch, record, stored_at_ms), row)| {
                        Ok(ConflictRow {
                            id,
                            site_id,
                            gateway_id,
                            journal_epoch,
                            record,
                            stored_at_ms,
                            kept_cursor: row.try_get::<_, i64>(18).map_err(pg_err)? as u64,
                        })
                    },
                )
                .collect()
        })
    }

    fn rejected(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<RejectedRow>, StoreError>> {
        Box::pin(async move {
            let rows = self.query_held("rejected", "reason", after, limit).await?;
            rows.into_iter()
                .map(
                    |(id, (site_id, gateway_id, journal_epoch, record, stored_at_ms), row)| {
                        Ok(RejectedRow {
                            id,
                            site_id,
                            gateway_id,
                            journal_epoch,
                            record,
                            stored_at_ms,
                            reason: row.try_get(18).map_err(pg_err)?,
                        })
                    },
                )
                .collect()
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(pool_err)?;
            client.simple_query("SELECT 1").await.map_err(pg_err)?;
            Ok(())
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.pool.close();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tls_tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

    use super::{resolve_tls, tls_client_config, PgTls, PgTlsMode};

    /// A CA (written as PEM to `dir/<name>.pem`) and a server config whose certificate,
    /// issued by that CA, names `db.test` and 127.0.0.1.
    fn ca_and_server(dir: &Path, name: &str) -> (PathBuf, Arc<rustls::ServerConfig>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, name);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["db.test".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let ca_file = dir.join(format!("{name}.pem"));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
        server.alpn_protocols = vec![b"postgresql".to_vec()];
        (ca_file, Arc::new(server))
    }

    /// An in-memory handshake; the client's error when it refuses the server.
    fn handshake(
        client: rustls::ClientConfig,
        server: Arc<rustls::ServerConfig>,
        name: &str,
    ) -> Result<Option<Vec<u8>>, rustls::Error> {
        let name = ServerName::try_from(name.to_string()).unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets().unwrap();
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(c.alpn_protocol().map(<[u8]>::to_vec));
            }
        }
        panic!("the handshake did not finish");
    }

    fn client(mode: PgTlsMode, ca_file: Option<&Path>) -> rustls::ClientConfig {
        tls_client_config(mode, ca_file).unwrap().unwrap()
    }

    fn cert_error(r: Result<Option<Vec<u8>>, rustls::Error>) -> rustls::CertificateError {
        match r {
            Err(rustls::Error::InvalidCertificate(e)) => e,
            other => panic!("expected a certificate error, got {other:?}"),
        }
    }

    #[test]
    fn verify_full_checks_the_issuer_and_the_host_name() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, server) = ca_and_server(dir.path(), "ca");
        let (other_ca, _) = ca_and_server(dir.path(), "other");
        let alpn = handshake(
            client(PgTlsMode::VerifyFull, Some(&ca)),
            server.clone(),
            "db.test",
        );
        assert_eq!(alpn.unwrap().as_deref(), Some(&b"postgresql"[..]));
        handshake(
            client(PgTlsMode::VerifyFull, Some(&ca)),
            server.clone(),
            "127.0.0.1",
        )
        .unwrap();
        let e = cert_error(handshake(
            client(PgTlsMode::VerifyFull, Some(&ca)),
            server.clone(),
            "other.test",
        ));
        assert!(
            matches!(
                e,
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            ),
            "{e:?}"
        );
        let e = cert_error(handshake(
            client(PgTlsMode::VerifyFull, Some(&other_ca)),
            server.clone(),
            "db.test",
        ));
        assert_eq!(e, rustls::CertificateError::UnknownIssuer);
        // Without store.ca_file: the public web roots, which did not issue a test CA.
        let e = cert_error(handshake(
            client(PgTlsMode::VerifyFull, None),
            server,
            "db.test",
        ));
        assert_eq!(e, rustls::CertificateError::UnknownIssuer);
    }

    #[test]
    fn require_encrypts_without_checking_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (_, server) = ca_and_server(dir.path(), "ca");
        handshake(client(PgTlsMode::Require, None), server.clone(), "db.test").unwrap();
        handshake(client(PgTlsMode::Require, None), server, "other.test").unwrap();
        assert!(tls_client_config(PgTlsMode::Disable, None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn ca_file_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = tls_client_config(PgTlsMode::VerifyFull, Some(&missing)).unwrap_err();
        assert!(e.to_string().contains("store.ca_file"), "{e}");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = tls_client_config(PgTlsMode::VerifyFull, Some(&junk)).unwrap_err();
        assert!(e.to_string().contains("store.ca_file"), "{e}");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn store_tls_wins_over_the_url_sslmode() {
        let resolve = |url: &str, mode: Option<PgTlsMode>, ca: Option<&str>| {
            let tls = PgTls {
                mode,
                ca_file: ca.map(PathBuf::from),
            };
            resolve_tls(url, &tls)
        };
        let base = "postgres://u@127.0.0.1:5432/x";
        let mode = |url: &str, set: Option<PgTlsMode>| resolve(url, set, None).unwrap().1;
        assert_eq!(mode(base, None), PgTlsMode::Disable);
        assert_eq!(
            mode(&format!("{base}?sslmode=prefer"), None),
            PgTlsMode::Disable
        );
        assert_eq!(
            mode(&format!("{base}?sslmode=require"), None),
            PgTlsMode::Require
        );
        let (url, m) = resolve(&format!("{base}?sslmode=verify-full"), None, None).unwrap();
        assert_eq!((url.as_str(), m), (base, PgTlsMode::VerifyFull));
        let require = format!("{base}?sslmode=require");
        assert_eq!(mode(&require, Some(PgTlsMode::Disable)), PgTlsMode::Disable);
        assert_eq!(
            mode(&require, Some(PgTlsMode::VerifyFull)),
            PgTlsMode::VerifyFull
        );
        let verify = format!("{base}?sslmode=verify-full");
        assert_eq!(mode(&verify, Some(PgTlsMode::Require)), PgTlsMode::Require);
        assert_eq!(mode(base, Some(PgTlsMode::Require)), PgTlsMode::Require);
        // A CA file needs verification in force, from either place.
        resolve(&verify, None, Some("/ca.pem")).unwrap();
        resolve(base, Some(PgTlsMode::VerifyFull), Some("/ca.pem")).unwrap();
        let e = resolve(&require, None, Some("/ca.pem")).unwrap_err();
        assert!(e.to_string().contains("store.ca_file"), "{e}");
        // PostgreSQL offers no TLS on a Unix socket.
        let e = resolve(
            "host=/run/postgresql dbname=x",
            Some(PgTlsMode::Require),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("store.tls"), "{e}");
        assert_eq!(
            resolve("host=/run/postgresql dbname=x", None, None)
                .unwrap()
                .1,
            PgTlsMode::Disable
        );
    }
}
