//! Loading a plugin file: read, fingerprint, compile, check against the
//! `warren:plugin` world. Done once per file version, never per message.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::cache::{CacheOutcome, CompiledCache};
use crate::runtime::{HostState, Invocation, InvokeLimits, Message, PluginPre, Runtime};

const COMPONENT_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
const CORE_MODULE_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
const WASM_PAGE_BYTES: u64 = 64 << 10;

/// A compiled plugin ready to be instantiated per message.
pub struct LoadedPlugin {
    name: String,
    path: PathBuf,
    digest: String,
    /// `version()`, shared with every invocation's log context.
    version: Arc<str>,
    pre: PluginPre<HostState>,
    compile_time: Duration,
    source: CacheOutcome,
    /// Largest initial size of the component's linear memories, in bytes
    /// (`None` when it cannot be known statically).
    initial_memory: Option<u64>,
    /// Keeps the engine's epoch ticker running while this version can be invoked.
    _runtime: Runtime,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

/// Turns plugin files into [`LoadedPlugin`]s: the runtime plus the optional
/// compiled cache. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PluginLoader {
    runtime: Runtime,
    cache: Option<CompiledCache>,
}

impl PluginLoader {
    /// A loader compiling with `runtime`, caching in `cache_dir` when given.
    pub fn new(runtime: Runtime, cache_dir: Option<&Path>) -> Result<Self> {
        let cache = cache_dir
            .map(|d| CompiledCache::new(d, runtime.engine()))
            .transpose()?;
        Ok(Self { runtime, cache })
    }

    /// The runtime plugins are compiled for.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Load the component at `path`.
    pub fn load(&self, path: &Path) -> Result<LoadedPlugin> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("loading plugin {}: cannot read the file", path.display()))?;
        self.load_bytes(path, &bytes)
    }

    /// Load from bytes already read; `path` names the plugin.
    pub fn load_bytes(&self, path: &Path, bytes: &[u8]) -> Result<LoadedPlugin> {
        LoadedPlugin::from_bytes(self, path, bytes)
            .with_context(|| format!("loading plugin {}", path.display()))
    }
}

/// SHA-256 of `bytes`, hex: a plugin version's identity.
pub fn digest_of(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

impl LoadedPlugin {
    fn from_bytes(loader: &PluginLoader, path: &Path, bytes: &[u8]) -> Result<Self> {
        match bytes.get(..8) {
            Some(h) if h == COMPONENT_HEADER => {}
            Some(h) if h == CORE_MODULE_HEADER => bail!(
                "this is a core WebAssembly module, not a component: build for wasm32-wasip2 \
                 or wrap it with `wasm-tools component new`"
            ),
            _ if bytes.is_empty() => bail!("the file is empty"),
            _ => bail!(
                "not a WebAssembly component (bad header, {} bytes)",
                bytes.len()
            ),
        }
        let digest = digest_of(bytes);
        let start = Instant::now();
        let runtime = &loader.runtime;
        let (component, source) = match &loader.cache {
            Some(cache) => cache.get_or_compile(runtime.engine(), &digest, bytes),
            None => runtime.compile(bytes).map(|c| (c, CacheOutcome::Compiled)),
        }
        .context("compiling the component")?;
        // Memories use 64 KiB pages: the engine does not enable custom page sizes.
        let initial_memory = component
            .resources_required()
            .and_then(|r| r.max_initial_memory_size)
            .map(|pages| pages.saturating_mul(WASM_PAGE_BYTES));
        let pre = runtime.prepare(&component)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into());
        let version = digest.get(..12).unwrap_or(&digest).into();
        Ok(Self {
            name,
            path: path.to_path_buf(),
            digest,
            version,
            pre,
            compile_time: start.elapsed(),
            source,
            initial_memory,
            _runtime: runtime.clone(),
        })
    }

    /// Whether the compiled code came from the cache.
    pub fn source(&self) -> CacheOutcome {
        self.source
    }

    /// Plugin name: the file name without extension.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// SHA-256 of the component bytes, hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Short version: the first 12 hex digits of the digest.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// How long loading took (compiling, or reading the cache, plus checking).
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// The most memory any of the plugin's linear memories starts with, in
    /// bytes: a memory limit below it fails every instantiation. `None` when
    /// the component has no memory or does not say statically.
    pub fn initial_memory_bytes(&self) -> Option<u64> {
        self.initial_memory
    }

    /// Run `handle` once in a fresh instance. Blocking: call it off the async
    /// executor. The instance is released when the returned [`Invocation`] is
    /// dropped, so a caller can act on the outcome first.
    pub fn invoke(
        &self,
        msg: &Message,
        config: Arc<BTreeMap<String, String>>,
        pipeline: Arc<str>,
        limits: InvokeLimits,
    ) -> Invocation {
        let log = crate::runtime::LogContext {
            pipeline,
            plugin_version: self.version.clone(),
        };
        crate::runtime::invoke(&self.pre, msg, config, log, limits)
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
