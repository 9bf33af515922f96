//! The `warren.toml` configuration: serde structs, defaults and validation.
//!
//! Unknown fields are rejected everywhere so a typo is an error, not a silently
//! ignored setting. Relative paths (plugins, the cache directory, TLS files) are
//! resolved against the directory of the config file. `WARREN_BROKER_URL`
//! overrides `broker.url`; validation runs after the override, so the TLS
//! settings are checked against the URL actually used.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use lapin::uri::{AMQPScheme, AMQPUri};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::broker::redact;

/// Environment variable that overrides `broker.url` (keeps credentials out of the file).
pub const BROKER_URL_ENV: &str = "WARREN_BROKER_URL";

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
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: default_broker_url(),
            reconnect_delay_ms: default_reconnect_ms(),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

impl BrokerConfig {
    /// Whether `url` asks for TLS (`amqps://`).
    pub fn uses_tls(&self) -> bool {
        self.url
            .parse::<AMQPUri>()
            .is_ok_and(|u| u.scheme == AMQPScheme::AMQPS)
    }

    /// Any TLS file configured?
    fn has_tls_files(&self) -> bool {
        self.ca_file.is_some() || self.client_cert_file.is_some() || self.client_key_file.is_some()
    }

    /// The URL parses, and the TLS files fit it and hold what they should.
    fn validate(&self) -> Result<()> {
        let uri: AMQPUri = self.url.parse().map_err(|e: String| {
            // Neither the URL nor the parser's message (which quotes it) can be
            // shown: a URL too broken to parse may not be redacted properly.
            let e = e.replace(&self.url, "...");
            anyhow!(
                "broker.url is not an AMQP URL ({e}); expected amqp://user:password@host:port/vhost \
                 or amqps://..."
            )
        })?;
        if uri.scheme != AMQPScheme::AMQPS {
            // A TLS setting on a plain URL would mean credentials and messages in
            // clear text where the operator meant to encrypt: refuse it.
            if self.has_tls_files() {
                bail!(
                    "broker.ca_file / client_cert_file / client_key_file are set, but broker.url {} \
                     is not amqps://: use amqps:// (usually port 5671) to connect with TLS, or remove \
                     the TLS settings",
                    redact(&self.url)
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

/// Read a PEM file and check it holds at least one certificate.
pub fn read_certificates(path: &Path) -> Result<String> {
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a valid PEM file", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{} holds no certificate (expected PEM blocks starting with -----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(pem)
}

/// Read a PEM file and check it holds a private key.
pub fn read_private_key(path: &Path) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem).with_context(|| {
        format!(
            "{} holds no usable private key (expected an unencrypted PEM key: \
             BEGIN PRIVATE KEY, BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY)",
            path.display()
        )
    })?;
    Ok(pem)
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
    /// Exchanges the plugin publishes to; declared durable at start so a publish
    /// never hits a missing exchange.
    #[serde(default, rename = "output")]
    pub outputs: Vec<OutputConfig>,
    /// Retry policy.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Resource limits for one invocation.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Watch the plugin file and swap in new versions as they appear.
    #[serde(default = "default_true")]
    pub reload: bool,
    /// Free-form settings the plugin reads with `host.config(key)`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

impl PipelineConfig {
    /// Name of the dead-letter queue.
    pub fn dlq_name(&self) -> String {
        format!("{}.dlq", self.queue)
    }
}

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

/// `[[pipeline.output]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Exchange name (`amq.*` exchanges exist already and are not declared).
    pub exchange: String,
    /// `direct` (default), `fanout` or `topic`.
    #[serde(default, rename = "type")]
    pub kind: ExchangeKind,
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

/// `[pipeline.retry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in total (first delivery included) before dead-lettering.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Delay before the second attempt.
    #[serde(default = "default_initial_delay_ms")]
    pub initial_delay_ms: u64,
    /// Longest delay; the doubling stops here.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// Fraction (0..=0.5) by which a delay may be shortened at random, so that
    /// messages failing together do not come back together.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_delay_ms: default_initial_delay_ms(),
            max_delay_ms: default_max_delay_ms(),
            jitter: default_jitter(),
        }
    }
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
fn default_max_attempts() -> u32 {
    5
}
fn default_initial_delay_ms() -> u64 {
    1_000
}
fn default_max_delay_ms() -> u64 {
    60_000
}
fn default_jitter() -> f64 {
    0.2
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
            config.broker.url = url;
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
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for p in &mut config.pipelines {
            resolve(&mut p.plugin);
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

    /// Checks serde cannot express.
    pub fn validate(&self) -> Result<()> {
        if self.pipelines.is_empty() {
            bail!("no [[pipeline]] configured: warren needs at least one");
        }
        self.broker.validate()?;
        self.ops.listen_addr()?;
        let mut names = HashSet::new();
        let mut queues = HashSet::new();
        for p in &self.pipelines {
            let what = format!("pipeline {:?}", p.name);
            if p.name.trim().is_empty() {
                bail!("a pipeline has an empty name");
            }
            if !names.insert(&p.name) {
                bail!("{what}: the name is used twice");
            }
            if p.queue.trim().is_empty() {
                bail!("{what}: queue must not be empty");
            }
            // Derived names (`<queue>.retry.<ms>`, consumer tags) must fit AMQP's
            // 255-byte short strings too.
            let longest = p.queue.len() + ".retry.".len() + p.retry.max_delay_ms.to_string().len();
            if longest > 255 {
                bail!(
                    "{what}: queue name is {} bytes; at most {} fit with its retry queue names",
                    p.queue.len(),
                    255 - (longest - p.queue.len())
                );
            }
            if p.name.len() > 200 {
                bail!("{what}: the name is longer than 200 bytes");
            }
            if p.queue.starts_with("amq.") {
                bail!("{what}: queue {:?} uses the reserved amq. prefix", p.queue);
            }
            if !queues.insert(&p.queue) {
                bail!("{what}: queue {:?} is consumed by two pipelines", p.queue);
            }
            if p.concurrency == 0 {
                bail!("{what}: concurrency must be at least 1");
            }
            if p.prefetch == 0 {
                bail!("{what}: prefetch must be at least 1 (0 would mean unlimited)");
            }
            let r = &p.retry;
            if r.max_attempts == 0 {
                bail!("{what}: retry.max_attempts must be at least 1");
            }
            if r.initial_delay_ms == 0 || r.max_delay_ms < r.initial_delay_ms {
                bail!("{what}: retry delays need 0 < initial_delay_ms <= max_delay_ms");
            }
            if !(0.0..=0.5).contains(&r.jitter) {
                bail!("{what}: retry.jitter must be between 0 and 0.5");
            }
            if p.limits.timeout_ms == 0 {
                bail!("{what}: limits.timeout_ms must be at least 1");
            }
            if p.limits.memory_mib == 0 || p.limits.memory_mib > 4096 {
                bail!("{what}: limits.memory_mib must be 1..=4096");
            }
            for b in &p.bindings {
                if b.exchange.is_empty() {
                    bail!(
                        "{what}: a binding needs an exchange name (the default exchange needs no binding)"
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::{Path, PathBuf};

    use super::Config;

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
}
