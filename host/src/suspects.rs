//! Messages that keep killing the broker session: a general defence against
//! poison messages whose effect (or whose long call) makes the broker close the
//! connection or channel, such as a forged direct reply-to address, or a call
//! longer than the broker's `consumer_timeout`.
//!
//! Such a message never settles: the broker requeues it with everything else
//! unsettled, warren reconnects, gets it again, and it kills the session again,
//! re-running its neighbours each time whose acks died with the connection. A
//! quorum queue's delivery limit ends that after many rounds (dead-lettering
//! without warren's headers), a classic queue never does.
//!
//! So each session keeps the deliveries that are in flight, taken by a worker
//! and not yet settled, and what each is doing: its call running, or its
//! effects published and not yet confirmed. When the session dies, the
//! suspects are the deliveries whose effects were unconfirmed (the broker
//! closes the connection over an effect it cannot deliver), and, when the
//! broker closed the consume channel because an ack took too long
//! (`consumer_timeout`), those whose call was running. The pipeline's
//! [`Ledger`] counts a death for each. A delivery that comes back marked
//! redelivered and has been a suspect at `session_death_limit` deaths is
//! parked in `<queue>.dlq` with a reason saying so, without calling the plugin
//! or sending any of its effects. Neighbours that had only an ack left to send
//! are never suspects: the death is not charged to them, however often they
//! are re-run beside the poison message. A neighbour whose own effects were
//! unconfirmed at the same deaths is charged too; its copy in the DLQ says why.
//!
//! Some deaths are nobody's fault, and are charged to no one (each is
//! counted in `warren_session_deaths_total` by its [`Verdict`]):
//!
//! * a death while the broker had blocked the connection (`connection.blocked`,
//!   a resource alarm): the broker reads nothing from a blocked connection, so
//!   no effect sent on it can have killed it. Effects wait unconfirmed
//!   meanwhile, so without this rule every close during an alarm would charge
//!   a whole prefetch window of innocent messages;
//! * a close with reply code 320 `CONNECTION_FORCED`: an operator's
//!   (`rabbitmqctl close_all_connections`, the management UI) or the broker's
//!   own (a node shutting down), never the answer to something warren sent.
//!
//! Direct replies (`amq.rabbitmq.reply-to.*`, the one effect whose address a
//! producer chooses and the broker may fail to deliver by closing the whole
//! connection) go out on a connection of their own (`pipeline::replies`), so
//! that a forged address kills neither the consume session nor its
//! neighbours' effects. A death of that connection is charged to the reply
//! at risk only when it was the only one unconfirmed on it; with several at
//! risk no one is charged, and each request, coming back redelivered, sends
//! its reply alone on it, so that the next death names its culprit.
//!
//! A message is known by a digest of its address, its identifying properties
//! and its body (the first and last 4 KiB and the length, so that the digest
//! costs the same for any size). Two identical messages share a count; that
//! errs towards parking a copy of a message that did kill sessions. The count
//! lives in the process: a replica that never saw the deaths starts from zero,
//! and the broker's own delivery limit stays the backstop.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{LazyLock, Mutex};

use foldhash::fast::FixedState as MapHasher;
use foldhash::quality::RandomState as DigestHasher;

use lapin::message::Delivery;

/// Reply code of a close forced by an operator or the broker (`rabbitmqctl
/// close_all_connections`, the management UI, a node shutting down).
pub const CONNECTION_FORCED: u16 = 320;

/// Most messages remembered; past it the ledger starts over. A session dying
/// with thousands of deliveries in flight is itself the problem to look at.
const CAPACITY: usize = 10_000;

/// Bytes of the body's start and end that go into the digest.
const SAMPLE: usize = 4096;

/// The digest's hasher, seeded at random once per process (the ledger lives
/// in the process): a producer cannot craft a message whose digest collides
/// with a poison message's and so share its count.
static DIGEST: LazyLock<DigestHasher> = LazyLock::new(DigestHasher::default);

/// A message's identity across deliveries. Computed for every delivery, so
/// with foldhash rather than std's SipHash, and over each byte at most once
/// (a body up to twice the sample is hashed whole).
pub fn key(d: &Delivery) -> u64 {
    let mut h = DIGEST.build_hasher();
    d.exchange.as_str().hash(&mut h);
    d.routing_key.as_str().hash(&mut h);
    let p = &d.properties;
    p.message_id().as_ref().map(|s| s.as_str()).hash(&mut h);
    p.correlation_id().as_ref().map(|s| s.as_str()).hash(&mut h);
    p.reply_to().as_ref().map(|s| s.as_str()).hash(&mut h);
    p.timestamp().hash(&mut h);
    let body = &d.data;
    body.len().hash(&mut h);
    if body.len() <= 2 * SAMPLE {
        body[..].hash(&mut h);
    } else {
        body[..SAMPLE].hash(&mut h);
        body[body.len().saturating_sub(SAMPLE)..].hash(&mut h);
    }
    h.finish()
}

/// Deaths of a session while each message was in flight, per pipeline.
#[derive(Debug, Default)]
pub struct Ledger {
    deaths: Mutex<HashMap<u64, u32, MapHasher>>,
}

impl Ledger {
    /// Count one more death for each of `keys`.
    pub fn record(&self, keys: impl IntoIterator<Item = u64>) {
        let Ok(mut deaths) = self.deaths.lock() else {
            return;
        };
        for k in keys {
            if deaths.len() >= CAPACITY && !deaths.contains_key(&k) {
                deaths.clear();
            }
            let n = deaths.entry(k).or_insert(0);
            *n = n.saturating_add(1);
        }
    }

    /// Deaths counted for `key`.
    pub fn deaths(&self, key: u64) -> u32 {
        self.deaths
            .lock()
            .ok()
            .and_then(|d| d.get(&key).copied())
            .unwrap_or(0)
    }

    /// The message settled (or was parked): start over for it.
    pub fn forget(&self, key: u64) {
        if let Ok(mut d) = self.deaths.lock()
            && !d.is_empty()
        {
            d.remove(&key);
        }
    }
}

/// What an in-flight delivery is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Its plugin call is running (or about to).
    Running,
    /// Its effects are published and not confirmed yet.
    Publishing,
}

/// The deliveries of one session that are in flight, by delivery tag.
#[derive(Debug, Default)]
pub struct InFlight {
    /// By delivery tag; touched twice per message, so not SipHash either.
    keys: Mutex<HashMap<u64, (u64, Stage), MapHasher>>,
}

impl InFlight {
    /// Delivery `tag` (message `key`) was taken by a worker.
    pub fn taken(&self, tag: u64, key: u64) {
        if let Ok(mut k) = self.keys.lock() {
            k.insert(tag, (key, Stage::Running));
        }
    }

    /// Delivery `tag`'s effects are being published.
    pub fn publishing(&self, tag: u64) {
        if let Ok(mut k) = self.keys.lock()
            && let Some(entry) = k.get_mut(&tag)
        {
            entry.1 = Stage::Publishing;
        }
    }

    /// Delivery `tag`'s work is done, but its ack found the channel closed:
    /// the broker redelivers it. It stays in flight as a call, which a
    /// `consumer_timeout` (the broker closing the channel over a call that ran
    /// too long) charges and any other death does not.
    pub fn unacked(&self, tag: u64) {
        if let Ok(mut k) = self.keys.lock()
            && let Some(entry) = k.get_mut(&tag)
        {
            entry.1 = Stage::Running;
        }
    }

    /// Delivery `tag` is settled: no longer a suspect.
    pub fn settled(&self, tag: u64) -> Option<u64> {
        self.keys
            .lock()
            .ok()
            .and_then(|mut k| k.remove(&tag))
            .map(|(key, _)| key)
    }

    /// The suspects of a session that just died: deliveries whose effects
    /// were unconfirmed, and with `running_too` those whose call was running.
    pub fn suspects(&self, running_too: bool) -> Vec<u64> {
        self.keys
            .lock()
            .map(|k| {
                k.values()
                    .filter(|(_, stage)| running_too || *stage == Stage::Publishing)
                    .map(|(key, _)| *key)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// What a death of a connection was charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Charged to the deliveries whose effects (or, after a
    /// `consumer_timeout`, calls) were at risk.
    Charged,
    /// Not charged: the broker had blocked the connection (resource alarm)
    /// and so read nothing sent on it.
    Blocked,
    /// Not charged: closed with `CONNECTION_FORCED` by an operator or the
    /// broker.
    Forced,
    /// Not charged: the reply connection died with several replies at risk;
    /// each is sent alone next time.
    Shared,
}

impl Verdict {
    /// All values, for the metric.
    pub const ALL: [Verdict; 4] = [Self::Charged, Self::Blocked, Self::Forced, Self::Shared];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Charged => "charged",
            Self::Blocked => "blocked",
            Self::Forced => "forced_close",
            Self::Shared => "shared",
        }
    }

    /// The verdict on a death: `close_code` is the reply code of the
    /// broker's close, if known; `blocked` whether the broker had blocked the
    /// connection when it died; `at_risk` how many deliveries were charged
    /// with it, and `alone_only` whether only a death with one at risk may be
    /// charged (the reply connection).
    pub fn of(close_code: Option<u16>, blocked: bool, at_risk: usize, alone_only: bool) -> Self {
        if close_code == Some(CONNECTION_FORCED) {
            Self::Forced
        } else if blocked {
            Self::Blocked
        } else if alone_only && at_risk > 1 {
            Self::Shared
        } else {
            Self::Charged
        }
    }
}

/// The reply code of the broker's close behind `e`, if it is one.
pub fn close_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// The reply code of a broker's close anywhere in `e`'s chain.
pub fn close_code_in(e: &anyhow::Error) -> Option<u16> {
    e.chain()
        .filter_map(|c| c.downcast_ref::<lapin::Error>())
        .find_map(close_code)
}

#[cfg(test)]
mod tests {
    use super::{CONNECTION_FORCED, InFlight, Ledger, Verdict};

    #[test]
    fn blocked_and_forced_deaths_are_nobodys_and_shared_reply_deaths_too() {
        // INTERNAL_ERROR, as a forged direct reply-to gets, or no close at all.
        assert_eq!(Verdict::of(Some(541), false, 3, false), Verdict::Charged);
        assert_eq!(Verdict::of(None, false, 1, true), Verdict::Charged);
        assert_eq!(Verdict::of(Some(541), true, 3, false), Verdict::Blocked);
        assert_eq!(Verdict::of(None, true, 1, true), Verdict::Blocked);
        assert_eq!(
            Verdict::of(Some(CONNECTION_FORCED), false, 3, false),
            Verdict::Forced
        );
        assert_eq!(
            Verdict::of(Some(CONNECTION_FORCED), true, 1, true),
            Verdict::Forced
        );
        assert_eq!(Verdict::of(Some(541), false, 2, true), Verdict::Shared);
        assert_eq!(Verdict::of(Some(541), false, 2, false), Verdict::Charged);
    }

    #[test]
    fn deaths_are_counted_per_message_until_it_settles() {
        let ledger = Ledger::default();
        let session = InFlight::default();
        session.taken(1, 0xbad);
        session.taken(2, 0x600d);
        session.taken(3, 0x5105);
        session.publishing(1);
        assert_eq!(session.settled(2), Some(0x600d));
        // Only a consumer timeout charges a call that is still running.
        assert_eq!(session.suspects(true).len(), 2);
        ledger.record(session.suspects(false));
        ledger.record([0xbad]);
        assert_eq!(ledger.deaths(0xbad), 2);
        assert_eq!(ledger.deaths(0x600d), 0);
        ledger.forget(0xbad);
        assert_eq!(ledger.deaths(0xbad), 0);
    }
}
