//! [`KeepRegistered`]: an instance's registration, renewed for as long as
//! it runs.

use std::sync::Arc;
use std::time::Duration;

use super::{Registry, RegistryError};
use crate::Instance;

/// The shortest interval between two heartbeats, whatever is configured.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);

/// Keeps one instance registered: heartbeats every interval, registers it
/// again when the registry says it lost it
/// ([`NotFound`](RegistryError::NotFound) or
/// [`LeaseExpired`](RegistryError::LeaseExpired)), and keeps trying, every
/// interval, while the registry cannot be reached. Each call is bounded by
/// the interval (an unanswered call counts as unreachable), so that one
/// hung call never holds up the next beat. Heartbeats keep to their
/// schedule, whatever each call took.
///
/// [`run`](Self::run) runs until its task is aborted (or its future
/// dropped); deregistering is the owner's business, after that.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use lodestar_core::registry::KeepRegistered;
/// use lodestar_core::{Instance, MemoryRegistry, Registry, ServiceKey};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), lodestar_core::RegistryError> {
/// let registry = Arc::new(MemoryRegistry::new());
/// let instance = Instance::new("orders", "127.0.0.1:7001");
/// let keeping = tokio::spawn(
///     KeepRegistered::new(registry.clone(), instance, Duration::from_secs(3))
///         .run(|| println!("registered")),
/// );
/// tokio::time::sleep(Duration::from_secs(60)).await; // many TTLs: still there
/// assert_eq!(registry.instances(&ServiceKey::new("orders")).await?.len(), 1);
/// keeping.abort();
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct KeepRegistered {
    registry: Arc<dyn Registry>,
    instance: Instance,
    ttl: Duration,
    interval: Duration,
    registered: bool,
}

impl KeepRegistered {
    /// Keeps `instance` registered in `registry` with leases of `ttl`,
    /// heartbeating every third of `ttl` unless [`interval`](Self::interval)
    /// says otherwise. Registers it first, at once, unless
    /// [`already_registered`](Self::already_registered).
    pub fn new(registry: Arc<dyn Registry>, instance: Instance, ttl: Duration) -> Self {
        Self {
            registry,
            instance,
            ttl,
            interval: ttl / 3,
            registered: false,
        }
    }

    /// The time between two heartbeats, and the bound of each registry
    /// call; default a third of the TTL, at least [`MIN_HEARTBEAT_INTERVAL`].
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Whether the instance was just registered: then the first heartbeat
    /// is one interval from now, not a registration at once. Default false.
    pub fn already_registered(mut self, registered: bool) -> Self {
        self.registered = registered;
        self
    }

    /// Runs until aborted, calling `on_registered` after each registration
    /// it made (the first, unless [`already_registered`](Self::already_registered),
    /// and each one after the registry lost the instance).
    pub async fn run(self, mut on_registered: impl FnMut() + Send) {
        let Self {
            registry,
            instance,
            ttl,
            interval,
            mut registered,
        } = self;
        let interval = interval.max(MIN_HEARTBEAT_INTERVAL);
        let key = instance.instance_key();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if registered {
            // The first tick completes at once; the first heartbeat is due one interval later.
            ticker.tick().await;
        }
        loop {
            ticker.tick().await;
            let call = async {
                if registered {
                    registry.heartbeat(&key).await
                } else {
                    registry.register(instance.clone(), ttl).await
                }
            };
            let result = tokio::time::timeout(interval, call)
                .await
                .unwrap_or_else(|_| {
                    Err(RegistryError::Unavailable(format!(
                        "no answer within {interval:?}"
                    )))
                });
            match result {
                Ok(()) => {
                    if !registered {
                        on_registered();
                    }
                    registered = true;
                }
                Err(RegistryError::NotFound(_) | RegistryError::LeaseExpired(_)) => {
                    tracing::warn!(service = %instance.key, instance = %instance.id,
                        "the registry lost this instance; registering again");
                    registered = false;
                    ticker.reset_immediately();
                }
                Err(error) => {
                    tracing::warn!(service = %instance.key, instance = %instance.id, %error,
                        "registry unreachable; will retry every {interval:?}");
                    // If the lease is gone by the time the registry is back, a
                    // heartbeat says so and we register again.
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::time::Instant;

    use super::*;
    use crate::registry::{Revision, WatchStream};
    use crate::sync::MutexExt;
    use crate::{InstanceKey, MemoryRegistry, ServiceKey};

    /// A memory registry that can be made to hang, and records each call.
    #[derive(Debug, Default)]
    struct Flaky {
        inner: MemoryRegistry,
        hang: AtomicBool,
        calls: Mutex<Vec<(&'static str, Instant)>>,
    }

    impl Flaky {
        async fn call<T>(
            &self,
            name: &'static str,
            call: impl Future<Output = Result<T, RegistryError>>,
        ) -> Result<T, RegistryError> {
            self.calls.lock_unpoisoned().push((name, Instant::now()));
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            call.await
        }

        fn calls(&self) -> Vec<(&'static str, Instant)> {
            self.calls.lock_unpoisoned().clone()
        }
    }

    #[async_trait::async_trait]
    impl Registry for Flaky {
        async fn register(&self, instance: Instance, ttl: Duration) -> Result<(), RegistryError> {
            self.call("register", self.inner.register(instance, ttl))
                .await
        }
        async fn heartbeat(&self, key: &InstanceKey) -> Result<(), RegistryError> {
            self.call("heartbeat", self.inner.heartbeat(key)).await
        }
        async fn deregister(&self, key: &InstanceKey) -> Result<(), RegistryError> {
            self.inner.deregister(key).await
        }
        async fn instances(&self, service: &ServiceKey) -> Result<Vec<Instance>, RegistryError> {
            self.inner.instances(service).await
        }
        async fn services(&self, namespace: &str) -> Result<Vec<ServiceKey>, RegistryError> {
            self.inner.services(namespace).await
        }
        async fn watch(
            &self,
            service: &ServiceKey,
            since: Option<Revision>,
        ) -> Result<WatchStream, RegistryError> {
            self.inner.watch(service, since).await
        }
    }

    const TTL: Duration = Duration::from_secs(3);

    fn instance() -> Instance {
        Instance::new("orders", "127.0.0.1:7001").with_id("a")
    }

    async fn count(registry: &Flaky) -> usize {
        registry
            .inner
            .instances(&ServiceKey::new("orders"))
            .await
            .unwrap()
            .len()
    }

    /// Starts keeping `instance()` registered; each registration it makes
    /// sends on the channel.
    fn keep(
        registry: &Arc<Flaky>,
        registered: bool,
    ) -> (
        crate::task::AbortOnDrop<()>,
        tokio::sync::mpsc::UnboundedReceiver<Instant>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let keeping = KeepRegistered::new(registry.clone(), instance(), TTL)
            .already_registered(registered)
            .run(move || {
                let _ = tx.send(Instant::now());
            });
        (crate::task::AbortOnDrop::new(tokio::spawn(keeping)), rx)
    }

    #[tokio::test(start_paused = true)]
    async fn registers_at_once_then_heartbeats_every_interval() {
        let registry = Arc::new(Flaky::default());
        let started = Instant::now();
        let (_keeping, mut registered) = keep(&registry, false);
        assert_eq!(registered.recv().await, Some(started));
        tokio::time::sleep(TTL * 10 + Duration::from_millis(500)).await;
        assert_eq!(count(&registry).await, 1);
        let calls = registry.calls();
        assert_eq!(calls[0], ("register", started));
        // One heartbeat a second (a third of the TTL), on schedule.
        let beats: Vec<u64> = calls[1..]
            .iter()
            .map(|(name, at)| {
                assert_eq!(*name, "heartbeat");
                (*at - started).as_secs()
            })
            .collect();
        assert_eq!(beats, (1..=30).collect::<Vec<_>>());
        assert!(registered.try_recv().is_err(), "registered only once");
    }

    #[tokio::test(start_paused = true)]
    async fn registers_again_as_soon_as_the_registry_lost_the_instance() {
        let registry = Arc::new(Flaky::default());
        registry.inner.register(instance(), TTL).await.unwrap();
        let (_keeping, mut registered) = keep(&registry, true);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(registered.try_recv().is_err(), "it was registered already");
        registry
            .inner
            .deregister(&instance().instance_key())
            .await
            .unwrap();
        let lost = Instant::now();
        let again = tokio::time::timeout(TTL, registered.recv())
            .await
            .expect("registered again within a TTL")
            .unwrap();
        // At the next heartbeat (at 2 s), which found it missing.
        assert_eq!(again - lost, Duration::from_millis(500));
        assert_eq!(count(&registry).await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn hung_calls_are_cut_at_the_interval_and_tried_again_until_the_registry_answers() {
        let registry = Arc::new(Flaky::default());
        registry.hang.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let (_keeping, mut registered) = keep(&registry, false);
        tokio::time::sleep(Duration::from_millis(4500)).await;
        let tries: Vec<(&str, u64)> = registry
            .calls()
            .iter()
            .map(|(name, at)| (*name, (*at - started).as_secs()))
            .collect();
        // Not registered yet: each try registers, one a second.
        assert_eq!(
            tries,
            [
                ("register", 0),
                ("register", 1),
                ("register", 2),
                ("register", 3),
                ("register", 4)
            ]
        );
        assert!(registered.try_recv().is_err());
        registry.hang.store(false, Ordering::SeqCst);
        let at = tokio::time::timeout(TTL, registered.recv())
            .await
            .expect("registered once the registry answers")
            .unwrap();
        assert_eq!(at - started, Duration::from_secs(5));
        assert_eq!(count(&registry).await, 1);
    }
}
