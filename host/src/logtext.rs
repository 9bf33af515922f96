//! Text from plugins and producers (log calls, printed lines, failure and
//! dead-letter reasons) on its way into warren's log. In the text format a
//! newline in such text would start what looks like a line of warren's own (a
//! producer once forged a `warren: stopped` line through a dead-letter
//! reason), and escape sequences would drive the reader's terminal. So control
//! characters are written escaped, as `\n`, `\r`, `\t` or `\u{1b}`; in the
//! JSON format they were escaped already, and this only makes them readable.
//!
//! Also [`redact`]: broker URLs on their way into logs and errors, without
//! their password; and [`error_chain`]: an error and its causes, each said
//! once.

use std::fmt;

/// Display `text` with its control characters escaped.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(char::is_control) {
            f.write_str(&rest[..i])?;
            let mut chars = rest[i..].chars();
            if let Some(c) = chars.next() {
                match c {
                    '\n' => f.write_str("\\n")?,
                    '\r' => f.write_str("\\r")?,
                    '\t' => f.write_str("\\t")?,
                    c => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                }
            }
            rest = chars.as_str();
        }
        f.write_str(rest)
    }
}

/// The URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// `text` cut to at most `max` bytes, on a character boundary; `…` marks a
/// cut. For plugin and producer text on its way into headers and log lines.
pub fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut = cut.saturating_sub(1);
    }
    format!("{}…", text.get(..cut).unwrap_or_default()).into()
}

/// An error and its causes, `: `-separated like `{:#}`, without the causes
/// that only repeat what the text before them says: the AMQP library's errors
/// print their source as part of their own message, so `{:#}` says it twice.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::{Escaped, redact};

    #[test]
    fn redact_hides_the_password_only() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host:5672"), "amqp://host:5672");
    }

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        let forged = "bad input\n2026-11-30T00:00:00Z  INFO warren: stopped\x1b[2J\tok ✓";
        assert_eq!(
            Escaped(forged).to_string(),
            "bad input\\n2026-11-30T00:00:00Z  INFO warren: stopped\\u{1b}[2J\\tok ✓"
        );
        assert_eq!(Escaped("plain").to_string(), "plain");
    }

    #[test]
    fn clip_cuts_on_a_character_boundary_and_marks_the_cut() {
        assert_eq!(super::clip("short", 10), "short");
        assert_eq!(super::clip("abcdef", 3), "abc…");
        // 'é' is two bytes: a cut inside it moves before it.
        assert_eq!(super::clip("aé", 2), "a…");
    }

    #[test]
    fn error_chains_say_each_cause_once() {
        let e = anyhow::anyhow!("ACCESS_REFUSED - Login was refused")
            .context("protocol error: ACCESS_REFUSED - Login was refused")
            .context("connecting to the broker");
        assert_eq!(
            super::error_chain(&e),
            "connecting to the broker: protocol error: ACCESS_REFUSED - Login was refused"
        );
    }
}
