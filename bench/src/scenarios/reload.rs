//! Hot reload: the time from replacing a plugin file (a rename over it, as
//! deploy tools do) to the first message handled by the new version, for the
//! small Rust plugins `tag_a` / `tag_b` (which stamp `x-tag: a|b` on what they
//! publish), with and without the compiled cache.
//!
//! Messages flow through the pipeline steadily (about one per millisecond), so
//! the first one handled after the swap shows up within about a millisecond;
//! the time is taken when its output reaches our consumer, so it includes one
//! publish-and-deliver hop. "With the cache" means the new version's compiled
//! code is in the cache (built before by `warren check`, another instance
//! sharing the directory, or an earlier deploy of the same file); a file never
//! seen before is always compiled.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use tokio::sync::{mpsc, watch};

use crate::baseline::stopped;
use crate::report::{Goal, Row};
use crate::setup::{self, toml_path, unique};
use crate::stats::summarize;
use crate::{Options, amqp};

pub async fn run(opts: &Options) -> Result<Vec<Row>> {
    let with = summarize(measure(opts, true).await?);
    let without = summarize(measure(opts, false).await?);
    let n = with.n;
    Ok(vec![
        Row::new(
            "8 reload",
            &format!("file replaced -> first message on new version, cached, p50 of {n}"),
            "ms",
            with.p50,
        )
        .goal(Goal::new("< 50 ms", with.p50 < 50.0)),
        Row::new("8 reload", "same, cached, max", "ms", with.max),
        Row::new(
            "8 reload",
            &format!("same, compiled (cache = false), p50 of {}", without.n),
            "ms",
            without.p50,
        ),
        Row::new("8 reload", "same, compiled, max", "ms", without.max),
    ])
}

/// Swap `tag_a` <-> `tag_b` `opts.reloads` times; milliseconds per swap.
async fn measure(opts: &Options, cache: bool) -> Result<Vec<f64>> {
    let name = unique("reload");
    let dir = opts.work_dir.join(&name);
    let stage = opts.work_dir.join(format!("{name}.stage"));
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(&stage)?;
    let file = dir.join("handler.wasm");
    std::fs::copy(opts.plugin("tag_a"), &file).context("copying tag_a")?;
    let runtime = if cache {
        format!(
            "cache_dir = {}\n",
            toml_path(&opts.work_dir.join("reload-cache"))
        )
    } else {
        "cache = false\n".to_string()
    };
    let pipeline = format!(
        "[[pipeline]]\nname = {name:?}\nqueue = {name:?}\nplugin = {}\nreload = true\n\
         queue_type = {:?}\nprefetch = 64\nconcurrency = {}\n\
         [[pipeline.output]]\nqueues = [{:?}]\n",
        toml_path(&file),
        opts.queue_type,
        opts.concurrency,
        format!("{name}.out")
    );
    let text = setup::config_toml(opts, None, &runtime, &pipeline);
    let config = warren::config::Config::parse(&text, std::path::Path::new("."))?;
    if cache {
        // Both versions were deployed (or checked) before on this machine.
        let loader = warren::plugin_loader(&config)?;
        let (a, b) = (opts.plugin("tag_a"), opts.plugin("tag_b"));
        tokio::task::spawn_blocking(move || {
            loader.load(&a)?;
            loader.load(&b)
        })
        .await
        .context("prewarming thread panicked")??;
    }
    let p = setup::pipeline(&config, &name)?.clone();
    let out = format!("{name}.out");
    let conn = amqp::connect(&opts.broker_url, "reload").await?;
    amqp::declare_pipeline(&conn, &p).await?;
    amqp::declare_classic(&conn, &out).await?;

    let running = warren::start(config).await?;
    running.wait_ready(Duration::from_secs(60)).await?;

    // Outputs: (arrival time, tag).
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, String)>();
    let ch = conn.create_channel().await?;
    let mut outputs = ch
        .basic_consume(
            out.as_str().into(),
            "reload-outputs".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let reader = tokio::spawn(async move {
        while let Some(Ok(d)) = outputs.next().await {
            let now = Instant::now();
            let tag = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-tag").map(warren::envelope::value_text))
                .unwrap_or_default();
            if tx.send((now, tag)).is_err() {
                break;
            }
        }
    });
    // Input: one message per millisecond.
    let (stop, mut stop_rx) = watch::channel(false);
    let feed_ch = conn.create_channel().await?;
    let queue = name.clone();
    let feeder = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = stopped(&mut stop_rx) => break,
                _ = tick.tick() => {
                    let r = feed_ch
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions::default(),
                            b"reload",
                            BasicProperties::default(),
                        )
                        .await;
                    if r.is_err() {
                        break;
                    }
                }
            }
        }
    });

    let result = async {
        let mut times = Vec::new();
        let mut current = "a";
        for i in 0..opts.reloads.max(1) {
            let next = if i % 2 == 0 { "b" } else { "a" };
            let staged = stage.join("handler.wasm");
            std::fs::copy(opts.plugin(&format!("tag_{next}")), &staged)?;
            // Steady state on the current version first.
            wait_tag(&mut rx, current, None).await?;
            tokio::time::sleep(Duration::from_millis(150)).await;
            while rx.try_recv().is_ok() {}
            let t0 = Instant::now();
            std::fs::rename(&staged, &file).context("replacing the plugin file")?;
            let at = wait_tag(&mut rx, next, Some(t0)).await?;
            times.push((at - t0).as_secs_f64() * 1e3);
            current = next;
        }
        anyhow::Ok(times)
    }
    .await;

    let _ = stop.send(true);
    let _ = feeder.await;
    running.shutdown().await;
    reader.abort();
    let mut queues = amqp::pipeline_queues(&p);
    queues.push(out);
    amqp::delete_queues(&conn, &queues).await?;
    let _ = conn.close(200, "done".into()).await;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&stage);
    result
}

/// Wait for an output tagged `tag` (arriving after `after`, if given).
async fn wait_tag(
    rx: &mut mpsc::UnboundedReceiver<(Instant, String)>,
    tag: &str,
    after: Option<Instant>,
) -> Result<Instant> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .with_context(|| format!("no output tagged {tag:?} within 60 s"))?;
        let Some((at, t)) = got else {
            bail!("the output consumer stopped");
        };
        if t == tag && after.is_none_or(|a| at >= a) {
            return Ok(at);
        }
    }
}
