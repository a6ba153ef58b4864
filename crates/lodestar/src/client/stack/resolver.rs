//! Keeps a balance layer's endpoint set in step with the registry.

use std::sync::{Arc, Weak};

use lodestar_core::registry::Follow;
use lodestar_core::{Registry, ServiceKey};

use super::balance::{Balance, ResolvingGuard};

/// Follows `key` and publishes every change into the balance layer, until
/// it is dropped. On errors the last known instances stay in use, and the
/// service is watched again, from the last revision seen, with backoff
/// (see [`Follow`]).
pub(crate) async fn run(
    registry: Arc<dyn Registry>,
    key: ServiceKey,
    balance: Weak<Balance>,
    _running: ResolvingGuard,
) {
    let mut follow = Follow::new(registry, key);
    loop {
        let result = follow.next().await;
        let Some(balance) = balance.upgrade() else {
            return;
        };
        match result {
            Ok(instances) => {
                balance.registry_failed(None);
                balance.update(instances.values().cloned());
            }
            Err(e) => {
                tracing::warn!(service = %balance.key, error = %e,
                    "registry watch failed; keeping the last known instances");
                balance.registry_failed(Some(e.to_string()));
            }
        }
    }
}
