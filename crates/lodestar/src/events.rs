//! Typed events over any [`Broker`]: publish protobuf messages, and handle
//! them in subscribers that the [`Service`](crate::Service) builder starts
//! and drains with the service.
//!
//! Everything published through here carries
//! [`content-type`](header::CONTENT_TYPE) (`application/protobuf`, or what
//! [`EventPublisher::publish_bytes`] is given), a fresh
//! [`message-id`](header::MESSAGE_ID), and, when the publishing task is
//! handling a traced request, its [`traceparent`](header::TRACEPARENT).
//!
//! ```
//! use lodestar::events::{self, EventPublisher};
//! use lodestar::MemoryBroker;
//! use lodestar::broker::{Broker, SubscribeOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = MemoryBroker::new();
//! let mut subscription = broker.subscribe("numbers", SubscribeOptions::broadcast()).await?;
//! let publisher = EventPublisher::new(broker.clone());
//! publisher.publish("numbers", &42u32).await?;
//!
//! let delivery = subscription.next().await.unwrap();
//! assert_eq!(delivery.message.header("content-type"), Some("application/protobuf"));
//! assert!(delivery.message.id().is_some());
//! let number: u32 = events::decode(&delivery.message)?;
//! assert_eq!(number, 42);
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::metrics::{BrokerMetrics, Metrics};
use crate::trace::TraceContext;
pub use lodestar_core::broker::{
    Broker, BrokerError, Delivery, Durable, Message, SubscribeOptions, Subscription, header,
};

/// The content type of protobuf bodies.
pub const PROTOBUF: &str = "application/protobuf";

/// Runs `future` with `traceparent` as the trace context that events it
/// publishes carry (a malformed one is ignored). lodestar's server does
/// this for each request that arrives with a `traceparent` header; see
/// [`crate::trace`].
pub async fn with_trace_context<F: Future>(traceparent: String, future: F) -> F::Output {
    match TraceContext::parse(&traceparent, None) {
        Some(context) => context.scope(future).await,
        None => future.await,
    }
}

/// The current task's `traceparent`, if any.
pub fn current_trace_context() -> Option<String> {
    TraceContext::current().map(|c| c.traceparent().to_owned())
}

/// A new message id: 128 random bits, as 32 hex digits.
pub fn new_message_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// Decodes a protobuf body. A body that does not decode is
/// [`BrokerError::Invalid`], naming the topic and message id.
pub fn decode<T: prost::Message + Default>(message: &Message) -> Result<T, BrokerError> {
    T::decode(message.body.clone()).map_err(|e| {
        BrokerError::Invalid(format!(
            "message {} on `{}` is not a valid {}: {e}",
            message.id().unwrap_or("without id"),
            message.topic,
            std::any::type_name::<T>()
        ))
    })
}

/// Publishes with lodestar's headers set, and counts what it published
/// (`lodestar_broker_published_total{topic}`, in [`Metrics::global`]
/// unless [`with_metrics`](Self::with_metrics) says otherwise). Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct EventPublisher {
    broker: Arc<dyn Broker>,
    metrics: BrokerMetrics,
}

impl EventPublisher {
    /// A publisher over `broker`.
    pub fn new(broker: impl Broker) -> Self {
        Self::from_arc(Arc::new(broker))
    }

    /// A publisher over a shared broker.
    pub fn from_arc(broker: Arc<dyn Broker>) -> Self {
        Self {
            broker,
            metrics: BrokerMetrics::of(Metrics::global()),
        }
    }

    /// Counts what it publishes in `metrics` rather than the process's
    /// registry.
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        self.metrics = BrokerMetrics::of(metrics);
        self
    }

    /// The broker underneath.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Publishes a protobuf message on `topic`.
    pub async fn publish<T: prost::Message>(
        &self,
        topic: &str,
        event: &T,
    ) -> Result<(), BrokerError> {
        self.publish_bytes(topic, PROTOBUF, event.encode_to_vec())
            .await
    }

    /// Publishes `body` with the given content type.
    pub async fn publish_bytes(
        &self,
        topic: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> Result<(), BrokerError> {
        let message = Message::new(topic, body);
        #[cfg(feature = "otlp")]
        if crate::telemetry::spans_on() {
            // The event carries the producer span's context (`stamp`).
            let traced = crate::telemetry::spans::publish(topic);
            let published = traced
                .run(async { self.broker.publish(stamp(message, content_type)).await })
                .await;
            if let Err(error) = &published {
                crate::telemetry::spans::failed(&traced, error);
            }
            published?;
            self.metrics.topic(topic).published().inc();
            return Ok(());
        }
        self.broker.publish(stamp(message, content_type)).await?;
        self.metrics.topic(topic).published().inc();
        Ok(())
    }
}

/// Sets lodestar's headers on `message`, keeping any already there.
pub fn stamp(mut message: Message, content_type: &str) -> Message {
    message
        .headers
        .entry(header::CONTENT_TYPE.to_owned())
        .or_insert_with(|| content_type.to_owned());
    message
        .headers
        .entry(header::MESSAGE_ID.to_owned())
        .or_insert_with(new_message_id);
    if let Some(context) = TraceContext::current()
        && !message.headers.contains_key(header::TRACEPARENT)
    {
        let traceparent = context.traceparent().to_owned();
        message
            .headers
            .insert(header::TRACEPARENT.to_owned(), traceparent);
        if let Some(tracestate) = context.tracestate() {
            message
                .headers
                .insert(crate::trace::TRACESTATE.to_owned(), tracestate.to_owned());
        }
    }
    message
}

/// Why a handler did not handle a message; the delivery is nacked (and, for
/// durable subscriptions, delivered again).
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// What a subscriber's handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

/// A type-erased handler of raw messages.
pub type Handler = Arc<dyn Fn(Message) -> HandlerFuture + Send + Sync>;

/// A handler of raw messages from a closure.
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    Arc::new(move |message| Box::pin(f(message)))
}

/// A handler of protobuf messages: the body is decoded into `T` first; a
/// body that does not decode is an error (nacked, so a durable subscription
/// dead-letters it after its retry limit).
pub fn proto_handler<T, F, Fut>(f: F) -> Handler
where
    T: prost::Message + Default + 'static,
    F: Fn(T, Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    let f = Arc::new(f);
    Arc::new(move |message: Message| {
        let f = f.clone();
        Box::pin(async move {
            let event = decode::<T>(&message)?;
            f(event, message).await
        })
    })
}

/// One subscription declared on a service: topic, options, handler.
#[derive(Clone)]
pub struct Subscriber {
    /// The topic.
    pub topic: String,
    /// Broadcast, queue group or durable.
    pub options: SubscribeOptions,
    /// What handles each message.
    pub handler: Handler,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("topic", &self.topic)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Runs `handled`, the handling of `message`, in the publisher's trace
/// `context`; with OpenTelemetry on, in a consumer span under it.
async fn handle<T>(
    topic: &str,
    message: &Message,
    context: Option<TraceContext>,
    handled: impl Future<Output = Result<Result<(), HandlerError>, T>>,
) -> Result<Result<(), HandlerError>, T> {
    #[cfg(feature = "otlp")]
    if crate::telemetry::spans_on() {
        let traced = crate::telemetry::spans::consume(topic, message.id(), context.as_ref());
        let result = traced.run(handled).await;
        match &result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => crate::telemetry::spans::failed(&traced, error),
            Err(_) => crate::telemetry::spans::failed(&traced, &"the handler panicked"),
        }
        return result;
    }
    let _ = (topic, message);
    match context {
        Some(context) => context.scope(handled).await,
        None => handled.await,
    }
}

/// How long a nacked delivery waits before it is delivered again.
pub const NACK_DELAY: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs one subscription: each delivery is handled in turn (so a
/// publisher's order is kept), acked when the handler succeeds and nacked
/// when it fails. Stops taking deliveries when `stop` turns true, finishes
/// the one in hand, then unsubscribes. Counts each delivery, redelivery,
/// ack and nack under the subscription's topic in `metrics` (with none,
/// the service's metrics are off: in a registry nobody serves).
pub(crate) async fn run_subscriber(
    mut subscription: Subscription,
    handler: Handler,
    mut stop: tokio::sync::watch::Receiver<bool>,
    metrics: Option<Metrics>,
) {
    let topic = subscription.topic().to_owned();
    let counted = BrokerMetrics::of(&metrics.unwrap_or_default()).topic(&topic);
    loop {
        let delivery = tokio::select! {
            biased;
            // A dropped sender (the RunningService was dropped) is not a
            // stop: the service runs on in the background.
            Ok(_) = stop.wait_for(|stop| *stop) => break,
            delivery = subscription.next() => delivery,
        };
        let Some(delivery) = delivery else {
            tracing::warn!(%topic, "the subscription ended");
            return;
        };
        counted.delivered().inc();
        if delivery.attempt > 1 {
            counted.redelivered().inc();
        }
        let context = delivery.message.header(header::TRACEPARENT).and_then(|t| {
            TraceContext::parse(t, delivery.message.header(crate::trace::TRACESTATE))
        });
        // A handler that panics fails this message only: it is nacked, and
        // the subscription carries on.
        let message = delivery.message.clone();
        let handled = std::panic::AssertUnwindSafe(async { handler(message).await });
        let handled = futures_util::FutureExt::catch_unwind(handled);
        let result = handle(&topic, &delivery.message, context, handled)
            .await
            .unwrap_or_else(|_| Err("the handler panicked".into()));
        let settled = match result {
            Ok(()) => {
                counted.acked().inc();
                delivery.ack().await
            }
            Err(e) => {
                counted.nacked().inc();
                tracing::warn!(%topic, id = delivery.message.id(), attempt = delivery.attempt, error = %e,
                    "the handler failed; the message is nacked");
                delivery.nack(NACK_DELAY).await
            }
        };
        if let Err(e) = settled {
            tracing::warn!(%topic, error = %e, "cannot settle a delivery; it will be delivered again");
        }
    }
    if let Err(e) = subscription.unsubscribe().await {
        tracing::warn!(%topic, error = %e, "unsubscribe failed");
    }
}
