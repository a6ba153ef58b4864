//! Keeps a balancer's instance set in step with the registry.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use lodestar_core::{Instance, Registry, Revision, ServiceKey, WatchEvent};

use super::balance::{Balance, ResolvingGuard};

/// Watches `key` and publishes every change into the balancer, until the
/// balancer is dropped. On errors it keeps the last known instances and
/// watches again, from the last revision it saw, with backoff.
pub(crate) async fn run(
    registry: Arc<dyn Registry>,
    key: ServiceKey,
    balancer: Weak<Balance>,
    _running: ResolvingGuard,
) {
    let mut instances: BTreeMap<String, Instance> = BTreeMap::new();
    let mut revision: Option<Revision> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        match registry.watch(&key, revision).await {
            Ok(mut stream) => {
                while let Some(event) = stream.next().await {
                    let event = match event {
                        Ok(event) => event,
                        Err(e) => {
                            tracing::warn!(service = %key, error = %e, "registry watch failed; keeping the last known instances");
                            if let Some(balancer) = balancer.upgrade() {
                                balancer.registry_failed(Some(e.to_string()));
                            }
                            break;
                        }
                    };
                    backoff = Duration::from_millis(50);
                    revision = Some(event.revision());
                    match event {
                        WatchEvent::Snapshot { instances: all, .. } => {
                            instances = all.into_iter().map(|i| (i.id.clone(), i)).collect();
                        }
                        WatchEvent::Put { instance, .. } => {
                            instances.insert(instance.id.clone(), instance);
                        }
                        WatchEvent::Delete { id, .. } => {
                            instances.remove(&id);
                        }
                    }
                    let Some(balancer) = balancer.upgrade() else {
                        return;
                    };
                    balancer.registry_failed(None);
                    balancer.update(instances.values().cloned());
                }
            }
            Err(e) => {
                tracing::warn!(service = %key, error = %e, "cannot watch the registry; keeping the last known instances");
                if let Some(balancer) = balancer.upgrade() {
                    balancer.registry_failed(Some(e.to_string()));
                }
            }
        }
        if balancer.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
