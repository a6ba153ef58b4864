//! What the registry server shows Prometheus on `GET /metrics`.
//!
//! The registry's state (instances by service and health, watchers,
//! events, heartbeats, self-preservation) is read from the memory
//! registry when scraped, by a collector: nothing is kept in step by
//! hand. The HTTP API's request durations are a histogram by method,
//! route template and status code.
//!
//! Several registry servers in one process with the same
//! [`Metrics`](lodestar::metrics::Metrics) add their counts up (a process
//! is one scrape target); self-preservation shows if any of them is in it.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use lodestar::metrics::prometheus_client::collector::Collector;
use lodestar::metrics::prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use lodestar::metrics::prometheus_client::metrics::MetricType;
use lodestar::metrics::prometheus_client::metrics::family::Family;
use lodestar::metrics::prometheus_client::metrics::histogram::Histogram;
use lodestar::metrics::prometheus_client::registry::Unit;
use lodestar::metrics::{DURATION_BUCKETS, Metrics, Sources};
use lodestar::registry::memory::RegistryEvents;
use tokio::time::Instant;

use crate::Server;

/// The labels of `http_server_request_duration_seconds`: method, route
/// template, status code.
type HttpLabels = [(&'static str, String); 3];

/// The `http_route` of requests no route matched, and the
/// `http_request_method` of methods outside the usual set: one series for
/// all of them.
const OTHER: &str = "_OTHER";

/// The registry server's metrics in one registry. Cheap to clone.
#[derive(Clone)]
pub(crate) struct ServerMetrics {
    servers: Sources<Server>,
    http: Family<HttpLabels, Histogram>,
}

impl ServerMetrics {
    /// The registry server's metrics in `metrics`, registered the first
    /// time.
    pub(crate) fn of(metrics: &Metrics) -> Self {
        metrics.set(|registry| {
            let http = Family::<HttpLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS)
            });
            registry.register_with_unit(
                "http_server_request_duration",
                "Duration of the registry's HTTP API requests, by method, route and status code",
                Unit::Seconds,
                http.clone(),
            );
            let servers = Sources::default();
            registry.register_collector(Box::new(Collected {
                servers: servers.clone(),
            }));
            ServerMetrics { servers, http }
        })
    }

    /// Shows `server` when scraped, for as long as it lives.
    pub(crate) fn add(&self, server: &Arc<Server>) {
        self.servers.add(server);
    }
}

/// Times each request of the HTTP API (the outermost layer, so refusals
/// count too), by the route template it matched.
pub(crate) async fn record(
    State(metrics): State<ServerMetrics>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = method_name(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(OTHER, MatchedPath::as_str)
        .to_owned();
    let response = next.run(request).await;
    let labels: HttpLabels = [
        ("http_request_method", method.to_owned()),
        ("http_route", route),
        (
            "http_response_status_code",
            response.status().as_u16().to_string(),
        ),
    ];
    metrics
        .http
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The method as OpenTelemetry names it; methods outside the usual set are
/// one `_OTHER`, so a client cannot make series up.
fn method_name(method: &axum::http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => OTHER,
    }
}

/// Reads the live servers' registries when scraped.
#[derive(Debug)]
struct Collected {
    servers: Sources<Server>,
}

/// What every live server adds up to.
#[derive(Default)]
struct Totals {
    /// Instances by (namespace, group, service), and how many are healthy.
    instances: BTreeMap<(String, String, String), (usize, usize)>,
    watchers: usize,
    heartbeats: u64,
    events: [u64; 6],
    preserving: bool,
    /// The lowest threshold and share keeping up of the servers with
    /// self-preservation on.
    threshold: Option<f64>,
    keeping_up: Option<f64>,
    ephemeral: usize,
    renewing: usize,
    warming: bool,
}

/// Each event type with its count.
fn events(events: &RegistryEvents) -> [(&'static str, u64); 6] {
    [
        ("registered", events.registered),
        ("updated", events.updated),
        ("deregistered", events.deregistered),
        ("expired", events.expired),
        ("recovered", events.recovered),
        ("evicted", events.evicted),
    ]
}

fn lowest(a: Option<f64>, b: f64) -> Option<f64> {
    Some(a.map_or(b, |a| a.min(b)))
}

impl Totals {
    fn of(servers: &[Arc<Server>]) -> Self {
        let mut totals = Totals::default();
        for server in servers {
            let stats = server.registry.stats();
            for health in server.registry.health_of_all() {
                let key = health.service;
                let entry = totals
                    .instances
                    .entry((key.namespace, key.group, key.service))
                    .or_default();
                entry.0 += health.instances;
                entry.1 += health.healthy;
            }
            totals.watchers += stats.watchers;
            totals.heartbeats += stats.heartbeats;
            for (total, (_, count)) in totals.events.iter_mut().zip(events(&stats.events)) {
                *total += count;
            }
            totals.preserving |= stats.self_preservation;
            if let Some(preservation) = server.self_preservation {
                totals.threshold = lowest(totals.threshold, preservation.threshold);
                totals.keeping_up = lowest(totals.keeping_up, stats.keeping_up);
            }
            totals.ephemeral += stats.ephemeral;
            totals.renewing += stats.renewing;
            totals.warming |= server.warming();
        }
        totals
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

impl Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let servers = self.servers.live();
        if servers.is_empty() {
            return Ok(());
        }
        let totals = Totals::of(&servers);

        let mut family = encoder.encode_descriptor(
            "lodestar_registry_instances",
            "Registered instances by service and health (status: healthy or unhealthy)",
            None,
            MetricType::Gauge,
        )?;
        for ((namespace, group, service), (all, healthy)) in &totals.instances {
            for (status, count) in [("healthy", *healthy), ("unhealthy", all - healthy)] {
                let labels = [
                    ("namespace", namespace.as_str()),
                    ("group", group.as_str()),
                    ("service", service.as_str()),
                    ("status", status),
                ];
                family.encode_family(&labels)?.encode_gauge(&count)?;
            }
        }

        gauge(
            &mut encoder,
            "lodestar_registry_watchers",
            "Open watches of services",
            totals.watchers as f64,
        )?;

        let mut family = encoder.encode_descriptor(
            "lodestar_registry_events",
            "What happened to instances, by type: registered, updated, deregistered, expired \
             (lease ran out, marked unhealthy), recovered (renewed within the eviction grace), \
             evicted",
            None,
            MetricType::Counter,
        )?;
        let named = events(&RegistryEvents::default());
        for ((kind, _), count) in named.iter().zip(totals.events) {
            family
                .encode_family(&[("type", *kind)])?
                .encode_counter::<NoLabelSet, u64, u64>(&count, None)?;
        }

        encoder
            .encode_descriptor(
                "lodestar_registry_heartbeats",
                "Heartbeats that renewed a lease",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, u64, u64>(&totals.heartbeats, None)?;

        gauge(
            &mut encoder,
            "lodestar_registry_self_preservation",
            "1 while self-preservation has frozen expiry, 0 otherwise",
            f64::from(u8::from(totals.preserving)),
        )?;
        if let (Some(threshold), Some(keeping_up)) = (totals.threshold, totals.keeping_up) {
            gauge(
                &mut encoder,
                "lodestar_registry_self_preservation_threshold_ratio",
                "Self-preservation engages when the renewal ratio falls below this",
                threshold,
            )?;
            gauge(
                &mut encoder,
                "lodestar_registry_renewal_ratio",
                "The share of the expected heartbeats that leases keeping up bring (1 with no leases)",
                keeping_up,
            )?;
        }
        let mut family = encoder.encode_descriptor(
            "lodestar_registry_leases",
            "Ephemeral instances by whether they renewed within two heartbeat intervals \
             (state: renewing or silent)",
            None,
            MetricType::Gauge,
        )?;
        let silent = totals.ephemeral.saturating_sub(totals.renewing);
        for (state, count) in [("renewing", totals.renewing), ("silent", silent)] {
            family
                .encode_family(&[("state", state)])?
                .encode_gauge(&count)?;
        }
        gauge(
            &mut encoder,
            "lodestar_registry_warming",
            "1 while the registry is warming up after a start (instances still coming back)",
            f64::from(u8::from(totals.warming)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_the_usual_set_are_one_series() {
        assert_eq!(method_name(&axum::http::Method::PUT), "PUT");
        let odd = axum::http::Method::from_bytes(b"BREW").unwrap_or_default();
        assert_eq!(method_name(&odd), OTHER);
    }
}
