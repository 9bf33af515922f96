//! Counters, gauges and histograms per pipeline, exposed in the Prometheus
//! text format by `prometheus-client`.
//!
//! Counters and gauges are plain atomics owned by each pipeline's
//! [`PipelineMetrics`], resolved once when the pipeline starts, so the message
//! path is one relaxed add; a scrape reads them into the library's constant
//! metrics ([`Scrape`]). Histograms are the library's own (one lock-free-ish
//! observe per message). Label values come from the enums that own them
//! ([`Disposition`], [`FailureKind`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use crate::allow::DenyKind;
use crate::disposition::Disposition;
use crate::downstream::DownstreamMetrics;
use crate::outbound::HttpMetrics;
use crate::plugins::{CACHE_SOURCES, PluginStatus};
use crate::suspects::Verdict;

use super::status::PipelineStatus;
pub use crate::runtime::FailureKind;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Buckets (seconds) of one plugin call: 100 µs to 30 s.
const HANDLE_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 30.0,
];
/// Buckets (seconds) of publishing a message's effects until confirmed.
const CONFIRM_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];
/// Buckets (seconds) from publish to handled: the AMQP `timestamp` has
/// one-second resolution, so nothing finer.
const END_TO_END_BUCKETS: [f64; 11] = [
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// One pipeline's histograms.
#[derive(Debug, Clone)]
struct Histograms {
    handle: Histogram,
    confirm: Histogram,
    end_to_end: Histogram,
}

impl Default for Histograms {
    fn default() -> Self {
        Self {
            handle: Histogram::new(HANDLE_BUCKETS),
            confirm: Histogram::new(CONFIRM_BUCKETS),
            end_to_end: Histogram::new(END_TO_END_BUCKETS),
        }
    }
}

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
    histograms: Histograms,
    /// Broker (re)connections after a loss.
    pub reconnects: AtomicU64,
    /// Acks the connection could not carry (the broker redelivers those
    /// deliveries, so they are handled again: at least once).
    pub settle_failures: Arc<AtomicU64>,
    /// The plugin serving, its reloads and where its code came from.
    pub plugin: Arc<PluginStatus>,
    /// The broker session as readiness shows it.
    pub status: PipelineStatus,
    /// The prefetch of the pipeline's consumer now (`max_in_flight_mb`).
    pub prefetch: AtomicU64,
    /// `host.log` lines dropped over a message's log budget.
    pub log_dropped: AtomicU64,
    /// Messages parked as suspected poison (the session died with them in
    /// flight `session_death_limit` times).
    pub poison_parked: AtomicU64,
    /// Deaths of a broker session (the consume connection or the reply
    /// connection) with messages at risk, by `suspects::Verdict`.
    session_deaths: [AtomicU64; 4],
    /// Times a missing queue of the pipeline (its DLQ, a retry tier) was
    /// declared again because a copy could not be routed to it.
    pub topology_repairs: AtomicU64,
    /// Outputs, replies and headers the allow-list refused, by `DenyKind`.
    denied: [AtomicU64; 3],
    /// Rate limit and circuit breaker.
    pub downstream: Arc<DownstreamMetrics>,
    /// Outbound HTTP of the plugin (`[pipeline.http]`).
    pub http: Arc<HttpMetrics>,
}

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

    /// Count a plugin failure.
    pub fn failure(&self, kind: FailureKind) {
        if let Some(c) = self.failures.get(kind.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count `n` refusals of the allow-list.
    pub fn denied(&self, kind: DenyKind, n: u64) {
        if let Some(i) = DenyKind::ALL.iter().position(|k| *k == kind) {
            self.denied[i].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Count a death of a session with messages at risk, by what it was
    /// charged to.
    pub fn session_death(&self, v: Verdict) {
        if let Some(i) = Verdict::ALL.iter().position(|x| *x == v) {
            self.session_deaths[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Deaths with this verdict so far.
    pub fn session_death_count(&self, v: Verdict) -> u64 {
        Verdict::ALL
            .iter()
            .position(|x| *x == v)
            .map_or(0, |i| self.session_deaths[i].load(Ordering::Relaxed))
    }

    /// Refusals of this kind so far.
    pub fn denied_count(&self, kind: DenyKind) -> u64 {
        DenyKind::ALL
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.denied[i].load(Ordering::Relaxed))
    }

    /// Plugin failures of this kind so far.
    pub fn failure_count(&self, kind: FailureKind) -> u64 {
        self.failures
            .get(kind.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Record the duration of one plugin call.
    pub fn observe_handle(&self, d: Duration) {
        self.histograms.handle.observe(d.as_secs_f64());
    }

    /// Record how long a message's effects took from publishing to confirmed.
    pub fn observe_confirm(&self, d: Duration) {
        self.histograms.confirm.observe(d.as_secs_f64());
    }

    /// Record the time from the producer's `timestamp` to handled.
    pub fn observe_end_to_end(&self, d: Duration) {
        self.histograms.end_to_end.observe(d.as_secs_f64());
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

    /// True when every pipeline is attached to the broker (a crashed one
    /// never is again).
    pub fn ready(&self) -> bool {
        self.pipelines
            .iter()
            .all(|p| p.status.connected.load(Ordering::Relaxed) && p.status.crashed().is_none())
    }

    /// Readiness detail as JSON.
    pub fn readiness_json(&self) -> serde_json::Value {
        let pipelines: Vec<_> = self
            .pipelines
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name,
                    "connected": p.status.connected.load(Ordering::Relaxed),
                    "broker_node": p.status.node(),
                    "plugin_version": p.plugin.version(),
                    "plugin_file_missing": p.plugin.missing.load(Ordering::Relaxed),
                    "last_reload_error": p.plugin.last_reload_error(),
                    "last_broker_error": p.status.last_broker_error(),
                    "last_effect_error": p.status.last_effect_error(),
                    "blocked": p.status.blocked_reason(),
                    "crashed": p.status.crashed(),
                    "circuit": super::downstream::circuit_json(&p.downstream),
                })
            })
            .collect();
        // An open breaker is "degraded": the process is fine and must not be
        // restarted, so it does not make the endpoint answer "not ready".
        let degraded = self.pipelines.iter().any(|p| p.downstream.degraded());
        let status = match (self.ready(), degraded) {
            (false, _) => "not_ready",
            (true, true) => "degraded",
            (true, false) => "ready",
        };
        serde_json::json!({ "ready": self.ready(), "status": status, "pipelines": pipelines })
    }

    /// The Prometheus text exposition format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(self.pipelines.clone())));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "rendering the metrics failed");
        }
        out
    }
}

/// One scrape: reads every pipeline's atomics into constant metrics.
#[derive(Debug)]
struct Scrape(Vec<Arc<PipelineMetrics>>);

/// A sample's value.
enum Value<'a> {
    Counter(u64),
    Seconds(f64),
    Gauge(i64),
    Histogram(&'a Histogram),
}

/// Label set of one sample: always the pipeline, sometimes one more.
type Labels<'a> = Vec<(&'static str, &'a str)>;

impl Scrape {
    /// One metric family: `samples` gives each pipeline's samples.
    fn family<'p>(
        &'p self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        kind: MetricType,
        samples: impl Fn(&'p PipelineMetrics) -> Vec<(Option<(&'static str, &'p str)>, Value<'p>)>,
    ) -> std::fmt::Result {
        let mut family = enc.encode_descriptor(name, help, None, kind)?;
        for p in &self.0 {
            for (extra, value) in samples(p) {
                let mut labels: Labels<'_> = vec![("pipeline", p.name.as_str())];
                labels.extend(extra);
                let m = family.encode_family(&labels)?;
                match value {
                    Value::Counter(v) => ConstCounter::new(v).encode(m)?,
                    Value::Seconds(v) => ConstCounter::new(v).encode(m)?,
                    Value::Gauge(v) => ConstGauge::new(v).encode(m)?,
                    Value::Histogram(h) => h.encode(m)?,
                }
            }
        }
        Ok(())
    }
}

fn one<'p>(v: Value<'p>) -> Vec<(Option<(&'static str, &'p str)>, Value<'p>)> {
    vec![(None, v)]
}

fn flag(b: bool) -> Value<'static> {
    Value::Gauge(i64::from(b))
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge, Histogram as Hist};
        let r = Ordering::Relaxed;
        let count = |a: &AtomicU64| Value::Counter(a.load(r));
        // Counters are named without `_total`: the encoder appends it.
        self.family(
            &mut enc,
            "warren_messages",
            "Deliveries settled, by outcome.",
            Counter,
            |p| {
                Disposition::ALL
                    .iter()
                    .map(|d| {
                        (
                            Some(("outcome", d.label())),
                            Value::Counter(p.outcome_count(*d)),
                        )
                    })
                    .collect()
            },
        )?;
        self.family(
            &mut enc,
            "warren_plugin_failures",
            "Plugin calls that failed, by kind.",
            Counter,
            |p| {
                FailureKind::ALL
                    .iter()
                    .map(|k| {
                        (
                            Some(("kind", k.label())),
                            Value::Counter(p.failure_count(*k)),
                        )
                    })
                    .collect()
            },
        )?;
        self.family(
            &mut enc,
            "warren_requeued",
            "Deliveries requeued because an effect was not confirmed.",
            Counter,
            |p| one(count(&p.requeued)),
        )?;
        self.family(
            &mut enc,
            "warren_published",
            "Plugin outputs and replies confirmed by the broker.",
            Counter,
            |p| one(count(&p.published)),
        )?;
        self.family(
            &mut enc,
            "warren_unroutable",
            "Plugin outputs the broker could not route.",
            Counter,
            |p| one(count(&p.unroutable)),
        )?;
        self.family(
            &mut enc,
            "warren_settle_failures",
            "Acks the broker connection could not carry; those deliveries are redelivered.",
            Counter,
            |p| one(count(&p.settle_failures)),
        )?;
        self.family(
            &mut enc,
            "warren_in_flight",
            "Deliveries being handled: taken by a worker, not yet settled.",
            Gauge,
            |p| one(Value::Gauge(p.in_flight.load(r))),
        )?;
        self.family(
            &mut enc,
            "warren_handle_seconds",
            "Time spent in plugin calls.",
            Hist,
            |p| one(Value::Histogram(&p.histograms.handle)),
        )?;
        self.family(&mut enc, "warren_publish_confirm_seconds", "Time from publishing a message's effects (outputs, reply, retry or DLQ copy) to the broker's confirms.", Hist, |p| one(Value::Histogram(&p.histograms.confirm)))?;
        self.family(&mut enc, "warren_end_to_end_seconds", "Time from the producer's AMQP timestamp (1 s resolution) to handled; messages without one are not observed.", Hist, |p| one(Value::Histogram(&p.histograms.end_to_end)))?;
        self.family(
            &mut enc,
            "warren_broker_connected",
            "1 when the pipeline's consumer is attached.",
            Gauge,
            |p| one(flag(p.status.connected.load(r))),
        )?;
        self.family(
            &mut enc,
            "warren_reconnects",
            "Broker reconnections.",
            Counter,
            |p| one(count(&p.reconnects)),
        )?;
        let versions: Vec<String> = self.0.iter().map(|p| p.plugin.version()).collect();
        let mut info =
            enc.encode_descriptor("warren_plugin_info", "Active plugin version.", None, Gauge)?;
        for (p, v) in self.0.iter().zip(&versions) {
            let labels: Labels<'_> = vec![("pipeline", p.name.as_str()), ("version", v.as_str())];
            ConstGauge::new(1i64).encode(info.encode_family(&labels)?)?;
        }
        self.family(
            &mut enc,
            "warren_plugin_reloads",
            "Plugin reloads, by result.",
            Counter,
            |p| {
                vec![
                    (
                        Some(("result", "ok")),
                        Value::Counter(p.plugin.reload_count()),
                    ),
                    (
                        Some(("result", "failed")),
                        Value::Counter(p.plugin.reload_failure_count()),
                    ),
                ]
            },
        )?;
        self.family(
            &mut enc,
            "warren_plugin_loads",
            "Plugin loads, by where the compiled code came from.",
            Counter,
            |p| {
                CACHE_SOURCES
                    .iter()
                    .map(|k| {
                        (
                            Some(("source", *k)),
                            Value::Counter(p.plugin.cache_count(k)),
                        )
                    })
                    .collect()
            },
        )?;
        self.family(
            &mut enc,
            "warren_plugin_file_missing",
            "1 while the plugin file is gone (the loaded version serves).",
            Gauge,
            |p| one(flag(p.plugin.missing.load(r))),
        )?;
        self.family(
            &mut enc,
            "warren_broker_blocked",
            "1 while the broker blocks the pipeline's connection (resource alarm).",
            Gauge,
            |p| one(flag(p.status.blocked())),
        )?;
        self.family(&mut enc, "warren_prefetch", "Prefetch of the pipeline's consumer: the configured one, or less to keep max_in_flight_mb.", Gauge, |p| one(Value::Gauge(i64::try_from(p.prefetch.load(r)).unwrap_or(i64::MAX))))?;
        self.family(
            &mut enc,
            "warren_plugin_log_dropped",
            "host.log lines dropped over a message's limits.max_log_lines or max_log_kib.",
            Counter,
            |p| one(count(&p.log_dropped)),
        )?;
        self.family(&mut enc, "warren_poison_parked", "Messages parked in the DLQ because the broker session died with them in flight session_death_limit times.", Counter, |p| one(count(&p.poison_parked)))?;
        self.family(
            &mut enc,
            "warren_session_deaths",
            "Deaths of a broker session (consume or reply connection) with messages at risk, by verdict: charged to them (session_death_limit), or not because the connection was blocked, closed with CONNECTION_FORCED, or a reply connection died with several replies at risk.",
            Counter,
            |p| {
                Verdict::ALL
                    .iter()
                    .map(|v| {
                        (
                            Some(("verdict", v.label())),
                            Value::Counter(p.session_death_count(*v)),
                        )
                    })
                    .collect()
            },
        )?;
        self.family(
            &mut enc,
            "warren_topology_repairs",
            "Missing queues of the pipeline declared again after a copy could not reach them.",
            Counter,
            |p| one(count(&p.topology_repairs)),
        )?;
        super::outbound::encode(&self.0, &mut enc)?;
        self.family(
            &mut enc,
            "warren_denied",
            "What the publish allow-list refused: outputs (publish), replies (reply) and plugin headers removed (header).",
            Counter,
            |p| {
                DenyKind::ALL
                    .iter()
                    .map(|k| (Some(("kind", k.label())), Value::Counter(p.denied_count(*k))))
                    .collect()
            },
        )?;
        self.family(
            &mut enc,
            "warren_rate_limited_seconds",
            "Time the pipeline waited for a rate_limit token before taking a delivery.",
            Counter,
            |p| one(Value::Seconds(p.downstream.rate_limited_seconds())),
        )?;
        self.family(
            &mut enc,
            "warren_rate_limit_consumers",
            "Consumers of the queue a cluster-scoped rate_limit is divided by (0: not shared).",
            Gauge,
            |p| {
                one(Value::Gauge(
                    i64::try_from(p.downstream.rate_share()).unwrap_or(i64::MAX),
                ))
            },
        )?;
        self.family(
            &mut enc,
            "warren_circuit_state",
            "Circuit breaker: 0 closed, 1 open, 2 half-open.",
            Gauge,
            |p| {
                one(Value::Gauge(
                    i64::try_from(p.downstream.circuit_gauge()).unwrap_or(i64::MAX),
                ))
            },
        )?;
        self.family(
            &mut enc,
            "warren_circuit_opened",
            "Times the circuit breaker opened (a failed half-open probe included).",
            Counter,
            |p| one(Value::Counter(p.downstream.opened_count())),
        )?;
        self.family(
            &mut enc,
            "warren_circuit_returned",
            "Prefetched deliveries returned to the queue unhandled because the breaker was open.",
            Counter,
            |p| one(Value::Counter(p.downstream.returned_count())),
        )?;
        self.family(
            &mut enc,
            "warren_pipeline_crashed",
            "1 after the pipeline's task panicked (it consumes no more until warren restarts).",
            Gauge,
            |p| one(flag(p.status.crashed().is_some())),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms_with_their_labels() {
        let m = Metrics::new(["a\"b"]);
        let p = m.pipeline("a\"b").unwrap();
        p.outcome(Disposition::Ack);
        p.failure(FailureKind::Timeout);
        p.observe_handle(Duration::from_millis(3));
        p.observe_end_to_end(Duration::from_secs(4));
        p.plugin.set_version("abc");
        let text = m.render();
        for line in [
            "# TYPE warren_messages_total counter",
            r#"warren_messages_total{pipeline="a\"b",outcome="ack"} 1"#,
            r#"warren_plugin_failures_total{pipeline="a\"b",kind="timeout"} 1"#,
            r#"warren_plugin_failures_total{pipeline="a\"b",kind="trap"} 0"#,
            "# TYPE warren_handle_seconds histogram",
            r#"warren_handle_seconds_bucket{pipeline="a\"b",le="0.0025"} 0"#,
            r#"warren_handle_seconds_bucket{pipeline="a\"b",le="0.005"} 1"#,
            r#"warren_handle_seconds_count{pipeline="a\"b"} 1"#,
            r#"warren_end_to_end_seconds_bucket{pipeline="a\"b",le="2"} 0"#,
            r#"warren_end_to_end_seconds_bucket{pipeline="a\"b",le="5"} 1"#,
            r#"warren_plugin_info{pipeline="a\"b",version="abc"} 1"#,
            "# TYPE warren_broker_blocked gauge",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn every_metric_the_grafana_dashboard_queries_exists() {
        let dashboard = include_str!("../../../deploy/grafana/warren.json");
        let text = Metrics::new(["p"]).render();
        let mut names: Vec<&str> = dashboard
            .match_indices("warren_")
            .map(|(i, _)| {
                let rest = &dashboard[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .filter(|n| n.len() > "warren_".len())
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() > 10, "{names:?}");
        for name in names {
            // Histograms are queried by their `_bucket` series and described
            // by their stem; a family without samples yet still has its TYPE.
            let stem = name.strip_suffix("_bucket").unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {stem} ")),
                "the dashboard queries {name}, which /metrics does not have"
            );
        }
    }
}
