//! [`MemoryRegistry`]: a complete registry inside one process.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::stream;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use super::{Registry, RegistryError, Revision, WatchEvent, WatchStream, validate};
use crate::{Instance, InstanceKey, ServiceKey};

/// How many recent changes the registry remembers for watchers that resume.
const DEFAULT_HISTORY: usize = 4096;
/// How many undelivered events a watcher may fall behind before it is sent a
/// fresh snapshot instead.
const WATCH_BUFFER: usize = 256;

/// A registry that lives in the memory of one process.
///
/// It implements the whole [`Registry`] contract: leases expire when their
/// TTL passes without a heartbeat (a background task evicts them on time and
/// tells watchers), watchers get ordered events with revisions and can resume
/// from a revision within the last 4096 changes, and a watcher that falls
/// more than 256 events behind is sent a fresh snapshot rather than slowing
/// anyone down.
///
/// Cloning is cheap and every clone is the same registry, which makes it the
/// natural choice for tests and for several services inside one process.
/// Expiry uses Tokio's clock, so tests may run it with paused time.
///
/// ```
/// use std::time::Duration;
/// use lodestar_core::{Instance, MemoryRegistry, Registry, RegistryError, ServiceKey};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let registry = MemoryRegistry::new();
/// let instance = Instance::new("orders", "127.0.0.1:7001");
/// let key = instance.instance_key();
/// registry.register(instance, Duration::from_secs(2)).await.unwrap();
///
/// tokio::time::sleep(Duration::from_secs(3)).await; // no heartbeat: the lease runs out
/// assert!(registry.instances(&ServiceKey::new("orders")).await.unwrap().is_empty());
/// assert!(matches!(registry.heartbeat(&key).await, Err(RegistryError::NotFound(_))));
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryRegistry {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the expiry task when a lease may now end sooner, or on drop.
    wake: Arc<Notify>,
}

struct State {
    revision: Revision,
    services: HashMap<ServiceKey, ServiceEntry>,
    /// Recent changes, oldest first, for watchers that resume.
    history: VecDeque<(ServiceKey, WatchEvent)>,
    history_cap: usize,
    /// Watchers resuming from a revision below this get a snapshot.
    compacted: Revision,
    sweeper: Option<tokio::task::JoinHandle<()>>,
}

struct ServiceEntry {
    instances: BTreeMap<String, Lease>,
    events: Option<broadcast::Sender<WatchEvent>>,
}

struct Lease {
    instance: Instance,
    ttl: Duration,
    expires: Instant,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("MemoryRegistry")
            .field("revision", &state.revision)
            .field("services", &state.services.len())
            .finish()
    }
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::with_history(DEFAULT_HISTORY)
    }

    /// An empty registry that remembers the last `changes` changes for
    /// watchers that resume (default 4096).
    pub fn with_history(changes: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    revision: 0,
                    services: HashMap::new(),
                    history: VecDeque::new(),
                    history_cap: changes.max(1),
                    compacted: 0,
                    sweeper: None,
                }),
                wake: Arc::new(Notify::new()),
            }),
        }
    }

    /// The revision of the latest change.
    pub fn revision(&self) -> Revision {
        self.shared.lock().revision
    }

    fn ensure_sweeper(&self, state: &mut State) {
        if state.sweeper.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(&self.shared);
        let wake = self.shared.wake.clone();
        state.sweeper = Some(handle.spawn(sweep(weak, wake)));
    }
}

/// Evicts expired leases on time. Holds only a weak reference, and ends when
/// the registry is dropped.
async fn sweep(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let notified = wake.notified();
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut state = shared.lock();
            state.evict_expired(Instant::now())
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Let the sweeper notice that the registry is gone.
        self.wake.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-changed
        // in a way that matters more than losing the registry, so recover.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn next_revision(&mut self) -> Revision {
        self.revision += 1;
        self.revision
    }

    fn record(&mut self, key: &ServiceKey, event: WatchEvent) {
        if let Some(tx) = self.services.get(key).and_then(|s| s.events.as_ref()) {
            // No receivers is fine: nobody is watching right now.
            let _ = tx.send(event.clone());
        }
        self.history.push_back((key.clone(), event));
        while self.history.len() > self.history_cap {
            if let Some((_, old)) = self.history.pop_front() {
                self.compacted = old.revision();
            }
        }
    }

    fn remove(&mut self, key: &ServiceKey, id: &str) -> bool {
        let removed = self
            .services
            .get_mut(key)
            .and_then(|s| s.instances.remove(id))
            .is_some();
        if removed {
            let revision = self.next_revision();
            self.record(
                key,
                WatchEvent::Delete {
                    revision,
                    id: id.to_owned(),
                },
            );
            self.drop_if_unused(key);
        }
        removed
    }

    fn drop_if_unused(&mut self, key: &ServiceKey) {
        let unused = self.services.get(key).is_some_and(|s| {
            s.instances.is_empty() && s.events.as_ref().is_none_or(|tx| tx.receiver_count() == 0)
        });
        if unused {
            self.services.remove(key);
        }
    }

    /// Removes every lease that ended at or before `now`; returns when the
    /// next one ends.
    fn evict_expired(&mut self, now: Instant) -> Option<Instant> {
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        for (key, service) in &self.services {
            for (id, lease) in &service.instances {
                if lease.expires <= now {
                    expired.push((key.clone(), id.clone()));
                } else {
                    next = Some(next.map_or(lease.expires, |n| n.min(lease.expires)));
                }
            }
        }
        for (key, id) in expired {
            tracing::info!(service = %key, instance = %id, "lease expired; instance evicted");
            self.remove(&key, &id);
        }
        next
    }

    fn snapshot(&self, key: &ServiceKey) -> Vec<Instance> {
        self.services
            .get(key)
            .map(|s| s.instances.values().map(|l| l.instance.clone()).collect())
            .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl Registry for MemoryRegistry {
    async fn register(&self, instance: Instance, ttl: Duration) -> Result<(), RegistryError> {
        validate(&instance, ttl)?;
        let now = Instant::now();
        let key = instance.key.clone();
        let mut state = self.shared.lock();
        self.ensure_sweeper(&mut state);
        let service = state
            .services
            .entry(key.clone())
            .or_insert_with(|| ServiceEntry {
                instances: BTreeMap::new(),
                events: None,
            });
        let lease = Lease {
            instance: instance.clone(),
            ttl,
            expires: now + ttl,
        };
        let previous = service.instances.insert(instance.id.clone(), lease);
        // Re-registering an unchanged instance only renews its lease.
        if previous.as_ref().is_none_or(|p| p.instance != instance) {
            let revision = state.next_revision();
            state.record(&key, WatchEvent::Put { revision, instance });
        }
        drop(state);
        self.shared.wake.notify_one();
        Ok(())
    }

    async fn heartbeat(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let lease = state
            .services
            .get_mut(&key.service)
            .and_then(|s| s.instances.get_mut(&key.id));
        match lease {
            None => Err(RegistryError::NotFound(key.clone())),
            Some(lease) if lease.expires <= now => {
                state.remove(&key.service, &key.id);
                Err(RegistryError::LeaseExpired(key.clone()))
            }
            Some(lease) => {
                lease.expires = now + lease.ttl;
                Ok(())
            }
        }
    }

    async fn deregister(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        self.shared.lock().remove(&key.service, &key.id);
        Ok(())
    }

    async fn instances(&self, service: &ServiceKey) -> Result<Vec<Instance>, RegistryError> {
        let mut state = self.shared.lock();
        self.ensure_sweeper(&mut state);
        Ok(state.snapshot(service))
    }

    async fn services(&self, namespace: &str) -> Result<Vec<ServiceKey>, RegistryError> {
        let state = self.shared.lock();
        let mut keys: Vec<ServiceKey> = state
            .services
            .iter()
            .filter(|(k, s)| k.namespace == namespace && !s.instances.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        Ok(keys)
    }

    async fn watch(
        &self,
        service: &ServiceKey,
        since: Option<Revision>,
    ) -> Result<WatchStream, RegistryError> {
        let mut state = self.shared.lock();
        self.ensure_sweeper(&mut state);
        let revision = state.revision;
        let initial: VecDeque<WatchEvent> = match since {
            Some(since) if since >= state.compacted && since <= revision => state
                .history
                .iter()
                .filter(|(k, e)| k == service && e.revision() > since)
                .map(|(_, e)| e.clone())
                .collect(),
            _ => VecDeque::from([WatchEvent::Snapshot {
                revision,
                instances: state.snapshot(service),
            }]),
        };
        let entry = state
            .services
            .entry(service.clone())
            .or_insert_with(|| ServiceEntry {
                instances: BTreeMap::new(),
                events: None,
            });
        let rx = entry
            .events
            .get_or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
            .subscribe();
        drop(state);

        let watcher = Watcher {
            pending: initial,
            rx: Some(rx),
            registry: Arc::downgrade(&self.shared),
            service: service.clone(),
            last: since.unwrap_or(0).min(revision),
        };
        Ok(Box::pin(stream::unfold(watcher, Watcher::next)))
    }
}

struct Watcher {
    pending: VecDeque<WatchEvent>,
    /// Always `Some` until dropped.
    rx: Option<broadcast::Receiver<WatchEvent>>,
    registry: Weak<Shared>,
    service: ServiceKey,
    /// The last revision handed out; never hand out an older one.
    last: Revision,
}

impl Watcher {
    async fn next(mut self) -> Option<(Result<WatchEvent, RegistryError>, Self)> {
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
            shared.lock().drop_if_unused(&self.service);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn inst(id: &str) -> Instance {
        Instance::new("svc", format!("127.0.0.1:{}", 1000 + id.len())).with_id(id)
    }

    async fn next(stream: &mut WatchStream) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("watch event within 5s")
            .expect("stream open")
            .expect("no error")
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expires_without_heartbeat_and_is_renewed_with_one() {
        let r = MemoryRegistry::new();
        let key = ServiceKey::new("svc");
        r.register(inst("a"), Duration::from_secs(3)).await.unwrap();
        r.register(inst("bb"), Duration::from_secs(3))
            .await
            .unwrap();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            r.heartbeat(&inst("a").instance_key()).await.unwrap();
        }
        let left: Vec<String> = r
            .instances(&key)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(left, vec!["a".to_owned()]);
        assert_eq!(
            r.heartbeat(&inst("bb").instance_key()).await,
            Err(RegistryError::NotFound(inst("bb").instance_key()))
        );
    }

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
    async fn invalid_registrations_are_refused_and_change_nothing() {
        let r = MemoryRegistry::new();
        let err = r
            .register(inst("a").with_id(""), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("empty id"), "{err}");
        let err = r.register(inst("a"), Duration::ZERO).await.unwrap_err();
        assert!(err.to_string().contains("TTL"), "{err}");
        assert_eq!(r.revision(), 0);
        assert!(r.services("default").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn unchanged_reregistration_is_not_a_change() {
        let r = MemoryRegistry::new();
        r.register(inst("a"), Duration::from_secs(5)).await.unwrap();
        r.register(inst("a"), Duration::from_secs(5)).await.unwrap();
        assert_eq!(r.revision(), 1);
        r.register(inst("a").with_version("2"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(r.revision(), 2);
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
    async fn namespaces_are_isolated() {
        let r = MemoryRegistry::new();
        let staging = ServiceKey::new("svc").with_namespace("staging");
        r.register(
            inst("a").with_service_key(staging.clone()),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(
            r.instances(&ServiceKey::new("svc"))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(r.instances(&staging).await.unwrap().len(), 1);
        assert_eq!(r.services("staging").await.unwrap(), vec![staging]);
        assert!(r.services("default").await.unwrap().is_empty());
    }
}
