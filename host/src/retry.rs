//! Retry tiers: the fixed set of delay queues a pipeline uses, and which tier a
//! failed attempt goes to; and [`reserved_shape`], the names of the queues
//! warren declares for a pipeline, which no plugin or setting may use.
//!
//! RabbitMQ expires messages only from the head of a queue, so mixing delays in
//! one queue would make a short delay wait behind a long one. Each tier is its
//! own queue with one queue-level TTL (`x-message-ttl`) whose dead-letter target
//! is the origin queue. Jitter shortens a copy's delay with a per-message
//! `expiration` of at most `jitter` x TTL; within a tier that can only hold a copy
//! back by that fraction, never past the tier's TTL.

use serde::Deserialize;

/// `[pipeline.retry]`: the policy the tiers are made from (it lives here, not
/// in `config`, so that this module needs nothing of the config's).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in total (first delivery included) before dead-lettering.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Delay before the second attempt.
    #[serde(default = "default_initial_delay_ms")]
    pub initial_delay_ms: u64,
    /// Longest delay; the doubling stops here.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// Fraction (0..=0.5) by which a delay may be shortened at random, so that
    /// messages failing together do not come back together.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_delay_ms: default_initial_delay_ms(),
            max_delay_ms: default_max_delay_ms(),
            jitter: default_jitter(),
        }
    }
}

fn default_max_attempts() -> u32 {
    5
}
fn default_initial_delay_ms() -> u64 {
    1_000
}
fn default_max_delay_ms() -> u64 {
    60_000
}
fn default_jitter() -> f64 {
    0.2
}

/// The delays (ms) of a pipeline's retry tiers, ascending, with its jitter.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryTiers {
    delays_ms: Vec<u64>,
    max_attempts: u32,
    jitter: f64,
}

impl RetryTiers {
    /// Tiers from the policy: `initial`, doubling, capped at `max` (always present).
    pub fn new(policy: &RetryConfig) -> Self {
        let mut delays_ms = Vec::new();
        let mut d = policy.initial_delay_ms.max(1);
        while d < policy.max_delay_ms {
            delays_ms.push(d);
            d = d.saturating_mul(2);
        }
        delays_ms.push(policy.max_delay_ms.max(1));
        Self {
            delays_ms,
            max_attempts: policy.max_attempts,
            jitter: policy.jitter,
        }
    }

    /// All tier delays, ascending.
    pub fn delays_ms(&self) -> &[u64] {
        &self.delays_ms
    }

    /// Total attempts allowed.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Tier for the retry after failed attempt `attempt` (1-based): the backoff
    /// schedule doubles per attempt until the longest tier.
    pub fn for_attempt(&self, attempt: u32) -> u64 {
        let i = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        self.delays_ms[i.min(self.delays_ms.len() - 1)]
    }

    /// Tier for a plugin-requested delay: the shortest tier not shorter than it,
    /// or the longest tier.
    pub fn for_request(&self, delay_ms: u64) -> u64 {
        self.delays_ms
            .iter()
            .copied()
            .find(|&d| d >= delay_ms)
            .unwrap_or(self.delays_ms[self.delays_ms.len() - 1])
    }

    /// Per-message expiration for a copy going to tier `tier_ms`; `unit` is a
    /// uniform random number in [0, 1).
    pub fn jittered(&self, tier_ms: u64, unit: f64) -> u64 {
        let cut = (tier_ms as f64 * self.jitter * unit.clamp(0.0, 1.0)) as u64;
        tier_ms.saturating_sub(cut).max(1)
    }
}

/// Name of the tier queue for `queue` with delay `ms`.
pub fn tier_queue(queue: &str, ms: u64) -> String {
    format!("{queue}.retry.{ms}")
}

/// Whether `queue` has the shape of a queue warren declares for some pipeline
/// (`<queue>.dlq`, `<queue>.retry.<digits>`), and which. Such names are
/// refused even when this configuration does not declare them: another warren
/// on the same virtual host does.
pub fn reserved_shape(queue: &str) -> Option<&'static str> {
    if queue.ends_with(".dlq") {
        return Some("a dead-letter queue (<queue>.dlq)");
    }
    match queue.rsplit_once(".retry.") {
        Some((_, ms)) if !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()) => {
            Some("a retry tier (<queue>.retry.<ms>)")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(initial: u64, max: u64) -> RetryConfig {
        RetryConfig {
            max_attempts: 5,
            initial_delay_ms: initial,
            max_delay_ms: max,
            jitter: 0.2,
        }
    }

    #[test]
    fn default_schedule_doubles_to_a_minute() {
        let t = RetryTiers::new(&RetryConfig::default());
        assert_eq!(
            t.delays_ms(),
            &[1000, 2000, 4000, 8000, 16000, 32000, 60000]
        );
        assert_eq!(t.for_attempt(1), 1000);
        assert_eq!(t.for_attempt(3), 4000);
        assert_eq!(t.for_attempt(40), 60000);
    }

    #[test]
    fn requested_delays_round_up_to_a_tier() {
        let t = RetryTiers::new(&policy(100, 1000));
        assert_eq!(t.delays_ms(), &[100, 200, 400, 800, 1000]);
        assert_eq!(t.for_request(0), 100);
        assert_eq!(t.for_request(150), 200);
        assert_eq!(t.for_request(800), 800);
        assert_eq!(t.for_request(5000), 1000);
    }

    #[test]
    fn jitter_only_shortens_within_bounds() {
        let t = RetryTiers::new(&policy(1000, 1000));
        assert_eq!(t.jittered(1000, 0.0), 1000);
        assert_eq!(t.jittered(1000, 0.999_999), 801);
        assert_eq!(t.jittered(1000, 0.5), 900);
    }
}
