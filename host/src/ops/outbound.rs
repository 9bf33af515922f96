//! Plugins' outbound HTTP (`[pipeline.http]`) as `/metrics` shows it. Label
//! values are bounded by the configuration: `host` is the allow-list rule
//! that matched, never the URL a plugin made up, and `status` a response
//! status code or one of a few failure words.

use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

use super::PipelineMetrics;

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
        for ((rule, status), n) in &p.http.requests() {
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
        p.http.duration().encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}
