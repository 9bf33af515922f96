//! A running pipeline: a supervisor that (re)connects, declares the topology and
//! consumes; one task per delivery that invokes the plugin and settles the
//! delivery according to `disposition`. One bad message never stops the loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{FieldTable, ShortString};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, field};

use crate::broker::{self, Publisher};
use crate::config::PipelineConfig;
use crate::disposition::{self, Circumstances, PipelineInfo, PluginStamp};
use crate::envelope::Envelope;
use crate::ops::PipelineMetrics;
use crate::plugins::PluginSlot;
use crate::retry::RetryTiers;
use crate::runtime::InvokeLimits;

/// Longest pause between reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(30);

/// Everything a pipeline's tasks share.
#[derive(Debug)]
pub struct Pipeline {
    pub config: PipelineConfig,
    pub info: PipelineInfo,
    pub slot: Arc<PluginSlot>,
    pub metrics: Arc<PipelineMetrics>,
    plugin_config: Arc<BTreeMap<String, String>>,
    limits: InvokeLimits,
    permits: Arc<Semaphore>,
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
            permits: Arc::new(Semaphore::new(config.concurrency)),
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
        url: String,
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
            match self.clone().session(&url, grace, stop.clone()).await {
                Ok(()) => return,
                Err(e) => {
                    self.metrics.connected.store(false, Ordering::Relaxed);
                    tracing::warn!(pipeline = %self.info.name, error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "pipeline lost its broker session; reconnecting");
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
        url: &str,
        grace: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let name = &self.info.name;
        let conn = broker::connect(url, name).await?;
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
        let mut consumer = channel
            .basic_consume(
                queue,
                tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming from queue {:?}", self.config.queue))?;
        self.metrics.connected.store(true, Ordering::Relaxed);
        tracing::info!(pipeline = %name, queue = %self.config.queue, plugin = %self.slot.current().version(), "consuming");

        let broken = Arc::new(Notify::new());
        let mut tasks = JoinSet::new();
        let outcome: Result<()> = loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break Ok(()),
                _ = broken.notified() => break Err(anyhow!("the publish channel closed")),
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = joined {
                        // Only a bug in warren gets here; the delivery stays unacked
                        // and returns to the queue with the channel.
                        tracing::error!(pipeline = %name, error = %e, "message task failed");
                    }
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let this = self.clone();
                        let publisher = publisher.clone();
                        let broken = broken.clone();
                        tasks.spawn(async move { this.handle(delivery, &publisher, &broken).await });
                    }
                    Some(Err(e)) => break Err(anyhow!(e).context("the consumer failed")),
                    None => break Err(anyhow!("the broker cancelled the consumer (queue deleted?)")),
                },
            }
        };

        // Stop the flow first, then let in-flight messages settle on this channel.
        self.metrics.connected.store(false, Ordering::Relaxed);
        let _ = channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await;
        let drained = tokio::time::timeout(grace, async {
            while let Some(joined) = tasks.join_next().await {
                if let Err(e) = joined {
                    tracing::error!(pipeline = %name, error = %e, "message task failed");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(pipeline = %name, left = tasks.len(), "shutdown grace ran out; unsettled messages go back to the queue");
            tasks.abort_all();
        }
        let _ = conn.close(200, "warren stopping".into()).await;
        outcome
    }

    /// Invoke the plugin on one delivery and settle it.
    async fn handle(self: Arc<Self>, delivery: Delivery, publisher: &Publisher, broken: &Notify) {
        self.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        let plugin = self.slot.current();
        let env = Envelope::new(
            delivery.properties.clone(),
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            &self.config.queue,
        );
        let span = tracing::info_span!(
            "message",
            pipeline = %self.info.name,
            queue = %self.config.queue,
            plugin = plugin.name(),
            version = plugin.version(),
            attempt = env.attempt,
            outcome = field::Empty,
        );
        async {
            let result = self.process(&plugin, &env, delivery.data, publisher).await;
            let settled = match result {
                Ok(plan) => {
                    tracing::Span::current().record("outcome", plan.disposition.label());
                    if let Some(reason) = &plan.reason {
                        tracing::info!(reason = %reason, "{}", plan.disposition.label());
                    } else {
                        tracing::debug!("{}", plan.disposition.label());
                    }
                    self.metrics.outcome(plan.disposition);
                    delivery.acker.ack(BasicAckOptions::default()).await.context("acking")
                }
                Err(e) => {
                    tracing::Span::current().record("outcome", "requeue");
                    tracing::warn!(error = %format!("{e:#}"), "effects not confirmed; requeueing the message");
                    self.metrics.requeued.fetch_add(1, Ordering::Relaxed);
                    if !publisher.usable() {
                        broken.notify_one();
                    }
                    let nack = BasicNackOptions { requeue: true, multiple: false };
                    delivery.acker.nack(nack).await.context("nacking")
                }
            };
            if let Err(e) = settled {
                // The channel is gone: the broker requeues the delivery itself.
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %format!("{e:#}"), "could not settle the delivery; the broker will redeliver it");
            }
        }
        .instrument(span)
        .await;
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Run the plugin and confirm the plan's effects; `Err` means requeue.
    async fn process(
        &self,
        plugin: &Arc<crate::plugins::LoadedPlugin>,
        env: &Envelope,
        body: Vec<u8>,
        publisher: &Publisher,
    ) -> Result<disposition::Plan> {
        let message = env.to_message(body);
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .context("the pipeline is shutting down")?;
        let (p, config, name, limits) = (
            plugin.clone(),
            self.plugin_config.clone(),
            self.info.name.clone(),
            self.limits,
        );
        let (message, invocation) = tokio::task::spawn_blocking(move || {
            let inv = p.invoke(&message, config, name, limits);
            (message, inv)
        })
        .await
        .context("the plugin call's thread failed")?;
        drop(permit);
        self.metrics.observe_handle(invocation.elapsed);
        if let Err(failure) = &invocation.result {
            self.metrics.failure(failure.kind());
            tracing::warn!(failure = %failure, "plugin call failed");
        }
        let mut plan = disposition::decide(
            &self.info,
            PluginStamp {
                name: plugin.name(),
                version: plugin.version(),
                digest: plugin.digest(),
            },
            env,
            message.body,
            invocation.result,
            Circumstances {
                now: SystemTime::now(),
                unit_random: fastrand::f64(),
            },
        );
        if !publisher.usable() {
            bail!("the publish channel is closed");
        }
        let report = publisher
            .publish_all(std::mem::take(&mut plan.publications))
            .await?;
        self.metrics
            .published
            .fetch_add(report.published, Ordering::Relaxed);
        self.metrics
            .unroutable
            .fetch_add(report.unroutable, Ordering::Relaxed);
        Ok(plan)
    }
}
