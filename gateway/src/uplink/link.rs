//! The link to one relay: where it is ([`Endpoint`]), what can go wrong ([`LinkError`]),
//! and the [`Link`] trait the uplink session drives, with two implementations:
//! [`super::ws::WsLink`] (one WebSocket, frames pipelined) and [`super::https::HttpsLink`]
//! (one `POST /v1/batches` per frame, up to `uplink.window` at once).
//!
//! # Contract every link keeps
//!
//! - `send` hands one frame to the transport; `recv` yields the relay's ack for the oldest
//!   frame sent and not yet answered. Acks come back **in send order**: the WebSocket relay
//!   answers frames in order, and the HTTPS link awaits its requests in order. So the n-th
//!   ack answers the n-th frame, which is what lets the session trim by batch.
//! - A frame the relay refused, a closed socket, a failed request: `recv` returns an error,
//!   the session ends, and every frame without an ack is resent on the next connection
//!   (from the journal's oldest unacknowledged record).
//! - `recv` is cancel-safe (the session polls it in a `select!`).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::http::Uri;
use bytes::Bytes;
use outpost_protocol::Ack;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_tungstenite::MaybeTlsStream;

use super::tls::TlsError;

/// Which protocol carries the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// One long-lived WebSocket on `/v1/uplink` (the normal path).
    Websocket,
    /// One `POST /v1/batches` per batch, for networks that break WebSockets.
    Https,
}

impl Transport {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Websocket => "websocket",
            Transport::Https => "https",
        }
    }
}

/// A relay address resolved for one transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL as configured (for status and logs).
    pub url: String,
    /// WebSocket or HTTPS POST.
    pub transport: Transport,
    /// `wss://` or `https://`.
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Path (and query) of the uplink endpoint on that host.
    pub path: String,
}

/// The standard paths; a URL with no path (or `/`) gets the one for its transport.
const WS_PATH: &str = "/v1/uplink";
const POST_PATH: &str = "/v1/batches";

impl Endpoint {
    /// Parses a relay URL for `transport`. The scheme says whether TLS is used
    /// (`wss`/`https`) or not (`ws`/`http`); the path defaults to `/v1/uplink` or
    /// `/v1/batches`, and either of those is swapped for the transport's own, so one list
    /// of URLs works with both transports. Any other path is a prefix (a reverse proxy).
    pub fn parse(url: &str, transport: Transport) -> Result<Endpoint, EndpointError> {
        let uri: Uri = url.parse().map_err(EndpointError::NotAUrl)?;
        let tls = match uri.scheme_str() {
            Some("wss") | Some("https") => true,
            Some("ws") | Some("http") => false,
            Some(other) => return Err(EndpointError::Scheme(other.to_string())),
            None => return Err(EndpointError::NoScheme),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or(EndpointError::NoHost)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let own = match transport {
            Transport::Websocket => WS_PATH,
            Transport::Https => POST_PATH,
        };
        let raw = uri.path().trim_end_matches('/');
        let path = if raw.is_empty() || raw == WS_PATH || raw == POST_PATH {
            own.to_string()
        } else if let Some(prefix) = raw
            .strip_suffix(WS_PATH)
            .or_else(|| raw.strip_suffix(POST_PATH))
        {
            format!("{prefix}{own}")
        } else {
            format!("{raw}{own}")
        };
        let path = match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        Ok(Endpoint {
            url: url.to_string(),
            transport,
            tls,
            host,
            port,
            path,
        })
    }

    /// `host:port` for the Host header (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The full URL of the endpoint (scheme, authority, path).
    pub fn full_url(&self) -> String {
        let scheme = match (self.transport, self.tls) {
            (Transport::Websocket, true) => "wss",
            (Transport::Websocket, false) => "ws",
            (Transport::Https, true) => "https",
            (Transport::Https, false) => "http",
        };
        format!("{scheme}://{}{}", self.authority(), self.path)
    }
}

/// Why a relay URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// It does not parse as a URL.
    #[error("not a URL ({0}); write e.g. \"wss://relay.example.org\"")]
    NotAUrl(#[source] axum::http::uri::InvalidUri),
    /// The scheme is not one of ours.
    #[error("scheme {0:?} is not supported; use wss://, ws://, https:// or http://")]
    Scheme(String),
    /// There is no scheme.
    #[error("a scheme is needed (wss://, ws://, https:// or http://)")]
    NoScheme,
    /// There is no host.
    #[error("the URL has no host")]
    NoHost,
}

/// Why a link failed. Every variant ends the session; the uplink backs off and resends.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// TCP connection or DNS failed.
    #[error("cannot connect to {0}")]
    Connect(String),
    /// The TLS handshake failed (unknown CA, wrong pin, wrong name, client certificate
    /// refused or unusable).
    #[error("TLS handshake failed: {0} (check uplink.ca_file / uplink.pinned_cert_sha256 / uplink.client_cert_file)")]
    Tls(#[source] TlsError),
    /// The relay refused the token, the client certificate or the gateway/site (401/403,
    /// WebSocket 1008).
    #[error("the relay refused this gateway: {0}. Check uplink.token_file (issue a token with `outpost-relay gateway add <gateway.id> --site <gateway.site>`), or, without a token, that the relay knows the certificate in uplink.client_cert_file")]
    Unauthorized(String),
    /// The relay refused a frame as too large (413, WebSocket 1009).
    #[error("the relay refused a batch as too large: {0}")]
    TooLarge(String),
    /// The relay answered with another error status or close code.
    #[error("the relay refused: {0}")]
    Refused(String),
    /// The connection broke or was closed.
    #[error("connection lost: {0}")]
    Closed(String),
    /// Nothing heard in time (ping, ack or connect timeout).
    #[error("timed out: {0}")]
    Timeout(String),
    /// The relay sent something that is not a valid answer.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The gateway itself could not go on (token missing, journal unreadable).
    #[error("{0}")]
    Local(String),
}

impl LinkError {
    /// A short stable name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            LinkError::Connect(_) => "connect",
            LinkError::Tls(_) => "tls",
            LinkError::Unauthorized(_) => "unauthorized",
            LinkError::TooLarge(_) => "too_large",
            LinkError::Refused(_) => "refused",
            LinkError::Closed(_) => "closed",
            LinkError::Timeout(_) => "timeout",
            LinkError::Protocol(_) => "protocol",
            LinkError::Local(_) => "local",
        }
    }

    /// Maps an HTTP error status and body (the relay's `{"error": {...}}`) to an error.
    pub fn from_status(status: u16, body: &[u8]) -> LinkError {
        let detail = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                let code = v["error"]["code"].as_str()?.to_string();
                let msg = v["error"]["message"].as_str().unwrap_or("").to_string();
                Some(format!("{code}: {msg}"))
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into());
        let text = format!("HTTP {status} {detail}");
        match status {
            401 | 403 => LinkError::Unauthorized(text),
            413 => LinkError::TooLarge(text),
            _ => LinkError::Refused(text),
        }
    }

    /// Maps a WebSocket close code and reason to an error.
    pub fn from_close(code: u16, reason: &str) -> LinkError {
        let text = format!("WebSocket closed by the relay ({code} {reason})");
        match code {
            1008 => LinkError::Unauthorized(text),
            1009 => LinkError::TooLarge(text),
            1000 | 1001 => LinkError::Closed(text),
            _ => LinkError::Refused(text),
        }
    }
}

/// A connected transport to one relay (see the module docs for the contract).
pub trait Link: Send {
    /// Hands one frame to the transport.
    fn send(&mut self, frame: Bytes) -> impl Future<Output = Result<(), LinkError>> + Send;
    /// The ack of the oldest unanswered frame. Pends while nothing is in flight and the
    /// transport has nothing to report. Cancel-safe.
    fn recv(&mut self) -> impl Future<Output = Result<Ack, LinkError>> + Send;
    /// Sends a keep-alive ping, when the transport has one.
    fn ping(&mut self) -> impl Future<Output = Result<(), LinkError>> + Send;
    /// Whether [`Link::ping`] does anything (WebSocket) or not (HTTPS).
    fn pings(&self) -> bool;
    /// When the relay was last heard from (any message, pong or response).
    fn last_heard(&self) -> Instant;
    /// Closes politely (best effort).
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// Opens TCP (and TLS for `wss`/`https`) to the endpoint. Nagle is off: frames and acks
/// are small and latency-bound.
pub async fn connect_stream(
    ep: &Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<MaybeTlsStream<TcpStream>, LinkError> {
    let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| LinkError::Connect(format!("{}: {e}", ep.authority())))?;
    if let Err(e) = tcp.set_nodelay(true) {
        // Not fatal: the link works, only small acks may wait for Nagle's timer.
        tracing::warn!(error = %e, relay = %ep.url, "cannot set TCP_NODELAY on the uplink socket");
    }
    if !ep.tls {
        return Ok(MaybeTlsStream::Plain(tcp));
    }
    let cfg = tls.ok_or(LinkError::Tls(TlsError::NotConfigured))?;
    let name = ServerName::try_from(ep.host.clone()).map_err(|e| {
        LinkError::Tls(TlsError::ServerName {
            host: ep.host.clone(),
            source: Arc::new(e),
        })
    })?;
    let stream = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| LinkError::Tls(TlsError::Handshake(Arc::new(e))))?;
    Ok(MaybeTlsStream::Rustls(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("wss://relay.example.org", Transport::Websocket).unwrap();
        assert_eq!((e.tls, e.port, e.path.as_str()), (true, 443, "/v1/uplink"));
        assert_eq!(e.full_url(), "wss://relay.example.org:443/v1/uplink");
        let e = Endpoint::parse("wss://relay.example.org/v1/uplink", Transport::Https).unwrap();
        assert_eq!(e.path, "/v1/batches");
        assert_eq!(e.full_url(), "https://relay.example.org:443/v1/batches");
        let e = Endpoint::parse("http://127.0.0.1:7000/outpost/", Transport::Websocket).unwrap();
        assert_eq!(
            (e.tls, e.port, e.path.as_str()),
            (false, 7000, "/outpost/v1/uplink")
        );
        let e = Endpoint::parse("ws://[::1]:7000", Transport::Websocket).unwrap();
        assert_eq!(e.authority(), "[::1]:7000");
        assert!(matches!(
            Endpoint::parse("ftp://x", Transport::Websocket),
            Err(EndpointError::Scheme(s)) if s == "ftp"
        ));
        assert!(Endpoint::parse("relay.example.org", Transport::Websocket).is_err());
        assert!(matches!(
            Endpoint::parse("wss://", Transport::Websocket),
            Err(EndpointError::NotAUrl(_) | EndpointError::NoHost)
        ));
    }

    #[tokio::test]
    async fn the_uplink_socket_has_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let ep = Endpoint::parse(&format!("ws://127.0.0.1:{port}"), Transport::Websocket).unwrap();
        let (stream, accepted) = tokio::join!(connect_stream(&ep, None), listener.accept());
        accepted.unwrap();
        match stream.unwrap() {
            MaybeTlsStream::Plain(tcp) => assert!(tcp.nodelay().unwrap()),
            _ => panic!("ws:// must be plain TCP"),
        }
    }

    #[test]
    fn errors_classify() {
        let e = LinkError::from_status(401, br#"{"error":{"code":"unauthorized","message":"no"}}"#);
        assert_eq!(e.kind(), "unauthorized");
        assert!(e.to_string().contains("uplink.token_file"));
        assert_eq!(LinkError::from_status(413, b"").kind(), "too_large");
        assert_eq!(LinkError::from_status(503, b"x").kind(), "refused");
        assert_eq!(LinkError::from_close(1009, "too_large").kind(), "too_large");
        assert_eq!(
            LinkError::from_close(1001, "shutting_down").kind(),
            "closed"
        );
    }
}
