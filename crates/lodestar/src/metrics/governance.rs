//! The governance metrics: what the client's traffic and resilience layers
//! and the server's admission and fault layers decided.
//!
//! Client side, by `server_address` (the service called) and, where a
//! call's method is known, `rpc_method`: endpoints by state, ejections,
//! breaker states and transitions, retries, hedges, retry-budget denials,
//! bulkhead and breaker refusals, injected faults. Server side, by
//! `rpc_method` (an unknown method is `_OTHER`, as for the call metrics):
//! rate-limited and shed calls, injected faults. They count decisions, not
//! calls: nothing here runs on a call that no policy touches.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Metrics;
use super::rpc::MethodTable;
use crate::client::observe::DecisionKind as ClientDecision;
use crate::server::observe::{Decision as ServerDecisionOf, DecisionKind as ServerDecision};

/// `server_address`, `rpc_method`.
type CallLabels = [(&'static str, String); 2];
/// `server_address`, `state`.
type StateLabels = [(&'static str, String); 2];
/// `server_address`, `rpc_method`, `state`.
type BreakerLabels = [(&'static str, String); 3];

/// The client's governance metrics, in one registry.
#[derive(Debug, Clone)]
pub(crate) struct ClientGovernance {
    endpoints: Family<StateLabels, Gauge>,
    ejections: Family<[(&'static str, String); 2], Counter>,
    breaker_state: Family<CallLabels, Gauge>,
    breaker_transitions: Family<BreakerLabels, Counter>,
    breaker_rejected: Family<CallLabels, Counter>,
    bulkhead_rejected: Family<CallLabels, Counter>,
    retries: Family<CallLabels, Counter>,
    hedges: Family<CallLabels, Counter>,
    budget_denied: Family<CallLabels, Counter>,
    faults: Family<CallLabels, Counter>,
}

impl ClientGovernance {
    /// The set in `metrics`, registered on first use.
    pub(crate) fn of(metrics: &Metrics) -> Self {
        metrics.set(Self::register)
    }

    fn register(registry: &mut Registry) -> Self {
        let set = Self {
            endpoints: Family::default(),
            ejections: Family::default(),
            breaker_state: Family::default(),
            breaker_transitions: Family::default(),
            breaker_rejected: Family::default(),
            bulkhead_rejected: Family::default(),
            retries: Family::default(),
            hedges: Family::default(),
            budget_denied: Family::default(),
            faults: Family::default(),
        };
        let r = registry;
        r.register(
            "lodestar_client_endpoints",
            "Endpoints of each service called, by state: healthy (taking calls) or ejected",
            set.endpoints.clone(),
        );
        r.register("lodestar_client_ejections", "Endpoints taken out of rotation, by reason: connect (refused a connection), consecutive_failures, or outlier (a detection sweep)", set.ejections.clone());
        r.register(
            "lodestar_client_breaker_state",
            "State of each method's circuit breaker: 0 closed, 1 half-open, 2 open",
            set.breaker_state.clone(),
        );
        r.register(
            "lodestar_client_breaker_transitions",
            "Circuit breaker changes of state, by the state entered",
            set.breaker_transitions.clone(),
        );
        r.register(
            "lodestar_client_breaker_rejected",
            "Calls an open circuit breaker failed at once (UNAVAILABLE)",
            set.breaker_rejected.clone(),
        );
        r.register(
            "lodestar_client_bulkhead_rejected",
            "Calls a full bulkhead failed at once (RESOURCE_EXHAUSTED)",
            set.bulkhead_rejected.clone(),
        );
        r.register(
            "lodestar_client_retries",
            "Configured retries sent",
            set.retries.clone(),
        );
        r.register(
            "lodestar_client_hedges",
            "Hedged attempts sent",
            set.hedges.clone(),
        );
        r.register(
            "lodestar_client_retry_budget_denied",
            "Retries and hedges the retry budget denied",
            set.budget_denied.clone(),
        );
        r.register(
            "lodestar_client_faults_injected",
            "Faults the client policy injected (a delay, an abort, or both)",
            set.faults.clone(),
        );
        set
    }

    /// A decision of a resilience layer about a call of `method` (a path)
    /// to `service`.
    pub(crate) fn decided(&self, service: &str, method: &str, kind: &ClientDecision) {
        let labels = || {
            [
                ("server_address", service.to_owned()),
                (
                    "rpc_method",
                    method.strip_prefix('/').unwrap_or(method).to_owned(),
                ),
            ]
        };
        let transition = |state: &str, value: i64| {
            let [address, method] = labels();
            self.breaker_state
                .get_or_create(&[address.clone(), method.clone()])
                .set(value);
            self.breaker_transitions
                .get_or_create(&[address, method, ("state", state.to_owned())])
                .inc();
        };
        match kind {
            ClientDecision::BreakerOpened { .. } => transition("open", 2),
            ClientDecision::BreakerHalfOpen => transition("half_open", 1),
            ClientDecision::BreakerClosed => transition("closed", 0),
            ClientDecision::BreakerRejected => {
                self.breaker_rejected.get_or_create(&labels()).inc();
            }
            ClientDecision::BulkheadFull { .. } => {
                self.bulkhead_rejected.get_or_create(&labels()).inc();
            }
            ClientDecision::FaultInjected { .. } => {
                self.faults.get_or_create(&labels()).inc();
            }
            ClientDecision::Retry { .. } => {
                self.retries.get_or_create(&labels()).inc();
            }
            ClientDecision::Hedge { .. } => {
                self.hedges.get_or_create(&labels()).inc();
            }
            ClientDecision::BudgetDenied { .. } => {
                self.budget_denied.get_or_create(&labels()).inc();
            }
            ClientDecision::PushbackWait { .. } | ClientDecision::PushbackStop => {}
        }
    }

    /// An endpoint of `service` was ejected, for `reason`.
    pub(crate) fn ejected(&self, service: &str, reason: &'static str) {
        self.ejections
            .get_or_create(&[
                ("server_address", service.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    /// `service` has `healthy` endpoints taking calls and `ejected` ones
    /// out of rotation.
    pub(crate) fn endpoints(&self, service: &str, healthy: usize, ejected: usize) {
        for (state, count) in [("healthy", healthy), ("ejected", ejected)] {
            let labels = [
                ("server_address", service.to_owned()),
                ("state", state.to_owned()),
            ];
            self.endpoints
                .get_or_create(&labels)
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
}

/// The server's governance metrics: an observer of its policy layers.
#[derive(Debug, Clone)]
pub(crate) struct ServerGovernance {
    counts: ServerCounts,
    methods: MethodTable,
}

#[derive(Debug, Clone)]
struct ServerCounts {
    rate_limited: Family<[(&'static str, String); 1], Counter>,
    shed: Family<[(&'static str, String); 1], Counter>,
    faults: Family<[(&'static str, String); 1], Counter>,
}

impl ServerGovernance {
    /// The server's set in `metrics`, labelling calls by `methods`.
    pub(crate) fn new(metrics: &Metrics, methods: MethodTable) -> Self {
        let counts = metrics.set(|r| {
            let counts = ServerCounts {
                rate_limited: Family::default(),
                shed: Family::default(),
                faults: Family::default(),
            };
            r.register("lodestar_server_rate_limited", "Calls a rate limit refused (RESOURCE_EXHAUSTED) before the handler ran", counts.rate_limited.clone());
            r.register("lodestar_server_shed", "Calls shed for want of room under a concurrency limit (RESOURCE_EXHAUSTED) before the handler ran", counts.shed.clone());
            r.register("lodestar_server_faults_injected", "Faults the server policy injected (a delay, an abort, or both)", counts.faults.clone());
            counts
        });
        Self { counts, methods }
    }
}

impl crate::server::observe::Observer for ServerGovernance {
    fn decided(&self, decision: &ServerDecisionOf<'_>) {
        let family = match decision.kind {
            ServerDecision::RateLimited { .. } => &self.counts.rate_limited,
            ServerDecision::Shed { .. } => &self.counts.shed,
            ServerDecision::FaultInjected { .. } => &self.counts.faults,
            _ => return,
        };
        let method = self.methods.find(decision.method).method();
        family
            .get_or_create(&[("rpc_method", method.to_owned())])
            .inc();
    }
}
