//! Serving: the [`Service`] builder and the lifecycle it owns.
//!
//! A service **binds** (port 0 is allowed; the real port is what gets
//! registered), **serves** gRPC over HTTP/2 with `grpc.health.v1.Health`
//! and server reflection (v1 and v1alpha) added, **registers** with its
//! registry under a lease and **heartbeats** to keep it. On SIGINT or
//! SIGTERM (with [`ServiceBuilder::run`]) or on
//! [`RunningService::shutdown`], it stops in this order:
//!
//! 1. health turns `NOT_SERVING`;
//! 2. the instance is deregistered, so clients stop picking it;
//! 3. the listener closes and every connection is told to stop opening
//!    streams (HTTP/2 `GOAWAY`); calls and streams in flight go on;
//! 4. once they finish, or the grace period ends (then they are cut), the
//!    service exits.
//!
//! Each step is announced as a [`Lifecycle`] event.

mod budget;
mod serve;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use lodestar_core::{Instance, Registry, RegistryError};
use tokio::sync::{broadcast, watch};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::MessageLimits;
use crate::client::IntoRegistry;
use crate::codec::Descriptors;
use crate::compression::Encoding;
use crate::tls::ServerTls;

/// What `lodestar-build` generates for each server so that [`ServiceBuilder`]
/// can configure it and describe it through reflection.
pub trait ServiceDefinition: Sized {
    /// The encoded `FileDescriptorSet` that declares this service.
    fn file_descriptor_set() -> &'static [u8];
    /// Applies the message size limits.
    fn with_message_limits(self, limits: &MessageLimits) -> Self;
}

/// A tonic-compatible gRPC service that a server can route calls to:
/// what generated `…Server` types, `tonic-health` and `tonic-reflection` are.
pub trait GrpcRoute:
    tower_service::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcRoute for S where
    S: tower_service::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Errors that stop a service from starting or from shutting down cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot bind {address}: {source}")]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The reflection descriptors could not be loaded.
    #[error("invalid file descriptor set for reflection: {0}")]
    Reflection(String),
    /// Two services with the same name were added (lodestar adds
    /// `grpc.health.v1.Health` and the reflection services itself).
    #[error("the service `{0}` is added twice (lodestar serves health and reflection itself)")]
    DuplicateService(&'static str),
    /// The registry refused the registration as invalid (a retry would not help).
    #[error("the registry refused to register {instance}: {source}")]
    Registration {
        /// The instance id.
        instance: String,
        /// What the registry said.
        source: RegistryError,
    },
    /// The serving task failed or panicked.
    #[error("the server task ended abnormally: {0}")]
    Task(String),
    /// A setting cannot work; the message names it, its value and what
    /// it must be.
    #[error("invalid setting: {0}")]
    Setting(String),
    /// A declared subscription could not be made.
    #[error("cannot subscribe to `{topic}`: {source}")]
    Subscribe {
        /// The topic.
        topic: String,
        /// What the broker said.
        source: crate::BrokerError,
    },
}

/// The steps of a service's life, in order. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lifecycle {
    /// Accepting connections at this address.
    Serving(SocketAddr),
    /// Registered (or registered again) in the registry.
    Registered,
    /// Shutdown began; health reports `NOT_SERVING`.
    NotServing,
    /// Removed from the registry.
    Deregistered,
    /// The listener is closed; connections drain.
    ListenerClosed,
    /// Every connection finished (`cut` were still open at the end of the grace period).
    Drained {
        /// How many connections were cut at the end of the grace period.
        cut: usize,
    },
}

/// Announces [`Lifecycle`] events, and remembers them so that a late
/// subscriber still sees every step.
#[derive(Debug)]
pub(crate) struct Announcer {
    history: std::sync::Mutex<Vec<Lifecycle>>,
    events: broadcast::Sender<Lifecycle>,
}

impl Announcer {
    fn new() -> Self {
        Self {
            history: std::sync::Mutex::new(Vec::new()),
            events: broadcast::channel(16).0,
        }
    }

    pub(crate) fn announce(&self, event: Lifecycle) {
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history.push(event.clone());
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }

    fn subscribe(&self) -> LifecycleEvents {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        LifecycleEvents {
            past: history.iter().cloned().collect(),
            live: self.events.subscribe(),
        }
    }
}

/// The [`Lifecycle`] events of a service: every step so far, then each new
/// one as it happens. From [`RunningService::lifecycle`].
#[derive(Debug)]
pub struct LifecycleEvents {
    past: std::collections::VecDeque<Lifecycle>,
    live: broadcast::Receiver<Lifecycle>,
}

impl LifecycleEvents {
    /// The next event; `None` once the service is gone.
    pub async fn next(&mut self) -> Option<Lifecycle> {
        if let Some(event) = self.past.pop_front() {
            return Some(event);
        }
        loop {
            match self.live.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next event if one has happened already.
    pub fn try_next(&mut self) -> Option<Lifecycle> {
        if let Some(event) = self.past.pop_front() {
            return Some(event);
        }
        loop {
            match self.live.try_recv() {
                Ok(event) => return Some(event),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    }
}

/// Limits on what clients may cost a server through its connections: how
/// many connections, and how much response data it holds for clients that
/// do not read it. Set with [`ServiceBuilder::connection_limits`].
///
/// Response data is counted from the moment a handler's body yields it
/// until HTTP/2 has written it to the socket, so a client that stops
/// reading (or never opens its flow-control window) pins at most
/// `max_unsent_bytes_per_connection`, and all clients together at most
/// `max_unsent_bytes`. See `docs/limits.md` for every limit.
///
/// ```
/// use std::time::Duration;
/// use lodestar::server::ConnectionLimits;
///
/// let limits = ConnectionLimits {
///     max_connections: 512,
///     stall_timeout: Duration::from_secs(10),
///     ..ConnectionLimits::default()
/// };
/// assert_eq!(limits.max_unsent_bytes_per_connection, 32 * 1024 * 1024);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once. One more is accepted and closed at once,
    /// so its client can try another instance. Default: 4096.
    pub max_connections: usize,
    /// Response bytes one connection may hold unsent. A response message
    /// that does not fit ends its call with `RESOURCE_EXHAUSTED`. Keep it
    /// above the send limit ([`MessageLimits`]), or messages that large can
    /// never be sent. Default: 32 MiB (eight 4 MiB messages).
    pub max_unsent_bytes_per_connection: usize,
    /// Response bytes all connections together may hold unsent; past it, as
    /// above. Default: 256 MiB.
    pub max_unsent_bytes: usize,
    /// A connection that holds unsent response data and sends less than
    /// 64 KiB of it (or less than all it held) in this long is closed (every
    /// call on it ends), freeing what it holds: a client that takes a byte
    /// now and then pins the server's budget as surely as one that takes
    /// nothing. Detected between one and two times this after progress
    /// stopped. Must be above zero. Default: 30 s.
    pub stall_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_unsent_bytes_per_connection: 32 * 1024 * 1024,
            max_unsent_bytes: 256 * 1024 * 1024,
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// Entry point: `Service::builder("name")`.
#[derive(Debug)]
pub struct Service {
    _private: (),
}

impl Service {
    /// Starts describing a service that will register under `name`.
    pub fn builder(name: impl Into<String>) -> ServiceBuilder {
        ServiceBuilder {
            instance: Instance::new(name, ""),
            id: None,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            registry: None,
            ttl: Duration::from_secs(6),
            heartbeat: None,
            grace: Duration::from_secs(10),
            limits: MessageLimits::default(),
            send_compressed: None,
            inspect_compression: false,
            tls: None,
            http2: crate::Http2Settings::server(),
            connections: ConnectionLimits::default(),
            services: Vec::new(),
            names: Vec::new(),
            descriptors: Vec::new(),
            broker: None,
            subscribers: Vec::new(),
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
    instance: Instance,
    id: Option<String>,
    bind: SocketAddr,
    advertise: Option<String>,
    registry: Option<Arc<dyn Registry>>,
    ttl: Duration,
    heartbeat: Option<Duration>,
    grace: Duration,
    limits: MessageLimits,
    send_compressed: Option<Encoding>,
    inspect_compression: bool,
    tls: Option<ServerTls>,
    http2: crate::Http2Settings,
    connections: ConnectionLimits,
    services: Vec<AddService>,
    names: Vec<&'static str>,
    descriptors: Vec<&'static [u8]>,
    broker: Option<Arc<dyn crate::Broker>>,
    subscribers: Vec<crate::events::Subscriber>,
}

/// Adds one service to the routes, with the final message limits.
type AddService = Box<dyn FnOnce(&mut RoutesBuilder, &MessageLimits) + Send>;

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

    /// Heartbeat interval. Default: a third of the TTL.
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

    /// HTTP/2 settings: keepalive pings, concurrent calls per connection,
    /// flow control. Default: [`Http2Settings::server`](crate::Http2Settings::server).
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

    /// Records whether each request message arrived compressed, in a
    /// [`ReceivedFlags`](crate::compression::ReceivedFlags) in the request's
    /// extensions. For tests and diagnostics. Default: off.
    pub fn inspect_compression(mut self, inspect: bool) -> Self {
        self.inspect_compression = inspect;
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

    /// Binds, starts serving, and registers. Returns once the listener is
    /// bound and the first registration attempt has finished (it waits at
    /// most the TTL or 5 s, whichever is less); if that attempt failed, the
    /// service serves anyway and registers in the background as soon as the
    /// registry can be reached.
    pub async fn start(self) -> Result<RunningService, ServeError> {
        let builtin = [
            <tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService> as NamedService>::NAME,
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ];
        let limits = &self.connections;
        if limits.max_connections == 0 || limits.stall_timeout.is_zero() {
            return Err(ServeError::Setting(format!(
                "ConnectionLimits::max_connections ({}) and stall_timeout ({:?}) must be above zero",
                limits.max_connections, limits.stall_timeout
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for name in builtin.iter().chain(&self.names) {
            if !seen.insert(*name) {
                return Err(ServeError::DuplicateService(name));
            }
        }
        let listener = tokio::net::TcpListener::bind(self.bind)
            .await
            .map_err(|source| ServeError::Bind {
                address: self.bind,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
            address: self.bind,
            source,
        })?;

        let mut instance = self.instance;
        instance.address = match self.advertise {
            Some(address) => address,
            None if local_addr.ip().is_unspecified() => format!("127.0.0.1:{}", local_addr.port()),
            None => local_addr.to_string(),
        };
        instance.id = self.id.unwrap_or_else(|| {
            format!(
                "{}-{:012x}",
                instance.key.service,
                fastrand::u64(..) & 0xffff_ffff_ffff
            )
        });

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_service_status("", ServingStatus::Serving).await;
        for name in &self.names {
            health
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }

        // Both reflection versions list every service, themselves included.
        let mut descriptors = vec![
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        for descriptor in &self.descriptors {
            if !descriptors.iter().any(|d| std::ptr::eq(*d, *descriptor)) {
                descriptors.push(descriptor);
            }
        }
        let reflection = || {
            descriptors
                .iter()
                .fold(tonic_reflection::server::Builder::configure(), |b, d| {
                    b.register_encoded_file_descriptor_set(d)
                })
        };
        let known = Descriptors::from_sets(&descriptors).map_err(|e| {
            ServeError::Reflection(format!("the services' descriptors do not load: {e}"))
        })?;
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;

        let mut routes = RoutesBuilder::default();
        for add in self.services {
            add(&mut routes, &self.limits);
        }
        routes
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let routes = routes.routes().prepare();

        let events = Arc::new(Announcer::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let serve = tokio::spawn(serve::serve(
            listener,
            serve::Stack::new(
                routes,
                self.limits,
                self.send_compressed,
                self.inspect_compression,
                known,
            ),
            stop_rx,
            self.grace,
            events.clone(),
            serve::Connections {
                tls: self.tls.as_ref().map(ServerTls::acceptor),
                http2: self.http2,
                limits: self.connections,
            },
        ));
        events.announce(Lifecycle::Serving(local_addr));

        // Subscribe before registering, so that a service found through the
        // registry is already handling its events.
        let (subscribers_stop, subscribers_stopped) = watch::channel(false);
        let mut subscriber_tasks = Vec::new();
        if !self.subscribers.is_empty() {
            let Some(broker) = &self.broker else {
                serve.abort();
                return Err(ServeError::Subscribe {
                    topic: self.subscribers[0].topic.clone(),
                    source: crate::BrokerError::Invalid(
                        "the service has subscribers but no broker (ServiceBuilder::broker)"
                            .to_owned(),
                    ),
                });
            };
            for subscriber in self.subscribers {
                let subscription = match broker
                    .subscribe(&subscriber.topic, subscriber.options.clone())
                    .await
                {
                    Ok(subscription) => subscription,
                    Err(source) => {
                        let _ = subscribers_stop.send(true);
                        serve.abort();
                        return Err(ServeError::Subscribe {
                            topic: subscriber.topic,
                            source,
                        });
                    }
                };
                subscriber_tasks.push(tokio::spawn(crate::events::run_subscriber(
                    subscription,
                    subscriber.handler,
                    subscribers_stopped.clone(),
                )));
            }
        }

        let registration = match self.registry {
            None => None,
            Some(registry) => {
                // Try once before returning, so that a started service is
                // findable; if the registry is down, keep trying in the background.
                let first = tokio::time::timeout(
                    self.ttl.min(Duration::from_secs(5)),
                    registry.register(instance.clone(), self.ttl),
                )
                .await;
                let registered = match first {
                    Ok(Ok(())) => {
                        tracing::info!(service = %instance.key, instance = %instance.id, address = %instance.address, "registered");
                        events.announce(Lifecycle::Registered);
                        true
                    }
                    Ok(Err(source @ RegistryError::Invalid(_))) => {
                        let _ = subscribers_stop.send(true);
                        serve.abort();
                        return Err(ServeError::Registration {
                            instance: instance.id,
                            source,
                        });
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(service = %instance.key, ?registry, error = %e,
                            "waiting for the registry: serving anyway, and registering as soon as it answers");
                        false
                    }
                    Err(_) => {
                        tracing::warn!(service = %instance.key, ?registry,
                            "waiting for the registry (no answer): serving anyway, and registering as soon as it answers");
                        false
                    }
                };
                let heartbeat = self
                    .heartbeat
                    .unwrap_or(self.ttl / 3)
                    .max(Duration::from_millis(10));
                let task = tokio::spawn(keep_registered(
                    registry.clone(),
                    instance.clone(),
                    self.ttl,
                    heartbeat,
                    registered,
                    events.clone(),
                ));
                Some(Registration { registry, task })
            }
        };
        tracing::info!(service = %instance.key, instance = %instance.id, address = %local_addr,
            "serving {}", self.names.join(", "));

        Ok(RunningService {
            local_addr,
            instance,
            health,
            names: self.names,
            registration,
            stop: stop_tx,
            serve,
            events,
            subscribers_stop,
            subscriber_tasks,
            grace: self.grace,
        })
    }

    /// Starts, then runs until SIGINT or SIGTERM, then shuts down gracefully.
    /// The signal handlers are installed before starting, so a signal that
    /// arrives during startup is not lost.
    pub async fn run(self) -> Result<(), ServeError> {
        let signal = shutdown_signal();
        self.run_until(signal).await
    }

    /// Starts, then runs until `signal` completes, then shuts down gracefully.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let running = self.start().await?;
        signal.await;
        running.shutdown().await
    }
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM. The handlers are
/// installed when this is called, not when it is first awaited.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    let (mut interrupt, mut terminate) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let interrupt = async {
                match interrupt.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let terminate = async {
                match terminate.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = interrupt => tracing::info!("SIGINT received; shutting down"),
                _ = terminate => tracing::info!("SIGTERM received; shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("Ctrl-C received; shutting down");
            } else {
                std::future::pending::<()>().await;
            }
        }
    }
}

struct Registration {
    registry: Arc<dyn Registry>,
    task: tokio::task::JoinHandle<()>,
}

/// A started service. Dropping it leaves the service running in the
/// background; call [`shutdown`](Self::shutdown) to stop it.
pub struct RunningService {
    local_addr: SocketAddr,
    instance: Instance,
    health: HealthReporter,
    names: Vec<&'static str>,
    registration: Option<Registration>,
    stop: watch::Sender<bool>,
    serve: tokio::task::JoinHandle<()>,
    events: Arc<Announcer>,
    subscribers_stop: watch::Sender<bool>,
    subscriber_tasks: Vec<tokio::task::JoinHandle<()>>,
    grace: Duration,
}

impl std::fmt::Debug for RunningService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningService")
            .field("local_addr", &self.local_addr)
            .field("instance", &self.instance.id)
            .finish_non_exhaustive()
    }
}

impl RunningService {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The instance as registered.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// The health reporter, to change what `grpc.health.v1.Health` reports.
    pub fn health(&self) -> &HealthReporter {
        &self.health
    }

    /// The lifecycle events: every step so far, then each new one.
    pub fn lifecycle(&self) -> LifecycleEvents {
        self.events.subscribe()
    }

    /// Shuts down gracefully; see the [module docs](self) for the order.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        let key = self.instance.key.clone();
        tracing::info!(service = %key, instance = %self.instance.id, "shutting down");
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        for name in &self.names {
            self.health
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        self.events.announce(Lifecycle::NotServing);
        if let Some(registration) = self.registration {
            // Stop heartbeating, and wait until a registration in flight is
            // over, so that it cannot land after the deregistration.
            registration.task.abort();
            let _ = registration.task.await;
            let instance_key = self.instance.instance_key();
            let deregister = registration.registry.deregister(&instance_key);
            match tokio::time::timeout(Duration::from_secs(5), deregister).await {
                Ok(Ok(())) => self.events.announce(Lifecycle::Deregistered),
                Ok(Err(e)) => {
                    tracing::warn!(service = %key, error = %e, "deregistration failed; the lease will expire instead")
                }
                Err(_) => {
                    tracing::warn!(service = %key, "deregistration timed out; the lease will expire instead")
                }
            }
        }
        // Stop taking events, finish the ones in hand, unsubscribe.
        let _ = self.subscribers_stop.send(true);
        let aborts: Vec<_> = self
            .subscriber_tasks
            .iter()
            .map(|t| t.abort_handle())
            .collect();
        let subscribers = futures_util::future::join_all(self.subscriber_tasks);
        if tokio::time::timeout(self.grace, subscribers).await.is_err() {
            tracing::warn!(service = %key, "event handlers still running at the end of the grace period; cut");
            for abort in aborts {
                abort.abort();
            }
        }
        let _ = self.stop.send(true);
        self.serve
            .await
            .map_err(|e| ServeError::Task(e.to_string()))
    }

    /// Stops at once, as a crash would: no deregistration, no draining;
    /// connections are cut. The lease expires on its own. For tests and demos.
    pub async fn abort(self) {
        if let Some(registration) = &self.registration {
            registration.task.abort();
        }
        for task in &self.subscriber_tasks {
            task.abort();
        }
        self.serve.abort();
        let _ = self.serve.await;
    }
}

/// Registers, then heartbeats; registers again whenever the registry has
/// lost the lease, and keeps trying while the registry is unreachable.
async fn keep_registered(
    registry: Arc<dyn Registry>,
    instance: Instance,
    ttl: Duration,
    interval: Duration,
    mut registered: bool,
    events: Arc<Announcer>,
) {
    // No registry call may hold up the next beat.
    let call_timeout = interval;
    let key = instance.instance_key();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if registered {
        // The first tick completes at once; the first heartbeat is due one interval later.
        ticker.tick().await;
    }
    loop {
        ticker.tick().await;
        let call = async {
            if registered {
                registry.heartbeat(&key).await
            } else {
                registry.register(instance.clone(), ttl).await.map(|()| {
                    tracing::info!(service = %instance.key, instance = %instance.id, address = %instance.address, "registered");
                    events.announce(Lifecycle::Registered);
                })
            }
        };
        let result = tokio::time::timeout(call_timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(RegistryError::Unavailable(format!(
                    "no answer within {call_timeout:?}"
                )))
            });
        match result {
            Ok(()) => registered = true,
            Err(RegistryError::NotFound(_) | RegistryError::LeaseExpired(_)) => {
                tracing::warn!(service = %instance.key, instance = %instance.id, "the registry lost this instance; registering again");
                registered = false;
                ticker.reset_immediately();
            }
            Err(e) => {
                tracing::warn!(service = %instance.key, instance = %instance.id, error = %e,
                    "registry unreachable; will retry every {interval:?}");
                // If the lease is gone by the time the registry is back, a
                // heartbeat says so and we register again.
            }
        }
    }
}
