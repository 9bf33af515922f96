//! What warren knows about a delivery besides its body: the original AMQP
//! properties, where it was first published, and warren's own retry bookkeeping
//! carried in `x-warren-*` headers across trips through the retry tiers.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::runtime::Message;

/// Header names warren reads and writes.
pub mod header {
    /// Attempt number of the delivery carrying it (absent = 1).
    pub const ATTEMPT: &str = "x-warren-attempt";
    /// Why the previous attempt asked for a retry.
    pub const RETRY_REASON: &str = "x-warren-retry-reason";
    /// Why the message was dead-lettered.
    pub const REASON: &str = "x-warren-reason";
    /// Attempts made before dead-lettering.
    pub const ATTEMPTS: &str = "x-warren-attempts";
    /// Pipeline that handled the message.
    pub const PIPELINE: &str = "x-warren-pipeline";
    /// Plugin name (file stem).
    pub const PLUGIN: &str = "x-warren-plugin";
    /// Short plugin version (first 12 hex digits of the digest).
    pub const PLUGIN_VERSION: &str = "x-warren-plugin-version";
    /// Full SHA-256 of the plugin component.
    pub const PLUGIN_DIGEST: &str = "x-warren-plugin-digest";
    /// Time of the first failed attempt (RFC 3339, UTC).
    pub const FIRST_FAILURE: &str = "x-warren-first-failure";
    /// Time of the last failed attempt (RFC 3339, UTC).
    pub const LAST_FAILURE: &str = "x-warren-last-failure";
    /// Exchange the message was originally published to.
    pub const ORIGINAL_EXCHANGE: &str = "x-warren-original-exchange";
    /// Routing key the message was originally published with.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-warren-original-routing-key";
    /// Set on the error reply sent to an RPC caller whose request was dead-lettered.
    pub const ERROR: &str = "x-warren-error";
    /// W3C trace context, copied from input to outputs.
    pub const TRACEPARENT: &str = "traceparent";
}

/// A delivery as the disposition logic needs it.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Properties as received (headers included).
    pub properties: BasicProperties,
    /// Exchange of the original publish (not the retry tier's).
    pub exchange: String,
    /// Routing key of the original publish.
    pub routing_key: String,
    /// Queue it was consumed from.
    pub queue: String,
    /// 1 on first delivery.
    pub attempt: u32,
}

impl Envelope {
    /// Build from what the broker delivered. A message coming back from a retry
    /// tier arrives via the default exchange; its original address is in headers.
    pub fn new(
        properties: BasicProperties,
        exchange: &str,
        routing_key: &str,
        queue: &str,
    ) -> Self {
        let attempt = header_u32(&properties, header::ATTEMPT).unwrap_or(1).max(1);
        let exchange = header_string(&properties, header::ORIGINAL_EXCHANGE)
            .unwrap_or_else(|| exchange.into());
        let routing_key = header_string(&properties, header::ORIGINAL_ROUTING_KEY)
            .unwrap_or_else(|| routing_key.into());
        Self {
            properties,
            exchange,
            routing_key,
            queue: queue.into(),
            attempt,
        }
    }

    /// The WIT message handed to the plugin.
    pub fn to_message(&self, body: Vec<u8>) -> Message {
        let p = &self.properties;
        Message {
            body,
            content_type: p.content_type().as_ref().map(|s| s.to_string()),
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            queue: self.queue.clone(),
            headers: p
                .headers()
                .as_ref()
                .map(|h| {
                    h.inner()
                        .iter()
                        .map(|(k, v)| (k.to_string(), value_text(v)))
                        .collect()
                })
                .unwrap_or_default(),
            message_id: p.message_id().as_ref().map(|s| s.to_string()),
            correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
            reply_to: p
                .reply_to()
                .as_ref()
                .map(|s| s.to_string())
                .filter(|s| !s.is_empty()),
            attempt: self.attempt,
        }
    }

    /// `reply_to`, if present and non-empty.
    pub fn reply_to(&self) -> Option<&str> {
        self.properties
            .reply_to()
            .as_ref()
            .map(|s| s.as_str())
            .filter(|s| !s.is_empty())
    }

    /// A header of the original message, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        header_string(&self.properties, name)
    }
}

/// Render an AMQP field value as text for the plugin.
pub fn value_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::DecimalValue(d) => {
            let scale = 10f64.powi(i32::from(d.scale));
            (f64::from(d.value) / scale).to_string()
        }
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::Timestamp(t) => t.to_string(),
        AMQPValue::FieldArray(a) => {
            let items: Vec<String> = a.as_slice().iter().map(value_text).collect();
            format!("[{}]", items.join(", "))
        }
        AMQPValue::FieldTable(t) => {
            let items: Vec<String> = t
                .inner()
                .iter()
                .map(|(k, v)| format!("{k}={}", value_text(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        AMQPValue::Void => String::new(),
    }
}

fn header_value<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    p.headers().as_ref()?.inner().get(name)
}

fn header_string(p: &BasicProperties, name: &str) -> Option<String> {
    header_value(p, name).map(value_text)
}

fn header_u32(p: &BasicProperties, name: &str) -> Option<u32> {
    header_value(p, name).and_then(|v| value_text(v).trim().parse().ok())
}

/// Headers as a mutable table (empty when the message had none).
pub fn headers_of(p: &BasicProperties) -> FieldTable {
    p.headers().clone().unwrap_or_default()
}

/// Insert a text header. Names come from warren or from validated plugin output.
pub fn set_text(table: &mut FieldTable, name: ShortString, value: &str) {
    table.insert(name, AMQPValue::LongString(value.into()));
}
