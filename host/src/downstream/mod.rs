//! Protecting the services a plugin calls: a per-pipeline rate limit
//! ([`ratelimit`]) and circuit breaker ([`breaker`]), and their metrics.
//!
//! Both sit between the pipeline's consumer and the plugin call, and both act
//! by not taking deliveries rather than by refusing them: a rate-limited
//! pipeline waits for a token while holding its consumer, an open breaker
//! cancels its consumer. Messages wait in the queue (or the prefetch window)
//! untouched; nothing is nacked in a loop and no attempt is spent.

pub mod breaker;
mod metrics;
pub mod ratelimit;

pub use breaker::{Admission, Breaker, BreakerConfig, Phase, Ticket};
pub use ratelimit::{Limiter, RateLimit, RateScope};

pub use metrics::DownstreamMetrics;
