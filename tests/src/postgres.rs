//! A private PostgreSQL server for tests and benchmarks: `initdb` in a temp dir, `postgres`
//! on a random port bound to 127.0.0.1, its Unix socket in the same temp dir. Never the
//! system service.
//!
//! The binaries come from `/usr/lib/postgresql/<version>/bin/` (Debian's `postgresql`
//! package; `tests/run` installs it). `initdb` refuses to run as root, so when the tests run
//! as root the temp dir is given to the `postgres` system user and the server processes
//! run as that user (uid/gid set on the child, so the child pid is the postmaster itself
//! and can be signalled directly). The server is stopped (fast shutdown) and its files
//! removed on drop.
//!
//! [`PgServer::start_ssl`] serves TLS (`ssl = on`) with a certificate and key the test made
//! (e.g. [`crate::pki::Pki`]). PostgreSQL refuses a key file that others can read, or that
//! is owned by anyone but its own user or root, so the key is copied into the server's
//! temp dir with mode 0600 and handed to the server's user.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::proc::{free_port, ChildProc};

/// A running private PostgreSQL server.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    user: Option<(u32, u32)>,
    fsync: bool,
    ssl: bool,
    proc: Option<ChildProc>,
}

/// The newest installed PostgreSQL's bin directory.
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (apt-get install postgresql, or run tests/run)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, p)| p)
        .context("no /usr/lib/postgresql/*/bin/initdb found (apt-get install postgresql)")
}

/// uid and gid of the `postgres` system user, from /etc/passwd.
fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            return Ok((f[2].parse()?, f[3].parse()?));
        }
    }
    bail!("running as root needs the `postgres` system user (apt-get install postgresql)")
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))?;
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

impl PgServer {
    /// initdb + start with `fsync = on` (the durable default; benchmarks use this).
    pub fn start() -> anyhow::Result<PgServer> {
        PgServer::start_with(true)
    }

    /// initdb + start; `fsync = false` trades crash safety of the OS for speed.
    pub fn start_with(fsync: bool) -> anyhow::Result<PgServer> {
        PgServer::init(fsync, None)
    }

    /// Like [`PgServer::start_with`], with `ssl = on` serving `cert_file` (PEM chain) and
    /// `key_file` (PEM key). Clients may still connect without TLS (pg_hba `host` lines).
    pub fn start_ssl(fsync: bool, cert_file: &Path, key_file: &Path) -> anyhow::Result<PgServer> {
        PgServer::init(fsync, Some((cert_file, key_file)))
    }

    fn init(fsync: bool, ssl: Option<(&Path, &Path)>) -> anyhow::Result<PgServer> {
        let bin = pg_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("outpost-pg-").tempdir()?;
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            let (uid, gid) = postgres_user()?;
            chown_tree(dir.path(), uid, gid)?;
            Some((uid, gid))
        } else {
            None
        };
        let mut s = PgServer {
            dir,
            bin,
            port: free_port(),
            user,
            fsync,
            ssl: ssl.is_some(),
            proc: None,
        };
        let mut initdb = s.command("initdb");
        initdb.arg("-D").arg(s.data_dir()).args([
            "-U",
            "outpost",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        let out = initdb.output().context("run initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if let Some((cert, key)) = ssl {
            s.install_ssl_files(cert, key)?;
        }
        s.start_server()?;
        Ok(s)
    }

    /// Copies the certificate and key to `server.crt` / `server.key` in the server's dir,
    /// the key with mode 0600, both owned by the server's user.
    fn install_ssl_files(&self, cert: &Path, key: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let (crt_to, key_to) = (self.ssl_cert_file(), self.ssl_key_file());
        std::fs::copy(cert, &crt_to)
            .with_context(|| format!("copy {} to {}", cert.display(), crt_to.display()))?;
        std::fs::copy(key, &key_to)
            .with_context(|| format!("copy {} to {}", key.display(), key_to.display()))?;
        std::fs::set_permissions(&key_to, std::fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = self.user {
            chown_tree(&crt_to, uid, gid)?;
            chown_tree(&key_to, uid, gid)?;
        }
        Ok(())
    }

    fn ssl_cert_file(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    fn ssl_key_file(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    fn command(&self, name: &str) -> Command {
        let mut c = Command::new(self.bin.join(name));
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            c.uid(uid).gid(gid);
        }
        c.current_dir(self.dir.path());
        c
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server on its port (again, after [`PgServer::stop`]) and waits until it
    /// accepts connections.
    pub fn start_server(&mut self) -> anyhow::Result<()> {
        if self.proc.is_some() {
            return Ok(());
        }
        let mut c = self.command("postgres");
        c.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=200"])
            .args(["-c", "shared_buffers=128MB"])
            .args([
                "-c",
                &format!("fsync={}", if self.fsync { "on" } else { "off" }),
            ]);
        if self.ssl {
            c.args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!("ssl_cert_file={}", self.ssl_cert_file().display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", self.ssl_key_file().display()));
        }
        let log = self.dir.path().join("postgres.log");
        let proc = ChildProc::spawn("postgres", c, &log);
        self.proc = Some(proc);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if let Some(p) = self.proc.as_mut() {
                if p.exited() {
                    let text = p.log_text();
                    self.proc = None;
                    bail!("postgres exited at start:\n{text}");
                }
            }
            if Instant::now() > deadline {
                bail!("postgres did not become ready in 60 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fast shutdown (SIGINT: abort sessions, checkpoint, exit) and wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(p.pid(), libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while !p.exited() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // ChildProc's drop kills and reaps whatever is left.
        }
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TCP address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A connection URL for the superuser `outpost` and database `postgres`.
    pub fn url(&self) -> String {
        format!("postgres://outpost@127.0.0.1:{}/postgres", self.port)
    }

    /// Creates database `name` and returns its URL (one server, isolated databases).
    pub fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let out = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "outpost",
                name,
            ])
            .output()
            .context("run createdb")?;
        if !out.status.success() {
            bail!("createdb {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(format!("postgres://outpost@127.0.0.1:{}/{name}", self.port))
    }

    /// Runs `sql` with `psql` as `outpost` in database `db` over TCP without TLS (so the
    /// query's own session is easy to tell from the ones under test); returns the
    /// unaligned, tuples-only output (`|` between columns, one row per line).
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "outpost",
                "-d",
                db,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .arg("-c")
            .arg(sql)
            .env("PGSSLMODE", "disable")
            .output()
            .context("run psql")?;
        if !out.status.success() {
            bail!("psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
