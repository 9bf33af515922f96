//! The rate limit and the circuit breaker as `/healthz/ready` shows them.

use std::time::SystemTime;

use crate::downstream::DownstreamMetrics;

/// The `circuit` member of a pipeline in `/healthz/ready`: `null` without a
/// breaker.
pub(super) fn circuit_json(d: &DownstreamMetrics) -> serde_json::Value {
    if !d.has_breaker() {
        return serde_json::Value::Null;
    }
    let state = match d.circuit_gauge() {
        0 => "closed",
        1 => "open",
        _ => "half_open",
    };
    let next = d.next_probe();
    serde_json::json!({
        "state": state,
        "next_probe_at": next.map(crate::disposition::rfc3339),
        "next_probe_in_ms": next.map(|t| {
            t.duration_since(SystemTime::now()).map_or(0, |d| d.as_millis() as u64)
        }),
    })
}
