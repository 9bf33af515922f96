//! `republish`: forwards each message body (and content type) unchanged; used by
//! the benchmarks.
//!
//! Config keys:
//! * `exchange`: target exchange (default `""`, the default exchange);
//! * `routing_key`: target routing key (default `<queue>.out`, where `<queue>` is the
//!   queue the message came from).
//!
//! Headers are not copied: warren's `x-warren-*` bookkeeping belongs to the
//! original delivery.

use warren_plugin_sdk::{Handler, Message, Outcome, Outgoing, config, config_or};

struct Republish;

impl Handler for Republish {
    fn handle(msg: Message) -> Outcome {
        let routing_key = config("routing_key").unwrap_or_else(|| format!("{}.out", msg.queue));
        let mut out = Outgoing::new(config_or("exchange", ""), routing_key, msg.body);
        out.content_type = msg.content_type;
        Outcome::publish([out])
    }
}

warren_plugin_sdk::export!(Republish);
