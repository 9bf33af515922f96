//! Settling the deliveries of one consume channel: acks batched into
//! `basic.ack multiple=true`, without ever acking a delivery before its own
//! effects are confirmed and without ever acking past one that is unsettled.
//!
//! Delivery tags on a channel count up from 1 in delivery order, and every
//! delivery on a pipeline's consume channel is the pipeline's. Message tasks
//! report each delivery as done (`ack`, after its effects are confirmed) or
//! failed (`requeue`). The settler keeps the *watermark*, the lowest tag not
//! yet settled; when it moves, one `multiple` ack naming the highest newly
//! covered tag that is still outstanding settles the whole stretch below it.
//!
//! Deliveries done above one still in progress wait for it briefly (`HOLD`),
//! then are acked one by one, so a slow message never holds the rest of the
//! prefetch window hostage. Requeues go out at once, each on its own, before
//! any ack that could cover their tag. A broker that saw a delivery requeued
//! or acked no longer counts it as outstanding, so a later `multiple` ack never
//! touches it.
//!
//! Batching follows the load: the settler takes every report that is ready,
//! then acts, so a quiet pipeline acks each message immediately and a busy one
//! acks hundreds with one frame.
//!
//! An ack has no answer, and one sent after the broker closed the channel
//! (a `consumer_timeout`, say) is dropped without a word: the message comes
//! back. Until the channel's close reaches the client it still looks open, so
//! an ack can look delivered and not be. What is to happen once an ack has
//! taken effect (counting the message, clearing it as a poison suspect) is
//! therefore done only when a round trip on the same channel, sent after the
//! acks, comes back: the broker handles a channel's frames in order, so it
//! read those acks on an open channel. If the channel closes first, it is
//! dropped, as the broker redelivers the message.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long deliveries done above an unsettled one wait for it before they are
/// acked individually. Short next to any timeout, long next to the spread of
/// completion times of concurrent fast messages.
pub const HOLD: Duration = Duration::from_millis(2);

/// How a delivery ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its effects are confirmed: ack it.
    Ack,
    /// Its effects could not be confirmed: nack it with requeue.
    Requeue,
}

/// What to do once a delivery's ack has surely taken effect.
pub type Acked = Box<dyn FnOnce() + Send>;

type Report = (u64, Verdict, Option<Acked>);

/// The exchange a round trip after the acks declares, passively: every vhost
/// has it and it cannot be deleted, so the declare changes nothing and never
/// fails on an open channel.
const PROBE_EXCHANGE: &str = "amq.direct";

/// Handle to a channel's settler. Dropping every handle and guard lets the
/// settler flush what is left and stop.
#[derive(Debug, Clone)]
pub struct Settler {
    tx: mpsc::UnboundedSender<Report>,
}

impl Settler {
    /// Start settling deliveries of `channel`, for `pipeline`'s log lines;
    /// `failures` counts the acks and nacks the channel could not carry.
    pub fn start(
        channel: Channel,
        pipeline: Arc<str>,
        failures: Arc<AtomicU64>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(channel, rx, pipeline, failures));
        (Self { tx }, task)
    }

    /// The guard for delivery `tag`: whoever holds it must settle it.
    pub fn guard(&self, tag: u64) -> SettleGuard {
        SettleGuard {
            tag,
            tx: Some(self.tx.clone()),
        }
    }
}

/// One delivery's obligation to be settled. Dropped unsettled (a panic, an
/// aborted task), it requeues the delivery rather than leave it unacked for
/// the rest of the session.
#[derive(Debug)]
pub struct SettleGuard {
    tag: u64,
    tx: Option<mpsc::UnboundedSender<Report>>,
}

impl SettleGuard {
    /// Ack the delivery (its effects are confirmed).
    pub fn ack(mut self) {
        self.send(Verdict::Ack, None);
    }

    /// Ack the delivery, and run `acked` once the broker has surely taken the
    /// ack on an open channel; never, if the channel closes first.
    pub fn ack_then(mut self, acked: Acked) {
        self.send(Verdict::Ack, Some(acked));
    }

    /// Nack the delivery with requeue.
    pub fn requeue(mut self) {
        self.send(Verdict::Requeue, None);
    }

    fn send(&mut self, v: Verdict, acked: Option<Acked>) {
        if let Some(tx) = self.tx.take() {
            // The settler only stops once every guard is gone, so this cannot
            // fail while we hold one; if it ever did, the delivery would stay
            // unacked and return to the queue with the channel.
            let _ = tx.send((self.tag, v, acked));
        }
    }
}

impl Drop for SettleGuard {
    fn drop(&mut self) {
        self.send(Verdict::Requeue, None);
    }
}

async fn run(
    channel: Channel,
    mut rx: mpsc::UnboundedReceiver<Report>,
    pipeline: Arc<str>,
    failures: Arc<AtomicU64>,
) {
    let mut book = Book::default();
    let mut open = true;
    let mut broken = false;
    // What to run once the acks of these tags have surely taken effect.
    let mut pending: Vec<(u64, Acked)> = Vec::new();
    while open || book.waiting() > 0 {
        let mut nacks = Vec::new();
        let wake = book.hold_deadline(HOLD);
        tokio::select! {
            report = rx.recv(), if open => match report {
                Some((tag, v, acked)) => {
                    book.record(tag, v, &mut nacks);
                    pending.extend(acked.map(|a| (tag, a)));
                    while let Ok((tag, v, acked)) = rx.try_recv() {
                        book.record(tag, v, &mut nacks);
                        pending.extend(acked.map(|a| (tag, a)));
                    }
                }
                None => open = false,
            },
            _ = tokio::time::sleep_until(wake.unwrap_or_else(far_future)), if wake.is_some() => {}
            else => {}
        }
        // Once no more reports can come, nothing is worth waiting for.
        let hold = if open { HOLD } else { Duration::ZERO };
        let plan = book.plan(Instant::now(), hold);
        if broken {
            // The channel is gone; the broker requeues everything unacked.
            pending.clear();
            continue;
        }
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        let mut sent = Vec::with_capacity(nacks.len() + plan.singles.len() + 1);
        for tag in nacks {
            sent.push(channel.basic_nack(tag, requeue).await);
        }
        if let Some(tag) = plan.multiple {
            sent.push(
                channel
                    .basic_ack(tag, BasicAckOptions { multiple: true })
                    .await,
            );
        }
        for &tag in &plan.singles {
            sent.push(
                channel
                    .basic_ack(tag, BasicAckOptions { multiple: false })
                    .await,
            );
        }
        if let Some(Err(e)) = sent.into_iter().find(Result::is_err) {
            broken = true;
            pending.clear();
            failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(pipeline = %pipeline, error = %e, "could not settle deliveries; the broker will redeliver them");
            continue;
        }
        // Those whose acks went out this round: below the watermark, or acked
        // alone.
        let (sent_now, later): (Vec<_>, Vec<_>) = pending
            .drain(..)
            .partition(|(t, _)| *t < book.watermark() || plan.singles.binary_search(t).is_ok());
        pending = later;
        if sent_now.is_empty() {
            continue;
        }
        if let Err(e) = round_trip(&channel).await {
            // Closed before the broker answered: the acks may have been
            // dropped with it, and the broker redelivers what they named.
            broken = true;
            pending.clear();
            tracing::debug!(pipeline = %pipeline, error = %e, "the consume channel closed before its acks were known to be taken");
            continue;
        }
        for (_, acked) in sent_now {
            acked();
        }
    }
}

/// A request on `channel` that the broker answers only after it has handled
/// every frame sent on it before.
async fn round_trip(channel: &Channel) -> lapin::Result<()> {
    channel
        .exchange_declare(
            PROBE_EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

/// State of a tag at or above the watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Received, still being handled (or not reported yet).
    Open,
    /// Done; not acked yet, so still outstanding at the broker.
    Ready,
    /// Acked on its own, or requeued: the broker no longer holds it for us.
    Sent,
}

/// What to send after a round of reports.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct AckPlan {
    /// `basic.ack multiple=true` with this tag.
    pub multiple: Option<u64>,
    /// `basic.ack` of each of these alone.
    pub singles: Vec<u64>,
}

/// The bookkeeping, apart from the I/O so it can be tested on its own.
#[derive(Debug)]
pub(crate) struct Book {
    /// The lowest tag not settled.
    watermark: u64,
    /// Slots of tags `watermark..`, front first (one byte per tag, so even a
    /// long-stuck delivery with thousands passing it costs little).
    slots: VecDeque<Slot>,
    /// Ready tags not yet acked; after `plan`, those above an open slot.
    waiting: Vec<u64>,
    /// Since when the oldest of `waiting` has been waiting.
    blocked_since: Option<Instant>,
}

impl Default for Book {
    fn default() -> Self {
        Self {
            watermark: 1,
            slots: VecDeque::new(),
            waiting: Vec::new(),
            blocked_since: None,
        }
    }
}

impl Book {
    /// Record a report; requeues are added to `nacks` (they go out at once).
    pub(crate) fn record(&mut self, tag: u64, v: Verdict, nacks: &mut Vec<u64>) {
        let Some(i) = tag
            .checked_sub(self.watermark)
            .and_then(|i| usize::try_from(i).ok())
        else {
            // Below the watermark: already settled; a duplicate report.
            return;
        };
        if i >= self.slots.len() {
            self.slots.resize(i + 1, Slot::Open);
        }
        if self.slots[i] != Slot::Open {
            return;
        }
        match v {
            Verdict::Ack => {
                self.slots[i] = Slot::Ready;
                self.waiting.push(tag);
            }
            Verdict::Requeue => {
                self.slots[i] = Slot::Sent;
                nacks.push(tag);
            }
        }
    }

    /// The lowest tag not settled: every tag below is acked or requeued.
    pub(crate) fn watermark(&self) -> u64 {
        self.watermark
    }

    /// Ready tags waiting above an unsettled one.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// When the waiting tags are to be acked alone, if any wait.
    pub(crate) fn hold_deadline(&self, hold: Duration) -> Option<Instant> {
        self.blocked_since.map(|t| t + hold)
    }

    /// Move the watermark over settled tags and decide what to ack.
    pub(crate) fn plan(&mut self, now: Instant, hold: Duration) -> AckPlan {
        let mut plan = AckPlan::default();
        while let Some(&s) = self.slots.front() {
            if s == Slot::Open {
                break;
            }
            self.slots.pop_front();
            if s == Slot::Ready {
                // Every tag below is settled or covered by this ack; the tag
                // itself is outstanding, so the broker accepts it.
                plan.multiple = Some(self.watermark);
            }
            self.watermark += 1;
        }
        let w = self.watermark;
        self.waiting.retain(|&t| t >= w);
        if self.waiting.is_empty() {
            self.blocked_since = None;
            return plan;
        }
        let since = *self.blocked_since.get_or_insert(now);
        if now.duration_since(since) >= hold {
            for &t in &self.waiting {
                if let Some(s) = usize::try_from(t - w)
                    .ok()
                    .and_then(|i| self.slots.get_mut(i))
                {
                    *s = Slot::Sent;
                }
            }
            plan.singles = std::mem::take(&mut self.waiting);
            plan.singles.sort_unstable();
            self.blocked_since = None;
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(b: &mut Book, tags: &[(u64, Verdict)]) -> Vec<u64> {
        let mut nacks = Vec::new();
        for &(t, v) in tags {
            b.record(t, v, &mut nacks);
        }
        nacks
    }

    const A: Verdict = Verdict::Ack;
    const R: Verdict = Verdict::Requeue;

    #[test]
    fn in_order_completions_become_one_multiple_ack() {
        let mut b = Book::default();
        report(&mut b, &[(1, A), (2, A), (3, A)]);
        let p = b.plan(Instant::now(), HOLD);
        assert_eq!(p.multiple, Some(3));
        assert!(p.singles.is_empty());
        report(&mut b, &[(4, A)]);
        assert_eq!(b.plan(Instant::now(), HOLD).multiple, Some(4));
    }

    #[test]
    fn never_acks_past_an_unsettled_delivery() {
        let mut b = Book::default();
        report(&mut b, &[(1, A), (3, A), (4, A)]);
        let t0 = Instant::now();
        let p = b.plan(t0, HOLD);
        assert_eq!(p.multiple, Some(1), "only the prefix below tag 2");
        assert!(p.singles.is_empty(), "3 and 4 wait for 2 a little");
        assert_eq!(b.waiting(), 2);
        // 2 completes within the hold: one multiple ack covers 2..4.
        report(&mut b, &[(2, A)]);
        let p = b.plan(t0 + Duration::from_millis(1), HOLD);
        assert_eq!(p.multiple, Some(4));
        assert!(p.singles.is_empty());
        assert_eq!(b.waiting(), 0);
    }

    #[test]
    fn a_slow_delivery_does_not_hold_the_others_past_the_hold() {
        let mut b = Book::default();
        report(&mut b, &[(2, A), (3, A)]);
        let t0 = Instant::now();
        assert_eq!(b.plan(t0, HOLD), AckPlan::default());
        assert_eq!(b.hold_deadline(HOLD), Some(t0 + HOLD));
        let p = b.plan(t0 + HOLD, HOLD);
        assert_eq!(p.multiple, None);
        assert_eq!(p.singles, vec![2, 3]);
        // Later completions above the same gap wait again, then go alone too.
        report(&mut b, &[(4, A)]);
        let t1 = t0 + HOLD * 2;
        assert!(b.plan(t1, HOLD).singles.is_empty());
        assert_eq!(b.plan(t1 + HOLD, HOLD).singles, vec![4]);
        // When 1 completes, only 1 is acked: 2..4 were acked alone already.
        report(&mut b, &[(1, A)]);
        let p = b.plan(t1 + HOLD * 2, HOLD);
        assert_eq!(p.multiple, Some(1));
        assert!(p.singles.is_empty());
        report(&mut b, &[(5, A)]);
        assert_eq!(b.plan(t1 + HOLD * 3, HOLD).multiple, Some(5));
    }

    #[test]
    fn requeues_go_out_at_once_and_are_skipped_by_later_acks() {
        let mut b = Book::default();
        let nacks = report(&mut b, &[(1, A), (2, R), (3, A)]);
        assert_eq!(nacks, vec![2]);
        // Acks 3 with multiple: 1 is covered, 2 is no longer outstanding.
        assert_eq!(b.plan(Instant::now(), HOLD).multiple, Some(3));
        // A requeue at the end of the prefix: the ack names the last ready tag.
        let nacks = report(&mut b, &[(4, A), (5, R)]);
        assert_eq!(nacks, vec![5]);
        let p = b.plan(Instant::now(), HOLD);
        assert_eq!(p.multiple, Some(4));
        // Only requeues: nothing to ack.
        let nacks = report(&mut b, &[(6, R)]);
        assert_eq!(nacks, vec![6]);
        assert_eq!(b.plan(Instant::now(), HOLD), AckPlan::default());
    }

    #[test]
    fn duplicate_and_stale_reports_are_ignored() {
        let mut b = Book::default();
        report(&mut b, &[(1, A)]);
        assert_eq!(b.plan(Instant::now(), HOLD).multiple, Some(1));
        let nacks = report(&mut b, &[(1, R), (2, A), (2, R)]);
        assert!(
            nacks.is_empty(),
            "tag 1 is settled and tag 2 was reported done"
        );
        assert_eq!(b.plan(Instant::now(), HOLD).multiple, Some(2));
    }

    #[test]
    fn closing_flushes_without_waiting() {
        let mut b = Book::default();
        report(&mut b, &[(2, A)]);
        let p = b.plan(Instant::now(), Duration::ZERO);
        assert_eq!(p.singles, vec![2]);
    }
}
