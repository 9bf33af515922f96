//! The publish allow-list: where a pipeline's plugin may send messages.
//!
//! A plugin holds warren's broker credentials by proxy: whatever it returns is
//! published with them. So its outputs are held to what the pipeline's
//! configuration lists, and the replies warren sends for it to addresses that
//! cannot reach warren's own queues (the README's "Security model" section
//! documents the rules for users):
//!
//! * An output to a named exchange needs a `[[pipeline.output]]` entry for that
//!   exchange; if the entries list `routing_keys`, the key must match one of
//!   them (AMQP topic syntax: `*` one word, `#` zero or more).
//! * An output to the default exchange `""` reaches the queue named by its
//!   routing key, so it needs that queue in an entry's `queues`.
//! * A reply goes to the message's own `reply_to`, which a producer chooses.
//!   It is refused when it names a queue warren manages (a pipeline's queue,
//!   a `<queue>.dlq`, a `<queue>.retry.<ms>` tier, or any name of those two
//!   shapes), and, when `reply_to_allow` is set, when it matches none of its
//!   patterns. Otherwise a producer could make warren write into a DLQ or a
//!   retry tier with warren's own rights.
//!
//! A denied output or reply is never sent and never dropped: `disposition`
//! dead-letters the message with the reason built here.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::config::PipelineConfig;
use crate::retry::{RetryTiers, reserved_shape, tier_queue};

/// What was refused; a metric label (`warren_denied_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyKind {
    /// A plugin output to an exchange, routing key or queue not listed.
    Publish,
    /// A reply to a `reply_to` that is not allowed.
    Reply,
    /// A plugin header warren does not let plugins set (`x-warren-*`, or a
    /// `traceparent` warren propagates); removed, the message goes on.
    Header,
}

impl DenyKind {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Reply => "reply",
            Self::Header => "header",
        }
    }

    /// All values, for metric pre-registration.
    pub const ALL: [DenyKind; 3] = [Self::Publish, Self::Reply, Self::Header];
}

/// A refused output or reply, with the reason that goes into the dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub kind: DenyKind,
    pub reason: String,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// The routing keys allowed on one exchange.
#[derive(Debug, Clone)]
enum Keys {
    /// An entry without `routing_keys`: any key.
    Any,
    /// The union of the entries' `routing_keys` patterns.
    Patterns(Vec<String>),
}

/// Where one pipeline's plugin may publish and reply.
#[derive(Debug, Clone, Default)]
pub struct PublishPolicy {
    exchanges: HashMap<String, Keys>,
    /// Queues reachable through the default exchange.
    queues: HashSet<String>,
    /// Every queue warren declares for the configuration: each pipeline's
    /// queue, dead-letter queue and retry tiers, with what it is.
    managed: HashMap<String, String>,
    /// `reply_to_allow`: `None` allows every queue warren does not manage.
    reply_to_allow: Option<Vec<String>>,
}

impl PublishPolicy {
    /// The policy of pipeline `p`, one of `all` (the whole configuration,
    /// whose queues are all out of reach unless `p` lists them).
    pub fn new(p: &PipelineConfig, all: &[PipelineConfig]) -> Self {
        let mut exchanges: HashMap<String, Keys> = HashMap::new();
        let mut queues = HashSet::new();
        for o in &p.outputs {
            queues.extend(o.queues.iter().cloned());
            if o.exchange.is_empty() {
                continue;
            }
            let keys = exchanges
                .entry(o.exchange.clone())
                .or_insert_with(|| Keys::Patterns(Vec::new()));
            match (keys, o.routing_keys.is_empty()) {
                (k, true) => *k = Keys::Any,
                (Keys::Patterns(list), false) => list.extend(o.routing_keys.iter().cloned()),
                (Keys::Any, false) => {}
            }
        }
        let mut managed = HashMap::new();
        for other in all.iter().chain(std::iter::once(p)) {
            let whose = format!("pipeline {:?}", other.name);
            managed.insert(other.queue.clone(), format!("the queue of {whose}"));
            managed.insert(
                other.dlq_name(),
                format!("the dead-letter queue of {whose}"),
            );
            for &ms in RetryTiers::new(&other.retry).delays_ms() {
                managed.insert(
                    tier_queue(&other.queue, ms),
                    format!("a retry tier of {whose}"),
                );
            }
        }
        Self {
            exchanges,
            queues,
            managed,
            reply_to_allow: p.reply_to_allow.clone(),
        }
    }

    /// May the plugin publish to `exchange` with `routing_key`?
    pub fn output(&self, exchange: &str, routing_key: &str) -> Result<(), Denial> {
        let deny = |rule: String| {
            Err(Denial {
                kind: DenyKind::Publish,
                reason: format!(
                    "publish denied: exchange {exchange:?}, routing key {routing_key:?}: {rule}"
                ),
            })
        };
        if exchange.is_empty() {
            if self.queues.contains(routing_key) && reserved_shape(routing_key).is_none() {
                return Ok(());
            }
            let what = self
                .managed
                .get(routing_key)
                .cloned()
                .or_else(|| reserved_shape(routing_key).map(str::to_string));
            return deny(match what {
                Some(what) => {
                    format!("queue {routing_key:?} is {what}, which a plugin may not publish to")
                }
                None => format!(
                    "queue {routing_key:?} is not in any queues = [...] of the pipeline's \
                     [[pipeline.output]] (the default exchange reaches only the queues listed)"
                ),
            });
        }
        match self.exchanges.get(exchange) {
            None => deny(format!(
                "exchange {exchange:?} is not listed in the pipeline's [[pipeline.output]]"
            )),
            Some(Keys::Any) => Ok(()),
            Some(Keys::Patterns(patterns)) => {
                if patterns.iter().any(|p| topic_matches(p, routing_key)) {
                    Ok(())
                } else {
                    deny(format!(
                        "the routing key matches none of the routing_keys {patterns:?} listed \
                         for exchange {exchange:?} in [[pipeline.output]]"
                    ))
                }
            }
        }
    }

    /// May warren reply to `reply_to` (for the plugin, or with an error reply)?
    pub fn reply_to(&self, reply_to: &str) -> Result<(), Denial> {
        let deny = |rule: String| {
            Err(Denial {
                kind: DenyKind::Reply,
                reason: format!("reply denied: reply_to {reply_to:?} {rule}"),
            })
        };
        if let Some(what) = self.managed.get(reply_to) {
            return deny(format!(
                "is {what}; warren never replies into a queue it manages"
            ));
        }
        if let Some(what) = reserved_shape(reply_to) {
            return deny(format!(
                "has the name of {what}; warren never replies into such a queue"
            ));
        }
        match &self.reply_to_allow {
            Some(patterns) if !patterns.iter().any(|p| glob_matches(p, reply_to)) => deny(format!(
                "matches none of the pipeline's reply_to_allow patterns {patterns:?}"
            )),
            _ => Ok(()),
        }
    }
}

/// AMQP topic matching: words separated by `.`, `*` matches exactly one word,
/// `#` zero or more.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    let words: Vec<&str> = key.split('.').collect();
    // reach[j]: the pattern words so far can match the first j key words.
    let mut reach = vec![false; words.len().saturating_add(1)];
    if let Some(first) = reach.first_mut() {
        *first = true;
    }
    for w in pattern.split('.') {
        let mut next = vec![false; reach.len()];
        if w == "#" {
            // Zero words (stay), or one more word after any reachable point.
            let mut carried = false;
            for (n, r) in next.iter_mut().zip(&reach) {
                carried = carried || *r;
                *n = carried;
            }
        } else {
            for (j, key_word) in words.iter().enumerate() {
                let matches = w == "*" || w == *key_word;
                if matches
                    && reach.get(j).copied().unwrap_or(false)
                    && let Some(n) = next.get_mut(j.saturating_add(1))
                {
                    *n = true;
                }
            }
        }
        reach = next;
    }
    reach.last().copied().unwrap_or(false)
}

/// Glob matching for `reply_to_allow`: `*` matches any run of characters
/// (dots included: direct reply-to names contain them), everything else
/// itself.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0usize, 0usize);
    // Where the last `*` was, and the text position it has swallowed up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ti));
                pi = pi.saturating_add(1);
            }
            Some(c) if t.get(ti) == Some(c) => {
                pi = pi.saturating_add(1);
                ti = ti.saturating_add(1);
            }
            _ => match star {
                Some((sp, st)) => {
                    let st = st.saturating_add(1);
                    star = Some((sp, st));
                    pi = sp.saturating_add(1);
                    ti = st;
                }
                None => return false,
            },
        }
    }
    p.get(pi..)
        .is_some_and(|rest| rest.iter().all(|&c| c == b'*'))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use super::*;
    use crate::config::Config;

    #[test]
    fn topic_patterns_follow_amqp() {
        let cases = [
            ("notify.*", "notify.email", true),
            ("notify.*", "notify", false),
            ("notify.*", "notify.email.urgent", false),
            ("notify.#", "notify", true),
            ("notify.#", "notify.email.urgent", true),
            ("#", "", true),
            ("#", "a.b.c", true),
            ("*.b.#", "a.b", true),
            ("*.b.#", "b", false),
            ("a.#.c", "a.c", true),
            ("a.#.c", "a.x.y.c", true),
            ("a.#.c", "a.x.y", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("#.#", "x", true),
        ];
        for (pattern, key, want) in cases {
            assert_eq!(topic_matches(pattern, key), want, "{pattern} vs {key}");
        }
    }

    #[test]
    fn globs_match_any_run_of_characters() {
        assert!(glob_matches(
            "amq.rabbitmq.reply-to.*",
            "amq.rabbitmq.reply-to.g1h2AA==.R25B=="
        ));
        assert!(!glob_matches("amq.rabbitmq.reply-to.*", "rpc.replies"));
        assert!(glob_matches("rpc-*-replies", "rpc-a.b-replies"));
        assert!(!glob_matches("rpc-*-replies", "rpc-a.b-replies2"));
        assert!(glob_matches("*", ""));
        assert!(glob_matches("exact", "exact"));
        assert!(!glob_matches("exact", "exac"));
    }

    fn policy(text: &str) -> PublishPolicy {
        let c = Config::parse(text, Path::new(".")).unwrap();
        PublishPolicy::new(&c.pipelines[0], &c.pipelines)
    }

    const TWO: &str = "[[pipeline]]\nname = \"hq\"\nqueue = \"hq\"\nplugin = \"p.wasm\"\n\
        [[pipeline.output]]\nexchange = \"notifications\"\ntype = \"topic\"\nrouting_keys = [\"notify.*\"]\n\
        [[pipeline.output]]\nexchange = \"audit\"\n\
        [[pipeline.output]]\nqueues = [\"jobs\", \"other\"]\n\
        [[pipeline]]\nname = \"other\"\nqueue = \"other\"\nplugin = \"p.wasm\"\n\
        [[pipeline]]\nname = \"third\"\nqueue = \"third\"\nplugin = \"p.wasm\"\n";

    #[test]
    fn outputs_need_a_listed_exchange_key_or_queue() {
        let p = policy(TWO);
        assert!(p.output("notifications", "notify.email").is_ok());
        assert!(p.output("audit", "anything.at.all").is_ok());
        assert!(p.output("", "jobs").is_ok());
        // Another pipeline's queue, because it is listed.
        assert!(p.output("", "other").is_ok());

        let reason = |x: &str, k: &str| p.output(x, k).unwrap_err().reason;
        let r = reason("notifications", "alert.email");
        assert!(
            r.contains("\"notifications\"")
                && r.contains("\"alert.email\"")
                && r.contains("notify.*"),
            "{r}"
        );
        let r = reason("amq.direct", "x");
        assert!(r.contains("\"amq.direct\" is not listed"), "{r}");
        let r = reason("", "elsewhere");
        assert!(r.contains("not in any queues = [...]"), "{r}");
        let r = reason("", "third");
        assert!(r.contains("the queue of pipeline \"third\""), "{r}");
        let r = reason("", "hq.dlq");
        assert!(r.contains("dead-letter queue of pipeline \"hq\""), "{r}");
        let r = reason("", "hq.retry.1000");
        assert!(r.contains("retry tier of pipeline \"hq\""), "{r}");
        let r = reason("", "elsewhere.dlq");
        assert!(r.contains("a dead-letter queue"), "{r}");
        assert_eq!(p.output("", "hq.dlq").unwrap_err().kind, DenyKind::Publish);
    }

    #[test]
    fn replies_never_reach_managed_queues() {
        let p = policy(TWO);
        assert!(p.reply_to("amq.rabbitmq.reply-to.g1h2AA==.x").is_ok());
        assert!(p.reply_to("amq.gen-abc").is_ok());
        assert!(p.reply_to("caller-replies").is_ok());
        for bad in [
            "hq",
            "hq.dlq",
            "other.retry.2000",
            "third",
            "foreign.dlq",
            "x.retry.5",
        ] {
            let d = p.reply_to(bad).unwrap_err();
            assert_eq!(d.kind, DenyKind::Reply);
            assert!(d.reason.contains(&format!("{bad:?}")), "{}", d.reason);
        }
    }

    #[test]
    fn reply_to_allow_narrows_replies() {
        let p = policy(
            "[[pipeline]]\nname = \"hq\"\nqueue = \"hq\"\nplugin = \"p.wasm\"\n\
             reply_to_allow = [\"amq.rabbitmq.reply-to.*\"]\n",
        );
        assert!(p.reply_to("amq.rabbitmq.reply-to.abc.def").is_ok());
        let r = p.reply_to("caller-replies").unwrap_err().reason;
        assert!(r.contains("reply_to_allow"), "{r}");
        // Even a pattern that would match cannot open a managed queue.
        let p = policy(
            "[[pipeline]]\nname = \"hq\"\nqueue = \"hq\"\nplugin = \"p.wasm\"\n\
             reply_to_allow = [\"*\"]\n",
        );
        assert!(p.reply_to("hq.dlq").is_err());
        assert!(p.reply_to("anything").is_ok());
    }
}
