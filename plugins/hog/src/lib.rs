//! `hog`: test fixture that allocates memory without bound until allocation fails
//! (the allocator then aborts, a trap), so warren's memory limit has something to
//! stop. No config keys.

use std::hint::black_box;
use warren_plugin_sdk::{Handler, Message, Outcome};

const CHUNK: usize = 1 << 20;

struct Hog;

impl Handler for Hog {
    fn handle(_msg: Message) -> Outcome {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Non-zero fill so every page is written, not just reserved; black_box so
            // the never-read allocations are not optimised away.
            hoard.push(black_box(vec![0xa5; CHUNK]));
        }
    }
}

warren_plugin_sdk::export!(Hog);
