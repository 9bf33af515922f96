//! Reloading one pipeline's plugin when its file changes.
//!
//! The watcher (`watch.rs`) pokes a [`Reloader`]. A poke is acted on after a
//! quiet period (`reload_debounce_ms`), and never while the plugin file is open
//! for writing (a slow `cp` or an in-place editor): the load waits for the
//! writer's close. The file is then read (only if it is a regular file, never
//! blocking) and fingerprinted; an unchanged digest is a no-op, so spurious
//! events cost one read. A new version is compiled (or taken from the compiled
//! cache) off the message path, checked against the world, and swapped in as
//! one `Arc`. Anything that fails keeps the old version serving and is
//! reported once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::file::{self, FileId, PluginFile, ReadError};
use super::{LoadedPlugin, PluginLoader, PluginSlot, digest_of};
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
    /// What the last reported failure was about, so that an event that changes
    /// nothing (a `touch` of the directory, a reader) does not report it again.
    failed_on: Option<FailedOn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FailedOn {
    /// Content that does not load.
    Digest(String),
    /// A file that cannot be read (not a regular file, no permission).
    File(FileId),
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

/// What the loading thread made of the bytes read.
enum Examined {
    Current,
    KnownBad,
    Loaded {
        digest: String,
        loaded: anyhow::Result<LoadedPlugin>,
    },
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
            if !self.settle(&mut stop).await {
                return;
            }
            // Reading and compiling run on blocking threads; stopping need not
            // wait for them (nothing is swapped once the future is dropped).
            tokio::select! {
                _ = self.reload_now() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Wait for a quiet period with no watcher event and no writer holding the
    /// file open. `false` when stopping.
    async fn settle(&self, stop: &mut watch::Receiver<bool>) -> bool {
        // Quiet period: more events restart it.
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.debounce) => break,
                _ = self.signal.poke.notified() => continue,
                _ = stop.wait_for(|s| *s) => return false,
            }
        }
        let since = Instant::now();
        while self.signal.writing() && since.elapsed() < MAX_WRITE_WAIT {
            tokio::select! {
                // Not a busy loop when the debounce is configured to 0.
                _ = tokio::time::sleep(self.debounce.max(Duration::from_millis(10))) => {}
                _ = stop.wait_for(|s| *s) => return false,
            }
        }
        true
    }

    /// Check the file now and swap if it holds a new, valid version.
    pub async fn reload_now(&self) -> ReloadResult {
        let mut state = self.state.lock().await;
        let current = self.slot.current();
        let path = self.path.clone();
        let read = match tokio::task::spawn_blocking(move || file::read_plugin(&path)).await {
            Ok(r) => r,
            Err(e) => {
                return self.failed(&mut state, None, format!("the reading thread failed: {e}"));
            }
        };
        let PluginFile { bytes } = match read {
            Ok(f) => f,
            Err(ReadError::Missing) => {
                if !state.missing {
                    state.missing = true;
                    self.metrics.plugin_missing.store(true, Ordering::Relaxed);
                    tracing::warn!(pipeline = %self.pipeline, file = %self.path.display(), version = current.version(),
                        "plugin file is gone; the loaded version keeps serving");
                }
                return ReloadResult::Missing;
            }
            Err(e @ ReadError::NotRegular { id, .. }) => {
                self.present(&mut state);
                let reason = format!("cannot load {}: {e}", self.path.display());
                return self.failed(&mut state, Some(FailedOn::File(id)), reason);
            }
            Err(ReadError::Io { error, id }) => {
                self.present(&mut state);
                let reason = format!("cannot read {}: {error}", self.path.display());
                return self.failed(&mut state, id.map(FailedOn::File), reason);
            }
        };
        self.present(&mut state);

        let (loader, path) = (self.loader.clone(), self.path.clone());
        // A file already reported as broken is not compiled again when an
        // unrelated event makes us re-read it.
        let known_bad = match &state.failed_on {
            Some(FailedOn::Digest(d)) => Some(d.clone()),
            _ => None,
        };
        let joined = tokio::task::spawn_blocking(move || {
            let digest = digest_of(&bytes);
            if digest == current.digest() {
                return Examined::Current;
            }
            if known_bad.as_deref() == Some(digest.as_str()) {
                return Examined::KnownBad;
            }
            let loaded = loader.load_bytes(&path, &bytes);
            Examined::Loaded { digest, loaded }
        })
        .await;
        let examined = match joined {
            Ok(v) => v,
            Err(e) => {
                return self.failed(&mut state, None, format!("the loading thread failed: {e}"));
            }
        };
        match examined {
            Examined::Current => {
                state.failed_on = None;
                ReloadResult::Unchanged
            }
            Examined::KnownBad => ReloadResult::Failed("unchanged broken file".into()),
            Examined::Loaded {
                loaded: Ok(plugin), ..
            } => {
                state.failed_on = None;
                let new = plugin.version().to_string();
                let (ms, source) = (
                    u64::try_from(plugin.compile_time().as_millis()).unwrap_or(u64::MAX),
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
            Examined::Loaded {
                digest,
                loaded: Err(e),
            } => self.failed(&mut state, Some(FailedOn::Digest(digest)), format!("{e:#}")),
        }
    }

    /// The file is there (whatever it holds).
    fn present(&self, state: &mut ReloadState) {
        if state.missing {
            state.missing = false;
            self.metrics.plugin_missing.store(false, Ordering::Relaxed);
            tracing::info!(pipeline = %self.pipeline, file = %self.path.display(), "plugin file is back");
        }
    }

    fn failed(
        &self,
        state: &mut ReloadState,
        on: Option<FailedOn>,
        reason: String,
    ) -> ReloadResult {
        if on.is_some() && state.failed_on == on {
            return ReloadResult::Failed(reason);
        }
        state.failed_on = on;
        self.metrics.reloaded(Some(&reason));
        tracing::error!(pipeline = %self.pipeline, file = %self.path.display(), version = self.slot.current().version(),
            error = %reason, "plugin reload failed; the previous version keeps serving");
        ReloadResult::Failed(reason)
    }
}
