//! Small statistics: percentiles of latency samples, and steady-state rates
//! from a sampled counter.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;

/// Percentiles of a set of samples (any unit).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nearest-rank percentile of sorted samples; `p` in 0..=100.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // The epsilon keeps 99.9% of 1000 at rank 999 despite float rounding.
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarise samples.
pub fn summarize(mut v: Vec<f64>) -> Summary {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let mean = if n == 0 {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / n as f64
    };
    Summary {
        n,
        p50: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        p999: percentile(&v, 99.9),
        max: v.last().copied().unwrap_or(f64::NAN),
        mean,
    }
}

/// Median of values (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

/// A measured rate.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Rate {
    /// Events per second over the steady window.
    pub per_sec: f64,
    /// Events counted in total (warm-up and tail included).
    pub counted: u64,
    /// Length of the steady window.
    pub window: Duration,
    /// CPU time this process spent per event over the window, in µs (all
    /// threads; from `/proc/self/stat`, 10 ms resolution), if readable.
    pub cpu_us_per_event: Option<f64>,
}

/// CPU time (user + system) of this process so far, in clock ticks.
pub fn process_cpu_ticks() -> Option<u64> {
    stat_cpu(&std::fs::read_to_string("/proc/self/stat").ok()?).map(|(_, t)| t)
}

/// Parent pid and CPU ticks (user + system) from a `/proc/<pid>/stat` line.
fn stat_cpu(stat: &str) -> Option<(u32, u64)> {
    // Fields after the command name (which may contain spaces) start at "state".
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid: u32 = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// CPU ticks of process `root` and all its living descendants (a Celery
/// worker's pool processes, say). Descendants that already exited are not
/// counted, so sample it while the tree is running.
pub fn tree_cpu_ticks(root: u32) -> Option<u64> {
    let mut procs: Vec<(u32, u32, u64)> = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((ppid, t)) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .as_deref()
            .and_then(stat_cpu)
        {
            procs.push((pid, ppid, t));
        }
    }
    let mut tree = vec![root];
    let mut total = 0;
    let mut found = false;
    while let Some(p) = tree.pop() {
        for &(pid, ppid, t) in &procs {
            if pid == p {
                total += t;
                found = true;
            }
            if ppid == p {
                tree.push(pid);
            }
        }
    }
    found.then_some(total)
}

/// CPU ticks per thread of this process: (thread id, name, ticks).
pub fn thread_cpu_ticks() -> Vec<(u32, String, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut v = Vec::new();
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let name = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map(|(n, _)| n.to_string())
            .unwrap_or_default();
        let f: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let t = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        v.push((tid, name.clone(), t(11) + t(12)));
        // Context switches ride along as a pseudo-thread "<name>#cs" (count, not ticks).
        if let Ok(status) = std::fs::read_to_string(e.path().join("status")) {
            let cs: u64 = status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            v.push((tid | 0x8000_0000, format!("{name}#cs"), cs));
        }
    }
    v
}

/// CPU ms per thread name between two [`thread_cpu_ticks`] snapshots
/// (threads that appeared in between count from zero).
pub fn thread_cpu_diff(
    before: &[(u32, String, u64)],
    after: &[(u32, String, u64)],
) -> Vec<(String, f64)> {
    let mut by_name: std::collections::BTreeMap<String, u64> = Default::default();
    for (tid, name, ticks) in after {
        let was = before
            .iter()
            .find(|b| b.0 == *tid)
            .map(|b| b.2)
            .unwrap_or(0);
        *by_name.entry(name.clone()).or_default() += ticks.saturating_sub(was);
    }
    by_name
        .into_iter()
        .map(|(n, t)| (n, t as f64 * 1e3 / TICKS_PER_SEC))
        .collect()
}

/// Linux reports process times in USER_HZ ticks, 100 per second.
const TICKS_PER_SEC: f64 = 100.0;

/// One sample of a run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    count: u64,
    cpu: Option<u64>,
}

/// Sample `counter` until it reaches `total` or `limit` has passed since the
/// first event, and return the rate over the steady part: from 5% to 95% of
/// `total` (start-up and the drain's tail excluded), interpolated between
/// samples. Fails if nothing happens within `startup` of the call.
pub async fn measure_rate(
    counter: impl Fn() -> u64,
    total: u64,
    limit: Duration,
    startup: Duration,
) -> Result<Rate> {
    measure_rate_cpu(counter, process_cpu_ticks, total, limit, startup).await
}

/// [`measure_rate`] with the CPU time read from `cpu` (clock ticks), e.g. of
/// another process tree, instead of this process.
pub async fn measure_rate_cpu(
    counter: impl Fn() -> u64,
    cpu: impl Fn() -> Option<u64>,
    total: u64,
    limit: Duration,
    startup: Duration,
) -> Result<Rate> {
    const TICK: Duration = Duration::from_millis(2);
    let process_cpu_ticks = cpu;
    let begin = Instant::now();
    let mut samples = vec![Sample {
        at: begin,
        count: counter(),
        cpu: process_cpu_ticks(),
    }];
    let mut first: Option<Instant> = None;
    loop {
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        let c = counter();
        samples.push(Sample {
            at: now,
            count: c,
            cpu: process_cpu_ticks(),
        });
        if c > 0 && first.is_none() {
            first = Some(now);
        }
        match first {
            None if now - begin > startup => {
                bail!("nothing was processed within {startup:?} of the start")
            }
            Some(f) if c >= total || now - f >= limit => break,
            _ => {}
        }
    }
    let last = samples.last().map(|s| s.count).unwrap_or(0);
    let lo = (total / 20).max(1);
    let hi = if last >= total {
        total - total / 20
    } else {
        last
    }
    .max(lo + 1);
    let (Some(a), Some(b)) = (crossing(&samples, lo), crossing(&samples, hi)) else {
        bail!("too few events to measure a rate ({last} of {total})");
    };
    let window = b.0.saturating_sub(a.0);
    if window.is_zero() {
        bail!("rate window is empty ({last} events)");
    }
    let events = (hi - lo) as f64;
    let cpu_us_per_event = match (a.1, b.1) {
        (Some(ca), Some(cb)) => Some((cb - ca).max(0.0) / TICKS_PER_SEC * 1e6 / events),
        _ => None,
    };
    Ok(Rate {
        per_sec: events / window.as_secs_f64(),
        counted: last,
        window,
        cpu_us_per_event,
    })
}

/// When the sampled counter reached `target` (relative to the first sample)
/// and the CPU ticks at that moment, linearly interpolated between the samples
/// around it.
fn crossing(samples: &[Sample], target: u64) -> Option<(Duration, Option<f64>)> {
    let t0 = samples.first()?.at;
    let i = samples.iter().position(|s| s.count >= target)?;
    let b = samples[i];
    if i == 0 {
        return Some((Duration::ZERO, b.cpu.map(|c| c as f64)));
    }
    let a = samples[i - 1];
    let span = (b.count - a.count) as f64;
    let frac = if span > 0.0 {
        ((target - a.count) as f64 / span).clamp(0.0, 1.0)
    } else {
        1.0
    };
    let at = a.at + (b.at - a.at).mul_f64(frac);
    let cpu = match (a.cpu, b.cpu) {
        (Some(ca), Some(cb)) => Some(ca as f64 + (cb as f64 - ca as f64) * frac),
        _ => None,
    };
    Some((at - t0, cpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 500.0);
        assert_eq!(percentile(&v, 99.0), 990.0);
        assert_eq!(percentile(&v, 99.9), 999.0);
        assert_eq!(percentile(&v, 100.0), 1000.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn crossing_interpolates() {
        let t = Instant::now();
        let s = [
            Sample {
                at: t,
                count: 0,
                cpu: Some(10),
            },
            Sample {
                at: t + Duration::from_millis(10),
                count: 100,
                cpu: Some(20),
            },
        ];
        assert_eq!(
            crossing(&s, 50),
            Some((Duration::from_millis(5), Some(15.0)))
        );
    }

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(process_cpu_ticks().is_some());
    }
}
