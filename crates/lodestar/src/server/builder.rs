//! Describing a service before it starts: [`Service::builder`] and its settings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lodestar_core::{Instance, Registry};

use super::connection::ConnectionLimits;
use super::stack::{Added, Next, RequestBody, ResponseBody, RouterBuilder, UserLayer};
use super::{GrpcRoute, ServiceDefinition};
use crate::MessageLimits;
use crate::client::IntoRegistry;
use crate::compression::Encoding;
use crate::tls::ServerTls;

/// Entry point: `Service::builder("name")`.
#[derive(Debug)]
pub struct Service {
    _private: (),
}

impl Service {
    /// Starts describing a service that will register under `name`.
    pub fn builder(name: impl Into<String>) -> ServiceBuilder {
        ServiceBuilder {
            // Version empty; namespace and group `default`; weight 100; no
            // labels; no zone.
            instance: Instance::new(name, ""),
            // Default: `{name}-{random hex}`, chosen at start.
            id: None,
            // Loopback, any free port.
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            // Default: the bound address (127.0.0.1 for an unspecified IP).
            advertise: None,
            // Default: serve without registering.
            registry: None,
            // Lease TTL: 6 s.
            ttl: Duration::from_secs(6),
            // Default: a third of the TTL.
            heartbeat: None,
            // Calls in flight get 10 s to finish at shutdown.
            grace: Duration::from_secs(10),
            // 4 MiB each way.
            limits: MessageLimits::default(),
            // Default: responses not compressed.
            send_compressed: None,
            // Default: request compression flags not recorded.
            inspect_compression: false,
            // Default: plaintext HTTP/2.
            tls: None,
            // TCP keepalive 60 s, no PINGs, 1024 streams per connection,
            // fixed windows (2 MiB per call, 5 MiB per connection), 10 s
            // handshake timeout.
            http2: crate::Http2Settings::server(),
            // 4096 connections; 32 MiB unsent per connection, 256 MiB in
            // all; 30 s stall timeout.
            connections: ConnectionLimits::default(),
            // gRPC-Web and Connect on (free until used), no CORS.
            web: super::WebProtocols::default(),
            // Health and reflection are added at start.
            services: Vec::new(),
            names: Vec::new(),
            descriptors: Vec::new(),
            // Default: no broker, no subscriptions.
            broker: None,
            subscribers: Vec::new(),
            // Default: no user layers (lodestar's own stack only).
            layers: Vec::new(),
            // No settings of particular methods.
            policy: super::policy::Policy::default(),
            // Nobody told of the policy layers' decisions.
            observers: super::observe::Observers::default(),
            // Calls counted in the process's registry.
            metrics: Some(crate::metrics::Metrics::global().clone()),
            // `/metrics`, `/healthz`, `/readyz` on loopback, any free port.
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            // lodestar's logs and traces, from the environment, unless the
            // process has a subscriber already.
            telemetry: true,
            // Default: the environment's settings.
            telemetry_settings: None,
        }
    }
}

/// Describes a service before it starts. Every setting has a documented default.
///
/// ```no_run
/// use std::time::Duration;
/// use lodestar::{MemoryRegistry, Service};
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// Service::builder("greeter")
///     .version("1.4.0")
///     .metadata("zone", "eu-1")
///     .bind("0.0.0.0:50051".parse()?)
///     .advertise("10.0.0.7:50051")
///     .registry(MemoryRegistry::new())
///     .ttl(Duration::from_secs(6))
///     .grace_period(Duration::from_secs(20))
///     // .add_service(GreeterServer::new(MyGreeter))
///     .run() // until SIGINT or SIGTERM, then a graceful shutdown
///     .await?;
/// # Ok(()) }
/// ```
pub struct ServiceBuilder {
    pub(super) instance: Instance,
    pub(super) id: Option<String>,
    pub(super) bind: SocketAddr,
    pub(super) advertise: Option<String>,
    pub(super) registry: Option<Arc<dyn Registry>>,
    pub(super) ttl: Duration,
    pub(super) heartbeat: Option<Duration>,
    pub(super) grace: Duration,
    pub(super) limits: MessageLimits,
    pub(super) send_compressed: Option<Encoding>,
    pub(super) inspect_compression: bool,
    pub(super) tls: Option<ServerTls>,
    pub(super) http2: crate::Http2Settings,
    pub(super) connections: ConnectionLimits,
    pub(super) web: super::WebProtocols,
    pub(super) services: Vec<AddService>,
    pub(super) names: Vec<&'static str>,
    pub(super) descriptors: Vec<&'static [u8]>,
    pub(super) broker: Option<Arc<dyn crate::Broker>>,
    pub(super) subscribers: Vec<crate::events::Subscriber>,
    pub(super) layers: Vec<Box<dyn UserLayer>>,
    pub(super) policy: super::policy::Policy,
    pub(super) observers: super::observe::Observers,
    pub(super) metrics: Option<crate::metrics::Metrics>,
    pub(super) admin: Option<SocketAddr>,
    pub(super) telemetry: bool,
    pub(super) telemetry_settings: Option<crate::telemetry::Telemetry>,
}

/// Adds one service to the routes, with the final message limits.
pub(super) type AddService = Box<dyn FnOnce(&mut RouterBuilder, &MessageLimits) + Send>;

impl std::fmt::Debug for ServiceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBuilder")
            .field("instance", &self.instance)
            .field("bind", &self.bind)
            .field("services", &self.names)
            .field("subscribers", &self.subscribers)
            .finish_non_exhaustive()
    }
}

impl ServiceBuilder {
    /// Where the service's calls are counted ([`metrics`](crate::metrics)),
    /// or `None` not to count them. Default: the process's registry,
    /// [`Metrics::global`](crate::metrics::Metrics::global).
    ///
    /// Every method of every service added is counted from the start (at
    /// zero), so rates and ratios exist before the first call; calls to
    /// other paths count as one method, `_OTHER`.
    ///
    /// ```
    /// use lodestar::metrics::Metrics;
    /// let own = Metrics::new().with_grpc_compat(true);
    /// let builder = lodestar::Service::builder("greeter").metrics(Some(own));
    /// # drop(builder);
    /// ```
    pub fn metrics(mut self, metrics: Option<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Where the [admin endpoint](crate::admin) listens (`/metrics`,
    /// `/healthz`, `/readyz` over HTTP/1.1), or `None` for no admin
    /// endpoint. Default: `127.0.0.1:0` (loopback, any free port; see
    /// [`RunningService::admin_addr`](crate::RunningService::admin_addr)).
    /// Bind it to an address Prometheus can reach, such as
    /// `0.0.0.0:9464`, to scrape the service from another host.
    pub fn admin_addr(mut self, address: Option<SocketAddr>) -> Self {
        self.admin = address;
        self
    }

    /// The version registered with the instance. Default: empty.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.instance.version = version.into();
        self
    }

    /// Adds a metadata label registered with the instance.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.instance.metadata.insert(key.into(), value.into());
        self
    }

    /// Replaces all metadata labels.
    pub fn labels(mut self, labels: BTreeMap<String, String>) -> Self {
        self.instance.metadata = labels;
        self
    }

    /// Namespace to register in. Default: `default`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.instance.key.namespace = namespace.into();
        self
    }

    /// Group to register in. Default: `default`.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.instance.key.group = group.into();
        self
    }

    /// Weight for weighted balancing. Default: 100.
    pub fn weight(mut self, weight: u32) -> Self {
        self.instance.weight = weight;
        self
    }

    /// The zone (failure domain: a rack, an availability zone) the instance
    /// runs in, for callers that prefer their own zone. Default: none
    /// (empty).
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.instance.zone = zone.into();
        self
    }

    /// The instance id. Default: `{name}-{random hex}`.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Address to listen on. Default: `127.0.0.1:0` (loopback, any free port).
    pub fn bind(mut self, address: SocketAddr) -> Self {
        self.bind = address;
        self
    }

    /// Address to register, as `host:port`, when it differs from the bound
    /// one (behind NAT, or bound to `0.0.0.0`). Default: the bound address;
    /// for an unspecified IP (`0.0.0.0`, `::`), `127.0.0.1` with the bound port.
    pub fn advertise(mut self, address: impl Into<String>) -> Self {
        self.advertise = Some(address.into());
        self
    }

    /// The registry to register in. Default: none (serve without registering).
    pub fn registry(mut self, registry: impl IntoRegistry) -> Self {
        self.registry = Some(registry.into_registry());
        self
    }

    /// Lease TTL: how long the registry keeps the instance without a
    /// heartbeat. Default: 6 s (with heartbeats every 2 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Heartbeat interval. Default: a third of the TTL. Must be shorter
    /// than the TTL ([`start`](Self::start) refuses it otherwise).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat = Some(interval);
        self
    }

    /// How long shutdown waits for calls and streams in flight before
    /// cutting them. Default: 10 s.
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Message size limits for every service of this server; a message over
    /// the receive limit is refused with `RESOURCE_EXHAUSTED`, and so is a
    /// response over the send limit, before it is encoded.
    /// Default: [`MessageLimits::default`] (4 MiB each way).
    pub fn message_limits(mut self, limits: MessageLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Compresses response messages with `encoding` for clients that accept
    /// it (`grpc-accept-encoding`); others get plain messages. A handler can
    /// opt a call out with [`Compress(false)`](crate::compression::Compress)
    /// in its response's extensions, or choose per message with
    /// [`PerMessage`](crate::compression::PerMessage). Compressed requests
    /// are always accepted. Default: no compression.
    pub fn send_compressed(mut self, encoding: Encoding) -> Self {
        self.send_compressed = Some(encoding);
        self
    }

    /// Serves over TLS (HTTP/2 negotiated with ALPN); with
    /// [`ServerTls::require_client_certs`], only to clients with a valid
    /// certificate. Default: plaintext HTTP/2.
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Connection settings: TCP keepalive, HTTP/2 keepalive pings,
    /// concurrent calls per connection, flow control. Default: [`Http2Settings::server`](crate::Http2Settings::server).
    pub fn http2(mut self, settings: crate::Http2Settings) -> Self {
        self.http2 = settings;
        self
    }

    /// Limits on connections and on the response data held for clients
    /// that do not read it. Default: [`ConnectionLimits::default`] (4096
    /// connections; 32 MiB unsent per connection, 256 MiB in all; a
    /// connection that sends nothing it holds for 30 s is closed).
    pub fn connection_limits(mut self, limits: ConnectionLimits) -> Self {
        self.connections = limits;
        self
    }

    /// Which protocols besides native gRPC the service's port serves
    /// (gRPC-Web, Connect; HTTP/1.1 with them), and which browser origins
    /// may call them (CORS). Default: [`WebProtocols::default`](super::WebProtocols::default):
    /// gRPC-Web and Connect on, no cross-origin access. See `docs/web.md`.
    ///
    /// ```
    /// use lodestar::server::{Cors, WebProtocols};
    ///
    /// let builder = lodestar::Service::builder("greeter").web(WebProtocols {
    ///     cors: Cors::allow(["http://localhost:5173"]),
    ///     ..WebProtocols::default()
    /// });
    /// // Native gRPC over HTTP/2 only:
    /// let grpc_only = lodestar::Service::builder("greeter").web(WebProtocols::none());
    /// # drop((builder, grpc_only));
    /// ```
    pub fn web(mut self, web: super::WebProtocols) -> Self {
        self.web = web;
        self
    }

    /// Records whether each request message arrived compressed, in a
    /// [`ReceivedFlags`](crate::compression::ReceivedFlags) in the request's
    /// extensions. For tests and diagnostics. Default: off.
    pub fn inspect_compression(mut self, inspect: bool) -> Self {
        self.inspect_compression = inspect;
        self
    }

    /// Adds a tower layer to every call, over HTTP requests: between
    /// lodestar's trace and status layers above and its deadline, codec,
    /// message limits and routes below (see `docs/architecture.md`,
    /// "Middleware"). Several calls compose, the **first added outermost**.
    /// Default: none.
    ///
    /// The layer sees `http::Request<`[`RequestBody`]`>` and answers
    /// `http::Response<`[`ResponseBody`]`>`; it wraps [`Next`], the rest of
    /// the stack. It is applied **once**, when the server starts, and the
    /// result cloned per connection and per call, so state a layer shares
    /// between clones (a concurrency limit's semaphore, a rate limiter) is
    /// shared by the whole server. Each call waits for the layers'
    /// readiness inside itself.
    ///
    /// A layer may fail a call with an error instead of a response; the
    /// caller then gets a trailers-only gRPC response: a [`tonic::Status`]
    /// as itself, tower's `load_shed::error::Overloaded` as
    /// `RESOURCE_EXHAUSTED`, its `timeout::error::Elapsed` as
    /// `DEADLINE_EXCEEDED`, and any other error as `UNAVAILABLE` with the
    /// error's text and its sources'. The request's
    /// [`CallEnd`](super::CallEnd) tells a layer how each call ended.
    ///
    /// ```
    /// use lodestar::Service;
    ///
    /// // Refuse calls while the layers below are not ready
    /// // (RESOURCE_EXHAUSTED), and give each call at most 5 s
    /// // (DEADLINE_EXCEEDED). With `tower::limit::ConcurrencyLimitLayer`
    /// // below the first, at most that many calls run at once, server-wide.
    /// let builder = Service::builder("greeter")
    ///     .layer(tower::load_shed::LoadShedLayer::new())
    ///     .layer(tower::timeout::TimeoutLayer::new(std::time::Duration::from_secs(5)));
    /// ```
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<Next> + Send + Sync + 'static,
        L::Service: tower::Service<
                http::Request<RequestBody>,
                Response = http::Response<ResponseBody>,
                Error: Into<tower::BoxError>,
                Future: Send + 'static,
            > + Clone
            + Send
            + Sync
            + 'static,
    {
        self.layers.push(Box::new(Added(layer)));
        self
    }

    /// The server policy: settings per method, as data (see
    /// [`policy`](super::policy)); replace it while running with
    /// [`RunningService::set_policy`](super::RunningService::set_policy).
    /// Refused, with the field named, if it is not valid. Default: none.
    ///
    /// ```
    /// use lodestar::Service;
    /// use lodestar::server::policy::Policy;
    ///
    /// let policy = Policy::from_toml("[[methods]]\nnames = [\"helloworld.Greeter/*\"]")?;
    /// let builder = Service::builder("greeter").policy(policy)?;
    /// # Ok::<(), lodestar::server::policy::PolicyError>(())
    /// ```
    pub fn policy(
        mut self,
        policy: super::policy::Policy,
    ) -> Result<Self, super::policy::PolicyError> {
        policy.validate()?;
        self.policy = policy;
        Ok(self)
    }

    /// Whether [`start`](Self::start) installs lodestar's `tracing`
    /// subscriber, configured from the environment (`RUST_LOG`,
    /// `LODESTAR_LOG_FORMAT`, the `OTEL_*` variables; see
    /// [`telemetry`](crate::telemetry)), as the process's global default.
    /// Default: yes, if the process has none yet (once per process; a
    /// subscriber the program installed first is left alone).
    ///
    /// ```
    /// // The program logs its own way.
    /// let builder = lodestar::Service::builder("greeter").telemetry(false);
    /// # drop(builder);
    /// ```
    pub fn telemetry(mut self, install: bool) -> Self {
        self.telemetry = install;
        self
    }

    /// The settings [`start`](Self::start) installs lodestar's subscriber
    /// with (when [`telemetry`](Self::telemetry) is on), instead of those
    /// of the environment; [`from_config`](Self::from_config) sets them
    /// from `[telemetry]`. The service's name is the spans' `service.name`
    /// unless they set one. Default: [`Telemetry::from_env`](crate::telemetry::Telemetry::from_env).
    pub fn telemetry_settings(mut self, telemetry: crate::telemetry::Telemetry) -> Self {
        self.telemetry_settings = Some(telemetry);
        self
    }

    /// Tells `observer` of every decision the server's policy layers make
    /// (see [`observe`](super::observe)). May be called more than once.
    pub fn observe(mut self, observer: impl super::observe::Observer) -> Self {
        self.observers = self.observers.with(observer);
        self
    }

    /// Adds a service generated by `lodestar-build`. Its message limits are
    /// applied and its descriptors served through reflection.
    pub fn add_service<S: ServiceDefinition + GrpcRoute>(mut self, service: S) -> Self {
        self.names.push(S::NAME);
        self.descriptors.push(S::file_descriptor_set());
        self.services.push(Box::new(move |routes, limits| {
            routes.add_service(service.with_message_limits(limits));
        }));
        self
    }

    /// Adds any tonic-compatible service as it is (for services not
    /// generated by `lodestar-build`; their descriptors can be added with
    /// [`ServiceBuilder::reflect`]).
    pub fn add_tonic_service<S: GrpcRoute>(mut self, service: S) -> Self {
        self.names.push(S::NAME);
        self.services.push(Box::new(move |routes, _| {
            routes.add_service(service);
        }));
        self
    }

    /// The broker that [`subscribe`](Self::subscribe)d handlers receive
    /// events from. Default: none.
    pub fn broker(mut self, broker: Arc<dyn crate::Broker>) -> Self {
        self.broker = Some(broker);
        self
    }

    /// Handles events on `topic` while the service runs: subscribed when it
    /// starts (before it registers), and on shutdown (after it deregisters)
    /// unsubscribed, with the message in hand finished within the grace
    /// period. Each subscription handles one message at a time, so a
    /// publisher's order is kept; a handler error nacks the message (durable
    /// subscriptions then deliver it again). Needs a [`broker`](Self::broker).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use lodestar::{MemoryBroker, Service};
    /// use lodestar::events::{self, SubscribeOptions};
    ///
    /// let builder = Service::builder("billing")
    ///     .broker(Arc::new(MemoryBroker::new()))
    ///     .subscribe(
    ///         "orders.created",
    ///         SubscribeOptions::queue("billing"),
    ///         events::proto_handler(|amount: u64, _message| async move {
    ///             println!("charge {amount}");
    ///             Ok(())
    ///         }),
    ///     );
    /// ```
    pub fn subscribe(
        mut self,
        topic: impl Into<String>,
        options: crate::events::SubscribeOptions,
        handler: crate::events::Handler,
    ) -> Self {
        self.subscribers.push(crate::events::Subscriber {
            topic: topic.into(),
            options,
            handler,
        });
        self
    }

    /// Serves an encoded `FileDescriptorSet` through reflection.
    pub fn reflect(mut self, file_descriptor_set: &'static [u8]) -> Self {
        self.descriptors.push(file_descriptor_set);
        self
    }
}
