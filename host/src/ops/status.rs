//! A pipeline's broker session as `/healthz/ready` shows it: attached or
//! not, to which node, why the last session failed, a resource alarm, refused
//! effects, a crashed task. Kept apart from the counters, which only add up.

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// Readiness state of one pipeline (part of its `PipelineMetrics`).
#[derive(Debug, Default)]
pub struct PipelineStatus {
    /// Whether the pipeline's consumer is attached to the broker.
    pub connected: AtomicBool,
    last_broker_error: RwLock<Option<String>>,
    /// Why the broker blocked the connection (a resource alarm), while it does.
    blocked: RwLock<Option<String>>,
    blocked_now: AtomicBool,
    /// The last refused effect, while refusals go on.
    last_effect_error: RwLock<Option<String>>,
    /// The pipeline's task panicked: it consumes no more until warren restarts.
    crashed: RwLock<Option<String>>,
    /// The broker node of the current connection (URL without password).
    node: RwLock<Option<String>>,
}

impl PipelineStatus {
    /// Why the last broker session failed (connecting, declaring, consuming);
    /// `None` once a session is consuming again.
    pub fn set_broker_error(&self, error: Option<&str>) {
        if let Ok(mut g) = self.last_broker_error.write() {
            *g = error.map(str::to_string);
        }
    }

    /// The error of the last failed broker session, while none has succeeded since.
    pub fn last_broker_error(&self) -> Option<String> {
        self.last_broker_error.read().ok().and_then(|g| g.clone())
    }

    /// The broker blocked the connection (`Some(reason)`) or lifted the block.
    pub fn set_blocked(&self, reason: Option<&str>) {
        self.blocked_now.store(reason.is_some(), Ordering::Relaxed);
        if let Ok(mut g) = self.blocked.write() {
            *g = reason.map(str::to_string);
        }
    }

    /// Whether the broker blocks the pipeline's connection now.
    pub fn blocked(&self) -> bool {
        self.blocked_now.load(Ordering::Relaxed)
    }

    /// A delivery's effects were refused (`Some`), or went through again.
    pub fn set_effect_error(&self, error: Option<&str>) {
        if let Ok(mut g) = self.last_effect_error.write() {
            *g = error.map(str::to_string);
        }
    }

    /// The last refused effect, while no effects have been confirmed since.
    pub fn last_effect_error(&self) -> Option<String> {
        self.last_effect_error.read().ok().and_then(|g| g.clone())
    }

    /// The pipeline's task ended with a panic (`why`): never ready again.
    pub fn set_crashed(&self, why: &str) {
        self.connected.store(false, Ordering::Relaxed);
        if let Ok(mut g) = self.crashed.write() {
            *g = Some(why.to_string());
        }
    }

    /// The broker node connected to now (`None` between connections).
    pub fn set_node(&self, node: Option<&str>) {
        if let Ok(mut g) = self.node.write() {
            *g = node.map(str::to_string);
        }
    }

    /// The broker node of the current connection, if any.
    pub fn node(&self) -> Option<String> {
        self.node.read().ok().and_then(|g| g.clone())
    }

    /// Why the pipeline's task panicked, if it did.
    pub fn crashed(&self) -> Option<String> {
        self.crashed.read().ok().and_then(|g| g.clone())
    }

    /// Why the broker blocks the connection, while it does.
    pub fn blocked_reason(&self) -> Option<String> {
        self.blocked.read().ok().and_then(|g| g.clone())
    }
}
