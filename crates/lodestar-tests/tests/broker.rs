//! The broker conformance suite for every backend, and the NATS backend's
//! at-least-once behaviour against a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use lodestar::Broker;
use lodestar::broker::{Durable, Message, SubscribeOptions, header};
use lodestar_broker::NatsBroker;
use lodestar_tests::bounded;
use lodestar_tests::broker_conformance;
use lodestar_tests::broker_conformance::Guard;
use lodestar_tests::nats::Nats;

broker_conformance!(memory, async {
    let broker: Arc<dyn Broker> = Arc::new(lodestar::MemoryBroker::new());
    (broker.clone(), broker, Box::new(()) as Guard)
});

// Two HTTP brokers (each with its own subscriber endpoint) finding each
// other through one registry.
broker_conformance!(http, async {
    let registry: Arc<dyn lodestar::Registry> = Arc::new(lodestar::MemoryRegistry::new());
    let publisher: Arc<dyn Broker> = Arc::new(lodestar_broker::HttpBroker::new(registry.clone()));
    let subscriber: Arc<dyn Broker> = Arc::new(lodestar_broker::HttpBroker::new(registry));
    (publisher, subscriber, Box::new(()) as Guard)
});

// Two connections to a real nats-server started for each test.
broker_conformance!(nats, async {
    let server = Nats::start().await;
    let publisher: Arc<dyn Broker> = Arc::new(NatsBroker::connect(&server.url()).await.unwrap());
    let subscriber: Arc<dyn Broker> = Arc::new(NatsBroker::connect(&server.url()).await.unwrap());
    (publisher, subscriber, Box::new(server) as Guard)
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_messages_cross_to_and_from_plain_nats_clients() {
    let server = Nats::start().await;
    let broker = NatsBroker::connect(&server.url()).await.unwrap();
    let plain = async_nats::connect(server.url()).await.unwrap();

    // lodestar → plain client: subject is the topic, headers are NATS headers.
    let mut plain_sub = plain.subscribe("interop.to-plain").await.unwrap();
    plain.flush().await.unwrap();
    broker
        .publish(
            Message::new("interop.to-plain", "hello")
                .with_header(header::CONTENT_TYPE, "text/plain")
                .with_header(header::MESSAGE_ID, "m-42"),
        )
        .await
        .unwrap();
    let got = bounded("the plain client", plain_sub.next()).await.unwrap();
    assert_eq!(&got.payload[..], b"hello");
    let headers = got.headers.unwrap();
    assert_eq!(headers.get("content-type").unwrap().as_str(), "text/plain");
    assert_eq!(headers.get("message-id").unwrap().as_str(), "m-42");

    // plain client → lodestar, with and without headers.
    let mut sub = broker
        .subscribe("interop.from-plain", SubscribeOptions::broadcast())
        .await
        .unwrap();
    plain
        .publish("interop.from-plain", "bare".into())
        .await
        .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("x-from", "plain");
    plain
        .publish_with_headers("interop.from-plain", headers, "with headers".into())
        .await
        .unwrap();
    plain.flush().await.unwrap();
    let first = bounded("lodestar", sub.next()).await.unwrap();
    assert_eq!(first.message.body, "bare");
    assert!(first.message.headers.is_empty());
    let second = bounded("lodestar", sub.next()).await.unwrap();
    assert_eq!(second.message.body, "with headers");
    assert_eq!(second.message.header("x-from"), Some("plain"));
}

async fn durable_subscription(
    broker: &NatsBroker,
    topic: &str,
    durable: Durable,
) -> lodestar::broker::Subscription {
    bounded(
        "a durable subscription",
        broker.subscribe(topic, SubscribeOptions::durable(durable)),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_redelivers_what_a_crashed_subscriber_never_acked() {
    let server = Nats::start().await;
    let publisher = NatsBroker::connect(&server.url()).await.unwrap();
    let durable = Durable::new("billing").ack_wait(Duration::from_secs(1));

    // The first subscriber takes a batch, acks three, then dies (its
    // connection closes without another word).
    let crashing = NatsBroker::connect(&server.url()).await.unwrap();
    let mut first = durable_subscription(&crashing, "js.orders", durable.clone()).await;
    for i in 0..10 {
        publisher
            .publish(
                Message::new("js.orders", i.to_string())
                    .with_header(header::MESSAGE_ID, format!("o-{i}")),
            )
            .await
            .unwrap();
    }
    let mut acked = BTreeSet::new();
    for _ in 0..6 {
        let delivery = bounded("a delivery", first.next()).await.unwrap();
        assert!(delivery.needs_ack());
        if acked.len() < 3 {
            delivery.ack().await.unwrap();
            acked.insert(String::from_utf8_lossy(&delivery.message.body).into_owned());
        }
    }
    drop(first);
    drop(crashing);

    // A new subscriber of the same durable gets every message not acked,
    // the ones the first one held included, and none that were acked.
    let restarted = NatsBroker::connect(&server.url()).await.unwrap();
    let mut second = durable_subscription(&restarted, "js.orders", durable).await;
    let mut rest = BTreeSet::new();
    while rest.len() < 7 {
        let delivery = bounded("a redelivery", second.next()).await.unwrap();
        let body = String::from_utf8_lossy(&delivery.message.body).into_owned();
        assert!(!acked.contains(&body), "{body} was acked yet came back");
        delivery.ack().await.unwrap();
        rest.insert(body);
    }
    let all: BTreeSet<String> = acked.union(&rest).cloned().collect();
    assert_eq!(all, (0..10).map(|i| i.to_string()).collect());
}

/// Acks are sent without waiting; ending a durable subscription confirms
/// the server has them. Acks still in the client when its connection
/// dropped cannot be confirmed by a round trip on the new connection, so
/// `unsubscribe` says they may come back instead of claiming success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_a_durable_after_a_reconnection_does_not_claim_the_acks_landed() {
    let mut server = Nats::start().await;
    let broker = NatsBroker::connect(&server.url()).await.unwrap();
    let durable = Durable::new("audit").ack_wait(Duration::from_secs(5));

    // No reconnection: the acks are confirmed.
    let mut quiet = durable_subscription(&broker, "js.audit", durable.clone()).await;
    broker
        .publish(Message::new("js.audit", "a").with_header(header::MESSAGE_ID, "a-1"))
        .await
        .unwrap();
    bounded("a delivery", quiet.next())
        .await
        .unwrap()
        .ack()
        .await
        .unwrap();
    bounded("unsubscribe", quiet.unsubscribe()).await.unwrap();

    // A reconnection in between: not confirmed.
    let mut subscription = durable_subscription(&broker, "js.audit", durable).await;
    broker
        .publish(Message::new("js.audit", "b").with_header(header::MESSAGE_ID, "a-2"))
        .await
        .unwrap();
    bounded("a delivery", subscription.next())
        .await
        .unwrap()
        .ack()
        .await
        .unwrap();
    server.kill();
    server.restart().await;
    // The client is back once a publish goes through again.
    bounded("a publish after the restart", async {
        while broker
            .publish(Message::new("js.audit", "c").with_header(header::MESSAGE_ID, "a-3"))
            .await
            .is_err()
        {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let error = bounded("unsubscribe", subscription.unsubscribe())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("may be delivered again"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_dead_letters_a_poison_message_after_the_retry_limit() {
    let server = Nats::start().await;
    let broker = NatsBroker::connect(&server.url()).await.unwrap();
    let durable = Durable::new("worker")
        .max_deliver(3)
        .dead_letter("dead.poison");
    let mut subscription = durable_subscription(&broker, "js.poison", durable).await;
    let mut dead = durable_subscription(&broker, "dead.poison", Durable::new("inspector")).await;
    broker
        .publish(Message::new("js.poison", "bad"))
        .await
        .unwrap();
    broker
        .publish(Message::new("js.poison", "good"))
        .await
        .unwrap();

    let mut poison_attempts = Vec::new();
    let mut good = 0;
    while poison_attempts.len() < 3 || good == 0 {
        let delivery = bounded("a delivery", subscription.next()).await.unwrap();
        if delivery.message.body == "bad" {
            poison_attempts.push(delivery.attempt);
            delivery.nack(Duration::ZERO).await.unwrap();
        } else {
            good += 1;
            delivery.ack().await.unwrap();
        }
    }
    assert_eq!(poison_attempts, [1, 2, 3]);
    let letter = bounded("the dead letter", dead.next()).await.unwrap();
    assert_eq!(letter.message.body, "bad");
    assert_eq!(
        letter.message.header(header::DEAD_LETTER_TOPIC),
        Some("js.poison")
    );
    assert_eq!(
        letter.message.header(header::DEAD_LETTER_ATTEMPTS),
        Some("3")
    );
    letter.ack().await.unwrap();
    // And it is not delivered a fourth time.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), subscription.next())
            .await
            .is_err(),
        "the poison message came back after dead-lettering"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_under_publish_load_loses_nothing_durable() {
    let mut server = Nats::start().await;
    let publisher = Arc::new(NatsBroker::connect(&server.url()).await.unwrap());
    let consumer = NatsBroker::connect(&server.url()).await.unwrap();
    let durable = Durable::new("ledger").ack_wait(Duration::from_secs(2));
    let mut subscription = durable_subscription(&consumer, "js.ledger", durable).await;

    // Steady publishing; remember what the broker confirmed as stored.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let load = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            let (mut stored, mut failed) = (Vec::new(), 0u32);
            let mut i = 0u32;
            while !*stop_rx.borrow() {
                let message = Message::new("js.ledger", i.to_string())
                    .with_header(header::MESSAGE_ID, format!("l-{i}"));
                match tokio::time::timeout(Duration::from_secs(3), publisher.publish(message)).await
                {
                    Ok(Ok(())) => stored.push(i),
                    _ => failed += 1,
                }
                i += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                    _ = stop_rx.changed() => {}
                }
            }
            (stored, failed)
        })
    };
    // Receive (and ack) the first messages, restart the server, then wait
    // until messages published after the restart arrive.
    let mut received = BTreeSet::new();
    while received.len() < 20 {
        let delivery = bounded("a delivery before the restart", subscription.next())
            .await
            .unwrap();
        received.insert(
            String::from_utf8_lossy(&delivery.message.body)
                .parse::<u32>()
                .unwrap(),
        );
        let _ = delivery.ack().await;
    }
    // An outage long enough for publishes to pile up behind it.
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart().await;
    let before = *received.iter().max().unwrap();
    let mut after_restart = 0;
    while after_restart < 20 {
        let delivery = bounded("a delivery after the restart", subscription.next())
            .await
            .unwrap();
        let n = String::from_utf8_lossy(&delivery.message.body)
            .parse::<u32>()
            .unwrap();
        if n > before + 50 {
            after_restart += 1;
        }
        received.insert(n);
        let _ = delivery.ack().await;
    }
    let _ = stop_tx.send(true);
    let (stored, failed) = bounded("the load to stop", load).await.unwrap();
    // Everything confirmed as stored arrives, possibly more than once.
    for n in &stored {
        if received.contains(n) {
            continue;
        }
        loop {
            let delivery = bounded(&format!("message {n}"), subscription.next())
                .await
                .unwrap();
            let got = String::from_utf8_lossy(&delivery.message.body)
                .parse::<u32>()
                .unwrap();
            received.insert(got);
            let _ = delivery.ack().await;
            if got == *n {
                break;
            }
        }
    }
    assert!(
        stored.len() > 40,
        "only {} stored, {failed} failed",
        stored.len()
    );
    eprintln!(
        "{} stored, {failed} refused while the server was down",
        stored.len()
    );
}

mod service {
    use super::*;
    use lodestar::Service;
    use lodestar::events::{self, EventPublisher};
    use lodestar::metrics::{BrokerMetrics, Metrics};
    use tokio::sync::{mpsc, oneshot};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscribers_start_with_the_service_and_drain_on_shutdown() {
        let broker: Arc<dyn Broker> = Arc::new(lodestar::MemoryBroker::new());
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(u64, Option<String>)>();
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let release = Arc::new(tokio::sync::Mutex::new(Some(release_rx)));
        let running = Service::builder("billing")
            .broker(broker.clone())
            .subscribe(
                "orders.created",
                SubscribeOptions::queue("billing"),
                events::proto_handler(move |amount: u64, message: Message| {
                    let seen = seen_tx.clone();
                    let release = release.clone();
                    async move {
                        let _ = seen.send((amount, message.id().map(str::to_owned)));
                        // The second order blocks until the test lets it go.
                        if amount == 2
                            && let Some(release) = release.lock().await.take()
                        {
                            let _ = release.await;
                        }
                        Ok(())
                    }
                }),
            )
            .start()
            .await
            .unwrap();
        let publisher = EventPublisher::from_arc(broker.clone());
        publisher.publish("orders.created", &1u64).await.unwrap();
        let (amount, id) = bounded("the first event", seen_rx.recv()).await.unwrap();
        assert_eq!(amount, 1);
        assert_eq!(id.unwrap().len(), 32, "a message id was stamped");
        publisher.publish("orders.created", &2u64).await.unwrap();
        assert_eq!(
            bounded("the second event", seen_rx.recv()).await.unwrap().0,
            2
        );

        // Shutdown waits for the handler in progress.
        let mut shutdown = tokio::spawn(running.shutdown());
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut shutdown)
                .await
                .is_err(),
            "shutdown finished while a handler was still running"
        );
        release_tx.send(()).unwrap();
        bounded("shutdown", shutdown).await.unwrap().unwrap();
        // Unsubscribed: a new subscriber in the same queue group gets everything.
        let mut after = broker
            .subscribe("orders.created", SubscribeOptions::queue("billing"))
            .await
            .unwrap();
        publisher.publish("orders.created", &3u64).await.unwrap();
        let delivery = bounded("after shutdown", after.next()).await.unwrap();
        assert_eq!(events::decode::<u64>(&delivery.message).unwrap(), 3);
        assert!(
            seen_rx.try_recv().is_err(),
            "the stopped service handled an event"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_running_service_keeps_handling_events() {
        let broker: Arc<dyn Broker> = Arc::new(lodestar::MemoryBroker::new());
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<u64>();
        let running = Service::builder("background")
            .broker(broker.clone())
            .subscribe(
                "ticks",
                SubscribeOptions::broadcast(),
                events::proto_handler(move |n: u64, _message: Message| {
                    let seen = seen_tx.clone();
                    async move {
                        let _ = seen.send(n);
                        Ok(())
                    }
                }),
            )
            .start()
            .await
            .unwrap();
        drop(running);
        EventPublisher::from_arc(broker)
            .publish("ticks", &5u64)
            .await
            .unwrap();
        assert_eq!(bounded("the event", seen_rx.recv()).await, Some(5));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscriber_without_a_broker_or_with_a_bad_topic_fails_start_clearly() {
        let handler = events::handler(|_message| async { Ok(()) });
        let error = Service::builder("svc")
            .subscribe("orders", SubscribeOptions::broadcast(), handler.clone())
            .start()
            .await
            .unwrap_err();
        assert!(error.to_string().contains("no broker"), "{error}");
        let error = Service::builder("svc")
            .broker(Arc::new(lodestar::MemoryBroker::new()))
            .subscribe("orders.*", SubscribeOptions::broadcast(), handler)
            .start()
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("cannot subscribe to `orders.*`"),
            "{error}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_handler_fails_one_message_and_the_subscription_goes_on() {
        let broker: Arc<dyn Broker> = Arc::new(lodestar::MemoryBroker::new());
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<u64>();
        let running = Service::builder("fragile")
            .broker(broker.clone())
            .subscribe(
                "numbers",
                SubscribeOptions::broadcast(),
                events::proto_handler(move |n: u64, _message: Message| {
                    let seen = seen_tx.clone();
                    async move {
                        assert_ne!(n, 13, "unlucky");
                        let _ = seen.send(n);
                        Ok(())
                    }
                }),
            )
            .start()
            .await
            .unwrap();
        // A handler that panics before it even returns a future.
        let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<Bytes>();
        let raw = Service::builder("fragile-raw")
            .broker(broker.clone())
            .subscribe(
                "numbers",
                SubscribeOptions::broadcast(),
                events::handler(move |message: Message| {
                    assert_ne!(
                        events::decode::<u64>(&message).unwrap(),
                        13,
                        "unlucky, early"
                    );
                    let _ = raw_tx.send(message.body);
                    async { Ok(()) }
                }),
            )
            .start()
            .await
            .unwrap();
        let publisher = EventPublisher::from_arc(broker);
        for n in [1u64, 13, 2] {
            publisher.publish("numbers", &n).await.unwrap();
        }
        assert_eq!(bounded("1", seen_rx.recv()).await, Some(1));
        assert_eq!(bounded("2, after the panic", seen_rx.recv()).await, Some(2));
        bounded("1", raw_rx.recv()).await.unwrap();
        let after = bounded("2, after the early panic", raw_rx.recv())
            .await
            .unwrap();
        assert_eq!(events::decode::<u64>(&Message::new("n", after)).unwrap(), 2);
        running.shutdown().await.unwrap();
        raw.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handlers_see_the_trace_context_and_pass_it_on() {
        let broker: Arc<dyn Broker> = Arc::new(lodestar::MemoryBroker::new());
        let mut downstream = broker
            .subscribe("shipments.requested", SubscribeOptions::broadcast())
            .await
            .unwrap();
        let publisher = EventPublisher::from_arc(broker.clone());
        let forward = publisher.clone();
        let running = Service::builder("shipping")
            .broker(broker.clone())
            .subscribe(
                "orders.paid",
                SubscribeOptions::broadcast(),
                events::proto_handler(move |order: u64, _message: Message| {
                    let forward = forward.clone();
                    async move {
                        forward.publish("shipments.requested", &order).await?;
                        Ok(())
                    }
                }),
            )
            .start()
            .await
            .unwrap();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned();
        events::with_trace_context(traceparent.clone(), publisher.publish("orders.paid", &9u64))
            .await
            .unwrap();
        let delivery = bounded("the forwarded event", downstream.next())
            .await
            .unwrap();
        assert_eq!(events::decode::<u64>(&delivery.message).unwrap(), 9);
        assert_eq!(
            delivery.message.header(header::TRACEPARENT),
            Some(traceparent.as_str())
        );
        running.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_durable_handler_is_retried_then_dead_lettered_through_the_service() {
        let server = Nats::start().await;
        let broker: Arc<dyn Broker> = Arc::new(NatsBroker::connect(&server.url()).await.unwrap());
        let (tried_tx, mut tried_rx) = mpsc::unbounded_channel::<String>();
        let running = Service::builder("worker")
            .broker(broker.clone())
            .subscribe(
                "svc.jobs",
                SubscribeOptions::durable(Durable::new("worker").max_deliver(2)),
                events::handler(move |message: Message| {
                    let tried = tried_tx.clone();
                    async move {
                        let body = String::from_utf8_lossy(&message.body).into_owned();
                        let _ = tried.send(body.clone());
                        if body == "poison" {
                            return Err("cannot handle poison".into());
                        }
                        Ok(())
                    }
                }),
            )
            .start()
            .await
            .unwrap();
        let mut dead = broker
            .subscribe(
                "dead.svc.jobs",
                SubscribeOptions::durable(Durable::new("inspector")),
            )
            .await
            .unwrap();
        let publisher = EventPublisher::from_arc(broker.clone());
        publisher
            .publish_bytes("svc.jobs", "text/plain", "poison")
            .await
            .unwrap();
        publisher
            .publish_bytes("svc.jobs", "text/plain", "fine")
            .await
            .unwrap();
        let letter = bounded("the dead letter", dead.next()).await.unwrap();
        assert_eq!(letter.message.body, "poison");
        letter.ack().await.unwrap();
        let mut tried = Vec::new();
        while let Ok(body) = tried_rx.try_recv() {
            tried.push(body);
        }
        assert_eq!(
            tried.iter().filter(|b| *b == "poison").count(),
            2,
            "{tried:?}"
        );
        assert!(tried.contains(&"fine".to_owned()), "{tried:?}");
        running.shutdown().await.unwrap();
        // Shut down, every delivery it took is settled and counted; the
        // subscription on the dead-letter topic is the test's own.
        assert_eq!(
            counts("svc.jobs"),
            Counts {
                published: 2,
                delivered: 3,
                acked: 1,
                nacked: 2,
                redelivered: 1,
                dead_lettered: 1,
            }
        );
        assert_eq!(counts("dead.svc.jobs"), Counts::default());
    }

    /// The broker counters of `topic` in the process's registry, where a
    /// service's subscribers and publishers count by default.
    fn counts(topic: &str) -> Counts {
        let topic = BrokerMetrics::of(Metrics::global()).topic(topic);
        Counts {
            published: topic.published().get(),
            delivered: topic.delivered().get(),
            acked: topic.acked().get(),
            nacked: topic.nacked().get(),
            redelivered: topic.redelivered().get(),
            dead_lettered: topic.dead_lettered().get(),
        }
    }

    #[derive(Debug, Default, PartialEq, Eq)]
    struct Counts {
        published: u64,
        delivered: u64,
        acked: u64,
        nacked: u64,
        redelivered: u64,
        dead_lettered: u64,
    }

    /// A service subscribed to `topic` through `subscriber`, whose handler
    /// fails on 13, is sent 1, 13 and 2 through `publisher`; once it is
    /// shut down, its counters say what happened, once each, and the
    /// scrape shows them by topic.
    async fn counted_once_each(
        publisher: Arc<dyn Broker>,
        subscriber: Arc<dyn Broker>,
        topic: &str,
    ) {
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<u64>();
        let running = Service::builder("counted")
            .broker(subscriber)
            .subscribe(
                topic,
                SubscribeOptions::queue("counted"),
                events::proto_handler(move |n: u64, _message: Message| {
                    let seen = seen_tx.clone();
                    async move {
                        let _ = seen.send(n);
                        if n == 13 {
                            return Err("unlucky".into());
                        }
                        Ok(())
                    }
                }),
            )
            .start()
            .await
            .unwrap();
        let publisher = EventPublisher::from_arc(publisher);
        for n in [1u64, 13, 2] {
            publisher.publish(topic, &n).await.unwrap();
        }
        for n in [1u64, 13, 2] {
            assert_eq!(bounded("a handled event", seen_rx.recv()).await, Some(n));
        }
        running.shutdown().await.unwrap();
        assert_eq!(
            counts(topic),
            Counts {
                published: 3,
                delivered: 3,
                acked: 2,
                nacked: 1,
                ..Counts::default()
            }
        );
        let scraped = Metrics::global().encode();
        for line in [
            format!("lodestar_broker_published_total{{topic=\"{topic}\"}} 3"),
            format!("lodestar_broker_nacked_total{{topic=\"{topic}\"}} 1"),
        ] {
            assert!(scraped.contains(&line), "{line} not in\n{scraped}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_memory_broker_counts_published_delivered_acked_and_nacked_once_each() {
        let broker: Arc<dyn Broker> = Arc::new(lodestar::MemoryBroker::new());
        counted_once_each(broker.clone(), broker, "counted.memory").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_http_broker_counts_published_delivered_acked_and_nacked_once_each() {
        let registry: Arc<dyn lodestar::Registry> = Arc::new(lodestar::MemoryRegistry::new());
        let publisher: Arc<dyn Broker> =
            Arc::new(lodestar_broker::HttpBroker::new(registry.clone()));
        let subscriber: Arc<dyn Broker> = Arc::new(lodestar_broker::HttpBroker::new(registry));
        counted_once_each(publisher, subscriber, "counted.http").await;
    }
}

/// A registry whose watches report the snapshot and then nothing more, like
/// a remote registry whose events lag far behind.
#[derive(Debug)]
struct StalledWatches(Arc<lodestar::MemoryRegistry>);

#[async_trait::async_trait]
impl lodestar::Registry for StalledWatches {
    async fn register(
        &self,
        instance: lodestar::Instance,
        ttl: Duration,
    ) -> Result<(), lodestar::RegistryError> {
        self.0.register(instance, ttl).await
    }
    async fn heartbeat(&self, key: &lodestar::InstanceKey) -> Result<(), lodestar::RegistryError> {
        self.0.heartbeat(key).await
    }
    async fn deregister(&self, key: &lodestar::InstanceKey) -> Result<(), lodestar::RegistryError> {
        self.0.deregister(key).await
    }
    async fn instances(
        &self,
        service: &lodestar::ServiceKey,
    ) -> Result<Vec<lodestar::Instance>, lodestar::RegistryError> {
        self.0.instances(service).await
    }
    async fn services(
        &self,
        namespace: &str,
    ) -> Result<Vec<lodestar::ServiceKey>, lodestar::RegistryError> {
        self.0.services(namespace).await
    }
    async fn watch(
        &self,
        service: &lodestar::ServiceKey,
        since: Option<lodestar::Revision>,
    ) -> Result<lodestar::WatchStream, lodestar::RegistryError> {
        let watch = self.0.watch(service, since).await?;
        Ok(Box::pin(
            watch.take(1).chain(futures_util::stream::pending()),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_publisher_with_a_lagging_cache_finds_a_replacement_queue_member() {
    let registry = Arc::new(lodestar::MemoryRegistry::new());
    let subscriber = lodestar_broker::HttpBroker::new(registry.clone());
    let publisher = lodestar_broker::HttpBroker::new(Arc::new(StalledWatches(registry.clone())));
    let first = subscriber
        .subscribe("lag.jobs", SubscribeOptions::queue("g"))
        .await
        .unwrap();
    // The publisher's cache now holds `first`, and never hears of changes.
    publisher
        .publish(Message::new("lag.jobs", "warm"))
        .await
        .unwrap();
    first.unsubscribe().await.unwrap();
    let mut second = subscriber
        .subscribe("lag.jobs", SubscribeOptions::queue("g"))
        .await
        .unwrap();
    // `first` answers 404; the registry, asked directly, names `second`.
    publisher
        .publish(Message::new("lag.jobs", "after"))
        .await
        .unwrap();
    let delivery = bounded("the replacement", second.next()).await.unwrap();
    assert_eq!(delivery.message.body, "after");
}

mod jetstream_recovery {
    use super::*;

    use super::durable_subscription as durable;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backlog_is_not_dead_lettered_while_it_waits_for_a_slow_subscriber() {
        let server = Nats::start().await;
        let broker = NatsBroker::connect(&server.url()).await.unwrap();
        let settings = Durable::new("slow")
            .ack_wait(Duration::from_secs(1))
            .max_deliver(2);
        let mut subscription = durable(&broker, "js.backlog", settings).await;
        let mut dead = durable(&broker, "dead.js.backlog", Durable::new("inspector")).await;
        for i in 0..40 {
            broker
                .publish(Message::new("js.backlog", i.to_string()))
                .await
                .unwrap();
        }
        // 40 × 50ms is twice the ack wait: only what is handed out may be
        // waiting on the clock.
        let mut handled = BTreeSet::new();
        while handled.len() < 40 {
            let delivery = bounded("a delivery", subscription.next()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            delivery.ack().await.unwrap();
            handled.insert(String::from_utf8_lossy(&delivery.message.body).into_owned());
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), dead.next())
                .await
                .is_err(),
            "a healthy message was dead-lettered"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unsubscribing_a_durable_with_a_backlog_returns() {
        let server = Nats::start().await;
        let broker = NatsBroker::connect(&server.url()).await.unwrap();
        let subscription = durable(&broker, "js.full", Durable::new("idle")).await;
        for i in 0..100 {
            broker
                .publish(Message::new("js.full", i.to_string()))
                .await
                .unwrap();
        }
        bounded("unsubscribe", subscription.unsubscribe())
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_consumer_and_stream_are_recreated() {
        let server = Nats::start().await;
        let broker = NatsBroker::connect(&server.url()).await.unwrap();
        let plain = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
        let mut subscription = durable(
            &broker,
            "js.phoenix",
            Durable::new("p").ack_wait(Duration::from_secs(1)),
        )
        .await;
        broker
            .publish(Message::new("js.phoenix", "before"))
            .await
            .unwrap();
        let first = bounded("before", subscription.next()).await.unwrap();
        first.ack().await.unwrap();
        // An operator deletes the stream (and with it the consumer).
        let name = plain.stream_by_subject("js.phoenix").await.unwrap();
        plain.delete_stream(&name).await.unwrap();
        // Publishing still works (the stream is gone, so it is a plain
        // publish), and the subscription comes back with its stream.
        bounded(
            "a publish without the stream",
            broker.publish(Message::new("js.phoenix", "gap")),
        )
        .await
        .unwrap();
        bounded("the stream to come back", async {
            while plain.stream_by_subject("js.phoenix").await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        broker
            .publish(Message::new("js.phoenix", "after"))
            .await
            .unwrap();
        loop {
            let delivery = bounded("after", subscription.next()).await.unwrap();
            delivery.ack().await.unwrap();
            if delivery.message.body == "after" {
                break;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resubscribing_with_new_settings_updates_the_consumer() {
        let server = Nats::start().await;
        let broker = NatsBroker::connect(&server.url()).await.unwrap();
        let plain = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
        let first = durable(
            &broker,
            "js.settings",
            Durable::new("s").ack_wait(Duration::from_secs(30)),
        )
        .await;
        first.unsubscribe().await.unwrap();
        let _second = durable(
            &broker,
            "js.settings",
            Durable::new("s").ack_wait(Duration::from_secs(2)),
        )
        .await;
        let name = plain.stream_by_subject("js.settings").await.unwrap();
        let stream = plain.get_stream(&name).await.unwrap();
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer("s").await.unwrap();
        assert_eq!(
            consumer.info().await.unwrap().config.ack_wait,
            Duration::from_secs(2)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_over_the_servers_limit_is_too_large() {
        let server = Nats::start().await;
        let broker = NatsBroker::connect(&server.url()).await.unwrap();
        let limit = broker.client().server_info().max_payload;
        // Over the limit counting the headers, though not the body alone.
        let plain = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
        // js.big has a stream (kept for the whole test), so its publish takes
        // the JetStream path; plain.big is a core publish.
        let _stored = durable(&broker, "js.big", Durable::new("big")).await;
        assert!(plain.stream_by_subject("js.big").await.is_ok());
        assert!(plain.stream_by_subject("plain.big").await.is_err());
        for topic in ["plain.big", "js.big"] {
            let message = Message::new(topic, vec![b'x'; limit]).with_header("message-id", "m");
            let error = broker.publish(message).await.unwrap_err();
            assert!(
                matches!(error, lodestar::BrokerError::TooLarge { .. }),
                "{topic}: {error:?}"
            );
        }
    }
}
