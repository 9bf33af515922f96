//! The worker threads of one session: they take turns waiting on the
//! consumer (leader/followers), pace for the rate limit and the breaker, and
//! hand each delivery to `handle`.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::types::ShortString;
use lapin::{Channel, Connection, Consumer};
use tokio::runtime::Handle;
use tokio::sync::Notify;

use super::replies::Replies;
use super::supervisor::CloseNote;
use super::{Pipeline, lock};
use crate::broker::{KnownExchanges, Publisher, SettleGuard, Settler};
use crate::downstream::{Admission, Phase, Ticket};
use crate::ops::PipelineMetrics;
use crate::suspects;

/// Stack of a worker thread. Plugins run on it (wasmtime's sync calls use the
/// host stack), so it matches the 2 MiB tokio gives blocking threads.
const WORKER_STACK: usize = 2 << 20;

/// A delivery on its way through a worker.
pub(super) struct Job {
    pub(super) delivery: Delivery,
    /// The message's identity for the poison ledger (`suspects::key`).
    pub(super) key: u64,
    pub(super) settle: SettleGuard,
    pub(super) in_flight: InFlight,
    /// The breaker's admission, reported with the call's result.
    pub(super) ticket: Option<Ticket>,
}

/// Counts a delivery in `warren_in_flight` from when a worker takes it until it
/// is settled.
pub(super) struct InFlight(Arc<PipelineMetrics>);

impl InFlight {
    pub(super) fn new(m: &Arc<PipelineMetrics>) -> Self {
        m.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(m.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the workers and publish tasks of one session share.
pub(super) struct Work {
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) publisher: Arc<Publisher>,
    /// The session's connection, for channels of its own (checks, repairs).
    pub(super) conn: Arc<Connection>,
    /// Exchanges known to exist, for checking outputs before publishing.
    pub(super) exchanges: KnownExchanges,
    /// The negotiated frame size: the largest header frame the broker takes.
    pub(super) frame_max: u32,
    /// The consume channel: an ack on it counts only while it is open.
    pub(super) channel: Channel,
    /// Deliveries taken and not yet settled on a live channel.
    pub(super) suspects: suspects::InFlight,
    /// The reply code of the broker's close of the connection, once seen.
    pub(super) close: Arc<CloseNote>,
    /// The connection for direct replies (see `replies`).
    pub(super) replies: Replies,
    /// The session's consumer. The worker holding the lock waits for the next
    /// delivery and hands the lock on as soon as it has one (leader/followers):
    /// the delivery is handled on the thread lapin's I/O thread woke, with no
    /// further hand-off, and the next worker is already waiting meanwhile.
    pub(super) consumer: Mutex<Consumer>,
    /// The queue consumed, for a consumer with another prefetch.
    pub(super) queue: ShortString,
    /// Tag of the consumer the workers read from now.
    pub(super) consumer_tag: Mutex<ShortString>,
    /// Its prefetch.
    pub(super) prefetch: AtomicU16,
    /// A move to a consumer with another prefetch is under way.
    pub(super) resizing: AtomicBool,
    /// The session is stopping: no new consumers.
    pub(super) stopping: AtomicBool,
    /// The consumer to read from once the current one has ended.
    pub(super) next_consumer: Mutex<Option<Consumer>>,
    /// Notified when the publish channel is found closed: the session restarts.
    pub(super) broken: Notify,
    /// Notified when the consumer ends or fails; `end_reason` says why.
    pub(super) ended: Notify,
    pub(super) end_reason: Mutex<Option<String>>,
    /// The consumer has ended: workers exit.
    pub(super) finished: AtomicBool,
    /// The async runtime, for publishing from worker threads.
    pub(super) runtime: Handle,
    /// Set when the shutdown grace ran out: deliveries still held by the
    /// consumer are requeued instead of handled.
    pub(super) abandon: AtomicBool,
    /// The consumer was cancelled on purpose with none to follow (the
    /// breaker is open): workers wait for the next one instead of ending.
    pub(super) paused: AtomicBool,
    /// Held while the consumer is being changed (prefetch, pause, resume),
    /// so that changes for the budget and the breaker never interleave.
    pub(super) switching: tokio::sync::Mutex<()>,
    /// Deliveries taken but not to be handled (the breaker is open, or the
    /// session stops during a rate-limit wait), requeued when the consumer
    /// they came from has ended. At most a prefetch window.
    pub(super) held: Mutex<Vec<SettleGuard>>,
}

/// Longest sleep of a worker waiting for a rate-limit token or a consumer,
/// between looks at whether the session stops.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// How often a worker of a paused pipeline looks for the next consumer.
pub(super) const PAUSED_POLL: Duration = Duration::from_millis(10);

/// What the leader may do with the delivery it just took.
enum Pace {
    /// Its rate-limit token is taken (or there is no limit).
    Go,
    /// The session stops, or the breaker opened, while it waited for a
    /// token: it goes back to the queue unhandled.
    Return,
}

impl Work {
    /// Start `n` worker threads on the session's consumer. They exit when the
    /// consumer ends (cancelled at shutdown, or the channel is gone).
    pub(super) fn start_workers(self: &Arc<Self>, n: usize, settler: &Settler) -> Result<()> {
        for _ in 0..n.max(1) {
            let (work, settler) = (self.clone(), settler.clone());
            std::thread::Builder::new()
                .name("warren-worker".into())
                .stack_size(WORKER_STACK)
                .spawn(move || work.run_worker(&settler))
                .context("starting a worker thread")?;
        }
        Ok(())
    }

    fn run_worker(self: &Arc<Self>, settler: &Settler) {
        loop {
            let (next, pace) = {
                let mut consumer = lock(&self.consumer);
                if self.finished.load(Ordering::Relaxed) {
                    return;
                }
                let next = loop {
                    let next = self.runtime.block_on(consumer.next());
                    if !matches!(next, Some(Ok(_))) && self.may_release_held(&next) {
                        // This consumer ended (or failed): what the breaker
                        // held back from it goes back to the queue now, when
                        // it can no longer be handed to it again.
                        self.release_held();
                    }
                    if next.is_none()
                        && let Some(replacement) = self.take_next_consumer()
                    {
                        // The old consumer was cancelled for one with another
                        // prefetch, and has handed out all it held.
                        *consumer = replacement;
                        continue;
                    }
                    if next.is_none()
                        && let Some(replacement) = self.wait_while_paused()
                    {
                        // The breaker cancelled the consumer and has now
                        // started the next one (half-open or closed).
                        *consumer = replacement;
                        continue;
                    }
                    if !matches!(next, Some(Ok(_))) {
                        // Marked before the lock is released: a worker that took
                        // the lock next would otherwise wait on a stream that has
                        // already ended, and hold up the shutdown until the
                        // connection closes.
                        self.finished.store(true, Ordering::Relaxed);
                    }
                    break next;
                };
                // The rate-limit token is waited for while holding the
                // consumer: no other worker takes a delivery meanwhile.
                let pace = match &next {
                    Some(Ok(_)) => self.pace(),
                    _ => Pace::Go,
                };
                (next, pace)
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    self.close.record(suspects::close_code(&e));
                    return self.end(format!("the consumer failed: {e}"));
                }
                None => {
                    return self.end("the broker cancelled the consumer (queue deleted?)".into());
                }
            };
            let key = suspects::key(&delivery);
            self.suspects.taken(delivery.delivery_tag, key);
            if let Some(want) = (self.pipeline.budget)
                .observe(delivery.data.len(), self.prefetch.load(Ordering::Relaxed))
                && !self.stopping.load(Ordering::Relaxed)
                && !self.paused.load(Ordering::Relaxed)
                && !self.resizing.swap(true, Ordering::Relaxed)
            {
                self.runtime.spawn(self.clone().resize(want));
            }
            let admission = match (pace, &self.pipeline.breaker) {
                (Pace::Return, _) => None,
                (Pace::Go, None) => Some(None),
                (Pace::Go, Some(b)) => match b.admit() {
                    Admission::Call(ticket) => Some(Some(ticket)),
                    Admission::Hold => {
                        self.pipeline.metrics.downstream.returned();
                        None
                    }
                },
            };
            let Some(ticket) = admission else {
                // Not started, so nothing of it happened: it goes back to the
                // queue as it came, its attempt counter untouched, once the
                // consumer is cancelled. Requeued now, the broker could hand
                // it straight back to this consumer, again and again, each
                // time counting against a quorum queue's delivery_limit.
                // A deliberate requeue, not a poison suspect.
                self.suspects.settled(delivery.delivery_tag);
                lock(&self.held).push(settler.guard(delivery.delivery_tag));
                continue;
            };
            let job = Job {
                settle: settler.guard(delivery.delivery_tag),
                in_flight: InFlight::new(&self.pipeline.metrics),
                key,
                delivery,
                ticket,
            };
            if self.abandon.load(Ordering::Relaxed) {
                // Dropping the guard requeues the delivery.
                continue;
            }
            // A panic here is a bug in warren; the job's guard requeues the
            // delivery and the worker carries on.
            if std::panic::catch_unwind(AssertUnwindSafe(|| self.handle(job))).is_err() {
                tracing::error!(pipeline = %self.pipeline.info.name, "handling a message panicked; it is requeued");
            }
        }
    }

    /// Wait for the pipeline's rate-limit token, if it has a limit. Called by
    /// the worker holding the consumer, so that the deliveries behind stay in
    /// the prefetch window meanwhile.
    fn pace(&self) -> Pace {
        let p = &self.pipeline;
        let Some(limiter) = &p.limiter else {
            return Pace::Go;
        };
        let mut since: Option<Instant> = None;
        loop {
            match limiter.try_take() {
                Ok(()) => break,
                Err(wait) => {
                    let started = *since.get_or_insert_with(Instant::now);
                    let open = p
                        .breaker
                        .as_ref()
                        .is_some_and(|b| matches!(b.phase(), Phase::Open { .. }));
                    if open || self.stopping.load(Ordering::Relaxed) {
                        p.metrics.downstream.rate_limited(started.elapsed());
                        return Pace::Return;
                    }
                    std::thread::sleep(wait.min(WAIT_SLICE));
                }
            }
        }
        if let Some(started) = since {
            p.metrics.downstream.rate_limited(started.elapsed());
        }
        Pace::Go
    }
}
