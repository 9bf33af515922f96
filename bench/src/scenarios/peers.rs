//! Scenario 7 (context, optional): other ways to run the same no-op on the same
//! broker, with the same prefetch and message size, against warren in the same
//! scenario: a hand-written pika consumer (acks each message) and a Celery
//! worker (`-P solo`, acks late, prefetch multiplier = prefetch) running a task
//! that does nothing. Needs a Python with pika and celery (`scripts/bench.sh`
//! installs them into a venv).
//!
//! The peers' progress is read from the queue depth (messages ready), sampled
//! every 20 ms; the prefetched window is a constant offset that does not change
//! the rate.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{BasicProperties, Connection};
use serde_json::json;

use super::{STARTUP, System, ratio_text};
use crate::report::Row;
use crate::setup::{self, ChildGuard, pipeline_toml, sizing, unique};
use crate::stats;
use crate::{Options, amqp};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Pika,
    Celery,
}

pub async fn run(opts: &Options) -> Result<Vec<Row>> {
    let Some(python) = opts.python.clone() else {
        bail!(
            "skipped: no Python with pika and celery given (scripts/bench.sh installs them \
             into a venv and passes --python)"
        );
    };
    let conn = amqp::connect(&opts.broker_url, "peers").await?;
    let drain = super::throughput::Drain::new(opts, &conn, false).await?;
    let warren = drain
        .run(opts, &conn, &amqp::body(opts.size), System::Warren)
        .await;
    drain.delete(&conn).await?;
    let warren = warren?.per_sec;
    let _ = conn.close(200, "done".into()).await;
    let mut rows = Vec::new();
    for peer in [Peer::Pika, Peer::Celery] {
        let (label, metric) = match peer {
            Peer::Pika => ("pika", "no-op: warren vs a pika consumer"),
            Peer::Celery => ("Celery", "no-op: warren vs a Celery worker (-P solo)"),
        };
        match measure(opts, peer, &python).await {
            Ok(rate) => rows.push(
                Row::new("7 peers", metric, "msgs/s", warren)
                    .baseline(label, rate)
                    .compare(ratio_text(warren / rate)),
            ),
            Err(e) => bail!("{label}: {e:#}"),
        }
    }
    Ok(rows)
}

async fn measure(opts: &Options, peer: Peer, python: &Path) -> Result<f64> {
    let name = unique("peer");
    let config = setup::config(
        opts,
        &pipeline_toml(&name, &name, &opts.plugin("noop"), &sizing(opts)),
    )?;
    let p = setup::pipeline(&config, &name)?.clone();
    let conn = amqp::connect(&opts.broker_url, "peers").await?;
    amqp::declare_pipeline(&conn, &p).await?;
    let total = opts.messages;
    match peer {
        Peer::Pika => amqp::fill(&conn, &name, total, &amqp::body(opts.size)).await?,
        Peer::Celery => {
            fill_celery(&conn, &name, total, "bench.noop", &amqp::body(opts.size)).await?
        }
    }
    let result = async {
        let mut cmd = Command::new(python);
        match peer {
            Peer::Pika => {
                cmd.arg(opts.peers_dir.join("pika_consumer.py"))
                    .arg(&opts.broker_url)
                    .arg(&name)
                    .arg(opts.prefetch.to_string());
            }
            Peer::Celery => {
                cmd.current_dir(&opts.peers_dir)
                    .args(["-m", "celery", "-A", "celery_noop", "worker", "-P", "solo"])
                    .args([
                        "--without-gossip",
                        "--without-mingle",
                        "--without-heartbeat",
                    ])
                    .args(["-l", "WARNING", "-Q", &name])
                    .env("BENCH_BROKER_URL", &opts.broker_url)
                    .env("BENCH_QUEUE", &name)
                    .env("BENCH_PREFETCH", opts.prefetch.to_string())
                    .env(
                        "BENCH_QUEUE_ARGS",
                        json!({ "x-queue-type": opts.queue_type }).to_string(),
                    );
            }
        }
        let mut child = ChildGuard::start(cmd)?;
        let done = Arc::new(AtomicU64::new(0));
        let poller = {
            let (done, url, queue) = (done.clone(), opts.broker_url.clone(), name.clone());
            tokio::spawn(async move {
                let Ok(conn) = amqp::connect(&url, "peers-depth").await else {
                    return;
                };
                while let Ok(depth) = amqp::depth(&conn, &queue).await {
                    done.store(total.saturating_sub(u64::from(depth)), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let rate = stats::measure_rate(
            || done.load(Ordering::Relaxed),
            total,
            opts.duration,
            STARTUP,
        )
        .await;
        poller.abort();
        child
            .check_alive()
            .context("the peer exited (is the venv complete?)")?;
        anyhow::Ok(rate?.per_sec)
    }
    .await;
    amqp::delete_queues(&conn, &amqp::pipeline_queues(&p)).await?;
    let _ = conn.close(200, "done".into()).await;
    result
}

/// Fill `queue` with `n` Celery task messages (protocol 2) for `task`, each
/// carrying `arg` (as text) as its one argument.
pub(super) async fn fill_celery(
    conn: &Connection,
    queue: &str,
    n: u64,
    task: &str,
    arg: &[u8],
) -> Result<()> {
    let arg = String::from_utf8_lossy(arg).into_owned();
    let body = serde_json::to_vec(&json!([
        [arg],
        {},
        {"callbacks": null, "errbacks": null, "chain": null, "chord": null}
    ]))?;
    amqp::fill_with(conn, queue, n, &body, |i| {
        let id = format!("bench-{i}");
        let text = |s: &str| AMQPValue::LongString(s.into());
        let mut h = FieldTable::default();
        h.insert("lang".into(), text("py"));
        h.insert("task".into(), text(task));
        h.insert("id".into(), text(&id));
        h.insert("root_id".into(), text(&id));
        h.insert("parent_id".into(), AMQPValue::Void);
        h.insert("group".into(), AMQPValue::Void);
        h.insert("shadow".into(), AMQPValue::Void);
        h.insert("eta".into(), AMQPValue::Void);
        h.insert("expires".into(), AMQPValue::Void);
        h.insert("retries".into(), AMQPValue::LongInt(0));
        h.insert(
            "timelimit".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void, AMQPValue::Void])),
        );
        h.insert("argsrepr".into(), text("('...',)"));
        h.insert("kwargsrepr".into(), text("{}"));
        h.insert("origin".into(), text("warren-bench"));
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_correlation_id(id.as_str().into())
            .with_delivery_mode(2)
            .with_priority(0)
            .with_headers(h)
    })
    .await
}
