//! Publishing with publisher confirms. A batch counts as done only when the
//! broker has confirmed every message in it; what "unroutable" means depends on
//! the publication's role (see `disposition::Role`).

use anyhow::{Context, Result, bail};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation};

use crate::disposition::{Publication, Role};

/// A confirm-mode channel.
#[derive(Debug)]
pub struct Publisher {
    channel: Channel,
}

/// What happened to a confirmed batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PublishReport {
    /// Outputs and replies confirmed.
    pub published: u64,
    /// Outputs the broker could not route (allowed; counted).
    pub unroutable: u64,
    /// Indexes of retry and dead-letter copies the broker could not route:
    /// one of warren's own queues is missing. Not done; the caller decides.
    pub lost_copies: Vec<usize>,
}

impl Publisher {
    /// Put `channel` in confirm mode and wrap it.
    pub async fn new(channel: Channel) -> Result<Self> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        Ok(Self { channel })
    }

    /// False once the channel has been closed (by an error or the broker).
    pub fn usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publish all, then wait for every confirm. A nack or an error fails the
    /// whole batch: the caller then requeues the original, and a later attempt
    /// publishes again (at-least-once, so duplicates are possible). A copy the
    /// broker could not route is reported in `lost_copies`.
    pub async fn publish_all(&self, pubs: &[Publication]) -> Result<PublishReport> {
        let mut pending = Vec::with_capacity(pubs.len());
        for (i, p) in pubs.iter().enumerate() {
            // Mandatory everywhere except replies: direct reply-to targets are not
            // queues, and a caller that went away is not our failure.
            let opts = BasicPublishOptions {
                mandatory: p.role != Role::Reply,
                ..BasicPublishOptions::default()
            };
            let confirm = self
                .channel
                .basic_publish(
                    p.exchange.clone(),
                    p.routing_key.clone(),
                    opts,
                    &p.body,
                    p.properties.clone(),
                )
                .await
                .with_context(|| {
                    format!(
                        "publishing to exchange {:?} key {:?}",
                        p.exchange, p.routing_key
                    )
                })?;
            pending.push((i, confirm));
        }
        let mut report = PublishReport::default();
        for (i, confirm) in pending {
            let Some(p) = pubs.get(i) else { continue };
            let (exchange, key) = (&p.exchange, &p.routing_key);
            let confirmation = confirm.await.with_context(|| {
                format!("waiting for the confirm of exchange {exchange:?} key {key:?}")
            })?;
            match confirmation {
                Confirmation::Ack(None) | Confirmation::NotRequested => {
                    if p.role != Role::Copy {
                        report.published += 1;
                    }
                }
                Confirmation::Ack(Some(_)) => match p.role {
                    Role::Copy => report.lost_copies.push(i),
                    Role::Output | Role::Reply => {
                        // Never the returned message itself: its body may be
                        // large, or secret.
                        tracing::warn!(%exchange, routing_key = %key, bytes = p.body.len(), "no queue is bound for this output; the broker dropped it");
                        report.unroutable += 1;
                    }
                },
                Confirmation::Nack(_) => bail!(
                    "the broker refused (nacked) the message to exchange {exchange:?} key {key:?}"
                ),
            }
        }
        Ok(report)
    }
}
