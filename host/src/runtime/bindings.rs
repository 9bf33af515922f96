//! Host bindings generated from `wit/warren.wit`; nothing else in the host
//! should need to know how `bindgen!` names things.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
});

pub(crate) use warren::plugin::host::Level;
pub use warren::plugin::types::{Message, Outcome, Outgoing, RetryRequest, RpcReply};
