//! The observability scenario: what lodestar's metrics cost per call.
//!
//! - **Cost**: lodestar's client and server as they run by default, every
//!   call counted on both sides (`rpc_server_/rpc_client_call_duration_seconds`
//!   and friends), against the same stack counting nothing
//!   (`metrics(None)` on both builders, no admin endpoint): unary calls with
//!   an empty payload, 32 in flight, lodestar → lodestar. Throughput, CPU
//!   and the client's allocations per call.

use crate::harness::{Case, Result, Settings};
use crate::rpc;

/// The cost case.
const COST: rpc::RpcCase = rpc::RpcCase {
    name: "cost: unary, empty payload, 32 in flight, lodestar → lodestar; lodestar: metrics on (the default), against both sides with metrics off",
    call: "unary",
    size: 0,
    concurrency: 32,
    rate: None,
};

pub(crate) async fn run(settings: &Settings) -> Result<Vec<Case>> {
    eprintln!("observability: what counting every call costs");
    let cost = rpc::cost(
        settings,
        "observability",
        &COST,
        [
            ("lodestar", rpc::Server::of(rpc::Side::Lodestar), &[]),
            (
                "lodestar, metrics off",
                rpc::Server::Lodestar(&rpc::METRICS_OFF_SERVER),
                &["--no-metrics"],
            ),
        ],
    )
    .await?;
    Ok(vec![cost])
}
