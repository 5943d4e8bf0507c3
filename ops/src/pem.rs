//! Reading PEM files: certificate chains, private keys, and CA files as trust roots.
//!
//! Every TLS setting of both daemons (the relay's `tls.*`, the gateway's `uplink.*` and
//! `mqtt.ca_file`, the relay's client-certificate registration) reads its files here, so
//! they accept the same files and fail with the same errors. A [`PemError`] names the file
//! and keeps the underlying error as its source; the caller adds the config key.
//!
//! Where the earlier copies differed: a CA file that is valid PEM but holds one unusable
//! certificate among usable ones was skipped by the MQTT client and refused by the others.
//! Refusing is the behaviour kept ([`load_roots`]): a CA file is written by hand, and a
//! certificate in it that silently does nothing hides a mistake.

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// Why a PEM file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid PEM.
    #[error("{} is not valid PEM: {source}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: std::io::Error,
    },
    /// The file holds no certificate.
    #[error("{} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no private key.
    #[error("{} holds no PEM private key (PKCS#8 \"PRIVATE KEY\", PKCS#1 \"RSA PRIVATE KEY\" or SEC1 \"EC PRIVATE KEY\")", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// A certificate in a CA file cannot be a trust anchor.
    #[error("{}: unusable CA certificate: {source}", path.display())]
    UnusableCa {
        /// The file.
        path: PathBuf,
        /// What rustls (webpki) found wrong.
        source: rustls::Error,
    },
}

impl PemError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            PemError::Read { path, .. }
            | PemError::Syntax { path, .. }
            | PemError::NoCertificate { path }
            | PemError::NoKey { path }
            | PemError::UnusableCa { path, .. } => path,
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in the PEM file `path`, in file order (a chain: leaf first). At least
/// one, or [`PemError::NoCertificate`].
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| PemError::Syntax {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first certificate in the PEM file `path` (a chain's leaf), without parsing the rest.
pub fn load_first_cert(path: &Path) -> Result<CertificateDer<'static>, PemError> {
    let pem = read(path)?;
    let first = rustls_pemfile::certs(&mut pem.as_slice()).next();
    match first {
        Some(Ok(der)) => Ok(der),
        Some(Err(source)) => Err(PemError::Syntax {
            path: path.to_path_buf(),
            source,
        }),
        None => Err(PemError::NoCertificate {
            path: path.to_path_buf(),
        }),
    }
}

/// The first private key in the PEM file `path` (PKCS#8, PKCS#1 or SEC1).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| PemError::Syntax {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| PemError::NoKey {
            path: path.to_path_buf(),
        })
}

/// The certificates of the CA file `path` as trust roots. Every certificate must be usable
/// as one (module docs).
pub fn load_roots(path: &Path) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|source| PemError::UnusableCa {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA certificate and its PKCS#8 key, PEM.
    fn ca() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_certificates_keys_and_roots() {
        let (cert, key) = ca();
        let (cert, key) = (cert.as_str(), key.as_str());
        let dir = tempfile::tempdir().unwrap();
        let chain = write(dir.path(), "chain.pem", &format!("{cert}{cert}"));
        assert_eq!(load_certs(&chain).unwrap().len(), 2);
        assert_eq!(
            load_first_cert(&chain).unwrap(),
            load_certs(&chain).unwrap()[0]
        );
        assert_eq!(load_roots(&chain).unwrap().len(), 2);
        let key = write(dir.path(), "key.pem", key);
        assert!(matches!(
            load_private_key(&key).unwrap(),
            PrivateKeyDer::Pkcs8(_)
        ));
    }

    #[test]
    fn errors_name_the_file_and_say_what_is_missing() {
        let (cert, key) = ca();
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = load_certs(&missing).unwrap_err();
        assert!(matches!(e, PemError::Read { .. }), "{e}");
        assert_eq!(e.path(), missing);
        assert!(e.to_string().contains("cannot read") && e.to_string().contains("missing.pem"));

        let junk = write(dir.path(), "junk.pem", "this is not PEM\n");
        assert!(matches!(
            load_certs(&junk),
            Err(PemError::NoCertificate { .. })
        ));
        assert!(matches!(
            load_first_cert(&junk),
            Err(PemError::NoCertificate { .. })
        ));
        assert!(matches!(
            load_private_key(&junk),
            Err(PemError::NoKey { .. })
        ));
        assert!(matches!(
            load_roots(&junk),
            Err(PemError::NoCertificate { .. })
        ));
        let e = load_private_key(&junk).unwrap_err().to_string();
        assert!(
            e.contains("no PEM private key") && e.contains("junk.pem"),
            "{e}"
        );

        // Cert and key swapped.
        let key = write(dir.path(), "key.pem", &key);
        let cert = write(dir.path(), "cert.pem", &cert);
        assert!(matches!(
            load_certs(&key),
            Err(PemError::NoCertificate { .. })
        ));
        assert!(matches!(
            load_private_key(&cert),
            Err(PemError::NoKey { .. })
        ));

        // A certificate block whose body is not base64.
        let broken = write(
            dir.path(),
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        let e = load_certs(&broken).unwrap_err();
        assert!(matches!(e, PemError::Syntax { .. }), "{e}");
        assert!(std::error::Error::source(&e).is_some());

        // Valid PEM, but the DER inside is no certificate: not a usable root.
        let garbage = write(
            dir.path(),
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        assert!(matches!(
            load_roots(&garbage),
            Err(PemError::UnusableCa { .. })
        ));
    }
}
