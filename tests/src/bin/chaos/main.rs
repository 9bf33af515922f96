//! `chaos`: the fault-injection run behind `scripts/chaos.sh`.
//!
//! Starts a RabbitMQ cluster (`scripts/broker.sh cluster`, on ports of its
//! own), N `warren run` processes of the real binary running the `probe`
//! plugin, a publisher with confirms and a collector; while messages flow it
//! injects faults one after another, each waited on by an event (a process
//! restarted, a replica ready again, new messages arriving) with a deadline,
//! never by a fixed sleep. Then it accounts for every confirmed message id:
//! each must be in exactly one terminal place (RPC reply, output queue or
//! DLQ, as its body asked), nothing left in warren's queues. It prints one
//! table and exits 1 if a message was lost or misplaced, a replica failed to
//! drain or exited unasked, or the run got stuck; 2 if it could not run.
//!
//! It never hangs: every wait has a limit, and the whole run has one deadline
//! (`--run-deadline-secs`). When a wait or the deadline runs out, the run
//! stops the traffic and the replicas at once and prints a diagnosis instead
//! of waiting on: each queue's depth and consumers while the replicas still
//! ran, what each replica and node reported, and for every confirmed message
//! not seen whether it sits in a queue (stranded, not lost) or is gone. On
//! SIGTERM or SIGINT it stops its replicas and its cluster before exiting.
//!
//! Every count of a fault is a flag, so the full run of RELIABILITY.md and the
//! short one of `scripts/test.sh` are the same code (`chaos --help`).

mod cluster;
mod replicas;
mod report;
mod traffic;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::watch;

use cluster::Cluster;
use replicas::{Replica, Signal};
use report::{FaultKind, FaultRecord};
use traffic::{Ledger, Queues, tracing_note as note};

const USAGE: &str = "\
chaos: fault injection against warren replicas on a RabbitMQ cluster

  chaos --warren PATH [--short] [options]

  --warren PATH          the warren binary to run (required)
  --plugin PATH          the probe plugin (default $WARREN_PLUGIN_DIR/probe.wasm)
  --dir PATH             state: cluster, configs, logs (default ./.broker/chaos)
  --base-port N          node 1's AMQP port (default 5811; node I: N+I-1,
                         management +10000, distribution +20000, epmd N+1000)
  --nodes N              cluster nodes (default 3)
  --replicas N           warren processes (default 3)
  --rate N               messages published per second (default 40)
  --replica-kills N      SIGKILL of a replica, restarted by its keeper (default 20)
  --replica-terms N      SIGTERM of a replica under load: it must drain (default 5)
  --leader-stops N       graceful stop/start of the node leading the queue (default 5)
  --leader-kills N       SIGKILL/start of the node leading the queue (default 5)
  --cluster-restarts N   every node stopped, then started again (default 2)
  --close-all N          rabbitmqctl close_all_connections (default 10)
  --reloads N            plugin hot reloads (symlink swaps) (default 50)
  --deadline-secs N      longest wait for any one event (default 240)
  --run-deadline-secs N  the whole run, cluster start to verdict (default 10800;
                         1200 with --short); past it the run ends with a diagnosis
  --short                the CI run: 2 replicas, rate 20, 2 replica kills, 1 of
                         every other fault, 3 reloads (flags after it override)
";

#[derive(Debug, Clone)]
struct Args {
    warren: PathBuf,
    plugin: PathBuf,
    dir: PathBuf,
    base_port: u16,
    nodes: u16,
    replicas: usize,
    rate: u32,
    counts: Vec<(FaultKind, u32)>,
    deadline: Duration,
    run_deadline: Duration,
}

fn parse_args() -> Result<Option<Args>> {
    let plugin_dir = std::env::var("WARREN_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist"));
    let mut a = Args {
        warren: PathBuf::new(),
        plugin: plugin_dir.join("probe.wasm"),
        dir: PathBuf::from(".broker/chaos"),
        base_port: 5811,
        nodes: 3,
        replicas: 3,
        rate: 40,
        counts: vec![
            (FaultKind::ReplicaKill, 20),
            (FaultKind::ReplicaTerm, 5),
            (FaultKind::LeaderStop, 5),
            (FaultKind::LeaderKill, 5),
            (FaultKind::ClusterRestart, 2),
            (FaultKind::CloseAll, 10),
            (FaultKind::Reload, 50),
        ],
        deadline: Duration::from_secs(240),
        run_deadline: Duration::from_secs(3 * 3600),
    };
    let mut args = std::env::args().skip(1);
    let set = |a: &mut Args, kind: FaultKind, n: u32| {
        for c in &mut a.counts {
            if c.0 == kind {
                c.1 = n;
            }
        }
    };
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            print!("{USAGE}");
            return Ok(None);
        }
        if flag == "--short" {
            a.replicas = 2;
            a.rate = 20;
            a.run_deadline = Duration::from_secs(1200);
            for (kind, n) in [
                (FaultKind::ReplicaKill, 2),
                (FaultKind::ReplicaTerm, 1),
                (FaultKind::LeaderStop, 1),
                (FaultKind::LeaderKill, 1),
                (FaultKind::ClusterRestart, 1),
                (FaultKind::CloseAll, 1),
                (FaultKind::Reload, 3),
            ] {
                set(&mut a, kind, n);
            }
            continue;
        }
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = || -> Result<u32> {
            value
                .parse()
                .with_context(|| format!("{flag} {value:?}: not a whole number"))
        };
        match flag.as_str() {
            "--warren" => a.warren = PathBuf::from(&value),
            "--plugin" => a.plugin = PathBuf::from(&value),
            "--dir" => a.dir = PathBuf::from(&value),
            "--base-port" => a.base_port = u16::try_from(num()?)?,
            "--nodes" => a.nodes = u16::try_from(num()?)?,
            "--replicas" => a.replicas = usize::try_from(num()?)?,
            "--rate" => a.rate = num()?,
            "--replica-kills" => set(&mut a, FaultKind::ReplicaKill, num()?),
            "--replica-terms" => set(&mut a, FaultKind::ReplicaTerm, num()?),
            "--leader-stops" => set(&mut a, FaultKind::LeaderStop, num()?),
            "--leader-kills" => set(&mut a, FaultKind::LeaderKill, num()?),
            "--cluster-restarts" => set(&mut a, FaultKind::ClusterRestart, num()?),
            "--close-all" => set(&mut a, FaultKind::CloseAll, num()?),
            "--reloads" => set(&mut a, FaultKind::Reload, num()?),
            "--deadline-secs" => a.deadline = Duration::from_secs(u64::from(num()?)),
            "--run-deadline-secs" => a.run_deadline = Duration::from_secs(u64::from(num()?)),
            _ => bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    if a.warren.as_os_str().is_empty() {
        bail!("--warren PATH is required\n{USAGE}");
    }
    if !(1..=9).contains(&a.nodes) || a.replicas == 0 || a.rate == 0 {
        bail!("--nodes must be 1 to 9, --replicas and --rate at least 1");
    }
    Ok(Some(a))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chaos: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("chaos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A copy of the plugin with a custom section naming `variant` appended: the
/// same code under another digest, so that swapping between two copies is a
/// real hot reload (an identical file would be `unchanged`).
fn variant(plugin: &[u8], variant: &str) -> Vec<u8> {
    const NAME: &[u8] = b"warren-chaos-variant";
    let mut payload = vec![u8::try_from(NAME.len()).unwrap_or(0)];
    payload.extend_from_slice(NAME);
    payload.extend_from_slice(variant.as_bytes());
    let mut out = plugin.to_vec();
    out.push(0); // custom section id
    // The payload is under 128 bytes: its size is one LEB128 byte.
    out.push(u8::try_from(payload.len()).unwrap_or(0));
    out.extend_from_slice(&payload);
    out
}

/// Point `link` at `target` in one step (a new symlink renamed over the old),
/// as a volume's atomic update does.
fn swap_symlink(link: &Path, target: &Path) -> Result<()> {
    let tmp = link.with_extension("wasm.new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)?;
    Ok(())
}

/// The order of the faults: kinds interleaved, so every kind is spread over
/// the run instead of coming in one block.
fn schedule(counts: &[(FaultKind, u32)]) -> Vec<FaultKind> {
    let mut left: Vec<(FaultKind, u32)> = counts.to_vec();
    let mut out = Vec::new();
    while left.iter().any(|(_, n)| *n > 0) {
        for (kind, n) in &mut left {
            if *n > 0 {
                out.push(*kind);
                *n -= 1;
            }
        }
    }
    out
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct World {
    args: Args,
    cluster: Cluster,
    urls: Vec<String>,
    queues: Queues,
    replicas: Vec<Arc<Replica>>,
    ledger: Arc<Ledger>,
    plugin_link: PathBuf,
    variants: [PathBuf; 2],
    current_variant: usize,
    next_replica: usize,
    /// When the faults and the waits for messages must be over, leaving
    /// [`WRAP_UP`] of the run's deadline to stop everything and report.
    faults_end: Instant,
}

/// What the run keeps of its deadline to stop the traffic and the replicas,
/// look for missing messages and print the report.
const WRAP_UP: Duration = Duration::from_secs(180);

impl World {
    /// The limit of one wait: the per-event deadline, or what is left of the
    /// run's, whichever is shorter.
    fn limit(&self) -> Duration {
        self.args
            .deadline
            .min(self.faults_end.saturating_duration_since(Instant::now()))
    }

    /// Every replica answers ready.
    async fn all_ready(&self) -> Result<()> {
        for r in &self.replicas {
            r.ready(self.limit()).await?;
        }
        Ok(())
    }

    /// New messages arrive again (the event that ends every fault).
    async fn flowing(&self) -> Result<()> {
        let from = self.ledger.arrivals();
        self.ledger.progress(from, 10, self.limit()).await
    }

    fn pick_replica(&mut self) -> Arc<Replica> {
        let r = Arc::clone(&self.replicas[self.next_replica % self.replicas.len()]);
        self.next_replica += 1;
        r
    }

    async fn inject(&mut self, kind: FaultKind) -> Result<String> {
        let limit = self.limit();
        match kind {
            FaultKind::ReplicaKill => {
                let r = self.pick_replica();
                let generation = r.signal(Signal::Kill).await?;
                r.restarted_after(generation, limit).await?;
                r.ready(limit).await?;
                self.flowing().await?;
                Ok(format!("replica {}", r.index))
            }
            FaultKind::ReplicaTerm => {
                let r = self.pick_replica();
                let before = r.exits().len();
                let generation = r.signal(Signal::Term).await?;
                r.restarted_after(generation, limit).await?;
                let exit = r.exits().get(before).cloned().context("no exit recorded")?;
                r.ready(limit).await?;
                self.flowing().await?;
                Ok(format!(
                    "replica {}: {} after {:.1} s",
                    r.index,
                    exit.status,
                    exit.after.unwrap_or_default().as_secs_f64()
                ))
            }
            FaultKind::LeaderStop | FaultKind::LeaderKill => {
                let leader = self.cluster.leader(&self.queues.input).await?;
                let verb = if kind == FaultKind::LeaderStop {
                    "node-stop"
                } else {
                    "node-kill"
                };
                let t0 = Instant::now();
                self.cluster.node(verb, leader).await?;
                // The other members elect a leader; replicas on the lost node
                // move to another one: messages arrive again.
                self.flowing().await?;
                let stall = t0.elapsed();
                let after = self.cluster.leader(&self.queues.input).await.ok();
                self.cluster.node("node-start", leader).await?;
                self.all_ready().await?;
                Ok(format!(
                    "node {leader} led; flowing again {:.1} s after {verb} returned; new leader {}",
                    stall.as_secs_f64(),
                    after.map_or("?".to_string(), |n| n.to_string())
                ))
            }
            FaultKind::ClusterRestart => {
                let t0 = Instant::now();
                self.cluster.stop().await?;
                let stopped = t0.elapsed();
                self.urls = self.cluster.start().await?;
                let started = t0.elapsed();
                self.all_ready().await?;
                self.flowing().await?;
                Ok(format!(
                    "stopped in {:.1} s, running again at {:.1} s, flowing at {:.1} s",
                    stopped.as_secs_f64(),
                    started.as_secs_f64(),
                    t0.elapsed().as_secs_f64()
                ))
            }
            FaultKind::CloseAll => {
                self.cluster.close_all_connections().await?;
                self.all_ready().await?;
                self.flowing().await?;
                Ok(String::new())
            }
            FaultKind::Reload => {
                let before = self.versions().await;
                self.current_variant = 1 - self.current_variant;
                swap_symlink(&self.plugin_link, &self.variants[self.current_variant])?;
                let deadline = Instant::now() + limit;
                loop {
                    let now = self.versions().await;
                    let all_new = now.iter().zip(&before).all(|(n, b)| n.is_some() && n != b);
                    let same = now.windows(2).all(|w| w[0] == w[1]);
                    if all_new && same {
                        break;
                    }
                    if Instant::now() >= deadline {
                        bail!(
                            "plugin reload: versions {now:?} (before {before:?}) after {limit:?}"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                self.flowing().await?;
                Ok(String::new())
            }
        }
    }

    async fn versions(&self) -> Vec<Option<String>> {
        let mut v = Vec::new();
        for r in &self.replicas {
            v.push(r.plugin_version().await);
        }
        v
    }
}

fn config_text(urls: &[String], q: &Queues, plugin: &Path, ops_port: u16) -> String {
    let list = urls
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"# Written by the chaos run (tests/src/bin/chaos).
[broker]
urls = [{list}]
reconnect_delay_ms = 200

[ops]
listen = "127.0.0.1:{ops_port}"
shutdown_grace_ms = 10000

[[pipeline]]
name = "chaos"
queue = {input:?}
plugin = {plugin:?}
quorum_initial_group_size = {n}
concurrency = 2

[[pipeline.output]]
queues = [{output:?}]

[pipeline.retry]
max_attempts = 3
initial_delay_ms = 200
max_delay_ms = 400
"#,
        input = q.input,
        plugin = plugin.display().to_string(),
        output = q.output,
        n = urls.len(),
    )
}

/// Turns true at the first SIGTERM, SIGINT or SIGHUP.
fn interrupts() -> Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => note("SIGTERM: stopping the replicas and the cluster"),
            _ = int.recv() => note("SIGINT: stopping the replicas and the cluster"),
            _ = hup.recv() => note("SIGHUP: stopping the replicas and the cluster"),
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn run(args: Args) -> Result<bool> {
    let started = Instant::now();
    let mut interrupted = interrupts()?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::path::absolute(&args.dir)?;
    let cluster = Cluster {
        script: repo.join("scripts/broker.sh"),
        base: args.base_port,
        dir: dir.join("cluster"),
        nodes: args.nodes,
    };
    // A fresh start: a cluster left by an interrupted run is stopped and its
    // state removed, so queues and counts are this run's alone.
    if cluster.dir.exists() {
        let _ = cluster.stop().await;
        std::fs::remove_dir_all(&cluster.dir)
            .with_context(|| format!("removing {}", cluster.dir.display()))?;
    }
    let work = dir.join("run");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    let plugin = std::fs::read(&args.plugin)
        .with_context(|| format!("reading the probe plugin {}", args.plugin.display()))?;
    let variants = [work.join("probe-a.wasm"), work.join("probe-b.wasm")];
    std::fs::write(&variants[0], variant(&plugin, "a"))?;
    std::fs::write(&variants[1], variant(&plugin, "b"))?;
    let plugin_link = work.join("probe.wasm");
    swap_symlink(&plugin_link, &variants[0])?;

    note(&format!(
        "starting a {}-node cluster on port {} ({}); the run ends by {:.0} s from now",
        args.nodes,
        args.base_port,
        cluster.dir.display(),
        args.run_deadline.as_secs_f64()
    ));
    let urls = tokio::select! {
        urls = cluster.start() => urls.context("starting the cluster"),
        _ = interrupted.wait_for(|i| *i) => Err(anyhow::anyhow!("interrupted while the cluster started")),
    };
    let urls = match urls {
        Ok(urls) => urls,
        Err(e) => {
            let _ = cluster.stop().await;
            return Err(e);
        }
    };
    note(&format!(
        "cluster up in {:.0} s",
        started.elapsed().as_secs_f64()
    ));

    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let input = format!("chaos.{stamp}.work");
    let queues = Queues {
        output: format!("chaos.{stamp}.out"),
        replies: format!("chaos.{stamp}.replies"),
        dlq: format!("{input}.dlq"),
        input,
    };
    if let Err(e) = traffic::declare(&urls, &queues).await {
        let _ = cluster.stop().await;
        return Err(e);
    }

    let mut replicas = Vec::new();
    let mut keepers = Vec::new();
    for i in 1..=args.replicas {
        let port = free_port()?;
        let config = work.join(format!("replica-{i}.toml"));
        std::fs::write(&config, config_text(&urls, &queues, &plugin_link, port))?;
        let r = Replica::new(
            i,
            port,
            config,
            work.join(format!("replica-{i}.log")),
            std::path::absolute(&args.warren)?,
        );
        keepers.push(r.keep());
        replicas.push(r);
    }
    let run_end = started + args.run_deadline;
    let mut world = World {
        args: args.clone(),
        cluster: cluster.clone(),
        urls: urls.clone(),
        queues: queues.clone(),
        replicas: replicas.clone(),
        ledger: Arc::new(Ledger::default()),
        plugin_link,
        variants,
        current_variant: 0,
        next_replica: 0,
        faults_end: run_end.checked_sub(WRAP_UP).unwrap_or(run_end),
    };
    let outcome = tokio::select! {
        o = drive(&mut world, keepers) => o,
        _ = interrupted.wait_for(|i| *i) => {
            for r in &replicas {
                r.kill_for_good().await;
            }
            Err(anyhow::anyhow!("interrupted"))
        }
    };
    // The cluster is stopped whatever happened; its logs stay on failure.
    let stop = cluster.stop().await;
    let result = match (outcome, stop) {
        (Ok(ok), Ok(())) => {
            if ok {
                let _ = std::fs::remove_dir_all(&cluster.dir);
            }
            Ok(ok)
        }
        (Ok(_), Err(e)) => Err(e.context("stopping the cluster")),
        (Err(e), _) => Err(e),
    };
    note(&format!(
        "done in {:.0} s; replica logs and configs in {}",
        started.elapsed().as_secs_f64(),
        work.display()
    ));
    result
}

/// What the world looks like when the run went wrong, taken while the
/// replicas still run: each queue, each replica's readiness, each node.
async fn snapshot(w: &World, queues: &[String]) -> (Vec<String>, Vec<String>) {
    let mut lines = Vec::new();
    match traffic::inspect(&w.urls, queues, Duration::from_secs(30)).await {
        Ok(states) => lines.extend(states.iter().map(|s| {
            format!(
                "queue {}: {} ready, {} consumers",
                s.name, s.ready, s.consumers
            )
        })),
        Err(e) => lines.push(format!("queues: no node answered: {e:#}")),
    }
    for r in &w.replicas {
        lines.push(format!("replica {}: {}", r.index, r.describe().await));
    }
    let cluster =
        match tokio::time::timeout(Duration::from_secs(60), w.cluster.run(&["status"])).await {
            Ok(Ok(text)) => text,
            Ok(Err(e)) => format!("cluster status failed: {e:#}"),
            Err(_) => "cluster status did not answer within 60 s".to_string(),
        };
    (lines, cluster.lines().map(str::to_string).collect())
}

/// The run once the cluster is up and the replicas are started: traffic,
/// faults, drain, accounting. `Ok(false)`: the run finished and failed.
async fn drive(w: &mut World, keepers: Vec<tokio::task::JoinHandle<()>>) -> Result<bool> {
    let t0 = Instant::now();
    w.all_ready().await.context("replicas did not start")?;
    note(&format!("{} replicas ready", w.replicas.len()));

    let (stop_tx, stop_rx) = watch::channel(false);
    let publisher = tokio::spawn(traffic::publish(
        w.urls.clone(),
        w.queues.clone(),
        w.args.rate,
        Arc::clone(&w.ledger),
        stop_rx.clone(),
    ));
    let (collect_tx, collect_rx) = watch::channel(false);
    let collector = tokio::spawn(traffic::collect(
        w.urls.clone(),
        w.queues.clone(),
        Arc::clone(&w.ledger),
        collect_rx,
    ));
    w.flowing()
        .await
        .context("no message went through before the faults")?;
    note("messages flowing; injecting faults");

    let plan = schedule(&w.args.counts);
    let mut faults: Vec<FaultRecord> = Vec::new();
    let mut stuck: Option<String> = None;
    for (n, kind) in plan.iter().enumerate() {
        let start = Instant::now();
        let left = w.faults_end.saturating_duration_since(start);
        // The fault's own waits are limited; this also bounds the cluster
        // commands and anything else it awaits by the run's deadline.
        let result = match tokio::time::timeout(left, w.inject(*kind)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!(
                "the run's deadline ({:?}) came during this fault",
                w.args.run_deadline
            )),
        };
        let took = start.elapsed();
        match result {
            Ok(detail) => {
                note(&format!(
                    "fault {}/{}: {} recovered in {:.1} s {detail}",
                    n + 1,
                    plan.len(),
                    kind.name(),
                    took.as_secs_f64()
                ));
                faults.push(FaultRecord {
                    kind: *kind,
                    start,
                    end: Instant::now(),
                    detail,
                });
            }
            Err(e) => {
                let text = format!("fault {}/{} {}: {e:#}", n + 1, plan.len(), kind.name());
                note(&text);
                faults.push(FaultRecord {
                    kind: *kind,
                    start,
                    end: Instant::now(),
                    detail: format!("FAILED: {e:#}"),
                });
                stuck = Some(text);
                break;
            }
        }
    }
    let faults_done = Instant::now();

    let _ = stop_tx.send(true);
    let published = match tokio::time::timeout(Duration::from_secs(30), publisher).await {
        Ok(joined) => joined.context("publisher task")?.context("publisher")?,
        Err(_) => bail!("the publisher did not stop within 30 s of being asked"),
    };
    note(&format!(
        "publisher stopped: {} confirmed; waiting for every message",
        published.confirmed
    ));
    // After a stuck fault there is nothing to wait for: the diagnosis below
    // says where the missing messages are.
    let arrived = if stuck.is_some() {
        Err(anyhow::anyhow!(
            "{} confirmed messages not seen when the run was stopped",
            w.ledger.missing()
        ))
    } else {
        w.ledger.all_arrived(w.limit()).await
    };
    if let Err(e) = &arrived {
        note(&format!("{e:#}"));
    }

    let tiers: Vec<String> = [200, 400]
        .iter()
        .map(|ms| format!("{}.retry.{ms}", w.queues.input))
        .collect();
    let mut warren_queues = vec![w.queues.input.clone()];
    warren_queues.extend(tiers);
    let terminal = vec![
        w.queues.replies.clone(),
        w.queues.output.clone(),
        w.queues.dlq.clone(),
    ];
    let all_queues: Vec<String> = warren_queues.iter().chain(&terminal).cloned().collect();
    let troubled = stuck.is_some() || arrived.is_err();
    let seen_while_running = if troubled {
        note("taking a snapshot of queues, replicas and nodes");
        Some(snapshot(w, &all_queues).await)
    } else {
        None
    };

    // Stop the replicas: what they still held unacked goes back to the
    // queues, where the counts below find it.
    let mut stop_errors = Vec::new();
    for (r, keeper) in w.replicas.iter().zip(keepers) {
        if let Err(e) = r.stop(keeper, Duration::from_secs(30)).await {
            stop_errors.push(format!("{e:#}"));
        }
    }
    let left = traffic::depths(&w.urls, &warren_queues, Duration::from_secs(60)).await?;
    // The collector drains the terminal places (late duplicates included),
    // as long as they keep getting shorter.
    let quiet = Duration::from_secs(if troubled { 15 } else { 60 });
    let mut terminal_left = traffic::depths(&w.urls, &terminal, Duration::from_secs(60)).await?;
    let mut last_change = Instant::now();
    while terminal_left.iter().any(|(_, n)| *n > 0) && last_change.elapsed() < quiet {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = traffic::depths(&w.urls, &terminal, Duration::from_secs(60)).await?;
        if now != terminal_left {
            last_change = Instant::now();
        }
        terminal_left = now;
    }
    let _ = collect_tx.send(true);
    let collector_reconnects = match tokio::time::timeout(Duration::from_secs(30), collector).await
    {
        Ok(joined) => joined.context("collector task")?.context("collector")?,
        Err(_) => bail!("the collector did not stop within 30 s of being asked"),
    };

    // Confirmed ids never seen: are they sitting in a queue, or gone?
    let located = if w.ledger.missing() > 0 {
        note(&format!(
            "looking for {} missing messages in the queues",
            w.ledger.missing()
        ));
        match traffic::locate(&w.urls, &all_queues, Duration::from_secs(60)).await {
            Ok(found) => Some(found),
            Err(e) => {
                note(&format!("could not read the queues: {e:#}"));
                None
            }
        }
    } else {
        None
    };

    let exits: Vec<replicas::Exit> = w.replicas.iter().flat_map(|r| r.exits()).collect();
    let report = report::Report {
        args_line: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        nodes: w.args.nodes,
        replicas: w.replicas.len(),
        rate: w.args.rate,
        faults,
        faults_span: faults_done.duration_since(t0),
        published,
        collector_reconnects,
        ledger: w.ledger.snapshot(),
        arrivals: w.ledger.arrival_times(),
        left: left.into_iter().chain(terminal_left).collect(),
        exits,
        stuck,
        not_arrived: arrived.err().map(|e| format!("{e:#}")),
        stop_errors,
        grace: Duration::from_secs(10),
        diagnosis: seen_while_running.map(|(queues, cluster)| report::Diagnosis {
            while_running: queues,
            cluster,
        }),
        located,
    };
    Ok(report.print())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_interleaved_and_counted() {
        let plan = schedule(&[
            (FaultKind::ReplicaKill, 3),
            (FaultKind::Reload, 1),
            (FaultKind::CloseAll, 0),
        ]);
        assert_eq!(
            plan,
            [
                FaultKind::ReplicaKill,
                FaultKind::Reload,
                FaultKind::ReplicaKill,
                FaultKind::ReplicaKill
            ]
        );
    }

    #[test]
    fn a_variant_is_the_plugin_plus_one_custom_section() {
        let v = variant(b"\0asm\x0d\0\x01\0", "b");
        assert_eq!(&v[..8], b"\0asm\x0d\0\x01\0");
        // id 0, size, name length, name, payload.
        let name = b"warren-chaos-variant";
        assert_eq!(v[8], 0);
        assert_eq!(usize::from(v[9]), 1 + name.len() + 1);
        assert_eq!(usize::from(v[10]), name.len());
        assert_eq!(&v[11..11 + name.len()], name);
        assert_eq!(v.last(), Some(&b'b'));
        assert_ne!(variant(b"x", "a"), variant(b"x", "b"));
    }
}
