//! Reloading one pipeline's plugin when its file changes.
//!
//! The watcher (`watch.rs`) pokes a [`Reloader`]; a poke is acted on once the
//! file has settled: a quiet period (`reload_debounce_ms`) with no event, no
//! writer holding the file open, and the same identity (inode, size, times) at
//! both ends of the period. The file is then read (only if it is a regular
//! file, never blocking) and fingerprinted; an unchanged digest is a no-op, so
//! spurious events cost one read. A new version is compiled (or taken from the
//! compiled cache) off the message path, checked against the world and against
//! the pipeline's limits, and swapped in as one `Arc`. Anything that fails keeps
//! the old version serving and is reported once.
//!
//! A file that is still being written is not an error: one that changed while
//! it was read or compiled, or whose last section runs past its end and that
//! was written recently (a writer appending in several opens, each closing the
//! file, looks finished to the watcher between appends), is looked at again
//! later instead of being reported.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::PluginStatus;
use super::file::{self, FileId, PluginFile, ReadError};
use super::{LoadedPlugin, PluginLoader, PluginSlot, check_fits, digest_of};

/// Longest wait for a writer to close the plugin file before loading anyway
/// (a crashed writer must not block reloads forever; a truncated file then
/// fails to load and the old version stays).
const MAX_WRITE_WAIT: Duration = Duration::from_secs(30);

/// How long a file that ends inside a section may stay unchanged before it is
/// reported as broken rather than waited for: longer than the pauses of a
/// writer appending in several opens, short enough that a copy that stopped
/// halfway is reported while someone is still looking.
const SETTLE_GRACE: Duration = Duration::from_secs(10);

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
    status: Arc<PluginStatus>,
    signal: Arc<ReloadSignal>,
    debounce: Duration,
    memory_limit: usize,
    state: tokio::sync::Mutex<ReloadState>,
}

#[derive(Debug, Default)]
struct ReloadState {
    missing: bool,
    /// What the last reported failure was about, so that an event that changes
    /// nothing (a `touch` of the directory, a reader) does not report it again.
    failed_on: Option<FailedOn>,
    /// A reload error is showing in the metrics.
    error_shown: bool,
    /// Digest of the content that last looked cut short, and when it was first seen.
    incomplete: Option<(String, Instant)>,
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
    /// The file is still being written; it is looked at again at its next
    /// change, or after `retry_in` at the latest.
    Unsettled { retry_in: Duration },
}

/// What the loading thread made of the bytes read.
enum Examined {
    Current,
    KnownBad,
    Incomplete {
        digest: String,
        len: usize,
    },
    Loaded {
        digest: String,
        loaded: anyhow::Result<LoadedPlugin>,
    },
}

impl Reloader {
    /// A reloader for `path`, feeding `slot`; a new version must fit in
    /// `memory_limit` bytes (the pipeline's `limits.memory_mib`).
    pub fn new(
        pipeline: Arc<str>,
        path: PathBuf,
        slot: Arc<PluginSlot>,
        loader: PluginLoader,
        status: Arc<PluginStatus>,
        debounce: Duration,
        memory_limit: usize,
    ) -> Self {
        Self {
            pipeline,
            path,
            slot,
            loader,
            status,
            signal: Arc::default(),
            debounce,
            memory_limit,
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
        let mut retry = None;
        loop {
            tokio::select! {
                _ = self.signal.poke.notified() => {}
                _ = sleep_for(retry) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if !self.settle(&mut stop).await {
                return;
            }
            // Reading and compiling run on blocking threads; stopping need not
            // wait for them (nothing is swapped once the future is dropped).
            let result = tokio::select! {
                r = self.reload_now() => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            retry = match result {
                ReloadResult::Unsettled { retry_in } => Some(retry_in),
                _ => None,
            };
        }
    }

    /// Wait until the file has been quiet for the debounce period: no watcher
    /// event, no writer holding it open, and the same identity at both ends of
    /// the period (a writer the watcher cannot see, on a network file system,
    /// still changes size and times). `false` when stopping.
    async fn settle(&self, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            let before = self.identity().await;
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
            if self.identity().await == before {
                return true;
            }
        }
    }

    async fn identity(&self) -> Option<FileId> {
        tokio::fs::metadata(&self.path)
            .await
            .ok()
            .map(|m| FileId::of(&m))
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
        let PluginFile { bytes, id } = match read {
            Ok(f) => f,
            Err(ReadError::Missing) => {
                state.incomplete = None;
                if !state.missing {
                    state.missing = true;
                    self.status.missing.store(true, Ordering::Relaxed);
                    tracing::warn!(pipeline = %self.pipeline, file = %self.path.display(), version = current.version(),
                        "plugin file is gone; the loaded version keeps serving");
                }
                return ReloadResult::Missing;
            }
            Err(ReadError::Changed) => {
                self.present(&mut state);
                return self.unsettled("the file changed while it was read", self.debounce);
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

        let (loader, path, limit) = (self.loader.clone(), self.path.clone(), self.memory_limit);
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
            if file::looks_incomplete(&bytes) {
                return Examined::Incomplete {
                    digest,
                    len: bytes.len(),
                };
            }
            let loaded = loader.load_bytes(&path, &bytes).and_then(|plugin| {
                check_fits(&plugin, limit)
                    .map_err(|e| e.context(format!("loading plugin {}", path.display())))?;
                Ok(plugin)
            });
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
                // The file holds the running version again (a rollback, or
                // permissions fixed): whatever was reported no longer applies.
                state.failed_on = None;
                state.incomplete = None;
                self.clear_error(&mut state);
                ReloadResult::Unchanged
            }
            Examined::KnownBad => ReloadResult::Failed("unchanged broken file".into()),
            Examined::Incomplete { digest, len } => self.incomplete(&mut state, digest, len, id),
            Examined::Loaded {
                loaded: Ok(plugin), ..
            } => {
                state.failed_on = None;
                state.incomplete = None;
                state.error_shown = false;
                let new = plugin.version().to_string();
                let (ms, source) = (
                    u64::try_from(plugin.load_time().as_millis()).unwrap_or(u64::MAX),
                    plugin.source().label(),
                );
                let old = self.slot.swap(plugin);
                self.status.set_version(&new);
                // Also clears the last reload error.
                self.status.reloaded(None);
                self.status.cache_outcome(source);
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
            } => {
                // Bytes that fail to load while the file has moved on since
                // they were read are a snapshot of a write in progress.
                if self.identity().await != Some(id) {
                    return self.unsettled("the file changed while it was loaded", self.debounce);
                }
                self.failed(&mut state, Some(FailedOn::Digest(digest)), format!("{e:#}"))
            }
        }
    }

    /// A file that ends inside a section: waited for while it is recent, then
    /// reported as broken.
    fn incomplete(
        &self,
        state: &mut ReloadState,
        digest: String,
        len: usize,
        id: FileId,
    ) -> ReloadResult {
        let now = Instant::now();
        let first_seen = match &state.incomplete {
            Some((d, since)) if *d == digest => *since,
            _ => {
                state.incomplete = Some((digest.clone(), now));
                now
            }
        };
        // Unchanged for long by its own time stamp, or by our watch of it
        // (which also covers a clock running ahead on a network file system).
        let quiet = now.duration_since(first_seen).max(id.age());
        let where_ = match len {
            0 => "it is empty",
            1..8 => "it ends inside the component header",
            _ => "it ends inside a section",
        };
        if let Some(left) = SETTLE_GRACE.checked_sub(quiet).filter(|d| !d.is_zero()) {
            return self.unsettled(
                &format!("{where_} ({len} bytes): the rest may still come"),
                left.max(self.debounce),
            );
        }
        state.incomplete = None;
        let reason = format!(
            "loading plugin {}: the file is incomplete: {where_} ({len} bytes) and has not \
             changed for {} s (a copy that stopped halfway?)",
            self.path.display(),
            quiet.as_secs()
        );
        self.failed(state, Some(FailedOn::Digest(digest)), reason)
    }

    fn unsettled(&self, why: &str, retry_in: Duration) -> ReloadResult {
        tracing::debug!(pipeline = %self.pipeline, file = %self.path.display(), why,
            retry_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
            "plugin file is still being written; not loaded yet");
        ReloadResult::Unsettled { retry_in }
    }

    /// The file is there (whatever it holds).
    fn present(&self, state: &mut ReloadState) {
        if state.missing {
            state.missing = false;
            self.status.missing.store(false, Ordering::Relaxed);
            tracing::info!(pipeline = %self.pipeline, file = %self.path.display(), "plugin file is back");
        }
    }

    fn clear_error(&self, state: &mut ReloadState) {
        if state.error_shown {
            state.error_shown = false;
            self.status.clear_reload_error();
            tracing::info!(pipeline = %self.pipeline, file = %self.path.display(), version = self.slot.current().version(),
                "plugin file holds the running version again; the last reload error no longer applies");
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
        state.error_shown = true;
        self.status.reloaded(Some(&reason));
        tracing::error!(pipeline = %self.pipeline, file = %self.path.display(), version = self.slot.current().version(),
            error = %reason, "plugin reload failed; the previous version keeps serving");
        ReloadResult::Failed(reason)
    }
}

/// Sleep for `d`, or for ever when there is nothing to wait for.
async fn sleep_for(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
