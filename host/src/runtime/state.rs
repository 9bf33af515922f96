//! Per-invocation store state: WASI context (granting nothing), outbound HTTP
//! (what the pipeline grants), resource limits, captured stdout/stderr and the
//! implementation of the `host` imports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::bindings::{Level, warren};
use crate::logtext::Escaped;
use crate::outbound::{CallHttp, HttpPolicy};

/// Bytes of stdout (and, separately, stderr) kept per invocation. A plugin that
/// prints more gets a write error, which a Rust `println!` turns into a trap.
const OUTPUT_CAPACITY: usize = 256 * 1024;

/// Identity of the running invocation, for log lines the plugin emits.
#[derive(Debug, Clone)]
pub(crate) struct LogContext {
    pub pipeline: Arc<str>,
    pub plugin_version: Arc<str>,
}

pub(crate) struct HostState {
    /// Built on the plugin's first WASI call: a no-op Rust plugin makes none,
    /// and building the context (clocks, random, stdio) costs about a tenth of
    /// such a plugin's whole instantiate + call + drop.
    wasi: Option<Wasi>,
    table: ResourceTable,
    http_ctx: WasiHttpCtx,
    /// `wasi:http` requests: checked against the pipeline's grant.
    pub(crate) http: CallHttp,
    pub(crate) limiter: MemoryLimiter,
    config: Arc<BTreeMap<String, String>>,
    log: LogContext,
    /// What is left of the call's `host.log` budget, and what was dropped.
    log_lines_left: u32,
    log_bytes_left: usize,
    log_dropped: u64,
    /// `host.report-outage`: the last pause the plugin asked for, and why.
    outage: Option<(u32, String)>,
    /// A Rust panic reported through `host.log` in this call: plugins built
    /// without WASI have no stderr, and the SDK's panic hook logs instead.
    logged_panic: Option<String>,
}

struct Wasi {
    ctx: WasiCtx,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
    /// Bytes of each pipe already forwarded to the log. A reused instance
    /// keeps its pipes (the guest may hold their streams), so each call
    /// forwards only what it added; an instance whose pipes are half full is
    /// not reused (`has_output_room`).
    stdout_seen: usize,
    stderr_seen: usize,
}

impl Wasi {
    fn new() -> Self {
        let stdout = MemoryOutputPipe::new(OUTPUT_CAPACITY);
        let stderr = MemoryOutputPipe::new(OUTPUT_CAPACITY);
        // No preopens, no env, no args, no network: the builder grants none of them
        // unless asked. Clocks and random stay available.
        let ctx = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            ctx,
            stdout,
            stderr,
            stdout_seen: 0,
            stderr_seen: 0,
        }
    }
}

impl HostState {
    pub(crate) fn new(
        config: Arc<BTreeMap<String, String>>,
        log: LogContext,
        limits: super::InvokeLimits,
        http: Option<Arc<HttpPolicy>>,
        deadline: Instant,
    ) -> Self {
        Self {
            wasi: None,
            table: ResourceTable::new(),
            http_ctx: WasiHttpCtx::new(),
            http: CallHttp::new(log.pipeline.clone(), http, deadline),
            limiter: MemoryLimiter::new(limits.memory_bytes),
            config,
            log,
            log_lines_left: limits.log_lines,
            log_bytes_left: limits.log_bytes,
            log_dropped: 0,
            outage: None,
            logged_panic: None,
        }
    }

    /// Start another call in this (reused) store: the per-call budgets,
    /// the HTTP deadline and the memory limit as if the store were new. The
    /// plugin's memory, and the WASI context it may hold streams of, stay.
    pub(crate) fn begin_call(
        &mut self,
        config: Arc<BTreeMap<String, String>>,
        log: LogContext,
        limits: super::InvokeLimits,
        http: Option<Arc<HttpPolicy>>,
        deadline: Instant,
    ) {
        self.http = CallHttp::new(log.pipeline.clone(), http, deadline);
        self.limiter = MemoryLimiter::new(limits.memory_bytes);
        self.config = config;
        self.log = log;
        self.log_lines_left = limits.log_lines;
        self.log_bytes_left = limits.log_bytes;
        self.log_dropped = 0;
        self.outage = None;
        self.logged_panic = None;
    }

    /// Whether another call may print at least half of what a fresh
    /// instance may without hitting the pipes' end. Asked after
    /// `flush_output`, which has seen everything written so far (reading the
    /// pipes' lengths again would copy their contents).
    pub(crate) fn has_output_room(&self) -> bool {
        self.wasi.as_ref().is_none_or(|w| {
            let half = OUTPUT_CAPACITY / 2;
            w.stdout_seen <= half && w.stderr_seen <= half
        })
    }

    /// The pause the plugin asked for with `host.report-outage`, and why.
    pub(crate) fn reported_outage(&self) -> Option<(u32, String)> {
        self.outage.clone()
    }

    /// `host.log` lines dropped over the budget in this call.
    pub(crate) fn log_dropped(&self) -> u64 {
        self.log_dropped
    }

    /// What the guest said about its crash on stderr (or, built without WASI,
    /// through the SDK's panic hook in `host.log`), if anything: the
    /// message of a Rust panic, a Python exception or a JavaScript error. It
    /// becomes part of the failure reason, which ends up in DLQ headers where
    /// a wasm backtrace would say nothing.
    pub(crate) fn crash_message(&self) -> Option<String> {
        let said = self.wasi.as_ref().and_then(|wasi| {
            let bytes = wasi.stderr.contents();
            let new = bytes.get(wasi.stderr_seen..).unwrap_or_default();
            crash_message(&String::from_utf8_lossy(new))
        });
        said.or_else(|| self.logged_panic.as_deref().and_then(crash_message))
    }

    /// Forward what the plugin printed to the log, line by line.
    pub(crate) fn flush_output(&mut self) {
        let Some(wasi) = &mut self.wasi else { return };
        for (stream, pipe, seen) in [
            ("stdout", &wasi.stdout, &mut wasi.stdout_seen),
            ("stderr", &wasi.stderr, &mut wasi.stderr_seen),
        ] {
            let all = pipe.contents();
            let bytes = all.get(*seen..).unwrap_or_default();
            *seen = all.len();
            if bytes.is_empty() {
                continue;
            }
            let (p, v) = (&*self.log.pipeline, &*self.log.plugin_version);
            for line in String::from_utf8_lossy(bytes)
                .lines()
                .filter(|l| !l.trim().is_empty())
            {
                let line = Escaped(line);
                if stream == "stderr" {
                    tracing::warn!(target: "warren::plugin", pipeline = p, version = v, stream, "{line}");
                } else {
                    tracing::info!(target: "warren::plugin", pipeline = p, version = v, stream, "{line}");
                }
            }
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.get_or_insert_with(Wasi::new).ctx,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http_ctx,
            table: &mut self.table,
            hooks: &mut self.http,
        }
    }
}

impl warren::plugin::types::Host for HostState {}

impl warren::plugin::host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        // Kept even past the log budget: it becomes the failure's reason.
        if matches!(level, Level::Error) && message.contains("panicked at") {
            self.logged_panic = Some(crate::logtext::clip(&message, 2_000).into_owned());
        }
        // One message must not flood the log: past the budget, lines are
        // dropped and counted (the pipeline reports them).
        if self.log_lines_left == 0 || message.len() > self.log_bytes_left {
            self.log_dropped = self.log_dropped.saturating_add(1);
            return;
        }
        self.log_lines_left -= 1;
        self.log_bytes_left -= message.len();
        let (p, v) = (&*self.log.pipeline, &*self.log.plugin_version);
        let message = Escaped(&message);
        match level {
            Level::Trace => {
                tracing::trace!(target: "warren::plugin", pipeline = p, version = v, "{message}")
            }
            Level::Debug => {
                tracing::debug!(target: "warren::plugin", pipeline = p, version = v, "{message}")
            }
            Level::Info => {
                tracing::info!(target: "warren::plugin", pipeline = p, version = v, "{message}")
            }
            Level::Warn => {
                tracing::warn!(target: "warren::plugin", pipeline = p, version = v, "{message}")
            }
            Level::Error => {
                tracing::error!(target: "warren::plugin", pipeline = p, version = v, "{message}")
            }
        }
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    fn report_outage(&mut self, pause_ms: u32, reason: String) {
        // Kept short: it ends up in a log line and the readiness detail.
        let reason = crate::logtext::clip(&reason, 500).into_owned();
        self.outage = Some((pause_ms, reason));
    }
}

fn crash_message(stderr: &str) -> Option<String> {
    let lines: Vec<&str> = stderr.lines().collect();
    // Python: the exception line is the first unindented line after the traceback.
    if let Some(t) = lines
        .iter()
        .position(|l| l.starts_with("Traceback (most recent call last)"))
    {
        return lines[t + 1..]
            .iter()
            .find(|l| !l.starts_with(' ') && !l.is_empty())
            .map(|l| l.trim().to_string());
    }
    // JavaScript (StarlingMonkey): the error message precedes its "Stack:".
    if let Some(s) = lines.iter().position(|l| l.trim() == "Stack:") {
        return lines[..s]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string());
    }
    // Rust: the panic message follows "panicked at <location>:".
    let p = lines.iter().position(|l| l.contains("panicked at"))?;
    Some(format!(
        "panicked: {}",
        lines.get(p + 1).map_or("", |l| l.trim())
    ))
}

/// Caps linear memory and remembers whether the cap was hit, so that the trap a
/// guest raises after a failed allocation can be reported as "out of memory".
pub(crate) struct MemoryLimiter {
    max_bytes: usize,
    pub(crate) hit: bool,
}

impl MemoryLimiter {
    fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            hit: false,
        }
    }
}

/// Generous bound on table growth; tables hold function references, not data.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.max_bytes && maximum.is_none_or(|m| desired <= m);
        if !allowed {
            self.hit = true;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS && maximum.is_none_or(|m| desired <= m))
    }
}

#[cfg(test)]
mod tests {
    use super::crash_message;

    #[test]
    fn crash_messages_are_found_for_each_language() {
        let rust = "thread '<unnamed>' (1) panicked at src/lib.rs:82:19:\nprobe: trap requested\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(
            crash_message(rust).as_deref(),
            Some("panicked: probe: trap requested")
        );
        let python = "Traceback (most recent call last):\n  File \"/0/app.py\", line 3, in handle\nValueError: bad ticket\nthread '<unnamed>' (1) panicked at runtime/src/lib.rs:1:1:\nPython function threw an unexpected exception\n";
        assert_eq!(
            crash_message(python).as_deref(),
            Some("ValueError: bad ticket")
        );
        let js = "fault injected\nStack:\n  route@router.js:118:43\n";
        assert_eq!(crash_message(js).as_deref(), Some("fault injected"));
        assert_eq!(crash_message("just chatter\n"), None);
    }
}
