//! Health checks of persistent instances.

use std::sync::Arc;
use std::time::Duration;

use lodestar::InstanceKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Server;
use crate::store::Check;

/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Checks every persistent instance that has a check, each at its interval.
pub(crate) async fn run(server: Arc<Server>) {
    let mut due: std::collections::HashMap<InstanceKey, tokio::time::Instant> = Default::default();
    // Checks in flight: a new one starts only when the last has answered, so
    // a slow answer can never overwrite a newer one.
    let running: Arc<std::sync::Mutex<std::collections::HashSet<InstanceKey>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        let checks = server.store.checks();
        let current: std::collections::HashSet<&InstanceKey> =
            checks.iter().map(|(k, _)| k).collect();
        due.retain(|key, _| current.contains(key));
        drop(current);
        for (key, check) in checks {
            if check.kind == "none" || due.get(&key).is_some_and(|at| *at > now) {
                continue;
            }
            if !running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.clone())
            {
                continue;
            }
            let interval = match check.interval_ms {
                0 => server.check_interval,
                ms => Duration::from_millis(u64::from(ms)),
            };
            due.insert(key.clone(), now + interval);
            let address = server
                .registry
                .get(&key)
                .filter(|(_, persistent)| *persistent)
                .map(|(instance, _)| instance.address);
            let Some(address) = address else {
                running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                continue;
            };
            let server = server.clone();
            let running = running.clone();
            tokio::spawn(async move {
                let healthy = tokio::time::timeout(CHECK_TIMEOUT, probe(&address, &check))
                    .await
                    .unwrap_or(false);
                if server.registry.set_health(&key, healthy).is_ok() {
                    tracing::debug!(instance = %key, healthy, "health check");
                }
                running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
            });
        }
    }
}

async fn probe(address: &str, check: &Check) -> bool {
    match check.kind.as_str() {
        "tcp" => TcpStream::connect(address).await.is_ok(),
        "http" => http_ok(address, &check.target).await,
        "grpc" => grpc_serving(address, &check.target).await,
        _ => true,
    }
}

/// `GET http://address{path}` answers 2xx.
async fn http_ok(address: &str, path: &str) -> bool {
    let path = if path.is_empty() { "/" } else { path };
    let Ok(mut stream) = TcpStream::connect(address).await else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    if stream.read_exact(&mut head).await.is_err() {
        return false;
    }
    // "HTTP/1.1 200"
    head.starts_with(b"HTTP/1.") && head[9] == b'2'
}

/// `grpc.health.v1.Health/Check` says SERVING.
async fn grpc_serving(address: &str, service: &str) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let registry = lodestar::StaticRegistry::new().with("checked", [address]);
    let client = lodestar::Client::builder(registry)
        .connect_timeout(CHECK_TIMEOUT)
        .timeout(CHECK_TIMEOUT)
        .build();
    let mut health = HealthClient::new(client.channel("checked"));
    let request = tonic_health::pb::HealthCheckRequest {
        service: service.to_owned(),
    };
    health
        .check(request)
        .await
        .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
}
