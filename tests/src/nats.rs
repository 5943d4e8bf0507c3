//! A private NATS server with JetStream for tests and benchmarks: `nats-server -js` on a
//! random port on 127.0.0.1, its JetStream store in a temp dir. Never a shared server.
//!
//! The binary comes from the Debian package `nats-server` (`/usr/sbin/nats-server`;
//! `tests/run` installs it). A missing binary is an error naming the package, so a test
//! that needs NATS fails rather than skips.
//!
//! [`NatsServer::stop`] (SIGTERM: a clean shutdown) and [`NatsServer::start_again`] restart
//! it on the same port with the same store, so streams and their messages survive: what a
//! test of "a NATS restart during delivery loses nothing" needs. The server is killed
//! (SIGKILL) when dropped.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::proc::{free_port, ChildProc};

/// How long the server may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(15);

/// A running (or stopped) private `nats-server -js`.
pub struct NatsServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    proc: Option<ChildProc>,
}

/// The `nats-server` executable: in PATH, else Debian's `/usr/sbin/nats-server`.
pub fn nats_server_bin() -> anyhow::Result<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("nats-server");
        if p.is_file() {
            return Ok(p);
        }
    }
    for p in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if Path::new(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!(
        "nats-server not found in PATH or /usr/sbin: install the Debian package `nats-server` \
         (apt-get install nats-server), or run tests/run, which installs it"
    )
}

impl NatsServer {
    /// Starts `nats-server -js` on a free port with a fresh store, and waits until it
    /// accepts connections.
    pub fn start() -> anyhow::Result<NatsServer> {
        let bin = nats_server_bin()?;
        let dir = tempfile::Builder::new().prefix("outpost-nats-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("store"))?;
        let mut s = NatsServer {
            dir,
            bin,
            port: free_port(),
            proc: None,
        };
        s.launch()?;
        Ok(s)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-js")
            .args(["-a", "127.0.0.1"])
            .args(["-p", &self.port.to_string()])
            .arg("--store_dir")
            .arg(self.store_dir());
        let mut p = ChildProc::spawn("nats-server", cmd, &self.log_path());
        let addr = self.addr();
        let deadline = Instant::now() + START_DEADLINE;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if p.exited() {
                bail!(
                    "nats-server exited at start on {addr}; log:\n{}",
                    p.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server did not accept connections on {addr} within {:?}; log:\n{}",
                    START_DEADLINE,
                    p.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc = Some(p);
        Ok(())
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The JetStream store directory (kept across restarts).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// SIGTERM (a clean shutdown) and wait; SIGKILL if it takes longer than 10 s.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            if p.terminate(Duration::from_secs(10)).is_none() {
                p.kill9();
            }
        }
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Starts it again (after [`Self::stop`] or [`Self::kill9`]) on the same port with the
    /// same store.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch()
            .with_context(|| format!("restart nats-server on port {}", self.port))
    }

    /// Whether it is running.
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| !p.exited())
    }

    /// Its log so far (for assertion messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
    }
}
