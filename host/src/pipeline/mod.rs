//! A running pipeline: a supervisor that (re)connects, declares the topology and
//! consumes; worker threads that run the plugin on each delivery; and settling
//! each delivery according to `disposition`. One bad message never stops the
//! loop.
//!
//! The path of a delivery: one of the pipeline's `concurrency` worker threads
//! takes it from the consumer, instantiates the plugin, calls it and decides
//! the disposition. An outcome with nothing to publish (a plain ack) is settled
//! right there; one with publications is started on the worker and finished by
//! an async task that waits for the broker's confirms and only then settles.
//! Settling goes through the consume channel's [`Settler`](crate::broker::Settler), which batches acks
//! without ever acking a delivery before its own effects are confirmed or past
//! one that is not settled yet (at-least-once).
//!
//! Why threads of the pipeline's own rather than a consumer task that calls
//! `spawn_blocking` per message: a plugin call is synchronous and often takes
//! microseconds, so handing a message from thread to thread costs as much as
//! the call, and each hand-off adds a wake-up to an RPC's latency. Workers take
//! turns waiting on the consumer (leader/followers), so a delivery is handled
//! on the thread that received it, the async side is not involved at all for
//! a plain ack, and one pipeline's calls never wait for another's threads.
//!
//! # Layout
//!
//! * this file: [`Pipeline`], what a pipeline's tasks share across sessions.
//! * `supervisor`: connect, declare and consume; reconnect with backoff;
//!   drain what is in flight when a session ends.
//! * `work`: one session's state and its worker threads (leader/followers
//!   on the consumer, pacing for the rate limit and the breaker).
//! * `steer`: changing the consumer (another prefetch, the breaker's pause
//!   and probe) and its end.
//! * `handle`: one message, from the plugin call to its settlement.
//! * `parked`: the waker that lets a worker start a publish before the
//!   async runtime takes it over.

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use crate::allow::PublishPolicy;
use crate::budget::Budget;
use crate::config::PipelineConfig;
use crate::disposition::PipelineInfo;
use crate::downstream::{self, Breaker, Limiter};
use crate::ops::PipelineMetrics;
use crate::plugins::PluginSlot;
use crate::retry::RetryTiers;
use crate::runtime::InvokeLimits;
use crate::secret::PluginSettings;
use crate::suspects::Ledger;

/// An event about one message (`$about`) of pipeline `$p`, carrying the fields
/// that identify it: the per-message span that also has them is DEBUG.
macro_rules! message_event {
    ($level:expr, $p:expr, $about:expr, $($rest:tt)+) => {
        tracing::event!(
            $level,
            pipeline = %$p.info.name,
            queue = %$p.config.queue,
            plugin = $about.plugin.name(),
            version = $about.plugin.version(),
            attempt = $about.attempt,
            $($rest)+
        )
    };
}

mod handle;
mod parked;
mod replies;
mod steer;
mod supervisor;
mod work;

/// A mutex that nothing panics while holding: a poisoned one is still whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Everything a pipeline's tasks share.
#[derive(Debug)]
pub struct Pipeline {
    pub config: PipelineConfig,
    pub info: PipelineInfo,
    pub slot: Arc<PluginSlot>,
    pub metrics: Arc<PipelineMetrics>,
    plugin_config: PluginSettings,
    limits: InvokeLimits,
    /// Outbound HTTP granted by `[pipeline.http]`; `None` denies every request.
    http: Option<Arc<crate::outbound::HttpPolicy>>,
    /// Deliveries requeued in a row because their effects were refused; sets
    /// the back-off before the next requeue, reset by any confirmed effects.
    requeue_streak: AtomicU32,
    /// Session deaths per message in flight at the time (poison messages).
    ledger: Ledger,
    /// The bytes held in deliveries, bounded through the prefetch.
    budget: Budget,
    /// `rate_limit`: tokens the consumer's leader waits for.
    limiter: Option<Arc<Limiter>>,
    /// `circuit_breaker`: lives across sessions, like the ledger.
    breaker: Option<Arc<Breaker>>,
}

impl Pipeline {
    /// Assemble a pipeline around an already loaded plugin; `policy` says
    /// where its outputs and replies may go.
    pub fn new(
        config: PipelineConfig,
        slot: Arc<PluginSlot>,
        metrics: Arc<PipelineMetrics>,
        policy: PublishPolicy,
    ) -> Self {
        let info = PipelineInfo {
            name: config.name.as_str().into(),
            queue: config.queue.clone(),
            dlq: config.dlq_name(),
            tiers: RetryTiers::new(&config.retry),
            policy: Arc::new(policy),
        };
        let limits = InvokeLimits {
            timeout: config.limits.timeout(),
            memory_bytes: config.limits.memory_bytes(),
            log_lines: config.limits.max_log_lines,
            log_bytes: config.limits.max_log_bytes(),
            messages_per_instance: config.messages_per_instance(),
        };
        metrics.plugin.set_version(slot.current().version());
        // A rate-limited pipeline's prefetch holds at most PREFETCH_SPAN of
        // calls: the rest wait in the queue, not unacked in the window.
        let prefetch = match config.rate_limit() {
            Ok(Some(limit)) => config
                .prefetch
                .min(limit.prefetch_cap(downstream::ratelimit::PREFETCH_SPAN)),
            _ => config.prefetch,
        };
        let budget = Budget::new(
            usize::try_from(config.max_in_flight_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
            prefetch,
        );
        // `validate` refused a bad rate_limit; one that fails here anyway is
        // said, not silently dropped.
        let limiter = match config.rate_limit() {
            Ok(limit) => limit.map(|l| Arc::new(Limiter::new(l, config.rate_limit_scope))),
            Err(e) => {
                tracing::error!(pipeline = %info.name, error = %format!("{e:#}"), "rate_limit ignored");
                None
            }
        };
        let breaker = config.circuit_breaker.clone().map(|c| {
            Arc::new(Breaker::new(
                c,
                info.name.clone(),
                metrics.downstream.clone(),
            ))
        });
        // The rules were checked with the configuration, so this cannot fail
        // in practice; if it did, HTTP stays denied rather than open.
        let http = {
            use crate::outbound::HttpPolicy;
            let deny = || HttpPolicy::deny_all(&config.name, metrics.http.clone());
            let policy = match &config.http {
                None => deny(),
                Some(h) => HttpPolicy::new(&config.name, h, metrics.http.clone()).unwrap_or_else(|e| {
                    tracing::error!(pipeline = %config.name, error = %format!("{e:#}"), "outbound HTTP denied");
                    deny()
                }),
            };
            Some(Arc::new(policy))
        };
        Self {
            plugin_config: PluginSettings::new(&config.config),
            config,
            info,
            slot,
            metrics,
            limits,
            http,
            requeue_streak: AtomicU32::new(0),
            ledger: Ledger::default(),
            budget,
            limiter,
            breaker,
        }
    }
}
