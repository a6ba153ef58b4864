//! The lodestar registry server's protocol and its client.
//!
//! * [`RemoteRegistry`] implements [`Registry`] against a `lodestar
//!   registry` server (or several, for failover): registrations and
//!   heartbeats go to the server; lookups are cached, so that while the
//!   server is unreachable the last known instances keep being served.
//! * [`SnapshotRegistry`] wraps any registry and keeps what it knows in a
//!   file, so that a process started while the registry is unreachable
//!   can still call (see [below](#a-snapshot-on-disk)).
//! * [`from_url`] turns a registry URL into a registry:
//!   `memory://`, `lodestar://host:port[,host:port…]`, or with TLS
//!   `lodestars://host:port[,host:port…]?ca=…[&cert=…&key=…][&server_name=…]`,
//!   `etcd://…`, each but the first with an optional `snapshot=PATH`.
//!   The token comes from `LODESTAR_REGISTRY_TOKEN` (or, as a fallback
//!   that shows in process listings and shell history, `?token=…`).
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = lodestar_registry::from_url("lodestar://127.0.0.1:7070")?;
//! let client = lodestar::Client::new(registry);
//! # Ok(()) }
//! ```
//!
//! # A snapshot on disk
//!
//! The caches of [`RemoteRegistry`] (and of the etcd backend) live in
//! memory: they carry a running process through a registry outage, but a
//! process that *starts* during one knows nothing, and its first call
//! fails once the client gives up waiting for the registry. With a
//! snapshot, opt-in as in Polaris' and Eureka's clients, it calls the
//! instances the last process saw instead:
//!
//! ```no_run
//! # fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = lodestar_registry::from_url(
//!     "lodestar://10.0.0.1:7070?snapshot=/var/lib/orders/registry.snapshot",
//! )?;
//! # Ok(()) }
//! ```
//!
//! * **What is kept.** The last known instances of every service the
//!   process looked up ([`Registry::instances`]) or watched (every service
//!   a [`Client`] calls), plus those read from the file at start that
//!   this run has not refreshed, as one JSON file. Services with no
//!   instances are left out.
//! * **When it is served.** When the wrapped registry is unreachable
//!   ([`RegistryError::Unavailable`]): a lookup answers with the last known
//!   instances; a new watch (the one a client's channel starts with)
//!   opens with them as its snapshot, then keeps trying the registry (every
//!   0.1 s doubling up to 5 s) and follows the registry's own watch once it
//!   answers. Other errors (a refused token, a bad request) pass through.
//! * **Stale until the registry answers.** Instances read from the file
//!   are *stale*: [`SnapshotRegistry::is_stale`] says so, and the first time
//!   they are served a warning names the service, the file and the
//!   snapshot's age. The registry's first answer for the service replaces
//!   them (logged at `info`), and the service is no longer stale.
//! * **Which file is used.** The file is read once, when the registry is
//!   built. It records its format, its format version and the registry it
//!   came from (scheme, hosts in any order, and etcd's `prefix`; never a
//!   token or password). A file that is larger than [`MAX_SNAPSHOT_BYTES`],
//!   not valid JSON, another program's, another version's, or saved from
//!   another registry is ignored with a warning; the process then starts
//!   as it would without a snapshot, and the next write replaces the file.
//! * **How it is written.** After a change, on a blocking thread
//!   (`spawn_blocking`), at most once per [`MIN_WRITE_INTERVAL`]: to a
//!   temporary file beside it, flushed (`fsync`), renamed over it, and the
//!   directory flushed, so a crash leaves the old file or the new one.
//!   [`SnapshotRegistry::save`] writes at once (at shutdown), and dropping
//!   the last handle writes what is left. A snapshot that would be larger
//!   than [`MAX_SNAPSHOT_BYTES`] is not written.
//! * **One file per program.** Processes of one program may share a file
//!   (the last write wins, whole); programs that call different services
//!   should each have their own.
//!
//! It is a wrapper rather than a part of [`RemoteRegistry`] so that every
//! backend gets it the same way (`etcd://…?snapshot=…` too), and so that a
//! process without a snapshot pays nothing for it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lodestar::{
    Client, Code, Instance, InstanceKey, MemoryRegistry, Registry, RegistryError, Revision,
    ServiceKey, StaticRegistry, Status, WatchEvent, WatchStream,
};
use lodestar_core::sync::MutexExt;

mod keepalive;
mod metrics;
mod snapshot;

pub use snapshot::{MAX_SNAPSHOT_BYTES, MIN_WRITE_INTERVAL, SnapshotError, SnapshotRegistry};

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

impl UrlError {
    /// `url` (shown redacted) cannot be used, for `reason`.
    fn new(url: &str, reason: &str) -> Self {
        Self {
            url: redacted(url),
            reason: reason.to_owned(),
        }
    }
}

/// The environment variable registry clients read their token from.
pub const TOKEN_ENV: &str = "LODESTAR_REGISTRY_TOKEN";

/// A registry from its URL:
///
/// * `memory://`: a registry inside this process;
/// * `lodestar://host:port[,host:port…]`: `lodestar registry` servers
///   (tried in turn), in plaintext;
/// * `lodestars://host:port[,host:port…]?ca=PATH[&cert=PATH&key=PATH][&server_name=NAME]`:
///   the same over TLS, trusting the CA certificate(s) in `ca`; with
///   `cert` and `key`, presenting that client certificate (mutual TLS);
///   with `server_name`, verifying the servers' certificates against that
///   name instead of the hosts in the URL;
/// * `etcd://host:port[,host:port…][?prefix=…&user=…&password=…&ca=…]`:
///   an etcd cluster (with the default `etcd` feature).
///
/// `lodestar` and `lodestars` clients send the token in
/// [`TOKEN_ENV`] (`LODESTAR_REGISTRY_TOKEN`) with every call, reads
/// included. `?token=…` in the URL is accepted as a fallback and wins
/// over the environment; it shows wherever the URL does (process listings,
/// shell history), so prefer the environment.
///
/// Any but `memory://` may add `snapshot=PATH` (percent-encoded): the
/// registry is then a [`SnapshotRegistry`] keeping its snapshot in the file
/// `PATH` (see [A snapshot on disk](crate#a-snapshot-on-disk)).
pub fn from_url(url: &str) -> Result<Arc<dyn Registry>, UrlError> {
    let (base, snapshot) = split_snapshot(url)?;
    match snapshot {
        Some(path) => Ok(Arc::new(SnapshotRegistry::new(
            open(&base, url)?,
            registry_name(&base),
            path,
        ))),
        None => open(&base, url),
    }
}

/// The registry named by `base` (a URL without `snapshot=`); errors show
/// `url`, the URL as the user wrote it.
fn open(base: &str, url: &str) -> Result<Arc<dyn Registry>, UrlError> {
    let error = |reason: &str| UrlError::new(url, reason);
    let expected = "expected memory://, lodestar://host:port[,host:port], \
                    lodestars://host:port[,host:port]?ca=… or etcd://host:port[,host:port]";
    let (scheme, rest) = base.split_once("://").ok_or_else(|| error(expected))?;
    match scheme {
        "memory" if rest.is_empty() => Ok(Arc::new(MemoryRegistry::new())),
        "lodestar" | "lodestars" => {
            let tls = scheme == "lodestars";
            let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
            let addresses = lodestar::parse_host_ports(hosts)
                .map_err(|e| error(&format!("{e} ({expected})")))?;
            let known = if tls {
                "token, ca, cert, key or server_name"
            } else {
                "token; TLS parameters need lodestars://"
            };
            let mut token = None;
            let (mut ca, mut cert, mut key, mut server_name) = (None, None, None, None);
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let slot = match pair.split_once('=') {
                    Some(("token", _)) => &mut token,
                    Some(("ca", _)) if tls => &mut ca,
                    Some(("cert", _)) if tls => &mut cert,
                    Some(("key", _)) if tls => &mut key,
                    Some(("server_name", _)) if tls => &mut server_name,
                    Some((name, _)) => {
                        return Err(error(&format!(
                            "unknown parameter `{name}` (expected {known}, or snapshot=…)"
                        )));
                    }
                    None => {
                        return Err(error(&format!(
                            "unknown parameter `{pair}` (expected {known})"
                        )));
                    }
                };
                *slot = pair.split_once('=').map(|(_, value)| value.to_owned());
            }
            let token = token.or_else(|| std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()));
            if let Some(token) = &token
                && !token.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(error(
                    "the token must be printable ASCII without spaces (it travels in a header)",
                ));
            }
            let mut registry = RemoteRegistry::new(&addresses);
            if tls {
                let client_tls = client_tls(ca, cert, key, server_name).map_err(|e| error(&e))?;
                registry = registry.with_tls(client_tls);
            }
            if let Some(token) = token {
                registry = registry.with_token(token);
            }
            Ok(Arc::new(registry))
        }
        #[cfg(feature = "etcd")]
        "etcd" => match lodestar_etcd::EtcdRegistry::from_url(base) {
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

/// `url` without its `snapshot=` parameter, and that parameter's path.
fn split_snapshot(url: &str) -> Result<(String, Option<PathBuf>), UrlError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    let mut kept = Vec::new();
    let mut snapshot = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if pair != "snapshot" && !pair.starts_with("snapshot=") {
            kept.push(pair);
            continue;
        }
        let path: String = form_urlencoded::parse(pair.as_bytes())
            .map(|(_, value)| value.into_owned())
            .collect();
        if path.is_empty() {
            return Err(UrlError::new(url, "snapshot= needs the path of a file"));
        }
        if snapshot.replace(PathBuf::from(path)).is_some() {
            return Err(UrlError::new(url, "snapshot= is given more than once"));
        }
    }
    if snapshot.is_some() && base.starts_with("memory://") {
        return Err(UrlError::new(
            url,
            "a memory:// registry ends with its process; there is nothing to keep a snapshot of",
        ));
    }
    let base = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((base, snapshot))
}

/// What a snapshot file records as its registry, for a URL without
/// `snapshot=`: the scheme, the hosts (in any order: the same cluster), and
/// etcd's key prefix; never a token or password, nor settings that do not
/// change which instances the registry holds.
fn registry_name(base: &str) -> String {
    let (scheme, rest) = base.split_once("://").unwrap_or(("", base));
    let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
    hosts.sort_unstable();
    let mut name = format!("{scheme}://{}", hosts.join(","));
    if scheme == "etcd" {
        let prefix = form_urlencoded::parse(query.as_bytes())
            .filter(|(key, _)| key == "prefix")
            .last()
            .map(|(_, value)| value.trim_end_matches('/').to_owned());
        if let Some(prefix) = prefix {
            name.push_str("?prefix=");
            name.push_str(&prefix);
        }
    }
    name
}

/// The TLS settings of a `lodestars://` URL.
fn client_tls(
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    server_name: Option<String>,
) -> Result<lodestar::tls::ClientTls, String> {
    let ca = ca.ok_or("lodestars:// needs ca=PATH (the CA certificate servers chain to)")?;
    let mut tls = lodestar::tls::ClientTls::from_ca_file(&ca).map_err(|e| e.to_string())?;
    tls = match (cert, key) {
        (Some(cert), Some(key)) => tls
            .with_identity_files(&cert, &key)
            .map_err(|e| e.to_string())?,
        (None, None) => tls,
        _ => return Err("cert=PATH and key=PATH go together (mutual TLS)".to_owned()),
    };
    if let Some(name) = server_name {
        tls = tls.with_server_name(&name).map_err(|e| e.to_string())?;
    }
    Ok(tls)
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

/// The registry a configuration names: `[registry] url` (see
/// [`from_url`]), which is `memory://` unless the file or the environment
/// (`LODESTAR_REGISTRY_URL`, or `LODESTAR_REGISTRY` as before) says
/// otherwise. The token still comes from [`TOKEN_ENV`]; it is never a key
/// of the file.
///
/// This crate opens it because `lodestar` cannot depend on it; the rest of
/// a service comes from
/// [`ServiceBuilder::from_config`](lodestar::ServiceBuilder::from_config):
///
/// ```
/// use lodestar::config::Config;
/// use lodestar::{Client, ServiceBuilder};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // Usually `Config::load("lodestar.toml")?`: the file, then the environment.
/// let config = Config::from_toml(r#"
///     [service]
///     name = "orders"
///     admin = "off"
///     [registry]
///     url = "memory://"
///     [broker]
///     url = "memory://"
///     [telemetry]
///     install = false
/// "#)?;
/// let registry = lodestar_registry::from_config(&config)?;
/// let running = ServiceBuilder::from_config(&config)?
///     .registry(registry.clone())
///     .start()
///     .await?;
/// let instances = registry.instances(&lodestar::ServiceKey::new("orders")).await?;
/// assert_eq!(instances.len(), 1);
/// let client = Client::from_config(registry, &config)?.build();
/// # drop(client);
/// running.shutdown().await?;
/// # Ok(()) }
/// ```
pub fn from_config(config: &lodestar::config::Config) -> Result<Arc<dyn Registry>, UrlError> {
    from_url(&config.registry.url)
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
    /// TLS towards the servers, if any.
    tls: Option<lodestar::tls::ClientTls>,
    /// `Bearer {token}`, parsed once.
    authorization: Option<lodestar::metadata::AsciiMetadataValue>,
    /// The last known instances of each service looked up or watched.
    cache: Mutex<HashMap<ServiceKey, Cached>>,
    /// The stream heartbeats go on.
    keepalive: keepalive::KeepAlive,
    /// Where it counts, and shows its cache when scraped.
    metrics: lodestar::metrics::Metrics,
}

/// What this client knows of one service.
#[derive(Default)]
struct Cached {
    instances: BTreeMap<String, Instance>,
    /// The set came (in part) from a registry that was still warming up:
    /// it may hold instances that never came back, so the next watch asks
    /// for a full snapshot.
    from_warming: bool,
    /// When the server last confirmed the set: its last answer, or the
    /// moment its last open watch ended.
    confirmed: Option<std::time::Instant>,
    /// Watches of the service open now: while one is, the server tells
    /// every change, and the set is current.
    watching: usize,
    /// A watch of the service ended: the next one is a reconnection.
    watch_ended: bool,
}

impl std::fmt::Debug for RemoteRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.inner.tls.is_some() {
            "lodestars"
        } else {
            "lodestar"
        };
        write!(f, "{scheme}://{}", self.inner.addresses.join(","))
    }
}

/// How long one registry call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

impl RemoteRegistry {
    /// A registry served at `addresses` (`host:port`; tried in turn).
    pub fn new(addresses: &[String]) -> Self {
        Self::build(
            addresses.to_vec(),
            None,
            None,
            lodestar::metrics::Metrics::global().clone(),
        )
    }

    fn build(
        addresses: Vec<String>,
        tls: Option<lodestar::tls::ClientTls>,
        authorization: Option<lodestar::metadata::AsciiMetadataValue>,
        metrics: lodestar::metrics::Metrics,
    ) -> Self {
        let known = StaticRegistry::new().with(SERVICE_NAME, addresses.iter().cloned());
        let mut client = Client::builder(known)
            .connect_timeout(Duration::from_secs(1))
            .ejection(Duration::from_millis(500), Duration::from_secs(5));
        if let Some(tls) = &tls {
            client = client.tls(tls.clone());
        }
        let inner = Arc::new(Inner {
            addresses,
            client: client.build(),
            tls,
            authorization,
            cache: Mutex::new(HashMap::new()),
            keepalive: keepalive::KeepAlive::default(),
            metrics,
        });
        metrics::ClientMetrics::of(&inner.metrics).add(&inner);
        Self { inner }
    }

    /// Counts its watch reconnections and shows the age of its cache
    /// (`lodestar_registry_client_*`) in `metrics` rather than the
    /// process's registry.
    pub fn with_metrics(self, metrics: &lodestar::metrics::Metrics) -> Self {
        Self::build(
            self.inner.addresses.clone(),
            self.inner.tls.clone(),
            self.inner.authorization.clone(),
            metrics.clone(),
        )
    }

    /// Sends `token` with every call, reads included
    /// (`authorization: Bearer <token>`).
    pub fn with_token(self, token: impl Into<String>) -> Self {
        let token = token.into();
        let authorization = format!("Bearer {token}").parse().ok();
        if authorization.is_none() {
            tracing::warn!(
                "the registry token has characters a header cannot carry; calls that need it will be refused"
            );
        }
        Self::build(
            self.inner.addresses.clone(),
            self.inner.tls.clone(),
            authorization,
            self.inner.metrics.clone(),
        )
    }

    /// Talks to the servers over TLS (mutual TLS if `tls` has an identity).
    pub fn with_tls(self, tls: lodestar::tls::ClientTls) -> Self {
        Self::build(
            self.inner.addresses.clone(),
            Some(tls),
            self.inner.authorization.clone(),
            self.inner.metrics.clone(),
        )
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
            (Code::FailedPrecondition, _) => RegistryError::Conflict(status.message().to_owned()),
            (Code::Unauthenticated | Code::PermissionDenied, _) => {
                RegistryError::Unauthorized(status.message().to_owned())
            }
            _ => RegistryError::Unavailable(format!("{self:?}: {}", status.message())),
        }
    }

    fn cached(&self, key: &ServiceKey) -> Option<Vec<Instance>> {
        let cache = self.inner.cache.lock_unpoisoned();
        cache
            .get(key)
            .map(|c| c.instances.values().cloned().collect())
    }

    /// Takes in a lookup's answer: it replaces what was known, unless the
    /// registry is warming up, when it only adds to it.
    fn remember(&self, key: &ServiceKey, instances: Vec<Instance>, warming: bool) -> Vec<Instance> {
        let mut cache = self.inner.cache.lock_unpoisoned();
        let cached = cache.entry(key.clone()).or_default();
        cached.confirmed = Some(std::time::Instant::now());
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
        let cache = self.inner.cache.lock_unpoisoned();
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
        let open = metrics::OpenWatch::begin(&self.inner, service);
        let this = self.clone();
        let key = service.clone();
        let events = stream.flat_map(move |response| {
            // Ends with the stream: the cache stops being current then.
            let _open = &open;
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
        let mut cache = self.inner.cache.lock_unpoisoned();
        let cached = cache.entry(key.clone()).or_default();
        cached.confirmed = Some(std::time::Instant::now());
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
        weight: Some(instance.weight),
        zone: instance.zone.clone(),
        healthy: instance.healthy,
        enabled: Some(instance.enabled),
        ephemeral: instance.ephemeral,
    }
}

/// An instance from the wire form; an unset weight is 100 and an unset
/// `enabled` is true, as [`Instance::new`] has them.
pub fn from_pb(instance: pb::Instance) -> Instance {
    let key = key_from_pb(instance.service.unwrap_or_default());
    let mut out = Instance::new(key.service.clone(), instance.address).with_service_key(key);
    out.id = instance.id;
    out.version = instance.version;
    if !instance.protocol.is_empty() {
        out.protocol = instance.protocol;
    }
    out.metadata = instance.metadata.into_iter().collect();
    if let Some(weight) = instance.weight {
        out.weight = weight;
    }
    out.zone = instance.zone;
    out.healthy = instance.healthy;
    if let Some(enabled) = instance.enabled {
        out.enabled = enabled;
    }
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
            ("lodestar://h:1?ca=/x", "TLS parameters need lodestars://"),
            ("lodestars://h:1", "needs ca=PATH"),
            (
                "lodestars://h:1?ca=/nonexistent/ca.pem",
                "cannot read the CA certificate",
            ),
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
