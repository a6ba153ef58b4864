//! The registry scenario, and the registry server child that other
//! scenarios use for discovery.

use std::net::SocketAddr;
use std::time::Duration;

use crate::harness::{self, Case, Result, Settings};

/// The child processes of this scenario.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum Child {
    /// A lodestar registry server (in-memory, no warm-up) on a free port;
    /// says `{"ready": {"addr": …}}`, then serves until killed.
    Server,
}

/// Runs a child process of this scenario.
pub(crate) async fn child(child: Child) -> Result<()> {
    match child {
        Child::Server => serve().await,
    }
}

async fn serve() -> Result<()> {
    let config = lodestar_registry_server::Config {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        http_addr: None,
        warmup: Duration::ZERO,
        ..Default::default()
    };
    let running = lodestar_registry_server::start(config).await?;
    harness::say(serde_json::json!({ "ready": { "addr": running.local_addr().to_string() } }));
    std::future::pending::<()>().await;
    Ok(())
}

/// A registry server process for discovery, on `cpu`; returns it and its
/// `lodestar://` URL.
pub(crate) async fn start_server(cpu: Option<usize>) -> Result<(harness::Proc, String)> {
    let mut server = harness::Proc::spawn_self(
        "registry server",
        cpu,
        &["registry".into(), "server".into()],
    )?;
    let ready = server.expect("ready", Duration::from_secs(10)).await?;
    let addr = ready["addr"].as_str().ok_or("registry server: no address")?;
    let url = format!("lodestar://{addr}");
    Ok((server, url))
}

/// Runs the scenario.
pub(crate) async fn run(_settings: &Settings) -> Result<Vec<Case>> {
    Ok(Vec::new())
}
