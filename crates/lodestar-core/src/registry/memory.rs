//! [`MemoryRegistry`]: a complete registry inside one process.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::stream;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use super::limits::{Limits, instance_size, quoted};
use super::packed::Packed;
use super::{Registry, RegistryError, Revision, WatchEvent, WatchStream};
use crate::sync::MutexExt;
use crate::{Instance, InstanceKey, ServiceKey};

/// How many recent changes the registry remembers for watchers that resume.
const DEFAULT_HISTORY: usize = 4096;
/// How many bytes of instances those changes may hold at most.
const DEFAULT_HISTORY_BYTES: usize = 16 * 1024 * 1024;
/// How many undelivered events a watcher may fall behind before it is sent a
/// fresh snapshot instead.
const WATCH_BUFFER: usize = 256;
/// How often self-preservation is judged while leases exist.
const PRESERVATION_TICK: Duration = Duration::from_millis(250);

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

struct Lease {
    instance: Packed,
    /// What the instance counts for in its service's `bytes`.
    size: u32,
    /// `None` for persistent instances, which never expire.
    ttl: Option<Duration>,
    renewed: Instant,
    /// The lease ran out and the instance is marked unhealthy.
    expired: bool,
    /// Renewed within two heartbeat intervals (ephemeral instances only):
    /// counted in [`State::renewals`] as keeping up.
    fresh: bool,
    /// When the timer that speaks for this lease is due; `None` for
    /// persistent instances. Timers due at another time are left over from
    /// before and ignored.
    queued: Option<Instant>,
}

/// `by` after `at`; far in the future rather than a panic if that is
/// past what the clock can hold.
fn after(at: Instant, by: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);
    at.checked_add(by)
        .or_else(|| at.checked_add(FAR))
        .unwrap_or(at)
}

/// Two heartbeat intervals of a lease: how recently it must have renewed
/// to count as keeping up.
fn two_intervals(ttl: Duration) -> Duration {
    ttl.saturating_mul(2) / 3
}

impl Lease {
    fn expires(&self) -> Option<Instant> {
        self.ttl.map(|ttl| after(self.renewed, ttl))
    }

    /// When the lease stops keeping up: two heartbeat intervals after its
    /// last renewal.
    fn stale_at(&self) -> Option<Instant> {
        self.ttl.map(|ttl| after(self.renewed, two_intervals(ttl)))
    }

    /// The next moment something may happen to the lease: it stops keeping
    /// up, it runs out, or its grace period ends.
    fn next_check(&self, grace: Duration) -> Option<Instant> {
        let ttl = self.ttl?;
        Some(if self.fresh {
            after(self.renewed, two_intervals(ttl))
        } else if !self.expired {
            after(self.renewed, ttl)
        } else {
            after(self.renewed, ttl.saturating_add(grace))
        })
    }

    /// Notes that the lease stopped keeping up, if it did by `now`.
    fn settle(&mut self, renewals: &mut Renewals, now: Instant) {
        if let Some(ttl) = self.ttl
            && self.fresh
            && self.stale_at().is_some_and(|at| at <= now)
        {
            self.fresh = false;
            renewals.went_stale(ttl);
        }
    }
}

/// A lease to look at: the instance `id` of `service`, at `at`.
///
/// Timers are lazy. A heartbeat does not move its lease's timer; the
/// sweeper, finding the timer early, queues it again. Only the timer due at
/// the lease's [`Lease::queued`] speaks for it; others (left over from a
/// heartbeat after expiry, a re-registration, a deregistration) are dropped
/// when they come due.
struct Timer {
    at: Instant,
    service: Arc<ServiceKey>,
    id: Arc<str>,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Timer {}

impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Timer {
    /// Reversed, so that the heap (a max-heap) yields the soonest first.
    fn cmp(&self, other: &Self) -> Ordering {
        other.at.cmp(&self.at)
    }
}

/// How many ephemeral instances keep up, and the share of the expected
/// renewals they stand for: each instance weighs as much as the heartbeats
/// it should send (in proportion to 1 / TTL), so that instances with long
/// leases cannot hide the silence of those with short ones. Kept up to date
/// as leases come, renew, go stale and go; weights are integers so that
/// adding and taking away never drifts.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Renewals {
    /// Ephemeral instances that renewed within two heartbeat intervals.
    count: usize,
    /// Their weights, summed.
    fresh: u128,
    /// The weights of every ephemeral instance, summed.
    total: u128,
}

impl Renewals {
    /// How much an instance with this TTL weighs: its heartbeat rate, in
    /// units fine enough for TTLs from a millisecond to years.
    fn weight(ttl: Duration) -> u128 {
        (1u128 << 60) / ttl.as_micros().max(1000)
    }

    /// A new lease, renewed just now.
    fn add(&mut self, ttl: Duration) {
        self.total += Self::weight(ttl);
        self.renewed(ttl);
    }

    /// A lease went away; `fresh` says whether it was keeping up.
    fn remove(&mut self, ttl: Duration, fresh: bool) {
        self.total = self.total.saturating_sub(Self::weight(ttl));
        if fresh {
            self.went_stale(ttl);
        }
    }

    /// A lease that had stopped keeping up renewed.
    fn renewed(&mut self, ttl: Duration) {
        self.count += 1;
        self.fresh += Self::weight(ttl);
    }

    /// A lease stopped keeping up.
    fn went_stale(&mut self, ttl: Duration) {
        self.count = self.count.saturating_sub(1);
        self.fresh = self.fresh.saturating_sub(Self::weight(ttl));
    }

    /// The share of the expected renewals that arrive (1 without leases).
    fn keeping_up(&self) -> f64 {
        if self.total > 0 {
            self.fresh as f64 / self.total as f64
        } else {
            1.0
        }
    }
}

/// One change, as the history keeps it.
struct Change {
    service: Arc<ServiceKey>,
    revision: Revision,
    what: Changed,
}

enum Changed {
    /// An instance was added or changed; it is now this.
    Put(Arc<str>, Packed),
    /// An instance left.
    Delete(Arc<str>),
}

impl Change {
    /// What keeping this change costs, in bytes.
    fn footprint(&self) -> usize {
        std::mem::size_of::<Self>()
            + match &self.what {
                Changed::Put(_, instance) => instance.footprint(),
                Changed::Delete(_) => 0,
            }
    }

    fn event(&self) -> WatchEvent {
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

fn new_service() -> ServiceEntry {
    ServiceEntry {
        instances: BTreeMap::new(),
        events: None,
        protection: 0.0,
        bytes: 0,
    }
}

/// The lease of instance `id` of `service`.
fn lease_in<'a>(
    services: &'a mut HashMap<Arc<ServiceKey>, ServiceEntry>,
    service: &ServiceKey,
    id: &str,
) -> Option<&'a mut Lease> {
    services.get_mut(service)?.instances.get_mut(id)
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

    /// The services with a protection threshold, and their thresholds, in
    /// key order.
    pub fn protection_thresholds(&self) -> Vec<(ServiceKey, f64)> {
        let state = self.shared.lock();
        let mut thresholds: Vec<(ServiceKey, f64)> = state
            .services
            .iter()
            .filter(|(_, s)| s.protection > 0.0)
            .map(|(k, s)| (ServiceKey::clone(k), s.protection))
            .collect();
        thresholds.sort_by(|a, b| a.0.cmp(&b.0));
        thresholds
    }

    /// Sets the protection threshold of a service (0 turns it off, the
    /// default): while fewer than this fraction of its instances are
    /// healthy, [`instances`](Registry::instances) returns all of them as
    /// healthy, rather than funnel all traffic onto the few left.
    pub fn set_protection_threshold(&self, service: &ServiceKey, threshold: f64) {
        let mut state = self.shared.lock();
        state
            .services
            .entry(Arc::new(service.clone()))
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
        }
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

    fn ensure_sweeper(&self, state: &mut State) {
        if state.sweeper.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(&self.shared);
        let wake = self.shared.wake.clone();
        // A new sweeper looks at everything first; until then, any new
        // timer is worth waking it for.
        state.next_wake = None;
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

    /// Records a change under the next revision: tells the service's
    /// watchers, and remembers it for those that resume.
    fn record(&mut self, service: Arc<ServiceKey>, what: Changed) {
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

    /// Queues a timer for instance `id` of `service` at `at`; true if the
    /// sweeper must be woken for it.
    fn schedule(&mut self, at: Instant, service: &Arc<ServiceKey>, id: &Arc<str>) -> bool {
        let wake = self.next_wake.is_none_or(|planned| at < planned);
        if wake {
            self.next_wake = Some(at);
        }
        self.timers.push(Timer {
            at,
            service: service.clone(),
            id: id.clone(),
        });
        wake
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
            Some(previous) => self.forget(previous),
            None => {
                self.instances += 1;
                self.populated += usize::from(first);
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

    /// Takes the timers due by `now` off the heap (dropping those left over),
    /// and notes which of their leases stopped keeping up.
    fn due(&mut self, now: Instant) -> Vec<Timer> {
        let mut due = Vec::new();
        while self.timers.peek().is_some_and(|t| t.at <= now) {
            let Some(timer) = self.timers.pop() else {
                break;
            };
            let Some(lease) = lease_in(&mut self.services, &timer.service, &timer.id) else {
                continue;
            };
            if lease.queued != Some(timer.at) {
                continue;
            }
            lease.settle(&mut self.renewals, now);
            due.push(timer);
        }
        due
    }

    /// Brings the counts of leases keeping up to `now`, without expiring
    /// anything (that is the sweeper's job).
    fn catch_up(&mut self, now: Instant) {
        let due = self.due(now);
        self.timers.extend(due);
    }

    /// Engages or releases self-preservation; true while engaged.
    fn preserve(&mut self, now: Instant) -> bool {
        let Some(preservation) = self.preservation else {
            return false;
        };
        let total = self.ephemeral;
        let renewing = self.renewals.count;
        let keeping_up = self.renewals.keeping_up();
        // By heartbeats expected, so that long leases cannot hide the
        // silence of short ones; and by instances, so that a few leases
        // with tiny TTLs (each weighing like thousands of ordinary ones)
        // cannot freeze expiry on their own: a partition silences many.
        let counted = if total > 0 {
            renewing as f64 / total as f64
        } else {
            1.0
        };
        let silent = total.saturating_sub(renewing);
        let engage = total >= preservation.min_instances
            && silent >= preservation.min_instances
            && keeping_up < preservation.threshold
            && counted < (1.0 + preservation.threshold) / 2.0;
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
                "SELF-PRESERVATION ENGAGED: {silent} of {total} instances stopped renewing their \
                 leases ({renewing} renew, bringing {:.0}% of the heartbeats expected); nothing \
                 that was alive until now expires until they recover (a partition on the \
                 registry's side is likelier than all of them dying at once)",
                keeping_up * 100.0
            );
        } else if self.preserving && release {
            self.preserving = false;
            self.preserving_since = None;
            // Renewals recovered: leases that ran out while expiry was frozen
            // get one full TTL from now, since heartbeats come back spread
            // over an interval. (After giving up, they are taken to be gone.)
            if !overdue {
                self.renew_expired(now);
            }
            tracing::warn!(
                renewing,
                instances = total,
                "self-preservation released: renewals recovered; expiry resumes"
            );
        }
        self.preserving
    }

    /// Renews every lease that has run out by `now`. A scan of every lease,
    /// but only once per release of self-preservation.
    fn renew_expired(&mut self, now: Instant) {
        for (service, entry) in &mut self.services {
            for (id, lease) in &mut entry.instances {
                let Some(ttl) = lease.ttl else {
                    continue;
                };
                if lease.expires().is_none_or(|expires| expires > now) {
                    continue;
                }
                lease.renewed = now;
                if !lease.fresh {
                    lease.fresh = true;
                    self.renewals.renewed(ttl);
                }
                let at = after(now, two_intervals(ttl));
                lease.queued = Some(at);
                self.timers.push(Timer {
                    at,
                    service: service.clone(),
                    id: id.clone(),
                });
            }
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

    /// Marks instances whose lease ran out unhealthy, and evicts those past
    /// the grace period, unless self-preservation holds; returns when to look
    /// again. The work is in proportion to the timers that came due.
    fn evict_expired(&mut self, now: Instant) -> Option<Instant> {
        let mut due = self.due(now);
        let was_preserving = self.preserving;
        let preserving = self.preserve(now);
        if was_preserving && !preserving {
            due.append(&mut self.frozen);
        }
        for timer in due {
            self.visit(timer, now, preserving);
        }
        let mut next = self.timers.peek().map(|t| t.at);
        // Self-preservation is judged continually while leases exist.
        if self.preservation.is_some() && self.ephemeral > 0 {
            let tick = after(now, PRESERVATION_TICK);
            next = Some(next.map_or(tick, |n| n.min(tick)));
        }
        self.next_wake = next;
        next
    }

    /// Does what is due to the lease of a due timer, and queues the timer
    /// again for the lease's next moment.
    fn visit(&mut self, mut timer: Timer, now: Instant, preserving: bool) {
        let grace = self.grace;
        let Some(lease) = lease_in(&mut self.services, &timer.service, &timer.id) else {
            return;
        };
        if lease.queued != Some(timer.at) {
            return;
        }
        lease.settle(&mut self.renewals, now);
        let Some(expires) = lease.expires() else {
            lease.queued = None;
            return;
        };
        let mut marked = None;
        // Leases that had run out before self-preservation engaged belong to
        // owners that were gone before whatever silenced the rest: they
        // expire as usual.
        let gone_before = self.preserving_since.is_some_and(|since| expires <= since);
        if !preserving || gone_before {
            if after(expires, grace) <= now {
                tracing::info!(service = %timer.service, instance = %timer.id, "lease expired; instance evicted");
                self.remove(&timer.service, &timer.id);
                return;
            }
            if expires <= now && !lease.expired {
                lease.expired = true;
                lease.instance.healthy = false;
                marked = Some(lease.instance.clone());
            }
        }
        match lease.next_check(grace) {
            Some(at) if at > now => {
                lease.queued = Some(at);
                timer.at = at;
            }
            // Only while preserving is anything due now still due after a
            // visit: it waits for expiry to resume.
            _ if preserving => {
                self.frozen.push(timer);
                return;
            }
            // Not reached; a millisecond on rather than a busy loop if it were.
            _ => {
                let at = after(now, Duration::from_millis(1));
                lease.queued = Some(at);
                timer.at = at;
            }
        }
        if let Some(instance) = marked {
            tracing::info!(service = %timer.service, instance = %timer.id, "lease expired; instance marked unhealthy");
            self.record(
                timer.service.clone(),
                Changed::Put(timer.id.clone(), instance),
            );
        }
        self.timers.push(timer);
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

    /// The instances of `key` as lookups report them (every one healthy
    /// while the service is below its protection threshold), and whether
    /// the protection threshold changed what they say.
    fn lookup(&self, key: &ServiceKey) -> (Vec<Instance>, bool) {
        let Some((service, entry)) = self.services.get_key_value(key) else {
            return (Vec::new(), false);
        };
        let leases = || entry.instances.values().map(|l| &l.instance);
        let (healthy, total) = leases()
            .filter(|i| i.enabled)
            .fold((0, 0), |(h, t), i| (h + usize::from(i.healthy), t + 1));
        let protect = super::below_protection_threshold(healthy, total, entry.protection)
            && leases().any(|i| !i.healthy);
        if protect {
            tracing::debug!(service = %key, healthy, total, "protection threshold: returning every instance");
        }
        let instances = entry
            .instances
            .iter()
            .map(|(id, l)| {
                let mut instance = l.instance.unpack(service, id);
                instance.healthy |= protect;
                instance
            })
            .collect();
        (instances, protect)
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
            state.remove(&key.service, &key.id);
            return Err(RegistryError::LeaseExpired(key.clone()));
        }
        lease.renewed = now;
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
            state.record(service, Changed::Put(id, instance));
        }
        drop(guard);
        if wake {
            self.shared.wake.notify_one();
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

    /// Checks the counts kept as things happen against a count from
    /// scratch, the way self-preservation used to count: a scan of every
    /// lease.
    fn assert_counts_right(r: &MemoryRegistry) -> Renewals {
        let mut state = r.shared.lock();
        let now = Instant::now();
        state.catch_up(now);
        let mut expected = Renewals::default();
        let mut ephemeral = 0;
        for lease in state.services.values().flat_map(|s| s.instances.values()) {
            let Some(ttl) = lease.ttl else {
                continue;
            };
            ephemeral += 1;
            expected.total += Renewals::weight(ttl);
            if now.saturating_duration_since(lease.renewed) < ttl * 2 / 3 {
                expected.count += 1;
                expected.fresh += Renewals::weight(ttl);
            }
        }
        assert_eq!(state.renewals, expected);
        assert_eq!(state.ephemeral, ephemeral);
        let instances: usize = state.services.values().map(|s| s.instances.len()).sum();
        assert_eq!(state.instances, instances);
        let populated = state.services.values().filter(|s| !s.instances.is_empty());
        assert_eq!(state.populated, populated.count());
        expected
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_deadline_does_not_delay_an_earlier_one() {
        let r = MemoryRegistry::new();
        let mut w = r.watch(&ServiceKey::new("svc"), None).await.unwrap();
        next(&mut w).await;
        let start = Instant::now();
        r.register(inst("long"), Duration::from_secs(60))
            .await
            .unwrap();
        r.register(inst("short"), Duration::from_secs(2))
            .await
            .unwrap();
        next(&mut w).await;
        next(&mut w).await;
        assert!(matches!(next(&mut w).await, WatchEvent::Delete { id, .. } if id == "short"));
        assert_eq!(start.elapsed(), Duration::from_secs(2), "evicted on time");
        assert_eq!(r.instances(&ServiceKey::new("svc")).await.unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_pushes_expiry_out_by_a_full_ttl() {
        let r = MemoryRegistry::new();
        let mut w = r.watch(&ServiceKey::new("svc"), None).await.unwrap();
        next(&mut w).await;
        r.register(inst("a"), Duration::from_secs(3)).await.unwrap();
        next(&mut w).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let renewed = Instant::now();
        r.heartbeat(&inst("a").instance_key()).await.unwrap();
        assert!(matches!(next(&mut w).await, WatchEvent::Delete { id, .. } if id == "a"));
        assert_eq!(renewed.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_sooner_deadline_wakes_the_sweeper() {
        let r = MemoryRegistry::new();
        let registered = Instant::now();
        r.register(inst("a"), Duration::from_secs(3)).await.unwrap();
        // Let the sweeper plan: it looks again when `a` stops keeping up.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let planned = registered + Duration::from_secs(2);
        let mut state = r.shared.lock();
        assert_eq!(state.next_wake, Some(planned));
        let now = Instant::now();
        let packed = Packed::new(&inst("b")).unwrap();
        let key = ServiceKey::new("svc");
        let ttl = Some(Duration::from_secs(60));
        assert!(!state.put(key.clone(), "later".into(), packed.clone(), 0, ttl, now));
        assert_eq!(state.next_wake, Some(planned));
        let ttl = Some(Duration::from_secs(1));
        assert!(state.put(key, "sooner".into(), packed, 0, ttl, now));
        assert!(state.next_wake < Some(planned));
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_do_not_pile_up_timers_and_persistent_instances_have_none() {
        let r = MemoryRegistry::builder()
            .self_preservation(SelfPreservation::default())
            .build();
        let all = many(10);
        for i in &all {
            r.register(i.clone(), Duration::from_secs(3)).await.unwrap();
        }
        r.register_persistent(inst("db")).unwrap();
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            beat(&r, &all).await;
        }
        assert!(r.shared.lock().timers.len() <= all.len());
        assert_eq!(r.stats().renewing, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_counts_stay_right_through_register_heartbeat_expiry_and_deregister() {
        let r = MemoryRegistry::builder()
            .eviction_grace(Duration::from_secs(1))
            .build();
        let svc = ServiceKey::new("svc");
        let key = |id: &str| inst(id).instance_key();
        r.register(inst("a"), Duration::from_secs(3)).await.unwrap();
        r.register(inst("bb"), Duration::from_secs(3))
            .await
            .unwrap();
        r.register(inst("long"), Duration::from_secs(60))
            .await
            .unwrap();
        r.register_persistent(inst("db").with_service_key(ServiceKey::new("other")))
            .unwrap();
        assert_eq!(assert_counts_right(&r).count, 3);

        tokio::time::sleep(Duration::from_secs(1)).await;
        r.heartbeat(&key("a")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // `bb` last renewed 2.5 s ago: no longer keeping up; `a` 1.5 s ago is.
        assert_eq!(assert_counts_right(&r).count, 2);
        assert_eq!(r.stats().renewing, 2);

        r.heartbeat(&key("bb")).await.unwrap();
        assert_eq!(assert_counts_right(&r).count, 3);

        r.deregister(&key("long")).await.unwrap();
        assert_eq!(assert_counts_right(&r).count, 2);
        // Replacing a lease counts it once, with its new TTL.
        r.register(inst("a"), Duration::from_secs(6)).await.unwrap();
        let counts = assert_counts_right(&r);
        assert_eq!(counts.count, 2);
        assert_eq!(
            counts.total,
            Renewals::weight(Duration::from_secs(6)) + Renewals::weight(Duration::from_secs(3))
        );

        // `bb` runs out and is marked unhealthy, then heals within its grace.
        tokio::time::sleep(Duration::from_millis(3200)).await;
        assert!(
            r.instances(&svc)
                .await
                .unwrap()
                .iter()
                .any(|i| i.id == "bb" && !i.healthy)
        );
        assert_eq!(assert_counts_right(&r).count, 1);
        r.heartbeat(&key("bb")).await.unwrap();
        assert_eq!(assert_counts_right(&r).count, 2);
        assert!(r.instances(&svc).await.unwrap().iter().all(|i| i.healthy));

        // Everyone falls silent: marked, then evicted; only the persistent one stays.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let counts = assert_counts_right(&r);
        assert_eq!(counts, Renewals::default());
        assert!(r.instances(&svc).await.unwrap().is_empty());
        let stats = r.stats();
        assert_eq!(
            (stats.instances, stats.ephemeral, stats.services),
            (1, 0, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_counts_stay_right_through_self_preservation() {
        let r = MemoryRegistry::builder()
            .eviction_grace(Duration::from_secs(2))
            .self_preservation(SelfPreservation::default())
            .build();
        let all = many(10);
        for i in &all {
            r.register(i.clone(), Duration::from_secs(3)).await.unwrap();
        }
        // Eight fall silent: preservation engages and nothing expires.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all[..2]).await;
            assert_counts_right(&r);
        }
        assert!(r.stats().self_preservation);
        assert_eq!(r.stats().renewing, 2);
        // They come back: released, and the counts follow.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all).await;
            assert_counts_right(&r);
        }
        assert!(!r.stats().self_preservation);
        assert_eq!(assert_counts_right(&r).count, 10);
        // Most leave gracefully, and the two left (too few for
        // preservation) fall silent: they expire on time.
        for i in &all[2..] {
            r.deregister(&i.instance_key()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(assert_counts_right(&r), Renewals::default());
        assert!(
            r.instances(&ServiceKey::new("svc"))
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_few_tiny_leases_cannot_freeze_expiry_and_the_gone_are_still_evicted() {
        // Limits that let a 1 ms lease in, to show that the rule itself holds.
        let limits = Limits {
            min_ttl: Duration::from_millis(1),
            ..Limits::default()
        };
        let r = MemoryRegistry::builder()
            .limits(limits)
            .self_preservation(SelfPreservation::default())
            .build();
        let healthy = many(150);
        for i in &healthy {
            r.register(i.clone(), Duration::from_secs(6)).await.unwrap();
        }
        let tiny: Vec<Instance> = (0..2).map(|n| inst(&format!("tiny{n}"))).collect();
        for i in &tiny {
            r.register(i.clone(), Duration::from_millis(1))
                .await
                .unwrap();
        }
        // The tiny leases go silent (their weight dwarfs the rest); the
        // others keep renewing.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            beat(&r, &healthy).await;
            assert!(!r.stats().self_preservation, "{:?}", r.stats());
        }
        let ids: Vec<String> = r
            .instances(&ServiceKey::new("svc"))
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids.len(), 150, "the silent ones were evicted");
        assert!(!ids.iter().any(|id| id.starts_with("tiny")));
    }

    #[tokio::test(start_paused = true)]
    async fn instances_gone_before_self_preservation_engaged_are_still_evicted() {
        let r = MemoryRegistry::builder()
            .eviction_grace(Duration::from_secs(3))
            .self_preservation(SelfPreservation::default())
            .build();
        let key = ServiceKey::new("svc");
        let all = many(10);
        for i in &all {
            r.register(i.clone(), Duration::from_secs(3)).await.unwrap();
        }
        // One dies first; its lease runs out while the rest still renew.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all[1..]).await;
        }
        assert!(!r.stats().self_preservation);
        // Then most go silent together (a partition): preservation engages.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            beat(&r, &all[1..3]).await;
        }
        assert!(r.stats().self_preservation, "{:?}", r.stats());
        tokio::time::sleep(Duration::from_secs(5)).await;
        let left = r.instances(&key).await.unwrap();
        assert_eq!(left.len(), 9, "the one gone before is evicted");
        assert!(!left.iter().any(|i| i.id == all[0].id));
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
