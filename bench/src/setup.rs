//! Setting up what the scenarios measure: warren configurations, unique queue
//! names, child processes (killed when dropped) and their resident memory.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use warren::config::{Config, PipelineConfig};

use crate::Options;

/// A queue name no other run uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "bench.{prefix}.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// TOML string literal for a path.
pub fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// One `[[pipeline]]` table; `extra` goes inside it (keys, then sub-tables).
/// The plugin may publish to `<queue>.out` through the default exchange.
pub fn pipeline_toml(name: &str, queue: &str, plugin: &Path, extra: &str) -> String {
    format!(
        "[[pipeline]]\nname = {name:?}\nqueue = {queue:?}\nplugin = {}\nreload = false\n{extra}\n\
         [[pipeline.output]]\nqueues = [{:?}]\n",
        toml_path(plugin),
        format!("{queue}.out")
    )
}

/// `[[pipeline]]` keys for the run's queue type, prefetch and concurrency.
pub fn sizing(opts: &Options) -> String {
    format!(
        "queue_type = {:?}\nprefetch = {}\nconcurrency = {}\n",
        opts.queue_type, opts.prefetch, opts.concurrency
    )
}

/// A whole warren configuration as TOML: broker, ops (disabled unless
/// `ops_listen` is given), the compiled cache under the work dir, pipelines.
pub fn config_toml(
    opts: &Options,
    ops_listen: Option<&str>,
    runtime: &str,
    pipelines: &str,
) -> String {
    let cache = opts.work_dir.join("compiled");
    let runtime = if runtime.is_empty() {
        format!("cache_dir = {}\n", toml_path(&cache))
    } else {
        runtime.to_string()
    };
    format!(
        "[broker]\nurl = {:?}\nreconnect_delay_ms = 100\n\
         [ops]\nlisten = {:?}\nshutdown_grace_ms = 5000\n\
         [runtime]\n{runtime}\n{pipelines}",
        opts.broker_url,
        ops_listen.unwrap_or(""),
    )
}

/// Parse a configuration built with [`config_toml`].
pub fn config(opts: &Options, pipelines: &str) -> Result<Config> {
    Config::parse(&config_toml(opts, None, "", pipelines), Path::new("."))
        .context("the generated warren configuration is invalid")
}

/// The pipeline named `name` of `config`.
pub fn pipeline<'a>(config: &'a Config, name: &str) -> Result<&'a PipelineConfig> {
    config
        .pipelines
        .iter()
        .find(|p| p.name == name)
        .with_context(|| format!("no pipeline {name}"))
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough locally).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A child process that is killed (and reaped) when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Spawn `cmd` + `args` with `RUST_LOG=error`, output discarded unless
    /// `WARREN_BENCH_CHILD_OUTPUT` is set.
    pub fn spawn(cmd: &[String], args: &[String]) -> Result<Self> {
        let (program, rest) = cmd.split_first().context("empty command")?;
        let mut c = Command::new(program);
        c.args(rest).args(args).env("RUST_LOG", "error");
        Self::start(c)
    }

    /// Spawn a prepared command (stdin closed; output as for [`Self::spawn`]).
    pub fn start(mut cmd: Command) -> Result<Self> {
        let inherit = std::env::var_os("WARREN_BENCH_CHILD_OUTPUT").is_some();
        let out = || {
            if inherit {
                Stdio::inherit()
            } else {
                Stdio::null()
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out())
            .stderr(out())
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        Ok(Self { child })
    }

    /// Process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Fail if the child has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the child process exited early: {status}");
        }
        Ok(())
    }

    /// Resident set size now, in bytes.
    pub fn rss(&self) -> Result<u64> {
        rss_of(self.child.id())
    }

    /// Peak resident set size since the process started (`VmHWM`), in bytes:
    /// the kernel keeps it, so no sampling period can miss the peak.
    pub fn peak_rss(&self) -> Result<u64> {
        status_kib(self.child.id(), "VmHWM:").map(|kib| kib * 1024)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmRSS` of a process, in bytes.
pub fn rss_of(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS:").map(|kib| kib * 1024)
}

/// A `kB` field of `/proc/<pid>/status`.
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Poll `f` until it returns `Ok(true)` or `timeout` passes.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if matches!(f().await, Ok(true)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
