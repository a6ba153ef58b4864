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

/// Eureka's self-preservation, done right.
///
/// When most instances stop renewing at once, it is more likely that the
/// registry lost touch with them (a network partition on its side) than
/// that they all died together. Self-preservation then freezes expiry:
/// nothing is marked unhealthy or evicted until renewals recover.
///
/// Eureka estimates renewals per minute from a fixed 30 s interval, updates
/// the estimate rarely, and needs peers. Here an instance *keeps up* if it
/// renewed within two of its own heartbeat intervals (a third of its TTL
/// each), so any interval works and nothing is averaged. Only instances
/// registered right now count, so graceful scale-downs and earlier evictions
/// lower the bar at once. It needs no peers, so it works on a single node.
/// It engages when fewer than `threshold` of the ephemeral instances keep
/// up, which happens before their leases (three intervals) run out. It
/// releases when at least halfway from `threshold` to all of them keep up
/// again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelfPreservation {
    /// Engage when fewer than this fraction of the ephemeral instances keep
    /// up. Default: 0.5.
    pub threshold: f64,
    /// Never engage with fewer ephemeral instances than this. Default: 3.
    pub min_instances: usize,
    /// Release after this long even if renewals have not recovered: the
    /// instances may really be gone (a zone lost, a deploy that killed its
    /// old instances). Clients skip dead instances on their own meanwhile.
    /// Default: 15 minutes.
    pub max_duration: Duration,
}

impl Default for SelfPreservation {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            min_instances: 3,
            max_duration: Duration::from_secs(15 * 60),
        }
    }
}

/// What a registry is doing, for operators and dashboards.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryStats {
    /// The latest revision.
    pub revision: Revision,
    /// Services with at least one instance.
    pub services: usize,
    /// Instances, ephemeral and persistent.
    pub instances: usize,
    /// Ephemeral instances (those with leases).
    pub ephemeral: usize,
    /// Ephemeral instances that renewed within two of their heartbeat
    /// intervals (a third of their TTL each): those that are keeping up.
    pub renewing: usize,
    /// Whether self-preservation has frozen expiry.
    pub self_preservation: bool,
}

/// Configures a [`MemoryRegistry`]; every setting has a documented default.
#[derive(Debug, Clone)]
pub struct MemoryRegistryBuilder {
    history: usize,
    grace: Duration,
    preservation: Option<SelfPreservation>,
    first_revision: Revision,
}

impl MemoryRegistryBuilder {
    /// How many recent changes to remember for watchers that resume. Default: 4096.
    pub fn history(mut self, changes: usize) -> Self {
        self.history = changes.max(1);
        self
    }

    /// Two-stage expiry: an instance whose lease ran out is first marked
    /// unhealthy (clients stop picking it), and evicted `grace` later if it
    /// does not come back. Default: zero (evicted at once).
    pub fn eviction_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The revision the registry starts at. A server that restarts can start
    /// past every revision it ever handed out (for example, the clock in
    /// microseconds), so a watcher of its earlier life resumes with a
    /// snapshot rather than a wrong history. Default: 0.
    pub fn first_revision(mut self, revision: Revision) -> Self {
        self.first_revision = revision;
        self
    }

    /// Turns on [`SelfPreservation`]. Default: off.
    pub fn self_preservation(mut self, preservation: SelfPreservation) -> Self {
        self.preservation = Some(preservation);
        self
    }

    /// Builds the registry.
    pub fn build(self) -> MemoryRegistry {
        MemoryRegistry {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    revision: self.first_revision,
                    services: HashMap::new(),
                    history: VecDeque::new(),
                    history_cap: self.history,
                    compacted: self.first_revision,
                    sweeper: None,
                    grace: self.grace,
                    preservation: self.preservation,
                    preserving: false,
                    preserving_since: None,
                    disabled: std::collections::HashSet::new(),
                    ephemeral: 0,
                }),
                wake: Arc::new(Notify::new()),
            }),
        }
    }
}

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
    /// How long an expired instance stays (unhealthy) before eviction.
    grace: Duration,
    preservation: Option<SelfPreservation>,
    /// Whether self-preservation has frozen expiry.
    preserving: bool,
    /// Since when.
    preserving_since: Option<Instant>,
    /// Instances operators took out of traffic; kept across re-registrations.
    disabled: std::collections::HashSet<InstanceKey>,
    /// How many instances hold leases.
    ephemeral: usize,
}

struct ServiceEntry {
    instances: BTreeMap<String, Lease>,
    events: Option<broadcast::Sender<WatchEvent>>,
    /// Below this healthy fraction, lookups return every instance.
    protection: f64,
}

struct Lease {
    instance: Instance,
    /// `None` for persistent instances, which never expire.
    ttl: Option<Duration>,
    renewed: Instant,
    /// The lease ran out and the instance is marked unhealthy.
    expired: bool,
}

impl Lease {
    fn expires(&self) -> Option<Instant> {
        self.ttl.map(|ttl| self.renewed + ttl)
    }
}

fn new_service() -> ServiceEntry {
    ServiceEntry {
        instances: BTreeMap::new(),
        events: None,
        protection: 0.0,
    }
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
    /// An empty registry with default settings.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// An empty registry that remembers the last `changes` changes for
    /// watchers that resume (default 4096).
    pub fn with_history(changes: usize) -> Self {
        Self::builder().history(changes).build()
    }

    /// Configures a registry.
    pub fn builder() -> MemoryRegistryBuilder {
        MemoryRegistryBuilder {
            history: DEFAULT_HISTORY,
            grace: Duration::ZERO,
            preservation: None,
            first_revision: 0,
        }
    }

    /// Registers an instance without a lease: it stays until deregistered,
    /// and its health is whatever [`set_health`](Self::set_health) last said
    /// (initially `instance.healthy`).
    pub fn register_persistent(&self, mut instance: Instance) -> Result<(), RegistryError> {
        validate(&instance, Duration::from_secs(1))?;
        instance.ephemeral = false;
        self.upsert(instance, None);
        Ok(())
    }

    /// Sets the health of a registered instance (for persistent instances,
    /// whose health an outside checker decides). Unknown instances are an error.
    pub fn set_health(&self, key: &InstanceKey, healthy: bool) -> Result<(), RegistryError> {
        self.update(key, |i| i.healthy = healthy)
    }

    /// Takes an instance out of traffic (`false`) or puts it back, without
    /// touching its lease. The choice outlives re-registrations of the
    /// instance (until this registry restarts).
    pub fn set_enabled(&self, key: &InstanceKey, enabled: bool) -> Result<(), RegistryError> {
        self.update(key, |i| i.enabled = enabled)?;
        let mut state = self.shared.lock();
        if enabled {
            state.disabled.remove(key);
        } else {
            state.disabled.insert(key.clone());
        }
        Ok(())
    }

    /// Sets the protection threshold of a service (0 turns it off, the
    /// default): while fewer than this fraction of its instances are
    /// healthy, [`instances`](Registry::instances) returns all of them as
    /// healthy, rather than funnel all traffic onto the few left.
    pub fn set_protection_threshold(&self, service: &ServiceKey, threshold: f64) {
        let mut state = self.shared.lock();
        state
            .services
            .entry(service.clone())
            .or_insert_with(new_service)
            .protection = threshold.clamp(0.0, 1.0);
    }

    /// A lookup, and whether the service's protection threshold applied
    /// (every instance reported healthy).
    pub fn lookup(&self, service: &ServiceKey) -> (Vec<Instance>, bool) {
        let mut state = self.shared.lock();
        self.ensure_sweeper(&mut state);
        state.lookup(service)
    }

    /// How many instances a service has, and how many are really healthy
    /// (whatever the protection threshold makes lookups say).
    pub fn health(&self, service: &ServiceKey) -> (usize, usize) {
        let state = self.shared.lock();
        let instances = state.snapshot(service);
        let healthy = instances.iter().filter(|i| i.healthy).count();
        (instances.len(), healthy)
    }

    /// One instance as stored (real health, whatever the protection
    /// threshold), and whether it is persistent; `None` if unknown.
    pub fn get(&self, key: &InstanceKey) -> Option<(Instance, bool)> {
        let state = self.shared.lock();
        let lease = state.services.get(&key.service)?.instances.get(&key.id)?;
        Some((lease.instance.clone(), lease.ttl.is_none()))
    }

    /// Every persistent instance (for saving them).
    pub fn persistent_instances(&self) -> Vec<Instance> {
        let state = self.shared.lock();
        state
            .services
            .values()
            .flat_map(|s| s.instances.values())
            .filter(|l| l.ttl.is_none())
            .map(|l| l.instance.clone())
            .collect()
    }

    /// What the registry is doing.
    pub fn stats(&self) -> RegistryStats {
        let state = self.shared.lock();
        RegistryStats {
            revision: state.revision,
            services: state
                .services
                .values()
                .filter(|s| !s.instances.is_empty())
                .count(),
            instances: state.services.values().map(|s| s.instances.len()).sum(),
            ephemeral: state.ephemeral,
            renewing: state.renewing(Instant::now()).0,
            self_preservation: state.preserving,
        }
    }

    fn update(
        &self,
        key: &InstanceKey,
        change: impl FnOnce(&mut Instance),
    ) -> Result<(), RegistryError> {
        let mut state = self.shared.lock();
        let lease = state
            .services
            .get_mut(&key.service)
            .and_then(|s| s.instances.get_mut(&key.id))
            .ok_or_else(|| RegistryError::NotFound(key.clone()))?;
        let before = lease.instance.clone();
        change(&mut lease.instance);
        if lease.instance != before {
            let instance = lease.instance.clone();
            let revision = state.next_revision();
            state.record(&key.service, WatchEvent::Put { revision, instance });
        }
        Ok(())
    }

    /// Adds or replaces an instance; `ttl: None` means persistent.
    fn upsert(&self, mut instance: Instance, ttl: Option<Duration>) {
        let now = Instant::now();
        let key = instance.key.clone();
        let mut state = self.shared.lock();
        self.ensure_sweeper(&mut state);
        if state.disabled.contains(&instance.instance_key()) {
            // An operator took it out of traffic; registering again does not undo that.
            instance.enabled = false;
        }
        let lease = Lease {
            instance: instance.clone(),
            ttl,
            renewed: now,
            expired: false,
        };
        let previous = state
            .services
            .entry(key.clone())
            .or_insert_with(new_service)
            .instances
            .insert(instance.id.clone(), lease);
        if let Some(previous) = &previous {
            state.forget_lease(previous.ttl);
        }
        state.add_lease(ttl);
        // Re-registering an unchanged instance only renews its lease.
        if previous.as_ref().is_none_or(|p| p.instance != instance) {
            let revision = state.next_revision();
            state.record(&key, WatchEvent::Put { revision, instance });
        }
        drop(state);
        self.shared.wake.notify_one();
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

    fn add_lease(&mut self, ttl: Option<Duration>) {
        if ttl.is_some() {
            self.ephemeral += 1;
        }
    }

    fn forget_lease(&mut self, ttl: Option<Duration>) {
        if ttl.is_some() {
            self.ephemeral = self.ephemeral.saturating_sub(1);
        }
    }

    /// Ephemeral instances that renewed within two heartbeat intervals,
    /// and the share of the expected renewals they stand for: each instance
    /// weighs as much as the heartbeats it should send (3 / TTL), so that
    /// instances with long leases cannot hide the silence of those with
    /// short ones.
    fn renewing(&self, now: Instant) -> (usize, f64) {
        let (mut count, mut fresh, mut total) = (0, 0.0, 0.0);
        for lease in self.services.values().flat_map(|s| s.instances.values()) {
            let Some(ttl) = lease.ttl else {
                continue;
            };
            let weight = 3.0 / ttl.as_secs_f64().max(0.001);
            total += weight;
            if now.saturating_duration_since(lease.renewed) < ttl * 2 / 3 {
                count += 1;
                fresh += weight;
            }
        }
        (count, if total > 0.0 { fresh / total } else { 1.0 })
    }

    /// Engages or releases self-preservation; true while engaged.
    fn preserve(&mut self, now: Instant) -> bool {
        let Some(preservation) = self.preservation else {
            return false;
        };
        let total = self.ephemeral;
        let (renewing, keeping_up) = self.renewing(now);
        let engage = total >= preservation.min_instances && keeping_up < preservation.threshold;
        let overdue = self
            .preserving_since
            .is_some_and(|since| now.saturating_duration_since(since) >= preservation.max_duration);
        let release = keeping_up >= (1.0 + preservation.threshold) / 2.0
            || total < preservation.min_instances
            || overdue;
        if overdue && self.preserving {
            tracing::warn!(
                "self-preservation held for {:?} without renewals recovering; the silent instances \
                 are taken to be gone and expiry resumes",
                preservation.max_duration
            );
        }
        if !self.preserving && engage {
            self.preserving = true;
            self.preserving_since = Some(now);
            tracing::warn!(
                renewing,
                instances = total,
                "SELF-PRESERVATION ENGAGED: only {renewing} of {total} instances are renewing their \
                 leases; nothing expires until they recover (a partition on the registry's side is \
                 likelier than all of them dying at once)"
            );
        } else if self.preserving && release {
            self.preserving = false;
            self.preserving_since = None;
            // Renewals recovered: leases that ran out while expiry was frozen
            // get one full TTL from now, since heartbeats come back spread
            // over an interval. (After giving up, they are taken to be gone.)
            if !overdue {
                for lease in self
                    .services
                    .values_mut()
                    .flat_map(|s| s.instances.values_mut())
                {
                    if lease.expires().is_some_and(|expires| expires <= now) {
                        lease.renewed = now;
                    }
                }
            }
            tracing::warn!(
                renewing,
                instances = total,
                "self-preservation released: renewals recovered; expiry resumes"
            );
        }
        self.preserving
    }

    fn remove(&mut self, key: &ServiceKey, id: &str) -> bool {
        let removed = self
            .services
            .get_mut(key)
            .and_then(|s| s.instances.remove(id));
        if let Some(lease) = &removed {
            self.forget_lease(lease.ttl);
        }
        let removed = removed.is_some();
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
            s.instances.is_empty()
                && s.protection == 0.0
                && s.events.as_ref().is_none_or(|tx| tx.receiver_count() == 0)
        });
        if unused {
            self.services.remove(key);
        }
    }

    /// Marks instances whose lease ran out unhealthy, and evicts those past
    /// the grace period, unless self-preservation holds; returns when to look again.
    fn evict_expired(&mut self, now: Instant) -> Option<Instant> {
        let preserving = self.preserve(now);
        let mut unhealthy = Vec::new();
        let mut evicted = Vec::new();
        let mut next: Option<Instant> = None;
        let mut soonest = |at: Instant| next = Some(next.map_or(at, |n: Instant| n.min(at)));
        for (key, service) in &self.services {
            for (id, lease) in &service.instances {
                let Some(expires) = lease.expires() else {
                    continue;
                };
                let evict_at = expires + self.grace;
                if preserving {
                    continue;
                }
                if evict_at <= now {
                    evicted.push((key.clone(), id.clone()));
                } else if expires <= now && !lease.expired {
                    unhealthy.push((key.clone(), id.clone()));
                    soonest(evict_at);
                } else if expires <= now {
                    soonest(evict_at);
                } else {
                    soonest(expires);
                }
            }
        }
        for (key, id) in unhealthy {
            tracing::info!(service = %key, instance = %id, "lease expired; instance marked unhealthy");
            if let Some(lease) = self
                .services
                .get_mut(&key)
                .and_then(|s| s.instances.get_mut(&id))
            {
                lease.expired = true;
                lease.instance.healthy = false;
                let instance = lease.instance.clone();
                let revision = self.next_revision();
                self.record(&key, WatchEvent::Put { revision, instance });
            }
        }
        for (key, id) in evicted {
            tracing::info!(service = %key, instance = %id, "lease expired; instance evicted");
            self.remove(&key, &id);
        }
        // Self-preservation is judged continually while leases exist.
        if self.preservation.is_some() && self.ephemeral > 0 {
            let tick = now + Duration::from_millis(250);
            next = Some(next.map_or(tick, |n| n.min(tick)));
        }
        next
    }

    fn snapshot(&self, key: &ServiceKey) -> Vec<Instance> {
        self.services
            .get(key)
            .map(|s| s.instances.values().map(|l| l.instance.clone()).collect())
            .unwrap_or_default()
    }

    /// A lookup: the instances, all reported healthy while the service is
    /// below its protection threshold.
    /// The instances of `key` as lookups report them, and whether the
    /// protection threshold changed what they say.
    fn lookup(&self, key: &ServiceKey) -> (Vec<Instance>, bool) {
        let mut instances = self.snapshot(key);
        let protection = self.services.get(key).map_or(0.0, |s| s.protection);
        let enabled = instances.iter().filter(|i| i.enabled);
        let (healthy, total) =
            enabled.fold((0, 0), |(h, t), i| (h + usize::from(i.healthy), t + 1));
        let protect = super::below_protection_threshold(healthy, total, protection)
            && instances.iter().any(|i| !i.healthy);
        if protect {
            tracing::debug!(service = %key, healthy, total, "protection threshold: returning every instance");
            for instance in &mut instances {
                instance.healthy = true;
            }
        }
        (instances, protect)
    }
}

#[async_trait::async_trait]
impl Registry for MemoryRegistry {
    async fn register(&self, mut instance: Instance, ttl: Duration) -> Result<(), RegistryError> {
        validate(&instance, ttl)?;
        instance.ephemeral = true;
        self.upsert(instance, Some(ttl));
        Ok(())
    }

    async fn heartbeat(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let grace = state.grace;
        let lease = state
            .services
            .get_mut(&key.service)
            .and_then(|s| s.instances.get_mut(&key.id));
        let Some(lease) = lease else {
            return Err(RegistryError::NotFound(key.clone()));
        };
        if lease
            .expires()
            .is_some_and(|expires| expires + grace <= now)
            && !state.preserving
        {
            // Past eviction, and the sweeper has not got to it yet.
            state.remove(&key.service, &key.id);
            return Err(RegistryError::LeaseExpired(key.clone()));
        }
        let Some(lease) = state
            .services
            .get_mut(&key.service)
            .and_then(|s| s.instances.get_mut(&key.id))
        else {
            return Err(RegistryError::NotFound(key.clone()));
        };
        lease.renewed = now;
        if lease.expired {
            // Back within the grace period: healthy again.
            lease.expired = false;
            lease.instance.healthy = true;
            let instance = lease.instance.clone();
            let revision = state.next_revision();
            state.record(&key.service, WatchEvent::Put { revision, instance });
        }
        Ok(())
    }

    async fn deregister(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        self.shared.lock().remove(&key.service, &key.id);
        Ok(())
    }

    async fn instances(&self, service: &ServiceKey) -> Result<Vec<Instance>, RegistryError> {
        let mut state = self.shared.lock();
        self.ensure_sweeper(&mut state);
        Ok(state.lookup(service).0)
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
            .or_insert_with(new_service);
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

    fn many(n: usize) -> Vec<Instance> {
        (0..n).map(|i| inst(&format!("i{i:02}"))).collect()
    }

    async fn beat(r: &MemoryRegistry, instances: &[Instance]) {
        for i in instances {
            let _ = r.heartbeat(&i.instance_key()).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn two_stage_expiry_marks_unhealthy_then_evicts_and_a_late_heartbeat_heals() {
        let r = MemoryRegistry::builder()
            .eviction_grace(Duration::from_secs(1))
            .build();
        let key = ServiceKey::new("svc");
        let mut w = r.watch(&key, None).await.unwrap();
        next(&mut w).await;
        r.register(inst("a"), Duration::from_secs(2)).await.unwrap();
        r.register(inst("bb"), Duration::from_secs(2))
            .await
            .unwrap();
        next(&mut w).await;
        next(&mut w).await;
        // Both leases run out: both marked unhealthy, still listed.
        for _ in 0..2 {
            assert!(
                matches!(next(&mut w).await, WatchEvent::Put { instance, .. } if !instance.healthy)
            );
        }
        assert_eq!(r.instances(&key).await.unwrap().len(), 2);
        // One comes back within the grace period: healthy again.
        r.heartbeat(&inst("a").instance_key()).await.unwrap();
        assert!(
            matches!(next(&mut w).await, WatchEvent::Put { instance, .. } if instance.id == "a" && instance.healthy)
        );
        // The other is evicted when the grace period ends.
        assert!(matches!(next(&mut w).await, WatchEvent::Delete { id, .. } if id == "bb"));
    }

    #[tokio::test(start_paused = true)]
    async fn self_preservation_engages_when_most_heartbeats_stop_and_releases_when_they_resume() {
        let r = MemoryRegistry::builder()
            .self_preservation(SelfPreservation::default())
            .build();
        let key = ServiceKey::new("svc");
        let all = many(10);
        for i in &all {
            r.register(i.clone(), Duration::from_secs(3)).await.unwrap();
        }
        // Everyone heartbeats every second (TTL / 3) for a while.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all).await;
        }
        assert!(!r.stats().self_preservation);
        // Eight stop at once; two carry on, for much longer than the TTL.
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all[..2]).await;
        }
        let stats = r.stats();
        assert!(stats.self_preservation, "{stats:?}");
        assert_eq!(
            r.instances(&key).await.unwrap().len(),
            10,
            "nothing is evicted"
        );
        assert!(
            r.instances(&key).await.unwrap().iter().all(|i| i.healthy),
            "nothing is even marked"
        );
        // They come back, one after another: preservation is released, and
        // none of them is evicted for coming back a little later than another.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for i in &all {
                r.heartbeat(&i.instance_key()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert!(!r.stats().self_preservation, "{:?}", r.stats());
        assert_eq!(r.instances(&key).await.unwrap().len(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_graceful_scale_down_does_not_trip_self_preservation() {
        let r = MemoryRegistry::builder()
            .self_preservation(SelfPreservation::default())
            .build();
        let all = many(10);
        for i in &all {
            r.register(i.clone(), Duration::from_secs(3)).await.unwrap();
        }
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all).await;
        }
        for i in &all[2..] {
            r.deregister(&i.instance_key()).await.unwrap();
        }
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all[..2]).await;
            assert!(!r.stats().self_preservation, "{:?}", r.stats());
        }
    }

    #[tokio::test]
    async fn below_the_protection_threshold_lookups_return_every_instance() {
        let r = MemoryRegistry::new();
        let key = ServiceKey::new("svc");
        for i in many(4) {
            r.register_persistent(i).unwrap();
        }
        for i in &many(4)[..3] {
            r.set_health(&i.instance_key(), false).unwrap();
        }
        let healthy = |v: Vec<Instance>| v.iter().filter(|i| i.healthy).count();
        assert_eq!(healthy(r.instances(&key).await.unwrap()), 1);
        r.set_protection_threshold(&key, 0.5);
        assert_eq!(healthy(r.instances(&key).await.unwrap()), 4);
        r.set_health(&many(4)[0].instance_key(), true).unwrap();
        assert_eq!(
            healthy(r.instances(&key).await.unwrap()),
            2,
            "at the threshold, the truth"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn persistent_instances_never_expire_and_can_be_disabled() {
        let r = MemoryRegistry::new();
        let key = ServiceKey::new("svc");
        r.register_persistent(inst("db")).unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let found = r.instances(&key).await.unwrap();
        assert_eq!(found.len(), 1);
        assert!(!found[0].ephemeral);
        r.set_enabled(&inst("db").instance_key(), false).unwrap();
        assert!(!r.instances(&key).await.unwrap()[0].enabled);
        assert_eq!(r.persistent_instances().len(), 1);
        assert!(matches!(
            r.set_health(&inst("nope").instance_key(), true),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn long_leases_do_not_hide_the_silence_of_short_ones() {
        let r = MemoryRegistry::builder()
            .self_preservation(SelfPreservation::default())
            .build();
        let short: Vec<Instance> = (0..10).map(|i| inst(&format!("s{i:02}"))).collect();
        let long: Vec<Instance> = (0..10).map(|i| inst(&format!("long{i:02}"))).collect();
        for i in &short {
            r.register(i.clone(), Duration::from_secs(3)).await.unwrap();
        }
        for i in &long {
            r.register(i.clone(), Duration::from_secs(60))
                .await
                .unwrap();
        }
        // Every heartbeat stops (a partition on the registry's side).
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(r.stats().self_preservation, "{:?}", r.stats());
        assert_eq!(
            r.instances(&ServiceKey::new("svc")).await.unwrap().len(),
            20
        );
    }

    #[tokio::test(start_paused = true)]
    async fn self_preservation_gives_up_after_its_maximum_duration() {
        let r = MemoryRegistry::builder()
            .self_preservation(SelfPreservation {
                max_duration: Duration::from_secs(60),
                ..SelfPreservation::default()
            })
            .build();
        let all = many(5);
        for i in &all {
            r.register(i.clone(), Duration::from_secs(3)).await.unwrap();
        }
        // Three die for good; two carry on.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all[..2]).await;
        }
        assert!(r.stats().self_preservation);
        for _ in 0..70 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all[..2]).await;
        }
        assert!(!r.stats().self_preservation);
        assert_eq!(
            r.instances(&ServiceKey::new("svc")).await.unwrap().len(),
            2,
            "the dead are evicted"
        );
    }

    #[tokio::test]
    async fn an_operators_disable_outlives_re_registration() {
        let r = MemoryRegistry::new();
        let key = ServiceKey::new("svc");
        r.register(inst("a"), Duration::from_secs(60))
            .await
            .unwrap();
        r.set_enabled(&inst("a").instance_key(), false).unwrap();
        r.deregister(&inst("a").instance_key()).await.unwrap();
        r.register(inst("a"), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(!r.instances(&key).await.unwrap()[0].enabled);
        r.set_enabled(&inst("a").instance_key(), true).unwrap();
        r.register(inst("a"), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(r.instances(&key).await.unwrap()[0].enabled);
    }
}
