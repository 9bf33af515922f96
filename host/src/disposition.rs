//! The one place that decides what happens to a delivery: the plugin's outcome
//! (or failure) becomes a list of publications to confirm, and then an ack.
//!
//! Rules (the README's "Delivery semantics" section documents them for users):
//! * `ack` -> nothing to publish. `publish` -> the outputs.
//! * `reply` -> the reply to `reply_to` with the request's `correlation_id`, plus
//!   its outputs. Without `reply_to` the message is dead-lettered: the plugin
//!   answered a message nobody waits for, which is a bug someone must see.
//! * `retry` and plugin failures (trap, timeout, memory) -> a copy to a retry tier
//!   with the next attempt number; once `max_attempts` is reached, dead-letter.
//! * `dead-letter` -> a copy to `<queue>.dlq` with the reason and bookkeeping
//!   headers; an RPC request also gets an error reply so its caller does not hang.
//! * Invalid plugin output (a name AMQP cannot carry) -> dead-letter, with why.
//! * An output or reply the pipeline's allow-list (`allow`) denies -> nothing of
//!   the outcome is sent; dead-letter with the rule that was missing. An error
//!   reply goes only to a `reply_to` the allow-list accepts.
//! * Plugin headers named `x-warren-*`, and `traceparent` when warren carries
//!   the delivery's own over, are removed: warren's stamp is the truth.
//!
//! The caller acks the original only after every publication is confirmed.

use std::sync::Arc;
use std::time::SystemTime;

use lapin::BasicProperties;
use lapin::types::{FieldTable, ShortString};

use crate::allow::{Denial, DenyKind, PublishPolicy};
use crate::envelope::{Envelope, header, header_frame_len, headers_of, set_text, table_len};
use crate::retry::{RetryTiers, tier_queue};
use crate::runtime::{Outcome, Outgoing, PluginFailure};

/// Persistent delivery mode: outputs and copies survive a broker restart.
const PERSISTENT: u8 = 2;

/// What kind of end a delivery came to; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    Ack,
    Publish,
    Reply,
    Retry,
    DeadLetter,
}

impl Disposition {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Publish => "publish",
            Self::Reply => "reply",
            Self::Retry => "retry",
            Self::DeadLetter => "dead_letter",
        }
    }

    /// All values, for metric pre-registration.
    pub const ALL: [Disposition; 5] = [
        Self::Ack,
        Self::Publish,
        Self::Reply,
        Self::Retry,
        Self::DeadLetter,
    ];
}

/// Why a publication exists; decides how an unroutable result is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A plugin output. Unroutable is allowed (pub/sub with no subscriber).
    Output,
    /// An RPC reply or error reply. The caller may have gone; not retried.
    Reply,
    /// A retry or dead-letter copy. Must reach its queue or the original is requeued.
    Copy,
}

/// One message to publish and have confirmed.
#[derive(Debug, Clone)]
pub struct Publication {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    pub role: Role,
}

/// The decision for one delivery.
#[derive(Debug)]
pub struct Plan {
    pub disposition: Disposition,
    pub publications: Vec<Publication>,
    /// Reason for retry / dead-letter, for logs.
    pub reason: Option<String>,
    /// Set when the dead letter is the allow-list's refusal.
    pub denied: Option<DenyKind>,
    /// Plugin headers removed because warren does not let plugins set them.
    pub stripped_headers: u64,
}

/// Pipeline facts the decision needs.
#[derive(Debug, Clone)]
pub struct PipelineInfo {
    pub name: Arc<str>,
    pub queue: String,
    pub dlq: String,
    pub tiers: RetryTiers,
    /// Where the plugin's outputs and replies may go.
    pub policy: Arc<PublishPolicy>,
}

/// Plugin identity stamped on what it produces.
#[derive(Debug, Clone, Copy)]
pub struct PluginStamp<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub digest: &'a str,
}

/// Inputs that vary per call but are not part of the delivery.
#[derive(Debug, Clone, Copy)]
pub struct Circumstances {
    pub now: SystemTime,
    /// Uniform random in [0, 1) for jitter.
    pub unit_random: f64,
    /// The connection's negotiated `frame_max` (0: no limit). A publication's
    /// properties must fit in one frame of this size.
    pub frame_max: u32,
}

/// Decide what to do with `env` (whose body is `body`) given the plugin's result.
pub fn decide(
    info: &PipelineInfo,
    plugin: PluginStamp<'_>,
    env: &Envelope,
    body: Vec<u8>,
    result: Result<Outcome, PluginFailure>,
    at: Circumstances,
) -> Plan {
    let outcome = match result {
        Ok(o) => o,
        Err(failure) => {
            return retry_or_dead_letter(info, plugin, env, body, failure.to_string(), None, at);
        }
    };
    if let Err(denial) = allowed(info, env, &outcome) {
        let mut plan = dead_letter(info, plugin, env, body, denial.reason, at);
        plan.denied = Some(denial.kind);
        return plan;
    }
    let mut stripped = 0u64;
    let built = match outcome {
        Outcome::Ack => Ok(Plan {
            disposition: Disposition::Ack,
            publications: vec![],
            reason: None,
            denied: None,
            stripped_headers: 0,
        }),
        Outcome::Publish(outs) => {
            outputs(info, plugin, env, outs, &mut stripped).map(|publications| Plan {
                disposition: Disposition::Publish,
                publications,
                reason: None,
                denied: None,
                stripped_headers: 0,
            })
        }
        Outcome::Reply(reply) => {
            let Some(reply_to) = env.reply_to() else {
                return dead_letter(
                    info,
                    plugin,
                    env,
                    body,
                    "reply outcome but the message has no reply-to".into(),
                    at,
                );
            };
            let mut headers = FieldTable::default();
            let built =
                text_headers(&mut headers, reply.headers, env, &mut stripped).and_then(|()| {
                    stamp(&mut headers, info, plugin, env);
                    let mut props = BasicProperties::default()
                        .with_headers(headers)
                        .with_delivery_mode(PERSISTENT);
                    if let Some(c) = env.properties.correlation_id() {
                        props = props.with_correlation_id(c.clone());
                    }
                    if let Some(ct) = reply.content_type {
                        props = props.with_content_type(short(ct, "reply content type")?);
                    }
                    let mut pubs = vec![Publication {
                        exchange: "".into(),
                        routing_key: short(reply_to.into(), "reply-to")?,
                        body: reply.body,
                        properties: props,
                        role: Role::Reply,
                    }];
                    pubs.extend(outputs(info, plugin, env, reply.publish, &mut stripped)?);
                    Ok(pubs)
                });
            built.map(|publications| Plan {
                disposition: Disposition::Reply,
                publications,
                reason: None,
                denied: None,
                stripped_headers: 0,
            })
        }
        Outcome::Retry(req) => {
            let delay = req.delay_ms.map(u64::from);
            return retry_or_dead_letter(info, plugin, env, body, req.reason, delay, at);
        }
        Outcome::DeadLetter(reason) => return dead_letter(info, plugin, env, body, reason, at),
    };
    let built = built.and_then(|plan| match oversized(&plan.publications, at.frame_max) {
        Some((i, len)) => Err(format!(
            "publication {} has {len} bytes of properties and headers; the broker's frame_max \
             allows {}",
            i + 1,
            at.frame_max
        )),
        None => Ok(plan),
    });
    built
        .map(|mut plan| {
            plan.stripped_headers = stripped;
            plan
        })
        .unwrap_or_else(|why| {
            dead_letter(
                info,
                plugin,
                env,
                body,
                format!("invalid plugin outcome: {why}"),
                at,
            )
        })
}

fn retry_or_dead_letter(
    info: &PipelineInfo,
    plugin: PluginStamp<'_>,
    env: &Envelope,
    body: Vec<u8>,
    reason: String,
    requested_ms: Option<u64>,
    at: Circumstances,
) -> Plan {
    let max = info.tiers.max_attempts();
    if env.attempt >= max {
        let reason = format!(
            "gave up after {} attempt{}: {reason}",
            env.attempt,
            if env.attempt == 1 { "" } else { "s" }
        );
        return dead_letter(info, plugin, env, body, reason, at);
    }
    let tier = match requested_ms {
        Some(ms) => info.tiers.for_request(ms),
        None => info.tiers.for_attempt(env.attempt),
    };
    let now = rfc3339(at.now);
    let mut headers = headers_of(&env.properties);
    set_text(
        &mut headers,
        header::ATTEMPT.into(),
        &(env.attempt + 1).to_string(),
    );
    set_text(&mut headers, header::RETRY_REASON.into(), &clip(&reason));
    failure_record(&mut headers, env, &now);
    let expiration = info.tiers.jittered(tier, at.unit_random);
    let properties = fit(
        copy_properties(&env.properties)
            .with_headers(headers)
            .with_expiration(expiration.to_string().into()),
        at.frame_max,
    );
    Plan {
        disposition: Disposition::Retry,
        publications: vec![Publication {
            exchange: "".into(),
            routing_key: tier_queue(&info.queue, tier).into(),
            body,
            properties,
            role: Role::Copy,
        }],
        reason: Some(reason),
        denied: None,
        stripped_headers: 0,
    }
}

/// Check every address the outcome would send to against the allow-list:
/// the reply's `reply_to` (chosen by the producer) and each output (chosen by
/// the plugin). The first refusal decides.
fn allowed(info: &PipelineInfo, env: &Envelope, outcome: &Outcome) -> Result<(), Denial> {
    let outs = match outcome {
        Outcome::Publish(outs) => outs,
        Outcome::Reply(reply) => {
            if let Some(reply_to) = env.reply_to() {
                info.policy.reply_to(reply_to)?;
            }
            &reply.publish
        }
        _ => return Ok(()),
    };
    outs.iter()
        .try_for_each(|o| info.policy.output(&o.exchange, &o.routing_key))
}

/// Park a delivery in the DLQ without calling the plugin and without any
/// other effect, not even an RPC caller's error reply: for a message suspected
/// of killing the broker session (see `suspects`), whose reply address may be
/// the very thing that kills it.
pub fn park(
    info: &PipelineInfo,
    plugin: PluginStamp<'_>,
    env: &Envelope,
    body: Vec<u8>,
    reason: String,
    at: Circumstances,
) -> Plan {
    let mut plan = dead_letter(info, plugin, env, body, reason, at);
    plan.publications.retain(|p| p.role == Role::Copy);
    plan
}

fn dead_letter(
    info: &PipelineInfo,
    plugin: PluginStamp<'_>,
    env: &Envelope,
    body: Vec<u8>,
    reason: String,
    at: Circumstances,
) -> Plan {
    let now = rfc3339(at.now);
    let reason = clip(&reason);
    let mut headers = headers_of(&env.properties);
    set_text(&mut headers, header::REASON.into(), &reason);
    set_text(
        &mut headers,
        header::ATTEMPTS.into(),
        &env.attempt.to_string(),
    );
    set_text(&mut headers, header::PIPELINE.into(), &info.name);
    set_text(&mut headers, header::PLUGIN.into(), plugin.name);
    set_text(&mut headers, header::PLUGIN_VERSION.into(), plugin.version);
    set_text(&mut headers, header::PLUGIN_DIGEST.into(), plugin.digest);
    failure_record(&mut headers, env, &now);
    let properties = fit(
        copy_properties(&env.properties).with_headers(headers),
        at.frame_max,
    );
    let mut publications = vec![Publication {
        exchange: "".into(),
        routing_key: info.dlq.clone().into(),
        body,
        properties,
        role: Role::Copy,
    }];
    // A producer's reply_to is an address warren writes to with its own
    // rights: one the allow-list refuses gets no error reply (the dead letter
    // still says why the message failed).
    if let Some(reply_to) = env.reply_to()
        && info.policy.reply_to(reply_to).is_ok()
        && let Ok(rk) = ShortString::try_new(reply_to)
    {
        let mut h = FieldTable::default();
        stamp(&mut h, info, plugin, env);
        set_text(&mut h, header::ERROR.into(), &reason);
        let mut props = BasicProperties::default()
            .with_headers(h)
            .with_content_type("text/plain".into());
        if let Some(c) = env.properties.correlation_id() {
            props = props.with_correlation_id(c.clone());
        }
        publications.push(Publication {
            exchange: "".into(),
            routing_key: rk,
            body: format!("error: {reason}").into_bytes(),
            properties: props,
            role: Role::Reply,
        });
    }
    Plan {
        disposition: Disposition::DeadLetter,
        publications,
        reason: Some(reason),
        denied: None,
        stripped_headers: 0,
    }
}

fn outputs(
    info: &PipelineInfo,
    plugin: PluginStamp<'_>,
    env: &Envelope,
    outs: Vec<Outgoing>,
    stripped: &mut u64,
) -> Result<Vec<Publication>, String> {
    outs.into_iter()
        .map(|o| {
            let mut headers = FieldTable::default();
            text_headers(&mut headers, o.headers, env, stripped)?;
            stamp(&mut headers, info, plugin, env);
            let mut properties = BasicProperties::default()
                .with_headers(headers)
                .with_delivery_mode(PERSISTENT);
            if let Some(ct) = o.content_type {
                properties = properties.with_content_type(short(ct, "content type")?);
            }
            Ok(Publication {
                exchange: short(o.exchange, "exchange")?,
                routing_key: short(o.routing_key, "routing key")?,
                body: o.body,
                properties,
                role: Role::Output,
            })
        })
        .collect()
}

/// Properties for a retry or dead-letter copy: everything the original carried
/// except `expiration` (a publisher's TTL must not make a parked copy vanish) and
/// `user_id` (the broker rejects a `user_id` that is not warren's own login).
fn copy_properties(p: &BasicProperties) -> BasicProperties {
    let mut c = BasicProperties::default().with_delivery_mode(PERSISTENT);
    if let Some(v) = p.content_type() {
        c = c.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        c = c.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        c = c.with_headers(v.clone());
    }
    if let Some(v) = p.priority() {
        c = c.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        c = c.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        c = c.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        c = c.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        c = c.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        c = c.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        c = c.with_app_id(v.clone());
    }
    c
}

/// What every retry and dead-letter copy records: when attempts failed, and
/// where the message was first published (as resolved by the envelope, so a
/// producer's forged values never pass through).
fn failure_record(headers: &mut FieldTable, env: &Envelope, now: &str) {
    keep_first(headers, header::FIRST_FAILURE, now);
    set_text(headers, header::LAST_FAILURE.into(), now);
    set_text(headers, header::ORIGINAL_EXCHANGE.into(), &env.exchange);
    set_text(
        headers,
        header::ORIGINAL_ROUTING_KEY.into(),
        &env.routing_key,
    );
}

/// The first publication whose header frame does not fit `frame_max`, and its size.
fn oversized(pubs: &[Publication], frame_max: u32) -> Option<(usize, usize)> {
    if frame_max == 0 {
        return None;
    }
    pubs.iter()
        .map(|p| header_frame_len(&p.properties))
        .enumerate()
        .find(|(_, len)| *len > frame_max as usize)
}

/// A retry or dead-letter copy must reach its queue whatever the producer put
/// in the headers: if its header frame would not fit the broker's `frame_max`
/// (warren's own headers come on top of the producer's), the producer's
/// largest headers are dropped until it fits, warren's own are kept, and
/// `x-warren-dropped-headers` says what went.
fn fit(props: BasicProperties, frame_max: u32) -> BasicProperties {
    let limit = frame_max as usize;
    if frame_max == 0 || header_frame_len(&props) <= limit {
        return props;
    }
    // Room for the note itself.
    let budget = limit.saturating_sub(600);
    let mut map = headers_of(&props).inner().clone();
    let mut theirs: Vec<(ShortString, usize)> = map
        .iter()
        .filter(|(k, _)| !k.as_str().starts_with("x-warren-"))
        .map(|(k, v)| {
            let mut one = FieldTable::default();
            one.insert(k.clone(), v.clone());
            (k.clone(), table_len(&one))
        })
        .collect();
    theirs.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let mut size = header_frame_len(&props);
    let mut dropped = Vec::new();
    for (k, n) in theirs {
        if size <= budget {
            break;
        }
        map.remove(&k);
        size = size.saturating_sub(n);
        dropped.push(k.to_string());
    }
    let mut headers = FieldTable::from(map);
    set_text(
        &mut headers,
        header::DROPPED_HEADERS.into(),
        &clip(&format!(
            "{} header(s) did not fit the broker's frame_max of {frame_max} bytes: {}",
            dropped.len(),
            dropped.join(", ")
        )),
    );
    props.with_headers(headers)
}

/// Provenance headers on everything a plugin produces; `traceparent` is
/// carried over. Set after the plugin's headers, so warren's win.
fn stamp(headers: &mut FieldTable, info: &PipelineInfo, plugin: PluginStamp<'_>, env: &Envelope) {
    set_text(headers, header::PIPELINE.into(), &info.name);
    set_text(headers, header::PLUGIN.into(), plugin.name);
    set_text(headers, header::PLUGIN_VERSION.into(), plugin.version);
    if let Some(tp) = env.header(header::TRACEPARENT) {
        set_text(headers, header::TRACEPARENT.into(), &tp);
    }
}

/// Plugin-provided headers, without the ones warren does not let a plugin
/// set (counted in `stripped`): any `x-warren-*` (consumers and `warren dlq`
/// trust them as warren's bookkeeping), and `traceparent` when the delivery
/// has one that warren carries over (a trace must not be re-parented by the
/// code it traces). Names are compared ignoring case, as consumers that read
/// them loosely would.
fn text_headers(
    table: &mut FieldTable,
    headers: Vec<(String, String)>,
    env: &Envelope,
    stripped: &mut u64,
) -> Result<(), String> {
    let traced = env.header(header::TRACEPARENT).is_some();
    for (k, v) in headers {
        let lower = k.to_ascii_lowercase();
        if lower.starts_with("x-warren-") || (traced && lower == header::TRACEPARENT) {
            *stripped = stripped.saturating_add(1);
            continue;
        }
        let name = short(k, "header name")?;
        set_text(table, name, &v);
    }
    Ok(())
}

fn short(s: String, what: &str) -> Result<ShortString, String> {
    let len = s.len();
    ShortString::try_new(s).map_err(|_| format!("{what} is {len} bytes; AMQP allows at most 255"))
}

fn keep_first(headers: &mut FieldTable, name: &'static str, value: &str) {
    if !headers.contains_key(name) {
        set_text(headers, name.into(), value);
    }
}

/// Reasons end up in headers; keep them to a sane size.
fn clip(s: &str) -> String {
    crate::logtext::clip(s, 2000).into_owned()
}

/// RFC 3339 UTC timestamp with milliseconds, without pulling in a date crate.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryConfig;
    use crate::envelope::value_text;
    use crate::runtime::{RetryRequest, RpcReply};

    fn info() -> PipelineInfo {
        PipelineInfo {
            name: "p".into(),
            queue: "q".into(),
            dlq: "q.dlq".into(),
            tiers: RetryTiers::new(&RetryConfig {
                max_attempts: 3,
                initial_delay_ms: 100,
                max_delay_ms: 400,
                jitter: 0.0,
            }),
            policy: Arc::new(PublishPolicy::default()),
        }
    }

    const STAMP: PluginStamp<'static> = PluginStamp {
        name: "plug",
        version: "0123456789ab",
        digest: "0123456789abcdef",
    };

    fn at() -> Circumstances {
        Circumstances {
            now: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
            unit_random: 0.5,
            frame_max: 131_072,
        }
    }

    /// A delivery of attempt `attempt`; after the first, back from a tier.
    fn env(props: BasicProperties, attempt: u32) -> Envelope {
        let mut h = headers_of(&props);
        set_text(&mut h, header::ATTEMPT.into(), &attempt.to_string());
        if attempt > 1 {
            set_text(&mut h, header::ORIGINAL_EXCHANGE.into(), "ex");
            set_text(&mut h, header::ORIGINAL_ROUTING_KEY.into(), "rk");
            let mut death = FieldTable::default();
            set_text(&mut death, "queue".into(), "q.retry.100");
            set_text(&mut death, "reason".into(), "expired");
            h.insert(
                "x-death".into(),
                lapin::types::AMQPValue::FieldArray(
                    vec![lapin::types::AMQPValue::FieldTable(death)].into(),
                ),
            );
            return Envelope::new(props.with_headers(h), "", "q", "q");
        }
        Envelope::new(props.with_headers(h), "ex", "rk", "q")
    }

    fn header_of(p: &Publication, name: &str) -> Option<String> {
        p.properties
            .headers()
            .as_ref()?
            .inner()
            .get(name)
            .map(value_text)
    }

    #[test]
    fn a_reply_without_reply_to_is_dead_lettered() {
        let reply = Outcome::Reply(RpcReply {
            body: b"x".to_vec(),
            content_type: None,
            headers: vec![],
            publish: vec![],
        });
        let plan = decide(
            &info(),
            STAMP,
            &env(BasicProperties::default(), 1),
            b"in".to_vec(),
            Ok(reply),
            at(),
        );
        assert_eq!(plan.disposition, Disposition::DeadLetter);
        assert_eq!(
            plan.publications.len(),
            1,
            "no error reply without a reply-to"
        );
        assert_eq!(plan.publications[0].routing_key.as_str(), "q.dlq");
        assert_eq!(plan.publications[0].body, b"in");
        assert!(
            header_of(&plan.publications[0], header::REASON)
                .is_some_and(|r| r.contains("no reply-to"))
        );
    }

    /// `info()` with the policy of a pipeline `p` on queue `q` configured with
    /// `extra` (keys, then `[[pipeline.output]]` entries).
    #[allow(clippy::expect_used)] // a broken fixture should fail the test loudly
    fn info_with(extra: &str) -> PipelineInfo {
        let text =
            format!("[[pipeline]]\nname = \"p\"\nqueue = \"q\"\nplugin = \"p.wasm\"\n{extra}");
        let c = crate::config::Config::parse(&text, std::path::Path::new("."))
            .expect("a valid test configuration");
        PipelineInfo {
            policy: Arc::new(PublishPolicy::new(&c.pipelines[0], &c.pipelines)),
            ..info()
        }
    }

    fn output(exchange: &str, routing_key: &str, headers: &[(&str, &str)]) -> Outgoing {
        Outgoing {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body: b"out".to_vec(),
            content_type: None,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_denied_output_sends_nothing_and_dead_letters_with_the_rule() {
        let info = info_with(
            "[[pipeline.output]]\nexchange = \"n\"\ntype = \"topic\"\nrouting_keys = [\"notify.*\"]\n",
        );
        let props = BasicProperties::default()
            .with_reply_to("caller".into())
            .with_correlation_id("c1".into());
        let outcome = Outcome::Publish(vec![
            output("n", "notify.email", &[]),
            output("n", "alert.email", &[]),
        ]);
        let plan = decide(
            &info,
            STAMP,
            &env(props, 1),
            b"in".to_vec(),
            Ok(outcome),
            at(),
        );
        assert_eq!(plan.disposition, Disposition::DeadLetter);
        assert_eq!(plan.denied, Some(DenyKind::Publish));
        // The DLQ copy and the caller's error reply; neither output.
        assert_eq!(plan.publications.len(), 2);
        assert_eq!(plan.publications[0].routing_key.as_str(), "q.dlq");
        assert_eq!(plan.publications[1].role, Role::Reply);
        let reason = header_of(&plan.publications[0], header::REASON).unwrap_or_default();
        assert!(
            reason.contains("\"n\"")
                && reason.contains("\"alert.email\"")
                && reason.contains("notify.*"),
            "{reason}"
        );
    }

    #[test]
    fn a_reply_to_a_managed_queue_is_never_written() {
        let info = info_with("");
        let props = BasicProperties::default()
            .with_reply_to("q.dlq".into())
            .with_correlation_id("c1".into());
        let reply = Outcome::Reply(RpcReply {
            body: b"answer".to_vec(),
            content_type: None,
            headers: vec![],
            publish: vec![],
        });
        let plan = decide(
            &info,
            STAMP,
            &env(props.clone(), 1),
            b"in".to_vec(),
            Ok(reply),
            at(),
        );
        assert_eq!(plan.disposition, Disposition::DeadLetter);
        assert_eq!(plan.denied, Some(DenyKind::Reply));
        assert_eq!(plan.publications.len(), 1, "no error reply into the DLQ");
        assert_eq!(plan.publications[0].role, Role::Copy);
        assert_eq!(plan.publications[0].routing_key.as_str(), "q.dlq");
        let reason = header_of(&plan.publications[0], header::REASON).unwrap_or_default();
        assert!(reason.contains("reply_to \"q.dlq\""), "{reason}");

        // A plugin's own dead letter sends no error reply there either.
        let plan = decide(
            &info,
            STAMP,
            &env(props, 1),
            b"in".to_vec(),
            Ok(Outcome::DeadLetter("bad".into())),
            at(),
        );
        assert_eq!(plan.publications.len(), 1);
        assert_eq!(plan.denied, None);
    }

    #[test]
    fn warren_headers_win_over_the_plugins() {
        let info = info_with("[[pipeline.output]]\nqueues = [\"out\"]\n");
        let mut h = FieldTable::default();
        set_text(&mut h, header::TRACEPARENT.into(), "00-trace-span-01");
        let outcome = Outcome::Publish(vec![output(
            "",
            "out",
            &[
                ("x-warren-pipeline", "forged"),
                ("X-Warren-Plugin-Version", "forged"),
                ("x-warren-error", "forged"),
                ("traceparent", "00-other-span-01"),
                ("x-mine", "kept"),
            ],
        )]);
        let plan = decide(
            &info,
            STAMP,
            &env(BasicProperties::default().with_headers(h), 1),
            vec![],
            Ok(outcome),
            at(),
        );
        assert_eq!(plan.disposition, Disposition::Publish);
        assert_eq!(plan.stripped_headers, 4);
        let out = &plan.publications[0];
        assert_eq!(header_of(out, header::PIPELINE).as_deref(), Some("p"));
        assert_eq!(
            header_of(out, header::PLUGIN_VERSION).as_deref(),
            Some("0123456789ab")
        );
        assert_eq!(header_of(out, "X-Warren-Plugin-Version"), None);
        assert_eq!(header_of(out, header::ERROR), None);
        assert_eq!(
            header_of(out, header::TRACEPARENT).as_deref(),
            Some("00-trace-span-01")
        );
        assert_eq!(header_of(out, "x-mine").as_deref(), Some("kept"));

        // Without a traceparent to carry over, the plugin may start a trace.
        let outcome = Outcome::Publish(vec![output("", "out", &[("traceparent", "00-new-01")])]);
        let plan = decide(
            &info,
            STAMP,
            &env(BasicProperties::default(), 1),
            vec![],
            Ok(outcome),
            at(),
        );
        assert_eq!(plan.stripped_headers, 0);
        assert_eq!(
            header_of(&plan.publications[0], header::TRACEPARENT).as_deref(),
            Some("00-new-01")
        );
    }

    #[test]
    fn names_amqp_cannot_carry_dead_letter_instead_of_panicking() {
        let long = "k".repeat(300);
        let outcome = Outcome::Publish(vec![Outgoing {
            exchange: String::new(),
            routing_key: "out".into(),
            body: vec![],
            content_type: Some(long),
            headers: vec![],
        }]);
        let plan = decide(
            &info_with("[[pipeline.output]]\nqueues = [\"out\"]\n"),
            STAMP,
            &env(BasicProperties::default(), 1),
            vec![],
            Ok(outcome),
            at(),
        );
        assert_eq!(plan.disposition, Disposition::DeadLetter);
        let reason = header_of(&plan.publications[0], header::REASON).unwrap_or_default();
        assert!(reason.contains("content type is 300 bytes"), "{reason}");
    }

    #[test]
    fn retries_go_to_the_tier_for_the_attempt_then_dead_letter() {
        let props = BasicProperties::default()
            .with_expiration("5000".into())
            .with_user_id("someone".into())
            .with_reply_to("caller".into())
            .with_correlation_id("c1".into());
        let retry = || {
            Outcome::Retry(RetryRequest {
                reason: "busy".into(),
                delay_ms: None,
            })
        };
        let plan = decide(
            &info(),
            STAMP,
            &env(props.clone(), 2),
            b"m".to_vec(),
            Ok(retry()),
            at(),
        );
        assert_eq!(plan.disposition, Disposition::Retry);
        let copy = &plan.publications[0];
        assert_eq!(copy.routing_key.as_str(), "q.retry.200");
        assert_eq!(header_of(copy, header::ATTEMPT).as_deref(), Some("3"));
        assert_eq!(
            header_of(copy, header::ORIGINAL_EXCHANGE).as_deref(),
            Some("ex")
        );
        assert_eq!(
            copy.properties.expiration().as_ref().map(|s| s.as_str()),
            Some("200")
        );
        assert_eq!(
            *copy.properties.user_id(),
            None,
            "the broker would reject a foreign user_id"
        );
        assert_eq!(
            copy.properties.reply_to().as_ref().map(|s| s.as_str()),
            Some("caller")
        );

        // The last attempt: parked, with an error reply for the RPC caller.
        let plan = decide(
            &info(),
            STAMP,
            &env(props, 3),
            b"m".to_vec(),
            Ok(retry()),
            at(),
        );
        assert_eq!(plan.disposition, Disposition::DeadLetter);
        let parked = &plan.publications[0];
        assert_eq!(
            header_of(parked, header::REASON).as_deref(),
            Some("gave up after 3 attempts: busy")
        );
        assert_eq!(
            *parked.properties.expiration(),
            None,
            "a parked copy must not expire"
        );
        assert_eq!(
            header_of(parked, header::LAST_FAILURE).as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
        let error_reply = &plan.publications[1];
        assert_eq!(error_reply.role, Role::Reply);
        assert_eq!(error_reply.routing_key.as_str(), "caller");
        assert_eq!(
            error_reply
                .properties
                .correlation_id()
                .as_ref()
                .map(|s| s.as_str()),
            Some("c1")
        );
    }

    #[test]
    fn plugin_failures_take_the_retry_path() {
        let plan = decide(
            &info(),
            STAMP,
            &env(BasicProperties::default(), 1),
            vec![],
            Err(PluginFailure::Timeout(std::time::Duration::from_millis(5))),
            at(),
        );
        assert_eq!(plan.disposition, Disposition::Retry);
        assert_eq!(plan.reason.as_deref(), Some("plugin timed out after 5 ms"));
    }
}
