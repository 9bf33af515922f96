//! The traffic of the run and its ledger: a publisher with confirms that
//! sends persistent messages with unique ids, and a collector that reads
//! every terminal place (RPC replies, the output queue, the dead-letter
//! queue). Both connect to any node and move to the next when theirs goes
//! away, like warren does, so faults of the cluster reach them too; what they
//! lose to a fault they make up for (an unconfirmed publish is sent again, an
//! unacknowledged collected message comes back and is told apart).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{Notify, watch};

/// What a message asks the probe plugin to do, and so where it must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `reply`: an RPC reply to the publisher's reply queue.
    Reply,
    /// `publish`: one output to the output queue.
    Publish,
    /// `retry` on every attempt: through the retry tiers, then the DLQ.
    Retry,
    /// `dead-letter`: straight to the DLQ.
    DeadLetter,
}

impl Kind {
    pub fn of(id: u64) -> Kind {
        match id % 4 {
            0 => Kind::Reply,
            1 => Kind::Publish,
            2 => Kind::Retry,
            _ => Kind::DeadLetter,
        }
    }

    pub fn place(self) -> Place {
        match self {
            Kind::Reply => Place::Reply,
            Kind::Publish => Place::Output,
            Kind::Retry | Kind::DeadLetter => Place::Dlq,
        }
    }
}

/// A terminal place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    Reply,
    Output,
    Dlq,
}

impl Place {
    pub const ALL: [Place; 3] = [Place::Reply, Place::Output, Place::Dlq];

    pub fn name(self) -> &'static str {
        match self {
            Place::Reply => "reply",
            Place::Output => "output",
            Place::Dlq => "DLQ",
        }
    }

    fn slot(self) -> usize {
        match self {
            Place::Reply => 0,
            Place::Output => 1,
            Place::Dlq => 2,
        }
    }
}

/// The queues of the run.
#[derive(Debug, Clone)]
pub struct Queues {
    pub input: String,
    pub output: String,
    pub replies: String,
    pub dlq: String,
}

/// What arrived for one id.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Arrivals per place (reply, output, DLQ), redeliveries to the collector
    /// itself not included.
    pub count: [u32; 3],
    /// The collector's own redeliveries (its ack died with its connection).
    pub collector_redelivered: u32,
    /// `x-warren-reason` of a DLQ arrival, kept for an id that should not be there.
    pub reason: Option<String>,
}

impl Seen {
    pub fn at(&self, place: Place) -> u32 {
        self.count[place.slot()]
    }

    pub fn total(&self) -> u32 {
        self.count.iter().sum()
    }
}

#[derive(Debug, Default)]
struct Book {
    /// Confirmed by the broker: these must all arrive.
    confirmed: HashSet<u64>,
    /// Sent more than once because a publish was not confirmed.
    resent: HashSet<u64>,
    seen: HashMap<u64, Seen>,
    /// When each id was first seen anywhere: the progress of the run.
    arrivals: Vec<Instant>,
    /// Bodies the collector could not read an id from.
    unreadable: u64,
}

/// Everything the publisher sent and the collector saw.
#[derive(Debug, Default)]
pub struct Ledger {
    book: Mutex<Book>,
    progress: Notify,
}

impl Ledger {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn confirmed(&self, id: u64) {
        self.book().confirmed.insert(id);
    }

    fn resent(&self, id: u64) {
        self.book().resent.insert(id);
    }

    fn arrived(&self, place: Place, id: Option<u64>, redelivered: bool, reason: Option<String>) {
        let mut b = self.book();
        let Some(id) = id else {
            b.unreadable += 1;
            return;
        };
        let first = !b.seen.contains_key(&id);
        let seen = b.seen.entry(id).or_default();
        // A redelivered message of an id already counted in that place is the
        // collector's own ack lost with its connection, not a second copy.
        if redelivered && seen.at(place) > 0 {
            seen.collector_redelivered += 1;
        } else {
            seen.count[place.slot()] += 1;
        }
        if place == Place::Dlq && Kind::of(id).place() != Place::Dlq && seen.reason.is_none() {
            seen.reason = reason;
        }
        if first {
            b.arrivals.push(Instant::now());
            drop(b);
            self.progress.notify_waiters();
        }
    }

    /// Ids seen anywhere so far.
    pub fn arrivals(&self) -> usize {
        self.book().arrivals.len()
    }

    pub fn arrival_times(&self) -> Vec<Instant> {
        self.book().arrivals.clone()
    }

    /// Wait until `n` more ids than `from` have been seen.
    pub async fn progress(&self, from: usize, n: usize, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.progress.notified();
            if self.arrivals() >= from + n {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!(
                    "no progress: {} of {n} new messages arrived within {limit:?}",
                    self.arrivals().saturating_sub(from)
                );
            }
        }
    }

    /// Confirmed ids not seen anywhere yet.
    pub fn missing(&self) -> usize {
        let b = self.book();
        b.confirmed
            .iter()
            .filter(|id| !b.seen.contains_key(id))
            .count()
    }

    /// Wait until every confirmed id has been seen; fails when no new id
    /// arrives for `quiet` while some are missing.
    pub async fn all_arrived(&self, quiet: Duration) -> Result<()> {
        loop {
            let notified = self.progress.notified();
            let missing = self.missing();
            if missing == 0 {
                return Ok(());
            }
            if tokio::time::timeout(quiet, notified).await.is_err() {
                bail!("{missing} confirmed messages missing, none arrived for {quiet:?}");
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let b = self.book();
        Snapshot {
            confirmed: b.confirmed.clone(),
            resent: b.resent.clone(),
            seen: b.seen.clone(),
            unreadable: b.unreadable,
        }
    }
}

/// The ledger at the end of the run.
#[derive(Debug)]
pub struct Snapshot {
    pub confirmed: HashSet<u64>,
    pub resent: HashSet<u64>,
    pub seen: HashMap<u64, Seen>,
    pub unreadable: u64,
}

/// Connect to some node, starting after `*next` and moving on; retried
/// (every 250 ms) until `limit`.
async fn connect(
    urls: &[String],
    next: &mut usize,
    name: &str,
    limit: Duration,
) -> Result<Connection> {
    let deadline = Instant::now() + limit;
    loop {
        let url = &urls[*next % urls.len()];
        *next = next.wrapping_add(1);
        let props =
            ConnectionProperties::default().with_connection_name(format!("chaos/{name}").into());
        match tokio::time::timeout(Duration::from_secs(15), Connection::connect(url, props)).await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(_)) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok(Err(e)) => return Err(e).context("no node took the connection"),
            Err(_) => bail!("no node took the connection within {limit:?}"),
        }
    }
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Declare the queues warren does not: the reply queue and the output queue
/// (quorum queues, so they survive the loss of a node like warren's own).
pub async fn declare(urls: &[String], q: &Queues) -> Result<()> {
    let mut next = 0;
    let conn = connect(urls, &mut next, "declare", Duration::from_secs(60)).await?;
    let ch = conn.create_channel().await?;
    for name in [&q.output, &q.replies] {
        let opts = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(name.as_str().into(), opts, quorum())
            .await
            .with_context(|| format!("declaring {name}"))?;
    }
    let _ = tokio::time::timeout(STEP, conn.close(200, "declared".into())).await;
    Ok(())
}

/// A broker step that has not answered in this long is not going to: a
/// connection can stay open to a node that no longer serves it.
pub const STEP: Duration = Duration::from_secs(15);

/// One queue as the broker sees it: ready messages and consumers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueState {
    pub name: String,
    pub ready: u32,
    pub consumers: u32,
}

/// Passive declares of `queues` on `conn` (exact counts, unlike the
/// management API's, which lag): one channel each, since a queue that is
/// missing closes its channel.
async fn inspect_on(conn: &Connection, queues: &[String]) -> Result<Vec<QueueState>> {
    let mut out = Vec::new();
    for q in queues {
        let ch = tokio::time::timeout(STEP, conn.create_channel())
            .await
            .context("opening a channel timed out")??;
        let opts = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = tokio::time::timeout(
            STEP,
            ch.queue_declare(q.as_str().into(), opts, FieldTable::default()),
        )
        .await
        .with_context(|| format!("looking up {q} timed out"))?
        .with_context(|| format!("looking up {q}"))?;
        out.push(QueueState {
            name: q.clone(),
            ready: declared.message_count(),
            consumers: declared.consumer_count(),
        });
        let _ = tokio::time::timeout(STEP, ch.close(200, "ok".into())).await;
    }
    Ok(out)
}

/// The state of `queues`, through whichever node answers within `limit`.
pub async fn inspect(
    urls: &[String],
    queues: &[String],
    limit: Duration,
) -> Result<Vec<QueueState>> {
    let mut next = 0;
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let conn = connect(urls, &mut next, "inspect", left).await?;
        let result = inspect_on(&conn, queues).await;
        let _ = tokio::time::timeout(STEP, conn.close(200, "counted".into())).await;
        match result {
            Ok(states) => return Ok(states),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Ready message counts of `queues`.
pub async fn depths(
    urls: &[String],
    queues: &[String],
    limit: Duration,
) -> Result<Vec<(String, u32)>> {
    Ok(inspect(urls, queues, limit)
        .await?
        .into_iter()
        .map(|s| (s.name, s.ready))
        .collect())
}

/// Take every message left in `queues` (the run is over: nothing consumes
/// them any more) and say where each id was sitting. Bounded by `limit`; what
/// was not reached in time is reported as not looked at.
pub async fn locate(
    urls: &[String],
    queues: &[String],
    limit: Duration,
) -> Result<(HashMap<u64, String>, bool)> {
    let deadline = Instant::now() + limit;
    let mut next = 0;
    let conn = connect(urls, &mut next, "locate", limit).await?;
    let mut found = HashMap::new();
    let mut complete = true;
    'queues: for q in queues {
        let ch = tokio::time::timeout(STEP, conn.create_channel())
            .await
            .context("opening a channel timed out")??;
        loop {
            if Instant::now() >= deadline {
                complete = false;
                break 'queues;
            }
            let got = tokio::time::timeout(
                STEP,
                ch.basic_get(
                    q.as_str().into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                ),
            )
            .await
            .with_context(|| format!("basic.get on {q} timed out"))?
            .with_context(|| format!("basic.get on {q}"))?;
            let Some(m) = got else { break };
            if let Some(id) = id_of(&m.delivery) {
                found.entry(id).or_insert_with(|| q.clone());
            }
        }
        let _ = tokio::time::timeout(STEP, ch.close(200, "ok".into())).await;
    }
    let _ = tokio::time::timeout(STEP, conn.close(200, "located".into())).await;
    Ok((found, complete))
}

/// Publisher statistics.
#[derive(Debug, Default, Clone)]
pub struct Published {
    pub sent: u64,
    pub confirmed: u64,
    pub resends: u64,
    pub reconnects: u64,
    /// Longest time between two confirms.
    pub longest_gap: Duration,
}

/// A connection and a confirm channel for the publisher. Every step has a
/// time limit: a node that is stopping can take a connection and then never
/// answer on it, and the publisher must move on to another node rather than
/// wait for it forever.
async fn publisher_channel(urls: &[String], next: &mut usize) -> Result<(Connection, Channel)> {
    const STEP: Duration = Duration::from_secs(15);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let conn = connect(urls, next, "publisher", left).await?;
        let opened = async {
            let ch = tokio::time::timeout(STEP, conn.create_channel())
                .await
                .context("opening a channel timed out")??;
            tokio::time::timeout(STEP, ch.confirm_select(ConfirmSelectOptions::default()))
                .await
                .context("confirm.select timed out")??;
            anyhow::Ok(ch)
        }
        .await;
        match opened {
            Ok(ch) => return Ok((conn, ch)),
            Err(e) if Instant::now() < deadline => {
                eprintln!("chaos: publisher channel failed ({e:#}); trying another node");
                let _ = tokio::time::timeout(STEP, conn.close(200, "retrying".into())).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Publish `rate` messages per second until `stop` turns true. Each message is
/// sent until the broker confirms it (mandatory, so an unroutable one counts
/// as not confirmed).
pub async fn publish(
    urls: Vec<String>,
    q: Queues,
    rate: u32,
    ledger: std::sync::Arc<Ledger>,
    mut stop: watch::Receiver<bool>,
) -> Result<Published> {
    const CONFIRM_LIMIT: Duration = Duration::from_secs(30);
    let mut stats = Published::default();
    let mut next_node = 0usize;
    let mut link: Option<(Connection, Channel)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut id = 0u64;
    let mut pending: Option<u64> = None;
    let mut last_confirm = Instant::now();
    loop {
        let this = match pending.take() {
            Some(p) => p,
            None => {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => {}
                }
                if *stop.borrow() {
                    break;
                }
                id += 1;
                id
            }
        };
        if link.is_none() {
            // Stopping wins over a node that takes its time to answer.
            tokio::select! {
                l = publisher_channel(&urls, &mut next_node) => link = Some(l?),
                _ = stopped(&mut stop) => break,
            }
            stats.reconnects += 1;
        }
        let Some((_, ch)) = &link else { continue };
        let kind = Kind::of(this);
        let tag = format!("m{this}");
        let body = match kind {
            Kind::Reply => format!("reply {tag}"),
            Kind::Publish => format!("publish - {} {tag}", q.output),
            Kind::Retry => format!("retry {tag}"),
            Kind::DeadLetter => format!("dead-letter {tag}"),
        };
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(tag.clone()));
        if kind == Kind::Reply {
            props = props
                .with_reply_to(q.replies.as_str().into())
                .with_correlation_id(tag.as_str().into());
        }
        stats.sent += 1;
        // One limit for the publish and its confirm: on a connection to a
        // node that went away either can wait forever.
        let attempt = tokio::time::timeout(CONFIRM_LIMIT, async {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    q.input.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body.as_bytes(),
                    props,
                )
                .await?;
            anyhow::Ok(matches!(confirm.await, Ok(Confirmation::Ack(None))))
        });
        // A publish cut off by the stop is neither confirmed nor sent again:
        // the ledger does not count on it, and a copy that arrives anyway is
        // reported as never confirmed.
        let confirmed = tokio::select! {
            r = attempt => r.is_ok_and(|r| r.unwrap_or(false)),
            _ = stopped(&mut stop) => break,
        };
        if confirmed {
            ledger.confirmed(this);
            stats.confirmed += 1;
            stats.longest_gap = stats.longest_gap.max(last_confirm.elapsed());
            last_confirm = Instant::now();
        } else {
            // Not confirmed: it may or may not be in the queue. Send it again
            // on a fresh connection; a second copy is a duplicate the report
            // attributes to the publisher.
            ledger.resent(this);
            stats.resends += 1;
            if let Some((conn, _)) = link.take() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    conn.close(200, "resending".into()),
                )
                .await;
            }
            pending = Some(this);
        }
    }
    if let Some((conn, _)) = link.take() {
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "done".into())).await;
    }
    Ok(stats)
}

/// The id of a terminal message: the body's last word (`m<id>`), else its
/// message id.
fn id_of(d: &lapin::message::Delivery) -> Option<u64> {
    let body = String::from_utf8_lossy(&d.data);
    let word = body
        .split_whitespace()
        .last()
        .map(str::to_string)
        .or_else(|| d.properties.message_id().as_ref().map(|m| m.to_string()))?;
    word.strip_prefix('m')?.parse().ok()
}

fn reason_of(d: &lapin::message::Delivery) -> Option<String> {
    let headers = d.properties.headers().as_ref()?;
    match headers.inner().get("x-warren-reason")? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// How often the collector asks the broker whether its consumers still exist.
const WATCH_EVERY: Duration = Duration::from_secs(3);

/// Checks in a row that may find a queue without a consumer, or fail, before
/// the collector starts over: one could be a consume not yet registered.
const WATCH_STRIKES: u32 = 2;

/// One session of the collector: a connection, a channel consuming every
/// terminal place, and a watchdog. Ends with an error when anything about it
/// stops working: a consumer cancelled by the broker (its stream ends), the
/// channel or connection closed, or a queue the broker says has no consumer
/// (a cluster restart can drop a consumer and keep the connection).
async fn collect_session(
    conn: &Connection,
    places: &[(Place, String)],
    ledger: &Ledger,
) -> Result<()> {
    let ch = tokio::time::timeout(STEP, conn.create_channel())
        .await
        .context("opening a channel timed out")??;
    tokio::time::timeout(STEP, ch.basic_qos(200, BasicQosOptions::default()))
        .await
        .context("basic.qos timed out")??;
    let mut streams = Vec::new();
    for (place, name) in places {
        let consumer = tokio::time::timeout(
            STEP,
            ch.basic_consume(
                name.as_str().into(),
                format!("chaos-{}", place.name()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .with_context(|| format!("consuming {name} timed out"))?
        .with_context(|| format!("consuming {name}"))?;
        let place = *place;
        // A consumer's stream ends when the broker cancels it: the `None`
        // after its last delivery says so.
        let stream = consumer
            .map(move |d| (place, Some(d)))
            .chain(futures_util::stream::once(async move { (place, None) }));
        streams.push(stream.boxed());
    }
    let names: Vec<String> = places.iter().map(|(_, n)| n.clone()).collect();
    let mut all = futures_util::stream::select_all(streams);
    let mut watch = tokio::time::interval(WATCH_EVERY);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut strikes = 0u32;
    loop {
        tokio::select! {
            item = all.next() => match item {
                Some((place, Some(d))) => {
                    let d = d.with_context(|| format!("consumer of the {} queue", place.name()))?;
                    ledger.arrived(place, id_of(&d), d.redelivered, reason_of(&d));
                    tokio::time::timeout(STEP, d.acker.ack(BasicAckOptions::default()))
                        .await
                        .context("ack timed out")??;
                }
                Some((place, None)) => bail!("the broker cancelled the consumer of the {} queue", place.name()),
                None => bail!("every consumer ended"),
            },
            _ = watch.tick() => {
                if !ch.status().connected() {
                    bail!("the consuming channel is closed");
                }
                let problem = match inspect_on(conn, &names).await {
                    Ok(states) => states
                        .iter()
                        .find(|s| s.consumers == 0)
                        .map(|s| format!("the broker lists no consumer on {}", s.name)),
                    Err(e) => Some(format!("checking the consumers failed: {e:#}")),
                };
                match problem {
                    None => strikes = 0,
                    Some(p) => {
                        strikes += 1;
                        if strikes >= WATCH_STRIKES {
                            bail!("{p} ({strikes} checks in a row)");
                        }
                    }
                }
            }
        }
    }
}

/// Consume the terminal places into the ledger until `stop` turns true,
/// starting a new session (connection and consumers) whenever one stops
/// working. Returns the number of sessions after the first.
pub async fn collect(
    urls: Vec<String>,
    q: Queues,
    ledger: std::sync::Arc<Ledger>,
    mut stop: watch::Receiver<bool>,
) -> Result<u64> {
    let places = [
        (Place::Reply, q.replies.clone()),
        (Place::Output, q.output.clone()),
        (Place::Dlq, q.dlq.clone()),
    ];
    let mut next_node = 1usize;
    let mut reconnects = 0u64;
    loop {
        if *stop.borrow() {
            return Ok(reconnects);
        }
        reconnects += 1;
        let conn = tokio::select! {
            c = connect(&urls, &mut next_node, "collector", Duration::from_secs(600)) => c?,
            _ = stopped(&mut stop) => return Ok(reconnects),
        };
        tokio::select! {
            r = collect_session(&conn, &places, &ledger) => {
                if let Err(e) = r {
                    tracing_note(&format!("collector: starting a new session: {e:#}"));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            _ = stopped(&mut stop) => {}
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "done".into())).await;
    }
}

/// Resolves once `stop` is true (at once if it already is). A unit future, so
/// that no `watch::Ref` is held across the other branch's awaits.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Progress notes go to stderr with a timestamp; the table goes to stdout.
pub fn tracing_note(text: &str) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    eprintln!(
        "chaos [{:02}:{:02}:{:02}] {text}",
        t / 3600 % 24,
        t / 60 % 60,
        t % 60
    );
}
