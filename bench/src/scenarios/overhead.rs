//! Scenario 4: the host's cost per message without the broker: instantiate +
//! call + drop, exactly what warren does for each delivery, for the no-op
//! plugin and for `thumbnail` on a fixed 640x400 PNG (to show that real plugin
//! work dominates).
//!
//! For scale, the same cycle for the smallest possible component (one core
//! module with one memory page and no imports) on warren's own engine: the
//! floor of a fresh wasmtime instance per message on this machine, which no
//! plugin can go below.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use warren::plugins::LoadedPlugin;
use warren::runtime::{InvokeLimits, Message, Outcome};

use super::micros;
use crate::report::{Goal, Row};
use crate::setup::{self, pipeline_toml};
use crate::stats::{Summary, summarize};
use crate::{Options, amqp};

/// No-op calls made before measuring (pool slots, caches, branch predictors).
const WARMUP: usize = 2_000;
/// Most calls measured per plugin.
const MAX_CALLS: usize = 200_000;

pub async fn run(opts: &Options) -> Result<Vec<Row>> {
    let config = setup::config(
        opts,
        &pipeline_toml("overhead", "bench.overhead", &opts.plugin("noop"), ""),
    )?;
    let loader = warren::plugin_loader(&config)?;
    let (noop_path, thumb_path) = (opts.plugin("noop"), opts.plugin("thumbnail"));
    let budget = opts.duration / 2;
    let size = opts.size;
    let (noop, thumb, floor) = tokio::task::spawn_blocking(move || {
        let floor = floor(loader.runtime().engine(), budget)?;
        let noop = loader.load(&noop_path)?;
        let thumb = loader.load(&thumb_path)?;
        let n = measure(&noop, message(amqp::body(size)), budget, WARMUP, |o| {
            matches!(o, Outcome::Ack)
        })?;
        let t = measure(
            &thumb,
            message(png()?),
            budget,
            3,
            |o| matches!(o, Outcome::Publish(v) if v.len() == 1),
        )?;
        anyhow::Ok((n, t, floor))
    })
    .await
    .context("the measuring thread panicked")??;
    let share = noop.p50 / thumb.p50 * 100.0;
    Ok(vec![
        Row::new(
            "4 overhead",
            "no-op instantiate + call + drop p50",
            "µs",
            noop.p50,
        )
        .goal(Goal::new("<= 5 µs", noop.p50 <= 5.0)),
        Row::new(
            "4 overhead",
            "no-op instantiate + call + drop p99",
            "µs",
            noop.p99,
        ),
        Row::new(
            "4 overhead",
            "floor: smallest component, same cycle, p50",
            "µs",
            floor.p50,
        )
        .compare(format!("no-op = floor + {:.2} µs", noop.p50 - floor.p50)),
        Row::new("4 overhead", "thumbnail 640x400 PNG p50", "µs", thumb.p50)
            .compare(format!("no-op = {share:.2}% of it")),
        Row::new("4 overhead", "thumbnail 640x400 PNG p99", "µs", thumb.p99),
    ])
}

/// The smallest component worth the name: no imports, one memory page, one
/// exported function returning a number.
const FLOOR_WAT: &str = r#"(component
  (core module $m
    (memory (export "memory") 1)
    (func (export "run") (result i32) i32.const 0))
  (core instance $i (instantiate $m))
  (func (export "run") (result u32) (canon lift (core func $i "run"))))"#;

/// Store + instantiate + call + drop of [`FLOOR_WAT`] on `engine`, per call µs.
fn floor(engine: &wasmtime::Engine, budget: Duration) -> Result<Summary> {
    use wasmtime::component::{Component, Linker};
    let component = Component::new(engine, FLOOR_WAT)
        .map_err(anyhow::Error::from)
        .context("compiling the floor component")?;
    let pre = Linker::<()>::new(engine)
        .instantiate_pre(&component)
        .map_err(anyhow::Error::from)
        .context("preparing the floor component")?;
    let once = || -> Result<u32> {
        let mut store = wasmtime::Store::new(engine, ());
        // warren's engine interrupts by epoch; a store starts at deadline 0.
        store.set_epoch_deadline(1_000_000);
        let instance = pre.instantiate(&mut store).map_err(anyhow::Error::from)?;
        let run = instance
            .get_typed_func::<(), (u32,)>(&mut store, "run")
            .map_err(anyhow::Error::from)?;
        let (n,) = run.call(&mut store, ()).map_err(anyhow::Error::from)?;
        Ok(n)
    };
    for _ in 0..WARMUP {
        once()?;
    }
    let mut samples = Vec::new();
    let end = Instant::now() + budget;
    while samples.len() < MAX_CALLS && (Instant::now() < end || samples.len() < 10) {
        let start = Instant::now();
        let n = once()?;
        let took = start.elapsed();
        if n != 0 {
            bail!("the floor component returned {n}");
        }
        samples.push(micros(took));
    }
    Ok(summarize(samples))
}

/// A message as warren builds it from a delivery.
fn message(body: Vec<u8>) -> Message {
    Message {
        body,
        content_type: None,
        exchange: "".into(),
        routing_key: "bench.overhead".into(),
        queue: "bench.overhead".into(),
        headers: vec![],
        message_id: None,
        correlation_id: None,
        reply_to: None,
        attempt: 1,
    }
}

/// The fixed test image: a 640x400 RGB gradient, PNG-encoded.
pub fn png() -> Result<Vec<u8>> {
    let img = image::RgbImage::from_fn(640, 400, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .context("encoding the test image")?;
    Ok(out.into_inner())
}

/// Call `plugin` on `msg` repeatedly for up to `budget`; per-call µs.
fn measure(
    plugin: &LoadedPlugin,
    msg: Message,
    budget: Duration,
    warmup: usize,
    ok: impl Fn(&Outcome) -> bool,
) -> Result<Summary> {
    let config = Arc::new(BTreeMap::new());
    let pipeline: Arc<str> = "overhead".into();
    let limits = InvokeLimits::new(Duration::from_secs(5), 64 << 20);
    for _ in 0..warmup {
        let inv = plugin.invoke(&msg, config.clone(), pipeline.clone(), limits);
        match &inv.result {
            Ok(o) if ok(o) => {}
            other => bail!("{} gave an unexpected result: {other:?}", plugin.name()),
        }
    }
    let mut samples = Vec::new();
    let end = Instant::now() + budget;
    while samples.len() < MAX_CALLS && (Instant::now() < end || samples.len() < 10) {
        let start = Instant::now();
        let inv = plugin.invoke(&msg, config.clone(), pipeline.clone(), limits);
        let good = matches!(&inv.result, Ok(o) if ok(o));
        // Releasing the instance is part of the cost, wherever warren does it.
        drop(inv);
        let took = start.elapsed();
        if !good {
            bail!("{} failed during measurement", plugin.name());
        }
        samples.push(micros(took));
    }
    Ok(summarize(samples))
}
