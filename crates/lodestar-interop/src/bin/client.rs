//! `lodestar-interop-client`: the gRPC interop test client, on lodestar.

use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser};
use lodestar::compression::Encoding;
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
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.use_tls {
        eprintln!("lodestar-interop-client: --use_tls is not supported yet");
        return ExitCode::from(2);
    }
    let address = format!("{}:{}", args.server_host, args.server_port);
    let registry = StaticRegistry::new().with(SERVICE_NAME, [address]);
    let builder = || {
        Client::builder(registry.clone())
            .inspect_compression(true)
            .timeout(Duration::from_secs(30))
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
