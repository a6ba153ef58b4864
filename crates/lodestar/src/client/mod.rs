//! Calling services by name.
//!
//! A [`Client`] holds a registry and the settings shared by every call. For
//! each service name it keeps one [`Channel`]: a local cache of the
//! service's instances, kept fresh by a background watch of the registry,
//! and one lazily opened HTTP/2 connection per instance. Generated clients
//! sit on a channel (`RouteGuideClient::by_name(&client, "route-guide")`).
//!
//! # What happens on a call
//!
//! A call passes through a stack of layers, built in one place
//! (`client/stack`), outer to inner:
//!
//! 1. **Your layers** ([`ClientBuilder::layer`]): any tower layers, which
//!    see each call once, as the caller made it.
//! 2. **Deadline**: the earliest of the request's own timeout, the deadline
//!    of the call being served (see [`Deadline`](crate::Deadline)) and the
//!    client's default. It bounds everything below.
//! 3. **Codec**: JSON or protobuf, compression, and the message size limits.
//! 4. **Retry**: a request that never reached a server (the connection
//!    could not be made, or was found closed before the request went out)
//!    is sent to another instance, whatever its kind. A unary request to a
//!    method marked idempotent in its `.proto` is also sent again when the
//!    instance fails before answering. Otherwise the caller gets
//!    `UNAVAILABLE`. A method the [`Policy`] retries or hedges
//!    ([`retries`]) is also sent again on the codes it names, or hedged,
//!    within the service's [retry budget](budget).
//! 5. **Balance**: the instances come from a local cache kept fresh by a
//!    watch of the registry (the registry is never asked on this path);
//!    the service's [`Policy`] routes the call to a group of them (routes,
//!    splits, the caller's zone), and the [`Selector`] of its strategy
//!    picks one, P2C peak-EWMA by default (see [`strategy`]). An instance
//!    that refuses connections is *ejected*: skipped for a while (1 s,
//!    doubling on each further failure up to 30 s by default); so is one
//!    that keeps failing ([`outlier`] detection); unless too few are left
//!    (the panic threshold). Every attempt is counted on its endpoint
//!    ([`EndpointStats`](selector::EndpointStats)) and reported to
//!    [observers](observe).
//! 6. **Endpoint**: one lazily opened HTTP/2 connection per instance. Calls
//!    go over native gRPC, or over gRPC-Web or Connect
//!    ([`ClientBuilder::protocol`]), translated here.
//!
//! The trace context of the call being served
//! ([`TraceContext`](crate::trace::TraceContext)) goes out with every call,
//! as its deadline does.

pub mod budget;
mod channel;
mod connection;
pub mod observe;

pub mod breaker;
pub mod bulkhead;
pub mod outlier;
pub mod policy;
pub mod retries;
pub(crate) mod route;
pub mod selector;
mod stack;
pub mod strategy;
mod stream;
mod web;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::body::CallBody;
pub use channel::{BoxChannel, CallFuture, Channel, ResponseBody};
use lodestar_core::sync::MutexExt;
use lodestar_core::{DEFAULT_GROUP, DEFAULT_NAMESPACE, Registry, ServiceKey};

use crate::MessageLimits;
use crate::codec::Codec;
use crate::compression::Encoding;
use crate::tls::ClientTls;

use observe::{Observer, ObserverDebug};
use selector::Selector;
use stack::Balance;

/// The most instances one call is ever sent to.
const MAX_ATTEMPTS: usize = 8;

pub use policy::{Policy, PolicyError, Strategy};
pub use web::{CallKind, Protocol, UnknownProtocol};

/// What a call needs to know about its method, carried in the request's
/// extensions so that it reaches the channel through any layers. Clients
/// that `lodestar-build` generates add it to every call.
///
/// ```
/// use lodestar::client::MethodInfo;
///
/// static DESCRIPTORS: &[u8] = &[]; // a generated FILE_DESCRIPTOR_SET
/// let mut request = http::Request::new(());
/// request
///     .extensions_mut()
///     .insert(MethodInfo::new(DESCRIPTORS).idempotent(true));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MethodInfo {
    /// The encoded `FileDescriptorSet` that declares the method, which the
    /// JSON codec needs.
    pub(crate) descriptors: Option<&'static [u8]>,
    /// Whether a unary call may be sent again when an instance fails
    /// before answering (the method is marked idempotent in its `.proto`).
    pub(crate) idempotent: bool,
}

impl MethodInfo {
    /// A method declared in `file_descriptor_set`, not idempotent.
    pub const fn new(file_descriptor_set: &'static [u8]) -> Self {
        Self {
            descriptors: Some(file_descriptor_set),
            idempotent: false,
        }
    }

    /// Marks the method as safe to send again (or not).
    pub const fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = idempotent;
        self
    }
}

/// Errors a lodestar client attaches as the source of a failed call's
/// [`Status`](tonic::Status), so a caller can tell why it failed.
///
/// ```
/// # fn handle(status: tonic::Status) {
/// use std::error::Error as _;
/// if let Some(lodestar::client::Error::NoInstances { service }) =
///     status.source().and_then(|e| e.downcast_ref::<lodestar::client::Error>())
/// {
///     eprintln!("nothing serves {service} right now");
/// }
/// # }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The registry has no instance of the service that takes traffic.
    #[error(
        "no instance of service `{service}` takes traffic: none is registered, or all are \
         unhealthy or disabled (see `lodestar describe {}`)", service.service
    )]
    NoInstances {
        /// The service, as `namespace/group/name`.
        service: ServiceKey,
    },
    /// The registry did not answer in time for the first call to the service.
    #[error("could not resolve service `{service}`: {reason}")]
    Resolve {
        /// The service, as `namespace/group/name`.
        service: ServiceKey,
        /// What went wrong.
        reason: String,
    },
    /// The call's route (see [`Policy`]) leaves it no instance, and says
    /// to fail rather than fall back.
    #[error("no instance of service `{service}` may take this call: {reason}")]
    NoRoute {
        /// The service, as `namespace/group/name`.
        service: ServiceKey,
        /// Which route, and the labels no instance has.
        reason: String,
    },
    /// Every instance tried failed before the request reached it.
    #[error("no instance of service `{service}` could be reached (last tried {address}): {reason}")]
    Unreachable {
        /// The service, as `namespace/group/name`.
        service: ServiceKey,
        /// The last address tried.
        address: String,
        /// The last error.
        reason: String,
    },
}

/// Calls services by name through a registry.
///
/// Cheap to clone; clones share channels and connections. See the
/// [module docs](self) for what happens on each call.
///
/// ```
/// use std::time::Duration;
/// use lodestar::{Client, MemoryRegistry, client::Strategy};
///
/// let client = Client::builder(MemoryRegistry::new())
///     .strategy(Strategy::Random)
///     .timeout(Duration::from_secs(5))
///     .build();
/// let channel = client.channel("route-guide"); // lazy: nothing is resolved yet
/// # drop(channel);
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    registry: Arc<dyn Registry>,
    config: Arc<ClientConfig>,
    channels: Mutex<HashMap<ServiceKey, Channel>>,
}

/// Makes each channel's own selector.
pub(crate) type SelectorFactory = Arc<dyn Fn() -> Box<dyn Selector> + Send + Sync>;

fn selector_factory<S: Selector + Clone>(selector: S) -> SelectorFactory {
    Arc::new(move || Box::new(selector.clone()))
}

/// Wraps a channel's stack in one of the user's layers.
pub(crate) type UserLayer = Arc<dyn Fn(BoxChannel) -> BoxChannel + Send + Sync>;

/// Settings shared by all the channels of a [`Client`].
#[derive(Clone)]
pub(crate) struct ClientConfig {
    pub(crate) namespace: String,
    pub(crate) group: String,
    /// A selector of the user's, used instead of the policy's strategy.
    pub(crate) selector: Option<SelectorFactory>,
    /// The policy of every service without one of its own.
    pub(crate) policy: Arc<Policy>,
    /// The caller's own labels and zone, for routing.
    pub(crate) caller: Arc<route::Caller>,
    pub(crate) observers: Arc<[Arc<dyn ObserverDebug>]>,
    pub(crate) layers: Vec<UserLayer>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) connect_timeout: Duration,
    pub(crate) resolve_timeout: Duration,
    pub(crate) ejection_base: Duration,
    pub(crate) ejection_max: Duration,
    pub(crate) max_attempts: usize,
    pub(crate) limits: MessageLimits,
    pub(crate) send_compressed: Option<Encoding>,
    pub(crate) inspect_compression: bool,
    pub(crate) tls: Option<ClientTls>,
    pub(crate) codec: Codec,
    pub(crate) http2: crate::Http2Settings,
    pub(crate) protocol: Protocol,
    pub(crate) protection_threshold: f64,
    pub(crate) metrics: Option<crate::metrics::Metrics>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("namespace", &self.namespace)
            .field("group", &self.group)
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .field("observers", &self.observers.len())
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            group: DEFAULT_GROUP.to_owned(),
            // Default: the policy's strategy.
            selector: None,
            // Default: P2C peak-EWMA, no routes, zone affinity when the
            // zone is known, outlier detection on (see `Policy`).
            policy: Arc::new(Policy::default()),
            // Default: no labels; the zone from `LODESTAR_ZONE`, if set.
            caller: Arc::new(route::Caller {
                labels: BTreeMap::new(),
                zone: std::env::var(ZONE_ENV).ok().filter(|z| !z.is_empty()),
            }),
            observers: Arc::new([]),
            layers: Vec::new(),
            timeout: None,
            connect_timeout: Duration::from_secs(3),
            resolve_timeout: Duration::from_secs(5),
            ejection_base: Duration::from_secs(1),
            ejection_max: Duration::from_secs(30),
            max_attempts: 3,
            limits: MessageLimits::default(),
            send_compressed: None,
            inspect_compression: false,
            tls: None,
            codec: Codec::Protobuf,
            http2: crate::Http2Settings::client(),
            // Native gRPC.
            protocol: Protocol::Grpc,
            protection_threshold: 0.0,
            // Calls counted in the process's registry.
            metrics: Some(crate::metrics::Metrics::global().clone()),
        }
    }
}

impl Client {
    /// A client with default settings over `registry`.
    pub fn new(registry: impl IntoRegistry) -> Self {
        Self::builder(registry).build()
    }

    /// Starts configuring a client over `registry`.
    pub fn builder(registry: impl IntoRegistry) -> ClientBuilder {
        ClientBuilder {
            registry: registry.into_registry(),
            config: ClientConfig::default(),
        }
    }

    /// The channel to the service named `service` in the client's namespace
    /// and group. Channels are created once per service and shared.
    ///
    /// Looking a channel up takes a lock shared by the whole client, so make
    /// generated clients once (`by_name`) and clone them, which is cheap,
    /// rather than making one per call.
    pub fn channel(&self, service: &str) -> Channel {
        let key = ServiceKey::new(service)
            .with_namespace(self.inner.config.namespace.clone())
            .with_group(self.inner.config.group.clone());
        self.channel_for(key)
    }

    /// The channel to the service `key` (any namespace and group).
    pub fn channel_for(&self, key: ServiceKey) -> Channel {
        let mut channels = self.inner.channels.lock_unpoisoned();
        channels
            .entry(key.clone())
            .or_insert_with(|| {
                let config = &self.inner.config;
                let balance = Balance::new(key, self.inner.registry.clone(), config.clone());
                Channel::new(balance, &config.layers)
            })
            .clone()
    }

    /// The message size limits generated clients apply.
    pub fn message_limits(&self) -> MessageLimits {
        self.inner.config.limits
    }

    /// The registry this client resolves through.
    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.inner.registry
    }

    /// Replaces the policy of `service` (in the client's namespace and
    /// group) on the running client: the next call follows it, over the
    /// same connections. A policy that is not valid is refused, and the
    /// one in force stays.
    pub fn set_policy(&self, service: &str, policy: Policy) -> Result<(), PolicyError> {
        policy.validate()?;
        self.channel(service).balance().set_policy(Arc::new(policy));
        Ok(())
    }

    /// The policy in force for `service`.
    pub fn policy(&self, service: &str) -> Policy {
        self.channel(service).balance().policy().as_ref().clone()
    }
}

/// The environment variable a client reads its zone from, unless
/// [`ClientBuilder::zone`] sets one.
pub const ZONE_ENV: &str = "LODESTAR_ZONE";

/// Configures a [`Client`]. Every setting has a documented default.
#[derive(Debug)]
pub struct ClientBuilder {
    registry: Arc<dyn Registry>,
    pub(crate) config: ClientConfig,
}

impl ClientBuilder {
    /// Namespace of the services this client calls. Default: `default`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.config.namespace = namespace.into();
        self
    }

    /// Group of the services this client calls. Default: `default`.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.config.group = group.into();
        self
    }

    /// How instances are picked (the policy's strategy, for every service
    /// without a policy of its own). Default: P2C peak-EWMA (see
    /// [`strategy`] for why).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        Arc::make_mut(&mut self.config.policy).strategy = strategy;
        self.config.selector = None;
        self
    }

    /// How instances are picked: each channel (one per service) gets its
    /// own clone of `selector`, used instead of any policy's strategy.
    /// Default: none (the policy's strategy).
    pub fn selector<S: Selector + Clone>(mut self, selector: S) -> Self {
        self.config.selector = Some(selector_factory(selector));
        self
    }

    /// The policy of every service this client calls (until
    /// [`Client::set_policy`] gives one its own), refused if it is not
    /// valid. It replaces the whole policy, strategy included: call
    /// [`strategy`](Self::strategy) after it, or set `policy.strategy`.
    /// Default: [`Policy::default`].
    ///
    /// ```
    /// use lodestar::client::{Policy, Strategy};
    ///
    /// let mut policy = Policy::from_toml("[outlier]\nconsecutive_failures = 3")?;
    /// policy.strategy = Strategy::RoundRobin;
    /// let client = lodestar::Client::builder(lodestar::MemoryRegistry::new())
    ///     .policy(policy)?
    ///     .zone("eu-west-1a")
    ///     .build();
    /// assert_eq!(client.policy("orders").strategy, Strategy::RoundRobin);
    /// # Ok::<(), lodestar::client::PolicyError>(())
    /// ```
    pub fn policy(mut self, policy: Policy) -> Result<Self, PolicyError> {
        policy.validate()?;
        self.config.policy = Arc::new(policy);
        Ok(self)
    }

    /// The caller's own labels, which routes can match
    /// ([`Match::caller`](policy::Match::caller)). Default: none.
    pub fn labels(mut self, labels: BTreeMap<String, String>) -> Self {
        Arc::make_mut(&mut self.config.caller).labels = labels;
        self
    }

    /// The caller's zone, to prefer instances in the same one
    /// ([`ZoneAffinity`](policy::ZoneAffinity)). Default: the
    /// `LODESTAR_ZONE` environment variable, if set.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        let zone = zone.into();
        Arc::make_mut(&mut self.config.caller).zone = (!zone.is_empty()).then_some(zone);
        self
    }

    /// Adds an observer of every attempt of every call (see [`observe`]).
    /// Several may be added. Default: none.
    pub fn observe(mut self, observer: impl Observer) -> Self {
        let mut observers: Vec<Arc<dyn ObserverDebug>> = self.config.observers.to_vec();
        observers.push(Arc::new(observer));
        self.config.observers = observers.into();
        self
    }

    /// Wraps every call in a tower layer: around the whole stack (above
    /// deadlines and retries, so it sees each call once, as the caller made
    /// it). Several may be added; the first added is the outermost. Each
    /// channel (one per service) gets its own instance of the layer's
    /// service, so a `ConcurrencyLimitLayer` limits each service's calls.
    ///
    /// The layer wraps a service of `http::Request<tonic::body::Body>` to
    /// `http::Response<`[`ResponseBody`]`>`. Its errors reach the caller
    /// as statuses: a [`Status`](tonic::Status) as itself, `tower`'s load-shed
    /// `Overloaded` as `RESOURCE_EXHAUSTED`, its timeout's `Elapsed` as
    /// `DEADLINE_EXCEEDED`, anything else as `UNAVAILABLE` with its text.
    ///
    /// ```
    /// use std::time::Duration;
    /// use lodestar::{Client, MemoryRegistry};
    ///
    /// let client = Client::builder(MemoryRegistry::new())
    ///     .layer(tower::limit::ConcurrencyLimitLayer::new(64))
    ///     .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(1)))
    ///     .build();
    /// # drop(client);
    /// ```
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<BoxChannel> + Send + Sync + 'static,
        L::Service: tower_service::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<ResponseBody>,
                Future: Send + 'static,
                Error: Into<crate::status::BoxError>,
            > + Clone
            + Send
            + Sync
            + 'static,
    {
        self.config.layers.push(Arc::new(move |inner: BoxChannel| {
            let unwrapped = inner.clone();
            let mut service = Some(layer.layer(inner));
            // A layer whose service is a channel already (such as
            // `Identity`) needs no second box, nor its errors mapped.
            if let Some(channel) =
                (&mut service as &mut dyn std::any::Any).downcast_mut::<Option<BoxChannel>>()
            {
                return channel.take().unwrap_or(unwrapped);
            }
            let map = |e: <L::Service as tower_service::Service<
                http::Request<tonic::body::Body>,
            >>::Error| crate::status::from_layer_error(e.into());
            service.map_or(unwrapped, |service| {
                BoxChannel::new(tower::util::MapErr::new(service, map))
            })
        }));
        self
    }

    /// A deadline for every call that has no earlier one. Default: none.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = Some(timeout);
        self
    }

    /// How long to wait for a TCP connection to an instance. Default: 3 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// How long the first call to a service waits for the registry to
    /// list its instances. Default: 5 s.
    pub fn resolve_timeout(mut self, timeout: Duration) -> Self {
        self.config.resolve_timeout = timeout;
        self
    }

    /// How long an instance that refused a connection is skipped; doubles
    /// with each further failure, up to `max`. Default: 1 s, up to 30 s.
    pub fn ejection(mut self, base: Duration, max: Duration) -> Self {
        self.config.ejection_base = base;
        self.config.ejection_max = max.max(base);
        self
    }

    /// How many instances one call may be sent to, counting the first,
    /// when it is sent again because it never left or (idempotent) its
    /// instance failed before answering. Default: 3. At least 1, at most
    /// 8. Retries a policy configures ([`retries`]) have their own count.
    pub fn max_attempts(mut self, attempts: usize) -> Self {
        self.config.max_attempts = attempts.clamp(1, MAX_ATTEMPTS);
        self
    }

    /// Connects to every instance over TLS (HTTP/2 negotiated with ALPN),
    /// verifying its certificate, and presenting one for mutual TLS if
    /// `tls` has an identity. Default: plaintext HTTP/2.
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.config.tls = Some(tls);
        self
    }

    /// Settings for connections to instances (TCP keepalive, HTTP/2
    /// keepalive pings, flow control). Default: [`Http2Settings::client`](crate::Http2Settings::client).
    pub fn http2(mut self, settings: crate::Http2Settings) -> Self {
        self.config.http2 = settings;
        self
    }

    /// The wire protocol of every call: native gRPC, gRPC-Web or Connect
    /// (see [`Protocol`]). Calls are made the same way whatever it is; the
    /// translation happens in the client's lowest layer, so deadlines,
    /// limits, retries and metrics work alike. Connections stay HTTP/2.
    /// Default: [`Protocol::Grpc`].
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.config.protocol = protocol;
        self
    }

    /// Where the client's calls are counted ([`metrics`](crate::metrics):
    /// `rpc_client_call_duration_seconds` and friends, labelled by the
    /// service called and the method), or `None` not to count them.
    /// Default: the process's registry,
    /// [`Metrics::global`](crate::metrics::Metrics::global).
    pub fn metrics(mut self, metrics: Option<crate::metrics::Metrics>) -> Self {
        self.config.metrics = metrics;
        self
    }

    /// Protection threshold: while fewer than this share of a service's
    /// enabled instances are healthy, calls go to all of them rather than
    /// pile onto the few healthy ones (a partial outage, or a registry that
    /// lost touch, should not become a full one). 0 turns it off. Default: 0.
    pub fn protection_threshold(mut self, threshold: f64) -> Self {
        self.config.protection_threshold = threshold.clamp(0.0, 1.0);
        self
    }

    /// How messages are encoded: protobuf (the default) or JSON
    /// (`application/grpc+json`, which lodestar servers accept too).
    pub fn codec(mut self, codec: Codec) -> Self {
        self.config.codec = codec;
        self
    }

    /// Compresses every request message with `encoding` (a call can opt
    /// out with [`Compress(false)`](crate::compression::Compress)). Responses
    /// are decompressed whatever this says. Default: no compression.
    pub fn send_compressed(mut self, encoding: Encoding) -> Self {
        self.config.send_compressed = Some(encoding);
        self
    }

    /// Records whether each response message arrived compressed, in a
    /// [`ReceivedFlags`](crate::compression::ReceivedFlags) in the response's
    /// extensions. For tests and diagnostics. Default: off.
    pub fn inspect_compression(mut self, inspect: bool) -> Self {
        self.config.inspect_compression = inspect;
        self
    }

    /// Message size limits for generated clients. Default: [`MessageLimits::default`].
    pub fn message_limits(mut self, limits: MessageLimits) -> Self {
        self.config.limits = limits;
        self
    }

    /// Builds the client. Nothing is resolved or connected until the first call.
    pub fn build(self) -> Client {
        Client {
            inner: Arc::new(ClientInner {
                registry: self.registry,
                config: Arc::new(self.config),
                channels: Mutex::new(HashMap::new()),
            }),
        }
    }
}

/// Anything that can serve as a client's or service's registry: a registry
/// value, or an `Arc` of one (`Arc<dyn Registry>` included).
pub trait IntoRegistry {
    /// Converts into a shared registry.
    fn into_registry(self) -> Arc<dyn Registry>;
}

impl<R: Registry> IntoRegistry for R {
    fn into_registry(self) -> Arc<dyn Registry> {
        Arc::new(self)
    }
}
