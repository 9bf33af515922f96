//! Operations: metrics kept by every pipeline and the HTTP endpoint that
//! exposes them with liveness and readiness.

mod http;
mod metrics;

pub use http::serve;
pub(crate) use metrics::escape as escape_label;
pub use metrics::{Metrics, PipelineMetrics};
