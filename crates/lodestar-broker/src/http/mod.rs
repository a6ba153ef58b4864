//! The HTTP broker: no broker process at all. Subscribers serve a small HTTP
//! endpoint and announce it in the registry; publishers find them there and
//! POST each message to them (as go-micro's HTTP broker does).
//!
//! # Registry
//!
//! Each subscription is one [`Instance`] of the service `broker.{topic}`
//! (default namespace and group, see [`service_name`]): its id is the
//! subscription id, its address the `host:port` of the subscriber's HTTP
//! server, its protocol `http`, and, for a queue group, its metadata holds
//! [`QUEUE_LABEL`]` = {group}`. The registration is a lease (10s by default)
//! that a background task renews every third of the TTL, registering again
//! if the lease ran out; unsubscribing (or dropping the
//! [`Subscription`]) deregisters it.
//!
//! # Wire format
//!
//! A message is `POST /v1/broker/{subscription id}` (see [`PATH_PREFIX`])
//! over HTTP/1.1:
//!
//! * the body is the message body, as is;
//! * the topic travels in the [`TOPIC_HEADER`] (`lodestar-topic`) header;
//! * each message header `name: value` travels as the HTTP header
//!   `lodestar-h-{name}` (see [`HEADER_PREFIX`]). HTTP header names are
//!   case-insensitive, so names arrive lowercased; values are UTF-8.
//!
//! So a plain HTTP client can publish to a subscriber too:
//!
//! ```text
//! curl -X POST http://127.0.0.1:41234/v1/broker/{id} \
//!      -H 'lodestar-topic: orders.created' \
//!      -H 'lodestar-h-content-type: application/json' \
//!      -d '{"id":7}'
//! ```
//!
//! The subscriber answers `200 OK` once the message is queued for the
//! subscription (waiting while its buffer is full, which slows publishers
//! down instead of dropping messages), `404 Not Found` for an unknown
//! subscription id (it has unsubscribed), `400 Bad Request` for a missing or
//! invalid topic (or one that is not the subscription's), and `413 Payload
//! Too Large` for a body over the limit.
//!
//! # Delivery
//!
//! Delivery is at most once. A publisher keeps, per topic, a cache of the
//! subscribers fed by a registry watch, so publishing does not ask the
//! registry each time (events already waiting in the watch are applied
//! first, so a subscription the registry has reported is never missed; with
//! a remote registry, a brand-new subscription may miss messages published
//! before its registration reaches the publisher). Then, for one message:
//!
//! * every broadcast subscriber (no queue group) gets a POST; one that fails
//!   (cannot be reached, times out or answers other than 2xx) is tried once
//!   more and then skipped with a warning: a dead broadcast subscriber does
//!   not fail the publish. One that answers `404` has unsubscribed and is
//!   skipped without retry;
//! * each queue group gets one POST: its members are tried in round-robin
//!   order, moving to the next member when one fails. If every member
//!   fails, [`publish`](Broker::publish) returns
//!   [`BrokerError::NoSubscriber`], after delivering to everyone else;
//! * no subscribers at all is not an error.
//!
//! A request that timed out may still have been delivered, so a retry (or a
//! fail-over to another queue member) after a timeout can, rarely, deliver a
//! message twice. Durable subscriptions are
//! [unsupported](BrokerError::Unsupported).

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use lodestar::broker::{
    Broker, BrokerError, Message, SubscribeOptions, Subscription, validate_message,
    validate_plain_subscription,
};
use lodestar::{Instance, Registry, RegistryError};
use lodestar_core::registry::KeepRegistered;
use tokio::sync::{OnceCell, mpsc};

mod publish;
mod subscribe;
mod wire;

pub use wire::{HEADER_PREFIX, PATH_PREFIX, TOPIC_HEADER};

use publish::TopicWatch;
pub(crate) use subscribe::{Endpoints, serve_io};
use subscribe::{Server, SubscriptionHandle};
use wire::encode_headers;

/// The instance metadata key naming a subscription's queue group.
pub const QUEUE_LABEL: &str = "queue";

/// The protocol subscriptions register with.
pub const PROTOCOL: &str = "http";

/// The lease TTL of a subscription's registration unless configured.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// The time limit of one POST to a subscriber unless configured.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How many received messages a subscription buffers unless configured.
pub const DEFAULT_CAPACITY: usize = 1024;

/// The largest message body a subscriber accepts unless configured.
pub const DEFAULT_MAX_BODY: usize = 16 * 1024 * 1024;

/// How long pooled connections to subscribers may stay idle.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The registry service under which the subscribers of `topic` register:
/// `broker.{topic}`.
///
/// ```
/// assert_eq!(lodestar_broker::http::service_name("orders.created"), "broker.orders.created");
/// ```
pub fn service_name(topic: &str) -> String {
    format!("broker.{topic}")
}

/// The broker that POSTs messages to subscribers found in the registry.
///
/// Subscribing starts (once per broker, on first use) an HTTP/1.1 server on
/// the [bind address](HttpBrokerBuilder::bind), `127.0.0.1:0` by default,
/// shared by all the broker's subscriptions, and registers the subscription
/// as an instance of `broker.{topic}`. Publishing POSTs the message to the
/// subscribers of its topic; see the [module docs](self) for the wire format
/// and the delivery rules. Clones share the server and caches.
///
/// ```
/// use std::sync::Arc;
/// use lodestar_broker::{Broker, HttpBroker, Message, SubscribeOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), lodestar_broker::BrokerError> {
/// let registry = Arc::new(lodestar::MemoryRegistry::new());
/// // Usually in different processes sharing a registry.
/// let subscriber = HttpBroker::new(registry.clone());
/// let publisher = HttpBroker::new(registry);
///
/// let mut orders = subscriber.subscribe("orders.created", SubscribeOptions::broadcast()).await?;
/// publisher.publish(Message::new("orders.created", "order 7")).await?;
/// let delivery = orders.next().await.ok_or(lodestar_broker::BrokerError::Closed)?;
/// assert_eq!(delivery.message.body, "order 7");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct HttpBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for HttpBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpBroker")
            .field("address", &self.address())
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Configures an [`HttpBroker`]; from [`HttpBroker::builder`].
#[derive(Debug, Clone)]
pub struct HttpBrokerBuilder {
    registry: Arc<dyn Registry>,
    config: Config,
}

#[derive(Debug, Clone)]
struct Config {
    bind: SocketAddr,
    advertise: Option<String>,
    ttl: Duration,
    request_timeout: Duration,
    capacity: usize,
    max_body: usize,
}

impl HttpBrokerBuilder {
    /// Where the subscribers' HTTP server listens; default `127.0.0.1:0`
    /// (loopback, any free port). To be reachable from other hosts, bind a
    /// routable or unspecified address (`0.0.0.0:0`) and set
    /// [`advertise`](Self::advertise).
    pub fn bind(mut self, address: SocketAddr) -> Self {
        self.config.bind = address;
        self
    }

    /// The `host:port` registered for publishers to reach this broker's
    /// subscriptions; default the address the server listens on. A port of
    /// `0` means the port the server actually listens on, e.g.
    /// `10.0.0.7:0`. Needed when binding an unspecified address.
    pub fn advertise(mut self, address: impl Into<String>) -> Self {
        self.config.advertise = Some(address.into());
        self
    }

    /// The lease TTL of each subscription's registration, renewed every
    /// third of it; default [`DEFAULT_TTL`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// The time limit of one POST to a subscriber, and of the first wait
    /// for the registry when publishing to a topic; default
    /// [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// How many received messages each subscription buffers before the
    /// server makes publishers wait; default [`DEFAULT_CAPACITY`] (at least 1).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.config.capacity = capacity.max(1);
        self
    }

    /// The largest body the subscribers' server accepts (`413` beyond);
    /// default [`DEFAULT_MAX_BODY`].
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.config.max_body = bytes;
        self
    }

    /// The broker. Nothing listens until the first subscription.
    pub fn build(self) -> HttpBroker {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // A subscriber that cannot be reached should cost a publish little.
        connector.set_connect_timeout(Some(self.config.request_timeout.min(CONNECT_TIMEOUT)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        HttpBroker {
            inner: Arc::new(Inner {
                registry: self.registry,
                config: self.config,
                uid: broker_uid(),
                next_subscription: AtomicU64::new(1),
                server: OnceCell::new(),
                client,
                topics: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl HttpBroker {
    /// A broker finding subscribers through `registry`, with the defaults of
    /// [`HttpBroker::builder`].
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        Self::builder(registry).build()
    }

    /// Configures a broker finding subscribers through `registry`.
    pub fn builder(registry: Arc<dyn Registry>) -> HttpBrokerBuilder {
        HttpBrokerBuilder {
            registry,
            config: Config {
                bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                advertise: None,
                ttl: DEFAULT_TTL,
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
                capacity: DEFAULT_CAPACITY,
                max_body: DEFAULT_MAX_BODY,
            },
        }
    }

    /// The advertised `host:port` of this broker's HTTP server, once the
    /// first subscription has started it.
    pub fn address(&self) -> Option<&str> {
        self.inner.server.get().map(|s| s.address.as_str())
    }
}

struct Inner {
    registry: Arc<dyn Registry>,
    config: Config,
    /// Makes subscription ids unique across brokers and processes.
    uid: String,
    next_subscription: AtomicU64,
    server: OnceCell<Server>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Per published topic: the subscribers, kept current by a watch.
    topics: Mutex<HashMap<String, TopicWatch>>,
}

/// The longest a publisher waits to connect to a subscriber.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A topic not published to for this long stops being watched.
const IDLE_TOPIC: Duration = Duration::from_secs(300);

/// A unique-enough prefix for this broker's subscription ids.
fn broker_uid() -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{:x}-{:x}-{:x}",
        std::process::id(),
        nanos,
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )
}

fn registry_error(error: RegistryError) -> BrokerError {
    match error {
        RegistryError::Invalid(reason) => BrokerError::Invalid(reason),
        other => BrokerError::Unavailable(other.to_string()),
    }
}

#[async_trait::async_trait]
impl Broker for HttpBroker {
    async fn publish(&self, message: Message) -> Result<(), BrokerError> {
        validate_message(&message)?;
        // Subscribers refuse bodies over their limit; say so here, clearly,
        // rather than as whatever a refused upload looks like.
        if message.body.len() > self.inner.config.max_body {
            return Err(BrokerError::TooLarge {
                size: message.body.len(),
                limit: self.inner.config.max_body,
            });
        }
        let headers = encode_headers(&message)?;
        let targets = self.inner.subscribers(&message.topic).await?.select();
        let topic = message.topic.as_str();
        let body = &message.body;
        let broadcast = futures_util::future::join_all(
            targets
                .broadcast
                .iter()
                .map(|target| self.inner.deliver_broadcast(topic, target, &headers, body)),
        );
        let groups =
            futures_util::future::join_all(targets.groups.iter().map(|(queue, members)| {
                self.inner
                    .deliver_group(topic, queue, members, &headers, body)
            }));
        let (_, groups) = futures_util::future::join(broadcast, groups).await;
        groups.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, BrokerError> {
        validate_plain_subscription(topic, &options, "HTTP")?;
        let inner = &self.inner;
        let server = inner.server().await?;
        let id = inner.subscription_id();
        let (tx, rx) = mpsc::channel(inner.config.capacity);
        // Ready to receive before anyone can find the subscription.
        server.endpoints.subscribe(id.clone(), topic.to_owned(), tx);
        let mut instance = Instance::new(service_name(topic), server.address.clone())
            .with_id(id.clone())
            .with_protocol(PROTOCOL);
        if let Some(queue) = &options.queue {
            instance = instance.with_label(QUEUE_LABEL, queue.clone());
        }
        let ttl = inner.config.ttl;
        // Until registered, dropping the handle (an error, or this future
        // being cancelled) only removes the endpoint.
        let mut handle = SubscriptionHandle {
            inner: inner.clone(),
            id,
            key: instance.instance_key(),
            heartbeat: None,
        };
        inner
            .registry
            .register(instance.clone(), ttl)
            .await
            .map_err(registry_error)?;
        // Renewed every third of the TTL, and registered again if the
        // registry lost it.
        let key = handle.key.clone();
        let keep = KeepRegistered::new(inner.registry.clone(), instance, ttl)
            .already_registered(true)
            .run(move || {
                tracing::info!(%key, "HTTP broker: subscription registered again after its lease was lost");
            });
        handle.heartbeat = Some(tokio::spawn(keep));
        Ok(Subscription::from_channel(topic, rx, handle))
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use futures_util::{FutureExt, StreamExt};
    use http::{Request, StatusCode};
    use lodestar::MemoryRegistry;
    use lodestar::broker::{Durable, header};
    use lodestar::{InstanceKey, Revision, ServiceKey, WatchEvent, WatchStream};

    use super::subscribe::advertised;
    use super::*;

    /// A bound on anything that could hang.
    const LIMIT: Duration = Duration::from_secs(5);

    async fn bounded<F: Future>(future: F) -> F::Output {
        tokio::time::timeout(LIMIT, future)
            .await
            .expect("timed out")
    }

    fn registry() -> Arc<MemoryRegistry> {
        Arc::new(MemoryRegistry::new())
    }

    fn broker(registry: &Arc<MemoryRegistry>) -> HttpBroker {
        HttpBroker::builder(registry.clone())
            .request_timeout(Duration::from_secs(2))
            .build()
    }

    async fn next(subscription: &mut Subscription) -> Message {
        bounded(subscription.next())
            .await
            .expect("subscription ended")
            .message
    }

    /// The deliveries already queued, without waiting.
    fn drain(subscription: &mut Subscription) -> Vec<Message> {
        let mut messages = Vec::new();
        while let Some(Some(delivery)) = subscription.next().now_or_never() {
            messages.push(delivery.message);
        }
        messages
    }

    /// A loopback address nothing listens on, held (bound, never
    /// listening) until the test's process ends: a port merely freed could
    /// be taken meanwhile by a server of a test running beside this one.
    async fn dead_address() -> String {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = socket.local_addr().unwrap().to_string();
        std::mem::forget(socket);
        address
    }

    async fn register_dead(
        registry: &Arc<MemoryRegistry>,
        topic: &str,
        id: &str,
        queue: Option<&str>,
    ) -> String {
        let address = dead_address().await;
        let mut instance = Instance::new(service_name(topic), address.clone()).with_id(id);
        if let Some(queue) = queue {
            instance = instance.with_label(QUEUE_LABEL, queue);
        }
        registry
            .register(instance, Duration::from_secs(30))
            .await
            .unwrap();
        address
    }

    async fn raw_post(
        address: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &'static str,
    ) -> StatusCode {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let mut request = Request::post(format!("http://{address}{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        bounded(client.request(request)).await.unwrap().status()
    }

    #[tokio::test]
    async fn broadcast_reaches_every_subscriber() {
        let registry = registry();
        let (a, b) = (broker(&registry), broker(&registry));
        let mut sa = a
            .subscribe("orders.created", SubscribeOptions::broadcast())
            .await
            .unwrap();
        let mut sb = b
            .subscribe("orders.created", SubscribeOptions::broadcast())
            .await
            .unwrap();
        assert_ne!(a.address(), b.address());

        a.publish(Message::new("orders.created", "order 7"))
            .await
            .unwrap();
        assert_eq!(next(&mut sa).await.body, "order 7");
        assert_eq!(next(&mut sb).await.body, "order 7");
        assert!(drain(&mut sa).is_empty() && drain(&mut sb).is_empty());
    }

    #[tokio::test]
    async fn subscriptions_register_under_broker_topic() {
        let registry = registry();
        let a = broker(&registry);
        let _s1 = a
            .subscribe("orders.created", SubscribeOptions::broadcast())
            .await
            .unwrap();
        let _s2 = a
            .subscribe("orders.created", SubscribeOptions::queue("billing"))
            .await
            .unwrap();
        let mut instances = registry
            .instances(&ServiceKey::new("broker.orders.created"))
            .await
            .unwrap();
        instances.sort_by_key(|i| i.metadata.contains_key(QUEUE_LABEL));
        assert_eq!(instances.len(), 2);
        assert_ne!(instances[0].id, instances[1].id);
        for instance in &instances {
            assert_eq!(Some(instance.address.as_str()), a.address());
            assert_eq!(instance.protocol, PROTOCOL);
        }
        assert_eq!(instances[0].metadata.get(QUEUE_LABEL), None);
        assert_eq!(instances[1].metadata[QUEUE_LABEL], "billing");
    }

    #[tokio::test]
    async fn queue_group_gets_each_message_once_round_robin() {
        let registry = registry();
        let (a, b, publisher) = (broker(&registry), broker(&registry), broker(&registry));
        let mut sa = a
            .subscribe("jobs", SubscribeOptions::queue("workers"))
            .await
            .unwrap();
        let mut sb = b
            .subscribe("jobs", SubscribeOptions::queue("workers"))
            .await
            .unwrap();
        // A broadcast subscriber alongside gets everything.
        let mut all = a
            .subscribe("jobs", SubscribeOptions::broadcast())
            .await
            .unwrap();

        for i in 0..10 {
            publisher
                .publish(Message::new("jobs", i.to_string()))
                .await
                .unwrap();
        }
        // Each publish returns once the message is queued.
        let (ma, mb) = (drain(&mut sa), drain(&mut sb));
        assert_eq!((ma.len(), mb.len()), (5, 5), "round robin: {ma:?} / {mb:?}");
        let mut bodies: Vec<u32> = ma
            .iter()
            .chain(&mb)
            .map(|m| std::str::from_utf8(&m.body).unwrap().parse().unwrap())
            .collect();
        bodies.sort_unstable();
        assert_eq!(bodies, (0..10).collect::<Vec<_>>());
        // Alternating members: one got the even messages, the other the odd.
        let parity: Vec<u32> = ma
            .iter()
            .map(|m| {
                std::str::from_utf8(&m.body)
                    .unwrap()
                    .parse::<u32>()
                    .unwrap()
                    % 2
            })
            .collect();
        assert!(parity.iter().all(|p| *p == parity[0]));
        assert_eq!(drain(&mut all).len(), 10);
    }

    #[tokio::test]
    async fn headers_and_body_round_trip() {
        let registry = registry();
        let (a, b) = (broker(&registry), broker(&registry));
        let mut s = a
            .subscribe("orders.created", SubscribeOptions::broadcast())
            .await
            .unwrap();
        let message = Message::new(
            "orders.created",
            Bytes::from_static(&[0, 159, 146, 150, 255]),
        )
        .with_header(header::CONTENT_TYPE, "application/protobuf")
        .with_header(header::MESSAGE_ID, "m-1")
        .with_header(
            header::TRACEPARENT,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .with_header("x-city", "Zürich, café");
        b.publish(message.clone()).await.unwrap();
        assert_eq!(next(&mut s).await, message);

        // Bad names and values are refused up front, as on every backend:
        // uppercase (HTTP would lowercase it), spaces, control characters.
        for (name, value) in [("X-Upper", "v"), ("x", "  padded  ")] {
            let error = b
                .publish(Message::new("orders.created", "").with_header(name, value))
                .await
                .unwrap_err();
            assert!(matches!(error, BrokerError::Invalid(_)), "{error}");
        }
        let error = b
            .publish(Message::new("orders.created", "").with_header("bad name", "v"))
            .await
            .unwrap_err();
        assert!(matches!(error, BrokerError::Invalid(_)), "{error}");
        let error = b
            .publish(Message::new("orders.created", "").with_header("x", "line\r\nbreak"))
            .await
            .unwrap_err();
        assert!(matches!(error, BrokerError::Invalid(_)), "{error}");
        assert!(drain(&mut s).is_empty());
    }

    #[tokio::test]
    async fn order_is_preserved_for_100_messages() {
        let registry = registry();
        let (a, b) = (broker(&registry), broker(&registry));
        let mut s = a
            .subscribe("ticks", SubscribeOptions::broadcast())
            .await
            .unwrap();
        let mut q = a
            .subscribe("ticks", SubscribeOptions::queue("one"))
            .await
            .unwrap();
        let receive = async {
            let mut received = Vec::new();
            for _ in 0..100 {
                received.push(next(&mut s).await.body);
            }
            received
        };
        let publish = async {
            for i in 0..100 {
                b.publish(Message::new("ticks", i.to_string()))
                    .await
                    .unwrap();
            }
        };
        let (received, ()) = bounded(futures_util::future::join(receive, publish)).await;
        let expected: Vec<Bytes> = (0..100).map(|i| Bytes::from(i.to_string())).collect();
        assert_eq!(received, expected);
        let queued: Vec<Bytes> = drain(&mut q).into_iter().map(|m| m.body).collect();
        assert_eq!(queued, expected);
    }

    #[tokio::test]
    async fn backpressure_waits_for_a_full_subscriber() {
        let registry = registry();
        let a = HttpBroker::builder(registry.clone()).capacity(1).build();
        let b = broker(&registry);
        let mut s = a
            .subscribe("slow", SubscribeOptions::broadcast())
            .await
            .unwrap();
        b.publish(Message::new("slow", "1")).await.unwrap();
        // The buffer is full: the second publish waits until the first is
        // read (an absence, so a short bounded wait shows it).
        let mut second = std::pin::pin!(b.publish(Message::new("slow", "2")));
        let early = tokio::time::timeout(Duration::from_millis(100), &mut second).await;
        assert!(early.is_err(), "published into a full buffer: {early:?}");
        assert_eq!(next(&mut s).await.body, "1");
        bounded(second).await.unwrap();
        assert_eq!(next(&mut s).await.body, "2");
    }

    #[tokio::test]
    async fn unsubscribe_deregisters_and_stops_delivery() {
        let registry = registry();
        let (a, b) = (broker(&registry), broker(&registry));
        let service = ServiceKey::new(service_name("orders.created"));
        let sa = a
            .subscribe("orders.created", SubscribeOptions::broadcast())
            .await
            .unwrap();
        let mut sb = b
            .subscribe("orders.created", SubscribeOptions::broadcast())
            .await
            .unwrap();
        let mut queue = a
            .subscribe("orders.created", SubscribeOptions::queue("q"))
            .await
            .unwrap();
        // The publisher (b) now caches all three subscriptions.
        b.publish(Message::new("orders.created", "1"))
            .await
            .unwrap();
        assert_eq!(next(&mut sb).await.body, "1");
        assert_eq!(next(&mut queue).await.body, "1");
        let ids: Vec<String> = registry
            .instances(&service)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids.len(), 3);

        let address = a.address().unwrap().to_owned();
        sa.unsubscribe().await.unwrap();
        let left = registry.instances(&service).await.unwrap();
        assert_eq!(left.len(), 2);
        let gone: Vec<&String> = ids
            .iter()
            .filter(|id| !left.iter().any(|i| &i.id == *id))
            .collect();
        assert_eq!(gone.len(), 1);
        // Its endpoint is gone too, even for a publisher whose cache lags.
        let status = raw_post(
            &address,
            &format!("{PATH_PREFIX}{}", gone[0]),
            &[(TOPIC_HEADER, "orders.created")],
            "late",
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        b.publish(Message::new("orders.created", "2"))
            .await
            .unwrap();
        assert_eq!(next(&mut sb).await.body, "2");

        // Dropping the queue subscription ends it and deregisters it too.
        let mut watch = registry
            .watch(&service, Some(registry.revision()))
            .await
            .unwrap();
        drop(queue);
        let event = bounded(watch.next()).await.unwrap().unwrap();
        assert!(matches!(event, WatchEvent::Delete { .. }), "{event:?}");
        assert_eq!(registry.instances(&service).await.unwrap().len(), 1);
        b.publish(Message::new("orders.created", "3"))
            .await
            .unwrap();
        assert_eq!(next(&mut sb).await.body, "3");
    }

    #[tokio::test]
    async fn queue_group_whose_members_are_all_dead_is_no_subscriber() {
        let registry = registry();
        let (a, b) = (broker(&registry), broker(&registry));
        let address = register_dead(&registry, "jobs", "dead-1", Some("workers")).await;
        let mut others = a
            .subscribe("jobs", SubscribeOptions::broadcast())
            .await
            .unwrap();

        let error = b.publish(Message::new("jobs", "work")).await.unwrap_err();
        match &error {
            BrokerError::NoSubscriber {
                topic,
                queue,
                reason,
            } => {
                assert_eq!((topic.as_str(), queue.as_str()), ("jobs", "workers"));
                assert!(reason.contains(&address), "{reason}");
            }
            other => panic!("expected NoSubscriber, got {other:?}"),
        }
        let text = error.to_string();
        assert!(
            text.contains("queue group `workers`") && text.contains("`jobs`"),
            "{text}"
        );
        // Everyone else still got it.
        assert_eq!(next(&mut others).await.body, "work");
    }

    #[tokio::test]
    async fn queue_group_fails_over_to_a_live_member() {
        let registry = registry();
        let (a, b) = (broker(&registry), broker(&registry));
        register_dead(&registry, "jobs", "dead-1", Some("workers")).await;
        let mut live = a
            .subscribe("jobs", SubscribeOptions::queue("workers"))
            .await
            .unwrap();
        for i in 0..4 {
            b.publish(Message::new("jobs", i.to_string()))
                .await
                .unwrap();
        }
        let bodies: Vec<Bytes> = drain(&mut live).into_iter().map(|m| m.body).collect();
        assert_eq!(bodies, ["0", "1", "2", "3"].map(Bytes::from));
    }

    #[tokio::test]
    async fn dead_broadcast_subscriber_is_skipped() {
        let registry = registry();
        let (a, b) = (broker(&registry), broker(&registry));
        register_dead(&registry, "orders.created", "dead-1", None).await;
        let mut live = a
            .subscribe("orders.created", SubscribeOptions::broadcast())
            .await
            .unwrap();
        b.publish(Message::new("orders.created", "7"))
            .await
            .unwrap();
        assert_eq!(next(&mut live).await.body, "7");
    }

    #[tokio::test]
    async fn no_subscribers_is_not_an_error() {
        let registry = registry();
        broker(&registry)
            .publish(Message::new("nobody.listens", "x"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn durable_is_unsupported_and_bad_names_invalid() {
        let registry = registry();
        let a = broker(&registry);
        let error = a
            .subscribe("orders", SubscribeOptions::durable(Durable::new("billing")))
            .await
            .unwrap_err();
        assert_eq!(
            error,
            BrokerError::Unsupported(
                "the HTTP broker has no durable subscriptions; use nats:// with JetStream"
                    .to_owned()
            )
        );
        for topic in ["", "orders.*", "a..b", "with space"] {
            let error = a
                .subscribe(topic, SubscribeOptions::broadcast())
                .await
                .unwrap_err();
            assert!(matches!(error, BrokerError::Invalid(_)), "{topic}: {error}");
            let error = a.publish(Message::new(topic, "x")).await.unwrap_err();
            assert!(matches!(error, BrokerError::Invalid(_)), "{topic}: {error}");
        }
        let error = a
            .subscribe("orders", SubscribeOptions::queue("bad queue"))
            .await
            .unwrap_err();
        assert!(matches!(error, BrokerError::Invalid(_)), "{error}");
        // Nothing was started or registered for those.
        assert!(a.address().is_none());
        assert!(registry.services("default").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn plain_http_clients_can_post_to_a_subscriber() {
        let registry = registry();
        let a = broker(&registry);
        let mut s = a
            .subscribe("orders.created", SubscribeOptions::broadcast())
            .await
            .unwrap();
        let address = a.address().unwrap().to_owned();
        let id = registry
            .instances(&ServiceKey::new(service_name("orders.created")))
            .await
            .unwrap()
            .remove(0)
            .id;
        let path = format!("{PATH_PREFIX}{id}");

        let status = raw_post(
            &address,
            &path,
            &[
                (TOPIC_HEADER, "orders.created"),
                ("lodestar-h-content-type", "application/json"),
                ("x-other", "ignored"),
            ],
            "{\"id\":7}",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let message = next(&mut s).await;
        assert_eq!(
            message,
            Message::new("orders.created", "{\"id\":7}")
                .with_header("content-type", "application/json")
        );

        let cases = [
            (path.as_str(), vec![], StatusCode::BAD_REQUEST),
            (
                path.as_str(),
                vec![(TOPIC_HEADER, "orders.*")],
                StatusCode::BAD_REQUEST,
            ),
            (
                path.as_str(),
                vec![(TOPIC_HEADER, "other.topic")],
                StatusCode::BAD_REQUEST,
            ),
            (
                "/v1/broker/no-such-id",
                vec![(TOPIC_HEADER, "orders.created")],
                StatusCode::NOT_FOUND,
            ),
            (
                "/elsewhere",
                vec![(TOPIC_HEADER, "orders.created")],
                StatusCode::NOT_FOUND,
            ),
        ];
        for (path, headers, expected) in cases {
            assert_eq!(
                raw_post(&address, path, &headers, "x").await,
                expected,
                "{path} {headers:?}"
            );
        }
        assert!(drain(&mut s).is_empty());
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused() {
        let registry = registry();
        let a = HttpBroker::builder(registry.clone()).max_body(4).build();
        let mut s = a
            .subscribe("small", SubscribeOptions::broadcast())
            .await
            .unwrap();
        let id = registry
            .instances(&ServiceKey::new(service_name("small")))
            .await
            .unwrap()
            .remove(0)
            .id;
        let status = raw_post(
            a.address().unwrap(),
            &format!("{PATH_PREFIX}{id}"),
            &[(TOPIC_HEADER, "small")],
            "too large",
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(drain(&mut s).is_empty());
    }

    #[tokio::test]
    async fn a_lost_lease_is_registered_again() {
        let registry = registry();
        let a = HttpBroker::builder(registry.clone())
            .ttl(Duration::from_millis(600))
            .build();
        let _s = a
            .subscribe("orders", SubscribeOptions::broadcast())
            .await
            .unwrap();
        let service = ServiceKey::new(service_name("orders"));
        let instance = registry.instances(&service).await.unwrap().remove(0);
        let mut watch = registry
            .watch(&service, Some(registry.revision()))
            .await
            .unwrap();
        registry.deregister(&instance.instance_key()).await.unwrap();
        let event = bounded(watch.next()).await.unwrap().unwrap();
        assert!(matches!(event, WatchEvent::Delete { .. }), "{event:?}");
        // The next heartbeat finds it gone and registers it again.
        let event = bounded(watch.next()).await.unwrap().unwrap();
        assert!(
            matches!(&event, WatchEvent::Put { instance: i, .. } if i.id == instance.id),
            "{event:?}"
        );
    }

    #[tokio::test]
    async fn advertised_addresses() {
        let local: SocketAddr = "127.0.0.1:4100".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:4100".parse().unwrap();
        assert_eq!(advertised(None, local).unwrap(), "127.0.0.1:4100");
        assert!(matches!(
            advertised(None, any),
            Err(BrokerError::Invalid(_))
        ));
        assert_eq!(
            advertised(Some("10.0.0.7:0"), any).unwrap(),
            "10.0.0.7:4100"
        );
        assert_eq!(
            advertised(Some("host.example:80"), any).unwrap(),
            "host.example:80"
        );
        assert_eq!(advertised(Some("[::1]:0"), any).unwrap(), "[::1]:4100");
        assert!(advertised(Some("no-port"), any).is_err());
        assert!(advertised(Some(":80"), any).is_err());

        // An advertised host with the port the server got.
        let registry = registry();
        let a = HttpBroker::builder(registry.clone())
            .bind("127.0.0.1:0".parse().unwrap())
            .advertise("127.0.0.1:0")
            .build();
        let b = broker(&registry);
        let mut s = a
            .subscribe("named", SubscribeOptions::broadcast())
            .await
            .unwrap();
        let address = a.address().unwrap();
        assert!(
            address.starts_with("127.0.0.1:") && !address.ends_with(":0"),
            "{address}"
        );
        b.publish(Message::new("named", "hi")).await.unwrap();
        assert_eq!(next(&mut s).await.body, "hi");
    }

    #[tokio::test]
    async fn a_new_subscriber_gets_the_next_publish() {
        let registry = registry();
        let (a, b) = (broker(&registry), broker(&registry));
        let mut first = a
            .subscribe("news", SubscribeOptions::queue("g"))
            .await
            .unwrap();
        // The publisher's cache exists before the next subscriptions.
        b.publish(Message::new("news", "0")).await.unwrap();
        assert_eq!(next(&mut first).await.body, "0");
        drop(first);
        let mut second = a
            .subscribe("news", SubscribeOptions::queue("g"))
            .await
            .unwrap();
        let mut third = a
            .subscribe("news", SubscribeOptions::broadcast())
            .await
            .unwrap();
        b.publish(Message::new("news", "1")).await.unwrap();
        assert_eq!(next(&mut second).await.body, "1");
        assert_eq!(next(&mut third).await.body, "1");
    }

    /// A registry whose first watches fail, or that never answers them.
    #[derive(Debug)]
    struct Flaky {
        inner: MemoryRegistry,
        failures: AtomicU64,
        hang: bool,
    }

    #[async_trait::async_trait]
    impl Registry for Flaky {
        async fn register(&self, instance: Instance, ttl: Duration) -> Result<(), RegistryError> {
            self.inner.register(instance, ttl).await
        }
        async fn heartbeat(&self, key: &InstanceKey) -> Result<(), RegistryError> {
            self.inner.heartbeat(key).await
        }
        async fn deregister(&self, key: &InstanceKey) -> Result<(), RegistryError> {
            self.inner.deregister(key).await
        }
        async fn instances(&self, service: &ServiceKey) -> Result<Vec<Instance>, RegistryError> {
            self.inner.instances(service).await
        }
        async fn services(&self, namespace: &str) -> Result<Vec<ServiceKey>, RegistryError> {
            self.inner.services(namespace).await
        }
        async fn watch(
            &self,
            service: &ServiceKey,
            since: Option<Revision>,
        ) -> Result<WatchStream, RegistryError> {
            if self.hang {
                std::future::pending::<()>().await;
            }
            let failed = self
                .failures
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            if failed.is_ok() {
                return Err(RegistryError::Unavailable("flaky".to_owned()));
            }
            self.inner.watch(service, since).await
        }
    }

    #[tokio::test]
    async fn the_watch_is_retried_and_a_silent_registry_is_unavailable() {
        let flaky = Arc::new(Flaky {
            inner: MemoryRegistry::new(),
            failures: AtomicU64::new(2),
            hang: false,
        });
        let a = HttpBroker::new(flaky.clone());
        let mut s = a
            .subscribe("retry", SubscribeOptions::broadcast())
            .await
            .unwrap();
        // The first publish waits through two failed watches (with backoff).
        bounded(a.publish(Message::new("retry", "x")))
            .await
            .unwrap();
        assert_eq!(next(&mut s).await.body, "x");
        assert_eq!(flaky.failures.load(Ordering::Relaxed), 0);

        let silent = Arc::new(Flaky {
            inner: MemoryRegistry::new(),
            failures: AtomicU64::new(0),
            hang: true,
        });
        let b = HttpBroker::builder(silent)
            .request_timeout(Duration::from_millis(200))
            .build();
        let error = bounded(b.publish(Message::new("retry", "x")))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, BrokerError::Unavailable(m) if m.contains("broker.retry")),
            "{error:?}"
        );
    }
}
