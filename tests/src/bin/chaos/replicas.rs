//! The `warren run` replicas: real processes of the real binary, each kept
//! running by a keeper task that starts it again whenever it exits (as a
//! Deployment's controller would), and records how and why it exited.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why the harness expects a replica to exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Kill,
    Term,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Kill => "KILL",
            Signal::Term => "TERM",
        }
    }
}

/// One exit of a replica process.
#[derive(Debug, Clone)]
pub struct Exit {
    pub replica: usize,
    /// The signal the harness sent, if any (none: an exit nobody asked for).
    pub signal: Option<Signal>,
    /// From the signal to the exit.
    pub after: Option<Duration>,
    pub status: String,
    pub success: bool,
}

#[derive(Debug, Default)]
struct State {
    pid: Option<u32>,
    signalled: Option<(Signal, Instant)>,
    stopping: bool,
}

#[derive(Debug)]
pub struct Replica {
    pub index: usize,
    pub ops_port: u16,
    config: PathBuf,
    log: PathBuf,
    warren: PathBuf,
    state: Mutex<State>,
    /// Starts so far; bumped when a new process is running.
    generation: watch::Sender<u64>,
    exits: Mutex<Vec<Exit>>,
}

impl Replica {
    pub fn new(
        index: usize,
        ops_port: u16,
        config: PathBuf,
        log: PathBuf,
        warren: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Self {
            index,
            ops_port,
            config,
            log,
            warren,
            state: Mutex::new(State::default()),
            generation: watch::Sender::new(0),
            exits: Mutex::new(Vec::new()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn exits(&self) -> Vec<Exit> {
        self.exits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Start the keeper: it runs the process, and runs it again after each
    /// exit until `stop` is called.
    pub fn keep(self: &Arc<Self>) -> JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                if me.state().stopping {
                    return;
                }
                let mut child = match me.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("chaos: replica {}: cannot start: {e:#}", me.index);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                me.state().pid = child.id();
                me.generation.send_modify(|g| *g += 1);
                let status = child.wait().await;
                let (signal, since) = {
                    let mut s = me.state();
                    s.pid = None;
                    match s.signalled.take() {
                        Some((sig, at)) => (Some(sig), Some(at.elapsed())),
                        None => (None, None),
                    }
                };
                let (status, success) = match status {
                    Ok(st) => (st.to_string(), st.success()),
                    Err(e) => (format!("wait failed: {e}"), false),
                };
                if signal.is_none() {
                    eprintln!(
                        "chaos: replica {} exited unasked: {status} (log {})",
                        me.index,
                        me.log.display()
                    );
                }
                if let Ok(mut exits) = me.exits.lock() {
                    exits.push(Exit {
                        replica: me.index,
                        signal,
                        after: since,
                        status,
                        success,
                    });
                }
            }
        })
    }

    fn spawn(&self) -> Result<tokio::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let err = log.try_clone()?;
        tokio::process::Command::new(&self.warren)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.warren.display()))
    }

    /// Send `signal` to the running process (recorded, so its exit is
    /// expected). Returns the generation that was signalled.
    pub async fn signal(&self, signal: Signal) -> Result<u64> {
        let generation = self.generation();
        let pid = {
            let mut s = self.state();
            let pid = s.pid.context("the replica is not running")?;
            s.signalled = Some((signal, Instant::now()));
            pid
        };
        let status = tokio::process::Command::new("kill")
            .arg("-s")
            .arg(signal.name())
            .arg(pid.to_string())
            .status()
            .await?;
        if !status.success() {
            bail!("kill -s {} {pid} failed: {status}", signal.name());
        }
        Ok(generation)
    }

    /// Wait until the keeper has started a process after `generation`.
    pub async fn restarted_after(&self, generation: u64, limit: Duration) -> Result<()> {
        let mut rx = self.generation.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|g| *g > generation))
            .await
            .with_context(|| {
                format!(
                    "replica {} was not started again within {limit:?}",
                    self.index
                )
            })?
            .context("keeper gone")?;
        Ok(())
    }

    /// Its `/healthz/ready` as JSON when it answers 200 (every pipeline consuming).
    pub async fn readiness(&self) -> Option<serde_json::Value> {
        let base = format!("http://127.0.0.1:{}", self.ops_port);
        let (status, body) = warren_tests::http("GET", &base, "/healthz/ready", None)
            .await
            .ok()?;
        if status != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    /// Wait until it is ready; its readiness JSON.
    pub async fn ready(&self, limit: Duration) -> Result<serde_json::Value> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = self.readiness().await
                && v["ready"] == true
            {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!(
                    "replica {} not ready within {limit:?} (log {})",
                    self.index,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The plugin version its (only) pipeline runs, once ready.
    pub async fn plugin_version(&self) -> Option<String> {
        let v = self.readiness().await?;
        v["pipelines"][0]["plugin_version"]
            .as_str()
            .map(str::to_string)
    }

    /// Stop for good: no restart; SIGTERM, and wait for the exit. A replica
    /// still running after `limit` is killed, and that is an error.
    pub async fn stop(&self, mut keeper: JoinHandle<()>, limit: Duration) -> Result<()> {
        self.state().stopping = true;
        if self.state().pid.is_some() {
            self.signal(Signal::Term).await?;
        }
        match tokio::time::timeout(limit, &mut keeper).await {
            Ok(joined) => joined.context("keeper task failed"),
            Err(_) => {
                self.kill_for_good().await;
                let _ = tokio::time::timeout(Duration::from_secs(10), keeper).await;
                bail!(
                    "replica {} did not stop within {limit:?} of SIGTERM; killed",
                    self.index
                )
            }
        }
    }

    /// SIGKILL the process and keep it from being started again (the run is
    /// being torn down).
    pub async fn kill_for_good(&self) {
        self.state().stopping = true;
        if self.state().pid.is_some() {
            let _ = self.signal(Signal::Kill).await;
        }
    }

    /// One line on how it is doing, for a diagnosis: running or not, its
    /// exits so far, and its readiness answer.
    pub async fn describe(&self) -> String {
        let pid = self.state().pid;
        let exits = self.exits();
        let base = format!("http://127.0.0.1:{}", self.ops_port);
        let ready = match warren_tests::http("GET", &base, "/healthz/ready", None).await {
            Ok((status, body)) => {
                let body: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
                let cut: String = body.chars().take(600).collect();
                format!("readiness {status}: {cut}")
            }
            Err(e) => format!("readiness: {e:#}"),
        };
        format!(
            "{}, {} starts, {} exits ({}), log {}; {ready}",
            pid.map_or("not running".to_string(), |p| format!("pid {p}")),
            self.generation(),
            exits.len(),
            exits
                .iter()
                .map(|e| format!(
                    "{}{}",
                    e.signal.map_or("unasked", |s| s.name()),
                    if e.success { " ok" } else { "" }
                ))
                .collect::<Vec<_>>()
                .join(", "),
            self.log.display()
        )
    }
}
