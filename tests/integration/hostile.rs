//! Hostile input, refused effects and broker trouble, each against the real
//! broker and for quorum and classic queues alike: the pipeline keeps
//! consuming (no reconnect), the message ends in exactly one terminal place
//! with a reason, and nothing else is lost.

use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::BasicProperties;
use warren::disposition::Disposition;
use warren::envelope::header_frame_len;
use warren::suspects::Verdict;
use warren_tests::{
    Client, RpcClient, broker_url, config, eventually, header, headers, raw, start, text, unique,
};

use crate::{FAST_RETRY, pipeline};

const WAIT: Duration = Duration::from_secs(30);
const QUEUE_TYPES: [&str; 2] = ["quorum", "classic"];

/// Wait until `queue` exists (again).
async fn exists(client: &Client, queue: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.depth(queue).await.is_err() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{queue} was not declared again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A probe pipeline on a fresh queue of type `qt`.
async fn probe(qt: &str, prefix: &str) -> anyhow::Result<(warren::Running, String, String)> {
    let q = unique(&format!("{prefix}-{qt}"));
    let name = unique(prefix);
    let extra = format!("queue_type = {qt:?}\n{FAST_RETRY}");
    let warren = start(config(&pipeline(&name, &q, "probe", &extra))?).await?;
    Ok((warren, q, name))
}

#[tokio::test]
async fn a_deleted_dlq_or_retry_tier_is_declared_again() -> anyhow::Result<()> {
    let client = Client::connect().await?;
    for qt in QUEUE_TYPES {
        let (warren, q, name) = probe(qt, "missing").await?;
        let m = warren.metrics().pipeline(&name).expect("pipeline metrics");
        let dlq = format!("{q}.dlq");

        client.delete_queue(&dlq).await?;
        client.send(&q, b"dead-letter parked").await?;
        exists(&client, &dlq).await?;
        let d = client.take_one(&dlq, WAIT).await?;
        assert_eq!(
            header(&d, "x-warren-reason").as_deref(),
            Some("parked"),
            "{qt}"
        );

        // A retry tier gone: the retry still goes through it, three attempts.
        client.delete_queue(&format!("{q}.retry.100")).await?;
        client.send(&q, b"retry flaky").await?;
        let d = client.take_one(&dlq, WAIT).await?;
        assert_eq!(
            header(&d, "x-warren-reason").as_deref(),
            Some("gave up after 3 attempts: flaky"),
            "{qt}"
        );
        assert!(m.topology_repairs.load(Ordering::Relaxed) >= 2, "{qt}");
        assert_eq!(
            m.requeued.load(Ordering::Relaxed),
            0,
            "{qt}: never requeued"
        );
        assert_eq!(m.reconnects.load(Ordering::Relaxed), 0, "{qt}");
        assert_eq!(client.depth(&q).await?, 0, "{qt}");
        assert_eq!(client.depth(&dlq).await?, 0, "{qt}: exactly one copy");
        warren.shutdown().await;
    }
    Ok(())
}

#[tokio::test]
async fn a_header_name_that_is_not_utf8_does_not_stop_the_pipeline() -> anyhow::Result<()> {
    let client = Client::connect().await?;
    for qt in QUEUE_TYPES {
        let (warren, q, name) = probe(qt, "not-utf8").await?;
        let m = warren.metrics().pipeline(&name).expect("pipeline metrics");
        let dlq = format!("{q}.dlq");
        // What pika sends for headers={b"bad\xffkey": "v"}; RabbitMQ relays it.
        raw::publish(
            &broker_url(),
            "",
            &q,
            &[(b"bad\xffkey".to_vec(), b"v".to_vec())],
            b"dead-letter hostile header",
        )
        .await?;
        client.send(&q, b"ack").await?;
        let d = client.take_one(&dlq, WAIT).await?;
        assert_eq!(
            header(&d, "x-warren-reason").as_deref(),
            Some("hostile header"),
            "{qt}"
        );
        // The byte that is not UTF-8 reads as '?'; the value is intact.
        assert_eq!(header(&d, "bad?key").as_deref(), Some("v"), "{qt}");
        eventually(WAIT, || m.outcome_count(Disposition::Ack) == 1).await?;
        assert_eq!(m.reconnects.load(Ordering::Relaxed), 0, "{qt}");
        assert_eq!(client.depth(&q).await?, 0, "{qt}");
        warren.shutdown().await;
    }
    Ok(())
}

#[tokio::test]
async fn output_to_a_missing_exchange_is_dead_lettered_not_looped() -> anyhow::Result<()> {
    let client = Client::connect().await?;
    for qt in QUEUE_TYPES {
        // Listed, so the allow-list lets it through; `amq.*` is never
        // declared (clients may not), so it stays missing.
        let missing = format!("amq.{}", unique("no-such-exchange"));
        let q = unique(&format!("no-exchange-{qt}"));
        let name = unique("no-exchange");
        let extra = format!(
            "queue_type = {qt:?}\n{FAST_RETRY}[[pipeline.output]]\nexchange = {missing:?}\n"
        );
        let warren = start(config(&pipeline(&name, &q, "probe", &extra))?).await?;
        let m = warren.metrics().pipeline(&name).expect("pipeline metrics");
        let dlq = format!("{q}.dlq");
        client
            .send(&q, format!("publish {missing} key hello").as_bytes())
            .await?;
        client.send(&q, b"ack").await?;
        let d = client.take_one(&dlq, WAIT).await?;
        let reason = header(&d, "x-warren-reason").unwrap_or_default();
        assert!(
            reason.contains(&missing) && reason.contains("NOT_FOUND"),
            "{qt}: {reason}"
        );
        eventually(WAIT, || m.outcome_count(Disposition::Ack) == 1).await?;
        // Counted once the broker's confirm is in, which may be after the
        // effect itself has reached the test.
        eventually(WAIT, || m.outcome_count(Disposition::DeadLetter) == 1).await?;
        assert_eq!(m.reconnects.load(Ordering::Relaxed), 0, "{qt}");
        assert_eq!(client.depth(&q).await?, 0, "{qt}");
        warren.shutdown().await;
    }
    Ok(())
}

#[tokio::test]
async fn producer_headers_that_leave_no_room_are_dropped_from_the_copy() -> anyhow::Result<()> {
    let client = Client::connect().await?;
    let frame_max = client.conn.configuration().frame_max() as usize;
    for qt in QUEUE_TYPES {
        let (warren, q, name) = probe(qt, "frame-max").await?;
        let m = warren.metrics().pipeline(&name).expect("pipeline metrics");
        let dlq = format!("{q}.dlq");
        // A producer's header that just fits one frame: warren's own headers
        // on the dead-letter copy would push it past frame_max.
        let props = |n: usize| {
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers(&[("big", &"x".repeat(n))]))
        };
        let n = frame_max - 64 - header_frame_len(&props(0));
        assert!(header_frame_len(&props(n)) <= frame_max);
        client
            .publish("", &q, b"dead-letter too big", props(n))
            .await?;
        client.send(&q, b"ack").await?;
        let d = client.take_one(&dlq, WAIT).await?;
        assert_eq!(
            header(&d, "x-warren-reason").as_deref(),
            Some("too big"),
            "{qt}"
        );
        assert_eq!(header(&d, "big"), None, "{qt}");
        assert!(
            header(&d, "x-warren-dropped-headers").is_some_and(|h| h.contains("big")),
            "{qt}"
        );
        eventually(WAIT, || m.outcome_count(Disposition::Ack) == 1).await?;
        assert_eq!(m.reconnects.load(Ordering::Relaxed), 0, "{qt}");
        warren.shutdown().await;
    }
    Ok(())
}

#[tokio::test]
async fn forged_bookkeeping_headers_are_not_believed() -> anyhow::Result<()> {
    let client = Client::connect().await?;
    let (warren, q, _name) = probe("quorum", "forged").await?;
    let dlq = format!("{q}.dlq");
    let props = BasicProperties::default().with_headers(headers(&[
        ("x-warren-attempt", "999999"),
        ("x-warren-original-exchange", "forged"),
    ]));
    client.publish("", &q, b"retry flaky", props).await?;
    // Three real attempts, not one.
    let d = client.take_one(&dlq, WAIT).await?;
    assert_eq!(
        header(&d, "x-warren-reason").as_deref(),
        Some("gave up after 3 attempts: flaky")
    );
    assert_eq!(
        header(&d, "x-warren-original-exchange").as_deref(),
        Some("")
    );
    warren.shutdown().await;
    Ok(())
}

/// A direct reply-to address that names a process of a node that does not
/// exist: RabbitMQ 3.10 fails delivering the reply and closes warren's whole
/// connection (541 INTERNAL_ERROR), every time the request comes back.
const FORGED_REPLY_TO: &str =
    "amq.rabbitmq.reply-to.g2dkABN3YXJyZW4tNTgyMUBsb2NhbGhvc3QAAAPoAAAAAGD3l1kA.xyz";

#[tokio::test]
async fn a_message_that_keeps_killing_the_session_is_parked() -> anyhow::Result<()> {
    let client = Client::connect().await?;
    for qt in QUEUE_TYPES {
        let (warren, q, name) = probe(qt, "poison").await?;
        let m = warren.metrics().pipeline(&name).expect("pipeline metrics");
        let dlq = format!("{q}.dlq");
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_reply_to(FORGED_REPLY_TO.into());
        client.publish("", &q, b"reply hi", props).await?;
        for _ in 0..10 {
            client.send(&q, b"ack").await?;
        }
        let d = client.take_one(&dlq, WAIT).await?;
        let reason = header(&d, "x-warren-reason").unwrap_or_default();
        assert!(
            reason.contains("suspected poison message") && reason.contains("died 3 times"),
            "{qt}: {reason}"
        );
        // Counted once the original's ack is known to be taken, which
        // follows the DLQ copy's confirm.
        eventually(WAIT, || m.poison_parked.load(Ordering::Relaxed) >= 1).await?;
        assert_eq!(m.poison_parked.load(Ordering::Relaxed), 1, "{qt}");
        // The neighbours were all handled; the poison message was never
        // charged to the broker's own delivery limit, and nothing is left.
        eventually(WAIT, || m.outcome_count(Disposition::Ack) >= 10).await?;
        eventually(WAIT, || m.status.connected.load(Ordering::Relaxed)).await?;
        assert_eq!(client.depth(&q).await?, 0, "{qt}");
        assert_eq!(client.depth(&dlq).await?, 0, "{qt}: exactly one copy");
        warren.shutdown().await;
    }
    Ok(())
}

/// A forged direct reply-to kills only the connection its reply goes out on:
/// the consume session never reconnects, innocent RPC requests and
/// publishers beside it are all answered and handled, none is parked, and
/// the poison message is parked once, counted once.
#[tokio::test]
async fn a_forged_reply_to_takes_down_neither_the_session_nor_its_neighbours() -> anyhow::Result<()>
{
    let client = Client::connect().await?;
    let mut rpc = RpcClient::connect().await?;
    for qt in QUEUE_TYPES {
        let q = unique(&format!("forged-{qt}"));
        let name = unique("forged");
        let (out, dlq) = (format!("{q}.out"), format!("{q}.dlq"));
        client.declare_queue(&out).await?;
        // Several workers, so that innocent replies and effects are in
        // flight beside the forged one.
        let extra = format!("queue_type = {qt:?}\nconcurrency = 4\nprefetch = 16\n{FAST_RETRY}");
        let warren = start(config(&pipeline(&name, &q, "probe", &extra))?).await?;
        let m = warren.metrics().pipeline(&name).expect("pipeline metrics");
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_reply_to(FORGED_REPLY_TO.into());
        client.publish("", &q, b"reply hi", props).await?;
        for i in 0..10 {
            rpc.request(&q, format!("reply ok {i}").as_bytes(), &format!("{q}-{i}"))
                .await?;
            client
                .send(&q, format!("publish - {out} m{i}").as_bytes())
                .await?;
        }
        let d = client.take_one(&dlq, WAIT).await?;
        let reason = header(&d, "x-warren-reason").unwrap_or_default();
        assert!(
            reason.contains("suspected poison message") && reason.contains("died 3 times"),
            "{qt}: {reason}"
        );
        assert_eq!(text(&d), "reply hi", "{qt}: the forged request is parked");
        // Every innocent request is answered (a reply cut off by the forged
        // one's death may come twice: at least once).
        let mut answered = std::collections::HashSet::new();
        while answered.len() < 10 {
            let r = rpc.next_reply(WAIT).await?;
            let id = r
                .properties
                .correlation_id()
                .as_ref()
                .map(|s| s.to_string());
            if let Some(id) = id.filter(|id| id.starts_with(&q)) {
                answered.insert(id);
            }
        }
        eventually(WAIT, || {
            m.outcome_count(Disposition::Reply) == 10 && m.outcome_count(Disposition::Publish) == 10
        })
        .await?;
        eventually(WAIT, || m.in_flight.load(Ordering::Relaxed) == 0).await?;
        assert_eq!(client.depth(&q).await?, 0, "{qt}");
        assert_eq!(
            client.depth(&dlq).await?,
            0,
            "{qt}: only the forged one parked"
        );
        assert!(client.depth(&out).await? >= 10, "{qt}");
        assert_eq!(m.poison_parked.load(Ordering::Relaxed), 1, "{qt}");
        // The consume session never died: the forged reply took only the
        // reply connection, each time.
        assert_eq!(m.reconnects.load(Ordering::Relaxed), 0, "{qt}");
        assert!(m.session_death_count(Verdict::Charged) >= 1, "{qt}");
        warren.shutdown().await;
        delete_queues_of(&q).await?;
    }
    Ok(())
}

/// Delete `queue` and every queue named after it (DLQ, retry tiers, outputs),
/// so that a long-lived test broker does not keep them.
async fn delete_queues_of(queue: &str) -> anyhow::Result<()> {
    let (status, body) = warren_tests::mgmt("GET", "/api/queues/%2f?columns=name").await?;
    anyhow::ensure!(status == 200, "listing queues: {status} {body}");
    let all: Vec<serde_json::Value> = serde_json::from_str(&body)?;
    for name in all.iter().filter_map(|q| q["name"].as_str()) {
        if name == queue || name.starts_with(&format!("{queue}.")) {
            warren_tests::mgmt("DELETE", &format!("/api/queues/%2f/{name}")).await?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn outputs_and_log_lines_per_message_are_capped() -> anyhow::Result<()> {
    let q = unique("caps");
    let name = unique("caps");
    let out = format!("{q}.out");
    let extra = "[pipeline.limits]\nmax_outputs = 10\nmax_log_lines = 5\n";
    let warren = start(config(&pipeline(&name, &q, "probe", extra))?).await?;
    let client = Client::connect().await?;
    client.declare_queue(&out).await?;
    let m = warren.metrics().pipeline(&name).expect("pipeline metrics");

    client
        .send(&q, format!("publish-many - {out} 11").as_bytes())
        .await?;
    let d = client.take_one(&format!("{q}.dlq"), WAIT).await?;
    assert_eq!(
        header(&d, "x-warren-reason").as_deref(),
        Some("the plugin returned 11 outputs; limits.max_outputs allows 10")
    );
    client
        .send(&q, format!("publish-many - {out} 10").as_bytes())
        .await?;
    assert_eq!(client.take(&out, 10, WAIT).await?.len(), 10);

    client.send(&q, b"log-many 20 chatter").await?;
    eventually(WAIT, || m.outcome_count(Disposition::Ack) == 1).await?;
    assert_eq!(m.log_dropped.load(Ordering::Relaxed), 15);
    assert_eq!(client.depth(&q).await?, 0);
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn large_bodies_lower_the_prefetch_to_the_memory_budget() -> anyhow::Result<()> {
    let client = Client::connect().await?;
    for qt in QUEUE_TYPES {
        let q = unique(&format!("budget-{qt}"));
        let name = unique("budget");
        let extra =
            format!("queue_type = {qt:?}\nprefetch = 32\nconcurrency = 1\nmax_in_flight_mb = 4\n");
        let warren = start(config(&pipeline(&name, &q, "probe", &extra))?).await?;
        let m = warren.metrics().pipeline(&name).expect("pipeline metrics");
        // 1 MiB bodies (the probe ignores the padding after its command).
        let mut body = b"sleep 5".to_vec();
        body.resize(1 << 20, b' ');
        for _ in 0..20 {
            client.send(&q, &body).await?;
        }
        eventually(WAIT, || m.outcome_count(Disposition::Ack) == 20).await?;
        // 4 MiB hold four such bodies, not 32.
        assert_eq!(m.prefetch.load(Ordering::Relaxed), 4, "{qt}");
        assert_eq!(m.requeued.load(Ordering::Relaxed), 0, "{qt}");
        assert_eq!(client.depth(&q).await?, 0, "{qt}");
        warren.shutdown().await;
    }
    Ok(())
}
