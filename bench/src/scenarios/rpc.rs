//! Scenario 3: RPC latency through `amq.rabbitmq.reply-to`, warren's `fib`
//! plugin vs a raw lapin fib responder, driven by the same client: one caller
//! making calls back to back, then `rpc_callers` concurrent callers.
//!
//! Both responders run at once, each on its own queue, and every caller
//! alternates between them call by call. On a shared machine whose load drifts
//! by the second, this pairs each warren call with a raw call made under the
//! same conditions; measuring one system after the other did not.
//!
//! The raw responder has warren's safety: it publishes the reply on a confirm
//! channel and acks the request after the confirm. The caller sees the reply
//! as soon as the broker routes it, so confirms cost neither side latency.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use tokio::sync::watch;

use super::micros;
use crate::report::{Goal, Row};
use crate::setup::{self, pipeline_toml, sizing, unique};
use crate::stats::summarize;
use crate::{Options, amqp, baseline};

/// The request: fib(30), as in the RabbitMQ tutorial.
const REQUEST: &[u8] = b"30";
const REPLY: &[u8] = b"832040";
/// Calls made (and discarded) before measuring.
const WARMUP: usize = 50;

/// Latencies in µs per system: index 0 is warren, 1 the raw responder.
type Pair = [Vec<f64>; 2];

pub async fn run(opts: &Options) -> Result<Vec<Row>> {
    let mut seq: Pair = Default::default();
    let mut conc: Pair = Default::default();
    for _ in 0..opts.rounds.max(1) {
        one(opts, &mut seq, &mut conc).await?;
    }
    let [ws, bs] = seq.map(summarize);
    let [wp, bp] = conc.map(summarize);
    let n = opts.rpc_callers;
    let row = |metric: String, w: f64, b: f64| {
        Row::new("3 rpc", &metric, "µs", w)
            .baseline("raw lapin", b)
            .compare(format!("{:+.0} µs", w - b))
    };
    Ok(vec![
        row(
            format!("1 caller p50 ({} calls each)", ws.n),
            ws.p50,
            bs.p50,
        )
        .goal(Goal::new("<= raw + 100 µs", ws.p50 <= bs.p50 + 100.0)),
        row("1 caller p99".into(), ws.p99, bs.p99)
            .goal(Goal::new("<= 1000 µs (idle machine)", ws.p99 <= 1000.0)),
        row("1 caller p99.9".into(), ws.p999, bs.p999),
        row(
            format!("{n} callers p50 ({} calls each)", wp.n),
            wp.p50,
            bp.p50,
        ),
        row(format!("{n} callers p99"), wp.p99, bp.p99),
        row(format!("{n} callers p99.9"), wp.p999, bp.p999),
    ])
}

async fn one(opts: &Options, seq: &mut Pair, conc: &mut Pair) -> Result<()> {
    let (w, r) = (unique("rpc-warren"), unique("rpc-raw"));
    let fib = opts.plugin("fib");
    let config = setup::config(
        opts,
        &format!(
            "{}{}",
            pipeline_toml(&w, &w, &fib, &sizing(opts)),
            // Only declared, for the raw responder's queue to match warren's.
            pipeline_toml(&r, &r, &fib, &sizing(opts))
        ),
    )?;
    let (wp, rp) = (
        setup::pipeline(&config, &w)?.clone(),
        setup::pipeline(&config, &r)?.clone(),
    );
    let conn = amqp::connect(&opts.broker_url, "rpc").await?;
    amqp::declare_pipeline(&conn, &wp).await?;
    amqp::declare_pipeline(&conn, &rp).await?;

    let mut warren_config = config.clone();
    warren_config.pipelines.retain(|p| p.name == w);
    let running = warren::start(warren_config).await?;
    let (stop, stop_rx) = watch::channel(false);
    let rconn = amqp::connect(&opts.broker_url, "rpc-responder").await?;
    let (queue, prefetch) = (r.clone(), opts.prefetch);
    let responder = tokio::spawn(async move {
        baseline::consume_forward(
            &rconn,
            &queue,
            prefetch,
            Default::default(),
            stop_rx,
            baseline::fib_reply,
        )
        .await
    });

    let phase = opts.duration / 2;
    let queues = [w.clone(), r.clone()];
    let result = async {
        running.wait_ready(Duration::from_secs(30)).await?;
        let s = drive(&conn, &queues, 1, phase).await?;
        let c = drive(&conn, &queues, opts.rpc_callers, phase).await?;
        for (into, mut from) in seq.iter_mut().zip(s) {
            into.append(&mut from);
        }
        for (into, mut from) in conc.iter_mut().zip(c) {
            into.append(&mut from);
        }
        anyhow::Ok(())
    }
    .await;

    let _ = stop.send(true);
    running.shutdown().await;
    let _ = responder.await;
    let mut all = amqp::pipeline_queues(&wp);
    all.extend(amqp::pipeline_queues(&rp));
    amqp::delete_queues(&conn, &all).await?;
    let _ = conn.close(200, "done".into()).await;
    result
}

/// A caller: its own channel consuming direct replies (also the HTTP
/// scenario's).
pub(super) struct Caller {
    pub(super) channel: Channel,
    replies: Consumer,
    next_id: u64,
}

impl Caller {
    pub(super) async fn new(conn: &Connection) -> Result<Self> {
        let channel = conn.create_channel().await?;
        let replies = channel
            .basic_consume(
                "amq.rabbitmq.reply-to".into(),
                unique("caller").into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("consuming amq.rabbitmq.reply-to")?;
        Ok(Self {
            channel,
            replies,
            next_id: 0,
        })
    }

    /// One call of the fib responders; returns its latency.
    async fn call(&mut self, queue: &str) -> Result<Duration> {
        let (took, reply) = self.request(queue, REQUEST).await?;
        if reply != REPLY {
            bail!("wrong reply: {:?}", String::from_utf8_lossy(&reply));
        }
        Ok(took)
    }

    /// One call with `body`; returns its latency and the reply's body.
    pub(super) async fn request(
        &mut self,
        queue: &str,
        body: &[u8],
    ) -> Result<(Duration, Vec<u8>)> {
        self.next_id += 1;
        let id = self.next_id.to_string();
        let props = BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id(id.as_str().into());
        let start = Instant::now();
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await?;
        loop {
            let reply = tokio::time::timeout(Duration::from_secs(10), self.replies.next())
                .await
                .context("no reply within 10 s")?
                .context("the reply consumer ended")??;
            let corr = reply
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str());
            if corr == Some(id.as_str()) {
                return Ok((start.elapsed(), reply.data));
            }
            // A late reply to an earlier call that timed out: skip it.
        }
    }
}

/// `callers` callers calling back to back for `phase`, each alternating
/// between the two queues (half the callers start on each); latencies in µs
/// per queue.
async fn drive(
    conn: &Connection,
    queues: &[String; 2],
    callers: usize,
    phase: Duration,
) -> Result<Pair> {
    let mut tasks = Vec::new();
    for c in 0..callers.max(1) {
        let mut caller = Caller::new(conn).await?;
        let queues = queues.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..WARMUP {
                caller.call(&queues[(c + i) % 2]).await?;
            }
            let end = Instant::now() + phase;
            let mut lat: Pair = Default::default();
            let mut i = c;
            while Instant::now() < end {
                let k = i % 2;
                lat[k].push(micros(caller.call(&queues[k]).await?));
                i += 1;
            }
            let _ = caller.channel.close(200, "done".into()).await;
            anyhow::Ok(lat)
        }));
    }
    let mut all: Pair = Default::default();
    for t in tasks {
        let lat = t.await.context("a caller panicked")??;
        for (into, mut from) in all.iter_mut().zip(lat) {
            into.append(&mut from);
        }
    }
    Ok(all)
}
