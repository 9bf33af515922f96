//! The queues a test makes on the test broker are deleted when the test ends,
//! so that a long-lived dev broker does not fill up with them (quorum queues
//! above all: each is a Raft group with its own files and memory).
//!
//! [`crate::start`] and [`crate::Client`]'s declare helpers record every queue
//! they make or that warren makes for a pipeline (its queue, its DLQ, every
//! retry tier and the `<queue>.out` the tests collect outputs in) with
//! [`track`] or [`track_config`]. They are recorded per thread, and libtest
//! runs each test on a thread of its own, so the record ends with the test:
//! its destructor deletes the queues then, passed or failed. A test that makes
//! queues some other way calls [`track`] itself.

use std::cell::RefCell;
use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};
use warren::config::Config;

use crate::names::broker_url;

/// The queues made on this thread (one test), deleted when it ends.
struct Made(Vec<String>);

thread_local! {
    static MADE: RefCell<Made> = const { RefCell::new(Made(Vec::new())) };
}

/// Delete `queue` from the test broker when the current test ends.
pub fn track(queue: &str) {
    let _ = MADE.try_with(|m| {
        if let Ok(mut m) = m.try_borrow_mut()
            && !m.0.iter().any(|q| q == queue)
        {
            m.0.push(queue.to_string());
        }
    });
}

/// Delete every queue warren makes for `config`'s pipelines (queue, DLQ,
/// retry tiers) and their `<queue>.out` when the current test ends.
pub fn track_config(config: &Config) {
    for p in &config.pipelines {
        track(&p.queue);
        track(&p.dlq_name());
        track(&format!("{}.out", p.queue));
        for ms in warren::retry::RetryTiers::new(&p.retry).delays_ms() {
            track(&warren::retry::tier_queue(&p.queue, *ms));
        }
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let queues = std::mem::take(&mut self.0);
        // On a thread of its own: this runs while the test's thread ends,
        // when its other thread-locals (tokio's among them) may be gone.
        let _ = std::thread::spawn(move || delete(&queues)).join();
    }
}

/// Delete `queues` (a missing one is no error), each within a few seconds;
/// whatever cannot be deleted is left, without failing the test.
fn delete(queues: &[String]) {
    const LIMIT: Duration = Duration::from_secs(10);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let url = broker_url();
        let connect = Connection::connect(&url, ConnectionProperties::default());
        let Ok(Ok(conn)) = tokio::time::timeout(LIMIT, connect).await else {
            return;
        };
        let mut channel = None;
        for q in queues {
            if channel.is_none() {
                channel = match tokio::time::timeout(LIMIT, conn.create_channel()).await {
                    Ok(Ok(c)) => Some(c),
                    _ => break,
                };
            }
            let Some(ch) = &channel else { break };
            let deleted = tokio::time::timeout(
                LIMIT,
                ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
            )
            .await;
            if !matches!(deleted, Ok(Ok(_))) {
                // The broker closes the channel on an error: the next delete
                // gets a new one.
                channel = None;
            }
        }
        let _ = conn.close(200, "test queues deleted".into()).await;
    });
}
