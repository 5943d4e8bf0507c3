//! Child processes for end-to-end tests: locating the real binaries, free ports, starting,
//! SIGKILL and SIGTERM, and waiting for readiness.
//!
//! Binaries are found next to the test executable (`target/<profile>/`). The first call in
//! a test process runs `cargo build -p <package> --bin <name>` with the same profile, so
//! `cargo test -p outpost-tests` never runs a stale gateway or relay.
//!
//! `OUTPOST_BIN_DIR=<dir>` skips the build and takes the binaries from `<dir>` as they are
//! (for benchmarks on a busy machine, or binaries built elsewhere); the caller then answers
//! for them being current.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The directory holding the workspace's binaries for the current profile.
pub fn target_profile_dir() -> PathBuf {
    // Tests run as target/<profile>/deps/<test>-<hash>; binaries as target/<profile>/<bin>.
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("executable directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent()
            .expect("target/<profile> directory")
            .to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

static BUILT: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Path of a workspace binary, built first (once per test process) so it is never stale.
pub fn binary(package: &str, name: &str) -> PathBuf {
    binary_with_features(package, name, &[])
}

/// Like [`binary`], built with `features` of `package` enabled (e.g. `test-hooks`). Always
/// pass the same features for one binary, or test processes rebuild it back and forth.
pub fn binary_with_features(package: &str, name: &str, features: &[&str]) -> PathBuf {
    if let Some(dir) = std::env::var_os("OUTPOST_BIN_DIR") {
        let path = PathBuf::from(dir).join(name);
        assert!(
            path.exists(),
            "{} not found (OUTPOST_BIN_DIR is set, so nothing is built)",
            path.display()
        );
        return path;
    }
    let dir = target_profile_dir();
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let set = built.get_or_insert_with(HashSet::new);
    if set.insert(name.to_string()) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", package, "--bin", name]);
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        if profile != "debug" {
            cmd.args(["--profile", profile]);
        }
        let mut all: Vec<String> = features.iter().map(|f| f.to_string()).collect();
        if let Some(extra) = std::env::var_os("OUTPOST_TEST_BIN_FEATURES") {
            all.push(extra.to_string_lossy().into_owned());
        }
        if !all.is_empty() {
            cmd.arg("--features").arg(all.join(","));
        }
        let status = cmd.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build -p {package} --bin {name} failed"
        );
    }
    let path = dir.join(name);
    assert!(path.exists(), "{} not found", path.display());
    path
}

/// A free TCP port on 127.0.0.1 (bound, then released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running child process that is killed (SIGKILL) when dropped.
pub struct ChildProc {
    /// The process.
    pub child: Child,
    /// A label for messages.
    pub name: String,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl ChildProc {
    /// Starts `cmd` with stdout/stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> ChildProc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log");
        let err = out.try_clone().expect("clone log handle");
        cmd.stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .stdin(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        ChildProc {
            child,
            name: name.to_string(),
            log: log.to_path_buf(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The log so far (for assertion messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A minimal blocking HTTP/1.0 request (the server closes the connection after the body).
/// Returns (status, body). Errors are connection failures.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    http_on(&mut s, &addr.to_string(), method, path, headers, body)
}

/// The HTTP/1.0 exchange of [`http`] on an open stream (plain or TLS): writes the request,
/// reads until the server closes, returns (status, body).
pub fn http_on<S: Read + Write>(
    s: &mut S,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    s.flush()?;
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => {}
        // A TLS peer that closes without close_notify: the response is complete anyway
        // (HTTP/1.0, the server closes after the body).
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
        Err(e) => return Err(e),
    }
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    Ok((status, buf[split + 4..].to_vec()))
}

/// Polls `GET path` until it answers 200 or `timeout` passes.
pub fn wait_http_ok(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok((200, _)) = http(addr, "GET", path, &[], b"") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}
