//! The currently active version of a pipeline's plugin. Readers take a cheap
//! `Arc` clone, so a message keeps the version it started with even if the slot
//! is swapped meanwhile; the old version is dropped with its last message.

use std::sync::{Arc, RwLock};

use super::LoadedPlugin;

/// Holder of the active plugin version.
#[derive(Debug)]
pub struct PluginSlot {
    current: RwLock<Arc<LoadedPlugin>>,
}

impl PluginSlot {
    /// A slot holding `plugin`.
    pub fn new(plugin: LoadedPlugin) -> Self {
        Self {
            current: RwLock::new(Arc::new(plugin)),
        }
    }

    /// The active version.
    pub fn current(&self) -> Arc<LoadedPlugin> {
        // A poisoned lock only means a writer panicked mid-swap of an Arc, which
        // cannot leave it half-written: keep serving what is there.
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replace the active version; returns the previous one.
    pub fn swap(&self, plugin: LoadedPlugin) -> Arc<LoadedPlugin> {
        let new = Arc::new(plugin);
        match self.current.write() {
            Ok(mut g) => std::mem::replace(&mut *g, new),
            Err(p) => std::mem::replace(&mut *p.into_inner(), new),
        }
    }
}
