//! Outbound HTTP for plugins: `wasi:http/outgoing-handler`, denied unless the
//! pipeline grants it with `[pipeline.http]`, and then only to the origins its
//! allow-list names.
//!
//! The order of checks for one request (all before any connection):
//! 1. the pipeline grants HTTP at all, and the message has requests left
//!    (`max_requests_per_message`; every request counts, denied ones too, so
//!    a plugin cannot probe the allow-list without limit);
//! 2. scheme, host and port match a rule of `allowed_hosts`;
//! 3. fewer than `max_concurrent_requests_per_message` of the message's
//!    requests are open: a request is open from its start until its response
//!    body ends, fails or is dropped (or the request fails), so one message
//!    holds that many sockets at most;
//! 4. the name is resolved by warren (or taken from the pipeline's `resolve`
//!    table), and unless the matching rule names the host literally or the
//!    addresses come from `resolve`, no address it resolves to may be internal
//!    (loopback, link-local, private, ...: `addr::refused_range`);
//! 5. warren connects to the addresses it checked, never resolving again.
//!
//! Every wait is bounded by the request's deadline: `timeout_ms` from its
//! start, and never past the message's own deadline (`limits.timeout_ms`).

mod addr;
mod metrics;
mod rules;
mod send;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

pub use metrics::HttpMetrics;
use rules::{AllowList, Host, Scheme};

/// Longest `timeout_ms` (24 hours, as `limits.timeout_ms`).
const MAX_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;
/// Largest `max_response_bytes`: 1 GiB; a response is held in the plugin's
/// memory, which is at most 4 GiB.
const MAX_RESPONSE_BYTES: u64 = 1 << 30;
/// Most `max_requests_per_message`.
const MAX_REQUESTS: u32 = 10_000;
/// Most `max_concurrent_requests_per_message`: sockets one message may hold.
const MAX_CONCURRENT: u32 = 256;

/// `[pipeline.http]`: outbound HTTP granted to the pipeline's plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `scheme://host[:port]` rules; `*.example.com` matches subdomains.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Budget of one request, from its start to the end of its response
    /// body; never past the message's own deadline.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Most bytes of one response body; past it the body stream fails.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// Most requests one message may make, denied ones included; more are
    /// denied.
    #[serde(default = "default_max_requests")]
    pub max_requests_per_message: u32,
    /// Most requests of one message open at the same time; a request started
    /// while that many are open is denied.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_requests_per_message: u32,
    /// PEM file of CA certificates trusted for HTTPS besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Host names answered from here instead of DNS, like curl's
    /// `--resolve`: `{ "hooks.internal.example" = ["10.1.2.3"] }`. The
    /// operator wrote these addresses, so they count as named literally
    /// (internal ranges are not refused for them).
    #[serde(default)]
    pub resolve: BTreeMap<String, Vec<IpAddr>>,
}

fn default_timeout_ms() -> u64 {
    5000
}
fn default_max_response_bytes() -> u64 {
    16 << 20
}
fn default_max_requests() -> u32 {
    16
}
fn default_max_concurrent() -> u32 {
    8
}

impl HttpConfig {
    /// The checks `warren check` and `warren run` make; errors name the field.
    pub fn validate(&self) -> Result<()> {
        AllowList::parse(&self.allowed_hosts).context("http.allowed_hosts")?;
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            bail!("http.timeout_ms must be between 1 and {MAX_TIMEOUT_MS} (24 hours)");
        }
        if self.max_response_bytes == 0 || self.max_response_bytes > MAX_RESPONSE_BYTES {
            bail!("http.max_response_bytes must be between 1 and {MAX_RESPONSE_BYTES} (1 GiB)");
        }
        if self.max_requests_per_message == 0 || self.max_requests_per_message > MAX_REQUESTS {
            bail!("http.max_requests_per_message must be between 1 and {MAX_REQUESTS}");
        }
        if self.max_concurrent_requests_per_message == 0
            || self.max_concurrent_requests_per_message > MAX_CONCURRENT
        {
            bail!(
                "http.max_concurrent_requests_per_message must be between 1 and {MAX_CONCURRENT}"
            );
        }
        if let Some(ca) = &self.ca_file {
            send::tls_config(Some(ca)).context("http.ca_file")?;
        }
        resolve_table(&self.resolve).context("http.resolve")?;
        Ok(())
    }
}

/// `resolve` keyed by the normalised name (`Host::parse`), so that a request
/// to `Hooks.Example.` finds the entry for `hooks.example`.
fn resolve_table(table: &BTreeMap<String, Vec<IpAddr>>) -> Result<HashMap<String, Vec<IpAddr>>> {
    let mut out = HashMap::with_capacity(table.len());
    for (name, addrs) in table {
        if name.contains('*') {
            bail!("{name:?}: names only, no wildcards (each name is pinned on its own)");
        }
        let name = match Host::parse(name)? {
            Host::Name(n) => n,
            Host::Ip(_) => bail!("{name:?} is an address already; only names are resolved"),
        };
        if addrs.is_empty() {
            bail!("{name:?}: give at least one address");
        }
        if out.insert(name.clone(), addrs.clone()).is_some() {
            bail!("{name:?} is listed twice (names are compared in lower case)");
        }
    }
    Ok(out)
}

/// One pipeline's grant, built at start: the parsed rules, the limits, and
/// the TLS settings (system roots plus `ca_file`).
pub struct HttpPolicy {
    pipeline: Arc<str>,
    rules: AllowList,
    timeout: Duration,
    max_response_bytes: u64,
    max_requests: u32,
    max_concurrent: u32,
    tls: Result<Arc<rustls::ClientConfig>, String>,
    /// `resolve`, normalised: these names are never looked up in DNS.
    pinned: HashMap<String, Vec<IpAddr>>,
    metrics: Arc<HttpMetrics>,
}

impl std::fmt::Debug for HttpPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpPolicy")
            .field("pipeline", &self.pipeline)
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl HttpPolicy {
    /// The grant of a validated `[pipeline.http]`. A CA file that can no
    /// longer be read (it was checked when the configuration was loaded) is
    /// logged, and makes HTTPS requests fail; plain HTTP still works.
    pub fn new(pipeline: &str, config: &HttpConfig, metrics: Arc<HttpMetrics>) -> Result<Self> {
        let rules = AllowList::parse(&config.allowed_hosts)
            .with_context(|| format!("pipeline {pipeline:?}: http.allowed_hosts"))?;
        let pinned = resolve_table(&config.resolve)
            .with_context(|| format!("pipeline {pipeline:?}: http.resolve"))?;
        let tls = send::tls_config(config.ca_file.as_deref()).map_err(|e| {
            let e = format!("{e:#}");
            tracing::error!(pipeline, error = %e, "HTTPS for plugins is unavailable");
            e
        });
        Ok(Self {
            pipeline: pipeline.into(),
            rules,
            timeout: Duration::from_millis(config.timeout_ms),
            max_response_bytes: config.max_response_bytes,
            max_requests: config.max_requests_per_message,
            max_concurrent: config.max_concurrent_requests_per_message,
            tls,
            pinned,
            metrics,
        })
    }

    /// The grant of a pipeline without `[pipeline.http]`: nothing, but its
    /// denials are counted and logged like any other.
    pub fn deny_all(pipeline: &str, metrics: Arc<HttpMetrics>) -> Self {
        Self {
            pipeline: pipeline.into(),
            rules: AllowList::default(),
            timeout: Duration::ZERO,
            max_response_bytes: 0,
            max_requests: 0,
            max_concurrent: 0,
            tls: Err("outbound HTTP is not granted".into()),
            pinned: HashMap::new(),
            metrics,
        }
    }
}

/// The `wasi:http` side of one plugin call: what the pipeline grants, the
/// message's deadline, and what the call has used so far.
pub(crate) struct CallHttp {
    /// For log lines when no policy is given (`warren invoke`).
    pipeline: Arc<str>,
    policy: Option<Arc<HttpPolicy>>,
    deadline: Instant,
    requests: u32,
    shared: Arc<CallShared>,
}

/// What the call's requests, running on the I/O runtime, report back.
#[derive(Default)]
struct CallShared {
    /// A denial was logged for this message already: one line per message.
    denial_logged: AtomicBool,
    /// A request was cut by the message's deadline (not its own timeout).
    cut_by_deadline: AtomicBool,
    /// Requests of this message open now (see [`OpenSlot`]).
    open: AtomicU32,
}

/// One open request of a message: taken before the request starts, held by
/// its response body, and given back when that body ends, fails or is
/// dropped, or at once when the request fails.
pub(crate) struct OpenSlot(Arc<CallShared>);

impl OpenSlot {
    /// A slot, unless `max` requests of the message are open already.
    fn take(shared: &Arc<CallShared>, max: u32) -> Option<Self> {
        shared
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n.saturating_add(1))
            })
            .ok()
            .map(|_| Self(shared.clone()))
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        let _ = self
            .0
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

impl CallHttp {
    pub(crate) fn new(
        pipeline: Arc<str>,
        policy: Option<Arc<HttpPolicy>>,
        deadline: Instant,
    ) -> Self {
        Self {
            pipeline,
            policy,
            deadline,
            requests: 0,
            shared: Arc::default(),
        }
    }

    /// Whether a request of this call was stopped by the message's deadline:
    /// the call then counts as timed out, whatever the plugin returned.
    pub(crate) fn cut_by_deadline(&self) -> bool {
        self.shared.cut_by_deadline.load(Ordering::Relaxed)
    }

    /// Refuse a request: logged once per message, counted every time. The
    /// answer waits for the request body (`drain`).
    fn deny(
        &self,
        request: http::Request<WasiBody>,
        target: &str,
        rule: &str,
        why: &str,
    ) -> SendFuture {
        deny(
            &self.pipeline,
            self.policy.as_deref(),
            &self.shared,
            target,
            rule,
            why,
        );
        let deadline = self.deadline;
        Box::new(async move {
            drain(request.into_body(), deadline).await;
            Err(HttpError::HttpRequestDenied)
        })
    }
}

/// Read a request body to its end (or the first error), throwing it away, at
/// most until `deadline`. A request that fails before its body is sent
/// (denied, refused, unresolvable) waits for it so that the plugin's writes
/// succeed and it sees the failure as the request's result: componentize-js
/// 0.23.0 (StarlingMonkey) aborts the whole call when a body write fails,
/// so a failed `fetch` POST would trap instead of rejecting.
async fn drain(mut body: WasiBody, deadline: Instant) {
    let read = async {
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            if frame.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), read).await;
}

fn deny(
    pipeline: &str,
    policy: Option<&HttpPolicy>,
    shared: &CallShared,
    target: &str,
    rule: &str,
    why: &str,
) {
    if let Some(p) = policy {
        p.metrics.denied();
    }
    if !shared.denial_logged.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            pipeline,
            host = %crate::logtext::Escaped(target),
            rule,
            "outbound HTTP request denied: {why} (further denials for this message are not logged)"
        );
    }
}

/// What `send_request` produces: the response head and a future that
/// drives the connection while the plugin reads the body.
type SendResult = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
>;
type SendFuture = Box<dyn Future<Output = SendResult> + Send>;

impl WasiHttpHooks for CallHttp {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        let uri = request.uri();
        let shown = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("?"),
            uri.authority().map_or("", |a| a.as_str())
        );
        let Some(policy) = self.policy.clone() else {
            return self.deny(
                request,
                &shown,
                "-",
                "outbound HTTP is not granted to this pipeline (no [pipeline.http])",
            );
        };
        // Every request counts, whether it is then denied or not: a plugin
        // looping over denied requests stops at the same budget.
        if policy.max_requests > 0 && self.requests >= policy.max_requests {
            let why = format!(
                "the message made {} requests already (http.max_requests_per_message)",
                self.requests
            );
            return self.deny(request, &shown, "-", &why);
        }
        self.requests = self.requests.saturating_add(1);
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            _ => return self.deny(request, &shown, "-", "only http and https are allowed"),
        };
        let Some(authority) = uri.authority() else {
            return self.deny(request, &shown, "-", "the request names no host");
        };
        if authority.as_str().contains('@') {
            return self.deny(
                request,
                &shown,
                "-",
                "user information in the URL is not allowed",
            );
        }
        let host = match Host::parse(authority.host()) {
            Ok(h) => h,
            Err(e) => return self.deny(request, &shown, "-", &format!("{e:#}")),
        };
        let port = authority.port_u16().unwrap_or(scheme.default_port());
        let Some(rule) = policy.rules.find(scheme, &host, port).cloned() else {
            let why = policy.rules.explain_miss(scheme, &host, port);
            return self.deny(request, &shown, "-", &why);
        };
        let Some(slot) = OpenSlot::take(&self.shared, policy.max_concurrent) else {
            let why = format!(
                "{} requests of the message are open already \
                 (http.max_concurrent_requests_per_message)",
                policy.max_concurrent
            );
            return self.deny(request, &shown, &rule.text, &why);
        };
        let target = send::Target {
            scheme,
            host,
            port,
            rule,
            shown,
        };
        let now = Instant::now();
        let own = now.checked_add(policy.timeout).unwrap_or(self.deadline);
        let (deadline, by_message) = if self.deadline <= own {
            (self.deadline, true)
        } else {
            (own, false)
        };
        let call = send::Call {
            policy,
            shared: self.shared.clone(),
            deadline,
            by_message,
            options,
        };
        Box::new(send::send(call, slot, target, request))
    }

    // The defaults log every failed connection at WARN without saying which
    // pipeline; a plugin could flood the log that way. warren's sender maps
    // its errors itself (send.rs), so these only see hyper's own.
    fn p2_error_from_hyper(&mut self, err: &hyper::Error) -> ErrorCode {
        tracing::debug!(pipeline = %self.pipeline, error = %err, "outbound HTTP: protocol error");
        if err.is_timeout() {
            ErrorCode::HttpResponseTimeout
        } else if err.is_incomplete_message() {
            ErrorCode::HttpResponseIncomplete
        } else {
            ErrorCode::HttpProtocolError
        }
    }

    fn p2_error_from_connect(&mut self, err: &std::io::Error) -> ErrorCode {
        tracing::debug!(pipeline = %self.pipeline, error = %err, "outbound HTTP: connection failed");
        match err.kind() {
            std::io::ErrorKind::TimedOut => ErrorCode::ConnectionTimeout,
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => {
                ErrorCode::ConnectionTerminated
            }
            _ => ErrorCode::ConnectionRefused,
        }
    }

    fn p2_error_from_tls(&mut self, err: &std::io::Error) -> ErrorCode {
        tracing::debug!(pipeline = %self.pipeline, error = %err, "outbound HTTP: TLS failed");
        let certificate = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)));
        if certificate {
            ErrorCode::TlsCertificateError
        } else {
            ErrorCode::TlsProtocolError
        }
    }
}
