//! `trap`: test fixture that panics on every message, which aborts the instance
//! with a WebAssembly trap (a failed attempt for warren). No config keys.

use warren_plugin_sdk::{Handler, Message, Outcome};

struct Trap;

impl Handler for Trap {
    fn handle(_msg: Message) -> Outcome {
        panic!("trap fixture: panicking on purpose");
    }
}

warren_plugin_sdk::export!(Trap);
