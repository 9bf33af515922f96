//! Counters of plugins' outbound HTTP, rendered with the pipeline's other
//! metrics. Label values are bounded by the configuration: `host` is the
//! allow-list rule that matched, never the URL a plugin made up, and `status`
//! a response status code or one of a few failure words.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the request-duration histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One pipeline's outbound HTTP counters.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// (rule, status) -> requests.
    requests: Mutex<BTreeMap<(String, String), u64>>,
    denied: AtomicU64,
    /// Requests per bucket of `BUCKETS` (not cumulative), then the rest.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    micros: AtomicU64,
}

impl HttpMetrics {
    /// Count a request that was sent: `status` is the response status or
    /// `error` / `timeout`; `elapsed` runs from the request to its response
    /// head (or failure).
    pub(crate) fn request(&self, rule: &str, status: &str, elapsed: Duration) {
        if let Ok(mut m) = self.requests.lock() {
            let n = m.entry((rule.to_string(), status.to_string())).or_insert(0);
            *n = n.saturating_add(1);
        }
        let secs = elapsed.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Count a request refused before any connection.
    pub(crate) fn denied(&self) {
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

/// The HTTP families for these pipelines, in Prometheus text format.
pub(crate) fn render(out: &mut String, pipelines: &[std::sync::Arc<crate::ops::PipelineMetrics>]) {
    let r = Ordering::Relaxed;
    let _ = writeln!(
        out,
        "# HELP warren_http_requests_total Outbound HTTP requests of plugins, by allow-list rule and response status (or error, timeout).\n# TYPE warren_http_requests_total counter"
    );
    for p in pipelines {
        let l = format!("pipeline=\"{}\"", crate::ops::escape_label(&p.name));
        if let Ok(m) = p.http.requests.lock() {
            for ((rule, status), n) in m.iter() {
                let rule = crate::ops::escape_label(rule);
                let _ = writeln!(
                    out,
                    "warren_http_requests_total{{{l},host=\"{rule}\",status=\"{status}\"}} {n}"
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP warren_http_denied_total Outbound HTTP requests of plugins refused before any connection.\n# TYPE warren_http_denied_total counter"
    );
    for p in pipelines {
        let l = format!("pipeline=\"{}\"", crate::ops::escape_label(&p.name));
        let _ = writeln!(
            out,
            "warren_http_denied_total{{{l}}} {}",
            p.http.denied.load(r)
        );
    }
    let _ = writeln!(
        out,
        "# HELP warren_http_request_seconds Time from an outbound HTTP request to its response head.\n# TYPE warren_http_request_seconds histogram"
    );
    for p in pipelines {
        let l = format!("pipeline=\"{}\"", crate::ops::escape_label(&p.name));
        let mut cumulative: u64 = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative = cumulative.saturating_add(p.http.buckets[i].load(r));
            let _ = writeln!(
                out,
                "warren_http_request_seconds_bucket{{{l},le=\"{b}\"}} {cumulative}"
            );
        }
        cumulative = cumulative.saturating_add(p.http.buckets[BUCKETS.len()].load(r));
        let _ = writeln!(
            out,
            "warren_http_request_seconds_bucket{{{l},le=\"+Inf\"}} {cumulative}"
        );
        let secs = p.http.micros.load(r) as f64 / 1e6;
        let _ = writeln!(out, "warren_http_request_seconds_sum{{{l}}} {secs}");
        let _ = writeln!(out, "warren_http_request_seconds_count{{{l}}} {cumulative}");
    }
}
