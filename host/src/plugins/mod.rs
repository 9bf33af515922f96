//! Plugins as warren holds them: loaded (compiled, checked against the world,
//! pre-instantiated) and kept in a slot that can be swapped as one unit.

mod loader;
mod slot;

pub use loader::LoadedPlugin;
pub use slot::PluginSlot;
