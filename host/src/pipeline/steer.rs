//! Changing the session's consumer: another prefetch for the largest message
//! seen (`max_in_flight_mb`), a pause and a probe for the circuit breaker, and
//! the end of the consumer that stops the workers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};

use super::lock;
use super::work::{PAUSED_POLL, Work};
use crate::downstream::{Breaker, Phase};

/// Consumers started for another prefetch, for unique tags.
static RESIZES: AtomicU64 = AtomicU64::new(0);

impl Work {
    /// Move to a consumer with prefetch `want`: RabbitMQ applies a changed
    /// prefetch to consumers started after the change only. The new consumer
    /// is ready before the old one is cancelled; workers read the old one to
    /// its end (what it already received is handled), then the new one.
    pub(super) async fn resize(self: Arc<Self>, want: u16) {
        let p = &self.pipeline;
        let _switching = self.switching.lock().await;
        // The breaker's prefetch (and pause) win over the budget's: it sets
        // the budget's prefetch itself when it closes.
        if self.paused.load(Ordering::SeqCst)
            || p.breaker
                .as_ref()
                .is_some_and(|b| b.phase() != Phase::Closed)
        {
            self.resizing.store(false, Ordering::Relaxed);
            return;
        }
        let moved = async {
            let (tag, old) = self
                .start_consumer(want, "consuming with the new prefetch")
                .await?;
            if self.stopping.load(Ordering::SeqCst) {
                // The stop may have cancelled the old tag before it was
                // replaced: the new consumer must not outlive it.
                let _ = self
                    .channel
                    .basic_cancel(tag, BasicCancelOptions::default())
                    .await;
            }
            let was = self.prefetch.swap(want, Ordering::Relaxed);
            p.metrics.prefetch.store(u64::from(want), Ordering::Relaxed);
            self.channel
                .basic_cancel(old, BasicCancelOptions::default())
                .await
                .context("cancelling the consumer with the old prefetch")?;
            tracing::info!(pipeline = %p.info.name, from = was, to = want, "prefetch set for the largest message seen (max_in_flight_mb)");
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = moved {
            tracing::warn!(pipeline = %p.info.name, error = %format!("{e:#}"), "could not change the prefetch");
        }
        self.resizing.store(false, Ordering::Relaxed);
    }

    /// Start a consumer with prefetch `want` beside the current one (`what`
    /// names the move in errors), hand it to the workers as the next one and
    /// make its tag current. Returns the new tag and the one it replaced; the
    /// caller cancels the old consumer when its move calls for it.
    pub(super) async fn start_consumer(
        &self,
        want: u16,
        what: &str,
    ) -> Result<(ShortString, ShortString)> {
        self.channel
            .basic_qos(want, BasicQosOptions::default())
            .await
            .context("setting the prefetch")?;
        let n = RESIZES.fetch_add(1, Ordering::Relaxed);
        let tag: ShortString = format!(
            "warren-{}-{}-{n}",
            self.pipeline.info.name,
            std::process::id()
        )
        .into();
        let consumer = self
            .channel
            .basic_consume(
                self.queue.clone(),
                tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| what.to_string())?;
        *lock(&self.next_consumer) = Some(consumer);
        let old = std::mem::replace(&mut *lock(&self.consumer_tag), tag.clone());
        Ok((tag, old))
    }

    /// The consumer ended while the breaker has it paused: wait for the one
    /// that follows (`None` if the session stops, or the consumer was not
    /// ended on purpose).
    pub(super) fn wait_while_paused(&self) -> Option<Consumer> {
        loop {
            if let Some(c) = self.take_next_consumer() {
                return Some(c);
            }
            if !self.paused.load(Ordering::SeqCst) || self.stopping.load(Ordering::SeqCst) {
                // The next consumer is stored before the pause is lifted:
                // one that came just now is seen here.
                return self.take_next_consumer();
            }
            // Without a consumer, nothing else tells the workers that the
            // session died: they look at the channel themselves.
            if !self.channel.status().connected() || !self.conn.status().connected() {
                self.end(
                    "the consume channel closed while the circuit breaker had the consumer paused"
                        .into(),
                );
                return None;
            }
            // A plain sleep, not the runtime's timer: a worker must not
            // depend on the runtime still running (it may be shutting down
            // under a worker that waits here).
            std::thread::sleep(PAUSED_POLL);
        }
    }

    /// Keep the consumer where the breaker's phase wants it, for the whole
    /// session: none while open (and go half-open when the pause is over),
    /// prefetch 1 while half-open, the budget's prefetch when closed.
    pub(super) async fn follow_breaker(self: Arc<Self>, breaker: Arc<Breaker>) {
        let p = &self.pipeline;
        let mut phases = breaker.subscribe();
        loop {
            let phase = *phases.borrow_and_update();
            let target = match phase {
                Phase::Closed => Some(p.budget.prefetch()),
                Phase::HalfOpen => Some(1),
                Phase::Open { .. } => None,
            };
            if let Err(e) = self.steer(target).await {
                tracing::warn!(pipeline = %p.info.name, phase = phase.label(), error = %format!("{e:#}"), "could not change the consumer for the circuit breaker");
            }
            match phase {
                Phase::Open { until } => tokio::select! {
                    _ = tokio::time::sleep_until(until.into()) => breaker.pause_over(Instant::now()),
                    changed = phases.changed() => if changed.is_err() { return },
                },
                _ => {
                    if phases.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// `None`: cancel the consumer and start none (workers wait, what it
    /// had received goes back to the queue unhandled). `Some(n)`: consume
    /// with prefetch `n`, replacing the current consumer (the same move as
    /// `resize`) or ending a pause.
    pub(super) async fn steer(self: &Arc<Self>, target: Option<u16>) -> Result<()> {
        let p = &self.pipeline;
        let _switching = self.switching.lock().await;
        if self.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        let paused = self.paused.load(Ordering::SeqCst);
        let Some(want) = target else {
            if paused {
                return Ok(());
            }
            // Marked before the cancel: the workers must see the end of the
            // consumer as a pause, not as the broker cancelling it.
            self.paused.store(true, Ordering::SeqCst);
            self.channel
                .basic_cancel(self.current_tag(), BasicCancelOptions::default())
                .await
                .context("cancelling the consumer")?;
            return Ok(());
        };
        if !paused && self.prefetch.load(Ordering::Relaxed) == want {
            return Ok(());
        }
        let (tag, old) = self
            .start_consumer(want, "consuming with the breaker's prefetch")
            .await?;
        self.prefetch.store(want, Ordering::Relaxed);
        p.metrics.prefetch.store(u64::from(want), Ordering::Relaxed);
        self.paused.store(false, Ordering::SeqCst);
        if self.stopping.load(Ordering::SeqCst) {
            let _ = self
                .channel
                .basic_cancel(tag, BasicCancelOptions::default())
                .await;
        }
        if !paused {
            self.channel
                .basic_cancel(old, BasicCancelOptions::default())
                .await
                .context("cancelling the consumer with the old prefetch")?;
        }
        Ok(())
    }

    /// Whether the deliveries held back may go back to the queue now that
    /// the consumer `next` came from has ended. Not while a replacement is
    /// waiting and the breaker is not closed: a consumer started for another
    /// prefetch just as the breaker opened would be handed them straight
    /// back; they go when that one is cancelled too (the pause), or once the
    /// breaker has closed.
    pub(super) fn may_release_held(&self, next: &Option<Result<Delivery, lapin::Error>>) -> bool {
        matches!(next, Some(Err(_)))
            || self.paused.load(Ordering::SeqCst)
            || self.stopping.load(Ordering::SeqCst)
            || lock(&self.next_consumer).is_none()
            || self
                .pipeline
                .breaker
                .as_ref()
                .is_none_or(|b| b.phase() == Phase::Closed)
    }

    /// Requeue the deliveries held back from the consumer that just ended.
    pub(super) fn release_held(&self) {
        let held = std::mem::take(&mut *lock(&self.held));
        for guard in held {
            guard.requeue();
        }
    }

    pub(super) fn take_next_consumer(&self) -> Option<Consumer> {
        lock(&self.next_consumer).take()
    }

    pub(super) fn current_tag(&self) -> ShortString {
        lock(&self.consumer_tag).clone()
    }

    /// The consumer ended: stop every worker, and the session if it still runs.
    pub(super) fn end(&self, reason: String) {
        self.finished.store(true, Ordering::Relaxed);
        let first = {
            let mut r = lock(&self.end_reason);
            r.is_none() && r.replace(reason).is_none()
        };
        if first {
            self.ended.notify_one();
        }
    }

    pub(super) fn end_reason(&self) -> String {
        self.end_reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| "the consumer ended".into())
    }
}
