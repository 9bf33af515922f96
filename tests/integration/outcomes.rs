//! Every outcome kind through a real broker, driven by the `probe` plugin.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use warren::disposition::Disposition;
use warren_tests::{Client, RpcClient, config, eventually, header, start, text, unique};

use crate::{FAST_RETRY, output_queue, pipeline};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn every_outcome_kind_reaches_the_broker() -> anyhow::Result<()> {
    let q = unique("outcomes");
    let out = unique("outcomes-out");
    let extra = format!("{FAST_RETRY}{}", output_queue(&out));
    let warren = start(config(&pipeline("outcomes", &q, "probe", &extra))?).await?;
    let client = Client::connect().await?;
    client.declare_queue(&out).await?;
    let m = warren
        .metrics()
        .pipeline("outcomes")
        .expect("pipeline metrics");

    // ack: consumed, nothing published, counted.
    client.send(&q, b"ack").await?;
    eventually(WAIT, || m.outcome_count(Disposition::Ack) == 1).await?;

    // publish: the output arrives with the plugin's and warren's headers.
    client
        .send(&q, format!("publish - {out} hello").as_bytes())
        .await?;
    let d = client.take_one(&out, WAIT).await?;
    assert_eq!(text(&d), "hello");
    assert_eq!(header(&d, "x-probe").as_deref(), Some("1"));
    assert_eq!(header(&d, "x-warren-pipeline").as_deref(), Some("outcomes"));
    assert_eq!(header(&d, "x-warren-plugin").as_deref(), Some("probe"));
    assert_eq!(
        header(&d, "x-warren-plugin-version").map(|v| v.len()),
        Some(12)
    );
    assert_eq!(
        *d.properties.delivery_mode(),
        Some(2),
        "outputs are persistent"
    );

    // reply, and reply with an extra publish.
    let mut rpc = RpcClient::connect().await?;
    let r = rpc.call(&q, b"reply pong", WAIT).await?;
    assert_eq!(text(&r), "pong");
    let r = rpc
        .call(&q, format!("reply-publish - {out} both").as_bytes(), WAIT)
        .await?;
    assert_eq!(text(&r), "both");
    assert_eq!(text(&client.take_one(&out, WAIT).await?), "both");

    // dead-letter: the original body parks in the DLQ with the bookkeeping headers.
    let dlq = format!("{q}.dlq");
    let props = BasicProperties::default()
        .with_message_id("m-1".into())
        .with_headers(warren_tests::headers(&[("traceparent", "00-abc-def-01")]));
    client
        .publish("", &q, b"dead-letter poison pill", props)
        .await?;
    let d = client.take_one(&dlq, WAIT).await?;
    assert_eq!(text(&d), "dead-letter poison pill");
    assert_eq!(
        header(&d, "x-warren-reason").as_deref(),
        Some("poison pill")
    );
    assert_eq!(header(&d, "x-warren-attempts").as_deref(), Some("1"));
    assert_eq!(header(&d, "x-warren-plugin").as_deref(), Some("probe"));
    assert_eq!(
        header(&d, "x-warren-plugin-digest").map(|v| v.len()),
        Some(64)
    );
    assert_eq!(
        header(&d, "x-warren-original-routing-key").as_deref(),
        Some(q.as_str())
    );
    assert!(header(&d, "x-warren-first-failure").is_some_and(|t| t.ends_with('Z')));
    assert_eq!(header(&d, "traceparent").as_deref(), Some("00-abc-def-01"));
    assert_eq!(
        d.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("m-1")
    );

    // A reply to a message without reply_to is dead-lettered, not dropped.
    client.send(&q, b"reply to nobody").await?;
    let d = client.take_one(&dlq, WAIT).await?;
    assert!(
        header(&d, "x-warren-reason").is_some_and(|r| r.contains("no reply-to")),
        "{:?}",
        header(&d, "x-warren-reason")
    );

    // retry until attempts run out: 3 attempts, 100 ms + 200 ms of delay, then DLQ.
    let t0 = Instant::now();
    client.send(&q, b"retry flaky").await?;
    let d = client.take_one(&dlq, WAIT).await?;
    let took = t0.elapsed();
    assert_eq!(
        header(&d, "x-warren-reason").as_deref(),
        Some("gave up after 3 attempts: flaky")
    );
    assert_eq!(header(&d, "x-warren-attempts").as_deref(), Some("3"));
    assert_eq!(
        header(&d, "x-warren-retry-reason").as_deref(),
        Some("flaky")
    );
    assert!(
        took >= Duration::from_millis(300),
        "retry delays not honoured: {took:?}"
    );

    // A transient failure that clears: two retries, then ack.
    let acks = m.outcome_count(Disposition::Ack);
    let retries = m.outcome_count(Disposition::Retry);
    client.send(&q, b"fail-until 3").await?;
    eventually(WAIT, || m.outcome_count(Disposition::Ack) == acks + 1).await?;
    // Counted once the broker's confirm is in, which may be after the
    // effect itself has reached the test.
    eventually(WAIT, || m.outcome_count(Disposition::Retry) == retries + 2).await?;

    assert_eq!(client.depth(&q).await?, 0);
    assert_eq!(client.depth(&dlq).await?, 0);
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_requested_delay_uses_the_matching_tier() -> anyhow::Result<()> {
    let q = unique("delay");
    let extra = "[pipeline.retry]\nmax_attempts = 2\ninitial_delay_ms = 100\nmax_delay_ms = 1600\njitter = 0.0\n";
    let warren = start(config(&pipeline("delay", &q, "probe", extra))?).await?;
    let client = Client::connect().await?;
    for ms in [100, 200, 400, 800, 1600] {
        assert_eq!(
            client.depth(&format!("{q}.retry.{ms}")).await?,
            0,
            "tier {ms} declared"
        );
    }
    let t0 = Instant::now();
    // 1000 ms rounds up to the 1600 ms tier; the second attempt gives up.
    client.send(&q, b"retry-after 1000 later").await?;
    let d = client
        .take_one(&format!("{q}.dlq"), Duration::from_secs(15))
        .await?;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1600),
        "came back after {took:?}"
    );
    assert_eq!(
        header(&d, "x-warren-reason").as_deref(),
        Some("gave up after 2 attempts: later")
    );
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn plugin_config_and_message_fields_reach_the_plugin() -> anyhow::Result<()> {
    let q = unique("meta");
    let extra = "[pipeline.config]\ngreeting = \"hej\"\n";
    let warren = start(config(&pipeline("meta", &q, "probe", extra))?).await?;
    let mut rpc = RpcClient::connect().await?;
    let r = rpc.call(&q, b"config greeting", WAIT).await?;
    assert_eq!(text(&r), "hej");
    let r = rpc.call(&q, b"config missing", WAIT).await?;
    assert_eq!(text(&r), "<none>");
    let r = rpc.call(&q, b"echo-meta", WAIT).await?;
    let meta: serde_json::Value = serde_json::from_slice(&r.data)?;
    assert_eq!(meta["queue"], q.as_str());
    assert_eq!(meta["routing_key"], q.as_str());
    assert_eq!(meta["attempt"], 1);
    assert_eq!(
        meta["reply_to"]
            .as_str()
            .map(|s| s.starts_with("amq.rabbitmq.reply-to")),
        Some(true)
    );
    warren.shutdown().await;
    Ok(())
}
