//! The supervisor: (re)connect with backoff, declare, consume until a stop
//! or a failure, and settle what is in flight before the session ends.

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Connection, Event};
use tokio::runtime::Handle;
use tokio::sync::{Notify, watch};

use super::Pipeline;
use super::replies::Replies;
use super::work::Work;
use crate::broker::{self, KnownExchanges, Publisher, Settler};
use crate::config::BrokerConfig;
use crate::downstream::{self, Phase, RateScope};
use crate::suspects::{self, Verdict};

/// Longest pause between reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(30);

/// A session that consumed this long ends the backoff even if its wait was
/// longer: a reconnect every few seconds at most is no storm, and a broker
/// that is back must not be left alone for the rest of a long delay.
const STABLE_SESSION: Duration = Duration::from_secs(5);

/// After the shutdown grace ran out: how long the last requeues and acks get
/// to reach the broker before the connection closes.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

/// How long a cancel or close may wait for the broker. A blocked connection
/// never answers; the broker requeues what is unsettled once the socket goes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

impl Pipeline {
    /// Run until `stop` turns true: connect, consume, and on broker loss reconnect
    /// with backoff. Returns after in-flight messages are settled or `grace` ran out.
    ///
    /// The delay doubles with every failed attempt up to `MAX_RECONNECT_DELAY`,
    /// and starts again from `first_delay` after a session that consumed for at
    /// least as long as the delay it had waited, or for `STABLE_SESSION`
    /// whichever is shorter: a broker that comes back after a short outage is
    /// used again at once, instead of after the back-off earned by the last
    /// long one (a full cluster restart followed soon by a closed connection
    /// stalled every replica for ~20 s before). Each wait is shortened by up to half at random, so
    /// replicas cut off together do not reconnect in lockstep.
    pub async fn supervise(
        self: Arc<Self>,
        endpoint: BrokerConfig,
        first_delay: Duration,
        grace: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::new(first_delay);
        let mut sessions = 0u64;
        loop {
            if *stop.borrow() {
                return;
            }
            if sessions > 0 {
                self.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            sessions = sessions.saturating_add(1);
            let mut consuming_since = None;
            match self
                .clone()
                .session(&endpoint, grace, stop.clone(), &mut consuming_since)
                .await
            {
                Ok(()) => return,
                Err(e) => {
                    self.metrics
                        .status
                        .connected
                        .store(false, Ordering::Relaxed);
                    let consumed = consuming_since.map(|t: Instant| t.elapsed());
                    let wait = jittered(backoff.after(consumed), fastrand::f64());
                    let error = crate::logtext::error_chain(&e);
                    tracing::warn!(pipeline = %self.info.name, error = %error, retry_in_ms = wait.as_millis() as u64, "pipeline lost its broker session; reconnecting");
                    self.metrics.status.set_broker_error(Some(&error));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            }
        }
    }

    /// One connection's lifetime. `Ok` means a clean stop was requested;
    /// `consuming_since` is set once the consumer is attached.
    async fn session(
        self: Arc<Self>,
        endpoint: &BrokerConfig,
        grace: Duration,
        mut stop: watch::Receiver<bool>,
        consuming_since: &mut Option<Instant>,
    ) -> Result<()> {
        let name = &self.info.name;
        let (conn, node) = broker::connect_any(endpoint, name).await?;
        let conn = Arc::new(conn);
        self.metrics.status.set_node(Some(&node));
        let close = Arc::new(CloseNote::default());
        let watching = tokio::spawn(watch_connection(
            conn.events_listener(),
            self.clone(),
            close.clone(),
        ));
        let result = self
            .clone()
            .consume(&conn, endpoint, close, grace, &mut stop, consuming_since)
            .await;
        self.metrics
            .status
            .connected
            .store(false, Ordering::Relaxed);
        // A blocked connection (a broker resource alarm) does not write at all,
        // not even the close: the process must be able to leave anyway, and the
        // broker requeues what was not settled when the socket goes.
        if tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "warren stopping".into()))
            .await
            .is_err()
        {
            tracing::warn!(pipeline = %name, "the broker did not answer the close in time (connection blocked?); leaving it");
        }
        watching.abort();
        self.metrics.status.set_blocked(None);
        self.metrics.status.set_node(None);
        result
    }

    /// Declare, start the workers and consume until `stop` or a failure.
    async fn consume(
        self: Arc<Self>,
        conn: &Arc<Connection>,
        endpoint: &BrokerConfig,
        close: Arc<CloseNote>,
        grace: Duration,
        stop: &mut watch::Receiver<bool>,
        consuming_since: &mut Option<Instant>,
    ) -> Result<()> {
        let name = &self.info.name;
        let setup = conn.create_channel().await.context("opening a channel")?;
        broker::declare(&setup, &self.config, &self.info.tiers)
            .await
            .with_context(|| format!("declaring the topology of pipeline {name:?}"))?;
        let _ = setup.close(200, "topology declared".into()).await;

        let publisher = Arc::new(
            Publisher::new(
                conn.create_channel()
                    .await
                    .context("opening the publish channel")?,
            )
            .await?,
        );
        let channel = conn
            .create_channel()
            .await
            .context("opening the consume channel")?;
        // A breaker still open or half-open from the last session starts at
        // prefetch 1: an open one cancels the consumer at once, returning
        // what it received, so as little as possible is sent back.
        let prefetch = match self.breaker.as_ref().map(|b| b.phase()) {
            None | Some(Phase::Closed) => self.budget.prefetch(),
            Some(_) => 1,
        };
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .context("setting prefetch")?;
        self.metrics
            .prefetch
            .store(u64::from(prefetch), Ordering::Relaxed);
        let tag: ShortString = format!("warren-{name}-{}", std::process::id()).into();
        let queue = ShortString::try_new(self.config.queue.clone())
            .map_err(|_| anyhow!("queue name too long"))?;

        let consumer = channel
            .basic_consume(
                queue.clone(),
                tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming from queue {:?}", self.config.queue))?;
        let (settler, mut settling) = Settler::start(
            channel.clone(),
            self.info.name.clone(),
            self.metrics.settle_failures.clone(),
        );
        let work = Arc::new(Work {
            pipeline: self.clone(),
            publisher,
            conn: conn.clone(),
            exchanges: KnownExchanges::new(&self.config),
            frame_max: conn.configuration().frame_max(),
            channel: channel.clone(),
            suspects: suspects::InFlight::default(),
            close,
            replies: Replies::new(endpoint.clone(), name),
            consumer: Mutex::new(consumer),
            queue,
            consumer_tag: Mutex::new(tag),
            prefetch: AtomicU16::new(prefetch),
            resizing: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            next_consumer: Mutex::new(None),
            broken: Notify::new(),
            ended: Notify::new(),
            end_reason: Mutex::new(None),
            finished: AtomicBool::new(false),
            runtime: Handle::current(),
            abandon: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            switching: tokio::sync::Mutex::new(()),
            held: Mutex::new(Vec::new()),
        });
        // Workers already started stop when the connection goes.
        work.start_workers(self.config.concurrency, &settler)?;
        // The session's helpers for the rate limit and the breaker; they end
        // with it.
        let mut helpers = Vec::new();
        if let Some(b) = &self.breaker {
            helpers.push(tokio::spawn(work.clone().follow_breaker(b.clone())));
        }
        if let Some(l) = &self.limiter
            && l.scope() == RateScope::Cluster
        {
            helpers.push(tokio::spawn(downstream::ratelimit::follow_consumers(
                conn.clone(),
                self.config.queue.clone(),
                l.clone(),
                self.info.name.clone(),
                self.metrics.downstream.clone(),
            )));
        }
        self.metrics.status.connected.store(true, Ordering::Relaxed);
        self.metrics.status.set_broker_error(None);
        *consuming_since = Some(Instant::now());
        tracing::info!(pipeline = %name, queue = %self.config.queue, plugin = %self.slot.current().version(), broker = %self.metrics.status.node().unwrap_or_default(), "consuming");

        let outcome: Result<()> = tokio::select! {
            _ = stop.wait_for(|s| *s) => Ok(()),
            _ = work.broken.notified() => Err(anyhow!("the publish channel closed")),
            _ = work.ended.notified() => Err(anyhow!(work.end_reason())),
        };
        // The suspects are taken at the moment of death: what finishes later
        // (on a dead channel) is not what killed it. Whether the connection
        // was blocked is too; they are judged once the session has ended,
        // when the reason of the broker's close is known.
        let death = outcome.as_ref().err().map(|e| {
            // A consumer_timeout closes the consume channel and leaves the
            // connection up; the reason reaches the worker either as the
            // consumer's error or, depending on how the close is processed,
            // as a bare end of the consumer, so the channel's state decides.
            let text = format!("{e:#}");
            let ack_timeout = (text.contains("PRECONDITION_FAILED") && text.contains("timed out"))
                || (conn.status().connected() && !channel.status().connected());
            Death {
                suspects: work.suspects.suspects(ack_timeout),
                blocked: conn.status().blocked(),
                connection_up: conn.status().connected(),
            }
        });

        // Stop the flow first, then let what was received settle on this
        // channel: workers handle what the consumer still holds, then exit on
        // its end; the settler stops once every delivery has reported.
        self.metrics
            .status
            .connected
            .store(false, Ordering::Relaxed);
        work.stopping.store(true, Ordering::SeqCst);
        for h in &helpers {
            h.abort();
        }
        // Workers waiting for the consumer of a paused (breaker-open)
        // pipeline see `stopping` and exit; its consumer is already cancelled.
        let tag = work.current_tag();
        if !work.paused.load(Ordering::SeqCst) {
            let _ = tokio::time::timeout(
                CLOSE_TIMEOUT,
                channel.basic_cancel(tag, BasicCancelOptions::default()),
            )
            .await;
        }
        drop(settler);
        if tokio::time::timeout(grace, &mut settling).await.is_err() {
            tracing::warn!(pipeline = %name, left = self.metrics.in_flight.load(Ordering::Relaxed), "shutdown grace ran out; unsettled messages go back to the queue");
            // Queued deliveries are requeued instead of handled; calls still
            // running end by their own timeout and find the channel closed.
            work.abandon.store(true, Ordering::Relaxed);
            let _ = tokio::time::timeout(FINAL_FLUSH, &mut settling).await;
        }
        work.replies.close().await;
        if let Some(death) = death {
            self.judge(death, &work.close).await;
        }
        outcome
    }
}

/// What was at risk when a session died.
struct Death {
    /// The deliveries whose effects were unconfirmed (or, after a
    /// `consumer_timeout`, whose calls were running).
    suspects: Vec<u64>,
    /// The broker had blocked the connection (a resource alarm).
    blocked: bool,
    /// The connection was still up: only a channel died.
    connection_up: bool,
}

impl Pipeline {
    /// Charge a session's death to its suspects, unless it was nobody's
    /// (see `suspects`): the connection was blocked, or closed by force.
    async fn judge(&self, death: Death, close: &CloseNote) {
        if death.suspects.is_empty() {
            return;
        }
        let code = if death.blocked || death.connection_up {
            close.get()
        } else {
            close.wait(CLOSE_TIMEOUT).await
        };
        let verdict = Verdict::of(code, death.blocked, death.suspects.len(), false);
        self.metrics.session_death(verdict);
        let (name, at_risk) = (&self.info.name, death.suspects.len());
        match verdict {
            Verdict::Charged | Verdict::Shared => {
                tracing::warn!(pipeline = %name, suspects = at_risk, "the session died with effects unconfirmed (or a call over the broker's consumer_timeout); each such message is charged one death (see session_death_limit)");
                self.ledger.record(death.suspects);
            }
            Verdict::Blocked => {
                tracing::warn!(pipeline = %name, at_risk, "the session died while the broker blocked the connection (resource alarm); nothing it sent was read, so no message is charged");
            }
            Verdict::Forced => {
                tracing::warn!(pipeline = %name, at_risk, "the broker closed the connection by force (CONNECTION_FORCED: an operator or the broker itself); no message is charged");
            }
        }
    }
}

/// The reply code of the broker's close of a session's connection, noted
/// by whichever sees it first: the connection's events, the consumer, the
/// publisher.
#[derive(Debug, Default)]
pub(super) struct CloseNote {
    /// `Some` once the connection's end is known; inside, the close's reply
    /// code (`None`: it ended without one, e.g. the socket broke).
    code: Mutex<Option<Option<u16>>>,
    known: Notify,
}

impl CloseNote {
    /// An error on the way carried a reply code of the broker's close.
    pub(super) fn record(&self, code: Option<u16>) {
        if code.is_some() {
            self.end(code);
        }
    }

    /// The connection ended, with the broker's reply code if it closed it.
    fn end(&self, code: Option<u16>) {
        let mut c = super::lock(&self.code);
        // A code seen once is kept; an end without one does not erase it.
        if c.flatten().is_none() {
            *c = Some(code);
        }
        drop(c);
        self.known.notify_waiters();
    }

    /// The reply code, if known now.
    fn get(&self) -> Option<u16> {
        super::lock(&self.code).flatten()
    }

    /// The reply code, waiting up to `limit` for the connection's end.
    async fn wait(&self, limit: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.known.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(code) = *super::lock(&self.code) {
                return code;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.get();
            }
        }
    }
}

struct Backoff {
    first: Duration,
    next: Duration,
    /// The wait before the session that just ended.
    waited: Duration,
}

impl Backoff {
    fn new(first: Duration) -> Self {
        Self {
            first,
            next: first,
            waited: Duration::ZERO,
        }
    }

    /// The wait (before jitter) after a session that consumed for `consumed`
    /// (`None`: it never got to consume).
    fn after(&mut self, consumed: Option<Duration>) -> Duration {
        if consumed.is_some_and(|c| c >= self.waited.min(STABLE_SESSION)) {
            self.next = self.first;
        }
        let wait = self.next;
        self.waited = wait;
        self.next = self.next.saturating_mul(2).min(MAX_RECONNECT_DELAY);
        wait
    }
}

/// `d` shortened by up to half, by `unit` (uniform in [0, 1)).
fn jittered(d: Duration, unit: f64) -> Duration {
    d.mul_f64(1.0 - unit.clamp(0.0, 1.0) / 2.0)
}

/// Log and show the broker's notices about the connection: `connection.blocked`
/// (a resource alarm: the broker stops reading from publishers) and its end.
async fn watch_connection(
    events: impl futures_util::Stream<Item = Event>,
    p: Arc<Pipeline>,
    close: Arc<CloseNote>,
) {
    futures_util::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            Event::ConnectionBlocked(reason) => {
                tracing::warn!(pipeline = %p.info.name, reason = %reason, "the broker blocked the connection (resource alarm): publishing, and so settling, waits until it lifts");
                p.metrics.status.set_blocked(Some(&reason));
            }
            Event::ConnectionUnblocked => {
                tracing::info!(pipeline = %p.info.name, "the broker unblocked the connection");
                p.metrics.status.set_blocked(None);
            }
            // The connection's end: its reason decides who a death is
            // charged to.
            Event::Error(e) => close.end(suspects::close_code(&e)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Backoff, MAX_RECONNECT_DELAY, STABLE_SESSION, jittered};

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_while_failing_and_resets_after_a_working_session() {
        let mut b = Backoff::new(100 * MS);
        let waits: Vec<_> = (0..4).map(|_| b.after(None)).collect();
        assert_eq!(waits, [100 * MS, 200 * MS, 400 * MS, 800 * MS]);
        // A session that consumed only briefly does not reset the delay.
        assert_eq!(b.after(Some(10 * MS)), 1600 * MS);
        // One that consumed longer than the delay it waited does.
        assert_eq!(b.after(Some(Duration::from_secs(5))), 100 * MS);
        assert_eq!(b.after(None), 200 * MS);
        for _ in 0..20 {
            b.after(None);
        }
        assert_eq!(b.after(None), MAX_RECONNECT_DELAY);
    }

    #[test]
    fn a_session_as_long_as_its_wait_or_a_stable_one_resets_the_backoff() {
        let mut b = Backoff::new(100 * MS);
        assert_eq!(b.after(None), 100 * MS);
        assert_eq!(b.after(None), 200 * MS);
        assert_eq!(b.after(None), 400 * MS);
        // It waited 400 ms and then consumed for 400 ms: back to the start.
        assert_eq!(b.after(Some(400 * MS)), 100 * MS);
        // After the longest wait, a session of STABLE_SESSION is enough.
        while b.after(None) < MAX_RECONNECT_DELAY {}
        assert_eq!(b.after(Some(STABLE_SESSION - MS)), MAX_RECONNECT_DELAY);
        assert_eq!(b.after(Some(STABLE_SESSION)), 100 * MS);
    }

    #[test]
    fn jitter_shortens_by_at_most_half() {
        assert_eq!(jittered(100 * MS, 0.0), 100 * MS);
        assert_eq!(jittered(100 * MS, 0.5), 75 * MS);
        assert!(jittered(100 * MS, 0.999_999) >= 50 * MS);
    }
}
