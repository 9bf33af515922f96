//! The WebAssembly side of warren: engine setup, the generated bindings, per-store
//! limits and state, and the one function that runs a plugin on a message.

mod bindings;
mod engine;
mod invoke;
mod state;

pub(crate) use bindings::PluginPre;
pub use bindings::{Message, Outcome, Outgoing, RetryRequest, RpcReply};
pub use engine::{Runtime, RuntimeOptions};
pub(crate) use invoke::invoke;
pub use invoke::{FailureKind, Invocation, InvokeLimits, PluginFailure};
pub(crate) use state::{HostState, LogContext};
