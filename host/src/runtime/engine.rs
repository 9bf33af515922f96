//! The shared wasmtime `Engine` (pooling allocator, epoch interruption), the
//! `Linker` with WASI, wasi:http and the `host` imports, and the epoch ticker thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::{Plugin, PluginPre};
use super::state::HostState;

/// One epoch tick. Deadlines are counted in ticks, which follow the wall clock,
/// so a plugin that runs past its timeout is stopped about one tick late (plus
/// however long the machine takes to schedule the ticker and the plugin's
/// thread). A 1 ms tick costs a thousand wake-ups a second, a few hundredths of
/// a percent of a core.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Dirty linear-memory bytes per slot reset by copying instead of madvise
/// (see `engine_config`). A small Rust plugin dirties a few pages per call;
/// CPython (a 12.4 MiB image) and SpiderMonkey (9.1 MiB) dirty megabytes, and
/// past this budget each of those pages would be decommitted and faulted in
/// again by the next message. 32 MiB instead of 2 MiB: `py_classifier` with
/// fresh instances drained 452 instead of 378 msgs/s at 3.8 instead of 4.3 ms
/// of CPU per message, with the same peak RSS (118 vs 119 MiB); Rust, C and
/// JavaScript unchanged (BENCHMARKS.md). Only pages a call dirtied count.
const KEEP_RESIDENT_MEMORY: usize = 32 << 20;
/// Same for tables, whose reset is a plain memset up to this size: one page
/// holds the 512 function references of a typical Rust plugin's tables, and a
/// page-table scan per table would cost more than it saves. Larger tables (JS,
/// Python runtimes) are decommitted beyond it as before.
const KEEP_RESIDENT_TABLE: usize = 4 << 10;
/// Slots decommitted per batch when madvise is still needed.
const DECOMMIT_BATCH: usize = 8;

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

/// The wasmtime engine and linker shared by every pipeline; cheap to clone.
/// (Named apart from the async runtime that often sits beside it.)
#[derive(Clone)]
pub struct WasmRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<HostState>,
}

impl std::fmt::Debug for WasmRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmRuntime").finish_non_exhaustive()
    }
}

impl WasmRuntime {
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
        // wasi:http is always linked, so a plugin that can make requests loads
        // on any pipeline; on one without `[pipeline.http]` every request is
        // denied (HTTP-request-denied) before anything leaves the host.
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker)
            .map_err(anyhow::Error::from)
            .context("linking wasi:http")?;
        Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(anyhow::Error::from)
            .context("linking the warren host interface")?;
        start_ticker(&engine)?;
        Ok(Self {
            inner: Arc::new(Inner { engine, linker }),
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
            .context("the component does not export warren:plugin/handler@0.1.x")
    }
}

fn engine_config(pool: Option<&RuntimeOptions>) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    // warren calls plugins synchronously, one call per store. Without this the
    // store sets up the component-model-async task machinery on every call
    // (about 15% of a no-op call); a component that needs async fails at load.
    config.concurrency_support(false);
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
            .max_memory_size(opts.max_memory_bytes)
            // Every message gets a fresh instance, so resetting a slot is on the
            // message path. By default wasmtime resets linear memory and tables
            // with madvise: a syscall, TLB shootdowns and, on the next message,
            // a page fault per page touched again (together ~15 µs for a no-op
            // Rust plugin). With PAGEMAP_SCAN (Linux 6.7+) it finds the pages
            // the call dirtied and copies them back from the image instead, up
            // to these budgets; whatever lies beyond is still decommitted. The
            // pages kept are ones the plugin uses on every call anyway.
            .pagemap_scan(Enabled::Auto)
            .linear_memory_keep_resident(KEEP_RESIDENT_MEMORY)
            .table_keep_resident(KEEP_RESIDENT_TABLE)
            // Slots released together are decommitted with fewer syscalls.
            .decommit_batch_size(DECOMMIT_BATCH);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(p));
    }
    config
}

/// Start the background thread advancing the engine's epoch every
/// `EPOCH_TICK`. It holds only a weak reference: it runs exactly as long as
/// anything (a `WasmRuntime`, a compiled plugin, a store) keeps the engine alive,
/// and ends by itself within a tick of the last one going away.
fn start_ticker(engine: &Engine) -> Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("warren-epoch".into())
        .spawn(move || {
            // Epochs follow the wall clock, not the number of sleeps: a sleep
            // of 1 ms often lasts 1.05-1.1 ms, and much longer on a busy
            // machine, so counting sleeps would let a 100 ms timeout run for
            // 110 ms or more. After oversleeping, the ticker catches up.
            let start = Instant::now();
            let tick_us = EPOCH_TICK.as_micros().max(1);
            let mut epochs: u128 = 0;
            loop {
                let next = u64::try_from(epochs.saturating_add(1).saturating_mul(tick_us))
                    .ok()
                    .and_then(|us| start.checked_add(Duration::from_micros(us)));
                if let Some(wait) = next.and_then(|n| n.checked_duration_since(Instant::now())) {
                    std::thread::sleep(wait);
                }
                let Some(engine) = weak.upgrade() else {
                    return;
                };
                let due = start.elapsed().as_micros() / tick_us;
                while epochs < due {
                    engine.increment_epoch();
                    epochs = epochs.saturating_add(1);
                }
            }
        })
        .context("starting the epoch ticker thread")?;
    Ok(())
}
