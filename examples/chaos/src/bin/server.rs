//! `chaos-server`: one instance of the Chaos service, misbehaving as its
//! flags say (and as `chaos.Chaos/Control` later says), registered by name.

use std::net::SocketAddr;
use std::process::ExitCode;

use chaos::flags::{FaultFlags, every_method, server_entry};
use chaos::{Behaviour, ChaosService, ControlRequest, SERVICE_NAME, parse_labels};
use clap::Parser;
use lodestar::Service;
use lodestar::server::policy::{
    Adaptive, Concurrency, MethodPolicy, Policy, PolicyError, RateLimit,
};

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
    /// Faults the server policy injects into every method but `Control`,
    /// before the handler (and so before --delay-ms and --fail-rate).
    #[command(flatten)]
    faults: FaultFlags,
    /// Rate limit of the Chaos methods (`Control` excepted), in calls per
    /// second; calls over it are refused with RESOURCE_EXHAUSTED and a
    /// pushback. Default: none.
    #[arg(long)]
    rate_limit: Option<f64>,
    /// Calls allowed at once under --rate-limit. Default: the rate, rounded
    /// up (at least 1).
    #[arg(long, requires = "rate_limit")]
    burst: Option<u32>,
    /// Metadata key naming the caller: --rate-limit applies to each caller.
    #[arg(long, requires = "rate_limit")]
    rate_key: Option<String>,
    /// The most callers with a bucket of their own under --rate-key.
    #[arg(long, requires = "rate_key", default_value_t = 10_000)]
    max_keys: u32,
    /// At most this many Chaos calls in flight (`Control` excepted); more
    /// are shed with RESOURCE_EXHAUSTED. Default: none.
    #[arg(long, conflicts_with = "adaptive")]
    concurrency_limit: Option<u32>,
    /// An adaptive concurrency limit (from throughput and latency; the
    /// policy's defaults) on the Chaos calls (`Control` excepted).
    #[arg(long)]
    adaptive: bool,
}

/// The method that steers a running instance: no limits, no faults.
const CONTROL: &str = "chaos.Chaos/Control";

/// The server policy the limit flags ask for: none on `Control`, the
/// limits on every other method.
fn limits(args: &Args) -> Result<Policy, String> {
    let mut control = MethodPolicy::default();
    control.names = vec![CONTROL.to_owned()];
    let mut chaos = MethodPolicy::default();
    chaos.names = vec!["chaos.Chaos/*".to_owned()];
    chaos.rate_limit = args.rate_limit.map(|rate| {
        let burst = args
            .burst
            .unwrap_or(rate.ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
        let mut limit = RateLimit::new(rate, burst);
        if let Some(key) = &args.rate_key {
            limit = limit.per_caller(key);
        }
        limit.max_keys = args.max_keys;
        limit
    });
    chaos.concurrency = match (args.concurrency_limit, args.adaptive) {
        (Some(n), _) => Some(Concurrency::Fixed(n)),
        (None, true) => Some(Concurrency::Adaptive(Adaptive::default())),
        (None, false) => None,
    };
    let mut policy = Policy::default();
    policy.methods = vec![control, chaos];
    policy.validate().map_err(|error| match error {
        PolicyError::Invalid {
            field,
            value,
            expected,
        } => {
            let flag = match field.rsplit('.').next() {
                Some("per_second") => "--rate-limit",
                Some("burst") => "--burst",
                Some("key") => "--rate-key",
                Some("max_keys") => "--max-keys",
                _ => "--concurrency-limit",
            };
            format!("{flag} {value}: expected {expected}")
        }
        other => other.to_string(),
    })?;
    Ok(policy)
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
    let mut policy = limits(&args)?;
    if let Some(fault) = args.faults.settings() {
        // Every method but `Control`, which stays a way to steer the
        // instance whatever its faults.
        for entry in &mut policy.methods {
            if entry.names.iter().all(|n| n != CONTROL) {
                entry.fault = Some(fault.clone());
            }
        }
        every_method(&mut policy.methods, |m| &m.names, server_entry).fault = Some(fault);
    }
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
        .policy(policy)
        .map_err(|e| format!("--fault-*: {e}"))?
        .add_service(ChaosService::new(&id, behaviour).into_server());
    if let Some(zone) = args.zone {
        builder = builder.zone(zone);
    }
    let running = builder
        .start()
        .await
        .map_err(|e| format!("cannot serve {} on {}: {e}", args.service, args.addr))?;
    println!("chaos serving on {} as {id}", running.local_addr());
    if let Some(admin) = running.admin_addr() {
        println!("chaos metrics at http://{admin}/metrics");
    }
    lodestar::server::shutdown_signal().await;
    running
        .shutdown()
        .await
        .map_err(|e| format!("shutting down {id}: {e}"))
}
