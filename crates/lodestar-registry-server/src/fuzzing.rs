//! Entry points for the fuzz targets in `fuzz/` (not part of the API).

use std::sync::Arc;
use std::time::Duration;

use crate::{Config, Server, Tokens, grpc, http, pb};

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
    /// A server whose writes need `token`, if given (as `--token` does).
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        let tokens = match token {
            Some(token) => Tokens::single(token).map_err(|e| e.to_string())?,
            None => Tokens::none(),
        };
        let config = Config {
            tokens,
            warmup: Duration::ZERO,
            metrics: lodestar::metrics::Metrics::new(),
            ..Config::default()
        };
        let closing = tokio::sync::watch::Sender::new(false);
        let server = Arc::new(Server::new(&config, closing.subscribe())?);
        let service = pb::registry_server::RegistryServer::new(grpc::Api::new(server.clone()));
        let metrics = crate::metrics::ServerMetrics::of(&config.metrics);
        metrics.add(&server);
        Ok(Self {
            http: http::router(server, config.max_body, config.request_timeout, metrics),
            grpc: axum::Router::new().fallback_service(service),
            _closing: closing,
        })
    }
}
