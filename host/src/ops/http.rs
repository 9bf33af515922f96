//! A deliberately tiny HTTP/1.1 server for `/metrics`, `/healthz` and
//! `/healthz/ready`: three read-only GETs do not justify a web framework.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::Metrics;

/// Serve until `stop` turns true. Binds before returning so callers know the
/// port is taken (or why not).
pub async fn serve(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the ops endpoint on {addr}"))?;
    tracing::info!(%addr, "ops endpoint listening (/metrics, /healthz, /healthz/ready)");
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let m = metrics.clone();
                        tokio::spawn(async move {
                            if let Err(e) = respond(stream, &m).await {
                                tracing::debug!(error = %e, "ops request failed");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "ops endpoint accept failed"),
                },
            }
        }
    }))
}

async fn respond(mut stream: TcpStream, metrics: &Metrics) -> Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // Only the request line matters; read until the end of the headers or 4 KiB.
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        ("GET", "/healthz") => ("200 OK", "application/json", r#"{"live":true}"#.to_string()),
        ("GET", "/healthz/ready") => {
            let status = if metrics.ready() {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (
                status,
                "application/json",
                metrics.readiness_json().to_string(),
            )
        }
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}
