//! The instance model: what a registry stores about one running copy of a service.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The namespace used when none is given. Namespaces isolate tenants or
/// environments: nothing in one namespace can see another.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The group used when none is given. Groups partition the services of a
/// namespace (for example by team or by application).
pub const DEFAULT_GROUP: &str = "default";

/// Names a service within a registry: `namespace / group / service`.
///
/// ```
/// use lodestar_core::ServiceKey;
///
/// let key = ServiceKey::new("route-guide");
/// assert_eq!(key.to_string(), "default/default/route-guide");
/// let key = ServiceKey::new("orders").with_namespace("staging").with_group("shop");
/// assert_eq!(key.to_string(), "staging/shop/orders");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKey {
    /// Tenant or environment; see [`DEFAULT_NAMESPACE`].
    pub namespace: String,
    /// Partition within the namespace; see [`DEFAULT_GROUP`].
    pub group: String,
    /// The service name that clients call, e.g. `route-guide`.
    pub service: String,
}

impl ServiceKey {
    /// A service in the default namespace and group.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            group: DEFAULT_GROUP.to_owned(),
            service: service.into(),
        }
    }

    /// Puts the service in `namespace`.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Puts the service in `group`.
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.group, self.service)
    }
}

/// Names one instance: its service and its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceKey {
    /// The service the instance belongs to.
    pub service: ServiceKey,
    /// The instance id, unique within the service.
    pub id: String,
}

impl fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service, self.id)
    }
}

/// One running copy of a service, as a registry stores it.
///
/// Build one with [`Instance::new`] and the `with_*` methods; every field
/// has a documented default.
///
/// ```
/// use lodestar_core::Instance;
///
/// let i = Instance::new("route-guide", "10.0.0.7:7000")
///     .with_id("route-guide-a")
///     .with_version("2.1.0")
///     .with_label("canary", "true")
///     .with_weight(50);
/// assert_eq!(i.address, "10.0.0.7:7000");
/// assert_eq!(i.metadata["canary"], "true");
/// assert!(i.healthy && i.enabled);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Unique within the service. Default: `{service}-{address}`.
    pub id: String,
    /// Namespace, group and service name.
    #[serde(flatten)]
    pub key: ServiceKey,
    /// The version the instance runs (free form; semver recommended). Default: empty.
    pub version: String,
    /// Where to reach it: `host:port`.
    pub address: String,
    /// How to talk to it. Default: `grpc`.
    pub protocol: String,
    /// Free-form labels, used for routing (e.g. `canary=true`).
    pub metadata: BTreeMap<String, String>,
    /// Relative share of traffic for weighted balancing. Default: 100.
    pub weight: u32,
    /// Availability zone or region. Default: empty.
    pub zone: String,
    /// Whether the instance is passing its health checks. Default: true.
    pub healthy: bool,
    /// Whether operators allow traffic to it. Default: true.
    pub enabled: bool,
    /// Whether it holds a lease kept alive by heartbeats (`true`, the
    /// default), or was registered to stay until deregistered and is
    /// health-checked by the registry instead (`false`).
    #[serde(default = "yes")]
    pub ephemeral: bool,
}

fn yes() -> bool {
    true
}

impl Instance {
    /// An instance of `service` (default namespace and group) reachable at `address`.
    pub fn new(service: impl Into<String>, address: impl Into<String>) -> Self {
        let service = service.into();
        let address = address.into();
        Self {
            id: format!("{service}-{address}"),
            key: ServiceKey::new(service),
            version: String::new(),
            address,
            protocol: "grpc".to_owned(),
            metadata: BTreeMap::new(),
            weight: 100,
            zone: String::new(),
            healthy: true,
            enabled: true,
            ephemeral: true,
        }
    }

    /// The service name, e.g. `route-guide`.
    pub fn service(&self) -> &str {
        &self.key.service
    }

    /// The key that names this instance in its registry.
    pub fn instance_key(&self) -> InstanceKey {
        InstanceKey {
            service: self.key.clone(),
            id: self.id.clone(),
        }
    }

    /// Sets the instance id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the namespace and group.
    pub fn with_service_key(mut self, key: ServiceKey) -> Self {
        self.key = key;
        self
    }

    /// Sets the version.
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the protocol.
    pub fn with_protocol(mut self, protocol: impl Into<String>) -> Self {
        self.protocol = protocol.into();
        self
    }

    /// Adds one metadata label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the zone.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = zone.into();
        self
    }

    /// Whether clients should send traffic here: healthy and enabled.
    pub fn is_routable(&self) -> bool {
        self.healthy && self.enabled
    }
}

/// Splits a comma-separated list of `host:port` addresses (as URLs carry
/// them: `h1:2379,h2:2379`), checking each; the error names the first that
/// is not `host:port`.
///
/// ```
/// use lodestar_core::parse_host_ports;
/// assert_eq!(parse_host_ports("a:1, b:2").unwrap(), ["a:1", "b:2"]);
/// assert_eq!(parse_host_ports("a:1,b").unwrap_err(), "`b` is not host:port");
/// // What may be a secret is not repeated.
/// assert!(!parse_host_ports("h:2379&password=s3cret").unwrap_err().contains("s3cret"));
/// ```
pub fn parse_host_ports(list: &str) -> Result<Vec<String>, String> {
    list.split(',')
        .map(str::trim)
        .map(|address| {
            let valid = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if valid {
                Ok(address.to_owned())
            } else if address.contains(['@', '=', '&', '?']) {
                // Part of a query or of credentials (a URL missing its `?`):
                // not shown, since it may hold a password.
                Err(
                    "an address is not host:port (not shown: it looks like part of a query or \
                     of credentials)"
                        .to_owned(),
                )
            } else {
                Err(format!("`{address}` is not host:port"))
            }
        })
        .collect()
}
