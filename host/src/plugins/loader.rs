//! Loading a plugin file: read, fingerprint, compile, check against the
//! `warren:plugin` world. Done once per file version, never per message.
//!
//! Compiled code is shared by digest: pipelines running the same plugin file
//! (or a reload to bytes already loaded) use one compiled component instead
//! of one each, which for a JavaScript or Python plugin is tens of MiB per
//! copy. The loader keeps only weak references, so code no pipeline uses any
//! more is freed with its last [`LoadedPlugin`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::cache::{CacheOutcome, CompiledCache, DEFAULT_CACHE_MAX_MB};
use crate::runtime::{
    HostState, IdleInstances, Invocation, InvokeLimits, Message, PluginPre, WasmRuntime,
};

const COMPONENT_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
const CORE_MODULE_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];

/// A compiled plugin ready to be instantiated per message.
pub struct LoadedPlugin {
    name: String,
    path: PathBuf,
    digest: String,
    /// `version()`, shared with every invocation's log context.
    version: Arc<str>,
    code: Arc<Compiled>,
    /// Instances kept between messages under `instance = "reuse"`. Per
    /// loaded version, not per compiled code: pipelines sharing code never
    /// share an instance, and a reload starts with none.
    idle: Arc<IdleInstances>,
    load_time: Duration,
    source: CacheOutcome,
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

/// Compiled, linked code of one plugin version, shared by every
/// [`LoadedPlugin`] of that version.
struct Compiled {
    pre: PluginPre<HostState>,
}

/// One slot per digest. Its lock is held while that digest compiles, so two
/// pipelines (or reloads) asking for the same bytes at once compile them once.
type CodeSlot = Arc<Mutex<Weak<Compiled>>>;

/// Turns plugin files into [`LoadedPlugin`]s: the runtime, the optional
/// compiled cache, and the compiled code already loaded. Cheap to clone; clones
/// share the loaded code.
#[derive(Clone)]
pub struct PluginLoader {
    runtime: WasmRuntime,
    cache: Option<CompiledCache>,
    loaded: Arc<Mutex<HashMap<String, CodeSlot>>>,
}

impl std::fmt::Debug for PluginLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginLoader")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// A poisoned lock only means a thread panicked while holding it; the map and
/// weak references it guards are never left half-updated.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PluginLoader {
    /// A loader compiling with `runtime`, caching in `cache_dir` when given
    /// (with the default size cap).
    pub fn new(runtime: WasmRuntime, cache_dir: Option<&Path>) -> Result<Self> {
        Self::with_cache(
            runtime,
            cache_dir,
            DEFAULT_CACHE_MAX_MB.saturating_mul(1 << 20),
        )
    }

    /// A loader caching in `cache_dir` when given, holding the directory to at
    /// most `cache_max_bytes` (0: no cap). Fails if the cache directory cannot
    /// be created or is not private to warren's user.
    pub fn with_cache(
        runtime: WasmRuntime,
        cache_dir: Option<&Path>,
        cache_max_bytes: u64,
    ) -> Result<Self> {
        let cache = cache_dir
            .map(|d| CompiledCache::new(d, runtime.engine(), cache_max_bytes))
            .transpose()?;
        Ok(Self {
            runtime,
            cache,
            loaded: Arc::default(),
        })
    }

    /// The runtime plugins are compiled for.
    pub fn runtime(&self) -> &WasmRuntime {
        &self.runtime
    }

    /// The compiled cache, when one is in use.
    pub fn cache(&self) -> Option<&CompiledCache> {
        self.cache.as_ref()
    }

    /// Load the component at `path`.
    pub fn load(&self, path: &Path) -> Result<LoadedPlugin> {
        let bytes = super::file::read_plugin(path)
            .map(|f| f.bytes)
            .with_context(|| format!("loading plugin {}: cannot read the file", path.display()))?;
        self.load_bytes(path, &bytes)
    }

    /// Load from bytes already read; `path` names the plugin.
    pub fn load_bytes(&self, path: &Path, bytes: &[u8]) -> Result<LoadedPlugin> {
        LoadedPlugin::from_bytes(self, path, bytes)
            .with_context(|| format!("loading plugin {}", path.display()))
    }

    /// The compiled code for `bytes`: already loaded, from the cache, or
    /// compiled now.
    fn compiled(&self, digest: &str, bytes: &[u8]) -> Result<(Arc<Compiled>, CacheOutcome)> {
        let slot = {
            let mut loaded = lock(&self.loaded);
            // Forget versions nobody uses; a slot locked right now is loading.
            loaded.retain(|_, s| {
                Arc::strong_count(s) > 1 || s.try_lock().map_or(true, |w| w.strong_count() > 0)
            });
            loaded.entry(digest.to_owned()).or_default().clone()
        };
        let mut code = lock(&slot);
        if let Some(shared) = code.upgrade() {
            return Ok((shared, CacheOutcome::Shared));
        }
        let runtime = &self.runtime;
        let (component, source) = match &self.cache {
            Some(cache) => cache.get_or_compile(runtime.engine(), digest, bytes, &|| self.in_use()),
            None => runtime.compile(bytes).map(|c| (c, CacheOutcome::Compiled)),
        }
        .context("compiling the component")?;
        let compiled = Arc::new(Compiled {
            pre: runtime.prepare(&component)?,
        });
        *code = Arc::downgrade(&compiled);
        Ok((compiled, source))
    }

    /// Digests of the versions loaded and still used (or loading right now).
    fn in_use(&self) -> HashSet<String> {
        lock(&self.loaded)
            .iter()
            // Never blocks: a slot locked now is loading, so in use.
            .filter(|(_, s)| s.try_lock().map_or(true, |w| w.strong_count() > 0))
            .map(|(d, _)| d.clone())
            .collect()
    }
}

/// SHA-256 of `bytes`, hex: a plugin version's identity.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
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
        let (code, source) = loader.compiled(&digest, bytes)?;
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
            code,
            idle: Arc::default(),
            load_time: start.elapsed(),
            source,
        })
    }

    /// Where the compiled code came from.
    pub fn source(&self) -> CacheOutcome {
        self.source
    }

    /// Whether `other` runs the very same compiled code (not a copy).
    pub fn shares_code_with(&self, other: &LoadedPlugin) -> bool {
        Arc::ptr_eq(&self.code, &other.code)
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

    /// The compiled component, for checks against a pipeline's limits.
    pub(crate) fn component(&self) -> &wasmtime::component::Component {
        self.code.pre.instance_pre().component()
    }

    /// How long loading took (compiling, or reading the cache, plus checking;
    /// for shared code, waiting for the load it shares).
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Run `handle` once in a fresh instance (or, when
    /// `limits.messages_per_instance` is above 1, in an idle one of this
    /// version's, if any). Blocking: call it off the async executor. The
    /// instance is released (or made idle again) when the returned
    /// [`Invocation`] is dropped, so a caller can act on the outcome first.
    pub fn invoke(
        &self,
        msg: &Message,
        config: Arc<BTreeMap<String, String>>,
        pipeline: Arc<str>,
        limits: InvokeLimits,
    ) -> Invocation {
        self.invoke_with_http(msg, config, pipeline, limits, None)
    }

    /// [`Self::invoke`] with the pipeline's outbound HTTP grant (`None`:
    /// every `wasi:http` request is denied).
    pub fn invoke_with_http(
        &self,
        msg: &Message,
        config: Arc<BTreeMap<String, String>>,
        pipeline: Arc<str>,
        limits: InvokeLimits,
        http: Option<Arc<crate::outbound::HttpPolicy>>,
    ) -> Invocation {
        let log = crate::runtime::LogContext {
            pipeline,
            plugin_version: self.version.clone(),
        };
        crate::runtime::invoke(&self.code.pre, &self.idle, msg, config, log, limits, http)
    }
}
