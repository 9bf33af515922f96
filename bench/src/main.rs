//! `warren-bench`: runs the benchmark scenarios and prints one table, also
//! written as JSON and Markdown. `scripts/bench.sh` builds it in release mode,
//! provides the broker and the plugins, and calls `warren-bench run`.
//!
//! Two helper subcommands exist for measurements that need a process of their
//! own: `host` (warren on a config file, when no `warren` binary is at hand)
//! and `raw-consumer` (the raw lapin baseline).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio::sync::watch;
use warren_bench::machine::Machine;
use warren_bench::{Options, Report, Scenario, amqp, baseline};

#[derive(Parser, Debug)]
#[command(
    name = "warren-bench",
    about = "warren against raw AMQP baselines, same broker, same run"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run scenarios and print the table.
    Run(Box<RunArgs>),
    /// Run warren on a config file until killed (the memory scenario's child).
    Host {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the raw lapin no-op consumer until killed (the memory baseline).
    RawConsumer {
        #[arg(long)]
        url: String,
        #[arg(long)]
        queue: String,
        #[arg(long, default_value_t = 256)]
        prefetch: u16,
        /// Never ack: keep every delivery (a full prefetch window) in memory.
        #[arg(long)]
        hold: bool,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Scenarios to run (repeatable); default all.
    #[arg(long = "scenario", short = 's', value_enum)]
    scenarios: Vec<Scenario>,
    /// Upper bound of one measured run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Messages pre-filled for each throughput run.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Prefetch of warren and of every baseline.
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
    /// warren's pipeline concurrency.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Runs per system per scenario (median reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Queue type: quorum (warren's default) or classic.
    #[arg(long, default_value = "quorum")]
    queue_type: String,
    /// Concurrent callers in the RPC scenario.
    #[arg(long, default_value_t = 16)]
    rpc_callers: usize,
    /// Calls at a time of the looping neighbour (isolation).
    #[arg(long, default_value_t = 1)]
    neighbour_concurrency: usize,
    /// The looping neighbour's timeout, in ms.
    #[arg(long, default_value_t = 100)]
    neighbour_timeout_ms: u64,
    /// Plugin swaps measured per cache setting (reload).
    #[arg(long, default_value_t = 10)]
    reloads: usize,
    /// AMQP URL of the broker.
    #[arg(
        long,
        env = "WARREN_BENCH_BROKER_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5702/%2f"
    )]
    broker_url: String,
    /// Management API (for the broker version); default: AMQP port + 10000.
    #[arg(long)]
    mgmt_url: Option<String>,
    /// Directory of the built plugins.
    #[arg(long, env = "WARREN_PLUGIN_DIR")]
    plugin_dir: Option<PathBuf>,
    /// Scratch directory (configs, compiled cache).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Where latest.json and latest.md are written.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// The `warren` binary for the memory scenario; default: next to this
    /// binary, else this binary's `host` subcommand.
    #[arg(long)]
    warren_bin: Option<PathBuf>,
    /// Python with pika and celery, for the peers scenario.
    #[arg(long)]
    python: Option<PathBuf>,
    /// A node_modules directory with amqplib, for the Node peer of the
    /// polyglot scenario.
    #[arg(long)]
    node_modules: Option<PathBuf>,
    /// How to describe the command in the report (set by scripts/bench.sh).
    #[arg(long, hide = true)]
    command_line: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // warren runs in this process with the filter `warren run` uses by default
    // (info), so its logging costs what it costs users. Its lines go to a file:
    // the isolation scenario alone makes it warn about hundreds of timeouts.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let log_file = matches!(cli.command, Cmd::Run(_))
        .then(|| std::fs::File::create(std::env::temp_dir().join("warren-bench.log")).ok())
        .flatten();
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(f) => builder
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(f))
            .init(),
        None => builder.with_writer(std::io::stderr).init(),
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Cmd::Run(args) => run(*args).await,
            Cmd::Host { config } => host(config).await.map(|()| true),
            Cmd::RawConsumer {
                url,
                queue,
                prefetch,
                hold,
            } => raw_consumer(url, queue, prefetch, hold)
                .await
                .map(|()| true),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("warren-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn host(config: PathBuf) -> Result<()> {
    let config = warren::config::Config::load(&config)?;
    warren::run(config, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

async fn raw_consumer(url: String, queue: String, prefetch: u16, hold: bool) -> Result<()> {
    let conn = amqp::connect(&url, "raw-consumer").await?;
    if hold {
        return baseline::consume_hold(&conn, &queue, prefetch).await;
    }
    let (_stop, stop_rx) = watch::channel(false);
    baseline::consume_ack(&conn, &queue, prefetch, Arc::default(), stop_rx).await
}

/// Management URL from the AMQP URL: same host, port + 10000.
fn default_mgmt(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let hostport = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hostport = hostport.split('/').next()?;
    let (host, port) = hostport.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    Some(format!("http://{host}:{}", port.checked_add(10_000)?))
}

async fn run(a: RunArgs) -> Result<bool> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::current_exe().context("locating this binary")?;
    let warren_cmd = match a.warren_bin {
        Some(bin) => vec![bin.display().to_string(), "run".into(), "--config".into()],
        None => match exe
            .parent()
            .map(|d| d.join("warren"))
            .filter(|p| p.is_file())
        {
            Some(bin) => vec![bin.display().to_string(), "run".into(), "--config".into()],
            None => vec![exe.display().to_string(), "host".into(), "--config".into()],
        },
    };
    let work_dir = a
        .work_dir
        .unwrap_or_else(|| std::env::temp_dir().join("warren-bench"));
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let opts = Options {
        mgmt_url: a.mgmt_url.or_else(|| default_mgmt(&a.broker_url)),
        broker_url: a.broker_url,
        plugin_dir: a
            .plugin_dir
            .unwrap_or_else(|| manifest.join("../plugins/dist")),
        work_dir,
        duration: Duration::from_secs_f64(a.duration.max(0.1)),
        messages: a.messages.max(100),
        size: a.size,
        prefetch: a.prefetch.max(1),
        concurrency: a.concurrency.max(1),
        rounds: a.rounds.max(1),
        queue_type: a.queue_type,
        rpc_callers: a.rpc_callers.max(1),
        neighbour_concurrency: a.neighbour_concurrency.max(1),
        neighbour_timeout: Duration::from_millis(a.neighbour_timeout_ms.max(1)),
        reloads: a.reloads.max(1),
        raw_consumer_cmd: vec![exe.display().to_string(), "raw-consumer".into()],
        warren_cmd,
        python: a.python,
        peers_dir: manifest.join("peers"),
        node_modules: a.node_modules,
    };
    let scenarios = if a.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        Scenario::ALL
            .into_iter()
            .filter(|s| a.scenarios.contains(s))
            .collect()
    };
    let command = a.command_line.unwrap_or_else(|| {
        std::env::args()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    });
    let machine = Machine::collect(opts.mgmt_url.as_deref()).await;
    let mut report = Report {
        machine,
        command,
        parameters: vec![
            format!("{} B bodies, persistent", opts.size),
            format!("{} queues", opts.queue_type),
            format!("prefetch {}", opts.prefetch),
            format!("warren concurrency {}", opts.concurrency),
            format!("{} messages per throughput run", opts.messages),
            format!("runs of at most {:?}", opts.duration),
            format!("median of {} runs per system", opts.rounds),
        ],
        rows: Vec::new(),
        notes: Vec::new(),
    };
    let mut ok = true;
    for s in scenarios {
        eprintln!("==> scenario {} {}", s.number(), s.name());
        let t = Instant::now();
        match warren_bench::run_scenario(&opts, s).await {
            Ok(rows) => {
                let partial = Report {
                    rows: rows.clone(),
                    notes: vec![],
                    ..report.clone()
                };
                eprintln!("{}", partial.text());
                report.rows.extend(rows);
            }
            Err(e) => {
                let text = format!("{}: {e:#}", s.name());
                eprintln!("    {text}");
                if !text.contains("skipped") {
                    ok = false;
                }
                report.notes.push(text);
            }
        }
        eprintln!("    ({:.0} s)", t.elapsed().as_secs_f64());
    }
    println!("{}", report.text());
    let out = a.out_dir.unwrap_or_else(|| manifest.join("results"));
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("latest.json"), report.json())?;
    std::fs::write(out.join("latest.md"), report.markdown())?;
    eprintln!(
        "wrote {} and {}",
        out.join("latest.json").display(),
        out.join("latest.md").display()
    );
    Ok(ok)
}
