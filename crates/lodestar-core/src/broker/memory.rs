//! The in-process broker.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use super::{
    Broker, BrokerError, Delivery, Message, SubscribeOptions, Subscription, Unsubscribe,
    validate_message, validate_plain_subscription,
};
use crate::sync::MutexExt;

/// How many undelivered messages a subscriber may hold before publishers wait.
const DEFAULT_CAPACITY: usize = 1024;

/// A broker inside one process: no setup, for development and tests.
///
/// Delivery is at most once. A subscriber that falls behind by more than
/// its buffer (1024 messages by default) makes publishers wait for it, so
/// nothing is dropped while it is subscribed. Durable subscriptions are
/// [unsupported](BrokerError::Unsupported).
///
/// ```
/// use lodestar_core::MemoryBroker;
/// use lodestar_core::broker::{Broker, Message, SubscribeOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), lodestar_core::broker::BrokerError> {
/// let broker = MemoryBroker::new();
/// let mut orders = broker.subscribe("orders.created", SubscribeOptions::broadcast()).await?;
/// broker.publish(Message::new("orders.created", "order 7")).await?;
/// let delivery = orders.next().await.unwrap();
/// assert_eq!(delivery.message.body, "order 7");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    topics: Mutex<HashMap<String, Topic>>,
    next_id: AtomicU64,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Topic {
    broadcast: Vec<Subscriber>,
    groups: BTreeMap<String, Group>,
}

#[derive(Debug, Default)]
struct Group {
    members: Vec<Subscriber>,
    next: usize,
}

#[derive(Debug)]
struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Delivery>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// An empty broker whose subscribers buffer up to `capacity` messages.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                topics: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                capacity: capacity.max(1),
            }),
        }
    }
}

impl Inner {
    fn topics(&self) -> MutexGuard<'_, HashMap<String, Topic>> {
        self.topics.lock_unpoisoned()
    }

    fn remove(&self, topic: &str, id: u64) {
        let mut topics = self.topics();
        let Some(entry) = topics.get_mut(topic) else {
            return;
        };
        entry.broadcast.retain(|s| s.id != id);
        entry.groups.retain(|_, group| {
            group.members.retain(|s| s.id != id);
            !group.members.is_empty()
        });
        if entry.broadcast.is_empty() && entry.groups.is_empty() {
            topics.remove(topic);
        }
    }
}

/// Removes the subscriber when the subscription ends.
struct Guard {
    inner: Arc<Inner>,
    topic: String,
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner.remove(&self.topic, self.id);
    }
}

#[async_trait::async_trait]
impl Unsubscribe for Guard {
    async fn unsubscribe(self: Box<Self>) -> Result<(), BrokerError> {
        // Dropping removes the subscriber.
        Ok(())
    }
}

#[async_trait::async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, message: Message) -> Result<(), BrokerError> {
        validate_message(&message)?;
        // Pick the receivers under the lock, send outside it.
        let targets: Vec<mpsc::Sender<Delivery>> = {
            let mut topics = self.inner.topics();
            let Some(topic) = topics.get_mut(&message.topic) else {
                return Ok(());
            };
            let mut targets: Vec<_> = topic.broadcast.iter().map(|s| s.tx.clone()).collect();
            for group in topic.groups.values_mut() {
                let n = group.members.len();
                // The next member still listening, round robin.
                for step in 0..n {
                    let member = &group.members[(group.next + step) % n];
                    if !member.tx.is_closed() {
                        targets.push(member.tx.clone());
                        group.next = (group.next + step + 1) % n;
                        break;
                    }
                }
            }
            targets
        };
        for tx in targets {
            // The body is shared, not copied. A receiver that went away
            // meanwhile simply misses the message.
            let _ = tx.send(Delivery::new(message.clone())).await;
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, BrokerError> {
        validate_plain_subscription(topic, &options, "memory")?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.inner.capacity);
        {
            let mut topics = self.inner.topics();
            let entry = topics.entry(topic.to_owned()).or_default();
            let subscriber = Subscriber { id, tx };
            match options.queue {
                Some(queue) => entry
                    .groups
                    .entry(queue)
                    .or_default()
                    .members
                    .push(subscriber),
                None => entry.broadcast.push(subscriber),
            }
        }
        let guard = Guard {
            inner: self.inner.clone(),
            topic: topic.to_owned(),
            id,
        };
        Ok(Subscription::from_channel(topic, rx, guard))
    }
}
