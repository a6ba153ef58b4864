//! The lodestar registry server: what `lodestar registry` runs.
//!
//! # Semantics
//!
//! * **Model**: namespace > group > service > instance. An instance has an
//!   id, address, protocol, version, metadata labels, weight, zone, and
//!   two switches: `healthy` (decided by leases or health checks) and
//!   `enabled` (decided by operators, to take it out of traffic without
//!   stopping it).
//! * **Ephemeral instances** hold a lease (their TTL) renewed by
//!   heartbeats, at least every third of the TTL. A lease that runs out
//!   marks the instance unhealthy (clients stop picking it); after
//!   [`Config::eviction_grace`] more it is evicted. lodestar services
//!   default to a 6 s TTL and 2 s heartbeats: a dead instance is out of
//!   traffic within 6 s, gone within 16 s.
//! * **Persistent instances** are registered to stay (by operators, or by
//!   services that do not heartbeat), saved in the data directory so that
//!   they survive restarts, and health-checked by the server (TCP, HTTP or
//!   gRPC health).
//! * **Self-preservation**: when most instances stop renewing at once,
//!   expiry freezes (see [`lodestar::registry::memory::SelfPreservation`]);
//!   it shows in logs, in the status API, in the `/v1/status` page and
//!   in `GET /metrics`.
//! * **Metrics**: the HTTP API serves `GET /metrics` (OpenMetrics text,
//!   [`Config::metrics`]; reading it takes read access to every
//!   namespace, as service names show in it), `GET /healthz` (alive) and
//!   `GET /readyz` (serving, not shutting down); see `docs/observability.md`.
//! * **Protection threshold** per service: below it, lookups return every
//!   instance as healthy instead of funnelling all traffic onto a few.
//! * **Watch** streams ordered events with revisions; a watcher that
//!   reconnects resumes after its revision, or gets a snapshot. Events
//!   that happen together travel together; a watcher that falls behind
//!   gets a snapshot instead of slowing the server. Revisions start from
//!   the clock, so they keep growing across restarts.
//! * **Warm-up**: for [`Config::warmup`] after a start, instances are
//!   still coming back; snapshots say so, and clients merge them with what
//!   they knew instead of dropping instances the registry has not heard
//!   from yet. When warm-up ends, watchers get a full snapshot.
//! * **Auth**: tokens scoped to namespaces, with read or write rights
//!   ([`Tokens`]; `authorization: Bearer <token>` as gRPC metadata or an
//!   HTTP header). Every request is checked against the namespace it
//!   touches: `ListServices` by its namespace; `GetInstances`, `Watch`,
//!   `Register`, `Heartbeat`, `KeepAlive` (each heartbeat on it),
//!   `Deregister`, `SetEnabled` and `SetProtection` by the namespace of
//!   the service they name. Anonymous callers may read the namespaces of
//!   [`Config::open_reads`]. `Status` (and `GET /v1/status`) is open to
//!   all: it holds only counts and flags, no names. Refusals say which
//!   token (by name), namespace and right; never the secret. With no
//!   tokens, everything is open. A single [`Config::tokens`] from
//!   [`Tokens::single`] is the legacy `--token`: write access everywhere.
//! * **TLS** ([`Config::tls`]): both APIs, with the same certificates;
//!   with mutual TLS, clients without a certificate from the CA are
//!   refused during the handshake. Clients use `lodestars://` URLs (see
//!   [`lodestar_registry::from_url`]).
//! * **Bounds**: the HTTP API reads no body before the request is
//!   authorized (a caller that may not write anywhere is answered before
//!   its body is read), takes JSON bodies up to [`Config::max_body`]
//!   (413 past it), closes connections that do not send a request's
//!   headers within [`Config::header_timeout`] (idle keep-alive
//!   connections included) or take longer than [`Config::request_timeout`]
//!   for a whole request, and serves at most [`Config::http_max_connections`]
//!   connections at once (more are closed as they are accepted). The gRPC
//!   API closes connections that do not finish the TLS handshake and the
//!   HTTP/2 preface within [`Config::header_timeout`], and pings idle ones
//!   (see [`lodestar::Http2Settings`]). At start, the soft open-file limit
//!   is raised to the hard limit, so that connections do not run out of
//!   file descriptors first.

mod auth;
mod checks;
mod conn;
#[doc(hidden)]
pub mod fuzzing;
mod grpc;
mod http;
mod metrics;
mod registration;
mod store;

pub use auth::{ALL_NAMESPACES, Access, SINGLE_TOKEN_NAME, Tokens, TokensError};
pub use checks::Network;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lodestar::registry::Limits;
use lodestar::registry::memory::SelfPreservation;
use lodestar::{
    InstanceKey, MemoryRegistry, Registry as _, RegistryError, RunningService, Service, ServiceKey,
};
use tokio::time::Instant;

pub use lodestar_registry::pb;

/// How the registry server runs. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct Config {
    /// The gRPC API. Default: `127.0.0.1:7070`.
    pub addr: SocketAddr,
    /// The HTTP/JSON API; `None` turns it off. Default: `127.0.0.1:7071`.
    pub http_addr: Option<SocketAddr>,
    /// Where persistent instances are kept; `None`: in memory only.
    pub data_dir: Option<PathBuf>,
    /// The tokens requests are checked against (see [`Tokens`]); none:
    /// everything is open. Default: none.
    pub tokens: Tokens,
    /// Namespaces anonymous callers may read (`"*"`: all); when no tokens
    /// are configured, everything is open anyway. Default: `["*"]`, reads
    /// open (as before tokens had scopes); set `[]` for a registry whose
    /// tenants must not see each other.
    pub open_reads: Vec<String>,
    /// TLS for both APIs (mutual TLS if it requires client certificates);
    /// `None`: plaintext. Default: `None`.
    pub tls: Option<lodestar::tls::ServerTls>,
    /// How long a connection has to send a request's headers (the HTTP
    /// API, also while idle between requests), or to finish its TLS
    /// handshake and HTTP/2 preface (the gRPC API). Default: 10 s.
    pub header_timeout: Duration,
    /// How long one HTTP request (its body included) may take before it
    /// is answered 408. Default: 30 s.
    pub request_timeout: Duration,
    /// How many connections the HTTP API serves at once; more are closed
    /// as they are accepted. Default: 512.
    pub http_max_connections: usize,
    /// How many connections the gRPC API serves at once; more are closed
    /// as they are accepted (lodestar's [`lodestar::ConnectionLimits`]).
    /// Default: 4096.
    pub grpc_max_connections: usize,
    /// The largest HTTP request body, in bytes; larger ones are answered
    /// 413 (registrations are well under 1 KiB). Default: 64 KiB.
    pub max_body: usize,
    /// How long an instance whose lease ran out stays (unhealthy) before
    /// it is evicted. Default: 10 s.
    pub eviction_grace: Duration,
    /// How long after a start instances are still coming back. Default: 10 s.
    pub warmup: Duration,
    /// How often persistent instances are health-checked, unless they say
    /// otherwise. Default: 5 s.
    pub check_interval: Duration,
    /// Self-preservation; `None` turns it off. Default: on, with its defaults.
    pub self_preservation: Option<SelfPreservation>,
    /// What registrations are accepted: names, sizes, lease TTLs.
    /// Default: [`Limits::default`].
    pub limits: Limits,
    /// How many bytes of instances the watch history may hold. Default:
    /// 16 MiB.
    pub history_bytes: usize,
    /// The networks health checks may reach; empty: any. Default: empty.
    /// An operator whose registry takes registrations from untrusted
    /// clients sets this to the networks its services live in.
    pub check_networks: Vec<Network>,
    /// Where the server counts what it does (served on `GET /metrics` of
    /// the HTTP API). Default: [`Metrics::global`](lodestar::metrics::Metrics::global).
    pub metrics: lodestar::metrics::Metrics,
}

impl Config {
    /// A server for tests and demos: gRPC on loopback at any free port,
    /// no HTTP API, no warm-up; every other setting the default.
    ///
    /// ```
    /// let config = lodestar_registry_server::Config::ephemeral();
    /// assert_eq!(config.addr.port(), 0);
    /// assert!(config.http_addr.is_none());
    /// ```
    pub fn ephemeral() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: None,
            warmup: Duration::ZERO,
            ..Self::default()
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 7070)),
            http_addr: Some(SocketAddr::from(([127, 0, 0, 1], 7071))),
            data_dir: None,
            tokens: Tokens::none(),
            open_reads: vec![ALL_NAMESPACES.to_owned()],
            tls: None,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            http_max_connections: 512,
            grpc_max_connections: 4096,
            max_body: 64 * 1024,
            eviction_grace: Duration::from_secs(10),
            warmup: Duration::from_secs(10),
            check_interval: Duration::from_secs(5),
            self_preservation: Some(SelfPreservation::default()),
            limits: Limits::default(),
            history_bytes: 16 * 1024 * 1024,
            check_networks: Vec::new(),
            metrics: lodestar::metrics::Metrics::global().clone(),
        }
    }
}

/// Why the registry server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The gRPC API could not be served.
    #[error("registry gRPC API: {0}")]
    Serve(#[from] lodestar::server::ServeError),
    /// The HTTP API could not bind.
    #[error("registry HTTP API: cannot bind {address}: {source}")]
    Http {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The data directory could not be used.
    #[error("registry data directory: {0}")]
    Store(String),
    /// A limit is out of range.
    #[error("registry limits: {0}")]
    Limits(String),
}

/// What the APIs share.
pub(crate) struct Server {
    pub(crate) registry: MemoryRegistry,
    pub(crate) auth: auth::Auth,
    pub(crate) started: Instant,
    pub(crate) warmup: Duration,
    pub(crate) store: store::Store,
    pub(crate) check_interval: Duration,
    pub(crate) check_networks: Vec<Network>,
    /// Set when shutdown begins: long-lived streams (keep-alive) end then,
    /// rather than hold the drain up until its grace period runs out.
    pub(crate) closing: tokio::sync::watch::Receiver<bool>,
    /// Self-preservation's settings, if it is on.
    pub(crate) self_preservation: Option<SelfPreservation>,
    /// Where it counts, and what `GET /metrics` serves.
    pub(crate) metrics: lodestar::metrics::Metrics,
}

impl Server {
    /// The state both APIs share, as `config` has it, with what the data
    /// directory holds loaded; the error says why the data directory
    /// cannot be used.
    pub(crate) fn new(
        config: &Config,
        closing: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Self, String> {
        let first_revision = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let mut registry = MemoryRegistry::builder()
            .limits(config.limits)
            .history_bytes(config.history_bytes)
            .eviction_grace(config.eviction_grace)
            .first_revision(first_revision);
        if let Some(preservation) = config.self_preservation {
            registry = registry.self_preservation(preservation);
        }
        let registry = registry.build();
        let (store, restored) = store::Store::open(config.data_dir.clone(), &registry)?;
        if restored > 0 {
            tracing::info!(restored, "persistent instances restored");
        }
        Ok(Self {
            registry,
            auth: auth::Auth::new(config.tokens.clone(), config.open_reads.clone()),
            started: Instant::now(),
            warmup: config.warmup,
            store,
            check_interval: config.check_interval,
            check_networks: config.check_networks.clone(),
            closing,
            self_preservation: config.self_preservation,
            metrics: config.metrics.clone(),
        })
    }

    pub(crate) fn warming(&self) -> bool {
        self.started.elapsed() < self.warmup
    }

    pub(crate) fn warmup_ends(&self) -> Instant {
        self.started + self.warmup
    }

    /// Registers, as either API was asked to: an ephemeral instance in
    /// memory, a persistent one on disk first and then in memory.
    pub(crate) async fn register(
        &self,
        registration: registration::Registration,
    ) -> Result<(), RegistryError> {
        let registration::Registration { instance, kind } = registration;
        match kind {
            registration::Kind::Lease(ttl) => self.registry.register(instance, ttl).await,
            registration::Kind::Persistent(check) => {
                self.register_persistent(instance, check).await
            }
        }
    }

    /// Registers a persistent instance with its health check. It is
    /// acknowledged only once it is on disk; the check of its kind, the
    /// write and its application in memory are one step.
    async fn register_persistent(
        &self,
        instance: lodestar::Instance,
        check: store::Check,
    ) -> Result<(), RegistryError> {
        let mut gate = self.store.gate().await;
        let reservation = self.registry.reserve_persistent(&instance)?;
        let key = instance.instance_key();
        let before = self
            .registry
            .get(&key)
            .filter(|(_, persistent)| *persistent);
        self.store.put(&mut gate, &instance, &check).await?;
        if let Err(refused) = self.registry.register_reserved(reservation, instance) {
            // On disk but refused in memory (its service grew meanwhile):
            // put the disk back as it was.
            let undone = match before {
                Some((before, _)) => {
                    let check = self.store.check(&key).unwrap_or_default();
                    self.store.put(&mut gate, &before, &check).await
                }
                None => self.store.delete(&mut gate, &key).await,
            };
            if let Err(e) = undone {
                tracing::error!(instance = %key, error = %e, "cannot undo a refused registration on disk");
            }
            return Err(refused);
        }
        self.store.remember(key, check);
        self.store.maybe_compact(&mut gate, &self.registry).await;
        Ok(())
    }

    /// Deregisters an instance; a persistent one leaves the disk first.
    pub(crate) async fn deregister(&self, key: &InstanceKey) -> Result<(), RegistryError> {
        let mut gate = self.store.gate().await;
        if self.registry.is_persistent(key) == Some(true) {
            self.store.delete(&mut gate, key).await?;
            self.store.forget(key);
        }
        self.registry.deregister(key).await?;
        self.store.maybe_compact(&mut gate, &self.registry).await;
        Ok(())
    }

    /// Takes an instance out of traffic or puts it back; remembered on
    /// disk, across re-registrations and restarts.
    pub(crate) async fn set_enabled(
        &self,
        key: &InstanceKey,
        enabled: bool,
    ) -> Result<(), RegistryError> {
        let mut gate = self.store.gate().await;
        if self.registry.get(key).is_none() {
            return Err(RegistryError::NotFound(key.clone()));
        }
        self.store.enabled(&mut gate, key, enabled).await?;
        self.registry.set_enabled(key, enabled)?;
        self.store.maybe_compact(&mut gate, &self.registry).await;
        Ok(())
    }

    /// Sets a service's protection threshold, remembered on disk.
    pub(crate) async fn set_protection(
        &self,
        service: &ServiceKey,
        threshold: f64,
    ) -> Result<(), RegistryError> {
        lodestar::registry::limits::check_service_key(service)?;
        if !(0.0..=1.0).contains(&threshold) {
            return Err(RegistryError::Invalid(format!(
                "the protection threshold of service {} must be between 0 and 1, not {threshold}",
                lodestar::registry::limits::quoted(&service.to_string())
            )));
        }
        let mut gate = self.store.gate().await;
        // Only for a service that exists: otherwise any name would cost
        // memory and a record for good.
        if self.registry.health(service).0 == 0 {
            return Err(RegistryError::Invalid(format!(
                "service {} has no instances; register one before setting its protection threshold",
                lodestar::registry::limits::quoted(&service.to_string())
            )));
        }
        self.store.protection(&mut gate, service, threshold).await?;
        self.registry.set_protection_threshold(service, threshold);
        self.store.maybe_compact(&mut gate, &self.registry).await;
        Ok(())
    }
}

/// A running registry server.
#[derive(Debug)]
pub struct RunningRegistry {
    grpc: RunningService,
    http_addr: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    closing: tokio::sync::watch::Sender<bool>,
}

impl RunningRegistry {
    /// Where the gRPC API listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.grpc.local_addr()
    }

    /// Where the HTTP API listens, if it is on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Stops serving (the gRPC API drains gracefully).
    pub async fn shutdown(self) -> Result<(), Error> {
        for task in &self.tasks {
            task.abort();
        }
        self.closing.send_replace(true);
        self.grpc.shutdown().await?;
        Ok(())
    }
}

/// Starts a registry server.
pub async fn start(config: Config) -> Result<RunningRegistry, Error> {
    if config.http_max_connections == 0 || config.max_body == 0 {
        return Err(Error::Limits(format!(
            "http_max_connections ({}) and max_body ({}) must be at least 1",
            config.http_max_connections, config.max_body
        )));
    }
    conn::raise_open_file_limit();
    let closing = tokio::sync::watch::Sender::new(false);
    let server = Arc::new(Server::new(&config, closing.subscribe()).map_err(Error::Store)?);
    let metrics = metrics::ServerMetrics::of(&config.metrics);
    metrics.add(&server);

    let mut grpc = Service::builder(lodestar_registry::SERVICE_NAME)
        .bind(config.addr)
        .http2(lodestar::Http2Settings {
            handshake_timeout: config.header_timeout,
            ..lodestar::Http2Settings::server()
        })
        .connection_limits(lodestar::ConnectionLimits {
            max_connections: config.grpc_max_connections,
            ..lodestar::ConnectionLimits::default()
        })
        .metrics(Some(config.metrics.clone()));
    if config.http_addr.is_some() {
        // Its HTTP port serves the metrics, its own and the gRPC API's.
        grpc = grpc.admin_addr(None);
    }
    if let Some(tls) = &config.tls {
        grpc = grpc.tls(tls.clone());
    }
    let grpc = grpc
        .add_service(pb::registry_server::RegistryServer::new(grpc::Api::new(
            server.clone(),
        )))
        .start()
        .await?;
    let mut tasks = vec![tokio::spawn(checks::run(server.clone()))];
    let http_addr = match config.http_addr {
        None => None,
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| Error::Http { address, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| Error::Http { address, source })?;
            let limits = conn::Limits {
                max_connections: config.http_max_connections,
                header_timeout: config.header_timeout,
                tls: config
                    .tls
                    .as_ref()
                    .map(lodestar::tls::ServerTls::http1_acceptor),
            };
            let app = http::router(
                server.clone(),
                config.max_body,
                config.request_timeout,
                metrics,
            );
            tasks.push(tokio::spawn(conn::serve_http1(listener, app, limits)));
            Some(bound)
        }
    };
    tracing::info!(
        grpc = %grpc.local_addr(),
        http = ?http_addr,
        tls = config.tls.is_some(),
        tokens = ?config.tokens,
        open_reads = ?config.open_reads,
        "registry serving"
    );
    Ok(RunningRegistry {
        grpc,
        http_addr,
        tasks,
        closing,
    })
}

/// The server's status, for both APIs.
pub(crate) fn status(server: &Server) -> pb::StatusResponse {
    let stats = server.registry.stats();
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    pb::StatusResponse {
        revision: stats.revision,
        services: count(stats.services),
        instances: count(stats.instances),
        ephemeral: count(stats.ephemeral),
        renewing: count(stats.renewing),
        self_preservation: stats.self_preservation,
        warming: server.warming(),
        uptime_ms: u64::try_from(server.started.elapsed().as_millis()).unwrap_or(u64::MAX),
    }
}
