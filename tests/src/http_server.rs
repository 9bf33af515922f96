//! A small real HTTP/1.1 server for the outbound-HTTP tests: plain threads
//! and std sockets (optionally rustls), answering each request as the test
//! says, and recording what it received. Not a mock of warren's client: the
//! requests arrive over TCP exactly as warren sends them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// One request as the server read it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the request was read.
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How to answer a request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Status, extra headers, body.
    Respond(u16, Vec<(String, String)>, Vec<u8>),
    /// Read the request, then never answer (the connection stays open until
    /// the server is dropped).
    Hang,
    /// Answer 200 with a head announcing this many body bytes, send one,
    /// then send nothing more (the connection stays open until the server is
    /// dropped): a response that stalls halfway.
    Stall(usize),
}

impl Reply {
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Self::Respond(200, Vec::new(), body.into())
    }
}

type Handler = dyn Fn(&Received) -> Reply + Send + Sync;

trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// A running server; stops accepting when dropped.
pub struct HttpServer {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl HttpServer {
    /// Plain HTTP on 127.0.0.1 with a free port.
    pub fn start(handler: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Result<Self> {
        Self::start_with(None, Arc::new(handler))
    }

    /// HTTPS with this certificate chain and key (PEM files).
    pub fn start_tls(
        cert: &Path,
        key: &Path,
        handler: impl Fn(&Received) -> Reply + Send + Sync + 'static,
    ) -> Result<Self> {
        let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(key)?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        Self::start_with(Some(Arc::new(config)), Arc::new(handler))
    }

    fn start_with(tls: Option<Arc<rustls::ServerConfig>>, handler: Arc<Handler>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, a, s) = (received.clone(), accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        let (h, r, s, tls) = (handler.clone(), r.clone(), s.clone(), tls.clone());
                        std::thread::spawn(move || {
                            let _ = stream.set_nonblocking(false);
                            let conn: Box<dyn Conn> = match tls {
                                None => Box::new(stream),
                                Some(cfg) => match rustls::ServerConnection::new(cfg) {
                                    Ok(c) => Box::new(rustls::StreamOwned::new(c, stream)),
                                    Err(_) => return,
                                },
                            };
                            serve(conn, &*h, &r, &s);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(Self {
            addr,
            received,
            accepted,
            stop,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:<port>` (or https) plus `path`.
    pub fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://127.0.0.1:{}{path}", self.port())
    }

    /// Requests read so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Wait until `n` requests were read.
    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> Result<Vec<Received>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received();
            if got.len() >= n {
                return Ok(got);
            }
            if Instant::now() >= deadline {
                bail!("{} requests within {timeout:?}, expected {n}", got.len());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Read requests off one connection and answer them until it closes.
fn serve(
    conn: Box<dyn Conn>,
    handler: &Handler,
    received: &Mutex<Vec<Received>>,
    stop: &AtomicBool,
) {
    let mut reader = BufReader::new(conn);
    loop {
        let req = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            _ => return,
        };
        let reply = handler(&req);
        if let Ok(mut g) = received.lock() {
            g.push(req);
        }
        match reply {
            Reply::Hang => {
                // Keep the connection open, answering nothing, until the
                // test is over.
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
            Reply::Stall(len) => {
                let head = format!("HTTP/1.1 200 X\r\ncontent-length: {len}\r\n\r\nx");
                let w = reader.get_mut();
                let _ = w.write_all(head.as_bytes());
                let _ = w.flush();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
            Reply::Respond(status, headers, body) => {
                let mut head = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", body.len());
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let w = reader.get_mut();
                if w.write_all(head.as_bytes()).is_err()
                    || w.write_all(&body).is_err()
                    || w.flush().is_err()
                {
                    return;
                }
            }
        }
    }
}

fn read_request(r: &mut BufReader<Box<dyn Conn>>) -> Result<Option<Received>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    let first = lines.first().context("empty request")?;
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines[1..]
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    if chunked {
        body = read_chunked(r)?;
    }
    Ok(Some(Received {
        method,
        path,
        headers,
        body,
        at: Instant::now(),
    }))
}

fn read_chunked(r: &mut BufReader<Box<dyn Conn>>) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        r.read_line(&mut size)?;
        let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)?;
        let mut chunk = vec![0; n + 2];
        r.read_exact(&mut chunk)?;
        if n == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..n]);
    }
}

/// A throwaway CA and a certificate for 127.0.0.1 signed by it, made with
/// the openssl command (as scripts/broker.sh does for the broker):
/// `(ca.pem, server.pem, server.key)` in `dir`.
pub fn test_ca(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let run = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl (apt-get install openssl)")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=warren test HTTP CA",
    ];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    run(&ca)?;
    let mut csr = vec!["req", "-subj", "/CN=127.0.0.1"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    run(&csr)?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ])?;
    Ok((
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    ))
}
