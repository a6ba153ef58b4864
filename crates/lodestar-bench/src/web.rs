//! The `web` scenario: what a call costs over the web protocols, each
//! beside native gRPC on the same lodestar server, and gRPC-Web beside
//! `tonic-web` (a tonic server behind `tonic_web::GrpcWebLayer`, the same
//! handler).
//!
//! - **Unary over Connect (JSON) and over gRPC-Web (binary)**: h2load
//!   ([`crate::h2load`]) POSTs the same payload over one HTTP/2 connection
//!   with 32 streams in flight, with each protocol's headers and body; the
//!   native gRPC variant is the same load as gRPC, to the same server.
//!   Skipped, with a note, when h2load is not installed.
//! - **Bidi ping-pong over WebSocket**: one socket per stream (the
//!   `lodestar.v1+proto` sub-protocol over HTTP/1.1 `Upgrade`, with
//!   `tokio-tungstenite`, the crate the server uses), each answer read
//!   before the next message is sent; beside the same ping-pong over native
//!   gRPC with tonic's client (16 streams on one connection).
//!
//! Neither load generator is lodestar's client, so the server's costs are
//! what differ. In the tables the first variant (`lodestar`) is the web
//! protocol; its "advantage" over `native gRPC` below 1.0 is what the
//! protocol costs on the same server.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::h2load;
use crate::harness::{self, Case, Proc, Result, Sample, Settings};
use crate::rpc::{self, Op, RpcCase, Server, Side, raw};

/// The benchmark service's unary method.
const UNARY_PATH: &str = "/lodestar.bench.v1.Bench/Unary";
/// The benchmark service's bidi method.
const PING_PONG_PATH: &str = "/lodestar.bench.v1.Bench/PingPong";
/// The WebSocket sub-protocol the scenario speaks (binary protobuf).
const WS_PROTOCOL: &str = "lodestar.v1+proto";
/// How long a WebSocket may take to open, or to answer one message.
const WS_PATIENCE: Duration = Duration::from_secs(10);

/// The child processes of this scenario.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum Child {
    /// A tonic server with `tonic_web::GrpcWebLayer` (HTTP/1.1 accepted
    /// too) serving the benchmark service; says `{"ready": {"addr": …}}`.
    TonicWebServer,
}

/// Runs a child process of this scenario.
pub(crate) async fn child(child: Child) -> Result<()> {
    match child {
        Child::TonicWebServer => serve_tonic_web().await,
    }
}

async fn serve_tonic_web() -> Result<()> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let incoming = tonic::transport::server::TcpIncoming::bind(any)?.with_nodelay(Some(true));
    let addr = incoming.local_addr()?;
    harness::say(serde_json::json!({ "ready": { "addr": addr.to_string() } }));
    tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(tonic_web::GrpcWebLayer::new())
        .add_service(raw::bench_server::BenchServer::new(rpc::RawBench))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// A web protocol h2load speaks for a unary call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Web {
    /// Connect unary, JSON (`application/json`).
    ConnectJson,
    /// gRPC-Web, binary (`application/grpc-web+proto`).
    GrpcWeb,
}

/// One unary case: a protocol and a payload.
struct UnaryCase {
    name: &'static str,
    web: Web,
    /// Payload bytes.
    size: usize,
}

/// Streams in flight on h2load's one connection.
const STREAMS: usize = 32;

const UNARY_CASES: &[UnaryCase] = &[
    UnaryCase {
        name: "Connect JSON unary, empty payload, h2load 1 connection × 32 streams",
        web: Web::ConnectJson,
        size: 0,
    },
    UnaryCase {
        name: "Connect JSON unary, 1 KiB, h2load 1 connection × 32 streams",
        web: Web::ConnectJson,
        size: 1024,
    },
    UnaryCase {
        name: "gRPC-Web unary, empty payload, h2load 1 connection × 32 streams",
        web: Web::GrpcWeb,
        size: 0,
    },
    UnaryCase {
        name: "gRPC-Web unary, 1 KiB, h2load 1 connection × 32 streams",
        web: Web::GrpcWeb,
        size: 1024,
    },
];

/// The variant names: the web protocol on lodestar's server first.
const LODESTAR: &str = "lodestar";
const NATIVE: &str = "native gRPC";
const TONIC_WEB: &str = "tonic-web";

/// The WebSocket ping-pong, in [`rpc::one_run`]'s terms.
const WS_CASE: RpcCase = RpcCase {
    name: "bidi ping-pong, 1 KiB, 16 streams (ops = round trips)",
    call: "ws-ping-pong",
    size: 1024,
    concurrency: 16,
    rate: None,
};

/// [`WS_CASE`] over native gRPC.
const NATIVE_PING_PONG: RpcCase = RpcCase {
    call: "ping-pong",
    ..WS_CASE
};

/// Runs the scenario: every case, its variants alternately, a fresh
/// server process for every run.
pub(crate) async fn run(settings: &Settings) -> Result<Vec<Case>> {
    eprintln!("web: Connect, gRPC-Web and WebSocket beside native gRPC and tonic-web");
    // The lodestar server registers in it; idle while measuring.
    let (_registry, registry_url) = crate::registry::start_server(settings.server_cpu()).await?;
    let lodestar = Server::of(Side::Lodestar);
    let mut out = Vec::new();
    match h2load::find() {
        None => eprintln!(
            "web: NOTE: h2load not found, the unary cases are skipped \
             (Debian: apt-get install nghttp2-client, or set LODESTAR_H2LOAD)"
        ),
        Some(h2load) => {
            for case in UNARY_CASES {
                let variants: &[&str] = match case.web {
                    Web::ConnectJson => &[LODESTAR, NATIVE],
                    Web::GrpcWeb => &[LODESTAR, NATIVE, TONIC_WEB],
                };
                out.push(
                    harness::alternate(settings, "web", case.name, variants, |variant| {
                        let registry_url = registry_url.clone();
                        let h2load = h2load.clone();
                        async move {
                            unary_run(settings, case, &variant, &h2load, &registry_url).await
                        }
                    })
                    .await?,
                );
            }
        }
    }
    out.push(
        harness::alternate(
            settings,
            "web",
            WS_CASE.name,
            &[LODESTAR, NATIVE],
            |variant| {
                let registry_url = registry_url.clone();
                async move {
                    let case = if variant == LODESTAR {
                        &WS_CASE
                    } else {
                        &NATIVE_PING_PONG
                    };
                    // tonic's client for native gRPC; the WebSocket worker
                    // ignores the side and dials the address.
                    rpc::one_run(settings, case, lodestar, Side::Tonic, &registry_url).await
                }
            },
        )
        .await?,
    );
    Ok(out)
}

/// One h2load run of `case` against `variant`'s server and protocol.
async fn unary_run(
    settings: &Settings,
    case: &UnaryCase,
    variant: &str,
    h2load: &std::path::Path,
    registry_url: &str,
) -> Result<Sample> {
    let payload = rpc::raw::Payload {
        body: vec![0x5A; case.size],
    };
    let frame = h2load::grpc_frame(&payload)?;
    // The request, its headers, and the fewest reply bytes a success has
    // (the echo: the same message back; gRPC-Web adds a trailers frame).
    let (body, headers, min_reply): (Vec<u8>, &[&str], usize) = match (variant, case.web) {
        (NATIVE, _) => (frame.clone(), h2load::GRPC_HEADERS, frame.len()),
        (_, Web::GrpcWeb) => (
            frame.clone(),
            &["content-type: application/grpc-web+proto", "x-grpc-web: 1"],
            frame.len() + 5,
        ),
        (_, Web::ConnectJson) => {
            let json = connect_json(&payload.body);
            let len = json.len();
            (
                json,
                &[
                    "content-type: application/json",
                    "connect-protocol-version: 1",
                ],
                len,
            )
        }
    };
    let (mut server, addr) = if variant == TONIC_WEB {
        start_tonic_web(settings).await?
    } else {
        rpc::start_server(settings, Server::of(Side::Lodestar), registry_url, None).await?
    };
    let load = h2load::Load {
        h2load,
        url: format!("http://{addr}{UNARY_PATH}"),
        body,
        headers,
        streams: STREAMS,
        min_response_bytes: min_reply as u64,
    };
    let sample = h2load::run(settings, &load, &server).await?;
    server.terminate().await?;
    Ok(sample)
}

/// The benchmark's `Payload` in protobuf's JSON mapping: `{}` when empty
/// (proto3 leaves defaults out), else `{"body":"<base64>"}`.
fn connect_json(body: &[u8]) -> Vec<u8> {
    if body.is_empty() {
        return b"{}".to_vec();
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(body);
    format!(r#"{{"body":"{encoded}"}}"#).into_bytes()
}

/// A tonic-web server, ready.
async fn start_tonic_web(settings: &Settings) -> Result<(Proc, String)> {
    let args = ["web".to_owned(), "tonic-web-server".to_owned()];
    let mut server = Proc::spawn_self("tonic-web server", settings.server_cpu(), &args)?;
    let ready = server.expect("ready", Duration::from_secs(10)).await?;
    let addr = ready["addr"]
        .as_str()
        .ok_or("tonic-web server: no address")?
        .to_owned();
    Ok((server, addr))
}

// ---- the WebSocket worker ----

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// One open WebSocket call of `PingPong`: a message out, then its echo
/// back, checked byte for byte.
struct WsPingPong {
    socket: Socket,
    /// The message envelope sent each time (and expected back).
    envelope: Bytes,
}

/// Opens a `PingPong` call over a WebSocket to the lodestar server at
/// `target` (`host:port`), sending `body` each time: a worker of the
/// `ws-ping-pong` client ([`rpc::Call::WsPingPong`]).
pub(crate) async fn ws_ping_pong(target: String, body: Vec<u8>) -> Result<rpc::Worker> {
    let stream = tokio::time::timeout(WS_PATIENCE, tokio::net::TcpStream::connect(&target))
        .await
        .map_err(|_| format!("connecting to {target} took over {WS_PATIENCE:?}"))??;
    stream.set_nodelay(true)?;
    let mut request = format!("ws://{target}{PING_PONG_PATH}").into_client_request()?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", WS_PROTOCOL.parse()?);
    let (mut socket, response) = tokio::time::timeout(
        WS_PATIENCE,
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .map_err(|_| format!("the WebSocket handshake took over {WS_PATIENCE:?}"))??;
    let chosen = response.headers().get("sec-websocket-protocol");
    if chosen.map(|v| v.as_bytes()) != Some(WS_PROTOCOL.as_bytes()) {
        return Err(format!("the server chose sub-protocol {chosen:?}, not {WS_PROTOCOL}").into());
    }
    // The leading envelope (flags 0x04): no metadata, no deadline.
    let mut leading = vec![0x04, 0, 0, 0, 2];
    leading.extend_from_slice(b"{}");
    socket.send(Message::Binary(leading.into())).await?;
    // A message envelope (flags 0x00) is laid out as a gRPC frame.
    let envelope = h2load::grpc_frame(&rpc::raw::Payload { body })?.into();
    Ok(rpc::worker(WsPingPong { socket, envelope }))
}

impl Op for WsPingPong {
    async fn call(&mut self) -> Result<u64> {
        self.socket
            .send(Message::Binary(self.envelope.clone()))
            .await?;
        loop {
            let next = tokio::time::timeout(WS_PATIENCE, self.socket.next())
                .await
                .map_err(|_| format!("no answer within {WS_PATIENCE:?}"))?;
            match next {
                Some(Ok(Message::Binary(answer))) if answer == self.envelope => return Ok(1),
                Some(Ok(Message::Binary(answer))) => {
                    return Err(format!(
                        "expected the message back, got {} bytes with flags {:?}",
                        answer.len(),
                        answer.first()
                    )
                    .into());
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(other)) => return Err(format!("expected a message, got {other:?}").into()),
                Some(Err(e)) => return Err(e.into()),
                None => return Err("the server closed the socket".into()),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn connect_json_is_protobufs_json_mapping() {
        assert_eq!(connect_json(&[]), b"{}");
        assert_eq!(connect_json(&[0x5A; 3]), br#"{"body":"Wlpa"}"#);
    }
}
