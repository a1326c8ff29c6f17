//! PEM files of certificates and private keys, read and checked up front so
//! that a wrong file is named at start, rather than failing later as a peer
//! nobody trusts.

use std::path::Path;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What is wrong with a PEM file, said of the file ("... holds no
/// certificate").
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// The file cannot be read.
    #[error("cannot be read ({0})")]
    Read(std::io::Error),
    /// The file is not PEM.
    #[error("is not valid PEM ({0})")]
    NotPem(String),
    /// No certificate block.
    #[error("holds no certificate (no -----BEGIN CERTIFICATE----- block)")]
    NoCertificate,
    /// Certificate blocks, none of which parses.
    #[error("holds no certificate that can be parsed")]
    Unparsable,
    /// No private key block.
    #[error("holds no usable private key ({0})")]
    NoKey(String),
}

/// The contents of `path`, which must hold at least one certificate that
/// rustls can parse (rustls skips the others, so a file of only such would
/// otherwise fail later as "untrusted").
pub fn certificates(path: &Path) -> Result<Vec<u8>, PemError> {
    let pem = std::fs::read(path).map_err(PemError::Read)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::NotPem(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate);
    }
    let (usable, _) = rustls::RootCertStore::empty().add_parsable_certificates(certs);
    if usable == 0 {
        return Err(PemError::Unparsable);
    }
    Ok(pem)
}

/// The contents of `path`, which must hold a private key (PKCS#8, PKCS#1
/// or SEC1).
pub fn private_key(path: &Path) -> Result<Vec<u8>, PemError> {
    let pem = std::fs::read(path).map_err(PemError::Read)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| PemError::NoKey(e.to_string()))?;
    Ok(pem)
}

/// "`what` `path` `error`", or "cannot read `what` `path`: ..." when the
/// file cannot be read; e.g. "the TLS key /etc/k.pem holds no usable private
/// key (...)".
pub fn describe(what: &str, path: &Path, error: &PemError) -> String {
    match error {
        PemError::Read(e) => format!("cannot read {what} {}: {e}", path.display()),
        other => format!("{what} {} {other}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_wrong_file_is_named_for_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let missing = dir.path().join("missing.pem");
        let text = write("text.pem", "hello\n");
        let junk = write(
            "junk.pem",
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        );
        assert!(matches!(certificates(&missing), Err(PemError::Read(_))));
        assert!(matches!(certificates(&text), Err(PemError::NoCertificate)));
        assert!(matches!(certificates(&junk), Err(PemError::Unparsable)));
        assert!(matches!(private_key(&text), Err(PemError::NoKey(_))));
        assert_eq!(
            describe("the CA", &text, &PemError::NoCertificate),
            format!(
                "the CA {} holds no certificate (no -----BEGIN CERTIFICATE----- block)",
                text.display()
            )
        );
        assert!(
            describe("the CA", &missing, &certificates(&missing).unwrap_err())
                .starts_with(&format!("cannot read the CA {}: ", missing.display()))
        );
    }
}
