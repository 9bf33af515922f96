//! PEM files named in the configuration (the broker's CA and client
//! certificate, a pipeline's `[pipeline.http] ca_file`), read and checked
//! once, so that `warren check` and the connection fail with the same
//! message naming the file.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Read a PEM file and check it holds at least one certificate.
pub fn read_certificates(path: &Path) -> Result<String> {
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a valid PEM file", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{} holds no certificate (expected PEM blocks starting with -----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(pem)
}

/// Read a PEM file and check it holds a private key.
pub fn read_private_key(path: &Path) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem).with_context(|| {
        format!(
            "{} holds no usable private key (expected an unencrypted PEM key: \
             BEGIN PRIVATE KEY, BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY)",
            path.display()
        )
    })?;
    Ok(pem)
}
