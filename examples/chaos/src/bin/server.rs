//! `chaos-server`: one instance of the Chaos service, misbehaving as its
//! flags say (and as `chaos.Chaos/Control` later says), registered by name.

use std::net::SocketAddr;
use std::process::ExitCode;

use chaos::flags::{FaultFlags, every_method, server_entry};
use chaos::{Behaviour, ChaosService, ControlRequest, SERVICE_NAME, parse_labels};
use clap::Parser;
use lodestar::Service;

/// Serves `chaos.Chaos` until SIGINT or SIGTERM, then shuts down gracefully.
///
/// Prints `chaos serving on ADDRESS as ID` on stdout once registered.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to serve on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Registry to register in: a `lodestar registry` server
    /// (lodestar://host:port), or any URL `lodestar services` takes.
    #[arg(long, env = "LODESTAR_REGISTRY")]
    registry: String,
    /// Service name to register under.
    #[arg(long, default_value = SERVICE_NAME)]
    service: String,
    /// Instance id, named in every reply. Default: `{service}-{random hex}`.
    #[arg(long)]
    id: Option<String>,
    /// Instance labels (metadata), as `key=value,key=value`.
    #[arg(long, default_value = "")]
    labels: String,
    /// Zone the instance runs in, for zone affinity. Default: none.
    #[arg(long)]
    zone: Option<String>,
    /// Weight, for weighted balancing.
    #[arg(long, default_value_t = 100)]
    weight: u32,
    /// Delay added to every call, in milliseconds (at most 60000).
    #[arg(long, default_value_t = 0)]
    delay_ms: u32,
    /// A uniform random extra delay of up to this many milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_jitter_ms: u32,
    /// Share of calls failed on purpose, from 0.0 to 1.0 (after the delay).
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// gRPC code of the failed calls, by name (UNAVAILABLE, INTERNAL, ...).
    #[arg(long, default_value = "UNAVAILABLE")]
    fail_code: String,
    /// Faults the server policy injects into every method, before the
    /// handler (and so before --delay-ms and --fail-rate).
    #[command(flatten)]
    faults: FaultFlags,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("chaos-server: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    // The flags go through the same checks as a `Control` call.
    let behaviour = Behaviour::default()
        .changed(&ControlRequest {
            delay_ms: Some(args.delay_ms),
            delay_jitter_ms: Some(args.delay_jitter_ms),
            fail_rate: Some(args.fail_rate),
            fail_code: Some(args.fail_code.clone()),
        })
        .map_err(|e| format!("invalid behaviour: {e}"))?;
    let labels = parse_labels(&args.labels).map_err(|e| format!("--labels: {e}"))?;
    let registry =
        lodestar_registry::from_url(&args.registry).map_err(|e| format!("--registry: {e}"))?;
    let id = args
        .id
        .unwrap_or_else(|| format!("{}-{:08x}", args.service, fastrand::u32(..)));

    let mut builder = Service::builder(&args.service)
        .id(&id)
        .version(env!("CARGO_PKG_VERSION"))
        .labels(labels)
        .weight(args.weight)
        .bind(args.addr)
        .registry(registry)
        .add_service(ChaosService::new(&id, behaviour).into_server());
    if let Some(zone) = args.zone {
        builder = builder.zone(zone);
    }
    if let Some(fault) = args.faults.settings() {
        let mut policy = lodestar::server::policy::Policy::default();
        every_method(&mut policy.methods, |m| &m.names, server_entry).fault = Some(fault);
        builder = builder
            .policy(policy)
            .map_err(|e| format!("--fault-*: {e}"))?;
    }
    let running = builder
        .start()
        .await
        .map_err(|e| format!("cannot serve {} on {}: {e}", args.service, args.addr))?;
    println!("chaos serving on {} as {id}", running.local_addr());
    lodestar::server::shutdown_signal().await;
    running
        .shutdown()
        .await
        .map_err(|e| format!("shutting down {id}: {e}"))
}
