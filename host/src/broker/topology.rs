//! Declaring what a pipeline needs on the broker: its queue, the dead-letter
//! queue, one queue per retry tier, bound and output exchanges, and bindings.
//! Declarations are idempotent, so this runs on every (re)connect.

use std::collections::HashSet;
use std::sync::Mutex;

use anyhow::{Context, Result};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind as LapinKind};

use crate::config::{ExchangeKind, PipelineConfig, QueueType};
use crate::retry::{RetryTiers, tier_queue};

/// Declare everything `p` uses.
pub async fn declare(channel: &Channel, p: &PipelineConfig, tiers: &RetryTiers) -> Result<()> {
    let dlq = p.dlq_name();
    let mut main_args = queue_type_args(p);
    if p.queue_type == QueueType::Quorum && p.delivery_limit > 0 {
        // Bounds crash loops: a message that keeps killing warren (or keeps being
        // requeued) ends up in the DLQ instead of cycling forever.
        main_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(clamp_i32(p.delivery_limit)),
        );
        main_args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        main_args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(dlq.as_str().into()),
        );
    }
    if p.single_active_consumer {
        // Only the consumed queue: the DLQ is read by hand and the retry tiers
        // by nobody (their messages expire back into this queue).
        main_args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    queue(channel, &p.queue, main_args).await?;
    queue(channel, &dlq, queue_type_args(p)).await?;

    for &ms in tiers.delays_ms() {
        let mut args = queue_type_args(p);
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(p.queue.as_str().into()),
        );
        if p.queue_type == QueueType::Quorum {
            // Quorum queues dead-letter at-most-once unless told otherwise; a
            // retry copy must not vanish between its tier and the origin queue.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
        queue(channel, &tier_queue(&p.queue, ms), args).await?;
    }

    for b in &p.bindings {
        exchange(channel, &b.exchange, b.kind).await?;
        let keys: Vec<&str> = if b.routing_keys.is_empty() {
            vec![""]
        } else {
            b.routing_keys.iter().map(String::as_str).collect()
        };
        for key in keys {
            channel
                .queue_bind(
                    name(&p.queue)?,
                    name(&b.exchange)?,
                    name(key)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| {
                    format!(
                        "binding queue {:?} to exchange {:?} with key {key:?}",
                        p.queue, b.exchange
                    )
                })?;
        }
    }
    // An entry of `queues` names the default exchange, which is never declared.
    for o in p.outputs.iter().filter(|o| !o.exchange.is_empty()) {
        exchange(channel, &o.exchange, o.kind).await?;
    }
    Ok(())
}

/// The arguments every queue of the pipeline is declared with: its type and,
/// for quorum queues, the replica count if one is configured.
fn queue_type_args(p: &PipelineConfig) -> FieldTable {
    let mut args = FieldTable::default();
    let v = match p.queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    args.insert("x-queue-type".into(), AMQPValue::LongString(v.into()));
    if let (QueueType::Quorum, Some(n)) = (p.queue_type, p.quorum_initial_group_size) {
        args.insert("x-quorum-initial-group-size".into(), AMQPValue::LongUInt(n));
    }
    args
}

async fn queue(channel: &Channel, q: &str, args: FieldTable) -> Result<()> {
    let opts = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match channel.queue_declare(name(q)?, opts, args).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let refused = matches!(
                e.kind(),
                lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == PRECONDITION_FAILED
            );
            if refused {
                // A queue's arguments are fixed when it is first declared; the
                // broker's own message (in the cause) names the argument.
                return Err(anyhow::Error::new(e).context(format!(
                    "declaring queue {q:?}: the broker refused it (PRECONDITION_FAILED) because \
                     the queue already exists with other arguments, and a queue's arguments \
                     cannot change once it is declared. The pipeline's queue_type, \
                     delivery_limit, quorum_initial_group_size and single_active_consumer set \
                     them; change them back, or drain and delete the queue (or use another queue \
                     name) so that warren declares it anew"
                )));
            }
            Err(anyhow::Error::new(e).context(format!("declaring queue {q:?}")))
        }
    }
}

async fn exchange(channel: &Channel, x: &str, kind: ExchangeKind) -> Result<()> {
    if x.starts_with("amq.") {
        // Built-in exchanges exist already and cannot be redeclared by clients.
        return Ok(());
    }
    let k = match kind {
        ExchangeKind::Direct => LapinKind::Direct,
        ExchangeKind::Fanout => LapinKind::Fanout,
        ExchangeKind::Topic => LapinKind::Topic,
    };
    let opts = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(name(x)?, k, opts, FieldTable::default())
        .await
        .with_context(|| format!("declaring exchange {x:?} ({kind:?})"))
}

fn name(s: &str) -> Result<ShortString> {
    ShortString::try_new(s).map_err(|_| anyhow::anyhow!("name {s:?} is longer than 255 bytes"))
}

fn clamp_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Exchanges known to exist on the broker, for checking a plugin's outputs
/// before they are published. A publish to a missing exchange makes the broker
/// close the channel (`NOT_FOUND`), and with it every other message's publish
/// in progress on it; checked first, only the message that asked for it is
/// dead-lettered.
#[derive(Debug)]
pub struct KnownExchanges {
    known: Mutex<HashSet<String>>,
}

/// Exchanges every RabbitMQ broker has (`amq.rabbitmq.*` ones are internal).
const BUILT_IN: [&str; 6] = [
    "",
    "amq.direct",
    "amq.fanout",
    "amq.topic",
    "amq.headers",
    "amq.match",
];

impl KnownExchanges {
    /// The built-in exchanges and those the pipeline declares itself.
    pub fn new(p: &PipelineConfig) -> Self {
        let known = BUILT_IN
            .iter()
            .map(|x| x.to_string())
            // An `amq.*` output is not declared (clients may not), so it is
            // known only if it is one of the built-in ones or once verified.
            .chain(
                p.outputs
                    .iter()
                    .filter(|o| !o.exchange.starts_with("amq."))
                    .map(|o| o.exchange.clone()),
            )
            .chain(p.bindings.iter().map(|b| b.exchange.clone()))
            .collect();
        Self {
            known: Mutex::new(known),
        }
    }

    /// Whether `x` is known to exist without asking the broker.
    pub fn known(&self, x: &str) -> bool {
        self.known.lock().is_ok_and(|k| k.contains(x))
    }

    /// Ask the broker whether `x` exists (a passive declare, on a channel of its
    /// own since a refusal closes it). `Err` carries the broker's reason when it
    /// says the exchange does not exist; any other trouble (the connection going
    /// away) is left to the publish itself to meet.
    pub async fn verify(&self, conn: &Connection, x: &str) -> std::result::Result<(), String> {
        if self.known(x) {
            return Ok(());
        }
        let Ok(name) = ShortString::try_new(x) else {
            return Err("the exchange name is longer than 255 bytes".into());
        };
        let Ok(channel) = conn.create_channel().await else {
            return Ok(());
        };
        let opts = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        match channel
            .exchange_declare(name, LapinKind::Direct, opts, FieldTable::default())
            .await
        {
            Ok(()) => {
                let _ = channel.close(200, "checked".into()).await;
                if let Ok(mut k) = self.known.lock() {
                    k.insert(x.to_string());
                }
                Ok(())
            }
            Err(e) => match e.kind() {
                lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == NOT_FOUND => {
                    Err(amqp.get_message().to_string())
                }
                _ => Ok(()),
            },
        }
    }
}

/// AMQP reply code of a missing entity.
const NOT_FOUND: u16 = 404;

/// AMQP reply code of a declaration that contradicts the existing entity.
const PRECONDITION_FAILED: u16 = 406;
