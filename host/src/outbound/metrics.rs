//! Counters of one pipeline's outbound HTTP, updated as requests go out;
//! `ops` reads them for `/metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;

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

    /// Requests sent so far, by (rule, status).
    pub fn requests(&self) -> BTreeMap<(String, String), u64> {
        self.requests.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Time from each request to its response head.
    pub fn duration(&self) -> &Histogram {
        &self.duration
    }
}
