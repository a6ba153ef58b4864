//! What a [`RemoteRegistry`](crate::RemoteRegistry) shows Prometheus: the
//! age of its cached instances (how long since the server last confirmed
//! them, which grows during an outage) and its watch reconnections.

use std::sync::{Arc, Weak};
use std::time::Instant;

use lodestar::ServiceKey;
use lodestar::metrics::prometheus_client::collector::Collector;
use lodestar::metrics::prometheus_client::encoding::DescriptorEncoder;
use lodestar::metrics::prometheus_client::metrics::MetricType;
use lodestar::metrics::prometheus_client::metrics::counter::Counter;
use lodestar::metrics::prometheus_client::registry::Unit;
use lodestar::metrics::{Metrics, Sources};
use lodestar_core::sync::MutexExt;

use crate::Inner;

/// The registry clients' metrics in one registry.
#[derive(Clone)]
pub(crate) struct ClientMetrics {
    clients: Sources<Inner>,
    reconnects: Counter,
}

impl ClientMetrics {
    pub(crate) fn of(metrics: &Metrics) -> Self {
        metrics.set(|registry| {
            let reconnects = Counter::default();
            registry.register(
                "lodestar_registry_client_watch_reconnects",
                "Watches of a service opened again after an earlier watch of it ended",
                reconnects.clone(),
            );
            let clients = Sources::default();
            registry.register_collector(Box::new(CacheAge {
                clients: clients.clone(),
            }));
            ClientMetrics {
                clients,
                reconnects,
            }
        })
    }

    /// Shows `client`'s cache when scraped, for as long as it lives.
    pub(crate) fn add(&self, client: &Arc<Inner>) {
        self.clients.add(client);
    }
}

/// A watch of one service, open: counts as a reconnection if an earlier
/// watch of the service ended, and keeps the service's cache current
/// until it is dropped.
pub(crate) struct OpenWatch {
    client: Weak<Inner>,
    service: ServiceKey,
}

impl OpenWatch {
    pub(crate) fn begin(client: &Arc<Inner>, service: &ServiceKey) -> Self {
        let reconnected = {
            let mut cache = client.cache.lock_unpoisoned();
            let cached = cache.entry(service.clone()).or_default();
            cached.watching += 1;
            cached.confirmed = Some(Instant::now());
            std::mem::take(&mut cached.watch_ended)
        };
        if reconnected {
            ClientMetrics::of(&client.metrics).reconnects.inc();
        }
        Self {
            client: Arc::downgrade(client),
            service: service.clone(),
        }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        let Some(client) = self.client.upgrade() else {
            return;
        };
        let mut cache = client.cache.lock_unpoisoned();
        if let Some(cached) = cache.get_mut(&self.service) {
            cached.watching = cached.watching.saturating_sub(1);
            cached.confirmed = Some(Instant::now());
            cached.watch_ended = true;
        }
    }
}

/// Reads the live clients' caches when scraped.
#[derive(Debug)]
struct CacheAge {
    clients: Sources<Inner>,
}

impl Collector for CacheAge {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let now = Instant::now();
        // Per service, the oldest of the clients' caches.
        let mut ages: std::collections::BTreeMap<ServiceKey, f64> = Default::default();
        for client in self.clients.live() {
            let cache = client.cache.lock_unpoisoned();
            for (service, cached) in cache.iter() {
                let Some(confirmed) = cached.confirmed else {
                    continue;
                };
                let age = if cached.watching > 0 {
                    0.0
                } else {
                    now.saturating_duration_since(confirmed).as_secs_f64()
                };
                let oldest = ages.entry(service.clone()).or_insert(age);
                *oldest = oldest.max(age);
            }
        }
        let mut family = encoder.encode_descriptor(
            "lodestar_registry_client_cache_age",
            "How long ago the registry server last confirmed the cached instances of a service \
             (0 while a watch of it is open); grows while the server is unreachable",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for (service, age) in &ages {
            let labels = [
                ("namespace", service.namespace.as_str()),
                ("group", service.group.as_str()),
                ("service", service.service.as_str()),
            ];
            family.encode_family(&labels)?.encode_gauge(age)?;
        }
        Ok(())
    }
}
