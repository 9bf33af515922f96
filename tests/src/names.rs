//! Names every test needs: the test broker's URL, built plugins' paths and
//! unique queue names. std only, so that the `warren` package's own tests
//! (`host/tests/`, which must use the binary cargo builds for them) include
//! this same file with `#[path]` instead of keeping copies.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// AMQP URL of the test broker.
pub fn broker_url() -> String {
    std::env::var("WARREN_TEST_BROKER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5682/%2f".into())
}

/// Path of a built plugin, e.g. `plugin("fib")`.
pub fn plugin(name: &str) -> PathBuf {
    let dir = std::env::var("WARREN_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist"));
    dir.join(format!("{name}.wasm"))
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "test.{prefix}.{}.{}.{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
