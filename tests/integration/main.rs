//! Integration tests: warren in-process against the real RabbitMQ broker and the
//! real example plugins started/built by `scripts/test.sh`. Every test uses its
//! own queue names, so they run in parallel and never see each other's messages.

// A failed expectation in a test should panic with its message: that is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod allowlist;
mod bare;
mod cache;
mod cluster;
mod config_errors;
mod conservation;
mod dlq;
mod downstream;
mod examples;
mod failures;
mod hostile;
mod http;
mod kubernetes;
mod lifecycle;
mod ops;
mod outcomes;
mod polyglot;
mod private_broker;
mod reload;
mod reuse;
mod rpc;
mod single_active;
mod tls;

use std::path::Path;

use warren_tests::{plugin, toml_path};

/// `[[pipeline]]` TOML for `plugin_name` on `queue`; `extra` is appended inside
/// the pipeline (keys first, then sub-tables). The plugin may publish to
/// `<queue>.out` through the default exchange, where the test plugins
/// (`tag_a`, `tag_b`, `republish`) publish unless configured otherwise.
pub fn pipeline(name: &str, queue: &str, plugin_name: &str, extra: &str) -> String {
    pipeline_at(name, queue, &plugin(plugin_name), extra)
}

/// Same, with an explicit plugin path.
pub fn pipeline_at(name: &str, queue: &str, plugin: &Path, extra: &str) -> String {
    format!(
        "[[pipeline]]\nname = {name:?}\nqueue = {queue:?}\nplugin = {}\n{extra}\n\
         [[pipeline.output]]\nqueues = [{:?}]\n",
        toml_path(plugin),
        format!("{queue}.out")
    )
}

/// A `[[pipeline.output]]` entry that lets the plugin publish to `queue`
/// through the default exchange.
pub fn output_queue(queue: &str) -> String {
    format!("[[pipeline.output]]\nqueues = [{queue:?}]\n")
}

/// Short retry policy so tests do not wait for the production backoff.
pub const FAST_RETRY: &str = "[pipeline.retry]\nmax_attempts = 3\ninitial_delay_ms = 100\nmax_delay_ms = 400\njitter = 0.0\n";
