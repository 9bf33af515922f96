//! RabbitMQ side: connecting, declaring each pipeline's topology, publishing
//! with confirms, and settling deliveries (batched acks).

mod publish;
mod settle;
mod topology;

pub use publish::{PublishReport, Publisher};
pub use settle::{SettleGuard, Settler, Verdict};
pub use topology::declare;

use anyhow::{Context, Result};
use lapin::{Connection, ConnectionProperties};

/// Open a connection named after the pipeline (visible in the management UI).
pub async fn connect(url: &str, name: &str) -> Result<Connection> {
    let props =
        ConnectionProperties::default().with_connection_name(format!("warren/{name}").into());
    Connection::connect(url, props)
        .await
        .with_context(|| format!("connecting to the broker at {}", redact(url)))
}

/// The URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_the_password_only() {
        assert_eq!(
            super::redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(super::redact("amqp://host:5672"), "amqp://host:5672");
    }
}
