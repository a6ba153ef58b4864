//! The balance layer: the instances of one service (discovery), and which
//! one each attempt goes to (selection).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use futures_util::future::Either;
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response};
use lodestar_core::sync::MutexExt;
use lodestar_core::task::AbortOnDrop;
use lodestar_core::{Instance, Registry, ServiceKey};
use tokio::sync::Notify;
use tokio::time::Instant;
use tonic::Status;

use super::retry::Leftover;
use crate::body::RequestBody;

use super::resolver;
use crate::client::connection::Connection;
use crate::client::observe::{AttemptGuard, Observed, Watchers};
use crate::client::selector::{CallInfo, Endpoint, EndpointStats, nanos_since_epoch};
use crate::client::{ClientConfig, Error};
use crate::deadline::Deadline;

/// Everything a [`Channel`](crate::client::Channel) shares: the endpoint
/// set, the selector, and the resolver that keeps the set fresh.
///
/// Selection reads the endpoint set without locking, and filters it (which
/// allocates) only when the call has tried an endpoint already or some
/// endpoint is ejected. An endpoint whose connection is refused is ejected:
/// skipped for a while (1 s, doubling on each further failure up to 30 s
/// by default) unless no other is left.
#[derive(Debug)]
pub(crate) struct Balance {
    pub(crate) key: ServiceKey,
    pub(crate) config: Arc<ClientConfig>,
    registry: Arc<dyn Registry>,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    synced: AtomicBool,
    synced_notify: Notify,
    watchers: Arc<Watchers>,
    /// The latest end of an ejection (nanoseconds, as [`EndpointStats`]
    /// keeps them), 0 if none was ever made: while it is 0 or past, no
    /// endpoint is ejected, and selection reads no clock.
    ejections: AtomicU64,
    /// Whether the last update was below the protection threshold.
    protecting: AtomicBool,
    /// Whether a resolver task is running; it clears this when it ends
    /// (for example because the runtime it ran on shut down).
    resolving: Arc<AtomicBool>,
    resolver: Mutex<Option<AbortOnDrop<()>>>,
    /// Why the registry last failed to answer, until it answers: named in
    /// the error of a call that found no instances in time.
    last_error: Mutex<Option<String>>,
}

/// Why an attempt did not produce a response.
pub(crate) enum Failure {
    /// No endpoint is left for this call.
    NoEndpoint,
    /// The attempt failed; what is left of the request says what may follow.
    Attempt(Box<AttemptFailure>),
}

/// A failed attempt.
pub(crate) struct AttemptFailure {
    pub(crate) leftover: Leftover,
    pub(crate) message: String,
    pub(crate) address: String,
    pub(crate) connection: Arc<Connection>,
}

/// Clears the `resolving` flag when the resolver task ends or is dropped.
pub(crate) struct ResolvingGuard(Arc<AtomicBool>);

impl Drop for ResolvingGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Balance {
    pub(crate) fn new(
        key: ServiceKey,
        registry: Arc<dyn Registry>,
        config: Arc<ClientConfig>,
    ) -> Self {
        let watchers = Arc::new(Watchers {
            service: key.clone(),
            selector: (config.selector)(),
            observers: config.observers.clone(),
        });
        Self {
            key,
            config,
            registry,
            endpoints: ArcSwap::from_pointee(Vec::new()),
            synced: AtomicBool::new(false),
            synced_notify: Notify::new(),
            watchers,
            ejections: AtomicU64::new(0),
            protecting: AtomicBool::new(false),
            resolving: Arc::new(AtomicBool::new(false)),
            resolver: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    /// Notes why the registry failed to answer (`None`: it answered).
    pub(crate) fn registry_failed(&self, error: Option<String>) {
        *self.last_error.lock_unpoisoned() = error;
    }

    /// Makes sure a resolver runs (starting one needs a runtime, so it
    /// happens on first use, and again if the old one's runtime is gone),
    /// and says whether the first snapshot is in.
    pub(crate) fn ready_now(self: &Arc<Self>) -> bool {
        if !self.resolving.load(Ordering::Acquire) {
            self.start_resolver();
        }
        self.synced.load(Ordering::Acquire)
    }

    /// Waits for the first snapshot, at most the resolve timeout.
    async fn ready(self: &Arc<Self>) -> Result<(), Error> {
        if self.ready_now() {
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
                let last = self.last_error.lock_unpoisoned();
                // The registry's words, from the network: printed safely.
                let cause = last
                    .as_deref()
                    .map(|e| format!(": {}", crate::registry::limits::printable(e)))
                    .unwrap_or_default();
                Error::Resolve {
                    service: self.key.clone(),
                    reason: format!(
                        "the registry did not list its instances within {:?}{cause}",
                        self.config.resolve_timeout
                    ),
                }
            })
    }

    fn start_resolver(self: &Arc<Self>) {
        let mut resolver = self.resolver.lock_unpoisoned();
        if self.resolving.swap(true, Ordering::AcqRel) {
            return; // another caller started one
        }
        let guard = ResolvingGuard(self.resolving.clone());
        *resolver = Some(AbortOnDrop::new(tokio::spawn(resolver::run(
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
                        stats: same.stats.clone(),
                    }));
                }
                match self.authority(&instance.address) {
                    Ok(authority) => Some(Arc::new(Endpoint {
                        connection: Arc::new(Connection::new(instance.address.clone())),
                        stats: Arc::new(EndpointStats::default()),
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

    /// Waits until the service's instances are known (the first snapshot),
    /// at most the resolve timeout.
    pub(crate) async fn wait_ready(self: &Arc<Self>) -> Result<(), Status> {
        if !self.ready_now() {
            // Only until the first snapshot: boxed, to keep every call's future small.
            Box::pin(self.ready()).await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// How many endpoints there are now.
    pub(crate) fn endpoint_count(&self) -> usize {
        self.endpoints.load().len()
    }

    /// The current endpoints (for inspection, not the call path).
    pub(crate) fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// The endpoint for one attempt: chosen by the selector among those
    /// not in `tried` and not ejected (or, if every one left is ejected,
    /// among those: rather try one than fail outright).
    fn pick(&self, tried: &[Arc<Connection>], call: &CallInfo<'_>) -> Option<Arc<Endpoint>> {
        let endpoints = self.endpoints.load();
        if endpoints.is_empty() {
            return None;
        }
        let mut now = None;
        let ejections = self.ejections.load(Ordering::Relaxed);
        let some_ejected = ejections != 0 && {
            let now = *now.get_or_insert_with(Instant::now);
            let ejected = nanos_since_epoch(now) < ejections;
            if !ejected {
                // Every ejection is over: later calls read no clock (unless
                // another ejection came meanwhile).
                let _ = self.ejections.compare_exchange(
                    ejections,
                    0,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            ejected
        };
        if tried.is_empty() && !some_ejected {
            // The common call: every endpoint may be used.
            let chosen = self.watchers.selector.select(&endpoints, call)?;
            return endpoints.get(chosen).cloned();
        }
        // By connection: it outlives the endpoint's rebuilds when the
        // instance's metadata changes, and holding it rules out address reuse.
        let untried = endpoints
            .iter()
            .filter(|e| !tried.iter().any(|c| Arc::ptr_eq(c, &e.connection)));
        let mut usable: Vec<Arc<Endpoint>> = untried
            .clone()
            .filter(|e| !e.stats.ejected(&mut now))
            .cloned()
            .collect();
        if usable.is_empty() {
            usable = untried.cloned().collect();
        }
        if usable.is_empty() {
            return None;
        }
        let chosen = self.watchers.selector.select(&usable, call)?;
        usable.get(chosen).cloned()
    }

    /// Notes that `endpoint` refused a connection: it is skipped for a while.
    pub(crate) fn eject(&self, endpoint: &Endpoint) {
        let config = &self.config;
        let (duration, until) = endpoint
            .stats
            .eject(config.ejection_base, config.ejection_max);
        self.ejections.fetch_max(until, Ordering::Relaxed);
        tracing::debug!(service = %self.key, address = %endpoint.instance.address, ?duration,
            "instance ejected");
    }

    /// Starts attempt `number` of a call, once the service's instances are
    /// known ([`wait_ready`](Self::wait_ready)), on an endpoint not in `tried`:
    /// picks it now and, over an open connection, sends the request now;
    /// the future waits for the response's headers. It fails at once when
    /// no endpoint is left to try.
    pub(crate) fn attempt(
        &self,
        request: Request<RequestBody>,
        tried: &[Arc<Connection>],
        number: usize,
        deadline: Option<Deadline>,
    ) -> impl Future<Output = Result<Response<Observed>, Failure>> + Send + '_ {
        let number = u32::try_from(number).unwrap_or(u32::MAX);
        let call = CallInfo {
            service: &self.key,
            method: request.uri().path(),
            headers: request.headers(),
            attempt: number,
        };
        let Some(endpoint) = self.pick(tried, &call) else {
            return Either::Right(std::future::ready(Err(Failure::NoEndpoint)));
        };
        let method = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let guard = AttemptGuard::start(
            self.watchers.clone(),
            endpoint.clone(),
            method,
            number,
            deadline,
        );
        Either::Left(super::endpoint::send(self, endpoint, request, guard))
    }
}

pub(crate) fn unavailable(error: Error) -> Status {
    let mut status = Status::unavailable(error.to_string());
    status.set_source(Arc::new(error));
    status
}
