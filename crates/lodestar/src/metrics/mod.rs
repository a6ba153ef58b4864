//! Prometheus metrics: what every lodestar process counts, and the
//! registry it is counted in.
//!
//! lodestar counts its calls, its governance decisions, its registry and
//! its broker in a [`Metrics`] registry, without any code from the user:
//! servers and clients use the process's [`Metrics::global`] registry
//! unless their builders are given another
//! ([`ServiceBuilder::metrics`](crate::ServiceBuilder::metrics),
//! [`ClientBuilder::metrics`](crate::client::ClientBuilder::metrics)).
//! A service serves it as OpenMetrics text on its admin address
//! (`GET /metrics`, see [`admin`](crate::admin)); the registry server on
//! its HTTP port. Every metric, its labels and its meaning are listed in
//! `docs/observability.md`.
//!
//! The names follow the OpenTelemetry semantic conventions for RPC, as
//! Prometheus spells them: `rpc_server_call_duration_seconds`, labelled by
//! `rpc_system_name`, `rpc_method` (`pkg.Service/Method`, or `_OTHER` for a
//! method the server does not serve), `rpc_status_code` (`OK`,
//! `NOT_FOUND`, ...) and `error_type` (the code again, on failures only).
//! Labels never hold an address or an instance id, so the number of series
//! is bounded by the methods and codes.
//!
//! The hot path takes no lock: each method's series are found once (a
//! server's at start, a client's on its first call) and counted with
//! relaxed atomics ([`DurationHistogram`]).
//!
//! Other crates and users add their own metrics to the same registry, with
//! the [`prometheus_client`] types:
//!
//! ```
//! use lodestar::metrics::Metrics;
//! use lodestar::metrics::prometheus_client::metrics::counter::Counter;
//!
//! #[derive(Clone)]
//! struct Mine {
//!     jobs: Counter,
//! }
//!
//! let metrics = Metrics::new();
//! // Registered once per registry, however often it is asked for.
//! let mine = metrics.set(|registry| {
//!     let jobs = Counter::default();
//!     registry.register("myapp_jobs", "Jobs done", jobs.clone());
//!     Mine { jobs }
//! });
//! mine.jobs.inc();
//! assert!(metrics.encode().contains("myapp_jobs_total 1"));
//! ```

mod bounded;
mod broker;
pub(crate) mod governance;
mod histogram;
pub(crate) mod rpc;
mod sources;

use std::any::{Any, TypeId};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use lodestar_core::sync::MutexExt;
pub use prometheus_client;
use prometheus_client::registry::Registry;

pub use broker::{BrokerMetrics, MAX_TOPICS, OTHER_TOPIC, TopicMetrics};
pub use histogram::DurationHistogram;
pub use sources::Sources;

/// The content type of [`Metrics::encode`]'s text: OpenMetrics 1.0.0.
/// Prometheus reads the text in this format only when the response says
/// so (otherwise it takes it for its older text format, and the `_total`
/// suffixes and `# EOF` confuse it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The upper bounds, in seconds, of the buckets of every duration
/// histogram lodestar keeps: the OpenTelemetry semantic conventions'
/// advice for RPC and HTTP durations (5 ms to 10 s). They include every
/// bound of Prometheus' default buckets, so the compatibility family's
/// histogram is made from them.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// A registry of metrics, encoded as one OpenMetrics document. Cheap to
/// clone: clones share the registry.
///
/// Sets of metrics are registered once per registry
/// ([`set`](Self::set)): two servers in one process, given the same
/// registry, count into the same series (a process is one scrape target).
#[derive(Clone, Default)]
pub struct Metrics {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    registry: Mutex<Registry>,
    /// The sets registered, by type.
    sets: Mutex<Vec<(TypeId, Box<dyn Any + Send + Sync>)>>,
    /// Whether the go-grpc-prometheus names are added.
    grpc_compat: Arc<std::sync::atomic::AtomicBool>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process's registry: what servers, clients, the registry server
    /// and brokers count in unless given another.
    pub fn global() -> &'static Metrics {
        static GLOBAL: OnceLock<Metrics> = OnceLock::new();
        GLOBAL.get_or_init(Metrics::new)
    }

    /// The set of metrics of type `T` in this registry: registered by
    /// `register` the first time it is asked for, then the same set (a
    /// clone of it) every time.
    pub fn set<T>(&self, register: impl FnOnce(&mut Registry) -> T) -> T
    where
        T: Clone + Send + Sync + 'static,
    {
        let mut sets = self.shared.sets.lock_unpoisoned();
        let found = sets
            .iter()
            .find(|(id, _)| *id == TypeId::of::<T>())
            .and_then(|(_, set)| set.downcast_ref::<T>());
        if let Some(set) = found {
            return set.clone();
        }
        let set = register(&mut self.shared.registry.lock_unpoisoned());
        sets.push((TypeId::of::<T>(), Box::new(set.clone())));
        set
    }

    /// Adds, from now on, the family names of go-grpc-prometheus
    /// (`grpc_server_handled_total`, `grpc_server_handling_seconds`,
    /// `grpc_client_handled_total`, ... with `grpc_type`, `grpc_service`,
    /// `grpc_method` and `grpc_code` labels) beside lodestar's own, for
    /// dashboards made for them. They are made from the same counts, so
    /// they cost nothing per call. Default: off.
    pub fn with_grpc_compat(self, on: bool) -> Self {
        self.shared
            .grpc_compat
            .store(on, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// Every metric of the registry, as an OpenMetrics text document
    /// (served with [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        let registry = self.shared.registry.lock_unpoisoned();
        // Writing to a String does not fail; a collector that fails leaves
        // what it wrote so far, and the document stays readable.
        if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
            tracing::warn!("a metrics collector failed to encode; the scrape is incomplete");
        }
        text
    }
}
