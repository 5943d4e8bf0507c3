//! A real `outpost-relay` process for end-to-end tests and benchmarks, and small
//! hand-made batches for tests that need exact control over punches, sequence numbers,
//! boots and anchors (the realistic generator is [`crate::workload`]).
//!
//! [`Relay::start`] gives each relay a temp data dir, a random port on 127.0.0.1 and plain
//! HTTP (`tls.disabled = true`), configured through `OUTPOST_*` environment variables like
//! an operator would, and waits until `/health/ready` answers 200. [`Relay::start_tls`] does
//! the same with TLS from a test [`Pki`], optionally asking for client certificates. The binary is found and
//! built by [`crate::proc::binary`]. Gateways are issued with the real CLI
//! (`outpost-relay gateway add`), whose last output line is the token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use outpost_protocol::frame::{self, Codec};
use outpost_protocol::{
    Batch, BootId, Id, Punch, PunchKind, Received, Record, Source, TimeAnchor, VerifyMethod,
};

use crate::pki::{https, Pki};
use crate::proc::{binary, free_port, http, ChildProc};

/// 2026-11-22T06:00:00Z, the base of the test punches' times.
pub const T0: i64 = 1_795_327_200_000;

/// An id from a test string (panics on an invalid one: test input only).
pub fn id(s: &str) -> Id {
    Id::new(s).unwrap_or_else(|e| panic!("bad test id {s:?}: {e}"))
}

/// A punch: device `device`, its counter `seq`, subject `subject`, `minute` minutes after
/// [`T0`].
pub fn punch(device: &str, seq: u64, subject: &str, minute: i64) -> Punch {
    Punch {
        device_id: id(device),
        device_seq: seq,
        subject_id: id(subject),
        kind: if seq % 2 == 0 {
            PunchKind::In
        } else {
            PunchKind::Out
        },
        verify: VerifyMethod::Card,
        device_time_ms: T0 + minute * 60_000,
        utc_offset_min: Some(120),
    }
}

/// A record of `p` at `gateway_seq`, received with a synchronised clock in boot `[7; 16]`.
pub fn record(p: Punch, gateway_seq: u64) -> Record {
    Record {
        punch: p,
        gateway_seq,
        received: Received {
            boot_id: BootId([7; 16]),
            mono_ms: 1_000 + gateway_seq * 10,
            wall_ms: p.device_time_ms + 250,
            clock_synced: true,
        },
        source: Source::Mqtt,
    }
}

/// A record received without a trusted clock: boot `boot`, monotonic time `mono_ms`, and a
/// wall clock stuck in 2001.
pub fn unsynced_record(p: Punch, gateway_seq: u64, boot: [u8; 16], mono_ms: u64) -> Record {
    Record {
        punch: p,
        gateway_seq,
        received: Received {
            boot_id: BootId(boot),
            mono_ms,
            wall_ms: 978_307_200_000,
            clock_synced: false,
        },
        source: Source::Http,
    }
}

/// A batch of `records` (contiguous seqs expected) and no anchors.
pub fn batch(gateway: &str, site: &str, epoch: u64, records: Vec<Record>) -> Batch {
    Batch {
        gateway_id: id(gateway),
        site_id: id(site),
        journal_epoch: epoch,
        records,
        anchors: Vec::new(),
    }
}

/// An anchor of `boot`.
pub fn anchor(boot: [u8; 16], mono_ms: u64, true_ms: i64, uncertainty_ms: u32) -> TimeAnchor {
    TimeAnchor {
        boot_id: BootId(boot),
        mono_ms,
        true_ms,
        uncertainty_ms,
    }
}

/// Deterministic punches `seqs` of a site with four devices `dev-0..3` and twenty subjects:
/// punch `n` is device `dev-(n % 4)`, device_seq `n`, subject `EMP-(n % 20)`.
pub fn punches(seqs: std::ops::RangeInclusive<u64>) -> Vec<Punch> {
    seqs.map(|n| {
        punch(
            &format!("dev-{}", n % 4),
            n,
            &format!("EMP-{:04}", n % 20),
            n as i64,
        )
    })
    .collect()
}

/// Records for `punches` with gateway_seq starting at `first_seq`.
pub fn records(punches: &[Punch], first_seq: u64) -> Vec<Record> {
    punches
        .iter()
        .enumerate()
        .map(|(i, p)| record(*p, first_seq + i as u64))
        .collect()
}

/// The frame of `b`, zstd compressed.
pub fn frame(b: &Batch) -> Vec<u8> {
    frame::encode_batch(b, Codec::Zstd).expect("encode batch frame")
}

/// Which store a test relay uses.
#[derive(Debug, Clone)]
pub enum StoreKind {
    /// The embedded sled store in the relay's data dir.
    Sled,
    /// PostgreSQL at this URL.
    Postgres(String),
}

/// A relay process.
pub struct Relay {
    /// The running process (None while stopped).
    pub proc: Option<ChildProc>,
    /// Its listening address (plain HTTP).
    pub addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// The admin token (read from the file the relay created).
    pub admin_token: String,
    /// With TLS: the client config (trusting the test CA) the harness's own requests use.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Where the log (`relay-<port>.log`) goes: the data dir's parent unless a test moves
    /// it (e.g. off a test filesystem that a power cut rewinds).
    pub log_dir: PathBuf,
    env: Vec<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl Relay {
    /// Path of the relay binary (built if needed).
    pub fn bin() -> PathBuf {
        binary("outpost-relay", "outpost-relay")
    }

    /// Starts a relay with its own temp data dir and `store`; `env` adds or replaces
    /// config overrides (e.g. `("OUTPOST_LIMITS__MAX_RECORDS_PER_BATCH", "10")`).
    pub fn start(store: StoreKind, env: &[(&str, &str)]) -> anyhow::Result<Relay> {
        let dir = tempfile::Builder::new()
            .prefix("outpost-relay-")
            .tempdir()?;
        let data = dir.path().join("data");
        let mut r = Relay::prepare(&data, store, env);
        r._dir = Some(dir);
        r.restart()?;
        Ok(r)
    }

    /// Like [`Relay::start`], serving TLS with `pki`'s server certificate; with
    /// `client_ca`, `tls.client_ca_file` is `pki`'s CA, so gateways may use client
    /// certificates that `pki` issued.
    pub fn start_tls(
        store: StoreKind,
        pki: &Pki,
        client_ca: bool,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Relay> {
        let dir = tempfile::Builder::new()
            .prefix("outpost-relay-")
            .tempdir()?;
        let (cert, key, ca) = (
            pki.cert_file.display().to_string(),
            pki.key_file.display().to_string(),
            pki.ca_file.display().to_string(),
        );
        let mut all: Vec<(&str, &str)> = vec![
            ("OUTPOST_TLS__DISABLED", "false"),
            ("OUTPOST_TLS__CERT_FILE", &cert),
            ("OUTPOST_TLS__KEY_FILE", &key),
        ];
        if client_ca {
            all.push(("OUTPOST_TLS__CLIENT_CA_FILE", &ca));
        }
        all.extend_from_slice(env);
        let mut r = Relay::prepare(&dir.path().join("data"), store, &all);
        r.tls = Some(pki.client_config(None));
        r._dir = Some(dir);
        r.restart()?;
        Ok(r)
    }

    /// Like [`Relay::start`] with a data dir the caller owns (not started yet: call
    /// [`Relay::restart`]).
    pub fn prepare(data_dir: &Path, store: StoreKind, env: &[(&str, &str)]) -> Relay {
        let port = free_port();
        let mut all: Vec<(String, String)> = vec![
            ("OUTPOST_RELAY__LISTEN".into(), format!("127.0.0.1:{port}")),
            (
                "OUTPOST_RELAY__DATA_DIR".into(),
                data_dir.display().to_string(),
            ),
            ("OUTPOST_TLS__DISABLED".into(), "true".into()),
            ("OUTPOST_LOG__LEVEL".into(), "info".into()),
            ("OUTPOST_AUTH__RELOAD_INTERVAL_MS".into(), "100".into()),
        ];
        match store {
            StoreKind::Sled => all.push(("OUTPOST_STORE__KIND".into(), "sled".into())),
            StoreKind::Postgres(url) => {
                all.push(("OUTPOST_STORE__KIND".into(), "postgres".into()));
                all.push(("OUTPOST_STORE__URL".into(), url));
            }
        }
        for (k, v) in env {
            all.retain(|(kk, _)| kk != k);
            all.push((k.to_string(), v.to_string()));
        }
        Relay {
            proc: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            data_dir: data_dir.to_path_buf(),
            admin_token: String::new(),
            tls: None,
            log_dir: data_dir.parent().unwrap_or(data_dir).to_path_buf(),
            env: all,
            _dir: None,
        }
    }

    /// A command for the relay binary with this relay's config (for a CLI run the test
    /// wants to control itself, e.g. kill).
    pub fn cli_command(&self) -> Command {
        self.command()
    }

    /// The log file of the process.
    pub fn log_path(&self) -> PathBuf {
        self.log_dir.join(format!("relay-{}.log", self.addr.port()))
    }

    /// SIGKILL (no-op when not running).
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(Relay::bin());
        c.env_remove("RUST_LOG");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// (Re)starts the process and waits until `/health/ready` answers 200.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.data_dir)?;
        let mut c = self.command();
        c.arg("run");
        let log = self.log_path();
        let mut p = ChildProc::spawn("outpost-relay", c, &log);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let ready = loop {
            if let Ok((200, _)) = self.request("GET", "/health/ready", &[], b"") {
                break true;
            }
            if std::time::Instant::now() > deadline || p.exited() {
                break false;
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        if !ready {
            let exited = p.exited();
            bail!(
                "relay not ready after 60 s (exited: {exited}); log:\n{}",
                p.log_text()
            );
        }
        self.proc = Some(p);
        self.admin_token = std::fs::read_to_string(self.data_dir.join("admin.token"))
            .context("read the relay's admin.token")?
            .trim()
            .to_string();
        Ok(())
    }

    /// SIGTERM and wait; returns whether it exited with status 0.
    pub fn stop(&mut self) -> bool {
        match self.proc.take() {
            Some(mut p) => p
                .terminate(Duration::from_secs(30))
                .is_some_and(|s| s.success()),
            None => true,
        }
    }

    /// Runs the CLI with this relay's config (`args` after the binary name).
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let mut c = self.command();
        c.args(args);
        c.output().context("run outpost-relay")
    }

    /// `gateway add ID --site SITE`: returns the token (the output's last line).
    pub fn add_gateway(&self, gateway: &str, site: &str) -> anyhow::Result<String> {
        let out = self.cli(&["gateway", "add", gateway, "--site", site])?;
        if !out.status.success() {
            bail!(
                "gateway add failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8(out.stdout)?;
        let token = text
            .lines()
            .last()
            .map(|l| l.trim().to_string())
            .filter(|t| !t.is_empty())
            .context("gateway add printed no token")?;
        self.wait_token(&token, true)?;
        Ok(token)
    }

    /// Waits until the running relay accepts (`known`) or refuses `token`: it reloads the
    /// gateways file every `auth.reload_interval_ms`. Probes with an empty body, which a
    /// known gateway gets 400 for and an unknown one 401.
    pub fn wait_token(&self, token: &str, known: bool) -> anyhow::Result<()> {
        if self.proc.is_none() {
            return Ok(());
        }
        let auth = format!("Bearer {token}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, _) =
                self.request("POST", "/v1/batches", &[("Authorization", &auth)], b"")?;
            if (status != 401) == known {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("the relay did not pick up the gateways file change in 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `gateway revoke ID`.
    pub fn revoke_gateway(&self, gateway: &str) -> anyhow::Result<()> {
        let out = self.cli(&["gateway", "revoke", gateway])?;
        if !out.status.success() {
            bail!(
                "gateway revoke failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// `reader add NAME`: returns the read token (the output's last line).
    pub fn add_reader(&self, name: &str) -> anyhow::Result<String> {
        self.add_scoped_reader(name, &[])
    }

    /// `reader add NAME --site S...` (every site when `sites` is empty): returns the read
    /// token (the output's last line) once the running relay accepts it.
    pub fn add_scoped_reader(&self, name: &str, sites: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["reader", "add", name];
        for s in sites {
            args.extend(["--site", s]);
        }
        let out = self.cli(&args)?;
        if !out.status.success() {
            bail!(
                "reader add failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let token = String::from_utf8(out.stdout)?
            .lines()
            .last()
            .map(|l| l.trim().to_string())
            .filter(|t| !t.is_empty())
            .context("reader add printed no token")?;
        if self.proc.is_some() {
            self.wait_reader(&token)?;
        }
        Ok(token)
    }

    /// Waits until the running relay accepts the read token `token` (it reloads the
    /// readers file every `auth.reload_interval_ms`).
    pub fn wait_reader(&self, token: &str) -> anyhow::Result<()> {
        let auth = format!("Bearer {token}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, _) =
                self.request("GET", "/v1/gateways", &[("Authorization", &auth)], b"")?;
            if status != 401 {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("the relay did not accept read token {token:.8}… within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://addr` (or `https://localhost:port` with TLS).
    pub fn http_url(&self) -> String {
        match self.tls {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    /// `ws://addr/v1/uplink` (or `wss://localhost:port/v1/uplink` with TLS).
    pub fn ws_url(&self) -> String {
        match self.tls {
            Some(_) => format!("wss://localhost:{}/v1/uplink", self.addr.port()),
            None => format!("ws://{}/v1/uplink", self.addr),
        }
    }

    /// One request to the relay, over TLS when it serves TLS; returns (status, body).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        match &self.tls {
            Some(cfg) => https(self.addr, cfg.clone(), method, path, headers, body),
            None => http(self.addr, method, path, headers, body),
        }
    }

    /// `GET path` with the admin token; returns (status, body).
    pub fn admin_get(&self, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        let auth = format!("Bearer {}", self.admin_token);
        Ok(self.request("GET", path, &[("Authorization", &auth)], b"")?)
    }

    /// The process id of the running relay.
    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(ChildProc::pid)
    }

    /// The relay's log so far.
    pub fn log(&self) -> String {
        self.proc
            .as_ref()
            .map(ChildProc::log_text)
            .unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An uplink WebSocket client connection.
pub type Uplink =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the uplink WebSocket at `url` with `token` (or no Authorization header when
/// `None`). A refused upgrade is an error carrying the HTTP status.
pub async fn ws_connect(
    url: &str,
    token: Option<&str>,
) -> Result<Uplink, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request()?;
    if let Some(t) = token {
        let v = format!("Bearer {t}").parse().map_err(|_| {
            tokio_tungstenite::tungstenite::Error::Url(
                tokio_tungstenite::tungstenite::error::UrlError::EmptyHostName,
            )
        })?;
        req.headers_mut().insert("authorization", v);
    }
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    Ok(ws)
}

/// What the relay sent back on an uplink socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// An ack frame.
    Ack(outpost_protocol::Ack),
    /// A close frame: code and reason.
    Close(u16, String),
    /// The connection ended without a close frame.
    Ended,
}

/// Reads the next ack or close (skipping pings), with a 60 s limit.
pub async fn ws_reply(ws: &mut Uplink) -> Reply {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("a reply from the relay within 60 s");
        match next {
            Some(Ok(Message::Binary(b))) => {
                return Reply::Ack(frame::decode_ack(&b).expect("relay sent a valid ack frame"))
            }
            Some(Ok(Message::Close(Some(c)))) => {
                return Reply::Close(u16::from(c.code), c.reason.to_string())
            }
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return Reply::Ended,
            Some(Ok(_)) => continue,
        }
    }
}

/// Sends one frame as a binary message.
pub async fn ws_send(ws: &mut Uplink, frame: Vec<u8>) {
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        frame.into(),
    ))
    .await
    .expect("send a frame");
}

/// `POST /v1/batches` with `frame` and `token`; returns the status and body.
pub async fn post_frame(base: &str, token: Option<&str>, frame: Vec<u8>) -> (u16, Vec<u8>) {
    let client = reqwest::Client::new();
    let mut req = client.post(format!("{base}/v1/batches")).body(frame);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("POST /v1/batches");
    let status = resp.status().as_u16();
    (
        status,
        resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
    )
}

/// The `error.code` of a JSON error body.
pub fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("<not a JSON error: {}>", String::from_utf8_lossy(body)))
}
