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
    /// On a retry or dead-letter copy: producer headers dropped so that the
    /// copy fits the broker's `frame_max`, and which.
    pub const DROPPED_HEADERS: &str = "x-warren-dropped-headers";
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
    ///
    /// warren's bookkeeping headers (attempt, original exchange and routing
    /// key) are believed only on a message that came back from one of this
    /// queue's retry tiers, which the broker records in `x-death`. On any
    /// other delivery a producer may have set them, and `x-warren-attempt:
    /// 999999` would dead-letter a message at its first failure.
    pub fn new(
        properties: BasicProperties,
        exchange: &str,
        routing_key: &str,
        queue: &str,
    ) -> Self {
        let ours = came_back_from_a_tier(&properties, queue);
        let trusted = |name| {
            if ours {
                header_string(&properties, name)
            } else {
                None
            }
        };
        let attempt = trusted(header::ATTEMPT)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(1u32)
            .max(1);
        let exchange = trusted(header::ORIGINAL_EXCHANGE).unwrap_or_else(|| exchange.into());
        let routing_key =
            trusted(header::ORIGINAL_ROUTING_KEY).unwrap_or_else(|| routing_key.into());
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
            // AMQP's decimal value is a signed 32-bit integer; the type holds
            // its bits unsigned.
            let value = i32::from_be_bytes(d.value.to_be_bytes());
            let scale = 10f64.powi(i32::from(d.scale));
            (f64::from(value) / scale).to_string()
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

/// Whether the newest `x-death` entry says the message expired in one of
/// `queue`'s retry tiers (`<queue>.retry.<ms>`) and was sent back by the broker.
fn came_back_from_a_tier(p: &BasicProperties, queue: &str) -> bool {
    let Some(AMQPValue::FieldArray(deaths)) = header_value(p, "x-death") else {
        return false;
    };
    let Some(AMQPValue::FieldTable(newest)) = deaths.as_slice().first() else {
        return false;
    };
    let field = |k: &str| newest.inner().get(k).map(value_text);
    let tier = field("queue").and_then(|q| {
        q.strip_prefix(queue)
            .and_then(|rest| rest.strip_prefix(".retry."))
            .map(|ms| !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()))
    });
    tier == Some(true) && field("reason").as_deref() == Some("expired")
}

/// Headers as a mutable table (empty when the message had none).
pub fn headers_of(p: &BasicProperties) -> FieldTable {
    p.headers().clone().unwrap_or_default()
}

/// Insert a text header. Names come from warren or from validated plugin output.
pub fn set_text(table: &mut FieldTable, name: ShortString, value: &str) {
    table.insert(name, AMQPValue::LongString(value.into()));
}

/// Bytes `table` takes on the wire, without its own 4-byte length prefix.
pub fn table_len(table: &FieldTable) -> usize {
    table
        .inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + value_len(v))
        .fold(0, usize::saturating_add)
}

/// Bytes one field value takes on the wire, its type tag included.
fn value_len(v: &AMQPValue) -> usize {
    1 + match v {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4usize.saturating_add(s.as_bytes().len()),
        AMQPValue::ByteArray(b) => 4usize.saturating_add(b.as_slice().len()),
        AMQPValue::FieldArray(a) => a
            .as_slice()
            .iter()
            .map(value_len)
            .fold(4, usize::saturating_add),
        AMQPValue::FieldTable(t) => 4usize.saturating_add(table_len(t)),
        AMQPValue::Void => 0,
    }
}

/// Bytes of a content header frame carrying `p`: the frame's own 8 bytes, the
/// class, weight, body size and flags, and every property that is set. The
/// broker refuses (closing the whole connection with `FRAME_ERROR`) a header
/// frame larger than the negotiated `frame_max`, so this is checked before
/// anything is published.
pub fn header_frame_len(p: &BasicProperties) -> usize {
    let short = |s: &Option<ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    let fixed = 8 + 14;
    let shorts = [
        p.content_type(),
        p.content_encoding(),
        p.correlation_id(),
        p.reply_to(),
        p.expiration(),
        p.message_id(),
        p.kind(),
        p.user_id(),
        p.app_id(),
        p.cluster_id(),
    ]
    .into_iter()
    .map(short)
    .sum::<usize>();
    let headers = p
        .headers()
        .as_ref()
        .map_or(0, |h| 4usize.saturating_add(table_len(h)));
    fixed + shorts + 1 + 1 + 8 + headers
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;
    use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable};

    use super::{Envelope, header, set_text, value_text};

    fn death(queue: &str, reason: &str) -> AMQPValue {
        let mut d = FieldTable::default();
        set_text(&mut d, "queue".into(), queue);
        set_text(&mut d, "reason".into(), reason);
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(d)]))
    }

    fn props(with_death: Option<AMQPValue>) -> BasicProperties {
        let mut h = FieldTable::default();
        set_text(&mut h, header::ATTEMPT.into(), "999999");
        set_text(&mut h, header::ORIGINAL_EXCHANGE.into(), "forged");
        if let Some(d) = with_death {
            h.insert("x-death".into(), d);
        }
        BasicProperties::default().with_headers(h)
    }

    #[test]
    fn bookkeeping_headers_count_only_after_a_trip_through_a_tier() {
        let first = Envelope::new(props(None), "uploads", "img", "q");
        assert_eq!(first.attempt, 1);
        assert_eq!(first.exchange, "uploads");
        let back = Envelope::new(props(Some(death("q.retry.200", "expired"))), "", "q", "q");
        assert_eq!(back.attempt, 999_999);
        assert_eq!(back.exchange, "forged");
        // Another queue's tier, or a death for another reason, is not ours.
        for d in [
            death("other.retry.200", "expired"),
            death("q.retry.200", "rejected"),
            death("q.dlq", "expired"),
        ] {
            assert_eq!(Envelope::new(props(Some(d)), "", "q", "q").attempt, 1);
        }
    }

    #[test]
    fn decimals_keep_their_sign() {
        let v = AMQPValue::DecimalValue(DecimalValue {
            scale: 1,
            value: u32::from_be_bytes((-15i32).to_be_bytes()),
        });
        assert_eq!(value_text(&v), "-1.5");
    }
}
