//! `lodestar-interop-server`: the gRPC interop test server, on lodestar.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser};
use lodestar::Service;
use lodestar::compression::Encoding;
use lodestar::tls::ServerTls;
use lodestar_interop::{InteropServer, SERVICE_NAME, TestServiceServer};

/// Serves grpc.testing.TestService as the gRPC interop test descriptions specify.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Port to listen on (0: any free port; the bound address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to listen on. Default: loopback only; `0.0.0.0` serves every
    /// interface (the interop server is a test tool, not hardened for exposure).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Serve over TLS.
    #[arg(long = "use_tls", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    use_tls: bool,
    /// The server certificate chain (PEM), with --use_tls.
    #[arg(long = "tls_cert_file", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/server1.pem"))]
    tls_cert_file: PathBuf,
    /// The server private key (PEM), with --use_tls.
    #[arg(long = "tls_key_file", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/server1.key"))]
    tls_key_file: PathBuf,
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
    let args = Args::parse();
    let mut builder = Service::builder(SERVICE_NAME);
    if args.use_tls {
        match ServerTls::from_pem_files(&args.tls_cert_file, &args.tls_key_file) {
            Ok(tls) => builder = builder.tls(tls),
            Err(e) => {
                eprintln!("lodestar-interop-server: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let started = builder
        .bind(SocketAddr::new(args.host, args.port))
        .send_compressed(Encoding::Gzip)
        .inspect_compression(true)
        .add_service(TestServiceServer::new(InteropServer))
        .start()
        .await;
    let running = match started {
        Ok(running) => running,
        Err(e) => {
            eprintln!("lodestar-interop-server: {e}");
            return ExitCode::from(1);
        }
    };
    println!(
        "lodestar-interop-server listening on {}",
        running.local_addr()
    );
    lodestar::server::shutdown_signal().await;
    match running.shutdown().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lodestar-interop-server: {e}");
            ExitCode::from(1)
        }
    }
}
