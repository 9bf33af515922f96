//! A deliberately tiny HTTP/1.1 server for `/metrics`, `/healthz` and
//! `/healthz/ready`.
//!
//! Hand-written rather than hyper's `http1`: three read-only resources, one
//! request per connection (`Connection: close`), no request bodies, so the
//! whole protocol surface is the request line. That fits on one screen, is
//! tested against real sockets (`tests/integration/ops.rs`), and its limits
//! below are explicit instead of being a framework's defaults. `GET` and
//! `HEAD` are answered; a query string is ignored (scrapers and probes add
//! them); anything else gets `405` with `Allow`.
//!
//! It must stay up whoever connects: at most [`MAX_CONNECTIONS`] are served at
//! once (more are closed as soon as they are accepted), each gets
//! [`REQUEST_TIMEOUT`] to send its request and take the answer, and a failing
//! `accept` (out of file descriptors, say) backs off instead of spinning
//! through log lines.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::Metrics;

/// Connections served at once. A scraper and a few probes need a handful.
pub const MAX_CONNECTIONS: usize = 64;

/// How long one connection may take to send its request and read the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// First pause after a failed accept; doubles up to `ACCEPT_BACKOFF_MAX`.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serve until `stop` turns true. Binds before returning so callers know the
/// port is taken (or why not), and returns the bound address: with port `0`
/// the system picks a free one.
pub async fn serve(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the ops endpoint on {addr}"))?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("reading the address the ops endpoint bound for {addr}"))?;
    tracing::info!(%addr, "ops endpoint listening (/metrics, /healthz, /healthz/ready)");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok((
        addr,
        tokio::spawn(async move {
            let mut backoff = ACCEPT_BACKOFF_FIRST;
            loop {
                let accepted = tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    accepted = listener.accept() => accepted,
                };
                let stream = match accepted {
                    Ok((stream, _)) => {
                        backoff = ACCEPT_BACKOFF_FIRST;
                        stream
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "ops endpoint accept failed");
                        tokio::select! {
                            _ = stop.wait_for(|s| *s) => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = backoff.saturating_mul(2).min(ACCEPT_BACKOFF_MAX);
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Full: closing at once frees the descriptor now.
                    tracing::debug!("ops endpoint busy; connection closed");
                    continue;
                };
                let m = metrics.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(REQUEST_TIMEOUT, respond(stream, &m)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(error = %e, "ops request failed"),
                        Err(_) => tracing::debug!("ops request timed out"),
                    }
                });
            }
        }),
    ))
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
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", super::metrics::CONTENT_TYPE, metrics.render()),
        ("GET" | "HEAD", "/healthz") => {
            ("200 OK", "application/json", r#"{"live":true}"#.to_string())
        }
        ("GET" | "HEAD", "/healthz/ready") => {
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
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET and HEAD\n".to_string(),
        ),
    };
    let allow = if status.starts_with("405") {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    // HEAD: the headers GET would send, Content-Length included, no body.
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await?;
    Ok(())
}
