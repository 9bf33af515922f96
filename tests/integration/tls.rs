//! `amqps://`: warren against the test broker's TLS listener, whose certificate
//! is signed by a throwaway CA that only `broker.ca_file` makes trusted.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use warren::disposition::Disposition;
use warren_tests::{
    Client, broker_url, config_for, connections, eventually, start, text, tls_broker, toml_path,
    unique,
};

use crate::pipeline;

const WAIT: Duration = Duration::from_secs(30);

/// The management API's record of warren's connection for `pipeline`; it lists
/// a new connection only after its next stats refresh, so ask until it shows.
async fn warren_connection(name: &str) -> anyhow::Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(c) = connections(&format!("warren/{name}"))
            .await?
            .into_iter()
            .next()
        {
            return Ok(c);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the management API did not list warren's connection within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Start warren on a TLS URL that cannot work and return the error it keeps
/// reporting, after checking it keeps retrying and never becomes ready.
async fn tls_failure(url: &str, broker_toml: &str) -> anyhow::Result<String> {
    let name = unique("tls-fail");
    let config = config_for(
        url,
        broker_toml,
        &pipeline(&name, &unique("tls-fail"), "noop", ""),
    )?;
    // Broker trouble does not fail the start: warren retries in the background.
    warren_tests::track_config(&config);
    let warren = warren::start(config).await?;
    let m = warren
        .metrics()
        .pipeline(&name)
        .context("pipeline metrics")?;
    // Three failed attempts: the first one and two retries.
    eventually(WAIT, || m.reconnects.load(Ordering::Relaxed) >= 2).await?;
    let error = m
        .status
        .last_broker_error()
        .context("no broker error recorded")?;
    assert!(!warren.metrics().ready(), "ready without a broker session");
    assert!(!m.status.connected.load(Ordering::Relaxed));
    let readiness = warren.metrics().readiness_json().to_string();
    assert!(
        readiness.contains("TLS handshake failed"),
        "readiness does not say why: {readiness}"
    );
    warren.shutdown().await;
    assert!(
        !error.contains("guest:guest@"),
        "password in the error: {error}"
    );
    Ok(error)
}

#[tokio::test]
async fn a_pipeline_consumes_and_publishes_over_tls() -> anyhow::Result<()> {
    let (url, ca) = tls_broker();
    let q = unique("tls");
    let out = unique("tls-out");
    let name = unique("tls-pipeline");
    let warren = start(config_for(
        &url,
        &format!("ca_file = {}", toml_path(&ca)),
        &pipeline(&name, &q, "probe", &crate::output_queue(&out)),
    )?)
    .await?;
    let m = warren
        .metrics()
        .pipeline(&name)
        .context("pipeline metrics")?;
    let client = Client::connect().await?;
    client.declare_queue(&out).await?;

    client
        .send(&q, format!("publish - {out} over tls").as_bytes())
        .await?;
    let d = client.take_one(&out, WAIT).await?;
    assert_eq!(text(&d), "over tls");
    eventually(WAIT, || m.outcome_count(Disposition::Publish) == 1).await?;

    // The broker's side of warren's connection: TLS, and no client certificate.
    let conn = warren_connection(&name).await?;
    assert_eq!(conn["ssl"], true, "{conn}");
    assert!(conn["peer_cert_subject"].is_null(), "{conn}");
    assert_eq!(m.status.last_broker_error(), None);
    warren.shutdown().await;
    assert_eq!(client.depth(&q).await?, 0, "the message was not acked");
    Ok(())
}

#[tokio::test]
async fn a_configured_client_certificate_is_presented() -> anyhow::Result<()> {
    let (url, ca) = tls_broker();
    let dir = ca.parent().context("CA file without a directory")?;
    let name = unique("mtls-pipeline");
    let broker_toml = format!(
        "ca_file = {}\nclient_cert_file = {}\nclient_key_file = {}",
        toml_path(&ca),
        toml_path(&dir.join("client.pem")),
        toml_path(&dir.join("client.key")),
    );
    let warren = start(config_for(
        &url,
        &broker_toml,
        &pipeline(&name, &unique("mtls"), "noop", ""),
    )?)
    .await?;
    let conn = warren_connection(&name).await?;
    assert_eq!(conn["ssl"], true, "{conn}");
    let subject = conn["peer_cert_subject"].as_str().unwrap_or("");
    assert!(subject.contains("warren-test-client"), "{conn}");
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_untrusted_broker_certificate_is_explained_and_retried() -> anyhow::Result<()> {
    let (url, _) = tls_broker();
    // System roots only: the test CA is not among them.
    let error = tls_failure(&url, "").await?;
    assert!(
        error.contains("TLS handshake failed")
            && error.contains("broker.ca_file is not set")
            && error.contains("UnknownIssuer"),
        "{error}"
    );
    Ok(())
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused() -> anyhow::Result<()> {
    let (url, ca) = tls_broker();
    // Same listener, reached under a name its certificate does not carry.
    let url = url.replace("@localhost:", "@127.0.0.2:");
    let error = tls_failure(&url, &format!("ca_file = {}", toml_path(&ca))).await?;
    assert!(
        error.contains("TLS handshake failed")
            && error.contains("must name the host")
            && error.contains("not valid for name \"127.0.0.2\""),
        "{error}"
    );
    Ok(())
}

#[tokio::test]
async fn amqps_to_a_plain_amqp_port_is_explained() -> anyhow::Result<()> {
    let (tls_url, ca) = tls_broker();
    let plain = broker_url();
    let port = plain
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .context("no port in the broker URL")?;
    let url = format!("amqps://guest:guest@localhost:{port}/%2f");
    assert_ne!(url, tls_url);
    let error = tls_failure(&url, &format!("ca_file = {}", toml_path(&ca))).await?;
    assert!(
        error.contains("TLS handshake failed") && error.contains("TLS listener"),
        "{error}"
    );
    Ok(())
}
