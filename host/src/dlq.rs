//! `warren dlq`: look into a pipeline's dead-letter queue and move parked
//! messages back once their cause is fixed.
//!
//! Reading must not lose or reorder anything, and AMQP has no "peek". So the
//! DLQ is consumed with manual acknowledgement on a channel whose prefetch
//! covers the whole read, nothing is acknowledged, and the channel is closed
//! at the end: the broker then puts every unacknowledged delivery back (where
//! it was on a classic queue; behind the unread ones, in no set order, on a
//! quorum queue). A read therefore sees at most [`MAX_LIMIT`] messages (the largest
//! prefetch AMQP can express), [`DEFAULT_LIMIT`] unless told otherwise.
//!
//! Redriving publishes a matching message again (with publisher confirms) and
//! acknowledges its DLQ copy only after the broker confirmed the new one; the
//! messages that do not match stay unacknowledged until the channel closes, so
//! they return in their order. Interrupted between the confirm and the ack, a
//! message exists twice (redriven and still parked): at least once, never zero.
//!
//! Purging acknowledges the selected messages and nothing else; it is the one
//! command here that destroys messages, so the CLI asks for `--yes`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer};

use crate::broker::connect;
use crate::config::{BrokerConfig, PipelineConfig};
use crate::disposition::rfc3339;
use crate::envelope::{header, headers_of, set_text, value_text};

/// Messages one read looks at unless told otherwise.
pub const DEFAULT_LIMIT: usize = 10_000;

/// Most messages one read can look at: the prefetch count is a 16-bit number,
/// and every message read stays unacknowledged until the end.
pub const MAX_LIMIT: usize = u16::MAX as usize;

/// Header a redriven message carries: how often, and when last.
pub const REDRIVEN: &str = "x-warren-redriven";

/// How long a read waits for the next delivery before taking the DLQ as read:
/// another consumer may hold some of the messages the count included.
const IDLE: Duration = Duration::from_secs(3);

/// Body bytes `show` prints.
const PREVIEW: usize = 200;

/// One parked message as read from the DLQ.
#[derive(Debug, Clone)]
pub struct Parked {
    /// Position in this read, from 1.
    pub position: usize,
    /// Properties as parked (headers included).
    pub properties: BasicProperties,
    /// The body.
    pub body: Vec<u8>,
    tag: u64,
}

impl Parked {
    /// A header, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.properties
            .headers()
            .as_ref()?
            .inner()
            .get(name)
            .map(value_text)
    }

    /// Why it was parked (`x-warren-reason`), empty when absent.
    pub fn reason(&self) -> String {
        self.header(header::REASON).unwrap_or_default()
    }

    /// When it last failed (`x-warren-last-failure`).
    pub fn last_failure(&self) -> Option<SystemTime> {
        self.header(header::LAST_FAILURE)
            .as_deref()
            .and_then(parse_rfc3339)
    }
}

/// Which parked messages a command applies to. Everything unset matches.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Case-insensitive substring of `x-warren-reason`.
    pub reason: Option<String>,
    /// `x-warren-plugin-version`, or a prefix of `x-warren-plugin-digest`.
    pub version: Option<String>,
    /// Only messages parked by another plugin than this digest.
    pub not_digest: Option<String>,
    /// Only messages whose last failure is at least this old.
    pub older_than: Option<Duration>,
}

/// Fewest hex digits `--version` takes: a shorter prefix of a digest would
/// select the versions of most plugins at once.
pub const MIN_VERSION_DIGITS: usize = 4;

/// Most hex digits `--version` takes: a whole SHA-256.
const MAX_VERSION_DIGITS: usize = 64;

/// A `--reason`: refused when empty or only blanks, since every reason
/// contains that (one unset shell variable in `--reason "$R" --yes` would
/// otherwise purge the whole DLQ).
pub fn parse_reason(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err(format!(
            "{text:?} would match every reason; give the text the reasons to select contain"
        ));
    }
    Ok(text.to_string())
}

/// A `--version`: a plugin version or digest prefix, at least
/// [`MIN_VERSION_DIGITS`] hex digits (lower-cased, as warren writes them).
/// Anything else could only ever match nothing, or, as a shorter prefix,
/// far more than meant.
pub fn parse_version(text: &str) -> Result<String, String> {
    let n = text.len();
    if !(MIN_VERSION_DIGITS..=MAX_VERSION_DIGITS).contains(&n)
        || !text.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(format!(
            "{text:?} is not a plugin version: give {MIN_VERSION_DIGITS} to {MAX_VERSION_DIGITS} \
             hex digits of its SHA-256 (as `warren dlq list` shows them)"
        ));
    }
    Ok(text.to_ascii_lowercase())
}

impl Selection {
    /// Refuse a selection that selects more than any operator could mean (an
    /// empty `reason`) or a `version` that is no version; see
    /// [`parse_reason`] and [`parse_version`]. Every command that reads a
    /// DLQ with a selection checks it first.
    pub fn check(&self) -> Result<()> {
        if let Some(r) = &self.reason {
            parse_reason(r).map_err(|e| anyhow::anyhow!("--reason {e}"))?;
        }
        if let Some(v) = &self.version {
            let normal = parse_version(v).map_err(|e| anyhow::anyhow!("--version {e}"))?;
            if normal != *v {
                bail!("--version {v:?} must be in lower case, as warren writes versions");
            }
        }
        Ok(())
    }

    /// Whether `m` is selected, at time `now`.
    pub fn matches(&self, m: &Parked, now: SystemTime) -> bool {
        if let Some(r) = &self.reason
            && !m.reason().to_lowercase().contains(&r.to_lowercase())
        {
            return false;
        }
        let version = m.header(header::PLUGIN_VERSION);
        let digest = m.header(header::PLUGIN_DIGEST);
        if let Some(v) = &self.version {
            let by_version = version.as_deref() == Some(v.as_str());
            let by_digest = v.len() >= 4 && digest.as_deref().is_some_and(|d| d.starts_with(v));
            if !(by_version || by_digest) {
                return false;
            }
        }
        if let Some(current) = &self.not_digest {
            let same = match (&digest, &version) {
                (Some(d), _) => d == current,
                (None, Some(v)) => current.starts_with(v.as_str()),
                // Parked without a plugin stamp: not by the current plugin.
                (None, None) => false,
            };
            if same {
                return false;
            }
        }
        if let Some(age) = self.older_than {
            // Without a readable time the age is unknown: not selected.
            let old_enough = m
                .last_failure()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|a| a >= age);
            if !old_enough {
                return false;
            }
        }
        true
    }
}

/// An open, non-consuming read of one DLQ.
struct Reader {
    conn: Connection,
    channel: Channel,
    consumer: Consumer,
    /// Messages in the DLQ when the read started.
    count: u32,
    /// Messages this read takes at most.
    expected: usize,
}

impl Reader {
    async fn open(broker: &BrokerConfig, dlq: &str, limit: usize) -> Result<Self> {
        if limit == 0 || limit > MAX_LIMIT {
            bail!("--limit must be between 1 and {MAX_LIMIT}");
        }
        let conn = connect(broker, &format!("dlq/{dlq}")).await?;
        // The count comes from a channel of its own: a passive declare of a
        // missing queue closes the channel it was sent on.
        let probe = conn.create_channel().await.context("opening a channel")?;
        let declared = probe
            .queue_declare(
                dlq.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| {
                format!("queue {dlq} does not exist (has the pipeline ever run on this broker?)")
            })?;
        let _ = probe.close(200, "counted".into()).await;
        let count = declared.message_count();
        let channel = conn.create_channel().await.context("opening a channel")?;
        let prefetch = u16::try_from(limit).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .context("setting the prefetch")?;
        let consumer = channel
            .basic_consume(
                dlq.into(),
                "warren-dlq".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming {dlq}"))?;
        let expected = usize::try_from(count).unwrap_or(usize::MAX).min(limit);
        Ok(Self {
            conn,
            channel,
            consumer,
            count,
            expected,
        })
    }

    /// The next parked message, or `None` once the read is complete.
    async fn next(&mut self, read: usize) -> Result<Option<Parked>> {
        if read >= self.expected {
            return Ok(None);
        }
        match tokio::time::timeout(IDLE, self.consumer.next()).await {
            Err(_) | Ok(None) => Ok(None),
            Ok(Some(d)) => {
                let d = d.context("reading the DLQ")?;
                Ok(Some(Parked {
                    position: read.saturating_add(1),
                    properties: d.properties,
                    body: d.data,
                    tag: d.delivery_tag,
                }))
            }
        }
    }

    /// Every message of the read, all left unacknowledged.
    async fn read_all(&mut self) -> Result<Vec<Parked>> {
        let mut all = Vec::with_capacity(self.expected.min(1024));
        while let Some(m) = self.next(all.len()).await? {
            all.push(m);
        }
        Ok(all)
    }

    /// Close: the broker puts back every unacknowledged message, in order.
    async fn close(self) -> Result<()> {
        self.channel
            .close(200, "read done".into())
            .await
            .context("closing the DLQ channel (its messages return to the DLQ)")?;
        let _ = self.conn.close(200, "done".into()).await;
        Ok(())
    }
}

/// What `list` reports for one pipeline.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Pipeline name.
    pub pipeline: String,
    /// DLQ name.
    pub dlq: String,
    /// Messages in the DLQ when the read started.
    pub count: u32,
    /// Messages read (at most the limit).
    pub read: usize,
    /// Read messages by normalised reason, most frequent first.
    pub by_reason: Vec<(String, usize)>,
    /// Read messages by plugin version, most frequent first.
    pub by_version: Vec<(String, usize)>,
    /// Earliest and latest `x-warren-last-failure` of the read messages.
    pub oldest: Option<SystemTime>,
    /// See `oldest`.
    pub newest: Option<SystemTime>,
}

impl Summary {
    fn of(p: &PipelineConfig, count: u32, parked: &[Parked]) -> Self {
        let mut reasons = BTreeMap::new();
        let mut versions = BTreeMap::new();
        for m in parked {
            bump(&mut reasons, normalise_reason(&m.reason()));
            bump(
                &mut versions,
                m.header(header::PLUGIN_VERSION)
                    .unwrap_or_else(|| "(none)".into()),
            );
        }
        let times = parked.iter().filter_map(Parked::last_failure);
        Self {
            pipeline: p.name.clone(),
            dlq: p.dlq_name(),
            count,
            read: parked.len(),
            by_reason: by_frequency(reasons),
            by_version: by_frequency(versions),
            oldest: times.clone().min(),
            newest: times.max(),
        }
    }

    /// The report as text, with ages relative to `now`.
    pub fn render(&self, now: SystemTime) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "pipeline {}  dlq {}  {} message(s)",
            self.pipeline, self.dlq, self.count
        );
        if usize::try_from(self.count).is_ok_and(|c| c > self.read) {
            let _ = write!(s, " (summary of the first {})", self.read);
        }
        s.push('\n');
        if self.read == 0 {
            return s;
        }
        let age = |t: Option<SystemTime>| {
            t.map_or("unknown".to_string(), |t| {
                format!("{} ago", human(now.duration_since(t).unwrap_or_default()))
            })
        };
        let _ = writeln!(
            s,
            "  last failure: oldest {}, newest {}",
            age(self.oldest),
            age(self.newest)
        );
        s.push_str("  by reason:\n");
        for (reason, n) in &self.by_reason {
            let _ = writeln!(s, "    {n:>6}  {reason}");
        }
        s.push_str("  by plugin version:\n");
        for (version, n) in &self.by_version {
            let _ = writeln!(s, "    {n:>6}  {version}");
        }
        s
    }
}

fn bump(map: &mut BTreeMap<String, usize>, key: String) {
    let n = map.entry(key).or_insert(0);
    *n = n.saturating_add(1);
}

fn by_frequency(map: BTreeMap<String, usize>) -> Vec<(String, usize)> {
    let mut v: Vec<_> = map.into_iter().collect();
    // Stable: equal counts stay in name order.
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}

/// Summarise `p`'s DLQ from its first `limit` messages, leaving it as it was.
pub async fn summarize(broker: &BrokerConfig, p: &PipelineConfig, limit: usize) -> Result<Summary> {
    let mut reader = Reader::open(broker, &p.dlq_name(), limit).await?;
    let parked = reader.read_all().await;
    let count = reader.count;
    reader.close().await?;
    Ok(Summary::of(p, count, &parked?))
}

/// The selected messages among the first `limit` of `p`'s DLQ, leaving it as
/// it was.
pub async fn read(
    broker: &BrokerConfig,
    p: &PipelineConfig,
    limit: usize,
    selection: &Selection,
) -> Result<Vec<Parked>> {
    selection.check()?;
    let mut reader = Reader::open(broker, &p.dlq_name(), limit).await?;
    let parked = reader.read_all().await;
    reader.close().await?;
    let now = SystemTime::now();
    Ok(parked?
        .into_iter()
        .filter(|m| selection.matches(m, now))
        .collect())
}

/// One message for `show`: its warren headers and a body preview.
pub fn render_parked(m: &Parked) -> String {
    let mut s = format!("#{}\n", m.position);
    let headers = m
        .properties
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default();
    for (k, v) in &headers {
        if k.as_str().starts_with("x-warren-") {
            let _ = writeln!(s, "  {}: {}", k.as_str(), value_text(v));
        }
    }
    let shown = m.body.get(..PREVIEW).unwrap_or(&m.body);
    let more = if m.body.len() > shown.len() {
        " …"
    } else {
        ""
    };
    match std::str::from_utf8(shown) {
        Ok(text) => {
            let _ = writeln!(s, "  body ({} bytes): {text:?}{more}", m.body.len());
        }
        Err(_) => {
            let hex: String = shown.iter().map(|b| format!("{b:02x}")).collect();
            let _ = writeln!(s, "  body ({} bytes, hex): {hex}{more}", m.body.len());
        }
    }
    s
}

/// How `redrive` moves messages.
#[derive(Debug, Clone)]
pub struct Redrive {
    /// Which messages.
    pub selection: Selection,
    /// Messages read at most.
    pub limit: usize,
    /// Print what would move, move nothing.
    pub dry_run: bool,
    /// Publish to this queue (default exchange) instead of the original address.
    pub to_queue: Option<String>,
}

/// What `redrive` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveReport {
    /// Messages read.
    pub read: usize,
    /// Messages republished and removed from the DLQ (or that would be, on a dry run).
    pub moved: usize,
    /// Selected messages the broker could not route or refused: left in the DLQ.
    pub failed: usize,
}

/// Move the selected messages of `p`'s DLQ back, reporting each on `line`.
pub async fn redrive(
    broker: &BrokerConfig,
    p: &PipelineConfig,
    how: &Redrive,
    line: &mut dyn FnMut(&str),
) -> Result<RedriveReport> {
    how.selection.check()?;
    let mut reader = Reader::open(broker, &p.dlq_name(), how.limit).await?;
    let result = redrive_with(&mut reader, p, how, line).await;
    // Whatever happened, closing returns what was not moved, in order.
    let closed = reader.close().await;
    let report = result?;
    closed?;
    Ok(report)
}

async fn redrive_with(
    reader: &mut Reader,
    p: &PipelineConfig,
    how: &Redrive,
    line: &mut dyn FnMut(&str),
) -> Result<RedriveReport> {
    let publisher = reader
        .conn
        .create_channel()
        .await
        .context("opening the publishing channel")?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    let mut report = RedriveReport::default();
    let now = SystemTime::now();
    while let Some(m) = reader.next(report.read).await? {
        report.read = report.read.saturating_add(1);
        if !how.selection.matches(&m, now) {
            continue;
        }
        let (exchange, key) = destination(&m, p, how.to_queue.as_deref());
        let what = format!(
            "#{} reason {:?} -> exchange {exchange:?} routing key {key:?}",
            m.position,
            m.reason()
        );
        if how.dry_run {
            line(&format!("would move {what}"));
            report.moved = report.moved.saturating_add(1);
            continue;
        }
        let properties = m.properties.clone().with_headers(redriven_headers(&m, now));
        let confirm = publisher
            .basic_publish(
                exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &m.body,
                properties,
            )
            .await
            .with_context(|| format!("publishing {what}"))?
            .await
            .with_context(|| format!("waiting for the confirm of {what}"))?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => {
                reader
                    .channel
                    .basic_ack(m.tag, BasicAckOptions::default())
                    .await
                    .with_context(|| format!("removing the DLQ copy of {what}"))?;
                line(&format!("moved {what}"));
                report.moved = report.moved.saturating_add(1);
            }
            Confirmation::Ack(Some(_)) => {
                line(&format!("left {what}: no queue is bound there"));
                report.failed = report.failed.saturating_add(1);
            }
            Confirmation::Nack(_) => {
                line(&format!("left {what}: the broker refused it"));
                report.failed = report.failed.saturating_add(1);
            }
        }
    }
    let _ = publisher.close(200, "done".into()).await;
    Ok(report)
}

/// How `purge` removes messages.
#[derive(Debug, Clone)]
pub struct Purge {
    /// Which messages.
    pub selection: Selection,
    /// Messages read at most.
    pub limit: usize,
    /// Print what would be removed, remove nothing.
    pub dry_run: bool,
}

/// What `purge` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Messages read.
    pub read: usize,
    /// Messages removed from the DLQ (or that would be, on a dry run).
    pub removed: usize,
}

/// Remove the selected messages of `p`'s DLQ for good, reporting each on
/// `line`. The others stay, in their order.
///
/// Deliberately not `queue.purge`: that removes everything, including
/// messages parked after the read began, which no filter has looked at.
pub async fn purge(
    broker: &BrokerConfig,
    p: &PipelineConfig,
    how: &Purge,
    line: &mut dyn FnMut(&str),
) -> Result<PurgeReport> {
    how.selection.check()?;
    let mut reader = Reader::open(broker, &p.dlq_name(), how.limit).await?;
    let result = purge_with(&mut reader, how, line).await;
    let closed = reader.close().await;
    let report = result?;
    closed?;
    Ok(report)
}

async fn purge_with(
    reader: &mut Reader,
    how: &Purge,
    line: &mut dyn FnMut(&str),
) -> Result<PurgeReport> {
    let mut report = PurgeReport::default();
    let now = SystemTime::now();
    while let Some(m) = reader.next(report.read).await? {
        report.read = report.read.saturating_add(1);
        if !how.selection.matches(&m, now) {
            continue;
        }
        let what = format!("#{} reason {:?}", m.position, m.reason());
        if how.dry_run {
            line(&format!("would remove {what}"));
        } else {
            reader
                .channel
                .basic_ack(m.tag, BasicAckOptions::default())
                .await
                .with_context(|| format!("removing {what}"))?;
            line(&format!("removed {what}"));
        }
        report.removed = report.removed.saturating_add(1);
    }
    Ok(report)
}

/// Where a redriven message goes: `to_queue`, else where it was first
/// published, else the pipeline's queue.
fn destination(m: &Parked, p: &PipelineConfig, to_queue: Option<&str>) -> (String, String) {
    if let Some(q) = to_queue {
        return (String::new(), q.to_string());
    }
    match (
        m.header(header::ORIGINAL_EXCHANGE),
        m.header(header::ORIGINAL_ROUTING_KEY),
    ) {
        (Some(exchange), Some(key)) => (exchange, key),
        _ => (String::new(), p.queue.clone()),
    }
}

/// The parked headers without the failure bookkeeping (the redriven message
/// starts again at attempt 1), plus `x-warren-redriven`.
fn redriven_headers(m: &Parked, now: SystemTime) -> FieldTable {
    let previous = m
        .header(REDRIVEN)
        .and_then(|v| {
            v.split(',')
                .next()
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let mut headers = headers_of(&m.properties);
    let mut kept = FieldTable::default();
    let dropped = [
        header::ATTEMPT,
        header::RETRY_REASON,
        header::REASON,
        header::ATTEMPTS,
        header::FIRST_FAILURE,
        header::LAST_FAILURE,
    ];
    for (k, v) in std::mem::take(&mut headers).inner() {
        if !dropped.contains(&k.as_str()) {
            kept.insert(k.clone(), v.clone());
        }
    }
    set_text(
        &mut kept,
        REDRIVEN.into(),
        &format!("{}, {}", previous.saturating_add(1), rfc3339(now)),
    );
    kept
}

/// Fold what differs between messages with the same cause (numbers, hex ids)
/// into `N`, so that "order 1234 not found" and "order 98 not found" group.
pub fn normalise_reason(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut word = String::new();
    for c in reason.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            out.push_str(&normalise_word(&word));
            word.clear();
        }
        out.push(c);
    }
    out.pop();
    out
}

fn normalise_word(word: &str) -> String {
    let hex = word.chars().all(|c| c.is_ascii_hexdigit());
    let digits = word.chars().any(|c| c.is_ascii_digit());
    // A hex id: all hex, with a digit or long enough not to be a word.
    if hex && (digits || word.len() >= 8) {
        return "N".into();
    }
    let mut out = String::with_capacity(word.len());
    let mut in_digits = false;
    for c in word.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('N');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

/// `30s`, `15m`, `2h`, `7d`, `500ms` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("expected a duration like 30s, 15m, 2h or 7d, got {text:?}"))?;
    let secs = |k: u64| {
        n.checked_mul(k)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("duration {text:?} is too long"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => Err(format!(
            "unknown unit {unit:?} in {text:?}; use ms, s, m, h or d"
        )),
    }
}

/// A duration as `3d4h`, `2h15m`, `5m3s` or `12s`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}d{hours}h")
    } else if hours > 0 {
        format!("{hours}h{mins}m")
    } else if mins > 0 {
        format!("{mins}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

/// Parse the UTC timestamps warren writes (`2024-05-01T12:00:00.123Z`; the
/// fraction is optional). Anything else is `None`.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = text.get(from..from.checked_add(len)?)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    if b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || b.get(10) != Some(&b'T')
        || b.get(13) != Some(&b':')
        || b.get(16) != Some(&b':')
        || b.last() != Some(&b'Z')
    {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, min, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let millis = match text.get(19..text.len().checked_sub(1)?)? {
        "" => 0,
        f => {
            let digits = f.strip_prefix('.')?;
            if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let padded = format!("{digits:0<3}");
            padded.get(..3)?.parse::<u64>().ok()?
        }
    };
    // Days-from-civil (Howard Hinnant's algorithm), the inverse of `rfc3339`.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec;
    let secs = u64::try_from(secs).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs) + Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn reasons_group_across_numbers_and_ids() {
        assert_eq!(
            normalise_reason("gave up after 3 attempts: order 1234 not found"),
            "gave up after N attempts: order N not found"
        );
        assert_eq!(
            normalise_reason("id 7f3a9c0e missing in v2 (deadbeefcafe)"),
            "id N missing in vN (N)"
        );
        assert_eq!(normalise_reason("parked"), "parked");
        assert_eq!(normalise_reason("bad add fee"), "bad add fee");
        assert_eq!(normalise_reason(""), "");
    }

    #[test]
    fn timestamps_round_trip() {
        for secs in [0u64, 951_782_400, 1_700_000_000, 4_102_444_800] {
            let t = SystemTime::UNIX_EPOCH + Duration::from_millis(secs * 1000 + 123);
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t), "{}", rfc3339(t));
        }
        assert!(parse_rfc3339("2024-05-01T12:00:00Z").is_some());
        assert_eq!(parse_rfc3339("2024-13-01T12:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(parse_rfc3339("2024-05-01T12:00:00.Z"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("2w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(human(Duration::from_secs(3 * 3600 + 125)), "3h2m");
    }

    #[test]
    fn redriving_counts_and_drops_the_failure_headers() {
        let mut h = FieldTable::default();
        for (k, v) in [
            (header::REASON, "boom"),
            (header::ATTEMPT, "3"),
            (header::LAST_FAILURE, "2024-05-01T12:00:00Z"),
            (header::ORIGINAL_EXCHANGE, "ex"),
            (REDRIVEN, "2, 2024-05-01T12:00:00.000Z"),
            ("app", "kept"),
        ] {
            set_text(&mut h, k.into(), v);
        }
        let m = Parked {
            position: 1,
            properties: BasicProperties::default().with_headers(h),
            body: Vec::new(),
            tag: 1,
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let out = redriven_headers(&m, now);
        let get = |k: &str| out.inner().get(k).map(value_text);
        assert_eq!(get(header::REASON), None);
        assert_eq!(get(header::ATTEMPT), None);
        assert_eq!(get(header::LAST_FAILURE), None);
        assert_eq!(get(header::ORIGINAL_EXCHANGE).as_deref(), Some("ex"));
        assert_eq!(get("app").as_deref(), Some("kept"));
        assert_eq!(
            get(REDRIVEN).as_deref(),
            Some("3, 2023-11-14T22:13:20.000Z")
        );
    }

    #[test]
    fn reasons_and_versions_that_would_select_more_than_meant_are_refused() {
        for r in ["", " ", "\t\n", "\u{a0}"] {
            assert!(parse_reason(r).is_err(), "{r:?}");
        }
        assert_eq!(parse_reason(" x ").as_deref(), Ok(" x "));
        for v in ["", "0", "abc", "abcg", "12 34", &"a".repeat(65)] {
            assert!(parse_version(v).is_err(), "{v:?}");
        }
        assert_eq!(parse_version("ABcd").as_deref(), Ok("abcd"));
        assert_eq!(parse_version("0123456789ab").as_deref(), Ok("0123456789ab"));
        let sel = |reason: Option<&str>, version: Option<&str>| Selection {
            reason: reason.map(str::to_string),
            version: version.map(str::to_string),
            ..Selection::default()
        };
        assert!(sel(Some(""), None).check().is_err());
        assert!(sel(None, Some("0")).check().is_err());
        assert!(sel(None, Some("ABCD")).check().is_err());
        assert!(sel(Some("x"), Some("abcd")).check().is_ok());
        assert!(Selection::default().check().is_ok());
    }

    #[test]
    fn selection() {
        let mut h = FieldTable::default();
        set_text(&mut h, header::REASON.into(), "Order Missing");
        set_text(&mut h, header::PLUGIN_VERSION.into(), "0123456789ab");
        set_text(&mut h, header::PLUGIN_DIGEST.into(), "0123456789abcdef");
        set_text(&mut h, header::LAST_FAILURE.into(), "2023-11-14T22:13:20Z");
        let m = Parked {
            position: 1,
            properties: BasicProperties::default().with_headers(h),
            body: Vec::new(),
            tag: 1,
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_060);
        let sel = |f: fn(&mut Selection)| {
            let mut s = Selection::default();
            f(&mut s);
            s.matches(&m, now)
        };
        assert!(sel(|_| {}));
        assert!(sel(|s| s.reason = Some("order miss".into())));
        assert!(!sel(|s| s.reason = Some("timeout".into())));
        assert!(sel(|s| s.version = Some("0123456789ab".into())));
        assert!(sel(|s| s.version = Some("0123456789abcd".into())));
        assert!(!sel(|s| s.version = Some("ffff".into())));
        assert!(!sel(|s| s.not_digest = Some("0123456789abcdef".into())));
        assert!(sel(|s| s.not_digest = Some("ffff".into())));
        assert!(sel(|s| s.older_than = Some(Duration::from_secs(60))));
        assert!(!sel(|s| s.older_than = Some(Duration::from_secs(61))));
    }
}
