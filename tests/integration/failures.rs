//! Plugins that trap, loop or eat memory: each failure is charged to its own
//! message (retried, then dead-lettered with the reason) and the next message is
//! handled normally.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use warren::ops::FailureKind;

use warren::disposition::Disposition;
use warren::plugins::PluginLoader;
use warren::runtime::{InvokeLimits, Message, PluginFailure, RuntimeOptions, WasmRuntime};
use warren_tests::{Client, config, eventually, header, plugin, start, text, unique};

use crate::pipeline;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn trap_timeout_and_memory_hog_are_charged_to_their_message() -> anyhow::Result<()> {
    let q = unique("failures");
    // One attempt, so each failure goes straight to the DLQ; concurrency 1, so
    // the healthy message really runs after the failures on the same consumer.
    let extra = "concurrency = 1\n[pipeline.retry]\nmax_attempts = 1\n[pipeline.limits]\ntimeout_ms = 300\nmemory_mib = 32\n";
    let warren = start(config(&pipeline("failures", &q, "probe", extra))?).await?;
    let client = Client::connect().await?;
    let m = warren
        .metrics()
        .pipeline("failures")
        .expect("pipeline metrics");
    for cmd in ["trap", "spin", "hog", "ack"] {
        client.send(&q, cmd.as_bytes()).await?;
    }
    eventually(WAIT, || m.outcome_count(Disposition::Ack) == 1).await?;
    let parked = client.take(&format!("{q}.dlq"), 3, WAIT).await?;
    let reasons: BTreeMap<String, String> = parked
        .iter()
        .map(|d| (text(d), header(d, "x-warren-reason").unwrap_or_default()))
        .collect();
    assert!(reasons["trap"].contains("plugin trapped"), "{reasons:?}");
    assert!(
        reasons["trap"].contains("trap requested"),
        "panic message kept: {reasons:?}"
    );
    assert!(
        reasons["spin"].contains("timed out after 300 ms"),
        "{reasons:?}"
    );
    assert!(
        reasons["hog"].contains("memory limit of 32 MiB"),
        "{reasons:?}"
    );
    assert_eq!(m.failure_count(FailureKind::Trap), 1);
    assert_eq!(m.failure_count(FailureKind::Timeout), 1);
    assert_eq!(m.failure_count(FailureKind::Memory), 1);
    // Counted once the broker's confirm is in, which may be after the
    // effect itself has reached the test.
    eventually(WAIT, || m.outcome_count(Disposition::DeadLetter) == 3).await?;
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_failing_message_is_retried_with_backoff_before_it_is_parked() -> anyhow::Result<()> {
    let q = unique("trap-retry");
    let extra = "[pipeline.retry]\nmax_attempts = 3\ninitial_delay_ms = 50\nmax_delay_ms = 100\n";
    let warren = start(config(&pipeline("trap-retry", &q, "trap", extra))?).await?;
    let client = Client::connect().await?;
    let m = warren
        .metrics()
        .pipeline("trap-retry")
        .expect("pipeline metrics");
    client.send(&q, b"anything").await?;
    let d = client.take_one(&format!("{q}.dlq"), WAIT).await?;
    assert!(
        header(&d, "x-warren-reason")
            .is_some_and(|r| r.starts_with("gave up after 3 attempts: plugin trapped"))
    );
    assert_eq!(m.failure_count(FailureKind::Trap), 3);
    // Counted once the broker's confirm is in, which may be after the
    // effect itself has reached the test.
    eventually(WAIT, || m.outcome_count(Disposition::Retry) == 2).await?;
    warren.shutdown().await;
    Ok(())
}

fn invoke_fixture(
    name: &str,
    limits: InvokeLimits,
) -> anyhow::Result<Result<warren::runtime::Outcome, PluginFailure>> {
    let runtime = WasmRuntime::new(&RuntimeOptions::default())?;
    let loaded = PluginLoader::new(runtime, None)?.load(&plugin(name))?;
    let msg = Message {
        body: b"x".to_vec(),
        content_type: None,
        exchange: String::new(),
        routing_key: "rk".into(),
        queue: "q".into(),
        headers: vec![],
        message_id: None,
        correlation_id: None,
        reply_to: None,
        attempt: 1,
    };
    Ok(loaded
        .invoke(&msg, Arc::new(BTreeMap::new()), "fixture".into(), limits)
        .result)
}

#[test]
fn fixtures_fail_the_way_they_should_without_a_broker() -> anyhow::Result<()> {
    let limits = InvokeLimits::new(Duration::from_millis(100), 16 << 20);
    assert!(matches!(
        invoke_fixture("trap", limits)?,
        Err(PluginFailure::Trap(_))
    ));
    assert!(
        matches!(invoke_fixture("spin", limits)?, Err(PluginFailure::Timeout(t)) if t == limits.timeout)
    );
    // Time enough to reach the memory limit on a loaded machine: with the
    // 100 ms above, a slow allocation loop ended as a timeout instead.
    let hog_limits = InvokeLimits::new(Duration::from_secs(30), 16 << 20);
    assert!(
        matches!(invoke_fixture("hog", hog_limits)?, Err(PluginFailure::OutOfMemory(b)) if b == 16 << 20)
    );
    assert!(matches!(
        invoke_fixture("noop", limits)?,
        Ok(warren::runtime::Outcome::Ack)
    ));
    Ok(())
}
