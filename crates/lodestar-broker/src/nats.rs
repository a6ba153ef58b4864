//! NATS: core subjects (at most once) and JetStream durable consumers (at
//! least once), over `async-nats`.
//!
//! # Conventions
//!
//! * A topic is a NATS subject of the same name; lodestar headers are NATS
//!   headers of the same names. A plain NATS client reads and writes them.
//! * A durable subscription to `topic` uses a JetStream stream named
//!   `LODESTAR_{topic}` (dots as `_`, plus a short hash so that distinct
//!   topics never share one) holding that subject, and a durable pull
//!   consumer of the [`Durable`] name with explicit acks. The stream is
//!   created by the first durable subscriber; from then on every message
//!   published on the topic (by anyone) is stored.
//! * Publishing to a topic that a stream holds waits for JetStream's
//!   acknowledgement, so success means the message is stored; the message
//!   id goes out as `Nats-Msg-Id` too, so JetStream drops a retried
//!   duplicate. Other topics are published fire-and-forget, as NATS core is.
//! * After [`Durable::max_deliver`] failed deliveries, a message is copied
//!   to the dead-letter topic (its own stream, `dead.{topic}` by default)
//!   with [`header::DEAD_LETTER_TOPIC`], [`header::DEAD_LETTER_ATTEMPTS`] and
//!   [`header::DEAD_LETTER_CONSUMER`], and terminated. The server's consumer
//!   has no delivery limit of its own: lodestar counts, so a message whose
//!   last attempt died with its subscriber, or whose dead-lettering failed,
//!   is delivered again and dead-lettered then, never dropped.
//! * An ack (and a nack) is sent without waiting for JetStream's answer, as
//!   plain NATS clients do: an ack lost on the way (the process died right
//!   after it) means the message comes back after the ack wait, which at
//!   least once allows. Ending a durable subscription, by
//!   [`Subscription::unsubscribe`] or by dropping it, first makes sure the
//!   server has every ack sent before, so that a drained subscriber leaves no
//!   handled message to be delivered again; `unsubscribe` returns an error
//!   if the server cannot confirm that.
//! * Whether a stream holds a topic is looked up once (concurrent publishers
//!   share the lookup) and remembered. A "no stream" answer is checked again
//!   in the background every 2 seconds, while publishes go on as core ones
//!   (a stream created meanwhile by someone else still stores them; they
//!   just do not wait for its acknowledgement until the check sees it).
//! * A durable subscription pulls 16 messages at a time and buffers 8, since
//!   the ack wait runs while a message waits; a handler must finish within
//!   the ack wait. A consumer or stream deleted under a subscription is
//!   created again, and resubscribing with a new ack wait updates it.
//! * Streams keep messages without limit (JetStream's defaults); set limits
//!   on them with NATS's own tools. A new durable name starts from the
//!   beginning of its stream.
//!

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer, stream};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{Broker, BrokerError, Delivery, Durable, Message, SubscribeOptions, Subscription};
use lodestar::broker::{
    Acker, Headers, Unsubscribe, header, validate_message, validate_options, validate_topic,
};
use lodestar_core::sync::MutexExt;

/// How long a "no stream holds this topic" answer is trusted before it is
/// checked again (in the background).
const NEGATIVE_STREAM_CACHE: Duration = Duration::from_secs(2);
/// How long a round trip to the server may take.
const ROUND_TRIP: Duration = Duration::from_secs(5);
/// How many durable deliveries wait for the subscriber: few, because their
/// ack wait runs while they wait.
const DURABLE_BUFFER: usize = 8;
/// How many messages a durable subscription pulls at once.
const DURABLE_BATCH: usize = 16;

/// A NATS broker: core subjects and JetStream durable subscriptions.
///
/// ```no_run
/// use lodestar_broker::{Broker, Message, NatsBroker, SubscribeOptions};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = NatsBroker::connect("nats://127.0.0.1:4222").await?;
/// let mut events = broker.subscribe("orders.created", SubscribeOptions::queue("billing")).await?;
/// broker.publish(Message::new("orders.created", "order 7")).await?;
/// let delivery = events.next().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct NatsBroker {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    servers: String,
    /// Which topics a JetStream stream holds.
    streams: Arc<StreamCache>,
    /// Where dead letters are counted.
    metrics: lodestar::metrics::BrokerMetrics,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nats://{}", self.servers)
    }
}

/// The servers of a `nats://[user:password@]host:port[,…]` URL, and the
/// hosts without credentials (what errors and `Debug` show).
pub(crate) fn servers(url: &str) -> Result<(Vec<async_nats::ServerAddr>, String), BrokerError> {
    let hosts = url.strip_prefix("nats://").ok_or_else(|| {
        BrokerError::Invalid("expected nats://[user:password@]host:port[,host:port]".to_owned())
    })?;
    let shown: Vec<&str> = hosts
        .split(',')
        .map(|h| h.trim().rsplit_once('@').map_or(h.trim(), |(_, host)| host))
        .collect();
    let shown = shown.join(",");
    lodestar::parse_host_ports(&shown).map_err(|e| {
        BrokerError::Invalid(if hosts.contains('@') {
            // The bad part may be a piece of the credentials (a `,` in a
            // password splits it): say so without showing it.
            "an address in the URL is not host:port (not shown, since the URL has credentials; \
             percent-encode `,` and `@` in them)"
                .to_owned()
        } else {
            e
        })
    })?;
    let mut servers = Vec::new();
    for (host, bare) in hosts.split(',').map(str::trim).zip(shown.split(',')) {
        let address: async_nats::ServerAddr = format!("nats://{host}")
            .parse()
            .map_err(|e| BrokerError::Invalid(format!("`{bare}`: {e}")))?;
        servers.push(address);
    }
    Ok((servers, shown))
}

impl NatsBroker {
    /// Connects to `nats://host:port[,host:port…]`. The client reconnects
    /// on its own after a server restart; this call fails if no server can
    /// be reached now.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let (servers, shown) = servers(url)?;
        let client = async_nats::ConnectOptions::new()
            .name("lodestar")
            .connection_timeout(Duration::from_secs(5))
            .connect(servers)
            .await
            .map_err(|e| {
                BrokerError::Unavailable(format!("cannot connect to nats://{shown}: {e}"))
            })?;
        Ok(Self {
            jetstream: jetstream::new(client.clone()),
            client,
            servers: shown,
            streams: Arc::default(),
            metrics: lodestar::metrics::BrokerMetrics::of(lodestar::metrics::Metrics::global()),
        })
    }

    /// Counts the messages it dead-letters
    /// (`lodestar_broker_dead_lettered_total{topic}`) in `metrics` rather
    /// than the process's registry.
    pub fn with_metrics(mut self, metrics: &lodestar::metrics::Metrics) -> Self {
        self.metrics = lodestar::metrics::BrokerMetrics::of(metrics);
        self
    }

    /// The underlying `async-nats` client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Waits until everything published so far has reached the server.
    async fn flush_client(&self) -> Result<(), BrokerError> {
        self.client
            .flush()
            .await
            .map_err(|e| BrokerError::Unavailable(format!("{self:?}: {e}")))
    }

    /// Waits until the server has processed everything this connection sent
    /// so far (a SUB, an UNSUB, acks). async-nats's `flush` only waits for
    /// the bytes to leave; the server handles one connection's operations in
    /// order, so a message to ourselves coming back is the proof. Bounded by
    /// [`ROUND_TRIP`] as a whole, queueing behind a full client included.
    async fn round_trip(client: &async_nats::Client) -> Result<(), BrokerError> {
        let echo = async {
            let inbox = client.new_inbox();
            let mut echo = client.subscribe(inbox.clone()).await.map_err(unavailable)?;
            client
                .publish(inbox, Bytes::new())
                .await
                .map_err(unavailable)?;
            let answered = echo.next().await;
            let _ = echo.unsubscribe().await;
            answered.map(drop).ok_or(BrokerError::Closed)
        };
        match tokio::time::timeout(ROUND_TRIP, echo).await {
            Ok(answered) => answered,
            Err(_) => Err(BrokerError::Unavailable(format!(
                "the NATS server did not answer within {ROUND_TRIP:?}"
            ))),
        }
    }

    /// Whether a JetStream stream holds `topic`.
    ///
    /// The first question about a topic waits for the server's answer, one
    /// lookup for all the publishers asking at once. Then a stream is
    /// trusted until a publish finds it gone ([`Self::forget`]); "no stream"
    /// is trusted for [`NEGATIVE_STREAM_CACHE`] and then checked again in
    /// the background, publishes going on as core ones meanwhile (a stream
    /// that someone else created stores those as well).
    async fn stored(&self, topic: &str) -> bool {
        let mut answer = {
            let mut cache = self.streams.lock();
            let CacheState { topics, lookups } = &mut *cache;
            match topics.get_mut(topic) {
                Some(Known::Stored) => return true,
                Some(Known::NotStored { checked, refresh }) => {
                    if refresh.is_none() && checked.elapsed() >= NEGATIVE_STREAM_CACHE {
                        *lookups += 1;
                        *refresh = Some(*lookups);
                        self.look_up(topic, *lookups, None);
                    }
                    return false;
                }
                Some(Known::Asking { answer, .. }) => answer.clone(),
                None => {
                    *lookups += 1;
                    let (tell, answer) = watch::channel(None);
                    topics.insert(
                        topic.to_owned(),
                        Known::Asking {
                            id: *lookups,
                            answer: answer.clone(),
                        },
                    );
                    self.look_up(topic, *lookups, Some(tell));
                    answer
                }
            }
        };
        // The lookup answers once; should it end without answering (its
        // runtime shutting down), the answer is unknown: publish through
        // JetStream, whose answer says.
        match answer.wait_for(Option::is_some).await {
            Ok(stored) => stored.unwrap_or(true),
            Err(_) => true,
        }
    }

    /// Asks the server whether a stream holds `topic`, in a task of its own
    /// (so that a publisher giving up does not leave the others waiting),
    /// records the answer under lookup `id`, and tells `tell`.
    fn look_up(&self, topic: &str, id: u64, tell: Option<watch::Sender<Option<bool>>>) {
        let jetstream = self.jetstream.clone();
        // Settles the lookup even if the task is dropped unfinished (its
        // runtime shutting down): the topic is then asked about again,
        // instead of waiting on a refresh that will never come.
        let mut lookup = Lookup {
            streams: self.streams.clone(),
            topic: topic.to_owned(),
            id,
            settled: false,
        };
        tokio::spawn(async move {
            let topic = lookup.topic.clone();
            let stored = match jetstream.stream_by_subject(topic.as_str()).await {
                Ok(_) => Some(true),
                Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {
                    Some(false)
                }
                // Unknown: ask again next time.
                Err(_) => None,
            };
            lookup.settle(stored);
            if let Some(tell) = tell {
                // Unknown: publish through JetStream, whose answer says.
                tell.send_replace(Some(stored.unwrap_or(true)));
            }
        });
    }

    /// Forgets what is known about `topic`: the next publish asks again.
    fn forget(&self, topic: &str) {
        self.streams.lock().topics.remove(topic);
    }

    /// Creates (or finds) the stream holding `topic`.
    async fn ensure_stream(&self, topic: &str) -> Result<stream::Stream, BrokerError> {
        let stream = self
            .jetstream
            .get_or_create_stream(stream::Config {
                name: stream_name(topic),
                subjects: vec![topic.to_owned()],
                ..stream::Config::default()
            })
            .await
            .map_err(|e| {
                BrokerError::Unavailable(format!("{self:?}: JetStream stream for `{topic}`: {e}"))
            })?;
        self.streams
            .lock()
            .topics
            .insert(topic.to_owned(), Known::Stored);
        Ok(stream)
    }

    /// The durable consumer for `topic`, creating its stream, the
    /// dead-letter stream and the consumer if missing, and bringing an
    /// existing consumer's ack wait up to date.
    async fn consumer(
        &self,
        topic: &str,
        durable: &Durable,
    ) -> Result<consumer::PullConsumer, BrokerError> {
        let stream = self.ensure_stream(topic).await?;
        self.ensure_stream(&durable.dead_letter_topic(topic))
            .await?;
        let config = consumer::pull::Config {
            durable_name: Some(durable.name.clone()),
            filter_subject: topic.to_owned(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: durable.ack_wait,
            // Unlimited on the server: lodestar counts the attempts and
            // dead-letters, so that a message whose dead-lettering failed is
            // delivered again rather than dropped (see the module docs).
            max_deliver: -1,
            ..consumer::pull::Config::default()
        };
        let error = |e: &dyn std::fmt::Display| {
            BrokerError::Unavailable(format!(
                "{self:?}: durable consumer `{}` on `{topic}`: {e}",
                durable.name
            ))
        };
        let mut consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(&durable.name, config.clone())
            .await
            .map_err(|e| error(&e))?;
        let existing = &consumer.cached_info().config;
        if existing.ack_wait != durable.ack_wait || existing.max_deliver != -1 {
            consumer = stream
                .update_consumer(config)
                .await
                .map_err(|e| error(&format!("cannot update its settings: {e}")))?;
        }
        Ok(consumer)
    }

    async fn durable(&self, topic: &str, durable: Durable) -> Result<Subscription, BrokerError> {
        let dead_letter = durable.dead_letter_topic(topic);
        validate_topic(&dead_letter)?;
        let consumer = self.consumer(topic, &durable).await?;
        let (tx, rx) = mpsc::channel(DURABLE_BUFFER);
        let (stop_tx, stop_rx) = oneshot::channel();
        let pump = DurablePump {
            broker: self.clone(),
            settle: Arc::new(Settle {
                counted: self.metrics.topic(topic),
                topic: topic.to_owned(),
                durable: durable.name.clone(),
                max_deliver: durable.max_deliver,
                dead_letter,
                jetstream: self.jetstream.clone(),
                connects: self
                    .client
                    .statistics()
                    .connects
                    .load(std::sync::atomic::Ordering::Relaxed),
            }),
            durable,
            consumer,
            tx,
        };
        tokio::spawn(pump.run(stop_rx));
        Ok(Subscription::from_channel(
            topic,
            rx,
            DurableStop(Some(stop_tx)),
        ))
    }

    async fn core(&self, topic: &str, queue: Option<String>) -> Result<Subscription, BrokerError> {
        let subscriber = match queue {
            Some(queue) => self.client.queue_subscribe(topic.to_owned(), queue).await,
            None => self.client.subscribe(topic.to_owned()).await,
        }
        .map_err(|e| BrokerError::Unavailable(format!("{self:?}: subscribe to `{topic}`: {e}")))?;
        // Make sure the server has the subscription before returning, so a
        // publish that follows (from any connection) is received.
        Self::round_trip(&self.client).await?;
        let (park, parked) = oneshot::channel();
        let deliveries = CoreDeliveries {
            subscriber: Some(subscriber),
            park: Some(park),
        };
        let stop = CoreStop {
            client: self.client.clone(),
            parked,
        };
        Ok(Subscription::new(topic, deliveries, stop))
    }
}

/// Which topics a JetStream stream holds, as far as this broker knows.
#[derive(Default)]
struct StreamCache(Mutex<CacheState>);

#[derive(Default)]
struct CacheState {
    topics: HashMap<String, Known>,
    /// How many lookups were started: the last one's id.
    lookups: u64,
}

/// What is known about one topic.
enum Known {
    /// A stream holds it: publishes wait for JetStream's acknowledgement.
    Stored,
    /// No stream held it at `checked`; `refresh` is the id of the lookup
    /// asking again, while one runs.
    NotStored {
        checked: Instant,
        refresh: Option<u64>,
    },
    /// Lookup `id`, the first, runs; publishers wait for its `answer`.
    Asking {
        id: u64,
        answer: watch::Receiver<Option<bool>>,
    },
}

impl StreamCache {
    fn lock(&self) -> MutexGuard<'_, CacheState> {
        self.0.lock_unpoisoned()
    }

    /// Records lookup `id`'s answer (`None`: unknown), unless something
    /// newer replaced what it was asked for (a stream created here, a
    /// publish that found the stream gone).
    fn settle(&self, topic: &str, id: u64, stored: Option<bool>) {
        let mut cache = self.lock();
        let ours = match cache.topics.get(topic) {
            Some(Known::Asking { id: asking, .. }) => *asking == id,
            Some(Known::NotStored { refresh, .. }) => *refresh == Some(id),
            _ => false,
        };
        if !ours {
            return;
        }
        match stored {
            Some(true) => {
                cache.topics.insert(topic.to_owned(), Known::Stored);
            }
            Some(false) => {
                let checked = Instant::now();
                let refresh = None;
                cache
                    .topics
                    .insert(topic.to_owned(), Known::NotStored { checked, refresh });
            }
            None => {
                cache.topics.remove(topic);
            }
        }
    }
}

/// One stream lookup in flight, settled exactly once.
struct Lookup {
    streams: Arc<StreamCache>,
    topic: String,
    id: u64,
    settled: bool,
}

impl Lookup {
    fn settle(&mut self, stored: Option<bool>) {
        self.settled = true;
        self.streams.settle(&self.topic, self.id, stored);
    }
}

impl Drop for Lookup {
    fn drop(&mut self) {
        if !self.settled {
            self.streams.settle(&self.topic, self.id, None);
        }
    }
}

/// A core subscription's deliveries: the async-nats subscriber itself, each
/// message turned into a [`Delivery`] as it is taken (no task, no second
/// buffer). When dropped, it hands the subscriber to its [`CoreStop`],
/// which unsubscribes it.
struct CoreDeliveries {
    subscriber: Option<async_nats::Subscriber>,
    park: Option<oneshot::Sender<async_nats::Subscriber>>,
}

impl Stream for CoreDeliveries {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        match self.subscriber.as_mut() {
            Some(subscriber) => subscriber
                .poll_next_unpin(cx)
                .map(|message| message.map(|message| Delivery::new(from_nats(&message)))),
            None => Poll::Ready(None),
        }
    }
}

impl Drop for CoreDeliveries {
    fn drop(&mut self) {
        if let (Some(subscriber), Some(park)) = (self.subscriber.take(), self.park.take()) {
            // Without a `CoreStop` to take it (the whole subscription was
            // dropped), the subscriber comes back and is dropped here, and
            // async-nats unsubscribes it in the background.
            let _ = park.send(subscriber);
        }
    }
}

/// Ends a core subscription: takes the subscriber back from its dropped
/// [`CoreDeliveries`] and unsubscribes it.
struct CoreStop {
    client: async_nats::Client,
    parked: oneshot::Receiver<async_nats::Subscriber>,
}

#[async_trait::async_trait]
impl Unsubscribe for CoreStop {
    async fn unsubscribe(self: Box<Self>) -> Result<(), BrokerError> {
        let CoreStop { client, parked } = *self;
        // `Subscription::unsubscribe` drops the deliveries first, which hand
        // the subscriber over at once.
        let Ok(mut subscriber) = parked.await else {
            return Ok(());
        };
        // Waits (bounded) for room in the client's queue, unlike a drop.
        match tokio::time::timeout(ROUND_TRIP, subscriber.unsubscribe()).await {
            Ok(Ok(())) => {}
            // A closed client has no subscription left to end.
            Ok(Err(_)) => return Ok(()),
            Err(_) => {
                return Err(BrokerError::Unavailable(format!(
                    "unsubscribing took longer than {ROUND_TRIP:?} (the NATS client is backed up)"
                )));
            }
        }
        drop(subscriber);
        // Confirmed only once the server has the UNSUB, so that nothing more
        // is routed to this member (of a queue group) afterwards. Without a
        // connection there is nothing to confirm: the client does not
        // restore an unsubscribed subscription when it reconnects.
        let _ = NatsBroker::round_trip(&client).await;
        Ok(())
    }
}

/// What a durable subscription's pump answers `unsubscribe` with.
type StopRequest = oneshot::Sender<Result<(), BrokerError>>;

/// Ends a durable subscription's pump: sends it a channel to answer on, or,
/// when dropped, just stops it.
struct DurableStop(Option<oneshot::Sender<StopRequest>>);

#[async_trait::async_trait]
impl Unsubscribe for DurableStop {
    async fn unsubscribe(mut self: Box<Self>) -> Result<(), BrokerError> {
        let Some(stop) = self.0.take() else {
            return Ok(());
        };
        let (done_tx, done_rx) = oneshot::channel();
        if stop.send(done_tx).is_err() {
            // The pump has ended, after confirming its acks.
            return Ok(());
        }
        // A pump that ends without answering has confirmed its acks too
        // (it noticed first that nobody takes deliveries any more).
        done_rx.await.unwrap_or(Ok(()))
    }
}

/// Moves a durable consumer's messages into a subscription, resuming after
/// errors (a server restart, a deleted consumer) until stopped.
struct DurablePump {
    broker: NatsBroker,
    durable: Durable,
    consumer: consumer::PullConsumer,
    tx: mpsc::Sender<Delivery>,
    /// What every delivery's acker shares.
    settle: Arc<Settle>,
}

/// Why a pump stops.
enum Stopped {
    /// `unsubscribe` asked, and waits for the answer.
    Unsubscribed(StopRequest),
    /// The subscription was dropped.
    Dropped,
    /// Nobody takes deliveries any more: the subscription is being dropped
    /// or unsubscribed.
    Unheard,
}

impl From<Result<StopRequest, oneshot::error::RecvError>> for Stopped {
    fn from(request: Result<StopRequest, oneshot::error::RecvError>) -> Self {
        match request {
            Ok(request) => Stopped::Unsubscribed(request),
            Err(_) => Stopped::Dropped,
        }
    }
}

/// What stopped a pump's inner loop.
enum Pumped {
    /// Time to stop.
    Stop(Stopped),
    /// The message stream failed or ended: get the consumer again.
    Resume,
}

impl DurablePump {
    async fn run(mut self, mut stop: oneshot::Receiver<StopRequest>) {
        let stopped = self.pump_until_stopped(&mut stop).await;
        // The acks (and nacks) of this subscription's deliveries went out on
        // this connection before this point, and the server handles one
        // connection's messages in order: once it answers a message sent
        // now, it has them all, and its consumer applies them long before
        // their ack wait could run out. Done when the subscription is just
        // dropped too, so that the acks leave this process even if the
        // client is dropped next.
        let confirmed = NatsBroker::round_trip(&self.broker.client)
            .await
            .and_then(|()| {
                // A reconnection since the subscription began may have lost
                // acks that were still in the client: the round trip on the
                // new connection says nothing about those.
                let connects = self
                    .broker
                    .client
                    .statistics()
                    .connects
                    .load(std::sync::atomic::Ordering::Relaxed);
                if connects == self.settle.connects {
                    Ok(())
                } else {
                    Err(BrokerError::Unavailable(
                        "the connection to NATS was re-established during the subscription".into(),
                    ))
                }
            })
            .map_err(|e| {
                BrokerError::Unavailable(format!(
                    "{:?}: durable `{}` on `{}`: cannot confirm that the server has the acks sent; \
                     their messages may be delivered again: {e}",
                    self.broker, self.settle.durable, self.settle.topic
                ))
            });
        let request = match stopped {
            Stopped::Unsubscribed(request) => Some(request),
            // An `unsubscribe` may be waiting already.
            Stopped::Unheard => stop.try_recv().ok(),
            Stopped::Dropped => None,
        };
        if let Some(request) = request {
            let _ = request.send(confirmed);
        }
    }

    async fn pump_until_stopped(&mut self, stop: &mut oneshot::Receiver<StopRequest>) -> Stopped {
        let mut backoff = Duration::from_millis(50);
        let mut fresh = true;
        loop {
            if !fresh {
                // The consumer (or its stream) may have been deleted.
                let recreated = tokio::select! {
                    request = &mut *stop => return request.into(),
                    consumer = self.broker.consumer(&self.settle.topic, &self.durable) => consumer,
                };
                match recreated {
                    Ok(consumer) => self.consumer = consumer,
                    Err(e) => {
                        tracing::warn!(topic = %self.settle.topic, error = %e, "durable consumer unavailable; retrying")
                    }
                }
            }
            fresh = false;
            let messages = tokio::select! {
                request = &mut *stop => return request.into(),
                messages = self.consumer.stream().max_messages_per_batch(DURABLE_BATCH).messages() => messages,
            };
            let pumped = match messages {
                Ok(messages) => self.pump(messages, stop, &mut backoff).await,
                Err(e) => {
                    tracing::warn!(topic = %self.settle.topic, error = %e, "durable consumer unavailable; retrying");
                    Pumped::Resume
                }
            };
            if let Pumped::Stop(stopped) = pumped {
                return stopped;
            }
            tokio::select! {
                request = &mut *stop => return request.into(),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn pump(
        &self,
        mut messages: consumer::pull::Stream,
        stop: &mut oneshot::Receiver<StopRequest>,
        backoff: &mut Duration,
    ) -> Pumped {
        loop {
            let next = tokio::select! {
                request = &mut *stop => return Pumped::Stop(request.into()),
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    *backoff = Duration::from_millis(50);
                    // Waiting for room in the buffer, but not past a stop.
                    tokio::select! {
                        request = &mut *stop => return Pumped::Stop(request.into()),
                        delivered = self.deliver(message) => if !delivered {
                            return Pumped::Stop(Stopped::Unheard);
                        },
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(topic = %self.settle.topic, error = %e, "durable consumer interrupted; resuming");
                    return Pumped::Resume;
                }
                None => return Pumped::Resume,
            }
        }
    }

    /// Hands one message to the subscriber; false once nobody listens.
    async fn deliver(&self, message: jetstream::Message) -> bool {
        let attempt = message
            .info()
            .map_or(1, |info| u32::try_from(info.delivered).unwrap_or(u32::MAX));
        let acker = Arc::new(JetStreamAck {
            message,
            attempt,
            settle: self.settle.clone(),
        });
        if attempt > self.settle.max_deliver {
            // The last attempt was never settled (its subscriber crashed),
            // or dead-lettering it failed: try (again) now.
            if let Err(e) = acker.dead_letter().await {
                tracing::warn!(topic = %self.settle.topic, error = %e, "cannot dead-letter a message; it will be delivered again");
                let _ = acker
                    .message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
            return true;
        }
        let delivery = Delivery::with_acker(from_nats(&acker.message.message), attempt, acker);
        self.tx.send(delivery).await.is_ok()
    }
}

/// What the ackers of one durable subscription's deliveries share.
struct Settle {
    topic: String,
    /// The topic's counters (dead letters).
    counted: lodestar::metrics::TopicMetrics,
    /// The durable's name.
    durable: String,
    max_deliver: u32,
    dead_letter: String,
    jetstream: jetstream::Context,
    /// The client's connection count when the subscription began: acks
    /// still in the client when a connection dropped were lost with it.
    connects: u64,
}

struct JetStreamAck {
    message: jetstream::Message,
    attempt: u32,
    settle: Arc<Settle>,
}

impl JetStreamAck {
    /// Copies the message to the dead-letter topic, then terminates it.
    async fn dead_letter(&self) -> Result<(), BrokerError> {
        let settle = &*self.settle;
        let mut headers = self.message.headers.clone().unwrap_or_default();
        headers.insert(header::DEAD_LETTER_TOPIC, settle.topic.as_str());
        headers.insert(
            header::DEAD_LETTER_ATTEMPTS,
            self.attempt.to_string().as_str(),
        );
        headers.insert(header::DEAD_LETTER_CONSUMER, settle.durable.as_str());
        // De-duplicated per message and consumer: another durable's dead
        // letter for the same message is its own.
        if let Ok(info) = self.message.info() {
            let id = format!(
                "dead-{}-{}-{}",
                info.stream, settle.durable, info.stream_sequence
            );
            headers.insert("Nats-Msg-Id", id.as_str());
        }
        settle
            .jetstream
            .publish_with_headers(
                settle.dead_letter.clone(),
                headers,
                self.message.payload.clone(),
            )
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        // Terminated only once the dead letter is stored: if this is lost,
        // the message comes back and is dead-lettered again (the same
        // message id, so JetStream keeps one copy).
        self.message
            .ack_with(AckKind::Term)
            .await
            .map_err(unavailable)?;
        settle.counted.dead_lettered().inc();
        Ok(())
    }
}

#[async_trait::async_trait]
impl Acker for JetStreamAck {
    async fn ack(&self) -> Result<(), BrokerError> {
        // A plain ack, not JetStream's confirmed "double" ack: that one
        // subscribes an inbox, waits for the server's answer and
        // unsubscribes, per message, which cost a durable subscriber two
        // thirds of its throughput and the server five times the CPU. At
        // least once does not need it: an ack lost on the way means a
        // redelivery after the ack wait. What it did guarantee, that a
        // subscriber which stopped cleanly leaves no handled message
        // behind, ending the subscription guarantees (`DurablePump::run`).
        self.message.ack().await.map_err(|e| {
            BrokerError::Unavailable(format!(
                "cannot ack a message on `{}`: {e}",
                self.settle.topic
            ))
        })
    }

    async fn nack(&self, delay: Duration) -> Result<(), BrokerError> {
        if self.attempt >= self.settle.max_deliver {
            match self.dead_letter().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // Keep the message: it comes back, and is dead-lettered
                    // on its next delivery.
                    tracing::warn!(topic = %self.settle.topic, error = %e, "cannot dead-letter a message; it will be delivered again");
                }
            }
        }
        let delay = (!delay.is_zero()).then_some(delay);
        self.message
            .ack_with(AckKind::Nak(delay))
            .await
            .map_err(unavailable)
    }
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

#[async_trait::async_trait]
impl Broker for NatsBroker {
    async fn publish(&self, message: Message) -> Result<(), BrokerError> {
        validate_message(&message)?;
        // The limit the server announced, which async-nats keeps at hand
        // (`server_info()` would copy the server's whole INFO per publish).
        let limit = self.client.max_payload();
        if limit > 0 && message.body.len() > limit {
            return Err(BrokerError::TooLarge {
                size: message.body.len(),
                limit,
            });
        }
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in &message.headers {
            headers.insert(name.as_str(), value.as_str());
        }
        let size = message.body.len();
        if self.stored(&message.topic).await {
            if let Some(id) = message.id() {
                headers.insert("Nats-Msg-Id", id);
            }
            use jetstream::context::PublishErrorKind as Kind;
            let topic = message.topic.clone();
            // No headers: a plain PUB, which the server parses for less
            // than an HPUB with an empty header block.
            let sent = if headers.is_empty() {
                self.jetstream.publish(message.topic, message.body).await
            } else {
                self.jetstream
                    .publish_with_headers(message.topic, headers, message.body)
                    .await
            };
            let acked = match sent {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            return match acked {
                Ok(_) => Ok(()),
                // No stream (any more): nothing stores the subject, and
                // whoever subscribes to it has had the message, as with a
                // core publish.
                Err(e) if e.kind() == Kind::StreamNotFound => {
                    self.forget(&topic);
                    Ok(())
                }
                Err(e) if e.kind() == Kind::MaxPayloadExceeded => Err(BrokerError::TooLarge {
                    size,
                    limit: self.client.max_payload(),
                }),
                Err(e) => {
                    if e.kind() == Kind::TimedOut {
                        self.forget(&topic);
                    }
                    Err(BrokerError::Unavailable(format!(
                        "{self:?}: not stored: {e}"
                    )))
                }
            };
        }
        let sent = if headers.is_empty() {
            self.client.publish(message.topic, message.body).await
        } else {
            self.client
                .publish_with_headers(message.topic, headers, message.body)
                .await
        };
        sent.map_err(|e| match e.kind() {
            async_nats::client::PublishErrorKind::MaxPayloadExceeded => BrokerError::TooLarge {
                size,
                limit: self.client.max_payload(),
            },
            _ => BrokerError::Unavailable(format!("{self:?}: {e}")),
        })
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, BrokerError> {
        validate_topic(topic)?;
        validate_options(&options)?;
        match options {
            SubscribeOptions {
                durable: Some(_),
                queue: Some(_),
            } => Err(BrokerError::Invalid(
                "a durable subscription shares its messages by durable name; leave queue unset"
                    .to_owned(),
            )),
            SubscribeOptions {
                durable: Some(durable),
                ..
            } => self.durable(topic, durable).await,
            SubscribeOptions { queue, .. } => self.core(topic, queue).await,
        }
    }

    async fn flush(&self) -> Result<(), BrokerError> {
        self.flush_client().await
    }
}

/// A lodestar message from a NATS one: the subject is the topic, headers
/// keep their names (first value of each).
fn from_nats(message: &async_nats::Message) -> Message {
    let mut headers = Headers::new();
    if let Some(map) = &message.headers {
        for (name, values) in map.iter() {
            if let Some(value) = values.first() {
                let name: &str = name.as_ref();
                headers.insert(name.to_owned(), value.as_str().to_owned());
            }
        }
    }
    Message {
        topic: message.subject.as_str().to_owned(),
        headers,
        body: message.payload.clone(),
    }
}

/// The JetStream stream for `topic`: `LODESTAR_` + the topic with `.` as `_`
/// + a hash of the exact topic, so that `a.b` and `a_b` differ.
fn stream_name(topic: &str) -> String {
    // FNV-1a: stable across builds and platforms.
    let hash = topic.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("LODESTAR_{}_{:08x}", topic.replace('.', "_"), hash as u32)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn a_bad_address_in_a_url_with_credentials_is_not_shown() {
        let error = servers("nats://ops:pa,ss@h:4222").unwrap_err().to_string();
        assert!(!error.contains("pa") && !error.contains("ops"), "{error}");
        assert!(error.contains("not host:port"), "{error}");
        let error = servers("nats://h:4222,nohost").unwrap_err().to_string();
        assert!(error.contains("`nohost`"), "{error}");
    }

    #[test]
    fn stream_names_are_valid_and_distinct() {
        let a = stream_name("a.b");
        let b = stream_name("a_b");
        assert_ne!(a, b);
        assert!(a.starts_with("LODESTAR_a_b_"));
        assert!(!a.contains('.'));
    }

    /// A nats-server with JetStream on a free loopback port, killed (and its
    /// store removed) when dropped.
    struct Server {
        url: String,
        store: std::path::PathBuf,
        child: std::process::Child,
    }

    impl Server {
        async fn start() -> Server {
            let binary = std::env::var("LODESTAR_NATS_SERVER").unwrap_or_else(|_| {
                ["nats-server", "/usr/sbin/nats-server"]
                    .into_iter()
                    .find(|b| {
                        std::process::Command::new(b)
                            .arg("--version")
                            .output()
                            .is_ok_and(|o| o.status.success())
                    })
                    .expect("nats-server (Debian: apt-get install nats-server)")
                    .to_owned()
            });
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let store = std::env::temp_dir().join(format!(
                "lodestar-broker-nats-{}-{port}-{:x}",
                std::process::id(),
                fastrand::u64(..)
            ));
            let child = std::process::Command::new(binary)
                .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
                .arg(&store)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            bounded("nats-server to accept connections", async {
                while tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_err()
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            Server {
                url: format!("nats://127.0.0.1:{port}"),
                store,
                child,
            }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.store);
        }
    }

    async fn bounded<F: std::future::Future>(what: &str, future: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    fn lookups(broker: &NatsBroker) -> u64 {
        broker.streams.lock().lookups
    }

    /// Makes the "no stream" answer for `topic` old enough to be checked again.
    fn age(broker: &NatsBroker, topic: &str) {
        match broker.streams.lock().topics.get_mut(topic) {
            Some(Known::NotStored { checked, .. }) => {
                *checked = checked.checked_sub(NEGATIVE_STREAM_CACHE).unwrap();
            }
            _ => panic!("`{topic}` is not known to have no stream"),
        }
    }

    /// Waits until the background lookup for `topic` has answered.
    async fn refreshed(broker: &NatsBroker, topic: &str) {
        bounded("the background lookup", async {
            while matches!(
                broker.streams.lock().topics.get(topic),
                Some(Known::NotStored {
                    refresh: Some(_),
                    ..
                })
            ) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_publishers_share_one_stream_lookup_and_refresh_in_the_background() {
        let server = Server::start().await;
        let broker = NatsBroker::connect(&server.url).await.unwrap();
        let publish_all = |n: usize| {
            let broker = broker.clone();
            async move {
                let publishes = (0..n).map(|i| {
                    let broker = broker.clone();
                    async move {
                        broker
                            .publish(Message::new("cache.core", i.to_string()))
                            .await
                    }
                });
                for published in futures_util::future::join_all(publishes).await {
                    published.unwrap();
                }
            }
        };
        // The first publishers to a topic all wait for one lookup.
        bounded("16 publishes", publish_all(16)).await;
        assert_eq!(lookups(&broker), 1);
        bounded("16 publishes", publish_all(16)).await;
        assert_eq!(lookups(&broker), 1, "a fresh answer was asked again");

        // Once the answer is old, one lookup checks it again, in the
        // background: the publishes meanwhile are core ones.
        age(&broker, "cache.core");
        bounded("16 publishes", publish_all(16)).await;
        assert_eq!(lookups(&broker), 2);
        refreshed(&broker, "cache.core").await;

        // A stream created since (by someone else) is found by the next
        // check, and from then on publishes wait for JetStream to store.
        let plain = jetstream::new(async_nats::connect(&server.url).await.unwrap());
        plain
            .create_stream(stream::Config {
                name: "ELSEWHERE".to_owned(),
                subjects: vec!["cache.core".to_owned()],
                ..stream::Config::default()
            })
            .await
            .unwrap();
        age(&broker, "cache.core");
        bounded("a publish", publish_all(1)).await;
        refreshed(&broker, "cache.core").await;
        assert!(matches!(
            broker.streams.lock().topics.get("cache.core"),
            Some(Known::Stored)
        ));
        bounded("a stored publish", publish_all(1)).await;
        let mut stream = plain.get_stream("ELSEWHERE").await.unwrap();
        // The first publish after the check went through JetStream, so it
        // is stored by the time `publish` returned.
        assert!(stream.info().await.unwrap().state.messages >= 1);

        // The stream deleted: a publish finds it gone, and the next asks.
        plain.delete_stream("ELSEWHERE").await.unwrap();
        bounded("a publish without the stream", publish_all(1)).await;
        bounded("a publish without the stream", publish_all(1)).await;
        assert!(matches!(
            broker.streams.lock().topics.get("cache.core"),
            Some(Known::NotStored { .. })
        ));
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server process.
    fn signal(server: &Server, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(server.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unsubscribing_a_durable_waits_until_the_server_has_its_acks() {
        let server = Server::start().await;
        let publisher = NatsBroker::connect(&server.url).await.unwrap();
        let subscriber = NatsBroker::connect(&server.url).await.unwrap();
        let ack_wait = Duration::from_secs(2);
        let options = SubscribeOptions::durable(Durable::new("drained").ack_wait(ack_wait));
        let mut subscription = bounded(
            "a durable subscription",
            subscriber.subscribe("js.drained", options.clone()),
        )
        .await
        .unwrap();
        for i in 0..50 {
            let message = Message::new("js.drained", i.to_string());
            bounded("a publish", publisher.publish(message))
                .await
                .unwrap();
        }
        let mut deliveries = Vec::new();
        for _ in 0..50 {
            deliveries.push(bounded("a delivery", subscription.next()).await.unwrap());
        }
        // The server stops reading, and enough goes out on the subscriber's
        // connection before the acks to fill the socket: the acks wait in
        // the client.
        signal(&server, "STOP");
        let junk = Bytes::from(vec![0u8; 900 * 1024]);
        for _ in 0..32 {
            subscriber
                .client()
                .publish("junk", junk.clone())
                .await
                .unwrap();
        }
        for delivery in &deliveries {
            delivery.ack().await.unwrap();
        }
        let mut unsubscribed = tokio::spawn(subscription.unsubscribe());
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut unsubscribed)
                .await
                .is_err(),
            "unsubscribe returned while the server could not have the acks"
        );
        signal(&server, "CONT");
        bounded("unsubscribe", unsubscribed).await.unwrap().unwrap();
        // The connection closes at once, with nothing left to send.
        drop(deliveries);
        drop(subscriber);

        // Nothing acked comes back, even after the ack wait.
        let subscriber = NatsBroker::connect(&server.url).await.unwrap();
        let mut subscription = bounded(
            "a durable subscription",
            subscriber.subscribe("js.drained", options),
        )
        .await
        .unwrap();
        let redelivered =
            tokio::time::timeout(ack_wait + Duration::from_millis(500), subscription.next()).await;
        assert!(
            redelivered.is_err(),
            "an acked message came back: {redelivered:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_core_subscription_unsubscribes_with_a_full_client_buffer() {
        let server = Server::start().await;
        let publisher = NatsBroker::connect(&server.url).await.unwrap();
        let subscriber = NatsBroker::connect(&server.url).await.unwrap();
        let mut subscription = subscriber
            .subscribe("core.backlog", SubscribeOptions::queue("g"))
            .await
            .unwrap();
        for i in 0..2000 {
            publisher
                .publish(Message::new("core.backlog", i.to_string()))
                .await
                .unwrap();
        }
        publisher.flush().await.unwrap();
        let first = bounded("a delivery", subscription.next()).await.unwrap();
        assert_eq!(first.message.body, "0");
        bounded("unsubscribe", subscription.unsubscribe())
            .await
            .unwrap();
        // The group has no member left: another one gets what follows.
        let mut next = subscriber
            .subscribe("core.backlog", SubscribeOptions::queue("g"))
            .await
            .unwrap();
        publisher
            .publish(Message::new("core.backlog", "after"))
            .await
            .unwrap();
        let delivery = bounded("the new member", next.next()).await.unwrap();
        assert_eq!(delivery.message.body, "after");
    }
}
