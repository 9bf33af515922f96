//! Watching plugin files for hot reload.
//!
//! The *directory* holding a plugin is watched, not the file: deploy tools
//! replace files by rename (`mv`, editors' write-then-rename), by delete and
//! re-create, or by swapping a symlink (Kubernetes ConfigMaps flip a `..data`
//! link), and a watch on the old inode would miss all of these. If the
//! configured path is a symlink, the directory of its target is watched too.
//! Any event in a watched directory pokes the pipelines whose plugin lives
//! there; their reloaders (`reload.rs`) decide what to do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use super::reload::{ReloadSignal, Reloader};

/// Start one watcher for all reloaders. Keep the returned watcher alive.
pub fn watch_plugins(reloaders: &[Arc<Reloader>]) -> Result<RecommendedWatcher> {
    // directory -> (file name, signal) of the plugins living there
    let mut by_dir: HashMap<PathBuf, Vec<(std::ffi::OsString, Arc<ReloadSignal>)>> = HashMap::new();
    for r in reloaders {
        for path in watched_paths(r.path()) {
            let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                continue;
            };
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            by_dir
                .entry(dir.to_path_buf())
                .or_default()
                .push((name.to_os_string(), r.signal()));
        }
    }
    let dirs: Vec<PathBuf> = by_dir.keys().cloned().collect();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<Event>| {
        let Ok(event) = res else { return };
        for path in &event.paths {
            let Some(dir) = path.parent() else { continue };
            let Some(entries) = by_dir.get(dir) else {
                continue;
            };
            for (name, signal) in entries {
                if path.file_name() == Some(name.as_os_str()) {
                    match event.kind {
                        EventKind::Modify(ModifyKind::Data(_)) => signal.set_writing(true),
                        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                            signal.set_writing(false)
                        }
                        _ => {}
                    }
                }
                // Any change in the directory may concern the plugin (a renamed
                // temp file, a flipped `..data` symlink); the digest check sorts it out.
                if !matches!(
                    event.kind,
                    EventKind::Access(AccessKind::Open(_) | AccessKind::Read)
                ) {
                    signal.poke();
                }
            }
        }
    })
    .context("starting the plugin file watcher")?;
    for dir in dirs {
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching plugin directory {}", dir.display()))?;
    }
    Ok(watcher)
}

/// The configured path, plus its symlink target when it is a link.
fn watched_paths(path: &Path) -> Vec<PathBuf> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = vec![path.clone()];
    if let Ok(target) = std::fs::canonicalize(&path)
        && target != path
        && target.parent() != path.parent()
    {
        out.push(target);
    }
    out
}
