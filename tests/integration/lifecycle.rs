//! Losing the broker connection, and shutting down with messages in flight.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use warren::disposition::Disposition;
use warren_tests::{Client, config, eventually, kill_connections, start, text, unique};

use crate::{output_queue, pipeline};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_lost_connection_is_recovered_without_losing_messages() -> anyhow::Result<()> {
    let q = unique("recover");
    let out = unique("recover-out");
    let name = unique("recover-pipeline");
    let extra = format!("concurrency = 2\n{}", output_queue(&out));
    let warren = start(config(&pipeline(&name, &q, "probe", &extra))?).await?;
    let client = Client::connect().await?;
    client.declare_queue(&out).await?;
    let m = warren.metrics().pipeline(&name).expect("pipeline metrics");

    let n = 200;
    for i in 0..n / 2 {
        client
            .send(&q, format!("publish - {out} m{i}").as_bytes())
            .await?;
    }
    // Cut warren's connection as a broker restart would, mid-stream. The
    // management API lists a new connection only after its next stats
    // refresh (seconds), so ask until it shows up.
    let deadline = tokio::time::Instant::now() + WAIT;
    let closed = loop {
        let closed = kill_connections(&format!("warren/{name}")).await?;
        if closed > 0 || tokio::time::Instant::now() >= deadline {
            break closed;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(closed, 1, "warren holds one connection per pipeline");
    for i in n / 2..n {
        client
            .send(&q, format!("publish - {out} m{i}").as_bytes())
            .await?;
    }
    eventually(WAIT, || {
        m.reconnects.load(Ordering::Relaxed) >= 1 && m.status.connected.load(Ordering::Relaxed)
    })
    .await?;

    // At-least-once: every message comes out; one in flight at the cut may
    // come out twice, never zero times.
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < n && tokio::time::Instant::now() < deadline {
        if let Ok(d) = client.take_one(&out, Duration::from_secs(1)).await {
            seen.insert(text(&d));
        }
    }
    assert_eq!(seen.len(), n, "missing outputs after the reconnect");
    assert_eq!(client.depth(&q).await?, 0);
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn shutdown_lets_in_flight_messages_finish() -> anyhow::Result<()> {
    let q = unique("drain");
    let warren = start(config(&pipeline(
        "drain",
        &q,
        "probe",
        "concurrency = 4\nprefetch = 4\n",
    ))?)
    .await?;
    let client = Client::connect().await?;
    let m = warren
        .metrics()
        .pipeline("drain")
        .expect("pipeline metrics");
    // Four long calls and four quick ones queued behind them.
    for _ in 0..4 {
        client.send(&q, b"sleep 2500").await?;
    }
    for _ in 0..4 {
        client.send(&q, b"ack").await?;
    }
    eventually(WAIT, || m.in_flight.load(Ordering::Relaxed) >= 1).await?;
    let running = u64::try_from(m.in_flight.load(Ordering::Relaxed)).unwrap_or(0);
    warren.shutdown().await;
    // Whatever was running when the stop came was settled before warren
    // stopped (at least the calls seen running; on a slow machine more may
    // have started before the stop), and whatever had not started stays in
    // the queue for the next consumer: nothing is both, nothing is neither,
    // however the calls and the stop interleaved.
    let acks = m.outcome_count(Disposition::Ack);
    assert!(
        acks >= running.max(1),
        "{acks} settled, {running} were running"
    );
    assert_eq!(m.in_flight.load(Ordering::Relaxed), 0);
    assert_eq!(m.requeued.load(Ordering::Relaxed), 0);
    assert_eq!(u64::from(client.depth(&q).await?) + acks, 8);
    Ok(())
}

#[tokio::test]
async fn shutdown_after_a_drain_does_not_wait_out_the_grace() -> anyhow::Result<()> {
    // At shutdown every worker of a pipeline must see that the consumer has
    // ended. A worker that started waiting on the ended stream would hold the
    // stop until the grace ran out; it is a race between the workers, so it
    // gets several chances to show.
    let client = Client::connect().await?;
    for round in 0..6 {
        let q = unique("quiet-stop");
        let name = unique("quiet-stop-pipeline");
        let mut cfg = config(&pipeline(
            &name,
            &q,
            "noop",
            "concurrency = 4\nprefetch = 64\n",
        ))?;
        cfg.ops.shutdown_grace_ms = 120_000;
        let warren = start(cfg).await?;
        let m = warren.metrics().pipeline(&name).expect("pipeline metrics");
        for _ in 0..300 {
            client.send(&q, b"x").await?;
        }
        eventually(WAIT, || m.outcome_count(Disposition::Ack) == 300).await?;
        let stopping = std::time::Instant::now();
        warren.shutdown().await;
        let took = stopping.elapsed();
        assert!(
            took < WAIT,
            "round {round}: stopping an idle pipeline took {took:?}, as if a worker waited out the grace"
        );
    }
    Ok(())
}

/// What a test leaves on the test broker: nothing. The queues warren made for
/// a quorum pipeline (queue, DLQ, every retry tier) and the test's own are
/// deleted when the test's thread ends, as libtest ends every test.
#[test]
fn a_tests_queues_are_deleted_when_the_test_ends() -> anyhow::Result<()> {
    let q = unique("cleanup");
    let collect = unique("cleanup-collect");
    let extra = format!("queue_type = \"quorum\"\n{}", crate::FAST_RETRY);
    let cfg = config(&pipeline("cleanup", &q, "probe", &extra))?;
    let tiers: Vec<String> = warren::retry::RetryTiers::new(&cfg.pipelines[0].retry)
        .delays_ms()
        .iter()
        .map(|ms| warren::retry::tier_queue(&q, *ms))
        .collect();
    let mut made = vec![q.clone(), format!("{q}.dlq"), collect.clone()];
    made.extend(tiers);
    // A test of its own, on a thread of its own, as libtest runs it.
    let names = made.clone();
    std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let warren = start(cfg).await?;
            let client = Client::connect().await?;
            client.declare_queue(&collect).await?;
            client.send(&q, b"dead-letter parked").await?;
            client.take_one(&format!("{q}.dlq"), WAIT).await?;
            warren.shutdown().await;
            for name in &names {
                client.depth(name).await?;
            }
            anyhow::Ok(())
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the inner test panicked"))??;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = Client::connect().await?;
        for name in &made {
            anyhow::ensure!(
                client.depth(name).await.is_err(),
                "{name} is still on the broker"
            );
        }
        anyhow::Ok(())
    })
}
