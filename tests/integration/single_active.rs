//! `single_active_consumer = true`: of two warren replicas on one queue only
//! one receives messages; when it shuts down the other takes over and nothing
//! is lost. A queue declared earlier without the argument is refused by the
//! broker, and warren's error says why and what to do.

use std::collections::HashSet;
use std::time::Duration;

use warren::disposition::Disposition;
use warren_tests::{Client, config, eventually, start, text, unique};

use crate::pipeline;

const WAIT: Duration = Duration::from_secs(60);
const BATCH: usize = 20;

async fn send_batch(client: &Client, queue: &str, batch: usize) -> anyhow::Result<()> {
    for i in 0..BATCH {
        client
            .send(queue, format!("b{batch}-m{i}").as_bytes())
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn one_replica_handles_a_single_active_consumer_queue_and_the_other_takes_over_losing_nothing()
-> anyhow::Result<()> {
    let q = unique("sac");
    let out = format!("{q}.out");
    let client = Client::connect().await?;
    client.declare_queue(&out).await?;
    // concurrency 1: the setting users choose for ordering.
    let toml = pipeline(
        "sac",
        &q,
        "tag_a",
        "single_active_consumer = true\nconcurrency = 1\nprefetch = 4",
    );
    let first = start(config(&toml)?).await?;
    let second = start(config(&toml)?).await?;
    // tag_a publishes every message: its outcome is `publish`.
    let acked = |w: &warren::Running| {
        w.metrics()
            .pipeline("sac")
            .map_or(0, |m| m.outcome_count(Disposition::Publish))
    };

    // Both replicas are consuming (and ready), yet one handles everything.
    send_batch(&client, &q, 0).await?;
    let outputs = client.take(&out, BATCH, WAIT).await?;
    eventually(WAIT, || acked(&first) + acked(&second) == BATCH as u64).await?;
    let (a, b) = (acked(&first), acked(&second));
    assert!(
        (a, b) == (BATCH as u64, 0) || (a, b) == (0, BATCH as u64),
        "both replicas handled messages: {a} and {b}"
    );
    assert!(first.metrics().ready() && second.metrics().ready());
    let (active, standby) = if a > 0 {
        (first, second)
    } else {
        (second, first)
    };
    let mut bodies: HashSet<String> = outputs.iter().map(text).collect();

    // Messages queued while the active one shuts down, and after: the
    // standby takes over and everything is handled once more.
    send_batch(&client, &q, 1).await?;
    let active_metrics = active.metrics().clone();
    active.shutdown().await;
    send_batch(&client, &q, 2).await?;
    let outputs = client.take(&out, 2 * BATCH, WAIT).await?;
    bodies.extend(outputs.iter().map(text));
    let expected: HashSet<String> = (0..3)
        .flat_map(|b| (0..BATCH).map(move |i| format!("b{b}-m{i}")))
        .collect();
    assert_eq!(bodies, expected, "a message was lost or altered");
    let gone = active_metrics
        .pipeline("sac")
        .map_or(0, |m| m.outcome_count(Disposition::Publish));
    let took_over = acked(&standby);
    assert!(
        took_over >= BATCH as u64,
        "the standby handled {took_over}, fewer than the batch sent after the handover"
    );
    assert_eq!(gone + took_over, 3 * BATCH as u64, "handled twice or lost");
    client
        .expect_empty(&out, Duration::from_millis(500))
        .await?;
    assert_eq!(client.depth(&q).await?, 0);
    standby.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_queue_declared_without_single_active_consumer_is_refused_with_a_clear_error()
-> anyhow::Result<()> {
    let q = unique("sac-existing");
    // The queue exists as an earlier warren declared it, without the argument.
    let plain = start(config(&pipeline("plain", &q, "noop", ""))?).await?;
    plain.shutdown().await;

    let toml = pipeline("sac", &q, "noop", "single_active_consumer = true");
    let refused = warren::start(config(&toml)?).await?;
    let metrics = refused
        .metrics()
        .pipeline("sac")
        .expect("the pipeline's metrics");
    eventually(WAIT, || metrics.status.last_broker_error().is_some()).await?;
    let error = metrics.status.last_broker_error().unwrap_or_default();
    for part in [
        "PRECONDITION_FAILED",
        "x-single-active-consumer",
        "already exists with other arguments",
        "single_active_consumer",
        "delete the queue",
    ] {
        assert!(error.contains(part), "{part:?} missing from: {error}");
    }
    assert!(!refused.metrics().ready());
    refused.shutdown().await;
    Ok(())
}
