//! Watching plugin files, wherever deploy tools put them.
//!
//! Deploys rarely write the plugin file in place. They rename a new file over
//! it, delete and re-create it, re-create or rename its whole directory, or
//! flip a symlink somewhere on the way to it: a `current -> releases/N` link
//! (Capistrano and friends), or Kubernetes' ConfigMap and Secret volumes, where
//! `dir/plugin.wasm -> ..data/plugin.wasm`, `..data -> ..2026_11_30_xx`, and an
//! update writes a new timestamped directory and renames a new `..data` link
//! over the old one. A watch on the file, or on the directory it was in at the
//! start, sees none of that once the directory itself is replaced.
//!
//! So the configured path is resolved the way the kernel does it, one name at
//! a time from `/`, following symlinks, and every directory in which a name is
//! looked up is watched (not recursively): the file's directory, every
//! ancestor, every directory a symlink leads through. An event about one of
//! those names (or about one of those directories itself) means the path may
//! lead elsewhere now: it is resolved again, the watches are moved to the
//! directories it goes through now (a directory replaced under the same name
//! is a different inode and is watched anew), and the pipeline is poked. When
//! part of the path does not exist, its nearest existing directory is watched
//! for the missing name, so re-creating it is seen too. Events about anything
//! else in those directories are ignored.
//!
//! Every [`RECHECK_EVERY`] the paths are also resolved again and the plugin
//! files' identities (device, inode, size, times) compared, without any event.
//! inotify cannot see everything: changes made by another machine on a network
//! file system (NFS, SMB, some container file sharing), a file or directory
//! mounted over, writes through a hard link in another directory, a directory
//! that cannot be watched (no read permission, the inotify watch limit), and
//! events dropped when the kernel's queue overflows. Those deploys are picked
//! up within seconds instead of never.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use super::file::{self, FileId};
use super::reload::{ReloadSignal, Reloader};

/// How often paths are resolved again and files looked at without an event.
/// A few `stat`s per pipeline; it only matters where inotify is blind.
const RECHECK_EVERY: Duration = Duration::from_secs(5);

/// Symlinks followed while resolving a path before giving up (Linux's limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// Keeps the plugin watcher running; dropping it stops the watching thread.
#[derive(Debug)]
pub struct PluginWatcher {
    tx: mpsc::Sender<Msg>,
}

impl Drop for PluginWatcher {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
    }
}

enum Msg {
    Event(notify::Result<Event>),
    Stop,
}

/// Start watching the reloaders' plugin files. Keep the returned value alive.
pub fn watch_plugins(reloaders: &[Arc<Reloader>]) -> Result<PluginWatcher> {
    let (tx, rx) = mpsc::channel();
    let events = tx.clone();
    // The handler runs on notify's own thread, which must not be asked to add
    // or remove watches from there: events go to the watching thread instead.
    let watcher = notify::recommended_watcher(move |res| {
        let _ = events.send(Msg::Event(res));
    })
    .context("starting the plugin file watcher")?;
    let plugins = reloaders
        .iter()
        .map(|r| {
            let path = std::path::absolute(r.path()).unwrap_or_else(|_| r.path().to_path_buf());
            Watched {
                signal: r.signal(),
                pipeline: r.pipeline().to_string(),
                resolution: resolve(&path),
                file: file::identity(&path),
                path,
            }
        })
        .collect();
    let mut watching = Watching {
        watcher,
        plugins,
        armed: HashMap::new(),
        unwatchable: HashSet::new(),
    };
    let all = vec![true; watching.plugins.len()];
    watching.rearm(&all);
    // A deploy between loading the plugins and watching their paths sent its
    // events to nobody: look once more now (an unchanged file costs one read).
    for w in &watching.plugins {
        w.signal.poke();
    }
    std::thread::Builder::new()
        .name("warren-plugin-watch".into())
        .spawn(move || watching.run(&rx))
        .context("starting the plugin watching thread")?;
    Ok(PluginWatcher { tx })
}

/// One pipeline's plugin path as the watcher follows it.
struct Watched {
    signal: Arc<ReloadSignal>,
    pipeline: String,
    /// The configured path, made absolute.
    path: PathBuf,
    resolution: Resolution,
    /// What the path led to at the last look.
    file: Option<FileId>,
}

/// What an event (or a recheck) asks of one pipeline.
#[derive(Debug, Clone, Copy, Default)]
struct Dirty {
    resolve: bool,
    poke: bool,
}

/// The watching thread's state.
struct Watching {
    watcher: RecommendedWatcher,
    plugins: Vec<Watched>,
    /// Watched directories, with the inode the watch is on.
    armed: HashMap<PathBuf, (u64, u64)>,
    /// Directories that could not be watched (reported once each).
    unwatchable: HashSet<PathBuf>,
}

impl Watching {
    fn run(mut self, rx: &mpsc::Receiver<Msg>) {
        let mut next_check = Instant::now() + RECHECK_EVERY;
        loop {
            let mut dirty = vec![Dirty::default(); self.plugins.len()];
            let mut rearm = false;
            // Checked before waiting, so a steady stream of unrelated events
            // (a busy /tmp is watched as an ancestor) cannot starve it.
            if Instant::now() >= next_check {
                next_check = Instant::now() + RECHECK_EVERY;
                self.recheck(&mut dirty);
                rearm = true;
            } else {
                match rx.recv_timeout(next_check.saturating_duration_since(Instant::now())) {
                    Ok(Msg::Event(res)) => {
                        rearm |= self.on_event(res, &mut dirty);
                        // Take whatever else is queued: a burst is acted on once.
                        loop {
                            match rx.try_recv() {
                                Ok(Msg::Event(res)) => rearm |= self.on_event(res, &mut dirty),
                                Ok(Msg::Stop) => return,
                                Err(_) => break,
                            }
                        }
                    }
                    Ok(Msg::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                }
            }
            let resolve: Vec<bool> = dirty.iter().map(|d| d.resolve).collect();
            if rearm || resolve.contains(&true) {
                self.rearm(&resolve);
            }
            for (w, d) in self.plugins.iter_mut().zip(&dirty) {
                if d.poke || d.resolve {
                    w.file = file::identity(&w.path);
                    w.signal.poke();
                }
            }
        }
    }

    /// Note what `res` means for each plugin; `true` when a watched directory
    /// may have been replaced.
    fn on_event(&mut self, res: notify::Result<Event>, dirty: &mut [Dirty]) -> bool {
        let event = match res {
            Ok(e) if !e.need_rescan() => e,
            other => {
                // Events were lost (queue overflow) or the watcher failed:
                // anything may have changed.
                if let Err(e) = other {
                    tracing::debug!(error = %e, "plugin file watcher error; looking at every plugin path again");
                }
                dirty.fill(Dirty {
                    resolve: true,
                    poke: true,
                });
                return true;
            }
        };
        let (relevant, structural) = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => (true, false),
            // Opening and reading (ours included) change nothing.
            EventKind::Access(_) => (false, false),
            EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Metadata(_)) => (true, false),
            // Created, removed, renamed, or unknown: a name may lead elsewhere.
            _ => (true, true),
        };
        if !relevant {
            return false;
        }
        let mut rearm = false;
        for p in &event.paths {
            if structural {
                // A watched directory (or one above it) was moved or deleted:
                // the watches went with it, and notify drops those under a
                // moved or deleted path itself. Watch whatever is there now,
                // even if it is the same directory moved back.
                let under: Vec<PathBuf> = self
                    .armed
                    .keys()
                    .filter(|d| d.starts_with(p))
                    .cloned()
                    .collect();
                for dir in under {
                    self.disarm(&dir);
                    rearm = true;
                }
            }
            for (w, d) in self.plugins.iter().zip(dirty.iter_mut()) {
                if w.resolution.target.as_deref() == Some(p.as_path()) {
                    match event.kind {
                        EventKind::Modify(ModifyKind::Data(_)) => w.signal.set_writing(true),
                        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                            w.signal.set_writing(false)
                        }
                        _ => {}
                    }
                }
                if w.resolution.concerns(p) {
                    d.poke = true;
                    d.resolve |= structural;
                }
            }
        }
        rearm
    }

    /// The safety net: what changed without an event.
    fn recheck(&mut self, dirty: &mut [Dirty]) {
        for (w, d) in self.plugins.iter().zip(dirty.iter_mut()) {
            if resolve(&w.path) != w.resolution {
                d.resolve = true;
            }
            if file::identity(&w.path) != w.file {
                d.poke = true;
            }
        }
    }

    /// Resolve the marked plugins' paths again and watch the directories all
    /// paths go through now. Repeated until nothing moves: a directory created
    /// between resolving and watching it sends no event.
    fn rearm(&mut self, which: &[bool]) {
        let mut which = which.to_vec();
        for _ in 0..=MAX_SYMLINK_HOPS {
            self.reconcile();
            let mut moved = false;
            for (w, again) in self.plugins.iter_mut().zip(which.iter_mut()) {
                if !*again {
                    continue;
                }
                let now = resolve(&w.path);
                *again = now != w.resolution;
                if *again {
                    moved = true;
                    tracing::debug!(pipeline = %w.pipeline, file = %w.path.display(),
                        target = ?now.target, "plugin path resolved again");
                    if now.target != w.resolution.target {
                        // A write in progress was to the file the path left.
                        w.signal.set_writing(false);
                    }
                    w.resolution = now;
                }
            }
            if !moved {
                break;
            }
        }
        self.reconcile();
    }

    /// Watch exactly the directories the resolved paths go through.
    fn reconcile(&mut self) {
        let wanted: BTreeSet<PathBuf> = self
            .plugins
            .iter()
            .flat_map(|w| w.resolution.dirs())
            .map(Path::to_path_buf)
            .collect();
        let gone: Vec<PathBuf> = self
            .armed
            .keys()
            .filter(|d| !wanted.contains(*d))
            .cloned()
            .collect();
        for dir in gone {
            self.disarm(&dir);
        }
        self.unwatchable.retain(|d| wanted.contains(d));
        for dir in wanted {
            let Some(inode) = file::inode(&dir) else {
                self.disarm(&dir);
                continue;
            };
            if self.armed.get(&dir) == Some(&inode) {
                continue;
            }
            self.disarm(&dir);
            match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.armed.insert(dir.clone(), inode);
                    self.unwatchable.remove(&dir);
                }
                Err(e) => {
                    if self.unwatchable.insert(dir.clone()) {
                        tracing::warn!(dir = %dir.display(), error = %e, recheck_s = RECHECK_EVERY.as_secs(),
                            "cannot watch a directory on the way to a plugin file; changes there are found by the periodic check");
                    }
                }
            }
        }
    }

    fn disarm(&mut self, dir: &Path) {
        if self.armed.remove(dir).is_some() {
            // notify has often dropped the watch itself (its directory was
            // deleted or moved away); then there is nothing to remove.
            let _ = self.watcher.unwatch(dir);
        }
    }
}

/// How a path resolves: every name looked up in a directory on the way from
/// `/` to the plugin file, symlinks followed, and the real path of the file
/// when the lookups got that far (whether or not it exists).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Resolution {
    lookups: Vec<(PathBuf, OsString)>,
    target: Option<PathBuf>,
}

impl Resolution {
    fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.lookups.iter().map(|(d, _)| d.as_path())
    }

    /// Whether a change at `p` can change what the path leads to: `p` is one
    /// of the names looked up, or one of the directories looked in.
    fn concerns(&self, p: &Path) -> bool {
        let (dir, name) = (p.parent(), p.file_name());
        self.lookups
            .iter()
            .any(|(d, n)| (Some(d.as_path()) == dir && Some(n.as_os_str()) == name) || d == p)
    }
}

/// A step of a path: its root, `..`, or a name (`.` is dropped).
enum Step {
    Root(PathBuf),
    Up,
    Name(OsString),
}

fn steps(path: &Path) -> Vec<Step> {
    let mut out = Vec::new();
    let mut rooted = false;
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => {
                if !rooted {
                    rooted = true;
                    let root = path.ancestors().last().unwrap_or(path);
                    out.push(Step::Root(root.to_path_buf()));
                }
            }
            Component::CurDir => {}
            Component::ParentDir => out.push(Step::Up),
            Component::Normal(name) => out.push(Step::Name(name.to_os_string())),
        }
    }
    out
}

/// Resolve an absolute `path` as the kernel would, recording each lookup.
/// Stops at the first name that is missing or cannot be looked at, which is
/// then watched for.
fn resolve(path: &Path) -> Resolution {
    let mut out = Resolution::default();
    let mut pending: VecDeque<Step> = steps(path).into();
    // Always a real directory: symlinks are replaced by their targets, so `..`
    // means its physical parent, as in the kernel.
    let mut dir = PathBuf::new();
    let mut hops = 0usize;
    while let Some(step) = pending.pop_front() {
        let name = match step {
            Step::Root(root) => {
                dir = root;
                continue;
            }
            Step::Up => {
                dir.pop();
                continue;
            }
            Step::Name(name) => name,
        };
        let entry = dir.join(&name);
        out.lookups.push((dir.clone(), name));
        let last = pending.is_empty();
        match std::fs::symlink_metadata(&entry) {
            Ok(m) if m.file_type().is_symlink() => {
                hops = hops.saturating_add(1);
                let Ok(link) = std::fs::read_link(&entry) else {
                    return out;
                };
                if hops > MAX_SYMLINK_HOPS {
                    return out;
                }
                for step in steps(&link).into_iter().rev() {
                    pending.push_front(step);
                }
            }
            Ok(_) if last => out.target = Some(entry),
            Ok(_) => dir = entry,
            Err(_) => {
                if last {
                    out.target = Some(entry);
                }
                return out;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::os::unix::fs::symlink;

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("warren-watch-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::canonicalize(dir).unwrap()
    }

    fn looked_in(r: &Resolution, dir: &Path) -> Vec<String> {
        r.lookups
            .iter()
            .filter(|(d, _)| d == dir)
            .map(|(_, n)| n.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_kubernetes_volume_resolves_through_its_data_link() {
        let vol = temp_dir("k8s");
        std::fs::create_dir(vol.join("..2026_11_30_01")).unwrap();
        std::fs::write(vol.join("..2026_11_30_01/plugin.wasm"), b"v1").unwrap();
        symlink("..2026_11_30_01", vol.join("..data")).unwrap();
        symlink("..data/plugin.wasm", vol.join("plugin.wasm")).unwrap();

        let r = resolve(&vol.join("plugin.wasm"));
        assert_eq!(
            r.target.as_deref(),
            Some(vol.join("..2026_11_30_01/plugin.wasm").as_path())
        );
        assert_eq!(
            looked_in(&r, &vol),
            ["plugin.wasm", "..data", "..2026_11_30_01"]
        );
        assert!(
            r.dirs().any(|d| d == Path::new("/")),
            "ancestors are watched"
        );
        // The flip is a rename of a new link over `..data`: that name concerns us,
        // a file elsewhere in the volume does not.
        assert!(r.concerns(&vol.join("..data")));
        assert!(!r.concerns(&vol.join("..data_tmp")));
        assert!(r.concerns(&vol), "the volume directory itself");

        std::fs::create_dir(vol.join("..2026_11_30_02")).unwrap();
        std::fs::write(vol.join("..2026_11_30_02/plugin.wasm"), b"v2").unwrap();
        symlink("..2026_11_30_02", vol.join("..data_tmp")).unwrap();
        std::fs::rename(vol.join("..data_tmp"), vol.join("..data")).unwrap();
        let again = resolve(&vol.join("plugin.wasm"));
        assert_eq!(
            again.target.as_deref(),
            Some(vol.join("..2026_11_30_02/plugin.wasm").as_path())
        );
        std::fs::remove_dir_all(vol).unwrap();
    }

    #[test]
    fn a_missing_directory_is_watched_for_in_its_parent() {
        let base = temp_dir("missing");
        let r = resolve(&base.join("plugins/./current.wasm"));
        assert_eq!(r.target, None);
        assert_eq!(looked_in(&r, &base), ["plugins"]);
        assert!(r.concerns(&base.join("plugins")));

        std::fs::create_dir(base.join("plugins")).unwrap();
        let r = resolve(&base.join("plugins/current.wasm"));
        assert_eq!(
            r.target.as_deref(),
            Some(base.join("plugins/current.wasm").as_path()),
            "a missing file is still a target"
        );
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn relative_links_and_dotdot_resolve_physically() {
        let base = temp_dir("links");
        std::fs::create_dir_all(base.join("releases/r1/plugins")).unwrap();
        std::fs::write(base.join("releases/r1/plugins/h.wasm"), b"x").unwrap();
        symlink("releases/r1", base.join("current")).unwrap();
        let r = resolve(&base.join("current/plugins/../plugins/h.wasm"));
        assert_eq!(
            r.target.as_deref(),
            Some(base.join("releases/r1/plugins/h.wasm").as_path())
        );
        symlink("loop", base.join("loop")).unwrap();
        assert_eq!(resolve(&base.join("loop/h.wasm")).target, None);
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn the_recheck_finds_changes_no_event_announced() {
        let base = temp_dir("recheck");
        for r in ["r1", "r2"] {
            std::fs::create_dir(base.join(r)).unwrap();
            std::fs::write(base.join(r).join("h.wasm"), r).unwrap();
        }
        symlink("r1", base.join("current")).unwrap();
        let path = base.join("current/h.wasm");
        // A watcher that reports nothing, as inotify does for changes made by
        // another machine on a network file system.
        let blind = notify::recommended_watcher(|_: notify::Result<Event>| {}).unwrap();
        let mut w = Watching {
            watcher: blind,
            plugins: vec![Watched {
                signal: Arc::default(),
                pipeline: "p".into(),
                resolution: resolve(&path),
                file: file::identity(&path),
                path: path.clone(),
            }],
            armed: HashMap::new(),
            unwatchable: HashSet::new(),
        };
        w.rearm(&[true]);
        assert!(w.armed.contains_key(&base.join("r1")));
        let check = |w: &mut Watching| {
            let mut dirty = [Dirty::default()];
            w.recheck(&mut dirty);
            (dirty[0].resolve, dirty[0].poke)
        };
        assert_eq!(check(&mut w), (false, false), "nothing changed");

        // Rewritten in place: same inode, new size and times.
        std::fs::write(base.join("r1/h.wasm"), "version 2").unwrap();
        assert_eq!(check(&mut w), (false, true));
        w.plugins[0].file = file::identity(&path);

        // The release link flipped: the path leads elsewhere.
        symlink("r2", base.join("current.tmp")).unwrap();
        std::fs::rename(base.join("current.tmp"), base.join("current")).unwrap();
        assert_eq!(check(&mut w), (true, true));
        w.rearm(&[true]);
        assert!(w.armed.contains_key(&base.join("r2")));
        assert!(
            !w.armed.contains_key(&base.join("r1")),
            "the old release is let go"
        );

        // A directory on the way replaced by another under the same name is
        // watched anew (the old watch followed the old inode).
        std::fs::rename(base.join("r2"), base.join("r2.old")).unwrap();
        std::fs::create_dir(base.join("r2")).unwrap();
        std::fs::copy(base.join("r2.old/h.wasm"), base.join("r2/h.wasm")).unwrap();
        let before = w.armed[&base.join("r2")];
        w.rearm(&[false]);
        assert_ne!(w.armed[&base.join("r2")], before);
        std::fs::remove_dir_all(base).unwrap();
    }
}
