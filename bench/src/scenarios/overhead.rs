//! Scenario 4: the host's cost per message without the broker: instantiate +
//! call + drop, exactly what warren does for each delivery, for the no-op
//! plugin and for `thumbnail` on a fixed 640x400 PNG (to show that real plugin
//! work dominates).
//!
//! For scale, the same cycle for the smallest possible component (one core
//! module with one memory page and no imports) on warren's own engine: the
//! floor of a fresh wasmtime instance per message on this machine, which no
//! plugin can go below.
//!
//! Then the steady-state cost of one message for each language's example
//! (`fib`, `js_router`, `py_classifier`, `c_checksum`), as in a running
//! warren: thousands of calls in one process, with a fresh instance per call
//! and with `instance = "reuse"` (the call alone; the instance is kept).

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
    let bare_path = opts.plugin(super::throughput::BARE_NOOP);
    let (noop, bare, thumb, floor) = tokio::task::spawn_blocking(move || {
        let floor = floor(loader.runtime().engine(), budget)?;
        let noop = loader.load(&noop_path)?;
        let thumb = loader.load(&thumb_path)?;
        let acked = |o: &Outcome| matches!(o, Outcome::Ack);
        let n = measure(&noop, message(amqp::body(size)), budget, WARMUP, 1, acked)?;
        let bare = if bare_path.exists() {
            let bare = loader.load(&bare_path)?;
            Some(measure(
                &bare,
                message(amqp::body(size)),
                budget,
                WARMUP,
                1,
                acked,
            )?)
        } else {
            eprintln!("    {}: skipped, it is not built", bare_path.display());
            None
        };
        let t = measure(
            &thumb,
            message(png()?),
            budget,
            3,
            1,
            |o| matches!(o, Outcome::Publish(v) if v.len() == 1),
        )?;
        anyhow::Ok((n, bare, t, floor))
    })
    .await
    .context("the measuring thread panicked")??;
    let share = noop.p50 / thumb.p50 * 100.0;
    let mut rows = vec![
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
    ];
    if let Some(bare) = bare {
        let over = bare.p50 - floor.p50;
        rows.push(
            Row::new(
                "4 overhead",
                "no-op without WASI imports (noop_bare), same cycle, p50",
                "µs",
                bare.p50,
            )
            .compare(format!("floor + {over:.2} µs"))
            .goal(Goal::new("<= floor + 2 µs", over <= 2.0)),
        );
    }
    rows.extend([
        Row::new("4 overhead", "thumbnail 640x400 PNG p50", "µs", thumb.p50)
            .compare(format!("no-op = {share:.2}% of it")),
        Row::new("4 overhead", "thumbnail 640x400 PNG p99", "µs", thumb.p99),
    ]);
    rows.extend(languages(opts, &config).await?);
    Ok(rows)
}

/// The example of each language and an input that takes its normal path.
fn examples(size: usize) -> [(&'static str, &'static str, Vec<u8>); 4] {
    [
        ("Rust", "fib", b"30".to_vec()),
        (
            "JavaScript",
            "js_router",
            super::polyglot::EVENT.as_bytes().to_vec(),
        ),
        (
            "Python",
            "py_classifier",
            super::polyglot::TICKET.as_bytes().to_vec(),
        ),
        ("C", "c_checksum", amqp::body(size)),
    ]
}

/// Steady-state µs per message of each built example, fresh and reused.
async fn languages(opts: &Options, config: &warren::config::Config) -> Result<Vec<Row>> {
    let loader = warren::plugin_loader(config)?;
    let budget = opts.duration / 4;
    let mut rows = Vec::new();
    for (language, name, body) in examples(opts.size) {
        let path = opts.plugin(name);
        if !path.exists() {
            eprintln!("    {name}: skipped, {} is not built", path.display());
            continue;
        }
        let loader = loader.clone();
        let (fresh, reused) = tokio::task::spawn_blocking(move || {
            let plugin = loader.load(&path)?;
            let good = |o: &Outcome| !matches!(o, Outcome::DeadLetter(_));
            let fresh = measure(&plugin, message(body.clone()), budget, 20, 1, good)?;
            let reused = measure(&plugin, message(body), budget, 20, 1000, good)?;
            anyhow::Ok((fresh, reused))
        })
        .await
        .context("the measuring thread panicked")??;
        rows.push(
            Row::new(
                "4 overhead",
                &format!("{name} ({language}) per message, fresh instance, p50"),
                "µs",
                fresh.p50,
            )
            .compare(format!("p99 {:.0} µs", fresh.p99)),
        );
        rows.push(
            Row::new(
                "4 overhead",
                &format!("{name} ({language}) per message, instance = reuse, p50"),
                "µs",
                reused.p50,
            )
            .compare(format!(
                "p99 {:.0} µs; {:.1}x faster than fresh",
                reused.p99,
                fresh.p50 / reused.p50
            )),
        );
    }
    Ok(rows)
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

/// Call `plugin` on `msg` repeatedly for up to `budget`; per-call µs. With
/// `messages_per_instance` above 1 an instance serves that many calls
/// (`instance = "reuse"`).
fn measure(
    plugin: &LoadedPlugin,
    msg: Message,
    budget: Duration,
    warmup: usize,
    messages_per_instance: u32,
    ok: impl Fn(&Outcome) -> bool,
) -> Result<Summary> {
    let config = Arc::new(BTreeMap::new());
    let pipeline: Arc<str> = "overhead".into();
    let mut limits = InvokeLimits::new(Duration::from_secs(5), 64 << 20);
    limits.messages_per_instance = messages_per_instance;
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
