//! The bytes a pipeline holds in deliveries: bounded by `max_in_flight_mb`
//! through the prefetch.
//!
//! RabbitMQ hands a consumer up to `prefetch` unacked deliveries, whatever
//! their size (AMQP's `prefetch_size` is not implemented by RabbitMQ), and
//! warren holds each in memory from its arrival until it is settled: prefetch
//! 256 with 5 MB bodies is over a gigabyte. So the prefetch a consumer gets is
//! what the budget allows for the largest body the pipeline has seen since the
//! start: `budget / largest`, at least 1, at most the configured `prefetch`.
//! Until a first body has been seen, a consumer starts with at most
//! [`SLOW_START`]; after that, a body larger than any before lowers the
//! prefetch (by moving to a new consumer with the new prefetch on the same
//! channel, since RabbitMQ applies a changed prefetch to new consumers only).
//! The only deliveries the budget cannot see coming are the window that was
//! already on its way when a larger size first appeared.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Prefetch of a pipeline's first consumer, before any size is known.
pub const SLOW_START: u16 = 8;

/// One pipeline's budget.
#[derive(Debug)]
pub struct Budget {
    /// Bytes; 0 means no budget (the configured prefetch, always).
    bytes: usize,
    configured: u16,
    /// Largest body seen since the start (0: none yet).
    largest: AtomicUsize,
}

impl Budget {
    pub fn new(bytes: usize, configured: u16) -> Self {
        Self {
            bytes,
            configured: configured.max(1),
            largest: AtomicUsize::new(0),
        }
    }

    /// The prefetch to start a consumer with.
    pub fn prefetch(&self) -> u16 {
        if self.bytes == 0 {
            return self.configured;
        }
        match self.largest.load(Ordering::Relaxed) {
            0 => self.configured.min(SLOW_START),
            largest => self.allowed(largest),
        }
    }

    /// Record a delivery of `len` bytes taken while the consumer has
    /// `current` as its prefetch; the prefetch the budget wants instead, if
    /// another.
    pub fn observe(&self, len: usize, current: u16) -> Option<u16> {
        if self.bytes == 0 {
            return None;
        }
        let largest = self
            .largest
            .fetch_max(len.max(1), Ordering::Relaxed)
            .max(len.max(1));
        let want = self.allowed(largest);
        (want != current).then_some(want)
    }

    fn allowed(&self, largest: usize) -> u16 {
        let n = self.bytes / largest.max(1);
        u16::try_from(n)
            .unwrap_or(u16::MAX)
            .clamp(1, self.configured)
    }
}

#[cfg(test)]
mod tests {
    use super::{Budget, SLOW_START};

    const MIB: usize = 1 << 20;

    #[test]
    fn prefetch_follows_the_largest_body_within_the_configured_one() {
        let b = Budget::new(256 * MIB, 256);
        assert_eq!(b.prefetch(), SLOW_START);
        // Small messages: the configured prefetch, once a size is known.
        assert_eq!(b.observe(1024, SLOW_START), Some(256));
        assert_eq!(b.observe(1024, 256), None);
        // 5 MB bodies: 53 fit the budget.
        assert_eq!(b.observe(5 * 1_000_000, 256), Some(53));
        assert_eq!(b.prefetch(), 53);
        // Smaller ones later do not raise it again: the largest seen counts.
        assert_eq!(b.observe(10, 53), None);
        // One body over the whole budget: one at a time.
        assert_eq!(b.observe(300 * MIB, 53), Some(1));
    }

    #[test]
    fn no_budget_means_the_configured_prefetch() {
        let b = Budget::new(0, 32);
        assert_eq!(b.prefetch(), 32);
        assert_eq!(b.observe(1 << 30, 32), None);
    }
}
