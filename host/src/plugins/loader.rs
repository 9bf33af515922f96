//! Loading a plugin file: read, fingerprint, compile, check against the
//! `warren:plugin` world. Done once per file version, never per message.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::runtime::{HostState, Invocation, InvokeLimits, Message, PluginPre, Runtime};

const COMPONENT_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
const CORE_MODULE_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];

/// A compiled plugin ready to be instantiated per message.
pub struct LoadedPlugin {
    name: String,
    path: PathBuf,
    digest: String,
    pre: PluginPre<HostState>,
    compile_time: Duration,
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

impl LoadedPlugin {
    /// Load the component at `path`.
    pub fn load(runtime: &Runtime, path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("loading plugin {}: cannot read the file", path.display()))?;
        Self::from_bytes(runtime, path, &bytes)
            .with_context(|| format!("loading plugin {}", path.display()))
    }

    /// Load from bytes already read; `path` names the plugin.
    pub fn from_bytes(runtime: &Runtime, path: &Path, bytes: &[u8]) -> Result<Self> {
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
        let digest = hex(&Sha256::digest(bytes));
        let start = Instant::now();
        let component = runtime.compile(bytes).context("compiling the component")?;
        let pre = runtime.prepare(&component)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into());
        Ok(Self {
            name,
            path: path.to_path_buf(),
            digest,
            pre,
            compile_time: start.elapsed(),
            _runtime: runtime.clone(),
        })
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
        self.digest.get(..12).unwrap_or(&self.digest)
    }

    /// How long compiling and checking took.
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// Run `handle` once in a fresh instance. Blocking: call it off the async
    /// executor (`spawn_blocking`).
    pub fn invoke(
        &self,
        msg: &Message,
        config: Arc<BTreeMap<String, String>>,
        pipeline: Arc<str>,
        limits: InvokeLimits,
    ) -> Invocation {
        let log = crate::runtime::LogContext {
            pipeline,
            plugin_version: self.version().into(),
        };
        crate::runtime::invoke(&self.pre, msg, config, log, limits)
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
