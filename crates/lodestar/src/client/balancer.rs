//! The instances of one service, and how one is picked for a call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::uri::Authority;
use lodestar_core::{Instance, Registry, ServiceKey};
use tokio::sync::Notify;

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
    /// Whether the last update was below the protection threshold.
    protecting: AtomicBool,
    /// Whether a resolver task is running; it clears this when it ends
    /// (for example because the runtime it ran on shut down).
    resolving: Arc<AtomicBool>,
    resolver: Mutex<Option<AbortOnDrop>>,
    /// Why the registry last failed to answer, until it answers: named in
    /// the error of a call that found no instances in time.
    last_error: Mutex<Option<String>>,
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Clears the `resolving` flag when the resolver task ends or is dropped.
pub(crate) struct ResolvingGuard(Arc<AtomicBool>);

impl Drop for ResolvingGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
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
            protecting: AtomicBool::new(false),
            resolving: Arc::new(AtomicBool::new(false)),
            resolver: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    /// Notes why the registry failed to answer (`None`: it answered).
    pub(crate) fn registry_failed(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// Makes sure a resolver runs (starting one needs a runtime, so it
    /// happens on first use, and again if the old one's runtime is gone),
    /// and waits for the first snapshot.
    pub(crate) async fn ready(self: &Arc<Self>) -> Result<(), super::Error> {
        if !self.resolving.load(Ordering::Acquire) {
            self.start_resolver();
        }
        if self.synced.load(Ordering::Acquire) {
            return Ok(());
        }
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
            .map_err(|_| {
                let last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
                // The registry's words, from the network: printed safely.
                let cause = last
                    .as_deref()
                    .map(|e| format!(": {}", crate::registry::limits::printable(e)))
                    .unwrap_or_default();
                super::Error::Resolve {
                    service: self.key.clone(),
                    reason: format!(
                        "the registry did not list its instances within {:?}{cause}",
                        self.config.resolve_timeout
                    ),
                }
            })
    }

    fn start_resolver(self: &Arc<Self>) {
        let mut resolver = self.resolver.lock().unwrap_or_else(|e| e.into_inner());
        if self.resolving.swap(true, Ordering::AcqRel) {
            return; // another caller started one
        }
        let guard = ResolvingGuard(self.resolving.clone());
        *resolver = Some(AbortOnDrop(tokio::spawn(resolver::run(
            self.registry.clone(),
            self.key.clone(),
            Arc::downgrade(self),
            guard,
        ))));
    }

    /// Replaces the instance set. Instances that stay keep their connection
    /// and ejection state, and take on any change to their metadata.
    pub(crate) fn update(&self, instances: impl Iterator<Item = Instance>) {
        let enabled: Vec<Instance> = instances.filter(|i| i.enabled).collect();
        let healthy = enabled.iter().filter(|i| i.healthy).count();
        let threshold = self.config.protection_threshold;
        // Below the protection threshold, every enabled instance takes traffic.
        let protect =
            crate::registry::below_protection_threshold(healthy, enabled.len(), threshold);
        // Said once when it begins and once when it ends, not on every update.
        if protect != self.protecting.swap(protect, Ordering::Relaxed) {
            if protect {
                tracing::warn!(service = %self.key, healthy, enabled = enabled.len(),
                    "below the protection threshold: calling every enabled instance");
            } else {
                tracing::info!(service = %self.key, healthy, enabled = enabled.len(),
                    "back above the protection threshold: calling healthy instances only");
            }
        }
        let instances = enabled.into_iter().filter(|i| protect || i.healthy);
        let old = self.endpoints.load();
        let existing: HashMap<(&str, &str), &Arc<Endpoint>> = old
            .iter()
            .map(|e| ((e.instance.id.as_str(), e.instance.address.as_str()), e))
            .collect();
        let mut next: Vec<Arc<Endpoint>> = instances
            .filter_map(|instance| {
                let same = existing
                    .get(&(instance.id.as_str(), instance.address.as_str()))
                    .map(|e| Arc::clone(e));
                if let Some(same) = same {
                    if same.instance == instance {
                        return Some(same);
                    }
                    return Some(Arc::new(Endpoint {
                        instance,
                        authority: same.authority.clone(),
                        connection: same.connection.clone(),
                    }));
                }
                match self.authority(&instance.address) {
                    Ok(authority) => Some(Arc::new(Endpoint {
                        connection: Arc::new(Connection::new(instance.address.clone())),
                        instance,
                        authority,
                    })),
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

    /// The `:authority` for an instance at `address`: the address, or the
    /// TLS server name override with the address's port.
    fn authority(&self, address: &str) -> Result<Authority, http::uri::InvalidUri> {
        match self
            .config
            .tls
            .as_ref()
            .and_then(|t| t.server_name_override())
        {
            Some(name) => {
                let port = address.rsplit_once(':').map_or("", |(_, port)| port);
                format!("{name}:{port}").parse()
            }
            None => address.parse(),
        }
    }

    /// The current endpoints (for inspection, not the call path).
    pub(crate) fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// Picks a current endpoint whose connection is not in `tried`,
    /// preferring ones not ejected. Reads the endpoint list without touching
    /// its shared reference count.
    pub(crate) fn pick(&self, tried: &[Arc<Connection>]) -> Option<Arc<Endpoint>> {
        let endpoints = self.endpoints.load();
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let start = match self.config.strategy {
            Strategy::RoundRobin => self.cursor.fetch_add(1, Ordering::Relaxed) % n,
            Strategy::Random => fastrand::usize(..n),
        };
        let mut now = None;
        let mut fallback = None;
        for endpoint in endpoints[start..].iter().chain(&endpoints[..start]) {
            // By connection: it outlives the endpoint's rebuilds when the
            // instance's metadata changes, and holding it rules out address reuse.
            if tried.iter().any(|c| Arc::ptr_eq(c, &endpoint.connection)) {
                continue;
            }
            if !endpoint.connection.is_ejected(&mut now) {
                return Some(endpoint.clone());
            }
            // Everything ejected: rather try one than fail outright.
            fallback.get_or_insert(endpoint);
        }
        fallback.cloned()
    }
}

/// One instance and the connection to its address.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) instance: Instance,
    pub(crate) authority: Authority,
    pub(crate) connection: Arc<Connection>,
}
