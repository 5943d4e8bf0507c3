//! The HTTPS link: each frame is one `POST /v1/batches` whose response is the ack.
//!
//! HTTP/1.1 has no pipelining worth using, so a window of `n` batches needs `n`
//! connections: each request runs in its own task on an idle connection (or a new one),
//! and [`Link::recv`] awaits the requests in the order they were sent, so acks come back
//! in send order like on the WebSocket. Dropping the link aborts every request in flight;
//! those batches are resent on the next connection.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use outpost_protocol::{frame, Ack};
use tokio::task::JoinHandle;

use super::link::{connect_stream, Endpoint, Link, LinkError};

/// Largest response body read (an ack frame or a JSON error).
const MAX_RESPONSE: usize = 64 * 1024;

type Sender = SendRequest<Full<Bytes>>;
type Reply = Result<(Ack, Sender), LinkError>;

/// What every request needs.
#[derive(Clone)]
struct Target {
    ep: Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// `Authorization` header value; `None` when the TLS client certificate identifies us.
    auth: Option<String>,
    timeout: Duration,
}

/// A set of HTTP/1.1 connections to one relay.
pub struct HttpsLink {
    target: Target,
    idle: Vec<Sender>,
    inflight: VecDeque<JoinHandle<Reply>>,
    heard: Instant,
}

impl HttpsLink {
    /// Opens the first connection (so that a wrong address or certificate shows up now,
    /// as a connection error, rather than at the first batch). Each request carries `token`
    /// as a Bearer token when there is one; with `None` there is no `Authorization` header
    /// and the relay identifies the gateway by the TLS client certificate in `tls`.
    pub async fn connect(
        ep: &Endpoint,
        tls: Option<Arc<rustls::ClientConfig>>,
        token: Option<&str>,
        request_timeout: Duration,
    ) -> Result<HttpsLink, LinkError> {
        let target = Target {
            ep: ep.clone(),
            tls,
            auth: token.map(|t| format!("Bearer {t}")),
            timeout: request_timeout,
        };
        let first = open(&target).await?;
        Ok(HttpsLink {
            target,
            idle: vec![first],
            inflight: VecDeque::new(),
            heard: Instant::now(),
        })
    }
}

async fn open(t: &Target) -> Result<Sender, LinkError> {
    let stream = connect_stream(&t.ep, t.tls.clone()).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| LinkError::Closed(format!("HTTP handshake failed: {e}")))?;
    // The connection task ends when its sender is dropped or the peer closes.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn post(t: Target, sender: Option<Sender>, frame: Bytes) -> Reply {
    let mut sender = match sender {
        Some(s) if !s.is_closed() => s,
        _ => open(&t).await?,
    };
    sender
        .ready()
        .await
        .map_err(|e| LinkError::Closed(format!("HTTP connection lost: {e}")))?;
    let mut req = hyper::Request::post(t.ep.path.as_str())
        .header(hyper::header::HOST, t.ep.authority())
        .header(hyper::header::CONTENT_TYPE, "application/octet-stream");
    if let Some(auth) = &t.auth {
        req = req.header(hyper::header::AUTHORIZATION, auth.as_str());
    }
    let req = req
        .body(Full::new(frame))
        .map_err(|e| LinkError::Local(format!("cannot build the request: {e}")))?;
    let exchange = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| LinkError::Closed(format!("POST {} failed: {e}", t.ep.path)))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| LinkError::Closed(format!("reading the response failed: {e}")))?
            .to_bytes();
        Ok::<_, LinkError>((status, body))
    };
    let (status, body) = tokio::time::timeout(t.timeout, exchange)
        .await
        .map_err(|_| {
            LinkError::Timeout(format!(
                "no answer to POST {} within uplink.ack_timeout ({:?})",
                t.ep.path, t.timeout
            ))
        })??;
    if status != 200 {
        return Err(LinkError::from_status(status, &body));
    }
    let ack = frame::decode_ack(&body)
        .map_err(|e| LinkError::Protocol(format!("the relay sent an invalid ack: {e}")))?;
    Ok((ack, sender))
}

impl Link for HttpsLink {
    async fn send(&mut self, frame: Bytes) -> Result<(), LinkError> {
        let sender = self.idle.pop();
        self.inflight
            .push_back(tokio::spawn(post(self.target.clone(), sender, frame)));
        Ok(())
    }

    async fn recv(&mut self) -> Result<Ack, LinkError> {
        let Some(front) = self.inflight.front_mut() else {
            return std::future::pending().await;
        };
        let joined = front.await;
        self.inflight.pop_front();
        self.heard = Instant::now();
        match joined {
            Ok(Ok((ack, sender))) => {
                self.idle.push(sender);
                Ok(ack)
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(LinkError::Local(format!("request task failed: {e}"))),
        }
    }

    async fn ping(&mut self) -> Result<(), LinkError> {
        Ok(())
    }

    fn pings(&self) -> bool {
        false
    }

    fn last_heard(&self) -> Instant {
        self.heard
    }

    async fn close(self) {}
}

impl Drop for HttpsLink {
    fn drop(&mut self) {
        for t in &self.inflight {
            t.abort();
        }
    }
}
