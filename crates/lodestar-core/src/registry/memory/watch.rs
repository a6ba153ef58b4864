//! The history of changes, and the watchers that follow a service through it.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use futures_util::stream;
use tokio::sync::broadcast;

use super::{MemoryRegistry, Shared, State, new_service};
use crate::ServiceKey;
use crate::registry::packed::Packed;
use crate::registry::{RegistryError, Revision, WatchEvent, WatchStream};

/// How many recent changes the registry remembers for watchers that resume.
pub(super) const DEFAULT_HISTORY: usize = 4096;

/// How many bytes of instances those changes may hold at most.
pub(super) const DEFAULT_HISTORY_BYTES: usize = 16 * 1024 * 1024;

/// How many undelivered events a watcher may fall behind before it is sent a
/// fresh snapshot instead.
pub(super) const WATCH_BUFFER: usize = 256;

/// One change, as the history keeps it.
pub(super) struct Change {
    pub(super) service: Arc<ServiceKey>,
    pub(super) revision: Revision,
    pub(super) what: Changed,
}

pub(super) enum Changed {
    /// An instance was added or changed; it is now this.
    Put(Arc<str>, Packed),
    /// An instance left.
    Delete(Arc<str>),
}

impl Change {
    /// What keeping this change costs, in bytes.
    pub(super) fn footprint(&self) -> usize {
        std::mem::size_of::<Self>()
            + match &self.what {
                Changed::Put(_, instance) => instance.footprint(),
                Changed::Delete(_) => 0,
            }
    }

    pub(super) fn event(&self) -> WatchEvent {
        let revision = self.revision;
        match &self.what {
            Changed::Put(id, instance) => WatchEvent::Put {
                revision,
                instance: instance.unpack(&self.service, id),
            },
            Changed::Delete(id) => WatchEvent::Delete {
                revision,
                id: id.to_string(),
            },
        }
    }
}

pub(super) struct Watcher {
    pub(super) pending: VecDeque<WatchEvent>,
    /// Always `Some` until dropped.
    pub(super) rx: Option<broadcast::Receiver<WatchEvent>>,
    pub(super) registry: Weak<Shared>,
    pub(super) service: ServiceKey,
    /// The last revision handed out; never hand out an older one.
    pub(super) last: Revision,
}

impl Watcher {
    pub(super) async fn next(mut self) -> Option<(Result<WatchEvent, RegistryError>, Self)> {
        loop {
            let event = match self.pending.pop_front() {
                Some(event) => event,
                None => match self.rx.as_mut()?.recv().await {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Too slow to follow every change: start over from the current state.
                        let shared = self.registry.upgrade()?;
                        let state = shared.lock();
                        self.rx = self.rx.as_ref().map(broadcast::Receiver::resubscribe);
                        WatchEvent::Snapshot {
                            revision: state.revision,
                            instances: state.snapshot(&self.service),
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            };
            let is_snapshot = matches!(event, WatchEvent::Snapshot { .. });
            if is_snapshot || event.revision() > self.last {
                self.last = self.last.max(event.revision());
                return Some((Ok(event), self));
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // The last watcher of a service with no instances takes its entry along.
        drop(self.rx.take());
        if let Some(shared) = self.registry.upgrade() {
            let mut state = shared.lock();
            state.watchers = state.watchers.saturating_sub(1);
            state.drop_if_unused(&self.service);
        }
    }
}

impl State {
    /// Records a change under the next revision: tells the service's
    /// watchers, and remembers it for those that resume.
    pub(super) fn record(&mut self, service: Arc<ServiceKey>, what: Changed) {
        self.revision += 1;
        let change = Change {
            service,
            revision: self.revision,
            what,
        };
        if let Some(tx) = self
            .services
            .get(&*change.service)
            .and_then(|s| s.events.as_ref())
            && tx.receiver_count() > 0
        {
            // Receivers may all go in the meantime; that is fine.
            let _ = tx.send(change.event());
        }
        self.history_bytes += change.footprint();
        self.history.push_back(change);
        while self.history.len() > self.history_cap || self.history_bytes > self.history_bytes_cap {
            let Some(old) = self.history.pop_front() else {
                break;
            };
            self.history_bytes = self.history_bytes.saturating_sub(old.footprint());
            self.compacted = old.revision;
        }
    }
}

impl MemoryRegistry {
    /// Watches `service` (see [`Registry::watch`]): the changes after
    /// `since` from the history, or a snapshot, then each change as it is
    /// recorded.
    pub(super) fn open_watch(&self, service: &ServiceKey, since: Option<Revision>) -> WatchStream {
        let mut state = self.shared.lock();
        self.ensure_sweeper(&mut state);
        let revision = state.revision;
        let initial: VecDeque<WatchEvent> = match since {
            Some(since) if since >= state.compacted && since <= revision => state
                .history
                .iter()
                .filter(|c| *c.service == *service && c.revision > since)
                .map(Change::event)
                .collect(),
            _ => VecDeque::from([WatchEvent::Snapshot {
                revision,
                instances: state.snapshot(service),
            }]),
        };
        let entry = state
            .services
            .entry(Arc::new(service.clone()))
            .or_insert_with(new_service);
        let rx = entry
            .events
            .get_or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
            .subscribe();
        state.watchers += 1;
        drop(state);

        let watcher = Watcher {
            pending: initial,
            rx: Some(rx),
            registry: Arc::downgrade(&self.shared),
            service: service.clone(),
            last: since.unwrap_or(0).min(revision),
        };
        Box::pin(stream::unfold(watcher, Watcher::next))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{inst, next};
    use super::super::*;
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn watch_sees_expiry_as_delete() {
        let r = MemoryRegistry::new();
        let key = ServiceKey::new("svc");
        let mut w = r.watch(&key, None).await.unwrap();
        assert!(
            matches!(next(&mut w).await, WatchEvent::Snapshot { instances, .. } if instances.is_empty())
        );
        r.register(inst("a"), Duration::from_secs(1)).await.unwrap();
        assert!(
            matches!(next(&mut w).await, WatchEvent::Put { instance, .. } if instance.id == "a")
        );
        assert!(matches!(next(&mut w).await, WatchEvent::Delete { id, .. } if id == "a"));
    }

    #[tokio::test]
    async fn resume_from_revision_replays_exactly_what_was_missed() {
        let r = MemoryRegistry::new();
        let key = ServiceKey::new("svc");
        let ttl = Duration::from_secs(60);
        r.register(inst("a"), ttl).await.unwrap();
        let seen = r.revision();
        r.register(inst("bb"), ttl).await.unwrap();
        r.deregister(&inst("a").instance_key()).await.unwrap();
        r.register(Instance::new("other", "x:1"), ttl)
            .await
            .unwrap();
        let mut w = r.watch(&key, Some(seen)).await.unwrap();
        assert!(
            matches!(next(&mut w).await, WatchEvent::Put { revision, instance } if revision == seen + 1 && instance.id == "bb")
        );
        assert!(
            matches!(next(&mut w).await, WatchEvent::Delete { revision, id } if revision == seen + 2 && id == "a")
        );
        r.register(inst("ccc"), ttl).await.unwrap();
        assert!(
            matches!(next(&mut w).await, WatchEvent::Put { instance, .. } if instance.id == "ccc")
        );
    }

    #[tokio::test]
    async fn resume_from_forgotten_revision_gets_a_snapshot() {
        let r = MemoryRegistry::with_history(2);
        let key = ServiceKey::new("svc");
        let ttl = Duration::from_secs(60);
        for id in ["a", "bb", "ccc", "dddd"] {
            r.register(inst(id), ttl).await.unwrap();
        }
        let mut w = r.watch(&key, Some(1)).await.unwrap();
        match next(&mut w).await {
            WatchEvent::Snapshot {
                revision,
                instances,
            } => {
                assert_eq!(revision, 4);
                assert_eq!(instances.len(), 4);
            }
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn slow_watcher_gets_a_snapshot_instead_of_stalling() {
        let r = MemoryRegistry::new();
        let key = ServiceKey::new("svc");
        let mut w = r.watch(&key, None).await.unwrap();
        next(&mut w).await;
        for n in 0..(WATCH_BUFFER + 10) {
            r.register(inst(&"x".repeat(n + 1)), Duration::from_secs(60))
                .await
                .unwrap();
        }
        match next(&mut w).await {
            WatchEvent::Snapshot {
                revision,
                instances,
            } => {
                assert_eq!(revision, r.revision());
                assert_eq!(instances.len(), WATCH_BUFFER + 10);
            }
            other => panic!("expected a snapshot after lagging, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn watching_an_empty_service_leaves_nothing_behind() {
        let r = MemoryRegistry::new();
        let w = r.watch(&ServiceKey::new("ghost"), None).await.unwrap();
        assert_eq!(r.shared.lock().services.len(), 1);
        drop(w);
        assert_eq!(r.shared.lock().services.len(), 0);
    }

    #[tokio::test]
    async fn the_history_is_bounded_in_bytes_and_services_in_size() {
        let r = MemoryRegistry::builder().history_bytes(1024 * 1024).build();
        let limits = Limits::default();
        let mut big = inst("big");
        for n in 0..4 {
            big.metadata.insert(format!("k{n}"), "v".repeat(4000));
        }
        for n in 0..2_000 {
            big.version = format!("v{n}");
            r.register(big.clone(), Duration::from_secs(30))
                .await
                .unwrap();
        }
        let (bytes, changes) = {
            let state = r.shared.lock();
            (state.history_bytes, state.history.len())
        };
        assert!(bytes <= 1024 * 1024, "{bytes}");
        assert!(changes < 2_000 && changes > 0, "{changes}");
        // A resume from before the forgotten changes gets a snapshot.
        let mut w = r.watch(&ServiceKey::new("svc"), Some(1)).await.unwrap();
        assert!(matches!(next(&mut w).await, WatchEvent::Snapshot { .. }));

        // A service's instances cannot add up to more than fits in a message.
        let mut n = 0;
        let error = loop {
            big.id = format!("big{n}");
            n += 1;
            if let Err(e) = r.register(big.clone(), Duration::from_secs(30)).await {
                break e;
            }
        };
        assert!(matches!(error, RegistryError::Invalid(_)), "{error}");
        assert!(error.to_string().contains("past its limit"), "{error}");
        let bytes: usize = r
            .instances(&ServiceKey::new("svc"))
            .await
            .unwrap()
            .iter()
            .map(instance_size)
            .sum();
        assert!(bytes <= limits.max_service_bytes);
        // Deregistering makes room again.
        for id in ["big0", "big1"] {
            r.deregister(&inst(id).instance_key()).await.unwrap();
        }
        r.register(big, Duration::from_secs(30)).await.unwrap();
    }
}
