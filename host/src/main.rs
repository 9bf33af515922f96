//! The `warren` command line: `run`, `check`, `invoke` and `dlq`. Only argument parsing
//! and output formatting live here; the work is in the library.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::{Parser, Subcommand, ValueEnum};
use warren::ReloadResult;
use warren::config::{Config, LogFormat, MAX_MEMORY_MIB, MAX_TIMEOUT_MS};
use warren::plugins::PluginLoader;
use warren::runtime::{InvokeLimits, Message, Outcome, Outgoing, RuntimeOptions, WasmRuntime};

#[derive(Parser, Debug)]
#[command(
    name = "warren",
    version,
    about = "Run WebAssembly plugins as RabbitMQ message handlers"
)]
struct Cli {
    /// Log format (overrides `log.format` in the config).
    #[arg(long, global = true, value_enum)]
    log_format: Option<Format>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Consume the configured queues until SIGINT/SIGTERM; SIGHUP re-checks plugin files.
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = "warren.toml")]
        config: PathBuf,
    },
    /// Validate the configuration and compile every plugin; no broker needed.
    Check {
        /// Configuration file.
        #[arg(long, short, default_value = "warren.toml")]
        config: PathBuf,
    },
    /// Run a plugin once on a message, without a broker, and print the outcome as JSON.
    Invoke(Box<InvokeArgs>),
    /// Inspect dead-letter queues and move parked messages back.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// Count each pipeline's parked messages, by reason and plugin version (reads, moves nothing).
    List {
        /// Configuration file.
        #[arg(long, short, default_value = "warren.toml")]
        config: PathBuf,
        /// Only this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Messages read per DLQ at most.
        #[arg(long, default_value_t = warren::dlq::DEFAULT_LIMIT)]
        limit: usize,
    },
    /// Print parked messages with their warren headers and a body preview (moves nothing).
    Show {
        #[command(flatten)]
        target: DlqTarget,
    },
    /// Publish parked messages again and remove them from the DLQ.
    Redrive {
        #[command(flatten)]
        target: DlqTarget,
        #[command(flatten)]
        filters: DlqFilters,
        /// Print what would move, move nothing.
        #[arg(long)]
        dry_run: bool,
        /// Publish to this queue (default exchange) instead of the original address.
        #[arg(long)]
        to_queue: Option<String>,
    },
    /// Remove parked messages for good (the selected ones only; needs --yes).
    Purge {
        #[command(flatten)]
        target: DlqTarget,
        #[command(flatten)]
        filters: DlqFilters,
        /// Print what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Confirm the removal (there is no prompt: warren runs without a terminal too).
        #[arg(long)]
        yes: bool,
    },
}

/// Selections only the commands that move or remove messages take.
#[derive(clap::Args, Debug)]
struct DlqFilters {
    /// Only messages parked by another plugin than the one the config points at now.
    #[arg(long, conflicts_with = "version")]
    not_current_version: bool,
    /// Only messages whose last failure is at least this old (30s, 15m, 2h, 7d).
    #[arg(long, value_parser = warren::dlq::parse_duration)]
    older_than: Option<Duration>,
}

#[derive(clap::Args, Debug)]
struct DlqTarget {
    /// Configuration file.
    #[arg(long, short, default_value = "warren.toml")]
    config: PathBuf,
    /// The pipeline whose DLQ to read.
    #[arg(long)]
    pipeline: String,
    /// Messages read at most (selected or not).
    #[arg(long, default_value_t = warren::dlq::DEFAULT_LIMIT)]
    limit: usize,
    /// Only messages whose reason contains this text (case-insensitive; not empty).
    #[arg(long, value_parser = warren::dlq::parse_reason)]
    reason: Option<String>,
    /// Only messages parked by this plugin version (or digest prefix, 4 hex digits at least).
    #[arg(long, value_parser = warren::dlq::parse_version)]
    version: Option<String>,
}

#[derive(clap::Args, Debug)]
struct InvokeArgs {
    /// The plugin component (.wasm).
    plugin: PathBuf,
    /// Message body as text.
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// Read the message body from a file.
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// A header, `key=value`; repeatable.
    #[arg(long = "header", value_parser = key_value)]
    headers: Vec<(String, String)>,
    /// A plugin config entry, `key=value`; repeatable.
    #[arg(long = "config", value_parser = key_value)]
    config: Vec<(String, String)>,
    #[arg(long)]
    content_type: Option<String>,
    #[arg(long)]
    reply_to: Option<String>,
    #[arg(long)]
    correlation_id: Option<String>,
    #[arg(long)]
    message_id: Option<String>,
    #[arg(long, default_value = "")]
    exchange: String,
    #[arg(long, default_value = "")]
    routing_key: String,
    #[arg(long, default_value = "invoke")]
    queue: String,
    #[arg(long, default_value_t = 1)]
    attempt: u32,
    /// Timeout of the call in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Memory limit in MiB.
    #[arg(long, default_value_t = 64)]
    memory_mib: u64,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            // Each cause once: lapin's errors repeat their source in their text.
            eprintln!("error: {}", warren::logtext::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    let log_format = cli.log_format;
    match cli.command {
        Command::Run { config } => run(&config, log_format),
        Command::Check { config } => check(&config, log_format),
        Command::Dlq(cmd) => {
            init_logging(log_format, LogFormat::Text);
            async_runtime()?.block_on(dlq(cmd))
        }
        Command::Invoke(args) => invoke(*args, log_format),
    }
}

/// The tokio runtime of the commands that talk to the broker or run plugins.
fn async_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

/// `warren run`: serve until a signal.
fn run(config: &std::path::Path, log_format: Option<Format>) -> Result<ExitCode> {
    let rt = async_runtime()?;
    let config = Config::load(config)?;
    init_logging(log_format, config.log.format);
    tracing::info!(broker = %config.broker.redacted(), tls = config.broker.uses_tls(), pipelines = config.pipelines.len(), "starting warren");
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let ended = rt.block_on(serve(config));
    // Whatever is still running (plugin calls cut short by a second
    // signal, a plugin still compiling) is abandoned, not waited for:
    // the broker redelivers unacknowledged messages.
    rt.shutdown_background();
    Ok(match ended? {
        Ended::Stopped => ExitCode::SUCCESS,
        Ended::Forced(code) => ExitCode::from(code),
    })
}

/// `warren check`: everything `run` would refuse, without a broker.
fn check(path: &std::path::Path, log_format: Option<Format>) -> Result<ExitCode> {
    init_logging(log_format, LogFormat::Text);
    let config = Config::load(path)?;
    let loader = warren::plugin_loader(&config)?;
    let loaded = warren::load_plugins(&loader, &config)?;
    for (p, plugin) in config.pipelines.iter().zip(&loaded) {
        println!(
            "ok  pipeline {:<16} queue {:<20} plugin {} (version {}, loaded in {} ms, cache {})",
            p.name,
            p.queue,
            plugin.path().display(),
            plugin.version(),
            plugin.load_time().as_millis(),
            plugin.source().label()
        );
    }
    for w in config.warnings() {
        println!("warning: {w}");
    }
    println!(
        "{}: configuration valid, {} pipeline(s)",
        path.display(),
        loaded.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// `warren invoke`: one plugin call, printed as JSON.
fn invoke(args: InvokeArgs, log_format: Option<Format>) -> Result<ExitCode> {
    let rt = async_runtime()?;
    let InvokeArgs {
        plugin,
        body,
        body_file,
        headers,
        config,
        content_type,
        reply_to,
        correlation_id,
        message_id,
        exchange,
        routing_key,
        queue,
        attempt,
        timeout_ms,
        memory_mib,
    } = args;
    init_logging(log_format, LogFormat::Text);
    let body = match (body, body_file) {
        (Some(b), _) => b.into_bytes(),
        (None, Some(f)) => read_body_file(&f)?,
        (None, None) => Vec::new(),
    };
    // The same ranges as `[pipeline.limits]`, for the same reasons.
    if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
        bail!("--timeout-ms must be between 1 and {MAX_TIMEOUT_MS} (24 hours)");
    }
    if memory_mib == 0 || memory_mib > MAX_MEMORY_MIB {
        bail!("--memory-mib must be between 1 and {MAX_MEMORY_MIB}");
    }
    let limits = InvokeLimits::new(
        Duration::from_millis(timeout_ms),
        usize::try_from(memory_mib << 20).unwrap_or(usize::MAX),
    );
    let runtime = WasmRuntime::new(&RuntimeOptions {
        max_instances: 2,
        max_memory_bytes: usize::try_from(MAX_MEMORY_MIB << 20).unwrap_or(usize::MAX),
    })?;
    let loaded = PluginLoader::new(runtime, None)?.load(&plugin)?;
    warren::plugins::check_fits_as(&loaded, limits.memory_bytes, "--memory-mib")?;
    let msg = Message {
        body,
        content_type,
        exchange,
        routing_key,
        queue,
        headers,
        message_id,
        correlation_id,
        reply_to,
        attempt,
    };
    let config: BTreeMap<_, _> = config.into_iter().collect();
    let inv = rt.block_on(async {
        tokio::task::spawn_blocking(move || {
            loaded.invoke(&msg, Arc::new(config), "invoke".into(), limits)
        })
        .await
    })?;
    let (json, ok) = match inv.result {
        Ok(outcome) => (outcome_json(outcome), true),
        Err(f) => (
            serde_json::json!({ "failure": { "kind": f.kind().label(), "message": f.to_string() } }),
            false,
        ),
    };
    let mut json = json;
    json["elapsed_ms"] = serde_json::json!(inv.elapsed.as_secs_f64() * 1000.0);
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn dlq(cmd: DlqCommand) -> Result<ExitCode> {
    use warren::dlq;
    match cmd {
        DlqCommand::List {
            config,
            pipeline,
            limit,
        } => {
            let config = Config::load(&config)?;
            let mut found = false;
            for p in &config.pipelines {
                if pipeline.as_ref().is_some_and(|name| *name != p.name) {
                    continue;
                }
                found = true;
                let summary = dlq::summarize(&config.broker, p, limit)
                    .await
                    .with_context(|| format!("pipeline {:?}", p.name))?;
                print!("{}", summary.render(std::time::SystemTime::now()));
            }
            if !found {
                bail!(
                    "no pipeline {:?} in the configuration",
                    pipeline.unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show { target } => {
            let (config, selection) = target.load(None)?;
            let p = target.pipeline(&config)?;
            let parked = dlq::read(&config.broker, p, target.limit, &selection).await?;
            for m in &parked {
                print!("{}", dlq::render_parked(m));
            }
            println!("{} message(s) shown", parked.len());
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Redrive {
            target,
            filters,
            dry_run,
            to_queue,
        } => {
            let (config, selection) = target.load(Some(&filters))?;
            let p = target.pipeline(&config)?;
            let how = dlq::Redrive {
                selection,
                limit: target.limit,
                dry_run,
                to_queue,
            };
            let report = dlq::redrive(&config.broker, p, &how, &mut |l| println!("{l}")).await?;
            let verb = if dry_run { "would move" } else { "moved" };
            println!(
                "{verb} {} of {} message(s) read; {} could not be published and stay in {}",
                report.moved,
                report.read,
                report.failed,
                p.dlq_name()
            );
            Ok(if report.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        DlqCommand::Purge {
            target,
            filters,
            dry_run,
            yes,
        } => {
            if !yes && !dry_run {
                bail!(
                    "purge removes messages for good: add --yes to confirm (or --dry-run to see what it would remove)"
                );
            }
            let (config, selection) = target.load(Some(&filters))?;
            let p = target.pipeline(&config)?;
            let how = dlq::Purge {
                selection,
                limit: target.limit,
                dry_run,
            };
            let report = dlq::purge(&config.broker, p, &how, &mut |l| println!("{l}")).await?;
            let verb = if dry_run { "would remove" } else { "removed" };
            println!(
                "{verb} {} of {} message(s) read from {}",
                report.removed,
                report.read,
                p.dlq_name()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

impl DlqTarget {
    /// The configuration and the selection of the target and `filters`.
    fn load(&self, filters: Option<&DlqFilters>) -> Result<(Config, warren::dlq::Selection)> {
        let config = Config::load(&self.config)?;
        let mut selection = warren::dlq::Selection {
            reason: self.reason.clone(),
            version: self.version.clone(),
            ..Default::default()
        };
        if let Some(f) = filters {
            if f.not_current_version {
                let p = self.pipeline(&config)?;
                let bytes = std::fs::read(&p.plugin)
                    .with_context(|| format!("reading the plugin {}", p.plugin.display()))?;
                selection.not_digest = Some(warren::plugins::digest_of(&bytes));
            }
            selection.older_than = f.older_than;
        }
        Ok((config, selection))
    }

    fn pipeline<'a>(&self, config: &'a Config) -> Result<&'a warren::config::PipelineConfig> {
        config
            .pipelines
            .iter()
            .find(|p| p.name == self.pipeline)
            .with_context(|| format!("no pipeline {:?} in the configuration", self.pipeline))
    }
}

fn body_json(body: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(body) {
        Ok(s) => serde_json::json!({ "text": s }),
        Err(_) => {
            serde_json::json!({ "base64": base64::engine::general_purpose::STANDARD.encode(body), "bytes": body.len() })
        }
    }
}

fn outgoing_json(o: Outgoing) -> serde_json::Value {
    serde_json::json!({
        "exchange": o.exchange,
        "routing_key": o.routing_key,
        "content_type": o.content_type,
        "headers": o.headers,
        "body": body_json(&o.body),
    })
}

fn outcome_json(o: Outcome) -> serde_json::Value {
    match o {
        Outcome::Ack => serde_json::json!({ "outcome": "ack" }),
        Outcome::Publish(outs) => serde_json::json!({
            "outcome": "publish",
            "publish": outs.into_iter().map(outgoing_json).collect::<Vec<_>>(),
        }),
        Outcome::Reply(r) => serde_json::json!({
            "outcome": "reply",
            "reply": {
                "content_type": r.content_type,
                "headers": r.headers,
                "body": body_json(&r.body),
            },
            "publish": r.publish.into_iter().map(outgoing_json).collect::<Vec<_>>(),
        }),
        Outcome::Retry(r) => {
            serde_json::json!({ "outcome": "retry", "reason": r.reason, "delay_ms": r.delay_ms })
        }
        Outcome::DeadLetter(reason) => {
            serde_json::json!({ "outcome": "dead-letter", "reason": reason })
        }
    }
}

/// Largest `--body-file` accepted: RabbitMQ's own default `max_message_size`
/// (128 MiB), so anything bigger could not be a real message either, and the
/// file is not read into memory to find out.
const MAX_BODY_FILE: u64 = 128 << 20;

fn read_body_file(f: &std::path::Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(f)
        .with_context(|| format!("reading body file {}", f.display()))?
        .len();
    if len > MAX_BODY_FILE {
        bail!(
            "body file {} is {len} bytes; a message body can be at most {MAX_BODY_FILE} bytes \
             (RabbitMQ's default max_message_size)",
            f.display()
        );
    }
    std::fs::read(f).with_context(|| format!("reading body file {}", f.display()))
}

fn init_logging(flag: Option<Format>, configured: LogFormat) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The AMQP library's own lines are off unless RUST_LOG names lapin: it
    // logs a returned (unroutable) message whole, its body as a list of
    // decimal bytes (one WARN line of megabytes, secrets included), and two
    // ERROR lines for every refused or lost connection, which warren reports
    // itself, once, with what it does about it (unroutable outputs with their
    // exchange, routing key and size; sessions with the broker's reason).
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("lapin"))
        && let Ok(d) = "lapin=off".parse()
    {
        filter = filter.add_directive(d);
    }
    let json = match flag {
        Some(Format::Json) => true,
        Some(Format::Text) => false,
        None => configured == LogFormat::Json,
    };
    // Colours only for a terminal: in a file or a log collector the escape
    // codes are noise. Whatever RUST_LOG says, wasmtime's crates log at most
    // at INFO (their TRACE lines carry the arguments of every WIT call a
    // plugin makes) and known secret values are replaced in every line: see
    // `warren::logging`.
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let cap = tracing_subscriber::filter::filter_fn(warren::logging::allowed);
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(warren::logging::stderr);
    let registry = tracing_subscriber::registry().with(filter).with(cap);
    if json {
        registry.with(layer.json().with_current_span(true)).init();
    } else {
        registry.with(layer).init();
    }
}

/// How `warren run` ended.
enum Ended {
    /// Stopped on request after the drain (or before anything started).
    Stopped,
    /// A second signal cut the drain short; the process exits with this code.
    Forced(u8),
}

/// Run until SIGINT or SIGTERM, then drain. SIGHUP re-checks the plugin files.
/// A second SIGINT or SIGTERM during the drain ends it at once.
async fn serve(config: Config) -> Result<Ended> {
    // Listen before anything starts: from here on SIGHUP no longer kills the
    // process (its default action), and a signal during start-up is seen.
    let mut signals = Signals::listen()?;
    let start = warren::start(config);
    tokio::pin!(start);
    let running = loop {
        tokio::select! {
            r = &mut start => break r?,
            s = signals.next() => match s {
                Sig::Hup => tracing::info!("SIGHUP received while starting; plugins are being loaded anyway"),
                s => {
                    tracing::info!("{} received while starting; exiting", s.name());
                    return Ok(Ended::Stopped);
                }
            },
        }
    };
    let first = loop {
        match signals.next().await {
            Sig::Hup => {
                tracing::info!("SIGHUP received; plugin files are re-checked");
                // Off the signal loop: compiling a new version can take seconds,
                // and a SIGTERM meanwhile must still be heard.
                tokio::spawn(recheck(running.reload_all()));
            }
            s => break s,
        }
    };
    tracing::info!(
        "{} received; shutting down: no new messages; settling in-flight ones",
        first.name()
    );
    let drain = running.shutdown();
    tokio::pin!(drain);
    loop {
        tokio::select! {
            () = &mut drain => {
                tracing::info!("stopped");
                return Ok(Ended::Stopped);
            }
            s = signals.next() => match s {
                Sig::Hup => tracing::info!("SIGHUP received while shutting down; ignored"),
                s => {
                    tracing::warn!(
                        signal = s.name(),
                        "second signal; exiting without waiting for in-flight messages, the broker redelivers them"
                    );
                    return Ok(Ended::Forced(s.exit_code()));
                }
            },
        }
    }
}

/// Log what a SIGHUP re-check found, one line per pipeline (a swap or a
/// failure is also logged by the reloader itself, with its details).
async fn recheck(reload: impl Future<Output = Vec<(String, ReloadResult)>>) {
    let results = reload.await;
    if results.is_empty() {
        tracing::info!("no pipeline has reload = true; no plugin file to re-check");
    }
    for (pipeline, result) in results {
        let result = match result {
            ReloadResult::Unchanged => "unchanged".to_string(),
            ReloadResult::Swapped { old, new } => format!("reloaded {old} -> {new}"),
            ReloadResult::Missing => "file missing; the loaded version keeps serving".into(),
            ReloadResult::Failed(e) => format!("failed ({e}); the loaded version keeps serving"),
            ReloadResult::Unsettled { retry_in } => format!(
                "still being written; looked at again when it settles (within {} ms)",
                retry_in.as_millis()
            ),
        };
        tracing::info!(pipeline = %pipeline, result = %result, "plugin file re-checked");
    }
}

/// A signal `warren run` acts on.
#[derive(Clone, Copy)]
enum Sig {
    Int,
    Term,
    Hup,
}

impl Sig {
    fn name(self) -> &'static str {
        match self {
            Self::Int => "SIGINT",
            Self::Term => "SIGTERM",
            Self::Hup => "SIGHUP",
        }
    }

    /// The shell's convention for "killed by this signal": 128 + its number.
    fn exit_code(self) -> u8 {
        match self {
            Self::Int => 130,
            Self::Term => 143,
            Self::Hup => 129,
        }
    }
}

/// The process's SIGINT, SIGTERM and SIGHUP, as a stream.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn listen() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("cannot listen for {name}"))
        };
        Ok(Self {
            int: listen(SignalKind::interrupt(), "SIGINT")?,
            term: listen(SignalKind::terminate(), "SIGTERM")?,
            hup: listen(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    #[cfg(not(unix))]
    fn listen() -> Result<Self> {
        Ok(Self {})
    }

    /// The next signal. A stream that can no longer deliver (it never ends
    /// while the runtime runs) just stops answering.
    #[cfg(unix)]
    async fn next(&mut self) -> Sig {
        tokio::select! {
            Some(()) = self.int.recv() => Sig::Int,
            Some(()) = self.term.recv() => Sig::Term,
            Some(()) = self.hup.recv() => Sig::Hup,
            else => std::future::pending().await,
        }
    }

    #[cfg(not(unix))]
    async fn next(&mut self) -> Sig {
        match tokio::signal::ctrl_c().await {
            Ok(()) => Sig::Int,
            Err(_) => std::future::pending().await,
        }
    }
}
