//! `spin`: test fixture that never returns, so warren's per-message timeout
//! (epoch interruption / fuel) has something to stop. No config keys.

use std::hint::black_box;
use warren_plugin_sdk::{Handler, Message, Outcome};

struct Spin;

impl Handler for Spin {
    fn handle(_msg: Message) -> Outcome {
        // black_box keeps the optimiser from proving the loop side-effect free.
        let mut n = 0u64;
        loop {
            n = black_box(n.wrapping_add(1));
        }
    }
}

warren_plugin_sdk::export!(Spin);
