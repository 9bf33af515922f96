//! The RabbitMQ cluster of the run, through `scripts/broker.sh cluster`: the
//! same script users run by hand, so the faults injected here are the ones
//! they can repeat (`node-stop`, `node-kill`, a full `stop` and `start`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// A cluster command that has not returned in this long is stuck: a node
/// start waits for its peers (the script's own limit is 300 s per node).
const COMMAND_LIMIT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone)]
pub struct Cluster {
    pub script: PathBuf,
    pub base: u16,
    pub dir: PathBuf,
    pub nodes: u16,
}

impl Cluster {
    /// `broker.sh cluster ARGS`; its standard output.
    pub async fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(&self.script)
            .arg("cluster")
            .args(args)
            .env("BROKER_PORT", self.base.to_string())
            .env("BROKER_DIR", &self.dir)
            .env_remove("BROKER_TLS_PORT")
            .env_remove("BROKER_EPMD_PORT")
            .kill_on_drop(true);
        let out = tokio::time::timeout(COMMAND_LIMIT, cmd.output())
            .await
            .with_context(|| {
                format!("broker.sh cluster {args:?} still running after {COMMAND_LIMIT:?}")
            })?
            .with_context(|| format!("running broker.sh cluster {args:?}"))?;
        if !out.status.success() {
            bail!(
                "broker.sh cluster {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Start (or restart) every node; their AMQP URLs.
    pub async fn start(&self) -> Result<Vec<String>> {
        let urls = self.run(&["start", &self.nodes.to_string()]).await?;
        let urls: Vec<String> = urls.split(',').map(str::to_string).collect();
        if urls.len() != usize::from(self.nodes) {
            bail!("cluster start printed {urls:?}");
        }
        Ok(urls)
    }

    pub async fn stop(&self) -> Result<()> {
        self.run(&["stop"]).await.map(drop)
    }

    pub async fn node(&self, verb: &str, index: u16) -> Result<()> {
        self.run(&[verb, &index.to_string()]).await.map(drop)
    }

    /// `rabbitmqctl close_all_connections` through the first node that answers:
    /// it closes the connections of every node of the cluster.
    pub async fn close_all_connections(&self) -> Result<()> {
        let mut errors = Vec::new();
        for i in 1..=self.nodes {
            match self
                .run(&["ctl", &i.to_string(), "close_all_connections", "chaos run"])
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        bail!(
            "close_all_connections failed on every node: {}",
            errors.join("; ")
        )
    }

    fn mgmt(&self, index: u16) -> String {
        format!("http://127.0.0.1:{}", self.base + index - 1 + 10_000)
    }

    /// Index (1-based) of the node whose member leads `queue`, asked of the
    /// management API of each node in turn until one answers.
    pub async fn leader(&self, queue: &str) -> Result<u16> {
        let path = format!("/api/queues/%2f/{queue}");
        let mut errors = Vec::new();
        for i in 1..=self.nodes {
            let answer = warren_tests::http("GET", &self.mgmt(i), &path, Some(("guest", "guest")))
                .await
                .and_then(|(status, body)| {
                    anyhow::ensure!(status == 200, "status {status}: {body}");
                    let v: serde_json::Value = serde_json::from_str(&body)?;
                    let leader = v["leader"].as_str().context("no leader field")?.to_string();
                    Ok(leader)
                });
            match answer {
                Ok(leader) => return self.index_of(&leader),
                Err(e) => errors.push(format!("node {i}: {e:#}")),
            }
        }
        bail!("no node named the leader of {queue}: {}", errors.join("; "))
    }

    /// `warren-<port>@localhost` -> its index.
    fn index_of(&self, node: &str) -> Result<u16> {
        let port: u16 = node
            .strip_prefix("warren-")
            .and_then(|s| s.split('@').next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("unexpected node name {node:?}"))?;
        let index = port
            .checked_sub(self.base)
            .map(|d| d + 1)
            .filter(|i| *i <= self.nodes)
            .with_context(|| format!("node {node:?} is not one of this cluster's"))?;
        Ok(index)
    }
}
