//! `greeter-server`: serves `helloworld.Greeter` and registers it as `greeter`.

use std::net::SocketAddr;

use clap::Parser;
use greeter::{MyGreeter, SERVICE_NAME};
use lodestar::{MemoryRegistry, Service};

/// Serves the Greeter until SIGINT or SIGTERM, then shuts down gracefully.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to serve on, exactly (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: SocketAddr,
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
    let registry = match &args.registry {
        Some(url) => lodestar_registry::from_url(url)?,
        None => std::sync::Arc::new(MemoryRegistry::new()),
    };
    let running = Service::builder(SERVICE_NAME)
        .bind(args.addr)
        .registry(registry)
        .add_service(MyGreeter.into_server())
        .start()
        .await?;
    println!("greeter serving on {}", running.local_addr());
    lodestar::server::shutdown_signal().await;
    running.shutdown().await?;
    Ok(())
}
