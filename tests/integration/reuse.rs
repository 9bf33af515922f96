//! `instance = "reuse"`: one instance handles several messages and keeps its
//! state between them; a failed call, `max_messages_per_instance` and a
//! reload each start a fresh one. The `probe` plugin's `count` command
//! replies with how many `count` calls its instance has handled.

use std::time::Duration;

use warren_tests::{Client, RpcClient, config, plugin, start, text, unique};

use crate::{pipeline, pipeline_at};

const WAIT: Duration = Duration::from_secs(30);

/// One worker, so every message meets the same instance (when it is kept);
/// failures dead-letter at once so no retried copy comes back later. The
/// timeout is generous: `hog` must reach the memory limit before it, however
/// slowly a loaded machine hands out the pages.
fn reuse(extra: &str) -> String {
    format!(
        "concurrency = 1\n{extra}\n[pipeline.retry]\nmax_attempts = 1\n\
         [pipeline.limits]\ntimeout_ms = 2000\nmemory_mib = 32\n"
    )
}

async fn counts(rpc: &mut RpcClient, q: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        got.push(text(&rpc.call(q, b"count", WAIT).await?));
    }
    Ok(got)
}

#[tokio::test]
async fn a_fresh_instance_forgets_and_a_reused_one_remembers() -> anyhow::Result<()> {
    let (fresh, kept) = (unique("reuse-fresh"), unique("reuse-kept"));
    let warren = start(config(&format!(
        "{}{}",
        pipeline("fresh", &fresh, "probe", &reuse("")),
        pipeline("kept", &kept, "probe", &reuse("instance = \"reuse\"")),
    ))?)
    .await?;
    let mut rpc = RpcClient::connect().await?;
    assert_eq!(counts(&mut rpc, &fresh, 3).await?, ["1", "1", "1"]);
    assert_eq!(counts(&mut rpc, &kept, 4).await?, ["1", "2", "3", "4"]);
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_failed_call_discards_the_instance_and_limits_stay_per_message() -> anyhow::Result<()> {
    let q = unique("reuse-fail");
    let warren = start(config(&pipeline(
        "reuse-fail",
        &q,
        "probe",
        &reuse("instance = \"reuse\""),
    ))?)
    .await?;
    let mut rpc = RpcClient::connect().await?;
    let client = Client::connect().await?;
    let dlq = format!("{q}.dlq");
    assert_eq!(counts(&mut rpc, &q, 2).await?, ["1", "2"]);

    // A trap: the next message meets a new instance.
    client.send(&q, b"trap").await?;
    assert_eq!(counts(&mut rpc, &q, 2).await?, ["1", "2"]);

    // A timeout: the deadline applies to this call of a reused instance
    // (not to its instantiation long ago), and the instance is discarded.
    client.send(&q, b"spin").await?;
    assert_eq!(counts(&mut rpc, &q, 1).await?, ["1"]);
    client.send(&q, b"spin").await?;
    // The memory limit, too, holds for each call.
    client.send(&q, b"hog").await?;
    assert_eq!(counts(&mut rpc, &q, 1).await?, ["1"]);

    let parked = client.take(&dlq, 4, WAIT).await?;
    let reasons: Vec<String> = parked
        .iter()
        .map(|d| warren_tests::header(d, "x-warren-reason").unwrap_or_default())
        .collect();
    assert!(reasons[0].contains("trap"), "{reasons:?}");
    assert!(
        reasons[1].contains("timed out after 2000 ms"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("timed out after 2000 ms"),
        "{reasons:?}"
    );
    assert!(reasons[3].contains("memory limit of 32 MiB"), "{reasons:?}");
    warren.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_instance_handles_at_most_max_messages_per_instance() -> anyhow::Result<()> {
    let q = unique("reuse-max");
    let warren = start(config(&pipeline(
        "reuse-max",
        &q,
        "probe",
        &reuse("instance = \"reuse\"\nmax_messages_per_instance = 3"),
    ))?)
    .await?;
    let mut rpc = RpcClient::connect().await?;
    assert_eq!(
        counts(&mut rpc, &q, 7).await?,
        ["1", "2", "3", "1", "2", "3", "1"]
    );
    warren.shutdown().await;
    Ok(())
}

/// `probe` with a custom section appended: the same behaviour, another
/// digest, so warren takes it for a new version.
fn another_version_of_probe() -> anyhow::Result<Vec<u8>> {
    let mut bytes = std::fs::read(plugin("probe"))?;
    let name = b"warren-test-version";
    let payload = unique("v");
    let size = 1 + name.len() + payload.len();
    anyhow::ensure!(size < 128, "the section size must fit one LEB128 byte");
    // Custom section: id 0, size, name length, name, payload.
    bytes.extend([0, size as u8, name.len() as u8]);
    bytes.extend(name);
    bytes.extend(payload.as_bytes());
    Ok(bytes)
}

#[tokio::test]
async fn a_reload_starts_from_fresh_instances_of_the_new_version() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(unique("reuse-reload"));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("probe.wasm");
    std::fs::copy(plugin("probe"), &file)?;
    let q = unique("reuse-reload");
    let warren = start(config(&pipeline_at(
        "reuse-reload",
        &q,
        &file,
        &reuse("instance = \"reuse\""),
    ))?)
    .await?;
    let mut rpc = RpcClient::connect().await?;
    assert_eq!(counts(&mut rpc, &q, 3).await?, ["1", "2", "3"]);

    let m = warren
        .metrics()
        .pipeline("reuse-reload")
        .ok_or_else(|| anyhow::anyhow!("no metrics"))?;
    let before = m.plugin.version();
    let tmp = dir.join(".probe.wasm.tmp");
    std::fs::write(&tmp, another_version_of_probe()?)?;
    std::fs::rename(&tmp, &file)?;
    let reloader = warren
        .reloader("reuse-reload")
        .ok_or_else(|| anyhow::anyhow!("no reloader"))?;
    // The watcher may have swapped it already; either way the new version
    // serves once this returns.
    let _ = reloader.reload_now().await;
    assert_ne!(m.plugin.version(), before, "the new version was not loaded");
    assert_eq!(counts(&mut rpc, &q, 2).await?, ["1", "2"]);
    warren.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
