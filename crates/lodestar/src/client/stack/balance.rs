//! The balance layer: the instances of one service (discovery), and which
//! one each attempt goes to (selection).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::client::selector::{
    CallInfo, Endpoint, EndpointStats, Prepared, instant_at, nanos_since_epoch,
};
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
    /// What selection reads, replaced whole when anything it depends on
    /// changes (see [`Selection`]).
    selection: ArcSwap<Selection>,
    /// Held while a new selection is built, so that two changes at once
    /// (a registry update and an ejection) cannot lose one another.
    rebuilding: Mutex<()>,
    /// Wakes the resolver task to look again at when the next ejection
    /// ends.
    ejected: Arc<Notify>,
    synced: AtomicBool,
    synced_notify: Notify,
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

/// What selection reads for each call: built when the instances, an
/// ejection or the policy change, never per call.
#[derive(Debug)]
pub(crate) struct Selection {
    /// Every endpoint that takes traffic, ejected or not, by instance id.
    endpoints: Arc<[Arc<Endpoint>]>,
    /// The endpoints a call may use (not ejected), prepared for the
    /// selector.
    usable: Prepared,
    /// When the first ejection in force ends (see [`nanos_since_epoch`]).
    ejected_until: Option<u64>,
    /// The selector, and who else is told about each attempt.
    watchers: Arc<Watchers>,
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
            selector: Arc::from((config.selector)()),
            observers: config.observers.clone(),
        });
        let selection = Selection {
            endpoints: Arc::new([]),
            usable: Prepared::new(watchers.selector.as_ref(), Arc::new([])),
            ejected_until: None,
            watchers,
        };
        Self {
            key,
            config,
            registry,
            selection: ArcSwap::from_pointee(selection),
            rebuilding: Mutex::new(()),
            ejected: Arc::new(Notify::new()),
            synced: AtomicBool::new(false),
            synced_notify: Notify::new(),
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
            self.ejected.clone(),
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
        let _rebuilding = self.rebuilding.lock_unpoisoned();
        let old = self.selection.load().endpoints.clone();
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
        self.select_over(next.into(), &mut None);
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
        self.selection.load().endpoints.len()
    }

    /// The current endpoints (for inspection, not the call path).
    pub(crate) fn endpoints(&self) -> Arc<[Arc<Endpoint>]> {
        self.selection.load().endpoints.clone()
    }

    /// Builds and publishes the selection over `endpoints`, as they stand
    /// at `now` (read from the clock if needed). The caller holds
    /// `rebuilding`.
    fn select_over(&self, endpoints: Arc<[Arc<Endpoint>]>, now: &mut Option<Instant>) {
        let watchers = self.selection.load().watchers.clone();
        let mut ejected_until = None::<u64>;
        let mut usable: Vec<Arc<Endpoint>> = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints.iter() {
            if endpoint.stats.ejected(now) {
                let until = endpoint.stats.ejected_until();
                ejected_until = Some(ejected_until.map_or(until, |u| u.min(until)));
            } else {
                usable.push(endpoint.clone());
            }
        }
        if usable.is_empty() {
            // Every endpoint is ejected: rather try one than fail outright.
            usable = endpoints.to_vec();
        }
        let usable = Prepared::new(watchers.selector.as_ref(), usable.into());
        self.selection.store(Arc::new(Selection {
            endpoints,
            usable,
            ejected_until,
            watchers,
        }));
    }

    /// Builds the selection again over the same endpoints (an ejection
    /// began or ended).
    fn reselect(&self) {
        let _rebuilding = self.rebuilding.lock_unpoisoned();
        let endpoints = self.selection.load().endpoints.clone();
        self.select_over(endpoints, &mut None);
    }

    /// When the next ejection in force ends, if any; ends those that are
    /// over first (by building the selection again).
    pub(crate) fn end_ejections(&self) -> Option<Instant> {
        let next = self.selection.load().ejected_until?;
        if nanos_since_epoch(Instant::now()) < next {
            return Some(instant_at(next));
        }
        self.reselect();
        self.selection.load().ejected_until.map(instant_at)
    }

    /// The endpoint for one attempt: chosen by the selector among the
    /// endpoints not ejected (prepared in advance), or, for a call that
    /// has tried some already, among those it has not tried.
    fn pick(
        &self,
        tried: &[Arc<Connection>],
        call: &CallInfo<'_>,
    ) -> Option<(Arc<Endpoint>, Arc<Watchers>)> {
        let selection = self.selection.load();
        let usable = &selection.usable;
        if usable.endpoints().is_empty() {
            return None;
        }
        let selector = selection.watchers.selector.as_ref();
        let endpoint = if tried.is_empty() {
            // The common call.
            let chosen = selector.select_prepared(usable, call)?;
            usable.endpoints().get(chosen)?.clone()
        } else {
            // By connection: it outlives the endpoint's rebuilds when the
            // instance's metadata changes, and holding it rules out address reuse.
            let untried = |set: &[Arc<Endpoint>]| -> Vec<Arc<Endpoint>> {
                set.iter()
                    .filter(|e| !tried.iter().any(|c| Arc::ptr_eq(c, &e.connection)))
                    .cloned()
                    .collect()
            };
            let mut candidates = untried(usable.endpoints());
            if candidates.is_empty() {
                // Only ejected ones are left: rather try one than fail outright.
                candidates = untried(&selection.endpoints);
            }
            let untried = candidates;
            if untried.is_empty() {
                return None;
            }
            let chosen = selector.select(&untried, call)?;
            untried.get(chosen)?.clone()
        };
        Some((endpoint, selection.watchers.clone()))
    }

    /// Notes that `endpoint` refused a connection: it is skipped for a while.
    pub(crate) fn eject(&self, endpoint: &Endpoint) {
        let config = &self.config;
        let (duration, _) = endpoint
            .stats
            .eject(config.ejection_base, config.ejection_max);
        self.reselect();
        self.ejected.notify_one();
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
        let Some((endpoint, watchers)) = self.pick(tried, &call) else {
            return Either::Right(std::future::ready(Err(Failure::NoEndpoint)));
        };
        let method = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let guard = AttemptGuard::start(watchers, endpoint.clone(), method, number, deadline);
        Either::Left(super::endpoint::send(self, endpoint, request, guard))
    }
}

pub(crate) fn unavailable(error: Error) -> Status {
    let mut status = Status::unavailable(error.to_string());
    status.set_source(Arc::new(error));
    status
}
