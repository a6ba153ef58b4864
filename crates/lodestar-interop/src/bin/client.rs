//! `lodestar-interop-client`: the gRPC interop test client, on lodestar.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser};
use lodestar::compression::Encoding;
use lodestar::tls::ClientTls;
use lodestar::{Client, StaticRegistry};
use lodestar_interop::{CASES, InteropClient, SERVICE_NAME};

/// Runs gRPC interop test cases against a grpc.testing.TestService server.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The server host to connect to.
    #[arg(long = "server_host", default_value = "localhost")]
    server_host: String,
    /// The server port to connect to.
    #[arg(long = "server_port", default_value_t = 8080)]
    server_port: u16,
    /// The test case to run, a comma-separated list, or `all`.
    #[arg(long = "test_case", default_value = "large_unary")]
    test_case: String,
    /// Connect over TLS.
    #[arg(long = "use_tls", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    use_tls: bool,
    /// Trust the test CA (--ca_file) for TLS.
    #[arg(long = "use_test_ca", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    use_test_ca: bool,
    /// The test CA certificate (PEM), with --use_test_ca.
    #[arg(long = "ca_file", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/ca.pem"))]
    ca_file: PathBuf,
    /// The host name to verify the server's certificate against (and to send as SNI).
    #[arg(long = "server_host_override")]
    server_host_override: Option<String>,
}

fn tls(args: &Args) -> Result<Option<ClientTls>, String> {
    if !args.use_tls {
        return Ok(None);
    }
    if !args.use_test_ca {
        return Err("--use_tls needs --use_test_ca: the platform's root CAs are not used".into());
    }
    let mut tls = ClientTls::from_ca_file(&args.ca_file).map_err(|e| e.to_string())?;
    if let Some(name) = &args.server_host_override {
        tls = tls.with_server_name(name).map_err(|e| e.to_string())?;
    }
    Ok(Some(tls))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let tls = match tls(&args) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("lodestar-interop-client: {e}");
            return ExitCode::from(2);
        }
    };
    let address = if args.server_host.contains(':') && !args.server_host.starts_with('[') {
        format!("[{}]:{}", args.server_host, args.server_port) // an IPv6 address
    } else {
        format!("{}:{}", args.server_host, args.server_port)
    };
    let registry = StaticRegistry::new().with(SERVICE_NAME, [address]);
    let builder = || {
        let builder = Client::builder(registry.clone())
            .inspect_compression(true)
            .timeout(Duration::from_secs(30));
        match &tls {
            Some(tls) => builder.tls(tls.clone()),
            None => builder,
        }
    };
    let client = InteropClient::new(
        builder().build(),
        builder().send_compressed(Encoding::Gzip).build(),
    );
    let cases: Vec<&str> = if args.test_case == "all" {
        CASES.to_vec()
    } else {
        args.test_case.split(',').map(str::trim).collect()
    };
    let mut failed = 0;
    for case in &cases {
        match client.run(case).await {
            Ok(()) => println!("PASS {case}"),
            Err(reason) => {
                failed += 1;
                println!("FAIL {case}: {reason}");
            }
        }
    }
    println!("{} passed, {failed} failed", cases.len() - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
