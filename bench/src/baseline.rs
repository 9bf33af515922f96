//! The baselines: hand-written lapin consumers doing the same work as warren
//! with the same safety and the same ack batching, and nothing else.
//!
//! Ack batching, as warren does it: deliveries whose work is done are acked
//! when the loop has nothing else ready, with one `basic.ack multiple=true` for
//! the highest delivery tag below which everything is done. A delivery is never
//! acked before its own effects are confirmed. These consumers settle in
//! delivery order, so "everything below is done" is simply the last one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use futures_util::future::FutureExt;
use futures_util::stream::{FuturesOrdered, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use tokio::sync::watch;

/// A message a baseline publishes for a delivery.
#[derive(Debug)]
pub struct Forward {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    pub mandatory: bool,
}

async fn consumer(conn: &Connection, queue: &str, prefetch: u16) -> Result<(Channel, Consumer)> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let consumer = ch
        .basic_consume(
            queue.into(),
            format!("baseline-{}", std::process::id()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming from {queue}"))?;
    Ok((ch, consumer))
}

/// Resolves once `stop` turns true (or its sender is gone). Returns `()`, not
/// the `watch::Ref`, so a `select!` holding it stays `Send`.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn ack_multiple() -> BasicAckOptions {
    BasicAckOptions { multiple: true }
}

/// Consume `queue` and ack every delivery (the no-op consumer), counting acked
/// deliveries in `acked`, until `stop` turns true.
pub async fn consume_ack(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    acked: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let (ch, mut consumer) = consumer(conn, queue, prefetch).await?;
    loop {
        let first = tokio::select! {
            _ = stopped(&mut stop) => break,
            d = consumer.next() => match d {
                Some(d) => d?,
                None => bail!("consumer cancelled"),
            },
        };
        let mut last = first.delivery_tag;
        let mut n = 1;
        // Everything already received is done too: one ack covers it all.
        while let Some(Some(d)) = consumer.next().now_or_never() {
            last = d?.delivery_tag;
            n += 1;
        }
        ch.basic_ack(last, ack_multiple()).await?;
        acked.fetch_add(n, Ordering::Relaxed);
    }
    let _ = ch.close(200, "baseline done".into()).await;
    Ok(())
}

/// Consume `queue` and keep every delivery without acking it, until the
/// consumer ends: a full prefetch window held in memory.
pub async fn consume_hold(conn: &Connection, queue: &str, prefetch: u16) -> Result<()> {
    let (_ch, mut consumer) = consumer(conn, queue, prefetch).await?;
    let mut held = Vec::new();
    while let Some(d) = consumer.next().await {
        held.push(d?);
    }
    Ok(())
}

/// Consume `queue`; for each delivery publish what `f` returns on a confirm
/// channel, and ack the delivery once that publish is confirmed. Counts acked
/// deliveries in `acked`.
pub async fn consume_forward(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    acked: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
    f: impl Fn(&Delivery) -> Forward,
) -> Result<()> {
    let (ch, mut consumer) = consumer(conn, queue, prefetch).await?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // One publish channel confirms in publish order, so confirms complete in
    // delivery order: FuturesOrdered yields the settled prefix.
    let mut pending = FuturesOrdered::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            d = consumer.next() => {
                let d = match d {
                    Some(d) => d?,
                    None => bail!("consumer cancelled"),
                };
                let out = f(&d);
                let confirm = publisher
                    .basic_publish(
                        out.exchange,
                        out.routing_key,
                        BasicPublishOptions { mandatory: out.mandatory, ..Default::default() },
                        &out.body,
                        out.properties,
                    )
                    .await?;
                let tag = d.delivery_tag;
                pending.push_back(confirm.map(move |c| (tag, c)));
            }
            Some((tag, c)) = pending.next(), if !pending.is_empty() => {
                check(c)?;
                let mut last = tag;
                let mut n = 1;
                while let Some(Some((tag, c))) = pending.next().now_or_never() {
                    check(c)?;
                    last = tag;
                    n += 1;
                }
                ch.basic_ack(last, ack_multiple()).await?;
                acked.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
    let _ = ch.close(200, "baseline done".into()).await;
    let _ = publisher.close(200, "baseline done".into()).await;
    Ok(())
}

fn check(c: lapin::Result<lapin::Confirmation>) -> Result<()> {
    match c? {
        lapin::Confirmation::Nack(_) => bail!("the broker nacked a publish"),
        lapin::Confirmation::Ack(Some(_)) => bail!("a publish was unroutable"),
        _ => Ok(()),
    }
}

/// The republish baseline's forward: the body to `<queue>.out`, persistent,
/// mandatory (warren publishes outputs mandatory too).
pub fn republish_to(out_queue: &str) -> impl Fn(&Delivery) -> Forward + use<> {
    let key: ShortString = out_queue.into();
    move |d| Forward {
        exchange: "".into(),
        routing_key: key.clone(),
        body: d.data.clone(),
        properties: BasicProperties::default().with_delivery_mode(2),
        mandatory: true,
    }
}

/// The RPC baseline's forward: fib(n) of the body, to `reply_to` with the
/// request's correlation id, like RabbitMQ tutorial 6's server.
pub fn fib_reply(d: &Delivery) -> Forward {
    let text = String::from_utf8_lossy(&d.data);
    let answer = match text.trim().parse::<u32>() {
        Ok(n) if n <= 186 => fib(n).to_string(),
        _ => "error: bad request".to_string(),
    };
    let mut props = BasicProperties::default();
    if let Some(c) = d.properties.correlation_id() {
        props = props.with_correlation_id(c.clone());
    }
    Forward {
        exchange: "".into(),
        routing_key: d.properties.reply_to().clone().unwrap_or_default(),
        body: answer.into_bytes(),
        properties: props,
        mandatory: false,
    }
}

/// fib(0) = 0, fib(1) = 1, iteratively (as the `fib` plugin computes it).
pub fn fib(n: u32) -> u128 {
    let (mut a, mut b) = (0u128, 1u128);
    for _ in 0..n {
        let next = a.wrapping_add(b);
        a = b;
        b = next;
    }
    a
}
