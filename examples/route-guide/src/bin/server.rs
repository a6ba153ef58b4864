//! `route-guide-server`: serves RouteGuide and registers it as `route-guide`.
//!
//! The same port serves the example page at `/` (`web/index.html`), which
//! calls all four methods from a browser with `/_lodestar/client.js`.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use lodestar::server::{Cors, WebProtocols};
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
    /// A browser origin whose pages may call the service (CORS and
    /// WebSocket), such as `http://localhost:5173`; repeat for more. The
    /// page the server serves at `/` needs none: it is the service's own
    /// origin.
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    allow_origins: Vec<String>,
}

/// The example page, served at `/`.
const PAGE: &[u8] = include_bytes!("../../web/index.html");

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
    let web = WebProtocols {
        cors: Cors::allow(args.allow_origins),
        ..WebProtocols::default()
    }
    .asset("/", "text/html; charset=utf-8", PAGE)?;
    let running = Service::builder(SERVICE_NAME)
        .version(env!("CARGO_PKG_VERSION"))
        .bind(args.addr)
        .web(web)
        .registry(registry)
        .add_service(RouteGuideService::new(name).into_server())
        .start()
        .await?;
    println!("route-guide serving on {}", running.local_addr());
    eprintln!(
        "the example page: http://{}/ (RouteGuide from a browser)",
        running.local_addr()
    );
    lodestar::server::shutdown_signal().await;
    running.shutdown().await?;
    Ok(())
}
