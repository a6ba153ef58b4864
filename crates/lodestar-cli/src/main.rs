//! `lodestar`: the command for operators and developers.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cert;
mod demo;
mod events;
mod registry;

/// lodestar: services from .proto, called by name, with discovery and governance.
#[derive(Parser, Debug)]
#[command(name = "lodestar", version, about, propagate_version = true)]
#[command(
    after_help = "Examples:\n  lodestar demo                  run three RouteGuide instances and call them by name\n  RUST_LOG=debug lodestar demo   the same, with the framework's logs\n  lodestar cert --out certs      a development CA and certificates for TLS\n  lodestar registry --data-dir /var/lib/lodestar   run the registry server\n  lodestar registry --tokens tokens.json --tls-cert certs/server.pem --tls-key certs/server.key\n                                 tenant tokens and TLS (see lodestar registry --help)\n  LODESTAR_REGISTRY_TOKEN=… lodestar services --registry 'lodestars://host:7070?ca=certs/ca.pem'\n  lodestar describe route-guide --output json       instances of a service, for scripts\n  lodestar subscribe orders.created --queue billing  print events as JSON lines\n  lodestar publish orders.created '{\"id\":7}' --header content-type=application/json"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a self-contained demo: an in-memory registry, three RouteGuide
    /// instances and a client calling them by name with all four call kinds;
    /// then one instance shuts down gracefully and one is killed while calls
    /// go on. Exits 0 when every call succeeded.
    Demo(demo::Args),
    /// Writes a development CA, a server certificate and a client
    /// certificate (PEM), to turn on TLS and mutual TLS in a minute.
    Cert(cert::Args),
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
            Command::Registry(args) => registry::serve(*args).await,
            Command::Services(args) => registry::services(args).await,
            Command::Describe(args) => registry::describe(args).await,
            Command::Publish(args) => events::publish(args).await,
            Command::Subscribe(args) => events::subscribe(args).await,
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
