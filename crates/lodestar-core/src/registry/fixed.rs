//! [`StaticRegistry`]: a fixed list of addresses, for calling servers that
//! do not register anywhere.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, stream};

use super::{Registry, RegistryError, Revision, WatchEvent, WatchStream};
use crate::sync::MutexExt;
use crate::{Instance, InstanceKey, ServiceKey};

/// A registry whose instances are given up front and never expire, like
/// go-micro's static selector: the way to call a server by name when it is
/// not registered anywhere (a server written in another language, a fixed
/// address in a config file).
///
/// Instances can also be registered at run time; leases are ignored.
///
/// ```
/// use lodestar_core::{Registry, ServiceKey, StaticRegistry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let registry = StaticRegistry::new().with("route-guide", ["10.0.0.7:10000", "10.0.0.8:10000"]);
/// let found = registry.instances(&ServiceKey::new("route-guide")).await.unwrap();
/// assert_eq!(found.len(), 2);
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct StaticRegistry {
    instances: Arc<Mutex<BTreeMap<ServiceKey, BTreeMap<String, Instance>>>>,
}

impl StaticRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds instances of `service` (default namespace and group) at `addresses`.
    pub fn with<A: Into<String>>(
        self,
        service: &str,
        addresses: impl IntoIterator<Item = A>,
    ) -> Self {
        {
            let mut all = self.instances.lock_unpoisoned();
            let entry = all.entry(ServiceKey::new(service)).or_default();
            for address in addresses {
                let instance = Instance::new(service, address);
                entry.insert(instance.id.clone(), instance);
            }
        }
        self
    }

    fn snapshot(&self, key: &ServiceKey) -> Vec<Instance> {
        let all = self.instances.lock_unpoisoned();
        all.get(key)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl Registry for StaticRegistry {
    async fn register(&self, instance: Instance, ttl: Duration) -> Result<(), RegistryError> {
        super::validate(&instance, ttl)?;
        let mut all = self.instances.lock_unpoisoned();
        all.entry(instance.key.clone())
            .or_default()
            .insert(instance.id.clone(), instance);
        Ok(())
    }

    async fn heartbeat(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        let all = self.instances.lock_unpoisoned();
        match all.get(&key.service).and_then(|s| s.get(&key.id)) {
            Some(_) => Ok(()),
            None => Err(RegistryError::NotFound(key.clone())),
        }
    }

    async fn deregister(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        let mut all = self.instances.lock_unpoisoned();
        if let Some(service) = all.get_mut(&key.service) {
            service.remove(&key.id);
        }
        Ok(())
    }

    async fn instances(&self, service: &ServiceKey) -> Result<Vec<Instance>, RegistryError> {
        Ok(self.snapshot(service))
    }

    async fn services(&self, namespace: &str) -> Result<Vec<ServiceKey>, RegistryError> {
        let all = self.instances.lock_unpoisoned();
        Ok(all
            .iter()
            .filter(|(k, v)| k.namespace == namespace && !v.is_empty())
            .map(|(k, _)| k.clone())
            .collect())
    }

    /// One snapshot, then nothing: the set does not change by itself.
    async fn watch(
        &self,
        service: &ServiceKey,
        _since: Option<Revision>,
    ) -> Result<WatchStream, RegistryError> {
        let snapshot = WatchEvent::Snapshot {
            revision: 0,
            instances: self.snapshot(service),
        };
        Ok(Box::pin(
            stream::iter([Ok(snapshot)]).chain(stream::pending()),
        ))
    }
}
