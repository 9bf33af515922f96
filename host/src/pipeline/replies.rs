//! Direct replies (`amq.rabbitmq.reply-to.*`) on a connection of their own.
//!
//! A direct reply-to address is chosen by the producer, and the broker does
//! not check it the way it checks a queue: RabbitMQ 3.10 fails delivering to
//! a forged one (one naming a node that does not exist) by closing the
//! publisher's whole connection with 541 INTERNAL_ERROR. On the session's
//! connection that would take the consume channel with it, and every
//! neighbour in flight would be re-run, its effects unconfirmed, again each
//! time the request comes back.
//!
//! So a session sends its direct replies on a second connection, opened when
//! the first is due and again after it dies. Its death costs only the replies
//! unconfirmed on it: their requests are requeued on the consume channel,
//! which stays up, and come back redelivered. A death with one reply at risk
//! is charged to that request (`session_death_limit`); with several, to none
//! of them, and each, coming back redelivered, sends its reply alone (no other
//! reply in flight on the connection meanwhile), so that a death then names
//! its culprit. A death while the connection was blocked, or a close with
//! CONNECTION_FORCED, is charged to no one, as on the session's connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use lapin::Connection;
use tokio::sync::{Mutex, RwLock};

use super::Pipeline;
use crate::broker::{self, PublishReport, Publisher};
use crate::config::BrokerConfig;
use crate::disposition::{Publication, Role};
use crate::suspects::{self, Verdict};

/// How long closing a dead or finished reply connection may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The prefix of the broker's direct reply-to pseudo-queue.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The reply connection of one session.
pub(super) struct Replies {
    endpoint: BrokerConfig,
    /// Its name in the broker's management UI: `warren/<pipeline>.replies`.
    name: String,
    open: Mutex<Option<Arc<Lane>>>,
    /// A reply sent alone holds it for writing, the others for reading.
    gate: RwLock<()>,
}

/// One reply connection, until it dies.
struct Lane {
    conn: Connection,
    publisher: Publisher,
    /// Replies published on it and not yet confirmed.
    at_risk: AtomicUsize,
    /// `at_risk` when the first failure after its death was seen.
    at_death: OnceLock<usize>,
}

impl Replies {
    pub(super) fn new(endpoint: BrokerConfig, pipeline: &str) -> Self {
        Self {
            endpoint,
            name: format!("{pipeline}.replies"),
            open: Mutex::new(None),
            gate: RwLock::new(()),
        }
    }

    /// Whether `p` goes out on the reply connection: a reply to a direct
    /// reply-to address.
    pub(super) fn carries(p: &Publication) -> bool {
        p.role == Role::Reply
            && p.exchange.as_str().is_empty()
            && p.routing_key.as_str().starts_with(DIRECT_REPLY_TO)
    }

    /// The live reply connection, opened now if there is none.
    async fn lane(&self) -> Result<Arc<Lane>> {
        let mut open = self.open.lock().await;
        if let Some(lane) = open.as_ref()
            && lane.conn.status().connected()
            && lane.publisher.usable()
        {
            return Ok(lane.clone());
        }
        if let Some(dead) = open.take() {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    CLOSE_TIMEOUT,
                    dead.conn.close(200, "reply connection replaced".into()),
                )
                .await;
            });
        }
        let conn = broker::connect(&self.endpoint, &self.name)
            .await
            .context("opening the connection for direct replies")?;
        let channel = conn
            .create_channel()
            .await
            .context("opening the channel for direct replies")?;
        let lane = Arc::new(Lane {
            conn,
            publisher: Publisher::new(channel).await?,
            at_risk: AtomicUsize::new(0),
            at_death: OnceLock::new(),
        });
        *open = Some(lane.clone());
        Ok(lane)
    }

    /// Publish the direct replies `pubs` of message `key` and wait for their
    /// confirms; `alone`: with no other reply in flight meanwhile. A death of
    /// the connection on the way is judged here (see the module docs).
    pub(super) async fn publish(
        &self,
        pubs: &[Publication],
        alone: bool,
        key: u64,
        p: &Pipeline,
    ) -> Result<PublishReport> {
        let (_shared, _alone) = if alone {
            (None, Some(self.gate.write().await))
        } else {
            (Some(self.gate.read().await), None)
        };
        let lane = self.lane().await?;
        lane.at_risk.fetch_add(1, Ordering::SeqCst);
        let result = lane.publisher.publish_all(pubs).await;
        let e = match result {
            Ok(report) => {
                lane.at_risk.fetch_sub(1, Ordering::SeqCst);
                return Ok(report);
            }
            Err(e) => e,
        };
        if lane.conn.status().connected() && lane.publisher.usable() {
            // A nack, not a death.
            lane.at_risk.fetch_sub(1, Ordering::SeqCst);
            return Err(e);
        }
        let mut first = false;
        let at_risk = *lane.at_death.get_or_init(|| {
            first = true;
            lane.at_risk.load(Ordering::SeqCst)
        });
        let code = suspects::close_code_in(&e);
        let verdict = Verdict::of(code, lane.conn.status().blocked(), at_risk, true);
        if first {
            p.metrics.session_death(verdict);
            let name = &p.info.name;
            let error = crate::logtext::error_chain(&e);
            match verdict {
                Verdict::Charged => {
                    tracing::warn!(pipeline = %name, error = %error, "the reply connection died with one direct reply unconfirmed; its message is charged one death (see session_death_limit)");
                }
                Verdict::Shared => {
                    tracing::warn!(pipeline = %name, error = %error, at_risk, "the reply connection died with several direct replies unconfirmed; none is charged, and each is sent alone when its message comes back");
                }
                Verdict::Blocked | Verdict::Forced => {
                    tracing::warn!(pipeline = %name, error = %error, verdict = verdict.label(), "the reply connection died blocked or closed by force; no message is charged");
                }
            }
        }
        if verdict == Verdict::Charged {
            p.ledger.record([key]);
        }
        Err(e.context("the connection for direct replies died"))
    }

    /// Close the reply connection, if open (the session ends).
    pub(super) async fn close(&self) {
        if let Some(lane) = self.open.lock().await.take() {
            let _ = tokio::time::timeout(
                CLOSE_TIMEOUT,
                lane.conn.close(200, "warren stopping".into()),
            )
            .await;
        }
    }
}
