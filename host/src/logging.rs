//! What keeps secrets out of the log whatever `RUST_LOG` says.
//!
//! Two layers, both applied by the `warren` binary's subscriber:
//!
//! 1. [`allowed`], a filter no `RUST_LOG` directive can widen: wasmtime's own
//!    crates (`wasmtime`, `wasmtime_wasi`, `wasmtime_wasi_http`, ...) log at
//!    most at INFO. Their TRACE events include one per WIT call made by a
//!    plugin, with its arguments and results (the bindings `bindgen!`
//!    generates with `tracing`): the path and query of every outbound HTTP
//!    request, header names, environment variables. Their DEBUG events include
//!    bytes a plugin wrote to a stream. Any of those can carry a secret a
//!    plugin read with `host.config`, so none of them is written.
//! 2. [`Redacting`], the writer: every line is written with each known secret
//!    value replaced by `<redacted>`. The known values are those
//!    [`hide`] was given: the `[pipeline.config]` values read from the
//!    environment (`crate::secret`) and the broker password, as written and in
//!    the escaped forms the text and JSON formats write them in. A value
//!    shorter than [`MIN_HIDDEN_LEN`] bytes is not replaced: it would blank
//!    out ordinary text all over the log.
//!
//! warren itself never logs those values; the writer catches what a library
//! might log at a level this filter lets through.

use std::io::{self, Write};
use std::sync::RwLock;

use tracing::{Level, Metadata};

/// Values shorter than this are not replaced in log lines.
pub const MIN_HIDDEN_LEN: usize = 4;

/// What a hidden value is replaced with.
const MASK: &str = "<redacted>";

/// The values to keep out of the log, in every form they are written in.
static HIDDEN: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Keep `value` out of every log line written from now on.
pub fn hide(value: &str) {
    if value.len() < MIN_HIDDEN_LEN {
        return;
    }
    // As written; as `{:?}` writes it (the text format's fields); as JSON
    // strings are escaped.
    let debug = format!("{value:?}");
    let json = serde_json::to_string(value).unwrap_or_default();
    let forms = [
        Some(value.to_string()),
        debug
            .get(1..debug.len().saturating_sub(1))
            .map(str::to_string),
        json.get(1..json.len().saturating_sub(1))
            .map(str::to_string),
    ];
    let Ok(mut hidden) = HIDDEN.write() else {
        return;
    };
    for form in forms.into_iter().flatten() {
        if form.len() >= MIN_HIDDEN_LEN && !hidden.contains(&form) {
            hidden.push(form);
        }
    }
    // Longest first, so that a value containing another is replaced whole.
    hidden.sort_by_key(|f| std::cmp::Reverse(f.len()));
}

/// `text` with every hidden value replaced, or `None` when it holds none.
pub fn redact(text: &str) -> Option<String> {
    let hidden = HIDDEN.read().ok()?;
    if hidden.is_empty() || !hidden.iter().any(|h| text.contains(h.as_str())) {
        return None;
    }
    let mut out = text.to_string();
    for h in hidden.iter() {
        if out.contains(h.as_str()) {
            out = out.replace(h.as_str(), MASK);
        }
    }
    Some(out)
}

/// Whether an event or span may be logged at all, whatever `RUST_LOG` says:
/// not above INFO for wasmtime's crates (see the module docs).
pub fn allowed(meta: &Metadata<'_>) -> bool {
    allowed_target(meta.target(), *meta.level())
}

fn allowed_target(target: &str, level: Level) -> bool {
    !(target.starts_with("wasmtime") && level > Level::INFO)
}

/// A writer that redacts each buffer it is given before passing it on. The
/// fmt layer writes one whole line per `write_all`, so a value is never split
/// between two calls.
pub struct Redacting<W>(pub W);

impl<W: Write> Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        match redact(&text) {
            Some(clean) => {
                self.0.write_all(clean.as_bytes())?;
                Ok(buf.len())
            }
            None => self.0.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// The binary's log writer: stderr, redacted.
pub fn stderr() -> Redacting<io::Stderr> {
    Redacting(io::stderr())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hidden_values_are_replaced_in_every_form_and_short_ones_are_not() {
        hide("tok\"en-7f3a9c");
        hide("abc");
        let line = r#"path_with_query=Some("/ok?t=tok\"en-7f3a9c") raw tok"en-7f3a9c abc"#;
        let clean = redact(line).unwrap();
        assert_eq!(
            clean,
            r#"path_with_query=Some("/ok?t=<redacted>") raw <redacted> abc"#
        );
        assert_eq!(redact("nothing to hide in this line"), None);
        let mut out = Vec::new();
        Redacting(&mut out)
            .write_all(b"{\"q\":\"tok\\\"en-7f3a9c\"}\n")
            .unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "{\"q\":\"<redacted>\"}\n");
    }

    #[test]
    fn wasmtime_logs_at_most_info() {
        for target in [
            "wasmtime_wasi_http::p2::bindings::http::types",
            "wasmtime_wasi::p2::bindings",
            "wasmtime",
        ] {
            assert!(!allowed_target(target, Level::TRACE), "{target}");
            assert!(!allowed_target(target, Level::DEBUG), "{target}");
            assert!(allowed_target(target, Level::INFO), "{target}");
            assert!(allowed_target(target, Level::WARN), "{target}");
        }
        assert!(allowed_target("warren::outbound", Level::TRACE));
        assert!(allowed_target("hyper", Level::TRACE));
    }
}
