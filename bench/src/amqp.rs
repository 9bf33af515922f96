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

/// Messages ready in `queue` (the test suite's helper).
pub async fn depth(conn: &Connection, queue: &str) -> Result<u32> {
    warren_tests::queue_depth(conn, queue).await
}

/// Persistent properties, as a producer of durable work would send.
pub fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// Publish `n` copies of `body` to `queue` (default exchange, persistent) with
/// publisher confirms, keeping a window of unconfirmed publishes in flight.
pub async fn fill(conn: &Connection, queue: &str, n: u64, body: &[u8]) -> Result<()> {
    fill_with(conn, queue, n, body, |_| persistent()).await
}

/// [`fill`] with the properties of message `i` from `props(i)`.
pub async fn fill_with(
    conn: &Connection,
    queue: &str,
    n: u64,
    body: &[u8],
    mut props: impl FnMut(u64) -> BasicProperties,
) -> Result<()> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut pending = VecDeque::with_capacity(FILL_WINDOW);
    for i in 0..n {
        let c = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props(i),
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
/// and body (the test suite's helper).
pub async fn http_get(base: &str, path: &str, auth: Option<(&str, &str)>) -> Result<(u16, String)> {
    warren_tests::http("GET", base, path, auth).await
}
