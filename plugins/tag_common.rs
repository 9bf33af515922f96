// Shared by `tag_a` and `tag_b`: two builds that differ only in `TAG`, so a
// test can tell which version handled a message.
//
// Publishes the body unchanged to config `exchange` (default "") with routing
// key config `routing_key` (default "<queue>.out") and header `x-tag: <TAG>`.

use warren_plugin_sdk::{Handler, Message, Outcome, Outgoing, config, config_or};

struct Tag;

impl Handler for Tag {
    fn handle(msg: Message) -> Outcome {
        let key = config("routing_key").unwrap_or_else(|| format!("{}.out", msg.queue));
        Outcome::publish([Outgoing::new(config_or("exchange", ""), key, msg.body).header("x-tag", TAG)])
    }
}

warren_plugin_sdk::export!(Tag);
