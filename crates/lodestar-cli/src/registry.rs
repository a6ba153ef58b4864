//! `lodestar registry`, `lodestar services`, `lodestar describe`.

use std::error::Error;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use lodestar::registry::limits::printable;
use lodestar::{DEFAULT_NAMESPACE, Instance, Registry, ServiceKey};

use crate::args::Span;
use crate::table::{Align, Table};

/// Options of `lodestar registry`.
#[derive(clap::Args, Debug)]
pub(crate) struct ServeArgs {
    /// Address of the gRPC API.
    #[arg(long, default_value = lodestar_registry::DEFAULT_ADDRESS)]
    addr: SocketAddr,
    /// Address of the HTTP/JSON API.
    #[arg(long, default_value = lodestar_registry::DEFAULT_HTTP_ADDRESS)]
    http_addr: SocketAddr,
    /// Turn the HTTP/JSON API off.
    #[arg(long)]
    no_http: bool,
    /// Directory for persistent instances (default: keep them in memory only).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A token with write access to every namespace (`authorization:
    /// Bearer <token>`). Prefer LODESTAR_REGISTRY_TOKEN or --token-file:
    /// a token given here shows in process listings.
    #[arg(long, env = "LODESTAR_REGISTRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the token of --token (its first line).
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// JSON file of tokens scoped to namespaces:
    /// {"tokens": [{"name": "team-a", "secret": "…" or "sha256": "<hex>",
    /// "namespaces": ["a"] or ["*"], "access": "read" or "write"}]}.
    /// With it, reads need a token too unless --open-reads.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Namespaces anyone may read without a token (comma-separated; alone:
    /// all). Default: all with --token only, none with --tokens.
    #[arg(long, num_args = 0..=1, default_missing_value = "*", value_delimiter = ',')]
    open_reads: Option<Vec<String>>,
    /// TLS for both APIs: the server certificate chain (PEM), e.g. from
    /// `lodestar cert`.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS: the server's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate from this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Time a connection has to send a request's headers (HTTP API, idle
    /// keep-alive time included) or finish its TLS handshake and HTTP/2
    /// preface (gRPC API).
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    header_timeout: Span,
    /// Time one HTTP request, its body included, may take (408 after).
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    request_timeout: Span,
    /// Connections the HTTP API serves at once; more are closed.
    #[arg(long, default_value_t = 512)]
    http_max_connections: usize,
    /// Connections the gRPC API serves at once; more are closed.
    #[arg(long, default_value_t = 4096)]
    grpc_max_connections: usize,
    /// Largest HTTP request body in bytes (413 past it).
    #[arg(long, default_value_t = 64 * 1024)]
    max_body: usize,
    /// How long an instance whose lease ran out stays (unhealthy) before eviction.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    eviction_grace: Span,
    /// How long after a start instances are still coming back (no eviction).
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    warmup: Span,
    /// Turn self-preservation off.
    #[arg(long)]
    no_self_preservation: bool,
    /// A network health checks may reach (`10.0.0.0/8`, `fd00::/8`, or one
    /// address); repeat for more. Default: any. Set it when untrusted
    /// clients may register persistent instances, so that checks cannot
    /// be aimed at other networks.
    #[arg(long = "check-network", value_name = "CIDR")]
    check_networks: Vec<lodestar_registry_server::Network>,
    /// The most bytes of metadata (keys and values) an instance may have.
    #[arg(long, default_value_t = lodestar::registry::Limits::default().max_metadata)]
    max_metadata_bytes: usize,
    /// The shortest lease TTL accepted.
    #[arg(long, value_name = "DURATION", default_value_t = Span(lodestar::registry::Limits::default().min_ttl))]
    min_ttl: Span,
    /// The longest lease TTL accepted.
    #[arg(long, value_name = "DURATION", default_value_t = Span(lodestar::registry::Limits::default().max_ttl))]
    max_ttl: Span,
}

pub(crate) async fn serve(args: ServeArgs) -> Result<ExitCode, Box<dyn Error>> {
    let token = match (&args.token, &args.token_file) {
        (Some(token), _) => Some(token.clone()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("--token-file {}: {e}", path.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    let mut tokens = match &token {
        Some(token) => lodestar_registry_server::Tokens::single(token)?,
        None => lodestar_registry_server::Tokens::none(),
    };
    if let Some(path) = &args.tokens {
        tokens = tokens.merge(lodestar_registry_server::Tokens::from_file(path)?)?;
    }
    let open_reads = match args.open_reads {
        Some(namespaces) => namespaces,
        None if args.tokens.is_some() => Vec::new(),
        None => vec![lodestar_registry_server::ALL_NAMESPACES.to_owned()],
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = lodestar::tls::ServerTls::from_pem_files(cert, key)?;
            Some(match &args.tls_client_ca {
                Some(ca) => tls.require_client_certs_from_file(ca)?,
                None => tls,
            })
        }
        _ => None,
    };
    let mut config = lodestar_registry_server::Config {
        addr: args.addr,
        http_addr: (!args.no_http).then_some(args.http_addr),
        data_dir: args.data_dir,
        tokens,
        open_reads,
        tls,
        eviction_grace: args.eviction_grace.0,
        warmup: args.warmup.0,
        check_networks: args.check_networks,
        limits: lodestar::registry::Limits {
            max_metadata: args.max_metadata_bytes,
            min_ttl: args.min_ttl.0,
            max_ttl: args.max_ttl.0,
            ..lodestar::registry::Limits::default()
        },
        header_timeout: args.header_timeout.0,
        request_timeout: args.request_timeout.0,
        http_max_connections: args.http_max_connections,
        grpc_max_connections: args.grpc_max_connections,
        max_body: args.max_body,
        ..lodestar_registry_server::Config::default()
    };
    if args.no_self_preservation {
        config.self_preservation = None;
    }
    let running = lodestar_registry_server::start(config).await?;
    println!("lodestar registry: gRPC on {}", running.local_addr());
    if let Some(http) = running.http_addr() {
        let scheme = if args.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        println!("lodestar registry: HTTP on {scheme}://{http}/v1/status");
        println!("lodestar registry: metrics on {scheme}://{http}/metrics");
    }
    lodestar::server::shutdown_signal().await;
    running.shutdown().await?;
    Ok(ExitCode::SUCCESS)
}

/// Where to find the registry, for the commands that read it.
#[derive(clap::Args, Debug)]
pub(crate) struct RegistryArg {
    /// Registry URL (memory://, lodestar://host:port[,host:port],
    /// lodestars://host:port?ca=PATH[&cert=PATH&key=PATH] for TLS,
    /// etcd://host:port[,host:port]). Default: lodestar://127.0.0.1:7070.
    /// The token comes from LODESTAR_REGISTRY_TOKEN (or ?token=…, which
    /// shows in process listings).
    #[arg(long, env = "LODESTAR_REGISTRY", value_parser = crate::args::registry_url)]
    registry: Option<String>,
    /// Namespace.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Output {
    Table,
    Json,
}

impl RegistryArg {
    /// What a read of this registry is, for progress lines.
    fn reading(&self) -> String {
        let url = self
            .registry
            .as_deref()
            .unwrap_or(lodestar_registry::DEFAULT_URL);
        format!(
            "reading the registry at {}",
            printable(url.split('?').next().unwrap_or(url))
        )
    }

    fn connect(&self) -> Result<std::sync::Arc<dyn Registry>, Box<dyn Error>> {
        Ok(match &self.registry {
            Some(url) => lodestar_registry::from_url(url)?,
            None => lodestar_registry::from_env()?,
        })
    }
}

pub(crate) async fn services(args: RegistryArg) -> Result<ExitCode, Box<dyn Error>> {
    let registry = args.connect()?;
    let reading = crate::progress::waiting(args.reading());
    let keys = registry.services(&args.namespace).await?;
    let mut rows = Vec::new();
    for key in keys {
        let instances = registry.instances(&key).await?;
        let healthy = instances.iter().filter(|i| i.healthy).count();
        rows.push((key, instances.len(), healthy));
    }
    drop(reading);
    match args.output {
        Output::Json => {
            let services: Vec<serde_json::Value> = rows
                .iter()
                .map(|(key, total, healthy)| {
                    serde_json::json!({
                        "namespace": key.namespace, "group": key.group, "service": key.service,
                        "instances": total, "healthy": healthy,
                    })
                })
                .collect();
            println!("{}", serde_json::json!({ "services": services }));
        }
        Output::Table => {
            let mut table = Table::new(&[
                ("SERVICE", Align::Left),
                ("GROUP", Align::Left),
                ("INSTANCES", Align::Right),
                ("HEALTHY", Align::Right),
            ]);
            for (key, total, healthy) in &rows {
                // Names come from whoever registered: printed safely.
                table.row(vec![
                    printable(&key.service).into_owned(),
                    printable(&key.group).into_owned(),
                    total.to_string(),
                    healthy.to_string(),
                ]);
            }
            table.print();
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Options of `lodestar describe`.
#[derive(clap::Args, Debug)]
pub(crate) struct DescribeArgs {
    /// The service to describe.
    service: String,
    /// Group.
    #[arg(long, default_value = lodestar::DEFAULT_GROUP)]
    group: String,
    #[command(flatten)]
    registry: RegistryArg,
}

pub(crate) async fn describe(args: DescribeArgs) -> Result<ExitCode, Box<dyn Error>> {
    let registry = args.registry.connect()?;
    let key = ServiceKey::new(&args.service)
        .with_namespace(&args.registry.namespace)
        .with_group(&args.group);
    let reading = crate::progress::waiting(args.registry.reading());
    let instances = registry.instances(&key).await?;
    drop(reading);
    match args.registry.output {
        Output::Json => {
            let value = serde_json::json!({
                "namespace": key.namespace, "group": key.group, "service": key.service,
                "instances": instances,
            });
            println!("{value}");
        }
        Output::Table => {
            println!(
                "{}: {} instance(s)",
                printable(&key.to_string()),
                instances.len()
            );
            instance_table(&instances).print();
        }
    }
    Ok(
        if instances.is_empty() && args.registry.output == Output::Table {
            eprintln!(
                "no instances of {} are registered",
                lodestar::registry::limits::quoted(&key.to_string())
            );
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        },
    )
}

/// Instances as a table: id, address, health, version, weight (for
/// `describe` and `watch`). Names come from whoever registered: printed safely.
pub(crate) fn instance_table<'a>(instances: impl IntoIterator<Item = &'a Instance>) -> Table {
    let mut table = Table::new(&[
        ("ID", Align::Left),
        ("ADDRESS", Align::Left),
        ("HEALTHY", Align::Left),
        ("ENABLED", Align::Left),
        ("VERSION", Align::Left),
        ("WEIGHT", Align::Right),
    ]);
    for i in instances {
        table.row(vec![
            printable(&i.id).into_owned(),
            printable(&i.address).into_owned(),
            i.healthy.to_string(),
            i.enabled.to_string(),
            printable(&i.version).into_owned(),
            i.weight.to_string(),
        ]);
    }
    table
}
