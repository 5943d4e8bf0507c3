//! The CLI's client for the running relay's own API (`outpost-relay outputs`).
//!
//! It reaches the relay at `relay.listen` (a wildcard address becomes loopback) with the
//! admin token from `auth.admin_token_file`, as the relay's configuration says, so it
//! needs no flags. With TLS it accepts exactly the certificate in `tls.cert_file` (the
//! relay's own; its name is usually not `127.0.0.1`, and a private CA is not in any trust
//! store), and still verifies the handshake signature, so the peer must hold that
//! certificate's key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use outpost_ops::pinned::PinnedCert;
use outpost_ops::token::AdminToken;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::config::Config;

/// Why the relay's API could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The admin token file could not be read.
    #[error("cannot read the admin token (auth.admin_token_file); run this as the relay's user, or point --config at its configuration")]
    Token(#[source] outpost_ops::token::AdminTokenError),
    /// The relay's certificate could not be read.
    #[error("cannot read the relay's certificate (tls.cert_file)")]
    Cert(#[source] outpost_ops::pem::PemError),
    /// Nothing listens there.
    #[error("no relay is listening on {0} (relay.listen); is it running?")]
    NotRunning(SocketAddr),
    /// The connection, TLS or HTTP failed.
    #[error("talking to the relay on {addr}: {reason}")]
    Talk {
        /// Where.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
}

pub use outpost_ops::addr::local_addr;

/// The refusal when the peer is not the relay whose `tls.cert_file` the config names.
fn not_own_cert(_got_hex: &str) -> String {
    "the server's certificate is not the one in tls.cert_file: another program listens on relay.listen".into()
}

/// `GET path` on the running relay with the admin token: the status and the body.
pub async fn get(cfg: &Config, path: &str) -> Result<(u16, String), ClientError> {
    let addr = local_addr(cfg.relay.listen);
    let token = AdminToken::read(&cfg.admin_token_file()).map_err(ClientError::Token)?;
    let talk = |reason: String| ClientError::Talk { addr, reason };
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| talk("connecting timed out".into()))?
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                ClientError::NotRunning(addr)
            } else {
                talk(e.to_string())
            }
        })?;
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(hyper::header::USER_AGENT, "outpost-relay-cli")
        .body(Empty::<Bytes>::new())
        .map_err(|e| talk(e.to_string()))?;
    let exchange = async {
        let answer = if cfg.tls.disabled {
            send(TokioIo::new(tcp), request).await
        } else {
            let cert_file = cfg
                .tls
                .cert_file
                .as_deref()
                .ok_or_else(|| talk("tls.cert_file is not set".into()))?;
            let cert = outpost_ops::pem::load_first_cert(cert_file).map_err(ClientError::Cert)?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| talk(e.to_string()))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert::of(
                    &cert,
                    provider,
                    not_own_cert,
                )))
                .with_no_client_auth();
            let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .map_err(|e| talk(format!("TLS: {e}")))?;
            send(TokioIo::new(stream), request).await
        };
        answer.map_err(|e| talk(e.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| talk("no answer within 30 s".into()))?
}

async fn send<I>(
    io: I,
    request: hyper::Request<Empty<Bytes>>,
) -> Result<(u16, String), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(request).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
