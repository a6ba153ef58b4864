//! The instances of one service, and how one is picked for a call.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use http::uri::Authority;
use lodestar_core::{Instance, Registry, ServiceKey};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::connection::Connection;
use super::{ClientConfig, Strategy, resolver};

/// Everything a [`Channel`](super::Channel) shares: the instance snapshot,
/// the picking cursor, and the resolver that keeps the snapshot fresh.
#[derive(Debug)]
pub(crate) struct Balancer {
    pub(crate) key: ServiceKey,
    pub(crate) config: Arc<ClientConfig>,
    registry: Arc<dyn Registry>,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    synced: AtomicBool,
    synced_notify: Notify,
    cursor: AtomicUsize,
    resolver: OnceLock<AbortOnDrop>,
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Balancer {
    pub(crate) fn new(
        key: ServiceKey,
        registry: Arc<dyn Registry>,
        config: Arc<ClientConfig>,
    ) -> Self {
        Self {
            key,
            config,
            registry,
            endpoints: ArcSwap::from_pointee(Vec::new()),
            synced: AtomicBool::new(false),
            synced_notify: Notify::new(),
            cursor: AtomicUsize::new(0),
            resolver: OnceLock::new(),
        }
    }

    /// Starts the resolver on first use (it needs a runtime) and waits for
    /// its first snapshot.
    pub(crate) async fn ready(self: &Arc<Self>) -> Result<(), super::Error> {
        if self.synced.load(Ordering::Acquire) {
            return Ok(());
        }
        self.resolver.get_or_init(|| {
            AbortOnDrop(tokio::spawn(resolver::run(
                self.registry.clone(),
                self.key.clone(),
                Arc::downgrade(self),
            )))
        });
        let wait = async {
            loop {
                let notified = self.synced_notify.notified();
                if self.synced.load(Ordering::Acquire) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(self.config.resolve_timeout, wait)
            .await
            .map_err(|_| super::Error::Resolve {
                service: self.key.clone(),
                reason: format!(
                    "the registry did not list its instances within {:?}",
                    self.config.resolve_timeout
                ),
            })
    }

    /// Replaces the instance set; connections to instances that stay are kept.
    pub(crate) fn update(&self, instances: impl Iterator<Item = Instance>) {
        let old = self.endpoints.load();
        let mut next: Vec<Arc<Endpoint>> = instances
            .filter(Instance::is_routable)
            .filter_map(|instance| {
                if let Some(existing) = old.iter().find(|e| {
                    e.instance.id == instance.id && e.instance.address == instance.address
                }) {
                    return Some(existing.clone());
                }
                match instance.address.parse::<Authority>() {
                    Ok(authority) => Some(Arc::new(Endpoint::new(instance, authority))),
                    Err(e) => {
                        tracing::warn!(service = %self.key, instance = %instance.id,
                            address = %instance.address, error = %e,
                            "ignoring an instance whose address is not host:port");
                        None
                    }
                }
            })
            .collect();
        next.sort_by(|a, b| a.instance.id.cmp(&b.instance.id));
        self.endpoints.store(Arc::new(next));
        if !self.synced.swap(true, Ordering::AcqRel) {
            self.synced_notify.notify_waiters();
        }
    }

    /// The current endpoints.
    pub(crate) fn endpoints(&self) -> arc_swap::Guard<Arc<Vec<Arc<Endpoint>>>> {
        self.endpoints.load()
    }

    /// Picks an endpoint not in `tried`, preferring ones not ejected.
    pub(crate) fn pick(&self, endpoints: &[Arc<Endpoint>], tried: &[usize]) -> Option<usize> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let start = match self.config.strategy {
            Strategy::RoundRobin => self.cursor.fetch_add(1, Ordering::Relaxed),
            Strategy::Random => fastrand::usize(..n),
        };
        let now = Instant::now();
        let candidates = (0..n)
            .map(|i| (start + i) % n)
            .filter(|i| !tried.contains(i));
        let mut fallback = None;
        for i in candidates {
            if !endpoints[i].is_ejected(now) {
                return Some(i);
            }
            // Everything ejected: rather try one than fail outright.
            fallback.get_or_insert(i);
        }
        fallback
    }
}

/// One instance, its connection and its ejection state.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) instance: Instance,
    pub(crate) authority: Authority,
    pub(crate) connection: Connection,
    /// Ejected until this many nanoseconds after [`epoch`].
    ejected_until: AtomicU64,
    failures: AtomicU32,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

impl Endpoint {
    fn new(instance: Instance, authority: Authority) -> Self {
        let connection = Connection::new(instance.address.clone());
        Self {
            instance,
            authority,
            connection,
            ejected_until: AtomicU64::new(0),
            failures: AtomicU32::new(0),
        }
    }

    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && nanos_since_epoch(now) < until
    }

    /// Skips this endpoint for a while: `base`, doubled for each failure in
    /// a row, at most `max`.
    pub(crate) fn eject(&self, config: &ClientConfig) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed).min(16);
        let duration = config
            .ejection_base
            .saturating_mul(1u32 << failures)
            .min(config.ejection_max);
        let until = nanos_since_epoch(Instant::now() + duration).max(1);
        self.ejected_until.store(until, Ordering::Relaxed);
        tracing::debug!(instance = %self.instance.id, address = %self.instance.address,
            ?duration, "instance ejected");
    }

    /// Clears the ejection after a success.
    pub(crate) fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }
}
