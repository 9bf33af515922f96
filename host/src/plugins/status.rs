//! What a pipeline's plugin is doing, as the loader and the reloader report
//! it: the version serving, whether its file is missing, reloads and their
//! failures, where each load's compiled code came from. `ops` reads it for
//! `/metrics` and `/healthz/ready`; nothing here knows about either.

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Where a load's code came from (`CacheOutcome::label`), in the order of
/// [`PluginStatus`]'s counters.
pub const CACHE_SOURCES: [&str; 5] = ["compiled", "miss", "hit", "recovered", "shared"];

/// One pipeline's plugin; shared by its reloader and the metrics.
#[derive(Debug, Default)]
pub struct PluginStatus {
    version: RwLock<String>,
    /// The plugin file is currently missing (the loaded version keeps serving).
    pub missing: AtomicBool,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    last_reload_error: RwLock<Option<String>>,
    cache: [AtomicU64; 5],
}

impl PluginStatus {
    /// Set the active plugin version label.
    pub fn set_version(&self, v: &str) {
        if let Ok(mut g) = self.version.write() {
            v.clone_into(&mut g);
        }
    }

    /// The active plugin version (short digest).
    pub fn version(&self) -> String {
        self.version.read().map(|g| g.clone()).unwrap_or_default()
    }

    /// Why the last reload failed, until a reload succeeds or the file holds
    /// the running version again.
    pub fn last_reload_error(&self) -> Option<String> {
        self.last_reload_error.read().ok().and_then(|g| g.clone())
    }

    /// Count a reload attempt that changed something: `None` = swapped, `Some(why)` = failed.
    pub fn reloaded(&self, error: Option<&str>) {
        match error {
            None => self.reloads.fetch_add(1, Ordering::Relaxed),
            Some(_) => self.reload_failures.fetch_add(1, Ordering::Relaxed),
        };
        if let Ok(mut g) = self.last_reload_error.write() {
            *g = error.map(str::to_string);
        }
    }

    /// Forget the last reload error without counting a reload: the plugin file
    /// holds the running version again.
    pub fn clear_reload_error(&self) {
        if let Ok(mut g) = self.last_reload_error.write() {
            *g = None;
        }
    }

    /// Successful reloads so far.
    pub fn reload_count(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Failed reloads so far.
    pub fn reload_failure_count(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    /// Count where a loaded plugin's code came from (`CacheOutcome::label`).
    pub fn cache_outcome(&self, label: &str) {
        if let Some(i) = CACHE_SOURCES.iter().position(|k| *k == label) {
            self.cache[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Loads with this cache outcome so far.
    pub fn cache_count(&self, label: &str) -> u64 {
        CACHE_SOURCES
            .iter()
            .position(|k| *k == label)
            .map_or(0, |i| self.cache[i].load(Ordering::Relaxed))
    }
}
