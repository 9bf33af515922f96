//! Scenario 10: the Python, JavaScript and C example plugins, each drained from
//! a backlog by warren with a fresh instance per message and with
//! `instance = "reuse"`, beside a peer doing the same work natively in the
//! same run:
//!
//! - `py_classifier` vs a Celery worker (prefork pool, one process per
//!   `--concurrency`, acks late, publishes confirmed) running the same
//!   classification in CPython (`bench/peers/celery_classifier.py`);
//! - `js_router` vs a Node consumer (amqplib, a confirm channel, ack after the
//!   publish is confirmed) running the same routing
//!   (`bench/peers/node_router.cjs`);
//! - `c_checksum` has no peer (its native twin would be the raw lapin
//!   consumer of scenario 2).
//!
//! Each plugin publishes one message per input to a topic exchange whose
//! output queue is bound with `#`. Reported per system: msgs/s over the
//! steady part of the drain, and CPU per message (warren: this process, as in
//! scenario 1; a peer: its whole process tree, sampled at the same moments).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};
use serde_json::json;
use warren::disposition::Disposition;

use super::{STARTUP, warren_rate};
use crate::report::{Goal, Row};
use crate::setup::{self, ChildGuard, pipeline_toml, sizing, unique};
use crate::stats::{self, Rate};
use crate::{Options, amqp};

/// Messages per drain: enough for the 10 s window of the fastest system here,
/// without minutes of filling at every run.
const MAX_MESSAGES: u64 = 30_000;

/// A support ticket `py_classifier` files under "billing".
pub(crate) const TICKET: &str = r#"{"id": "T-1042", "subject": "Refund for a double charge", "body": "I was charged twice for my subscription this month; please refund the second payment."}"#;
/// An event `js_router` turns into one Slack payload.
pub(crate) const EVENT: &str = r#"{"event": "deploy.failed", "severity": "error", "summary": "Deploy of api failed at the migration step", "service": "api", "url": "https://ci.example.com/runs/1042", "fields": {"commit": "abc1234", "stage": "migrate"}}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Celery,
    Node,
}

struct Case {
    plugin: &'static str,
    language: &'static str,
    body: Vec<u8>,
    peer: Option<Peer>,
}

pub async fn run(opts: &Options) -> Result<Vec<Row>> {
    let cases = [
        Case {
            plugin: "py_classifier",
            language: "Python",
            body: TICKET.as_bytes().to_vec(),
            peer: Some(Peer::Celery),
        },
        Case {
            plugin: "js_router",
            language: "JavaScript",
            body: EVENT.as_bytes().to_vec(),
            peer: Some(Peer::Node),
        },
        Case {
            plugin: "c_checksum",
            language: "C",
            body: amqp::body(opts.size),
            peer: None,
        },
    ];
    let mut rows = Vec::new();
    for case in &cases {
        if !opts.plugin(case.plugin).exists() {
            eprintln!(
                "    {}: skipped, {} is not built (scripts/build-plugins.sh)",
                case.plugin,
                opts.plugin(case.plugin).display()
            );
            continue;
        }
        rows.extend(
            measure_case(opts, case)
                .await
                .with_context(|| case.plugin.to_string())?,
        );
    }
    Ok(rows)
}

async fn measure_case(opts: &Options, case: &Case) -> Result<Vec<Row>> {
    let conn = amqp::connect(&opts.broker_url, "polyglot").await?;
    let name = unique(case.plugin);
    let exchange = format!("{name}.x");
    let out = format!("{name}.out");
    let total = opts.messages.min(MAX_MESSAGES);
    let pipelines_for = |instance: &str| {
        let extra = format!(
            "{}instance = {instance:?}\n[[pipeline.output]]\nexchange = {exchange:?}\ntype = \"topic\"\n\
             [pipeline.config]\nexchange = {exchange:?}\n",
            sizing(opts)
        );
        pipeline_toml(&name, &name, &opts.plugin(case.plugin), &extra)
    };
    let config_for = |instance: &str| setup::config(opts, &pipelines_for(instance));
    let fresh_config = config_for("fresh")?;
    let p = setup::pipeline(&fresh_config, &name)?.clone();
    amqp::declare_pipeline(&conn, &p).await?;
    declare_output(&conn, &exchange, &out).await?;
    let mut queues = amqp::pipeline_queues(&p);
    queues.push(out.clone());

    let result = async {
        let mut rates = Vec::new();
        for instance in ["fresh", "reuse"] {
            refill(&conn, &name, &out, total, &case.body, None).await?;
            let rate = warren_rate(
                opts,
                config_for(instance)?,
                &name,
                Disposition::Publish,
                total,
            )
            .await?;
            let rss = peak_rss(
                opts,
                &conn,
                &name,
                &out,
                &case.body,
                &pipelines_for(instance),
            )
            .await
            .map_err(|e| eprintln!("    {}: no RSS measured: {e:#}", case.plugin))
            .ok();
            rates.push((rate, rss));
        }
        let peer = match case.peer {
            None => None,
            Some(peer) => {
                refill(&conn, &name, &out, total, &case.body, Some(peer)).await?;
                match measure_peer(opts, peer, &name, &exchange, total).await {
                    Ok(rate) => Some((peer, rate)),
                    Err(e) => {
                        eprintln!("    {}: the {peer:?} peer is skipped: {e:#}", case.plugin);
                        None
                    }
                }
            }
        };
        anyhow::Ok((rates, peer))
    }
    .await;
    amqp::delete_queues(&conn, &queues).await?;
    let _ = conn.close(200, "done".into()).await;
    let (rates, peer) = result?;
    Ok(rows_of(case, &rates, peer))
}

fn rows_of(case: &Case, rates: &[(Rate, Option<f64>)], peer: Option<(Peer, Rate)>) -> Vec<Row> {
    let scenario = "10 polyglot";
    let peer_label = |p: Peer| match p {
        Peer::Celery => "Celery (prefork)",
        Peer::Node => "Node (amqplib)",
    };
    let mut rows = Vec::new();
    for ((rate, rss), instance) in rates.iter().zip(["fresh", "reuse"]) {
        let metric = format!("{} ({}), instance = {instance}", case.plugin, case.language);
        let mut row = Row::new(scenario, &metric, "msgs/s", rate.per_sec);
        if let Some((p, peer)) = &peer {
            let ratio = rate.per_sec / peer.per_sec;
            row = row
                .baseline(peer_label(*p), peer.per_sec)
                .compare(super::ratio_text(ratio))
                .goal(Goal::new(">= 1.0x the peer", ratio >= 1.0));
        }
        rows.push(row);
        if let Some(cpu) = rate.cpu_us_per_event {
            let mut row = Row::new(
                scenario,
                &format!("{}, instance = {instance}: CPU per message", case.plugin),
                "µs",
                cpu,
            );
            if let Some((p, peer_cpu)) = peer
                .as_ref()
                .and_then(|(p, r)| r.cpu_us_per_event.map(|c| (*p, c)))
            {
                row = row
                    .baseline(peer_label(p), peer_cpu)
                    .compare(format!("{:.2}x", cpu / peer_cpu));
            }
            rows.push(row);
        }
        if let Some(rss) = rss {
            rows.push(Row::new(
                scenario,
                &format!(
                    "{}, instance = {instance}: peak RSS of warren draining a backlog",
                    case.plugin
                ),
                "MiB",
                rss / (1024.0 * 1024.0),
            ));
        }
    }
    rows
}

/// Messages drained by the warren process whose peak RSS is taken.
const RSS_MESSAGES: u64 = 3_000;

/// Peak RSS (`VmHWM`, bytes) of warren as its own process while it drains a
/// backlog of `RSS_MESSAGES` with `pipelines`, at the run's prefetch and
/// concurrency.
async fn peak_rss(
    opts: &Options,
    conn: &Connection,
    queue: &str,
    out: &str,
    body: &[u8],
    pipelines: &str,
) -> Result<f64> {
    let n = RSS_MESSAGES.min(opts.messages);
    refill(conn, queue, out, n, body, None).await?;
    let file = opts.work_dir.join(format!("{queue}.toml"));
    std::fs::write(&file, setup::config_toml(opts, None, "", pipelines))
        .with_context(|| format!("writing {}", file.display()))?;
    let mut child = ChildGuard::spawn(&opts.warren_cmd, &[file.display().to_string()])?;
    let deadline = std::time::Instant::now() + STARTUP * 2;
    loop {
        child.check_alive()?;
        if amqp::depth(conn, out).await? >= u32::try_from(n).unwrap_or(u32::MAX) {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the backlog was not drained within {:?}",
            STARTUP * 2
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak = child.peak_rss()? as f64;
    drop(child);
    let _ = std::fs::remove_file(&file);
    Ok(peak)
}

/// A durable topic exchange and a classic queue bound to it with `#`, so the
/// plugins' and peers' publishes are routed (and kept until the next purge).
async fn declare_output(conn: &Connection, exchange: &str, out: &str) -> Result<()> {
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("declaring {exchange}"))?;
    let _ = ch.close(200, "declared".into()).await;
    amqp::declare_classic(conn, out).await?;
    let ch = conn.create_channel().await?;
    ch.queue_bind(
        out.into(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("binding {out}"))?;
    let _ = ch.close(200, "bound".into()).await;
    Ok(())
}

/// Empty the input and output queues and fill the input with `total`
/// messages: plain ones, or Celery task messages carrying the body.
async fn refill(
    conn: &Connection,
    queue: &str,
    out: &str,
    total: u64,
    body: &[u8],
    peer: Option<Peer>,
) -> Result<()> {
    amqp::purge(conn, queue).await?;
    amqp::purge(conn, out).await?;
    match peer {
        Some(Peer::Celery) => {
            super::peers::fill_celery(conn, queue, total, "bench.classify", body).await
        }
        _ => amqp::fill(conn, queue, total, body).await,
    }
}

async fn measure_peer(
    opts: &Options,
    peer: Peer,
    queue: &str,
    exchange: &str,
    total: u64,
) -> Result<Rate> {
    let cmd = match peer {
        Peer::Celery => {
            let python = opts
                .python
                .as_deref()
                .context("no Python with celery (scripts/bench.sh installs one)")?;
            let processes = opts.concurrency.max(1).to_string();
            let mut cmd = Command::new(python);
            cmd.current_dir(&opts.peers_dir)
                .args(["-m", "celery", "-A", "celery_classifier", "worker"])
                .args(["-P", "prefork", "-c", &processes])
                .args([
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ])
                .args(["-l", "WARNING", "-Q", queue])
                .env("BENCH_BROKER_URL", &opts.broker_url)
                .env("BENCH_QUEUE", queue)
                .env("BENCH_EXCHANGE", exchange)
                .env("BENCH_PROCESSES", &processes)
                .env("BENCH_PREFETCH", opts.prefetch.to_string())
                .env(
                    "BENCH_QUEUE_ARGS",
                    json!({ "x-queue-type": opts.queue_type }).to_string(),
                );
            cmd
        }
        Peer::Node => {
            let modules = opts
                .node_modules
                .as_deref()
                .context("no node_modules with amqplib (scripts/bench.sh installs it)")?;
            let mut cmd = Command::new("node");
            cmd.arg(opts.peers_dir.join("node_router.cjs"))
                .args([opts.broker_url.as_str(), queue, exchange])
                .arg(opts.prefetch.to_string())
                .env("NODE_PATH", modules);
            cmd
        }
    };
    run_peer(cmd, &opts.broker_url, queue, total, opts.duration).await
}

/// Run a peer process and measure its drain of `queue` from the queue depth
/// (sampled every 20 ms; the prefetched window is a constant offset that does
/// not change the rate) and the CPU of its process tree.
async fn run_peer(
    cmd: Command,
    url: &str,
    queue: &str,
    total: u64,
    limit: Duration,
) -> Result<Rate> {
    let mut child = ChildGuard::start(cmd)?;
    let pid = child.id();
    let done = Arc::new(AtomicU64::new(0));
    let poller = {
        let (done, url, queue) = (done.clone(), url.to_string(), queue.to_string());
        tokio::spawn(async move {
            let Ok(conn) = amqp::connect(&url, "polyglot-depth").await else {
                return;
            };
            while let Ok(depth) = amqp::depth(&conn, &queue).await {
                done.store(total.saturating_sub(u64::from(depth)), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let rate = stats::measure_rate_cpu(
        || done.load(Ordering::Relaxed),
        || stats::tree_cpu_ticks(pid),
        total,
        limit,
        STARTUP,
    )
    .await;
    poller.abort();
    child.check_alive().context("the peer exited")?;
    rate
}
