//! Scenario 5: resident memory of warren as its own process, next to the raw
//! lapin consumer in its own process doing the same, at the same prefetch:
//!
//! * idle: started on an empty queue;
//! * draining a backlog with the no-op plugin (a fresh process per run: filling
//!   while a consumer runs would keep the queue, and the memory, near empty).
//!   The median is of samples taken while the backlog drains, plus one taken
//!   when it has drained; the maximum is the process's own peak (`VmHWM`).
//!   A fast machine can drain the whole backlog between two samples, so
//!   neither may depend on a sample landing inside the drain;
//! * holding a full prefetch window: the plugin (`spin`, with a long timeout,
//!   one call at a time) keeps the first message, so `prefetch` deliveries sit
//!   in the process unacked; the raw consumer simply never acks. The growth over
//!   that process's idle RSS, divided by `prefetch`, is the cost of one
//!   in-flight message.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lapin::Connection;

use super::{STARTUP, System};
use crate::report::{Goal, Row};
use crate::setup::{self, ChildGuard, pipeline_toml, unique};
use crate::stats::{median, summarize};
use crate::{Options, amqp};

const MIB: f64 = 1024.0 * 1024.0;
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

struct Profile {
    idle: f64,
    load_p50: f64,
    load_max: f64,
    held_idle: f64,
    held: f64,
}

pub async fn run(opts: &Options) -> Result<Vec<Row>> {
    let w = profile(opts, System::Warren).await?;
    let b = profile(opts, System::Baseline).await?;
    let p = opts.prefetch;
    let per = |x: &Profile| (x.held - x.held_idle) / f64::from(p);
    Ok(vec![
        Row::new("5 memory", "RSS idle", "MiB", w.idle / MIB).baseline("raw lapin", b.idle / MIB),
        Row::new(
            "5 memory",
            &format!("RSS draining a backlog, no-op, prefetch {p} (median)"),
            "MiB",
            w.load_p50 / MIB,
        )
        .baseline("raw lapin", b.load_p50 / MIB),
        Row::new(
            "5 memory",
            &format!("RSS draining a backlog, no-op, prefetch {p} (max)"),
            "MiB",
            w.load_max / MIB,
        )
        .baseline("raw lapin", b.load_max / MIB)
        .goal(Goal::new("<= 64 MiB", w.load_max / MIB <= 64.0)),
        Row::new(
            "5 memory",
            &format!("RSS holding {p} unacked {} B messages", opts.size),
            "MiB",
            w.held / MIB,
        )
        .baseline("raw lapin", b.held / MIB)
        .goal(Goal::new("<= 64 MiB", w.held / MIB <= 64.0)),
        Row::new(
            "5 memory",
            "bytes per in-flight message (growth / prefetch)",
            "bytes",
            per(&w),
        )
        .baseline("raw lapin", per(&b)),
    ])
}

/// A system run as a child process on a fresh queue.
struct Child {
    guard: ChildGuard,
    queue: String,
    queues: Vec<String>,
    ops: Option<String>,
    file: Option<std::path::PathBuf>,
}

impl Child {
    /// Start `sys` on a new queue; `hold` keeps every delivery unacked.
    async fn start(opts: &Options, conn: &Connection, sys: System, hold: bool) -> Result<Self> {
        let name = unique("memory");
        let (plugin, extra) = if hold {
            // One call at a time that outlives the measurement: everything
            // else the broker sends waits in the process, unacked.
            (
                "spin",
                format!(
                    "queue_type = {:?}\nprefetch = {}\nconcurrency = 1\n\
                     [pipeline.limits]\ntimeout_ms = 120000\n",
                    opts.queue_type, opts.prefetch
                ),
            )
        } else {
            ("noop", setup::sizing(opts))
        };
        let port = setup::free_port()?;
        let ops = format!("127.0.0.1:{port}");
        let text = setup::config_toml(
            opts,
            Some(&ops),
            "",
            &pipeline_toml(&name, &name, &opts.plugin(plugin), &extra),
        );
        let config = warren::config::Config::parse(&text, std::path::Path::new("."))?;
        let p = setup::pipeline(&config, &name)?.clone();
        amqp::declare_pipeline(conn, &p).await?;
        let queues = amqp::pipeline_queues(&p);
        let (guard, ops, file) = match sys {
            System::Warren => {
                let file = opts.work_dir.join(format!("{name}.toml"));
                std::fs::write(&file, &text)
                    .with_context(|| format!("writing {}", file.display()))?;
                let guard = ChildGuard::spawn(&opts.warren_cmd, &[file.display().to_string()])?;
                (guard, Some(format!("http://{ops}")), Some(file))
            }
            System::Baseline => {
                let mut args = vec![
                    "--url".to_string(),
                    opts.broker_url.clone(),
                    "--queue".into(),
                    name.clone(),
                    "--prefetch".into(),
                    opts.prefetch.to_string(),
                ];
                if hold {
                    args.push("--hold".into());
                }
                (
                    ChildGuard::spawn(&opts.raw_consumer_cmd, &args)?,
                    None,
                    None,
                )
            }
        };
        let mut child = Self {
            guard,
            queue: name,
            queues,
            ops,
            file,
        };
        child.wait_ready().await?;
        Ok(child)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + STARTUP;
        loop {
            self.guard.check_alive()?;
            let ready = match &self.ops {
                // Refused until the ops endpoint listens: not ready yet.
                Some(base) => matches!(
                    amqp::http_get(base, "/healthz/ready", None).await,
                    Ok((200, _))
                ),
                // The raw consumer has no health endpoint; give it a moment.
                None => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    true
                }
            };
            if ready {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "not ready within {STARTUP:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Median RSS over `n` samples.
    async fn rss_median(&mut self, n: usize) -> Result<f64> {
        let mut v = Vec::new();
        for _ in 0..n {
            self.guard.check_alive()?;
            v.push(self.guard.rss()? as f64);
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        Ok(median(&v))
    }

    async fn stop(self, conn: &Connection) -> Result<()> {
        drop(self.guard);
        amqp::delete_queues(conn, &self.queues).await?;
        if let Some(f) = self.file {
            let _ = std::fs::remove_file(f);
        }
        Ok(())
    }
}

async fn profile(opts: &Options, sys: System) -> Result<Profile> {
    let conn = amqp::connect(&opts.broker_url, "memory").await?;
    let body = amqp::body(opts.size);

    // Idle.
    let mut idle_child = Child::start(opts, &conn, sys, false).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = idle_child.rss_median(10).await?;
    let queue = idle_child.queue.clone();
    // Under load: a full backlog in the same queue, drained by a new process.
    drop(idle_child.guard);
    amqp::fill(&conn, &queue, opts.messages, &body).await?;
    let mut load_child =
        Child::start_on(opts, &conn, sys, idle_child.queues, idle_child.file, &queue).await?;
    let mut rss = Vec::new();
    let start = Instant::now();
    loop {
        load_child.guard.check_alive()?;
        let depth = u64::from(amqp::depth(&conn, &queue).await?);
        // Sample while the broker still has a backlog to push.
        if depth < opts.messages && depth > u64::from(opts.prefetch) {
            rss.push(load_child.guard.rss()? as f64);
        }
        if depth <= u64::from(opts.prefetch)
            || start.elapsed() > opts.duration + STARTUP
            || (rss.len() >= 20 && start.elapsed() > opts.duration)
        {
            break;
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    // One sample at the end of the drain, before the process goes: the memory
    // the drain grew is still resident then, however fast it went.
    load_child.guard.check_alive()?;
    rss.push(load_child.guard.rss()? as f64);
    let peak = load_child.guard.peak_rss()? as f64;
    load_child.stop(&conn).await?;
    let load = summarize(rss);

    // A full prefetch window held.
    let mut held_child = Child::start(opts, &conn, sys, true).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held_idle = held_child.rss_median(10).await?;
    let extra = 10;
    amqp::fill(
        &conn,
        &held_child.queue,
        u64::from(opts.prefetch) + extra,
        &body,
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    // The broker has handed out the whole window once only `extra` are ready.
    while u64::from(amqp::depth(&conn, &held_child.queue).await?) > extra {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the prefetch window never filled"
        );
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = held_child.rss_median(10).await?;
    held_child.stop(&conn).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(Profile {
        idle,
        load_p50: load.p50,
        load_max: load.max.max(peak),
        held_idle,
        held,
    })
}

impl Child {
    /// Start `sys` again on an existing queue (config file reused for warren).
    async fn start_on(
        opts: &Options,
        _conn: &Connection,
        sys: System,
        queues: Vec<String>,
        file: Option<std::path::PathBuf>,
        queue: &str,
    ) -> Result<Self> {
        let (guard, ops) = match (sys, &file) {
            (System::Warren, Some(f)) => {
                // Same file, same ops port: the previous process is gone.
                let text = std::fs::read_to_string(f)?;
                let port = text
                    .lines()
                    .find_map(|l| l.strip_prefix("listen = \""))
                    .and_then(|l| l.strip_suffix('"'))
                    .map(|a| format!("http://{a}"));
                (
                    ChildGuard::spawn(&opts.warren_cmd, &[f.display().to_string()])?,
                    port,
                )
            }
            _ => (
                ChildGuard::spawn(
                    &opts.raw_consumer_cmd,
                    &[
                        "--url".into(),
                        opts.broker_url.clone(),
                        "--queue".into(),
                        queue.to_string(),
                        "--prefetch".into(),
                        opts.prefetch.to_string(),
                    ],
                )?,
                None,
            ),
        };
        let mut child = Self {
            guard,
            queue: queue.to_string(),
            queues,
            ops,
            file,
        };
        child.wait_ready().await?;
        Ok(child)
    }
}
