//! Scenarios 1 and 2: draining a pre-filled durable queue of persistent
//! messages.
//!
//! 1. warren with the no-op plugin vs a raw lapin consumer that acks each
//!    message (with warren's ack batching).
//! 2. warren with `republish` (publish each body, confirmed, then ack) vs a raw
//!    lapin consumer doing consume -> publish -> confirm -> ack.
//!
//! Each run gets a fresh queue declared with warren's own topology code, filled
//! with `messages` messages before the consumer starts; the rate is taken over
//! the steady middle of the drain (see `stats::measure_rate`).
//!
//! Scenario 1 also drains the backlog (once per round, before the two
//! systems) with `instance = "reuse"`, to show what a fresh instance per
//! message costs on the no-op path, and with `noop_bare`, the same no-op built
//! for wasm32-unknown-unknown (no WASI imports), fresh instances, when it is
//! built.

use anyhow::Result;
use warren::disposition::Disposition;

use super::{System, baseline_rate, order, ratio_text, warren_rate};
use crate::report::{Goal, Row};
use crate::setup::{self, pipeline_toml, sizing, unique};
use crate::stats::{Rate, median};
use crate::{Options, amqp, baseline};

/// Run scenario 1 (`republish == false`) or 2.
pub async fn run(opts: &Options, republish: bool) -> Result<Vec<Row>> {
    let mut conn = amqp::connect(&opts.broker_url, "throughput").await?;
    let body = amqp::body(opts.size);
    let drain = Drain::new(opts, &conn, republish).await?;
    let (mut w, mut b) = (Vec::new(), Vec::new());
    let (mut reused, mut bare) = (Vec::new(), Vec::new());
    let variants: &[Variant] = match (republish, opts.plugin(BARE_NOOP).exists()) {
        (true, _) => &[],
        (false, true) => &[Variant::Reuse, Variant::Bare],
        (false, false) => {
            eprintln!("    {BARE_NOOP}: skipped, it is not built");
            &[Variant::Reuse]
        }
    };
    for round in 0..opts.rounds.max(1) {
        for &variant in variants {
            let rate = retried_once(opts, &mut conn, async |c| {
                drain.run_variant(opts, c, &body, variant).await
            })
            .await?;
            match variant {
                Variant::Reuse => reused.push(rate),
                Variant::Bare => bare.push(rate),
            }
        }
        for sys in order(round) {
            let rate = retried_once(opts, &mut conn, async |c| {
                drain.run(opts, c, &body, sys).await
            })
            .await?;
            match sys {
                System::Warren => w.push(rate),
                System::Baseline => b.push(rate),
            }
        }
    }
    drain.delete(&conn).await?;
    let _ = conn.close(200, "done".into()).await;
    let rate = |v: &[Rate]| median(&v.iter().map(|r| r.per_sec).collect::<Vec<_>>());
    let cpu = |v: &[Rate]| {
        median(
            &v.iter()
                .filter_map(|r| r.cpu_us_per_event)
                .collect::<Vec<_>>(),
        )
    };
    let (wr, br) = (rate(&w), rate(&b));
    let ratio = wr / br;
    let (scenario, metric) = if republish {
        ("2 publish", "republish, confirmed, then ack")
    } else {
        ("1 throughput", "no-op consume + ack")
    };
    let mut main = Row::new(scenario, metric, "msgs/s", wr)
        .baseline("raw lapin", br)
        .compare(ratio_text(ratio));
    if !republish {
        main = main.goal(Goal::new(">= 0.95x raw", ratio >= 0.95));
    }
    let (wc, bc) = (cpu(&w), cpu(&b));
    let cpu_row = Row::new(
        scenario,
        "CPU of the consuming process per message",
        "µs",
        wc,
    )
    .baseline("raw lapin", bc)
    .compare(format!("{:+.1} µs", wc - bc));
    let mut rows = vec![main, cpu_row];
    for (runs, drained, cpu_label) in [
        (
            &reused,
            "no-op consume + ack, instance = reuse",
            "CPU per message, instance = reuse",
        ),
        (
            &bare,
            "no-op without WASI imports (noop_bare) consume + ack",
            "CPU per message, noop_bare",
        ),
    ] {
        if runs.is_empty() {
            continue;
        }
        let (rr, rc) = (rate(runs), cpu(runs));
        rows.push(
            Row::new(scenario, drained, "msgs/s", rr)
                .baseline("raw lapin", br)
                .compare(ratio_text(rr / br)),
        );
        rows.push(
            Row::new(scenario, cpu_label, "µs", rc)
                .baseline("raw lapin", bc)
                .compare(format!("{:+.1} µs", rc - bc)),
        );
    }
    Ok(rows)
}

/// The no-op built for wasm32-unknown-unknown by `scripts/build-plugins.sh`.
pub(crate) const BARE_NOOP: &str = "noop_bare";

/// A drain by warren besides the main comparison (scenario 1 only).
#[derive(Clone, Copy)]
pub(crate) enum Variant {
    /// `instance = "reuse"`.
    Reuse,
    /// [`BARE_NOOP`] instead of `noop`, a fresh instance per message.
    Bare,
}

/// `run` on `conn`, and once more after a failure: say so, wait a moment and
/// reconnect if needed. RabbitMQ 3.10 occasionally drops connections with
/// INTERNAL_ERROR when its quorum-queue segment writer trips over a deleted
/// queue; one bad moment of the broker should not sink the whole run.
pub(crate) async fn retried_once<T>(
    opts: &Options,
    conn: &mut lapin::Connection,
    mut run: impl AsyncFnMut(&lapin::Connection) -> Result<T>,
) -> Result<T> {
    match run(conn).await {
        Ok(t) => Ok(t),
        Err(e) => {
            eprintln!("    a run failed ({e:#}); retrying it once");
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            if !conn.status().connected() {
                *conn = amqp::connect(&opts.broker_url, "throughput").await?;
            }
            run(conn).await
        }
    }
}

/// The queue(s) of a throughput scenario, reused by all its runs: purged and
/// refilled before each, deleted once at the end (fewer quorum-queue
/// deletions of large logs, which RabbitMQ 3.10 handles poorly).
pub(crate) struct Drain {
    name: String,
    config: warren::config::Config,
    queues: Vec<String>,
    out: String,
    republish: bool,
}

impl Drain {
    /// Declare the queue (with warren's own declarations) and, for
    /// republishing, the output queue.
    pub(crate) async fn new(
        opts: &Options,
        conn: &lapin::Connection,
        republish: bool,
    ) -> Result<Self> {
        let name = unique(if republish { "publish" } else { "noop" });
        let plugin = opts.plugin(if republish { "republish" } else { "noop" });
        let config = setup::config(opts, &pipeline_toml(&name, &name, &plugin, &sizing(opts)))?;
        let p = setup::pipeline(&config, &name)?.clone();
        let out = format!("{name}.out");
        amqp::declare_pipeline(conn, &p).await?;
        if republish {
            amqp::declare_classic(conn, &out).await?;
        }
        let mut queues = amqp::pipeline_queues(&p);
        queues.push(out.clone());
        Ok(Self {
            name,
            config,
            queues,
            out,
            republish,
        })
    }

    /// One drain of the refilled queue by `sys`.
    pub(crate) async fn run(
        &self,
        opts: &Options,
        conn: &lapin::Connection,
        body: &[u8],
        sys: System,
    ) -> Result<Rate> {
        let name = &self.name;
        amqp::purge(conn, name).await?;
        if self.republish {
            amqp::purge(conn, &self.out).await?;
        }
        amqp::fill(conn, name, opts.messages, body).await?;
        let total = opts.messages;
        match sys {
            System::Warren => {
                let d = if self.republish {
                    Disposition::Publish
                } else {
                    Disposition::Ack
                };
                warren_rate(opts, self.config.clone(), name, d, total).await
            }
            System::Baseline => {
                let (queue, prefetch) = (name.clone(), opts.prefetch);
                if self.republish {
                    let forward = baseline::republish_to(&self.out);
                    baseline_rate(opts, total, move |c, acked, stop| async move {
                        baseline::consume_forward(&c, &queue, prefetch, acked, stop, forward).await
                    })
                    .await
                } else {
                    baseline_rate(opts, total, move |c, acked, stop| async move {
                        baseline::consume_ack(&c, &queue, prefetch, acked, stop).await
                    })
                    .await
                }
            }
        }
    }

    /// One drain by warren as `variant` (no-op only).
    pub(crate) async fn run_variant(
        &self,
        opts: &Options,
        conn: &lapin::Connection,
        body: &[u8],
        variant: Variant,
    ) -> Result<Rate> {
        amqp::purge(conn, &self.name).await?;
        amqp::fill(conn, &self.name, opts.messages, body).await?;
        let mut config = self.config.clone();
        for p in &mut config.pipelines {
            match variant {
                Variant::Reuse => p.instance = warren::config::InstanceMode::Reuse,
                Variant::Bare => p.plugin = opts.plugin(BARE_NOOP),
            }
        }
        warren_rate(opts, config, &self.name, Disposition::Ack, opts.messages).await
    }

    /// Delete the scenario's queues.
    pub(crate) async fn delete(self, conn: &lapin::Connection) -> Result<()> {
        amqp::delete_queues(conn, &self.queues).await
    }
}
