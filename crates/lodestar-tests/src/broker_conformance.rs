//! One suite of behaviour tests that every [`Broker`] backend must pass:
//! memory, HTTP, NATS. Each case takes a publishing and a subscribing broker
//! (the same one, or two clients of one backend) and a topic prefix of its
//! own, and panics with what went wrong.
//!
//! Use [`broker_conformance!`](macro@crate::broker_conformance) to run every case
//! as a test of its own for a backend.

use std::collections::BTreeSet;

use bytes::Bytes;
use lodestar::broker::{Broker, BrokerError, Durable, Message, SubscribeOptions, Subscription};

use crate::bounded;

/// Keeps a backend's servers alive for the length of a test.
pub type Guard = Box<dyn std::any::Any + Send>;

async fn subscribe(broker: &dyn Broker, topic: &str, options: SubscribeOptions) -> Subscription {
    bounded("subscribe", broker.subscribe(topic, options))
        .await
        .unwrap_or_else(|e| panic!("subscribe to {topic}: {e}"))
}

async fn publish(broker: &dyn Broker, message: Message) {
    let topic = message.topic.clone();
    bounded("publish", broker.publish(message))
        .await
        .unwrap_or_else(|e| panic!("publish to {topic}: {e}"));
}

async fn body(subscription: &mut Subscription) -> String {
    let delivery = bounded("a delivery", subscription.next())
        .await
        .expect("the subscription is open");
    String::from_utf8_lossy(&delivery.message.body).into_owned()
}

/// Every broadcast subscriber gets every message; other topics' do not.
pub async fn broadcast_reaches_every_subscriber(
    publisher: &dyn Broker,
    subscriber: &dyn Broker,
    prefix: &str,
) {
    let topic = format!("{prefix}.orders");
    let other = format!("{prefix}.other");
    let mut a = subscribe(subscriber, &topic, SubscribeOptions::broadcast()).await;
    let mut b = subscribe(subscriber, &topic, SubscribeOptions::broadcast()).await;
    let mut c = subscribe(subscriber, &other, SubscribeOptions::broadcast()).await;
    publish(publisher, Message::new(&topic, "one")).await;
    publish(publisher, Message::new(&other, "elsewhere")).await;
    publish(publisher, Message::new(&topic, "two")).await;
    assert_eq!(body(&mut a).await, "one");
    assert_eq!(body(&mut a).await, "two");
    assert_eq!(body(&mut b).await, "one");
    assert_eq!(body(&mut b).await, "two");
    // `other`'s subscriber got only its own message.
    assert_eq!(body(&mut c).await, "elsewhere");
    publish(publisher, Message::new(&other, "later")).await;
    assert_eq!(body(&mut c).await, "later");
}

/// Each message goes to exactly one member of a queue group, every group
/// gets its own copy, and broadcast subscribers still get everything.
pub async fn queue_groups_share_messages(
    publisher: &dyn Broker,
    subscriber: &dyn Broker,
    prefix: &str,
) {
    const N: usize = 30;
    let topic = format!("{prefix}.jobs");
    let mut members = Vec::new();
    for _ in 0..2 {
        members.push(subscribe(subscriber, &topic, SubscribeOptions::queue("workers")).await);
    }
    let mut auditor = subscribe(subscriber, &topic, SubscribeOptions::queue("audit")).await;
    let mut watcher = subscribe(subscriber, &topic, SubscribeOptions::broadcast()).await;
    for i in 0..N {
        publish(publisher, Message::new(&topic, i.to_string())).await;
    }
    // The broadcast subscriber and the one-member group see all N.
    for i in 0..N {
        assert_eq!(body(&mut watcher).await, i.to_string());
        assert_eq!(body(&mut auditor).await, i.to_string());
    }
    // The workers see each message exactly once between them.
    let mut seen = Vec::new();
    let mut per_member = Vec::new();
    let [first, second] = &mut members[..] else {
        unreachable!()
    };
    while seen.len() < N {
        let got = tokio::select! {
            d = first.next() => (0, d),
            d = second.next() => (1, d),
            _ = tokio::time::sleep(crate::TIMEOUT) => panic!("workers got {} of {N}", seen.len()),
        };
        let delivery = got.1.expect("open");
        per_member.push(got.0);
        seen.push(String::from_utf8_lossy(&delivery.message.body).into_owned());
    }
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), N, "duplicates among {seen:?}");
    for member in [0, 1] {
        assert!(
            per_member.contains(&member),
            "member {member} got none of {N}: the group does not share"
        );
    }
    // Nothing more arrives: publish a marker to the broadcast subscriber
    // and check no worker got an extra copy by then.
    publish(publisher, Message::new(&topic, "marker")).await;
    assert_eq!(body(&mut watcher).await, "marker");
    let extra = bounded("the marker at a worker", async {
        tokio::select! {
            d = first.next() => d.map(|d| d.message.body),
            d = second.next() => d.map(|d| d.message.body),
        }
    })
    .await;
    assert_eq!(extra, Some(Bytes::from("marker")), "only the marker, once");
}

/// Messages from one publisher arrive in the order they were published.
pub async fn one_publishers_messages_arrive_in_order(
    publisher: &dyn Broker,
    subscriber: &dyn Broker,
    prefix: &str,
) {
    const N: usize = 200;
    let topic = format!("{prefix}.ordered");
    let mut subscription = subscribe(subscriber, &topic, SubscribeOptions::broadcast()).await;
    let mut queued = subscribe(subscriber, &topic, SubscribeOptions::queue("one")).await;
    for i in 0..N {
        publish(publisher, Message::new(&topic, i.to_string())).await;
    }
    for i in 0..N {
        assert_eq!(body(&mut subscription).await, i.to_string());
        assert_eq!(body(&mut queued).await, i.to_string());
    }
}

/// Headers and binary bodies survive the trip.
pub async fn headers_and_bodies_round_trip(
    publisher: &dyn Broker,
    subscriber: &dyn Broker,
    prefix: &str,
) {
    let topic = format!("{prefix}.headers");
    let mut subscription = subscribe(subscriber, &topic, SubscribeOptions::broadcast()).await;
    let body: Vec<u8> = (0..=255u8).chain([0, 0xff, b'\n', b'\r']).collect();
    let sent = Message::new(&topic, body.clone())
        .with_header("content-type", "application/octet-stream")
        .with_header("message-id", "m-1")
        .with_header("x-custom", "a value with spaces");
    publish(publisher, sent.clone()).await;
    let got = bounded("a delivery", subscription.next())
        .await
        .expect("open");
    assert_eq!(got.message.topic, topic);
    assert_eq!(got.message.body, Bytes::from(body));
    for (name, value) in &sent.headers {
        assert_eq!(
            got.message.header(name),
            Some(value.as_str()),
            "header {name}"
        );
    }
    assert!(!got.needs_ack(), "plain subscriptions are at most once");
    // An empty body is a message too.
    publish(publisher, Message::new(&topic, Bytes::new())).await;
    let got = bounded("a delivery", subscription.next())
        .await
        .expect("open");
    assert!(got.message.body.is_empty());
}

/// After unsubscribing, a subscriber gets nothing more; the others carry on.
pub async fn unsubscribe_stops_delivery(
    publisher: &dyn Broker,
    subscriber: &dyn Broker,
    prefix: &str,
) {
    let topic = format!("{prefix}.unsub");
    // Unsubscribing returns even with a backlog nobody read.
    let backlog = format!("{prefix}.backlog");
    let idle = subscribe(subscriber, &backlog, SubscribeOptions::broadcast()).await;
    for i in 0..300 {
        publish(publisher, Message::new(&backlog, i.to_string())).await;
    }
    bounded("unsubscribe with a backlog", idle.unsubscribe())
        .await
        .unwrap();

    let leaving = subscribe(subscriber, &topic, SubscribeOptions::queue("g")).await;
    let mut staying = subscribe(subscriber, &topic, SubscribeOptions::queue("g")).await;
    let mut watcher = subscribe(subscriber, &topic, SubscribeOptions::broadcast()).await;
    bounded("unsubscribe", leaving.unsubscribe()).await.unwrap();
    for i in 0..10 {
        publish(publisher, Message::new(&topic, i.to_string())).await;
    }
    // With the other member gone, the one that stayed gets all ten.
    for i in 0..10 {
        assert_eq!(body(&mut staying).await, i.to_string());
        assert_eq!(body(&mut watcher).await, i.to_string());
    }
    // Dropping a subscription unsubscribes too, though (unlike
    // `unsubscribe`) without waiting for the backend: once a message reaches
    // the replacement, every later one does.
    drop(staying);
    let mut replacement = subscribe(subscriber, &topic, SubscribeOptions::queue("g")).await;
    bounded("the dropped member to leave", async {
        loop {
            publish(publisher, Message::new(&topic, "probe")).await;
            let got =
                tokio::time::timeout(std::time::Duration::from_millis(100), replacement.next())
                    .await;
            if let Ok(delivery) = got {
                assert_eq!(delivery.expect("open").message.body, "probe");
                return;
            }
        }
    })
    .await;
    for i in 0..10 {
        publish(publisher, Message::new(&topic, format!("after {i}"))).await;
    }
    let mut got = body(&mut replacement).await;
    while got == "probe" {
        got = body(&mut replacement).await;
    }
    assert_eq!(got, "after 0");
    for i in 1..10 {
        assert_eq!(body(&mut replacement).await, format!("after {i}"));
    }
}

/// Bad topics and options are refused with clear errors; no subscribers is
/// not an error.
pub async fn bad_input_is_refused_clearly(
    publisher: &dyn Broker,
    subscriber: &dyn Broker,
    prefix: &str,
) {
    for topic in [
        "",
        "a..b",
        "orders.*",
        "orders.>",
        "has space",
        ".lead",
        "trail.",
    ] {
        let error = publisher
            .publish(Message::new(topic, "x"))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, BrokerError::Invalid(m) if m.contains("topic")),
            "publish to {topic:?}: {error:?}"
        );
        let error = subscriber
            .subscribe(topic, SubscribeOptions::broadcast())
            .await
            .unwrap_err();
        assert!(
            matches!(error, BrokerError::Invalid(_)),
            "subscribe to {topic:?}: {error:?}"
        );
    }
    let topic = format!("{prefix}.bad");
    // Headers every backend can carry unchanged, or a clear refusal.
    let too_many = (0..=lodestar::broker::MAX_HEADERS).fold(Message::new(&topic, "x"), |m, i| {
        m.with_header(format!("h{i}"), "v")
    });
    for message in [
        Message::new(&topic, "x").with_header("Content-Type", "text/plain"),
        Message::new(&topic, "x").with_header("has space", "v"),
        Message::new(&topic, "x").with_header("k", "two\nlines"),
        Message::new(&topic, "x").with_header("k", " padded "),
        too_many,
    ] {
        let error = publisher.publish(message.clone()).await.unwrap_err();
        assert!(
            matches!(error, BrokerError::Invalid(_)),
            "{:?}: {error:?}",
            message.headers
        );
    }
    let long_topic = "t".repeat(lodestar::broker::MAX_TOPIC + 1);
    let error = publisher
        .publish(Message::new(long_topic, "x"))
        .await
        .unwrap_err();
    assert!(matches!(error, BrokerError::Invalid(_)), "{error:?}");
    let error = subscriber
        .subscribe(&topic, SubscribeOptions::queue("no spaces"))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, BrokerError::Invalid(m) if m.contains("queue")),
        "{error:?}"
    );
    let error = subscriber
        .subscribe(
            &topic,
            SubscribeOptions::durable(Durable::new("d").max_deliver(0)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, BrokerError::Invalid(_) | BrokerError::Unsupported(_)),
        "{error:?}"
    );
    // Nobody listening: at-most-once publishing is still fine.
    publish(publisher, Message::new(format!("{prefix}.nobody"), "x")).await;
}

/// Runs every broker conformance case as a test of its own.
///
/// `$make` is an async expression yielding `(publisher, subscriber, guard)`.
#[macro_export]
macro_rules! broker_conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            use $crate::broker_conformance as case;

            async fn brokers() -> (
                std::sync::Arc<dyn lodestar::Broker>,
                std::sync::Arc<dyn lodestar::Broker>,
                case::Guard,
            ) {
                $make.await
            }

            fn prefix(case: &str) -> String {
                format!("{}-{case}-{}", stringify!($backend), std::process::id())
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn broadcast_reaches_every_subscriber() {
                let (p, s, _guard) = brokers().await;
                case::broadcast_reaches_every_subscriber(&*p, &*s, &prefix("broadcast")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn queue_groups_share_messages() {
                let (p, s, _guard) = brokers().await;
                case::queue_groups_share_messages(&*p, &*s, &prefix("queue")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn one_publishers_messages_arrive_in_order() {
                let (p, s, _guard) = brokers().await;
                case::one_publishers_messages_arrive_in_order(&*p, &*s, &prefix("order")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn headers_and_bodies_round_trip() {
                let (p, s, _guard) = brokers().await;
                case::headers_and_bodies_round_trip(&*p, &*s, &prefix("headers")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unsubscribe_stops_delivery() {
                let (p, s, _guard) = brokers().await;
                case::unsubscribe_stops_delivery(&*p, &*s, &prefix("unsub")).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bad_input_is_refused_clearly() {
                let (p, s, _guard) = brokers().await;
                case::bad_input_is_refused_clearly(&*p, &*s, &prefix("bad")).await;
            }
        }
    };
}
