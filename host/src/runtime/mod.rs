//! The WebAssembly side of warren: engine setup, the generated bindings, per-store
//! limits and state, the one function that runs a plugin on a message, and the
//! idle instances `instance = "reuse"` keeps between messages.

mod bindings;
mod engine;
mod invoke;
mod reuse;
mod state;

pub(crate) use bindings::PluginPre;
pub use bindings::{Message, Outcome, Outgoing, RetryRequest, RpcReply};
pub use engine::{RuntimeOptions, WasmRuntime};
pub(crate) use invoke::invoke;
pub use invoke::{FailureKind, Invocation, InvokeLimits, PluginFailure};
pub(crate) use reuse::IdleInstances;
pub(crate) use state::{HostState, LogContext};
