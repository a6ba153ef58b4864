//! The `tracing` scenario: what a call costs a lodestar server with
//! OpenTelemetry tracing on, against the same server with it off (no OTLP
//! endpoint: one relaxed load per call).
//!
//! The same load as `rpc-server` (tonic's own client, one connection,
//! unary, empty payload, 32 in flight) against:
//!
//! - **sampled**: every call's server span recorded and exported over
//!   OTLP/HTTP (the `always_on` sampler; the load sends no `traceparent`,
//!   so parent-based `always_on` samples alike) to a collector in the
//!   server's own process ([`sink`]: reads each export, answers 200), so
//!   encoding and sending spans count in the server's CPU;
//! - **not sampled**: tracing on, every call's span made and its context
//!   carried, but not sampled (`parentbased_always_off`), so nothing is
//!   recorded or exported.
//!
//! "server cpu/op" is the number to read: the price of tracing per call.

use lodestar::telemetry::{Protocol, Sampler, Telemetry};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

use crate::harness::{self, Case, Result, Settings};
use crate::rpc::{self, LodestarServer, Server, Side};

/// The load: `rpc-server`'s unary case.
const CASE: rpc::RpcCase = rpc::RpcCase {
    name: "unary, empty payload, 32 in flight, tonic client → lodestar server",
    call: "unary",
    size: 0,
    concurrency: 32,
    rate: None,
};

/// The server with every call's span sampled and exported.
pub(crate) const SAMPLED: LodestarServer = LodestarServer {
    name: "lodestar, tracing on, sampled",
    configure: |builder| traced(builder, Sampler::AlwaysOn),
};

/// The server with tracing on and no call sampled.
pub(crate) const NOT_SAMPLED: LodestarServer = LodestarServer {
    name: "lodestar, tracing on, not sampled",
    configure: |builder| traced(builder, Sampler::ParentBasedAlwaysOff),
};

/// Turns tracing on for the process, exporting to an in-process sink.
fn traced(builder: lodestar::ServiceBuilder, sampler: Sampler) -> Result<lodestar::ServiceBuilder> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    tokio::spawn(sink(tokio::net::TcpListener::from_std(listener)?));
    let guard = Telemetry::new()
        .logs(false)
        .otlp(format!("http://{addr}/v1/traces"), Protocol::HttpProtobuf)
        .sampler(sampler)
        .init()?;
    // Exported for the life of the process (the server is killed at the end).
    std::mem::forget(guard);
    Ok(builder.layer(tower::layer::util::Identity::new()))
}

/// Runs the scenario: each traced server against the untraced one.
pub(crate) async fn run(settings: &Settings) -> Result<Vec<Case>> {
    eprintln!("tracing: a lodestar server with tracing on (sampled, not sampled) vs off");
    // Discovery for the servers; idle while measuring.
    let (_registry, registry_url) = crate::registry::start_server(settings.server_cpu()).await?;
    let mut out = Vec::new();
    for traced in [&SAMPLED, &NOT_SAMPLED] {
        out.push(
            harness::alternate(
                settings,
                "tracing",
                format!("{}; lodestar: {}", CASE.name, traced.name),
                &["lodestar", "lodestar, tracing off"],
                |variant| {
                    let registry_url = registry_url.clone();
                    async move {
                        let server = match variant.as_str() {
                            "lodestar" => Server::Lodestar(traced),
                            _ => Server::of(Side::Lodestar),
                        };
                        rpc::one_run(settings, &CASE, server, Side::Tonic, &registry_url).await
                    }
                },
            )
            .await?,
        );
    }
    Ok(out)
}

/// A minimal OTLP/HTTP collector: reads each request (HTTP/1.1, a
/// `content-length` body) and answers `200` with an empty
/// `ExportTraceServiceResponse`, on every connection, until the process
/// ends.
async fn sink(listener: tokio::net::TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut stream = BufReader::new(stream);
            let mut body = Vec::new();
            loop {
                let mut length = 0usize;
                let mut line = String::new();
                // The request line and headers, up to the empty line.
                loop {
                    line.clear();
                    match stream.read_line(&mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
                body.resize(length, 0);
                if stream.read_exact(&mut body).await.is_err() {
                    return;
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                if stream.get_mut().write_all(answer).await.is_err() {
                    return;
                }
            }
        });
    }
}
