//! The rate-limit and circuit-breaker state of a pipeline as the limiter and
//! the breaker report it: counters, the breaker's gauge and its next probe.
//! `ops` reads it for `/metrics` and `/healthz/ready`.

use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// One pipeline's rate-limit and breaker metrics (shared with its
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

    /// Whether the pipeline has a breaker at all.
    pub fn has_breaker(&self) -> bool {
        self.has_breaker.load(Ordering::Relaxed) != 0
    }

    /// When an open breaker probes next.
    pub fn next_probe(&self) -> Option<SystemTime> {
        self.next_probe.read().ok().and_then(|g| *g)
    }
}
