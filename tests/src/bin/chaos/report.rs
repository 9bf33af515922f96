//! The accounting at the end of a run, printed as one Markdown table (the one
//! RELIABILITY.md keeps), and the verdict.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::replicas::{Exit, Signal};
use crate::traffic::{Kind, Place, Published, Snapshot};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    ReplicaKill,
    ReplicaTerm,
    LeaderStop,
    LeaderKill,
    ClusterRestart,
    CloseAll,
    Reload,
}

impl FaultKind {
    pub const ALL: [FaultKind; 7] = [
        FaultKind::ReplicaKill,
        FaultKind::ReplicaTerm,
        FaultKind::LeaderStop,
        FaultKind::LeaderKill,
        FaultKind::ClusterRestart,
        FaultKind::CloseAll,
        FaultKind::Reload,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ReplicaKill => "SIGKILL of a replica (keeper restarts it)",
            FaultKind::ReplicaTerm => "SIGTERM of a replica under load (drain)",
            FaultKind::LeaderStop => "stop/start of the queue leader's node",
            FaultKind::LeaderKill => "SIGKILL/start of the queue leader's node",
            FaultKind::ClusterRestart => "full cluster restart",
            FaultKind::CloseAll => "rabbitmqctl close_all_connections",
            FaultKind::Reload => "plugin hot reload (symlink swap)",
        }
    }
}

/// One injected fault: from its injection until messages flowed again.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub kind: FaultKind,
    pub start: Instant,
    pub end: Instant,
    pub detail: String,
}

#[derive(Debug)]
pub struct Report {
    pub args_line: String,
    pub nodes: u16,
    pub replicas: usize,
    pub rate: u32,
    pub faults: Vec<FaultRecord>,
    pub faults_span: Duration,
    pub published: Published,
    pub collector_reconnects: u64,
    pub ledger: Snapshot,
    pub arrivals: Vec<Instant>,
    /// Ready messages left per queue once the replicas stopped.
    pub left: Vec<(String, u32)>,
    pub exits: Vec<Exit>,
    pub stuck: Option<String>,
    pub not_arrived: Option<String>,
    pub stop_errors: Vec<String>,
    pub grace: Duration,
    /// Taken when the run went wrong, before the replicas were stopped.
    pub diagnosis: Option<Diagnosis>,
    /// Where the confirmed ids never seen were found once everything
    /// stopped (`true`: every queue was read to the end).
    pub located: Option<(HashMap<u64, String>, bool)>,
}

/// The state of the world when the run went wrong.
#[derive(Debug)]
pub struct Diagnosis {
    /// Each queue's depth and consumers, then each replica's state.
    pub while_running: Vec<String>,
    /// `broker.sh cluster status`.
    pub cluster: Vec<String>,
}

/// How far a drain may run past the grace period (process exit, log flush)
/// before it counts as a failed drain.
const DRAIN_SLACK: Duration = Duration::from_secs(5);

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

impl Report {
    /// Longest gap between two first arrivals that overlaps a fault of `kind`
    /// (every fault when `None`).
    fn longest_stall(&self, kind: Option<FaultKind>) -> Duration {
        let windows: Vec<(Instant, Instant)> = self
            .faults
            .iter()
            .filter(|f| kind.is_none_or(|k| f.kind == k))
            .map(|f| (f.start, f.end))
            .collect();
        self.arrivals
            .windows(2)
            .filter(|w| windows.iter().any(|(s, e)| w[0] <= *e && w[1] >= *s))
            .map(|w| w[1].duration_since(w[0]))
            .max()
            .unwrap_or_default()
    }

    /// Print the table; `true` when nothing was lost and nothing failed.
    pub fn print(&self) -> bool {
        let l = &self.ledger;
        let mut lost = Vec::new();
        let mut misplaced = Vec::new();
        let mut dup_ids = 0u64;
        let mut dup_copies = 0u64;
        let mut dup_resent = 0u64;
        let mut per_place = [0u64; 3];
        let mut dlq_retry = 0u64;
        let mut collector_redelivered = 0u64;
        let mut ids: Vec<u64> = l.confirmed.iter().copied().collect();
        ids.sort_unstable();
        let mut stranded: HashMap<&str, Vec<u64>> = HashMap::new();
        for id in &ids {
            let Some(seen) = l.seen.get(id) else {
                match self.located.as_ref().and_then(|(found, _)| found.get(id)) {
                    Some(queue) => stranded.entry(queue.as_str()).or_default().push(*id),
                    None => lost.push(*id),
                }
                continue;
            };
            let want = Kind::of(*id).place();
            for (i, place) in Place::ALL.iter().enumerate() {
                if seen.at(*place) > 0 {
                    per_place[i] += 1;
                }
            }
            if Kind::of(*id) == Kind::Retry && seen.at(Place::Dlq) > 0 {
                dlq_retry += 1;
            }
            if Place::ALL.iter().any(|p| *p != want && seen.at(*p) > 0) {
                misplaced.push((*id, seen.reason.clone()));
            }
            if seen.total() > 1 {
                dup_ids += 1;
                dup_copies += u64::from(seen.total() - 1);
                if l.resent.contains(id) {
                    dup_resent += 1;
                }
            }
            collector_redelivered += u64::from(seen.collector_redelivered);
        }
        let unconfirmed_seen = l.seen.keys().filter(|id| !l.confirmed.contains(id)).count();
        let term_exits: Vec<&Exit> = self
            .exits
            .iter()
            .filter(|e| e.signal == Some(Signal::Term))
            .collect();
        let failed_drains: Vec<&&Exit> = term_exits
            .iter()
            .filter(|e| !e.success || e.after.is_none_or(|a| a > self.grace + DRAIN_SLACK))
            .collect();
        let longest_drain = term_exits
            .iter()
            .filter_map(|e| e.after)
            .max()
            .unwrap_or_default();
        let unasked: Vec<&Exit> = self.exits.iter().filter(|e| e.signal.is_none()).collect();
        let left_total: u64 = self.left.iter().map(|(_, n)| u64::from(*n)).sum();

        println!();
        println!(
            "## chaos run: {} nodes, {} replicas, {} msg/s",
            self.nodes, self.replicas, self.rate
        );
        println!();
        println!("`chaos {}`", self.args_line);
        println!();
        println!("| fault | injected | longest stall | slowest recovery |");
        println!("|---|---:|---:|---:|");
        for kind in FaultKind::ALL {
            let of_kind: Vec<&FaultRecord> =
                self.faults.iter().filter(|f| f.kind == kind).collect();
            let slowest = of_kind
                .iter()
                .map(|f| f.end.duration_since(f.start))
                .max()
                .unwrap_or_default();
            println!(
                "| {} | {} | {} | {} |",
                kind.name(),
                of_kind.len(),
                secs(self.longest_stall(Some(kind))),
                secs(slowest)
            );
        }
        println!();
        println!("| | |");
        println!("|---|---:|");
        let row = |k: &str, v: String| println!("| {k} | {v} |");
        row(
            "faults injected, in",
            format!("{} in {}", self.faults.len(), secs(self.faults_span)),
        );
        row("messages in (confirmed)", ids.len().to_string());
        row(
            "publishes not confirmed, sent again",
            format!(
                "{} (publisher reconnects: {})",
                self.published.resends,
                self.published.reconnects.saturating_sub(1)
            ),
        );
        row("→ RPC reply", per_place[0].to_string());
        row("→ output queue", per_place[1].to_string());
        row(
            "→ DLQ",
            format!(
                "{} ({dlq_retry} after 3 attempts, {} dead-lettered)",
                per_place[2],
                per_place[2].saturating_sub(dlq_retry)
            ),
        );
        row(
            "in a place other than their own",
            misplaced.len().to_string(),
        );
        row(
            "duplicates",
            format!(
                "{dup_copies} extra copies of {dup_ids} ids ({dup_resent} of them ids the publisher sent twice)"
            ),
        );
        let stranded_total: usize = stranded.values().map(Vec::len).sum();
        row("**lost**", format!("**{}**", lost.len()));
        row(
            "not seen, but found in a queue afterwards",
            stranded_total.to_string(),
        );
        row(
            "left in queues / unacked after the run",
            left_total.to_string(),
        );
        row(
            "longest stall (no new message arriving)",
            secs(self.longest_stall(None)),
        );
        row(
            "longest confirm gap at the publisher",
            secs(self.published.longest_gap),
        );
        row(
            "SIGTERM drains (longest)",
            format!(
                "{} ({} failed, grace {})",
                term_exits.len(),
                failed_drains.len(),
                secs(self.grace)
            ),
        );
        row("longest drain", secs(longest_drain));
        row("replica exits nobody asked for", unasked.len().to_string());
        row(
            "collector reconnects / its own redeliveries",
            format!(
                "{} / {collector_redelivered}",
                self.collector_reconnects.saturating_sub(1)
            ),
        );
        println!();

        let mut ok = true;
        let mut fail = |text: String| {
            ok = false;
            println!("FAIL: {text}");
        };
        if let Some(d) = &self.diagnosis {
            println!("### diagnosis, taken before the replicas were stopped");
            println!();
            for line in d.while_running.iter().chain(&d.cluster) {
                println!("    {line}");
            }
            println!();
        }
        if !lost.is_empty() {
            let first: Vec<String> = lost.iter().take(20).map(|id| format!("m{id}")).collect();
            let how = match &self.located {
                Some((_, true)) => "in no queue either: gone",
                Some((_, false)) => "not found in the part of the queues read in time",
                None => "the queues were not read",
            };
            fail(format!(
                "{} messages lost ({how}): {}",
                lost.len(),
                first.join(" ")
            ));
        }
        let mut stranded: Vec<(&str, Vec<u64>)> = stranded.into_iter().collect();
        stranded.sort();
        for (queue, ids) in &stranded {
            let first: Vec<String> = ids.iter().take(10).map(|id| format!("m{id}")).collect();
            fail(format!(
                "{} messages not lost but stranded in {queue}, never consumed: {}",
                ids.len(),
                first.join(" ")
            ));
        }
        for (id, reason) in misplaced.iter().take(20) {
            fail(format!(
                "m{id} ({:?}) arrived in the wrong place; DLQ reason: {}",
                Kind::of(*id),
                reason.as_deref().unwrap_or("-")
            ));
        }
        if let Some(s) = &self.stuck {
            fail(format!("stuck: {s}"));
        }
        if let Some(s) = &self.not_arrived {
            fail(format!("after the faults: {s}"));
        }
        for e in &failed_drains {
            fail(format!(
                "replica {} did not drain within its grace: {} after {}",
                e.replica,
                e.status,
                e.after.map(secs).unwrap_or_default()
            ));
        }
        for e in &unasked {
            fail(format!(
                "replica {} exited unasked: {}",
                e.replica, e.status
            ));
        }
        for (q, n) in self.left.iter().filter(|(_, n)| *n > 0) {
            fail(format!("{n} messages left in {q}"));
        }
        for e in &self.stop_errors {
            fail(format!("stopping: {e}"));
        }
        if unconfirmed_seen > 0 {
            println!(
                "note: {unconfirmed_seen} ids arrived that the broker never confirmed to the publisher"
            );
        }
        if l.unreadable > 0 {
            fail(format!("{} collected messages carried no id", l.unreadable));
        }
        for f in self.faults.iter().filter(|f| !f.detail.is_empty()) {
            eprintln!("  {}: {}", f.kind.name(), f.detail);
        }
        println!(
            "{}",
            if ok {
                "PASS: every message accounted for"
            } else {
                "FAILED"
            }
        );
        ok
    }
}
