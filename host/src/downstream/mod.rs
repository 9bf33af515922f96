//! Protecting the services a plugin calls: a per-pipeline rate limit
//! ([`ratelimit`]) and circuit breaker ([`breaker`]), and their metrics.
//!
//! Both sit between the pipeline's consumer and the plugin call, and both act
//! by not taking deliveries rather than by refusing them: a rate-limited
//! pipeline waits for a token while holding its consumer, an open breaker
//! cancels its consumer. Messages wait in the queue (or the prefetch window)
//! untouched; nothing is nacked in a loop and no attempt is spent.

pub mod breaker;
pub mod ratelimit;

use std::fmt::Write as _;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

pub use breaker::{Admission, Breaker, BreakerConfig, Phase, Ticket};
pub use ratelimit::{Limiter, RateLimit, RateScope};

/// One pipeline's rate-limit and breaker metrics (part of its
/// `PipelineMetrics`).
#[derive(Debug, Default)]
pub struct DownstreamMetrics {
    /// Time the pipeline's consumer waited for a rate-limit token, in ns.
    rate_limited_ns: AtomicU64,
    /// 0 closed, 1 open, 2 half-open (`Phase::gauge`).
    circuit_state: AtomicU64,
    circuit_opened: AtomicU64,
    /// Deliveries returned to the queue unhandled because the breaker was
    /// open (the prefetch window when it opened).
    circuit_returned: AtomicU64,
    /// When an open breaker probes next.
    next_probe: RwLock<Option<SystemTime>>,
    /// Whether the pipeline has a breaker at all (for readiness).
    has_breaker: AtomicU64,
    /// Consumers a cluster-scoped rate limit is divided by (0: not shared).
    rate_share: AtomicU64,
}

impl DownstreamMetrics {
    pub fn rate_limited(&self, waited: Duration) {
        self.rate_limited_ns.fetch_add(
            u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Seconds spent waiting for rate-limit tokens.
    pub fn rate_limited_seconds(&self) -> f64 {
        self.rate_limited_ns.load(Ordering::Relaxed) as f64 / 1e9
    }

    pub fn set_rate_share(&self, consumers: u32) {
        self.rate_share
            .store(u64::from(consumers), Ordering::Relaxed);
    }

    /// Consumers a cluster-scoped rate limit is shared by now (0: not shared).
    pub fn rate_share(&self) -> u64 {
        self.rate_share.load(Ordering::Relaxed)
    }

    pub fn set_circuit(&self, gauge: u64, next_probe: Option<SystemTime>) {
        self.has_breaker.store(1, Ordering::Relaxed);
        self.circuit_state.store(gauge, Ordering::Relaxed);
        if let Ok(mut g) = self.next_probe.write() {
            *g = next_probe;
        }
    }

    pub fn opened(&self) {
        self.circuit_opened.fetch_add(1, Ordering::Relaxed);
    }

    pub fn returned(&self) {
        self.circuit_returned.fetch_add(1, Ordering::Relaxed);
    }

    /// `warren_circuit_state` now.
    pub fn circuit_gauge(&self) -> u64 {
        self.circuit_state.load(Ordering::Relaxed)
    }

    pub fn opened_count(&self) -> u64 {
        self.circuit_opened.load(Ordering::Relaxed)
    }

    pub fn returned_count(&self) -> u64 {
        self.circuit_returned.load(Ordering::Relaxed)
    }

    /// True while the breaker is open or half-open: the pipeline works, at
    /// most at a trickle; readiness says "degraded", not "not ready".
    pub fn degraded(&self) -> bool {
        self.circuit_gauge() != 0
    }

    /// The `circuit` member of a pipeline in `/healthz/ready`: `null` without
    /// a breaker.
    pub fn readiness_json(&self) -> serde_json::Value {
        if self.has_breaker.load(Ordering::Relaxed) == 0 {
            return serde_json::Value::Null;
        }
        let state = match self.circuit_gauge() {
            0 => "closed",
            1 => "open",
            _ => "half_open",
        };
        let next = self.next_probe.read().ok().and_then(|g| *g);
        serde_json::json!({
            "state": state,
            "next_probe_at": next.map(crate::disposition::rfc3339),
            "next_probe_in_ms": next.map(|t| {
                t.duration_since(SystemTime::now()).map_or(0, |d| d.as_millis() as u64)
            }),
        })
    }

    /// Append this pipeline's lines of the families below to `out`;
    /// `labels` is `pipeline="..."`.
    fn render_family(&self, family: &str, labels: &str, out: &mut String) {
        let r = Ordering::Relaxed;
        let _ = match family {
            "warren_rate_limited_seconds_total" => {
                writeln!(out, "{family}{{{labels}}} {}", self.rate_limited_seconds())
            }
            "warren_circuit_state" => {
                writeln!(out, "{family}{{{labels}}} {}", self.circuit_state.load(r))
            }
            "warren_rate_limit_consumers" => {
                writeln!(out, "{family}{{{labels}}} {}", self.rate_share.load(r))
            }
            "warren_circuit_opened_total" => {
                writeln!(out, "{family}{{{labels}}} {}", self.circuit_opened.load(r))
            }
            _ => writeln!(
                out,
                "{family}{{{labels}}} {}",
                self.circuit_returned.load(r)
            ),
        };
    }
}

/// The Prometheus families of this module: (name, type, help).
const FAMILIES: [(&str, &str, &str); 5] = [
    (
        "warren_rate_limited_seconds_total",
        "counter",
        "Time the pipeline waited for a rate_limit token before taking a delivery.",
    ),
    (
        "warren_rate_limit_consumers",
        "gauge",
        "Consumers of the queue a cluster-scoped rate_limit is divided by (0: not shared).",
    ),
    (
        "warren_circuit_state",
        "gauge",
        "Circuit breaker: 0 closed, 1 open, 2 half-open.",
    ),
    (
        "warren_circuit_opened_total",
        "counter",
        "Times the circuit breaker opened (a failed half-open probe included).",
    ),
    (
        "warren_circuit_returned_total",
        "counter",
        "Prefetched deliveries returned to the queue unhandled because the breaker was open.",
    ),
];

/// Render this module's families for `pipelines` (name, metrics) into `out`.
pub fn render<'a>(
    pipelines: impl Iterator<Item = (&'a str, &'a DownstreamMetrics)> + Clone,
    escape: impl Fn(&str) -> String,
    out: &mut String,
) {
    for (family, kind, help) in FAMILIES {
        let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} {kind}");
        for (name, m) in pipelines.clone() {
            let labels = format!("pipeline=\"{}\"", escape(name));
            m.render_family(family, &labels, out);
        }
    }
}
