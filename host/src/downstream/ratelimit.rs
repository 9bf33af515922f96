//! `rate_limit`: how many plugin calls a pipeline may start per second,
//! minute or hour.
//!
//! A token bucket in GCRA form (one "theoretical arrival time" instead of a
//! token count), sized to a tenth of a second's worth of calls (at least one):
//! a provider's quota is never exceeded by more than that burst, and a rate
//! like `100/min` is spaced evenly (one call every 600 ms) rather than spent
//! in a burst at the start of each minute. Only the worker that holds the
//! pipeline's consumer waits for a token, so while the bucket is empty no
//! further delivery is taken: prefetched ones wait in the consumer, nothing is
//! nacked or requeued.
//!
//! With `rate_limit_scope = "cluster"` the rate is divided by the number of
//! consumers the broker reports on the queue (a passive declare, every
//! [`SHARE_REFRESH`]), so replicas consuming one queue share the limit without
//! talking to each other.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Deserialize;

/// Largest count of a rate (`1000000/s` is already far beyond what one
/// pipeline calls).
pub const MAX_RATE_COUNT: u64 = 1_000_000;

/// How often a cluster-scoped limit reads the queue's consumer count.
pub const SHARE_REFRESH: Duration = Duration::from_secs(5);

/// A rate-limited pipeline's prefetch holds at most this much work at the
/// limit: a delivery must not wait in the prefetch window anywhere near the
/// broker's `consumer_timeout` (30 minutes by default), which would close the
/// channel and bring every unacked delivery back.
pub const PREFETCH_SPAN: Duration = Duration::from_secs(600);

/// RabbitMQ's default `consumer_timeout`.
const CONSUMER_TIMEOUT: Duration = Duration::from_secs(1800);

/// The burst: calls that may start back to back after an idle spell.
const BURST_SPAN_NS: u64 = 100_000_000;

/// `rate_limit = "N/unit"`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Calls per `per`.
    pub count: u64,
    pub per: Duration,
}

impl RateLimit {
    /// Parse `"50/s"`, `"100/min"`, `"3600/h"`, strictly: decimal digits
    /// without sign or leading zero, then `/` and the unit, nothing around
    /// or between them (`" 5/s"`, `"+5/s"`, `"05/s"` and `"5/ s"` are
    /// refused, so a value means one thing only).
    pub fn parse(text: &str) -> Result<Self> {
        let form = "is not of the form N/s, N/min or N/h (digits, no spaces, no sign)";
        let Some((count, unit)) = text.split_once('/') else {
            bail!("rate_limit {text:?} {form}");
        };
        let per = match unit {
            "s" => Duration::from_secs(1),
            "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other if other.trim() != other || other.is_empty() => {
                bail!("rate_limit {text:?} {form}")
            }
            other => bail!("rate_limit {text:?}: unknown unit {other:?} (use s, min or h)"),
        };
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            bail!("rate_limit {text:?}: {count:?} is not a whole number {form}");
        }
        if count.len() > 1 && count.starts_with('0') {
            bail!("rate_limit {text:?}: write the count {count:?} without leading zeros");
        }
        let count: u64 = count
            .parse()
            .map_err(|_| anyhow::anyhow!("rate_limit {text:?}: {count:?} is not a whole number"))?;
        if count == 0 || count > MAX_RATE_COUNT {
            bail!(
                "rate_limit {text:?}: the count must be between 1 and {MAX_RATE_COUNT} \
                 (0 would never call the plugin; leave rate_limit out for no limit)"
            );
        }
        Ok(Self { count, per })
    }

    /// The largest prefetch that holds no more than `span` of calls at this
    /// rate (at least 1).
    pub fn prefetch_cap(&self, span: Duration) -> u16 {
        let calls =
            u128::from(self.count).saturating_mul(span.as_nanos()) / self.per.as_nanos().max(1);
        u16::try_from(calls).unwrap_or(u16::MAX).max(1)
    }

    /// Nanoseconds between two calls when the limit is shared by `share`
    /// consumers.
    fn interval_ns(&self, share: u32) -> u64 {
        let per = u64::try_from(self.per.as_nanos()).unwrap_or(u64::MAX);
        (per / self.count.max(1)).saturating_mul(u64::from(share.max(1)))
    }
}

/// `warren check`'s warning for a pipeline whose rate spaces calls so far
/// apart that the delivery waiting for its turn stays unacked past the
/// broker's default `consumer_timeout`.
/// `spec` is the setting as written.
pub fn warning(pipeline: &str, spec: &str, limit: &RateLimit) -> Option<String> {
    let interval = Duration::from_nanos(limit.interval_ns(1));
    (interval >= CONSUMER_TIMEOUT).then(|| {
        format!(
            "pipeline {:?}: rate_limit {:?} spaces calls {} s apart, and the delivery waiting for \
             its turn stays unacked that long, at or past RabbitMQ's default consumer_timeout of \
             1800 s; the broker would close the channel and redeliver. Use a faster rate or \
             raise consumer_timeout on the broker",
            pipeline,
            spec,
            interval.as_secs()
        )
    })
}

/// `rate_limit_scope`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RateScope {
    /// The limit applies to this process.
    #[default]
    Local,
    /// The limit is shared by every consumer of the queue.
    Cluster,
}

/// The GCRA state: when the next call is due at the steady rate, in
/// nanoseconds since the limiter's epoch. Pure arithmetic, so it is tested
/// without clocks.
#[derive(Debug, Default)]
struct Gcra {
    tat: u64,
}

impl Gcra {
    /// Take a token at `now` (ns) with `interval` ns per token; `Err(wait)`
    /// says how many ns until one is free.
    fn take(&mut self, now: u64, interval: u64) -> Result<(), u64> {
        let burst = (BURST_SPAN_NS / interval.max(1)).max(1);
        let tolerance = interval.saturating_mul(burst.saturating_sub(1));
        let allowed_at = self.tat.saturating_sub(tolerance);
        if now < allowed_at {
            return Err(allowed_at.saturating_sub(now));
        }
        self.tat = self.tat.max(now).saturating_add(interval);
        Ok(())
    }
}

/// One pipeline's limiter.
#[derive(Debug)]
pub struct Limiter {
    limit: RateLimit,
    scope: RateScope,
    epoch: Instant,
    state: Mutex<Gcra>,
    /// Consumers sharing the limit (cluster scope); 1 for a local one.
    share: AtomicU32,
}

impl Limiter {
    pub fn new(limit: RateLimit, scope: RateScope) -> Self {
        Self {
            limit,
            scope,
            epoch: Instant::now(),
            state: Mutex::new(Gcra::default()),
            share: AtomicU32::new(1),
        }
    }

    pub fn scope(&self) -> RateScope {
        self.scope
    }

    /// Take a token now, or say how long until one is free.
    pub fn try_take(&self) -> Result<(), Duration> {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let interval = self.limit.interval_ns(self.share.load(Ordering::Relaxed));
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.take(now, interval).map_err(Duration::from_nanos)
    }

    /// The number of consumers the limit is shared by now.
    pub fn share(&self) -> u32 {
        self.share.load(Ordering::Relaxed)
    }

    /// Set the number of consumers sharing a cluster-scoped limit (at least
    /// one: this process's own consumer may be paused when it is counted).
    pub fn set_share(&self, consumers: u32) {
        self.share.store(consumers.max(1), Ordering::Relaxed);
    }
}

/// Keep a cluster-scoped limiter's share at the queue's consumer count, read
/// with a passive declare every [`SHARE_REFRESH`], until the session ends (the
/// caller aborts the task). A failed read keeps the last share and tries
/// again with a new channel (a passive declare that fails closes its channel).
pub async fn follow_consumers(
    conn: std::sync::Arc<Connection>,
    queue: String,
    limiter: std::sync::Arc<Limiter>,
    pipeline: std::sync::Arc<str>,
    metrics: std::sync::Arc<super::DownstreamMetrics>,
) {
    metrics.set_rate_share(limiter.share());
    let mut channel = None;
    loop {
        let mut count = consumer_count(&conn, &queue, &mut channel).await;
        // A count that rises is read again after a moment, and the lower
        // reading kept: while a replica changes its prefetch it has two
        // consumers for an instant, and counting both would halve the
        // share of everyone for a whole refresh period.
        if let Some(n) = count
            && n > limiter.share()
        {
            tokio::time::sleep(RECOUNT_AFTER).await;
            count = consumer_count(&conn, &queue, &mut channel)
                .await
                .map(|again| again.min(n));
        }
        if let Some(n) = count {
            let before = limiter.share();
            limiter.set_share(n);
            metrics.set_rate_share(limiter.share());
            if limiter.share() != before {
                tracing::info!(pipeline = %pipeline, consumers = limiter.share(), "rate_limit shared by the queue's consumers");
            }
        }
        tokio::time::sleep(SHARE_REFRESH).await;
    }
}

/// How long after a rising consumer count it is read again.
const RECOUNT_AFTER: Duration = Duration::from_millis(500);

/// The queue's consumer count by a passive declare, on a channel of its own
/// (a failed passive declare closes its channel; the next call opens
/// another). `None` if it could not be read.
async fn consumer_count(
    conn: &Connection,
    queue: &str,
    channel: &mut Option<lapin::Channel>,
) -> Option<u32> {
    if channel.as_ref().is_none_or(|c| !c.status().connected()) {
        *channel = conn.create_channel().await.ok();
    }
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .as_ref()?
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(q) => Some(q.consumer_count()),
        Err(e) => {
            tracing::debug!(queue, error = %e, "could not read the queue's consumer count; keeping the last share");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Gcra, RateLimit};

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn parses_the_three_units_and_refuses_the_rest() {
        let r = RateLimit::parse("50/s").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.count, r.per), (50, Duration::from_secs(1)));
        let r = RateLimit::parse("100/min").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.count, r.per), (100, Duration::from_secs(60)));
        let r = RateLimit::parse("3600/h").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.interval_ns(1), SEC);
        for bad in [
            "0/s",
            "50",
            "50/d",
            "50/m",
            "-1/s",
            "1.5/s",
            "/s",
            "2000000/s",
            "",
            " 5/s",
            "5/s ",
            "+5/s",
            "05/s",
            "00/s",
            "5/ s",
            "5 /s",
            "5/S",
            "5/s/s",
            "99999999999999999999999/s",
            "٥/s",
        ] {
            assert!(RateLimit::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_prefetch_holds_ten_minutes_of_calls_at_most() {
        let cap = |text: &str| {
            RateLimit::parse(text)
                .unwrap_or_else(|e| panic!("{e}"))
                .prefetch_cap(super::PREFETCH_SPAN)
        };
        assert_eq!(cap("100/min"), 1000);
        assert_eq!(cap("1/min"), 10);
        assert_eq!(cap("1/h"), 1);
        assert_eq!(cap("1000000/s"), u16::MAX);
    }

    #[test]
    fn a_shared_limit_spaces_calls_by_the_share() {
        let r = RateLimit::parse("20/s").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.interval_ns(1), SEC / 20);
        assert_eq!(r.interval_ns(4), SEC / 5);
        assert_eq!(r.interval_ns(0), SEC / 20);
    }

    /// Calls let through in `span` ns by a caller that asks every `step` ns.
    fn granted(interval: u64, span: u64, step: u64) -> u64 {
        let mut g = Gcra::default();
        let mut n = 0;
        let mut now = 0;
        while now < span {
            if g.take(now, interval).is_ok() {
                n += 1;
            }
            now += step;
        }
        n
    }

    #[test]
    fn the_steady_rate_is_the_configured_one() {
        // 20/s over 10 s, asked every millisecond: 200, plus one for the
        // burst of two (a tenth of a second's worth).
        assert_eq!(granted(SEC / 20, 10 * SEC, 1_000_000), 201);
        // 100/min (one per 600 ms): no burst at all.
        assert_eq!(granted(60 * SEC / 100, 60 * SEC, 1_000_000), 100);
    }

    #[test]
    fn an_empty_bucket_says_how_long_to_wait() {
        let mut g = Gcra::default();
        let interval = SEC / 2; // 2/s: burst of one
        assert_eq!(g.take(0, interval), Ok(()));
        assert_eq!(g.take(SEC / 10, interval), Err(4 * SEC / 10));
        assert_eq!(g.take(SEC / 2, interval), Ok(()));
        // An idle spell saves no more than the burst.
        assert_eq!(g.take(100 * SEC, interval), Ok(()));
        assert!(g.take(100 * SEC + 1, interval).is_err());
    }

    #[test]
    fn a_late_caller_does_not_lose_the_rate() {
        // Waking 0.3 ms late each time: the burst tolerance absorbs it, so
        // 1000/s still gives ~1000 calls a second.
        let interval = SEC / 1000;
        let mut g = Gcra::default();
        let (mut now, mut n) = (0u64, 0u64);
        while now < SEC {
            match g.take(now, interval) {
                Ok(()) => n += 1,
                Err(wait) => now += wait + 300_000,
            }
        }
        assert!((990..=1101).contains(&n), "{n}");
    }
}
