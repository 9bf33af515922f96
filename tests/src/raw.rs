//! A publisher that writes AMQP 0-9-1 frames itself, for messages that a
//! well-behaved client library cannot produce but the broker accepts and
//! relays: header names that are not UTF-8, for one. Enough of the protocol
//! for PLAIN login, one channel, confirms and one publish; nothing else.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;
const LIMIT: Duration = Duration::from_secs(10);

/// A header as raw bytes: name and a long-string value.
pub type RawHeader = (Vec<u8>, Vec<u8>);

/// Publish `body` with `headers` to `exchange`/`routing_key` on the broker at
/// `url` (`amqp://user:password@host:port/%2f`, default vhost only) and wait
/// for the broker's confirm.
pub async fn publish(
    url: &str,
    exchange: &str,
    routing_key: &str,
    headers: &[RawHeader],
    body: &[u8],
) -> Result<()> {
    tokio::time::timeout(
        LIMIT,
        publish_inner(url, exchange, routing_key, headers, body),
    )
    .await
    .context("raw publish timed out")?
}

async fn publish_inner(
    url: &str,
    exchange: &str,
    routing_key: &str,
    headers: &[RawHeader],
    body: &[u8],
) -> Result<()> {
    let rest = url.strip_prefix("amqp://").context("only amqp:// URLs")?;
    let (creds, hostpart) = rest.split_once('@').context("no credentials in the URL")?;
    let (user, password) = creds.split_once(':').context("no password in the URL")?;
    let addr = hostpart.split('/').next().unwrap_or(hostpart);
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    s.write_all(b"AMQP\x00\x00\x09\x01").await?;
    expect_method(&mut s, 10, 10).await?; // connection.start

    let mut m = method(10, 11);
    m.extend_from_slice(&0u32.to_be_bytes()); // client properties: empty table
    short(&mut m, b"PLAIN");
    let response = [b"\0", user.as_bytes(), b"\0", password.as_bytes()].concat();
    long(&mut m, &response);
    short(&mut m, b"en_US");
    send(&mut s, FRAME_METHOD, 0, &m).await?;

    let tune = expect_method(&mut s, 10, 30).await?;
    let frame_max = tune
        .get(2..6)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(131_072);
    let channel_max = tune
        .get(0..2)
        .map_or(1, |b| u16::from_be_bytes([b[0], b[1]]));
    let mut m = method(10, 31);
    m.extend_from_slice(&channel_max.to_be_bytes());
    m.extend_from_slice(&frame_max.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
    send(&mut s, FRAME_METHOD, 0, &m).await?;

    let mut m = method(10, 40);
    short(&mut m, b"/");
    short(&mut m, b"");
    m.push(0);
    send(&mut s, FRAME_METHOD, 0, &m).await?;
    expect_method(&mut s, 10, 41).await?;

    let mut m = method(20, 10);
    short(&mut m, b"");
    send(&mut s, FRAME_METHOD, 1, &m).await?;
    expect_method(&mut s, 20, 11).await?;

    let mut m = method(85, 10); // confirm.select
    m.push(0);
    send(&mut s, FRAME_METHOD, 1, &m).await?;
    expect_method(&mut s, 85, 11).await?;

    let mut m = method(60, 40); // basic.publish
    m.extend_from_slice(&0u16.to_be_bytes());
    short(&mut m, exchange.as_bytes());
    short(&mut m, routing_key.as_bytes());
    m.push(0);
    send(&mut s, FRAME_METHOD, 1, &m).await?;

    let mut table = Vec::new();
    for (k, v) in headers {
        short(&mut table, k);
        table.push(b'S');
        long(&mut table, v);
    }
    let mut h = Vec::new();
    h.extend_from_slice(&60u16.to_be_bytes());
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&(body.len() as u64).to_be_bytes());
    h.extend_from_slice(&(0x2000u16 | 0x1000).to_be_bytes()); // headers, delivery mode
    long(&mut h, &table);
    h.push(2); // persistent
    send(&mut s, FRAME_HEADER, 1, &h).await?;
    send(&mut s, FRAME_BODY, 1, body).await?;
    let ack = read_method(&mut s).await?;
    if ack.get(..4) != Some(&[0, 60, 0, 80][..]) {
        bail!("expected basic.ack, got method {:?}", ack.get(..4));
    }

    let mut m = method(10, 50); // connection.close
    m.extend_from_slice(&200u16.to_be_bytes());
    short(&mut m, b"done");
    m.extend_from_slice(&[0, 0, 0, 0]);
    send(&mut s, FRAME_METHOD, 0, &m).await?;
    let _ = expect_method(&mut s, 10, 51).await;
    Ok(())
}

fn method(class: u16, id: u16) -> Vec<u8> {
    [class.to_be_bytes(), id.to_be_bytes()].concat()
}

fn short(out: &mut Vec<u8>, s: &[u8]) {
    out.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(&s[..s.len().min(255)]);
}

fn long(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(s);
}

async fn send(s: &mut TcpStream, kind: u8, channel: u16, payload: &[u8]) -> Result<()> {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&u32::try_from(payload.len())?.to_be_bytes());
    f.extend_from_slice(payload);
    f.push(FRAME_END);
    s.write_all(&f).await?;
    Ok(())
}

/// The payload of the next method frame (other frames are skipped).
async fn read_method(s: &mut TcpStream) -> Result<Vec<u8>> {
    loop {
        let mut head = [0u8; 7];
        s.read_exact(&mut head).await.context("reading a frame")?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        s.read_exact(&mut payload).await?;
        payload.pop();
        if head[0] == FRAME_METHOD {
            return Ok(payload);
        }
    }
}

async fn expect_method(s: &mut TcpStream, class: u16, id: u16) -> Result<Vec<u8>> {
    let p = read_method(s).await?;
    if p.get(..4) != Some(&method(class, id)[..]) {
        let text = String::from_utf8_lossy(&p);
        bail!("expected method {class}.{id}, got {:?}: {text}", p.get(..4));
    }
    Ok(p.get(4..).map(<[u8]>::to_vec).unwrap_or_default())
}
