//! Plugins as warren holds them: loaded (compiled, checked against the world,
//! pre-instantiated) and kept in a slot that can be swapped as one unit.

mod cache;
mod file;
mod limits;
mod loader;
mod reload;
mod slot;
mod status;
mod watch;

pub use cache::{CacheOutcome, CompiledCache, DEFAULT_CACHE_MAX_MB};
pub use limits::{check_fits, check_fits_as};
pub use loader::{LoadedPlugin, PluginLoader, digest_of};
pub use reload::{ReloadResult, Reloader};
pub use slot::PluginSlot;
pub use status::{CACHE_SOURCES, PluginStatus};
pub use watch::{PluginWatcher, watch_plugins};
