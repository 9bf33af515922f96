//! `[pipeline.circuit_breaker]`: stop calling the plugin while what it calls
//! is down, instead of burning every message's attempts in the retry tiers.
//!
//! The state machine lives here and knows nothing of the broker; the pipeline
//! acts on its [`Phase`] (published through a `watch` channel): `Closed`
//! consumes normally, `Open` has no consumer at all (messages wait in the
//! queue, their attempt counters untouched), `HalfOpen` consumes with
//! prefetch 1 and lets one call at a time through as a probe.
//!
//! A failure is a `retry` outcome, a trap, a timeout or a memory-limit hit;
//! a `dead-letter` is not (bad input is not an outage), nor is a plugin that
//! cannot be instantiated (that is warren's side). The breaker opens when, in
//! the last `window_ms` (counted in ten slots, so to a tenth of the window),
//! at least `min_calls` calls ended and at least `failure_ratio` of them
//! failed. After `open_ms` it goes half-open; [`HALF_OPEN_SUCCESSES`] probes
//! in a row that do not fail close it, one that fails opens it again for twice
//! the last pause, up to `max_open_ms`.
//!
//! Only calls admitted in the current phase count: a call that started while
//! the breaker was closed and ends after it opened (an in-flight one
//! finishing) says nothing about the service now.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Result, bail};
use serde::Deserialize;
use tokio::sync::watch;

use super::DownstreamMetrics;
use crate::logtext::Escaped;

/// Probes in a row that must not fail for a half-open breaker to close.
pub const HALF_OPEN_SUCCESSES: u32 = 3;

/// Longest `window_ms`, `open_ms` and `max_open_ms`: 24 hours.
pub const MAX_BREAKER_MS: u64 = 86_400_000;

/// Slots the window is counted in.
const SLOTS: usize = 10;

/// Failure reasons kept for the log line that says why the breaker opened.
const REASONS_KEPT: usize = 3;

/// `[pipeline.circuit_breaker]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Open when at least this share of the calls in the window failed.
    #[serde(default = "default_failure_ratio")]
    pub failure_ratio: f64,
    /// ... out of at least this many calls.
    #[serde(default = "default_min_calls")]
    pub min_calls: u32,
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
    /// First pause; doubles while probes fail, up to `max_open_ms`.
    #[serde(default = "default_open_ms")]
    pub open_ms: u64,
    #[serde(default = "default_max_open_ms")]
    pub max_open_ms: u64,
}

fn default_failure_ratio() -> f64 {
    0.5
}
fn default_min_calls() -> u32 {
    20
}
fn default_window_ms() -> u64 {
    30_000
}
fn default_open_ms() -> u64 {
    30_000
}
fn default_max_open_ms() -> u64 {
    600_000
}

impl BreakerConfig {
    /// Errors name the field; the caller adds the pipeline.
    pub fn validate(&self) -> Result<()> {
        // `!(x > 0.0)` also refuses NaN.
        if !(self.failure_ratio > 0.0 && self.failure_ratio <= 1.0) {
            bail!(
                "circuit_breaker.failure_ratio must be above 0 and at most 1 (it is {})",
                self.failure_ratio
            );
        }
        if self.min_calls == 0 || self.min_calls > 1_000_000 {
            bail!("circuit_breaker.min_calls must be between 1 and 1000000");
        }
        if !(100..=MAX_BREAKER_MS).contains(&self.window_ms) {
            bail!("circuit_breaker.window_ms must be between 100 and {MAX_BREAKER_MS} (24 hours)");
        }
        if !(1..=MAX_BREAKER_MS).contains(&self.open_ms) {
            bail!("circuit_breaker.open_ms must be between 1 and {MAX_BREAKER_MS} (24 hours)");
        }
        if self.max_open_ms < self.open_ms || self.max_open_ms > MAX_BREAKER_MS {
            bail!(
                "circuit_breaker.max_open_ms must be between open_ms ({}) and {MAX_BREAKER_MS} (24 hours)",
                self.open_ms
            );
        }
        Ok(())
    }
}

/// What the pipeline's consumer should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Closed,
    /// No consumer until `until`, then half-open.
    Open {
        until: Instant,
    },
    HalfOpen,
}

impl Phase {
    /// `warren_circuit_state`: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> u64 {
        match self {
            Self::Closed => 0,
            Self::Open { .. } => 1,
            Self::HalfOpen => 2,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// Calls and failures per slot of the window. Pure arithmetic over
/// milliseconds since the breaker's epoch.
#[derive(Debug)]
struct Window {
    slot_ms: u64,
    /// `(slot number, calls, failures)`; a slot whose number is not current
    /// is stale and counts as empty.
    slots: [(u64, u64, u64); SLOTS],
}

impl Window {
    fn new(window_ms: u64) -> Self {
        Self {
            slot_ms: (window_ms / SLOTS as u64).max(1),
            slots: [(u64::MAX, 0, 0); SLOTS],
        }
    }

    fn record(&mut self, now_ms: u64, failed: bool) {
        let n = now_ms / self.slot_ms;
        let i = usize::try_from(n % SLOTS as u64).unwrap_or(0);
        if let Some(slot) = self.slots.get_mut(i) {
            if slot.0 != n {
                *slot = (n, 0, 0);
            }
            slot.1 = slot.1.saturating_add(1);
            slot.2 = slot.2.saturating_add(u64::from(failed));
        }
    }

    /// `(calls, failures)` in the window ending at `now_ms`.
    fn totals(&self, now_ms: u64) -> (u64, u64) {
        let n = now_ms / self.slot_ms;
        let oldest = n.saturating_sub(SLOTS as u64 - 1);
        self.slots
            .iter()
            .filter(|s| s.0 != u64::MAX && s.0 >= oldest && s.0 <= n)
            .fold((0, 0), |(c, f), s| {
                (c.saturating_add(s.1), f.saturating_add(s.2))
            })
    }

    fn clear(&mut self) {
        self.slots = [(u64::MAX, 0, 0); SLOTS];
    }
}

#[derive(Debug)]
struct State {
    phase: Phase,
    window: Window,
    /// Bumped at every change of phase: tickets of another phase are stale.
    generation: u64,
    /// The pause of the last opening; `None` after closing.
    pause: Option<Duration>,
    probe_running: bool,
    probe_successes: u32,
    reasons: VecDeque<String>,
}

/// What the breaker says about one delivery taken from the consumer.
#[derive(Debug)]
pub enum Admission {
    /// Call the plugin; report the result with the ticket.
    Call(Ticket),
    /// Do not call: return the delivery to the queue unhandled.
    Hold,
}

/// A call admitted by the breaker. Dropped without a result (no call was
/// made after all, or one that says nothing about the service), it frees the
/// half-open probe slot.
#[derive(Debug)]
pub struct Ticket {
    breaker: Arc<Breaker>,
    generation: u64,
    probe: bool,
    done: bool,
}

impl Ticket {
    /// Report the call's result: `Some(reason)` if it failed.
    pub fn finish(mut self, failure: Option<&str>) {
        self.done = true;
        self.breaker
            .record(self.generation, self.probe, Some(failure), Instant::now());
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.breaker
                .record(self.generation, self.probe, None, Instant::now());
        }
    }
}

/// One pipeline's breaker; lives as long as the pipeline (across broker
/// sessions).
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    pipeline: Arc<str>,
    metrics: Arc<DownstreamMetrics>,
    epoch: Instant,
    state: Mutex<State>,
    phase_tx: watch::Sender<Phase>,
}

impl Breaker {
    pub fn new(config: BreakerConfig, pipeline: Arc<str>, metrics: Arc<DownstreamMetrics>) -> Self {
        let window = Window::new(config.window_ms);
        metrics.set_circuit(Phase::Closed.gauge(), None);
        Self {
            config,
            pipeline,
            metrics,
            epoch: Instant::now(),
            state: Mutex::new(State {
                phase: Phase::Closed,
                window,
                generation: 0,
                pause: None,
                probe_running: false,
                probe_successes: 0,
                reasons: VecDeque::new(),
            }),
            phase_tx: watch::channel(Phase::Closed).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned state is still whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follow the phase (the pipeline's consumer acts on it).
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase_tx.subscribe()
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// May a delivery just taken from the consumer be handled?
    pub fn admit(self: &Arc<Self>) -> Admission {
        let mut s = self.lock();
        let probe = match s.phase {
            Phase::Closed => false,
            Phase::Open { .. } => return Admission::Hold,
            Phase::HalfOpen if s.probe_running => return Admission::Hold,
            Phase::HalfOpen => {
                s.probe_running = true;
                true
            }
        };
        Admission::Call(Ticket {
            breaker: self.clone(),
            generation: s.generation,
            probe,
            done: false,
        })
    }

    /// An open breaker whose pause is over goes half-open (called by the
    /// pipeline when the pause ends).
    pub fn pause_over(&self, now: Instant) {
        let mut s = self.lock();
        if let Phase::Open { until } = s.phase
            && now >= until
        {
            tracing::info!(pipeline = %self.pipeline, probes = HALF_OPEN_SUCCESSES, "circuit breaker half-open: consuming with prefetch 1 to probe the downstream service");
            self.enter(&mut s, Phase::HalfOpen);
        }
    }

    /// The plugin reported its service down (`host.report-outage`): open now
    /// for `pause` (at least 1 ms, at most `max_open_ms`), whatever the
    /// ratio. An open breaker is kept open until the later of the two ends.
    pub fn trip(&self, pause: Duration, reason: &str, now: Instant) {
        let pause = pause
            .max(Duration::from_millis(1))
            .min(Duration::from_millis(self.config.max_open_ms));
        let mut s = self.lock();
        if let Phase::Open { until } = s.phase
            && until >= now + pause
        {
            return;
        }
        tracing::warn!(
            pipeline = %self.pipeline,
            pause_ms = pause.as_millis() as u64,
            reason = %Escaped(reason),
            "circuit breaker opened: the plugin reported its downstream service down; consumption paused"
        );
        self.open(&mut s, pause, now);
    }

    /// `result`: `None` when the call says nothing (not made, or not the
    /// downstream's fault), `Some(None)` success, `Some(Some(reason))` failure.
    fn record(&self, generation: u64, probe: bool, result: Option<Option<&str>>, now: Instant) {
        let mut s = self.lock();
        if generation != s.generation {
            return;
        }
        if probe {
            s.probe_running = false;
        }
        let Some(failure) = result else { return };
        if let Some(reason) = failure {
            if s.reasons.len() >= REASONS_KEPT {
                s.reasons.pop_front();
            }
            s.reasons.push_back(reason.to_string());
        }
        match s.phase {
            Phase::Closed => {
                let now_ms = self.ms_since_epoch(now);
                s.window.record(now_ms, failure.is_some());
                let (calls, failures) = s.window.totals(now_ms);
                let ratio = failures as f64 / calls.max(1) as f64;
                if calls >= u64::from(self.config.min_calls) && ratio >= self.config.failure_ratio {
                    let pause = Duration::from_millis(self.config.open_ms);
                    tracing::warn!(
                        pipeline = %self.pipeline,
                        failed = failures,
                        calls,
                        failure_ratio = %format!("{ratio:.2}"),
                        window_ms = self.config.window_ms,
                        pause_ms = pause.as_millis() as u64,
                        last_reasons = %Escaped(&reasons_text(&s.reasons)),
                        "circuit breaker opened: consumption paused, messages wait in the queue"
                    );
                    self.open(&mut s, pause, now);
                }
            }
            Phase::HalfOpen => match failure {
                Some(reason) => {
                    let last = s
                        .pause
                        .unwrap_or(Duration::from_millis(self.config.open_ms));
                    let pause = last
                        .saturating_mul(2)
                        .min(Duration::from_millis(self.config.max_open_ms));
                    tracing::warn!(
                        pipeline = %self.pipeline,
                        pause_ms = pause.as_millis() as u64,
                        reason = %Escaped(reason),
                        "circuit breaker probe failed: open again"
                    );
                    self.open(&mut s, pause, now);
                }
                None => {
                    s.probe_successes = s.probe_successes.saturating_add(1);
                    if s.probe_successes >= HALF_OPEN_SUCCESSES {
                        tracing::info!(pipeline = %self.pipeline, "circuit breaker closed: the downstream service answers again");
                        s.pause = None;
                        s.window.clear();
                        s.reasons.clear();
                        self.enter(&mut s, Phase::Closed);
                    }
                }
            },
            Phase::Open { .. } => {}
        }
    }

    fn open(&self, s: &mut State, pause: Duration, now: Instant) {
        s.pause = Some(pause);
        self.metrics.opened();
        self.enter(s, Phase::Open { until: now + pause });
    }

    fn enter(&self, s: &mut State, phase: Phase) {
        s.phase = phase;
        s.generation = s.generation.wrapping_add(1);
        s.probe_running = false;
        s.probe_successes = 0;
        let probe_at = match phase {
            Phase::Open { until } => {
                let left = until.saturating_duration_since(Instant::now());
                Some(SystemTime::now() + left)
            }
            _ => None,
        };
        self.metrics.set_circuit(phase.gauge(), probe_at);
        self.phase_tx.send_replace(phase);
    }

    fn ms_since_epoch(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }
}

fn reasons_text(reasons: &VecDeque<String>) -> String {
    reasons
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{
        Admission, Breaker, BreakerConfig, DownstreamMetrics, HALF_OPEN_SUCCESSES, Phase, Window,
    };

    fn config(ratio: f64, min_calls: u32) -> BreakerConfig {
        BreakerConfig {
            failure_ratio: ratio,
            min_calls,
            window_ms: 10_000,
            open_ms: 1_000,
            max_open_ms: 3_000,
        }
    }

    fn breaker(c: BreakerConfig) -> Arc<Breaker> {
        let metrics = Arc::new(DownstreamMetrics::default());
        Arc::new(Breaker::new(c, "p".into(), metrics))
    }

    fn call(b: &Arc<Breaker>, failure: Option<&str>) {
        match b.admit() {
            Admission::Call(t) => t.finish(failure),
            Admission::Hold => panic!("held in {:?}", b.phase()),
        }
    }

    #[test]
    fn the_window_forgets_calls_older_than_it() {
        let mut w = Window::new(1_000);
        w.record(0, true);
        w.record(950, false);
        assert_eq!(w.totals(999), (2, 1));
        // At 1050 the slot of t=0 has left the window; t=950's has not.
        assert_eq!(w.totals(1_050), (1, 0));
        assert_eq!(w.totals(5_000), (0, 0));
        // A slot reused a window later starts from zero.
        w.record(10_000, true);
        assert_eq!(w.totals(10_000), (1, 1));
    }

    #[test]
    fn opens_at_the_ratio_once_there_are_enough_calls() {
        let b = breaker(config(0.5, 4));
        call(&b, Some("down"));
        call(&b, Some("down"));
        call(&b, Some("down"));
        // 3 failures of 3: below min_calls.
        assert_eq!(b.phase(), Phase::Closed);
        call(&b, None);
        // 3 of 4 = 0.75 >= 0.5.
        assert!(matches!(b.phase(), Phase::Open { .. }));
        assert!(matches!(b.admit(), Admission::Hold));
        assert_eq!(b.metrics.opened_count(), 1);
    }

    #[test]
    fn dead_letters_and_silent_tickets_are_not_failures() {
        let b = breaker(config(0.5, 2));
        call(&b, None);
        call(&b, None);
        for _ in 0..10 {
            // A ticket dropped without a result (no call after all).
            let Admission::Call(t) = b.admit() else {
                panic!("held")
            };
            drop(t);
        }
        call(&b, Some("down"));
        // 1 of 3 failed.
        assert_eq!(b.phase(), Phase::Closed);
    }

    #[test]
    fn half_open_lets_one_probe_at_a_time_and_closes_after_successes() {
        let b = breaker(config(1.0, 1));
        call(&b, Some("down"));
        let Phase::Open { until } = b.phase() else {
            panic!("not open")
        };
        b.pause_over(until - Duration::from_millis(1));
        assert!(matches!(b.phase(), Phase::Open { .. }), "too early");
        b.pause_over(until);
        assert_eq!(b.phase(), Phase::HalfOpen);
        for _ in 0..HALF_OPEN_SUCCESSES {
            let Admission::Call(t) = b.admit() else {
                panic!("probe held")
            };
            assert!(matches!(b.admit(), Admission::Hold), "second probe");
            t.finish(None);
        }
        assert_eq!(b.phase(), Phase::Closed);
        assert_eq!(b.metrics.circuit_gauge(), 0);
    }

    #[test]
    fn a_failed_probe_doubles_the_pause_up_to_the_maximum() {
        let b = breaker(config(1.0, 1));
        call(&b, Some("down"));
        let mut pauses = Vec::new();
        for _ in 0..4 {
            let Phase::Open { until } = b.phase() else {
                panic!("not open")
            };
            b.pause_over(until);
            let at = Instant::now();
            call(&b, Some("still down"));
            let Phase::Open { until } = b.phase() else {
                panic!("not open again")
            };
            pauses.push((until - at).as_millis() / 100);
        }
        // 1 s first; then 2, 3 (capped), 3 — to 100 ms.
        assert_eq!(pauses, [20, 30, 30, 30]);
        assert_eq!(b.metrics.opened_count(), 5);
    }

    #[test]
    fn a_reported_outage_opens_at_once_for_the_pause_asked() {
        let b = breaker(config(0.5, 20));
        let now = Instant::now();
        b.trip(Duration::from_millis(1_500), "provider down", now);
        assert_eq!(
            b.phase(),
            Phase::Open {
                until: now + Duration::from_millis(1_500)
            }
        );
        // A shorter report does not shorten it; a pause over max_open_ms is cut.
        b.trip(Duration::from_millis(10), "again", now);
        b.trip(Duration::from_secs(3_600), "long", now);
        assert_eq!(
            b.phase(),
            Phase::Open {
                until: now + Duration::from_millis(3_000)
            }
        );
        assert_eq!(b.metrics.opened_count(), 2);
    }

    #[test]
    fn calls_from_before_a_change_do_not_count() {
        let b = breaker(config(1.0, 1));
        let Admission::Call(old) = b.admit() else {
            panic!("held")
        };
        call(&b, Some("down"));
        let Phase::Open { until } = b.phase() else {
            panic!("not open")
        };
        b.pause_over(until);
        // A call admitted while closed ends during half-open: ignored.
        old.finish(Some("late"));
        assert_eq!(b.phase(), Phase::HalfOpen);
    }

    #[test]
    fn validation_refuses_what_cannot_work() {
        assert!(config(0.5, 20).validate().is_ok());
        assert!(config(1.0, 1).validate().is_ok());
        for bad in [0.0, -0.1, 1.01, f64::NAN] {
            assert!(config(bad, 20).validate().is_err(), "{bad}");
        }
        assert!(config(0.5, 0).validate().is_err());
        let mut c = config(0.5, 20);
        c.max_open_ms = 999;
        assert!(c.validate().is_err());
        let mut c = config(0.5, 20);
        c.open_ms = 0;
        assert!(c.validate().is_err());
        let mut c = config(0.5, 20);
        c.window_ms = 10;
        assert!(c.validate().is_err());
    }
}
