//! Service registries: where instances announce themselves and clients find them.
//!
//! # Leases
//!
//! An instance is registered with a *time to live*. The registry holds the
//! registration as a lease; the instance keeps it alive by sending
//! [`Registry::heartbeat`]s well inside the TTL (lodestar's `Service` sends
//! one every third of the TTL). An instance that crashes stops heartbeating
//! and its lease runs out, so it disappears from the registry without anyone
//! having to clean up after it. A heartbeat for a lease that already ran out
//! fails with [`RegistryError::LeaseExpired`]; the owner then registers again.
//!
//! # Watch and revisions
//!
//! Every change in a registry gets the next [`Revision`], a number that only
//! grows. [`Registry::watch`] yields the changes of one service in revision
//! order, starting with a [`WatchEvent::Snapshot`] of its current instances.
//! A watcher that lost its stream asks again with the last revision it
//! applied and receives exactly the changes it missed, or a fresh snapshot
//! when the registry no longer remembers that far back. Clients build their
//! local cache this way, so that the hot path of a call never waits for the
//! registry.
//!
//! # Backends
//!
//! [`MemoryRegistry`](crate::MemoryRegistry) lives inside one process and is
//! the default for development and tests. Other backends (the `lodestar
//! registry` server, etcd) implement the same trait.

mod fixed;
mod follow;
mod keep;
pub mod limits;
pub mod memory;
mod packed;

pub use fixed::StaticRegistry;
pub use follow::{FOLLOW_BACKOFF_FIRST, FOLLOW_BACKOFF_MAX, Follow};
pub use keep::{KeepRegistered, MIN_HEARTBEAT_INTERVAL};
pub use limits::Limits;

use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;

use crate::{Instance, InstanceKey, ServiceKey};

/// A registry's change counter: strictly increasing across all changes.
pub type Revision = u64;

/// A stream of changes to one service, as returned by [`Registry::watch`].
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, RegistryError>> + Send>>;

/// One change to the instances of a watched service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The full set of instances at `revision`; replaces whatever the watcher held.
    Snapshot {
        /// The registry revision this set reflects.
        revision: Revision,
        /// Every instance of the service.
        instances: Vec<Instance>,
    },
    /// An instance was added or changed.
    Put {
        /// The revision of this change.
        revision: Revision,
        /// The instance as it now is.
        instance: Instance,
    },
    /// An instance left: deregistered or its lease expired.
    Delete {
        /// The revision of this change.
        revision: Revision,
        /// The instance's id.
        id: String,
    },
}

impl WatchEvent {
    /// The revision this event brings the watcher to.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Snapshot { revision, .. }
            | WatchEvent::Put { revision, .. }
            | WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// What can go wrong talking to a registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The instance is not registered (never was, or was deregistered).
    #[error("instance {0} is not registered")]
    NotFound(InstanceKey),
    /// The instance's lease ran out before this heartbeat; register it again.
    #[error("the lease of instance {0} has expired; register it again")]
    LeaseExpired(InstanceKey),
    /// The request was malformed; the message says which field and why.
    #[error("invalid registration: {0}")]
    Invalid(String),
    /// The registry could not be reached or failed; the message names it.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// The write conflicts with what is registered (for example, an
    /// ephemeral instance registered again as persistent); the message
    /// says what to do.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The registry refused a write: no token, or the wrong one.
    #[error("not authorized: {0}")]
    Unauthorized(String),
}

/// A service registry: register, renew, deregister, look up, and watch instances.
///
/// Implementations must be cheap to share (`Arc<dyn Registry>`) and safe to
/// call from many tasks at once.
#[async_trait::async_trait]
pub trait Registry: Send + Sync + std::fmt::Debug + 'static {
    /// Registers (or replaces) `instance` with a lease of `ttl`.
    ///
    /// Errors with [`RegistryError::Invalid`] when the instance has an empty
    /// id, service or address, or `ttl` is zero.
    async fn register(&self, instance: Instance, ttl: Duration) -> Result<(), RegistryError>;

    /// Renews the lease of a registered instance for another TTL.
    async fn heartbeat(&self, key: &InstanceKey) -> Result<(), RegistryError>;

    /// Removes an instance at once. Removing an unknown instance is not an error.
    async fn deregister(&self, key: &InstanceKey) -> Result<(), RegistryError>;

    /// The current instances of one service (empty when the service is unknown).
    async fn instances(&self, service: &ServiceKey) -> Result<Vec<Instance>, RegistryError>;

    /// Every service with at least one instance in `namespace`.
    async fn services(&self, namespace: &str) -> Result<Vec<ServiceKey>, RegistryError>;

    /// Watches one service.
    ///
    /// With `since: None` the stream starts with a [`WatchEvent::Snapshot`].
    /// With `since: Some(rev)` it yields the changes after `rev`, or a
    /// snapshot when those are no longer known.
    async fn watch(
        &self,
        service: &ServiceKey,
        since: Option<Revision>,
    ) -> Result<WatchStream, RegistryError>;
}

/// A shared registry is a registry, so `Arc<dyn Registry>` can be passed
/// wherever one is expected.
#[async_trait::async_trait]
impl<R: Registry + ?Sized> Registry for std::sync::Arc<R> {
    async fn register(&self, instance: Instance, ttl: Duration) -> Result<(), RegistryError> {
        (**self).register(instance, ttl).await
    }
    async fn heartbeat(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        (**self).heartbeat(key).await
    }
    async fn deregister(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        (**self).deregister(key).await
    }
    async fn instances(&self, service: &ServiceKey) -> Result<Vec<Instance>, RegistryError> {
        (**self).instances(service).await
    }
    async fn services(&self, namespace: &str) -> Result<Vec<ServiceKey>, RegistryError> {
        (**self).services(namespace).await
    }
    async fn watch(
        &self,
        service: &ServiceKey,
        since: Option<Revision>,
    ) -> Result<WatchStream, RegistryError> {
        (**self).watch(service, since).await
    }
}

/// Whether a service is below its protection threshold: fewer than
/// `threshold` (a fraction, 0 = off) of its enabled instances are healthy.
/// Below it, a registry's lookups and a client's balancer treat every
/// enabled instance as healthy, so that a mass health failure (more likely
/// a checker's fault than the fleet's) does not pile all traffic on the
/// few left.
///
/// ```
/// use lodestar_core::registry::below_protection_threshold;
/// assert!(below_protection_threshold(1, 4, 0.5));
/// assert!(!below_protection_threshold(2, 4, 0.5));
/// assert!(!below_protection_threshold(0, 4, 0.0));
/// ```
pub fn below_protection_threshold(healthy: usize, enabled: usize, threshold: f64) -> bool {
    threshold > 0.0 && enabled > 0 && (healthy as f64) < threshold * enabled as f64
}

/// Checks a registration as every backend must, with the default
/// [`Limits`]: names, id, address, sizes and the lease TTL.
///
/// ```
/// use std::time::Duration;
/// use lodestar_core::{Instance, registry::validate};
/// assert!(validate(&Instance::new("svc", "10.0.0.1:80"), Duration::from_secs(5)).is_ok());
/// assert!(validate(&Instance::new("svc", ""), Duration::from_secs(5)).is_err());
/// ```
pub fn validate(instance: &Instance, ttl: Duration) -> Result<(), RegistryError> {
    Limits::default().check(instance, ttl)
}
