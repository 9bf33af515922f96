//! What the benchmark ran on: CPU, memory, kernel, broker version, load.

use serde::Serialize;

use crate::amqp;

/// Facts about the machine and broker of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory: String,
    pub kernel: String,
    pub broker_version: String,
    pub load_average: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Machine {
    /// Collect facts; the broker version comes from the management API if given.
    pub async fn collect(mgmt_url: Option<&str>) -> Self {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown CPU".into());
        let mem_kib: u64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let broker_version = match mgmt_url {
            Some(url) => broker_version(url)
                .await
                .unwrap_or_else(|| "unknown".into()),
            None => "unknown".into(),
        };
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            memory: format!("{:.1} GiB", mem_kib as f64 / (1024.0 * 1024.0)),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            broker_version,
            load_average: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

async fn broker_version(mgmt_url: &str) -> Option<String> {
    let (status, body) = amqp::http_get(mgmt_url, "/api/overview", Some(("guest", "guest")))
        .await
        .ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let version = v.get("rabbitmq_version")?.as_str()?;
    let erlang = v.get("erlang_version").and_then(|e| e.as_str());
    Some(match erlang {
        Some(e) => format!("{version} (Erlang {e})"),
        None => version.to_string(),
    })
}
