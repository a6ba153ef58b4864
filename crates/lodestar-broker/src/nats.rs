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
//!   with [`header::DEAD_LETTER_TOPIC`] and
//!   [`header::DEAD_LETTER_ATTEMPTS`],
//!   and terminated. The consumer allows one delivery more than
//!   `max_deliver` so that a subscriber that crashed on the last attempt
//!   does not lose the message: the extra delivery goes straight to the
//!   dead-letter topic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::{Broker, BrokerError, Delivery, Durable, Message, SubscribeOptions, Subscription};
use lodestar::broker::{
    Acker, Headers, Unsubscribe, header, validate_message, validate_options, validate_topic,
};

/// How long a "no stream holds this topic" answer is trusted.
const NEGATIVE_STREAM_CACHE: Duration = Duration::from_secs(2);
/// How many deliveries a subscription buffers before NATS waits for it.
const BUFFER: usize = 256;

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
            BrokerError::Invalid(format!("`{url}`: expected nats://host:port[,host:port]"))
        })?;
        let mut servers = Vec::new();
        for host in hosts.split(',').map(str::trim) {
            let valid = host
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(BrokerError::Invalid(format!(
                    "`{host}` in `{url}` is not host:port"
                )));
            }
            let address: async_nats::ServerAddr = format!("nats://{host}")
                .parse()
                .map_err(|e| BrokerError::Invalid(format!("`{host}`: {e}")))?;
            servers.push(address);
        }
        let client = async_nats::ConnectOptions::new()
            .name("lodestar")
            .connection_timeout(Duration::from_secs(5))
            .connect(servers)
            .await
            .map_err(|e| BrokerError::Unavailable(format!("cannot connect to {url}: {e}")))?;
        Ok(Self {
            jetstream: jetstream::new(client.clone()),
            client,
            servers: hosts.to_owned(),
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
        let stored = self.jetstream.stream_by_subject(topic).await.is_ok();
        self.remember(topic, stored);
        stored
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

    async fn durable(&self, topic: &str, durable: Durable) -> Result<Subscription, BrokerError> {
        let stream = self.ensure_stream(topic).await?;
        let dead_letter = durable.dead_letter_topic(topic);
        validate_topic(&dead_letter)?;
        self.ensure_stream(&dead_letter).await?;
        let max_deliver = i64::from(durable.max_deliver);
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &durable.name,
                consumer::pull::Config {
                    durable_name: Some(durable.name.clone()),
                    filter_subject: topic.to_owned(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: durable.ack_wait,
                    // One more than asked: see the module docs.
                    max_deliver: max_deliver + 1,
                    ..consumer::pull::Config::default()
                },
            )
            .await
            .map_err(|e| {
                BrokerError::Unavailable(format!(
                    "{self:?}: durable consumer `{}` on `{topic}`: {e}",
                    durable.name
                ))
            })?;
        let (tx, rx) = mpsc::channel(BUFFER);
        let (stop_tx, stop_rx) = oneshot::channel::<oneshot::Sender<()>>();
        let pump = DurablePump {
            broker: self.clone(),
            topic: topic.to_owned(),
            dead_letter,
            max_deliver: durable.max_deliver,
            consumer,
            tx,
        };
        tokio::spawn(pump.run(stop_rx));
        Ok(Subscription::new(
            topic,
            receiver_stream(rx),
            Stop(Some(stop_tx)),
        ))
    }

    async fn core(&self, topic: &str, queue: Option<String>) -> Result<Subscription, BrokerError> {
        let subscriber = match queue {
            Some(queue) => self.client.queue_subscribe(topic.to_owned(), queue).await,
            None => self.client.subscribe(topic.to_owned()).await,
        }
        .map_err(|e| BrokerError::Unavailable(format!("{self:?}: subscribe to `{topic}`: {e}")))?;
        // Make sure the server has the subscription before returning, so a
        // publish that follows is received.
        self.flush_client().await?;
        let (tx, rx) = mpsc::channel(BUFFER);
        let (stop_tx, mut stop_rx) = oneshot::channel::<oneshot::Sender<()>>();
        tokio::spawn(async move {
            let mut subscriber = subscriber;
            loop {
                tokio::select! {
                    stop = &mut stop_rx => {
                        let _ = subscriber.unsubscribe().await;
                        if let Ok(done) = stop {
                            let _ = done.send(());
                        }
                        return;
                    }
                    message = subscriber.next() => {
                        let Some(message) = message else { return };
                        if tx.send(Delivery::new(from_nats(message))).await.is_err() {
                            let _ = subscriber.unsubscribe().await;
                            return;
                        }
                    }
                }
            }
        });
        Ok(Subscription::new(
            topic,
            receiver_stream(rx),
            Stop(Some(stop_tx)),
        ))
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
/// errors (a server restart, say) until stopped.
struct DurablePump {
    broker: NatsBroker,
    topic: String,
    dead_letter: String,
    max_deliver: u32,
    consumer: consumer::PullConsumer,
    tx: mpsc::Sender<Delivery>,
}

impl DurablePump {
    async fn run(self, mut stop: oneshot::Receiver<oneshot::Sender<()>>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let messages = tokio::select! {
                done = &mut stop => { if let Ok(done) = done { let _ = done.send(()); } return; }
                messages = self.consumer.messages() => messages,
            };
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "durable consumer unavailable; retrying");
                    tokio::select! {
                        done = &mut stop => { if let Ok(done) = done { let _ = done.send(()); } return; }
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    done = &mut stop => { if let Ok(done) = done { let _ = done.send(()); } return; }
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => {
                        backoff = Duration::from_millis(50);
                        if !self.deliver(message).await {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        // Heartbeats missed, server gone: async-nats keeps
                        // the stream going where it can; log and carry on.
                        tracing::debug!(topic = %self.topic, error = %e, "durable consumer hiccup");
                    }
                    None => break,
                }
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
            max_deliver: self.max_deliver,
            dead_letter: self.dead_letter.clone(),
            topic: self.topic.clone(),
            jetstream: self.broker.jetstream.clone(),
        });
        if attempt > self.max_deliver {
            // The last attempt was never settled (its subscriber crashed).
            if let Err(e) = acker.dead_letter().await {
                tracing::warn!(topic = %self.topic, error = %e, "cannot dead-letter a message");
            }
            return true;
        }
        let delivery =
            Delivery::with_acker(from_nats(acker.message.message.clone()), attempt, acker);
        self.tx.send(delivery).await.is_ok()
    }
}

struct JetStreamAck {
    message: jetstream::Message,
    attempt: u32,
    max_deliver: u32,
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
            return self.dead_letter().await;
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
        if self.stored(&message.topic).await {
            if let Some(id) = message.id() {
                headers.insert("Nats-Msg-Id", id);
            }
            self.jetstream
                .publish_with_headers(message.topic, headers, message.body)
                .await
                .map_err(unavailable)?
                .await
                .map_err(|e| BrokerError::Unavailable(format!("{self:?}: not stored: {e}")))?;
            return Ok(());
        }
        self.client
            .publish_with_headers(message.topic, headers, message.body)
            .await
            .map_err(|e| BrokerError::Unavailable(format!("{self:?}: {e}")))
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

fn receiver_stream(
    mut rx: mpsc::Receiver<Delivery>,
) -> impl futures_util::Stream<Item = Delivery> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
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
