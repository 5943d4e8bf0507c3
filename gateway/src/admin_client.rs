//! A tiny HTTP client for the CLI to reach the local gateway's admin API.
//!
//! It speaks HTTP/1.0 on purpose: the server then ends the body by closing the connection
//! instead of chunking it, so streaming an export to stdout needs no chunk decoder.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Why the admin API could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there: the daemon is not running (or listens elsewhere).
    #[error("no gateway is listening on {0}")]
    NotRunning(SocketAddr),
    /// The connection failed in another way.
    #[error("talking to the gateway on {addr}: {source}")]
    Io {
        /// Where.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The answer was not HTTP.
    #[error("the program on {0} did not answer like an Outpost gateway")]
    NotHttp(SocketAddr),
}

pub use outpost_ops::addr::local_addr;

/// Sends `GET path` with a bearer token; returns the status and a reader positioned at the body.
pub fn get(addr: SocketAddr, path: &str, token: &str) -> Result<(u16, Box<dyn Read>), ClientError> {
    let io = |source| ClientError::Io { addr, source };
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            ClientError::NotRunning(addr)
        } else {
            io(e)
        }
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nUser-Agent: outpost-gateway-cli\r\n\r\n"
    )
    .map_err(io)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(io)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|_| line.starts_with("HTTP/"))
        .ok_or(ClientError::NotHttp(addr))?;
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(io)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    Ok((status, Box::new(r)))
}
