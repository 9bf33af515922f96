//! One message: call the plugin, decide its disposition, publish its effects
//! and settle it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tracing::{Instrument, Level, field};

use super::Pipeline;
use super::parked::Parked;
use super::replies::Replies;
use super::work::{InFlight, Job, Work};
use crate::allow::DenyKind;
use crate::broker::{self, SettleGuard};
use crate::disposition::{self, Circumstances, Plan, PluginStamp, Publication};
use crate::envelope::Envelope;
use crate::logtext::Escaped;
use crate::plugins::LoadedPlugin;
use crate::runtime::{Outcome, PluginFailure};
use crate::suspects;

/// First pause before a delivery whose effects were refused is requeued; it
/// doubles with each further refusal in a row, up to `REQUEUE_BACKOFF_MAX`.
const REQUEUE_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const REQUEUE_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What a message's INFO and WARN log lines name, besides the pipeline.
pub(super) struct About {
    plugin: Arc<LoadedPlugin>,
    attempt: u32,
    /// The message's identity for the poison ledger (`suspects::key`).
    pub(super) key: u64,
    /// The broker marked the delivery redelivered: a direct reply of its
    /// goes out alone (see `replies`).
    pub(super) redelivered: bool,
    /// It is being parked as a suspected poison message: counted in
    /// `warren_poison_parked_total` once its DLQ copy is confirmed and acked.
    pub(super) poison: bool,
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

impl Work {
    /// Invoke the plugin on one delivery, decide, and settle it (or hand the
    /// publications to an async task that settles it once they are confirmed).
    pub(super) fn handle(self: &Arc<Self>, job: Job) {
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
        let mut about = About {
            plugin: plugin.clone(),
            attempt: env.attempt,
            key,
            redelivered,
            poison: false,
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
            // Counted when settled: a copy cut off by another death comes
            // back and is parked again, and must not be counted twice.
            about.poison = true;
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
    pub(super) fn settle_plan(
        self: &Arc<Self>,
        plan: Plan,
        tag: u64,
        settle: SettleGuard,
        in_flight: InFlight,
        about: About,
        span: tracing::Span,
    ) {
        if plan.publications.is_empty() {
            self.ack(plan, about, tag, (settle, in_flight), span);
            return;
        }
        self.suspects.publishing(tag);
        let work = self.clone();
        let task = Box::pin(
            async move {
                work.publish_and_settle(plan, tag, (settle, in_flight), about)
                    .await;
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
    pub(super) fn check_outputs(
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
    pub(super) async fn publish_and_settle(
        self: &Arc<Self>,
        plan: Plan,
        tag: u64,
        (settle, in_flight): (SettleGuard, InFlight),
        about: About,
    ) {
        let p = &self.pipeline;
        match self.publish(&plan, &about).await {
            Ok(()) => {
                if p.requeue_streak.load(Ordering::Relaxed) != 0 {
                    p.requeue_streak.store(0, Ordering::Relaxed);
                    p.metrics.status.set_effect_error(None);
                }
                let span = tracing::Span::current();
                self.ack(plan, about, tag, (settle, in_flight), span);
            }
            Err(e) => {
                tracing::Span::current().record("outcome", "requeue");
                let error = format!("{e:#}");
                p.metrics.requeued.fetch_add(1, Ordering::Relaxed);
                if !self.publisher.usable() {
                    // Its reason decides who the death is charged to.
                    self.close.record(suspects::close_code_in(&e));
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
                p.metrics.status.set_effect_error(Some(&error));
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
    pub(super) async fn publish(&self, plan: &Plan, about: &About) -> Result<()> {
        let p = &self.pipeline;
        if !self.publisher.usable() {
            bail!("the publish channel is closed");
        }
        let started = Instant::now();
        let report = self.publish_split(plan, about).await?;
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
    /// Publish the plan's direct replies on the reply connection and the rest
    /// on the session's publish channel; `lost_copies` index
    /// `plan.publications`.
    async fn publish_split(&self, plan: &Plan, about: &About) -> Result<broker::PublishReport> {
        let pubs = &plan.publications;
        let direct = pubs.iter().filter(|p| Replies::carries(p)).count();
        if direct == 0 {
            return self.publisher.publish_all(pubs).await;
        }
        let (alone, key, p) = (about.redelivered, about.key, &self.pipeline);
        if direct == pubs.len() {
            return self.replies.publish(pubs, alone, key, p).await;
        }
        // Both: the session's effects and the replies, each where it goes.
        let lane: Vec<Publication> = pubs
            .iter()
            .filter(|p| Replies::carries(p))
            .cloned()
            .collect();
        // The indexes in `plan.publications` of what the session publishes.
        let main_at: Vec<usize> = (0..pubs.len())
            .filter(|&i| pubs.get(i).is_some_and(|p| !Replies::carries(p)))
            .collect();
        let main: Vec<Publication> = main_at
            .iter()
            .filter_map(|&i| pubs.get(i).cloned())
            .collect();
        let (main_report, lane_report) = tokio::join!(
            self.publisher.publish_all(&main),
            self.replies.publish(&lane, alone, key, p)
        );
        let (mut report, lane_report) = (main_report?, lane_report?);
        report.published = report.published.saturating_add(lane_report.published);
        report.unroutable = report.unroutable.saturating_add(lane_report.unroutable);
        report.lost_copies = report
            .lost_copies
            .iter()
            .filter_map(|&i| main_at.get(i).copied())
            .collect();
        Ok(report)
    }

    /// Ack a delivery whose effects are all confirmed. It is counted, and
    /// is no longer a poison suspect (its deaths are forgotten), only once
    /// the broker has surely taken the ack on an open channel (see
    /// `broker::settle`): an ack sent after the broker closed the channel (a
    /// `consumer_timeout`, a dead connection) is dropped and the message
    /// comes back, so counting it would count it twice. The channel can look
    /// open here and be closed already: its close may still be on its way.
    /// It stays in `warren_in_flight` until then.
    pub(super) fn ack(
        self: &Arc<Self>,
        plan: Plan,
        about: About,
        tag: u64,
        (settle, in_flight): (SettleGuard, InFlight),
        span: tracing::Span,
    ) {
        // Only its ack is left: until it is known to be taken, the delivery
        // stays in flight as a call, which a consumer_timeout (the broker
        // closing the channel over a call that ran too long) charges and any
        // other death does not. A worker busy with a long call only sees the
        // channel's end when it comes back for the next delivery, after this.
        self.suspects.unacked(tag);
        let work = self.clone();
        settle.ack_then(Box::new(move || {
            let _entered = span.enter();
            if let Some(key) = work.suspects.settled(tag) {
                work.pipeline.ledger.forget(key);
            }
            work.pipeline.settled(&plan, &about);
            drop(in_flight);
        }));
    }
}

impl Pipeline {
    /// Record a delivery whose effects are all confirmed (it is acked next).
    pub(super) fn settled(&self, plan: &Plan, about: &About) {
        tracing::Span::current().record("outcome", plan.disposition.label());
        if about.poison {
            self.metrics.poison_parked.fetch_add(1, Ordering::Relaxed);
        }
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
