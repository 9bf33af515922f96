//! Write warren plugins in Rust.
//!
//! A warren plugin is a WebAssembly component that handles one RabbitMQ message
//! at a time: warren calls it once per delivery, each time in a fresh instance, and
//! turns the returned [`Outcome`] into broker actions (acknowledge, publish, reply to
//! an RPC caller, retry later or dead-letter). This crate hides the component-model
//! bindings behind a small API:
//!
//! * implement [`Handler`] and register it with [`export!`];
//! * read the delivery through [`Message`] ([`Message::body_str`], [`Message::header`], ...);
//! * answer with an [`Outcome`] ([`Outcome::ack`], [`Outcome::publish`],
//!   [`Outcome::reply`], [`Outcome::retry`], [`Outcome::dead_letter`], ...);
//! * read the pipeline's settings with [`config`], [`config_or`] and [`config_parse`];
//! * write to warren's log with the functions in [`log`];
//! * call the HTTP services the pipeline grants with [`http`].
//!
//! Plugins get WASI preview 2 clocks, random numbers and stdout/stderr (both go to
//! warren's log), but no files, environment variables or sockets; outbound HTTP
//! only to what the pipeline's `[pipeline.http]` allows.
//!
//! # A complete plugin
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "shout"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! warren-plugin-sdk = { path = "../plugin-sdk" }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```
//! use warren_plugin_sdk::{Handler, Message, Outcome, Outgoing, config_or, log};
//!
//! struct Shout;
//!
//! impl Handler for Shout {
//!     fn handle(msg: Message) -> Outcome {
//!         let Ok(text) = msg.body_str() else {
//!             return Outcome::dead_letter("body is not UTF-8");
//!         };
//!         log::debug(&format!("shouting {} bytes", text.len()));
//!         let loud = Outgoing::new(config_or("exchange", ""), "shouted", text.to_uppercase())
//!             .content_type("text/plain");
//!         Outcome::publish(vec![loud])
//!     }
//! }
//!
//! warren_plugin_sdk::export!(Shout);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`; the component is
//! `target/wasm32-wasip2/release/shout.wasm`.
//!
//! A plugin that needs nothing from WASI (no clocks, random numbers or stdout)
//! can also be built with `--target wasm32-unknown-unknown` and wrapped with
//! `wasm-tools component new`: it then imports only warren's interfaces and
//! is cheaper to instantiate per message. The SDK supplies the allocator and
//! the panic hook that target needs; see the README's "Without WASI".

use std::fmt;
use std::str::{FromStr, Utf8Error};
use std::time::Duration;

use __private::bindings;

#[cfg(all(target_family = "wasm", target_os = "unknown"))]
mod bare;
pub mod http;

pub use bindings::warren::plugin::types::{Message, Outcome, Outgoing, RetryRequest, RpcReply};

/// Implementation details used by [`export!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub mod bindings {
        wit_bindgen::generate!({
            path: "../wit",
            world: "plugin",
            pub_export_macro: true,
            export_macro_name: "__export_generated",
            default_bindings_module: "warren_plugin_sdk::__private::bindings",
            additional_derives: [Clone, PartialEq, Eq],
        });
    }
}

/// A message handler: the one thing a plugin implements.
///
/// warren calls [`Handler::handle`] once per delivery attempt, in a fresh instance,
/// so nothing survives between calls (no state in statics, no caches). A panic traps
/// the instance, which warren counts as a failed attempt: the message is retried with
/// backoff and eventually dead-lettered. Return [`Outcome::dead_letter`] for input
/// that can never succeed, so it is not retried pointlessly.
pub trait Handler {
    /// Handle one message and say what to do with it.
    fn handle(msg: Message) -> Outcome;
}

impl<H: Handler> bindings::exports::warren::plugin::handler::Guest for H {
    fn handle(msg: Message) -> Outcome {
        #[cfg(all(target_family = "wasm", target_os = "unknown"))]
        bare::init();
        <H as Handler>::handle(msg)
    }
}

/// Exports a [`Handler`] as the plugin's `warren:plugin/handler` implementation.
///
/// Use it exactly once per plugin crate, at the top level:
///
/// ```
/// use warren_plugin_sdk::{Handler, Message, Outcome, export};
///
/// struct Noop;
///
/// impl Handler for Noop {
///     fn handle(_msg: Message) -> Outcome {
///         Outcome::ack()
///     }
/// }
///
/// export!(Noop);
/// ```
#[macro_export]
macro_rules! export {
    ($handler:ty) => {
        // The generated export macro only takes an identifier, so paths and generic
        // types go through an alias.
        const _: () = {
            type __WarrenHandler = $handler;
            $crate::__private::bindings::__export_generated!(
                __WarrenHandler with_types_in $crate::__private::bindings
            );
        };
    };
}

impl Message {
    /// The payload, exactly as published.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The payload as UTF-8 text, or why it is not.
    pub fn body_str(&self) -> Result<&str, Utf8Error> {
        std::str::from_utf8(&self.body)
    }

    /// The value of header `name` (exact, case-sensitive match, as AMQP header
    /// names are), or `None` if the message does not carry it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The AMQP `content_type` property.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The AMQP `message_id` property.
    pub fn message_id(&self) -> Option<&str> {
        self.message_id.as_deref()
    }

    /// The AMQP `correlation_id` property (RPC requests carry one).
    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }

    /// The AMQP `reply_to` property: where an RPC answer goes.
    pub fn reply_to(&self) -> Option<&str> {
        self.reply_to.as_deref()
    }
}

impl Outgoing {
    /// A message for `exchange` (`""` is the default exchange, which routes to the
    /// queue named by `routing_key`) with no content type and no headers.
    ///
    /// warren publishes it only where the pipeline's `[[pipeline.output]]`
    /// entries allow (an exchange and its `routing_keys`, or a queue listed in
    /// `queues` for the default exchange); anything else dead-letters the
    /// message. Headers named `x-warren-*` are warren's and are dropped.
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        body: impl Into<Vec<u8>>,
    ) -> Self {
        Outgoing {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body: body.into(),
            content_type: None,
            headers: Vec::new(),
        }
    }

    /// Sets the AMQP `content_type` property.
    #[must_use]
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Adds a string header.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

impl RpcReply {
    /// A reply with this body, no content type, no headers and nothing else to publish.
    ///
    /// Turn it into an [`Outcome`] with `.into()` (or [`Outcome::from`]).
    ///
    /// ```
    /// # use warren_plugin_sdk::{Outcome, Outgoing, RpcReply};
    /// let outcome: Outcome = RpcReply::new(r#"{"ok":true}"#)
    ///     .content_type("application/json")
    ///     .header("x-served-by", "example")
    ///     .publish(Outgoing::new("audit", "rpc.answered", "ok"))
    ///     .into();
    /// ```
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        RpcReply {
            body: body.into(),
            content_type: None,
            headers: Vec::new(),
            publish: Vec::new(),
        }
    }

    /// Sets the reply's AMQP `content_type` property.
    #[must_use]
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Adds a string header to the reply.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Adds a message to publish along with the reply.
    #[must_use]
    pub fn publish(mut self, message: Outgoing) -> Self {
        self.publish.push(message);
        self
    }
}

impl From<RpcReply> for Outcome {
    fn from(reply: RpcReply) -> Self {
        Outcome::Reply(reply)
    }
}

impl Outcome {
    /// Done; nothing to publish.
    pub fn ack() -> Self {
        Outcome::Ack
    }

    /// Done; publish these messages (warren acknowledges the delivery only once the
    /// broker has confirmed all of them). Accepts a `Vec` or an array.
    pub fn publish(messages: impl Into<Vec<Outgoing>>) -> Self {
        Outcome::Publish(messages.into())
    }

    /// Done; answer the RPC caller with this body. See [`RpcReply`] for content
    /// type, headers and extra publishes. Replying to a message without `reply_to`
    /// makes warren dead-letter it.
    pub fn reply(body: impl Into<Vec<u8>>) -> Self {
        Outcome::Reply(RpcReply::new(body))
    }

    /// A transient failure: handle the message again later, after the pipeline's
    /// backoff delay. Once the pipeline's attempts run out it is dead-lettered.
    pub fn retry(reason: impl Into<String>) -> Self {
        Outcome::Retry(RetryRequest {
            reason: reason.into(),
            delay_ms: None,
        })
    }

    /// Like [`Outcome::retry`], asking for a delay of about `delay` (warren rounds
    /// it up to its nearest retry tier; delays beyond `u32::MAX` ms saturate).
    pub fn retry_after(reason: impl Into<String>, delay: Duration) -> Self {
        Outcome::Retry(RetryRequest {
            reason: reason.into(),
            delay_ms: Some(u32::try_from(delay.as_millis()).unwrap_or(u32::MAX)),
        })
    }

    /// A poison message: park it in the pipeline's dead-letter queue with this reason.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Outcome::DeadLetter(reason.into())
    }
}

/// Writing to warren's log, which tags each line with the pipeline, plugin version
/// and message.
pub mod log {
    pub use crate::bindings::warren::plugin::host::Level;

    /// Writes `message` at `level`.
    pub fn log(level: Level, message: &str) {
        crate::bindings::warren::plugin::host::log(level, message);
    }

    /// Writes `message` at trace level.
    pub fn trace(message: &str) {
        log(Level::Trace, message);
    }

    /// Writes `message` at debug level.
    pub fn debug(message: &str) {
        log(Level::Debug, message);
    }

    /// Writes `message` at info level.
    pub fn info(message: &str) {
        log(Level::Info, message);
    }

    /// Writes `message` at warn level.
    pub fn warn(message: &str) {
        log(Level::Warn, message);
    }

    /// Writes `message` at error level.
    pub fn error(message: &str) {
        log(Level::Error, message);
    }
}

/// The value of `key` in the pipeline's `[pipelines.config]` table, or `None` if unset.
pub fn config(key: &str) -> Option<String> {
    bindings::warren::plugin::host::config(key)
}

/// Report that the service this plugin calls is down: warren pauses the
/// pipeline for `pause` (its circuit breaker opens at once, then probes as
/// usual), if the pipeline has a `[pipeline.circuit_breaker]`. The message's
/// own outcome is still what `handle` returns: usually [`Outcome::retry`].
/// Needs warren with contract 0.1.1 or later.
pub fn report_outage(pause: Duration, reason: &str) {
    let ms = u32::try_from(pause.as_millis()).unwrap_or(u32::MAX);
    bindings::warren::plugin::host::report_outage(ms, reason);
}

/// The value of `key`, or `default` if unset.
pub fn config_or(key: &str, default: &str) -> String {
    config(key).unwrap_or_else(|| default.to_owned())
}

/// The value of `key` parsed as a `T`: `Ok(None)` if unset, an error naming the key
/// if it does not parse. Surrounding whitespace is ignored.
///
/// ```no_run
/// # use warren_plugin_sdk::{config_parse, Outcome};
/// # fn f() -> Outcome {
/// let limit = match config_parse::<u32>("limit") {
///     Ok(limit) => limit.unwrap_or(10),
///     Err(e) => return Outcome::dead_letter(e.to_string()),
/// };
/// # Outcome::ack() }
/// ```
pub fn config_parse<T>(key: &str) -> Result<Option<T>, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    config(key).map(|value| parse_value(key, value)).transpose()
}

/// The value of `key` parsed as a `T`, or `default` if unset; an error naming the
/// key if it does not parse.
pub fn config_parse_or<T>(key: &str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    Ok(config_parse(key)?.unwrap_or(default))
}

fn parse_value<T>(key: &str, value: String) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    value.trim().parse().map_err(|e: T::Err| ConfigError {
        key: key.to_owned(),
        reason: e.to_string(),
        value,
    })
}

/// A config value that does not parse as the requested type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config key.
    pub key: String,
    /// Its value, as set.
    pub value: String,
    /// The parser's complaint.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "config {}: invalid value {:?}: {}",
            self.key, self.value, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &[u8]) -> Message {
        Message {
            body: body.to_vec(),
            content_type: None,
            exchange: String::new(),
            routing_key: "rk".into(),
            queue: "q".into(),
            headers: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            message_id: Some("m".into()),
            correlation_id: None,
            reply_to: None,
            attempt: 1,
        }
    }

    #[test]
    fn message_accessors() {
        let m = message(b"hi");
        assert_eq!(m.body_str(), Ok("hi"));
        assert!(message(&[0xff]).body_str().is_err());
        assert_eq!(m.header("a"), Some("1"));
        assert_eq!(m.header("A"), None);
        assert_eq!(m.message_id(), Some("m"));
        assert_eq!(m.reply_to(), None);
    }

    #[test]
    fn builders() {
        let o = Outgoing::new("x", "k", "b")
            .content_type("text/plain")
            .header("h", "v");
        assert_eq!(o.content_type.as_deref(), Some("text/plain"));
        assert_eq!(o.headers, vec![("h".to_owned(), "v".to_owned())]);
        let Outcome::Reply(r) = RpcReply::new("r").publish(o.clone()).into() else {
            panic!("not a reply");
        };
        assert_eq!(r.publish, vec![o]);
        assert_eq!(
            Outcome::retry_after("x", Duration::from_secs(u64::MAX)),
            Outcome::Retry(RetryRequest {
                reason: "x".into(),
                delay_ms: Some(u32::MAX)
            })
        );
    }

    #[test]
    fn parse_errors_name_the_key() {
        assert_eq!(parse_value::<u32>("n", " 7 ".into()), Ok(7));
        let e = parse_value::<u32>("n", "x".into()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config n: invalid value \"x\": invalid digit found in string"
        );
    }
}
