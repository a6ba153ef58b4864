//! Entry points for the fuzz targets in `fuzz/` (not part of the API).

use std::sync::Arc;
use std::time::Duration;

use lodestar::MemoryRegistry;
use tokio::time::Instant;

use crate::{Server, grpc, http, pb, store};

/// Both APIs of one fresh registry server (in memory, no data directory,
/// no warm-up, health checks not running), to call in process.
pub struct Apis {
    /// The HTTP/JSON API's router.
    pub http: axum::Router,
    /// The generated `lodestar.registry.v1.Registry` gRPC service, behind
    /// a router that sends it every request.
    pub grpc: axum::Router,
    /// Shutdown has not begun while this lives.
    _closing: tokio::sync::watch::Sender<bool>,
}

impl Apis {
    /// A server whose writes need `token`, if given.
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        let closing = tokio::sync::watch::Sender::new(false);
        let server = Arc::new(Server {
            registry: MemoryRegistry::new(),
            token: token.map(str::to_owned),
            started: Instant::now(),
            warmup: Duration::ZERO,
            store: store::Store::open(None)?,
            check_interval: Duration::from_secs(1),
            closing: closing.subscribe(),
        });
        let service = pb::registry_server::RegistryServer::new(grpc::Api::new(server.clone()));
        Ok(Self {
            http: http::router(server),
            grpc: axum::Router::new().fallback_service(service),
            _closing: closing,
        })
    }
}
