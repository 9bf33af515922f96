//! Counters and gauges per pipeline, rendered as Prometheus text. Plain atomics:
//! the message path only ever does relaxed increments.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::allow::DenyKind;
use crate::disposition::Disposition;

/// All pipelines' metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pipelines: Vec<Arc<PipelineMetrics>>,
}

/// One pipeline's metrics.
#[derive(Debug, Default)]
pub struct PipelineMetrics {
    pub name: String,
    outcomes: [AtomicU64; 5],
    /// Deliveries nacked back to the queue because an effect was not confirmed.
    pub requeued: AtomicU64,
    failures: [AtomicU64; 4],
    /// Plugin outputs and replies confirmed by the broker.
    pub published: AtomicU64,
    /// Plugin outputs the broker could not route anywhere.
    pub unroutable: AtomicU64,
    /// Deliveries taken by a worker and not yet settled (prefetched ones still
    /// waiting for a worker are not counted).
    pub in_flight: AtomicI64,
    handle_micros: AtomicU64,
    handle_count: AtomicU64,
    /// Whether the pipeline's consumer is attached to the broker.
    pub connected: AtomicBool,
    /// Broker (re)connections after a loss.
    pub reconnects: AtomicU64,
    /// Messages that could not be decoded or settled for reasons outside the plugin.
    pub errors: AtomicU64,
    plugin_version: RwLock<String>,
    /// The plugin file is currently missing (the loaded version keeps serving).
    pub plugin_missing: AtomicBool,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    last_reload_error: RwLock<Option<String>>,
    last_broker_error: RwLock<Option<String>>,
    cache: [AtomicU64; 5],
    /// The prefetch of the pipeline's consumer now (`max_in_flight_mb`).
    pub prefetch: AtomicU64,
    /// `host.log` lines dropped over a message's log budget.
    pub log_dropped: AtomicU64,
    /// Messages parked as suspected poison (the session died with them in
    /// flight `session_death_limit` times).
    pub poison_parked: AtomicU64,
    /// Times a missing queue of the pipeline (its DLQ, a retry tier) was
    /// declared again because a copy could not be routed to it.
    pub topology_repairs: AtomicU64,
    /// Outputs, replies and headers the allow-list refused, by `DenyKind`.
    denied: [AtomicU64; 3],
    /// Why the broker blocked the connection (a resource alarm), while it does.
    blocked: RwLock<Option<String>>,
    blocked_now: AtomicBool,
    /// The last refused effect, while refusals go on.
    last_effect_error: RwLock<Option<String>>,
}

const CACHE_OUTCOMES: [&str; 5] = ["compiled", "miss", "hit", "recovered", "shared"];

const FAILURE_KINDS: [&str; 4] = ["trap", "timeout", "memory", "instantiate"];

impl PipelineMetrics {
    /// Count a settled delivery.
    pub fn outcome(&self, d: Disposition) {
        let i = Disposition::ALL.iter().position(|x| *x == d).unwrap_or(0);
        self.outcomes[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Settled deliveries with this disposition so far.
    pub fn outcome_count(&self, d: Disposition) -> u64 {
        let i = Disposition::ALL.iter().position(|x| *x == d).unwrap_or(0);
        self.outcomes[i].load(Ordering::Relaxed)
    }

    /// Count a plugin failure by kind (`trap`, `timeout`, `memory`, `instantiate`).
    pub fn failure(&self, kind: &str) {
        if let Some(i) = FAILURE_KINDS.iter().position(|k| *k == kind) {
            self.failures[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count `n` refusals of the allow-list.
    pub fn denied(&self, kind: DenyKind, n: u64) {
        if let Some(i) = DenyKind::ALL.iter().position(|k| *k == kind) {
            self.denied[i].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Refusals of this kind so far.
    pub fn denied_count(&self, kind: DenyKind) -> u64 {
        DenyKind::ALL
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.denied[i].load(Ordering::Relaxed))
    }

    /// Plugin failures of this kind so far.
    pub fn failure_count(&self, kind: &str) -> u64 {
        FAILURE_KINDS
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.failures[i].load(Ordering::Relaxed))
    }

    /// Record the duration of one plugin call.
    pub fn observe_handle(&self, d: Duration) {
        self.handle_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.handle_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a reload attempt that changed something: `None` = swapped, `Some(why)` = failed.
    pub fn reloaded(&self, error: Option<&str>) {
        match error {
            None => self.reloads.fetch_add(1, Ordering::Relaxed),
            Some(_) => self.reload_failures.fetch_add(1, Ordering::Relaxed),
        };
        if let Ok(mut g) = self.last_reload_error.write() {
            *g = error.map(str::to_string);
        }
    }

    /// Forget the last reload error without counting a reload: the plugin file
    /// holds the running version again.
    pub fn clear_reload_error(&self) {
        if let Ok(mut g) = self.last_reload_error.write() {
            *g = None;
        }
    }

    /// Successful reloads so far.
    pub fn reload_count(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Failed reloads so far.
    pub fn reload_failure_count(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    /// Count where a loaded plugin's code came from (`CacheOutcome::label`).
    pub fn cache_outcome(&self, label: &str) {
        if let Some(i) = CACHE_OUTCOMES.iter().position(|k| *k == label) {
            self.cache[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Loads with this cache outcome so far.
    pub fn cache_count(&self, label: &str) -> u64 {
        CACHE_OUTCOMES
            .iter()
            .position(|k| *k == label)
            .map_or(0, |i| self.cache[i].load(Ordering::Relaxed))
    }

    /// The active plugin version (short digest).
    pub fn plugin_version(&self) -> String {
        self.plugin_version
            .read()
            .map(|g| g.clone())
            .unwrap_or_default()
    }

    fn last_reload_error(&self) -> Option<String> {
        self.last_reload_error.read().ok().and_then(|g| g.clone())
    }

    /// Why the last broker session failed (connecting, declaring, consuming);
    /// `None` once a session is consuming again.
    pub fn set_broker_error(&self, error: Option<&str>) {
        if let Ok(mut g) = self.last_broker_error.write() {
            *g = error.map(str::to_string);
        }
    }

    /// The error of the last failed broker session, while none has succeeded since.
    pub fn last_broker_error(&self) -> Option<String> {
        self.last_broker_error.read().ok().and_then(|g| g.clone())
    }

    /// The broker blocked the connection (`Some(reason)`) or lifted the block.
    pub fn set_blocked(&self, reason: Option<&str>) {
        self.blocked_now.store(reason.is_some(), Ordering::Relaxed);
        if let Ok(mut g) = self.blocked.write() {
            *g = reason.map(str::to_string);
        }
    }

    /// Whether the broker blocks the pipeline's connection now.
    pub fn blocked(&self) -> bool {
        self.blocked_now.load(Ordering::Relaxed)
    }

    /// A delivery's effects were refused (`Some`), or went through again.
    pub fn set_effect_error(&self, error: Option<&str>) {
        if let Ok(mut g) = self.last_effect_error.write() {
            *g = error.map(str::to_string);
        }
    }

    /// The last refused effect, while no effects have been confirmed since.
    pub fn last_effect_error(&self) -> Option<String> {
        self.last_effect_error.read().ok().and_then(|g| g.clone())
    }

    /// Set the active plugin version label.
    pub fn set_plugin_version(&self, v: &str) {
        if let Ok(mut g) = self.plugin_version.write() {
            v.clone_into(&mut g);
        }
    }
}

impl Metrics {
    /// Metrics for these pipeline names.
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            pipelines: names
                .into_iter()
                .map(|n| {
                    Arc::new(PipelineMetrics {
                        name: n.to_string(),
                        ..Default::default()
                    })
                })
                .collect(),
        }
    }

    /// One pipeline's metrics.
    pub fn pipeline(&self, name: &str) -> Option<Arc<PipelineMetrics>> {
        self.pipelines.iter().find(|p| p.name == name).cloned()
    }

    /// All pipelines.
    pub fn pipelines(&self) -> &[Arc<PipelineMetrics>] {
        &self.pipelines
    }

    /// True when every pipeline is attached to the broker.
    pub fn ready(&self) -> bool {
        self.pipelines
            .iter()
            .all(|p| p.connected.load(Ordering::Relaxed))
    }

    /// Readiness detail as JSON.
    pub fn readiness_json(&self) -> serde_json::Value {
        let pipelines: Vec<_> = self
            .pipelines
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name,
                    "connected": p.connected.load(Ordering::Relaxed),
                    "plugin_version": p.plugin_version(),
                    "plugin_file_missing": p.plugin_missing.load(Ordering::Relaxed),
                    "last_reload_error": p.last_reload_error(),
                    "last_broker_error": p.last_broker_error(),
                    "last_effect_error": p.last_effect_error(),
                    "blocked": p.blocked.read().ok().and_then(|g| g.clone()),
                })
            })
            .collect();
        serde_json::json!({ "ready": self.ready(), "pipelines": pipelines })
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let families: [(&str, &str, &str); 20] = [
            (
                "warren_messages_total",
                "counter",
                "Deliveries settled, by outcome.",
            ),
            (
                "warren_requeued_total",
                "counter",
                "Deliveries requeued because an effect was not confirmed.",
            ),
            (
                "warren_plugin_failures_total",
                "counter",
                "Plugin calls that failed, by kind.",
            ),
            (
                "warren_published_total",
                "counter",
                "Plugin outputs and replies confirmed by the broker.",
            ),
            (
                "warren_unroutable_total",
                "counter",
                "Plugin outputs the broker could not route.",
            ),
            (
                "warren_errors_total",
                "counter",
                "Deliveries that hit a host-side error.",
            ),
            (
                "warren_in_flight",
                "gauge",
                "Deliveries being handled: taken by a worker, not yet settled.",
            ),
            (
                "warren_handle_seconds",
                "summary",
                "Time spent in plugin calls.",
            ),
            (
                "warren_broker_connected",
                "gauge",
                "1 when the pipeline's consumer is attached.",
            ),
            (
                "warren_reconnects_total",
                "counter",
                "Broker reconnections.",
            ),
            ("warren_plugin_info", "gauge", "Active plugin version."),
            (
                "warren_plugin_reloads_total",
                "counter",
                "Plugin reloads, by result.",
            ),
            (
                "warren_plugin_loads_total",
                "counter",
                "Plugin loads, by where the compiled code came from.",
            ),
            (
                "warren_plugin_file_missing",
                "gauge",
                "1 while the plugin file is gone (the loaded version serves).",
            ),
            (
                "warren_broker_blocked",
                "gauge",
                "1 while the broker blocks the pipeline's connection (resource alarm).",
            ),
            (
                "warren_prefetch",
                "gauge",
                "Prefetch of the pipeline's consumer: the configured one, or less to keep max_in_flight_mb.",
            ),
            (
                "warren_plugin_log_dropped_total",
                "counter",
                "host.log lines dropped over a message's limits.max_log_lines or max_log_kib.",
            ),
            (
                "warren_poison_parked_total",
                "counter",
                "Messages parked in the DLQ because the broker session died with them in flight session_death_limit times.",
            ),
            (
                "warren_denied_total",
                "counter",
                "What the publish allow-list refused: outputs (publish), replies (reply) and plugin headers removed (header).",
            ),
            (
                "warren_topology_repairs_total",
                "counter",
                "Missing queues of the pipeline declared again after a copy could not reach them.",
            ),
        ];
        for (name, kind, help) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for p in &self.pipelines {
                let l = format!("pipeline=\"{}\"", escape(&p.name));
                let r = Ordering::Relaxed;
                match name {
                    "warren_messages_total" => {
                        for (i, d) in Disposition::ALL.iter().enumerate() {
                            let _ = writeln!(
                                out,
                                "{name}{{{l},outcome=\"{}\"}} {}",
                                d.label(),
                                p.outcomes[i].load(r)
                            );
                        }
                    }
                    "warren_plugin_failures_total" => {
                        for (i, k) in FAILURE_KINDS.iter().enumerate() {
                            let _ = writeln!(
                                out,
                                "{name}{{{l},kind=\"{k}\"}} {}",
                                p.failures[i].load(r)
                            );
                        }
                    }
                    "warren_handle_seconds" => {
                        let secs = p.handle_micros.load(r) as f64 / 1e6;
                        let _ = writeln!(out, "{name}_sum{{{l}}} {secs}");
                        let _ = writeln!(out, "{name}_count{{{l}}} {}", p.handle_count.load(r));
                    }
                    "warren_plugin_reloads_total" => {
                        let _ = writeln!(out, "{name}{{{l},result=\"ok\"}} {}", p.reloads.load(r));
                        let _ = writeln!(
                            out,
                            "{name}{{{l},result=\"failed\"}} {}",
                            p.reload_failures.load(r)
                        );
                    }
                    "warren_plugin_loads_total" => {
                        for (i, k) in CACHE_OUTCOMES.iter().enumerate() {
                            let _ = writeln!(
                                out,
                                "{name}{{{l},source=\"{k}\"}} {}",
                                p.cache[i].load(r)
                            );
                        }
                    }
                    "warren_denied_total" => {
                        for (i, k) in DenyKind::ALL.iter().enumerate() {
                            let _ = writeln!(
                                out,
                                "{name}{{{l},kind=\"{}\"}} {}",
                                k.label(),
                                p.denied[i].load(r)
                            );
                        }
                    }
                    "warren_plugin_info" => {
                        let v = escape(&p.plugin_version());
                        let _ = writeln!(out, "{name}{{{l},version=\"{v}\"}} 1");
                    }
                    _ => {
                        let v = match name {
                            "warren_requeued_total" => p.requeued.load(r),
                            "warren_published_total" => p.published.load(r),
                            "warren_unroutable_total" => p.unroutable.load(r),
                            "warren_errors_total" => p.errors.load(r),
                            "warren_in_flight" => u64::try_from(p.in_flight.load(r)).unwrap_or(0),
                            "warren_broker_connected" => u64::from(p.connected.load(r)),
                            "warren_plugin_file_missing" => u64::from(p.plugin_missing.load(r)),
                            "warren_broker_blocked" => u64::from(p.blocked()),
                            "warren_topology_repairs_total" => p.topology_repairs.load(r),
                            "warren_poison_parked_total" => p.poison_parked.load(r),
                            "warren_plugin_log_dropped_total" => p.log_dropped.load(r),
                            "warren_prefetch" => p.prefetch.load(r),
                            _ => p.reconnects.load(r),
                        };
                        let _ = writeln!(out, "{name}{{{l}}} {v}");
                    }
                }
            }
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
