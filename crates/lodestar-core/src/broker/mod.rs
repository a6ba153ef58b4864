//! Events: publish a message on a topic, and whoever subscribed gets it.
//!
//! # Delivery
//!
//! A [`Message`] is a topic, string headers and a body of bytes. A
//! subscription either *broadcasts* (every subscriber gets every message)
//! or joins a *queue group* (each message goes to one member of the group;
//! different groups each get their own copy). Messages from one publisher
//! arrive in the order they were published.
//!
//! Plain subscriptions are *at most once*: a subscriber that is not there
//! when a message is published does not get it. *Durable* subscriptions
//! ([`SubscribeOptions::durable`], NATS JetStream) are *at least once*: each
//! [`Delivery`] must be [acked](Delivery::ack); one that is nacked, or not
//! acked in time, is delivered again, up to a limit, after which it goes to
//! a dead-letter topic.
//!
//! # Headers
//!
//! lodestar's publishers set [`header::CONTENT_TYPE`], [`header::MESSAGE_ID`]
//! and, inside a traced call, [`header::TRACEPARENT`], so that plain clients
//! of the backend can read what lodestar publishes.
//!
//! # Backends
//!
//! [`MemoryBroker`](crate::MemoryBroker) lives inside one process. The HTTP
//! broker (found through the registry) and NATS implement the same trait in
//! `lodestar-broker`.

pub mod memory;

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;

/// Header names lodestar sets on the messages it publishes.
pub mod header {
    /// The body's media type, e.g. `application/protobuf` or `application/json`.
    pub const CONTENT_TYPE: &str = "content-type";
    /// A unique id per message; JetStream also de-duplicates on it.
    pub const MESSAGE_ID: &str = "message-id";
    /// W3C trace context of the publishing span.
    pub const TRACEPARENT: &str = "traceparent";
    /// On a dead-lettered message: the topic it was first published to.
    pub const DEAD_LETTER_TOPIC: &str = "dead-letter-topic";
    /// On a dead-lettered message: how many times it was delivered.
    pub const DEAD_LETTER_ATTEMPTS: &str = "dead-letter-attempts";
    /// On a dead-lettered message: the durable subscription that gave up.
    pub const DEAD_LETTER_CONSUMER: &str = "dead-letter-consumer";
}

/// Message headers: names are lowercase by convention.
pub type Headers = BTreeMap<String, String>;

/// One event: a topic, headers and an opaque body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Where it is published, e.g. `orders.created`.
    pub topic: String,
    /// String headers, see [`header`].
    pub headers: Headers,
    /// The payload.
    pub body: Bytes,
}

impl Message {
    /// A message on `topic` with `body` and no headers.
    ///
    /// ```
    /// use lodestar_core::broker::{Message, header};
    /// let message = Message::new("orders.created", "{\"id\":7}")
    ///     .with_header(header::CONTENT_TYPE, "application/json");
    /// assert_eq!(message.header("content-type"), Some("application/json"));
    /// ```
    pub fn new(topic: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            headers: Headers::new(),
            body: body.into(),
        }
    }

    /// Sets a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The [`header::MESSAGE_ID`], if set.
    pub fn id(&self) -> Option<&str> {
        self.header(header::MESSAGE_ID)
    }
}

/// Why a broker operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// A topic, queue group or option that cannot be used.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The broker cannot be reached or refused for a transient reason.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// A queue group exists for the topic but none of its members could take
    /// the message (HTTP broker).
    #[error("no subscriber of queue group `{queue}` could take a message on `{topic}`: {reason}")]
    NoSubscriber {
        /// The topic.
        topic: String,
        /// The queue group.
        queue: String,
        /// What the members said.
        reason: String,
    },
    /// The message is larger than the backend accepts.
    #[error("message of {size} bytes exceeds the broker's limit of {limit}")]
    TooLarge {
        /// The body's size.
        size: usize,
        /// The backend's limit.
        limit: usize,
    },
    /// The backend does not offer this (e.g. durable subscriptions in memory).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The subscription or broker was closed.
    #[error("closed")]
    Closed,
}

/// A durable, at-least-once subscription (NATS JetStream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durable {
    /// The consumer's name; subscribers with the same name share its
    /// progress (and its messages, like a queue group), across restarts.
    pub name: String,
    /// How long a delivery may stay unacked before it is delivered again.
    pub ack_wait: Duration,
    /// How many times a message is delivered before it is dead-lettered.
    pub max_deliver: u32,
    /// Where messages go after `max_deliver` attempts; default
    /// `dead.{topic}`.
    pub dead_letter: Option<String>,
}

impl Durable {
    /// A durable consumer with a 30s ack wait, 5 deliveries and the default
    /// dead-letter topic.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            dead_letter: None,
        }
    }

    /// Sets how long a delivery may stay unacked.
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// Sets how many deliveries a message gets before it is dead-lettered.
    pub fn max_deliver(mut self, attempts: u32) -> Self {
        self.max_deliver = attempts;
        self
    }

    /// Sets the dead-letter topic.
    pub fn dead_letter(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter = Some(topic.into());
        self
    }

    /// The dead-letter topic for messages on `topic`.
    pub fn dead_letter_topic(&self, topic: &str) -> String {
        self.dead_letter
            .clone()
            .unwrap_or_else(|| format!("dead.{topic}"))
    }
}

/// How to subscribe: broadcast (the default), a queue group, or durable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Join this queue group: each message goes to one of its members.
    pub queue: Option<String>,
    /// Subscribe durably, at least once.
    pub durable: Option<Durable>,
}

impl SubscribeOptions {
    /// Every subscriber gets every message.
    pub fn broadcast() -> Self {
        Self::default()
    }

    /// Each message goes to one member of `group`.
    pub fn queue(group: impl Into<String>) -> Self {
        Self {
            queue: Some(group.into()),
            durable: None,
        }
    }

    /// A durable, at-least-once subscription.
    pub fn durable(durable: Durable) -> Self {
        Self {
            queue: None,
            durable: Some(durable),
        }
    }
}

/// Settles an at-least-once delivery with its backend.
#[async_trait::async_trait]
pub trait Acker: Send + Sync {
    /// The message was handled; do not deliver it again.
    async fn ack(&self) -> Result<(), BrokerError>;
    /// The message was not handled; deliver it again after `delay`.
    async fn nack(&self, delay: Duration) -> Result<(), BrokerError>;
}

/// A message as a subscriber receives it.
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// Which delivery of this message this is, from 1.
    pub attempt: u32,
    acker: Option<Arc<dyn Acker>>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("attempt", &self.attempt)
            .field("acked", &self.acker.is_some())
            .finish()
    }
}

impl Delivery {
    /// An at-most-once delivery: there is nothing to ack.
    pub fn new(message: Message) -> Self {
        Self {
            message,
            attempt: 1,
            acker: None,
        }
    }

    /// An at-least-once delivery settled through `acker`.
    pub fn with_acker(message: Message, attempt: u32, acker: Arc<dyn Acker>) -> Self {
        Self {
            message,
            attempt,
            acker: Some(acker),
        }
    }

    /// Whether this delivery must be acked (it comes from a durable subscription).
    pub fn needs_ack(&self) -> bool {
        self.acker.is_some()
    }

    /// Acknowledges the message; a no-op for at-most-once deliveries.
    pub async fn ack(&self) -> Result<(), BrokerError> {
        match &self.acker {
            Some(acker) => acker.ack().await,
            None => Ok(()),
        }
    }

    /// Asks for the message again after `delay`; a no-op for at-most-once
    /// deliveries.
    pub async fn nack(&self, delay: Duration) -> Result<(), BrokerError> {
        match &self.acker {
            Some(acker) => acker.nack(delay).await,
            None => Ok(()),
        }
    }
}

/// Ends a subscription with its backend.
#[async_trait::async_trait]
pub trait Unsubscribe: Send {
    /// Stops delivery; messages published afterwards are not received.
    async fn unsubscribe(self: Box<Self>) -> Result<(), BrokerError>;
}

/// A live subscription: a stream of [`Delivery`]s. Dropping it unsubscribes
/// in the background (at most once, a message the backend sent before it
/// heard is lost with the subscription);
/// [`unsubscribe`](Self::unsubscribe) waits for the backend to confirm.
pub struct Subscription {
    topic: String,
    stream: Pin<Box<dyn Stream<Item = Delivery> + Send>>,
    handle: Option<Box<dyn Unsubscribe>>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// A subscription to `topic` delivering `stream`, ended by `handle`.
    pub fn new(
        topic: impl Into<String>,
        stream: impl Stream<Item = Delivery> + Send + 'static,
        handle: impl Unsubscribe + 'static,
    ) -> Self {
        Self {
            topic: topic.into(),
            stream: Box::pin(stream),
            handle: Some(Box::new(handle)),
        }
    }

    /// A subscription to `topic` delivering what arrives on `deliveries`
    /// (the usual shape of a backend: a task or server feeding a channel).
    pub fn from_channel(
        topic: impl Into<String>,
        mut deliveries: tokio::sync::mpsc::Receiver<Delivery>,
        handle: impl Unsubscribe + 'static,
    ) -> Self {
        let stream = futures_util::stream::poll_fn(move |cx| deliveries.poll_recv(cx));
        Self::new(topic, stream, handle)
    }

    /// The subscribed topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The next delivery; `None` once the subscription has ended.
    pub async fn next(&mut self) -> Option<Delivery> {
        futures_util::StreamExt::next(&mut self.stream).await
    }

    /// Unsubscribes and waits until the backend has stopped delivery.
    /// Deliveries not yet taken from the subscription are dropped.
    pub async fn unsubscribe(self) -> Result<(), BrokerError> {
        // Drop the receiving side first, so that a backend task blocked on
        // a full buffer is free to hear the request.
        let Subscription { stream, handle, .. } = self;
        drop(stream);
        match handle {
            Some(handle) => handle.unsubscribe().await,
            None => Ok(()),
        }
    }
}

impl Stream for Subscription {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.stream.as_mut().poll_next(cx)
    }
}

/// Publishes and subscribes. Every backend implements this.
#[async_trait::async_trait]
pub trait Broker: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes `message` on `message.topic`. For at-most-once backends,
    /// success means the backend took the message, not that anyone got it.
    async fn publish(&self, message: Message) -> Result<(), BrokerError>;

    /// Subscribes to `topic`.
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, BrokerError>;

    /// Waits until everything published so far has left this process (for
    /// backends that buffer, like NATS core). Default: nothing to wait for.
    async fn flush(&self) -> Result<(), BrokerError> {
        Ok(())
    }
}

#[async_trait::async_trait]
// Hands out the inner broker's futures as they are: an `async fn` here
// would box a second future around each (one allocation per publish).
impl<B: Broker + ?Sized> Broker for Arc<B> {
    fn publish<'a, 'f>(&'a self, message: Message) -> BoxFuture<'f, Result<(), BrokerError>>
    where
        'a: 'f,
        Self: 'f,
    {
        (**self).publish(message)
    }

    fn subscribe<'a, 'b, 'f>(
        &'a self,
        topic: &'b str,
        options: SubscribeOptions,
    ) -> BoxFuture<'f, Result<Subscription, BrokerError>>
    where
        'a: 'f,
        'b: 'f,
        Self: 'f,
    {
        (**self).subscribe(topic, options)
    }

    fn flush<'a, 'f>(&'a self) -> BoxFuture<'f, Result<(), BrokerError>>
    where
        'a: 'f,
        Self: 'f,
    {
        (**self).flush()
    }
}

/// What the [`Broker`] methods return (as `async_trait` writes them).
type BoxFuture<'f, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'f>>;

/// The longest topic, in bytes: short enough that every backend can name
/// what it keeps per topic after it (JetStream streams, dead-letter topics).
pub const MAX_TOPIC: usize = 200;
/// The most headers a message may carry.
pub const MAX_HEADERS: usize = 64;
/// The longest header value, in bytes.
pub const MAX_HEADER_VALUE: usize = 4096;

/// Checks a message before it is published: its topic, and headers every
/// backend carries unchanged: at most [`MAX_HEADERS`]; names of lowercase
/// letters, digits, `-`, `_` and `.` (at most 128 bytes); values of
/// printable text without leading or trailing spaces (at most
/// [`MAX_HEADER_VALUE`] bytes).
///
/// ```
/// use lodestar_core::broker::{Message, validate_message};
/// assert!(validate_message(&Message::new("t", "x").with_header("content-type", "text/plain")).is_ok());
/// assert!(validate_message(&Message::new("t", "x").with_header("Content-Type", "text/plain")).is_err());
/// assert!(validate_message(&Message::new("t", "x").with_header("k", "two\nlines")).is_err());
/// ```
pub fn validate_message(message: &Message) -> Result<(), BrokerError> {
    validate_topic(&message.topic)?;
    if message.headers.len() > MAX_HEADERS {
        return Err(BrokerError::Invalid(format!(
            "{} headers on `{}`: at most {MAX_HEADERS}",
            message.headers.len(),
            message.topic
        )));
    }
    for (name, value) in &message.headers {
        let name_ok = !name.is_empty()
            && name.len() <= 128
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
            });
        if !name_ok {
            return Err(BrokerError::Invalid(format!(
                "header name `{name}`: expected lowercase letters, digits, `-`, `_` and `.` \
                 (at most 128 bytes)"
            )));
        }
        let value_ok = value.len() <= MAX_HEADER_VALUE
            && !value.chars().any(char::is_control)
            && value.trim() == value;
        if !value_ok {
            return Err(BrokerError::Invalid(format!(
                "the value of header `{name}`: expected text without control characters or \
                 leading and trailing spaces (at most {MAX_HEADER_VALUE} bytes)"
            )));
        }
    }
    Ok(())
}

/// Checks a topic (or queue group) name: dot-separated non-empty tokens of
/// letters, digits, `-` and `_`. Wildcards are not part of lodestar's broker
/// contract, so that every backend behaves the same.
///
/// ```
/// use lodestar_core::broker::validate_topic;
/// assert!(validate_topic("orders.created").is_ok());
/// assert!(validate_topic("orders.*").is_err());
/// assert!(validate_topic("").is_err());
/// ```
pub fn validate_topic(topic: &str) -> Result<(), BrokerError> {
    validate_name("topic", topic)
}

/// Checks a topic or queue group name; `kind` names it in the error.
fn validate_name(kind: &str, name: &str) -> Result<(), BrokerError> {
    let valid_token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() <= MAX_TOPIC && name.split('.').all(valid_token) {
        Ok(())
    } else {
        Err(BrokerError::Invalid(format!(
            "{kind} `{name}`: expected dot-separated tokens of letters, digits, `-` and `_` \
             (at most {MAX_TOPIC} bytes, no wildcards)"
        )))
    }
}

/// Checks a subscription for a backend without durable subscriptions
/// (`backend` names it in the error): the topic, the options, and that no
/// durable subscription is asked for.
pub fn validate_plain_subscription(
    topic: &str,
    options: &SubscribeOptions,
    backend: &str,
) -> Result<(), BrokerError> {
    validate_topic(topic)?;
    validate_options(options)?;
    if options.durable.is_some() {
        return Err(BrokerError::Unsupported(format!(
            "the {backend} broker has no durable subscriptions; use nats:// with JetStream"
        )));
    }
    Ok(())
}

/// Checks the options for `topic`.
pub fn validate_options(options: &SubscribeOptions) -> Result<(), BrokerError> {
    if let Some(queue) = &options.queue {
        validate_name("queue group", queue)?;
    }
    if let Some(durable) = &options.durable {
        let valid = !durable.name.is_empty()
            && durable
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(BrokerError::Invalid(format!(
                "durable name `{}`: expected letters, digits, `-` and `_`",
                durable.name
            )));
        }
        if durable.max_deliver == 0 {
            return Err(BrokerError::Invalid(format!(
                "durable `{}`: max_deliver is 0; it must be at least 1",
                durable.name
            )));
        }
        if durable.ack_wait.is_zero() {
            return Err(BrokerError::Invalid(format!(
                "durable `{}`: ack_wait is 0; it must be longer than a handler takes",
                durable.name
            )));
        }
    }
    Ok(())
}
