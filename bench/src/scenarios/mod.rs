//! The scenarios, one module each, plus what several of them share: draining
//! a pre-filled queue with warren or with a baseline and measuring the rate.

pub mod http;
pub mod isolation;
pub mod memory;
pub mod overhead;
pub mod peers;
pub mod polyglot;
pub mod reload;
pub mod rpc;
pub mod throughput;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use warren::config::Config;
use warren::disposition::Disposition;

use crate::stats::{self, Rate};
use crate::{Options, amqp};

/// How long a system may take to process its first message.
pub const STARTUP: Duration = Duration::from_secs(60);

/// Start warren with `config` and measure how fast pipeline `name` settles
/// deliveries with disposition `d`, out of `total` pre-filled messages.
pub async fn warren_rate(
    opts: &Options,
    config: Config,
    name: &str,
    d: Disposition,
    total: u64,
) -> Result<Rate> {
    let before = stats::thread_cpu_ticks();
    let running = warren::start(config).await?;
    let m = running
        .metrics()
        .pipeline(name)
        .context("warren has no metrics for the pipeline")?;
    let rate = stats::measure_rate(|| m.outcome_count(d), total, opts.duration, STARTUP).await;
    report_threads("warren", &before, m.outcome_count(d));
    running.shutdown().await;
    rate
}

/// Run a baseline consumer (`consume(conn, acked, stop)`) on its own
/// connection and measure how fast it acks, out of `total` messages.
pub async fn baseline_rate<F, Fut>(opts: &Options, total: u64, consume: F) -> Result<Rate>
where
    F: FnOnce(lapin::Connection, Arc<AtomicU64>, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let before = stats::thread_cpu_ticks();
    let conn = amqp::connect(&opts.broker_url, "baseline").await?;
    let acked = Arc::new(AtomicU64::new(0));
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(consume(conn, acked.clone(), stop_rx));
    let rate = stats::measure_rate(
        || acked.load(Ordering::Relaxed),
        total,
        opts.duration,
        STARTUP,
    )
    .await;
    report_threads("baseline", &before, acked.load(Ordering::Relaxed));
    let _ = stop.send(true);
    let finished = task.await.context("the baseline task panicked")?;
    match (rate, finished) {
        (Ok(r), _) => Ok(r),
        (Err(e), Err(why)) => Err(e.context(format!("the baseline failed: {why:#}"))),
        (Err(e), Ok(())) => Err(e),
    }
}

/// With `WARREN_BENCH_THREADS` set, print CPU µs per message by thread name
/// since `before` (a profiling aid; not part of the table).
fn report_threads(what: &str, before: &[(u32, String, u64)], messages: u64) {
    if std::env::var_os("WARREN_BENCH_THREADS").is_none() || messages == 0 {
        return;
    }
    let diff = stats::thread_cpu_diff(before, &stats::thread_cpu_ticks());
    let parts: Vec<String> = diff
        .iter()
        .filter(|(_, ms)| *ms > 0.0)
        .map(|(n, ms)| format!("{n}={:.1}", ms * 1e3 / messages as f64))
        .collect();
    eprintln!("    {what}: CPU µs/msg by thread: {}", parts.join(" "));
}

/// Which system a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Warren,
    Baseline,
}

/// The order of the systems in `round`: alternating, so slow drift of the
/// machine's load does not favour one of them.
pub fn order(round: usize) -> [System; 2] {
    if round.is_multiple_of(2) {
        [System::Baseline, System::Warren]
    } else {
        [System::Warren, System::Baseline]
    }
}

/// A value from Prometheus text: the line starting with `series` (name and
/// labels exactly as rendered).
pub fn prom_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
}

/// `ratio` as text, e.g. `0.97x`.
pub fn ratio_text(ratio: f64) -> String {
    format!("{ratio:.3}x")
}

/// Microseconds in a duration, as f64.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
