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
//! Settling goes through the consume channel's [`Settler`], which batches acks
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

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Wake, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer, Event};
use tokio::runtime::Handle;
use tokio::sync::{Notify, watch};
use tracing::{Instrument, Level, field};

use crate::allow::{DenyKind, PublishPolicy};
use crate::broker::{self, KnownExchanges, Publisher, SettleGuard, Settler};
use crate::budget::Budget;
use crate::config::{BrokerConfig, PipelineConfig};
use crate::disposition::{self, Circumstances, PipelineInfo, Plan, PluginStamp, Publication};
use crate::downstream::{self, Admission, Breaker, Limiter, Phase, RateScope, Ticket};
use crate::envelope::Envelope;
use crate::logtext::Escaped;
use crate::ops::PipelineMetrics;
use crate::plugins::{LoadedPlugin, PluginSlot};
use crate::retry::RetryTiers;
use crate::runtime::{InvokeLimits, Outcome, PluginFailure};
use crate::secret::PluginSettings;
use crate::suspects::{self, Ledger};

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

/// Longest pause between reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(30);

/// Stack of a worker thread. Plugins run on it (wasmtime's sync calls use the
/// host stack), so it matches the 2 MiB tokio gives blocking threads.
const WORKER_STACK: usize = 2 << 20;

/// After the shutdown grace ran out: how long the last requeues and acks get
/// to reach the broker before the connection closes.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

/// Consumers started for another prefetch, for unique tags.
static RESIZES: AtomicU64 = AtomicU64::new(0);

/// A mutex that nothing panics while holding: a poisoned one is still whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// First pause before a delivery whose effects were refused is requeued; it
/// doubles with each further refusal in a row, up to `REQUEUE_BACKOFF_MAX`.
const REQUEUE_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const REQUEUE_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long a cancel or close may wait for the broker. A blocked connection
/// never answers; the broker requeues what is unsettled once the socket goes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

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
        metrics.set_plugin_version(slot.current().version());
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
        let breaker = config
            .circuit_breaker
            .clone()
            .map(|c| Arc::new(Breaker::new(c, info.name.clone(), metrics.clone())));
        // The rules were checked with the configuration, so this cannot fail
        // in practice; if it did, HTTP stays denied rather than open.
        let http = {
            use crate::outbound::HttpPolicy;
            let deny = || HttpPolicy::deny_all(&config.name, metrics.clone());
            let policy = match &config.http {
                None => deny(),
                Some(h) => HttpPolicy::new(&config.name, h, metrics.clone()).unwrap_or_else(|e| {
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

    /// Run until `stop` turns true: connect, consume, and on broker loss reconnect
    /// with backoff. Returns after in-flight messages are settled or `grace` ran out.
    ///
    /// The delay doubles with every failed attempt up to [`MAX_RECONNECT_DELAY`],
    /// and starts again from `first_delay` after a session that consumed for at
    /// least as long as the delay it had waited: a broker that comes back after a
    /// short outage is used again at once, instead of after the back-off earned
    /// by the last long one. Each wait is shortened by up to half at random, so
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
                    self.metrics.connected.store(false, Ordering::Relaxed);
                    let consumed = consuming_since.map(|t: Instant| t.elapsed());
                    let wait = jittered(backoff.after(consumed), fastrand::f64());
                    let error = chain_text(&e);
                    tracing::warn!(pipeline = %self.info.name, error = %error, retry_in_ms = wait.as_millis() as u64, "pipeline lost its broker session; reconnecting");
                    self.metrics.set_broker_error(Some(&error));
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
        self.metrics.set_node(Some(&node));
        let watching = tokio::spawn(watch_connection(conn.events_listener(), self.clone()));
        let result = self
            .clone()
            .consume(&conn, grace, &mut stop, consuming_since)
            .await;
        self.metrics.connected.store(false, Ordering::Relaxed);
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
        self.metrics.set_blocked(None);
        self.metrics.set_node(None);
        result
    }

    /// Declare, start the workers and consume until `stop` or a failure.
    async fn consume(
        self: Arc<Self>,
        conn: &Arc<Connection>,
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
        let (settler, mut settling) = Settler::start(channel.clone(), self.metrics.clone());
        let work = Arc::new(Work {
            pipeline: self.clone(),
            publisher,
            conn: conn.clone(),
            exchanges: KnownExchanges::new(&self.config),
            frame_max: conn.configuration().frame_max(),
            channel: channel.clone(),
            suspects: suspects::InFlight::default(),
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
                self.metrics.clone(),
            )));
        }
        self.metrics.connected.store(true, Ordering::Relaxed);
        self.metrics.set_broker_error(None);
        *consuming_since = Some(Instant::now());
        tracing::info!(pipeline = %name, queue = %self.config.queue, plugin = %self.slot.current().version(), broker = %self.metrics.node().unwrap_or_default(), "consuming");

        let outcome: Result<()> = tokio::select! {
            _ = stop.wait_for(|s| *s) => Ok(()),
            _ = work.broken.notified() => Err(anyhow!("the publish channel closed")),
            _ = work.ended.notified() => Err(anyhow!(work.end_reason())),
        };
        // The suspects are taken at the moment of death: what finishes later
        // (on a dead channel) is not what killed it.
        if let Err(e) = &outcome {
            // A consumer_timeout closes the consume channel and leaves the
            // connection up; the reason reaches the worker either as the
            // consumer's error or, depending on how the close is processed,
            // as a bare end of the consumer, so the channel's state decides.
            let text = format!("{e:#}");
            let ack_timeout = (text.contains("PRECONDITION_FAILED") && text.contains("timed out"))
                || (conn.status().connected() && !channel.status().connected());
            let suspects = work.suspects.suspects(ack_timeout);
            if !suspects.is_empty() {
                tracing::warn!(pipeline = %name, suspects = suspects.len(), "the session died with effects unconfirmed (or a call over the broker's consumer_timeout); each such message is charged one death (see session_death_limit)");
                self.ledger.record(suspects);
            }
        }

        // Stop the flow first, then let what was received settle on this
        // channel: workers handle what the consumer still holds, then exit on
        // its end; the settler stops once every delivery has reported.
        self.metrics.connected.store(false, Ordering::Relaxed);
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
        outcome
    }
}

/// An error and its causes, `: `-separated like `{:#}`, without the causes
/// that only repeat what the text before them says: the AMQP library's errors
/// print their source as part of their own message, so `{:#}` says it twice.
fn chain_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// Delays between reconnection attempts: doubling from `first` up to
/// [`MAX_RECONNECT_DELAY`] while attempts fail, back to `first` after a session
/// that consumed for at least as long as the delay it had waited.
#[derive(Debug)]
struct Backoff {
    first: Duration,
    next: Duration,
}

impl Backoff {
    fn new(first: Duration) -> Self {
        Self { first, next: first }
    }

    /// The wait (before jitter) after a session that consumed for `consumed`
    /// (`None`: it never got to consume).
    fn after(&mut self, consumed: Option<Duration>) -> Duration {
        if consumed.is_some_and(|c| c >= self.next) {
            self.next = self.first;
        }
        let wait = self.next;
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
async fn watch_connection(events: impl futures_util::Stream<Item = Event>, p: Arc<Pipeline>) {
    futures_util::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            Event::ConnectionBlocked(reason) => {
                tracing::warn!(pipeline = %p.info.name, reason = %reason, "the broker blocked the connection (resource alarm): publishing, and so settling, waits until it lifts");
                p.metrics.set_blocked(Some(&reason));
            }
            Event::ConnectionUnblocked => {
                tracing::info!(pipeline = %p.info.name, "the broker unblocked the connection");
                p.metrics.set_blocked(None);
            }
            _ => {}
        }
    }
}

/// What a message's INFO and WARN log lines name, besides the pipeline.
struct About {
    plugin: Arc<LoadedPlugin>,
    attempt: u32,
}

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A task polled first on the calling thread and handed to the async runtime
/// only once something wakes it.
struct Parked {
    runtime: Handle,
    state: Mutex<ParkedState>,
}

struct ParkedState {
    /// The task, once its first poll left it waiting.
    task: Option<Task>,
    /// It was woken, possibly before it was stored here.
    woken: bool,
}

impl Parked {
    fn start(runtime: &Handle, mut task: Task) {
        let parked = Arc::new(Self {
            runtime: runtime.clone(),
            state: Mutex::new(ParkedState {
                task: None,
                woken: false,
            }),
        });
        let waker = Waker::from(parked.clone());
        let _in_runtime = runtime.enter();
        if task
            .as_mut()
            .poll(&mut TaskContext::from_waker(&waker))
            .is_ready()
        {
            return;
        }
        let mut state = parked.lock();
        if state.woken {
            drop(state);
            runtime.spawn(task);
        } else {
            state.task = Some(task);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ParkedState> {
        // Nothing panics while holding it; a poisoned state is still whole.
        lock(&self.state)
    }
}

impl Wake for Parked {
    fn wake(self: Arc<Self>) {
        let task = {
            let mut state = self.lock();
            state.woken = true;
            state.task.take()
        };
        // Later wakes find the task gone: the runtime polls it from then on
        // with wakers of its own. If nothing ever wakes it (the channel went
        // away with the confirm), dropping the waker drops the task, and its
        // settle guard requeues the delivery.
        if let Some(task) = task {
            self.runtime.spawn(task);
        }
    }
}

/// A delivery on its way through a worker.
struct Job {
    delivery: Delivery,
    /// The message's identity for the poison ledger (`suspects::key`).
    key: u64,
    settle: SettleGuard,
    in_flight: InFlight,
    /// The breaker's admission, reported with the call's result.
    ticket: Option<Ticket>,
}

/// What a call says about the plugin's downstream service (the breaker's
/// input).
enum CallVerdict {
    /// A `retry` outcome, a trap, a timeout, a memory-limit hit.
    Failed(String),
    /// Any other outcome, a dead-letter included: bad input is not an outage.
    Fine,
    /// The instance could not be created: warren's trouble, not the service's.
    Silent,
}

fn downstream_failure(result: &Result<Outcome, PluginFailure>) -> CallVerdict {
    match result {
        Ok(Outcome::Retry(r)) => CallVerdict::Failed(format!("retry: {}", r.reason)),
        Ok(_) => CallVerdict::Fine,
        Err(PluginFailure::Instantiate(_)) => CallVerdict::Silent,
        Err(f) => CallVerdict::Failed(f.to_string()),
    }
}

/// Counts a delivery in `warren_in_flight` from when a worker takes it until it
/// is settled.
struct InFlight(Arc<PipelineMetrics>);

impl InFlight {
    fn new(m: &Arc<PipelineMetrics>) -> Self {
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
struct Work {
    pipeline: Arc<Pipeline>,
    publisher: Arc<Publisher>,
    /// The session's connection, for channels of its own (checks, repairs).
    conn: Arc<Connection>,
    /// Exchanges known to exist, for checking outputs before publishing.
    exchanges: KnownExchanges,
    /// The negotiated frame size: the largest header frame the broker takes.
    frame_max: u32,
    /// The consume channel: an ack on it counts only while it is open.
    channel: Channel,
    /// Deliveries taken and not yet settled on a live channel.
    suspects: suspects::InFlight,
    /// The session's consumer. The worker holding the lock waits for the next
    /// delivery and hands the lock on as soon as it has one (leader/followers):
    /// the delivery is handled on the thread lapin's I/O thread woke, with no
    /// further hand-off, and the next worker is already waiting meanwhile.
    consumer: Mutex<Consumer>,
    /// The queue consumed, for a consumer with another prefetch.
    queue: ShortString,
    /// Tag of the consumer the workers read from now.
    consumer_tag: Mutex<ShortString>,
    /// Its prefetch.
    prefetch: AtomicU16,
    /// A move to a consumer with another prefetch is under way.
    resizing: AtomicBool,
    /// The session is stopping: no new consumers.
    stopping: AtomicBool,
    /// The consumer to read from once the current one has ended.
    next_consumer: Mutex<Option<Consumer>>,
    /// Notified when the publish channel is found closed: the session restarts.
    broken: Notify,
    /// Notified when the consumer ends or fails; `end_reason` says why.
    ended: Notify,
    end_reason: Mutex<Option<String>>,
    /// The consumer has ended: workers exit.
    finished: AtomicBool,
    /// The async runtime, for publishing from worker threads.
    runtime: Handle,
    /// Set when the shutdown grace ran out: deliveries still held by the
    /// consumer are requeued instead of handled.
    abandon: AtomicBool,
    /// The consumer was cancelled on purpose with none to follow (the
    /// breaker is open): workers wait for the next one instead of ending.
    paused: AtomicBool,
    /// Held while the consumer is being changed (prefetch, pause, resume),
    /// so that changes for the budget and the breaker never interleave.
    switching: tokio::sync::Mutex<()>,
    /// Deliveries taken but not to be handled (the breaker is open, or the
    /// session stops during a rate-limit wait), requeued when the consumer
    /// they came from has ended. At most a prefetch window.
    held: Mutex<Vec<SettleGuard>>,
}

/// Longest sleep of a worker waiting for a rate-limit token or a consumer,
/// between looks at whether the session stops.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// How often a worker of a paused pipeline looks for the next consumer.
const PAUSED_POLL: Duration = Duration::from_millis(10);

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
    fn start_workers(self: &Arc<Self>, n: usize, settler: &Settler) -> Result<()> {
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
                Some(Err(e)) => return self.end(format!("the consumer failed: {e}")),
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

    /// Move to a consumer with prefetch `want`: RabbitMQ applies a changed
    /// prefetch to consumers started after the change only. The new consumer
    /// is ready before the old one is cancelled; workers read the old one to
    /// its end (what it already received is handled), then the new one.
    async fn resize(self: Arc<Self>, want: u16) {
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
    async fn start_consumer(&self, want: u16, what: &str) -> Result<(ShortString, ShortString)> {
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
    fn wait_while_paused(&self) -> Option<Consumer> {
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

    /// Keep the consumer where the breaker's phase wants it, for the whole
    /// session: none while open (and go half-open when the pause is over),
    /// prefetch 1 while half-open, the budget's prefetch when closed.
    async fn follow_breaker(self: Arc<Self>, breaker: Arc<Breaker>) {
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
    async fn steer(self: &Arc<Self>, target: Option<u16>) -> Result<()> {
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
    fn may_release_held(&self, next: &Option<Result<Delivery, lapin::Error>>) -> bool {
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
    fn release_held(&self) {
        let held = std::mem::take(&mut *lock(&self.held));
        for guard in held {
            guard.requeue();
        }
    }

    fn take_next_consumer(&self) -> Option<Consumer> {
        lock(&self.next_consumer).take()
    }

    fn current_tag(&self) -> ShortString {
        lock(&self.consumer_tag).clone()
    }

    /// The consumer ended: stop every worker, and the session if it still runs.
    fn end(&self, reason: String) {
        self.finished.store(true, Ordering::Relaxed);
        let first = {
            let mut r = lock(&self.end_reason);
            r.is_none() && r.replace(reason).is_none()
        };
        if first {
            self.ended.notify_one();
        }
    }

    fn end_reason(&self) -> String {
        self.end_reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| "the consumer ended".into())
    }

    /// Invoke the plugin on one delivery, decide, and settle it (or hand the
    /// publications to an async task that settles it once they are confirmed).
    fn handle(self: &Arc<Self>, job: Job) {
        let p = &self.pipeline;
        let Job {
            delivery,
            key,
            settle,
            in_flight,
            ticket,
        } = job;
        let tag = delivery.delivery_tag;
        let redelivered = delivery.redelivered;
        let plugin = p.slot.current();
        // The producer's AMQP `timestamp`: seconds since the epoch.
        let sent = delivery.properties.timestamp().as_ref().copied();
        let env = Envelope::new(
            delivery.properties,
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            &p.config.queue,
        );
        // The span is DEBUG: at the default level a plain ack logs nothing, and
        // building and formatting a span for every message cost several µs of
        // CPU each. The events that are logged at INFO and above carry the
        // same fields themselves (`About`).
        let span = tracing::debug_span!(
            "message",
            pipeline = %p.info.name,
            queue = %p.config.queue,
            plugin = plugin.name(),
            version = plugin.version(),
            attempt = env.attempt,
            outcome = field::Empty,
        );
        let entered = span.enter();
        let about = About {
            plugin: plugin.clone(),
            attempt: env.attempt,
        };
        let stamp = PluginStamp {
            name: plugin.name(),
            version: plugin.version(),
            digest: plugin.digest(),
        };
        let at = Circumstances {
            now: SystemTime::now(),
            unit_random: fastrand::f64(),
            frame_max: self.frame_max,
        };
        let limit = p.config.session_death_limit;
        let deaths = if redelivered && limit > 0 {
            p.ledger.deaths(key)
        } else {
            0
        };
        if deaths >= limit && deaths > 0 {
            let reason = format!(
                "suspected poison message: the broker session died {deaths} times while it was \
                 in flight (its call running or its effects unconfirmed); parked without calling \
                 the plugin or sending its effects"
            );
            message_event!(
                Level::WARN,
                p,
                about,
                deaths,
                "parking a message that keeps killing the broker session"
            );
            p.metrics.poison_parked.fetch_add(1, Ordering::Relaxed);
            let plan = disposition::park(&p.info, stamp, &env, delivery.data, reason, at);
            drop(entered);
            return self.settle_plan(plan, tag, settle, in_flight, about, span);
        }
        let message = env.to_message(delivery.data);
        let invocation = plugin.invoke_with_http(
            &message,
            p.plugin_config.shared(),
            p.info.name.clone(),
            p.limits,
            p.http.clone(),
        );
        p.metrics.observe_handle(invocation.elapsed);
        if let Some(age) = sent.and_then(|secs| {
            let sent = UNIX_EPOCH.checked_add(Duration::from_secs(secs))?;
            // A producer clock ahead of ours gives no age rather than a false one.
            at.now.duration_since(sent).ok()
        }) {
            p.metrics.observe_end_to_end(age);
        }
        let dropped = invocation.log_dropped();
        if dropped > 0 {
            p.metrics.log_dropped.fetch_add(dropped, Ordering::Relaxed);
            message_event!(
                Level::WARN,
                p,
                about,
                dropped,
                "plugin log lines over limits.max_log_lines / max_log_kib were dropped"
            );
        }
        if let Err(failure) = &invocation.result {
            p.metrics.failure(failure.kind());
            message_event!(Level::WARN, p, about, failure = %Escaped(&failure.to_string()), "plugin call failed");
        }
        if let Some(ticket) = ticket {
            match downstream_failure(&invocation.result) {
                CallVerdict::Failed(reason) => ticket.finish(Some(&reason)),
                CallVerdict::Fine => ticket.finish(None),
                // Dropped: the call says nothing about the downstream service.
                CallVerdict::Silent => drop(ticket),
            }
        }
        if let Some((pause_ms, reason)) = invocation.reported_outage() {
            match &p.breaker {
                Some(b) => b.trip(
                    Duration::from_millis(u64::from(pause_ms)),
                    &reason,
                    Instant::now(),
                ),
                None => message_event!(
                    Level::WARN,
                    p,
                    about,
                    pause_ms,
                    reason = %Escaped(&reason),
                    "the plugin reported its downstream service down, but the pipeline has no [pipeline.circuit_breaker]; ignored"
                ),
            }
        }
        let result = self.check_outputs(invocation.result);
        let plan = disposition::decide(&p.info, stamp, &env, message.body, result, at);
        drop(entered);
        self.settle_plan(plan, tag, settle, in_flight, about, span);
    }

    /// Ack a delivery without effects now; start publishing the effects of one
    /// with effects, and settle it once they are confirmed.
    fn settle_plan(
        self: &Arc<Self>,
        plan: Plan,
        tag: u64,
        settle: SettleGuard,
        in_flight: InFlight,
        about: About,
        span: tracing::Span,
    ) {
        if plan.publications.is_empty() {
            let _entered = span.enter();
            self.ack(&plan, &about, tag, settle);
            drop(in_flight);
            return;
        }
        self.suspects.publishing(tag);
        let work = self.clone();
        let task = Box::pin(
            async move {
                work.publish_and_settle(plan, tag, settle, &about).await;
                drop(in_flight);
            }
            .instrument(span.clone()),
        );
        // Start publishing on this thread: the first poll queues the first
        // publication's frames and wakes lapin's I/O thread, so an RPC reply
        // leaves now rather than after a runtime thread has picked the task up.
        // Waiting for the confirms and settling continue on the runtime, from
        // when the broker's confirm wakes the task: spawned now, it would
        // wake a runtime thread only to find it still waiting, a wake-up that
        // competes with the reply for the CPU.
        Parked::start(&self.runtime, task);
    }

    /// Outputs to an exchange the broker does not have are refused before
    /// anything is published: the broker would close the publish channel, and
    /// with it the effects of every other message in progress on it, and the
    /// message would come back to do it again. The message is dead-lettered
    /// with the broker's reason instead.
    fn check_outputs(
        &self,
        result: Result<Outcome, PluginFailure>,
    ) -> Result<Outcome, PluginFailure> {
        let (outs, reply_bytes) = match &result {
            Ok(Outcome::Publish(outs)) => (outs, 0),
            Ok(Outcome::Reply(reply)) => (&reply.publish, reply.body.len()),
            _ => return result,
        };
        // Caps per message: one message must not make thousands of
        // publications or hold unbounded memory in their bodies.
        let limits = &self.pipeline.config.limits;
        let count = outs.len().saturating_add(usize::from(reply_bytes > 0));
        if count > limits.max_outputs as usize {
            return Ok(Outcome::DeadLetter(format!(
                "the plugin returned {count} outputs; limits.max_outputs allows {}",
                limits.max_outputs
            )));
        }
        let bytes = outs
            .iter()
            .map(|o| o.body.len())
            .fold(reply_bytes, usize::saturating_add);
        if bytes > limits.max_output_bytes() {
            return Ok(Outcome::DeadLetter(format!(
                "the plugin returned {bytes} bytes of output bodies; limits.max_output_mib allows {} MiB",
                limits.max_output_mib
            )));
        }
        // The allow-list comes first: an output it denies is never looked up
        // on the broker (`decide` dead-letters the message with the reason).
        let policy = &self.pipeline.info.policy;
        if outs
            .iter()
            .any(|o| policy.output(&o.exchange, &o.routing_key).is_err())
        {
            return result;
        }
        for o in outs {
            if self.exchanges.known(&o.exchange) {
                continue;
            }
            if let Err(why) = self
                .runtime
                .block_on(self.exchanges.verify(&self.conn, &o.exchange))
            {
                return Ok(Outcome::DeadLetter(format!(
                    "output to exchange {:?} refused: {why}",
                    o.exchange
                )));
            }
        }
        result
    }

    /// Publish the plan's effects; ack once all are confirmed, else requeue.
    async fn publish_and_settle(&self, plan: Plan, tag: u64, settle: SettleGuard, about: &About) {
        let p = &self.pipeline;
        match self.publish(&plan, about).await {
            Ok(()) => {
                if p.requeue_streak.load(Ordering::Relaxed) != 0 {
                    p.requeue_streak.store(0, Ordering::Relaxed);
                    p.metrics.set_effect_error(None);
                }
                self.ack(&plan, about, tag, settle);
            }
            Err(e) => {
                tracing::Span::current().record("outcome", "requeue");
                let error = format!("{e:#}");
                p.metrics.requeued.fetch_add(1, Ordering::Relaxed);
                if !self.publisher.usable() {
                    message_event!(Level::WARN, p, about, error = %error, "effects not confirmed; requeueing the message");
                    // The session restarts; the broker requeues what is unsettled.
                    self.broken.notify_one();
                    settle.requeue();
                    return;
                }
                // The broker hands a requeued message out again at once, and
                // whatever refused its effects is likely to refuse them again:
                // back off, longer while the refusals go on, instead of spinning
                // through requeues and log lines.
                let streak = p.requeue_streak.fetch_add(1, Ordering::Relaxed);
                let delay = REQUEUE_BACKOFF_FIRST
                    .saturating_mul(1 << streak.min(10))
                    .min(REQUEUE_BACKOFF_MAX);
                message_event!(Level::WARN, p, about, error = %error, requeue_in_ms = delay.as_millis() as u64, "effects not confirmed; requeueing the message");
                p.metrics.set_effect_error(Some(&error));
                tokio::time::sleep(delay).await;
                // A deliberate requeue on a live channel: not a suspect.
                if self.channel.status().connected() {
                    self.suspects.settled(tag);
                }
                settle.requeue();
            }
        }
    }

    /// Publish the plan's publications and wait for their confirms. A retry or
    /// dead-letter copy that the broker could not route means one of warren's
    /// own queues is gone (deleted by hand or by a policy): they are declared
    /// again and the copy is published once more. Left alone, the message
    /// would be requeued until a quorum queue's delivery limit dead-letters it
    /// into the missing queue, where the broker drops it.
    async fn publish(&self, plan: &Plan, about: &About) -> Result<()> {
        let p = &self.pipeline;
        if !self.publisher.usable() {
            bail!("the publish channel is closed");
        }
        let started = Instant::now();
        let report = self.publisher.publish_all(&plan.publications).await?;
        p.metrics.observe_confirm(started.elapsed());
        p.metrics
            .published
            .fetch_add(report.published, Ordering::Relaxed);
        p.metrics
            .unroutable
            .fetch_add(report.unroutable, Ordering::Relaxed);
        if report.lost_copies.is_empty() {
            return Ok(());
        }
        let copies: Vec<Publication> = report
            .lost_copies
            .iter()
            .filter_map(|&i| plan.publications.get(i).cloned())
            .collect();
        let missing: Vec<&str> = copies.iter().map(|c| c.routing_key.as_str()).collect();
        message_event!(Level::WARN, p, about, queues = ?missing, "a queue of the pipeline is missing; declaring its queues again");
        p.metrics.topology_repairs.fetch_add(1, Ordering::Relaxed);
        let channel = self
            .conn
            .create_channel()
            .await
            .context("opening a channel to declare the queues again")?;
        broker::declare(&channel, &p.config, &p.info.tiers)
            .await
            .with_context(|| {
                format!("declaring the topology of pipeline {:?} again", p.info.name)
            })?;
        let _ = channel.close(200, "topology declared".into()).await;
        let again = self.publisher.publish_all(&copies).await?;
        if !again.lost_copies.is_empty() {
            bail!(
                "the broker could not route the copy to queue(s) {missing:?}, even after declaring them again"
            );
        }
        Ok(())
    }
}

impl Work {
    /// Ack a delivery whose effects are all confirmed: its work is done, so it
    /// is no longer a poison suspect. It is counted (and its deaths are
    /// forgotten) only if the ack can still reach the broker: on
    /// a channel the broker has closed (a `consumer_timeout`, a dead
    /// connection) the message comes back, and counting it would count it
    /// twice.
    fn ack(&self, plan: &Plan, about: &About, tag: u64, settle: SettleGuard) {
        settle.ack();
        if !self.channel.status().connected() {
            // A worker busy with a long call only sees the channel's end when
            // it comes back for the next delivery, after this: the delivery
            // must still be in flight then, for a consumer_timeout to charge it.
            self.suspects.unacked(tag);
            tracing::debug!(pipeline = %self.pipeline.info.name, "acked on a closed channel; the broker redelivers it");
            return;
        }
        if let Some(key) = self.suspects.settled(tag) {
            self.pipeline.ledger.forget(key);
        }
        self.pipeline.settled(plan, about);
    }
}

impl Pipeline {
    /// Record a delivery whose effects are all confirmed (it is acked next).
    fn settled(&self, plan: &Plan, about: &About) {
        tracing::Span::current().record("outcome", plan.disposition.label());
        if plan.stripped_headers > 0 {
            self.metrics.denied(DenyKind::Header, plan.stripped_headers);
        }
        if let Some(kind) = plan.denied {
            self.metrics.denied(kind, 1);
            message_event!(
                Level::WARN,
                self,
                about,
                reason = %Escaped(plan.reason.as_deref().unwrap_or_default()),
                "denied by the pipeline's allow-list; dead-lettered"
            );
        } else if let Some(reason) = &plan.reason {
            message_event!(
                Level::INFO,
                self,
                about,
                reason = %Escaped(reason),
                "{}",
                plan.disposition.label()
            );
        } else {
            tracing::debug!("{}", plan.disposition.label());
        }
        self.metrics.outcome(plan.disposition);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Backoff, MAX_RECONNECT_DELAY, jittered};

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
    fn error_chains_say_each_cause_once() {
        let e = anyhow::anyhow!("ACCESS_REFUSED - Login was refused")
            .context("protocol error: ACCESS_REFUSED - Login was refused")
            .context("connecting to the broker");
        assert_eq!(
            super::chain_text(&e),
            "connecting to the broker: protocol error: ACCESS_REFUSED - Login was refused"
        );
    }

    #[test]
    fn jitter_shortens_by_at_most_half() {
        assert_eq!(jittered(100 * MS, 0.0), 100 * MS);
        assert_eq!(jittered(100 * MS, 0.5), 75 * MS);
        assert!(jittered(100 * MS, 0.999_999) >= 50 * MS);
    }
}
