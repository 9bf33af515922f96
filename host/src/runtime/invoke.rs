//! Running a plugin on one message: a fresh store and instance per call, the
//! timeout and memory cap enforced, and every way it can fail classified.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Store, Trap};

use super::bindings::{Message, Outcome, PluginPre};
use super::engine::EPOCH_TICK;
use super::state::{HostState, LogContext};
use crate::outbound::HttpPolicy;

/// Per-call resource limits.
#[derive(Debug, Clone, Copy)]
pub struct InvokeLimits {
    /// Wall-clock budget for instantiation plus `handle`.
    pub timeout: Duration,
    /// Cap on the instance's linear memory.
    pub memory_bytes: usize,
    /// `host.log` lines kept per call; the rest are dropped and counted.
    pub log_lines: u32,
    /// `host.log` bytes kept per call.
    pub log_bytes: usize,
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
    /// The spent instance. Releasing it resets its pooled memory and tables,
    /// a few microseconds that need not delay the message's effects: it goes
    /// when the `Invocation` is dropped, after the caller has acted.
    _store: Store<HostState>,
}

impl Invocation {
    /// `host.log` lines the call made beyond its budget, dropped.
    pub fn log_dropped(&self) -> u64 {
        self._store.data().log_dropped()
    }

    /// The pause the plugin asked for with `host.report-outage`, and why.
    pub fn reported_outage(&self) -> Option<(u32, String)> {
        self._store.data().reported_outage()
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
    let state = HostState::new(config, log, limits, http, deadline);
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    // The current tick is already partly over, so one more tick makes sure a
    // plugin always gets its whole timeout (and is stopped within a tick after).
    let ticks = limits
        .timeout
        .as_micros()
        .div_ceil(EPOCH_TICK.as_micros())
        .max(1)
        + 1;
    store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
    store.epoch_deadline_trap();

    let mut result = match pre.instantiate(&mut store) {
        Err(e) => Err(classify(&store, e, limits, true)),
        Ok(plugin) => plugin
            .warren_plugin_handler()
            .call_handle(&mut store, msg)
            .map_err(|e| classify(&store, e, limits, false)),
    };
    // An HTTP request cut by the message's deadline makes the call a timeout
    // even if the plugin, handed the error, still returned in time: the
    // message takes the same retry path as a plugin stopped by the epoch.
    if result.is_ok() && store.data().http.cut_by_deadline() {
        result = Err(PluginFailure::Timeout(limits.timeout));
    }
    store.data().flush_output();
    Invocation {
        result,
        elapsed: start.elapsed(),
        _store: store,
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
    if text.len() > MAX_FAILURE_TEXT {
        let mut cut = MAX_FAILURE_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    if instantiating {
        PluginFailure::Instantiate(text)
    } else {
        PluginFailure::Trap(text)
    }
}
