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

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Wake, Waker};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use tokio::runtime::Handle;
use tokio::sync::{Notify, watch};
use tracing::{Instrument, Level, field};

use crate::broker::{self, Publisher, SettleGuard, Settler};
use crate::config::{BrokerConfig, PipelineConfig};
use crate::disposition::{self, Circumstances, PipelineInfo, Plan, PluginStamp};
use crate::envelope::Envelope;
use crate::ops::PipelineMetrics;
use crate::plugins::{LoadedPlugin, PluginSlot};
use crate::retry::RetryTiers;
use crate::runtime::InvokeLimits;

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

/// Everything a pipeline's tasks share.
#[derive(Debug)]
pub struct Pipeline {
    pub config: PipelineConfig,
    pub info: PipelineInfo,
    pub slot: Arc<PluginSlot>,
    pub metrics: Arc<PipelineMetrics>,
    plugin_config: Arc<BTreeMap<String, String>>,
    limits: InvokeLimits,
}

impl Pipeline {
    /// Assemble a pipeline around an already loaded plugin.
    pub fn new(
        config: PipelineConfig,
        slot: Arc<PluginSlot>,
        metrics: Arc<PipelineMetrics>,
    ) -> Self {
        let info = PipelineInfo {
            name: config.name.as_str().into(),
            queue: config.queue.clone(),
            dlq: config.dlq_name(),
            tiers: RetryTiers::new(&config.retry),
        };
        let limits = InvokeLimits {
            timeout: config.limits.timeout(),
            memory_bytes: config.limits.memory_bytes(),
        };
        metrics.set_plugin_version(slot.current().version());
        Self {
            plugin_config: Arc::new(config.config.clone()),
            config,
            info,
            slot,
            metrics,
            limits,
        }
    }

    /// Run until `stop` turns true: connect, consume, and on broker loss reconnect
    /// with backoff. Returns after in-flight messages are settled or `grace` ran out.
    pub async fn supervise(
        self: Arc<Self>,
        endpoint: BrokerConfig,
        first_delay: Duration,
        grace: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut delay = first_delay;
        let mut sessions = 0u64;
        loop {
            if *stop.borrow() {
                return;
            }
            if sessions > 0 {
                self.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            sessions += 1;
            match self.clone().session(&endpoint, grace, stop.clone()).await {
                Ok(()) => return,
                Err(e) => {
                    self.metrics.connected.store(false, Ordering::Relaxed);
                    let error = format!("{e:#}");
                    tracing::warn!(pipeline = %self.info.name, error = %error, retry_in_ms = delay.as_millis() as u64, "pipeline lost its broker session; reconnecting");
                    self.metrics.set_broker_error(Some(&error));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            delay = (delay * 2).min(MAX_RECONNECT_DELAY);
        }
    }

    /// One connection's lifetime. `Ok` means a clean stop was requested.
    async fn session(
        self: Arc<Self>,
        endpoint: &BrokerConfig,
        grace: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let name = &self.info.name;
        let conn = broker::connect(endpoint, name).await?;
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
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .context("setting prefetch")?;
        let tag: ShortString = format!("warren-{name}-{}", std::process::id()).into();
        let queue = ShortString::try_new(self.config.queue.clone())
            .map_err(|_| anyhow!("queue name too long"))?;

        let consumer = channel
            .basic_consume(
                queue,
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
            consumer: Mutex::new(consumer),
            broken: Notify::new(),
            ended: Notify::new(),
            end_reason: Mutex::new(None),
            finished: AtomicBool::new(false),
            runtime: Handle::current(),
            abandon: AtomicBool::new(false),
        });
        if let Err(e) = work.start_workers(self.config.concurrency, &settler) {
            // Workers already started stop when the connection goes.
            let _ = conn.close(200, "warren cannot start workers".into()).await;
            return Err(e);
        }
        self.metrics.connected.store(true, Ordering::Relaxed);
        self.metrics.set_broker_error(None);
        tracing::info!(pipeline = %name, queue = %self.config.queue, plugin = %self.slot.current().version(), "consuming");

        let outcome: Result<()> = tokio::select! {
            _ = stop.wait_for(|s| *s) => Ok(()),
            _ = work.broken.notified() => Err(anyhow!("the publish channel closed")),
            _ = work.ended.notified() => Err(anyhow!(work.end_reason())),
        };

        // Stop the flow first, then let what was received settle on this
        // channel: workers handle what the consumer still holds, then exit on
        // its end; the settler stops once every delivery has reported.
        self.metrics.connected.store(false, Ordering::Relaxed);
        let _ = channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await;
        drop(settler);
        if tokio::time::timeout(grace, &mut settling).await.is_err() {
            tracing::warn!(pipeline = %name, left = self.metrics.in_flight.load(Ordering::Relaxed), "shutdown grace ran out; unsettled messages go back to the queue");
            // Queued deliveries are requeued instead of handled; calls still
            // running end by their own timeout and find the channel closed.
            work.abandon.store(true, Ordering::Relaxed);
            let _ = tokio::time::timeout(FINAL_FLUSH, &mut settling).await;
        }
        let _ = conn.close(200, "warren stopping".into()).await;
        outcome
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
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
    settle: SettleGuard,
    in_flight: InFlight,
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
    /// The session's consumer. The worker holding the lock waits for the next
    /// delivery and hands the lock on as soon as it has one (leader/followers):
    /// the delivery is handled on the thread lapin's I/O thread woke, with no
    /// further hand-off, and the next worker is already waiting meanwhile.
    consumer: Mutex<Consumer>,
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
            let next = {
                let mut consumer = match self.consumer.lock() {
                    Ok(c) => c,
                    Err(poisoned) => poisoned.into_inner(),
                };
                if self.finished.load(Ordering::Relaxed) {
                    return;
                }
                let next = self.runtime.block_on(consumer.next());
                if !matches!(next, Some(Ok(_))) {
                    // Marked before the lock is released: a worker that took
                    // the lock next would otherwise wait on a stream that has
                    // already ended, and hold up the shutdown until the
                    // connection closes.
                    self.finished.store(true, Ordering::Relaxed);
                }
                next
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return self.end(format!("the consumer failed: {e}")),
                None => {
                    return self.end("the broker cancelled the consumer (queue deleted?)".into());
                }
            };
            let job = Job {
                settle: settler.guard(delivery.delivery_tag),
                in_flight: InFlight::new(&self.pipeline.metrics),
                delivery,
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

    /// The consumer ended: stop every worker, and the session if it still runs.
    fn end(&self, reason: String) {
        self.finished.store(true, Ordering::Relaxed);
        let first = {
            let mut r = self
                .end_reason
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
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
            settle,
            in_flight,
        } = job;
        let plugin = p.slot.current();
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
        let message = env.to_message(delivery.data);
        let invocation = plugin.invoke(
            &message,
            p.plugin_config.clone(),
            p.info.name.clone(),
            p.limits,
        );
        p.metrics.observe_handle(invocation.elapsed);
        if let Err(failure) = &invocation.result {
            p.metrics.failure(failure.kind());
            message_event!(Level::WARN, p, about, failure = %failure, "plugin call failed");
        }
        let plan = disposition::decide(
            &p.info,
            PluginStamp {
                name: plugin.name(),
                version: plugin.version(),
                digest: plugin.digest(),
            },
            &env,
            message.body,
            invocation.result,
            Circumstances {
                now: SystemTime::now(),
                unit_random: fastrand::f64(),
            },
        );
        if plan.publications.is_empty() {
            p.settled(&plan, &about);
            settle.ack();
            drop(in_flight);
            return;
        }
        drop(entered);
        let work = self.clone();
        let task = Box::pin(
            async move {
                work.publish_and_settle(plan, settle, &about).await;
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

    /// Publish the plan's effects; ack once all are confirmed, else requeue.
    async fn publish_and_settle(&self, mut plan: Plan, settle: SettleGuard, about: &About) {
        let p = &self.pipeline;
        let published = async {
            if !self.publisher.usable() {
                bail!("the publish channel is closed");
            }
            let report = self
                .publisher
                .publish_all(std::mem::take(&mut plan.publications))
                .await?;
            p.metrics
                .published
                .fetch_add(report.published, Ordering::Relaxed);
            p.metrics
                .unroutable
                .fetch_add(report.unroutable, Ordering::Relaxed);
            anyhow::Ok(())
        }
        .await;
        match published {
            Ok(()) => {
                p.settled(&plan, about);
                settle.ack();
            }
            Err(e) => {
                tracing::Span::current().record("outcome", "requeue");
                message_event!(
                    Level::WARN,
                    p,
                    about,
                    error = %format!("{e:#}"),
                    "effects not confirmed; requeueing the message"
                );
                p.metrics.requeued.fetch_add(1, Ordering::Relaxed);
                if !self.publisher.usable() {
                    self.broken.notify_one();
                }
                settle.requeue();
            }
        }
    }
}

impl Pipeline {
    /// Record a delivery whose effects are all confirmed (it is acked next).
    fn settled(&self, plan: &Plan, about: &About) {
        tracing::Span::current().record("outcome", plan.disposition.label());
        if let Some(reason) = &plan.reason {
            message_event!(
                Level::INFO,
                self,
                about,
                reason = %reason,
                "{}",
                plan.disposition.label()
            );
        } else {
            tracing::debug!("{}", plan.disposition.label());
        }
        self.metrics.outcome(plan.disposition);
    }
}
