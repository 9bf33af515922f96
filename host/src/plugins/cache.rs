//! On-disk cache of compiled components, keyed by the component's SHA-256 and
//! the engine's compilation settings, so restarts and reloads of a known
//! version skip Cranelift.
//!
//! Loading native code from disk is only as safe as the file, so an entry is
//! never trusted blindly: next to `<key>.cwasm` lies `<key>.sha256`, the digest
//! of the compiled bytes, checked before wasmtime sees them; wasmtime then
//! checks version and settings itself. An entry failing either check is
//! deleted and rebuilt. Entries are written to a temporary file and renamed,
//! so a crash mid-write leaves no half entry.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::loader::hex;

/// Where a component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Compiled now; no cache configured.
    Compiled,
    /// Compiled now and stored.
    Miss,
    /// Loaded from the cache.
    Hit,
    /// A bad entry was found, discarded and replaced.
    Recovered,
}

impl CacheOutcome {
    /// Metric / log label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Compiled => "compiled",
            Self::Miss => "miss",
            Self::Hit => "hit",
            Self::Recovered => "recovered",
        }
    }
}

/// The cache directory for one engine configuration.
#[derive(Debug, Clone)]
pub struct CompiledCache {
    dir: PathBuf,
    engine_key: String,
}

impl CompiledCache {
    /// A cache in `dir` (created if missing) for components compiled by `engine`.
    pub fn new(dir: &Path, engine: &Engine) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the compiled cache {}", dir.display()))?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(Self {
            dir: dir.to_path_buf(),
            engine_key: format!("{:016x}", h.finish()),
        })
    }

    fn paths(&self, digest: &str) -> (PathBuf, PathBuf) {
        let stem = format!("{digest}-{}", self.engine_key);
        (
            self.dir.join(format!("{stem}.cwasm")),
            self.dir.join(format!("{stem}.sha256")),
        )
    }

    /// The compiled component for `bytes` (whose SHA-256 is `digest`).
    pub fn get_or_compile(
        &self,
        engine: &Engine,
        digest: &str,
        bytes: &[u8],
    ) -> Result<(Component, CacheOutcome)> {
        let (code_path, sum_path) = self.paths(digest);
        let mut outcome = CacheOutcome::Miss;
        if code_path.exists() {
            match load_verified(engine, &code_path, &sum_path) {
                Ok(c) => return Ok((c, CacheOutcome::Hit)),
                Err(e) => {
                    tracing::warn!(entry = %code_path.display(), error = %format!("{e:#}"), "discarding a bad compiled-cache entry");
                    let _ = std::fs::remove_file(&code_path);
                    let _ = std::fs::remove_file(&sum_path);
                    outcome = CacheOutcome::Recovered;
                }
            }
        }
        let component = Component::new(engine, bytes).map_err(anyhow::Error::from)?;
        if let Err(e) = store(&component, &code_path, &sum_path) {
            // A read-only or full disk costs the next start a compile, nothing more.
            tracing::warn!(dir = %self.dir.display(), error = %format!("{e:#}"), "could not write the compiled cache");
        }
        Ok((component, outcome))
    }
}

fn load_verified(engine: &Engine, code_path: &Path, sum_path: &Path) -> Result<Component> {
    let code = std::fs::read(code_path).context("reading the entry")?;
    let expected = std::fs::read_to_string(sum_path).context("reading the entry's checksum")?;
    let actual = hex(&Sha256::digest(&code));
    anyhow::ensure!(
        expected.trim() == actual,
        "checksum mismatch (corrupt entry)"
    );
    deserialize(engine, &code)
}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, code: &[u8]) -> Result<Component> {
    // SAFETY: wasmtime requires that the bytes were produced by `serialize` of a
    // compatible engine and not tampered with. They were written by `store`
    // below and their SHA-256 matched the checksum written alongside them;
    // wasmtime itself rejects bytes from another version or configuration.
    let component = unsafe { Component::deserialize(engine, code) };
    component
        .map_err(anyhow::Error::from)
        .context("wasmtime rejected the entry")
}

fn store(component: &Component, code_path: &Path, sum_path: &Path) -> Result<()> {
    let code = component.serialize().map_err(anyhow::Error::from)?;
    let sum = hex(&Sha256::digest(&code));
    write_atomically(code_path, &code)?;
    write_atomically(sum_path, sum.as_bytes())
}

/// Write to a name no other writer (process or thread) uses, then rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))
}
