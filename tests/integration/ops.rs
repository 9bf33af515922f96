//! The ops endpoint: what it serves, and that idle or abusive connections
//! cannot take it (or the process) down.

use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_tests::{broker_url, http, unique};

use crate::pipeline;

const WAIT: Duration = Duration::from_secs(30);

/// warren with the ops endpoint on port 0 (the system picks one), and that
/// endpoint's base URL as warren reports it.
async fn with_ops() -> anyhow::Result<(warren::Running, String)> {
    let (warren, base) = with_ops_on(&broker_url()).await?;
    warren.wait_ready(WAIT).await?;
    Ok((warren, base))
}

async fn with_ops_on(url: &str) -> anyhow::Result<(warren::Running, String)> {
    let q = unique("ops");
    let text = format!(
        "[broker]\nurl = {url:?}\nreconnect_delay_ms = 100\n[ops]\nlisten = \"127.0.0.1:0\"\n{}",
        pipeline("ops", &q, "noop", "")
    );
    let config = warren::config::Config::parse(&text, std::path::Path::new("."))?;
    warren_tests::track_config(&config);
    let warren = warren::start(config).await?;
    let addr = warren.ops_addr().context("no ops address")?;
    anyhow::ensure!(addr.port() != 0, "the bound port is reported, not 0");
    Ok((warren, format!("http://{addr}")))
}

/// One raw request; the whole answer as text.
async fn raw(base: &str, request: &str) -> anyhow::Result<String> {
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer)).await??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test]
async fn serves_metrics_liveness_and_readiness() -> anyhow::Result<()> {
    let (warren, base) = with_ops().await?;
    let (status, body) = http("GET", &base, "/metrics", None).await?;
    assert_eq!(status, 200);
    assert!(
        body.contains("warren_messages_total{pipeline=\"ops\",outcome=\"ack\"} 0"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE warren_broker_blocked gauge"),
        "{body}"
    );
    assert_eq!(http("GET", &base, "/healthz", None).await?.0, 200);
    let (status, body) = http("GET", &base, "/healthz/ready", None).await?;
    assert_eq!(status, 200);
    let ready: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["pipelines"][0]["name"], "ops");
    assert_eq!(ready["pipelines"][0]["blocked"], serde_json::Value::Null);
    assert_eq!(http("GET", &base, "/nope", None).await?.0, 404);
    assert_eq!(http("POST", &base, "/metrics", None).await?.0, 405);

    // Query strings, as scrapers and probes add them, are ignored.
    let (status, body) = http("GET", &base, "/healthz/ready?verbose=1", None).await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ready\":true"), "{body}");
    assert_eq!(http("GET", &base, "/metrics?x=y", None).await?.0, 200);

    // HEAD: GET's status and headers, no body.
    let head = raw(&base, "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let get = raw(&base, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "HEAD carries no body: {head:?}");
    let len = |a: &str| {
        a.lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map(str::to_string)
    };
    assert_eq!(len(&head), len(&get));
    assert!(get.ends_with(r#"{"live":true}"#), "{get}");

    // Other methods are told what is allowed.
    let put = raw(&base, "PUT /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    assert!(
        put.starts_with("HTTP/1.1 405") && put.contains("Allow: GET, HEAD"),
        "{put}"
    );
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn readiness_is_503_with_the_reason_while_the_broker_cannot_be_reached() -> anyhow::Result<()>
{
    // A port nothing listens on: the pipeline never attaches.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (warren, base) = with_ops_on(&format!("amqp://guest:guest@127.0.0.1:{closed}/%2f")).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let body = loop {
        let (status, body) = http("GET", &base, "/healthz/ready", None).await?;
        assert_eq!(status, 503, "{body}");
        let ready: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(ready["ready"], false, "{body}");
        if !ready["pipelines"][0]["last_broker_error"].is_null() {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no broker error within {WAIT:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.contains("\"connected\":false"), "{body}");
    // Liveness is not readiness: the process is fine.
    assert_eq!(http("GET", &base, "/healthz", None).await?.0, 200);
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn idle_connections_cannot_starve_the_endpoint() -> anyhow::Result<()> {
    let (warren, base) = with_ops().await?;
    let addr = base.trim_start_matches("http://").to_string();
    // Far more idle connections than the endpoint serves at once; none sends
    // a request.
    let mut idle = Vec::new();
    for _ in 0..2_000 {
        idle.push(tokio::net::TcpStream::connect(&addr).await?);
    }
    // Over the cap they are closed at once, under it when their time is up:
    // every one of them ends, from the server's side.
    let deadline = tokio::time::Instant::now() + WAIT;
    for mut s in idle {
        let mut b = [0u8; 1];
        let read = tokio::time::timeout_at(deadline, s.read(&mut b)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "an idle connection was kept open"
        );
    }
    // And the endpoint answers again.
    let (status, _) = http("GET", &base, "/healthz", None).await?;
    assert_eq!(status, 200);
    warren.shutdown().await;
    Ok(())
}
