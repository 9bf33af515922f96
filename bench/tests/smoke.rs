//! Smoke test of the benchmark harness: every scenario runs for about a second
//! against the test broker (`WARREN_TEST_BROKER_URL`, as `scripts/test.sh`
//! provides it) and must produce sane numbers. It checks that the harness
//! works, not how fast anything is: debug builds on a busy machine say
//! nothing about performance.

// A failed expectation in a test should panic with its message: that is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use warren_bench::{Options, Row, Scenario, run_scenario};

fn opts(tag: &str) -> Options {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let exe = env!("CARGO_BIN_EXE_warren-bench").to_string();
    let work_dir =
        std::env::temp_dir().join(format!("warren-bench-smoke-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&work_dir).unwrap();
    Options {
        broker_url: std::env::var("WARREN_TEST_BROKER_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5682/%2f".into()),
        mgmt_url: None,
        plugin_dir: std::env::var("WARREN_PLUGIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| manifest.join("../plugins/dist")),
        work_dir,
        duration: Duration::from_secs(1),
        messages: 3_000,
        size: 1024,
        prefetch: 64,
        concurrency: 2,
        rounds: 1,
        queue_type: "quorum".into(),
        rpc_callers: 4,
        neighbour_concurrency: 1,
        neighbour_timeout: Duration::from_millis(50),
        reloads: 2,
        warren_cmd: vec![exe.clone(), "host".into(), "--config".into()],
        raw_consumer_cmd: vec![exe, "raw-consumer".into()],
        python: None,
        peers_dir: manifest.join("peers"),
        node_modules: None,
    }
}

async fn smoke(s: Scenario) -> Vec<Row> {
    smoke_with(s, |_| {}).await
}

/// [`smoke`] with `adjust` applied to the options first.
async fn smoke_with(s: Scenario, adjust: impl FnOnce(&mut Options)) -> Vec<Row> {
    let mut o = opts(s.name());
    adjust(&mut o);
    let rows = run_scenario(&o, s)
        .await
        .unwrap_or_else(|e| panic!("scenario {} failed: {e:#}", s.name()));
    let _ = std::fs::remove_dir_all(&o.work_dir);
    assert!(!rows.is_empty(), "scenario {} produced no rows", s.name());
    for r in &rows {
        assert!(r.warren.is_finite(), "not a number: {r:?}");
        if let Some(b) = r.baseline {
            assert!(b.is_finite() && b > 0.0, "baseline not positive: {r:?}");
        }
        // Lateness past a deadline may be a fraction of a tick early; every
        // other quantity is a positive rate, time or size.
        if !r.metric.contains("after its deadline") {
            assert!(r.warren > 0.0, "not positive: {r:?}");
        }
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput() {
    let rows = smoke(Scenario::Throughput).await;
    assert!(
        rows[0]
            .comparison
            .as_deref()
            .is_some_and(|c| c.ends_with('x'))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish() {
    smoke(Scenario::Publish).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc() {
    smoke(Scenario::Rpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overhead() {
    smoke(Scenario::Overhead).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory() {
    smoke(Scenario::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation() {
    smoke(Scenario::Isolation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload() {
    smoke(Scenario::Reload).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http() {
    let rows = smoke(Scenario::Http).await;
    assert!(rows[0].baseline.is_some(), "{:?}", rows[0]);
}

/// Without a Python venv the peers scenario says it was skipped, and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_python_are_skipped() {
    let e = run_scenario(&opts("peers"), Scenario::Peers)
        .await
        .expect_err("no python given");
    assert!(format!("{e:#}").contains("skipped"), "{e:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polyglot() {
    // Without Python and Node the peers are skipped: warren's own rows, fresh
    // and reused, remain for each example that is built.
    // Python and JavaScript in a debug build on a loaded machine handle a few
    // dozen messages a second: a backlog small enough to finish, and time
    // enough to finish it, so the rate is taken over events whatever the
    // machine's speed.
    let rows = smoke_with(Scenario::Polyglot, |o| {
        o.messages = 100;
        o.duration = Duration::from_secs(30);
    })
    .await;
    assert!(rows.iter().any(|r| r.metric.contains("instance = reuse")));
}
