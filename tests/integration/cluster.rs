//! Several broker nodes (`[broker] urls`): a node that refuses connections is
//! passed over within the same round, and readiness names the node in use;
//! on a real three-node RabbitMQ cluster (`scripts/broker.sh cluster`), the
//! loss of the node warren is connected to loses no message.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};

use warren::config::Config;
use warren_tests::{Client, broker_url, plugin, start, toml_path, unique};

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

/// Three RabbitMQ nodes joined into one cluster by `scripts/broker.sh
/// cluster`, on ports of their own; stopped (and their state removed) on drop.
struct LocalCluster {
    base: u16,
    dir: PathBuf,
}

const NODES: u16 = 3;

impl LocalCluster {
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        run_cluster(self.base, &self.dir, args)
    }

    /// Start the cluster; its nodes' AMQP URLs.
    fn start() -> anyhow::Result<(Self, Vec<String>)> {
        let cluster = Self {
            base: free_cluster_ports()?,
            dir: std::env::temp_dir().join(unique("cluster")),
        };
        let urls = cluster.run(&["start", &NODES.to_string()])?;
        let urls: Vec<String> = urls.split(',').map(str::to_string).collect();
        anyhow::ensure!(urls.len() == usize::from(NODES), "urls: {urls:?}");
        Ok((cluster, urls))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = run_cluster(self.base, &self.dir, &["stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `scripts/broker.sh cluster ARGS` for the cluster at `base` in `dir`; its
/// standard output.
fn run_cluster(base: u16, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("bash")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/broker.sh"))
        .arg("cluster")
        .args(args)
        .env("BROKER_PORT", base.to_string())
        .env("BROKER_DIR", dir)
        .env_remove("BROKER_TLS_PORT")
        .env_remove("BROKER_EPMD_PORT")
        .output()
        .with_context(|| format!("running broker.sh cluster {args:?}"))?;
    if !out.status.success() {
        bail!(
            "broker.sh cluster {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A base port whose cluster ports (each node's AMQP, management and
/// distribution ports, and the shared epmd's) are all free now. Below the
/// range the private brokers of `private_broker` use, and like theirs below
/// Linux's range for outgoing connections (32768 and up by default), where a
/// port free now can be taken by a client's connection before a node binds
/// it.
fn free_cluster_ports() -> anyhow::Result<u16> {
    for attempt in 0..200u16 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let base = 7_000 + ((nanos as u16) ^ attempt) % 1_500;
        let mut ports = vec![base + 1000];
        for i in 0..NODES {
            ports.extend([base + i, base + i + 10_000, base + i + 20_000]);
        }
        if ports
            .iter()
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        {
            return Ok(base);
        }
    }
    bail!("no free ports for a local cluster")
}

#[tokio::test]
async fn the_loss_of_the_node_warren_uses_loses_no_message() -> anyhow::Result<()> {
    const HALF: usize = 300;
    let (cluster, urls) = tokio::task::spawn_blocking(LocalCluster::start).await??;
    let q = unique("cluster-loss");
    let out = format!("{q}.out");
    let list = urls
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "[broker]\nurls = [{list}]\nreconnect_delay_ms = 100\n[ops]\nlisten = \"\"\n\
         [[pipeline]]\nname = \"loss\"\nqueue = {q:?}\nplugin = {}\nquorum_initial_group_size = 3\n\
         [[pipeline.output]]\nqueues = [{out:?}]\n[pipeline.config]\nrouting_key = {out:?}\n",
        toml_path(&plugin("republish"))
    );
    let config = Config::parse(&text, Path::new("."))?;
    let warren = start(config).await?;
    let node = |w: &warren::Running| {
        w.metrics().readiness_json()["pipelines"][0]["broker_node"]
            .as_str()
            .map(str::to_string)
    };
    let first = node(&warren).context("no broker node in readiness")?;
    let victim = urls
        .iter()
        .position(|u| warren::broker::redact(u) == first)
        .context("the node in readiness is none of the cluster's")?;
    // The test's own client uses another node, which stays up.
    let client = Client::connect_to(&urls[(victim + 1) % urls.len()]).await?;
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    client
        .channel
        .queue_declare(
            out.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            quorum,
        )
        .await?;
    let send = |range: std::ops::Range<usize>| {
        let (client, q) = (&client, &q);
        async move {
            for i in range {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(ShortString::from(format!("m{i}")));
                client
                    .publish("", q, format!("{i}").as_bytes(), props)
                    .await?;
            }
            anyhow::Ok(())
        }
    };

    // The first half flows; the node warren uses dies while it does.
    send(0..HALF).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while (client.depth(&out).await? as usize) < HALF / 3 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no outputs");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let index = (victim + 1).to_string();
    let (base, dir) = (cluster.base, cluster.dir.clone());
    tokio::task::spawn_blocking(move || run_cluster(base, &dir, &["node-kill", &index])).await??;
    // The second half can only be handled after warren reconnected elsewhere.
    send(HALF..2 * HALF).await?;

    // Every message reaches the output at least once.
    let reader = client.conn.create_channel().await?;
    reader.basic_qos(500, BasicQosOptions::default()).await?;
    let mut consumer = reader
        .basic_consume(
            out.as_str().into(),
            "check".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while seen.len() < 2 * HALF {
        let d = tokio::time::timeout_at(deadline, consumer.next())
            .await
            .with_context(|| format!("{} of {} ids arrived", seen.len(), 2 * HALF))?
            .context("the output consumer ended")??;
        *seen
            .entry(String::from_utf8_lossy(&d.data).into_owned())
            .or_default() += 1;
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    let again = node(&warren).unwrap_or_default();
    assert_ne!(again, first, "warren is on another node now");
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "cluster node loss: {} messages, {duplicates} delivered twice (at least once), node {} killed",
        2 * HALF,
        victim + 1
    );
    // Nothing left behind: the input queue drains (acks, not requeues).
    let deadline = tokio::time::Instant::now() + WAIT * 4;
    while client.depth(&q).await? != 0 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{q} did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    warren.shutdown().await;
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}
