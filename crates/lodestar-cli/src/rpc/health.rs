//! `lodestar health TARGET [SERVICE]`: the standard health check
//! (`grpc.health.v1.Health/Check`), with an exit status for scripts and
//! probes.
//!
//! The exit codes follow `grpc_health_probe`'s (0 serving, 3 the RPC
//! failed, 4 not serving), except that a connection failure exits 1 and a
//! usage error 2, as everywhere else in `lodestar`: the probe has the two
//! the other way round.

use std::error::Error;
use std::process::ExitCode;

use lodestar::MessageLimits;
use lodestar::registry::limits::printable;
use serde_json::json;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::target::TargetArgs;
use super::{Failure, FailureKind};
use crate::args::Span;

/// Exit code: the check answered SERVING.
const SERVING: u8 = 0;
/// Exit code: the target could not be found or reached.
const CANNOT_CONNECT: u8 = 1;
/// Exit code: the check failed with a status (unknown service, timeout, …).
const RPC_FAILED: u8 = 3;
/// Exit code: the check answered, but not SERVING.
const NOT_SERVING: u8 = 4;

/// Options of `lodestar health`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    lodestar health route-guide                          the server of an instance of route-guide\n  \
    lodestar health 127.0.0.1:10000 routeguide.RouteGuide   one service of it\n\n\
    Exit codes (grpc_health_probe's, but for 1 and 2, which it swaps):\n  \
    0  SERVING\n  \
    1  the target could not be found or reached (connection failure)\n  \
    2  usage error\n  \
    3  the check failed: an RPC error (the service is unknown to the server: NOT_FOUND), or the timeout\n  \
    4  the check answered NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN")]
pub(crate) struct HealthArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// The service to check, by its full name (e.g. routeguide.RouteGuide).
    /// Default: the server as a whole.
    service: Option<String>,
    /// Longest wait for the answer, once connected, e.g. 500ms, 1s.
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    timeout: Span,
    /// Output format: the status's name, or a JSON document ({"status":"SERVING"}).
    #[arg(long, value_enum, default_value_t = HealthOutput::Text)]
    output: HealthOutput,
}

/// How `health` prints the status.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HealthOutput {
    /// `SERVING`.
    Text,
    /// `{"status":"SERVING"}`.
    Json,
}

/// Runs `lodestar health`.
pub(crate) async fn run(args: HealthArgs) -> Result<ExitCode, Box<dyn Error>> {
    let waiting = super::waiting(format!("checking {}", printable(&args.target.target)));
    let checked = check(&args).await;
    drop(waiting);
    let (code, printed) = match checked {
        Ok(status) => {
            let code = if status == ServingStatus::Serving {
                SERVING
            } else {
                NOT_SERVING
            };
            (code, Ok(status.as_str_name()))
        }
        Err(failure)
            if failure.kind == FailureKind::Transport || failure.kind == FailureKind::Target =>
        {
            (CANNOT_CONNECT, Err(failure))
        }
        Err(failure) => (RPC_FAILED, Err(failure)),
    };
    match printed {
        Ok(status) if args.output == HealthOutput::Json => {
            println!("{}", json!({ "status": status }))
        }
        Ok(status) => println!("{status}"),
        Err(failure) => eprintln!("lodestar health: {failure}"),
    }
    Ok(ExitCode::from(code))
}

/// The status the target reports for the service.
async fn check(args: &HealthArgs) -> Result<ServingStatus, Failure> {
    let connection = args.target.connect().await?;
    let service = args.service.clone().unwrap_or_default();
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.clone(),
    });
    request.set_timeout(args.timeout.0);
    let mut client = HealthClient::new(connection.channel(MessageLimits::default()));
    let what = format!(
        "checking {}{} on {}",
        if service.is_empty() {
            "the server"
        } else {
            "service "
        },
        printable(&service),
        connection.description
    );
    let bound = args.target.connect_timeout() + args.timeout.0;
    let answer = tokio::time::timeout(bound, client.check(request))
        .await
        .map_err(|_| {
            Failure::new(
                FailureKind::Transport,
                format!(
                    "{what}: no answer within {}",
                    lodestar::config::format_duration(bound)
                ),
            )
        })?
        .map_err(|status| super::status_failure(FailureKind::Method, &what, &status))?;
    let status = answer.into_inner().status;
    ServingStatus::try_from(status).map_err(|_| {
        Failure::new(
            FailureKind::Method,
            format!("{what}: the server answered an unknown status {status}"),
        )
    })
}
