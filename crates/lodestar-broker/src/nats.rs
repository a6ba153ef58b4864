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
//! * A durable subscription pulls 16 messages at a time and buffers 8, since
//!   the ack wait runs while a message waits; a handler must finish within
//!   the ack wait. A consumer or stream deleted under a subscription is
//!   created again, and resubscribing with a new ack wait updates it.
//! * Streams keep messages without limit (JetStream's defaults); set limits
//!   on them with NATS's own tools. A new durable name starts from the
//!   beginning of its stream.
//!

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::{Broker, BrokerError, Delivery, Durable, Message, SubscribeOptions, Subscription};
use lodestar::broker::{
    Acker, Headers, Unsubscribe, header, validate_message, validate_options, validate_topic,
};

/// How long a "no stream holds this topic" answer is trusted.
const NEGATIVE_STREAM_CACHE: Duration = Duration::from_secs(2);
/// How long a round trip to the server may take.
const ROUND_TRIP: Duration = Duration::from_secs(5);
/// How many deliveries a core subscription buffers before NATS waits for it.
const BUFFER: usize = 256;
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
    /// Topic → whether a JetStream stream holds it (and when we asked).
    streams: Arc<Mutex<HashMap<String, (bool, Instant)>>>,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nats://{}", self.servers)
    }
}

impl NatsBroker {
    /// Connects to `nats://host:port[,host:port…]`. The client reconnects
    /// on its own after a server restart; this call fails if no server can
    /// be reached now.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let hosts = url.strip_prefix("nats://").ok_or_else(|| {
            BrokerError::Invalid("expected nats://[user:password@]host:port[,host:port]".to_owned())
        })?;
        // What errors and Debug show: the hosts without any credentials.
        let shown: Vec<&str> = hosts
            .split(',')
            .map(|h| h.trim().rsplit_once('@').map_or(h.trim(), |(_, host)| host))
            .collect();
        let shown = shown.join(",");
        lodestar::parse_host_ports(&shown).map_err(BrokerError::Invalid)?;
        let mut servers = Vec::new();
        for (host, bare) in hosts.split(',').map(str::trim).zip(shown.split(',')) {
            let address: async_nats::ServerAddr = format!("nats://{host}")
                .parse()
                .map_err(|e| BrokerError::Invalid(format!("`{bare}`: {e}")))?;
            servers.push(address);
        }
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
        })
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
    /// so far (a SUB, an UNSUB). async-nats's `flush` only waits for the
    /// bytes to leave; the server handles one connection's operations in
    /// order, so a message to ourselves coming back is the proof.
    async fn round_trip(client: &async_nats::Client) -> Result<(), BrokerError> {
        let inbox = client.new_inbox();
        let mut echo = client.subscribe(inbox.clone()).await.map_err(unavailable)?;
        client
            .publish(inbox, Bytes::new())
            .await
            .map_err(unavailable)?;
        let answered = tokio::time::timeout(ROUND_TRIP, echo.next()).await;
        let _ = echo.unsubscribe().await;
        match answered {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(BrokerError::Closed),
            Err(_) => Err(BrokerError::Unavailable(format!(
                "the NATS server did not answer within {ROUND_TRIP:?}"
            ))),
        }
    }

    /// Whether a JetStream stream holds `topic` (cached).
    async fn stored(&self, topic: &str) -> bool {
        let cached = self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .copied();
        match cached {
            Some((true, _)) => return true,
            Some((false, at)) if at.elapsed() < NEGATIVE_STREAM_CACHE => return false,
            _ => {}
        }
        match self.jetstream.stream_by_subject(topic).await {
            Ok(_) => {
                self.remember(topic, true);
                true
            }
            Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {
                self.remember(topic, false);
                false
            }
            // Unknown: publish through JetStream, whose answer says.
            Err(_) => true,
        }
    }

    fn forget(&self, topic: &str) {
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(topic);
    }

    fn remember(&self, topic: &str, stored: bool) {
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_owned(), (stored, Instant::now()));
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
        self.remember(topic, true);
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
        let (stop_tx, stop_rx) = oneshot::channel::<oneshot::Sender<()>>();
        let pump = DurablePump {
            broker: self.clone(),
            topic: topic.to_owned(),
            dead_letter,
            durable,
            consumer,
            tx,
        };
        tokio::spawn(pump.run(stop_rx));
        Ok(Subscription::from_channel(topic, rx, Stop(Some(stop_tx))))
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
        let (tx, rx) = mpsc::channel(BUFFER);
        let (stop_tx, mut stop_rx) = oneshot::channel::<oneshot::Sender<()>>();
        let client = self.client.clone();
        tokio::spawn(async move {
            let mut subscriber = subscriber;
            let stop = loop {
                let message = tokio::select! {
                    stop = &mut stop_rx => break stop.ok(),
                    message = subscriber.next() => message,
                };
                let Some(message) = message else { return };
                // Waiting for room in the buffer, but not past a stop.
                tokio::select! {
                    stop = &mut stop_rx => break stop.ok(),
                    sent = tx.send(Delivery::new(from_nats(message))) => if sent.is_err() { break None },
                }
            };
            let _ = subscriber.unsubscribe().await;
            if let Some(done) = stop {
                // Confirmed only once the server has the UNSUB, so that
                // nothing more is routed to this member afterwards.
                let _ = NatsBroker::round_trip(&client).await;
                let _ = done.send(());
            }
        });
        Ok(Subscription::from_channel(topic, rx, Stop(Some(stop_tx))))
    }
}

/// Ends a subscription's task: sends it a channel to confirm on, or, when
/// dropped, just stops it.
struct Stop(Option<oneshot::Sender<oneshot::Sender<()>>>);

#[async_trait::async_trait]
impl Unsubscribe for Stop {
    async fn unsubscribe(mut self: Box<Self>) -> Result<(), BrokerError> {
        let Some(stop) = self.0.take() else {
            return Ok(());
        };
        let (done_tx, done_rx) = oneshot::channel();
        if stop.send(done_tx).is_ok() {
            // The task may already have ended, which is as good.
            let _ = done_rx.await;
        }
        Ok(())
    }
}

/// Moves a durable consumer's messages into a subscription, resuming after
/// errors (a server restart, a deleted consumer) until stopped.
struct DurablePump {
    broker: NatsBroker,
    topic: String,
    dead_letter: String,
    durable: Durable,
    consumer: consumer::PullConsumer,
    tx: mpsc::Sender<Delivery>,
}

/// What stopped a pump's inner loop.
enum Pumped {
    /// Told to stop, or nobody listens any more.
    Stop,
    /// The message stream failed or ended: get the consumer again.
    Resume,
}

impl DurablePump {
    async fn run(mut self, mut stop: oneshot::Receiver<oneshot::Sender<()>>) {
        let mut backoff = Duration::from_millis(50);
        let mut fresh = true;
        loop {
            if !fresh {
                // The consumer (or its stream) may have been deleted.
                let recreated = tokio::select! {
                    done = &mut stop => return confirm(done),
                    consumer = self.broker.consumer(&self.topic, &self.durable) => consumer,
                };
                match recreated {
                    Ok(consumer) => self.consumer = consumer,
                    Err(e) => {
                        tracing::warn!(topic = %self.topic, error = %e, "durable consumer unavailable; retrying")
                    }
                }
            }
            fresh = false;
            let messages = tokio::select! {
                done = &mut stop => return confirm(done),
                messages = self.consumer.stream().max_messages_per_batch(DURABLE_BATCH).messages() => messages,
            };
            let pumped = match messages {
                Ok(messages) => self.pump(messages, &mut stop, &mut backoff).await,
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "durable consumer unavailable; retrying");
                    Pumped::Resume
                }
            };
            if let Pumped::Stop = pumped {
                return;
            }
            tokio::select! {
                done = &mut stop => return confirm(done),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn pump(
        &self,
        mut messages: consumer::pull::Stream,
        stop: &mut oneshot::Receiver<oneshot::Sender<()>>,
        backoff: &mut Duration,
    ) -> Pumped {
        loop {
            let next = tokio::select! {
                done = &mut *stop => { confirm(done); return Pumped::Stop; }
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    *backoff = Duration::from_millis(50);
                    // Waiting for room in the buffer, but not past a stop.
                    tokio::select! {
                        done = &mut *stop => { confirm(done); return Pumped::Stop; }
                        delivered = self.deliver(message) => if !delivered { return Pumped::Stop; },
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(topic = %self.topic, error = %e, "durable consumer interrupted; resuming");
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
            max_deliver: self.durable.max_deliver,
            durable: self.durable.name.clone(),
            dead_letter: self.dead_letter.clone(),
            topic: self.topic.clone(),
            jetstream: self.broker.jetstream.clone(),
        });
        if attempt > self.durable.max_deliver {
            // The last attempt was never settled (its subscriber crashed),
            // or dead-lettering it failed: try (again) now.
            if let Err(e) = acker.dead_letter().await {
                tracing::warn!(topic = %self.topic, error = %e, "cannot dead-letter a message; it will be delivered again");
                let _ = acker
                    .message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
            return true;
        }
        let delivery =
            Delivery::with_acker(from_nats(acker.message.message.clone()), attempt, acker);
        self.tx.send(delivery).await.is_ok()
    }
}

/// Confirms a stop request, if it was one (not a dropped handle).
fn confirm(done: Result<oneshot::Sender<()>, oneshot::error::RecvError>) {
    if let Ok(done) = done {
        let _ = done.send(());
    }
}

struct JetStreamAck {
    message: jetstream::Message,
    attempt: u32,
    max_deliver: u32,
    durable: String,
    dead_letter: String,
    topic: String,
    jetstream: jetstream::Context,
}

impl JetStreamAck {
    /// Copies the message to the dead-letter topic, then terminates it.
    async fn dead_letter(&self) -> Result<(), BrokerError> {
        let mut headers = self.message.headers.clone().unwrap_or_default();
        headers.insert(header::DEAD_LETTER_TOPIC, self.topic.as_str());
        headers.insert(
            header::DEAD_LETTER_ATTEMPTS,
            self.attempt.to_string().as_str(),
        );
        headers.insert(header::DEAD_LETTER_CONSUMER, self.durable.as_str());
        // De-duplicated per message and consumer: another durable's dead
        // letter for the same message is its own.
        if let Ok(info) = self.message.info() {
            let id = format!(
                "dead-{}-{}-{}",
                info.stream, self.durable, info.stream_sequence
            );
            headers.insert("Nats-Msg-Id", id.as_str());
        }
        self.jetstream
            .publish_with_headers(
                self.dead_letter.clone(),
                headers,
                self.message.payload.clone(),
            )
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        self.message
            .ack_with(AckKind::Term)
            .await
            .map_err(unavailable)
    }
}

#[async_trait::async_trait]
impl Acker for JetStreamAck {
    async fn ack(&self) -> Result<(), BrokerError> {
        // A double ack: JetStream confirms it, so an ack lost on the way is
        // an error here rather than a silent redelivery later.
        self.message.double_ack().await.map_err(unavailable)
    }

    async fn nack(&self, delay: Duration) -> Result<(), BrokerError> {
        if self.attempt >= self.max_deliver {
            match self.dead_letter().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // Keep the message: it comes back, and is dead-lettered
                    // on its next delivery.
                    tracing::warn!(topic = %self.topic, error = %e, "cannot dead-letter a message; it will be delivered again");
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
        let limit = self.client.server_info().max_payload;
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
            let acked = match self
                .jetstream
                .publish_with_headers(message.topic, headers, message.body)
                .await
            {
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
                    limit: self.client.server_info().max_payload,
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
        self.client
            .publish_with_headers(message.topic, headers, message.body)
            .await
            .map_err(|e| match e.kind() {
                async_nats::client::PublishErrorKind::MaxPayloadExceeded => BrokerError::TooLarge {
                    size,
                    limit: self.client.server_info().max_payload,
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
fn from_nats(message: async_nats::Message) -> Message {
    let mut headers = Headers::new();
    if let Some(map) = &message.headers {
        for (name, values) in map.iter() {
            if let Some(value) = values.first() {
                headers.insert(name.to_string(), value.to_string());
            }
        }
    }
    Message {
        topic: message.subject.to_string(),
        headers,
        body: message.payload,
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
    use super::*;

    #[test]
    fn stream_names_are_valid_and_distinct() {
        let a = stream_name("a.b");
        let b = stream_name("a_b");
        assert_ne!(a, b);
        assert!(a.starts_with("LODESTAR_a_b_"));
        assert!(!a.contains('.'));
    }
}
