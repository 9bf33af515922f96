//! Sending one allowed request: resolve, check the addresses, connect to
//! exactly those, TLS, HTTP/1.1, and a response body bounded in size and time.
//! It runs on wasmtime-wasi's I/O runtime; the plugin's thread waits for it
//! only while the plugin blocks on the response, so every wait here ends at
//! the request's deadline at the latest.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody};

use super::addr::refused_range;
use super::rules::{Host, Rule, Scheme};
use super::{CallShared, HttpPolicy, OpenSlot, SendResult};

/// Where an allowed request goes, and the rule that allowed it.
pub(super) struct Target {
    pub(super) scheme: Scheme,
    pub(super) host: Host,
    pub(super) port: u16,
    pub(super) rule: Rule,
    /// `scheme://authority` as the plugin wrote it, for the log.
    pub(super) shown: String,
}

/// The request's budget and where it reports.
pub(super) struct Call {
    pub(super) policy: Arc<HttpPolicy>,
    pub(super) shared: Arc<CallShared>,
    /// When the whole request, response body included, must be over.
    pub(super) deadline: Instant,
    /// `deadline` is the message's deadline, not the request's own timeout.
    pub(super) by_message: bool,
    /// The plugin's own (shorter) timeouts, if it set any.
    pub(super) options: Option<RequestOptions>,
}

impl Call {
    /// The deadline ran out: when it was the message's, the plugin call is
    /// charged a timeout.
    fn expired(&self) {
        if self.by_message {
            self.shared.cut_by_deadline.store(true, Ordering::Relaxed);
        }
    }

    /// The earlier of the deadline and `now + limit`, for one step.
    fn step_deadline(&self, limit: Option<std::time::Duration>) -> tokio::time::Instant {
        let d = limit
            .and_then(|l| Instant::now().checked_add(l))
            .map_or(self.deadline, |d| d.min(self.deadline));
        tokio::time::Instant::from_std(d)
    }
}

/// The future `WasiHttpHooks::send_request` hands to wasmtime-wasi-http.
/// `slot` is the request's place among the message's open requests: the
/// response body holds it, and it is given back with the body, or at once
/// when the request fails.
pub(super) async fn send(
    call: Call,
    slot: OpenSlot,
    target: Target,
    request: http::Request<WasiBody>,
) -> SendResult {
    let started = Instant::now();
    let result = exchange(&call, slot, &target, request).await;
    let status = match &result {
        Ok((res, _)) => res.status().as_u16().to_string(),
        // Counted as denied already.
        Err(HttpError::HttpRequestDenied) => return result,
        Err(
            HttpError::ConnectionTimeout | HttpError::ConnectionReadTimeout | HttpError::DnsTimeout,
        ) => "timeout".to_string(),
        Err(_) => "error".to_string(),
    };
    call.policy
        .metrics
        .request(&target.rule.text, &status, started.elapsed());
    result
}

async fn exchange(
    call: &Call,
    slot: OpenSlot,
    target: &Target,
    mut request: http::Request<WasiBody>,
) -> SendResult {
    let (mut sender, conn) = match connect(call, target).await {
        Ok(c) => c,
        Err(e) => {
            // Read the body the plugin is writing before it hears of the
            // failure (see `super::drain`): dropping it now would fail its
            // writes first, which componentize-js turns into a trap.
            super::drain(request.into_body(), call.deadline).await;
            return Err(e);
        }
    };

    // The request line carries the path only; scheme and authority went into
    // the connection and the Host header.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|e| HttpError::InternalError(Some(e.to_string())))?;

    // Drive the connection while waiting for the response head; the driver
    // lives on after the head (it streams the body) and ends at the deadline.
    let deadline = tokio::time::Instant::from_std(call.deadline);
    let first_byte_by = call.step_deadline(call.options.and_then(|o| o.first_byte_timeout));
    let mut conn = Box::pin(conn);
    let head = async {
        let mut send = std::pin::pin!(sender.send_request(request));
        let mut conn_done = false;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = send.as_mut().poll(cx) {
                return Poll::Ready(r.map_err(HttpError::from));
            }
            if !conn_done {
                let r = ready!(conn.as_mut().poll(cx));
                conn_done = true;
                return match r {
                    Ok(()) => send.as_mut().poll(cx).map_err(HttpError::from),
                    Err(e) => Poll::Ready(Err(HttpError::from(e))),
                };
            }
            Poll::Pending
        })
        .await
    };
    let response = match tokio::time::timeout_at(first_byte_by, head).await {
        Ok(r) => r?,
        Err(_) => {
            call.expired();
            return Err(HttpError::ConnectionReadTimeout);
        }
    };

    let shared = call.shared.clone();
    let by_message = call.by_message;
    // How the connection ended is logged here, with the pipeline, and never
    // handed back: wasmtime-wasi-http would log an error it gets from this
    // future itself, at WARN and without saying which pipeline (`dropping
    // error ...`). The plugin learns of it from the response body, which
    // fails the same way.
    let pipeline = call.policy.pipeline.clone();
    let host = target.shown.clone();
    let driver = async move {
        let error = match tokio::time::timeout_at(deadline, conn).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => HttpError::from(e).to_string(),
            Err(_) => HttpError::HttpResponseTimeout.to_string(),
        };
        tracing::debug!(
            pipeline = %pipeline,
            host = %crate::logtext::Escaped(&host),
            error = %error,
            "outbound HTTP: the connection ended before the response did"
        );
        Ok(())
    };
    let between = call.options.and_then(|o| o.between_bytes_timeout);
    let limit = call.policy.max_response_bytes;
    let response = response.map(move |incoming| {
        BoundedBody {
            inner: incoming,
            left: limit,
            limit,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            between: between.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
            shared,
            by_message,
            slot: Some(slot),
        }
        .boxed_unsync()
    });
    Ok((response, Box::new(driver)))
}

/// The sending half of an HTTP/1.1 connection, and its driver.
type Connected = (
    hyper::client::conn::http1::SendRequest<WasiBody>,
    hyper::client::conn::http1::Connection<TokioIo<Box<dyn Stream>>, WasiBody>,
);

/// Resolve (checking the addresses), connect, TLS, HTTP/1.1 handshake.
async fn connect(call: &Call, target: &Target) -> Result<Connected, HttpError> {
    let addrs = resolve(call, target).await?;

    // Connect to the addresses that were checked, in the resolver's order.
    let connect_by = call.step_deadline(call.options.and_then(|o| o.connect_timeout));
    let mut last_err = None;
    let mut stream = None;
    for addr in addrs {
        match tokio::time::timeout_at(connect_by, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                stream = Some(s);
                break;
            }
            Ok(Err(e)) => last_err = Some(e),
            Err(_) => {
                call.expired();
                return Err(HttpError::ConnectionTimeout);
            }
        }
    }
    let Some(stream) = stream else {
        return Err(last_err.map_or(HttpError::DestinationUnavailable, HttpError::Connect));
    };
    let _ = stream.set_nodelay(true);

    let io: Box<dyn Stream> = match target.scheme {
        Scheme::Http => Box::new(stream),
        Scheme::Https => {
            let tls = match &call.policy.tls {
                Ok(t) => t.clone(),
                Err(e) => {
                    tracing::warn!(pipeline = %call.policy.pipeline, error = %e, "HTTPS request failed: no TLS configuration");
                    return Err(HttpError::TlsCertificateError);
                }
            };
            let name = match &target.host {
                Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
                Host::Name(n) => {
                    ServerName::try_from(n.clone()).map_err(|_| HttpError::DnsError {
                        rcode: Some("invalid DNS name".to_string()),
                        info_code: None,
                    })?
                }
            };
            let connector = tokio_rustls::TlsConnector::from(tls);
            match tokio::time::timeout_at(connect_by, connector.connect(name, stream)).await {
                Ok(Ok(s)) => Box::new(s),
                Ok(Err(e)) => return Err(HttpError::Tls(e)),
                Err(_) => {
                    call.expired();
                    return Err(HttpError::ConnectionTimeout);
                }
            }
        }
    };

    match tokio::time::timeout_at(
        connect_by,
        hyper::client::conn::http1::handshake(TokioIo::new(io)),
    )
    .await
    {
        Ok(r) => Ok(r?),
        Err(_) => {
            call.expired();
            Err(HttpError::ConnectionTimeout)
        }
    }
}

/// The addresses to connect to: an IP literal as is; a name resolved once,
/// each address checked unless the rule names the host literally.
async fn resolve(call: &Call, target: &Target) -> Result<Vec<SocketAddr>, HttpError> {
    let name = match &target.host {
        // Only a rule naming this address matched (a wildcard never matches
        // an address), so it is allowed whatever its range.
        Host::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, target.port)]),
        Host::Name(n) => n.clone(),
    };
    // Pinned by the operator in `resolve`: no DNS, and no range check (the
    // check is against names that DNS points inward, not against addresses
    // the configuration names).
    if let Some(ips) = call.policy.pinned.get(&name) {
        return Ok(ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, target.port))
            .collect());
    }
    let by = call.step_deadline(None);
    let addrs: Vec<SocketAddr> = match tokio::time::timeout_at(
        by,
        tokio::net::lookup_host((name.as_str(), target.port)),
    )
    .await
    {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => {
            tracing::debug!(pipeline = %call.policy.pipeline, host = %name, error = %e, "outbound HTTP: name not resolved");
            return Err(HttpError::DnsError {
                rcode: Some(e.to_string()),
                info_code: None,
            });
        }
        Err(_) => {
            call.expired();
            return Err(HttpError::DnsTimeout);
        }
    };
    if addrs.is_empty() {
        return Err(HttpError::DestinationNotFound);
    }
    if let Some((ip, range)) = inward(&target.rule, &addrs) {
        let why = format!(
            "{name} resolves to {ip}, {range}; only a rule naming the host or address \
             literally allows that (rule {} is a wildcard)",
            target.rule
        );
        super::deny(
            &call.policy.pipeline,
            Some(&call.policy),
            &call.shared,
            &target.shown,
            &target.rule.text,
            &why,
        );
        return Err(HttpError::HttpRequestDenied);
    }
    Ok(addrs)
}

/// The first internal address among those a name resolved to, when the rule
/// that matched does not name the host literally. Any one refuses the whole
/// name: connecting to the others only would still let the name choose.
fn inward(rule: &Rule, addrs: &[SocketAddr]) -> Option<(std::net::IpAddr, &'static str)> {
    if rule.is_literal() {
        return None;
    }
    addrs
        .iter()
        .find_map(|a| refused_range(a.ip()).map(|r| (a.ip(), r)))
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T> Stream for T where T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}

/// A response body that fails once it passes `max_response_bytes`, once
/// the request's deadline is reached, or after the plugin's
/// between-bytes timeout without data.
struct BoundedBody {
    inner: hyper::body::Incoming,
    left: u64,
    limit: u64,
    deadline: Pin<Box<Sleep>>,
    between: Option<(std::time::Duration, Pin<Box<Sleep>>)>,
    shared: Arc<CallShared>,
    by_message: bool,
    /// The request's open slot, given back when the body ends or fails
    /// (before the plugin hears of it, so that its next request finds the
    /// slot free) or is dropped.
    slot: Option<OpenSlot>,
}

impl Body for BoundedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = &mut *self;
        let frame = this.poll_bounded(cx);
        let done = match &frame {
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if done {
            this.slot = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl BoundedBody {
    fn poll_bounded(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = u64::try_from(data.len()).unwrap_or(u64::MAX);
                    if n > this.left {
                        this.left = 0;
                        return Poll::Ready(Some(Err(HttpError::HttpResponseBodySize(Some(
                            this.limit,
                        )))));
                    }
                    this.left -= n;
                }
                if let Some((d, sleep)) = &mut this.between {
                    let next = tokio::time::Instant::now() + *d;
                    sleep.as_mut().reset(next);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(HttpError::from(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    if this.by_message {
                        this.shared.cut_by_deadline.store(true, Ordering::Relaxed);
                    }
                    return Poll::Ready(Some(Err(HttpError::HttpResponseTimeout)));
                }
                if let Some((_, sleep)) = &mut this.between
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout)));
                }
                Poll::Pending
            }
        }
    }
}

/// rustls settings for HTTPS: the system's root CAs plus those of
/// `ca_file`. HTTP/1.1 only (no ALPN), which every webhook endpoint speaks.
pub(super) fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system certificate rustls cannot use is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let pem = crate::pem::read_certificates(path)?;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert =
                cert.with_context(|| format!("{} is not a valid PEM file", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("{}: a certificate is not a usable CA", path.display()))?;
        }
    }
    if roots.is_empty() {
        bail!(
            "no CA certificate to verify servers with: the system store is empty or unreadable \
             ({} errors) and no http.ca_file is set",
            native.errors.len()
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addrs(ips: &[&str]) -> Vec<SocketAddr> {
        ips.iter()
            .map(|ip| SocketAddr::new(ip.parse().unwrap(), 443))
            .collect()
    }

    #[test]
    fn a_wildcard_name_resolving_inward_is_refused_a_literal_one_is_not() {
        let wildcard = Rule::parse("https://*.example.com").unwrap();
        let literal = Rule::parse("https://billing.internal").unwrap();
        let inside = addrs(&["93.184.216.34", "127.0.0.1"]);
        let (ip, range) = inward(&wildcard, &inside).unwrap();
        assert_eq!(ip.to_string(), "127.0.0.1");
        assert!(range.starts_with("loopback"));
        assert!(inward(&wildcard, &addrs(&["169.254.169.254"])).is_some());
        assert!(inward(&wildcard, &addrs(&["::ffff:10.0.0.1"])).is_some());
        assert!(inward(&wildcard, &addrs(&["93.184.216.34"])).is_none());
        assert!(inward(&literal, &inside).is_none());
    }
}
