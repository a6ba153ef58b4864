//! The broker's counters: messages published, delivered to handlers,
//! acked, nacked, redelivered and dead-lettered, by topic.
//!
//! Counted once per message whatever the backend: published by
//! [`EventPublisher`](crate::events::EventPublisher); delivered, acked,
//! nacked and redelivered where a subscriber started by the
//! [`Service`](crate::Service) builder hands a delivery to its handler
//! and settles it; dead-lettered by the backends that dead-letter
//! (JetStream). A topic's counters are found once
//! ([`BrokerMetrics::topic`], a lock-free lookup after the first) and
//! kept by whoever counts on them.
//!
//! The topics a process counts are bounded: past [`MAX_TOPICS`], further
//! topics count as one `_OTHER` series.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::Metrics;
use super::bounded::Bounded;

/// The most topics a registry keeps series for; more count as `_OTHER`.
pub const MAX_TOPICS: usize = 1000;

/// The `topic` of messages on topics past [`MAX_TOPICS`].
pub const OTHER_TOPIC: &str = super::bounded::OTHER;

type Labels = [(&'static str, String); 1];

/// The broker's counter families in one [`Metrics`] registry. Cheap to
/// clone.
///
/// ```
/// use lodestar::metrics::{BrokerMetrics, Metrics};
///
/// let metrics = Metrics::new();
/// let orders = BrokerMetrics::of(&metrics).topic("orders.created");
/// orders.published().inc();
/// assert!(metrics.encode().contains(r#"lodestar_broker_published_total{topic="orders.created"} 1"#));
/// ```
#[derive(Clone)]
pub struct BrokerMetrics {
    shared: Arc<Shared>,
}

struct Shared {
    families: [Family<Labels, Counter>; 6],
    /// Each topic's counters, read without a lock.
    topics: Bounded<TopicMetrics>,
}

impl std::fmt::Debug for BrokerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerMetrics").finish_non_exhaustive()
    }
}

/// The counters of one topic. Cheap to clone.
#[derive(Clone, Debug)]
pub struct TopicMetrics {
    counters: Arc<[Counter; 6]>,
}

impl TopicMetrics {
    /// Messages published on the topic.
    pub fn published(&self) -> &Counter {
        &self.counters[0]
    }

    /// Deliveries handed to a handler (redeliveries included).
    pub fn delivered(&self) -> &Counter {
        &self.counters[1]
    }

    /// Deliveries acked: the handler succeeded.
    pub fn acked(&self) -> &Counter {
        &self.counters[2]
    }

    /// Deliveries nacked: the handler failed (or panicked).
    pub fn nacked(&self) -> &Counter {
        &self.counters[3]
    }

    /// Deliveries that were not a message's first.
    pub fn redelivered(&self) -> &Counter {
        &self.counters[4]
    }

    /// Messages given up on and moved to the dead-letter topic.
    pub fn dead_lettered(&self) -> &Counter {
        &self.counters[5]
    }
}

impl BrokerMetrics {
    /// The broker's families in `metrics`, registered the first time.
    pub fn of(metrics: &Metrics) -> Self {
        metrics.set(|registry| {
            let families: [Family<Labels, Counter>; 6] = Default::default();
            let described = [
                ("lodestar_broker_published", "Messages published, by topic"),
                (
                    "lodestar_broker_delivered",
                    "Deliveries handed to a subscriber's handler, redeliveries included, by topic",
                ),
                (
                    "lodestar_broker_acked",
                    "Deliveries acked after their handler succeeded, by topic",
                ),
                (
                    "lodestar_broker_nacked",
                    "Deliveries nacked after their handler failed, by topic",
                ),
                (
                    "lodestar_broker_redelivered",
                    "Deliveries that were not a message's first, by topic",
                ),
                (
                    "lodestar_broker_dead_lettered",
                    "Messages moved to their dead-letter topic after their last attempt, by topic",
                ),
            ];
            for ((name, help), family) in described.into_iter().zip(&families) {
                registry.register(name, help, family.clone());
            }
            BrokerMetrics {
                shared: Arc::new(Shared {
                    families,
                    topics: Bounded::new(MAX_TOPICS),
                }),
            }
        })
    }

    /// The counters of `topic` (or of `_OTHER`, past [`MAX_TOPICS`]).
    /// Allocates only the first time a topic is seen.
    pub fn topic(&self, topic: &str) -> TopicMetrics {
        self.shared.topics.find(
            topic,
            |_| true,
            |name| {
                let labels: Labels = [("topic", name.to_owned())];
                let counters = self
                    .shared
                    .families
                    .each_ref()
                    .map(|family| family.get_or_create(&labels).clone());
                TopicMetrics {
                    counters: Arc::new(counters),
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn topics_past_the_bound_count_as_one_other_series() {
        let metrics = Metrics::new();
        let broker = BrokerMetrics::of(&metrics);
        for n in 0..MAX_TOPICS + 50 {
            broker.topic(&format!("t{n}")).published().inc();
        }
        // Found again, not counted anew.
        broker.topic("t0").published().inc();
        let text = metrics.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("lodestar_broker_published_total{"))
            .count();
        assert_eq!(series, MAX_TOPICS + 1);
        assert!(text.contains(r#"lodestar_broker_published_total{topic="_OTHER"} 50"#));
        assert!(text.contains(r#"lodestar_broker_published_total{topic="t0"} 2"#));
        // The same families from the same registry.
        BrokerMetrics::of(&metrics).topic("t1").acked().inc();
        assert!(
            metrics
                .encode()
                .contains(r#"lodestar_broker_acked_total{topic="t1"} 1"#)
        );
    }
}
