//! Counters of plugins' outbound HTTP (`[pipeline.http]`), kept here beside
//! the pipeline's other metrics so that `outbound` (which updates them)
//! depends on `ops` and not the other way round. Label values are bounded by
//! the configuration: `host` is the allow-list rule that matched, never the
//! URL a plugin made up, and `status` a response status code or one of a few
//! failure words.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::histogram::Histogram;

use super::PipelineMetrics;

/// Upper bounds of the request-duration histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One pipeline's outbound HTTP counters.
#[derive(Debug)]
pub struct HttpMetrics {
    /// (rule, status) -> requests.
    requests: Mutex<BTreeMap<(String, String), u64>>,
    denied: AtomicU64,
    duration: Histogram,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            denied: AtomicU64::new(0),
            duration: Histogram::new(BUCKETS),
        }
    }
}

impl HttpMetrics {
    /// Count a request that was sent: `status` is the response status or
    /// `error` / `timeout`; `elapsed` runs from the request to its response
    /// head (or failure).
    pub fn request(&self, rule: &str, status: &str, elapsed: Duration) {
        if let Ok(mut m) = self.requests.lock() {
            let n = m.entry((rule.to_string(), status.to_string())).or_insert(0);
            *n = n.saturating_add(1);
        }
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Count a request refused before any connection.
    pub fn denied(&self) {
        self.denied.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests refused so far.
    pub fn denied_count(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    /// Requests sent to `rule` that ended with `status` so far.
    pub fn request_count(&self, rule: &str, status: &str) -> u64 {
        self.requests
            .lock()
            .ok()
            .and_then(|m| m.get(&(rule.to_string(), status.to_string())).copied())
            .unwrap_or(0)
    }
}

/// The HTTP families of these pipelines, for one scrape.
pub(super) fn encode(
    pipelines: &[Arc<PipelineMetrics>],
    enc: &mut DescriptorEncoder,
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(
        "warren_http_requests",
        "Outbound HTTP requests of plugins, by allow-list rule and response status (or error, timeout).",
        None,
        MetricType::Counter,
    )?;
    for p in pipelines {
        let requests = p
            .http
            .requests
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        for ((rule, status), n) in &requests {
            let labels = [
                ("pipeline", p.name.as_str()),
                ("host", rule.as_str()),
                ("status", status.as_str()),
            ];
            ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
        }
    }
    let mut family = enc.encode_descriptor(
        "warren_http_denied",
        "Outbound HTTP requests of plugins refused before any connection.",
        None,
        MetricType::Counter,
    )?;
    for p in pipelines {
        let labels = [("pipeline", p.name.as_str())];
        ConstCounter::new(p.http.denied_count()).encode(family.encode_family(&labels)?)?;
    }
    let mut family = enc.encode_descriptor(
        "warren_http_request_seconds",
        "Time from an outbound HTTP request to its response head.",
        None,
        MetricType::Histogram,
    )?;
    for p in pipelines {
        let labels = [("pipeline", p.name.as_str())];
        p.http.duration.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}
