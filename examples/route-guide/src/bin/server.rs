//! `route-guide-server`: serves RouteGuide and registers it as `route-guide`.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use lodestar::{MemoryRegistry, Service};
use route_guide::{RouteGuideService, SERVICE_NAME};

/// Serves the RouteGuide example until SIGINT or SIGTERM, then shuts down gracefully.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to serve on, exactly (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:10000")]
    addr: SocketAddr,
    /// Name put in the `x-served-by` response metadata. Default: the address.
    #[arg(long)]
    name: Option<String>,
    /// Registry to register in (lodestar://host:port, memory://). Default:
    /// LODESTAR_REGISTRY, else a registry of its own.
    #[arg(long, env = "LODESTAR_REGISTRY")]
    registry: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let name = args.name.unwrap_or_else(|| args.addr.to_string());
    let registry = match &args.registry {
        Some(url) => lodestar_registry::from_url(url)?,
        None => Arc::new(MemoryRegistry::new()),
    };
    let running = Service::builder(SERVICE_NAME)
        .version(env!("CARGO_PKG_VERSION"))
        .bind(args.addr)
        .registry(registry)
        .add_service(RouteGuideService::new(name).into_server())
        .start()
        .await?;
    println!("route-guide serving on {}", running.local_addr());
    lodestar::server::shutdown_signal().await;
    running.shutdown().await?;
    Ok(())
}
