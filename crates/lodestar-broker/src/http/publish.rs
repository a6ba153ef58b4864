//! The publishers' side: per-topic subscriber caches fed by registry
//! watches, and delivery (broadcast, and one member per queue group).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use lodestar::broker::BrokerError;
use lodestar::{Registry, ServiceKey};
use lodestar_core::error::chain;
use lodestar_core::registry::Follow;
use lodestar_core::sync::MutexExt;
use lodestar_core::task::AbortOnDrop;
use tokio::sync::watch;

use super::wire::PATH_PREFIX;
use super::{IDLE_TOPIC, Inner, QUEUE_LABEL, service_name};

/// A topic's watch task and what it maintains.
pub(super) struct TopicWatch {
    pub(super) subscribers: Arc<Subscribers>,
    /// When this topic was last published to.
    pub(super) used: Instant,
    pub(super) _task: AbortOnDrop<()>,
}

/// The known subscribers of one topic.
pub(super) struct Subscribers {
    pub(super) known: Mutex<Known>,
    /// `true` once the first snapshot arrived.
    pub(super) ready: watch::Sender<bool>,
}

/// The followed registry watch and what publishing keeps beside it. The
/// watch task advances the watch; a publisher also takes in whatever
/// events are already waiting before choosing targets, so that a
/// subscription registered just before a publish (in the same process, or
/// one the registry already reported) is not missed.
pub(super) struct Known {
    pub(super) follow: Follow,
    /// The watch task's waker. Whoever advances `follow` polls with it, so
    /// that the task is still woken for the next event.
    pub(super) waker: Option<Waker>,
    /// Round-robin position per queue group.
    pub(super) next: HashMap<String, usize>,
    /// Why the watch last failed, to explain a publish that cannot wait.
    pub(super) last_error: Option<String>,
}

/// Where to POST a message for one subscription.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub(super) id: String,
    pub(super) address: String,
}

/// Who gets one message.
#[derive(Default)]
pub(super) struct Targets {
    pub(super) broadcast: Vec<Target>,
    /// Per queue group, its members in the order to try them.
    pub(super) groups: BTreeMap<String, Vec<Target>>,
}

impl Subscribers {
    /// Takes in what the watch has ready, polling with `cx`, until it has
    /// nothing more (`cx` is woken when it has).
    pub(super) fn pump(&self, known: &mut Known, cx: &mut Context<'_>) {
        loop {
            match known.follow.poll_next(cx) {
                Poll::Ready(Ok(_)) => {
                    known.last_error = None;
                    self.ready.send_replace(true);
                }
                Poll::Ready(Err(error)) => {
                    tracing::warn!(service = %known.follow.service(), %error,
                        retry_in = ?known.follow.retry_in(), "HTTP broker: watching subscribers failed");
                    known.last_error = Some(error.to_string());
                }
                Poll::Pending => return,
            }
        }
    }

    /// Applies the events already waiting, without waiting for more.
    pub(super) fn catch_up(&self) {
        let mut known = self.known.lock_unpoisoned();
        let Some(waker) = known.waker.clone() else {
            return;
        };
        self.pump(&mut known, &mut Context::from_waker(&waker));
    }

    /// The targets of the next message, advancing each group's round robin.
    pub(super) fn select(&self) -> Targets {
        self.catch_up();
        let mut known = self.known.lock_unpoisoned();
        let Known { follow, next, .. } = &mut *known;
        let mut targets = Targets::default();
        for instance in follow.instances().values().filter(|i| i.is_routable()) {
            let target = Target {
                id: instance.id.clone(),
                address: instance.address.clone(),
            };
            match instance.metadata.get(QUEUE_LABEL).filter(|q| !q.is_empty()) {
                Some(queue) => targets
                    .groups
                    .entry(queue.clone())
                    .or_default()
                    .push(target),
                None => targets.broadcast.push(target),
            }
        }
        next.retain(|group, _| targets.groups.contains_key(group));
        for (group, members) in &mut targets.groups {
            // Start each group at a random member, so that short-lived
            // publishers do not all pick the same one first.
            let position = next
                .entry(group.clone())
                .or_insert_with(|| fastrand::usize(..));
            let start = *position % members.len();
            *position = start.wrapping_add(1);
            members.rotate_left(start);
        }
        targets
    }
}

/// Keeps `subscribers` current: follows the registry watch (resuming from
/// the last applied revision after an error, with backoff), until aborted.
pub(super) async fn watch_topic(subscribers: Arc<Subscribers>) {
    std::future::poll_fn(|cx| {
        let mut known = subscribers.known.lock_unpoisoned();
        match &mut known.waker {
            Some(waker) => waker.clone_from(cx.waker()),
            None => known.waker = Some(cx.waker().clone()),
        }
        subscribers.pump(&mut known, cx);
        Poll::<()>::Pending
    })
    .await
}

impl Inner {
    /// The subscribers of `topic`, starting to watch them on first use and
    /// waiting (bounded) for the first snapshot.
    pub(super) async fn subscribers(&self, topic: &str) -> Result<Arc<Subscribers>, BrokerError> {
        let subscribers = {
            let mut topics = self.topics.lock_unpoisoned();
            if !topics.contains_key(topic) {
                // Stop watching topics nobody publishes to any more (only
                // when a new one starts, so the common path stays O(1)).
                topics.retain(|_, watch| watch.used.elapsed() < IDLE_TOPIC);
            }
            let watch = topics.entry(topic.to_owned()).or_insert_with(|| {
                let follow =
                    Follow::new(self.registry.clone(), ServiceKey::new(service_name(topic)));
                let subscribers = Arc::new(Subscribers {
                    known: Mutex::new(Known {
                        follow,
                        waker: None,
                        next: HashMap::new(),
                        last_error: None,
                    }),
                    ready: watch::Sender::new(false),
                });
                let task = tokio::spawn(watch_topic(subscribers.clone()));
                TopicWatch {
                    subscribers,
                    used: Instant::now(),
                    _task: AbortOnDrop::new(task),
                }
            });
            watch.used = Instant::now();
            watch.subscribers.clone()
        };
        let mut ready = subscribers.ready.subscribe();
        let timeout = self.config.request_timeout;
        match tokio::time::timeout(timeout, ready.wait_for(|ready| *ready)).await {
            Ok(Ok(_)) => Ok(subscribers),
            Ok(Err(_)) => Err(BrokerError::Closed),
            Err(_) => {
                let why = subscribers
                    .known
                    .lock_unpoisoned()
                    .last_error
                    .clone()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                Err(BrokerError::Unavailable(format!(
                    "the registry did not list the subscribers of `{}` within {timeout:?}{why}",
                    service_name(topic)
                )))
            }
        }
    }

    /// POSTs `message` to one subscription.
    pub(super) async fn post(
        &self,
        target: &Target,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<(), Failure> {
        let url = format!("http://{}{PATH_PREFIX}{}", target.address, target.id);
        let uri: Uri = url
            .parse()
            .map_err(|e| Failure::Failed(format!("{url}: not a valid URL: {e}")))?;
        let mut request = Request::new(Full::new(body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers.clone();
        let timeout = self.config.request_timeout;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| Failure::Failed(format!("{url}: {}", chain(&e))))?;
            let status = response.status();
            // Read the (short) body so that the connection can be reused.
            let text = match response.into_body().collect().await {
                Ok(body) => String::from_utf8_lossy(&body.to_bytes()).trim().to_owned(),
                Err(e) => chain(&e),
            };
            if status.is_success() {
                Ok(())
            } else if status == StatusCode::NOT_FOUND {
                Err(Failure::Gone(format!("{url}: {status} {text}")))
            } else if status.is_client_error()
                && status != StatusCode::REQUEST_TIMEOUT
                && status != StatusCode::TOO_MANY_REQUESTS
            {
                // The subscriber refused this message; asking again would
                // get the same answer.
                Err(Failure::Refused(format!("{url}: {status} {text}")))
            } else {
                Err(Failure::Failed(format!("{url}: {status} {text}")))
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Failed(format!(
                "{url}: no answer within {timeout:?}"
            ))),
        }
    }

    /// Delivers to a broadcast subscriber, retrying once; failures are logged.
    pub(super) async fn deliver_broadcast(
        &self,
        topic: &str,
        target: &Target,
        headers: &HeaderMap,
        body: &Bytes,
    ) {
        let mut result = self.post(target, headers, body).await;
        if let Err(Failure::Failed(_)) = result {
            result = self.post(target, headers, body).await;
        }
        match result {
            Ok(()) => {}
            Err(Failure::Gone(reason)) => {
                tracing::debug!(topic, subscription = %target.id, %reason, "HTTP broker: skipping a subscriber that has unsubscribed");
            }
            Err(Failure::Failed(reason) | Failure::Refused(reason)) => {
                tracing::warn!(topic, subscription = %target.id, %reason, "HTTP broker: skipping a subscriber that failed; it misses this message");
            }
        }
    }

    /// Members of `queue` the registry lists now that are not in `known`.
    pub(super) async fn fresh_members(
        &self,
        topic: &str,
        queue: &str,
        known: &[Target],
    ) -> Vec<Target> {
        let key = ServiceKey::new(service_name(topic));
        let listed =
            tokio::time::timeout(self.config.request_timeout, self.registry.instances(&key)).await;
        let Ok(Ok(instances)) = listed else {
            return Vec::new();
        };
        instances
            .into_iter()
            .filter(|i| i.is_routable())
            .filter(|i| i.metadata.get(QUEUE_LABEL).is_some_and(|q| q == queue))
            .filter(|i| !known.iter().any(|k| k.id == i.id))
            .map(|i| Target {
                id: i.id,
                address: i.address,
            })
            .collect()
    }

    /// Delivers to one member of a queue group, trying them in turn.
    pub(super) async fn deliver_group(
        &self,
        topic: &str,
        queue: &str,
        members: &[Target],
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<(), BrokerError> {
        let mut reasons = Vec::new();
        for member in members {
            match self.post(member, headers, body).await {
                Ok(()) => return Ok(()),
                Err(Failure::Gone(reason) | Failure::Failed(reason) | Failure::Refused(reason)) => {
                    tracing::debug!(topic, queue, subscription = %member.id, %reason, "HTTP broker: queue member failed; trying the next");
                    reasons.push(reason);
                }
            }
        }
        // Every member the cache knows failed. Before giving up, ask the
        // registry itself (off the hot path: only here) for members the
        // watch has not brought yet, e.g. one that just replaced them.
        let mut tried = members.len();
        for member in self.fresh_members(topic, queue, members).await {
            tried += 1;
            match self.post(&member, headers, body).await {
                Ok(()) => return Ok(()),
                Err(Failure::Gone(reason) | Failure::Failed(reason) | Failure::Refused(reason)) => {
                    reasons.push(reason)
                }
            }
        }
        let reason = format!("all {tried} member(s) failed: {}", reasons.join("; "));
        tracing::warn!(topic, queue, %reason, "HTTP broker: no queue member took a message");
        Err(BrokerError::NoSubscriber {
            topic: topic.to_owned(),
            queue: queue.to_owned(),
            reason,
        })
    }
}

/// Why one POST did not deliver.
pub(super) enum Failure {
    /// `404`: the subscription has ended.
    Gone(String),
    /// A 4xx answer about the message itself: not retried.
    Refused(String),
    /// Unreachable, timed out, or another non-2xx answer.
    Failed(String),
}
