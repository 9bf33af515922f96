//! Helpers shared by the integration tests: where the test broker and the
//! built plugins are, unique names, starting warren in-process, and a small
//! AMQP client (publish with confirms, get, consume, RPC) built on lapin.
//!
//! Every queue made through these helpers is deleted when its test ends
//! (see `cleanup`).
//!
//! The broker and plugins come from `scripts/test.sh`, which exports
//! `WARREN_TEST_BROKER_URL`, `WARREN_TEST_TLS_URL`, `WARREN_TEST_TLS_CA` and
//! `WARREN_PLUGIN_DIR`.

// A failed expectation in a test should panic with its message: that is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use warren::config::Config;

mod cleanup;
pub mod http_server;
mod names;
pub mod raw;

pub use cleanup::{track, track_config};
pub use names::{broker_url, plugin, unique};

/// A plugin `scripts/build-plugins.sh` builds only when its toolchain
/// installs: its path, or why it is missing.
pub fn built_plugin(name: &str) -> std::result::Result<std::path::PathBuf, String> {
    let path = plugin(name);
    if path.exists() {
        return Ok(path);
    }
    Err(format!(
        "{} is missing: scripts/build-plugins.sh did not build it (look for its SKIPPING line)",
        path.display()
    ))
}

/// A plugin in a language whose toolchain may fail to install. Missing, it
/// fails the test under CI (which must prove every language) and is `None`,
/// after a note, elsewhere.
pub fn language_plugin(name: &str) -> Option<std::path::PathBuf> {
    let why = match built_plugin(name) {
        Ok(path) => return Some(path),
        Err(why) => why,
    };
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{why}; under CI every language's plugins must build");
    }
    eprintln!("note: skipping (the rest of) this test: {why}");
    None
}

/// The test broker's TLS listener: its `amqps://` URL and the CA file that
/// signed its certificate (`client.pem` and `client.key` beside it form a
/// client certificate signed by the same CA). Panics when they are not set:
/// a TLS test has nothing to test without them, and must not pass quietly.
pub fn tls_broker() -> (String, PathBuf) {
    let var =
        |name: &str| {
            std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
            panic!(
                "{name} is not set: run the tests through scripts/test.sh, which starts the \
                 test broker with a TLS listener and exports it"
            )
        })
        };
    let url = var("WARREN_TEST_TLS_URL");
    let ca = PathBuf::from(var("WARREN_TEST_TLS_CA"));
    assert!(
        ca.is_file(),
        "WARREN_TEST_TLS_CA {} is not a file",
        ca.display()
    );
    (url, ca)
}

/// Build a config from `[[pipeline]]` TOML; broker and ops are filled in.
pub fn config(pipelines_toml: &str) -> Result<Config> {
    config_for(&broker_url(), "", pipelines_toml)
}

/// Same, for the broker at `url`, with `broker_toml` lines added to `[broker]`.
pub fn config_for(url: &str, broker_toml: &str, pipelines_toml: &str) -> Result<Config> {
    let text = format!(
        "[broker]\nurl = {url:?}\nreconnect_delay_ms = 100\n{broker_toml}\n[ops]\nlisten = \"\"\nshutdown_grace_ms = 5000\n{pipelines_toml}"
    );
    Config::parse(&text, std::path::Path::new("."))
}

/// TOML string literal for a path.
pub fn toml_path(p: &std::path::Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Start warren with this config and wait until it consumes. Its queues
/// are deleted when the test ends.
pub async fn start(config: Config) -> Result<warren::Running> {
    track_config(&config);
    let running = warren::start(config).await?;
    running.wait_ready(Duration::from_secs(20)).await?;
    Ok(running)
}

/// A test-side AMQP client.
pub struct Client {
    pub conn: Connection,
    pub channel: Channel,
}

impl Client {
    /// Connect with a confirm-mode channel.
    pub async fn connect() -> Result<Self> {
        Self::connect_to(&broker_url()).await
    }

    /// Connect to the broker at `url` with a confirm-mode channel.
    pub async fn connect_to(url: &str) -> Result<Self> {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .context("connecting the test client")?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { conn, channel })
    }

    /// Publish and wait for the confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            bail!("publish to {exchange:?}/{routing_key:?} not confirmed");
        }
        Ok(())
    }

    /// Publish to a queue through the default exchange.
    pub async fn send(&self, queue: &str, body: &[u8]) -> Result<()> {
        self.publish(
            "",
            queue,
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
    }

    /// Declare a durable classic queue for collecting outputs (deleted when
    /// the test ends).
    pub async fn declare_queue(&self, queue: &str) -> Result<()> {
        track(queue);
        let opts = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        self.channel
            .queue_declare(queue.into(), opts, FieldTable::default())
            .await?;
        Ok(())
    }

    /// Declare a durable classic queue as warren declares a pipeline's queue
    /// of `queue_type = "classic"`.
    pub async fn declare_classic(&self, queue: &str) -> Result<()> {
        track(queue);
        let opts = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        self.channel.queue_declare(queue.into(), opts, args).await?;
        Ok(())
    }

    /// Declare a queue and bind it to `exchange` with `key`.
    pub async fn bound_queue(&self, queue: &str, exchange: &str, key: &str) -> Result<()> {
        self.declare_queue(queue).await?;
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Messages ready in `queue` (exact: a passive declare).
    pub async fn depth(&self, queue: &str) -> Result<u32> {
        queue_depth(&self.conn, queue).await
    }

    /// Delete a queue (as an operator or a policy might, under warren).
    pub async fn delete_queue(&self, queue: &str) -> Result<()> {
        let ch = self.conn.create_channel().await?;
        ch.queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
            .await
            .with_context(|| format!("deleting queue {queue}"))?;
        let _ = ch.close(200, "deleted".into()).await;
        Ok(())
    }

    /// Empty a queue.
    pub async fn purge(&self, queue: &str) -> Result<()> {
        self.channel
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await?;
        Ok(())
    }

    /// Take exactly `n` messages from `queue`, waiting up to `timeout`.
    pub async fn take(&self, queue: &str, n: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await?
            {
                Some(m) => {
                    m.delivery.acker.ack(BasicAckOptions::default()).await?;
                    got.push(m.delivery);
                }
                None if Instant::now() >= deadline => {
                    bail!(
                        "got {} of {n} messages from {queue} within {timeout:?}",
                        got.len()
                    )
                }
                None => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
        Ok(got)
    }

    /// Take one message.
    pub async fn take_one(&self, queue: &str, timeout: Duration) -> Result<Delivery> {
        let mut v = self.take(queue, 1, timeout).await?;
        v.pop().context("no message")
    }

    /// Assert that nothing arrives in `queue` for `wait`.
    pub async fn expect_empty(&self, queue: &str, wait: Duration) -> Result<()> {
        tokio::time::sleep(wait).await;
        let d = self.depth(queue).await?;
        if d != 0 {
            bail!("{queue} holds {d} message(s), expected none");
        }
        Ok(())
    }
}

/// An RPC caller using direct reply-to (`amq.rabbitmq.reply-to`), like the
/// RabbitMQ tutorials' clients.
pub struct RpcClient {
    channel: Channel,
    consumer: lapin::Consumer,
    _conn: Connection,
}

impl RpcClient {
    /// Open a connection and start consuming direct replies.
    pub async fn connect() -> Result<Self> {
        let conn = Connection::connect(&broker_url(), ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        let consumer = channel
            .basic_consume(
                "amq.rabbitmq.reply-to".into(),
                unique("rpc").into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            channel,
            consumer,
            _conn: conn,
        })
    }

    /// Send a request without waiting for the answer.
    pub async fn request(&self, queue: &str, body: &[u8], correlation_id: &str) -> Result<()> {
        let props = BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id(correlation_id.into());
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await?;
        Ok(())
    }

    /// Next reply, within `timeout`.
    pub async fn next_reply(&mut self, timeout: Duration) -> Result<Delivery> {
        match tokio::time::timeout(timeout, self.consumer.next()).await {
            Ok(Some(d)) => Ok(d?),
            Ok(None) => bail!("reply consumer ended"),
            Err(_) => bail!("no reply within {timeout:?}"),
        }
    }

    /// Collect `n` replies keyed by correlation id; a second reply for the
    /// same id is an error (a duplicate answer).
    pub async fn replies(
        &mut self,
        n: usize,
        timeout: Duration,
    ) -> Result<std::collections::HashMap<String, Delivery>> {
        let mut got = std::collections::HashMap::with_capacity(n);
        while got.len() < n {
            let r = self.next_reply(timeout).await?;
            let id = r
                .properties
                .correlation_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            if got.insert(id.clone(), r).is_some() {
                bail!("two replies for correlation id {id:?}");
            }
        }
        Ok(got)
    }

    /// Request and wait for its reply.
    pub async fn call(&mut self, queue: &str, body: &[u8], timeout: Duration) -> Result<Delivery> {
        let id = unique("corr");
        self.request(queue, body, &id).await?;
        let reply = self.next_reply(timeout).await?;
        let got = reply
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.to_string());
        if got.as_deref() != Some(id.as_str()) {
            bail!("reply carries correlation id {got:?}, expected {id}");
        }
        Ok(reply)
    }
}

/// A header of a received message, as text.
pub fn header(d: &Delivery, name: &str) -> Option<String> {
    d.properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)
        .map(warren::envelope::value_text)
}

/// Body as UTF-8 text (lossy).
pub fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

/// A header table with one text entry.
pub fn headers(pairs: &[(&str, &str)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), AMQPValue::LongString((*v).into()));
    }
    t
}

/// Poll `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Management API base URL of the test broker.
pub fn mgmt_url() -> String {
    std::env::var("WARREN_TEST_MGMT_URL").unwrap_or_else(|_| "http://127.0.0.1:15682".into())
}

/// Messages ready in `queue` on `conn` (exact: a passive declare on a channel
/// of its own, so a missing queue closes only that one).
pub async fn queue_depth(conn: &Connection, queue: &str) -> Result<u32> {
    let ch = conn.create_channel().await?;
    let opts = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let q = ch
        .queue_declare(queue.into(), opts, FieldTable::default())
        .await
        .with_context(|| format!("queue {queue} does not exist"))?;
    let _ = ch.close(200, "ok".into()).await;
    Ok(q.message_count())
}

/// A request to the test broker's management API (guest/guest).
pub async fn mgmt(method: &str, path: &str) -> Result<(u16, String)> {
    http(method, &mgmt_url(), path, Some(("guest", "guest")))
        .await
        .context("calling the management API")
}

/// One plain HTTP/1.0 request to `base` (`http://host:port`) with optional
/// basic auth; returns status and body. HTTP/1.0, so the body is never
/// chunked. Enough for the management API and warren's ops endpoint, without
/// an HTTP client dependency (the benchmarks use it too).
pub async fn http(
    method: &str,
    base: &str,
    path: &str,
    auth: Option<(&str, &str)>,
) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LIMIT: Duration = Duration::from_secs(5);
    let host = base
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?
        .trim_end_matches('/');
    let mut stream = tokio::time::timeout(LIMIT, tokio::net::TcpStream::connect(host))
        .await
        .with_context(|| format!("connecting to {host} timed out"))?
        .with_context(|| format!("connecting to {host}"))?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: 0\r\n");
    if let Some((user, password)) = auth {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        req.push_str(&format!("Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut raw))
        .await
        .with_context(|| format!("reading the answer of {host}{path} timed out"))??;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The management API's record of the connections whose name (the client's
/// `connection_name`) starts with `prefix`.
pub async fn connections(prefix: &str) -> Result<Vec<serde_json::Value>> {
    let (status, body) = mgmt(
        "GET",
        "/api/connections?columns=name,client_properties,ssl,ssl_protocol,peer_cert_subject",
    )
    .await?;
    if status != 200 {
        bail!("listing connections: HTTP {status}: {body}");
    }
    // `http` speaks HTTP/1.0, so the body is the JSON itself, never chunked.
    let conns: serde_json::Value =
        serde_json::from_str(&body).context("parsing the connection list")?;
    Ok(conns
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| {
            c["client_properties"]["connection_name"]
                .as_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .cloned()
        .collect())
}

/// Force-close every broker connection whose name starts with `prefix`, as a
/// broker restart or a network cut would. Returns how many were closed.
pub async fn kill_connections(prefix: &str) -> Result<usize> {
    let mut closed = 0;
    for c in connections(prefix).await? {
        let name = c["name"].as_str().unwrap_or("");
        let encoded: String = name
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = mgmt("DELETE", &format!("/api/connections/{encoded}")).await?;
        if !(200..300).contains(&status) {
            bail!("closing connection {name}: HTTP {status}: {body}");
        }
        closed += 1;
    }
    Ok(closed)
}
