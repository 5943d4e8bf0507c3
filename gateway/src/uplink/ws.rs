//! The WebSocket link: one connection to `GET /v1/uplink`, frames as binary messages,
//! one ack per frame back, in order (see [`super::link`]).
//!
//! The relay pings us (tungstenite answers with a pong by itself while reading), and we
//! ping the relay every `uplink.ping_interval`: the session declares the link dead when
//! nothing comes back within `uplink.ping_timeout`, long before TCP would notice.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use outpost_protocol::{frame, Ack};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::link::{connect_stream, Endpoint, Link, LinkError};

/// Largest message accepted from the relay: acks are a few dozen bytes, later downlink
/// messages (time, config) stay small.
const MAX_INBOUND: usize = 64 * 1024;

/// A connected uplink WebSocket.
pub struct WsLink {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    heard: Instant,
}

impl WsLink {
    /// Connects and upgrades, presenting `token` as a Bearer token when there is one.
    /// `None` sends no `Authorization` header: the relay then identifies the gateway by the
    /// TLS client certificate in `tls` (if any). An HTTP refusal (401, 403, 503) becomes the
    /// matching [`LinkError`].
    pub async fn connect(
        ep: &Endpoint,
        tls: Option<Arc<rustls::ClientConfig>>,
        token: Option<&str>,
    ) -> Result<WsLink, LinkError> {
        let stream = connect_stream(ep, tls).await?;
        let mut req = ep
            .full_url()
            .into_client_request()
            .map_err(|e| LinkError::Local(format!("bad relay URL {}: {e}", ep.url)))?;
        if let Some(token) = token {
            let auth = format!("Bearer {token}")
                .parse()
                .map_err(|_| LinkError::Local("the relay token has characters that cannot go in a header; check uplink.token_file (or OUTPOST_UPLINK_TOKEN)".into()))?;
            req.headers_mut().insert("authorization", auth);
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_INBOUND))
            .max_frame_size(Some(MAX_INBOUND));
        let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
            .await
            .map_err(|e| match e {
                WsError::Http(resp) => LinkError::from_status(
                    resp.status().as_u16(),
                    resp.body().as_deref().unwrap_or_default(),
                ),
                other => LinkError::Closed(format!("WebSocket upgrade failed: {other}")),
            })?;
        Ok(WsLink {
            ws,
            heard: Instant::now(),
        })
    }
}

fn io_error(e: WsError) -> LinkError {
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            LinkError::Closed("the WebSocket is closed".into())
        }
        other => LinkError::Closed(other.to_string()),
    }
}

impl Link for WsLink {
    async fn send(&mut self, frame: Bytes) -> Result<(), LinkError> {
        self.ws.send(Message::Binary(frame)).await.map_err(io_error)
    }

    async fn recv(&mut self) -> Result<Ack, LinkError> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    self.heard = Instant::now();
                    return frame::decode_ack(&b).map_err(|e| {
                        LinkError::Protocol(format!("the relay sent an invalid ack: {e}"))
                    });
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => self.heard = Instant::now(),
                Some(Ok(Message::Close(c))) => {
                    return Err(match c {
                        Some(c) => LinkError::from_close(u16::from(c.code), &c.reason),
                        None => LinkError::Closed("the relay closed the WebSocket".into()),
                    })
                }
                Some(Ok(Message::Text(_) | Message::Frame(_))) => self.heard = Instant::now(),
                Some(Err(e)) => return Err(io_error(e)),
                None => return Err(LinkError::Closed("the relay closed the connection".into())),
            }
        }
    }

    async fn ping(&mut self) -> Result<(), LinkError> {
        self.ws
            .send(Message::Ping(Bytes::new()))
            .await
            .map_err(io_error)
    }

    fn pings(&self) -> bool {
        true
    }

    fn last_heard(&self) -> Instant {
        self.heard
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.ws.close(None)).await;
    }
}
