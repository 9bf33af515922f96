//! Nothing lost, nothing doubled: every message sent ends up in exactly one of
//! acked, published output, RPC reply or dead-letter queue, also when some
//! handlers call an HTTP service that answers, fails, hangs past the
//! message's deadline, or is not allowed.

use std::collections::HashSet;
use std::time::Duration;

use lapin::BasicProperties;
use warren::disposition::Disposition;
use warren_tests::http_server::{HttpServer, Reply};
use warren_tests::{Client, RpcClient, config, eventually, header, start, text, unique};

use crate::{output_queue, pipeline};

#[tokio::test]
async fn every_message_ends_up_in_exactly_one_place() -> anyhow::Result<()> {
    // The service: its answer depends on the id it is sent (`h<i>`).
    let service = HttpServer::start(|r| {
        let id = String::from_utf8_lossy(&r.body);
        let i: usize = id.trim_start_matches('h').parse().unwrap_or(0);
        match i % 5 {
            1 => Reply::Respond(500, Vec::new(), b"failed".to_vec()),
            3 => Reply::Hang,
            _ => Reply::ok("ok"),
        }
    })?;
    let elsewhere = HttpServer::start(|_| Reply::ok("must not be reached"))?;
    let q = unique("conserve");
    let out = unique("conserve-out");
    // The message deadline ends the hung requests; it is generous, so that an
    // answered request is never cut on a loaded machine.
    let extra = format!(
        "concurrency = 4\nprefetch = 32\n[pipeline.retry]\nmax_attempts = 1\n[pipeline.limits]\ntimeout_ms = 2000\n\
         [pipeline.http]\nallowed_hosts = [{:?}]\n{}",
        service.url("http", ""),
        output_queue(&out)
    );
    let warren = start(config(&pipeline("conserve", &q, "probe", &extra))?).await?;
    let client = Client::connect().await?;
    client.declare_queue(&out).await?;
    let mut rpc = RpcClient::connect().await?;
    let n = 400usize;
    let (mut acks, mut outputs, mut replies, mut parked) =
        (0, HashSet::new(), HashSet::new(), HashSet::new());
    let (mut hung, mut called) = (0, 0);
    for i in 0..n {
        let id = format!("m{i}");
        if i % 8 == 7 {
            // One in eight calls the service: published when it answers 2xx,
            // parked (reason: its id) on 500 or denial, parked as timed out
            // (its message id) when the server hangs.
            let hid = format!("h{i}");
            let url = if i % 5 == 4 {
                elsewhere.url("http", "/")
            } else {
                called += 1;
                service.url("http", "/")
            };
            match i % 5 {
                0 | 2 => outputs.insert(hid.clone()),
                3 => {
                    hung += 1;
                    parked.insert(hid.clone())
                }
                _ => parked.insert(hid.clone()),
            };
            let props = BasicProperties::default().with_message_id(hid.as_str().into());
            let body = format!("http-publish {url} - {out} {hid}");
            client.publish("", &q, body.as_bytes(), props).await?;
            continue;
        }
        match i % 5 {
            0 => {
                acks += 1;
                client.send(&q, b"ack").await?;
            }
            1 => {
                outputs.insert(id.clone());
                client
                    .send(&q, format!("publish - {out} {id}").as_bytes())
                    .await?;
            }
            2 => {
                replies.insert(id.clone());
                rpc.request(&q, format!("reply {id}").as_bytes(), &id)
                    .await?;
            }
            3 => {
                parked.insert(id.clone());
                client
                    .send(&q, format!("dead-letter {id}").as_bytes())
                    .await?;
            }
            _ => {
                // A trap is a failure of its message only; with one attempt it is parked.
                parked.insert(id.clone());
                let props = BasicProperties::default().with_message_id(id.as_str().into());
                client.publish("", &q, b"trap", props).await?;
            }
        }
    }
    let m = warren
        .metrics()
        .pipeline("conserve")
        .expect("pipeline metrics");
    let wait = Duration::from_secs(60);
    eventually(wait, || m.outcome_count(Disposition::Ack) as usize == acks).await?;

    let got_out: Vec<String> = client
        .take(&out, outputs.len(), wait)
        .await?
        .iter()
        .map(text)
        .collect();
    assert_eq!(got_out.iter().cloned().collect::<HashSet<_>>(), outputs);
    assert_eq!(got_out.len(), outputs.len(), "duplicated outputs");

    let got_replies = rpc.replies(replies.len(), wait).await?;
    for (id, r) in &got_replies {
        assert_eq!(&text(r), id);
    }
    assert_eq!(got_replies.into_keys().collect::<HashSet<_>>(), replies);

    let dlq = format!("{q}.dlq");
    let got_parked: Vec<String> = client
        .take(&dlq, parked.len(), wait)
        .await?
        .iter()
        .map(|d| match header(d, "x-warren-reason") {
            Some(r) if r.contains("plugin trapped") || r.contains("timed out") => d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            Some(r) => r,
            None => String::new(),
        })
        .collect();
    assert_eq!(got_parked.iter().cloned().collect::<HashSet<_>>(), parked);
    assert_eq!(got_parked.len(), parked.len(), "duplicated dead letters");

    client
        .expect_empty(&out, Duration::from_millis(300))
        .await?;
    assert_eq!(client.depth(&dlq).await?, 0);
    assert_eq!(client.depth(&q).await?, 0);
    assert_eq!(m.requeued.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(hung > 0);
    assert_eq!(elsewhere.accepted(), 0, "a denied request reached a server");
    // Every allowed call reached the service exactly once.
    let mut calls: Vec<String> = service
        .received()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    calls.sort_unstable();
    let before = calls.len();
    calls.dedup();
    assert_eq!(calls.len(), before, "a call was made twice");
    assert_eq!(calls.len(), called);
    // Counted once the broker's confirms are in, which may be after the
    // effects themselves have reached the test.
    let settled = || -> u64 { Disposition::ALL.iter().map(|d| m.outcome_count(*d)).sum() };
    eventually(Duration::from_secs(30), || settled() as usize >= n).await?;
    assert_eq!(settled() as usize, n, "every delivery settled exactly once");
    warren.shutdown().await;
    Ok(())
}
