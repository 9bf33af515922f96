//! `noop`: test fixture that acknowledges every message and does nothing else.
//! It measures warren's per-message overhead. No config keys.

use warren_plugin_sdk::{Handler, Message, Outcome};

struct Noop;

impl Handler for Noop {
    fn handle(_msg: Message) -> Outcome {
        Outcome::ack()
    }
}

warren_plugin_sdk::export!(Noop);
