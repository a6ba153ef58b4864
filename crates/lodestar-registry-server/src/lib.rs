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
//!   it shows in logs, in the status API and in the `/v1/status` page.
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
//! * **Auth**: with a token, every write needs `authorization: Bearer
//!   <token>` (gRPC metadata or HTTP header). Reads are open.

mod checks;
#[doc(hidden)]
pub mod fuzzing;
mod grpc;
mod http;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lodestar::registry::memory::SelfPreservation;
use lodestar::{InstanceKey, MemoryRegistry, RunningService, Service};
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
    /// The token writes need; `None`: writes are open.
    pub token: Option<String>,
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 7070)),
            http_addr: Some(SocketAddr::from(([127, 0, 0, 1], 7071))),
            data_dir: None,
            token: None,
            eviction_grace: Duration::from_secs(10),
            warmup: Duration::from_secs(10),
            check_interval: Duration::from_secs(5),
            self_preservation: Some(SelfPreservation::default()),
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
}

/// What the APIs share.
pub(crate) struct Server {
    pub(crate) registry: MemoryRegistry,
    pub(crate) token: Option<String>,
    pub(crate) started: Instant,
    pub(crate) warmup: Duration,
    pub(crate) store: store::Store,
    pub(crate) check_interval: Duration,
    /// Set when shutdown begins: long-lived streams (keep-alive) end then,
    /// rather than hold the drain up until its grace period runs out.
    pub(crate) closing: tokio::sync::watch::Receiver<bool>,
}

impl Server {
    pub(crate) fn warming(&self) -> bool {
        self.started.elapsed() < self.warmup
    }

    pub(crate) fn warmup_ends(&self) -> Instant {
        self.started + self.warmup
    }

    /// Whether `authorization` (a header value) allows a write.
    pub(crate) fn allows_write(&self, authorization: Option<&str>) -> bool {
        match &self.token {
            None => true,
            Some(token) => authorization
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes())),
        }
    }

    /// Saves the persistent instances, logging (not failing) on error.
    pub(crate) fn save(&self) {
        if let Err(e) = self.store.save(&self.registry) {
            tracing::error!(error = %e, "cannot save the persistent instances");
        }
    }

    /// Registers a persistent instance with its health check, and saves.
    pub(crate) fn register_persistent(
        &self,
        instance: lodestar::Instance,
        check: store::Check,
    ) -> Result<(), lodestar::RegistryError> {
        let key = instance.instance_key();
        self.registry.register_persistent(instance)?;
        self.store.remember(key, check);
        self.save();
        Ok(())
    }

    /// Deregisters an instance; a persistent one also loses its check, and
    /// the change is saved.
    pub(crate) async fn deregister(
        &self,
        key: &InstanceKey,
    ) -> Result<(), lodestar::RegistryError> {
        use lodestar::Registry as _;
        let persistent = self.registry.is_persistent(key).unwrap_or(false);
        self.registry.deregister(key).await?;
        if persistent {
            self.store.forget(key);
            self.save();
        }
        Ok(())
    }

    /// Refuses to turn a persistent instance ephemeral or the other way
    /// round: deregister it first.
    pub(crate) fn check_kind(&self, key: &InstanceKey, persistent: bool) -> Result<(), String> {
        let Some(is_persistent) = self.registry.is_persistent(key) else {
            return Ok(());
        };
        if is_persistent != persistent {
            let (was, now) = if is_persistent {
                ("persistent", "ephemeral")
            } else {
                ("ephemeral", "persistent")
            };
            return Err(format!(
                "instance {key} is registered as {was}; deregister it before registering it as {now}"
            ));
        }
        Ok(())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    let first_revision = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let mut registry = MemoryRegistry::builder()
        .eviction_grace(config.eviction_grace)
        .first_revision(first_revision);
    if let Some(preservation) = config.self_preservation {
        registry = registry.self_preservation(preservation);
    }
    let registry = registry.build();
    let store = store::Store::open(config.data_dir.clone()).map_err(Error::Store)?;
    let restored = store.load(&registry).map_err(Error::Store)?;
    if restored > 0 {
        tracing::info!(restored, "persistent instances restored");
    }
    let closing = tokio::sync::watch::Sender::new(false);
    let server = Arc::new(Server {
        registry,
        token: config.token.clone(),
        started: Instant::now(),
        warmup: config.warmup,
        store,
        check_interval: config.check_interval,
        closing: closing.subscribe(),
    });

    let grpc = Service::builder(lodestar_registry::SERVICE_NAME)
        .bind(config.addr)
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
            tasks.push(tokio::spawn(http::serve(listener, server.clone())));
            Some(bound)
        }
    };
    tracing::info!(grpc = %grpc.local_addr(), http = ?http_addr, "registry serving");
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
