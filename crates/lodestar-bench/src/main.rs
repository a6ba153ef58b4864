//! `lodestar-bench`: lodestar measured side by side with what users would
//! pick instead (raw tonic, etcd, async-nats), as `../shared/BENCHMARKS.md`
//! and `docs/benchmarks.md` describe.
//!
//! `lodestar-bench run` is the one command: it starts every server and load
//! generator as its own process (pinned to its own core with `taskset`),
//! alternates lodestar and its peer, and prints Markdown tables (medians,
//! min–max and ratios) and writes JSON. `--smoke` does the same in seconds,
//! to prove the harness works; the test suite runs it.
//!
//! The other subcommands are the child processes `run` starts.

mod alloc;
mod balance;
mod broker;
mod failover;
mod footprint;
mod h2load;
mod harness;
mod observability;
mod overload;
mod pick;
mod registry;
mod resilience;
mod rpc;
mod rpc_sides;
mod traced;
mod web;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use harness::{Report, Settings};

/// The system allocator, counting for the `pick` scenario's memory per
/// endpoint while it measures (see [`alloc`]).
#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

/// lodestar's benchmarks.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the benchmarks and reports them.
    Run(RunArgs),
    /// (child) An RPC server or client.
    #[command(hide = true, subcommand)]
    Rpc(rpc::Child),
    /// (child) A registry server or load generator.
    #[command(hide = true, subcommand)]
    Registry(registry::Child),
    /// (child) A broker load generator.
    #[command(hide = true, subcommand)]
    Broker(broker::Child),
    /// (child) A failover instance or client.
    #[command(hide = true, subcommand)]
    Failover(failover::Child),
    /// (child) A strategy measurer.
    #[command(hide = true, subcommand)]
    Pick(pick::Child),
    /// (child) A fleet instance or client.
    #[command(hide = true, subcommand)]
    Balance(balance::Child),
    /// (child) A retry-storm or tail instance, or client.
    #[command(hide = true, subcommand)]
    Resilience(resilience::Child),
    /// (child) An overloaded server or its load.
    #[command(hide = true, subcommand)]
    Overload(overload::Child),
    /// (child) A web protocol peer server.
    #[command(hide = true, subcommand)]
    Web(web::Child),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// A second or two per scenario, one repetition: proves the harness
    /// works, measures nothing worth reporting.
    #[arg(long)]
    smoke: bool,
    /// Repetitions of each case for each side.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seconds each measured run lasts.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Only these scenarios (rpc, rpc-server, rpc-client, registry, broker,
    /// failover, footprint, pick, balance, resilience, overload, observability,
    /// tracing, web).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// Where to write the Markdown tables (also printed).
    #[arg(long, default_value = "target/bench/results.md")]
    markdown: PathBuf,
    /// Do not pin processes to cores.
    #[arg(long)]
    no_pin: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("lodestar-bench: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let child = !matches!(args.command, Command::Run(_));
    match runtime.block_on(dispatch(args.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if child {
                // The orchestrator reads this line and reports it.
                harness::say(serde_json::json!({ "error": e.to_string() }));
            }
            eprintln!("lodestar-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> harness::Result<()> {
    match command {
        Command::Run(args) => run(args).await,
        Command::Rpc(child) => rpc::child(child).await,
        Command::Registry(child) => registry::child(child).await,
        Command::Broker(child) => broker::child(child).await,
        Command::Failover(child) => failover::child(child).await,
        Command::Pick(child) => pick::child(child).await,
        Command::Balance(child) => balance::child(child).await,
        Command::Resilience(child) => resilience::child(child).await,
        Command::Overload(child) => overload::child(child).await,
        Command::Web(child) => web::child(child).await,
    }
}

async fn run(args: RunArgs) -> harness::Result<()> {
    let mut settings = if args.smoke {
        Settings::smoke()
    } else {
        Settings::full(args.reps, Duration::from_secs_f64(args.duration))
    };
    if args.no_pin {
        settings.pin = false;
    }
    let wanted = |scenario: &str| args.only.is_empty() || args.only.iter().any(|o| o == scenario);
    let known = [
        "rpc",
        "rpc-server",
        "rpc-client",
        "registry",
        "broker",
        "failover",
        "footprint",
        "pick",
        "balance",
        "resilience",
        "overload",
        "observability",
        "tracing",
        "web",
    ];
    if let Some(unknown) = args.only.iter().find(|o| !known.contains(&o.as_str())) {
        return Err(format!("unknown scenario `{unknown}`; known: {}", known.join(", ")).into());
    }
    eprintln!(
        "lodestar-bench: {} run, {} repetition(s), {:?} each{}",
        if settings.smoke { "smoke" } else { "full" },
        settings.reps,
        settings.duration,
        if settings.pin {
            ", clients on cpu 0, servers on cpu 1"
        } else {
            ", not pinned"
        }
    );
    let mut report = Report::default();
    if wanted("rpc") {
        report.cases.extend(rpc::run(&settings).await?);
    }
    if wanted("rpc-server") {
        report.cases.extend(rpc_sides::run_server(&settings).await?);
    }
    if wanted("rpc-client") {
        report.cases.extend(rpc_sides::run_client(&settings).await?);
    }
    if wanted("registry") {
        report.cases.extend(registry::run(&settings).await?);
    }
    if wanted("broker") {
        report.cases.extend(broker::run(&settings).await?);
    }
    if wanted("failover") {
        report.cases.extend(failover::run(&settings).await?);
    }
    if wanted("footprint") {
        report.cases.extend(footprint::run(&settings).await?);
    }
    if wanted("pick") {
        report.cases.extend(pick::run(&settings).await?);
    }
    if wanted("balance") {
        report.cases.extend(balance::run(&settings).await?);
    }
    if wanted("resilience") {
        report.cases.extend(resilience::run(&settings).await?);
    }
    if wanted("observability") {
        report.cases.extend(observability::run(&settings).await?);
    }
    if wanted("overload") {
        report.cases.extend(overload::run(&settings).await?);
    }
    if wanted("tracing") {
        report.cases.extend(traced::run(&settings).await?);
    }
    if wanted("web") {
        report.cases.extend(web::run(&settings).await?);
    }
    let markdown = report.to_markdown();
    println!("{markdown}");
    for (path, contents) in [
        (
            &args.json,
            serde_json::to_string_pretty(&report.to_json(&settings))?,
        ),
        (&args.markdown, markdown),
    ] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, contents)?;
        eprintln!("lodestar-bench: wrote {}", path.display());
    }
    Ok(())
}
