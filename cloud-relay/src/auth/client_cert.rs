//! The verified client certificate of a TLS connection (module docs of `auth`, "Client
//! certificates").
//!
//! `server` attaches it to every request of the connection; `intake` reads it to find the
//! gateway. It lives under `auth` so that neither has to import the other for it.

/// The SHA-256 of the client's verified end-entity certificate, attached to every request
/// of a TLS connection that presented one (see [`super::cert_fingerprint`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientCert(pub [u8; 32]);
