//! A private mosquitto broker for tests and benchmarks: its own temp directory, config,
//! password file and persistence, on a random port on 127.0.0.1 (never the system service
//! on 1883).
//!
//! - Runs as the current user. Started as root (CI), mosquitto 2 would drop privileges to
//!   the `mosquitto` user and then could not read the temp directory, so the config says
//!   `user root`; mosquitto ignores that line when it is not started as root.
//! - `persistence true`: a broker stopped with SIGTERM and started again keeps its
//!   persistent sessions and queued QoS 1 messages (a SIGKILL loses what was not saved).
//! - `max_inflight_messages 1000`, a large `max_queued_messages` and `set_tcp_nodelay true`,
//!   the settings the gateway's documentation recommends for a site broker (the defaults,
//!   20 and 1000, throttle ack-after-commit ingest and drop punches queued while the
//!   gateway restarts; Nagle's algorithm delays each small ack by up to 40 ms).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::proc::{free_port, ChildProc};

/// A mosquitto process owned by a test.
pub struct Mosquitto {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// Its directory (config, passwords, persistence, log).
    pub dir: PathBuf,
    proc: Option<ChildProc>,
}

/// The mosquitto executable (`mosquitto` in PATH, else `/usr/sbin/mosquitto`).
pub fn mosquitto_bin() -> Option<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("mosquitto");
        if p.is_file() {
            return Some(p);
        }
    }
    let p = PathBuf::from("/usr/sbin/mosquitto");
    p.is_file().then_some(p)
}

impl Mosquitto {
    /// Writes the config into `dir` and starts mosquitto. `users` are (username, password)
    /// pairs; with none, anonymous clients are allowed. Panics if mosquitto is missing
    /// (`tests/run` installs it) or does not start.
    pub fn start(dir: &Path, users: &[(&str, &str)]) -> Mosquitto {
        std::fs::create_dir_all(dir).expect("mosquitto dir");
        let passwd = dir.join("passwd");
        if !users.is_empty() {
            for (i, (u, p)) in users.iter().enumerate() {
                let mut cmd = Command::new("mosquitto_passwd");
                cmd.arg("-b");
                if i == 0 {
                    cmd.arg("-c");
                }
                let st = cmd
                    .arg(&passwd)
                    .arg(u)
                    .arg(p)
                    .status()
                    .expect("run mosquitto_passwd (package mosquitto)");
                assert!(st.success(), "mosquitto_passwd failed");
            }
        }
        let mut m = Mosquitto {
            port: free_port(),
            dir: dir.to_path_buf(),
            proc: None,
        };
        let persistence = dir.join("persistence");
        std::fs::create_dir_all(&persistence).expect("persistence dir");
        let mut conf = format!(
            "listener {port} 127.0.0.1\n\
             user root\n\
             persistence true\n\
             persistence_location {pers}/\n\
             autosave_interval 1\n\
             max_inflight_messages 1000\n\
             max_queued_messages 1000000\n\
             max_packet_size 1048576\n\
             set_tcp_nodelay true\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n",
            port = m.port,
            pers = persistence.display()
        );
        if users.is_empty() {
            conf.push_str("allow_anonymous true\n");
        } else {
            conf.push_str(&format!(
                "allow_anonymous false\npassword_file {}\n",
                passwd.display()
            ));
        }
        std::fs::write(dir.join("mosquitto.conf"), conf).expect("write mosquitto.conf");
        m.launch();
        m
    }

    fn launch(&mut self) {
        let bin = mosquitto_bin().expect("mosquitto not installed (apt-get install mosquitto)");
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(self.dir.join("mosquitto.conf"));
        let mut p = ChildProc::spawn("mosquitto", cmd, &self.dir.join("mosquitto.log"));
        let addr = self.addr();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if p.exited() || Instant::now() > deadline {
                panic!("mosquitto did not start on {addr}; log:\n{}", p.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc = Some(p);
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGTERM (mosquitto saves its persistence file) and wait.
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

    /// Starts it again on the same port with the same config and persistence.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Whether it is running.
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| !p.exited())
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill9();
    }
}
