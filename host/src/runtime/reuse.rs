//! Instances kept between messages for `instance = "reuse"`.
//!
//! A reused instance skips instantiation (for a JavaScript or Python runtime
//! most of a message's cost) at the price of isolation: whatever one message
//! leaves in the plugin's memory, the next message handled by that instance
//! sees. Limits stay per call (deadline, memory cap, log budget, HTTP grant:
//! see `HostState::begin_call`). An instance goes back to the idle set only
//! after a call that returned an outcome within every limit; after a trap, a
//! timeout, a memory-limit hit or a failed instantiation it is dropped, so
//! the next message gets a fresh one. Each plugin version has its own idle
//! set: after a reload, instances of the old version are dropped with it.

use std::sync::{Arc, Mutex, PoisonError};

use wasmtime::Store;

use super::bindings::Plugin;
use super::state::HostState;

/// A store and the instance in it (`None` until instantiated, and for good
/// if instantiation failed).
pub(crate) struct Warm {
    pub(crate) store: Store<HostState>,
    pub(crate) plugin: Option<Plugin>,
    /// Messages it has handled.
    pub(crate) calls: u32,
}

/// Idle instances of one plugin version in one pipeline. At most one per
/// worker thread: a worker takes one for a message and gives it back after.
#[derive(Default)]
pub(crate) struct IdleInstances {
    idle: Mutex<Vec<Warm>>,
}

impl std::fmt::Debug for IdleInstances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleInstances").finish_non_exhaustive()
    }
}

impl IdleInstances {
    /// The most recently used idle instance (its memory is the likeliest to
    /// be in the CPU caches), if any.
    pub(crate) fn take(&self) -> Option<Warm> {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    fn put(&self, warm: Warm) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(warm);
    }
}

/// The instance of a finished call, until the caller has acted on the
/// outcome. Dropped, it goes back to `back_to` when that is set (the call
/// decided it may be reused) and is released (its pooled memory reset)
/// otherwise.
pub(crate) struct Spent {
    pub(crate) warm: Option<Warm>,
    pub(crate) back_to: Option<Arc<IdleInstances>>,
}

impl Drop for Spent {
    fn drop(&mut self) {
        if let (Some(warm), Some(idle)) = (self.warm.take(), self.back_to.take())
            && warm.plugin.is_some()
        {
            idle.put(warm);
        }
    }
}
