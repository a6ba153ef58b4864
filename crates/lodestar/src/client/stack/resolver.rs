//! Keeps a balance layer's endpoint set in step with the registry.

use std::sync::{Arc, Weak};

use lodestar_core::registry::Follow;
use lodestar_core::{Registry, ServiceKey};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::balance::{Balance, ResolvingGuard};

/// Follows `key` and publishes every change into the balance layer, until
/// it is dropped; runs the balance layer's ejection timers (outlier
/// sweeps, ends of ejections) when they are due, woken by `ejected` when
/// an ejection begins or the policy changes. On errors the last known instances stay in use, and the
/// service is watched again, from the last revision seen, with backoff
/// (see [`Follow`]).
pub(crate) async fn run(
    registry: Arc<dyn Registry>,
    key: ServiceKey,
    balance: Weak<Balance>,
    ejected: Arc<Notify>,
    _running: ResolvingGuard,
) {
    let mut follow = Follow::new(registry, key);
    // When the balance layer's timers are next due.
    let mut timers: Option<Instant> = None;
    loop {
        let result = {
            let began = ejected.notified();
            let ends = async {
                match timers {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                result = follow.next() => Some(result),
                () = began => None,
                () = ends => None,
            }
        };
        let Some(balance) = balance.upgrade() else {
            return;
        };
        timers = balance.run_timers();
        let Some(result) = result else {
            continue;
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
