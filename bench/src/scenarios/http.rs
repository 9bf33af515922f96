//! Scenario 9: the cost of one HTTP POST made by a plugin through warren
//! (wasi:http, the allow-list, warren's own connection), against the same
//! POST from a plain Rust client, to the same local server in the same run.
//!
//! warren's side is measured as a difference: RPC calls to the `probe` plugin
//! that POST (`http POST <url> <body>`) and calls that do not (`reply ok`) are
//! made alternately by one caller, so each pair runs under the same load; the
//! median of the pairs' differences is what the POST added to a message. The
//! plain client makes the same request in between: a new connection per
//! request (warren keeps none open either), HTTP/1.1, the response read to
//! the end of its head (a 204 has no body).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use warren_tests::http_server::{HttpServer, Reply};

use super::micros;
use super::rpc::Caller;
use crate::report::Row;
use crate::setup::{self, pipeline_toml, unique};
use crate::stats::{median, summarize};
use crate::{Options, amqp};

/// What the plugin and the plain client send: a small webhook payload.
const PAYLOAD: &str = r#"{"text":"deploy of v42 failed"}"#;
/// Rounds made (and discarded) before measuring.
const WARMUP: usize = 20;

pub async fn run(opts: &Options) -> Result<Vec<Row>> {
    let server = HttpServer::start(|_| Reply::Respond(204, Vec::new(), Vec::new()))?;
    let url = server.url("http", "/hook");
    let name = unique("http");
    let probe = opts.plugin("probe");
    let extra = format!(
        "concurrency = 1\n[pipeline.http]\nallowed_hosts = [{:?}]\n",
        server.url("http", "")
    );
    let config = setup::config(opts, &pipeline_toml(&name, &name, &probe, &extra))?;
    let p = setup::pipeline(&config, &name)?.clone();
    let running = warren::start(config).await?;
    let conn = amqp::connect(&opts.broker_url, "http-bench").await?;
    let result = async {
        running.wait_ready(Duration::from_secs(30)).await?;
        let mut caller = Caller::new(&conn).await?;
        let post = format!("http POST {url} {PAYLOAD}");
        let (mut with, mut without, mut diff, mut plain) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let end = Instant::now() + opts.duration;
        let mut round = 0usize;
        while Instant::now() < end || round < WARMUP + 3 {
            // Alternate which of the pair goes first.
            let (a, b) = if round.is_multiple_of(2) {
                let a = call(&mut caller, &name, "reply ok", "ok").await?;
                (a, call(&mut caller, &name, &post, "\"status\":204").await?)
            } else {
                let b = call(&mut caller, &name, &post, "\"status\":204").await?;
                (call(&mut caller, &name, "reply ok", "ok").await?, b)
            };
            let addr = server.addr;
            let c = tokio::task::spawn_blocking(move || plain_post(addr))
                .await
                .context("the plain client panicked")??;
            if round >= WARMUP {
                without.push(micros(a));
                with.push(micros(b));
                diff.push(micros(b) - micros(a));
                plain.push(micros(c));
            }
            round += 1;
        }
        anyhow::Ok((with, without, diff, plain))
    }
    .await;
    running.shutdown().await;
    amqp::delete_queues(&conn, &amqp::pipeline_queues(&p)).await?;
    let _ = conn.close(200, "done".into()).await;
    let (with, without, diff, plain) = result?;
    let pairs = diff.len();
    let cost = median(&diff);
    let plain = summarize(plain);
    let (with, without) = (summarize(with), summarize(without));
    Ok(vec![
        Row::new(
            "9 http",
            &format!("POST by a plugin, p50 of paired differences ({pairs} pairs)"),
            "µs",
            cost,
        )
        .baseline("plain Rust client", plain.p50)
        .compare(format!("{:+.0} µs", cost - plain.p50)),
        Row::new("9 http", "RPC call that POSTs, p50", "µs", with.p50),
        Row::new(
            "9 http",
            "RPC call without the POST, p50",
            "µs",
            without.p50,
        ),
        Row::new("9 http", "plain Rust client POST p99", "µs", plain.p99),
    ])
}

/// The plain client: one POST on a new connection, response read to the end.
fn plain_post(addr: SocketAddr) -> Result<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "POST /hook HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{PAYLOAD}",
        PAYLOAD.len()
    )?;
    // The head ends the answer: a 204 has no body (the server keeps the
    // connection open whatever `connection: close` says, so no EOF to wait for).
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("the server closed the connection before answering");
        }
        answer.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    let took = start.elapsed();
    if !answer.starts_with(b"HTTP/1.1 204") {
        bail!(
            "unexpected answer: {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(80)])
        );
    }
    Ok(took)
}

/// One call of `caller` whose reply must contain `expect`; its latency.
async fn call(caller: &mut Caller, queue: &str, body: &str, expect: &str) -> Result<Duration> {
    let (took, reply) = caller.request(queue, body.as_bytes()).await?;
    let text = String::from_utf8_lossy(&reply);
    if !text.contains(expect) {
        bail!("reply {text:?} does not contain {expect:?}");
    }
    Ok(took)
}
