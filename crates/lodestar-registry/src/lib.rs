//! The lodestar registry server's protocol and its client.
//!
//! * [`RemoteRegistry`] implements [`Registry`] against a `lodestar
//!   registry` server (or several, for failover): registrations and
//!   heartbeats go to the server; lookups are cached, so that while the
//!   server is unreachable the last known instances keep being served.
//! * [`from_url`] turns a registry URL into a registry:
//!   `memory://`, `lodestar://host:port[,host:port…][?token=…]`.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = lodestar_registry::from_url("lodestar://127.0.0.1:7070")?;
//! let client = lodestar::Client::new(registry);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lodestar::{
    Client, Code, Instance, InstanceKey, MemoryRegistry, Registry, RegistryError, Revision,
    ServiceKey, StaticRegistry, Status, WatchEvent, WatchStream,
};

mod keepalive;

/// Generated code for `lodestar.registry.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    lodestar::include_proto!("lodestar.registry.v1");
}

use pb::registry_client::RegistryClient;

/// Where `lodestar registry` listens for gRPC by default.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:7070";
/// Where `lodestar registry` serves its HTTP/JSON API by default.
pub const DEFAULT_HTTP_ADDRESS: &str = "127.0.0.1:7071";
/// The registry URL used when none is given (and `LODESTAR_REGISTRY` is unset).
pub const DEFAULT_URL: &str = "lodestar://127.0.0.1:7070";
/// The service name the registry server is called by.
pub const SERVICE_NAME: &str = "lodestar-registry";

/// A registry URL that cannot be used. It shows the URL with any token or
/// password replaced by `***`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unsupported registry URL `{url}`: {reason}")]
pub struct UrlError {
    url: String,
    reason: String,
}

/// A registry from its URL:
///
/// * `memory://`: a registry inside this process;
/// * `lodestar://host:port[,host:port…][?token=…]`: `lodestar registry`
///   servers (tried in turn), with an optional write token;
/// * `etcd://host:port[,host:port…][?prefix=…&user=…&password=…&ca=…]`:
///   an etcd cluster (with the default `etcd` feature).
pub fn from_url(url: &str) -> Result<Arc<dyn Registry>, UrlError> {
    let error = |reason: &str| UrlError {
        url: redacted(url),
        reason: reason.to_owned(),
    };
    let expected = "expected memory://, lodestar://host:port[,host:port][?token=…] or etcd://host:port[,host:port]";
    let (scheme, rest) = url.split_once("://").ok_or_else(|| error(expected))?;
    match scheme {
        "memory" if rest.is_empty() => Ok(Arc::new(MemoryRegistry::new())),
        "lodestar" => {
            let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
            let addresses = lodestar::parse_host_ports(hosts)
                .map_err(|e| error(&format!("{e} ({expected})")))?;
            let mut token = None;
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some(("token", value)) => {
                        if !value.bytes().all(|b| b.is_ascii_graphic()) {
                            return Err(error(
                                "the token must be printable ASCII without spaces (it travels in a header)",
                            ));
                        }
                        token = Some(value.to_owned());
                    }
                    _ => {
                        // The name only: the value may be a secret (password=…).
                        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
                        return Err(error(&format!(
                            "unknown parameter `{name}` (expected token=…)"
                        )));
                    }
                }
            }
            let mut registry = RemoteRegistry::new(&addresses);
            if let Some(token) = token {
                registry = registry.with_token(token);
            }
            Ok(Arc::new(registry))
        }
        #[cfg(feature = "etcd")]
        "etcd" => match lodestar_etcd::EtcdRegistry::from_url(url) {
            Ok(registry) => Ok(Arc::new(registry)),
            Err(reason) => Err(error(&reason)),
        },
        #[cfg(not(feature = "etcd"))]
        "etcd" => Err(error(
            "this build has no etcd support (build lodestar-registry with the `etcd` feature)",
        )),
        _ => Err(error(expected)),
    }
}

/// `url` with the values of `token` and `password` parameters hidden.
fn redacted(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name @ ("token" | "password"), _)) => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

/// The registry named by `LODESTAR_REGISTRY`, or [`DEFAULT_URL`].
pub fn from_env() -> Result<Arc<dyn Registry>, UrlError> {
    from_url(&std::env::var("LODESTAR_REGISTRY").unwrap_or_else(|_| DEFAULT_URL.to_owned()))
}

/// A [`Registry`] backed by `lodestar registry` servers. See the crate docs.
#[derive(Clone)]
pub struct RemoteRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    addresses: Vec<String>,
    client: Client,
    /// `Bearer {token}`, parsed once.
    authorization: Option<lodestar::metadata::AsciiMetadataValue>,
    /// The last known instances of each service looked up or watched.
    cache: Mutex<HashMap<ServiceKey, Cached>>,
    /// The stream heartbeats go on.
    keepalive: keepalive::KeepAlive,
}

/// What this client knows of one service.
#[derive(Default)]
struct Cached {
    instances: BTreeMap<String, Instance>,
    /// The set came (in part) from a registry that was still warming up:
    /// it may hold instances that never came back, so the next watch asks
    /// for a full snapshot.
    from_warming: bool,
}

impl std::fmt::Debug for RemoteRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lodestar://{}", self.inner.addresses.join(","))
    }
}

/// How long one registry call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

impl RemoteRegistry {
    /// A registry served at `addresses` (`host:port`; tried in turn).
    pub fn new(addresses: &[String]) -> Self {
        let known = StaticRegistry::new().with(SERVICE_NAME, addresses.iter().cloned());
        let client = Client::builder(known)
            .connect_timeout(Duration::from_secs(1))
            .ejection(Duration::from_millis(500), Duration::from_secs(5))
            .build();
        Self {
            inner: Arc::new(Inner {
                addresses: addresses.to_vec(),
                client,
                authorization: None,
                cache: Mutex::new(HashMap::new()),
                keepalive: keepalive::KeepAlive::default(),
            }),
        }
    }

    /// Sends `token` with every write (`authorization: Bearer <token>`).
    pub fn with_token(self, token: impl Into<String>) -> Self {
        let token = token.into();
        let authorization = format!("Bearer {token}").parse().ok();
        if authorization.is_none() {
            tracing::warn!(
                "the registry token has characters a header cannot carry; writes will be refused"
            );
        }
        let inner = Arc::new(Inner {
            addresses: self.inner.addresses.clone(),
            client: self.inner.client.clone(),
            authorization,
            cache: Mutex::new(HashMap::new()),
            keepalive: keepalive::KeepAlive::default(),
        });
        Self { inner }
    }

    fn api(&self) -> RegistryClient<lodestar::client::Channel> {
        RegistryClient::by_name(&self.inner.client, SERVICE_NAME)
    }

    fn request<T>(&self, message: T) -> lodestar::Request<T> {
        let mut request = lodestar::Request::new(message);
        request.set_timeout(CALL_TIMEOUT);
        self.authorize(&mut request);
        request
    }

    fn authorize<T>(&self, request: &mut lodestar::Request<T>) {
        if let Some(value) = &self.inner.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
    }

    fn error(&self, status: Status, key: Option<&InstanceKey>) -> RegistryError {
        match (status.code(), key) {
            (Code::NotFound, Some(key)) => RegistryError::NotFound(key.clone()),
            (Code::InvalidArgument, _) => RegistryError::Invalid(status.message().to_owned()),
            (Code::Unauthenticated | Code::PermissionDenied, _) => {
                RegistryError::Unauthorized(status.message().to_owned())
            }
            _ => RegistryError::Unavailable(format!("{self:?}: {}", status.message())),
        }
    }

    fn cached(&self, key: &ServiceKey) -> Option<Vec<Instance>> {
        let cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .map(|c| c.instances.values().cloned().collect())
    }

    /// Takes in a lookup's answer: it replaces what was known, unless the
    /// registry is warming up, when it only adds to it.
    fn remember(&self, key: &ServiceKey, instances: Vec<Instance>, warming: bool) -> Vec<Instance> {
        let mut cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        let cached = cache.entry(key.clone()).or_default();
        if warming {
            cached.from_warming = true;
        } else {
            cached.instances.clear();
            cached.from_warming = false;
        }
        for instance in instances {
            cached.instances.insert(instance.id.clone(), instance);
        }
        cached.instances.values().cloned().collect()
    }

    fn built_while_warming(&self, key: &ServiceKey) -> bool {
        let cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(key).is_some_and(|c| c.from_warming)
    }
}

#[async_trait::async_trait]
impl Registry for RemoteRegistry {
    async fn register(&self, instance: Instance, ttl: Duration) -> Result<(), RegistryError> {
        let key = instance.instance_key();
        let request = pb::RegisterRequest {
            instance: Some(to_pb(&instance)),
            ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
            persistent: false,
            check: None,
        };
        self.api()
            .register(self.request(request))
            .await
            .map(|_| ())
            .map_err(|s| self.error(s, Some(&key)))
    }

    async fn heartbeat(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        let on_stream = self
            .inner
            .keepalive
            .heartbeat(
                || self.api(),
                self.inner.authorization.as_ref(),
                instance_ref(key),
                CALL_TIMEOUT,
            )
            .await;
        if let Ok(answer) = on_stream {
            return answer.map_err(|s| self.error(s, Some(key)));
        }
        self.api()
            .heartbeat(self.request(instance_ref(key)))
            .await
            .map(|_| ())
            .map_err(|s| self.error(s, Some(key)))
    }

    async fn deregister(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        self.api()
            .deregister(self.request(instance_ref(key)))
            .await
            .map(|_| ())
            .map_err(|s| self.error(s, Some(key)))
    }

    async fn instances(&self, service: &ServiceKey) -> Result<Vec<Instance>, RegistryError> {
        let request = pb::GetInstancesRequest {
            service: Some(key_to_pb(service)),
        };
        match self.api().get_instances(self.request(request)).await {
            Ok(response) => {
                let response = response.into_inner();
                let instances: Vec<Instance> =
                    response.instances.into_iter().map(from_pb).collect();
                Ok(self.remember(service, instances, response.warming))
            }
            Err(status) => {
                let error = self.error(status, None);
                match (&error, self.cached(service)) {
                    // The registry is away: the last known instances still serve.
                    (RegistryError::Unavailable(_), Some(cached)) => Ok(cached),
                    _ => Err(error),
                }
            }
        }
    }

    async fn services(&self, namespace: &str) -> Result<Vec<ServiceKey>, RegistryError> {
        let request = pb::ListServicesRequest {
            namespace: namespace.to_owned(),
        };
        let response = self
            .api()
            .list_services(self.request(request))
            .await
            .map_err(|s| self.error(s, None))?;
        Ok(response
            .into_inner()
            .services
            .into_iter()
            .filter_map(|s| s.service.map(key_from_pb))
            .collect())
    }

    async fn watch(
        &self,
        service: &ServiceKey,
        since: Option<Revision>,
    ) -> Result<WatchStream, RegistryError> {
        // A view built while the registry warmed up may hold instances that
        // never came back: start over with a full snapshot.
        let since = if self.built_while_warming(service) {
            None
        } else {
            since
        };
        let request = pb::WatchRequest {
            service: Some(key_to_pb(service)),
            since: since.unwrap_or(0),
        };
        // No deadline: a watch lasts as long as both sides do.
        let mut request = lodestar::Request::new(request);
        self.authorize(&mut request);
        let stream = self
            .api()
            .watch(request)
            .await
            .map_err(|s| self.error(s, None))?
            .into_inner();
        let this = self.clone();
        let key = service.clone();
        let events = stream.flat_map(move |response| {
            let events: Vec<Result<WatchEvent, RegistryError>> = match response {
                Ok(response) => response
                    .events
                    .into_iter()
                    .filter_map(|event| this.apply(&key, event))
                    .map(Ok)
                    .collect(),
                Err(status) => vec![Err(this.error(status, None))],
            };
            futures_util::stream::iter(events)
        });
        Ok(Box::pin(events))
    }
}

impl RemoteRegistry {
    /// Applies one event to the cache and returns what the watcher should see.
    fn apply(&self, key: &ServiceKey, event: pb::WatchEvent) -> Option<WatchEvent> {
        let revision = event.revision;
        let mut cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        let cached = cache.entry(key.clone()).or_default();
        let known = &mut cached.instances;
        match event.kind? {
            pb::watch_event::Kind::Snapshot(snapshot) => {
                let fresh = snapshot.instances.into_iter().map(from_pb);
                if snapshot.warming {
                    // The registry restarted and instances are still coming
                    // back: add what it knows to what we knew, drop nothing.
                    cached.from_warming = true;
                    for instance in fresh {
                        known.insert(instance.id.clone(), instance);
                    }
                } else {
                    cached.from_warming = false;
                    *known = fresh.map(|i| (i.id.clone(), i)).collect();
                }
                Some(WatchEvent::Snapshot {
                    revision,
                    instances: known.values().cloned().collect(),
                })
            }
            pb::watch_event::Kind::Put(instance) => {
                let instance = from_pb(instance);
                known.insert(instance.id.clone(), instance.clone());
                Some(WatchEvent::Put { revision, instance })
            }
            pb::watch_event::Kind::Delete(id) => {
                known.remove(&id);
                Some(WatchEvent::Delete { revision, id })
            }
        }
    }
}

fn instance_ref(key: &InstanceKey) -> pb::InstanceRef {
    pb::InstanceRef {
        service: Some(key_to_pb(&key.service)),
        id: key.id.clone(),
    }
}

/// A service key in the wire form.
pub fn key_to_pb(key: &ServiceKey) -> pb::ServiceKey {
    pb::ServiceKey {
        namespace: key.namespace.clone(),
        group: key.group.clone(),
        service: key.service.clone(),
    }
}

/// A service key from the wire form; empty namespace and group mean the defaults.
pub fn key_from_pb(key: pb::ServiceKey) -> ServiceKey {
    let mut out = ServiceKey::new(key.service);
    if !key.namespace.is_empty() {
        out.namespace = key.namespace;
    }
    if !key.group.is_empty() {
        out.group = key.group;
    }
    out
}

/// An instance in the wire form.
pub fn to_pb(instance: &Instance) -> pb::Instance {
    pb::Instance {
        id: instance.id.clone(),
        service: Some(key_to_pb(&instance.key)),
        version: instance.version.clone(),
        address: instance.address.clone(),
        protocol: instance.protocol.clone(),
        metadata: instance.metadata.clone().into_iter().collect(),
        weight: instance.weight,
        zone: instance.zone.clone(),
        healthy: instance.healthy,
        enabled: instance.enabled,
        ephemeral: instance.ephemeral,
    }
}

/// An instance from the wire form.
pub fn from_pb(instance: pb::Instance) -> Instance {
    let key = key_from_pb(instance.service.unwrap_or_default());
    let mut out = Instance::new(key.service.clone(), instance.address).with_service_key(key);
    out.id = instance.id;
    out.version = instance.version;
    if !instance.protocol.is_empty() {
        out.protocol = instance.protocol;
    }
    out.metadata = instance.metadata.into_iter().collect();
    out.weight = instance.weight;
    out.zone = instance.zone;
    out.healthy = instance.healthy;
    out.enabled = instance.enabled;
    out.ephemeral = instance.ephemeral;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_with_clear_errors() {
        assert!(from_url("memory://").is_ok());
        assert!(from_url("lodestar://127.0.0.1:7070,127.0.0.1:7071?token=s3cret").is_ok());
        for (bad, says) in [
            ("127.0.0.1:7070", "expected memory://"),
            ("lodestar://nohost", "`nohost` is not host:port"),
            ("lodestar://h:notaport", "is not host:port"),
            ("lodestar://h:1?tok=x", "unknown parameter `tok`"),
            ("consul://h:8500", "expected memory://"),
            ("etcd://h", "is not host:port"),
        ] {
            let error = from_url(bad).map(|_| ()).unwrap_err().to_string();
            assert!(
                error.contains(bad) && error.contains(says),
                "{bad}: {error}"
            );
        }
        for (bad, shown) in [
            (
                "lodestar://h:1?token=s3cret&x=1",
                "lodestar://h:1?token=***&x=1",
            ),
            (
                "etcd://h:1?user=u&password=s3cret&ttl=1",
                "etcd://h:1?user=u&password=***&ttl=1",
            ),
            // A password where a lodestar:// URL takes none is still hidden.
            (
                "lodestar://h:1?password=s3cret",
                "lodestar://h:1?password=***",
            ),
        ] {
            let error = from_url(bad).map(|_| ()).unwrap_err().to_string();
            assert!(error.contains(shown), "{error}");
            assert!(!error.contains("s3cret"), "{error}");
        }
    }

    #[test]
    fn instances_survive_the_wire_form() {
        let instance = Instance::new("svc", "10.0.0.1:80")
            .with_service_key(
                ServiceKey::new("svc")
                    .with_namespace("prod")
                    .with_group("shop"),
            )
            .with_version("1.2")
            .with_label("zone", "a")
            .with_weight(7);
        assert_eq!(from_pb(to_pb(&instance)), instance);
    }
}
