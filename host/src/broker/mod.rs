//! RabbitMQ side: connecting (plain or TLS), declaring each pipeline's topology,
//! publishing with confirms, and settling deliveries (batched acks).
//!
//! An `amqps://` URL connects through rustls. The broker's certificate must
//! chain to one of the system's root CAs or to `broker.ca_file`, and name the
//! URL's host; `broker.client_cert_file` and `broker.client_key_file` add a
//! client certificate for brokers that require mutual TLS. The files were
//! checked when the configuration was loaded, and are read again at every
//! connection attempt so that a renewed certificate is used from the next
//! reconnect on, without a restart. A handshake that fails is reported with
//! what to check, and retried with backoff like any other connection failure.

mod publish;
mod settle;
mod topology;

pub use publish::{PublishReport, Publisher};
pub use settle::{SettleGuard, Settler, Verdict};
pub use topology::{KnownExchanges, declare};

pub use crate::logtext::redact;

use std::time::Duration;

use anyhow::{Context, Result};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties};

use crate::config::BrokerConfig;
use crate::pem::{read_certificates, read_private_key};

/// How long one node may take to accept a connection (TCP, TLS and the AMQP
/// handshake) before the next node is tried: a node that is down but whose
/// address still routes (a dead VM, a dropped packet) would otherwise hold a
/// whole round of attempts.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Open a connection named after the pipeline (visible in the management UI).
pub async fn connect(broker: &BrokerConfig, name: &str) -> Result<Connection> {
    Ok(connect_any(broker, name).await?.0)
}

/// Open a connection to one of the broker's nodes, and say which (without
/// its password). One call is one round: it starts at a random node, so
/// that replicas spread over a cluster, and tries each node once. The
/// caller's backoff applies between rounds.
pub async fn connect_any(broker: &BrokerConfig, name: &str) -> Result<(Connection, String)> {
    let nodes = broker.endpoints();
    let start = fastrand::usize(..nodes.len().max(1));
    let mut failures = Vec::new();
    for i in 0..nodes.len() {
        let Some(url) = nodes.get(start.saturating_add(i) % nodes.len()) else {
            continue;
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect_to(broker, url, name)).await {
            Ok(Ok(conn)) => return Ok((conn, redact(url))),
            Ok(Err(e)) if nodes.len() == 1 => return Err(e),
            Ok(Err(e)) => failures.push(format!("{:#}", e)),
            Err(_) => failures.push(format!(
                "connecting to the broker at {} timed out after {CONNECT_TIMEOUT:?}",
                redact(url)
            )),
        }
    }
    anyhow::bail!(
        "no broker node accepted the connection: {}",
        failures.join("; ")
    )
}

async fn connect_to(broker: &BrokerConfig, url: &str, name: &str) -> Result<Connection> {
    let target = redact(url);
    let props =
        ConnectionProperties::default().with_connection_name(format!("warren/{name}").into());
    let tls = if broker.uses_tls() {
        tls_config(broker)
            .with_context(|| format!("loading the TLS settings for the broker at {target}"))?
    } else {
        OwnedTLSConfig::default()
    };
    let runtime = lapin::runtime::default_runtime().context("finding the async runtime")?;
    Connection::connect_with_config(url, props, tls, runtime)
        .await
        .map_err(|e| explain(e, broker))
        .with_context(|| format!("connecting to the broker at {target}"))
}

/// The CA and client certificate files, read now.
fn tls_config(broker: &BrokerConfig) -> Result<OwnedTLSConfig> {
    let cert_chain = broker
        .ca_file
        .as_deref()
        .map(|p| read_certificates(p).context("broker.ca_file"))
        .transpose()?;
    // Validation refused one without the other.
    let identity = match (&broker.client_cert_file, &broker.client_key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read_certificates(cert)
                .context("broker.client_cert_file")?
                .into_bytes(),
            key: read_private_key(key).context("broker.client_key_file")?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// A failed TLS handshake surfaces as an I/O error carrying rustls's reason;
/// on its own ("invalid peer certificate: UnknownIssuer") it does not say
/// which setting to look at, so say it. The reason is kept as text: lapin's
/// error around it would print it twice.
fn explain(err: lapin::Error, broker: &BrokerConfig) -> anyhow::Error {
    match tls_failure(&err) {
        Some(tls) => anyhow::anyhow!("{tls}").context(tls_hint(tls, broker)),
        None => anyhow::Error::new(err),
    }
}

fn tls_failure(err: &lapin::Error) -> Option<&rustls::Error> {
    match err.kind() {
        lapin::ErrorKind::IOError(io) => io.get_ref()?.downcast_ref::<rustls::Error>(),
        _ => None,
    }
}

fn tls_hint(err: &rustls::Error, broker: &BrokerConfig) -> String {
    match err {
        rustls::Error::InvalidCertificate(_) => {
            let trusted = match &broker.ca_file {
                Some(ca) => format!(
                    "the system's root CAs and the CA(s) in broker.ca_file ({})",
                    ca.display()
                ),
                None => "only the system's root CAs (broker.ca_file is not set)".to_string(),
            };
            format!(
                "TLS handshake failed: the broker's certificate was not accepted. warren trusts \
                 {trusted}; a broker with a certificate from a private CA needs broker.ca_file \
                 set to that CA's PEM file, and the certificate must name the host in broker.url"
            )
        }
        rustls::Error::AlertReceived(_) => {
            let client_cert = if broker.client_cert_file.is_some() {
                "check that it accepts the certificate in broker.client_cert_file"
            } else {
                "if it requires a client certificate (mutual TLS), set broker.client_cert_file \
                 and broker.client_key_file"
            };
            format!("TLS handshake failed: the broker ended it with an alert; {client_cert}")
        }
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => {
            "TLS handshake failed: the other end does not speak TLS; is the port in broker.url \
             the broker's TLS listener? (RabbitMQ's is usually 5671; an amqp:// port does not \
             speak TLS)"
                .to_string()
        }
        _ => "TLS handshake failed".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::config::BrokerConfig;

    #[test]
    fn certificate_errors_point_at_the_ca_setting() {
        let err = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let mut broker = BrokerConfig::default();
        let hint = super::tls_hint(&err, &broker);
        assert!(
            hint.contains("TLS") && hint.contains("broker.ca_file is not set"),
            "{hint}"
        );
        broker.ca_file = Some(PathBuf::from("/etc/warren/ca.pem"));
        let hint = super::tls_hint(&err, &broker);
        assert!(hint.contains("/etc/warren/ca.pem"), "{hint}");
    }
}
