//! The balance layer: the instances of one service (discovery), and which
//! one each attempt goes to (selection).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

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
use crate::client::budget::RetryBudget;
use crate::client::connection::Connection;
use crate::client::observe::{AttemptGuard, DecisionKind, Observed, OutlierWatch, Watchers};
use crate::client::outlier::{Detector, Reason};
use crate::client::policy::Policy;
use crate::client::retries::{MethodPlan, Plans};
use crate::client::route::Routing;
use crate::client::selector::{
    CallInfo, Endpoint, EndpointStats, Selector, instant_at, nanos_since_epoch,
};
use crate::client::{ClientConfig, Error};
use crate::deadline::Deadline;

/// Everything a [`Channel`](crate::client::Channel) shares: the endpoint
/// set, the selector, and the resolver that keeps the set fresh.
///
/// Selection reads a [`Selection`] built in advance, without locking; it
/// filters (and allocates) only for a call that has tried an endpoint
/// already. An endpoint is left out of selection (ejected) for a while when
/// its connection is refused (1 s, doubling on each further failure up to
/// 30 s by default) or when outlier detection ejects it; when fewer than
/// the panic threshold are left, every endpoint is used.
#[derive(Debug)]
pub(crate) struct Balance {
    pub(crate) key: ServiceKey,
    pub(crate) config: Arc<ClientConfig>,
    /// The state of the layers above retry (bulkhead, breakers, faults).
    pub(crate) guards: super::Guards,
    registry: Arc<dyn Registry>,
    /// What selection reads, replaced whole when anything it depends on
    /// changes (see [`Selection`]).
    selection: ArcSwap<Selection>,
    /// Held while a new selection is built, so that two changes at once
    /// (a registry update and an ejection) cannot lose one another.
    rebuilding: Mutex<()>,
    /// Wakes the resolver task to look again at its timers: an ejection
    /// began, or the policy changed.
    ejected: Arc<Notify>,
    /// Decides outlier ejections and returns.
    detector: Detector,
    /// Whether an ejection began since the selection was built: the
    /// resolver task builds it again.
    stale: AtomicBool,
    /// When outlier detection next sweeps.
    next_sweep: Mutex<Sweep>,
    /// Whether no sweep is scheduled because there is nothing to watch
    /// (see [`Sweep::Idle`]): the first failure reported wakes the sweeps.
    sweeps_idle: Arc<AtomicBool>,
    /// This balance layer, for the reports of its attempts.
    this: Weak<Balance>,
    synced: AtomicBool,
    synced_notify: Notify,
    /// Whether the last update was below the protection threshold.
    protecting: AtomicBool,
    /// Whether the last selection was below the panic threshold.
    panicking: AtomicBool,
    /// Whether a resolver task is running; it clears this when it ends
    /// (for example because the runtime it ran on shut down).
    resolving: Arc<AtomicBool>,
    resolver: Mutex<Option<AbortOnDrop<()>>>,
    /// Why the registry last failed to answer, until it answers: named in
    /// the error of a call that found no instances in time.
    last_error: Mutex<Option<String>>,
    /// The configured retries and hedges of the service's methods, and its
    /// retry budget, following the policy.
    plans: Plans,
}

/// What selection reads for each call: built when the instances, an
/// ejection or the policy change, never per call.
#[derive(Debug)]
pub(crate) struct Selection {
    /// Every endpoint that takes traffic, ejected or not, by instance id.
    endpoints: Arc<[Arc<Endpoint>]>,
    /// The endpoints a call may use (not ejected, or all of them in a
    /// panic), grouped by the policy's routes and prepared for the selector.
    routing: Routing,
    /// When the first ejection in force ends (see [`nanos_since_epoch`]).
    ejected_until: Option<u64>,
    /// The selector, and who else is told about each attempt.
    watchers: Arc<Watchers>,
    /// The policy this selection follows.
    policy: Arc<Policy>,
}

/// When outlier detection next sweeps (judges the interval just ended and
/// ends the ejections that are over).
#[derive(Debug, Clone, Copy)]
enum Sweep {
    /// At the resolver task's next wake: the policy changed, or no sweep
    /// has run yet.
    Due,
    /// At this time.
    At(Instant),
    /// Not until a failure is reported: the last sweep found nothing to
    /// watch (no failure, no ejection, no multiplier above 0), or
    /// detection is off.
    Idle,
}

/// Why an attempt did not produce a response.
pub(crate) enum Failure {
    /// No endpoint is left for this call.
    NoEndpoint,
    /// The call's route leaves it no endpoint, and says to fail.
    NoRoute(crate::client::route::RouteError),
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
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| {
            let policy = config.policy.clone();
            let selector = selector_for(&config, &policy);
            let sweeps_idle = Arc::new(AtomicBool::new(false));
            let watchers = watchers(&key, &config, selector, &policy, this, &sweeps_idle);
            let routing = Routing::build(
                &policy,
                &[],
                &[],
                &config.caller,
                watchers.selector.as_ref(),
            );
            let selection = Selection {
                endpoints: Arc::new([]),
                routing,
                ejected_until: None,
                watchers,
                policy,
            };
            Self::with_selection(key, registry, config, selection, this.clone(), sweeps_idle)
        })
    }

    /// Whether any method of the service is retried or hedged: all a call
    /// of a service without them pays for them is this load.
    pub(crate) fn is_configured(&self) -> bool {
        self.plans.any_configured()
    }

    /// The plan of the method `path` calls, if it is retried or hedged,
    /// with the service's retry budget.
    pub(crate) fn plan(&self, path: &str) -> Option<(Arc<MethodPlan>, Option<Arc<RetryBudget>>)> {
        self.plans.method(path)
    }

    /// Tells the client's observers about a decision on a call of `method`.
    pub(crate) fn decided(&self, method: &str, kind: DecisionKind) {
        self.guards.reporter.report(method, kind);
    }

    fn with_selection(
        key: ServiceKey,
        registry: Arc<dyn Registry>,
        config: Arc<ClientConfig>,
        selection: Selection,
        this: Weak<Balance>,
        sweeps_idle: Arc<AtomicBool>,
    ) -> Self {
        let plans = Plans::default();
        plans.follow(&selection.policy);
        Self {
            plans,
            detector: Detector::new(key.clone()),
            guards: super::Guards::new(key.clone(), &config, &selection.policy),
            key,
            config,
            registry,
            selection: ArcSwap::from_pointee(selection),
            rebuilding: Mutex::new(()),
            ejected: Arc::new(Notify::new()),
            next_sweep: Mutex::new(Sweep::Due),
            sweeps_idle,
            stale: AtomicBool::new(false),
            this,
            synced: AtomicBool::new(false),
            synced_notify: Notify::new(),
            protecting: AtomicBool::new(false),
            panicking: AtomicBool::new(false),
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
        let current = self.selection.load();
        self.select_with(
            endpoints,
            current.policy.clone(),
            current.watchers.clone(),
            now,
        );
    }

    /// [`select_over`](Self::select_over), under `policy`, with `watchers`.
    fn select_with(
        &self,
        endpoints: Arc<[Arc<Endpoint>]>,
        policy: Arc<Policy>,
        watchers: Arc<Watchers>,
        now: &mut Option<Instant>,
    ) {
        let mut ejected_until = None::<u64>;
        let mut usable: Vec<Arc<Endpoint>> = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints.iter() {
            if endpoint.stats.ejected(now) {
                let until = endpoint.stats.ejected_until();
                ejected_until = Some(ejected_until.map_or(until, |u| u.min(until)));
            } else if !endpoint.stats.outlier.is_ejected() {
                usable.push(endpoint.clone());
            }
        }
        // The panic threshold: too few left (or none) would take all the
        // traffic; rather spread it over every endpoint.
        let threshold = u64::from(policy.outlier.panic_threshold_percent);
        let panic = usable.len() < endpoints.len()
            && (usable.is_empty()
                || (usable.len() as u64) * 100 < threshold * endpoints.len() as u64);
        // Said once when it begins and once when it ends (and not at all
        // for a lone instance: there is no one else to call).
        if panic != self.panicking.swap(panic, Ordering::Relaxed) && endpoints.len() > 1 {
            if panic {
                tracing::warn!(service = %self.key, usable = usable.len(), total = endpoints.len(),
                    panic_threshold_percent = threshold,
                    "below the panic threshold: calling every instance, ejected or not");
            } else {
                tracing::info!(service = %self.key, usable = usable.len(), total = endpoints.len(),
                    "back above the panic threshold: ejected instances left out again");
            }
        }
        if let Some(counted) = &self.guards.reporter.counted {
            let healthy = usable.len();
            counted.endpoints(&self.key.service, healthy, endpoints.len() - healthy);
        }
        if panic {
            usable = endpoints.to_vec();
        }
        let routing = Routing::build(
            &policy,
            &usable,
            &endpoints,
            &self.config.caller,
            watchers.selector.as_ref(),
        );
        self.selection.store(Arc::new(Selection {
            endpoints,
            routing,
            ejected_until,
            watchers,
            policy,
        }));
    }

    /// The policy in force.
    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.selection.load().policy.clone()
    }

    /// Follows `policy` from the next call on (a validated one), over the
    /// same endpoints and connections; a new strategy gets a new selector.
    pub(crate) fn set_policy(&self, policy: Arc<Policy>) {
        let _rebuilding = self.rebuilding.lock_unpoisoned();
        let current = self.selection.load();
        let selector =
            if self.config.selector.is_none() && policy.strategy != current.policy.strategy {
                selector_for(&self.config, &policy)
            } else {
                current.watchers.selector.clone()
            };
        let watchers = watchers(
            &self.key,
            &self.config,
            selector,
            &policy,
            &self.this,
            &self.sweeps_idle,
        );
        self.guards.follow(&policy);
        self.plans.follow(&policy);
        tracing::info!(service = %self.key, "client policy replaced");
        self.select_with(current.endpoints.clone(), policy, watchers, &mut None);
        drop(_rebuilding);
        // Outlier detection sweeps once more under the new settings (which
        // may end every ejection), then at the new interval. (Never with
        // `rebuilding` held: `run_timers` takes `next_sweep`, then
        // `rebuilding`.)
        *self.next_sweep.lock_unpoisoned() = Sweep::Due;
        self.sweeps_idle.store(false, Ordering::Release);
        self.ejected.notify_one();
    }

    /// A failure was reported while the sweeps were idle: they start
    /// again, the first an interval from now.
    pub(crate) fn wake_sweeps(&self) {
        let mut next_sweep = self.next_sweep.lock_unpoisoned();
        if let Sweep::Idle = *next_sweep {
            let interval = self.selection.load().policy.outlier.interval();
            *next_sweep = Sweep::At(crate::deadline::later(Instant::now(), interval));
            self.sweeps_idle.store(false, Ordering::Release);
            drop(next_sweep);
            self.ejected.notify_one();
        }
    }

    /// Asks the resolver task to build the selection again, soon (an
    /// ejection began): the report of a failed attempt does not pay for
    /// the rebuild, and a burst of failures costs one rebuild.
    fn reselect_soon(&self) {
        self.stale.store(true, Ordering::Release);
        self.ejected.notify_one();
    }

    /// Builds the selection again over the same endpoints (an ejection
    /// began or ended).
    fn reselect(&self) {
        let _rebuilding = self.rebuilding.lock_unpoisoned();
        let endpoints = self.selection.load().endpoints.clone();
        self.select_over(endpoints, &mut None);
    }

    /// Runs the timers of ejection: sweeps outlier detection when its
    /// interval is up, and ends the connection ejections that are over.
    /// Returns when to run them next, if ever (the resolver task sleeps
    /// until then, or until woken by a new ejection or policy).
    pub(crate) fn run_timers(&self) -> Option<Instant> {
        let now = Instant::now();
        let selection = self.selection.load_full();
        let settings = &selection.policy.outlier;
        let mut changed = self.stale.swap(false, Ordering::AcqRel);
        let next_sweep = {
            let mut next_sweep = self.next_sweep.lock_unpoisoned();
            let due = match *next_sweep {
                Sweep::Due => true,
                Sweep::At(at) => at <= now,
                Sweep::Idle => false,
            };
            if due {
                let endpoints = &selection.endpoints;
                let failed = endpoints.iter().any(|e| e.stats.outlier.failures_pending());
                let changes = self.detector.sweep(endpoints, settings, now);
                for _ in &changes.ejected {
                    self.guards.reporter.ejected("outlier");
                }
                changed |= !changes.is_empty();
                // Another sweep only while there is something to judge or
                // end: failures in the interval just judged, an ejection,
                // or a multiplier still to come down. Otherwise no timer
                // stays armed (tokio reads the clock at every park while
                // one is), until a failure is reported.
                let watching = failed
                    || endpoints
                        .iter()
                        .any(|e| e.stats.outlier.is_ejected() || e.stats.outlier.multiplier() != 0);
                *next_sweep = if settings.enabled && watching {
                    Sweep::At(crate::deadline::later(now, settings.interval()))
                } else {
                    Sweep::Idle
                };
                self.sweeps_idle
                    .store(matches!(*next_sweep, Sweep::Idle), Ordering::Release);
            }
            match *next_sweep {
                Sweep::At(at) => Some(at),
                Sweep::Due | Sweep::Idle => None,
            }
        };
        if changed {
            self.reselect();
        }
        let ejection_ends = match self.selection.load().ejected_until {
            Some(next) if nanos_since_epoch(now) >= next => {
                self.reselect();
                self.selection.load().ejected_until.map(instant_at)
            }
            next => next.map(instant_at),
        };
        match (next_sweep, ejection_ends) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// `endpoint` just failed [`consecutive_failures`](crate::client::outlier::OutlierSettings::consecutive_failures)
    /// times in a row: ejects it, if outlier detection allows.
    pub(crate) fn consecutive_failures(&self, endpoint: &Endpoint) {
        let selection = self.selection.load_full();
        let ejected = self.detector.try_eject(
            endpoint,
            &selection.endpoints,
            &selection.policy.outlier,
            Instant::now(),
            Reason::ConsecutiveFailures,
        );
        if ejected.is_some() {
            self.guards.reporter.ejected("consecutive_failures");
            self.reselect_soon();
        }
    }

    /// The endpoint for one attempt: chosen by the selector among the
    /// endpoints the call's route allows (prepared in advance), or, for a
    /// call that has tried some already, among those of them it has not
    /// tried: in the route's group (its local part first), then, if the
    /// route allows, anywhere; with no route, an ejected endpoint rather
    /// than none.
    fn pick(
        &self,
        tried: &[Arc<Connection>],
        call: &CallInfo<'_>,
    ) -> Result<(Arc<Endpoint>, Arc<Watchers>), Failure> {
        let selection = self.selection.load();
        let routing = &selection.routing;
        let routed = match tried.first() {
            None => routing.route(call),
            Some(first) => routing.route_retry(call, first),
        }
        .map_err(Failure::NoRoute)?;
        let selector = selection.watchers.selector.as_ref();
        let endpoint = if tried.is_empty() {
            // The common call.
            let group = routed.group;
            if group.endpoints().is_empty() {
                return Err(Failure::NoEndpoint);
            }
            selector
                .select_prepared(group, call)
                .and_then(|chosen| group.endpoints().get(chosen))
                .ok_or(Failure::NoEndpoint)?
                .clone()
        } else {
            // By connection: it outlives the endpoint's rebuilds when the
            // instance's metadata changes, and holding it rules out address reuse.
            let untried = |set: &[Arc<Endpoint>]| -> Vec<Arc<Endpoint>> {
                set.iter()
                    .filter(|e| !tried.iter().any(|c| Arc::ptr_eq(c, &e.connection)))
                    .cloned()
                    .collect()
            };
            let mut candidates = untried(routed.group.endpoints());
            if candidates.is_empty() {
                candidates = untried(routed.whole.endpoints());
            }
            if candidates.is_empty() && (routed.retry_anywhere || routed.unrouted) {
                candidates = untried(routing.all().endpoints());
            }
            if candidates.is_empty() && routed.unrouted {
                // Only ejected ones are left: rather try one than fail outright.
                candidates = untried(&selection.endpoints);
            }
            if candidates.is_empty() {
                return Err(Failure::NoEndpoint);
            }
            selector
                .select(&candidates, call)
                .and_then(|chosen| candidates.get(chosen))
                .ok_or(Failure::NoEndpoint)?
                .clone()
        };
        Ok((endpoint, selection.watchers.clone()))
    }

    /// Notes that `endpoint` refused a connection: it is skipped for a while.
    pub(crate) fn eject(&self, endpoint: &Endpoint) {
        let config = &self.config;
        let (duration, _) = endpoint
            .stats
            .eject(config.ejection_base, config.ejection_max);
        self.guards.reporter.ejected("connect");
        self.reselect_soon();
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
        self.start(request, tried, number, deadline, false).1
    }

    /// [`attempt`](Self::attempt), also giving the connection of the
    /// endpoint chosen (none if none was left).
    pub(crate) fn attempt_picked(
        &self,
        request: Request<RequestBody>,
        tried: &[Arc<Connection>],
        number: usize,
        deadline: Option<Deadline>,
    ) -> (
        Option<Arc<Connection>>,
        impl Future<Output = Result<Response<Observed>, Failure>> + Send + '_,
    ) {
        self.start(request, tried, number, deadline, true)
    }

    /// Starts an attempt; gives its connection if `picked` is asked for.
    pub(crate) fn start(
        &self,
        request: Request<RequestBody>,
        tried: &[Arc<Connection>],
        number: usize,
        deadline: Option<Deadline>,
        picked: bool,
    ) -> (
        Option<Arc<Connection>>,
        impl Future<Output = Result<Response<Observed>, Failure>> + Send + '_,
    ) {
        let number = u32::try_from(number).unwrap_or(u32::MAX);
        let call = CallInfo {
            service: &self.key,
            method: request.uri().path(),
            headers: request.headers(),
            attempt: number,
        };
        let (endpoint, watchers) = match self.pick(tried, &call) {
            Ok(picked) => picked,
            Err(failure) => return (None, Either::Right(std::future::ready(Err(failure)))),
        };
        let method = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let guard = AttemptGuard::start(watchers, endpoint.clone(), method, number, deadline);
        // Only when asked: the common call takes no reference it drops at once.
        let connection = picked.then(|| endpoint.connection.clone());
        (
            connection,
            Either::Left(super::endpoint::send(self, endpoint, request, guard)),
        )
    }
}

/// Who is told about each attempt under `policy`: `selector`, the client's
/// observers, and outlier detection (reporting to `balance`).
fn watchers(
    key: &ServiceKey,
    config: &ClientConfig,
    selector: Arc<dyn Selector>,
    policy: &Policy,
    balance: &Weak<Balance>,
    sweeps_idle: &Arc<AtomicBool>,
) -> Arc<Watchers> {
    let outlier = policy.outlier.enabled.then(|| OutlierWatch {
        settings: policy.outlier.clone(),
        codes: policy.outlier.failure_code_set(),
        balance: balance.clone(),
        sweeps_idle: sweeps_idle.clone(),
    });
    Arc::new(Watchers {
        service: key.clone(),
        selector,
        observers: config.observers.clone(),
        outlier,
    })
}

/// The selector of a channel: the user's, or the one `policy` names.
fn selector_for(config: &ClientConfig, policy: &Policy) -> Arc<dyn Selector> {
    match &config.selector {
        Some(factory) => Arc::from(factory()),
        None => Arc::from(crate::client::strategy::factory(&policy.strategy)()),
    }
}

pub(crate) fn unavailable(error: Error) -> Status {
    let mut status = Status::unavailable(error.to_string());
    status.set_source(Arc::new(error));
    status
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lodestar_core::MemoryRegistry;

    use super::*;

    fn balance() -> Arc<Balance> {
        let balance = Balance::new(
            ServiceKey::new("svc"),
            Arc::new(MemoryRegistry::new()),
            Arc::new(ClientConfig::default()),
        );
        balance.update(
            ["127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"]
                .into_iter()
                .enumerate()
                .map(|(i, address)| Instance::new("svc", address).with_id(format!("i{i}"))),
        );
        balance
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_service_keeps_no_sweep_timer_and_a_failure_starts_one() {
        let balance = balance();
        let interval = Duration::from_millis(Policy::default().outlier.interval_ms);
        // The first sweep finds nothing to watch: no timer stays armed.
        assert_eq!(balance.run_timers(), None);
        assert!(balance.sweeps_idle.load(Ordering::Acquire));
        // A failure wakes the sweeps, an interval from now.
        let endpoint = balance.endpoints()[0].clone();
        endpoint
            .stats
            .outlier
            .record(true, &Policy::default().outlier);
        balance.wake_sweeps();
        let woken = Instant::now();
        assert_eq!(balance.run_timers(), Some(woken + interval));
        // That sweep judges the failure; the one after, with nothing new,
        // goes idle again.
        tokio::time::advance(interval).await;
        assert_eq!(balance.run_timers(), Some(woken + interval * 2));
        tokio::time::advance(interval).await;
        assert_eq!(balance.run_timers(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn sweeps_go_on_while_an_instance_is_ejected() {
        let balance = balance();
        assert_eq!(balance.run_timers(), None);
        let endpoint = balance.endpoints()[0].clone();
        balance.consecutive_failures(&endpoint);
        assert!(endpoint.stats.is_ejected());
        balance.wake_sweeps();
        let settings = Policy::default().outlier;
        let interval = settings.interval();
        // Every interval until its ejection (30 s) is over and it is back.
        for _ in 0..4 {
            assert!(balance.run_timers().is_some());
            tokio::time::advance(interval).await;
        }
        assert!(!endpoint.stats.is_ejected());
    }
}
