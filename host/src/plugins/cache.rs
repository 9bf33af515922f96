//! On-disk cache of compiled components, so restarts and reloads of a known
//! plugin version skip Cranelift (seconds for a JavaScript or Python plugin).
//!
//! # Entries
//!
//! One file per plugin version and engine configuration:
//! `<plugin sha256>-<engine hash, 16 hex>.cwasm`, holding a fixed header and
//! then the bytes of wasmtime's `Component::serialize`:
//!
//! | bytes | content |
//! |---|---|
//! | 16 | magic and format version, `warren-cwasm-v1\n` |
//! | 32 | SHA-256 of the plugin (`.wasm`) the code was compiled from |
//! | 32 | engine hash: SHA-256 of the format version and wasmtime's `precompile_compatibility_hash` (target, compiler flags, tunables, wasm features, wasmtime version) |
//! | 32 | SHA-256 of the compiled bytes that follow |
//! | 8 | length of the compiled bytes, little endian |
//!
//! Engine settings that do not change the compiled code (the pooling
//! allocator's sizes, and with them `memory_mib` and `concurrency`) are not in
//! the hash, so configurations that differ only in those share entries;
//! configurations whose code differs get different names and coexist.
//!
//! # Before wasmtime sees the bytes
//!
//! `Component::deserialize` maps the bytes as native code: a bad entry is not a
//! wasm trap but arbitrary code in warren's process, outside the sandbox. So an
//! entry is loaded only if, in this order:
//!
//! 1. the cache directory belongs to warren's effective user and no one else can
//!    write it (no group or other write bit), and every directory above it
//!    belongs to root or that user and is not writable by others unless sticky
//!    (like `/tmp`), so no one else can replace the directory either. A
//!    directory failing this is refused with an error naming it and warren
//!    runs without the cache (compiling at every start), as when the directory
//!    cannot be created. warren creates the directory with mode 0700;
//! 2. the entry is a regular file (not a symlink) owned by the same user and
//!    writable by no one else;
//! 3. the header names this plugin's digest and this engine's full hash, and
//!    the compiled bytes have the recorded length and SHA-256.
//!
//! An entry failing 2 or 3 (corrupt, truncated, or bound to another plugin
//! than its name says, e.g. copied over another entry) is deleted and rebuilt.
//! An entry that passes them but that wasmtime still rejects is left alone
//! (it may suit another process) and the plugin is compiled.
//!
//! # Threat model
//!
//! The header is not a secret-keyed MAC: whoever can write the directory can
//! also write a self-consistent header for any code. A key would have to live
//! where that same user could read it, so it would add nothing. The protection
//! against other users is the ownership and permission check (1, 2); the ones
//! who pass it (warren's own user and root) can replace the plugin files or
//! warren itself anyway. The binding (3) protects against everything short of
//! deliberate forgery: entries copied or restored under another name, entries
//! of other engine settings or wasmtime versions, torn writes and corruption.
//!
//! # Housekeeping
//!
//! Entries are written under a temporary name and renamed, so a crash
//! mid-write leaves no half entry; a failed write (a full disk) removes its
//! temporary file, and temporary files older than an hour (left by a crash)
//! are removed when the cache is opened. A hit touches the entry's mtime; when
//! the directory holds more than the size cap, the least recently used entries
//! are deleted, except those this process has loaded and still uses.

use std::collections::HashSet;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Default size cap of the cache directory, in MiB (`[runtime] cache_max_mb`):
/// room for the compiled code of a few dozen JavaScript or Python plugin
/// versions (about 35-40 MiB each) or hundreds of Rust ones.
pub const DEFAULT_CACHE_MAX_MB: u64 = 1024;

const MAGIC: &[u8; 16] = b"warren-cwasm-v1\n";
const HEADER_LEN: usize = 16 + 32 + 32 + 32 + 8;
/// `<64 hex>-<16 hex>`: the part of a file name that marks it as ours.
const STEM_LEN: usize = 64 + 1 + 16;
/// A temporary file this old was left by a crash, not by a write in progress.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// Where a component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Compiled now; no cache configured (or the cache was refused).
    Compiled,
    /// Compiled now and stored.
    Miss,
    /// Loaded from the cache.
    Hit,
    /// A bad entry was found, discarded and replaced.
    Recovered,
    /// Already loaded for another pipeline or an earlier load: the same
    /// compiled code, shared.
    Shared,
}

impl CacheOutcome {
    /// Metric / log label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Compiled => "compiled",
            Self::Miss => "miss",
            Self::Hit => "hit",
            Self::Recovered => "recovered",
            Self::Shared => "shared",
        }
    }
}

/// The cache directory, for one engine configuration.
#[derive(Debug, Clone)]
pub struct CompiledCache {
    dir: PathBuf,
    engine_hash: [u8; 32],
    /// First 16 hex digits of `engine_hash`, in entry names.
    engine_key: String,
    /// Size cap in bytes; 0 = none.
    max_bytes: u64,
    /// Effective user id: the only owner trusted for the directory and entries.
    uid: u32,
}

/// What looking an entry up found.
enum Lookup {
    Absent,
    Hit(Component),
    /// Corrupt, or not what its name says: delete and rebuild.
    Bad(anyhow::Error),
    /// Passed every check but wasmtime (or the file system) refused it: leave it.
    Unusable(anyhow::Error),
}

impl CompiledCache {
    /// A cache in `dir` (created, mode 0700, if missing) for components
    /// compiled by `engine`, holding at most `max_bytes` (0: no cap). Fails if
    /// the directory cannot be created or other users could write it.
    pub fn new(dir: &Path, engine: &Engine, max_bytes: u64) -> Result<Self> {
        let uid = perms::effective_uid()?;
        perms::create_private_dir(dir)
            .with_context(|| format!("creating the compiled cache {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving the compiled cache {}", dir.display()))?;
        perms::check_dir(&dir, uid)?;
        let engine_hash = engine_hash(engine);
        let engine_key = hex(engine_hash.get(..8).unwrap_or(&engine_hash));
        let cache = Self {
            dir,
            engine_hash,
            engine_key,
            max_bytes,
            uid,
        };
        cache.remove_stale_temp_files();
        Ok(cache)
    }

    /// The (canonical) cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry file for the plugin whose SHA-256 is `digest`.
    pub fn entry_path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}-{}.cwasm", self.engine_key))
    }

    /// The compiled component for `bytes` (whose SHA-256 is `digest`).
    /// `in_use` lists the digests this process holds loaded; their entries are
    /// never evicted.
    pub fn get_or_compile(
        &self,
        engine: &Engine,
        digest: &str,
        bytes: &[u8],
        in_use: &dyn Fn() -> HashSet<String>,
    ) -> Result<(Component, CacheOutcome)> {
        // Checked at every load, not only at start: permissions may change.
        if let Err(e) = perms::check_dir(&self.dir, self.uid) {
            tracing::warn!(error = %format!("{e:#}"), "compiled cache refused; compiling without it");
            let component = Component::new(engine, bytes).map_err(anyhow::Error::from)?;
            return Ok((component, CacheOutcome::Compiled));
        }
        let path = self.entry_path(digest);
        let (outcome, store) = match self.lookup(engine, digest, &path) {
            Lookup::Hit(component) => {
                self.enforce_cap(&path, in_use);
                return Ok((component, CacheOutcome::Hit));
            }
            Lookup::Absent => (CacheOutcome::Miss, true),
            Lookup::Bad(e) => {
                tracing::warn!(entry = %path.display(), error = %format!("{e:#}"), "discarding a bad compiled-cache entry");
                // The rename in `store` replaces it too; removing it now keeps a
                // failed store from leaving it behind.
                let _ = std::fs::remove_file(&path);
                (CacheOutcome::Recovered, true)
            }
            Lookup::Unusable(e) => {
                tracing::warn!(entry = %path.display(), error = %format!("{e:#}"), "skipping a compiled-cache entry this engine cannot use; compiling");
                (CacheOutcome::Miss, false)
            }
        };
        let component = Component::new(engine, bytes).map_err(anyhow::Error::from)?;
        if store && let Err(e) = self.store(digest, &component, &path) {
            // A read-only or full disk costs the next start a compile, nothing more.
            tracing::warn!(dir = %self.dir.display(), error = %format!("{e:#}"), "could not write the compiled cache");
        }
        self.enforce_cap(&path, in_use);
        Ok((component, outcome))
    }

    fn lookup(&self, engine: &Engine, digest: &str, path: &Path) -> Lookup {
        let (file, code) = match self.read_verified(digest, path) {
            Ok(Some(entry)) => entry,
            Ok(None) => return Lookup::Absent,
            Err(EntryError::Bad(e)) => return Lookup::Bad(e),
            Err(EntryError::Unusable(e)) => return Lookup::Unusable(e),
        };
        match deserialize(engine, code.get(HEADER_LEN..).unwrap_or_default()) {
            Ok(c) => {
                // Recency for eviction; a read-only disk just loses it.
                let _ = file.set_modified(SystemTime::now());
                Lookup::Hit(c)
            }
            Err(e) => Lookup::Unusable(e),
        }
    }

    /// The entry's bytes (header included) if it passes every check before
    /// wasmtime; `None` if there is no entry.
    fn read_verified(
        &self,
        digest: &str,
        path: &Path,
    ) -> std::result::Result<Option<(File, Vec<u8>)>, EntryError> {
        let link_meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(EntryError::Unusable(anyhow::Error::from(e))),
        };
        if !link_meta.file_type().is_file() {
            return Err(EntryError::Bad(anyhow::anyhow!(
                "refusing {}: not a regular file",
                path.display()
            )));
        }
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(EntryError::Unusable(anyhow::Error::from(e))),
        };
        let meta = file
            .metadata()
            .map_err(|e| EntryError::Unusable(anyhow::Error::from(e)))?;
        // What was opened must be what was checked (no symlink swapped in).
        perms::same_file(&link_meta, &meta)
            .and_then(|()| perms::check_entry(path, &meta, self.uid))
            .map_err(EntryError::Bad)?;
        let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        file.read_to_end(&mut bytes)
            .map_err(|e| EntryError::Unusable(anyhow::Error::from(e)))?;
        self.check_header(digest, &bytes).map_err(EntryError::Bad)?;
        Ok(Some((file, bytes)))
    }

    fn check_header(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let (header, code) = bytes
            .split_at_checked(HEADER_LEN)
            .context("truncated entry (shorter than its header)")?;
        let (magic, rest) = header.split_at(16);
        let (plugin, rest) = rest.split_at(32);
        let (engine, rest) = rest.split_at(32);
        let (code_sum, len) = rest.split_at(32);
        if magic != MAGIC {
            bail!("not a warren cache entry of this format");
        }
        let plugin = hex(plugin);
        if plugin != digest {
            bail!("compiled from another plugin (sha256 {plugin}), not from {digest}");
        }
        if engine != self.engine_hash {
            bail!("compiled for other engine settings than its name says");
        }
        let len = <[u8; 8]>::try_from(len).map(u64::from_le_bytes)?;
        if u64::try_from(code.len()).ok() != Some(len) {
            bail!(
                "truncated entry ({} bytes of compiled code, header says {len})",
                code.len()
            );
        }
        if Sha256::digest(code).as_slice() != code_sum {
            bail!("checksum mismatch (corrupt entry)");
        }
        Ok(())
    }

    fn store(&self, digest: &str, component: &Component, path: &Path) -> Result<()> {
        let code = component.serialize().map_err(anyhow::Error::from)?;
        let len = u64::try_from(code.len()).context("compiled code too large")?;
        let total = len.saturating_add(HEADER_LEN as u64);
        if self.max_bytes != 0 && total > self.max_bytes {
            tracing::warn!(entry = %path.display(), mib = total >> 20, max_mib = self.max_bytes >> 20,
                "compiled plugin larger than cache_max_mb; not cached");
            return Ok(());
        }
        write_atomically(path, &[&self.header(digest, &code)?, &code])
    }

    /// The header binding `code` to the plugin `digest` and this engine.
    fn header(&self, digest: &str, code: &[u8]) -> Result<Vec<u8>> {
        let plugin = hex_to_bytes(digest).context("plugin digest is not SHA-256 hex")?;
        let len = u64::try_from(code.len()).context("compiled code too large")?;
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&plugin);
        header.extend_from_slice(&self.engine_hash);
        header.extend_from_slice(&Sha256::digest(code));
        header.extend_from_slice(&len.to_le_bytes());
        Ok(header)
    }

    /// Delete least recently used entries (of any engine) until the directory
    /// holds at most `max_bytes`, sparing `keep` and the entries of plugins
    /// this process uses.
    fn enforce_cap(&self, keep: &Path, in_use: &dyn Fn() -> HashSet<String>) {
        if self.max_bytes == 0 {
            return;
        }
        let mut entries = Vec::new();
        let mut total: u64 = 0;
        for (path, kind, meta) in self.our_files() {
            if kind == FileKind::Entry {
                total = total.saturating_add(meta.len());
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                entries.push((used, path, meta.len()));
            }
        }
        if total <= self.max_bytes {
            return;
        }
        let in_use = in_use();
        entries.sort();
        for (_, path, len) in entries {
            if total <= self.max_bytes {
                break;
            }
            let digest = file_name(&path).and_then(|n| n.get(..64)).unwrap_or("");
            if path == keep || in_use.contains(digest) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(entry = %path.display(), "evicted a least recently used compiled-cache entry");
                    total = total.saturating_sub(len);
                }
                // Another process sharing the directory evicted it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    total = total.saturating_sub(len);
                }
                Err(e) => {
                    tracing::warn!(entry = %path.display(), error = %e, "could not evict a compiled-cache entry");
                }
            }
        }
        if total > self.max_bytes {
            tracing::warn!(dir = %self.dir.display(), mib = total >> 20, max_mib = self.max_bytes >> 20,
                "the compiled plugins in use exceed cache_max_mb; raise it to keep them all cached");
        }
    }

    fn remove_stale_temp_files(&self) {
        let now = SystemTime::now();
        for (path, kind, meta) in self.our_files() {
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok());
            if kind == FileKind::Temp && age.is_some_and(|a| a > STALE_TEMP_AGE) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Regular files in the directory whose names say warren wrote them; other
    /// files are never touched.
    fn our_files(&self) -> Vec<(PathBuf, FileKind, std::fs::Metadata)> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        dir.filter_map(|e| {
            let e = e.ok()?;
            let kind = classify(e.file_name().to_str()?)?;
            let meta = e.metadata().ok().filter(|m| m.file_type().is_file())?;
            Some((e.path(), kind, meta))
        })
        .collect()
    }
}

enum EntryError {
    Bad(anyhow::Error),
    Unusable(anyhow::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    /// An entry (this format or an older one, of any engine).
    Entry,
    /// A temporary file of a write.
    Temp,
}

/// `<64 hex>-<16 hex>.cwasm` (or `.sha256`, the checksum file of the previous
/// format) is an entry, `<64 hex>-<16 hex>.tmp.*` a temporary file.
fn classify(name: &str) -> Option<FileKind> {
    let (stem, rest) = name.split_at_checked(STEM_LEN)?;
    let (digest, key) = stem.split_at(64);
    let key = key.strip_prefix('-')?;
    let is_hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_hex(digest) || !is_hex(key) {
        return None;
    }
    match rest {
        ".cwasm" | ".sha256" => Some(FileKind::Entry),
        r if r.starts_with(".tmp.") => Some(FileKind::Temp),
        _ => None,
    }
}

fn file_name(path: &Path) -> Option<&str> {
    path.file_name()?.to_str()
}

fn hex_to_bytes(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks(2)) {
        *o = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// SHA-256 of the entry format and everything wasmtime checks when it
/// deserializes: stable across processes and Rust versions (unlike
/// `DefaultHasher`), and long enough to bind an entry to its engine.
fn engine_hash(engine: &Engine) -> [u8; 32] {
    struct Sha(Sha256);
    impl Hasher for Sha {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        fn finish(&self) -> u64 {
            let d = self.0.clone().finalize();
            let mut first = [0u8; 8];
            first.copy_from_slice(d.get(..8).unwrap_or(&[0; 8]));
            u64::from_le_bytes(first)
        }
    }
    let mut h = Sha(Sha256::new());
    h.write(MAGIC);
    engine.precompile_compatibility_hash().hash(&mut h);
    h.0.finalize().into()
}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, code: &[u8]) -> Result<Component> {
    // SAFETY: wasmtime requires bytes produced by `serialize` of a compatible
    // engine and not tampered with since. `read_verified` established that
    // they lie in a directory and file only warren's user (or root) can write,
    // under a header binding them to this plugin and this engine, with the
    // recorded SHA-256; see the module docs for what that does and does not
    // cover. wasmtime itself rejects bytes from another version or settings.
    let component = unsafe { Component::deserialize(engine, code) };
    component
        .map_err(anyhow::Error::from)
        .context("wasmtime rejected the entry")
}

/// Removes a temporary file unless it was renamed into place.
struct TempFile<'a>(Option<&'a Path>);

impl TempFile<'_> {
    /// It has been renamed: nothing to remove.
    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Write `parts` to a private file under a name no other writer (process or
/// thread) uses, then rename it to `path`. On any failure the temporary file
/// is removed. No fsync: an entry torn by a power cut fails its checksum and
/// is rebuilt.
fn write_atomically(path: &Path, parts: &[&[u8]]) -> Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    let mut guard = TempFile(Some(&tmp));
    let mut file =
        perms::create_private_file(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for part in parts {
        file.write_all(part)
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    drop(file);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    guard.keep();
    Ok(())
}

/// Ownership and permission checks: who could have written what we load.
#[cfg(unix)]
mod perms {
    use std::fs::{DirBuilder, File, Metadata, OpenOptions};
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    use std::path::Path;

    use anyhow::{Context, Result, bail};

    const GROUP_OTHER_WRITE: u32 = 0o022;
    const STICKY: u32 = 0o1000;

    /// The effective user id, from `/proc` (std has no `geteuid`).
    pub(super) fn effective_uid() -> Result<u32> {
        let status = std::fs::read_to_string("/proc/self/status")
            .context("reading /proc/self/status to learn warren's user id")?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|euid| euid.parse().ok())
            .context("no effective user id in /proc/self/status")
    }

    /// Create `dir` and its missing parents with mode 0700; an existing
    /// directory is left as it is (and checked by `check_dir`).
    pub(super) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
        DirBuilder::new().recursive(true).mode(0o700).create(dir)
    }

    /// A new file only its owner can read or write.
    pub(super) fn create_private_file(path: &Path) -> std::io::Result<File> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
    }

    /// `dir` (canonical) is a directory owned by `uid` that no one else can
    /// write, below directories no one else can rename it out of.
    pub(super) fn check_dir(dir: &Path, uid: u32) -> Result<()> {
        let refuse = |why: String| {
            anyhow::anyhow!(
                "refusing the compiled cache {}: {why}; anyone who can write there could make \
                 warren run their code outside the sandbox (make it a directory of warren's \
                 user with `chmod 700`, or choose another cache_dir)",
                dir.display()
            )
        };
        let meta = std::fs::metadata(dir).with_context(|| format!("checking {}", dir.display()))?;
        if !meta.is_dir() {
            return Err(refuse("not a directory".into()));
        }
        if meta.uid() != uid {
            return Err(refuse(format!(
                "it belongs to uid {}, not to warren's user (uid {uid})",
                meta.uid()
            )));
        }
        if meta.mode() & GROUP_OTHER_WRITE != 0 {
            return Err(refuse(format!(
                "its group or other users can write it (mode {:o})",
                meta.mode() & 0o7777
            )));
        }
        for parent in dir.ancestors().skip(1) {
            let m = std::fs::metadata(parent)
                .with_context(|| format!("checking {}", parent.display()))?;
            if m.uid() != 0 && m.uid() != uid {
                return Err(refuse(format!(
                    "its parent {} belongs to uid {}, who could replace it",
                    parent.display(),
                    m.uid()
                )));
            }
            // A sticky directory (like /tmp) lets others create files but not
            // rename or delete ours.
            if m.mode() & GROUP_OTHER_WRITE != 0 && m.mode() & STICKY == 0 {
                return Err(refuse(format!(
                    "its parent {} can be written by other users and is not sticky \
                     (mode {:o}), so they could replace it",
                    parent.display(),
                    m.mode() & 0o7777
                )));
            }
        }
        Ok(())
    }

    /// An entry about to be loaded: a regular file owned by `uid`, writable by
    /// no one else.
    pub(super) fn check_entry(path: &Path, meta: &Metadata, uid: u32) -> Result<()> {
        if !meta.is_file() {
            bail!("refusing {}: not a regular file", path.display());
        }
        if meta.uid() != uid {
            bail!(
                "refusing {}: it belongs to uid {}, not to warren's user (uid {uid})",
                path.display(),
                meta.uid()
            );
        }
        if meta.mode() & GROUP_OTHER_WRITE != 0 {
            bail!(
                "refusing {}: its group or other users can write it (mode {:o})",
                path.display(),
                meta.mode() & 0o7777
            );
        }
        Ok(())
    }

    /// The file opened is the one whose link was checked.
    pub(super) fn same_file(link: &Metadata, opened: &Metadata) -> Result<()> {
        if link.dev() != opened.dev() || link.ino() != opened.ino() {
            bail!("the entry changed while it was opened");
        }
        Ok(())
    }
}

/// Without Unix ownership and permissions the directory cannot be shown to be
/// private, so the cache is refused.
#[cfg(not(unix))]
mod perms {
    use std::fs::{File, Metadata};
    use std::path::Path;

    use anyhow::{Result, bail};

    pub(super) fn effective_uid() -> Result<u32> {
        bail!("the compiled cache needs Unix file ownership and permissions")
    }
    pub(super) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)
    }
    pub(super) fn create_private_file(path: &Path) -> std::io::Result<File> {
        File::create_new(path)
    }
    pub(super) fn check_dir(_: &Path, _: u32) -> Result<()> {
        effective_uid().map(|_| ())
    }
    pub(super) fn check_entry(_: &Path, _: &Metadata, _: u32) -> Result<()> {
        effective_uid().map(|_| ())
    }
    pub(super) fn same_file(_: &Metadata, _: &Metadata) -> Result<()> {
        Ok(())
    }
}

/// Lower-case hex of `bytes` (entry names and header fields).
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::plugins::digest_of;

    /// A fresh directory of its own under the system temp dir (not created).
    fn temp_path(what: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        std::env::temp_dir().join(format!(
            "warren-cache-unit.{what}.{}.{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// A small component importing one function named `name`: distinct code
    /// per name, recognisable after loading.
    fn plugin(name: &str) -> (String, Vec<u8>) {
        let text = format!("(component (import \"{name}\" (func)))").into_bytes();
        (digest_of(&text), text)
    }

    fn import_of(engine: &Engine, c: &Component) -> String {
        let ty = c.component_type();
        let (name, _) = ty.imports(engine).next().expect("an import");
        name.to_string()
    }

    fn none_in_use() -> HashSet<String> {
        HashSet::new()
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn set_age(p: &Path, age: Duration) {
        let f = File::options().write(true).open(p).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn a_stored_entry_is_private_and_hits_next_time() {
        let dir = temp_path("hit").join("nested");
        let engine = Engine::default();
        let cache = CompiledCache::new(&dir, &engine, 0).unwrap();
        assert_eq!(mode(&dir), 0o700, "created private");
        let (digest, bytes) = plugin("a");
        let (_, outcome) = cache
            .get_or_compile(&engine, &digest, &bytes, &none_in_use)
            .unwrap();
        assert_eq!(outcome, CacheOutcome::Miss);
        let entry = cache.entry_path(&digest);
        assert_eq!(mode(&entry), 0o600);
        assert_eq!(
            files(cache.dir()).len(),
            1,
            "one file per entry, no temp left"
        );
        let (c, outcome) = cache
            .get_or_compile(&engine, &digest, &bytes, &none_in_use)
            .unwrap();
        assert_eq!(outcome, CacheOutcome::Hit);
        assert_eq!(import_of(&engine, &c), "a");
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn an_entry_copied_over_another_plugins_name_is_rebuilt_not_run() {
        let dir = temp_path("swap");
        let engine = Engine::default();
        let cache = CompiledCache::new(&dir, &engine, 0).unwrap();
        let (da, a) = plugin("a");
        let (db, b) = plugin("b");
        cache
            .get_or_compile(&engine, &da, &a, &none_in_use)
            .unwrap();
        cache
            .get_or_compile(&engine, &db, &b, &none_in_use)
            .unwrap();
        // Both the code and its checksum travel with the copy: self-consistent.
        std::fs::copy(cache.entry_path(&db), cache.entry_path(&da)).unwrap();
        let (c, outcome) = cache
            .get_or_compile(&engine, &da, &a, &none_in_use)
            .unwrap();
        assert_eq!(outcome, CacheOutcome::Recovered);
        assert_eq!(import_of(&engine, &c), "a", "a's own code, not b's");
        let (c, outcome) = cache
            .get_or_compile(&engine, &da, &a, &none_in_use)
            .unwrap();
        assert_eq!(
            (outcome, import_of(&engine, &c).as_str()),
            (CacheOutcome::Hit, "a")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_and_truncated_entries_are_deleted_and_rebuilt() {
        let dir = temp_path("corrupt");
        let engine = Engine::default();
        let cache = CompiledCache::new(&dir, &engine, 0).unwrap();
        let (d, bytes) = plugin("a");
        cache
            .get_or_compile(&engine, &d, &bytes, &none_in_use)
            .unwrap();
        let entry = cache.entry_path(&d);
        let good = std::fs::read(&entry).unwrap();
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        for bad in [flipped, good[..good.len() / 2].to_vec(), b"junk".to_vec()] {
            std::fs::write(&entry, bad).unwrap();
            let (_, outcome) = cache
                .get_or_compile(&engine, &d, &bytes, &none_in_use)
                .unwrap();
            assert_eq!(outcome, CacheOutcome::Recovered);
            assert_eq!(std::fs::read(&entry).unwrap().len(), good.len(), "rebuilt");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_entry_wasmtime_rejects_is_skipped_not_deleted() {
        let dir = temp_path("reject");
        let engine = Engine::default();
        let cache = CompiledCache::new(&dir, &engine, 0).unwrap();
        let (d, bytes) = plugin("a");
        // A header that checks out over code wasmtime cannot use.
        let code = b"\x7fELF not really".to_vec();
        let entry = [cache.header(&d, &code).unwrap(), code].concat();
        let path = cache.entry_path(&d);
        std::fs::write(&path, &entry).unwrap();
        chmod(&path, 0o600);
        let (c, outcome) = cache
            .get_or_compile(&engine, &d, &bytes, &none_in_use)
            .unwrap();
        assert_eq!(
            (outcome, import_of(&engine, &c).as_str()),
            (CacheOutcome::Miss, "a")
        );
        assert_eq!(std::fs::read(&path).unwrap(), entry, "left as it was");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn engines_with_other_settings_keep_their_own_entries() {
        let dir = temp_path("engines");
        let plain = Engine::default();
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let epochs = Engine::new(&config).unwrap();
        let c1 = CompiledCache::new(&dir, &plain, 0).unwrap();
        let c2 = CompiledCache::new(&dir, &epochs, 0).unwrap();
        let (d, bytes) = plugin("a");
        assert_ne!(c1.entry_path(&d), c2.entry_path(&d));
        for (cache, engine) in [(&c1, &plain), (&c2, &epochs)] {
            let (_, o) = cache
                .get_or_compile(engine, &d, &bytes, &none_in_use)
                .unwrap();
            assert_eq!(o, CacheOutcome::Miss);
        }
        for (cache, engine) in [(&c1, &plain), (&c2, &epochs)] {
            let (_, o) = cache
                .get_or_compile(engine, &d, &bytes, &none_in_use)
                .unwrap();
            assert_eq!(o, CacheOutcome::Hit, "neither deleted the other's entry");
        }
        assert_eq!(files(&dir).len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_refused_with_its_path() {
        let engine = Engine::default();
        for m in [0o777, 0o770, 0o702] {
            let dir = temp_path("open");
            std::fs::create_dir(&dir).unwrap();
            chmod(&dir, m);
            let err = format!("{:#}", CompiledCache::new(&dir, &engine, 0).unwrap_err());
            assert!(err.contains(&dir.display().to_string()), "{err}");
            assert!(err.contains("can write it"), "{err}");
            std::fs::remove_dir_all(dir).unwrap();
        }
        // Private itself, but inside a directory anyone may rename it out of.
        let parent = temp_path("open-parent");
        let dir = parent.join("cache");
        std::fs::create_dir_all(&dir).unwrap();
        chmod(&parent, 0o777);
        let err = format!("{:#}", CompiledCache::new(&dir, &engine, 0).unwrap_err());
        assert!(err.contains("not sticky"), "{err}");
        // Sticky, like /tmp: others cannot rename what is not theirs.
        chmod(&parent, 0o1777);
        CompiledCache::new(&dir, &engine, 0).unwrap();
        std::fs::remove_dir_all(parent).unwrap();
    }

    #[test]
    fn a_directory_made_open_later_is_no_longer_used() {
        let dir = temp_path("later");
        let engine = Engine::default();
        let cache = CompiledCache::new(&dir, &engine, 0).unwrap();
        let (d, bytes) = plugin("a");
        cache
            .get_or_compile(&engine, &d, &bytes, &none_in_use)
            .unwrap();
        chmod(&dir, 0o777);
        let (_, o) = cache
            .get_or_compile(&engine, &d, &bytes, &none_in_use)
            .unwrap();
        assert_eq!(o, CacheOutcome::Compiled);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_entry_others_can_write_or_own_or_that_is_a_symlink_is_not_loaded() {
        let dir = temp_path("entry-perms");
        let engine = Engine::default();
        let cache = CompiledCache::new(&dir, &engine, 0).unwrap();
        let (d, bytes) = plugin("a");
        let path = cache.entry_path(&d);
        let hit = |cache: &CompiledCache| {
            cache
                .get_or_compile(&engine, &d, &bytes, &none_in_use)
                .unwrap()
                .1
        };
        assert_eq!(hit(&cache), CacheOutcome::Miss);
        chmod(&path, 0o666);
        assert_eq!(hit(&cache), CacheOutcome::Recovered);
        assert_eq!(mode(&path), 0o600, "replaced by a private entry");

        // The same bytes behind a symlink.
        let elsewhere = dir.join("elsewhere");
        std::fs::rename(&path, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        assert_eq!(hit(&cache), CacheOutcome::Recovered);
        assert!(!path.is_symlink());

        if perms::effective_uid().unwrap() == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            assert_eq!(hit(&cache), CacheOutcome::Recovered);
            assert_eq!(std::fs::metadata(&path).unwrap().uid(), 0);
        }
        assert_eq!(hit(&cache), CacheOutcome::Hit);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_least_recently_used_entries_go_first_but_not_those_in_use() {
        let dir = temp_path("lru");
        let engine = Engine::default();
        let uncapped = CompiledCache::new(&dir, &engine, 0).unwrap();
        let plugins: Vec<_> = ["a", "b", "c", "d"].into_iter().map(plugin).collect();
        for (d, bytes) in &plugins[..3] {
            uncapped
                .get_or_compile(&engine, d, bytes, &none_in_use)
                .unwrap();
        }
        let size = std::fs::metadata(uncapped.entry_path(&plugins[0].0))
            .unwrap()
            .len();
        // a is the oldest, then b, then c.
        for (i, (d, _)) in plugins[..3].iter().enumerate() {
            set_age(
                &uncapped.entry_path(d),
                Duration::from_secs(300 - 100 * i as u64),
            );
        }
        // Someone else's file is neither counted nor touched.
        std::fs::write(dir.join("notes.txt"), vec![0u8; 4 * size as usize]).unwrap();
        // A hit makes a the most recent.
        let (_, o) = uncapped
            .get_or_compile(&engine, &plugins[0].0, &plugins[0].1, &none_in_use)
            .unwrap();
        assert_eq!(o, CacheOutcome::Hit);

        // Room for three entries (they are about the same size): adding d
        // evicts b, the least recently used.
        let capped = CompiledCache::new(&dir, &engine, size * 3 + size / 2).unwrap();
        let (d, bytes) = &plugins[3];
        capped
            .get_or_compile(&engine, d, bytes, &none_in_use)
            .unwrap();
        let exists = |i: usize| capped.entry_path(&plugins[i].0).exists();
        assert_eq!(
            (0..4).map(exists).collect::<Vec<_>>(),
            [true, false, true, true]
        );
        assert!(dir.join("notes.txt").exists());

        // Room for two, c in use: a goes (older than c, d is the one loaded).
        let capped = CompiledCache::new(&dir, &engine, size * 2 + size / 2).unwrap();
        set_age(&capped.entry_path(&plugins[2].0), Duration::from_secs(1000));
        let in_use = || HashSet::from([plugins[2].0.clone()]);
        let (_, o) = capped.get_or_compile(&engine, d, bytes, &in_use).unwrap();
        assert_eq!(o, CacheOutcome::Hit);
        assert_eq!(
            (0..4).map(exists).collect::<Vec<_>>(),
            [false, false, true, true]
        );

        // Room for one, both in use: nothing more can go.
        let capped = CompiledCache::new(&dir, &engine, size + size / 2).unwrap();
        capped.get_or_compile(&engine, d, bytes, &in_use).unwrap();
        assert_eq!(
            (0..4).map(exists).collect::<Vec<_>>(),
            [false, false, true, true]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_entry_larger_than_the_cap_is_not_stored() {
        let dir = temp_path("too-big");
        let engine = Engine::default();
        let cache = CompiledCache::new(&dir, &engine, 64).unwrap();
        let (d, bytes) = plugin("a");
        let (_, o) = cache
            .get_or_compile(&engine, &d, &bytes, &none_in_use)
            .unwrap();
        assert_eq!(o, CacheOutcome::Miss);
        assert!(files(&dir).is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        let dir = temp_path("failed-write");
        std::fs::create_dir(&dir).unwrap();
        // Renaming a file over a non-empty directory fails after the write.
        let target = dir.join(format!("{}-{}.cwasm", "0".repeat(64), "1".repeat(16)));
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("x"), b"x").unwrap();
        assert!(write_atomically(&target, &[b"header", b"code"]).is_err());
        assert_eq!(files(&dir), [target.file_name().unwrap().to_string_lossy()]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn temporary_files_left_by_a_crash_are_removed_on_open() {
        let dir = temp_path("stale");
        std::fs::create_dir(&dir).unwrap();
        chmod(&dir, 0o700);
        let stem = format!("{}-{}", "a".repeat(64), "b".repeat(16));
        let stale = dir.join(format!("{stem}.tmp.1.0"));
        let fresh = dir.join(format!("{stem}.tmp.2.0"));
        let foreign = dir.join("unrelated.tmp.1.0");
        for p in [&stale, &fresh, &foreign] {
            std::fs::write(p, b"partial").unwrap();
            set_age(p, Duration::from_secs(2 * 3600));
        }
        set_age(&fresh, Duration::from_secs(1));
        CompiledCache::new(&dir, &Engine::default(), 0).unwrap();
        assert!(!stale.exists());
        assert!(fresh.exists(), "may be a write in progress");
        assert!(foreign.exists(), "not ours");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn names_are_classified_strictly() {
        let stem = format!("{}-{}", "a".repeat(64), "0123456789abcdef");
        assert_eq!(classify(&format!("{stem}.cwasm")), Some(FileKind::Entry));
        assert_eq!(classify(&format!("{stem}.sha256")), Some(FileKind::Entry));
        assert_eq!(classify(&format!("{stem}.tmp.12.3")), Some(FileKind::Temp));
        assert_eq!(classify(&format!("{stem}.txt")), None);
        assert_eq!(classify(&format!("x{}", &stem[1..])), None);
        assert_eq!(classify("short.cwasm"), None);
    }
}
