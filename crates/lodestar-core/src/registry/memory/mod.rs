//! [`MemoryRegistry`]: a complete registry inside one process.
//!
//! This module holds the registry itself: its builder, the state behind
//! its lock, and registering, deregistering and looking up. The rest is
//! split by concern:
//!
//! * `expiry`: leases, their timers and the sweeper that expires them;
//! * `preservation`: self-preservation (expiry frozen when most leases
//!   go silent at once) and protection thresholds;
//! * `watch`: the history of changes and the watchers that follow it.

mod expiry;
mod preservation;
mod watch;

pub use preservation::SelfPreservation;

use expiry::{Lease, Timer, after, lease_in, two_intervals};
use preservation::{PRESERVATION_TICK, Renewals};
use watch::{Change, Changed, DEFAULT_HISTORY, DEFAULT_HISTORY_BYTES};

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use super::limits::{Limits, instance_size, quoted};
use super::packed::Packed;
use super::{Registry, RegistryError, Revision, WatchEvent, WatchStream};
use crate::sync::MutexExt;
use crate::{Instance, InstanceKey, ServiceKey};

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
    /// The share of the heartbeats expected from ephemeral instances that
    /// the instances keeping up bring (each instance weighs as its
    /// heartbeat rate): what self-preservation compares with its
    /// threshold. 1 with no ephemeral instances.
    pub keeping_up: f64,
    /// Open watches.
    pub watchers: usize,
    /// Heartbeats that renewed a lease, since the registry was built.
    pub heartbeats: u64,
    /// What happened to instances, since the registry was built.
    pub events: RegistryEvents,
}

/// How many times each thing happened to instances since a registry was
/// built (see [`RegistryStats::events`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RegistryEvents {
    /// An instance the registry did not hold was registered.
    pub registered: u64,
    /// A registered instance changed: registered again with other
    /// details, its health set by a checker, or taken out of traffic or
    /// put back.
    pub updated: u64,
    /// An instance was deregistered.
    pub deregistered: u64,
    /// A lease ran out: the instance was marked unhealthy.
    pub expired: u64,
    /// A lease that had run out was renewed within the eviction grace:
    /// the instance is healthy again.
    pub recovered: u64,
    /// An instance whose lease ran out was evicted after the grace.
    pub evicted: u64,
}

/// The instances of one service and how many of them are healthy (see
/// [`MemoryRegistry::health_of_all`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceHealth {
    /// The service.
    pub service: ServiceKey,
    /// Its instances.
    pub instances: usize,
    /// Those really healthy (whatever the protection threshold makes
    /// lookups say).
    pub healthy: usize,
}

/// What [`MemoryRegistry::lookup_with_revision`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Lookup {
    /// The instances of the service, in id order; every one reported
    /// healthy when `protected`.
    pub instances: Vec<Instance>,
    /// Whether the service's protection threshold applied.
    pub protected: bool,
    /// The revision these instances reflect.
    pub revision: Revision,
}

/// Configures a [`MemoryRegistry`]; every setting has a documented default.
#[derive(Debug, Clone)]
pub struct MemoryRegistryBuilder {
    history: usize,
    history_bytes: usize,
    limits: Limits,
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

    /// How many bytes of instances the remembered changes may hold; the
    /// oldest are forgotten first (a watcher resuming from before them gets
    /// a snapshot). Default: 16 MiB, so that even changes to the largest
    /// instances [`Limits`] allows cannot make the history grow past it.
    pub fn history_bytes(mut self, bytes: usize) -> Self {
        self.history_bytes = bytes;
        self
    }

    /// What registrations are accepted: names, sizes, TTLs. Default:
    /// [`Limits::default`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
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
                    history_bytes: 0,
                    history_bytes_cap: self.history_bytes,
                    reserved: HashSet::new(),
                    compacted: self.first_revision,
                    sweeper: None,
                    grace: self.grace,
                    preservation: self.preservation,
                    preserving: false,
                    preserving_since: None,
                    disabled: HashSet::new(),
                    instances: 0,
                    populated: 0,
                    ephemeral: 0,
                    renewals: Renewals::default(),
                    timers: BinaryHeap::new(),
                    frozen: Vec::new(),
                    next_wake: None,
                    watchers: 0,
                    heartbeats: 0,
                    events: RegistryEvents::default(),
                }),
                wake: Arc::new(Notify::new()),
                limits: self.limits,
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
    /// What registrations are accepted.
    limits: Limits,
}

/// Everything a registry holds, behind one lock.
///
/// Nothing here scans every instance on a timer or per request. Each lease
/// has one [`Timer`], for the next moment something may happen to it: it
/// stops counting as renewing, its lease runs out, or its grace period
/// ends. The timers sit in a heap ordered by time, so the sweeper does work
/// in proportion to what comes due, and is woken only when a new timer is
/// due before it planned to look again. Heartbeats, the most frequent
/// writes, leave the timer alone: finding it early, the sweeper queues it
/// again for the right time. The counts self-preservation judges by
/// ([`Renewals`]) move with each registration, heartbeat, expiry and
/// deregistration.
struct State {
    revision: Revision,
    /// Each service under a shared key that history and timers also hold.
    services: HashMap<Arc<ServiceKey>, ServiceEntry>,
    /// Recent changes, oldest first, for watchers that resume.
    history: VecDeque<Change>,
    history_cap: usize,
    /// What the changes in `history` hold, in bytes, and the most they may.
    history_bytes: usize,
    history_bytes_cap: usize,
    /// Keys being registered as persistent right now (see
    /// [`MemoryRegistry::reserve_persistent`]): ephemeral registrations of
    /// them are refused meanwhile.
    reserved: HashSet<InstanceKey>,
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
    disabled: HashSet<InstanceKey>,
    /// How many instances there are, ephemeral and persistent.
    instances: usize,
    /// How many services have at least one instance.
    populated: usize,
    /// How many instances hold leases.
    ephemeral: usize,
    /// Which leases are keeping up, for self-preservation.
    renewals: Renewals,
    /// When each lease needs looking at next, soonest first.
    timers: BinaryHeap<Timer>,
    /// Timers that came due while self-preservation froze expiry; they are
    /// looked at again when it releases.
    frozen: Vec<Timer>,
    /// When the sweeper will next look at the timers of its own accord
    /// (`None`: only when woken). A timer due earlier wakes it.
    next_wake: Option<Instant>,
    /// Open watches.
    watchers: usize,
    /// Heartbeats that renewed a lease.
    heartbeats: u64,
    /// What happened to instances.
    events: RegistryEvents,
}

struct ServiceEntry {
    /// Each instance under its id, shared with its timer and history.
    instances: BTreeMap<Arc<str>, Lease>,
    events: Option<broadcast::Sender<WatchEvent>>,
    /// Below this healthy fraction, lookups return every instance.
    protection: f64,
    /// What the instances add up to, as [`instance_size`] counts them.
    bytes: usize,
}

fn new_service() -> ServiceEntry {
    ServiceEntry {
        instances: BTreeMap::new(),
        events: None,
        protection: 0.0,
        bytes: 0,
    }
}

/// A key held for a persistent registration in progress; see
/// [`MemoryRegistry::reserve_persistent`]. Dropping it releases the key.
#[derive(Debug)]
pub struct Reservation {
    key: InstanceKey,
    /// `None` once released.
    registry: Option<Weak<Shared>>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(shared) = self.registry.take().and_then(|r| r.upgrade()) {
            shared.lock().reserved.remove(&self.key);
        }
    }
}

/// An instance registered as `was` that someone tried to register as `now`.
fn conflict(key: &InstanceKey, was: &str, now: &str) -> RegistryError {
    RegistryError::Conflict(format!(
        "instance {key} is registered as {was}; deregister it before registering it as {now}"
    ))
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
            history_bytes: DEFAULT_HISTORY_BYTES,
            limits: Limits::default(),
            grace: Duration::ZERO,
            preservation: None,
            first_revision: 0,
        }
    }

    /// Registers an instance without a lease: it stays until deregistered,
    /// and its health is whatever [`set_health`](Self::set_health) last said
    /// (initially `instance.healthy`).
    ///
    /// An instance is persistent or ephemeral for as long as it is
    /// registered: registering a known ephemeral instance as persistent
    /// (or one being registered as persistent as ephemeral) fails with
    /// [`RegistryError::Conflict`]; deregister it first.
    pub fn register_persistent(&self, mut instance: Instance) -> Result<(), RegistryError> {
        self.shared.limits.check_instance(&instance)?;
        instance.ephemeral = false;
        self.upsert(instance, None, None)
    }

    /// Reserves `key` for a persistent registration that is about to be
    /// made durable elsewhere (the registry server's disk) before it is
    /// applied with [`register_reserved`](Self::register_reserved). Until
    /// then, or until the reservation is dropped, ephemeral registrations
    /// of the key are refused, so that the check of its kind and the write
    /// are one step. Fails with [`RegistryError::Conflict`] if the key is
    /// registered as ephemeral or reserved already, and with
    /// [`RegistryError::Invalid`] if the instance is not acceptable.
    pub fn reserve_persistent(&self, instance: &Instance) -> Result<Reservation, RegistryError> {
        self.shared.limits.check_instance(instance)?;
        let key = instance.instance_key();
        let mut state = self.shared.lock();
        if state.is_persistent(&key) == Some(false) {
            return Err(conflict(&key, "ephemeral", "persistent"));
        }
        if !state.reserved.insert(key.clone()) {
            return Err(RegistryError::Conflict(format!(
                "instance {key} is being registered by another request; try again"
            )));
        }
        Ok(Reservation {
            key,
            registry: Some(Arc::downgrade(&self.shared)),
        })
    }

    /// Registers the persistent instance a [`Reservation`] was taken for,
    /// and releases the reservation, in one step.
    pub fn register_reserved(
        &self,
        reservation: Reservation,
        mut instance: Instance,
    ) -> Result<(), RegistryError> {
        instance.ephemeral = false;
        self.upsert(instance, None, Some(reservation))
    }

    /// Sets the health of a registered instance (for persistent instances,
    /// whose health an outside checker decides). Unknown instances are an error.
    pub fn set_health(&self, key: &InstanceKey, healthy: bool) -> Result<(), RegistryError> {
        self.update(key, |i| i.healthy = healthy)
    }

    /// Takes an instance out of traffic (`false`) or puts it back, without
    /// touching its lease. The choice outlives re-registrations of the
    /// instance (until this registry restarts). An unknown instance is an
    /// error ([`RegistryError::NotFound`]); the choice is remembered for
    /// when it registers all the same.
    pub fn set_enabled(&self, key: &InstanceKey, enabled: bool) -> Result<(), RegistryError> {
        {
            let mut state = self.shared.lock();
            if enabled {
                state.disabled.remove(key);
            } else {
                state.disabled.insert(key.clone());
            }
        }
        self.update(key, |i| i.enabled = enabled)
    }

    /// Takes `key` out of traffic whenever it is registered, from now on
    /// (what [`set_enabled`](Self::set_enabled)`(key, false)` does, for an
    /// instance that need not be registered yet: a restarted registry
    /// remembers operators' choices this way).
    pub fn remember_disabled(&self, key: InstanceKey) {
        let _ = self.update(&key, |i| i.enabled = false);
        self.shared.lock().disabled.insert(key);
    }

    /// The instances operators took out of traffic, in key order.
    pub fn disabled(&self) -> Vec<InstanceKey> {
        let mut keys: Vec<InstanceKey> = self.shared.lock().disabled.iter().cloned().collect();
        keys.sort();
        keys
    }

    /// A lookup, and whether the service's protection threshold applied
    /// (every instance reported healthy).
    pub fn lookup(&self, service: &ServiceKey) -> (Vec<Instance>, bool) {
        let mut state = self.shared.lock();
        self.ensure_sweeper(&mut state);
        state.lookup(service)
    }

    /// A lookup, whether the service's protection threshold applied, and
    /// the revision it reflects, all under one lock.
    pub fn lookup_with_revision(&self, service: &ServiceKey) -> Lookup {
        let mut state = self.shared.lock();
        self.ensure_sweeper(&mut state);
        let (instances, protected) = state.lookup(service);
        Lookup {
            instances,
            protected,
            revision: state.revision,
        }
    }

    /// How many instances a service has, and how many are really healthy
    /// (whatever the protection threshold makes lookups say).
    pub fn health(&self, service: &ServiceKey) -> (usize, usize) {
        let state = self.shared.lock();
        state.services.get(service).map_or((0, 0), |s| {
            let healthy = s.instances.values().filter(|l| l.instance.healthy);
            (s.instances.len(), healthy.count())
        })
    }

    /// One instance as stored (real health, whatever the protection
    /// threshold), and whether it is persistent; `None` if unknown.
    pub fn get(&self, key: &InstanceKey) -> Option<(Instance, bool)> {
        let state = self.shared.lock();
        let (service, entry) = state.services.get_key_value(&key.service)?;
        let (id, lease) = entry.instances.get_key_value(key.id.as_str())?;
        Some((lease.instance.unpack(service, id), lease.ttl.is_none()))
    }

    /// Whether an instance is persistent (`Some(true)`) or ephemeral
    /// (`Some(false)`); `None` if unknown. Cheaper than [`get`](Self::get).
    pub fn is_persistent(&self, key: &InstanceKey) -> Option<bool> {
        self.shared.lock().is_persistent(key)
    }

    /// Every persistent instance (for saving them).
    pub fn persistent_instances(&self) -> Vec<Instance> {
        let state = self.shared.lock();
        state
            .services
            .iter()
            .flat_map(|(service, s)| s.instances.iter().map(move |(id, l)| (service, id, l)))
            .filter(|(_, _, l)| l.ttl.is_none())
            .map(|(service, id, l)| l.instance.unpack(service, id))
            .collect()
    }

    /// What the registry is doing.
    pub fn stats(&self) -> RegistryStats {
        let mut state = self.shared.lock();
        state.catch_up(Instant::now());
        RegistryStats {
            revision: state.revision,
            services: state.populated,
            instances: state.instances,
            ephemeral: state.ephemeral,
            renewing: state.renewals.count,
            self_preservation: state.preserving,
            keeping_up: state.renewals.keeping_up(),
            watchers: state.watchers,
            heartbeats: state.heartbeats,
            events: state.events,
        }
    }

    /// Every service with instances, and how many of them are really
    /// healthy (whatever the protection threshold makes lookups say), in
    /// no order: what metrics show. A walk over every instance, under the
    /// registry's lock.
    pub fn health_of_all(&self) -> Vec<ServiceHealth> {
        let state = self.shared.lock();
        state
            .services
            .iter()
            .filter(|(_, s)| !s.instances.is_empty())
            .map(|(service, s)| ServiceHealth {
                service: ServiceKey::clone(service),
                instances: s.instances.len(),
                healthy: s.instances.values().filter(|l| l.instance.healthy).count(),
            })
            .collect()
    }

    fn update(
        &self,
        key: &InstanceKey,
        change: impl FnOnce(&mut Packed),
    ) -> Result<(), RegistryError> {
        let mut guard = self.shared.lock();
        let state = &mut *guard;
        let not_found = || RegistryError::NotFound(key.clone());
        let (service, entry) = state
            .services
            .get_key_value(&key.service)
            .ok_or_else(not_found)?;
        let service = service.clone();
        let id = entry
            .instances
            .get_key_value(key.id.as_str())
            .ok_or_else(not_found)?
            .0
            .clone();
        let lease = lease_in(&mut state.services, &key.service, &key.id).ok_or_else(not_found)?;
        let before = (lease.instance.healthy, lease.instance.enabled);
        change(&mut lease.instance);
        if (lease.instance.healthy, lease.instance.enabled) != before {
            let instance = lease.instance.clone();
            state.events.updated += 1;
            state.record(service, Changed::Put(id, instance));
        }
        Ok(())
    }

    /// Adds or replaces an instance; `ttl: None` means persistent. The
    /// instance was checked against the limits already; here it is checked
    /// against what is registered (its kind, its service's size), all under
    /// one lock with the write.
    fn upsert(
        &self,
        mut instance: Instance,
        ttl: Option<Duration>,
        reservation: Option<Reservation>,
    ) -> Result<(), RegistryError> {
        let size = instance_size(&instance);
        let now = Instant::now();
        let mut guard = self.shared.lock();
        let state = &mut *guard;
        self.ensure_sweeper(state);
        let key = instance.instance_key();
        let reserved_here = reservation.as_ref().is_some_and(|r| r.key == key);
        if let Some(mut reservation) = reservation {
            // Released here, under this lock, rather than by its drop.
            reservation.registry = None;
            state.reserved.remove(&reservation.key);
        }
        match (state.is_persistent(&key), ttl.is_some()) {
            (Some(true), true) => return Err(conflict(&key, "persistent", "ephemeral")),
            (Some(false), false) => return Err(conflict(&key, "ephemeral", "persistent")),
            (None, true) if !reserved_here && state.reserved.contains(&key) => {
                return Err(conflict(&key, "persistent (right now)", "ephemeral"));
            }
            _ => {}
        }
        let limit = self.shared.limits.max_service_bytes;
        let service_bytes = state.services.get(&key.service).map_or(0, |s| {
            let previous = s
                .instances
                .get(key.id.as_str())
                .map_or(0, |l| l.size as usize);
            s.bytes - previous
        });
        if service_bytes + size > limit {
            return Err(RegistryError::Invalid(format!(
                "instance {} of service {}: the service's instances would add up to {} bytes, past \
                 its limit of {limit}; the instance list must fit in one message",
                quoted(&key.id),
                quoted(&key.service.to_string()),
                service_bytes + size,
            )));
        }
        if !state.disabled.is_empty() && state.disabled.contains(&key) {
            // An operator took it out of traffic; registering again does not undo that.
            instance.enabled = false;
        }
        let Some(packed) = Packed::new(&instance) else {
            return Err(RegistryError::Invalid(format!(
                "instance {} of service {} is too large (4 GiB or more of text)",
                quoted(&instance.id),
                quoted(&instance.key.to_string())
            )));
        };
        let size = u32::try_from(size).unwrap_or(u32::MAX);
        let wake = state.put(instance.key, instance.id, packed, size, ttl, now);
        drop(guard);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// The revision of the latest change.
    pub fn revision(&self) -> Revision {
        self.shared.lock().revision
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
        self.state.lock_unpoisoned()
    }
}

impl State {
    /// Whether an instance is persistent; `None` if unknown.
    fn is_persistent(&self, key: &InstanceKey) -> Option<bool> {
        let lease = self
            .services
            .get(&key.service)?
            .instances
            .get(key.id.as_str())?;
        Some(lease.ttl.is_none())
    }

    /// Adds or replaces an instance; `ttl: None` means persistent. True if
    /// the sweeper must be woken.
    fn put(
        &mut self,
        key: ServiceKey,
        id: String,
        instance: Packed,
        size: u32,
        ttl: Option<Duration>,
        now: Instant,
    ) -> bool {
        let service = match self.services.get_key_value(&key) {
            Some((service, _)) => service.clone(),
            None => {
                let service = Arc::new(key);
                self.services.insert(service.clone(), new_service());
                service
            }
        };
        let Some(entry) = self.services.get_mut(&*service) else {
            return false;
        };
        let known = entry.instances.get_key_value(id.as_str());
        // Re-registering an unchanged instance only renews its lease.
        let changed = known.is_none_or(|(_, l)| l.instance != instance);
        let id = known.map_or_else(|| Arc::from(id), |(id, _)| id.clone());
        let record = changed.then(|| instance.clone());
        let lease = Lease {
            instance,
            size,
            ttl,
            renewed: now,
            expired: false,
            fresh: ttl.is_some(),
            queued: ttl.map(|ttl| after(now, two_intervals(ttl))),
        };
        let queued = lease.queued;
        let previous = entry.instances.insert(id.clone(), lease);
        entry.bytes += size as usize;
        if let Some(previous) = &previous {
            entry.bytes = entry.bytes.saturating_sub(previous.size as usize);
        }
        let first = entry.instances.len() == 1;
        match &previous {
            Some(previous) => {
                self.forget(previous);
                self.events.updated += u64::from(changed);
            }
            None => {
                self.instances += 1;
                self.populated += usize::from(first);
                self.events.registered += 1;
            }
        }
        if let Some(ttl) = ttl {
            self.ephemeral += 1;
            self.renewals.add(ttl);
        }
        let wake = queued.is_some_and(|at| self.schedule(at, &service, &id));
        if let Some(instance) = record {
            self.record(service, Changed::Put(id, instance));
        }
        wake
    }

    /// Takes a lease that went away out of the counts.
    fn forget(&mut self, lease: &Lease) {
        if let Some(ttl) = lease.ttl {
            self.ephemeral = self.ephemeral.saturating_sub(1);
            self.renewals.remove(ttl, lease.fresh);
        }
    }

    fn remove(&mut self, key: &ServiceKey, id: &str) -> bool {
        let Some(service) = self.services.get_key_value(key).map(|(s, _)| s.clone()) else {
            return false;
        };
        let Some(entry) = self.services.get_mut(key) else {
            return false;
        };
        let Some((id, lease)) = entry.instances.remove_entry(id) else {
            return false;
        };
        let emptied = entry.instances.is_empty();
        entry.bytes = entry.bytes.saturating_sub(lease.size as usize);
        self.forget(&lease);
        self.instances = self.instances.saturating_sub(1);
        if emptied {
            self.populated = self.populated.saturating_sub(1);
        }
        self.record(service, Changed::Delete(id));
        self.drop_if_unused(key);
        true
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

    fn snapshot(&self, key: &ServiceKey) -> Vec<Instance> {
        self.services
            .get_key_value(key)
            .map(|(service, s)| {
                let instances = s.instances.iter();
                instances
                    .map(|(id, l)| l.instance.unpack(service, id))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl Registry for MemoryRegistry {
    async fn register(&self, mut instance: Instance, ttl: Duration) -> Result<(), RegistryError> {
        self.shared.limits.check(&instance, ttl)?;
        instance.ephemeral = true;
        self.upsert(instance, Some(ttl), None)
    }

    async fn heartbeat(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        let now = Instant::now();
        let mut guard = self.shared.lock();
        let state = &mut *guard;
        let Some(lease) = lease_in(&mut state.services, &key.service, &key.id) else {
            return Err(RegistryError::NotFound(key.clone()));
        };
        if lease
            .expires()
            .is_some_and(|expires| after(expires, state.grace) <= now)
            && !state.preserving
        {
            // Past eviction, and the sweeper has not got to it yet.
            if state.remove(&key.service, &key.id) {
                state.events.evicted += 1;
            }
            return Err(RegistryError::LeaseExpired(key.clone()));
        }
        lease.renewed = now;
        state.heartbeats += 1;
        // A lease that was keeping up has a timer due no later than its
        // new one would be; the sweeper queues it again when it comes due.
        let mut requeue = None;
        if let Some(ttl) = lease.ttl
            && !lease.fresh
        {
            lease.fresh = true;
            state.renewals.renewed(ttl);
            let at = after(now, two_intervals(ttl));
            lease.queued = Some(at);
            requeue = Some(at);
        }
        let healed = lease.expired.then(|| {
            // Back within the grace period: healthy again.
            lease.expired = false;
            lease.instance.healthy = true;
            lease.instance.clone()
        });
        if requeue.is_none() && healed.is_none() {
            return Ok(());
        }
        let service = state.services.get_key_value(&key.service).map(|(s, e)| {
            let id = e.instances.get_key_value(key.id.as_str()).map(|(id, _)| id);
            (s.clone(), id.cloned())
        });
        let Some((service, Some(id))) = service else {
            return Ok(());
        };
        let wake = requeue.is_some_and(|at| state.schedule(at, &service, &id));
        if let Some(instance) = healed {
            state.events.recovered += 1;
            state.record(service, Changed::Put(id, instance));
        }
        drop(guard);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    async fn deregister(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        let mut state = self.shared.lock();
        if state.remove(&key.service, &key.id) {
            state.events.deregistered += 1;
        }
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
            .map(|(k, _)| ServiceKey::clone(k))
            .collect();
        keys.sort();
        Ok(keys)
    }

    async fn watch(
        &self,
        service: &ServiceKey,
        since: Option<Revision>,
    ) -> Result<WatchStream, RegistryError> {
        Ok(self.open_watch(service, since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    pub(super) fn inst(id: &str) -> Instance {
        Instance::new("svc", format!("127.0.0.1:{}", 1000 + id.len())).with_id(id)
    }

    pub(super) async fn next(stream: &mut WatchStream) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("watch event within 5s")
            .expect("stream open")
            .expect("no error")
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

    pub(super) fn many(n: usize) -> Vec<Instance> {
        (0..n).map(|i| inst(&format!("i{i:02}"))).collect()
    }

    pub(super) async fn beat(r: &MemoryRegistry, instances: &[Instance]) {
        for i in instances {
            let _ = r.heartbeat(&i.instance_key()).await;
        }
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

    #[tokio::test(start_paused = true)]
    async fn stats_count_every_kind_of_event_the_heartbeats_and_the_open_watches() {
        let r = MemoryRegistry::builder()
            .eviction_grace(Duration::from_secs(2))
            .build();
        let ttl = Duration::from_secs(3);
        r.register(inst("a"), ttl).await.unwrap();
        r.register(inst("bb"), ttl).await.unwrap();
        r.register(inst("a"), ttl).await.unwrap(); // unchanged: a renewal
        r.register(inst("a").with_version("2"), ttl).await.unwrap();
        r.set_enabled(&inst("a").instance_key(), false).unwrap();
        r.heartbeat(&inst("a").instance_key()).await.unwrap();
        let watch = r.watch(&ServiceKey::new("svc"), None).await.unwrap();
        let other = r.watch(&ServiceKey::new("other"), None).await.unwrap();
        assert_eq!(r.stats().watchers, 2);
        drop(other);
        assert_eq!(r.stats().watchers, 1);
        let health = r.health_of_all();
        assert_eq!(
            health,
            vec![ServiceHealth {
                service: ServiceKey::new("svc"),
                instances: 2,
                healthy: 2
            }]
        );

        // bb falls silent: expired (unhealthy), then evicted after the grace;
        // a renews through it, once after its lease ran out (recovered).
        tokio::time::sleep(Duration::from_secs(2)).await;
        r.heartbeat(&inst("a").instance_key()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(r.health_of_all()[0].healthy, 1);
        assert_eq!(r.stats().events.expired, 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        r.heartbeat(&inst("a").instance_key()).await.unwrap();
        assert_eq!(r.health_of_all()[0].instances, 1);
        r.deregister(&inst("a").instance_key()).await.unwrap();
        r.deregister(&inst("a").instance_key()).await.unwrap(); // gone: nothing
        let stats = r.stats();
        let events = stats.events;
        assert_eq!(
            (
                events.registered,
                events.updated,
                events.deregistered,
                events.expired,
                events.evicted
            ),
            (2, 2, 1, 2, 1),
            "{stats:?}"
        );
        assert_eq!(events.recovered, 1, "{stats:?}");
        assert_eq!(stats.heartbeats, 3);
        assert!(r.health_of_all().is_empty());
        drop(watch);
        assert_eq!(r.stats().watchers, 0);
    }

    #[tokio::test]
    async fn an_instance_keeps_its_kind_and_a_reservation_holds_it() {
        let r = MemoryRegistry::new();
        let i = inst("a");
        r.register(i.clone(), Duration::from_secs(5)).await.unwrap();
        assert!(matches!(
            r.register_persistent(i.clone()),
            Err(RegistryError::Conflict(_))
        ));
        assert!(matches!(
            r.reserve_persistent(&i),
            Err(RegistryError::Conflict(_))
        ));
        let p = inst("p");
        let held = r.reserve_persistent(&p).unwrap();
        let error = r
            .register(p.clone(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(error, RegistryError::Conflict(_)), "{error}");
        assert!(matches!(
            r.reserve_persistent(&p),
            Err(RegistryError::Conflict(_))
        ));
        r.register_reserved(held, p.clone()).unwrap();
        assert_eq!(r.is_persistent(&p.instance_key()), Some(true));
        // A dropped reservation frees the key.
        let q = inst("q");
        drop(r.reserve_persistent(&q).unwrap());
        r.register(q, Duration::from_secs(5)).await.unwrap();
    }
}
