//! Operations: metrics kept by every pipeline and the HTTP endpoint that
//! exposes them with liveness and readiness.

mod downstream;
mod http;
mod metrics;
mod outbound;
mod status;

pub use http::serve;
pub use metrics::{DenyKind, FailureKind, Metrics, PipelineMetrics};
pub use status::PipelineStatus;
