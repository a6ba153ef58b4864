//! [`Follow`]: the instances of one service, kept current by a watch that
//! survives registry failures.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use super::{Registry, RegistryError, Revision, WatchEvent, WatchStream};
use crate::backoff::Backoff;
use crate::{Instance, ServiceKey};

/// The first wait before watching again after a failure.
pub const FOLLOW_BACKOFF_FIRST: Duration = Duration::from_millis(50);

/// The longest wait between two attempts to watch (the wait doubles from
/// [`FOLLOW_BACKOFF_FIRST`] after each failure, and starts over once an
/// event arrives).
pub const FOLLOW_BACKOFF_MAX: Duration = Duration::from_secs(5);

type Opening = Pin<Box<dyn Future<Output = Result<WatchStream, RegistryError>> + Send>>;

/// Follows one service in a registry: the set of its instances (by id),
/// kept current by [`Registry::watch`].
///
/// Each call of [`next`](Self::next) waits for the next change and
/// answers the whole set after it, or the registry's error. After an error
/// the last known set is kept, and the service is watched again from the
/// last revision seen (so only the missed changes come, or a fresh
/// snapshot), after a wait that doubles from [`FOLLOW_BACKOFF_FIRST`] to
/// [`FOLLOW_BACKOFF_MAX`] and starts over with the next event. A watch that
/// ends without an error is watched again the same way, without reporting
/// it. The first watch starts at the first call of `next`.
///
/// For a task that also needs to take in the events already waiting from
/// elsewhere, without waiting, there is [`poll_next`](Self::poll_next).
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use lodestar_core::registry::Follow;
/// use lodestar_core::{Instance, MemoryRegistry, Registry, ServiceKey};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), lodestar_core::RegistryError> {
/// let registry = Arc::new(MemoryRegistry::new());
/// let mut orders = Follow::new(registry.clone(), ServiceKey::new("orders"));
/// assert!(orders.next().await?.is_empty()); // the first snapshot
///
/// registry.register(Instance::new("orders", "127.0.0.1:7001").with_id("a"), Duration::from_secs(10)).await?;
/// let known = orders.next().await?;
/// assert_eq!(known.keys().collect::<Vec<_>>(), ["a"]);
/// # Ok(())
/// # }
/// ```
pub struct Follow {
    registry: Arc<dyn Registry>,
    service: ServiceKey,
    instances: BTreeMap<String, Instance>,
    revision: Option<Revision>,
    backoff: Backoff,
    /// The wait in progress after a failure.
    retry_in: Option<Duration>,
    state: State,
}

enum State {
    /// About to watch.
    Idle,
    /// Asking the registry for a watch.
    Opening(Opening),
    /// Taking in the watch's events.
    Watching(WatchStream),
    /// Waiting before watching again.
    Waiting(Pin<Box<tokio::time::Sleep>>),
}

impl std::fmt::Debug for Follow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Idle => "idle",
            State::Opening(_) => "opening a watch",
            State::Watching(_) => "watching",
            State::Waiting(_) => "waiting to watch again",
        };
        f.debug_struct("Follow")
            .field("registry", &self.registry)
            .field("service", &self.service)
            .field("instances", &self.instances.len())
            .field("revision", &self.revision)
            .field("state", &state)
            .finish()
    }
}

impl Follow {
    /// Follows `service` in `registry`, knowing no instances yet.
    pub fn new(registry: Arc<dyn Registry>, service: ServiceKey) -> Self {
        Self {
            registry,
            service,
            instances: BTreeMap::new(),
            revision: None,
            backoff: Backoff::new(FOLLOW_BACKOFF_FIRST, FOLLOW_BACKOFF_MAX),
            retry_in: None,
            state: State::Idle,
        }
    }

    /// The service followed.
    pub fn service(&self) -> &ServiceKey {
        &self.service
    }

    /// The instances as last known, by id (empty before the first event).
    pub fn instances(&self) -> &BTreeMap<String, Instance> {
        &self.instances
    }

    /// The revision of the last event taken in; the next watch starts after it.
    pub fn revision(&self) -> Option<Revision> {
        self.revision
    }

    /// After a failure, how long it waits before watching again; `None`
    /// while it is watching.
    pub fn retry_in(&self) -> Option<Duration> {
        self.retry_in
    }

    /// Waits for the next change, and answers every instance after it; or
    /// the registry's error (the last known instances are kept, see
    /// [`instances`](Self::instances)), after which the next call watches
    /// again, with backoff. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Result<&BTreeMap<String, Instance>, RegistryError> {
        std::future::poll_fn(|cx| self.advance(cx)).await?;
        Ok(&self.instances)
    }

    /// [`next`](Self::next) as a poll: `Ready` with every instance after a
    /// change, or with the registry's error; `Pending` (and `cx` woken
    /// later) while nothing has changed.
    pub fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<&BTreeMap<String, Instance>, RegistryError>> {
        ready!(self.advance(cx))?;
        Poll::Ready(Ok(&self.instances))
    }

    /// Moves on until one event was taken in or the registry failed.
    fn advance(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RegistryError>> {
        loop {
            match &mut self.state {
                State::Idle => {
                    let registry = self.registry.clone();
                    let service = self.service.clone();
                    let since = self.revision;
                    self.state =
                        State::Opening(Box::pin(
                            async move { registry.watch(&service, since).await },
                        ));
                }
                State::Opening(opening) => match ready!(opening.as_mut().poll(cx)) {
                    Ok(stream) => self.state = State::Watching(stream),
                    Err(error) => {
                        self.wait();
                        return Poll::Ready(Err(error));
                    }
                },
                State::Watching(stream) => match ready!(stream.as_mut().poll_next(cx)) {
                    Some(Ok(event)) => {
                        self.apply(event);
                        self.backoff.reset();
                        return Poll::Ready(Ok(()));
                    }
                    Some(Err(error)) => {
                        self.wait();
                        return Poll::Ready(Err(error));
                    }
                    // Ended without a word: watch again, after a wait.
                    None => self.wait(),
                },
                State::Waiting(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    self.retry_in = None;
                    self.state = State::Idle;
                }
            }
        }
    }

    fn wait(&mut self) {
        let wait = self.backoff.next_wait();
        self.retry_in = Some(wait);
        self.state = State::Waiting(Box::pin(tokio::time::sleep(wait)));
    }

    fn apply(&mut self, event: WatchEvent) {
        self.revision = Some(event.revision());
        match event {
            WatchEvent::Snapshot { instances, .. } => {
                self.instances = instances.into_iter().map(|i| (i.id.clone(), i)).collect();
            }
            WatchEvent::Put { instance, .. } => {
                self.instances.insert(instance.id.clone(), instance);
            }
            WatchEvent::Delete { id, .. } => {
                self.instances.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::sync::MutexExt;
    use crate::{InstanceKey, MemoryRegistry};

    /// What one `watch` call answers: a stream of these events, or an error.
    type Answer = Result<Vec<Result<WatchEvent, RegistryError>>, RegistryError>;

    /// A registry whose watches are scripted: each `watch` call takes the
    /// next answer (a stream of these events, or an error), and records
    /// the revision it was asked from and when.
    #[derive(Debug, Default)]
    struct Scripted {
        answers: Mutex<VecDeque<Answer>>,
        asked: Mutex<Vec<(Option<Revision>, tokio::time::Instant)>>,
    }

    impl Scripted {
        fn answer(&self, answer: Answer) {
            self.answers.lock_unpoisoned().push_back(answer);
        }
    }

    #[async_trait::async_trait]
    impl Registry for Scripted {
        async fn register(&self, _: Instance, _: Duration) -> Result<(), RegistryError> {
            unimplemented!()
        }
        async fn heartbeat(&self, _: &InstanceKey) -> Result<(), RegistryError> {
            unimplemented!()
        }
        async fn deregister(&self, _: &InstanceKey) -> Result<(), RegistryError> {
            unimplemented!()
        }
        async fn instances(&self, _: &ServiceKey) -> Result<Vec<Instance>, RegistryError> {
            unimplemented!()
        }
        async fn services(&self, _: &str) -> Result<Vec<ServiceKey>, RegistryError> {
            unimplemented!()
        }
        async fn watch(
            &self,
            _: &ServiceKey,
            since: Option<Revision>,
        ) -> Result<WatchStream, RegistryError> {
            self.asked
                .lock_unpoisoned()
                .push((since, tokio::time::Instant::now()));
            let answer = self.answers.lock_unpoisoned().pop_front();
            match answer {
                Some(Ok(events)) => Ok(Box::pin(futures_util::stream::iter(events))),
                Some(Err(error)) => Err(error),
                // Nothing more scripted: a watch that never says anything.
                None => Ok(Box::pin(futures_util::stream::pending())),
            }
        }
    }

    fn instance(id: &str) -> Instance {
        Instance::new("svc", "127.0.0.1:1").with_id(id)
    }

    fn ids(instances: &BTreeMap<String, Instance>) -> Vec<&str> {
        instances.keys().map(String::as_str).collect()
    }

    fn down() -> RegistryError {
        RegistryError::Unavailable("down".into())
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_the_last_instances_across_errors_and_resumes_from_the_last_revision() {
        let registry = Arc::new(Scripted::default());
        registry.answer(Ok(vec![
            Ok(WatchEvent::Snapshot {
                revision: 3,
                instances: vec![instance("a"), instance("b")],
            }),
            Ok(WatchEvent::Delete {
                revision: 4,
                id: "a".into(),
            }),
            Err(down()),
        ]));
        registry.answer(Err(down()));
        registry.answer(Ok(vec![Ok(WatchEvent::Put {
            revision: 5,
            instance: instance("c"),
        })]));
        let mut follow = Follow::new(registry.clone(), ServiceKey::new("svc"));

        assert_eq!(ids(follow.next().await.unwrap()), ["a", "b"]);
        assert_eq!(ids(follow.next().await.unwrap()), ["b"]);
        assert_eq!(follow.next().await.unwrap_err(), down());
        assert_eq!(ids(follow.instances()), ["b"]);
        assert_eq!(follow.retry_in(), Some(Duration::from_millis(50)));
        assert_eq!(follow.next().await.unwrap_err(), down());
        assert_eq!(follow.retry_in(), Some(Duration::from_millis(100)));
        assert_eq!(ids(follow.instances()), ["b"]);
        assert_eq!(ids(follow.next().await.unwrap()), ["b", "c"]);
        assert_eq!(follow.revision(), Some(5));
        assert_eq!(follow.retry_in(), None);

        let asked = registry.asked.lock_unpoisoned().clone();
        let since: Vec<Option<Revision>> = asked.iter().map(|(since, _)| *since).collect();
        assert_eq!(since, [None, Some(4), Some(4)]);
        // 50 ms after the first failure, then 100 ms after the second.
        assert_eq!(asked[1].1 - asked[0].1, Duration::from_millis(50));
        assert_eq!(asked[2].1 - asked[1].1, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_doubles_to_five_seconds_and_starts_over_after_an_event() {
        let registry = Arc::new(Scripted::default());
        for _ in 0..9 {
            registry.answer(Err(down()));
        }
        registry.answer(Ok(vec![
            Ok(WatchEvent::Snapshot {
                revision: 1,
                instances: vec![],
            }),
            Err(down()),
        ]));
        registry.answer(Err(down()));
        let mut follow = Follow::new(registry.clone(), ServiceKey::new("svc"));
        for _ in 0..9 {
            follow.next().await.unwrap_err();
        }
        follow.next().await.unwrap();
        follow.next().await.unwrap_err();
        follow.next().await.unwrap_err();

        let asked = registry.asked.lock_unpoisoned().clone();
        let waits: Vec<u128> = asked
            .windows(2)
            .map(|w| (w[1].1 - w[0].1).as_millis())
            .collect();
        // Nine failed watches, then one that brought an event and failed:
        // after it, the wait starts over at 50 ms.
        assert_eq!(waits, [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 50]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_that_ends_is_watched_again_without_an_error() {
        let registry = Arc::new(Scripted::default());
        registry.answer(Ok(vec![Ok(WatchEvent::Snapshot {
            revision: 7,
            instances: vec![instance("a")],
        })]));
        registry.answer(Ok(vec![Ok(WatchEvent::Put {
            revision: 8,
            instance: instance("b"),
        })]));
        let mut follow = Follow::new(registry.clone(), ServiceKey::new("svc"));
        assert_eq!(ids(follow.next().await.unwrap()), ["a"]);
        assert_eq!(ids(follow.next().await.unwrap()), ["a", "b"]);
        let since: Vec<Option<Revision>> = registry
            .asked
            .lock_unpoisoned()
            .iter()
            .map(|(since, _)| *since)
            .collect();
        assert_eq!(since, [None, Some(7)]);
    }

    #[tokio::test]
    async fn follows_a_real_registry() {
        let registry = Arc::new(MemoryRegistry::new());
        registry
            .register(instance("a"), Duration::from_secs(10))
            .await
            .unwrap();
        let mut follow = Follow::new(registry.clone(), ServiceKey::new("svc"));
        let bounded = Duration::from_secs(5);
        let first = tokio::time::timeout(bounded, follow.next()).await.unwrap();
        assert_eq!(ids(first.unwrap()), ["a"]);
        registry
            .deregister(&instance("a").instance_key())
            .await
            .unwrap();
        let next = tokio::time::timeout(bounded, follow.next()).await.unwrap();
        assert!(next.unwrap().is_empty());
    }

    #[tokio::test]
    async fn poll_next_takes_in_what_is_waiting_without_waiting() {
        let registry = Arc::new(MemoryRegistry::new());
        let mut follow = Follow::new(registry.clone(), ServiceKey::new("svc"));
        tokio::time::timeout(Duration::from_secs(5), follow.next())
            .await
            .unwrap()
            .unwrap();
        registry
            .register(instance("a"), Duration::from_secs(10))
            .await
            .unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match follow.poll_next(&mut cx) {
            Poll::Ready(Ok(instances)) => assert_eq!(ids(instances), ["a"]),
            other => panic!("expected the waiting event, got {other:?}"),
        }
        assert!(follow.poll_next(&mut cx).is_pending());
    }
}
