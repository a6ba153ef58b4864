//! Keeping a service registered: the registration, the heartbeats, and
//! registering again when the registry has lost the instance.

use std::sync::Arc;
use std::time::Duration;

use lodestar_core::{Instance, Registry, RegistryError};

use super::lifecycle::{Announcer, Lifecycle};

/// A service's registration: where, and the task that keeps it.
pub(super) struct Registration {
    pub(super) registry: Arc<dyn Registry>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

/// Registers, then heartbeats; registers again whenever the registry has
/// lost the lease, and keeps trying while the registry is unreachable.
pub(super) async fn keep_registered(
    registry: Arc<dyn Registry>,
    instance: Instance,
    ttl: Duration,
    interval: Duration,
    mut registered: bool,
    events: Arc<Announcer>,
) {
    // No registry call may hold up the next beat.
    let call_timeout = interval;
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
                registry.register(instance.clone(), ttl).await.map(|()| {
                    tracing::info!(service = %instance.key, instance = %instance.id, address = %instance.address, "registered");
                    events.announce(Lifecycle::Registered);
                })
            }
        };
        let result = tokio::time::timeout(call_timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(RegistryError::Unavailable(format!(
                    "no answer within {call_timeout:?}"
                )))
            });
        match result {
            Ok(()) => registered = true,
            Err(RegistryError::NotFound(_) | RegistryError::LeaseExpired(_)) => {
                tracing::warn!(service = %instance.key, instance = %instance.id, "the registry lost this instance; registering again");
                registered = false;
                ticker.reset_immediately();
            }
            Err(e) => {
                tracing::warn!(service = %instance.key, instance = %instance.id, error = %e,
                    "registry unreachable; will retry every {interval:?}");
                // If the lease is gone by the time the registry is back, a
                // heartbeat says so and we register again.
            }
        }
    }
}
