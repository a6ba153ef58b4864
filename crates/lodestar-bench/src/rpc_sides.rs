//! The RPC scenario taken apart, one side at a time, so that a cost on one
//! side cannot hide behind a saving on the other (the `rpc` scenario
//! measures lodestar client → lodestar server against tonic → tonic).
//!
//! - **`rpc-server`**: the same neutral load against each lodestar server
//!   of [`rpc::LODESTAR_SERVERS`] (a real `Service`, default stack on,
//!   registered in a registry server) and a bare tonic server, alternately.
//!   Two load generators:
//!   - tonic's own client: a raw tonic channel, one HTTP/2 connection,
//!     the `rpc` scenario's tonic side (unary, server streaming, bidi);
//!   - h2load, POSTing one framed `Unary` request over one connection with
//!     32 streams in flight ([`crate::h2load`]); skipped, with a note, when
//!     h2load is not installed.
//!
//!   "server cpu/op" is the number to read: the load is the same bytes on
//!   the same connection for both servers.
//! - **`rpc-client`**: lodestar's client (by name through the registry
//!   server, default stack on) and tonic's client (a raw channel to the
//!   address), both against the same bare tonic server; "client cpu/op"
//!   (the client process's CPU time over the window) is the number to read.
//!
//! Both scenarios run the `rpc` scenario's closed-loop cases with payloads
//! up to 1 KiB: unary empty and 1 KiB (32 in flight), server streaming and
//! bidi ping-pong.

use crate::h2load;
use crate::harness::{self, Case, Result, Sample, Settings};
use crate::rpc::{self, RpcCase, Server, Side};

/// The `rpc` cases both scenarios run: the closed-loop ones with payloads
/// up to 1 KiB.
fn cases() -> impl Iterator<Item = &'static RpcCase> {
    rpc::CASES
        .iter()
        .filter(|case| case.rate.is_none() && case.size <= 1024)
}

/// One h2load case: unary calls with this payload.
struct H2loadCase {
    name: &'static str,
    /// Payload bytes.
    size: usize,
    /// Streams in flight on the one connection.
    streams: usize,
}

const H2LOAD_CASES: &[H2loadCase] = &[
    H2loadCase {
        name: "h2load: unary, empty payload, 1 connection, 32 streams",
        size: 0,
        streams: 32,
    },
    H2loadCase {
        name: "h2load: unary, 1 KiB, 1 connection, 32 streams",
        size: 1024,
        streams: 32,
    },
];

/// The gRPC path of the benchmark service's unary method.
const UNARY_PATH: &str = "/lodestar.bench.v1.Bench/Unary";

/// Runs `rpc-server`: each lodestar server and the bare tonic server under
/// the same load, alternately, a fresh server process per run.
pub(crate) async fn run_server(settings: &Settings) -> Result<Vec<Case>> {
    eprintln!("rpc-server: lodestar server vs bare tonic server, same load generator");
    // The lodestar servers register in it; idle while measuring.
    let (_registry, registry_url) = crate::registry::start_server(settings.server_cpu()).await?;
    let variants = Server::variants();
    let mut out = Vec::new();
    for case in cases() {
        let name = format!("tonic client: {}", case.name);
        out.push(
            harness::alternate(settings, "rpc-server", name, &variants, |variant| {
                let registry_url = registry_url.clone();
                async move {
                    let server = Server::parse(&variant)?;
                    rpc::one_run(settings, case, server, Side::Tonic, &registry_url).await
                }
            })
            .await?,
        );
    }
    let Some(h2load) = h2load::find() else {
        eprintln!(
            "rpc-server: NOTE: h2load not found, its cases are skipped \
             (Debian: apt-get install nghttp2-client, or set LODESTAR_H2LOAD)"
        );
        return Ok(out);
    };
    for case in H2LOAD_CASES {
        out.push(
            harness::alternate(settings, "rpc-server", case.name, &variants, |variant| {
                let registry_url = registry_url.clone();
                let h2load = h2load.clone();
                async move {
                    let server = Server::parse(&variant)?;
                    h2load_run(settings, case, server, &h2load, &registry_url).await
                }
            })
            .await?,
        );
    }
    Ok(out)
}

async fn h2load_run(
    settings: &Settings,
    case: &H2loadCase,
    server_kind: Server,
    h2load: &std::path::Path,
    registry_url: &str,
) -> Result<Sample> {
    let (mut server, addr) = rpc::start_server(settings, server_kind, registry_url, None).await?;
    let body = h2load::grpc_frame(&rpc::raw::Payload {
        body: vec![0x5A; case.size],
    })?;
    let load = h2load::Load {
        h2load,
        url: format!("http://{addr}{UNARY_PATH}"),
        // The reply echoes the request.
        min_response_bytes: body.len() as u64,
        body,
        headers: h2load::GRPC_HEADERS,
        streams: case.streams,
    };
    let sample = h2load::run(settings, &load, &server).await?;
    server.terminate().await?;
    Ok(sample)
}

/// Runs `rpc-client`: lodestar's client and tonic's, alternately, each
/// against a fresh bare tonic server.
pub(crate) async fn run_client(settings: &Settings) -> Result<Vec<Case>> {
    eprintln!("rpc-client: lodestar client vs tonic client, same bare tonic server");
    // lodestar's client finds the tonic server in it by name.
    let (_registry, registry_url) = crate::registry::start_server(settings.server_cpu()).await?;
    let mut out = Vec::new();
    for case in cases() {
        out.push(
            harness::alternate(
                settings,
                "rpc-client",
                case.name,
                &["lodestar", "tonic"],
                |variant| {
                    let registry_url = registry_url.clone();
                    async move {
                        let client = Side::parse(&variant)?;
                        rpc::one_run(settings, case, Server::Tonic, client, &registry_url).await
                    }
                },
            )
            .await?,
        );
    }
    Ok(out)
}
