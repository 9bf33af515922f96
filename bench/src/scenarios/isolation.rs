//! Scenario 6: isolation between pipelines of one warren process.
//!
//! A healthy no-op pipeline drains a pre-filled queue
//! * alone (its neighbour pipeline, running `spin`, has nothing to do);
//! * while the neighbour gets only messages whose plugin loops until its
//!   timeout, with `neighbour_concurrency` calls at a time;
//! * as a control, alone again while the same number of plain busy-looping
//!   threads outside warren burn CPU: what the neighbour costs through the
//!   CPU alone, whatever host ran it.
//!
//! Then: how long after its deadline a looping plugin is stopped, from warren's
//! own timing of the neighbour's calls and from direct calls with every core
//! busy.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use warren::disposition::Disposition;
use warren::runtime::{InvokeLimits, Message};

use super::{STARTUP, micros, prom_value, ratio_text};
use crate::report::{Goal, Row};
use crate::setup::{self, pipeline_toml, sizing, unique};
use crate::stats::{self, median, summarize};
use crate::{Options, amqp};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Neighbour {
    Idle,
    Looping,
    BusyThreads,
}

pub async fn run(opts: &Options) -> Result<Vec<Row>> {
    let (mut alone, mut looping, mut burner) = (Vec::new(), Vec::new(), Vec::new());
    let mut lateness_ms = Vec::new();
    let mut conn = amqp::connect(&opts.broker_url, "isolation").await?;
    let setup = Setup::new(opts, &conn).await?;
    for round in 0..opts.rounds.max(1) {
        let mut kinds = [Neighbour::Idle, Neighbour::Looping, Neighbour::BusyThreads];
        kinds.rotate_left(round % 3);
        for k in kinds {
            let (rate, late) = super::throughput::retried_once(opts, &mut conn, async |c| {
                one(opts, c, &setup, k).await
            })
            .await?;
            match k {
                Neighbour::Idle => alone.push(rate),
                Neighbour::Looping => {
                    looping.push(rate);
                    lateness_ms.extend(late);
                }
                Neighbour::BusyThreads => burner.push(rate),
            }
        }
    }
    amqp::delete_queues(&conn, &setup.queues).await?;
    let _ = conn.close(200, "done".into()).await;
    let (a, l, c) = (median(&alone), median(&looping), median(&burner));
    let direct = direct_lateness(opts).await?;
    let in_run = if lateness_ms.is_empty() {
        f64::NAN
    } else {
        median(&lateness_ms)
    };
    let n = opts.neighbour_concurrency;
    let t = opts.neighbour_timeout.as_millis();
    Ok(vec![
        Row::new(
            "6 isolation",
            &format!("healthy no-op, neighbour looping ({n} at a time, {t} ms timeout)"),
            "msgs/s",
            l,
        )
        .baseline("alone", a)
        .compare(ratio_text(l / a))
        .goal(Goal::new(">= 0.95x alone", l / a >= 0.95)),
        Row::new(
            "6 isolation",
            &format!("control: healthy no-op next to {n} busy threads outside warren"),
            "msgs/s",
            c,
        )
        .baseline("alone", a)
        .compare(ratio_text(c / a)),
        Row::new(
            "6 isolation",
            "looping plugin stopped after its deadline (in the run above, mean)",
            "ms",
            in_run,
        )
        .goal(Goal::new("<= 20 ms", in_run <= 20.0)),
        Row::new(
            "6 isolation",
            &format!(
                "looping plugin stopped after its deadline ({} at once, all cores busy) p50",
                direct.cpus
            ),
            "ms",
            direct.p50,
        ),
        Row::new(
            "6 isolation",
            &format!(
                "looping plugin stopped after its deadline ({} at once, all cores busy) max",
                direct.cpus
            ),
            "ms",
            direct.max,
        )
        .goal(Goal::new("<= 20 ms", direct.max <= 20.0)),
    ])
}

/// The two pipelines and their queues, reused by every run (purged and
/// refilled before each; deleted once at the end).
struct Setup {
    healthy: String,
    looping: String,
    config: warren::config::Config,
    queues: Vec<String>,
}

impl Setup {
    async fn new(opts: &Options, conn: &lapin::Connection) -> Result<Self> {
        let (h, s) = (unique("healthy"), unique("looping"));
        let nc = opts.neighbour_concurrency.max(1);
        let looping_extra = format!(
            "queue_type = {:?}\nprefetch = {}\nconcurrency = {nc}\n\
             [pipeline.retry]\nmax_attempts = 1\n\
             [pipeline.limits]\ntimeout_ms = {}\n",
            opts.queue_type,
            nc * 2,
            opts.neighbour_timeout.as_millis().max(1),
        );
        let pipelines = format!(
            "{}{}",
            pipeline_toml(&h, &h, &opts.plugin("noop"), &sizing(opts)),
            pipeline_toml(&s, &s, &opts.plugin("spin"), &looping_extra)
        );
        let config = setup::config(opts, &pipelines)?;
        let mut queues = Vec::new();
        for name in [&h, &s] {
            let p = setup::pipeline(&config, name)?;
            amqp::declare_pipeline(conn, p).await?;
            queues.extend(amqp::pipeline_queues(p));
        }
        Ok(Self {
            healthy: h,
            looping: s,
            config,
            queues,
        })
    }
}

/// One run: the healthy pipeline's rate, and (for a looping neighbour) the
/// neighbour's mean lateness past its deadline in ms.
async fn one(
    opts: &Options,
    conn: &lapin::Connection,
    setup: &Setup,
    k: Neighbour,
) -> Result<(f64, Option<f64>)> {
    let (h, s) = (&setup.healthy, &setup.looping);
    let timeout_ms = opts.neighbour_timeout.as_millis().max(1);
    let nc = opts.neighbour_concurrency.max(1);
    amqp::purge(conn, h).await?;
    amqp::purge(conn, s).await?;
    amqp::fill(conn, h, opts.messages, &amqp::body(opts.size)).await?;
    if k == Neighbour::Looping {
        // Enough to keep every neighbour slot looping for the whole run.
        let run = opts.duration + STARTUP.min(Duration::from_secs(10));
        let per_slot = run.as_millis() / timeout_ms + 2;
        let n = u64::try_from(per_slot).unwrap_or(u64::MAX) * nc as u64 + 2 * nc as u64;
        amqp::fill(conn, s, n, b"loop").await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let burners: Vec<_> = if k == Neighbour::BusyThreads {
        (0..nc)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = black_box(x.wrapping_add(1));
                    }
                })
            })
            .collect()
    } else {
        Vec::new()
    };

    let result = async {
        let running = warren::start(setup.config.clone()).await?;
        let m = running
            .metrics()
            .pipeline(h)
            .context("no metrics for the healthy pipeline")?;
        let rate = stats::measure_rate(
            || m.outcome_count(Disposition::Ack),
            opts.messages,
            opts.duration,
            STARTUP,
        )
        .await;
        let text = running.metrics().render();
        running.shutdown().await;
        let late = if k == Neighbour::Looping {
            let label = format!("{{pipeline=\"{s}\"}}");
            let sum = prom_value(&text, &format!("warren_handle_seconds_sum{label}"));
            let count = prom_value(&text, &format!("warren_handle_seconds_count{label}"));
            match (sum, count) {
                (Some(sum), Some(count)) if count > 0.0 => {
                    Some((sum / count) * 1e3 - timeout_ms as f64)
                }
                _ => None,
            }
        } else {
            None
        };
        anyhow::Ok((rate?.per_sec, late))
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    for b in burners {
        let _ = b.join();
    }
    result
}

struct Direct {
    cpus: usize,
    p50: f64,
    max: f64,
}

/// Call `spin` directly with the neighbour's timeout on one thread per CPU at
/// once (the worst case for the thread that must notice its deadline), a few
/// times each; lateness past the deadline in ms.
async fn direct_lateness(opts: &Options) -> Result<Direct> {
    let config = setup::config(
        opts,
        &pipeline_toml("lateness", "bench.lateness", &opts.plugin("spin"), ""),
    )?;
    let loader = warren::plugin_loader(&config)?;
    let path = opts.plugin("spin");
    let plugin = Arc::new(
        tokio::task::spawn_blocking(move || loader.load(&path))
            .await
            .context("loading thread panicked")??,
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let timeout = opts.neighbour_timeout;
    let calls = 5;
    let mut threads = Vec::new();
    for _ in 0..cpus {
        let plugin = plugin.clone();
        threads.push(std::thread::spawn(move || {
            let msg = Message {
                body: b"loop".to_vec(),
                content_type: None,
                exchange: "".into(),
                routing_key: "bench.lateness".into(),
                queue: "bench.lateness".into(),
                headers: vec![],
                message_id: None,
                correlation_id: None,
                reply_to: None,
                attempt: 1,
            };
            let limits = InvokeLimits::new(timeout, 64 << 20);
            let mut late = Vec::new();
            for _ in 0..calls {
                let start = Instant::now();
                let inv = plugin.invoke(&msg, Arc::new(BTreeMap::new()), "lateness".into(), limits);
                let took = start.elapsed();
                if inv.result.is_ok() {
                    return Err(anyhow::anyhow!("spin returned instead of timing out"));
                }
                late.push((micros(took) - micros(timeout)) / 1e3);
            }
            Ok(late)
        }));
    }
    let mut all = Vec::new();
    for t in threads {
        let late = tokio::task::spawn_blocking(move || t.join())
            .await
            .context("join")?
            .map_err(|_| anyhow::anyhow!("a lateness thread panicked"))??;
        all.extend(late);
    }
    let s = summarize(all);
    Ok(Direct {
        cpus,
        p50: s.p50,
        max: s.max,
    })
}
