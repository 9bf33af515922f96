//! The `warren.toml` configuration: serde structs, defaults and validation.
//!
//! Unknown fields are rejected everywhere so a typo is an error, not a silently
//! ignored setting. Relative paths (plugins, the cache directory, TLS files) are
//! resolved against the directory of the config file. `WARREN_BROKER_URL`
//! overrides `broker.url`; validation runs after the override, so the TLS
//! settings are checked against the URL actually used.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use lapin::uri::{AMQPScheme, AMQPUri};
use serde::Deserialize;

use crate::logtext::redact;
use crate::pem::{read_certificates, read_private_key};
pub use crate::retry::RetryConfig;
use crate::retry::{RetryTiers, tier_queue};
use crate::secret::Setting;

/// Environment variable that overrides `broker.url` (keeps credentials out of the file).
pub const BROKER_URL_ENV: &str = "WARREN_BROKER_URL";

/// Most worker threads one pipeline may run (`concurrency`). Each is an OS
/// thread with a 2 MiB stack and a pooled instance slot that reserves 4 GiB of
/// address space per linear memory, and a plugin call is CPU-bound (plugins
/// have no I/O to wait on), so parallelism far beyond the cores only costs
/// memory. Tens of thousands of threads exhaust the kernel's memory-map limit
/// and abort the process.
pub const MAX_CONCURRENCY: usize = 1024;

/// Most worker threads all pipelines together may run: the engine's instance
/// pool is sized for this sum, and 4096 slots with their memories, tables and
/// stacks already reserve about a quarter of a 64-bit process's address space.
pub const MAX_TOTAL_CONCURRENCY: usize = 4096;

/// Longest `limits.timeout_ms`: 24 hours. The deadline is counted in epoch
/// ticks added to the engine's epoch counter, so it must stay far from
/// overflowing; a handler that needs longer than a day is holding its message
/// past any broker's consumer timeout anyway.
pub const MAX_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;

/// Longest retry delay: 2^32 - 1 ms (about 49.7 days). The retry tiers use it
/// as a queue's `x-message-ttl` and a message's `expiration`; RabbitMQ has
/// refused larger values for both (3.10 accepts up to ten years), so this is
/// what every broker version takes.
pub const MAX_RETRY_DELAY_MS: u64 = u32::MAX as u64;

/// Largest `limits.memory_mib`: 4 GiB, all a 32-bit linear memory can address.
pub const MAX_MEMORY_MIB: u64 = 4096;

/// Longest `broker.reconnect_delay_ms`: the reconnect backoff doubles up to
/// 30 s, so a first delay beyond that would only make the first reconnect the
/// slowest.
pub const MAX_RECONNECT_DELAY_MS: u64 = 30_000;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Broker connection settings.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Operations endpoint (metrics, health).
    #[serde(default)]
    pub ops: OpsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Plugin compilation cache and reloading.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// One entry per queue warren consumes from.
    #[serde(default, rename = "pipeline")]
    pub pipelines: Vec<PipelineConfig>,
}

/// `[broker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// AMQP URL, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`; `amqps://` connects
    /// with TLS (RabbitMQ's TLS port is usually 5671).
    #[serde(default = "default_broker_url")]
    pub url: String,
    /// The nodes of a RabbitMQ cluster, instead of `url`: every connection
    /// starts at a random one (so replicas spread over the cluster) and moves
    /// on to the next after a failure. All `amqp://` or all `amqps://`.
    #[serde(default)]
    pub urls: Vec<String>,
    /// First delay before reconnecting after the broker goes away; doubles up to 30 s.
    #[serde(default = "default_reconnect_ms")]
    pub reconnect_delay_ms: u64,
    /// `amqps://` only: PEM file with the CA certificate(s) that signed the broker's
    /// certificate, trusted in addition to the system's roots. Needed for a private
    /// CA; a broker with a publicly trusted certificate needs nothing.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `amqps://` only: PEM file with warren's client certificate (and any
    /// intermediates), for brokers that require mutual TLS. Needs `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// `amqps://` only: PEM file with the unencrypted private key of
    /// `client_cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Whether `url` came from `WARREN_BROKER_URL` rather than the file, so that
    /// errors about it name the place the operator has to fix.
    #[serde(skip)]
    url_from_env: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: default_broker_url(),
            urls: Vec::new(),
            reconnect_delay_ms: default_reconnect_ms(),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            url_from_env: false,
        }
    }
}

impl BrokerConfig {
    /// Whether the broker URLs ask for TLS (`amqps://`; validation makes
    /// sure they all agree).
    pub fn uses_tls(&self) -> bool {
        self.endpoints()
            .first()
            .and_then(|u| u.parse::<AMQPUri>().ok())
            .is_some_and(|u| u.scheme == AMQPScheme::AMQPS)
    }

    /// The broker nodes to connect to: `urls`, or `url` alone.
    pub fn endpoints(&self) -> Vec<&str> {
        if self.urls.is_empty() {
            vec![self.url.as_str()]
        } else {
            self.urls.iter().map(String::as_str).collect()
        }
    }

    /// The nodes, without passwords, for logs.
    pub fn redacted(&self) -> String {
        self.endpoints()
            .iter()
            .map(|u| redact(u))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Any TLS file configured?
    fn has_tls_files(&self) -> bool {
        self.ca_file.is_some() || self.client_cert_file.is_some() || self.client_key_file.is_some()
    }

    /// Use the URL(s) from the environment (`WARREN_BROKER_URL`, several
    /// separated by commas) instead of the file's.
    pub fn override_url(&mut self, url: String) {
        let mut urls: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        if urls.len() > 1 {
            self.url = default_broker_url();
            self.urls = urls;
        } else {
            self.url = urls.pop().unwrap_or(url);
            self.urls.clear();
        }
        self.url_from_env = true;
    }

    /// Where the URL was set, as the operator would look for it.
    fn url_origin(&self) -> &'static str {
        match (self.url_from_env, self.urls.is_empty()) {
            (true, _) => BROKER_URL_ENV,
            (false, true) => "broker.url",
            (false, false) => "broker.urls",
        }
    }

    /// The URLs parse and agree on TLS, and the TLS files fit them and hold
    /// what they should.
    fn validate(&self) -> Result<()> {
        let origin = self.url_origin();
        if !self.urls.is_empty() && !self.url_from_env && self.url != default_broker_url() {
            bail!("set broker.url (one node) or broker.urls (a cluster), not both");
        }
        let mut schemes = Vec::new();
        for (i, url) in self.endpoints().into_iter().enumerate() {
            let which = if self.urls.is_empty() {
                origin.to_string()
            } else {
                format!("{origin} (entry {})", i.saturating_add(1))
            };
            let uri: AMQPUri = url.parse().map_err(|e: String| {
                // Neither the URL nor the parser's message (which quotes it) can be
                // shown: a URL too broken to parse may not be redacted properly.
                let e = e.replace(url, "...");
                anyhow!(
                    "{which} is not an AMQP URL ({e}); expected amqp://user:password@host:port/vhost \
                     or amqps://..."
                )
            })?;
            // Never logged by warren (see `redacted`); kept out of what a
            // library might log too (unless it is the user name, which is
            // not secret and shown).
            let user = &uri.authority.userinfo;
            if user.password != user.username {
                crate::logging::hide(&user.password);
            }
            schemes.push(uri.scheme);
        }
        if schemes.windows(2).any(|w| w[0] != w[1]) {
            bail!(
                "{origin} mixes amqp:// and amqps:// nodes: a cluster is reached the same way on \
                 every node, or credentials would travel in clear text to some"
            );
        }
        let Some(scheme) = schemes.first() else {
            bail!("{origin} is empty: give at least one broker URL");
        };
        let redacted = self.redacted();
        if self.reconnect_delay_ms > MAX_RECONNECT_DELAY_MS {
            bail!(
                "broker.reconnect_delay_ms must be at most {MAX_RECONNECT_DELAY_MS} (30 s, where the \
                 backoff stops doubling)"
            );
        }
        if *scheme != AMQPScheme::AMQPS {
            // A TLS setting on a plain URL would mean credentials and messages in
            // clear text where the operator meant to encrypt: refuse it.
            if self.has_tls_files() {
                bail!(
                    "broker.ca_file / client_cert_file / client_key_file are set, but {origin} {} \
                     is not amqps://: use amqps:// (usually port 5671) to connect with TLS, or remove \
                     the TLS settings",
                    redacted
                );
            }
            return Ok(());
        }
        if let Some(ca) = &self.ca_file {
            read_certificates(ca).context("broker.ca_file")?;
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                read_certificates(cert).context("broker.client_cert_file")?;
                read_private_key(key).context("broker.client_key_file")?;
            }
            (Some(_), None) => {
                bail!("broker.client_cert_file is set without broker.client_key_file")
            }
            (None, Some(_)) => {
                bail!("broker.client_key_file is set without broker.client_cert_file")
            }
        }
        Ok(())
    }
}

/// `[ops]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    /// Address of the HTTP endpoint serving `/metrics`, `/healthz`, `/healthz/ready`.
    /// Empty string disables it.
    #[serde(default = "default_ops_listen")]
    pub listen: String,
    /// How long shutdown waits for in-flight messages before closing anyway.
    #[serde(default = "default_drain_ms")]
    pub shutdown_grace_ms: u64,
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self {
            listen: default_ops_listen(),
            shutdown_grace_ms: default_drain_ms(),
        }
    }
}

impl OpsConfig {
    /// The parsed listen address, `None` when disabled.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        let addr = self.listen.parse().with_context(|| {
            format!(
                "ops.listen {:?} is not an address like 0.0.0.0:9090",
                self.listen
            )
        })?;
        Ok(Some(addr))
    }
}

/// `[runtime]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Directory of the compiled-plugin cache. Default: `$WARREN_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/warren/compiled`, else `~/.cache/warren/compiled`.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Set to false to compile every plugin at every start.
    #[serde(default = "default_true")]
    pub cache: bool,
    /// Quiet period after a plugin file changes before it is loaded.
    #[serde(default = "default_debounce_ms")]
    pub reload_debounce_ms: u64,
    /// Size cap of the cache directory in MiB; least recently used entries are
    /// evicted beyond it. 0 = no cap.
    #[serde(default = "default_cache_max_mb")]
    pub cache_max_mb: u64,
}

fn default_cache_max_mb() -> u64 {
    crate::plugins::DEFAULT_CACHE_MAX_MB
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            cache: true,
            reload_debounce_ms: default_debounce_ms(),
            cache_max_mb: default_cache_max_mb(),
        }
    }
}

impl RuntimeConfig {
    /// The cache directory to use, `None` when caching is off.
    pub fn effective_cache_dir(&self) -> Option<PathBuf> {
        if !self.cache {
            return None;
        }
        if let Some(d) = &self.cache_dir {
            return Some(d.clone());
        }
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        env("WARREN_CACHE_DIR")
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("warren/compiled")))
            .or_else(|| env("HOME").map(|d| d.join(".cache/warren/compiled")))
    }
}

/// `[log]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[[pipeline]]`: one queue, one plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Unique name; used in logs, metrics and the `x-warren-pipeline` header.
    pub name: String,
    /// Queue to consume from; declared durable.
    pub queue: String,
    /// `quorum` (default) or `classic`.
    #[serde(default)]
    pub queue_type: QueueType,
    /// Quorum queues only: how many cluster nodes hold a replica of each of the
    /// pipeline's queues (`x-quorum-initial-group-size`); unset, the broker's
    /// default (every node, up to its configured limit).
    #[serde(default)]
    pub quorum_initial_group_size: Option<u32>,
    /// Declare the queue with `x-single-active-consumer`: of all the
    /// consumers on it (one per replica) the broker delivers to one at a time
    /// and hands over to the next when it goes, so messages are handled in
    /// queue order across replicas (with `concurrency = 1`).
    #[serde(default)]
    pub single_active_consumer: bool,
    /// Exchanges to bind the queue to.
    #[serde(default, rename = "binding")]
    pub bindings: Vec<BindingConfig>,
    /// Path of the plugin component (`.wasm`); relative to the config file.
    pub plugin: PathBuf,
    /// AMQP prefetch (unacked deliveries the broker hands out at once).
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// How many messages are handled in parallel.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// `fresh` (the default): a new plugin instance for every message.
    /// `reuse`: an instance handles up to `max_messages_per_instance`
    /// messages in turn, keeping its memory (and so any state) between
    /// them; it is replaced after any failed call (see README "Instance
    /// reuse").
    #[serde(default)]
    pub instance: InstanceMode,
    /// Under `instance = "reuse"`: messages one instance handles before a
    /// fresh one replaces it. Default 1000.
    #[serde(default)]
    pub max_messages_per_instance: Option<u32>,
    /// Bytes of deliveries the pipeline may hold at once, in MB (MiB): the
    /// prefetch is lowered to what fits the largest body seen. 0: no budget.
    #[serde(default = "default_max_in_flight_mb")]
    pub max_in_flight_mb: u64,
    /// Quorum queues only: deliveries (including requeues after a crash) before
    /// the broker itself dead-letters a message to `<queue>.dlq`. 0 disables.
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
    /// Times the broker session may die while a message is in flight (its
    /// call running or its effects unconfirmed) before the message is parked
    /// in `<queue>.dlq` as a suspected poison message. 0 disables.
    #[serde(default = "default_session_death_limit")]
    pub session_death_limit: u32,
    /// Where the plugin may publish (the allow-list, see `allow`): exchanges,
    /// declared durable at start so a publish never hits a missing exchange,
    /// and queues reachable through the default exchange.
    #[serde(default, rename = "output")]
    pub outputs: Vec<OutputConfig>,
    /// Patterns (`*` matches any run of characters) a message's `reply_to`
    /// must match for warren to reply to it. Unset: any queue warren does not
    /// manage.
    #[serde(default)]
    pub reply_to_allow: Option<Vec<String>>,
    /// Retry policy.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Resource limits for one invocation.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Watch the plugin file and swap in new versions as they appear.
    #[serde(default = "default_true")]
    pub reload: bool,
    /// Free-form settings the plugin reads with `host.config(key)`; a value
    /// may come from the environment (`{ env = "NAME" }`, see `secret`).
    #[serde(default)]
    pub config: BTreeMap<String, Setting>,
    /// Plugin calls per second, minute or hour (`"50/s"`); see `downstream`.
    #[serde(default)]
    pub rate_limit: Option<String>,
    /// Whether `rate_limit` is this process's or shared by the queue's consumers.
    #[serde(default)]
    pub rate_limit_scope: crate::downstream::RateScope,
    /// Pause consuming while the plugin's downstream service fails.
    #[serde(default)]
    pub circuit_breaker: Option<crate::downstream::BreakerConfig>,
    /// Outbound HTTP granted to the plugin; none without this table.
    #[serde(default)]
    pub http: Option<crate::outbound::HttpConfig>,
}

impl PipelineConfig {
    /// Name of the dead-letter queue.
    pub fn dlq_name(&self) -> String {
        format!("{}.dlq", self.queue)
    }

    /// Messages one instance may handle: 1 under `instance = "fresh"`.
    pub fn messages_per_instance(&self) -> u32 {
        match self.instance {
            InstanceMode::Fresh => 1,
            InstanceMode::Reuse => self
                .max_messages_per_instance
                .unwrap_or(DEFAULT_MAX_MESSAGES_PER_INSTANCE),
        }
    }
}

/// How long a pipeline's plugin instances live (`instance`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InstanceMode {
    /// A new instance per message: nothing a message leaves behind in the
    /// plugin's memory is seen by the next.
    #[default]
    Fresh,
    /// One instance handles several messages in turn, up to
    /// `max_messages_per_instance`; replaced after any failed call.
    Reuse,
}

/// `max_messages_per_instance` when not set.
pub const DEFAULT_MAX_MESSAGES_PER_INSTANCE: u32 = 1000;
/// Upper bound of `max_messages_per_instance`: an instance whose memory is
/// never reset for longer than that is a leak waiting to be found.
pub const MAX_MESSAGES_PER_INSTANCE: u32 = 1_000_000;

/// Queue type of the pipeline's queues.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, durable; the RabbitMQ default for new work.
    #[default]
    Quorum,
    /// Durable classic queue.
    Classic,
}

/// `[[pipeline.binding]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig {
    /// Exchange name; declared durable with the given type.
    pub exchange: String,
    /// `direct` (default), `fanout` or `topic`.
    #[serde(default, rename = "type")]
    pub kind: ExchangeKind,
    /// Routing keys (binding keys for topic). Empty means `[""]`.
    #[serde(default)]
    pub routing_keys: Vec<String>,
}

/// `[[pipeline.output]]`: an exchange the plugin may publish to, or queues it
/// may reach through the default exchange.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Exchange name (`amq.*` exchanges exist already and are not declared).
    /// Empty (or left out) for an entry of `queues`.
    #[serde(default)]
    pub exchange: String,
    /// `direct` (default), `fanout` or `topic`.
    #[serde(default, rename = "type")]
    pub kind: ExchangeKind,
    /// Routing keys the plugin may use on this exchange (AMQP topic syntax:
    /// `*` one word, `#` zero or more). Empty: any.
    #[serde(default)]
    pub routing_keys: Vec<String>,
    /// Queues the plugin may publish to through the default exchange (the
    /// routing key is the queue's name); only in an entry without `exchange`.
    #[serde(default)]
    pub queues: Vec<String>,
}

/// Exchange type.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Exact routing-key match.
    #[default]
    Direct,
    /// Every bound queue.
    Fanout,
    /// Pattern match with `*` and `#`.
    Topic,
}

/// `[pipeline.limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Wall-clock budget of one `handle` call.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Maximum linear memory of the plugin instance, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Most outputs (publishes, a reply counts as one) per message; more is a
    /// dead-letter of that message.
    #[serde(default = "default_max_outputs")]
    pub max_outputs: u32,
    /// Most bytes of output bodies per message, in MiB; more is a dead-letter.
    #[serde(default = "default_max_output_mib")]
    pub max_output_mib: u64,
    /// Most `host.log` lines per message; more are dropped and counted.
    #[serde(default = "default_max_log_lines")]
    pub max_log_lines: u32,
    /// Most bytes of `host.log` text per message, in KiB; more is dropped.
    #[serde(default = "default_max_log_kib")]
    pub max_log_kib: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            timeout_ms: default_timeout_ms(),
            memory_mib: default_memory_mib(),
            max_outputs: default_max_outputs(),
            max_output_mib: default_max_output_mib(),
            max_log_lines: default_max_log_lines(),
            max_log_kib: default_max_log_kib(),
        }
    }
}

fn default_max_outputs() -> u32 {
    1000
}
fn default_max_output_mib() -> u64 {
    64
}
fn default_max_log_lines() -> u32 {
    100
}
fn default_max_log_kib() -> u64 {
    64
}

impl LimitsConfig {
    /// Timeout as a `Duration`.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
    /// Memory limit in bytes.
    pub fn memory_bytes(&self) -> usize {
        usize::try_from(self.memory_mib.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
    }
    /// Output body budget per message, in bytes.
    pub fn max_output_bytes(&self) -> usize {
        usize::try_from(self.max_output_mib.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
    }
    /// `host.log` budget per message, in bytes.
    pub fn max_log_bytes(&self) -> usize {
        usize::try_from(self.max_log_kib.saturating_mul(1024)).unwrap_or(usize::MAX)
    }
}

fn default_true() -> bool {
    true
}
fn default_debounce_ms() -> u64 {
    20
}
fn default_broker_url() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2f".into()
}
fn default_reconnect_ms() -> u64 {
    500
}
fn default_ops_listen() -> String {
    "127.0.0.1:9090".into()
}
fn default_drain_ms() -> u64 {
    10_000
}
fn default_prefetch() -> u16 {
    32
}
fn default_concurrency() -> usize {
    4
}
fn default_delivery_limit() -> u32 {
    20
}
fn default_session_death_limit() -> u32 {
    3
}
fn default_max_in_flight_mb() -> u64 {
    256
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_memory_mib() -> u64 {
    64
}

impl Config {
    /// Read, parse, apply env overrides, resolve paths and validate.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let in_file = || format!("in config file {}", path.display());
        let mut config = Self::parse_unvalidated(&text, base).with_context(in_file)?;
        if let Ok(url) = std::env::var(BROKER_URL_ENV)
            && !url.is_empty()
        {
            config.broker.override_url(url);
        }
        config.validate().with_context(in_file)?;
        Ok(config)
    }

    /// Parse TOML text and validate; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let config = Self::parse_unvalidated(text, base)?;
        config.validate()?;
        Ok(config)
    }

    fn parse_unvalidated(text: &str, base: &Path) -> Result<Self> {
        let mut config: Config = toml::from_str(text).context("invalid TOML configuration")?;
        let resolve = |p: &mut PathBuf| {
            // An empty path stays empty so validation can say so: joined to the
            // base it would name the config directory.
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        for p in &mut config.pipelines {
            resolve(&mut p.plugin);
            if let Some(ca) = p.http.as_mut().and_then(|h| h.ca_file.as_mut()) {
                resolve(ca);
            }
            // Secrets are read here so that `warren check` and `warren run`
            // both stop on a missing variable, before anything starts.
            for (key, setting) in &mut p.config {
                setting
                    .resolve()
                    .with_context(|| format!("pipeline {:?}: config.{key}", p.name))?;
            }
        }
        let b = &mut config.broker;
        [
            &mut config.runtime.cache_dir,
            &mut b.ca_file,
            &mut b.client_cert_file,
            &mut b.client_key_file,
        ]
        .into_iter()
        .flatten()
        .for_each(resolve);
        Ok(config)
    }

    /// Checks serde cannot express: everything `warren run` would otherwise
    /// only find out on the broker, in the middle of a delivery, or by
    /// crashing. Each error names the field to change.
    /// What is valid but likely wrong: said by `warren check` and logged by
    /// `warren run` at start.
    ///
    /// RabbitMQ closes a consumer's channel when a delivery stays unacked
    /// longer than its `consumer_timeout` (30 minutes unless configured), and
    /// redelivers it. A delivery may wait in the prefetch window for the calls
    /// ahead of it (`prefetch / concurrency` of them, each up to `timeout_ms`)
    /// and then take `timeout_ms` itself.
    pub fn warnings(&self) -> Vec<String> {
        const CONSUMER_TIMEOUT_MS: u64 = 30 * 60 * 1000;
        let mut warnings: Vec<String> = self
            .pipelines
            .iter()
            .filter_map(|p| {
                let waits = u64::from(p.prefetch)
                    .div_ceil(u64::try_from(p.concurrency.max(1)).unwrap_or(u64::MAX))
                    .saturating_add(1);
                let worst = p.limits.timeout_ms.saturating_mul(waits);
                (worst >= CONSUMER_TIMEOUT_MS).then(|| {
                    format!(
                        "pipeline {:?}: a delivery may stay unacked for up to {} s (limits.timeout_ms \
                         {} x {waits}: its own call and the {} ahead of it in the prefetch window), \
                         at or past RabbitMQ's default consumer_timeout of 1800 s; the broker would \
                         close the channel and redeliver. Lower timeout_ms or prefetch, or raise \
                         consumer_timeout on the broker",
                        p.name,
                        worst / 1000,
                        p.limits.timeout_ms,
                        waits - 1
                    )
                })
            })
            .chain(self.pipelines.iter().filter_map(|p| {
                let limit = p.rate_limit().ok()??;
                let spec = p.rate_limit.as_deref().unwrap_or_default();
                crate::downstream::ratelimit::warning(&p.name, spec, &limit)
            }))
            .collect();
        warnings.extend(
            self.pipelines
                .iter()
                .flat_map(PipelineConfig::unlisted_exchanges),
        );
        // Valid (one active consumer is also how to keep a single writer),
        // but the usual reason for it is order, which parallel calls undo.
        warnings.extend(
            self.pipelines
                .iter()
                .filter(|p| p.single_active_consumer && p.concurrency > 1)
                .map(|p| {
                    format!(
                        "pipeline {:?}: single_active_consumer keeps one replica consuming, but \
                         concurrency = {} handles its messages in parallel, so they may finish \
                         out of queue order; set concurrency = 1 for ordered handling",
                        p.name, p.concurrency
                    )
                }),
        );
        warnings
    }

    pub fn validate(&self) -> Result<()> {
        if self.pipelines.is_empty() {
            bail!("no [[pipeline]] configured: warren needs at least one");
        }
        self.broker.validate()?;
        self.ops.listen_addr()?;
        if self
            .runtime
            .cache_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            bail!(
                "runtime.cache_dir must not be empty (leave it out for the default, or set cache = false)"
            );
        }
        let mut names = HashSet::new();
        let mut total_concurrency: usize = 0;
        for p in &self.pipelines {
            if p.name.trim().is_empty() {
                bail!("a pipeline has an empty name");
            }
            if !names.insert(&p.name) {
                bail!("pipeline {:?}: the name is used twice", p.name);
            }
            p.validate()
                .with_context(|| format!("pipeline {:?}", p.name))?;
            total_concurrency = total_concurrency.saturating_add(p.concurrency);
        }
        if total_concurrency > MAX_TOTAL_CONCURRENCY {
            bail!(
                "the pipelines' concurrency adds up to {total_concurrency}; at most \
                 {MAX_TOTAL_CONCURRENCY} worker threads are allowed in total"
            );
        }
        self.check_queue_names()?;
        self.check_exchange_types()
    }

    /// No queue warren declares may be declared twice: a pipeline's queue must
    /// not be another pipeline's queue, dead-letter queue (`<queue>.dlq`) or
    /// retry tier (`<queue>.retry.<ms>`). Two pipelines would otherwise consume
    /// each other's parked or delayed messages, or fail to declare a queue that
    /// already exists with other arguments.
    fn check_queue_names(&self) -> Result<()> {
        // queue name -> (pipeline, what the queue is to that pipeline)
        let mut owners: HashMap<String, (&str, &'static str)> = HashMap::new();
        for p in &self.pipelines {
            let tiers = RetryTiers::new(&p.retry);
            let derived = [
                (p.queue.clone(), "queue"),
                (p.dlq_name(), "dead-letter queue"),
            ]
            .into_iter()
            .chain(
                tiers
                    .delays_ms()
                    .iter()
                    .map(|&ms| (tier_queue(&p.queue, ms), "retry queue")),
            );
            for (queue, role) in derived {
                if let Some((other, other_role)) = owners.get(&queue) {
                    if role == "queue" && *other_role == "queue" {
                        bail!(
                            "pipeline {:?}: queue {queue:?} is consumed by two pipelines \
                             ({other:?} too)",
                            p.name
                        );
                    }
                    bail!(
                        "pipeline {:?}: queue names clash: {queue:?} is the {role} of pipeline \
                         {:?} and the {other_role} of pipeline {other:?}; rename one of the \
                         queues",
                        p.name,
                        p.name
                    );
                }
                owners.insert(queue, (&p.name, role));
            }
        }
        Ok(())
    }

    /// An exchange has one type on the broker: two declarations with different
    /// types fail the second with PRECONDITION_FAILED at every (re)connect.
    /// Built-in `amq.*` exchanges are not declared, so their type is not checked.
    fn check_exchange_types(&self) -> Result<()> {
        let mut seen: HashMap<&str, (ExchangeKind, &str)> = HashMap::new();
        for p in &self.pipelines {
            let used = p
                .bindings
                .iter()
                .map(|b| (b.exchange.as_str(), b.kind))
                .chain(p.outputs.iter().map(|o| (o.exchange.as_str(), o.kind)));
            for (exchange, kind) in used {
                if exchange.starts_with("amq.") {
                    continue;
                }
                match seen.get(exchange) {
                    Some((k, other)) if *k != kind => {
                        let by = if *other == p.name {
                            format!("pipeline {other:?} (twice)")
                        } else {
                            format!("pipelines {other:?} and {:?}", p.name)
                        };
                        bail!(
                            "exchange {exchange:?} is declared as {} and as {} by {by}: an exchange \
                             has one type; use the same type everywhere",
                            k.label(),
                            kind.label()
                        );
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(exchange, (kind, &p.name));
                    }
                }
            }
        }
        Ok(())
    }
}

impl PipelineConfig {
    /// The checks of one pipeline on its own; errors name the field, the
    /// caller adds the pipeline's name.
    fn validate(&self) -> Result<()> {
        if self.queue.trim().is_empty() {
            bail!("queue must not be empty");
        }
        if self.queue.starts_with("amq.") {
            bail!("queue {:?} uses the reserved amq. prefix", self.queue);
        }
        if self.name.len() > 200 {
            bail!("the name is longer than 200 bytes");
        }
        if self.plugin.as_os_str().is_empty() {
            bail!("plugin must not be empty");
        }
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            bail!(
                "concurrency must be between 1 and {MAX_CONCURRENCY} (it is {})",
                self.concurrency
            );
        }
        if self.prefetch == 0 {
            bail!("prefetch must be at least 1 (0 would mean unlimited)");
        }
        match (self.instance, self.max_messages_per_instance) {
            (InstanceMode::Fresh, Some(_)) => bail!(
                "max_messages_per_instance applies only with instance = \"reuse\" \
                 (with \"fresh\", every instance handles one message)"
            ),
            (InstanceMode::Reuse, Some(n)) if n == 0 || n > MAX_MESSAGES_PER_INSTANCE => bail!(
                "max_messages_per_instance must be between 1 and {MAX_MESSAGES_PER_INSTANCE} (it is {n})"
            ),
            _ => {}
        }
        match (self.quorum_initial_group_size, self.queue_type) {
            (Some(0), _) => bail!("quorum_initial_group_size must be at least 1"),
            (Some(_), QueueType::Classic) => bail!(
                "quorum_initial_group_size is for quorum queues; this pipeline's queue_type is classic"
            ),
            _ => {}
        }
        self.retry.validate()?;
        self.limits.validate()?;
        self.validate_downstream()?;
        if let Some(http) = &self.http {
            http.validate()?;
        }
        // Derived names (`<queue>.retry.<ms>`, consumer tags) must fit AMQP's
        // 255-byte short strings too. The delays are bounded by now, so this
        // cannot overflow.
        let suffix = ".retry.".len() + self.retry.max_delay_ms.to_string().len();
        if self.queue.len().saturating_add(suffix) > 255 {
            bail!(
                "queue name is {} bytes; at most {} fit with its retry queue names",
                self.queue.len(),
                255 - suffix
            );
        }
        for b in &self.bindings {
            if b.exchange.is_empty() {
                bail!(
                    "binding exchange must not be empty (the default exchange \"\" routes by queue \
                     name and needs no binding)"
                );
            }
            short_string("binding exchange", &b.exchange)?;
            for key in &b.routing_keys {
                short_string("binding routing key", key)?;
            }
        }
        for o in &self.outputs {
            o.validate()?;
        }
        for pattern in self.reply_to_allow.iter().flatten() {
            if pattern.is_empty() {
                bail!("reply_to_allow has an empty pattern");
            }
            short_string("reply_to_allow pattern", pattern)?;
        }
        Ok(())
    }

    /// `[pipeline.config]` values that name an exchange (a key `exchange`, or
    /// one ending in `_exchange`) the pipeline does not list as an output: a
    /// plugin configured that way would have every publish denied. Keys are
    /// the only generic clue to what a plugin does with a value, so other
    /// names go unchecked; secrets are never looked at (nor shown).
    fn unlisted_exchanges(&self) -> Vec<String> {
        self.config
            .iter()
            .filter(|(k, _)| *k == "exchange" || k.ends_with("_exchange"))
            .filter_map(|(k, v)| Some((k, v.text()?)))
            .filter(|(_, x)| !x.is_empty() && !self.outputs.iter().any(|o| o.exchange == *x))
            .map(|(k, x)| {
                format!(
                    "pipeline {:?}: config.{k} names exchange {x:?}, which is not listed in its \
                     [[pipeline.output]]; the plugin's publishes to it will be denied",
                    self.name
                )
            })
            .collect()
    }
}

impl OutputConfig {
    fn validate(&self) -> Result<()> {
        if self.exchange.is_empty() {
            if self.queues.is_empty() {
                bail!(
                    "an output needs an exchange, or queues = [...] for the default exchange \
                     (which routes by queue name and is not declared)"
                );
            }
            if !self.routing_keys.is_empty() || self.kind != ExchangeKind::Direct {
                bail!(
                    "an output of queues = [...] (the default exchange) takes no routing_keys or \
                     type: the routing key is the queue name"
                );
            }
        } else if !self.queues.is_empty() {
            bail!(
                "output exchange {:?} has queues = [...]: queues are reached through the default \
                 exchange, in an entry of their own without exchange",
                self.exchange
            );
        }
        short_string("output exchange", &self.exchange)?;
        for key in &self.routing_keys {
            short_string("output routing key", key)?;
        }
        for q in &self.queues {
            if q.is_empty() {
                bail!("output queues has an empty name");
            }
            short_string("output queue", q)?;
            // warren's own queues take only warren's copies: a message put there
            // by a plugin would skip its bookkeeping (or, in a tier, come back
            // to a queue after the TTL as if it were a retry).
            if let Some(what) = crate::retry::reserved_shape(q) {
                bail!(
                    "output queue {q:?} has the name of {what}, which warren manages; a plugin \
                     may not publish there"
                );
            }
        }
        Ok(())
    }
}

impl PipelineConfig {
    /// The parsed `rate_limit`, if any (`validate` has refused a bad one).
    pub fn rate_limit(&self) -> Result<Option<crate::downstream::RateLimit>> {
        self.rate_limit
            .as_deref()
            .map(crate::downstream::RateLimit::parse)
            .transpose()
    }

    fn validate_downstream(&self) -> Result<()> {
        let limit = self.rate_limit()?;
        if limit.is_none() && self.rate_limit_scope == crate::downstream::RateScope::Cluster {
            bail!("rate_limit_scope = \"cluster\" needs a rate_limit");
        }
        // The cluster scope divides the rate by the queue's consumer count,
        // which counts the waiting consumers of a single-active-consumer
        // queue too, while only one of them receives anything.
        if self.single_active_consumer
            && self.rate_limit_scope == crate::downstream::RateScope::Cluster
        {
            bail!(
                "rate_limit_scope = \"cluster\" divides the rate among the queue's consumers, but \
                 with single_active_consumer only one of them receives messages: leave \
                 rate_limit_scope at \"local\", the whole rate is the active consumer's"
            );
        }
        if let Some(b) = &self.circuit_breaker {
            b.validate()?;
        }
        Ok(())
    }
}

/// AMQP names and routing keys are short strings: at most 255 bytes.
fn short_string(what: &str, s: &str) -> Result<()> {
    if s.len() > 255 {
        bail!("{what} {s:?} is {} bytes; AMQP allows at most 255", s.len());
    }
    Ok(())
}

impl RetryConfig {
    fn validate(&self) -> Result<()> {
        if self.max_attempts == 0 {
            bail!("retry.max_attempts must be at least 1");
        }
        if self.initial_delay_ms == 0 || self.initial_delay_ms > MAX_RETRY_DELAY_MS {
            bail!(
                "retry.initial_delay_ms must be between 1 and {MAX_RETRY_DELAY_MS} \
                 (2^32-1 ms, the longest message TTL every RabbitMQ version accepts)"
            );
        }
        if self.max_delay_ms > MAX_RETRY_DELAY_MS {
            bail!(
                "retry.max_delay_ms must be at most {MAX_RETRY_DELAY_MS} (2^32-1 ms, about 49.7 \
                 days: the longest message TTL every RabbitMQ version accepts)"
            );
        }
        if self.max_delay_ms < self.initial_delay_ms {
            bail!("retry.max_delay_ms must be at least retry.initial_delay_ms");
        }
        if !(0.0..=0.5).contains(&self.jitter) {
            bail!("retry.jitter must be between 0 and 0.5");
        }
        Ok(())
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<()> {
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            bail!("limits.timeout_ms must be between 1 and {MAX_TIMEOUT_MS} (24 hours)");
        }
        if self.memory_mib == 0 || self.memory_mib > MAX_MEMORY_MIB {
            bail!("limits.memory_mib must be between 1 and {MAX_MEMORY_MIB}");
        }
        Ok(())
    }
}

impl ExchangeKind {
    /// The type as written in the configuration.
    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::{Path, PathBuf};

    use super::{Config, DEFAULT_MAX_MESSAGES_PER_INSTANCE, InstanceMode};

    /// A throwaway self-signed CA certificate (no key is kept anywhere).
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBkTCCATegAwIBAgIURlntGpcGb+TuRIvFgSUoKdo3TAUwCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwSd2FycmVuLWNvbmZpZy10ZXN0MCAXDTI2MTEyNzE1MDMxMloY
DzIxMjYxMTAzMTUwMzEyWjAdMRswGQYDVQQDDBJ3YXJyZW4tY29uZmlnLXRlc3Qw
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATqAGgnJ+IzD467O2J+WSJbC10usAIW
huyWV59qd5SLL8+ZTUzZX6yXdRk2yw2DpbcCWzuQbPkWi8bR1EZtbvD1o1MwUTAd
BgNVHQ4EFgQUjSd5shUglc+SDmh4PKCt6yko/8AwHwYDVR0jBBgwFoAUjSd5shUg
lc+SDmh4PKCt6yko/8AwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBF
AiB0ThB5ajiXhX91LJ4pQRcOJ61vvtvSLdQ6pIFO2VZ68AIhALSH4PNeEDoXYFmX
HaA345fM08VHGBV9qZxLPPMcJpRd
-----END CERTIFICATE-----
";

    #[test]
    fn long_calls_against_the_consumer_timeout_are_warned_about() {
        let with = |extra: &str| {
            let text =
                format!("[[pipeline]]\nname = \"p\"\nqueue = \"q\"\nplugin = \"p.wasm\"\n{extra}");
            Config::parse(&text, Path::new(".")).unwrap().warnings()
        };
        assert!(with("").is_empty());
        // 10 minutes per call, 8 waiting per worker ahead of a delivery.
        let w = with("prefetch = 32\nconcurrency = 4\n[pipeline.limits]\ntimeout_ms = 600000\n");
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("5400 s") && w[0].contains("consumer_timeout"),
            "{w:?}"
        );
    }

    /// A fresh directory for one test's files.
    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "warren-config-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn parse(broker: &str, base: &Path) -> Result<Config, String> {
        let text = format!(
            "[broker]\n{broker}\n[[pipeline]]\nname = \"p\"\nqueue = \"q\"\nplugin = \"p.wasm\"\n"
        );
        Config::parse(&text, base).map_err(|e| format!("{e:#}"))
    }

    const TLS_URL: &str = "url = \"amqps://guest:secret@localhost:5671/%2f\"";

    #[test]
    fn tls_files_resolve_against_the_config_directory() {
        let d = dir("resolve");
        std::fs::write(d.join("ca.pem"), CA_PEM).unwrap();
        let c = parse(&format!("{TLS_URL}\nca_file = \"ca.pem\""), &d).unwrap();
        assert_eq!(c.broker.ca_file, Some(d.join("ca.pem")));
        assert!(c.broker.uses_tls());
    }

    #[test]
    fn a_missing_ca_file_is_an_error_naming_it() {
        let d = dir("missing");
        let err = parse(&format!("{TLS_URL}\nca_file = \"nope/ca.pem\""), &d).unwrap_err();
        assert!(err.contains("broker.ca_file"), "{err}");
        assert!(
            err.contains(&d.join("nope/ca.pem").display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_an_error() {
        let d = dir("empty");
        std::fs::write(d.join("ca.pem"), "not a certificate\n").unwrap();
        let err = parse(&format!("{TLS_URL}\nca_file = \"ca.pem\""), &d).unwrap_err();
        assert!(err.contains("holds no certificate"), "{err}");
    }

    #[test]
    fn tls_settings_with_a_plain_url_are_refused() {
        let d = dir("plain");
        std::fs::write(d.join("ca.pem"), CA_PEM).unwrap();
        let err = parse(
            "url = \"amqp://guest:secret@localhost:5672/%2f\"\nca_file = \"ca.pem\"",
            &d,
        )
        .unwrap_err();
        assert!(err.contains("not amqps://"), "{err}");
        assert!(!err.contains("secret"), "password leaked: {err}");
    }

    #[test]
    fn client_certificate_and_key_come_together_and_are_checked() {
        let d = dir("client");
        std::fs::write(d.join("cert.pem"), CA_PEM).unwrap();
        let err = parse(&format!("{TLS_URL}\nclient_cert_file = \"cert.pem\""), &d).unwrap_err();
        assert!(err.contains("without broker.client_key_file"), "{err}");
        // A certificate where the key should be.
        let err = parse(
            &format!("{TLS_URL}\nclient_cert_file = \"cert.pem\"\nclient_key_file = \"cert.pem\""),
            &d,
        )
        .unwrap_err();
        assert!(
            err.contains("broker.client_key_file") && err.contains("no usable private key"),
            "{err}"
        );
    }

    #[test]
    fn a_malformed_url_is_refused_without_its_password() {
        let err = parse("url = \"amqps//guest:secret@host\"", Path::new(".")).unwrap_err();
        assert!(err.contains("not an AMQP URL"), "{err}");
        assert!(!err.contains("secret"), "password leaked: {err}");
    }

    /// Parse one pipeline `x` on queue `q` with `extra` TOML appended inside it
    /// (keys first, then sub-tables), plus any `more` pipelines.
    fn pipeline(extra: &str, more: &str) -> Result<Config, String> {
        let text = format!(
            "[[pipeline]]\nname = \"x\"\nqueue = \"q\"\nplugin = \"p.wasm\"\n{extra}\n{more}"
        );
        Config::parse(&text, Path::new(".")).map_err(|e| format!("{e:#}"))
    }

    fn pipeline_err(extra: &str) -> String {
        pipeline(extra, "").expect_err(&format!("accepted: {extra}"))
    }

    /// Another pipeline `y` with its own queue and `extra`.
    fn other(queue: &str, extra: &str) -> String {
        format!("[[pipeline]]\nname = \"y\"\nqueue = {queue:?}\nplugin = \"p.wasm\"\n{extra}\n")
    }

    #[test]
    fn instance_reuse_is_validated() {
        let c = pipeline("", "").unwrap();
        assert_eq!(c.pipelines[0].instance, InstanceMode::Fresh);
        assert_eq!(c.pipelines[0].messages_per_instance(), 1);
        let c = pipeline("instance = \"reuse\"", "").unwrap();
        assert_eq!(
            c.pipelines[0].messages_per_instance(),
            DEFAULT_MAX_MESSAGES_PER_INSTANCE
        );
        let c = pipeline("instance = \"reuse\"\nmax_messages_per_instance = 7", "").unwrap();
        assert_eq!(c.pipelines[0].messages_per_instance(), 7);
        for bad in ["0", "1000001"] {
            let err = pipeline_err(&format!(
                "instance = \"reuse\"\nmax_messages_per_instance = {bad}"
            ));
            assert!(err.contains("max_messages_per_instance"), "{err}");
        }
        let err = pipeline_err("max_messages_per_instance = 5");
        assert!(err.contains("only with instance = \"reuse\""), "{err}");
        let err = pipeline_err("instance = \"pooled\"");
        assert!(err.contains("instance"), "{err}");
    }

    #[test]
    fn concurrency_is_bounded_per_pipeline() {
        for bad in ["0", "1025", "100000", "18446744073709551615"] {
            let err = pipeline_err(&format!("concurrency = {bad}"));
            assert!(
                err.contains("pipeline \"x\"") && err.contains("concurrency"),
                "{bad}: {err}"
            );
        }
        assert_eq!(
            pipeline("concurrency = 1024", "").unwrap().pipelines[0].concurrency,
            1024
        );
    }

    #[test]
    fn concurrency_is_bounded_in_total() {
        let mut text = String::new();
        for i in 0..5 {
            text.push_str(&format!(
                "[[pipeline]]\nname = \"p{i}\"\nqueue = \"q{i}\"\nplugin = \"p.wasm\"\nconcurrency = 1024\n"
            ));
        }
        let err = Config::parse(&text, Path::new("."))
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(err.contains("concurrency adds up to 5120"), "{err}");
        // Four at the per-pipeline maximum are exactly the total.
        let four: String = text
            .split_inclusive("concurrency = 1024\n")
            .take(4)
            .collect();
        Config::parse(&four, Path::new(".")).unwrap();
    }

    #[test]
    fn engine_sizing_does_not_overflow_on_an_unvalidated_config() {
        let text = "[[pipeline]]\nname = \"a\"\nqueue = \"a\"\nplugin = \"p.wasm\"\n\
                    concurrency = 18446744073709551615\n\
                    [[pipeline]]\nname = \"b\"\nqueue = \"b\"\nplugin = \"p.wasm\"\n\
                    concurrency = 18446744073709551615\n";
        let config = Config::parse_unvalidated(text, Path::new(".")).unwrap();
        let opts = crate::runtime_options(&config);
        assert_eq!(opts.max_instances, u32::MAX);
        // The pool's memories are sized for the largest allowed limit, whatever
        // the pipelines ask for.
        assert_eq!(opts.max_memory_bytes, 4096 << 20);
    }

    #[test]
    fn timeout_is_bounded_to_a_day() {
        for bad in ["0", "86400001", "18446744073709551615"] {
            let err = pipeline_err(&format!("[pipeline.limits]\ntimeout_ms = {bad}"));
            assert!(
                err.contains("pipeline \"x\"") && err.contains("limits.timeout_ms"),
                "{bad}: {err}"
            );
        }
        let c = pipeline("[pipeline.limits]\ntimeout_ms = 86400000", "").unwrap();
        assert_eq!(c.pipelines[0].limits.timeout().as_secs(), 86_400);
    }

    #[test]
    fn memory_is_bounded() {
        for bad in ["0", "4097"] {
            let err = pipeline_err(&format!("[pipeline.limits]\nmemory_mib = {bad}"));
            assert!(err.contains("limits.memory_mib"), "{bad}: {err}");
        }
        pipeline("[pipeline.limits]\nmemory_mib = 4096", "").unwrap();
    }

    #[test]
    fn retry_delays_stay_within_the_brokers_ttl_limit() {
        let err = pipeline_err("[pipeline.retry]\nmax_delay_ms = 4294967296");
        assert!(
            err.contains("pipeline \"x\"") && err.contains("retry.max_delay_ms"),
            "{err}"
        );
        let err = pipeline_err(
            "[pipeline.retry]\ninitial_delay_ms = 4294967296\nmax_delay_ms = 4294967296",
        );
        assert!(err.contains("retry.initial_delay_ms"), "{err}");
        let err = pipeline_err("[pipeline.retry]\ninitial_delay_ms = 18446744073709551615");
        assert!(err.contains("retry.initial_delay_ms"), "{err}");
        let err = pipeline_err("[pipeline.retry]\ninitial_delay_ms = 0");
        assert!(err.contains("retry.initial_delay_ms"), "{err}");
        let err = pipeline_err("[pipeline.retry]\ninitial_delay_ms = 5000\nmax_delay_ms = 4000");
        assert!(err.contains("retry.max_delay_ms must be at least"), "{err}");
        let c = pipeline(
            "[pipeline.retry]\ninitial_delay_ms = 4294967295\nmax_delay_ms = 4294967295",
            "",
        )
        .unwrap();
        assert_eq!(c.pipelines[0].retry.max_delay_ms, u64::from(u32::MAX));
    }

    #[test]
    fn the_default_exchange_is_neither_declared_nor_bound() {
        let err = pipeline_err("[[pipeline.output]]\nexchange = \"\"");
        assert!(
            err.contains("pipeline \"x\"")
                && err.contains("an output needs an exchange, or queues"),
            "{err}"
        );
        let err = pipeline_err("[[pipeline.binding]]\nexchange = \"\"");
        assert!(err.contains("binding exchange must not be empty"), "{err}");
    }

    #[test]
    fn names_longer_than_amqp_allows_are_refused() {
        let long = "e".repeat(256);
        let err = pipeline_err(&format!("[[pipeline.output]]\nexchange = {long:?}"));
        assert!(
            err.contains("output exchange") && err.contains("256 bytes"),
            "{err}"
        );
        let err = pipeline_err(&format!(
            "[[pipeline.binding]]\nexchange = \"ok\"\nrouting_keys = [{long:?}]"
        ));
        assert!(err.contains("binding routing key"), "{err}");
    }

    #[test]
    fn an_exchange_has_one_type_across_pipelines() {
        let err = pipeline(
            "[[pipeline.output]]\nexchange = \"events\"\ntype = \"topic\"",
            &other(
                "q2",
                "[[pipeline.binding]]\nexchange = \"events\"\ntype = \"fanout\"",
            ),
        )
        .unwrap_err();
        assert!(
            err.contains("exchange \"events\"")
                && err.contains("topic")
                && err.contains("fanout")
                && err.contains("pipelines \"x\" and \"y\""),
            "{err}"
        );
        // Within one pipeline too; `direct` is the default type.
        let err = pipeline_err(
            "[[pipeline.binding]]\nexchange = \"jobs\"\n[[pipeline.output]]\nexchange = \"jobs\"\ntype = \"topic\"",
        );
        assert!(err.contains("pipeline \"x\" (twice)"), "{err}");
        // The same type everywhere is fine, and built-in exchanges are not declared.
        pipeline(
            "[[pipeline.output]]\nexchange = \"events\"\ntype = \"topic\"\n\
             [[pipeline.output]]\nexchange = \"amq.topic\"",
            &other(
                "q2",
                "[[pipeline.binding]]\nexchange = \"events\"\ntype = \"topic\"\n\
                 [[pipeline.binding]]\nexchange = \"amq.topic\"\ntype = \"topic\"",
            ),
        )
        .unwrap();
    }

    #[test]
    fn a_queue_cannot_be_another_pipelines_dead_letter_or_retry_queue() {
        let err = pipeline("", &other("q.dlq", "")).unwrap_err();
        assert!(
            err.contains("\"q.dlq\"")
                && err.contains("dead-letter queue of pipeline \"x\"")
                && err.contains("pipeline \"y\""),
            "{err}"
        );
        // The default retry tiers are 1000, 2000, ... 60000 ms.
        let err = pipeline("", &other("q.retry.4000", "")).unwrap_err();
        assert!(
            err.contains("\"q.retry.4000\"") && err.contains("retry queue of pipeline \"x\""),
            "{err}"
        );
        // Declared in the other order, the clash is found all the same.
        let text = format!(
            "{}[[pipeline]]\nname = \"x\"\nqueue = \"q\"\nplugin = \"p.wasm\"\n",
            other("q.dlq", "")
        );
        let err = format!("{:#}", Config::parse(&text, Path::new(".")).unwrap_err());
        assert!(
            err.contains("\"q.dlq\"") && err.contains("queue of pipeline \"y\""),
            "{err}"
        );
        let err = pipeline("", &other("q", "")).unwrap_err();
        assert!(err.contains("consumed by two pipelines"), "{err}");
        // A name that merely looks like a tier of a delay the pipeline does not use is fine.
        pipeline("", &other("q.retry.3000", "")).unwrap();
    }

    #[test]
    fn outputs_list_exchanges_with_keys_or_default_exchange_queues() {
        let c = pipeline(
            "[[pipeline.output]]\nexchange = \"n\"\ntype = \"topic\"\nrouting_keys = [\"notify.*\"]\n\
             [[pipeline.output]]\nqueues = [\"jobs\"]\n",
            "",
        )
        .unwrap();
        assert_eq!(c.pipelines[0].outputs[1].queues, ["jobs"]);
        let err = pipeline_err("[[pipeline.output]]\nexchange = \"n\"\nqueues = [\"jobs\"]");
        assert!(err.contains("in an entry of their own"), "{err}");
        let err = pipeline_err("[[pipeline.output]]\nqueues = [\"jobs\"]\nrouting_keys = [\"a\"]");
        assert!(err.contains("takes no routing_keys"), "{err}");
        for reserved in ["q.dlq", "other.dlq", "q.retry.1000", "x.retry.7"] {
            let err = pipeline_err(&format!("[[pipeline.output]]\nqueues = [{reserved:?}]"));
            assert!(
                err.contains(&format!("output queue {reserved:?}"))
                    && err.contains("warren manages"),
                "{err}"
            );
        }
        // Another pipeline's queue may be listed: that is how pipelines chain.
        pipeline("[[pipeline.output]]\nqueues = [\"q2\"]", &other("q2", "")).unwrap();
        let err = pipeline_err("reply_to_allow = [\"\"]");
        assert!(err.contains("reply_to_allow has an empty pattern"), "{err}");
    }

    #[test]
    fn a_config_exchange_that_is_not_an_output_is_warned_about() {
        let c = pipeline(
            "[[pipeline.output]]\nexchange = \"thumbnails\"\n[pipeline.config]\n\
             output_exchange = \"thumbnails\"\nexchange = \"elsewhere\"\nexchange_note = \"x\"\n",
            "",
        )
        .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("config.exchange") && w[0].contains("\"elsewhere\""),
            "{w:?}"
        );
    }

    #[test]
    fn secrets_come_from_the_environment_and_never_show() {
        // PATH is set wherever tests run; the other name nowhere. (Setting
        // variables here would race with other tests' threads.)
        let (set, unset) = ("PATH", "WARREN_TEST_SECRET_NEVER_SET_7F3A");
        let value = std::env::var(set).unwrap();
        let c = pipeline(
            &format!("[pipeline.config]\ntoken = {{ env = {set:?} }}\nplain = \"p\"\n"),
            "",
        )
        .unwrap();
        let settings = crate::secret::PluginSettings::new(&c.pipelines[0].config).shared();
        assert_eq!(settings.get("token"), Some(&value));
        assert_eq!(settings.get("plain").map(String::as_str), Some("p"));
        let debug = format!("{c:?}");
        assert!(!debug.contains(&value), "{debug}");

        let err = pipeline_err(&format!(
            "[pipeline.config]\ntoken = {{ env = {unset:?} }}\n"
        ));
        assert!(
            err.contains("pipeline \"x\"") && err.contains("config.token") && err.contains(unset),
            "{err}"
        );
        let err = pipeline_err("[pipeline.config]\ntoken = { env = \"X\", value = \"y\" }\n");
        assert!(err.contains("token"), "{err}");
    }

    #[test]
    fn an_empty_plugin_path_is_a_config_error() {
        let text = "[[pipeline]]\nname = \"x\"\nqueue = \"q\"\nplugin = \"\"\n";
        let err = Config::parse(text, Path::new("/etc/warren"))
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert_eq!(err, "pipeline \"x\": plugin must not be empty");
    }

    #[test]
    fn reconnect_delay_is_bounded_by_the_backoff_cap() {
        let err = parse("reconnect_delay_ms = 30001", Path::new(".")).unwrap_err();
        assert!(err.contains("broker.reconnect_delay_ms"), "{err}");
        parse("reconnect_delay_ms = 30000", Path::new(".")).unwrap();
    }

    #[test]
    fn errors_about_an_overriding_url_name_the_environment_variable() {
        let mut c = parse("", Path::new(".")).unwrap();
        c.broker.override_url("not a url".into());
        let err = format!("{:#}", c.validate().unwrap_err());
        assert!(
            err.starts_with("WARREN_BROKER_URL is not an AMQP URL"),
            "{err}"
        );
        assert!(!err.contains("broker.url"), "{err}");

        let d = dir("env-tls");
        std::fs::write(d.join("ca.pem"), CA_PEM).unwrap();
        let mut c = parse(&format!("{TLS_URL}\nca_file = \"ca.pem\""), &d).unwrap();
        c.broker
            .override_url("amqp://guest:secret@localhost:5672/%2f".into());
        let err = format!("{:#}", c.validate().unwrap_err());
        assert!(
            err.contains("WARREN_BROKER_URL") && err.contains("not amqps://"),
            "{err}"
        );
        assert!(!err.contains("secret"), "password leaked: {err}");
    }

    #[test]
    fn a_cluster_is_given_as_urls_or_a_comma_separated_environment_value() {
        let c = parse(
            "urls = [\"amqp://u:secret@n1:5672/%2f\", \"amqp://u:secret@n2:5672/%2f\"]",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.broker.endpoints().len(), 2);
        assert_eq!(
            c.broker.redacted(),
            "amqp://u:***@n1:5672/%2f,amqp://u:***@n2:5672/%2f"
        );

        let err = parse(
            "url = \"amqp://a:5672\"\nurls = [\"amqp://b:5672\"]",
            Path::new("."),
        )
        .unwrap_err();
        assert!(err.contains("not both"), "{err}");

        let err = parse(
            "urls = [\"amqp://a:5672\", \"amqps://u:secret@b:5671\"]",
            Path::new("."),
        )
        .unwrap_err();
        assert!(err.contains("mixes amqp:// and amqps://"), "{err}");
        let err = parse("urls = [\"amqp://a:5672\", \"nope\"]", Path::new(".")).unwrap_err();
        assert!(
            err.starts_with("broker.urls (entry 2) is not an AMQP URL"),
            "{err}"
        );

        let mut c = parse("", Path::new(".")).unwrap();
        c.broker
            .override_url(" amqp://n1:5672/%2f , amqp://n2:5672/%2f,".into());
        c.validate().unwrap();
        assert_eq!(
            c.broker.endpoints(),
            vec!["amqp://n1:5672/%2f", "amqp://n2:5672/%2f"]
        );
        c.broker.override_url("amqp://only:5672/%2f".into());
        assert_eq!(c.broker.endpoints(), vec!["amqp://only:5672/%2f"]);
    }

    #[test]
    fn quorum_initial_group_size_is_for_quorum_queues_only() {
        let pipeline = |extra: &str| {
            Config::parse(
                &format!(
                    "[[pipeline]]\nname = \"p\"\nqueue = \"q\"\nplugin = \"p.wasm\"\n{extra}\n"
                ),
                Path::new("."),
            )
            .map_err(|e| format!("{e:#}"))
        };
        let c = pipeline("quorum_initial_group_size = 3").unwrap();
        assert_eq!(c.pipelines[0].quorum_initial_group_size, Some(3));
        let err = pipeline("quorum_initial_group_size = 0").unwrap_err();
        assert!(err.contains("at least 1"), "{err}");
        let err = pipeline("queue_type = \"classic\"\nquorum_initial_group_size = 3").unwrap_err();
        assert!(err.contains("for quorum queues"), "{err}");
    }

    #[test]
    fn single_active_consumer_is_off_by_default_and_checked_with_what_it_affects() {
        let c = pipeline("", "").unwrap();
        assert!(!c.pipelines[0].single_active_consumer);
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());

        let c = pipeline("single_active_consumer = true\nconcurrency = 1", "").unwrap();
        assert!(c.pipelines[0].single_active_consumer);
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());

        let c = pipeline("single_active_consumer = true\nconcurrency = 4", "").unwrap();
        let w = c.warnings();
        assert!(
            w.len() == 1 && w[0].contains("pipeline \"x\"") && w[0].contains("concurrency = 1"),
            "{w:?}"
        );

        let err = pipeline_err(
            "single_active_consumer = true\nrate_limit = \"10/s\"\nrate_limit_scope = \"cluster\"",
        );
        assert!(
            err.contains("pipeline \"x\"") && err.contains("single_active_consumer"),
            "{err}"
        );
        pipeline("single_active_consumer = true\nrate_limit = \"10/s\"", "").unwrap();
    }
}
