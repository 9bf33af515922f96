//! The shared wasmtime `Engine` (pooling allocator, epoch interruption), the
//! `Linker` with WASI and the `host` imports, and the epoch ticker thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::{Plugin, PluginPre};
use super::state::HostState;

/// One epoch tick. Deadlines are counted in ticks, so a plugin that runs past its
/// timeout is stopped at most about one tick late.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Sizing of the engine.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Instances that may be alive at once (sum of pipeline concurrency + slack).
    pub max_instances: u32,
    /// Largest memory limit of any pipeline, in bytes.
    pub max_memory_bytes: usize,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            max_instances: 16,
            max_memory_bytes: 64 << 20,
        }
    }
}

/// Engine + linker shared by every pipeline; cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<HostState>,
    ticker: Option<Ticker>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.stop();
        }
    }
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Runtime {
    /// Build the engine. The pooling allocator is preferred (instantiation in
    /// microseconds, memory reused across messages); if the OS refuses the
    /// virtual-memory reservation it needs, warren falls back to on-demand
    /// allocation and says so.
    pub fn new(opts: &RuntimeOptions) -> Result<Self> {
        let engine = match Engine::new(&engine_config(Some(opts))) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "pooling allocator unavailable; using on-demand allocation");
                Engine::new(&engine_config(None))
                    .map_err(anyhow::Error::from)
                    .context("creating the wasmtime engine")?
            }
        };
        let mut linker: Linker<HostState> = Linker::new(&engine);
        // Every Rust/JS/Python component imports some of WASI even when it does no
        // I/O; the context built per store grants nothing beyond clocks and random.
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(anyhow::Error::from)
            .context("linking WASI")?;
        Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(anyhow::Error::from)
            .context("linking the warren host interface")?;
        let ticker = Ticker::start(engine.clone())?;
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                linker,
                ticker: Some(ticker),
            }),
        })
    }

    /// The engine, for compiling components.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Compile component bytes. Slow (milliseconds to seconds): never on the message path.
    pub fn compile(&self, bytes: &[u8]) -> Result<Component> {
        Ok(Component::new(&self.inner.engine, bytes)?)
    }

    /// Resolve a component's imports against the linker and check that it exports
    /// the `warren:plugin` world, so a mismatch is found at load time.
    pub(crate) fn prepare(&self, component: &Component) -> Result<PluginPre<HostState>> {
        let pre = self
            .inner
            .linker
            .instantiate_pre(component)
            .map_err(anyhow::Error::from)
            .context("the component imports something warren does not provide")?;
        PluginPre::new(pre)
            .map_err(anyhow::Error::from)
            .context("the component does not export warren:plugin/handler@0.1.0")
    }
}

fn engine_config(pool: Option<&RuntimeOptions>) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    if let Some(opts) = pool {
        let n = opts.max_instances.max(1);
        let mut p = PoolingAllocationConfig::default();
        // A component is several core instances (main module, shims, adapters);
        // JS and Python runtimes bring more tables and bigger instance metadata.
        p.total_component_instances(n)
            .total_core_instances(n.saturating_mul(16))
            .total_memories(n.saturating_mul(4))
            .total_tables(n.saturating_mul(16))
            .total_stacks(n)
            .max_memories_per_component(4)
            .max_tables_per_component(16)
            .max_core_instances_per_component(64)
            .max_component_instance_size(1 << 20)
            .max_core_instance_size(8 << 20)
            .table_elements(1 << 17)
            .max_memory_size(opts.max_memory_bytes);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(p));
    }
    config
}

/// Background thread advancing the engine's epoch every `EPOCH_TICK`.
struct Ticker {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl Ticker {
    fn start(engine: Engine) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("warren-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .context("starting the epoch ticker thread")?;
        Ok(Self { stop, handle })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
    }
}
