//! The relay token: where it comes from (`OUTPOST_UPLINK_TOKEN`, else `uplink.token_file`)
//! and when having none is fine (a TLS client certificate identifies the gateway instead).

use std::path::Path;

use super::batcher::BatchHeader;
use super::config::UplinkConfig;
use super::link::LinkError;

/// The environment variable that, when set, holds the relay token (wins over the file).
pub const TOKEN_ENV: &str = "OUTPOST_UPLINK_TOKEN";

/// The relay token: `env` (the value of `OUTPOST_UPLINK_TOKEN`) when set and not blank,
/// else the contents of `path`. With `client_cert` (a client certificate is configured), a
/// missing or empty token file is `Ok(None)`: the relay then knows the gateway by its
/// certificate. Any other read error stays an error, since a token was meant to be there.
/// The error is why there is no token.
fn read_token(
    env: Option<String>,
    path: &Path,
    client_cert: bool,
) -> Result<Option<String>, String> {
    if let Some(t) = env {
        if !t.trim().is_empty() {
            return Ok(Some(t.trim().to_string()));
        }
    }
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && client_cert => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    match text.trim() {
        "" if client_cert => Ok(None),
        "" => Err("the file is empty".into()),
        t => Ok(Some(t.to_string())),
    }
}

/// The relay token for this gateway (see [`read_token`]), or an error saying how to
/// provide one.
pub(super) fn relay_token(
    cfg: &UplinkConfig,
    data_dir: &Path,
    header: &BatchHeader,
) -> Result<Option<String>, LinkError> {
    let path = cfg.token_file(data_dir);
    read_token(std::env::var(TOKEN_ENV).ok(), &path, cfg.has_client_cert()).map_err(|why| {
        LinkError::Local(format!(
            "no relay token ({why}): put the token printed by `outpost-relay gateway add {} --site {}` in {} (uplink.token_file), or set {TOKEN_ENV}, or authenticate with a TLS client certificate instead (uplink.client_cert_file and uplink.client_key_file)",
            header.gateway_id, header.site_id, path.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_optional_only_with_a_client_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.token");
        let env = |v: &str| Some(v.to_string());

        // No token anywhere: an error without a certificate, no header with one.
        assert!(read_token(None, &path, false).is_err());
        assert_eq!(read_token(None, &path, true), Ok(None));
        assert_eq!(read_token(env("  "), &path, true), Ok(None));

        // An empty file counts as no token.
        std::fs::write(&path, "\n").unwrap();
        assert_eq!(
            read_token(None, &path, false),
            Err("the file is empty".into())
        );
        assert_eq!(read_token(None, &path, true), Ok(None));

        // A token, when there is one, is always sent; the variable wins over the file.
        std::fs::write(&path, "ogw_file\n").unwrap();
        assert_eq!(read_token(None, &path, true), Ok(Some("ogw_file".into())));
        assert_eq!(read_token(None, &path, false), Ok(Some("ogw_file".into())));
        assert_eq!(
            read_token(env(" ogw_env "), &path, true),
            Ok(Some("ogw_env".into()))
        );

        // A token file that exists but cannot be read is an error even with a certificate.
        let not_a_file = dir.path().to_path_buf();
        assert!(read_token(None, &not_a_file, true).is_err());
    }
}
