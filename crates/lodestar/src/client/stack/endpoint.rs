//! The endpoint layer: sending one attempt over the connection to the
//! chosen instance.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use h2::RecvStream;
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use lodestar_core::error::chain;

use super::balance::{AttemptFailure, Balance, Failure};
use super::retry::Leftover;
use crate::body::{RequestBody, RequestError};
use crate::client::connection::Sender;
use crate::client::observe::{AttemptGuard, Observed, Outcome};
use crate::client::selector::Endpoint;
use crate::client::stream::{self, NotSent, Received};
use crate::client::web::{self, Protocol};

/// Sends `request` to `endpoint` and says what is left of it if that
/// fails. Over an open connection the request goes out now, before the
/// returned future is first polled; otherwise the future connects first
/// (boxed: it is rare, and as large as a TCP and TLS handshake). A refused
/// connection ejects the endpoint.
pub(crate) fn send<'a>(
    balance: &'a Balance,
    endpoint: Arc<Endpoint>,
    request: Request<RequestBody>,
    guard: AttemptGuard,
) -> impl Future<Output = Result<Response<Observed>, Failure>> + Send + 'a {
    if let Some(sender) = endpoint.connection.live() {
        return Either::Left(exchange(balance, endpoint, sender, request, guard));
    }
    Either::Right(Box::pin(async move {
        let config = &balance.config;
        match endpoint
            .connection
            .connect(config.connect_timeout, config.tls.as_ref(), config.http2)
            .await
        {
            Ok(sender) => {
                let mut guard = guard;
                guard.connected();
                exchange(balance, endpoint, sender, request, guard).await
            }
            Err(e) => {
                if e.attempted {
                    balance.eject(&endpoint);
                }
                guard.finish(Outcome::Transport(e.message.clone()));
                let leftover = Leftover::Untouched {
                    request,
                    same_endpoint: false,
                };
                Err(failed(&endpoint, leftover, e.message))
            }
        }
    }))
}

/// Hands `request` to the connection now; the future waits for the
/// response's headers.
fn exchange(
    balance: &Balance,
    endpoint: Arc<Endpoint>,
    sender: Arc<Sender>,
    mut request: Request<RequestBody>,
    mut guard: AttemptGuard,
) -> impl Future<Output = Result<Response<Observed>, Failure>> + Send + use<> {
    set_origin(&mut request, &endpoint, balance.config.tls.is_some());
    // The one branch native gRPC pays for the choice of protocol.
    let web = match balance.config.protocol {
        Protocol::Grpc => None,
        protocol => {
            let unary = match request.extensions().get::<web::CallKind>() {
                Some(kind) => *kind == web::CallKind::Unary,
                None => {
                    let path = request.uri().path();
                    super::metered::kind(request.extensions().get(), path)
                        == crate::metrics::rpc::Kind::Unary
                }
            };
            let limit = balance.config.limits.max_decoding_message_size;
            match web::prepare(&mut request, protocol, unary, limit) {
                Ok(decoder) => Some(decoder),
                Err(status) => {
                    guard.finish(Outcome::Status(status.code()));
                    return Either::Right(std::future::ready(Err(failed(
                        &endpoint,
                        Leftover::Fail(status),
                        String::new(),
                    ))));
                }
            }
        }
    };
    let request_error = request.body().error().clone();
    match stream::send(&sender, request) {
        Ok(sent) => {
            guard.sent();
            Either::Left(Exchange {
                response: sent.response,
                waiting: Some(Waiting {
                    endpoint,
                    sender,
                    request_error,
                    guard,
                    cancel: sent.cancel,
                    web,
                }),
            })
        }
        Err(NotSent::Connection { request, error }) => {
            // Closing or going away: the next call opens a new connection,
            // and this one may go anywhere, as it never left.
            endpoint.connection.reset(&sender);
            let message = format!("{} ({})", sender.failure(&error), endpoint.instance.address);
            guard.finish(Outcome::Transport(message.clone()));
            let leftover = Leftover::Untouched {
                request: *request,
                same_endpoint: true,
            };
            Either::Right(std::future::ready(Err(failed(
                &endpoint, leftover, message,
            ))))
        }
        Err(NotSent::Lost(error)) => {
            endpoint.connection.reset(&sender);
            let message = format!(
                "{} ({}); the connection closed as the request was handed to it, before \
                 any of it went out",
                sender.failure(&error),
                endpoint.instance.address
            );
            guard.finish(Outcome::Transport(message.clone()));
            Either::Right(std::future::ready(Err(failed(
                &endpoint,
                Leftover::Replay { unsent: true },
                message,
            ))))
        }
        Err(NotSent::Refused(error)) => {
            let status = tonic::Status::internal(format!(
                "HTTP/2 refused the request to {}: {}",
                endpoint.instance.address,
                chain(&error)
            ));
            guard.finish(Outcome::Status(status.code()));
            Either::Right(std::future::ready(Err(failed(
                &endpoint,
                Leftover::Fail(status),
                String::new(),
            ))))
        }
    }
}

pin_project_lite::pin_project! {
    /// An attempt sent, waiting for the response's headers.
    struct Exchange {
        #[pin]
        response: h2::client::ResponseFuture,
        // Taken when the response comes.
        waiting: Option<Waiting>,
    }
}

/// What an attempt needs to know once its response (or error) comes.
struct Waiting {
    endpoint: Arc<Endpoint>,
    sender: Arc<Sender>,
    request_error: RequestError,
    guard: AttemptGuard,
    cancel: Option<stream::OnDrop>,
    /// How to read the response back, for a call over gRPC-Web or Connect.
    web: Option<Box<web::Decoder>>,
}

impl Future for Exchange {
    type Output = Result<Response<Observed>, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.response.poll(cx));
        match this.waiting.take() {
            Some(waiting) => Poll::Ready(waiting.outcome(result)),
            // Polled after it was ready: a bug in the caller; never hang.
            None => Poll::Ready(Err(Failure::NoEndpoint)),
        }
    }
}

impl Waiting {
    fn outcome(
        self,
        result: Result<Response<RecvStream>, h2::Error>,
    ) -> Result<Response<Observed>, Failure> {
        let Waiting {
            endpoint,
            sender,
            request_error,
            mut guard,
            cancel,
            web,
        } = self;
        match result {
            Ok(mut response) => {
                if let Some(mut web) = web {
                    web.response(&mut response);
                    return Ok(web_response(response, web, cancel, guard, &endpoint));
                }
                endpoint.stats.connected();
                guard.answered();
                // A trailers-only response (its headers end the stream)
                // carries its status in its headers.
                let trailers_only = response.body().is_end_stream();
                let guard = match trailers_only
                    .then(|| crate::status::code_in(response.headers()))
                    .flatten()
                {
                    Some(code) => {
                        guard.finish(Outcome::Status(code));
                        None
                    }
                    None => Some(guard),
                };
                Ok(response.map(|body| Observed::new(Received::new(body, cancel), guard)))
            }
            Err(e) => {
                if let Some(status) = request_error.get().cloned() {
                    // Our own request body failed (e.g. a message over the
                    // send limit): that is the error, and the connection is fine.
                    guard.finish(Outcome::Status(status.code()));
                    return Err(failed(&endpoint, Leftover::Fail(status), String::new()));
                }
                if !e.is_reset() || e.is_go_away() {
                    // Not just this stream: the connection failed.
                    endpoint.connection.reset(&sender);
                }
                let message = format!("{} ({})", sender.failure(&e), endpoint.instance.address);
                guard.finish(Outcome::Transport(message.clone()));
                Err(failed(
                    &endpoint,
                    Leftover::Replay { unsent: false },
                    message,
                ))
            }
        }
    }
}

/// A web call's response, read back as native gRPC's by `web`.
fn web_response(
    response: Response<RecvStream>,
    web: Box<web::Decoder>,
    cancel: Option<stream::OnDrop>,
    mut guard: AttemptGuard,
    endpoint: &Endpoint,
) -> Response<Observed> {
    endpoint.stats.connected();
    guard.answered();
    let trailers_only = response.body().is_end_stream();
    let guard = match trailers_only
        .then(|| crate::status::code_in(response.headers()))
        .flatten()
    {
        Some(code) => {
            guard.finish(Outcome::Status(code));
            None
        }
        None => Some(guard),
    };
    response.map(|body| Observed::new(Received::web(body, cancel, web), guard))
}

fn failed(endpoint: &Endpoint, leftover: Leftover, message: String) -> Failure {
    Failure::Attempt(Box::new(AttemptFailure {
        leftover,
        message,
        address: endpoint.instance.address.clone(),
        connection: endpoint.connection.clone(),
    }))
}

fn set_origin(request: &mut Request<RequestBody>, endpoint: &Endpoint, tls: bool) {
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = Some(endpoint.authority.clone());
    parts.path_and_query = Some(path);
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}
