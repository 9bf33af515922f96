//! warren runs WebAssembly components ("plugins") as RabbitMQ message handlers.
//!
//! Each `[[pipeline]]` in the configuration binds one queue to one plugin. For
//! every delivery warren instantiates the plugin afresh (or, with `instance =
//! "reuse"`, takes an idle instance of the pipeline's), calls
//! `warren:plugin/handler.handle`, and turns the typed outcome into broker
//! actions with at-least-once guarantees (see [`disposition`]).
//!
//! [`run`] is the whole program as a function: tests and embedders call it with
//! their own configuration and shutdown signal; the CLI is a thin wrapper.
//!
//! # Layout
//!
//! From the bottom up: a module uses only modules above it in this list
//! (there are no dependency cycles), and each keeps the state it reports
//! (`PluginStatus`, `DownstreamMetrics`, `HttpMetrics`) for `ops` to read.
//! The linked modules are public for the CLI, the integration tests and the
//! benchmarks (configuration, plugin loading and calls, dispositions,
//! metrics, `warren dlq`); the others are internal to the crate.
//!
//! * [`logtext`]: producer and plugin text escaped for log lines; broker URLs
//!   without their password; error chains with each cause once.
//! * [`retry`]: the retry policy, its tiers of delay queues and the shapes of
//!   the queue names warren reserves.
//! * `budget`: `max_in_flight_mb`, the prefetch that fits the largest body.
//! * `suspects`: poison messages, charged with the deaths of sessions.
//! * `secret`: `[pipeline.config]` values read from the environment, never
//!   printed.
//! * `pem`: certificate and key files named in the configuration.
//! * `outbound`: plugins' HTTP requests (wasi:http) under the pipeline's
//!   allow-list: rules, address checks, the connection, its counters.
//! * [`runtime`]: the wasmtime engine, the generated bindings of the WIT
//!   contract, per-call limits (`runtime::engine`, `runtime::state`), one
//!   call of a plugin (`runtime::invoke`) and the idle instances kept for
//!   `instance = "reuse"` (`runtime::reuse`).
//! * [`envelope`]: a delivery's properties and warren's bookkeeping headers,
//!   and their wire sizes.
//! * `downstream`: the rate limit and the circuit breaker, and their
//!   state.
//! * [`plugins`]: loading a plugin file (`loader`), the compiled-code cache
//!   (`cache`), reading the file safely (`file`), the memory-limit check
//!   (`limits`), the swappable current version (`slot`), watching paths
//!   (`watch`), hot reload (`reload`) and what they report (`status`).
//! * [`config`]: the configuration file, its defaults and its validation
//!   (what `warren check` rejects).
//! * [`allow`]: the publish allow-list: where a plugin's outputs and replies
//!   may go.
//! * [`disposition`]: outcome -> broker actions; the one place that decides
//!   ack, retry or dead-letter.
//! * [`ops`]: per-pipeline metrics and readiness, read from the modules
//!   above at scrape time (`metrics`), and the HTTP endpoint serving them
//!   (`http`).
//! * [`broker`]: connecting, declaring the topology (`topology`), publishing
//!   with confirms (`publish`) and settling deliveries in batches (`settle`).
//! * `pipeline`: one pipeline: the reconnecting supervisor, one session's
//!   worker threads, changes of its consumer, the handling of one message
//!   (see its own `# Layout`).
//! * [`dlq`]: `warren dlq`, reading, moving and purging dead letters.
//! * this file: starting and stopping it all ([`start`], [`run`], [`Running`]).

pub mod allow;
pub mod broker;
pub(crate) mod budget;
pub mod config;
pub mod disposition;
pub mod dlq;
pub(crate) mod downstream;
pub mod envelope;
pub mod logging;
pub mod logtext;
pub mod ops;
pub(crate) mod outbound;
pub(crate) mod pem;
pub(crate) mod pipeline;
pub mod plugins;
pub mod retry;
pub mod runtime;
pub(crate) mod secret;
pub mod suspects;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::ops::Metrics;
use crate::pipeline::Pipeline;
use crate::plugins::{LoadedPlugin, PluginLoader, PluginSlot, Reloader};
use crate::runtime::{RuntimeOptions, WasmRuntime};

pub use crate::plugins::ReloadResult;

/// A started warren: pipelines consuming, ops endpoint serving.
#[derive(Debug)]
pub struct Running {
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    ops_addr: Option<std::net::SocketAddr>,
    reloaders: Vec<Arc<Reloader>>,
    _watcher: Option<plugins::PluginWatcher>,
}

impl Running {
    /// Live metrics (also served on `/metrics`).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Where the ops endpoint listens, if enabled (the port the system
    /// picked when the config says port `0`).
    pub fn ops_addr(&self) -> Option<std::net::SocketAddr> {
        self.ops_addr
    }

    /// The reloader of a pipeline (absent when `reload = false`).
    pub fn reloader(&self, pipeline: &str) -> Option<&Arc<Reloader>> {
        self.reloaders.iter().find(|r| r.pipeline() == pipeline)
    }

    /// Re-check every watched plugin file now, as if it had changed (what
    /// SIGHUP does): a new valid version is swapped in, anything else keeps
    /// the loaded one. Pipelines with `reload = false` are not touched. The
    /// future owns what it needs, so it can be spawned.
    pub fn reload_all(&self) -> impl Future<Output = Vec<(String, ReloadResult)>> + Send + 'static {
        let reloaders = self.reloaders.clone();
        async move {
            let mut results = Vec::with_capacity(reloaders.len());
            for r in reloaders {
                let result = r.reload_now().await;
                results.push((r.pipeline().to_string(), result));
            }
            results
        }
    }

    /// Wait until every pipeline is consuming, or `timeout` passes.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.metrics.ready() {
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "not ready after {timeout:?}: {}",
                    self.metrics.readiness_json()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stop consuming, let in-flight messages settle (up to the grace period),
    /// close broker connections.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Size the engine for the configured pipelines.
pub fn runtime_options(config: &Config) -> RuntimeOptions {
    // Validation bounds the sum; saturating keeps an unvalidated config from
    // overflowing here all the same.
    // A reusing pipeline holds one instance per worker, idle or busy, per
    // plugin version; right after a reload the old version's idle ones live
    // until its last message is done, so it may briefly hold twice as many.
    let concurrency = config
        .pipelines
        .iter()
        .map(|p| match p.instance {
            config::InstanceMode::Fresh => p.concurrency,
            config::InstanceMode::Reuse => p.concurrency.saturating_mul(2),
        })
        .fold(0usize, usize::saturating_add);
    RuntimeOptions {
        // Slack for `check` and instances kept alive briefly around a reload.
        max_instances: u32::try_from(concurrency.saturating_add(4)).unwrap_or(u32::MAX),
        max_memory_bytes: POOL_MEMORY_BYTES,
    }
}

/// The pooled memory slots are sized for the largest limit a pipeline may have,
/// whatever this configuration says: each slot reserves 4 GiB of address space
/// anyway, and the pipeline's own `memory_mib` is enforced per instance by the
/// store's limiter. Sized for the configured limits instead, the engine would
/// refuse to compile a plugin whose initial memory is above them, and would
/// take a compiled-cache entry of that plugin for a bad one and delete it.
const POOL_MEMORY_BYTES: usize = (config::MAX_MEMORY_MIB as usize) << 20;

/// The loader for this configuration: the engine plus the compiled cache. A
/// cache directory that cannot be created, or that other users could write,
/// costs compile time, not the start.
pub fn plugin_loader(config: &Config) -> Result<PluginLoader> {
    let runtime = WasmRuntime::new(&runtime_options(config))?;
    let dir = config.runtime.effective_cache_dir();
    let max_bytes = config.runtime.cache_max_mb.saturating_mul(1 << 20);
    match PluginLoader::with_cache(runtime.clone(), dir.as_deref(), max_bytes) {
        Ok(l) => Ok(l),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "compiled cache unavailable; plugins compile at every start");
            PluginLoader::new(runtime, None)
        }
    }
}

/// Load every pipeline's plugin and check it against the pipeline's limits.
/// Used by `run` and by `warren check`.
pub fn load_plugins(loader: &PluginLoader, config: &Config) -> Result<Vec<LoadedPlugin>> {
    config
        .pipelines
        .iter()
        .map(|p| {
            loader
                .load(&p.plugin)
                .and_then(|plugin| {
                    plugins::check_fits(&plugin, p.limits.memory_bytes())
                        .with_context(|| format!("loading plugin {}", p.plugin.display()))?;
                    Ok(plugin)
                })
                .with_context(|| format!("pipeline {:?}", p.name))
        })
        .collect()
}

/// Load plugins, start pipelines, reloaders and the ops endpoint. Fails fast on
/// anything a restart would not fix (bad plugin, port in use); broker trouble is
/// retried in the background and shows in readiness instead.
pub async fn start(config: Config) -> Result<Running> {
    let loader = plugin_loader(&config)?;
    let loaded = tokio::task::spawn_blocking({
        let (loader, config) = (loader.clone(), config.clone());
        move || load_plugins(&loader, &config)
    })
    .await
    .context("plugin loading thread failed")??;

    let metrics = Arc::new(Metrics::new(
        config.pipelines.iter().map(|p| p.name.as_str()),
    ));
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut ops_addr = None;
    if let Some(addr) = config.ops.listen_addr()? {
        let (bound, handle) = ops::serve(addr, metrics.clone(), stop_rx.clone()).await?;
        ops_addr = Some(bound);
        tasks.push(handle);
    }
    let grace = Duration::from_millis(config.ops.shutdown_grace_ms);
    let first_delay = Duration::from_millis(config.broker.reconnect_delay_ms.max(1));
    let debounce = Duration::from_millis(config.runtime.reload_debounce_ms);
    let mut reloaders = Vec::new();
    for (p, plugin) in config.pipelines.iter().zip(loaded) {
        tracing::info!(
            pipeline = %p.name,
            plugin = %plugin.path().display(),
            version = plugin.version(),
            load_ms = plugin.load_time().as_millis() as u64,
            cache = plugin.source().label(),
            "plugin loaded"
        );
        let pm = metrics
            .pipeline(&p.name)
            .context("metrics missing for a configured pipeline")?;
        pm.plugin.cache_outcome(plugin.source().label());
        let slot = Arc::new(PluginSlot::new(plugin));
        if p.reload {
            let r = Arc::new(Reloader::new(
                p.name.as_str().into(),
                p.plugin.clone(),
                slot.clone(),
                loader.clone(),
                pm.plugin.clone(),
                debounce,
                p.limits.memory_bytes(),
            ));
            tasks.push(tokio::spawn(r.clone().run(stop_rx.clone())));
            reloaders.push(r);
        }
        let policy = allow::PublishPolicy::new(p, &config.pipelines);
        let pipeline = Arc::new(Pipeline::new(p.clone(), slot, pm.clone(), policy));
        tasks.push(tokio::spawn(report_panic(
            pm,
            pipeline.supervise(config.broker.clone(), first_delay, grace, stop_rx.clone()),
        )));
    }
    let watcher = if reloaders.is_empty() {
        None
    } else {
        Some(plugins::watch_plugins(&reloaders)?)
    };
    Ok(Running {
        metrics,
        stop,
        tasks,
        ops_addr,
        reloaders,
        _watcher: watcher,
    })
}

/// Run a pipeline's task so that a panic in it is logged with the pipeline's
/// name and makes warren not ready, instead of ending silently in a join
/// result nobody reads. The pipeline is not restarted in place: after a bug
/// its state is unknown, and a restart of the process (which readiness asks
/// an orchestrator for) lets the broker redeliver whatever it held.
async fn report_panic(pm: Arc<ops::PipelineMetrics>, task: impl Future<Output = ()>) {
    use futures_util::FutureExt as _;
    if let Err(panic) = std::panic::AssertUnwindSafe(task).catch_unwind().await {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        tracing::error!(
            pipeline = %pm.name,
            panic = %logtext::Escaped(&why),
            "pipeline task panicked: it consumes no more, warren reports not ready until restarted"
        );
        pm.status.set_crashed(&why);
    }
}

/// Run until `shutdown` resolves, then drain and stop.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let running = start(config).await?;
    shutdown.await;
    tracing::info!("shutting down: no new messages; settling in-flight ones");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn a_panicking_pipeline_task_is_logged_and_not_ready() {
        let metrics = Metrics::new(["p"]);
        let pm = metrics.pipeline("p").unwrap();
        pm.status
            .connected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(metrics.ready());
        report_panic(pm.clone(), async { panic!("boom {}", 7) }).await;
        assert!(!metrics.ready());
        assert_eq!(pm.status.crashed().as_deref(), Some("boom 7"));
        assert_eq!(
            metrics.readiness_json()["pipelines"][0]["crashed"],
            "boom 7"
        );

        // A task that ends normally leaves readiness alone.
        let metrics = Metrics::new(["q"]);
        let pm = metrics.pipeline("q").unwrap();
        pm.status
            .connected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        report_panic(pm.clone(), async {}).await;
        assert!(metrics.ready() && pm.status.crashed().is_none());
    }
}
