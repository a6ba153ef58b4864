//! The steps of a service's life, announced as they happen.

use lodestar_core::sync::MutexExt;
use std::net::SocketAddr;

use tokio::sync::broadcast;

/// The steps of a service's life, in order. See the [module docs](crate::server).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lifecycle {
    /// Accepting connections at this address.
    Serving(SocketAddr),
    /// Registered (or registered again) in the registry.
    Registered,
    /// Shutdown began; health reports `NOT_SERVING`.
    NotServing,
    /// Removed from the registry.
    Deregistered,
    /// The listener is closed; connections drain.
    ListenerClosed,
    /// Every connection finished (`cut` were still open at the end of the grace period).
    Drained {
        /// How many connections were cut at the end of the grace period.
        cut: usize,
    },
}

/// Announces [`Lifecycle`] events, and remembers them so that a late
/// subscriber still sees every step.
#[derive(Debug)]
pub(crate) struct Announcer {
    history: std::sync::Mutex<Vec<Lifecycle>>,
    events: broadcast::Sender<Lifecycle>,
}

impl Announcer {
    pub(crate) fn new() -> Self {
        Self {
            history: std::sync::Mutex::new(Vec::new()),
            events: broadcast::channel(16).0,
        }
    }

    pub(crate) fn announce(&self, event: Lifecycle) {
        let mut history = self.history.lock_unpoisoned();
        history.push(event.clone());
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }

    /// Every step so far, in order.
    pub(crate) fn history(&self) -> Vec<Lifecycle> {
        self.history.lock_unpoisoned().clone()
    }

    pub(crate) fn subscribe(&self) -> LifecycleEvents {
        let history = self.history.lock_unpoisoned();
        LifecycleEvents {
            past: history.iter().cloned().collect(),
            live: self.events.subscribe(),
        }
    }
}

/// The [`Lifecycle`] events of a service: every step so far, then each new
/// one as it happens. From [`RunningService::lifecycle`](crate::RunningService::lifecycle).
#[derive(Debug)]
pub struct LifecycleEvents {
    past: std::collections::VecDeque<Lifecycle>,
    live: broadcast::Receiver<Lifecycle>,
}

impl LifecycleEvents {
    /// The next event; `None` once the service is gone.
    pub async fn next(&mut self) -> Option<Lifecycle> {
        if let Some(event) = self.past.pop_front() {
            return Some(event);
        }
        loop {
            match self.live.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next event if one has happened already.
    pub fn try_next(&mut self) -> Option<Lifecycle> {
        if let Some(event) = self.past.pop_front() {
            return Some(event);
        }
        loop {
            match self.live.try_recv() {
                Ok(event) => return Some(event),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    }
}
