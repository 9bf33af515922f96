//! The ops endpoint: what it serves, and that idle or abusive connections
//! cannot take it (or the process) down.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use warren_tests::{broker_url, http, start, unique};

use crate::pipeline;

const WAIT: Duration = Duration::from_secs(30);

/// warren with the ops endpoint on a free port, and that endpoint's base URL.
async fn with_ops() -> anyhow::Result<(warren::Running, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let q = unique("ops");
    let text = format!(
        "[broker]\nurl = {:?}\nreconnect_delay_ms = 100\n[ops]\nlisten = \"127.0.0.1:{port}\"\n{}",
        broker_url(),
        pipeline("ops", &q, "noop", "")
    );
    let config = warren::config::Config::parse(&text, std::path::Path::new("."))?;
    Ok((start(config).await?, format!("http://127.0.0.1:{port}")))
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
