//! Broker chores shared by the scenarios: connecting, declaring a pipeline's
//! queues exactly as warren does, pre-filling a queue fast, deleting queues,
//! and a minimal HTTP GET for the management API and warren's ops endpoint.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren::config::PipelineConfig;
use warren::retry::{RetryTiers, tier_queue};

/// Unconfirmed publishes kept in flight while filling a queue.
const FILL_WINDOW: usize = 1024;

/// Open a connection named `warren-bench/<name>` (visible in the management UI).
pub async fn connect(url: &str, name: &str) -> Result<Connection> {
    let props =
        ConnectionProperties::default().with_connection_name(format!("warren-bench/{name}").into());
    Connection::connect(url, props)
        .await
        .with_context(|| format!("connecting to the broker for {name}"))
}

/// Declare `p`'s queue, DLQ and retry tiers with warren's own declaration code,
/// so baselines consume from a queue with exactly the arguments warren uses.
pub async fn declare_pipeline(conn: &Connection, p: &PipelineConfig) -> Result<()> {
    let ch = conn.create_channel().await?;
    warren::broker::declare(&ch, p, &RetryTiers::new(&p.retry)).await?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Declare a durable classic queue (for collecting outputs).
pub async fn declare_classic(conn: &Connection, queue: &str) -> Result<()> {
    let ch = conn.create_channel().await?;
    let opts = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(queue.into(), opts, FieldTable::default())
        .await
        .with_context(|| format!("declaring {queue}"))?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Every queue warren declares for `p` (main, DLQ, retry tiers).
pub fn pipeline_queues(p: &PipelineConfig) -> Vec<String> {
    let mut v = vec![p.queue.clone(), p.dlq_name()];
    for &ms in RetryTiers::new(&p.retry).delays_ms() {
        v.push(tier_queue(&p.queue, ms));
    }
    v
}

/// Delete queues, ignoring ones that do not exist.
pub async fn delete_queues(conn: &Connection, queues: &[String]) -> Result<()> {
    // Give the broker a moment to flush the queues' logs first: RabbitMQ
    // 3.10's quorum-queue segment writer can crash (taking connections down
    // with INTERNAL_ERROR) when a queue is deleted while it is still writing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for q in queues {
        // A failed delete closes the channel, so each gets its own.
        let ch = conn.create_channel().await?;
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = ch.close(200, "deleted".into()).await;
    }
    Ok(())
}

/// Remove every ready message from `queue`.
pub async fn purge(conn: &Connection, queue: &str) -> Result<()> {
    let ch = conn.create_channel().await?;
    ch.queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .with_context(|| format!("purging {queue}"))?;
    let _ = ch.close(200, "purged".into()).await;
    Ok(())
}

/// Messages ready in `queue`.
pub async fn depth(conn: &Connection, queue: &str) -> Result<u32> {
    let ch = conn.create_channel().await?;
    let opts = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let q = ch
        .queue_declare(queue.into(), opts, FieldTable::default())
        .await
        .with_context(|| format!("queue {queue} does not exist"))?;
    let _ = ch.close(200, "ok".into()).await;
    Ok(q.message_count())
}

/// Persistent properties, as a producer of durable work would send.
pub fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// Publish `n` copies of `body` to `queue` (default exchange, persistent) with
/// publisher confirms, keeping a window of unconfirmed publishes in flight.
pub async fn fill(conn: &Connection, queue: &str, n: u64, body: &[u8]) -> Result<()> {
    fill_with(conn, queue, n, body, persistent()).await
}

/// [`fill`] with explicit properties.
pub async fn fill_with(
    conn: &Connection,
    queue: &str,
    n: u64,
    body: &[u8],
    props: BasicProperties,
) -> Result<()> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut pending = VecDeque::with_capacity(FILL_WINDOW);
    for _ in 0..n {
        let c = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props.clone(),
            )
            .await?;
        pending.push_back(c);
        if pending.len() >= FILL_WINDOW
            && let Some(c) = pending.pop_front()
            && !c.await?.is_ack()
        {
            bail!("the broker refused a message while filling {queue}");
        }
    }
    for c in pending {
        if !c.await?.is_ack() {
            bail!("the broker refused a message while filling {queue}");
        }
    }
    let _ = ch.close(200, "filled".into()).await;
    Ok(())
}

/// A 1 KiB-style body of `size` bytes (printable, so logs stay readable).
pub fn body(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

/// `GET path` on `http://host:port` with optional basic auth; returns status
/// and body. Enough HTTP for the management API and warren's ops endpoint.
pub async fn http_get(base: &str, path: &str, auth: Option<(&str, &str)>) -> Result<(u16, String)> {
    let hostport = base
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?
        .trim_end_matches('/');
    let mut stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(hostport),
    )
    .await
    .context("connect timed out")??;
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\n");
    if let Some((u, p)) = auth {
        req.push_str(&format!(
            "Authorization: Basic {}\r\n",
            base64(format!("{u}:{p}").as_bytes())
        ));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .context("read timed out")??;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("malformed HTTP response")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(super::base64(b"guest:guest"), "Z3Vlc3Q6Z3Vlc3Q=");
        assert_eq!(super::base64(b"ab"), "YWI=");
        assert_eq!(super::base64(b"abc"), "YWJj");
    }
}
