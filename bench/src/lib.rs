//! warren's benchmark harness: each scenario measures warren and a baseline on
//! the same broker, with the same message size and prefetch, in the same run,
//! and reports ratios (the machines it runs on are shared and noisy, so absolute
//! numbers from different runs do not compare).
//!
//! `main.rs` is the command line; the smoke test (`tests/smoke.rs`) runs every
//! scenario for about a second so the harness cannot rot.

pub mod amqp;
pub mod baseline;
pub mod machine;
pub mod report;
pub mod scenarios;
pub mod setup;
pub mod stats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

pub use report::{Goal, Report, Row};

/// Everything a run is parameterised by.
#[derive(Debug, Clone)]
pub struct Options {
    /// AMQP URL of the broker every scenario uses.
    pub broker_url: String,
    /// Management API base URL (`http://127.0.0.1:15672`), for the broker version.
    pub mgmt_url: Option<String>,
    /// Where the built plugins are (`noop.wasm`, `fib.wasm`, ...).
    pub plugin_dir: PathBuf,
    /// Scratch space: generated configs, the compiled cache, plugin copies.
    pub work_dir: PathBuf,
    /// Upper bound of one measured run.
    pub duration: Duration,
    /// Messages pre-filled for the throughput scenarios.
    pub messages: u64,
    /// Body size in bytes.
    pub size: usize,
    /// Prefetch of warren's pipeline and of every baseline consumer.
    pub prefetch: u16,
    /// warren's pipeline concurrency (plugin calls in parallel).
    pub concurrency: usize,
    /// Measured runs per system; the median is reported. Runs alternate
    /// between warren and the baseline so drift hits both.
    pub rounds: usize,
    /// `quorum` (warren's default) or `classic`.
    pub queue_type: String,
    /// Concurrent callers in the concurrent RPC measurement.
    pub rpc_callers: usize,
    /// Concurrency of the looping neighbour in the isolation scenario.
    pub neighbour_concurrency: usize,
    /// The neighbour's per-call timeout.
    pub neighbour_timeout: Duration,
    /// Hot-reload swaps measured per cache setting.
    pub reloads: usize,
    /// Command that runs warren as its own process on a config file (the path
    /// is appended), e.g. `[".../warren", "run", "--config"]`. Used for RSS.
    pub warren_cmd: Vec<String>,
    /// Command that runs the raw lapin consumer as its own process (arguments
    /// are appended), e.g. `[".../warren-bench", "raw-consumer"]`.
    pub raw_consumer_cmd: Vec<String>,
    /// Python with pika and celery installed, for the peer scenario.
    pub python: Option<PathBuf>,
    /// Directory holding the peer scripts (`pika_consumer.py`, `celery_noop.py`).
    pub peers_dir: PathBuf,
    /// A `node_modules` directory with amqplib, for the Node peer of the
    /// polyglot scenario (`node` from the PATH runs it).
    pub node_modules: Option<PathBuf>,
}

impl Options {
    /// Path of a built plugin.
    pub fn plugin(&self, name: &str) -> PathBuf {
        self.plugin_dir.join(format!("{name}.wasm"))
    }
}

/// The scenarios, in the order they run and are numbered in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// 1. no-op consume + ack vs a raw lapin consumer.
    Throughput,
    /// 2. republish with confirms vs raw consume -> publish -> confirm -> ack.
    Publish,
    /// 3. RPC latency, fib, sequential and concurrent callers.
    Rpc,
    /// 4. instantiate + call + drop without the broker.
    Overhead,
    /// 5. RSS idle and under load at the configured prefetch.
    Memory,
    /// 6. a healthy pipeline next to one whose plugin loops until its timeout.
    Isolation,
    /// 8. hot reload: file replaced -> first message handled by the new version.
    Reload,
    /// 7. pika and Celery doing the same no-op (needs `python`).
    Peers,
    /// 9. one HTTP POST by a plugin vs the same POST from a plain Rust client.
    Http,
    /// 10. the Python, JavaScript and C examples, fresh and reused, next to
    ///     Celery and a Node consumer doing the same work.
    Polyglot,
}

impl Scenario {
    /// All scenarios, in table order.
    pub const ALL: [Scenario; 10] = [
        Scenario::Throughput,
        Scenario::Publish,
        Scenario::Rpc,
        Scenario::Overhead,
        Scenario::Memory,
        Scenario::Isolation,
        Scenario::Peers,
        Scenario::Reload,
        Scenario::Http,
        Scenario::Polyglot,
    ];

    /// Short name used in the table and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Publish => "publish",
            Scenario::Rpc => "rpc",
            Scenario::Overhead => "overhead",
            Scenario::Memory => "memory",
            Scenario::Isolation => "isolation",
            Scenario::Peers => "peers",
            Scenario::Reload => "reload",
            Scenario::Http => "http",
            Scenario::Polyglot => "polyglot",
        }
    }

    /// Number in the benchmark issue's list (reload is the extra one).
    pub fn number(self) -> u8 {
        match self {
            Scenario::Throughput => 1,
            Scenario::Publish => 2,
            Scenario::Rpc => 3,
            Scenario::Overhead => 4,
            Scenario::Memory => 5,
            Scenario::Isolation => 6,
            Scenario::Peers => 7,
            Scenario::Reload => 8,
            Scenario::Http => 9,
            Scenario::Polyglot => 10,
        }
    }
}

/// Run one scenario and return its rows.
pub async fn run_scenario(opts: &Options, s: Scenario) -> Result<Vec<Row>> {
    match s {
        Scenario::Throughput => scenarios::throughput::run(opts, false).await,
        Scenario::Publish => scenarios::throughput::run(opts, true).await,
        Scenario::Rpc => scenarios::rpc::run(opts).await,
        Scenario::Overhead => scenarios::overhead::run(opts).await,
        Scenario::Memory => scenarios::memory::run(opts).await,
        Scenario::Isolation => scenarios::isolation::run(opts).await,
        Scenario::Peers => scenarios::peers::run(opts).await,
        Scenario::Reload => scenarios::reload::run(opts).await,
        Scenario::Http => scenarios::http::run(opts).await,
        Scenario::Polyglot => scenarios::polyglot::run(opts).await,
    }
}
