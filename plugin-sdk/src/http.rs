//! A small blocking HTTP client over `wasi:http/outgoing-handler`.
//!
//! warren denies every request unless the pipeline grants outbound HTTP in
//! `[pipeline.http]`, and then allows only the origins its `allowed_hosts`
//! names; anything else fails with [`Error::Denied`]. Each request is bounded
//! by the pipeline's `timeout_ms` and never outlives the message's own
//! deadline; the response body by `max_response_bytes`. Redirects are not
//! followed: a 3xx comes back as a [`Response`].
//!
//! ```no_run
//! use warren_plugin_sdk::http;
//!
//! # fn f() -> Result<(), http::Error> {
//! let res = http::post("https://hooks.example.com/notify")
//!     .header("authorization", "Bearer token")
//!     .json(&r#"{"text": "hello"}"#)
//!     .send()?;
//! if !res.is_success() {
//!     println!("status {}: {}", res.status, res.body_lossy());
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::Duration;

use wasip2::http::outgoing_handler;
pub use wasip2::http::types::Method;
use wasip2::http::types::{ErrorCode, Fields, IncomingBody, OutgoingBody, OutgoingRequest, Scheme};
use wasip2::io::streams::StreamError;

/// Bytes written to the request body per call (the most WASI's blocking
/// write takes at once).
const WRITE_CHUNK: usize = 4096;
/// Bytes asked for per read of the response body.
const READ_CHUNK: u64 = 64 * 1024;

/// A request being built; send it with [`Request::send`].
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// A `GET` request.
pub fn get(url: impl Into<String>) -> Request {
    request(Method::Get, url)
}

/// A `POST` request.
pub fn post(url: impl Into<String>) -> Request {
    request(Method::Post, url)
}

/// A `PUT` request.
pub fn put(url: impl Into<String>) -> Request {
    request(Method::Put, url)
}

/// A `DELETE` request.
pub fn delete(url: impl Into<String>) -> Request {
    request(Method::Delete, url)
}

/// A request with any method.
pub fn request(method: Method, url: impl Into<String>) -> Request {
    Request {
        method,
        url: url.into(),
        headers: Vec::new(),
        body: Vec::new(),
    }
}

impl Request {
    /// Add a header (repeat for more values).
    pub fn header(mut self, name: impl Into<String>, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((name.into(), value.as_ref().to_vec()));
        self
    }

    /// The request body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// A JSON body, with `content-type: application/json`: anything whose
    /// `Display` is JSON, such as a `serde_json::Value` or a string holding
    /// JSON text.
    pub fn json(self, value: &impl fmt::Display) -> Self {
        self.header("content-type", "application/json")
            .body(value.to_string())
    }

    /// Send the request and read the whole response. Blocks until the
    /// response is complete or fails.
    pub fn send(self) -> Result<Response, Error> {
        let url = Url::parse(&self.url)?;
        let mut entries: Vec<(String, Vec<u8>)> = self.headers;
        // A known length, so the body goes out with content-length rather
        // than chunked (which some servers refuse, and a GET should not use).
        let has_body = !self.body.is_empty()
            || matches!(self.method, Method::Post | Method::Put | Method::Patch);
        if has_body
            && !entries
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        {
            entries.push((
                "content-length".into(),
                self.body.len().to_string().into_bytes(),
            ));
        }
        let headers = Fields::from_list(&entries)
            .map_err(|e| Error::InvalidRequest(format!("header: {e:?}")))?;
        let req = OutgoingRequest::new(headers);
        let invalid = |what: &str| Error::InvalidRequest(format!("{what} refused by the host"));
        req.set_method(&self.method)
            .map_err(|()| invalid("method"))?;
        req.set_scheme(Some(&url.scheme))
            .map_err(|()| invalid("scheme"))?;
        req.set_authority(Some(&url.authority))
            .map_err(|()| invalid("authority"))?;
        req.set_path_with_query(Some(&url.path))
            .map_err(|()| invalid("path"))?;
        let out = if self.body.is_empty() {
            None
        } else {
            Some(req.body().map_err(|()| invalid("body"))?)
        };
        // The request goes out as soon as it is handed over; the body is
        // streamed to it afterwards (written first, it would wait for a
        // reader that does not exist yet).
        let pending = outgoing_handler::handle(req, None).map_err(Error::from_code)?;
        if let Some(out) = out {
            {
                let stream = out.write().map_err(|()| invalid("body stream"))?;
                for chunk in self.body.chunks(WRITE_CHUNK) {
                    if let Err(e) = stream.blocking_write_and_flush(chunk) {
                        // The request failed; its future says why.
                        drop(stream);
                        return Err(failure(&pending).unwrap_or(Error::from_stream(e)));
                    }
                }
            }
            OutgoingBody::finish(out, None).map_err(Error::from_code)?;
        }
        pending.subscribe().block();
        let incoming = match pending.get() {
            Some(Ok(Ok(res))) => res,
            Some(Ok(Err(code))) => return Err(Error::from_code(code)),
            Some(Err(())) | None => {
                return Err(Error::Other("the response was already taken".into()));
            }
        };
        let status = incoming.status();
        let headers = incoming
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let body_handle = incoming
            .consume()
            .map_err(|()| Error::Other("response body already taken".into()))?;
        let body = read_all(&body_handle)?;
        drop(IncomingBody::finish(body_handle));
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

fn failure(pending: &outgoing_handler::FutureIncomingResponse) -> Option<Error> {
    pending.subscribe().block();
    match pending.get() {
        Some(Ok(Err(code))) => Some(Error::from_code(code)),
        _ => None,
    }
}

fn read_all(body: &IncomingBody) -> Result<Vec<u8>, Error> {
    let stream = body
        .stream()
        .map_err(|()| Error::Other("response body stream already taken".into()))?;
    let mut out = Vec::new();
    loop {
        match stream.blocking_read(READ_CHUNK) {
            Ok(chunk) => out.extend_from_slice(&chunk),
            Err(StreamError::Closed) => return Ok(out),
            Err(e) => return Err(Error::from_stream(e)),
        }
    }
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code, e.g. 200.
    pub status: u16,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The whole body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text, invalid UTF-8 replaced.
    pub fn body_lossy(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `Retry-After` given in seconds (an HTTP date is not understood and
    /// gives `None`).
    pub fn retry_after(&self) -> Option<Duration> {
        let secs: u64 = self.header("retry-after")?.trim().parse().ok()?;
        Some(Duration::from_secs(secs))
    }
}

/// Why a request produced no response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The pipeline does not allow this request: its URL is not in
    /// `[pipeline.http] allowed_hosts`, the host resolves to an internal
    /// address, or the message used up `max_requests_per_message`.
    Denied,
    /// The server did not answer in time (the pipeline's `timeout_ms`, or
    /// the message's own deadline).
    Timeout,
    /// The response body is larger than `max_response_bytes`.
    TooLarge,
    /// The URL or a header cannot be sent.
    InvalidRequest(String),
    /// Any other failure, with wasi:http's error code.
    Other(String),
}

impl Error {
    fn from_code(code: ErrorCode) -> Self {
        match code {
            ErrorCode::HttpRequestDenied => Self::Denied,
            ErrorCode::ConnectionTimeout
            | ErrorCode::ConnectionReadTimeout
            | ErrorCode::HttpResponseTimeout
            | ErrorCode::DnsTimeout => Self::Timeout,
            ErrorCode::HttpResponseBodySize(_) => Self::TooLarge,
            other => Self::Other(format!("{other:?}")),
        }
    }

    fn from_stream(e: StreamError) -> Self {
        match e {
            StreamError::Closed => Self::Other("stream closed".into()),
            StreamError::LastOperationFailed(err) => {
                match wasip2::http::types::http_error_code(&err) {
                    Some(code) => Self::from_code(code),
                    None => Self::from_text(&err.to_debug_string()),
                }
            }
        }
    }

    /// wasmtime 48 hands the errors of a response body stream to the plugin
    /// without a wasi:http error code, only as text; the host's limits are
    /// recognised by it.
    fn from_text(text: &str) -> Self {
        let first = text.lines().next().unwrap_or("").trim();
        if first.contains("body size exceeds limit") {
            Self::TooLarge
        } else if first.contains("timeout") {
            Self::Timeout
        } else {
            Self::Other(first.to_string())
        }
    }

    /// Whether trying again later may help (a timeout or a failed
    /// connection), as opposed to a denial or a bad request.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Timeout | Self::Other(_))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Denied => f.write_str("HTTP request denied by the pipeline's allow-list"),
            Self::Timeout => f.write_str("HTTP request timed out"),
            Self::TooLarge => f.write_str("HTTP response larger than max_response_bytes"),
            Self::InvalidRequest(m) => write!(f, "invalid HTTP request: {m}"),
            Self::Other(m) => write!(f, "HTTP request failed: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// The parts of an absolute `http://` or `https://` URL that wasi:http takes.
#[derive(Debug)]
struct Url {
    scheme: Scheme,
    authority: String,
    path: String,
}

impl Url {
    fn parse(url: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::InvalidRequest(format!("URL {url:?}: {why}"));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("not absolute"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            _ => return Err(bad("only http and https are supported")),
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        // The fragment stays with the client.
        let path = path.split('#').next().unwrap_or("");
        let path = if path.is_empty() || path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        Ok(Self {
            scheme,
            authority: authority.to_string(),
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_what_wasi_http_takes() {
        let u = Url::parse("https://hooks.example.com:8443/a/b?x=1#frag").unwrap();
        assert!(matches!(u.scheme, Scheme::Https));
        assert_eq!(u.authority, "hooks.example.com:8443");
        assert_eq!(u.path, "/a/b?x=1");
        assert_eq!(Url::parse("http://h").unwrap().path, "/");
        assert_eq!(Url::parse("http://h?q").unwrap().path, "/?q");
        assert!(Url::parse("ftp://h/").is_err());
        assert!(Url::parse("h/x").is_err());
        assert!(Url::parse("http:///x").is_err());
    }

    #[test]
    fn body_errors_without_a_code_are_recognised_by_their_text() {
        assert_eq!(
            Error::from_text("HTTP response body size exceeds limit: 10 bytes\nStack backtrace:"),
            Error::TooLarge
        );
        assert_eq!(Error::from_text("HTTP response timeout"), Error::Timeout);
        assert_eq!(
            Error::from_text("connection reset\n  0: frame"),
            Error::Other("connection reset".into())
        );
    }
}
