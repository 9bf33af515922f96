//! Several broker nodes (`[broker] urls`): a node that refuses connections is
//! passed over within the same round, and readiness names the node in use.

use std::path::Path;
use std::time::Duration;

use warren::config::Config;
use warren_tests::{Client, broker_url, start, unique};

use crate::pipeline;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_dead_node_in_urls_is_passed_over_and_readiness_names_the_node_in_use()
-> anyhow::Result<()> {
    // A port nothing listens on stands for a node that is down.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dead_url = format!("amqp://guest:guest@127.0.0.1:{dead}/%2f");
    let live = broker_url();
    let q = unique("urls");
    // Several pipelines: each connection starts at a random node, so some
    // start at the dead one; with the reconnect delay far beyond the test's
    // deadline, only moving on within the round can make them ready in time.
    let pipelines: String = (0..8)
        .map(|i| pipeline(&format!("urls-{i}"), &format!("{q}.{i}"), "noop", ""))
        .collect();
    let text = |broker: &str| {
        format!("[broker]\n{broker}\nreconnect_delay_ms = 30000\n[ops]\nlisten = \"\"\n{pipelines}")
    };
    let both = text(&format!("url = {live:?}\nurls = [{dead_url:?}, {live:?}]"));
    let err = Config::parse(&both, Path::new(".")).unwrap_err();
    assert!(format!("{err:#}").contains("not both"), "{err:#}");
    let config = Config::parse(
        &text(&format!("urls = [{dead_url:?}, {live:?}]")),
        Path::new("."),
    )?;
    let warren = start(config).await?;
    let ready = warren.metrics().readiness_json();
    let expected = warren::broker::redact(&live);
    for p in ready["pipelines"].as_array().into_iter().flatten() {
        assert_eq!(p["broker_node"], expected.as_str(), "{ready}");
    }
    let client = Client::connect().await?;
    for i in 0..8 {
        client.send(&format!("{q}.{i}"), b"x").await?;
    }
    // Handled and acked: every queue drains.
    let deadline = tokio::time::Instant::now() + WAIT;
    for i in 0..8 {
        let queue = format!("{q}.{i}");
        while client.depth(&queue).await? != 0 {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{queue} did not drain"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    warren.shutdown().await;
    Ok(())
}
