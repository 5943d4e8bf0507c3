//! A real `outpost-gateway` process for end-to-end tests.
//!
//! Each gateway gets a private data directory and a random HTTP port, and is configured
//! through `OUTPOST_*` environment variables (the same way an operator can).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::proc::{binary_with_features, free_port, http, wait_http_ok, ChildProc};

/// A gateway process and what a test needs to talk to it.
pub struct Gateway {
    /// The running process (None while stopped).
    pub proc: Option<ChildProc>,
    /// Its HTTP address.
    pub addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Extra environment (config overrides) used at every start.
    pub env: Vec<(String, String)>,
    /// Where the log (`gateway.log`) and the empty config file go: the `dir` given to
    /// [`Gateway::new`], which may be another place than the data dir's parent
    /// ([`Gateway::with_data_dir`]).
    pub home: PathBuf,
    starts: u32,
}

impl Gateway {
    /// Path of the gateway binary (built if needed), with the `test-hooks` feature so tests
    /// can shift its wall clock (`OUTPOST_TEST_WALL_OFFSET_MS`).
    pub fn bin() -> PathBuf {
        binary_with_features("outpost-gateway", "outpost-gateway", &["test-hooks"])
    }

    /// Prepares a gateway in `dir` (not started). `env` adds config overrides such as
    /// `("OUTPOST_AUTH__REQUIRED", "false")`.
    /// An `OUTPOST_GATEWAY__DATA_DIR` in `env` moves the data dir (see
    /// [`Gateway::with_data_dir`]); the log stays in `dir`.
    pub fn new(dir: &Path, env: &[(&str, &str)]) -> Gateway {
        let data = env
            .iter()
            .rev()
            .find(|(k, _)| *k == "OUTPOST_GATEWAY__DATA_DIR")
            .map(|(_, v)| PathBuf::from(v))
            .unwrap_or_else(|| dir.join("data"));
        Gateway::with_data_dir(dir, &data, env)
    }

    /// Like [`Gateway::new`] with the data directory at `data_dir` (e.g. on a test
    /// filesystem), while the log and the empty config file stay in `dir`.
    pub fn with_data_dir(dir: &Path, data_dir: &Path, env: &[(&str, &str)]) -> Gateway {
        let port = free_port();
        let mut all: Vec<(String, String)> = vec![
            ("OUTPOST_GATEWAY__ID".into(), "gw-test".into()),
            ("OUTPOST_GATEWAY__SITE".into(), "HC001".into()),
            (
                "OUTPOST_GATEWAY__DATA_DIR".into(),
                data_dir.display().to_string(),
            ),
            ("OUTPOST_HTTP__LISTEN".into(), format!("127.0.0.1:{port}")),
            ("OUTPOST_HTTP__RATE_LIMIT_PER_SECOND".into(), "0".into()),
            ("OUTPOST_ADMS__ENABLED".into(), "false".into()),
            // Tests that want MQTT turn it on with their own private broker and port; the
            // default (auto on 0.0.0.0:1883) would make parallel tests share one port.
            ("OUTPOST_MQTT__MODE".into(), "off".into()),
            ("RUST_LOG".into(), "info".into()),
        ];
        for (k, v) in env {
            all.retain(|(kk, _)| kk != k);
            all.push((k.to_string(), v.to_string()));
        }
        Gateway {
            proc: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            data_dir: data_dir.to_path_buf(),
            env: all,
            home: dir.to_path_buf(),
            starts: 0,
        }
    }

    /// A command for the gateway binary with this gateway's environment.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(Self::bin());
        cmd.env_clear();
        for key in ["PATH", "HOME", "TMPDIR"] {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        // An empty config file pins the embedded defaults, so a box with the Debian package
        // installed (/etc/outpost/gateway.toml) does not leak its settings into tests.
        let empty = self.home.join("empty-config.toml");
        if !empty.exists() {
            let _ = std::fs::create_dir_all(&self.home);
            let _ = std::fs::write(&empty, "");
        }
        cmd.env("OUTPOST_CONFIG", &empty);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts the process and waits until `/health/ready` answers 200.
    pub fn start(&mut self) {
        if let Err(e) = self.try_start(Duration::from_secs(30)) {
            panic!("{e}");
        }
    }

    /// The log file of the process.
    pub fn log_path(&self) -> PathBuf {
        self.home.join("gateway.log")
    }

    /// Like [`Gateway::start`], but a gateway that does not become ready within `timeout`
    /// (or exits first) is an error carrying its log, and is killed.
    pub fn try_start(&mut self, timeout: Duration) -> Result<(), String> {
        assert!(self.proc.is_none(), "gateway already running");
        std::fs::create_dir_all(&self.data_dir).expect("data dir");
        self.starts += 1;
        let log = self.log_path();
        let mut cmd = self.command();
        cmd.arg("run");
        let mut p = ChildProc::spawn("outpost-gateway", cmd, &log);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if wait_http_ok(self.addr, "/health/ready", Duration::from_millis(200)) {
                break;
            }
            if p.exited() || std::time::Instant::now() > deadline {
                let exited = p.exited();
                p.kill9();
                return Err(format!(
                    "gateway did not become ready (exited: {exited}); log:\n{}",
                    p.log_text()
                ));
            }
        }
        self.proc = Some(p);
        Ok(())
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// SIGTERM; returns the exit status (None if it did not exit in time).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut p = self.proc.take()?;
        p.terminate(Duration::from_secs(20))
    }

    /// Runs a CLI subcommand with this gateway's environment; returns (exit ok, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.command().args(args).output().expect("run gateway CLI");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// Issues a device token with `outpost-gateway device add`.
    pub fn add_device(&self, id: &str) -> String {
        let (ok, out, err) = self.cli(&["device", "add", id]);
        assert!(ok, "device add failed: {err}");
        out.lines().last().expect("token line").trim().to_string()
    }

    /// The admin token (created at first start).
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .expect("admin token file")
            .trim()
            .to_string()
    }

    /// POSTs a JSON body to `/v1/punches`; returns (status, JSON body).
    pub fn post_punches(&self, token: Option<&str>, body: &Value) -> std::io::Result<(u16, Value)> {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        let (code, bytes) = http(
            self.addr,
            "POST",
            "/v1/punches",
            &headers,
            body.to_string().as_bytes(),
        )?;
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((code, v))
    }

    /// GETs an admin endpoint with the admin token; returns (status, body).
    pub fn admin_get(&self, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
        let auth = format!("Bearer {}", self.admin_token());
        http(
            self.addr,
            "GET",
            path,
            &[("Authorization", auth.as_str())],
            b"",
        )
    }

    /// Every record in the journal, via `outpost-gateway export` (works running or stopped).
    pub fn export(&self) -> Vec<Value> {
        let (ok, out, err) = self.cli(&["export", "--format", "ndjson"]);
        assert!(ok, "export failed: {err}");
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("export line is JSON"))
            .collect()
    }

    /// How many times it was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}
