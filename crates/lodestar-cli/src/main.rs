//! `lodestar`: the command for operators and developers.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod args;
mod cert;
mod config;
mod demo;
mod events;
mod new;
mod progress;
mod registry;
mod rpc;
mod table;
mod watch;

/// Examples, the environment and exit codes, after `lodestar --help`.
const AFTER_HELP: &str = "\
Examples:
  lodestar demo                  the whole system in one process, in seconds
  lodestar demo --keep           the same, left running, with addresses to try
  lodestar new orders            a new service crate (proto, handlers, lodestar.toml, test)
  lodestar registry --data-dir /var/lib/lodestar   run the registry server
  lodestar services              the services in the registry
  lodestar describe route-guide --output json       instances of a service, for scripts
  lodestar watch route-guide --count 5              registry changes as they happen
  lodestar subscribe orders.created --queue billing  print events as JSON lines
  lodestar publish orders.created '{\"id\":7}' --header content-type=application/json
  lodestar call route-guide GetFeature -d '{\"latitude\":409146138,\"longitude\":-746188906}'
                                 call a method by service name, JSON in and out
  lodestar list route-guide RouteGuide               the methods a service serves
  lodestar health 127.0.0.1:10000                    exit 0 when serving
  lodestar cert --out certs      a development CA and certificates for TLS
  lodestar config check lodestar.toml   check a configuration file and the LODESTAR_* variables
  lodestar completions bash > ~/.local/share/bash-completion/completions/lodestar

Environment:
  LODESTAR_REGISTRY        registry URL (default lodestar://127.0.0.1:7070)
  LODESTAR_REGISTRY_TOKEN  the token sent to the registry (never shown)
  LODESTAR_BROKER          broker URL (default nats://127.0.0.1:4222)
  RUST_LOG                 log filter, on stderr (default warn; e.g. RUST_LOG=debug)
  COLUMNS                  the width tables fit (default: the terminal's)

Durations are written 500ms, 2s, 1m30s, 1h.

Exit codes:
  0   success
  1   failure: unreachable server or registry, refused input, failed check
  2   usage error (unknown command or flag, bad value)
  64+ lodestar call: 64 + the gRPC status code (e.g. 69 NOT_FOUND, 78 UNAVAILABLE)";

/// lodestar: services from .proto, called by name, with discovery and governance.
#[derive(Parser, Debug)]
#[command(name = "lodestar", version, about, propagate_version = true)]
#[command(after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the whole system in one process, in seconds: a registry server,
    /// an HTTP broker, a greeter and four RouteGuide instances, called by
    /// name with every call kind; one instance slow, one failing, routed
    /// around; an event from RouteGuide handled by the greeter; a graceful
    /// shutdown and a crash while calls go on.
    ///
    /// Exits 0 when all went well, that is when: every call succeeded as
    /// the client saw it; every failed attempt was on route-guide-4 (whose
    /// GetFeature fails by design) or on route-guide-1 after its crash, and
    /// was sent again to another instance; outlier detection ejected
    /// route-guide-4 and no call reached it afterwards; every event
    /// published was handled; route-guide-2 left the registry on its
    /// graceful shutdown and route-guide-1 was evicted when its lease ran
    /// out. Otherwise it says what went wrong and exits 1.
    Demo(demo::Args),
    /// Writes a development CA, a server certificate and a client
    /// certificate (PEM), to turn on TLS and mutual TLS in a minute.
    Cert(cert::Args),
    /// Checks a lodestar.toml (`config check FILE`), or prints one with every
    /// key at its default (`config defaults`).
    Config(config::Args),
    /// Runs the registry server: gRPC and HTTP/JSON APIs, leases and
    /// heartbeats, persistent instances, self-preservation.
    Registry(Box<registry::ServeArgs>),
    /// Lists the services in a registry.
    Services(registry::RegistryArg),
    /// Shows the instances of a service.
    Describe(registry::DescribeArgs),
    /// Publishes one message on a topic.
    Publish(events::PublishArgs),
    /// Prints each message on a topic, one JSON line each, until interrupted.
    Subscribe(events::SubscribeArgs),
    /// Prints a service's registry changes as they happen (instances
    /// added, changed, removed): JSON lines when piped, a live table on a
    /// terminal; until interrupted, --timeout or --count.
    Watch(watch::WatchArgs),
    /// Calls a method of a service (by name through the registry, or by
    /// address) with JSON in and out, through server reflection: all four
    /// call kinds, streams printed as they arrive.
    Call(Box<rpc::call::CallArgs>),
    /// Lists the services of a server, or the methods of one, through
    /// server reflection.
    List(rpc::list::ListArgs),
    /// Checks a server's health (grpc.health.v1), with exit codes for probes.
    Health(rpc::health::HealthArgs),
    /// Creates a new service crate: a .proto with every call kind, handlers,
    /// a main reading lodestar.toml, and a test (no network, no protoc).
    New(new::Args),
    /// Prints a shell completion script: `lodestar completions bash >
    /// ~/.local/share/bash-completion/completions/lodestar`.
    Completions(Completions),
}

/// Options of `lodestar completions`.
#[derive(clap::Args, Debug)]
struct Completions {
    /// The shell to complete for.
    shell: clap_complete::Shell,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("lodestar: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Cert(args) => cert::run(args),
            Command::Config(args) => config::run(args),
            Command::Registry(args) => registry::serve(*args).await,
            Command::Services(args) => registry::services(args).await,
            Command::Describe(args) => registry::describe(args).await,
            Command::Publish(args) => events::publish(args).await,
            Command::Subscribe(args) => events::subscribe(args).await,
            Command::Watch(args) => watch::watch(args).await,
            Command::Call(args) => Ok(rpc::call::run(*args).await),
            Command::List(args) => rpc::list::run(args).await,
            Command::Health(args) => rpc::health::run(args).await,
            Command::New(args) => new::run(args),
            Command::Completions(args) => {
                clap_complete::generate(
                    args.shell,
                    &mut <Cli as clap::CommandFactory>::command(),
                    "lodestar",
                    &mut std::io::stdout(),
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "lodestar: {}",
                lodestar::registry::limits::printable(&e.to_string())
            );
            ExitCode::from(1)
        }
    }
}
