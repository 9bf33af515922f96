//! The results: one row per measured quantity, rendered as a terminal table,
//! as Markdown (pasted into BENCHMARKS.md) and as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::machine::Machine;

/// A goal from the benchmark issue and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub text: String,
    pub met: bool,
}

impl Goal {
    /// A goal with its verdict.
    pub fn new(text: impl Into<String>, met: bool) -> Self {
        Self {
            text: text.into(),
            met,
        }
    }
}

/// One measured quantity.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario number and name, e.g. `1 throughput`.
    pub scenario: String,
    /// What is measured, e.g. `no-op consume + ack`.
    pub metric: String,
    pub unit: String,
    /// warren's value.
    pub warren: f64,
    /// The baseline's value, when the scenario has one.
    pub baseline: Option<f64>,
    /// What the baseline is, e.g. `raw lapin`.
    pub baseline_name: Option<String>,
    /// How warren compares: a ratio or a difference, as text.
    pub comparison: Option<String>,
    pub goal: Option<Goal>,
}

impl Row {
    /// A row without a baseline.
    pub fn new(scenario: &str, metric: &str, unit: &str, warren: f64) -> Self {
        Self {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: unit.into(),
            warren,
            baseline: None,
            baseline_name: None,
            comparison: None,
            goal: None,
        }
    }

    /// Attach a baseline value.
    pub fn baseline(mut self, name: &str, value: f64) -> Self {
        self.baseline = Some(value);
        self.baseline_name = Some(name.into());
        self
    }

    /// Attach a comparison text.
    pub fn compare(mut self, text: impl Into<String>) -> Self {
        self.comparison = Some(text.into());
        self
    }

    /// Attach a goal.
    pub fn goal(mut self, g: Goal) -> Self {
        self.goal = Some(g);
        self
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    /// The command line, for reproducing the run.
    pub command: String,
    /// Run parameters as text (`prefetch=256`, ...).
    pub parameters: Vec<String>,
    pub rows: Vec<Row>,
    /// Scenarios that were skipped or failed, and why.
    pub notes: Vec<String>,
}

/// Format a value for a table cell with sensible precision.
pub fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{v:.0}");
        group(&s)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Thousands separators: 123456 -> 123,456.
fn group(s: &str) -> String {
    let (sign, digits) = s.strip_prefix('-').map_or(("", s), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

impl Report {
    fn cells(r: &Row) -> [String; 7] {
        let base = match (&r.baseline, &r.baseline_name) {
            (Some(v), Some(n)) => format!("{} ({n})", fmt_value(*v)),
            _ => "".into(),
        };
        let goal = r.goal.as_ref();
        [
            r.scenario.clone(),
            format!("{} [{}]", r.metric, r.unit),
            fmt_value(r.warren),
            base,
            r.comparison.clone().unwrap_or_default(),
            goal.map(|g| g.text.clone()).unwrap_or_default(),
            goal.map(|g| if g.met { "yes" } else { "NO" }.to_string())
                .unwrap_or_default(),
        ]
    }

    const HEADERS: [&'static str; 7] = [
        "scenario",
        "metric [unit]",
        "warren",
        "baseline",
        "warren vs baseline",
        "goal",
        "met",
    ];

    /// A plain-text table for the terminal.
    pub fn text(&self) -> String {
        let rows: Vec<[String; 7]> = self.rows.iter().map(Self::cells).collect();
        let mut widths = Self::HEADERS.map(|h| h.chars().count());
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
                let pad = w - c.chars().count();
                // Numbers right-aligned, text left-aligned.
                if i == 2 {
                    let _ = write!(s, "{}{c}  ", " ".repeat(pad));
                } else {
                    let _ = write!(s, "{c}{}  ", " ".repeat(pad));
                }
            }
            s.trim_end().to_string()
        };
        let mut out = String::new();
        let headers: Vec<String> = Self::HEADERS.iter().map(|h| h.to_string()).collect();
        out.push_str(&line(&headers));
        out.push('\n');
        out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
        out.push('\n');
        for r in &rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }

    /// The table as Markdown, with the machine and parameters above it.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "Machine: {} x {}, {} RAM, Linux {}, RabbitMQ {}; load average at start {}.\n",
            m.cpus, m.cpu_model, m.memory, m.kernel, m.broker_version, m.load_average
        );
        let _ = writeln!(out, "Command: `{}`\n", self.command);
        let _ = writeln!(out, "Parameters: {}.\n", self.parameters.join(", "));
        let _ = writeln!(out, "| {} |", Self::HEADERS.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(Self::HEADERS.len()));
        for r in &self.rows {
            let cells = Self::cells(r).map(|c| c.replace('|', "\\|"));
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        for n in &self.notes {
            let _ = writeln!(out, "\nNote: {n}");
        }
        out
    }

    /// Pretty JSON.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_readable() {
        assert_eq!(fmt_value(123456.7), "123,457");
        assert_eq!(fmt_value(0.987), "0.99");
        assert_eq!(fmt_value(42.26), "42.3");
        assert_eq!(fmt_value(f64::NAN), "n/a");
    }
}
