//! Running a plugin on one message: a fresh store and instance per call (or
//! an idle one of the pipeline's under `instance = "reuse"`), the timeout and
//! memory cap enforced, and every way it can fail classified.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Store, Trap};

use super::bindings::{Message, Outcome, PluginPre};
use super::engine::EPOCH_TICK;
use super::reuse::{IdleInstances, Spent, Warm};
use super::state::{HostState, LogContext};
use crate::outbound::HttpPolicy;

/// Per-call resource limits.
#[derive(Debug, Clone, Copy)]
pub struct InvokeLimits {
    /// Wall-clock budget for instantiation (of a fresh instance) plus `handle`.
    pub timeout: Duration,
    /// Cap on the instance's linear memory.
    pub memory_bytes: usize,
    /// `host.log` lines kept per call; the rest are dropped and counted.
    pub log_lines: u32,
    /// `host.log` bytes kept per call.
    pub log_bytes: usize,
    /// Messages one instance may handle: 1 is a fresh instance per message
    /// (`instance = "fresh"`), more keeps it for the next call
    /// (`instance = "reuse"`).
    pub messages_per_instance: u32,
}

impl InvokeLimits {
    /// These time and memory limits, with the default log budget (100 lines,
    /// 64 KiB per call).
    pub fn new(timeout: Duration, memory_bytes: usize) -> Self {
        Self {
            timeout,
            memory_bytes,
            log_lines: 100,
            log_bytes: 64 << 10,
            messages_per_instance: 1,
        }
    }
}

/// Why a call produced no outcome. Each is a failed attempt of that message only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginFailure {
    /// The plugin trapped (a panic, `unreachable`, an uncaught exception, ...).
    Trap(String),
    /// The plugin ran past its deadline and was interrupted.
    Timeout(Duration),
    /// The plugin tried to grow its memory past the limit.
    OutOfMemory(usize),
    /// The instance could not be created (e.g. its initial memory exceeds the limit).
    Instantiate(String),
}

impl PluginFailure {
    /// The kind, as counted in metrics.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Trap(_) => FailureKind::Trap,
            Self::Timeout(_) => FailureKind::Timeout,
            Self::OutOfMemory(_) => FailureKind::Memory,
            Self::Instantiate(_) => FailureKind::Instantiate,
        }
    }
}

/// Why a plugin call failed, as counted (`kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The plugin trapped (panicked, hit `unreachable`, ...).
    Trap,
    /// It ran past `limits.timeout_ms`.
    Timeout,
    /// It hit `limits.memory_mib`.
    Memory,
    /// It could not be instantiated.
    Instantiate,
}

impl FailureKind {
    /// Every kind, in label order.
    pub const ALL: [FailureKind; 4] = [Self::Trap, Self::Timeout, Self::Memory, Self::Instantiate];

    /// The `kind` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Trap => "trap",
            Self::Timeout => "timeout",
            Self::Memory => "memory",
            Self::Instantiate => "instantiate",
        }
    }

    /// Position in [`FailureKind::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::Trap => 0,
            Self::Timeout => 1,
            Self::Memory => 2,
            Self::Instantiate => 3,
        }
    }
}

impl fmt::Display for PluginFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Trap(m) => write!(f, "plugin trapped: {m}"),
            Self::Timeout(d) => write!(f, "plugin timed out after {} ms", d.as_millis()),
            Self::OutOfMemory(b) => {
                write!(f, "plugin exceeded its memory limit of {} MiB", b >> 20)
            }
            Self::Instantiate(m) => write!(f, "plugin could not be instantiated: {m}"),
        }
    }
}

/// The result of one call.
pub struct Invocation {
    pub result: Result<Outcome, PluginFailure>,
    /// Instantiation plus the call; not the release of the instance.
    pub elapsed: Duration,
    /// Whether the instance goes back to the pipeline's idle ones.
    pub reused: bool,
    /// The spent instance. Releasing it resets its pooled memory and tables,
    /// a few microseconds that need not delay the message's effects (and a
    /// reused instance must not be taken by another message before this one
    /// is done with it): it goes when the `Invocation` is dropped, after the
    /// caller has acted.
    spent: Spent,
}

impl Invocation {
    fn state(&self) -> Option<&HostState> {
        self.spent.warm.as_ref().map(|w| w.store.data())
    }

    /// `host.log` lines the call made beyond its budget, dropped.
    pub fn log_dropped(&self) -> u64 {
        self.state().map_or(0, HostState::log_dropped)
    }

    /// The pause the plugin asked for with `host.report-outage`, and why.
    pub fn reported_outage(&self) -> Option<(u32, String)> {
        self.state().and_then(HostState::reported_outage)
    }
}

impl fmt::Debug for Invocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invocation")
            .field("result", &self.result)
            .field("elapsed", &self.elapsed)
            .finish_non_exhaustive()
    }
}

/// Longest failure text kept; traps carry wasm backtraces that can be huge.
const MAX_FAILURE_TEXT: usize = 1000;

pub(crate) fn invoke(
    pre: &PluginPre<HostState>,
    idle: &Arc<IdleInstances>,
    msg: &Message,
    config: Arc<BTreeMap<String, String>>,
    log: LogContext,
    limits: InvokeLimits,
    http: Option<Arc<HttpPolicy>>,
) -> Invocation {
    let start = Instant::now();
    let engine = pre.engine();
    // Outbound HTTP waits in host calls, where epoch interruption cannot
    // reach; its requests end at this deadline themselves.
    let deadline = start.checked_add(limits.timeout).unwrap_or(start);
    let reuse = limits.messages_per_instance > 1;
    let mut warm = match reuse.then(|| idle.take()).flatten() {
        Some(mut warm) => {
            warm.store
                .data_mut()
                .begin_call(config, log, limits, http, deadline);
            warm
        }
        None => {
            let state = HostState::new(config, log, limits, http, deadline);
            let mut store = Store::new(engine, state);
            store.limiter(|s| &mut s.limiter);
            Warm {
                store,
                plugin: None,
                calls: 0,
            }
        }
    };
    let store = &mut warm.store;
    // The current tick is already partly over, so one more tick makes sure a
    // plugin always gets its whole timeout (and is stopped within a tick after).
    let ticks = limits
        .timeout
        .as_micros()
        .div_ceil(EPOCH_TICK.as_micros())
        .max(1)
        + 1;
    // Relative to the current epoch, so a reused store gets the whole
    // timeout again for this call.
    store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
    store.epoch_deadline_trap();

    let plugin = match warm.plugin.take() {
        Some(plugin) => plugin,
        None => match pre.instantiate(&mut *store) {
            Ok(plugin) => plugin,
            Err(e) => {
                let failure = classify(store, e, limits, true);
                store.data_mut().flush_output();
                return Invocation {
                    result: Err(failure),
                    elapsed: start.elapsed(),
                    reused: false,
                    spent: Spent {
                        warm: Some(warm),
                        back_to: None,
                    },
                };
            }
        },
    };
    let mut result = plugin
        .warren_plugin_handler()
        .call_handle(&mut *store, msg)
        .map_err(|e| classify(store, e, limits, false));
    warm.plugin = Some(plugin);
    // An HTTP request cut by the message's deadline makes the call a timeout
    // even if the plugin, handed the error, still returned in time: the
    // message takes the same retry path as a plugin stopped by the epoch.
    if result.is_ok() && store.data().http.cut_by_deadline() {
        result = Err(PluginFailure::Timeout(limits.timeout));
    }
    store.data_mut().flush_output();
    warm.calls = warm.calls.saturating_add(1);
    // Reused only after a call that ended well within every limit: a trap
    // can leave the guest's memory half-updated (and wasmtime refuses to
    // enter an instance that trapped), an interrupted call stopped the guest
    // anywhere, and a guest that was refused memory may have carried on in
    // a state its author never tested.
    let reused = reuse
        && result.is_ok()
        && !warm.store.data().limiter.hit
        && warm.calls < limits.messages_per_instance
        && warm.store.data().has_output_room();
    Invocation {
        result,
        elapsed: start.elapsed(),
        reused,
        spent: Spent {
            warm: Some(warm),
            back_to: reused.then(|| idle.clone()),
        },
    }
}

fn classify(
    store: &Store<HostState>,
    err: wasmtime::Error,
    limits: InvokeLimits,
    instantiating: bool,
) -> PluginFailure {
    if matches!(err.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        return PluginFailure::Timeout(limits.timeout);
    }
    if store.data().limiter.hit {
        return PluginFailure::OutOfMemory(limits.memory_bytes);
    }
    // The root cause is the trap itself; the context chain around it is a wasm
    // backtrace of anonymous functions that helps nobody reading a DLQ header.
    let mut text = err.root_cause().to_string();
    if let Some(said) = store.data().crash_message() {
        text = format!("{text} ({said})");
    }
    let text = crate::logtext::clip(&text, MAX_FAILURE_TEXT).into_owned();
    if instantiating {
        PluginFailure::Instantiate(text)
    } else {
        PluginFailure::Trap(text)
    }
}
