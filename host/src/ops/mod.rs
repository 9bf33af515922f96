//! Operations: metrics kept by every pipeline and the HTTP endpoint that
//! exposes them with liveness and readiness.

mod downstream;
mod http;
mod metrics;
mod outbound;

pub use http::serve;
pub use metrics::{DenyKind, FailureKind, Metrics, PipelineMetrics};
