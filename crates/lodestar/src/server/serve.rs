//! The accept loop, the per-connection HTTP/2 server, and the server stack.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::body::Body;
use tonic::service::Routes;

use std::sync::Arc;

use super::budget::{Budgeted, ConnectionBudget, ServerBudget};
use super::{Announcer, ConnectionLimits, Lifecycle};
use crate::MessageLimits;
use crate::body::{CallBody, Side};
use crate::codec::{self as json, Descriptors, Transcode};
use crate::compression::{Compress, Encoding, PerMessage, ReceivedFlags};
use crate::deadline;
use crate::frames::{Decompress, Reframer};
use crate::io::Rewind;
use http::HeaderValue;
use tonic::codec::SingleMessageCompressionOverride;

/// The least a connection holding response data must send per
/// `stall_timeout` not to count as stalled: 64 KiB (or all it held).
const MIN_PROGRESS: usize = 64 * 1024;

/// What runs for every request: the inbound deadline, then routing to the
/// service and method.
#[derive(Clone)]
pub(crate) struct Stack {
    routes: Routes,
    limits: MessageLimits,
    send_compressed: Option<Encoding>,
    inspect_compression: bool,
    descriptors: Descriptors,
    /// The budget of the connection this serves (set per connection).
    budget: Option<Arc<ConnectionBudget>>,
}

impl Stack {
    pub(crate) fn new(
        routes: Routes,
        limits: MessageLimits,
        send_compressed: Option<Encoding>,
        inspect_compression: bool,
        descriptors: Descriptors,
    ) -> Self {
        Self {
            routes,
            limits,
            send_compressed,
            inspect_compression,
            descriptors,
            budget: None,
        }
    }

    /// This stack, for a connection whose responses count against `budget`.
    fn for_connection(&self, budget: Arc<ConnectionBudget>) -> Self {
        Self {
            budget: Some(budget),
            ..self.clone()
        }
    }
}

/// Compresses a response if the server sends compressed, the client
/// accepts the encoding, and the handler did not opt out.
fn compress_response<B>(
    encoding: Option<Encoding>,
    response: &mut Response<B>,
) -> Option<Reframer> {
    let encoding = encoding?;
    let extensions = response.extensions();
    let disabled = extensions.get::<Compress>().is_some_and(|c| !c.0)
        || extensions.get::<SingleMessageCompressionOverride>()
            == Some(&SingleMessageCompressionOverride::Disable);
    let plan = extensions.get::<PerMessage>().cloned();
    if disabled && plan.is_none() {
        return None;
    }
    response
        .headers_mut()
        .insert("grpc-encoding", encoding.header_value());
    Some(Reframer::compressing(encoding, !disabled, plan))
}

/// A response as the server sends it.
type ServerResponse = Response<Budgeted<CallBody<Body>>>;

type StackFuture = Pin<Box<dyn Future<Output = Result<ServerResponse, Infallible>> + Send>>;

impl tower_service::Service<Request<Incoming>> for Stack {
    type Response = ServerResponse;
    type Error = Infallible;
    type Future = StackFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower_service::Service::<Request<CallBody<Incoming>>>::poll_ready(&mut self.routes, cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let budget = self.budget.clone();
        let budgeted = move |response: Response<CallBody<Body>>| -> ServerResponse {
            response.map(|body| Budgeted::new(body, budget))
        };
        let deadline = match deadline::inbound(request.headers()) {
            Ok(deadline) => deadline,
            Err(status) => {
                let json = json::is_json(request.headers());
                return Box::pin(std::future::ready(Ok(budgeted(reject(status, json)))));
            }
        };
        if let Some(deadline) = deadline {
            request.extensions_mut().insert(deadline);
        }
        let receive = Some(self.limits.max_decoding_message_size);
        let send = Some(self.limits.max_encoding_message_size);
        // Compress only for a client that accepts the encoding.
        let encoding = self
            .send_compressed
            .filter(|e| e.accepted_by(request.headers().get("grpc-accept-encoding")));
        let received = self.inspect_compression.then(ReceivedFlags::default);
        if let Some(received) = &received {
            request.extensions_mut().insert(received.clone());
        }
        // A JSON request is transcoded to protobuf on the way in, and its
        // response back to JSON on the way out.
        let json = if json::is_json(request.headers()) {
            match self.json_method(&request) {
                Ok(method) => Some(method),
                Err(status) => {
                    return Box::pin(std::future::ready(Ok(budgeted(reject(status, true)))));
                }
            }
        } else {
            None
        };
        let inbound = json.as_ref().map(|(method, gzip)| {
            let headers = request.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.remove("grpc-encoding"); // decompressed here, before transcoding
            Reframer::transcoding(
                Transcode::JsonToProto {
                    descriptor: method.input(),
                    peer_is_at_fault: true,
                },
                Decompress {
                    limit: self.limits.max_decoding_message_size,
                    gzip: *gzip,
                },
            )
        });
        let json = json.map(|(method, _)| method);
        let outbound = json.map(|method| Transcode::ProtoToJson(method.output()));
        // The caller's W3C trace context, for the calls and events the handler makes.
        let trace = crate::trace::TraceContext::from_headers(request.headers());
        let future = self.routes.call(request.map(|body| {
            CallBody::new(body, None, Side::Received, receive)
                .with_received_flags(received)
                .with_reframer(inbound)
        }));
        let future = async move {
            match trace {
                Some(trace) => trace.scope(future).await,
                None => future.await,
            }
        };
        let respond = move |mut response: Response<Body>, deadline| {
            let mut reframer = compress_response(encoding, &mut response);
            if let Some(transcode) = outbound {
                reframer = Some(reframer.unwrap_or_default().with_transcode(Some(transcode)));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static(json::CONTENT_TYPE),
                );
            }
            let trailers = response
                .extensions_mut()
                .remove::<crate::Trailers>()
                .map(|t| t.0.into_headers());
            response.map(|body| {
                CallBody::new(body, deadline, Side::ServerResponse, send)
                    .with_reframer(reframer)
                    .with_trailers(trailers)
            })
        };
        Box::pin(async move {
            let Some(deadline) = deadline else {
                let Ok(response) = future.await;
                return Ok(budgeted(respond(response, None)));
            };
            // The handler runs with the inbound deadline as the current one, and
            // is dropped (cancelled) when it passes.
            match tokio::time::timeout_at(deadline.instant(), deadline.scope(future)).await {
                Ok(Ok(response)) => Ok(budgeted(respond(response, Some(deadline)))),
                Err(_) => {
                    let status = deadline::exceeded("before the handler answered");
                    Ok(budgeted(reject(status, false)))
                }
            }
        })
    }
}

impl Stack {
    /// The method of a JSON request, and whether its messages may be
    /// gzip-compressed; or why it cannot be served as JSON.
    fn json_method<B>(
        &self,
        request: &Request<B>,
    ) -> Result<(prost_reflect::MethodDescriptor, bool), tonic::Status> {
        let path = request.uri().path();
        let method = self.descriptors.method(path).ok_or_else(|| {
            tonic::Status::unimplemented(format!(
                "JSON is not available for {path}: this server has no descriptors for it \
                 (an unknown method, or a service added without them: see ServiceBuilder::reflect)"
            ))
        })?;
        let gzip = match request
            .headers()
            .get("grpc-encoding")
            .map(HeaderValue::as_bytes)
        {
            None | Some(b"identity") => false,
            Some(b"gzip") => true,
            Some(other) => {
                let mut status = tonic::Status::unimplemented(format!(
                    "this server cannot decompress `{}` (it accepts gzip)",
                    String::from_utf8_lossy(other)
                ));
                status.metadata_mut().insert(
                    "grpc-accept-encoding",
                    tonic::metadata::MetadataValue::from_static("gzip,identity"),
                );
                return Err(status);
            }
        };
        Ok((method, gzip))
    }
}

/// A trailers-only response carrying `status`.
fn reject(status: tonic::Status, json: bool) -> Response<CallBody<Body>> {
    let mut response = status.into_http::<Body>();
    if json {
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(json::CONTENT_TYPE),
        );
    }
    response.map(|body| CallBody::new(body, None, Side::ServerResponse, None))
}

/// How connections are served: TLS or not, HTTP/2 settings, and limits.
pub(crate) struct Connections {
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) http2: crate::Http2Settings,
    pub(crate) limits: ConnectionLimits,
}

/// Accepts connections until told to stop, then closes the listener, asks
/// every connection to finish (GOAWAY), and waits up to `grace` for them.
pub(crate) async fn serve(
    listener: TcpListener,
    stack: Stack,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    events: Arc<Announcer>,
    connections: Connections,
) {
    let Connections {
        tls,
        http2: settings,
        limits,
    } = connections;
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .adaptive_window(settings.adaptive_window)
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .max_concurrent_streams(settings.max_concurrent_streams);
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let unsent = ServerBudget::new(limits.max_unsent_bytes);
    // Whether the last connection was refused, to warn once per episode.
    let mut refusing = false;
    let stopped = async move {
        // A dropped sender means the handle was dropped: keep serving.
        if stop.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            () = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Count only connections still open.
                    while connections.try_join_next().is_some() {}
                    if connections.len() >= limits.max_connections {
                        if !refusing {
                            tracing::warn!(max_connections = limits.max_connections,
                                "at the connection limit: closing new connections until some end");
                        }
                        refusing = true;
                        tracing::debug!(%peer, "connection refused: at the connection limit");
                        drop(stream);
                        continue;
                    }
                    refusing = false;
                    let budget = ConnectionBudget::new(
                        limits.max_unsent_bytes_per_connection,
                        unsent.clone(),
                    );
                    connections.spawn(serve_connection(
                        stream,
                        settings.handshake_timeout,
                        tls.clone(),
                        http2.clone(),
                        Served {
                            stack: stack.for_connection(budget.clone()),
                            budget,
                            stall_timeout: limits.stall_timeout,
                        },
                        drain_rx.clone(),
                    ));
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    events.announce(Lifecycle::ListenerClosed);
    let _ = drain_tx.send(true);
    let open = connections.len();
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    let cut = match drained {
        Ok(()) => 0,
        Err(_) => {
            let cut = connections.len();
            tracing::warn!(
                cut,
                open,
                ?grace,
                "grace period over; cutting the remaining connections"
            );
            connections.shutdown().await;
            cut
        }
    };
    events.announce(Lifecycle::Drained { cut });
}

/// The client connection preface every HTTP/2 connection starts with.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What serves one connection: the stack for its calls, and the budget it
/// watches for stalls.
struct Served {
    stack: Stack,
    budget: Arc<ConnectionBudget>,
    stall_timeout: Duration,
}

async fn serve_connection(
    stream: TcpStream,
    handshake_timeout: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    served: Served,
    drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let started = tokio::time::Instant::now() + handshake_timeout;
    // In the connection's own task, so a slow client holds up no one else;
    // a client that never finishes its handshake is dropped.
    let Some(acceptor) = tls else {
        if let Some(stream) = expect_preface(stream, started, peer).await {
            run_connection(TokioIo::new(stream), http2, served, drain, peer).await;
        }
        return;
    };
    let stream = match tokio::time::timeout_at(started, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return tracing::info!(?peer, error = %e, "TLS handshake failed"),
        Err(_) => {
            return tracing::info!(?peer, "TLS handshake timed out after {handshake_timeout:?}");
        }
    };
    if let Some(stream) = expect_preface(stream, started, peer).await {
        run_connection(TokioIo::new(stream), http2, served, drain, peer).await;
    }
}

/// Reads the HTTP/2 preface before `deadline` (hyper would wait forever),
/// and hands back a stream that replays it.
async fn expect_preface<S>(
    mut stream: S,
    deadline: tokio::time::Instant,
    peer: Option<std::net::SocketAddr>,
) -> Option<Rewind<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt as _;
    let mut preface = vec![0u8; PREFACE.len()];
    match tokio::time::timeout_at(deadline, stream.read_exact(&mut preface)).await {
        Ok(Ok(_)) => Some(Rewind::new(preface, stream)),
        Ok(Err(e)) => {
            tracing::debug!(?peer, error = %e, "connection closed before the HTTP/2 preface");
            None
        }
        Err(_) => {
            tracing::info!(?peer, "no HTTP/2 preface in time; closing the connection");
            None
        }
    }
}

async fn run_connection<I>(
    io: I,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    served: Served,
    mut drain: watch::Receiver<bool>,
    peer: Option<std::net::SocketAddr>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let Served {
        stack,
        budget,
        stall_timeout,
    } = served;
    let connection = http2.serve_connection(io, TowerToHyperService::new(stack));
    tokio::pin!(connection);
    // A stall: data held at two checks in a row, and less than
    // MIN_PROGRESS of it (or of what was held) sent between.
    let mut stall_check =
        tokio::time::interval_at(tokio::time::Instant::now() + stall_timeout, stall_timeout);
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (budget.held(), budget.sent());
    let mut draining = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, draining, "connection ended with an error");
                }
                return;
            }
            _ = drain.wait_for(|d| *d), if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = stall_check.tick() => {
                let now = (budget.held(), budget.sent());
                // A client that takes a trickle (a byte now and then) holds
                // its budget as surely as one that takes nothing: progress
                // is at least MIN_PROGRESS, or all that was held.
                let needed = last.0.min(MIN_PROGRESS);
                let sent = now.1.saturating_sub(last.1);
                if last.0 > 0 && now.0 > 0 && sent < needed as u64 {
                    tracing::info!(?peer, held = now.0, sent, ?stall_timeout,
                        "closing a connection whose client reads too little of its responses");
                    return;
                }
                last = now;
            }
        }
    }
}
