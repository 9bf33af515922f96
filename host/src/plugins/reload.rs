//! Reloading one pipeline's plugin when its file changes.
//!
//! The watcher (`watch.rs`) pokes a [`Reloader`]. A poke is acted on after a
//! quiet period (`reload_debounce_ms`), and never while the plugin file is open
//! for writing (a slow `cp` or an in-place editor): the load waits for the
//! writer's close. The file is then read and fingerprinted; an unchanged digest
//! is a no-op, so spurious events cost one read. A new version is compiled (or
//! taken from the compiled cache) off the message path, checked against the
//! world, and swapped in as one `Arc`. Anything that fails keeps the old
//! version serving and is reported.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::{PluginLoader, PluginSlot, digest_of};
use crate::ops::PipelineMetrics;

/// Longest wait for a writer to close the plugin file before loading anyway
/// (a crashed writer must not block reloads forever; a truncated file then
/// fails to load and the old version stays).
const MAX_WRITE_WAIT: Duration = Duration::from_secs(30);

/// What the watcher tells one pipeline's reloader.
#[derive(Debug, Default)]
pub struct ReloadSignal {
    poke: Notify,
    writing: AtomicBool,
}

impl ReloadSignal {
    /// Something about the plugin file may have changed.
    pub(super) fn poke(&self) {
        self.poke.notify_one();
    }

    /// A writer modified the file (`true`) or closed it (`false`).
    pub(super) fn set_writing(&self, writing: bool) {
        self.writing.store(writing, Ordering::Release);
    }

    fn writing(&self) -> bool {
        self.writing.load(Ordering::Acquire)
    }
}

/// One pipeline's reloader.
#[derive(Debug)]
pub struct Reloader {
    pipeline: Arc<str>,
    path: PathBuf,
    slot: Arc<PluginSlot>,
    loader: PluginLoader,
    metrics: Arc<PipelineMetrics>,
    signal: Arc<ReloadSignal>,
    debounce: Duration,
    state: tokio::sync::Mutex<ReloadState>,
}

#[derive(Debug, Default)]
struct ReloadState {
    missing: bool,
    last_failed_digest: Option<String>,
}

/// Result of one reload check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadResult {
    /// Same digest as the running version.
    Unchanged,
    /// A new version now serves.
    Swapped { old: String, new: String },
    /// The file is gone; the loaded version keeps serving.
    Missing,
    /// The file could not be loaded; the loaded version keeps serving.
    Failed(String),
}

impl Reloader {
    /// A reloader for `path`, feeding `slot`.
    pub fn new(
        pipeline: Arc<str>,
        path: PathBuf,
        slot: Arc<PluginSlot>,
        loader: PluginLoader,
        metrics: Arc<PipelineMetrics>,
        debounce: Duration,
    ) -> Self {
        Self {
            pipeline,
            path,
            slot,
            loader,
            metrics,
            signal: Arc::default(),
            debounce,
            state: Default::default(),
        }
    }

    /// The signal the watcher pokes.
    pub fn signal(&self) -> Arc<ReloadSignal> {
        self.signal.clone()
    }

    /// The pipeline this reloader serves.
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// The watched plugin path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// React to pokes until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.signal.poke.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            // Quiet period: more events restart it.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(self.debounce) => break,
                    _ = self.signal.poke.notified() => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            let since = Instant::now();
            while self.signal.writing() && since.elapsed() < MAX_WRITE_WAIT {
                tokio::select! {
                    _ = tokio::time::sleep(self.debounce) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            self.reload_now().await;
        }
    }

    /// Check the file now and swap if it holds a new, valid version.
    pub async fn reload_now(&self) -> ReloadResult {
        let mut state = self.state.lock().await;
        let current = self.slot.current();
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !state.missing {
                    state.missing = true;
                    self.metrics.plugin_missing.store(true, Ordering::Relaxed);
                    tracing::warn!(pipeline = %self.pipeline, file = %self.path.display(), version = current.version(),
                        "plugin file is gone; the loaded version keeps serving");
                }
                return ReloadResult::Missing;
            }
            Err(e) => {
                return self.failed(
                    &mut state,
                    None,
                    format!("cannot read {}: {e}", self.path.display()),
                );
            }
        };
        state.missing = false;
        self.metrics.plugin_missing.store(false, Ordering::Relaxed);
        let (loader, path) = (self.loader.clone(), self.path.clone());
        // A file already reported as broken is not compiled again when an
        // unrelated event in its directory makes us re-read it.
        let known_bad = state.last_failed_digest.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let digest = digest_of(&bytes);
            if digest == current.digest() || known_bad.as_deref() == Some(digest.as_str()) {
                return (digest, None);
            }
            let loaded = loader.load_bytes(&path, &bytes);
            (digest, Some(loaded))
        })
        .await;
        let (digest, loaded) = match joined {
            Ok(v) => v,
            Err(e) => {
                return self.failed(&mut state, None, format!("the loading thread failed: {e}"));
            }
        };
        let Some(loaded) = loaded else {
            return if state.last_failed_digest.as_deref() == Some(digest.as_str()) {
                ReloadResult::Failed("unchanged broken file".into())
            } else {
                ReloadResult::Unchanged
            };
        };
        match loaded {
            Ok(plugin) => {
                state.last_failed_digest = None;
                let new = plugin.version().to_string();
                let (ms, source) = (
                    plugin.compile_time().as_millis() as u64,
                    plugin.source().label(),
                );
                let old = self.slot.swap(plugin);
                self.metrics.set_plugin_version(&new);
                self.metrics.reloaded(None);
                self.metrics.cache_outcome(source);
                tracing::info!(pipeline = %self.pipeline, file = %self.path.display(), old = old.version(), new = %new,
                    load_ms = ms, cache = source, "plugin reloaded");
                ReloadResult::Swapped {
                    old: old.version().to_string(),
                    new,
                }
            }
            Err(e) => self.failed(&mut state, Some(digest), format!("{e:#}")),
        }
    }

    fn failed(
        &self,
        state: &mut ReloadState,
        digest: Option<String>,
        reason: String,
    ) -> ReloadResult {
        state.last_failed_digest = digest;
        self.metrics.reloaded(Some(&reason));
        tracing::error!(pipeline = %self.pipeline, file = %self.path.display(), version = self.slot.current().version(),
            error = %reason, "plugin reload failed; the previous version keeps serving");
        ReloadResult::Failed(reason)
    }
}
